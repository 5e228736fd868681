//! Reading process facts from `/proc`, `/etc/passwd` and the cgroup v2 tree.
//!
//! Everything here tolerates processes vanishing between two reads: a process
//! that is gone simply yields `None` (or is left out of a scan).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Where the proc filesystem is mounted.
const PROC: &str = "/proc";

/// What the agent records about the process that owns a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Thread group id (the pid as user space sees it).
    pub tgid: u32,
    /// `Name:` from `/proc/<tgid>/status`: the comm of the thread group leader.
    pub comm: String,
    /// Target of `/proc/<tgid>/exe`, without a trailing ` (deleted)`; `None` for kernel
    /// threads, zombies, or when the link cannot be read (permissions).
    pub exe: Option<String>,
    /// Real user id.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// The cgroup v2 path (the `0::/path` line of `/proc/<tgid>/cgroup`) relative to the
    /// cgroup2 root, without the leading '/'; `""` for the root cgroup. `None` when the
    /// process is in no cgroup v2 hierarchy or the file cannot be read.
    pub cgroup: Option<String>,
}

/// Facts about process `tgid`, or `None` if it no longer exists (or its status is unreadable).
pub fn proc_info(tgid: u32) -> Option<ProcInfo> {
    proc_info_in(Path::new(PROC), tgid)
}

fn proc_info_in(proc_root: &Path, tgid: u32) -> Option<ProcInfo> {
    let dir = proc_root.join(tgid.to_string());
    let status = fs::read_to_string(dir.join("status")).ok()?;
    let st = parse_status(&status)?;
    let exe = fs::read_link(dir.join("exe")).ok().map(|p| {
        let s = p.to_string_lossy();
        s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned()
    });
    let cgroup = fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|text| parse_cgroup_v2(&text));
    Some(ProcInfo {
        tgid,
        comm: st.name,
        exe,
        uid: st.uid,
        gid: st.gid,
        cgroup,
    })
}

/// The fields of `/proc/<pid>/status` that [`ProcInfo`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Status {
    name: String,
    uid: u32,
    gid: u32,
}

/// Parse `/proc/<pid>/status`: `Name:` (unescaped), and the real ids of `Uid:` and `Gid:`.
fn parse_status(text: &str) -> Option<Status> {
    let mut name = None;
    let mut uid = None;
    let mut gid = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Name:") {
            // The kernel writes "Name:\t<comm>"; only '\n' and '\\' are escaped in comm.
            let raw = rest.strip_prefix('\t').unwrap_or(rest);
            name = Some(unescape_comm(raw));
        } else if let Some(rest) = line.strip_prefix("Uid:") {
            uid = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.strip_prefix("Gid:") {
            gid = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        }
        if name.is_some() && uid.is_some() && gid.is_some() {
            break;
        }
    }
    Some(Status {
        name: name?,
        uid: uid?,
        gid: gid?,
    })
}

/// Undo the escaping of comm in `/proc/<pid>/status` (`\n` -> newline, `\\` -> backslash).
fn unescape_comm(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// The cgroup v2 path from the text of `/proc/<pid>/cgroup`, without the leading '/'.
fn parse_cgroup_v2(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.strip_prefix('/').unwrap_or(path).to_owned())
}

/// Parse `/etc/passwd` text into uid -> user name; the first entry for a uid wins.
fn parse_passwd(text: &str) -> HashMap<u32, String> {
    let mut map = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.starts_with('+') || line.starts_with('-') {
            continue;
        }
        let mut fields = line.split(':');
        let (Some(name), Some(_pw), Some(uid)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        if let Ok(uid) = uid.parse::<u32>() {
            map.entry(uid).or_insert_with(|| name.to_owned());
        }
    }
    map
}

/// The name of user `uid` from `/etc/passwd` (read afresh on every call; use
/// [`UserNames`] for repeated look-ups). Users known only to NSS services are not seen.
pub fn user_name(uid: u32) -> Option<String> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    parse_passwd(&text).remove(&uid)
}

/// A cache of `/etc/passwd`, loaded on first use. A miss reloads the file, at most
/// once per second, so users added while the agent runs are found.
#[derive(Debug)]
pub struct UserNames {
    path: PathBuf,
    names: HashMap<u32, String>,
    loaded_at: Option<Instant>,
}

impl Default for UserNames {
    fn default() -> Self {
        Self::new()
    }
}

impl UserNames {
    /// A cache over `/etc/passwd`. Nothing is read until the first look-up.
    pub fn new() -> Self {
        Self::with_path("/etc/passwd")
    }

