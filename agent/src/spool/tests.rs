//! Spool tests: round trips, recovery from every torn tail, damage, full disks, the size
//! cap, a model test replaying random operations with crashes, a real tmpfs, and a
//! throughput measurement (`#[ignore]`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, UNIX_EPOCH},
};

use super::*;
use crate::event::DeltaEvent;
use crate::event::Traffic;

// ---------------------------------------------------------------------------------------
// Helpers

pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "sockacct-spool-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// splitmix64
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub(super) fn ident() -> Identity {
    Identity {
        agent: "3d12f0c8a7b94e21".into(),
        boot: "5c30e1aa-4f7d-4c59-9a0e-2b1d3c4e5f60".into(),
    }
}

const LABELS: [&str; 8] = [
    "nginx",
    "postgres",
    "curl",
    "sshd",
    "systemd-resolve",
    "node",
    "redis-server",
    "chronyd",
];

/// A realistic delta event: ~5 labels, one interface.
pub(super) fn event(i: u64) -> DeltaEvent {
    let mut labels = BTreeMap::new();
    let mut total = Traffic::default();
    for k in 0..5u64 {
        let name = LABELS[((i + k * 3) % LABELS.len() as u64) as usize];
        let x = i.wrapping_mul(2654435761).wrapping_add(k * 7919) % 100_000;
        let t = Traffic {
            tx: 60 + x * 13,
            rx: 40 + x * 7 % 50_000,
            tx_packets: 1 + x % 90,
            rx_packets: 1 + x % 70,
        };
        total.add(&t);
        labels.insert(name.to_string(), t);
    }
    let unattributed = Traffic {
        tx: 0,
        rx: 60 * (i % 3),
        tx_packets: 0,
        rx_packets: i % 3,
    };
    total.add(&unattributed);
    let mut ifaces = BTreeMap::new();
    ifaces.insert(
        "eth0".to_string(),
        Traffic {
            tx: total.tx + total.tx_packets * 14,
            rx: total.rx + total.rx_packets * 14,
            ..total
        },
    );
    let id = ident();
    DeltaEvent {
        v: FORMAT_VERSION,
        kind: "delta".into(),
        agent: id.agent,
        boot: id.boot,
        seq: 0,
        t: 1_795_443_814_760 + i * 100,
        d: 100,
        labels,
        unattributed,
        total,
        ifaces,
    }
}

pub(super) fn events(from: u64, n: u64) -> Vec<DeltaEvent> {
    (from..from + n).map(event).collect()
}

pub(super) fn small_cfg(fsync: FsyncPolicy) -> SpoolConfig {
    SpoolConfig {
        dir: PathBuf::from("/nonexistent"),
        segment_max_bytes: 4096,
        segment_max_age: Duration::from_secs(600),
        total_max_bytes: 1 << 30,
        fsync,
        memory_backlog_bytes: 1 << 20,
    }
}

/// A persistent allocator in `dir` (a fresh block per open, as in the daemon).
pub(super) fn alloc(dir: &Path) -> SeqAllocator {
    SeqAllocator::open(&dir.join("seq")).unwrap()
}

/// A fixed point on both clocks (the monotonic one from the first call in this process).
pub(super) fn t0() -> Now {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    Now {
        mono: *BASE.get_or_init(Instant::now),
        wall: UNIX_EPOCH + Duration::from_secs(1_795_443_814),
    }
}

pub(super) fn split_lines(b: &[u8]) -> Vec<Vec<u8>> {
    b.split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| l.to_vec())
        .collect()
}

pub(super) fn seq_of(line: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(line).unwrap();
    v["seq"].as_u64().unwrap()
}

pub(super) fn json(line: &[u8]) -> serde_json::Value {
    serde_json::from_slice(line).unwrap()
}

/// Every record on the storage as (seq, line), checking seq strictly increases.
pub(super) fn read_back<S: Storage>(st: &S) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    cat_storage(st, &mut out).unwrap();
    let recs: Vec<(u64, Vec<u8>)> = split_lines(&out)
        .into_iter()
        .map(|l| (seq_of(&l), l))
        .collect();
    for w in recs.windows(2) {
        assert!(
            w[0].0 < w[1].0,
            "seq not increasing: {} then {}",
            w[0].0,
            w[1].0
        );
    }
    recs
}

pub(super) fn open_fault(
    fs: &FaultStorage,
    cfg: SpoolConfig,
    dir: &Path,
) -> (Spool<FaultStorage>, RecoveryReport) {
    Spool::open(cfg, fs.clone(), ident(), alloc(dir)).unwrap()
}

