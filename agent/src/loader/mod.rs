//! Loader: checks the host can run us, loads the kernel programs, attaches them, and
//! detaches everything again (no program, link or qdisc left behind).
use std::{
    ffi::CString,
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use agent_common::*;
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuHashMap, PerCpuValues},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, FExit,
        ProgramError, SchedClassifier, SockOps, TcAttachType, cgroup_skb::CgroupSkbLinkId,
        cgroup_sock::CgroupSockLinkId, fexit::FExitLinkId, sock_ops::SockOpsLinkId,
        tc::SchedClassifierLinkId, tp_btf::BtfTracePointLinkId,
    },
};
use log::{info, warn};
use thiserror::Error;

mod clsact;
pub mod hooks;
mod tc_record;

/// The compiled kernel programs (built by agent/build.rs; empty unless it was asked to).
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SOCKACCT_BPF_OBJ"));

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "sockacct needs root or the capabilities {missing} to load and attach kernel programs. \
         Run it as root (sudo sockacct run), or grant them (systemd: AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN)"
    )]
    NotPrivileged { missing: String },
    #[error(
        "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): sockacct needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.4 are)"
    )]
    NoBtf,
    #[error(
        "no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/self/mountinfo). Mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`, or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error(
        "cgroup path {path} does not exist or cannot be opened: {source}. Pass an existing cgroup v2 directory with --cgroup"
    )]
    CgroupMissing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a cgroup v2 directory (it is on another file system). Use a directory under the cgroup2 mount {mount}"
    )]
    NotCgroup2 { path: PathBuf, mount: String },
    #[error(
        "interface {0:?} does not exist (see `ip link`); fix --iface or `interfaces` in the config"
    )]
    NoInterface(String),
    #[error("loading the kernel object failed: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("the kernel refused program {name}: {detail}")]
    Program { name: &'static str, detail: String },
    #[error("attaching {name} to {target} failed: {detail}")]
    Attach {
        name: &'static str,
        target: String,
        detail: String,
    },
    #[error(
        "this sockacct binary was built without its kernel programs (SOCKACCT_BUILD_EBPF was not \
         set). Build it with `cargo xtask run` or `cargo xtask package`, or \
         `SOCKACCT_BUILD_EBPF=1 cargo build --release -p sockacct`"
    )]
    NoKernelObject,
    #[error("reading the kernel's BTF: {0}")]
    BadBtf(String),
    #[error("map {0} is missing from the kernel object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

/// What to load and where.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// cgroup v2 directory to count under; None = the cgroup2 mount's root.
    pub cgroup: Option<PathBuf>,
    /// Interfaces to count per interface with tc.
    pub interfaces: Vec<String>,
    /// Capacity of the per-socket and owner maps.
    pub max_sockets: u32,
    /// Count unconnected UDP sockets per peer (for flow records).
    pub per_peer: bool,
    /// Where a run that attaches netlink tc filters (no tcx) records them, so the next run
    /// removes what a killed one left (the run's state directory). None (`sockacct
    /// check`): nothing recorded, nothing stale removed.
    pub tc_record: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            cgroup: None,
            interfaces: vec![],
            max_sockets: DEFAULT_MAX_SOCKETS,
            per_peer: false,
            tc_record: None,
        }
    }
}

/// Checks privileges, BTF and cgroup v2; returns the cgroup directory to attach to.
pub fn preflight(cgroup: Option<&Path>) -> Result<PathBuf, LoadError> {
    let missing = missing_capabilities();
    if !missing.is_empty() {
        return Err(LoadError::NotPrivileged {
            missing: missing.join(", "),
        });
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(LoadError::NoBtf);
    }
    let mount = crate::procfs::cgroup2_mount().ok_or(LoadError::NoCgroup2)?;
    let path = cgroup
        .map(Path::to_path_buf)
        .unwrap_or_else(|| mount.clone());
    if let Err(source) = std::fs::metadata(&path) {
        return Err(LoadError::CgroupMissing { path, source });
    }
    if statfs_type(&path) != Some(CGROUP2_SUPER_MAGIC) {
        return Err(LoadError::NotCgroup2 {
            path,
            mount: mount.display().to_string(),
        });
    }
    Ok(path)
}