    /// A cache over a passwd-format file at `path`.
    pub fn with_path(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            names: HashMap::new(),
            loaded_at: None,
        }
    }

    /// The name of user `uid`, if the passwd file has one.
    pub fn get(&mut self, uid: u32) -> Option<&str> {
        if !self.names.contains_key(&uid) {
            let due = self
                .loaded_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if due {
                self.reload();
            }
        }
        self.names.get(&uid).map(String::as_str)
    }

    /// Re-read the passwd file now (an unreadable file leaves the cache empty).
    pub fn reload(&mut self) {
        self.names = fs::read_to_string(&self.path)
            .map(|t| parse_passwd(&t))
            .unwrap_or_default();
        self.loaded_at = Some(Instant::now());
    }
}

/// Map socket inode -> tgid of a process that holds an fd on it, from the `socket:[INODE]`
/// links under `/proc/<tgid>/fd`.
///
/// Only the thread group leaders listed in `/proc` are scanned (not `/proc/<pid>/task`), so a
/// thread that unshared its fd table is not seen. When several processes share a socket the
/// first one found (lowest pid, in `/proc` order) wins. Processes that vanish mid-scan, or
/// whose fds we may not read (not root), are skipped.
pub fn socket_inodes_by_pid() -> HashMap<u64, u32> {
    socket_inodes_in(Path::new(PROC))
}

fn socket_inodes_in(proc_root: &Path) -> HashMap<u64, u32> {
    let mut map = HashMap::new();
    let Ok(entries) = fs::read_dir(proc_root) else {
        return map;
    };
    let mut fd_dir = PathBuf::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(tgid) = parse_pid(name.as_bytes()) else {
            continue;
        };
        fd_dir.clear();
        fd_dir.push(proc_root);
        fd_dir.push(&name);
        fd_dir.push("fd");
        let Ok(fds) = fs::read_dir(&fd_dir) else {
            continue; // gone, or not ours to read
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue; // closed meanwhile
            };
            if let Some(inode) = parse_socket_link(target.as_os_str().as_bytes()) {
                map.entry(inode).or_insert(tgid);
            }
        }
    }
    map
}

fn parse_pid(name: &[u8]) -> Option<u32> {
    if name.is_empty() || !name.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(name).ok()?.parse().ok()
}

/// `socket:[12345]` -> 12345.
fn parse_socket_link(target: &[u8]) -> Option<u64> {
    let digits = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The cookie of the calling thread's network namespace (what `bpf_get_netns_cookie` and
/// `SO_NETNS_COOKIE` report), or 0 if it cannot be had (kernel older than 5.14).
pub fn netns_cookie_of_self() -> u64 {
    // SAFETY: plain socket(2); the fd is checked and closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return 0;
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a valid, writable u64 and `len` holds its size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    if rc != 0 || len as usize != std::mem::size_of::<u64>() {
        return 0;
    }
    cookie
}

/// Mount point of the first cgroup2 file system in `/proc/self/mountinfo`
/// (`/sys/fs/cgroup` on unified systems, `/sys/fs/cgroup/unified` in a hybrid layout).
/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo_cgroup2(&text)
}

/// The mount point of the first line of mountinfo text whose fstype is `cgroup2`.
///
/// A line reads `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER`,
/// with space, tab, newline and backslash in paths written as `\ooo` octal escapes.
fn parse_mountinfo_cgroup2(text: &str) -> Option<PathBuf> {
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.get(sep + 1) != Some(&"cgroup2") {
            continue;
        }
        let mount_point = unescape_octal(fields[4]);
        return Some(PathBuf::from(OsString::from_vec(mount_point)));
    }
    None
}

/// Decode `\ooo` octal escapes (as the kernel's `seq_escape` writes them) into raw bytes.
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..=i + 3]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The path, relative to `root` and without a leading '/', of the cgroup whose id is `id`
/// (in cgroup v2 a cgroup's id is the inode number of its directory); `""` for `root`
/// itself. Walks the tree under `root` and stops at the first match.
pub fn cgroup_path_by_id(root: &Path, id: u64) -> Option<String> {
    let mut found = None;
    walk_dirs(root, &mut |ino, rel| {
        if ino == id {
            found = Some(rel.to_owned());
            false
        } else {
            true
        }
    });
    found
}

/// Depth-first walk of the directories under `root` (not following symlinks), calling
/// `visit(inode, relative path)` for `root` (as `""`) and every directory below it until
/// `visit` returns false. Directories that vanish or cannot be read are skipped.
fn walk_dirs(root: &Path, visit: &mut dyn FnMut(u64, &str) -> bool) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(root) else {
        return;
    };
    if !meta.is_dir() || !visit(meta.ino(), "") {
        return;
    }
    let mut stack: Vec<String> = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let is_dir = match entry.file_type() {
                Ok(t) => t.is_dir(),
                Err(_) => continue,
            };
            if !is_dir {
                continue;
            }
            let name = entry.file_name();
            let child = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            // readdir's d_ino: on kernfs (cgroup2) it is the same id stat reports.
            if !visit(entry.ino(), &child) {
                return;
            }
            stack.push(child);
        }
    }
}