pub(super) fn segment_files(fs: &FaultStorage) -> Vec<String> {
    fs.names()
        .into_iter()
        .filter(|n| n.starts_with("seg-"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Round trip, cat, verify

#[test]
fn spool_round_trip_append_seal_bodies_acknowledge() {
    let tmp = TempDir::new("rt");
    let dir = tmp.path().join("spool");
    let cfg = SpoolConfig {
        dir: dir.clone(),
        ..SpoolConfig::default()
    };
    let (mut sp, rep) = Spool::open(
        cfg.clone(),
        FsStorage::open(&dir).unwrap(),
        ident(),
        alloc(tmp.path()),
    )
    .unwrap();
    assert_eq!(rep.records, 0);
    let mut written = Vec::new();
    for b in 0..10 {
        let mut evs = events(b * 3, 3);
        let out = sp.append(&mut evs, t0());
        assert_eq!((out.written, out.backlogged, out.dropped), (3, 0, 0));
        assert_eq!(evs[2].seq, out.last_seq.unwrap());
        written.extend(split_lines(&out.lines));
    }
    assert_eq!(written.len(), 30);
    let seqs: Vec<u64> = written.iter().map(|l| seq_of(l)).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    // The line is the event with its seq.
    let mut e0 = event(0);
    e0.seq = seqs[0];
    assert_eq!(written[0], serde_json::to_vec(&e0).unwrap());

    assert!(sp.pending().is_empty(), "nothing sealed yet");
    sp.seal().unwrap();
    let p = sp.pending();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].first_seq, p[0].last_seq, p[0].records, p[0].frames),
        (seqs[0], seqs[29], 30, 10)
    );
    assert_eq!(
        p[0].bytes,
        fs::metadata(dir.join(&p[0].name)).unwrap().len()
    );
    assert!(p[0].name.ends_with(".zst") && p[0].name.starts_with("seg-"));

    // zstd -dc | jq reads a sealed segment as it is.
    if Command::new("zstd").arg("--version").output().is_ok() {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "zstd -dc {} | jq -c .seq",
                dir.join(&p[0].name).display()
            ))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got: Vec<u64> = String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(got, seqs);
    }

    // Bodies: whole frames, at most max_body bytes; a frame bigger than that alone.
    let frame_len = p[0].bytes / 10;
    let bodies = sp.bodies(frame_len * 3 + frame_len / 2).unwrap();
    assert!(bodies.len() >= 4, "{} bodies", bodies.len());
    let mut got = Vec::new();
    for b in &bodies {
        assert!(b.data.len() as u64 <= frame_len * 3 + frame_len / 2 || b.oversize);
        let plain = zstd::stream::decode_all(&b.data[..]).unwrap();
        let lines = split_lines(&plain);
        assert_eq!(lines.len() as u64, b.records);
        assert_eq!(
            (seq_of(&lines[0]), seq_of(lines.last().unwrap())),
            (b.first_seq, b.last_seq)
        );
        assert_eq!(b.pos.last_seq, b.last_seq);
        got.extend(lines);
    }
    assert_eq!(got, written);
    assert!(
        sp.bodies(1)
            .unwrap()
            .iter()
            .all(|b| b.oversize && b.frames == 1)
    );

    // Acknowledge the first two bodies: the segment stays (partly acknowledged).
    sp.acknowledge(bodies[0].pos.clone()).unwrap();
    sp.acknowledge(bodies[1].pos.clone()).unwrap();
    sp.acknowledge(bodies[0].pos.clone()).unwrap(); // older again: no-op
    assert_eq!(sp.pending().len(), 1);
    let rest = sp.bodies(1 << 20).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].records, 30 - bodies[0].records - bodies[1].records);
    assert_eq!(rest[0].first_seq, bodies[2].first_seq);
    // Acknowledging beyond what is sealed is refused.
    let mut bad = rest[0].pos.clone();
    bad.last_seq += 1000;
    assert!(matches!(sp.acknowledge(bad), Err(SpoolError::Cursor(_))));
    // Reopen in between: the cursor survives.
    drop(sp);
    let (mut sp, rep) = Spool::open(
        cfg.clone(),
        FsStorage::open(&dir).unwrap(),
        ident(),
        alloc(tmp.path()),
    )
    .unwrap();
    assert_eq!(rep.acked_seq, Some(bodies[1].last_seq));
    let rest2 = sp.bodies(1 << 20).unwrap();
    assert_eq!(rest2[0].data, rest[0].data);
    sp.acknowledge(rest2[0].pos.clone()).unwrap();
    assert!(sp.pending().is_empty());
    assert!(
        !dir.join(&p[0].name).exists(),
        "acknowledged segment deleted"
    );
    assert!(dir.join("cursor").exists());

    // New records continue with higher numbers.
    let out = sp.append(&mut events(100, 1), t0());
    assert!(out.first_seq.unwrap() > seqs[29]);
    let st = sp.stats();
    assert_eq!(st.records_written, 1);
    assert!(st.healthy);
    // A second agent on the same directory is refused.
    assert!(FsStorage::open(&dir).is_err());
}

