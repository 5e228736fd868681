//! What another actor on the host can do to the agent's files, with the real agent: the
//! spool directory removed while labelled traffic is being counted (issue 18, probe 7), and
//! links planted at the names the agent writes as root (probe 10).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sockacct_tests::*;

fn seq_of(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap()
}

/// The `tx + rx` of `label` in a delta record (0 if absent or not a delta).
fn label_bytes(v: &Value, label: &str) -> u64 {
    if v["type"] != "delta" {
        return 0;
    }
    let t = &v["labels"][label];
    t["tx"].as_u64().unwrap_or(0) + t["rx"].as_u64().unwrap_or(0)
}

/// Every record in a spool directory, read by `sockacct spool cat`.
fn spool_cat(dir: &std::path::Path) -> Vec<Value> {
    let o = Command::new(agent_exe())
        .args(["spool", "cat", "--spool-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn removing_the_spool_directory_loses_only_what_was_in_it_and_says_so_once() {
    if !require_root("spool_dir_removed") {
        return;
    }
    let cg = TestCgroup::new("rmspool");
    let state = TempDir::new("rmspool");
    let spool = state.0.join("spool");
    let cfg = state.0.join("sockacct.toml");
    // Small segments, so sealed ones exist when the directory goes.
    fs::write(
        &cfg,
        "[spool]\nsegment_max_bytes = 4096\nmax_bytes = 10485760\n",
    )
    .unwrap();
    let d = Daemon::start_in(
        &cg,
        &state.0,
        &["--interval", "20", "--config", cfg.to_str().unwrap()],
    );
    assert_eq!(
        fs::metadata(&spool).unwrap().permissions().mode() & 0o7777,
        0o700,
        "the spool directory is created 0700"
    );
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "rm-srv",
        &["tcp-serve", "127.0.0.1", "1000000", "300"],
    );
    let port = srv.value("port").to_string();
    let cli = Peer::spawn(
        Some(&cg),
        None,
        "rm-cli",
        &["tcp-connect", "127.0.0.1", &port, "1000000", "700"],
    );
    wait_for("two sealed segments", Duration::from_secs(60), || {
        let st = d.control(json!({"cmd": "status"}));
        (st["spool"]["pending_segments"].as_u64().unwrap_or(0) >= 2).then_some(())
    });

    // rm -rf (again only if the agent made a file in it between the unlinks and the rmdir).
    let removed_at = Instant::now();
    while let Err(e) = fs::remove_dir_all(&spool) {
        assert!(spool.exists(), "{e}");
    }
    let st = wait_for(
        "the spool directory to be made again",
        Duration::from_secs(2),
        || {
            let st = d.control(json!({"cmd": "status"}));
            (spool.is_dir() && st["spool"]["dir_lost"] == 1 && st["spool"]["dir_missing"] == false)
                .then_some(st)
        },
    );
    eprintln!("made again after {:?}", removed_at.elapsed());
    assert_eq!(
        fs::metadata(&spool).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    // Traffic goes on; new deltas land in the new directory.
    let ticks = st["ticks"].as_u64().unwrap();
    wait_for("more polls", Duration::from_secs(10), || {
        let st = d.control(json!({"cmd": "status"}));
        (st["ticks"].as_u64().unwrap() > ticks + 20).then_some(())
    });
    drop(cli);
    drop(srv);
    let stderr = d.stderr();
    let printed: Vec<Value> = d
        .stop_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // The gap record, printed like every record, and in the new spool.
    let gaps: Vec<&Value> = printed
        .iter()
        .filter(|v| v["type"] == "gap" && v["reason"] == "dir_lost")
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let g = gaps[0];
    let (first, last, lost_records) = (
        g["lost_first_seq"].as_u64().unwrap(),
        g["lost_last_seq"].as_u64().unwrap(),
        g["lost_records"].as_u64().unwrap(),
    );
    assert!(lost_records > 0);
    let on_disk: BTreeMap<u64, Value> = spool_cat(&spool)
        .into_iter()
        .map(|v| (seq_of(&v), v))
        .collect();
    assert!(
        on_disk.contains_key(&seq_of(g)),
        "the gap record is in the new spool"
    );

    // Every record the agent wrote is either in the new spool or stated lost: exactly one,
    // and the gap's count is exact (nothing was uploaded, so nothing was acknowledged).
    let mut lost = BTreeSet::new();
    for v in &printed {
        let s = seq_of(v);
        let in_range = (first..=last).contains(&s);
        match (on_disk.get(&s), in_range) {
            (Some(w), false) => assert_eq!(w, v, "seq {s} altered"),
            (None, true) => {
                lost.insert(s);
            }
            (Some(_), true) => panic!("seq {s} is in the new spool and stated lost"),
            (None, false) => panic!("seq {s} neither in the spool nor stated lost: {v}"),
        }
    }
    assert_eq!(
        lost.len() as u64,
        lost_records,
        "the gap names exactly what was lost"
    );
    assert_eq!(
        st["spool"]["dropped"]["dir_lost"]["records"].as_u64(),
        Some(lost_records)
    );
    // The bytes: what is in the spool plus what the gap states lost is all that was counted.
    for label in ["rm-cli", "rm-srv"] {
        let all: u64 = printed.iter().map(|v| label_bytes(v, label)).sum();
        let kept: u64 = on_disk.values().map(|v| label_bytes(v, label)).sum();
        let gone: u64 = printed
            .iter()
            .filter(|v| lost.contains(&seq_of(v)))
            .map(|v| label_bytes(v, label))
            .sum();
        assert!(all > 0, "{label} counted");
        assert_eq!(kept + gone, all, "{label}: spool + gap == counted");
    }
    let after: u64 = on_disk
        .values()
        .filter(|v| seq_of(v) > seq_of(g))
        .map(|v| label_bytes(v, "rm-cli"))
        .sum();
    assert!(
        after > 0,
        "deltas after the directory was made again are in it"
    );
    let verify = Command::new(agent_exe())
        .args(["spool", "verify", "--spool-dir"])
        .arg(&spool)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Said once per change, not per tick.
    let count = |pat: &str| stderr.iter().filter(|l| l.contains(pat)).count();
    assert_eq!(count("was removed while the agent ran"), 1, "{stderr:#?}");
    assert_eq!(count("is there again"), 1, "{stderr:#?}");
    assert!(count("writing works again") <= 1, "{stderr:#?}");
    assert!(count("held in memory") <= 1, "{stderr:#?}");
}

/// Runs the agent expecting it to refuse to start; returns its standard error.
fn refused(cg: &TestCgroup, dir: &std::path::Path) -> String {
    let mut child = Command::new(agent_exe())
        .args(["run", "--cgroup"])
        .arg(&cg.path)
        .arg("--state-dir")
        .arg(dir)
        .arg("--spool-dir")
        .arg(dir.join("spool"))
        .arg("--control-socket")
        .arg(dir.join("control.sock"))
        .args(["--no-metrics"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_for("the agent to refuse", Duration::from_secs(30), || {
        child.try_wait().unwrap()
    });
    let mut err = String::new();
    use std::io::Read as _;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!st.success(), "the agent started: {err}");
    err
}

#[test]
fn a_link_planted_at_the_agents_names_is_never_written_through() {
    if !require_root("planted_links") {
        return;
    }
    let cg = TestCgroup::new("links");
    let base = TempDir::new("links");
    let target = base.0.join("root-only");
    fs::write(&target, "precious\n").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
    let state = base.0.join("state");
    fs::create_dir(&state).unwrap();

    // `running`: the probe's case.
    std::os::unix::fs::symlink(&target, state.join("running")).unwrap();
    let err = refused(&cg, &state);
    assert!(
        err.contains("running") && err.contains("symbolic link"),
        "{err}"
    );
    fs::remove_file(state.join("running")).unwrap();

    // `seq`.
    std::os::unix::fs::symlink(&target, state.join("seq")).unwrap();
    let err = refused(&cg, &state);
    assert!(
        err.contains("seq") && err.contains("symbolic link"),
        "{err}"
    );
    fs::remove_file(state.join("seq")).unwrap();

    // A segment name in the spool directory.
    fs::create_dir(state.join("spool")).unwrap();
    let seg = state.join("spool/seg-00000000000000000000.zst.open");
    std::os::unix::fs::symlink(&target, &seg).unwrap();
    let err = refused(&cg, &state);
    assert!(
        err.contains("seg-") && err.contains("symbolic link"),
        "{err}"
    );
    fs::remove_file(&seg).unwrap();

    // The spool directory itself as a link.
    fs::remove_dir(state.join("spool")).unwrap();
    let elsewhere = base.0.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, state.join("spool")).unwrap();
    let err = refused(&cg, &state);
    assert!(
        err.contains("spool") && err.contains("symbolic link"),
        "{err}"
    );
    fs::remove_file(state.join("spool")).unwrap();

    // A state directory others may write to.
    fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
    let err = refused(&cg, &state);
    assert!(
        err.contains("writable by group or others") && err.contains("chmod go-w"),
        "{err}"
    );
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();

    assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
    // With the links gone, it starts.
    let d = Daemon::start_in(&cg, &state, &[]);
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
    d.stop();
}