/// Memoized cgroup id -> path look-ups under one cgroup2 root. A miss rescans the whole
/// tree, at most once per second; a rescan replaces the memo, so ids of removed cgroups
/// are forgotten then.
#[derive(Debug)]
pub struct CgroupPaths {
    root: PathBuf,
    paths: HashMap<u64, String>,
    scanned_at: Option<Instant>,
    min_rescan: Duration,
}

impl CgroupPaths {
    /// A cache over the cgroup2 tree mounted at `root`. Nothing is read until a look-up.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            paths: HashMap::new(),
            scanned_at: None,
            min_rescan: Duration::from_secs(1),
        }
    }

    /// A cache over the cgroup2 mount found by [`cgroup2_mount`], if there is one.
    pub fn from_mount() -> Option<Self> {
        cgroup2_mount().map(Self::new)
    }

    /// The root this cache resolves under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of cgroup `id` relative to the root (`""` for the root), or `None` if no
    /// such cgroup was found by the latest scan.
    pub fn get(&mut self, id: u64) -> Option<&str> {
        if !self.paths.contains_key(&id) {
            let due = self
                .scanned_at
                .is_none_or(|t| t.elapsed() >= self.min_rescan);
            if due {
                self.rescan();
            }
        }
        self.paths.get(&id).map(String::as_str)
    }

    /// Walk the tree now and replace the memo with what is there.
    pub fn rescan(&mut self) {
        let mut paths = HashMap::with_capacity(self.paths.len().max(16));
        walk_dirs(&self.root, &mut |ino, rel| {
            paths.insert(ino, rel.to_owned());
            true
        });
        self.paths = paths;
        self.scanned_at = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn status_parsing() {
        let text = "Name:\tmy\\\\wei rd\\nproc\n\
                    Umask:\t0022\n\
                    State:\tS (sleeping)\n\
                    Tgid:\t4242\n\
                    Pid:\t4242\n\
                    Uid:\t1000\t1001\t1002\t1003\n\
                    Gid:\t100\t101\t102\t103\n\
                    Groups:\t4 24 27\n";
        let st = parse_status(text).unwrap();
        assert_eq!(
            st,
            Status {
                name: "my\\wei rd\nproc".into(),
                uid: 1000,
                gid: 100
            }
        );
        // Tabs inside a comm are not escaped by the kernel.
        let st = parse_status("Name:\ta\tb\nUid:\t0\t0\t0\t0\nGid:\t5\t5\t5\t5\n").unwrap();
        assert_eq!(st.name, "a\tb");
        assert_eq!((st.uid, st.gid), (0, 5));
        assert!(parse_status("Name:\tx\nGid:\t1\t1\t1\t1\n").is_none());
    }

    #[test]
    fn cgroup_file_parsing() {
        let v2 = "12:memory:/foo\n0::/system.slice/sshd.service\n";
        assert_eq!(
            parse_cgroup_v2(v2).as_deref(),
            Some("system.slice/sshd.service")
        );
        assert_eq!(parse_cgroup_v2("0::/\n").as_deref(), Some(""));
        assert_eq!(parse_cgroup_v2("4:memory:/x\n1:cpu:/\n"), None);
    }

    #[test]
    fn proc_info_of_self() {
        let pid = std::process::id();
        let info = proc_info(pid).expect("own process");
        assert_eq!(info.tgid, pid);
        let comm = fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(info.comm, comm.trim_end_matches('\n'));
        let exe = std::env::current_exe().unwrap();
        assert_eq!(info.exe.as_deref(), Some(exe.to_str().unwrap()));
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!((info.uid, info.gid), (uid, gid));
        let cg = fs::read_to_string("/proc/self/cgroup").unwrap();
        assert_eq!(info.cgroup, parse_cgroup_v2(&cg));
        assert!(proc_info(u32::MAX - 1).is_none());
    }

    #[test]
    fn passwd_parsing_and_lookup() {
        let text = "root:x:0:0:root:/root:/bin/bash\n\
                    # comment\n\
                    daemon:x:1:1::/:/sbin/nologin\n\
                    broken\n\
                    dup:x:1:1::/:/sbin/nologin\n\
                    nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
        let m = parse_passwd(text);
        assert_eq!(m.get(&0).map(String::as_str), Some("root"));
        assert_eq!(m.get(&1).map(String::as_str), Some("daemon"));
        assert_eq!(m.get(&65534).map(String::as_str), Some("nobody"));
        assert_eq!(m.len(), 3);

        assert_eq!(user_name(0).as_deref(), Some("root"));
        let mut names = UserNames::new();
        assert_eq!(names.get(0), Some("root"));
        assert_eq!(names.get(4_000_000_000), None);
    }

    #[test]
    fn socket_inode_scan_finds_own_socket() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let target = fs::read_link(format!("/proc/self/fd/{}", sock.as_raw_fd())).unwrap();
        let inode = parse_socket_link(target.as_os_str().as_bytes()).unwrap();
        let map = socket_inodes_by_pid();
        assert_eq!(map.get(&inode), Some(&std::process::id()));
    }

    #[test]
    fn socket_link_and_pid_parsing() {
        assert_eq!(parse_socket_link(b"socket:[12345]"), Some(12345));
        assert_eq!(parse_socket_link(b"socket:[]"), None);
        assert_eq!(parse_socket_link(b"pipe:[12345]"), None);
        assert_eq!(parse_socket_link(b"/dev/null"), None);
        assert_eq!(parse_pid(b"123"), Some(123));
        assert_eq!(parse_pid(b"self"), None);
        assert_eq!(parse_pid(b""), None);
    }

    #[test]
    fn netns_cookie_is_known_and_stable() {
        let a = netns_cookie_of_self();
        assert_ne!(a, 0, "kernel should support SO_NETNS_COOKIE");
        assert_eq!(a, netns_cookie_of_self());
    }

    #[test]
    fn mountinfo_parsing() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
