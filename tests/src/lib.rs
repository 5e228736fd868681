//! Harness for sockacct's integration tests: a cgroup of the test's own, traffic peers
//! spawned into it, network namespaces with veth pairs, and the real agent binary whose
//! JSON events are collected. Everything created is removed on drop, also when a test
//! fails (panics unwind through the guards).
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

pub use sockacct::event::{DeltaEvent, Traffic};

pub mod collector;
pub mod prom;
pub mod tls;
pub use collector::{Answer, Collector, Received};

/// True when running as root; otherwise says the test is skipped, visibly: straight to
/// stderr, which the test harness does not capture (eprintln! output of a passing test
/// would never be seen).
pub fn require_root(test: &str) -> bool {
    if unsafe { libc::geteuid() } != 0 {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "skipping {test}: needs root (run `cargo xtask test` as root)"
        );
        return false;
    }
    true
}

pub fn cgroup2_root() -> PathBuf {
    sockacct::procfs::cgroup2_mount().expect("no cgroup2 mount")
}

/// Waits for `cond` with a deadline; panics with `what` if it never holds.
pub fn wait_for<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A cgroup v2 directory for one test, removed on drop (its processes killed first).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> TestCgroup {
        let path = cgroup2_root().join(format!("sockacct-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..200 {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

/// A network namespace joined to the host by a veth pair, removed on drop.
/// Host side `host_if` has `host_ip`/30, the namespace side `peer_ip`/30. IPv6 is off on
/// both ends and neighbours are static, so the only packets on the link are the test's.
pub struct VethNs {
    pub ns: String,
    pub host_if: String,
    pub host_ip: String,
    pub peer_ip: String,
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(st.success(), "{args:?} failed: {st}");
}

impl VethNs {
    pub fn new(tag: &str, subnet: u8) -> VethNs {
        let id = std::process::id() % 100000;
        let ns = format!("sa-{tag}-{id}");
        let host_if = format!("sa{tag}{id}h");
        let peer_if = format!("sa{tag}{id}p");
        assert!(host_if.len() <= 15, "interface name too long: {host_if}");
        let host_ip = format!("10.231.{subnet}.1");
        let peer_ip = format!("10.231.{subnet}.2");
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        let v = VethNs {
            ns: ns.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            peer_ip: peer_ip.clone(),
        };
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        sh(&["ip", "link", "set", &peer_if, "netns", &ns]);
        sh(&[
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{host_if}.disable_ipv6=1"),
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-q",
            "-w",
            &format!("net.ipv6.conf.{peer_if}.disable_ipv6=1"),
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{peer_ip}/30"),
            "dev",
            &peer_if,
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        sh(&[
            "ip", "netns", "exec", &ns, "ip", "link", "set", &peer_if, "up",
        ]);
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        let mac = |dev: &str, ns: Option<&str>| -> String {
            let mut c = Command::new("ip");
            if let Some(ns) = ns {
                c.args(["netns", "exec", ns, "ip"]);
            }
            let o = c.args(["-o", "link", "show", dev]).output().unwrap();
            let s = String::from_utf8_lossy(&o.stdout).to_string();
            s.split("link/ether ")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        let hmac = mac(&host_if, None);
        let pmac = mac(&peer_if, Some(&ns));
        sh(&[
            "ip",
            "neigh",
            "replace",
            &peer_ip,
            "lladdr",
            &pmac,
            "dev",
            &host_if,
            "nud",
            "permanent",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ip",
            "neigh",
            "replace",
            &host_ip,
            "lladdr",
            &hmac,
            "dev",
            &peer_if,
            "nud",
            "permanent",
        ]);
        v
    }
}

impl Drop for VethNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the peer end, which deletes the host end.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn join_cgroup_before_exec(cmd: &mut Command, cg: &Path) -> fs::File {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cg.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", cg.display()));
    let fd = procs.as_raw_fd();
    unsafe {
        cmd.pre_exec(move || {
            // "0" = the writing process; write(2) is async-signal-safe.
            if libc::write(fd, b"0\n".as_ptr().cast(), 2) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    procs
}

/// A traffic generator process (tests/src/bin/peer.rs).
pub struct Peer {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdin: Option<ChildStdin>,
    seen: Vec<String>,
}

impl Peer {
    /// Spawns `sockacct-peer --name NAME ARGS…`, inside `cg` (if given) and inside network
    /// namespace `ns` (if given).
    pub fn spawn(cg: Option<&TestCgroup>, ns: Option<&str>, name: &str, args: &[&str]) -> Peer {
        Peer::spawn_as(cg, ns, name, args, None)
    }

    /// Like [`Peer::spawn`], running as `(uid, gid)` when given (no supplementary groups).
    pub fn spawn_as(
        cg: Option<&TestCgroup>,
        ns: Option<&str>,
        name: &str,
        args: &[&str],
        user: Option<(u32, u32)>,
    ) -> Peer {
        Peer::spawn_inner(cg, ns, name, args, user)
    }

    fn spawn_inner(
        cg: Option<&TestCgroup>,
        ns: Option<&str>,
        name: &str,
        args: &[&str],
        user: Option<(u32, u32)>,
    ) -> Peer {
        let exe = if user.is_some() {
            world_exe("sockacct-peer")
        } else {
            sibling_exe("sockacct-peer")
        };
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, &exe]);
                c
            }
            None => Command::new(exe),
        };
        cmd.arg("--name").arg(name).args(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let _guard = cg.map(|c| join_cgroup_before_exec(&mut cmd, &c.path));
        if let Some((uid, gid)) = user {
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn peer");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Peer {
            child,
            lines: rx,
            stdin,
            seen: vec![],
        }
    }

    /// Waits for a "KEY TEXT" line and returns TEXT.
    pub fn text(&mut self, key: &str) -> String {
        let pre = format!("{key} ");
        if let Some(v) = self.seen.iter().find_map(|l| l.strip_prefix(&pre)) {
            return v.to_string();
        }
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if let Some(v) = l.strip_prefix(&pre) {
                        return v.to_string();
                    }
                }
                Err(_) => panic!("peer never printed {key:?} (saw {:?})", self.seen),
            }
        }
    }

    /// Waits for a "KEY VALUE" line and returns VALUE.
    pub fn value(&mut self, key: &str) -> u64 {
        let v = self.text(key);
        v.trim()
            .parse()
            .unwrap_or_else(|e| panic!("peer printed {key} {v:?}: {e}"))
    }

    /// Waits for a bare line.
    pub fn expect_line(&mut self, line: &str) {
        let end = Instant::now() + Duration::from_secs(30);
        while !self.seen.iter().any(|l| l == line) {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("peer never printed {line:?} (saw {:?})", self.seen),
            }
        }
    }

    pub fn send_line(&mut self, s: &str) {
        let i = self.stdin.as_mut().unwrap();
        writeln!(i, "{s}").unwrap();
        i.flush().unwrap();
    }

    /// Waits for exit; panics on failure.
    pub fn finish(mut self) -> Peer {
        let st = self.child.wait().unwrap();
        assert!(st.success(), "peer failed: {st}");
        // Collect what is left of its output.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(l);
        }
        self
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The real agent binary, run with `--stdout`; its events are collected.
pub struct Daemon {
    child: Child,
    events: Arc<Mutex<Vec<DeltaEvent>>>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// State, spool and control socket live here.
    pub dir: PathBuf,
    _state: Option<TempDir>,
}

pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "sockacct-{tag}-{}-{}",
            std::process::id(),
            rand_u32()
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    u32::from_ne_bytes(b)
}

/// A binary of this package, found next to the running test executable
/// (target/<profile>/deps/<test> -> target/<profile>/<name>).
pub fn sibling_exe(name: &str) -> String {
    let me = std::env::current_exe().unwrap();
    for dir in me.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    panic!(
        "{name} not found near {} (build it with cargo build -p sockacct-tests)",
        me.display()
    )
}

/// A copy of this package's binary `name` that any user may execute, for tests that run
/// it unprivileged: the checkout (and so target/) may sit under a 0700 directory such as
/// root's home, where an unprivileged process cannot reach it. One per test process, in
/// /tmp; those of test processes that are gone are removed.
pub fn world_exe(name: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = n.strip_prefix("sockacct-exe-")
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let d = tmp.join(format!("sockacct-exe-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        d
    });
    static COPYING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = COPYING.lock().unwrap_or_else(|p| p.into_inner());
    let to = dir.join(name);
    if !to.exists() {
        let from = sibling_exe(name);
        let part = dir.join(format!(".{name}.part"));
        fs::copy(&from, &part).unwrap_or_else(|e| panic!("copy {from}: {e}"));
        fs::set_permissions(&part, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&part, &to).unwrap();
    }
    to.display().to_string()
}

pub fn agent_exe() -> String {
    sibling_exe("sockacct-agent")
}

impl Daemon {
    /// Starts `sockacct run --stdout --cgroup CG ARGS…` with its state, spool and control
    /// socket in a fresh temporary directory, and waits until it runs.
    pub fn start(cg: &TestCgroup, args: &[&str]) -> Daemon {
        let state = TempDir::new("state");
        let dir = state.0.clone();
        let mut d = Daemon::start_in(cg, &dir, args);
        d._state = Some(state);
        d
    }

    /// Same, without `--stdout`: the agent as deployed, writing its records only to the
    /// spool (benchmarks: printing every record, and this harness parsing each line,
    /// would take CPU from the agent). `lines()` and `events()` stay empty.
    pub fn start_quiet(cg: &TestCgroup, args: &[&str]) -> Daemon {
        let state = TempDir::new("state");
        let dir = state.0.clone();
        let mut d = Daemon::start_opts(cg, &dir, args, false);
        d._state = Some(state);
        d
    }

    /// Same as [`Daemon::start`], in a directory the caller keeps (to restart on the same
    /// spool).
    pub fn start_in(cg: &TestCgroup, dir: &Path, args: &[&str]) -> Daemon {
        Daemon::start_opts(cg, dir, args, true)
    }

    fn start_opts(cg: &TestCgroup, dir: &Path, args: &[&str], stdout: bool) -> Daemon {
        let mut cmd = Command::new(agent_exe());
        // Any free port: tests side by side (and an agent on the host) never collide.
        let metrics_given = args
            .iter()
            .any(|a| a.starts_with("--metrics-listen") || *a == "--no-metrics");
        cmd.arg("run")
            .args(stdout.then_some("--stdout"))
            .arg("--cgroup")
            .arg(&cg.path)
            .arg("--state-dir")
            .arg(dir)
            .arg("--spool-dir")
            .arg(dir.join("spool"))
            .arg("--control-socket")
            .arg(dir.join("control.sock"))
            .args(args)
            .args(if metrics_given {
                &[][..]
            } else {
                &["--metrics-listen", "127.0.0.1:0"][..]
            })
            .env(
                "RUST_LOG",
                std::env::var("SOCKACCT_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn agent");
        let events = Arc::new(Mutex::new(vec![]));
        let lines = Arc::new(Mutex::new(vec![]));
        let stderr = Arc::new(Mutex::new(vec![]));
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (ev, li) = (events.clone(), lines.clone());
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let v: serde_json::Value =
                    serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"));
                if v["type"] == "delta" {
                    let e: DeltaEvent = serde_json::from_value(v)
                        .unwrap_or_else(|e| panic!("bad event line {l:?}: {e}"));
                    ev.lock().unwrap().push(e);
                }
                li.lock().unwrap().push(l);
            }
        });
        let se = stderr.clone();
        thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[agent] {l}");
                se.lock().unwrap().push(l);
            }
        });
        let mut d = Daemon {
            child,
            events,
            lines,
            stderr,
            dir: dir.to_path_buf(),
            _state: None,
        };
        // Ready when the control socket answers `status`: it is bound only after every
        // program is attached, so traffic from here on is counted.
        wait_for(
            "the agent to answer status",
            Duration::from_secs(60),
            || {
                if let Ok(Some(st)) = d.child.try_wait() {
                    panic!("agent exited early ({st}): {:?}", d.stderr.lock().unwrap());
                }
                d.status_if_up().filter(|v| v["ok"] == true).map(|_| ())
            },
        );
        // The start record is written before `status` answers, but our reader thread may
        // not have taken it yet: a test counting lines from here must not see it arrive.
        if stdout {
            wait_for("the agent's start record", Duration::from_secs(10), || {
                d.lines
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|l| l.contains("\"type\":\"agent\""))
                    .then_some(())
            });
        }
        d
    }

    pub fn events(&self) -> Vec<DeltaEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Every line written to stdout (events and gap records).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// ADDR:PORT of the metrics endpoint (from `status`).
    pub fn metrics_addr(&self) -> String {
        let st = self.control(serde_json::json!({"cmd": "status"}));
        st["metrics"]["listen"]
            .as_str()
            .unwrap_or_else(|| panic!("the agent serves no metrics: {}", st["metrics"]))
            .to_string()
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Sends one raw request line on the control socket and returns the reply line.
    /// `status` if the control socket accepts a connection yet.
    fn status_if_up(&self) -> Option<serde_json::Value> {
        let mut s = std::os::unix::net::UnixStream::connect(self.control_socket()).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    pub fn control_raw(&self, line: &[u8]) -> String {
        let mut s = std::os::unix::net::UnixStream::connect(self.control_socket())
            .expect("connect control socket");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let _ = s.write_all(line);
        let _ = s.write_all(b"\n");
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        reply
    }

    /// Sends one request and parses the reply.
    pub fn control(&self, req: serde_json::Value) -> serde_json::Value {
        let r = self.control_raw(req.to_string().as_bytes());
        serde_json::from_str(&r).unwrap_or_else(|e| panic!("bad control reply {r:?}: {e}"))
    }

    /// Runs the CLI (`sockacct ARGS… --control-socket <ours>`), returning (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let o = Command::new(agent_exe())
            .args(args)
            .arg("--control-socket")
            .arg(self.control_socket())
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into(),
            String::from_utf8_lossy(&o.stderr).into(),
        )
    }

    /// SIGKILL: no chance to clean up. Returns the lines it wrote.
    pub fn kill9(mut self) -> Vec<String> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
        thread::sleep(Duration::from_millis(100));
        self.lines()
    }

    /// Waits until the agent has polled `n` more times (read from `status`).
    pub fn wait_ticks(&self, n: u64) {
        let ticks = |d: &Daemon| {
            d.control(serde_json::json!({"cmd": "status"}))["ticks"]
                .as_u64()
                .unwrap_or(0)
        };
        let start = ticks(self);
        wait_for(&format!("{n} more polls"), Duration::from_secs(30), || {
            (ticks(self) >= start + n).then_some(())
        });
    }

    /// SIGTERM, wait for a clean exit, return every line it wrote.
    pub fn stop_lines(self) -> Vec<String> {
        let lines = self.lines.clone();
        self.stop();
        lines.lock().unwrap().clone()
    }

    /// Sends `sig` and waits for the agent to exit (and its last lines to be read).
    pub fn stop_with(&mut self, sig: libc::c_int) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let st = wait_for("the agent to exit", Duration::from_secs(30), || {
            self.child.try_wait().unwrap()
        });
        wait_for("the last lines", Duration::from_secs(5), || {
            self.stderr()
                .iter()
                .any(|l| l.contains("detached; bye"))
                .then_some(())
        });
        thread::sleep(Duration::from_millis(100));
        st
    }

    /// SIGTERM, wait for a clean exit, return every event it wrote.
    pub fn stop(mut self) -> Vec<DeltaEvent> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = wait_for("the agent to exit", Duration::from_secs(30), || {
            self.child.try_wait().unwrap()
        });
        assert!(st.success(), "agent exited with {st}: {:?}", self.stderr());
        // Let the reader thread take the last lines.
        wait_for("the last events", Duration::from_secs(5), || {
            self.stderr()
                .iter()
                .any(|l| l.contains("detached; bye"))
                .then_some(())
        });
        thread::sleep(Duration::from_millis(100));
        self.events()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sum of every event's labels, plus unattributed and total.