#[test]
fn spool_cat_and_verify() {
    let tmp = TempDir::new("cat");
    let dir = tmp.path().join("spool");
    let cfg = SpoolConfig {
        dir: dir.clone(),
        fsync: FsyncPolicy::Always,
        ..SpoolConfig::default()
    };
    let (mut sp, _) = Spool::open(
        cfg,
        FsStorage::open(&dir).unwrap(),
        ident(),
        alloc(tmp.path()),
    )
    .unwrap();
    let mut all = Vec::new();
    for b in 0..6 {
        let out = sp.append(&mut events(b * 2, 2), t0());
        all.extend(split_lines(&out.lines));
        if b == 2 {
            sp.seal().unwrap();
        }
    }
    // One sealed, one open segment: cat prints both, oldest first.
    let mut out = Vec::new();
    let rep = cat(&dir, &mut out).unwrap();
    assert_eq!(split_lines(&out), all);
    assert_eq!((rep.segments, rep.records, rep.frames), (2, 12, 6));
    assert!(rep.damage.is_empty());
    let v = verify(&dir).unwrap();
    assert!(v.is_clean(), "{v}");
    assert_eq!(v.records(), 12);
    assert!(v.segments[1].open && !v.segments[0].open);
    assert_eq!(v.segments[0].first_seq, Some(seq_of(&all[0])));

    // Damage a sealed segment: verify reports it, cat skips it, nothing is modified.
    let sealed = dir.join(&v.segments[0].name);
    let mut bytes = fs::read(&sealed).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&sealed, &bytes).unwrap();
    let before: Vec<(String, Vec<u8>)> = {
        let mut v: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().into_string().unwrap(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let v = verify(&dir).unwrap();
    assert!(!v.is_clean());
    assert_eq!(v.segments[0].damage.len(), 1);
    assert!(v.to_string().contains("DAMAGE"), "{v}");
    let mut out = Vec::new();
    let rep = cat(&dir, &mut out).unwrap();
    assert_eq!(rep.damage.len(), 1);
    let got = split_lines(&out);
    assert_eq!(got.len(), 10, "one frame (2 records) skipped");
    assert!(got.iter().all(|l| all.contains(l)));
    let after: Vec<(String, Vec<u8>)> = {
        let mut v: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().into_string().unwrap(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(before, after, "cat and verify change nothing");
    assert!(cat(&tmp.path().join("missing"), &mut Vec::new()).is_err());
}

// ---------------------------------------------------------------------------------------
// Recovery

/// Builds a spool with `good` fsynced batches and one more frame; returns the storage, the
/// active segment's name, the length of its good prefix, and the good records.
fn spool_with_last_frame(tmp: &Path) -> (FaultStorage, String, usize, Vec<Vec<u8>>) {
    let fs = FaultStorage::new(1);
    let (mut sp, _) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp);
    let mut good = Vec::new();
    for b in 0..4 {
        good.extend(split_lines(&sp.append(&mut events(b * 2, 2), t0()).lines));
    }
    let name = sp.stats().active_segment.unwrap();
    let prefix = fs.contents(&name).unwrap().len();
    sp.append(&mut events(100, 3), t0());
    drop(sp);
    (fs, name, prefix, good)
}

#[test]
fn spool_torn_last_frame_at_every_offset() {
    let tmp = TempDir::new("torn");
    let (base, name, prefix, good) = spool_with_last_frame(tmp.path());
    let full = base.contents(&name).unwrap();
    let last_len = full.len() - prefix;
    assert!(last_len > 50);
    for cut in 0..last_len {
        let fs = FaultStorage::new(cut as u64);
        fs.put(&name, &full[..prefix + cut]);
        let (mut sp, rep) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
        if cut == 0 {
            assert!(rep.torn.is_none());
        } else {
            let t = rep
                .torn
                .as_ref()
                .unwrap_or_else(|| panic!("cut {cut}: no torn tail reported"));
            assert_eq!(
                (t.offset, t.bytes_cut),
                (prefix as u64, cut as u64),
                "cut {cut}"
            );
        }
        assert!(rep.damaged.is_empty());
        assert_eq!(rep.sealed, vec![name.trim_end_matches(".open").to_string()]);
        let recs: Vec<Vec<u8>> = read_back(&fs).into_iter().map(|r| r.1).collect();
        assert_eq!(recs, good, "cut {cut}: exactly the fsynced records");
        assert_eq!(sp.stats().torn_bytes_cut, cut as u64);
        // Appending continues, into a new segment.
        let out = sp.append(&mut events(200, 1), t0());
        assert_eq!(out.written, 1);
        assert_ne!(sp.stats().active_segment.unwrap(), name);
        let recs = read_back(&fs);
        assert_eq!(recs.len(), good.len() + 1);
        assert_eq!(recs.last().unwrap().1, split_lines(&out.lines)[0]);
    }
    // Any byte of the last frame flipped: never a corrupt record, never a fsynced one lost.
    for i in 0..last_len {
        let fs = FaultStorage::new(i as u64);
        let mut data = full.clone();
        data[prefix + i] ^= 0xA5;
        fs.put(&name, &data);
        let (_sp, rep) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
        let recs: Vec<Vec<u8>> = read_back(&fs).into_iter().map(|r| r.1).collect();
        assert_eq!(recs, good, "flip at {i}");
        assert_eq!(
            rep.torn.as_ref().map(|t| t.bytes_cut),
            Some(last_len as u64),
            "flip at {i}"
        );
    }
}

#[test]
fn spool_damaged_middle_segment_set_aside() {
    let tmp = TempDir::new("dmg");
    let fs = FaultStorage::new(7);
    let (mut sp, _) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    let mut segs: Vec<Vec<Vec<u8>>> = Vec::new();
    for s in 0..3 {
        let mut lines = Vec::new();
        for b in 0..5 {
            lines.extend(split_lines(
                &sp.append(&mut events(s * 100 + b, 1), t0()).lines,
            ));
        }
        sp.seal().unwrap();
        segs.push(lines);
    }
    let p = sp.pending();
    assert_eq!(p.len(), 3);
    // The server acknowledged the first segment and part of the middle one.
    let all = sp.bodies(1).unwrap();
    assert_eq!(all.len(), 15, "one frame per body, every segment");
    assert!(all.windows(2).all(|w| w[0].last_seq < w[1].first_seq));
    for b in all.into_iter().filter(|b| b.segment == p[0].name) {
        sp.acknowledge(b.pos).unwrap();
    }
    let b = sp.bodies(1).unwrap();
    assert_eq!(b[0].segment, p[1].name);
    sp.acknowledge(b[0].pos.clone()).unwrap(); // first frame of the middle segment
    let acked = b[0].last_seq;
    drop(sp);

    // Corrupt the third of five frames of the middle segment.
    let mid = fs.contents(&p[1].name).unwrap();
    let frame_len = mid.len() / 5;
    let mut bad = mid.clone();
    bad[2 * frame_len + frame_len / 2] ^= 0xFF;
    fs.put(&p[1].name, &bad);

    let (sp, rep) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    assert_eq!(rep.damaged.len(), 1, "{rep}");
    let d = &rep.damaged[0];
    assert_eq!(d.segment, p[1].name);
    assert_eq!(d.set_aside_as, format!("{}.damaged", p[1].name));
    assert_eq!(
        (d.frames_kept, d.records_kept),
        (4, 4),
        "good frames before and after the damage kept"
    );
    assert_eq!(
        fs.contents(&d.set_aside_as).unwrap(),
        bad,
        "original kept, not deleted"
    );
    assert!(rep.torn.is_none());
    assert_eq!(
        rep.acked_seq,
        Some(acked),
        "a cursor into the damaged segment does not break opening"
    );
    let recs: Vec<Vec<u8>> = read_back(&fs).into_iter().map(|r| r.1).collect();
    let mut want: Vec<Vec<u8>> = segs[1].clone();
    want.remove(2);
    want.extend(segs[2].clone());
    assert_eq!(recs, want);
    // Upload continues after the cursor, inside the salvaged segment.
    let b = sp.bodies(1 << 20).unwrap();
    assert_eq!(b[0].first_seq, seq_of(&segs[1][1]));
    assert_eq!(b[0].records, 3);
    assert_eq!(sp.stats().damaged_segments, 1);
    // Verify sees a clean spool and the file set aside.
    let v = verify_storage(&fs).unwrap();
    assert!(v.is_clean(), "{v}");
    assert_eq!(v.set_aside, vec![d.set_aside_as.clone()]);
    drop(sp);
    // Reopening again changes nothing.
    let (_sp, rep) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    assert!(rep.damaged.is_empty() && rep.torn.is_none());
    assert_eq!(rep.set_aside_earlier.len(), 1);
}

#[test]
fn spool_damage_inside_last_segment_is_not_cut() {
    // Damage followed by good frames in the newest segment is damage, not a torn tail: the
    // good frames after it are kept.
    let tmp = TempDir::new("dmglast");
    let fs = FaultStorage::new(8);
    let (mut sp, _) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    let mut lines = Vec::new();
    for b in 0..4 {
        lines.extend(split_lines(&sp.append(&mut events(b, 1), t0()).lines));
    }
    let name = sp.stats().active_segment.unwrap();
    drop(sp);
    let mut data = fs.contents(&name).unwrap();
    let fl = data.len() / 4;
    data[fl + 10] ^= 1;
    fs.put(&name, &data);
    let (_sp, rep) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    assert!(rep.torn.is_none());
    assert_eq!(rep.damaged.len(), 1);
    assert_eq!(rep.damaged[0].records_kept, 3);
    let recs: Vec<Vec<u8>> = read_back(&fs).into_iter().map(|r| r.1).collect();
    assert_eq!(
        recs,
        vec![lines[0].clone(), lines[2].clone(), lines[3].clone()]
    );
}

#[test]
fn spool_salvage_survives_a_crash_at_every_step() {
    let tmp = TempDir::new("salv");
    let fs0 = FaultStorage::new(9);
    let (mut sp, _) = open_fault(&fs0, small_cfg(FsyncPolicy::Always), tmp.path());
    let mut all = Vec::new();
    for s in 0..3 {
        for b in 0..3 {
            all.extend(split_lines(
                &sp.append(&mut events(s * 10 + b, 1), t0()).lines,
            ));
        }
        sp.seal().unwrap();
    }
    let p = sp.pending();
    drop(sp);
    let mut mid = fs0.contents(&p[1].name).unwrap();
    let fl = mid.len() / 3;
    mid[fl + fl / 2] ^= 0xFF;
    let mut want = all.clone();
    want.remove(4);
    for k in 0..30 {
        let fs = FaultStorage::new(100 + k as u64);
        for n in segment_files(&fs0) {
            fs.put(&n, &fs0.contents(&n).unwrap());
        }
        fs.put(&p[1].name, &mid);
        fs.kill_after(k);
        let r = Spool::open(
            small_cfg(FsyncPolicy::Always),
            fs.clone(),
            ident(),
            alloc(tmp.path()),
        );
        drop(r);
        fs.crash();
        let (_sp, _rep) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
        let recs: Vec<Vec<u8>> = read_back(&fs).into_iter().map(|r| r.1).collect();
        assert_eq!(recs, want, "killed after {k} operations");
        let names = fs.names();
        assert!(names.iter().any(|n| n.ends_with(".damaged")), "{names:?}");
        assert!(
            !names
                .iter()
                .any(|n| n.ends_with(".salvage") || n.ends_with(".tmp")),
            "{names:?}"
        );
    }
}

#[test]
fn spool_cursor_problems_do_not_break_opening() {
    let tmp = TempDir::new("cur");
    let fs = FaultStorage::new(3);
    let (mut sp, _) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    sp.append(&mut events(0, 2), t0());
    sp.seal().unwrap();
    drop(sp);
    // A cursor naming a segment that does not exist (dropped or set aside).
    fs.put(
        "cursor",
        br#"{"v":1,"acked_seq":0,"segment":"seg-00000000000000000077.zst","offset":99}"#,
    );
    let (sp, rep) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    assert_eq!(rep.acked_seq, Some(0));
    assert_eq!(sp.pending().len(), 1);
    assert!(rep.cursor_problem.is_none());
    drop(sp);
    // An unreadable cursor: nothing counts as acknowledged (records may be sent twice, never lost).
    fs.put("cursor", b"{garbage");
    let (sp, rep) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    assert!(rep.cursor_problem.is_some());
    assert_eq!(sp.pending().len(), 1);
}

#[test]
fn spool_refuses_an_allocator_behind_the_spool() {
    let tmp = TempDir::new("seqb");
    let fs = FaultStorage::new(4);
    let (mut sp, _) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    sp.append(&mut events(0, 2), t0());
    drop(sp);
    let e = Spool::open(
        small_cfg(FsyncPolicy::Always),
        fs.clone(),
        ident(),
        SeqAllocator::ephemeral(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, SpoolError::SeqBehind { .. }), "{e}");
}

#[test]
fn spool_is_send() {
    fn send<T: Send>() {}
    send::<Spool<FsStorage>>();
    send::<Spool<FaultStorage>>();
}

#[test]
fn spool_bodies_pass_over_a_segment_damaged_while_running() {
    let tmp = TempDir::new("rot");
    let fs = FaultStorage::new(21);
    let (mut sp, _) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    let mut lines = Vec::new();
    for s in 0..2 {
        for b in 0..3 {
            lines.extend(split_lines(
                &sp.append(&mut events(s * 10 + b, 1), t0()).lines,
            ));
        }
        sp.seal().unwrap();
    }
    let p = sp.pending();
    // Bit rot in the last frame of the first segment, after recovery checked it.
    let mut d = fs.contents(&p[0].name).unwrap();
    let n = d.len();
    d[n - 3] ^= 0x10;
    fs.put(&p[0].name, &d);
    let mut got = Vec::new();
    loop {
        let bodies = sp.bodies(1 << 20).unwrap();
        if bodies.is_empty() {
            break;
        }
        for b in bodies {
            got.extend(split_lines(&zstd::stream::decode_all(&b.data[..]).unwrap()));
            sp.acknowledge(b.pos).unwrap();
        }
    }
    let mut want = lines.clone();
    want.remove(2);
    assert_eq!(
        got, want,
        "everything good uploaded, the damaged frame skipped"
    );
    assert!(sp.pending().is_empty());
    assert!(segment_files(&fs).is_empty());
}

#[test]
fn spool_config_is_checked() {
    let fs = FaultStorage::new(5);
    let mut c = small_cfg(FsyncPolicy::Always);
    c.total_max_bytes = c.segment_max_bytes;
    assert!(matches!(
        Spool::open(c, fs, ident(), SeqAllocator::ephemeral()),
        Err(SpoolError::Config(_))
    ));
}

// ---------------------------------------------------------------------------------------
// Disk failures

const BACKLOG_CAP: u64 = 8192;

#[test]
fn spool_enospc_backlog_then_space_returns() {
    let tmp = TempDir::new("enospc");
    let fs = FaultStorage::new(11);
    let mut cfg = small_cfg(FsyncPolicy::Always);
    cfg.memory_backlog_bytes = BACKLOG_CAP;
    let (mut sp, _) = open_fault(&fs, cfg, tmp.path());
    let mut lines: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut dropped = BTreeSet::new();
    for i in 0..5 {
        let out = sp.append(&mut events(i, 1), t0());
        assert_eq!(out.written, 1);
        lines.extend(split_lines(&out.lines).into_iter().map(|l| (seq_of(&l), l)));
    }
    fs.enospc_after(700); // a few more frames fit, then the disk is full
    let mut backlogged_seen = false;
    for i in 5..60 {
        let out = sp.append(&mut events(i, 2), t0());
        let ls = split_lines(&out.lines);
        assert_eq!(ls.len(), 2);
        for l in &ls[ls.len() - out.dropped..] {
            dropped.insert(seq_of(l));
        }
        backlogged_seen |= out.backlogged > 0;
        if out.backlogged > 0 || out.dropped > 0 {
            assert!(
                out.error.as_deref().unwrap_or("").contains("No space left"),
                "{:?}",
                out.error
            );
        }
        lines.extend(ls.into_iter().map(|l| (seq_of(&l), l)));
    }
    assert!(backlogged_seen);
    let st = sp.stats();
    assert!(!st.healthy);
    // Bounded in bytes: full up to less than one frame (~500 bytes for two events), plus
    // at most one gap record.
    assert!(
        st.backlog_bytes <= BACKLOG_CAP + 512 && st.backlog_bytes > BACKLOG_CAP - 1000,
        "{}",
        st.backlog_bytes
    );
    assert_eq!(st.backlog_max_bytes, BACKLOG_CAP);
    assert_eq!(st.dropped.backlog_full.records, dropped.len() as u64);
    assert!(!dropped.is_empty());
    // Nothing torn on disk meanwhile.
    assert!(verify_storage(&fs).unwrap().is_clean());

    fs.set_capacity(None);
    sp.tick(t0());
    let st = sp.stats();
    assert!(st.healthy, "{:?}", st.last_error);
    assert_eq!(st.backlog_records, 0);
    let gaps = split_lines(&sp.take_gap_lines());
    assert_eq!(gaps.len(), 1);
    let g = json(&gaps[0]);
    assert_eq!(g["type"], "gap");
    assert_eq!(g["reason"], "backlog_full");
    assert_eq!(g["lost_records"].as_u64(), Some(dropped.len() as u64));
    assert_eq!(g["lost_first_seq"].as_u64(), dropped.first().copied());
    assert_eq!(g["lost_last_seq"].as_u64(), dropped.last().copied());
    assert_eq!(
        (g["agent"].as_str(), g["v"].as_u64()),
        (Some(ident().agent.as_str()), Some(1))
    );
    let recs = read_back(&fs);
    let on_disk: BTreeMap<u64, Vec<u8>> = recs.into_iter().collect();
    for (s, l) in &lines {
        if dropped.contains(s) {
            assert!(!on_disk.contains_key(s));
        } else {
            assert_eq!(on_disk.get(s), Some(l), "seq {s} lost");
        }
    }
    assert_eq!(on_disk.len(), lines.len() - dropped.len() + 1);
    assert_eq!(
        on_disk.values().last().unwrap(),
        &gaps[0],
        "the gap record comes after everything it covers"
    );
}

#[test]
fn spool_eio_torn_write_erofs_and_failed_fsync() {
    let tmp = TempDir::new("eio");
    let fs = FaultStorage::new(12);
    let (mut sp, _) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    let mut all = Vec::new();
    let mut push = |sp: &mut Spool<FaultStorage>, i: u64| {
        let out = sp.append(&mut events(i, 1), t0());
        all.extend(split_lines(&out.lines));
        out
    };
    push(&mut sp, 0);
    // A torn write: a prefix reaches the file, then EIO. It is cut; the frame waits.
    fs.tear_next_append(9);
    let out = push(&mut sp, 1);
    assert_eq!((out.written, out.backlogged), (0, 1));
    assert!(verify_storage(&fs).unwrap().is_clean());
    sp.tick(t0());
    assert!(sp.stats().healthy);
    // A failed fsync: what was written since the last good fsync is written again.
    fs.fail_next(FaultOp::Sync, 1, libc::EIO);
    let out = push(&mut sp, 2);
    assert_eq!((out.written, out.backlogged), (0, 1));
    assert!(sp.stats().last_error.unwrap().contains("fsync"));
    // Read-only file system.
    fs.set_read_only(true);
    let out = push(&mut sp, 3);
    assert_eq!(out.backlogged, 1);
    assert_eq!(sp.stats().backlog_records, 2);
    assert!(out.error.unwrap().contains("Read-only"));
    fs.set_read_only(false);
    // EIO on append, once.
    fs.fail_next(FaultOp::Append, 1, libc::EIO);
    let out = push(&mut sp, 4);
    assert_eq!(out.written + out.backlogged, 1);
    sp.tick(t0());
    assert!(sp.stats().healthy);
    let recs: Vec<Vec<u8>> = read_back(&fs).into_iter().map(|r| r.1).collect();
    assert_eq!(recs, all, "every record exactly once, in order");
    // And durable: a crash now loses nothing.
    drop(sp);
    fs.crash();
    let (_sp, rep) = open_fault(&fs, small_cfg(FsyncPolicy::Always), tmp.path());
    assert!(rep.torn.is_none());
    assert_eq!(
        read_back(&fs).into_iter().map(|r| r.1).collect::<Vec<_>>(),
        all
    );
}

#[test]
fn spool_size_cap_drops_oldest_and_writes_gap() {
    let tmp = TempDir::new("cap");
    let fs = FaultStorage::new(13);
    let mut cfg = small_cfg(FsyncPolicy::Interval(Duration::from_secs(1)));
    cfg.total_max_bytes = 3 * 4096;
    let (mut sp, _) = open_fault(&fs, cfg.clone(), tmp.path());
    let mut lines: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut gaps = Vec::new();
    for i in 0..20 {
        let out = sp.append(&mut events(i, 1), t0());
        lines.extend(split_lines(&out.lines).into_iter().map(|l| (seq_of(&l), l)));
        gaps.extend(split_lines(&out.gaps));
    }
    assert!(gaps.is_empty());
    // Acknowledge the first frame of the oldest segment: a later drop of that segment loses
    // only what follows.
    let b = sp.bodies(1).unwrap();
    sp.acknowledge(b[0].pos.clone()).unwrap();
    let acked = b[0].last_seq;
    for i in 20..300 {
        let out = sp.append(&mut events(i, 1), t0());
        lines.extend(split_lines(&out.lines).into_iter().map(|l| (seq_of(&l), l)));
        gaps.extend(split_lines(&out.gaps));
        let st = sp.stats();
        assert!(
            st.bytes_on_disk <= cfg.total_max_bytes + 1024,
            "{} bytes",
            st.bytes_on_disk
        );
    }
    let st = sp.stats();
    assert!(st.dropped.spool_full.records > 0);
    assert!(!gaps.is_empty());
    let on_disk: BTreeMap<u64, Vec<u8>> = read_back(&fs).into_iter().collect();
    let mut lost = BTreeSet::new();
    let mut lost_records = 0;
    for g in &gaps {
        let g = json(g);
        assert_eq!(g["reason"], "spool_full");
        let (a, b) = (
            g["lost_first_seq"].as_u64().unwrap(),
            g["lost_last_seq"].as_u64().unwrap(),
        );
        lost.extend(a..=b);
        lost_records += g["lost_records"].as_u64().unwrap();
    }
    for g in &gaps {
        // A gap record is on disk, or was itself dropped later (and is covered by a later gap).
        let s = seq_of(g);
        assert!(
            on_disk.get(&s) == Some(g) || lost.contains(&s),
            "gap record {s}"
        );
        lines.insert(s, g.clone());
    }
    assert_eq!(lost_records, st.dropped.spool_full.records);
    let first_gap = json(&gaps[0]);
    assert_eq!(
        first_gap["lost_first_seq"].as_u64(),
        Some(acked + 1),
        "acknowledged records are not lost"
    );
    for (s, l) in &lines {
        if *s <= acked {
            continue;
        }
        if lost.contains(s) {
            assert!(!on_disk.contains_key(s), "seq {s} said lost but present");
        } else {
            assert_eq!(
                on_disk.get(s),
                Some(l),
                "seq {s} missing and not covered by a gap"
            );
        }
    }
    // Exactly the records not present are counted.
    let missing = lines
        .keys()
        .filter(|s| **s > acked && !on_disk.contains_key(s))
        .count() as u64;
    assert_eq!(missing, st.dropped.spool_full.records);
}

// ---------------------------------------------------------------------------------------
// Model test: random operations, faults and crashes

struct Model {
    /// Every line the spool handed out (records and gap records), by seq.
    issued: BTreeMap<u64, Vec<u8>>,
    /// Dropped from the backlog (never on disk).
    dropped: BTreeSet<u64>,
    /// Not durable when the process ended (in the backlog, or written but not fsynced).
    volatile: BTreeSet<u64>,
    /// Ranges stated lost by spool_full and dir_lost gap records.
    cap_lost: Vec<(u64, u64)>,
    /// Issued before the directory was removed: what was kept is written again, but the
    /// durability it had in the old directory is not claimed until the next fsync; exact
    /// accounting of a removal is checked by spool_directory_removed_*.
    before_dir_loss: Option<u64>,
    /// The spool's claim: records up to here that reached the disk are durable.
    durable: Option<u64>,
    acked_ok: Option<u64>,
    acked_tried: Option<u64>,
    server: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    fn take_gaps(&mut self, gaps: &[u8]) {
        for l in split_lines(gaps) {
            let v = json(&l);
            if v["reason"] == "spool_full" || v["reason"] == "dir_lost" {
                self.cap_lost.push((
                    v["lost_first_seq"].as_u64().unwrap(),
                    v["lost_last_seq"].as_u64().unwrap(),
                ));
            }
            self.issued.insert(seq_of(&l), l);
        }
    }
    /// The process ends: what was not durable may be gone.
    fn end_session(&mut self) {
        let d = self.durable;
        let v: Vec<u64> = self
            .issued
            .keys()
            .copied()
            .filter(|s| d.is_none_or(|d| *s > d))
            .collect();
        self.volatile.extend(v);
    }
    /// A record may be missing from the disk only if: it was not durable when the process
    /// ended, was dropped from the backlog, the server has it, or a gap record says so.
    fn excused(&self, s: u64) -> bool {
        self.volatile.contains(&s)
            || self.dropped.contains(&s)
            || self.server.contains_key(&s)
            || self.cap_lost.iter().any(|(a, b)| (*a..=*b).contains(&s))
            || self.before_dir_loss.is_some_and(|b| s <= b)
    }
    fn check(&self, fs: &FaultStorage, rep: &RecoveryReport, ctx: &str) {
        let recs = read_back(fs); // (c) checked inside
        let mut seen = BTreeSet::new();
        for (s, l) in &recs {
            assert!(seen.insert(*s), "{ctx}: seq {s} twice"); // (a)
            assert_eq!(
                self.issued.get(s),
                Some(l),
                "{ctx}: seq {s} invented or altered"
            ); // (d)
        }
        assert!(
            rep.damaged.is_empty(),
            "{ctx}: crash-only model produced damage: {rep}"
        );
        assert!(
            rep.acked_seq >= self.acked_ok && rep.acked_seq <= self.acked_tried,
            "{ctx}: cursor {:?}",
            rep.acked_seq
        );
        if let Some(d) = self.durable {
            for s in self.issued.keys().copied().filter(|s| *s <= d) {
                // (b)
                assert!(
                    seen.contains(&s) || self.excused(s),
                    "{ctx}: durable seq {s} lost (durable up to {d})"
                );
            }
        }
        for (s, l) in &self.server {
            assert_eq!(
                self.issued.get(s),
                Some(l),
                "{ctx}: uploaded seq {s} invented"
            );
        }
    }
}

/// What a model run went through (to see the interesting paths are taken).
#[derive(Debug, Default)]
struct Coverage {
    crashes: usize,
    restarts: usize,
    torn_cut: usize,
    gaps_reissued: usize,
    spool_full: u64,
    backlog_full: u64,
    uploaded: usize,
    dir_lost: usize,
}

fn model_run(seed: u64, steps: usize, cov: &mut Coverage) {
    let tmp = TempDir::new("model");
    let mut rng = Rng(seed);
    let fs = FaultStorage::new(seed);
    let policy = match seed % 3 {
        0 => FsyncPolicy::Always,
        1 => FsyncPolicy::Interval(Duration::from_millis(500)),
        _ => FsyncPolicy::Never,
    };
    let cfg = SpoolConfig {
        dir: PathBuf::from("/nonexistent"),
        segment_max_bytes: 4096,
        segment_max_age: Duration::from_secs(5),
        total_max_bytes: if seed.is_multiple_of(2) {
            4 * 4096
        } else {
            1 << 30
        },
        fsync: policy,
        memory_backlog_bytes: 4096,
    };
    let mut m = Model {
        issued: BTreeMap::new(),
        dropped: BTreeSet::new(),
        volatile: BTreeSet::new(),
        cap_lost: Vec::new(),
        before_dir_loss: None,
        durable: None,
        acked_ok: None,
        acked_tried: None,
        server: BTreeMap::new(),
    };
    let mut now = t0();
    let (mut sp, rep) = open_fault(&fs, cfg.clone(), tmp.path());
    m.take_gaps(&rep.gap_lines);
    let mut next_ev = 0u64;

    let trace = std::env::var("SPOOL_TRACE").is_ok();
    // One operation.
    let op = |sp: &mut Spool<FaultStorage>,
              m: &mut Model,
              rng: &mut Rng,
              now: &mut Now,
              next_ev: &mut u64,
              kind: u64| {
        if trace {
            let st = sp.stats();
            eprintln!(
                "  op {kind}: active {:?} {}B, sealed {}, backlog {}, durable {:?}, acked {:?}, err {:?}",
                st.active_segment,
                st.active_bytes,
                st.segments,
                st.backlog_records,
                st.durable_seq,
                st.acked_seq,
                st.last_error
            );
        }
        match kind {
            0..=49 => {
                *now += Duration::from_millis(rng.below(400));
                let n = 1 + rng.below(4);
                let mut evs = events(*next_ev, n);
                *next_ev += n;
                let out = sp.append(&mut evs, *now);
                if trace {
                    eprintln!(
                        "  append {:?}..={:?}: w {} b {} d {}",
                        out.first_seq, out.last_seq, out.written, out.backlogged, out.dropped
                    );
                }
                let ls = split_lines(&out.lines);
                assert_eq!(out.written + out.backlogged + out.dropped, n as usize);
                for l in &ls[ls.len() - out.dropped..] {
                    m.dropped.insert(seq_of(l));
                }
                for l in ls {
                    m.issued.insert(seq_of(&l), l);
                }
                m.take_gaps(&out.gaps);
            }
            50..=64 => {
                *now += Duration::from_millis(rng.below(3000));
                sp.tick(*now);
            }
            65..=71 => {
                let _ = sp.seal();
            }
            72..=81 => {
                if let Ok(bodies) = sp.bodies(1 + rng.below(600)) {
                    let take = rng.below(bodies.len() as u64 + 1) as usize;
                    for b in bodies.into_iter().take(take) {
                        let plain = zstd::stream::decode_all(&b.data[..]).unwrap();
                        for l in split_lines(&plain) {
                            m.server.insert(seq_of(&l), l);
                        }
                        m.acked_tried = m.acked_tried.max(Some(b.pos.last_seq));
                        match sp.acknowledge(b.pos.clone()) {
                            Ok(()) => m.acked_ok = m.acked_ok.max(Some(b.pos.last_seq)),
                            Err(_) => break,
                        }
                    }
                }
            }
            _ => {
                let _ = sp.flush();
            }
        }
        let g = sp.take_gap_lines();
        m.take_gaps(&g);
    };

    for step in 0..steps {
        let k = rng.below(100);
        if trace {
            eprintln!("step {step}: {k} files {:?}", fs.names());
        }
        match k {
            0..=84 => {
                let kind = rng.below(90);
                op(&mut sp, &mut m, &mut rng, &mut now, &mut next_ev, kind);
                m.durable = m.durable.max(sp.stats().durable_seq);
            }
            85..=89 => match rng.below(7) {
                f if trace && {
                    eprintln!("  fault {f}");
                    false
                } =>
                {
                    unreachable!()
                }
                0 => fs.enospc_after(rng.below(3000)),
                1 => fs.set_capacity(None),
                2 => fs.fail_next(FaultOp::Sync, 1 + rng.below(2) as usize, libc::EIO),
                3 => fs.tear_next_append(rng.below(40) as usize),
                4 => fs.fail_next(FaultOp::Append, 1, libc::EIO),
                5 => {
                    // `rm -rf` of the directory; the agent notices at its next call.
                    fs.lose_dir();
                    m.before_dir_loss = m.issued.keys().next_back().copied();
                    // The cursor file went too; it is written again, not at once durably.
                    m.acked_ok = None;
                    now.mono += Duration::from_millis(100);
                    sp.tick(now);
                    m.take_gaps(&sp.take_gap_lines());
                    cov.dir_lost += 1;
                }
                _ => fs.set_read_only(rng.below(2) == 0),
            },
            90..=96 => {
                // Power loss, possibly in the middle of an operation.
                if rng.below(2) == 0 {
                    let k = rng.below(12) as usize;
                    if trace {
                        eprintln!("  kill after {k}");
                    }
                    fs.kill_after(k);
                    let kind = rng.below(90);
                    op(&mut sp, &mut m, &mut rng, &mut now, &mut next_ev, kind);
                    m.durable = m.durable.max(sp.stats().durable_seq);
                }
                let st = sp.stats();
                cov.spool_full += st.dropped.spool_full.records;
                cov.backlog_full += st.dropped.backlog_full.records;
                drop(sp);
                m.end_session();
                fs.crash();
                if rng.below(4) == 0 {
                    // ... and once more while recovering.
                    fs.kill_after(rng.below(8) as usize);
                    let r = Spool::open(cfg.clone(), fs.clone(), ident(), alloc(tmp.path()));
                    if let Ok((_, rep)) = &r {
                        m.take_gaps(&rep.gap_lines);
                    }
                    drop(r);
                    m.end_session();
                    fs.crash();
                }
                let (s2, rep) = open_fault(&fs, cfg.clone(), tmp.path());
                sp = s2;
                m.take_gaps(&rep.gap_lines);
                m.check(&fs, &rep, &format!("seed {seed} step {step} after crash"));
                cov.torn_cut += rep.torn.is_some() as usize;
                cov.gaps_reissued += rep.gaps_reissued;
                m.acked_ok = rep.acked_seq;
                m.acked_tried = rep.acked_seq;
                m.durable = m.durable.max(sp.stats().durable_seq);
                cov.crashes += 1;
            }
            _ => {
                // Clean restart (the process exits, the machine stays up).
                drop(sp);
                m.end_session();
                fs.clear_faults();
                let (s2, rep) = open_fault(&fs, cfg.clone(), tmp.path());
                sp = s2;
                m.take_gaps(&rep.gap_lines);
                m.check(&fs, &rep, &format!("seed {seed} step {step} after restart"));
                m.acked_ok = rep.acked_seq;
                m.acked_tried = rep.acked_seq;
                cov.restarts += 1;
            }
        }
    }
    drop(sp);
    m.end_session();
    fs.crash();
    let (sp, rep) = open_fault(&fs, cfg.clone(), tmp.path());
    m.take_gaps(&rep.gap_lines);
    m.check(&fs, &rep, &format!("seed {seed} final"));
    // Upload everything that is left: server + disk covers every durable record.
    let mut sp = sp;
    sp.seal().unwrap();
    while let Some(b) = sp.bodies(1 << 20).unwrap().into_iter().next() {
        for l in split_lines(&zstd::stream::decode_all(&b.data[..]).unwrap()) {
            m.server.insert(seq_of(&l), l);
        }
        sp.acknowledge(b.pos).unwrap();
    }
    assert!(sp.pending().is_empty());
    assert!(segment_files(&fs).is_empty(), "{:?}", segment_files(&fs));
    if let Some(d) = m.durable {
        for s in m.issued.keys().copied().filter(|s| *s <= d) {
            assert!(m.excused(s), "seed {seed}: durable seq {s} never uploaded");
        }
    }
    cov.uploaded += m.server.len();
}

#[test]
fn spool_model_random_operations_with_crashes() {
    let seeds: u64 = std::env::var("SPOOL_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let from: u64 = std::env::var("SPOOL_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut cov = Coverage::default();
    for seed in from..from + seeds {
        model_run(seed, 300, &mut cov);
    }
    eprintln!("model: {seeds} runs: {cov:?}");
    assert!(
        cov.crashes >= seeds as usize
            && cov.torn_cut > 0
            && cov.spool_full > 0
            && cov.backlog_full > 0
            && cov.dir_lost > 0
    );
}

// ---------------------------------------------------------------------------------------
// A real, tiny file system

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn spool_real_tmpfs_fills_up_and_frees() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("spool_real_tmpfs_fills_up_and_frees: skipped (needs root to mount a tmpfs)");
        return;
    }
    let tmp = TempDir::new("tmpfs");
    let mnt = tmp.path().join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("spool_real_tmpfs_fills_up_and_frees: skipped (cannot mount a tmpfs here)");
        return;
    }
    let _m = Mount(mnt.clone());
    let dir = mnt.join("spool");
    let cfg = SpoolConfig {
        dir: dir.clone(),
        segment_max_bytes: 16 << 10,
        fsync: FsyncPolicy::Always,
        memory_backlog_bytes: 64 << 10,
        ..SpoolConfig::default()
    };
    let (mut sp, _) = Spool::open(
        cfg.clone(),
        FsStorage::open(&dir).unwrap(),
        ident(),
        alloc(tmp.path()),
    )
    .unwrap();
    // Fill the file system with something else, leaving ~8 KiB.
    let filler = mnt.join("filler");
    {
        use std::io::Write as _;
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            let avail = FsStorage::open_read_only(&mnt)
                .unwrap()
                .available()
                .unwrap();
            if avail <= 8192 {
                break;
            }
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
    }
    let mut lines: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut dropped = BTreeSet::new();
    let mut full = false;
    for i in 0..400 {
        let out = sp.append(&mut events(i, 2), t0());
        let ls = split_lines(&out.lines);
        for l in &ls[ls.len() - out.dropped..] {
            dropped.insert(seq_of(l));
        }
        lines.extend(ls.into_iter().map(|l| (seq_of(&l), l)));
        if out.backlogged > 0 {
            full = true;
            assert!(
                out.error.as_deref().unwrap_or("").contains("No space left"),
                "{:?}",
                out.error
            );
        }
    }
    assert!(full, "the disk never filled up");
    let st = sp.stats();
    assert!(!st.healthy);
    assert!(st.dropped.backlog_full.records > 0);
    assert!(st.backlog_records > 0);
    assert!(
        verify(&dir).unwrap().is_clean(),
        "a full disk leaves no partial frame"
    );
    eprintln!(
        "tmpfs: {} records written before ENOSPC, {} waiting, {} dropped; {:?} bytes free",
        st.records_written,
        st.backlog_records,
        st.dropped.backlog_full.records,
        st.fs_available_bytes
    );
    // Space returns.
    fs::remove_file(&filler).unwrap();
    sp.tick(t0());
    let st = sp.stats();
    assert!(st.healthy, "{:?}", st.last_error);
    assert_eq!(st.backlog_records, 0);
    sp.seal().unwrap();
    let mut out = Vec::new();
    cat(&dir, &mut out).unwrap();
    let on_disk: BTreeMap<u64, Vec<u8>> = split_lines(&out)
        .into_iter()
        .map(|l| (seq_of(&l), l))
        .collect();
    for (s, l) in &lines {
        if !dropped.contains(s) {
            assert_eq!(on_disk.get(s), Some(l), "seq {s}");
        }
    }
    let gaps: Vec<serde_json::Value> = on_disk
        .values()
        .map(|l| json(l))
        .filter(|v| v["type"] == "gap")
        .collect();
    assert_eq!(gaps.len(), 1);
    assert_eq!(gaps[0]["lost_records"].as_u64(), Some(dropped.len() as u64));
    assert!(verify(&dir).unwrap().is_clean());
    drop(sp);
}

