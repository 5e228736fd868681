//! The optional hooks: for each purpose, the programs that can serve it, best first, and
//! what an operator loses when this kernel allows none of them. The choice is made from
//! the kernel's BTF (which tracepoints exist, how many arguments a function takes) and
//! then by loading: a program the kernel refuses is unloaded and the next one tried, so
//! an optional program never stops the agent.
use std::os::fd::AsFd;

use aya::{
    Ebpf,
    programs::{BtfTracePoint, CgroupAttachMode, FExit, ProgramError, SockOps},
};
use serde::Serialize;

use super::{Link, chain, prog};
use crate::btf::Btf as KernelBtf;

#[derive(Debug, Clone, Copy)]
pub enum Attach {
    TpBtf(&'static str),
    FExit(&'static str),
    /// cgroup sock_ops on the counted cgroup.
    SockOps,
}

#[derive(Debug)]
pub struct Candidate {
    pub program: &'static str,
    pub attach: Attach,
    /// fexit: the traced function's argument count this program's return-value slot
    /// assumes.
    pub args: Option<usize>,
    /// Reads the socket cookie at the BTF offset of `sk_cookie`: for kernels whose
    /// tracing programs may not call bpf_get_socket_cookie (before 5.12).
    pub compat: bool,
}

#[derive(Debug)]
pub struct Purpose {
    pub name: &'static str,
    pub candidates: &'static [Candidate],
    /// What is lost without any of them (None: the agent cannot run without one).
    pub without: Option<&'static str>,
}

const fn tp(program: &'static str, tp: &'static str, compat: bool) -> Candidate {
    Candidate {
        program,
        attach: Attach::TpBtf(tp),
        args: None,
        compat,
    }
}

const fn accept(program: &'static str, args: usize, compat: bool) -> Candidate {
    Candidate {
        program,
        attach: Attach::FExit("inet_csk_accept"),
        args: Some(args),
        compat,
    }
}

/// TCP sockets are finished (final record, entries removed) when they reach TCP_CLOSE.
pub const TCP_CLOSE: Purpose = Purpose {
    name: "tcp_close",
    candidates: &[
        tp("sockacct_tcp_state", "inet_sock_set_state", false),
        tp("sockacct_tcp_state_compat", "inet_sock_set_state", true),
    ],
    without: None,
};

/// The exact owner of accepted sockets: the task that accept()s them.
pub const ACCEPT: Purpose = Purpose {
    name: "accept_owner",
    candidates: &[
        accept("sockacct_accept", 2, false),
        accept("sockacct_accept4", 4, false),
        accept("sockacct_accept4_compat", 4, true),
    ],
    without: Some(
        "server-side (accepted) sockets are labelled with the first process that sends or \
         receives on them, and with their listener's owner until then",
    ),
};

/// Without the accept hook: the first process that receives on an accepted socket.
pub const FIRST_RECV: Purpose = Purpose {
    name: "first_recv_owner",
    candidates: &[
        tp("sockacct_first_recv", "tcp_rcv_space_adjust", false),
        tp("sockacct_first_recv_compat", "tcp_rcv_space_adjust", true),
        tp("sockacct_first_recv_any", "sock_recv_length", false),
    ],
    without: Some(
        "an accepted socket that never sends keeps its listener's owner until it is closed",
    ),
};

/// Without the accept hook: the first process that sends on an accepted socket.
pub const FIRST_SEND: Purpose = Purpose {
    name: "first_send_owner",
    candidates: &[
        tp("sockacct_first_send", "tcp_sendmsg_locked", false),
        tp("sockacct_first_send_any", "sock_send_length", false),
    ],
    without: Some(
        "an accepted socket that sends before it receives keeps its listener's owner until then",
    ),
};

/// An owner entry for accepted sockets at the end of the handshake (and, on old kernels,
/// their cookie, which the compat programs read rather than create).
pub const PASSIVE: Purpose = Purpose {
    name: "passive_open",
    candidates: &[Candidate {
        program: "sockacct_passive",
        attach: Attach::SockOps,
        args: None,
        compat: false,
    }],
    without: Some(
        "accepted sockets are labelled with their listener's owner until the process that \
         closes them is known",
    ),
};

/// What was chosen for one purpose, and why the better candidates were not.
#[derive(Debug, Clone, Serialize)]
pub struct HookChoice {
    pub purpose: &'static str,
    /// The program in use; None when the kernel allows none of them.
    pub program: Option<&'static str>,
    /// Where it is attached (e.g. `fexit/inet_csk_accept`).
    pub target: Option<String>,
    /// Candidates passed over, with the reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passed_over: Vec<String>,
    /// What is lost, when nothing serves the purpose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<&'static str>,
}

impl HookChoice {
    /// `purpose=program` (`none` when nothing serves it), as logs, metrics and coverage
    /// records show it.
    pub fn short(&self) -> String {
        format!("{}={}", self.purpose, self.program.unwrap_or("none"))
    }
}

pub(crate) struct Chooser<'a> {
    pub ebpf: &'a mut Ebpf,
    pub aya_btf: &'a aya::Btf,
    pub kbtf: &'a KernelBtf,
    pub cookie_offset: Option<u32>,
    pub cgroup: &'a std::fs::File,
}

fn target(a: Attach) -> String {
    match a {
        Attach::TpBtf(t) => format!("tp_btf/{t}"),
        Attach::FExit(f) => format!("fexit/{f}"),
        Attach::SockOps => "cgroup/sock_ops".into(),
    }
}

/// The first lines of a verifier refusal: enough to tell why, short enough for a log.
fn refusal(e: ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            // The verifier's last words before its statistics say why.
            let stats = [
                "processed ",
                "stack depth",
                "verification time",
                "max_states",
            ];
            let last = log
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty() && !stats.iter().any(|s| l.starts_with(s)))
                .unwrap_or("")
                .to_string();
            if last.is_empty() {
                format!("refused: {io_error}")
            } else {
                format!("refused: {io_error}: {last}")
            }
        }
        other => chain(&other),
    }
}