fn statfs_type(p: &Path) -> Option<i64> {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_type as i64)
}

/// Capabilities we need that the effective set lacks (CAP_SYS_ADMIN stands in for
/// CAP_BPF and CAP_PERFMON, as the kernel allows).
pub fn missing_capabilities() -> Vec<&'static str> {
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut missing = vec![];
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

pub(crate) enum Link {
    Skb(&'static str, CgroupSkbLinkId),
    Sock(&'static str, CgroupSockLinkId),
    Tp(&'static str, BtfTracePointLinkId),
    FExit(&'static str, FExitLinkId),
    Tc(&'static str, SchedClassifierLinkId),
    SockOps(&'static str, SockOpsLinkId),
}

/// The loaded and attached programs and their maps.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub cgroup: PathBuf,
    /// (ifindex, name) of every interface counted with tc.
    pub interfaces: Vec<(u32, String)>,
    /// False when the accept hook could not be attached (server-side sockets then take the
    /// owner of the first process that sends or receives on them, their listener's until
    /// then).
    pub accept_hook: bool,
    /// The optional hooks chosen for this kernel, per purpose.
    pub hooks: Vec<hooks::HookChoice>,
    links: Vec<Link>,
    /// clsact qdiscs the agent added (ifindex, name): removed after the links.
    qdiscs: Vec<(u32, String)>,
    /// The record of our netlink tc filters: removed once they are.
    tc_record: Option<PathBuf>,
    _cgroup_fd: File,
}

fn program_error(name: &'static str, e: ProgramError) -> LoadError {
    let detail = match &e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            format!(
                "{io_error}\nverifier log (last {} lines):\n{}",
                tail.len(),
                tail.join("\n")
            )
        }
        other => chain(other),
    };
    LoadError::Program { name, detail }
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

fn attach_error(name: &'static str, target: impl Into<String>, e: ProgramError) -> LoadError {
    LoadError::Attach {
        name,
        target: target.into(),
        detail: chain(&e),
    }
}

pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Checks the host ([`preflight`]), then loads and attaches everything.
pub fn load(opts: &LoadOptions) -> Result<Loaded, LoadError> {
    load_checked(preflight(opts.cgroup.as_deref())?, opts)
}

/// Loads and attaches everything to `cgroup`, the directory [`preflight`] returned.
pub fn load_checked(cgroup: PathBuf, opts: &LoadOptions) -> Result<Loaded, LoadError> {
    let cg = File::open(&cgroup).map_err(|source| LoadError::CgroupMissing {
        path: cgroup.clone(),
        source,
    })?;
    let mut ifaces = vec![];
    for name in &opts.interfaces {
        ifaces.push((
            ifindex(name).ok_or_else(|| LoadError::NoInterface(name.clone()))?,
            name.clone(),
        ));
    }

    if BPF_OBJECT.is_empty() {
        return Err(LoadError::NoKernelObject);
    }
    raise_memlock_limit();
    // One parse of the kernel's BTF for the loader's relocations and the hook choice
    // (EbpfLoader would parse its own copy: tens of MB at the agent's startup peak).
    let aya_btf = Btf::from_sys_fs().map_err(|_| LoadError::NoBtf)?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&aya_btf))
        .map_max_entries(MAP_SOCKS, opts.max_sockets)
        .map_max_entries(MAP_OWNERS, opts.max_sockets)
        .load(BPF_OBJECT)?;
    // Settings before any program is attached, so the first packet already sees them.
    set_setting(
        &mut ebpf,
        SETTINGS_FLAGS,
        if opts.per_peer { SETTING_PER_PEER } else { 0 },
    )?;
    let mut links = vec![];

    for (name, ty) in [
        ("sockacct_ingress", CgroupSkbAttachType::Ingress),
        ("sockacct_egress", CgroupSkbAttachType::Egress),
    ] {
        let p: &mut CgroupSkb = prog(&mut ebpf, name).map_err(|e| program_error(name, e))?;
        p.load().map_err(|e| program_error(name, e))?;
        // Single: links already let several programs share a cgroup; AllowMultiple is EINVAL.
        let id = p
            .attach(cg.as_fd(), ty, CgroupAttachMode::Single)
            .map_err(|e| attach_error(name, cgroup.display().to_string(), e))?;
        links.push(Link::Skb(name, id));
    }
    for name in ["sockacct_sock_create", "sockacct_sock_release"] {
        let p: &mut CgroupSock = prog(&mut ebpf, name).map_err(|e| program_error(name, e))?;
        p.load().map_err(|e| program_error(name, e))?;
        let id = p
            .attach(cg.as_fd(), CgroupAttachMode::Single)
            .map_err(|e| attach_error(name, cgroup.display().to_string(), e))?;
        links.push(Link::Sock(name, id));
    }

    let kbtf = crate::btf::Btf::kernel().map_err(|e| LoadError::BadBtf(e.to_string()))?;
    let cookie_offset = kbtf.member_offset("sock_common", "skc_cookie");
    if let Some(off) = cookie_offset {
        set_setting(&mut ebpf, SETTINGS_COOKIE_OFFSET, off)?;
    }
    let mut chooser = hooks::Chooser {
        ebpf: &mut ebpf,
        aya_btf: &aya_btf,
        kbtf: &kbtf,
        cookie_offset,
        cgroup: &cg,
    };
    let mut chosen = vec![];
    let close = chooser.choose(&hooks::TCP_CLOSE, &mut links);
    if close.program.is_none() {
        return Err(LoadError::Program {
            name: "sockacct_tcp_state",
            detail: format!(
                "no program this kernel accepts can see TCP sockets close, and without that \
                 their entries are never finished ({}). sockacct needs Linux 5.10 or later \
                 with BTF; before 5.12 it reads socket cookies with bpf_probe_read_kernel, \
                 which lockdown=confidentiality forbids",
                close.passed_over.join("; ")
            ),
        });
    }
    chosen.push(close);
    let accept = chooser.choose(&hooks::ACCEPT, &mut links);
    // The compat accept hook reads cookies instead of creating them: the end of the
    // handshake (sock_ops) hands out the accepted socket's cookie before accept() runs.
    let accept_compat = accept.program.is_some_and(|p| p.ends_with("_compat"));
    let accept_hook = accept.program.is_some();
    chosen.push(accept);
    if !accept_hook {
        // TCP's own send and receive paths first, not sock_send_length/sock_recv_length:
        // those run for every send and receive of every socket on the machine.
        chosen.push(chooser.choose(&hooks::FIRST_RECV, &mut links));
        chosen.push(chooser.choose(&hooks::FIRST_SEND, &mut links));
    }
    if !accept_hook || accept_compat {
        // Accepted sockets get their owner entry at the end of the handshake, so the
        // hooks above find it even before the socket's first packet.
        chosen.push(chooser.choose(&hooks::PASSIVE, &mut links));
    }
    for c in &chosen {
        match (c.program, c.lost) {
            (Some(p), _) if !c.passed_over.is_empty() => {
                info!("{}: using {p} ({})", c.purpose, c.passed_over.join("; "))
            }
            (None, Some(lost)) => warn!(
                "{}: this kernel allows none of its hooks ({}); {lost}",
                c.purpose,
                c.passed_over.join("; ")
            ),
            _ => {}
        }
    }

    let mut qdiscs = vec![];
    let mut tc_recorded = None;
    if !ifaces.is_empty() {
        let mut m: PerCpuHashMap<&mut MapData, u32, SlotCounters> = PerCpuHashMap::try_from(
            ebpf.map_mut(MAP_IFACES)
                .ok_or(LoadError::MissingMap(MAP_IFACES))?,
        )
        .map_err(|source| LoadError::Map {
            name: MAP_IFACES,
            source,
        })?;
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| LoadError::Map {
            name: MAP_IFACES,
            source: e.into(),
        })?;
        for (idx, _) in &ifaces {
            let zero =
                PerCpuValues::try_from(vec![SlotCounters::default(); ncpus]).map_err(|e| {
                    LoadError::Map {
                        name: MAP_IFACES,
                        source: e.into(),
                    }
                })?;
            m.insert(idx, zero, 0).map_err(|source| LoadError::Map {
                name: MAP_IFACES,
                source,
            })?;
        }
        // Kernels >= 6.6 attach tc programs as tcx links: no qdisc. Older ones attach
        // netlink filters, which need a clsact qdisc (aya decides the same way).
        use aya::util::KernelVersion;
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            if let Some(p) = &opts.tc_record {
                tc_record::clean_stale(p);
            }
            for (idx, iface) in &ifaces {
                match clsact::ensure(iface) {
                    Ok(true) => qdiscs.push((*idx, iface.clone())),
                    Ok(false) => {}
                    Err(detail) => {
                        remove_qdiscs(&mut qdiscs);
                        return Err(LoadError::Attach {
                            name: "sockacct_tc_ingress",
                            target: iface.clone(),
                            detail,
                        });
                    }
                }
            }
        }
        let tc_progs = [
            ("sockacct_tc_ingress", TcAttachType::Ingress),
            ("sockacct_tc_egress", TcAttachType::Egress),
        ];
        let r = (|| {
            for (name, _) in tc_progs {
                let p: &mut SchedClassifier =
                    prog(&mut ebpf, name).map_err(|e| program_error(name, e))?;
                p.load().map_err(|e| program_error(name, e))?;
            }
            // Recorded before the first filter exists: a run killed at any point after
            // leaves nothing the next one does not know about.
            if let (false, Some(p)) = (tcx, &opts.tc_record) {
                match record_tc(&mut ebpf, &ifaces, &qdiscs, p) {
                    Ok(()) => tc_recorded = Some(p.clone()),
                    Err(e) => warn!(
                        "recording the tc filters in {}: {e}; if this run is killed, the next \
                         one cannot remove them",
                        p.display()
                    ),
                }
            }
            for (name, ty) in tc_progs {
                let p: &mut SchedClassifier =
                    prog(&mut ebpf, name).map_err(|e| program_error(name, e))?;
                for (_, iface) in &ifaces {
                    let id = p
                        .attach(iface, ty)
                        .map_err(|e| attach_error(name, iface.clone(), e))?;
                    links.push(Link::Tc(name, id));
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            remove_qdiscs(&mut qdiscs);
            if let Some(p) = tc_recorded.take() {
                tc_record::remove(&p);
            }
            return Err(e);
        }
    }
    info!(
        "attached to cgroup {} (max {} sockets){}; hooks: {}",
        cgroup.display(),
        opts.max_sockets,
        if ifaces.is_empty() {
            String::new()
        } else {
            format!(
                ", tc on {:?}{}",
                ifaces.iter().map(|i| &i.1).collect::<Vec<_>>(),
                if qdiscs.is_empty() {
                    ""
                } else {
                    " (clsact qdisc added, removed at exit)"
                }
            )
        },
        chosen
            .iter()
            .map(hooks::HookChoice::short)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(Loaded {
        ebpf,
        cgroup,
        interfaces: ifaces,
        accept_hook,
        hooks: chosen,
        links,
        qdiscs,
        tc_record: tc_recorded,
        _cgroup_fd: cg,
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, often 8 MiB (systemd's default)
/// or 64 KiB, less than our ring buffers alone. Later kernels charge the memory cgroup and
/// ignore the limit. Best effort: a failure shows up as a map creation error naming it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!(
            "could not raise RLIMIT_MEMLOCK ({}); on kernels before 5.11 map creation may fail \
             (systemd: LimitMEMLOCK=infinity)",
            std::io::Error::last_os_error()
        );
    }
}

fn set_setting(ebpf: &mut Ebpf, index: u32, value: u32) -> Result<(), LoadError> {
    let mut a: aya::maps::Array<&mut MapData, u32> = aya::maps::Array::try_from(
        ebpf.map_mut(MAP_SETTINGS)
            .ok_or(LoadError::MissingMap(MAP_SETTINGS))?,
    )
    .map_err(|source| LoadError::Map {
        name: MAP_SETTINGS,
        source,
    })?;
    a.set(index, value, 0).map_err(|source| LoadError::Map {
        name: MAP_SETTINGS,
        source,
    })
}

/// Records the netlink tc filters just attached ([`tc_record`]).
fn record_tc(
    ebpf: &mut Ebpf,
    ifaces: &[(u32, String)],
    qdiscs: &[(u32, String)],
    path: &Path,
) -> std::io::Result<()> {
    let mut prog_ids = vec![];
    for name in ["sockacct_tc_ingress", "sockacct_tc_egress"] {
        let id = prog::<SchedClassifier>(ebpf, name)
            .and_then(|p| p.info())
            .map_err(|e| std::io::Error::other(chain(&e)))?
            .id();
        prog_ids.push(id);
    }
    let rec = tc_record::TcRecord {
        boot: tc_record::boot_id(),
        ifaces: ifaces
            .iter()
            .map(|(idx, name)| tc_record::TcIface {
                name: name.clone(),
                ifindex: *idx,
                added_clsact: qdiscs.iter().any(|q| q.0 == *idx),
                prog_ids: prog_ids.clone(),
            })
            .collect(),
    };
    tc_record::write(path, &rec)
}

fn remove_qdiscs(qdiscs: &mut Vec<(u32, String)>) {
    for (idx, iface) in qdiscs.drain(..) {
        if let Err(e) = clsact::remove(idx) {
            warn!("removing the clsact qdisc the agent added to {iface}: {e}");
        }
    }
}

impl Loaded {
    /// Detaches every program (packets stop being counted; maps stay readable).
    pub fn detach(&mut self) {
        let mut tc_detached = true;
        for link in self.links.drain(..) {
            let tc = matches!(link, Link::Tc(..));
            let r = match link {
                Link::Skb(n, id) => prog::<CgroupSkb>(&mut self.ebpf, n).and_then(|p| p.detach(id)),
                Link::Sock(n, id) => {
                    prog::<CgroupSock>(&mut self.ebpf, n).and_then(|p| p.detach(id))
                }
                Link::Tp(n, id) => {
                    prog::<BtfTracePoint>(&mut self.ebpf, n).and_then(|p| p.detach(id))
                }
                Link::FExit(n, id) => prog::<FExit>(&mut self.ebpf, n).and_then(|p| p.detach(id)),
                Link::Tc(n, id) => {
                    prog::<SchedClassifier>(&mut self.ebpf, n).and_then(|p| p.detach(id))
                }
                Link::SockOps(n, id) => {
                    prog::<SockOps>(&mut self.ebpf, n).and_then(|p| p.detach(id))
                }
            };
            if let Err(e) = r {
                warn!("detach: {}", chain(&e));
                tc_detached &= !tc;
            }
        }
        remove_qdiscs(&mut self.qdiscs);
        // Kept when a filter could not be removed: the next run tries again.
        if let (true, Some(p)) = (tc_detached, self.tc_record.take()) {
            tc_record::remove(&p);
        }
    }

    /// Takes a map out of the object (the poller owns the maps it reads).
    pub fn take_map(&mut self, name: &'static str) -> Result<Map, LoadError> {
        self.ebpf.take_map(name).ok_or(LoadError::MissingMap(name))
    }
}

/// Program `name` of the object as type `T` (a missing one is an error, never a panic).
pub(crate) fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, ProgramError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProgramError::UnexpectedProgramType)?
        .try_into()
}

impl Drop for Loaded {
    fn drop(&mut self) {
        self.detach();
    }
}