#[derive(Debug, Default, Clone)]
pub struct Sums {
    pub labels: BTreeMap<String, Traffic>,
    pub unattributed: Traffic,
    pub total: Traffic,
    pub ifaces: BTreeMap<String, Traffic>,
}

pub fn sum(events: &[DeltaEvent]) -> Sums {
    let mut s = Sums::default();
    for e in events {
        for (l, t) in &e.labels {
            s.labels.entry(l.clone()).or_default().add(t);
        }
        for (l, t) in &e.ifaces {
            s.ifaces.entry(l.clone()).or_default().add(t);
        }
        s.unattributed.add(&e.unattributed);
        s.total.add(&e.total);
    }
    s
}

/// Checks the invariants every run must keep: conservation in every event, increasing
/// seq, no empty event.
pub fn check_events(events: &[DeltaEvent]) {
    let mut prev: Option<u64> = None;
    for e in events {
        assert!(
            e.conserves(),
            "event seq {} does not conserve: {e:?}",
            e.seq
        );
        assert!(
            !(e.total.is_zero() && e.ifaces.is_empty()),
            "empty event written: {e:?}"
        );
        assert!(
            e.labels.values().all(|t| !t.is_zero()),
            "a label that did not move: {e:?}"
        );
        if let Some(p) = prev {
            assert!(e.seq > p, "seq not increasing: {p} then {}", e.seq);
        }
        prev = Some(e.seq);
        assert_eq!(e.v, 1);
        assert_eq!(e.kind, "delta");
    }
}

pub fn label<'a>(s: &'a Sums, name: &str) -> &'a Traffic {
    s.labels.get(name).unwrap_or_else(|| {
        panic!(
            "no label {name:?} in {:?}",
            s.labels.keys().collect::<Vec<_>>()
        )
    })
}