impl Chooser<'_> {
    /// Loads and attaches the best candidate this kernel allows.
    pub(crate) fn choose(&mut self, p: &Purpose, links: &mut Vec<Link>) -> HookChoice {
        let mut passed_over = vec![];
        for c in p.candidates {
            match self.try_one(c) {
                Ok(link) => {
                    links.push(link);
                    return HookChoice {
                        purpose: p.name,
                        program: Some(c.program),
                        target: Some(target(c.attach)),
                        passed_over,
                        lost: None,
                    };
                }
                Err(why) => passed_over.push(format!("{}: {why}", c.program)),
            }
        }
        HookChoice {
            purpose: p.name,
            program: None,
            target: None,
            passed_over,
            lost: p.without,
        }
    }

    fn try_one(&mut self, c: &Candidate) -> Result<Link, String> {
        if c.compat && self.cookie_offset.is_none() {
            return Err("needs sk_cookie's offset, which this kernel's BTF does not give".into());
        }
        match c.attach {
            Attach::TpBtf(tp) => {
                if !self.kbtf.has_tracepoint(tp) {
                    return Err(format!("this kernel has no tracepoint {tp}"));
                }
                let p: &mut BtfTracePoint = prog(self.ebpf, c.program).map_err(|e| chain(&e))?;
                p.load(tp, self.aya_btf).map_err(refusal)?;
                match p.attach() {
                    Ok(id) => Ok(Link::Tp(c.program, id)),
                    Err(e) => {
                        let _ = p.unload();
                        Err(format!("attach failed: {}", chain(&e)))
                    }
                }
            }
            Attach::FExit(func) => {
                if let Some(want) = c.args {
                    match self.kbtf.func_arg_count(func) {
                        Some(n) if n == want => {}
                        Some(n) => {
                            return Err(format!("{func} takes {n} arguments here, not {want}"));
                        }
                        None => return Err(format!("this kernel's BTF does not describe {func}")),
                    }
                }
                let p: &mut FExit = prog(self.ebpf, c.program).map_err(|e| chain(&e))?;
                p.load(func, self.aya_btf).map_err(refusal)?;
                match p.attach() {
                    Ok(id) => Ok(Link::FExit(c.program, id)),
                    Err(e) => {
                        let _ = p.unload();
                        Err(format!("attach failed: {}", chain(&e)))
                    }
                }
            }
            Attach::SockOps => {
                let p: &mut SockOps = prog(self.ebpf, c.program).map_err(|e| chain(&e))?;
                p.load().map_err(refusal)?;
                match p.attach(self.cgroup.as_fd(), CgroupAttachMode::Single) {
                    Ok(id) => Ok(Link::SockOps(c.program, id)),
                    Err(e) => {
                        let _ = p.unload();
                        Err(format!("attach failed: {}", chain(&e)))
                    }
                }
            }
        }
    }
}