41 31 0:38 / /mnt/my\\040cgroup\\011two\\134x rw,nosuid shared:5 master:2 - cgroup2 cgroup2 rw
42 31 0:39 / /second rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_mountinfo_cgroup2(text),
            Some(PathBuf::from("/mnt/my cgroup\ttwo\\x"))
        );
        assert_eq!(
            parse_mountinfo_cgroup2("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"),
            None
        );
        // A cgroup2 *source* or option is not a cgroup2 fstype.
        assert_eq!(
            parse_mountinfo_cgroup2("22 1 8:1 / /x rw - tmpfs cgroup2 rw\n"),
            None
        );
        assert_eq!(unescape_octal("a\\040b\\"), b"a b\\".to_vec());
        assert_eq!(unescape_octal("\\04"), b"\\04".to_vec());
    }

    #[test]
    fn cgroup2_mount_is_found() {
        let m = cgroup2_mount().expect("a cgroup2 mount");
        assert!(
            m.join("cgroup.procs").exists(),
            "{m:?} is not a cgroup2 root"
        );
    }

    #[test]
    fn cgroup_path_of_own_cgroup() {
        let root = cgroup2_mount().expect("a cgroup2 mount");
        let own = parse_cgroup_v2(&fs::read_to_string("/proc/self/cgroup").unwrap())
            .expect("in a cgroup2 hierarchy");
        let dir = if own.is_empty() {
            root.clone()
        } else {
            root.join(&own)
        };
        let id = fs::metadata(&dir).unwrap().ino();
        assert_eq!(cgroup_path_by_id(&root, id).as_deref(), Some(own.as_str()));
        let mut cache = CgroupPaths::new(&root);
        assert_eq!(cache.get(id), Some(own.as_str()));
        assert_eq!(cache.get(u64::MAX), None);

        // With the rights to, also resolve a nested cgroup made for the test.
        let name = format!("sockacct-test-{}", std::process::id());
        let nested = root.join(&name).join("inner");
        if fs::create_dir_all(&nested).is_ok() {
            let id = fs::metadata(&nested).unwrap().ino();
            let got = cgroup_path_by_id(&root, id);
            let _ = fs::remove_dir(&nested);
            let _ = fs::remove_dir(root.join(&name));
            assert_eq!(got, Some(format!("{name}/inner")));
        }
    }

    #[test]
    fn cgroup_walk_on_plain_tree_and_cache_throttle() {
        let base = std::env::temp_dir().join(format!("sockacct-cgwalk-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("a/b/c")).unwrap();
        fs::create_dir_all(base.join("d")).unwrap();
        fs::write(base.join("a/file"), b"x").unwrap();
        let ino = |p: &str| fs::metadata(base.join(p)).unwrap().ino();
        let root_ino = fs::metadata(&base).unwrap().ino();

        assert_eq!(cgroup_path_by_id(&base, root_ino).as_deref(), Some(""));
        assert_eq!(
            cgroup_path_by_id(&base, ino("a/b/c")).as_deref(),
            Some("a/b/c")
        );
        assert_eq!(cgroup_path_by_id(&base, ino("d")).as_deref(), Some("d"));
        assert_eq!(cgroup_path_by_id(&base, ino("a/file")), None);

        let mut cache = CgroupPaths::new(&base);
        assert_eq!(cache.get(ino("a/b")), Some("a/b"));
        // A directory made right after a scan is not seen until a second has passed.
        fs::create_dir(base.join("e")).unwrap();
        let e = ino("e");
        assert_eq!(cache.get(e), None);
        cache.scanned_at = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(cache.get(e), Some("e"));

        fs::remove_dir_all(&base).unwrap();
    }
}