// ---------------------------------------------------------------------------------------
// Throughput (run: cargo test --release -p sockacct --lib -- spool_perf --ignored --nocapture)

#[test]
#[ignore]
fn spool_perf_events_per_second() {
    let tmp = TempDir::new("perf");
    // Where the time goes, per event: serialization, compression.
    let evs: Vec<DeltaEvent> = events(0, 1000);
    let start = Instant::now();
    let lines: Vec<Vec<u8>> = (0..100_000).map(|i| evs[i % 1000].to_json_line()).collect();
    let ser = start.elapsed() / 100_000;
    let mut c = frame::compressor().unwrap();
    let start = Instant::now();
    let mut z = 0;
    for l in &lines {
        z += c.compress(l).unwrap().len();
    }
    let comp = start.elapsed() / 100_000;
    eprintln!(
        "per event: serialize {ser:?}, compress {comp:?} ({} -> {} bytes)",
        lines[0].len(),
        z / 100_000
    );
    for (label, fsync, batch, n) in [
        (
            "interval 1s, 1 event/frame",
            FsyncPolicy::Interval(Duration::from_secs(1)),
            1usize,
            200_000u64,
        ),
        (
            "interval 1s, 10 events/frame",
            FsyncPolicy::Interval(Duration::from_secs(1)),
            10,
            200_000,
        ),
        ("never, 1 event/frame", FsyncPolicy::Never, 1, 200_000),
        ("always, 1 event/frame", FsyncPolicy::Always, 1, 5_000),
    ] {
        let dir = tmp.path().join(label.replace([' ', ',', '/'], "_"));
        let cfg = SpoolConfig {
            dir: dir.clone(),
            fsync,
            ..SpoolConfig::default()
        };
        let (mut sp, _) =
            Spool::open(cfg, FsStorage::open(&dir).unwrap(), ident(), alloc(&dir)).unwrap();
        let mut evs: Vec<DeltaEvent> = events(0, 1000);
        let start = Instant::now();
        let mut json_bytes = 0u64;
        let mut i = 0u64;
        while i < n {
            let base = (i as usize) % (1000 - batch);
            let batch_evs = &mut evs[base..base + batch];
            let now = Now::system();
            let out = sp.append(batch_evs, now);
            json_bytes += out.lines.len() as u64;
            if i.is_multiple_of(1000) {
                sp.tick(now);
            }
            i += batch as u64;
        }
        sp.flush().unwrap();
        let el = start.elapsed();
        let st = sp.stats();
        drop(sp);
        let start = Instant::now();
        let cfg = SpoolConfig {
            dir: dir.clone(),
            fsync,
            ..SpoolConfig::default()
        };
        let (_sp, rep) = Spool::open_dir(cfg, ident(), alloc(&dir)).unwrap();
        let rel = start.elapsed();
        assert_eq!(rep.records, n);
        eprintln!(
            "{label}: {n} events in {:.2?} = {:.0} events/s; {:.1} JSON bytes/event, {:.1} bytes/event on disk, ratio {:.2}, {} fsyncs",
            el,
            n as f64 / el.as_secs_f64(),
            json_bytes as f64 / n as f64,
            st.bytes_written as f64 / n as f64,
            json_bytes as f64 / st.bytes_written as f64,
            st.fsyncs
        );
        eprintln!(
            "  reopen (verifies every frame) of {} MB: {rel:.2?}",
            st.bytes_written >> 20
        );
        assert_eq!(st.records_written, n);
    }
}
