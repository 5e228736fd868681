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

/// The compiled kernel programs (built by agent/build.rs).
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            cgroup: None,
            interfaces: vec![],
            max_sockets: DEFAULT_MAX_SOCKETS,
            per_peer: false,
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

enum Link {
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
    links: Vec<Link>,
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

fn chain(e: &dyn std::error::Error) -> String {
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

fn attach_tp(
    ebpf: &mut Ebpf,
    btf: &Btf,
    name: &'static str,
    tp: &str,
) -> Result<BtfTracePointLinkId, LoadError> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .unwrap()
        .try_into()
        .map_err(|e| program_error(name, e))?;
    p.load(tp, btf).map_err(|e| program_error(name, e))?;
    p.attach()
        .map_err(|e| attach_error(name, format!("tp_btf/{tp}"), e))
}

pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Loads and attaches everything. The caller should have run [`preflight`].
pub fn load(opts: &LoadOptions) -> Result<Loaded, LoadError> {
    let cgroup = preflight(opts.cgroup.as_deref())?;
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

    let mut ebpf = EbpfLoader::new()
        .map_max_entries(MAP_SOCKS, opts.max_sockets)
        .map_max_entries(MAP_OWNERS, opts.max_sockets)
        .load(BPF_OBJECT)?;
    // Settings before any program is attached, so the first packet already sees them.
    {
        let mut a: aya::maps::Array<&mut MapData, u32> = aya::maps::Array::try_from(
            ebpf.map_mut(MAP_SETTINGS)
                .ok_or(LoadError::MissingMap(MAP_SETTINGS))?,
        )
        .map_err(|source| LoadError::Map {
            name: MAP_SETTINGS,
            source,
        })?;
        let bits = if opts.per_peer { SETTING_PER_PEER } else { 0 };
        a.set(0, bits, 0).map_err(|source| LoadError::Map {
            name: MAP_SETTINGS,
            source,
        })?;
    }
    let mut links = vec![];

    for (name, ty) in [
        ("sockacct_ingress", CgroupSkbAttachType::Ingress),
        ("sockacct_egress", CgroupSkbAttachType::Egress),
    ] {
        let p: &mut CgroupSkb = ebpf
            .program_mut(name)
            .unwrap()
            .try_into()
            .map_err(|e| program_error(name, e))?;
        p.load().map_err(|e| program_error(name, e))?;
        // Single: links already let several programs share a cgroup; AllowMultiple is EINVAL.
        let id = p
            .attach(cg.as_fd(), ty, CgroupAttachMode::Single)
            .map_err(|e| attach_error(name, cgroup.display().to_string(), e))?;
        links.push(Link::Skb(name, id));
    }
    for name in ["sockacct_sock_create", "sockacct_sock_release"] {
        let p: &mut CgroupSock = ebpf
            .program_mut(name)
            .unwrap()
            .try_into()
            .map_err(|e| program_error(name, e))?;
        p.load().map_err(|e| program_error(name, e))?;
        let id = p
            .attach(cg.as_fd(), CgroupAttachMode::Single)
            .map_err(|e| attach_error(name, cgroup.display().to_string(), e))?;
        links.push(Link::Sock(name, id));
    }
    let btf = Btf::from_sys_fs().map_err(|_| LoadError::NoBtf)?;
    {
        let name = "sockacct_tcp_state";
        let p: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .unwrap()
            .try_into()
            .map_err(|e| program_error(name, e))?;
        p.load("inet_sock_set_state", &btf)
            .map_err(|e| program_error(name, e))?;
        let id = p
            .attach()
            .map_err(|e| attach_error(name, "tp_btf/inet_sock_set_state", e))?;
        links.push(Link::Tp(name, id));
    }
    let accept_hook = {
        let name = "sockacct_accept";
        let r = (|| -> Result<FExitLinkId, LoadError> {
            let p: &mut FExit = ebpf
                .program_mut(name)
                .unwrap()
                .try_into()
                .map_err(|e| program_error(name, e))?;
            p.load("inet_csk_accept", &btf)
                .map_err(|e| program_error(name, e))?;
            p.attach()
                .map_err(|e| attach_error(name, "fexit/inet_csk_accept", e))
        })();
        match r {
            Ok(id) => {
                links.push(Link::FExit(name, id));
                true
            }
            Err(e) => {
                warn!(
                    "accept hook unavailable ({e}); server-side sockets take the owner of the first \
                     process that sends or receives on them (or of their listener until then)"
                );
                false
            }
        }
    };
    if !accept_hook {
        // TCP's own send and receive paths, not sock_send_length/sock_recv_length: those
        // run for every send and receive of every socket on the machine (small UDP paid
        // for them), while only accepted TCP sockets need an owner this way. Kernels
        // without these tracepoints get the generic ones.
        let tcp = [
            ("sockacct_first_recv", "tcp_rcv_space_adjust"),
            ("sockacct_first_send", "tcp_sendmsg_locked"),
        ];
        let any = [
            ("sockacct_first_recv_any", "sock_recv_length"),
            ("sockacct_first_send_any", "sock_send_length"),
        ];
        let mut attached = vec![];
        let mut failed = None;
        for (name, tp) in tcp {
            match attach_tp(&mut ebpf, &btf, name, tp) {
                Ok(id) => attached.push(Link::Tp(name, id)),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            warn!(
                "TCP send/receive tracepoints unavailable ({e}); watching every socket's send and receive instead"
            );
            for link in attached.drain(..) {
                if let Link::Tp(n, id) = link {
                    let _ = prog::<BtfTracePoint>(&mut ebpf, n).and_then(|p| p.detach(id));
                }
            }
            for (name, tp) in any {
                attached.push(Link::Tp(name, attach_tp(&mut ebpf, &btf, name, tp)?));
            }
        }
        links.append(&mut attached);
        // Accepted sockets get their owner entry at the end of the handshake, so the
        // hooks above find it even before the socket's first packet.
        let name = "sockacct_passive";
        let p: &mut SockOps = ebpf
            .program_mut(name)
            .unwrap()
            .try_into()
            .map_err(|e| program_error(name, e))?;
        p.load().map_err(|e| program_error(name, e))?;
        let id = p
            .attach(cg.as_fd(), CgroupAttachMode::Single)
            .map_err(|e| attach_error(name, cgroup.display().to_string(), e))?;
        links.push(Link::SockOps(name, id));
    }

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
        for (name, ty) in [
            ("sockacct_tc_ingress", TcAttachType::Ingress),
            ("sockacct_tc_egress", TcAttachType::Egress),
        ] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap()
                .try_into()
                .map_err(|e| program_error(name, e))?;
            p.load().map_err(|e| program_error(name, e))?;
            for (_, iface) in &ifaces {
                // tcx links on kernels >= 6.6: no clsact qdisc is created, nothing to clean up.
                let id = p
                    .attach(iface, ty)
                    .map_err(|e| attach_error(name, iface.clone(), e))?;
                links.push(Link::Tc(name, id));
            }
        }
    }
    info!(
        "attached to cgroup {} (max {} sockets){}{}",
        cgroup.display(),
        opts.max_sockets,
        if ifaces.is_empty() {
            String::new()
        } else {
            format!(
                ", tc on {:?}",
                ifaces.iter().map(|i| &i.1).collect::<Vec<_>>()
            )
        },
        if accept_hook {
            ""
        } else {
            ", without accept hook"
        }
    );
    Ok(Loaded {
        ebpf,
        cgroup,
        interfaces: ifaces,
        accept_hook,
        links,
        _cgroup_fd: cg,
    })
}

impl Loaded {
    /// Detaches every program (packets stop being counted; maps stay readable).
    pub fn detach(&mut self) {
        for link in self.links.drain(..) {
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
            }
        }
    }

    /// Takes a map out of the object (the poller owns the maps it reads).
    pub fn take_map(&mut self, name: &'static str) -> Result<Map, LoadError> {
        self.ebpf.take_map(name).ok_or(LoadError::MissingMap(name))
    }
}

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, ProgramError>
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
