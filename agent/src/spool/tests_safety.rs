//! Spool tests for what another actor on the host can do to it: the directory removed while
//! the agent writes, links planted at its names, the wall clock stepped backwards.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    time::Duration,
};

use super::tests::{
    TempDir, alloc, events, ident, json, open_fault, read_back, seq_of, small_cfg, split_lines, t0,
};
use super::*;

/// Appends one event, returning its line(s) by seq.
fn put(sp: &mut Spool<FaultStorage>, i: u64, now: Now, issued: &mut BTreeMap<u64, Vec<u8>>) {
    let out = sp.append(&mut events(i, 1), now);
    for l in split_lines(&out.lines) {
        issued.insert(seq_of(&l), l);
    }
}

#[test]
fn spool_directory_removed_gap_names_exactly_what_was_lost() {
    let tmp = TempDir::new("dirloss");
    let fs = FaultStorage::new(21);
    let (mut sp, _) = open_fault(
        &fs,
        small_cfg(FsyncPolicy::Interval(Duration::from_secs(1))),
        tmp.path(),
    );
    let mut now = t0();
    let mut issued = BTreeMap::new();
    let mut i = 0;
    while sp.pending().len() < 3 {
        put(&mut sp, i, now, &mut issued);
        i += 1;
        now += Duration::from_millis(200);
    }
    // The server has part of the oldest segment.
    let b = sp.bodies(800).unwrap().remove(0);
    assert!(b.pos.last_seq < sp.pending()[0].last_seq, "a partial body");
    let acked = b.pos.last_seq;
    sp.acknowledge(b.pos).unwrap();
    // The segment being written gets fsynced frames, then frames not yet fsynced.
    for _ in 0..3 {
        put(&mut sp, i, now, &mut issued);
        i += 1;
        now += Duration::from_millis(1100);
        sp.tick(now);
    }
    for _ in 0..2 {
        put(&mut sp, i, now, &mut issued);
        i += 1;
    }
    let st = sp.stats();
    assert!(st.active_bytes > 0 && st.durable_seq.is_some());
    let last_sealed = sp.pending().last().unwrap().last_seq;
    let lost: Vec<u64> = issued
        .keys()
        .copied()
        .filter(|s| *s > acked && *s <= last_sealed)
        .collect();

    // rm -rf; and the directory cannot be made again for two more calls.
    fs.lose_dir();
    fs.fail_reattach(3);
    now += Duration::from_millis(100);
    sp.tick(now);
    let gaps = split_lines(&sp.take_gap_lines());
    assert_eq!(gaps.len(), 1, "one gap record at once");
    let g = json(&gaps[0]);
    assert_eq!(g["reason"], "dir_lost");
    assert_eq!(g["lost_first_seq"].as_u64(), lost.first().copied());
    assert_eq!(g["lost_last_seq"].as_u64(), lost.last().copied());
    assert_eq!(g["lost_records"].as_u64(), Some(lost.len() as u64));
    assert_eq!(g["t"].as_u64(), Some(unix_ms(now.wall)));
    let gap_seq = seq_of(&gaps[0]);
    assert!(gap_seq > *issued.keys().next_back().unwrap());
    let st = sp.stats();
    assert_eq!(st.dir_lost, 1);
    assert!(st.dir_missing && !st.healthy);
    assert_eq!(st.dropped.dir_lost.records, lost.len() as u64);
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("cannot be made again")
    );

    // Records keep coming meanwhile: they wait in memory.
    let out = sp.append(&mut events(i, 1), now);
    assert_eq!((out.written, out.backlogged), (0, 1));
    for l in split_lines(&out.lines) {
        issued.insert(seq_of(&l), l);
    }
    now += Duration::from_millis(100);
    sp.tick(now);
    assert!(sp.stats().dir_missing);
    now += Duration::from_millis(100);
    sp.tick(now); // the directory is made again
    let st = sp.stats();
    assert!(st.healthy && !st.dir_missing, "{:?}", st.last_error);
    assert_eq!((st.dir_lost, fs.reattaches()), (1, 1));
    assert!(
        fs.names().contains(&"cursor".to_string()),
        "{:?}",
        fs.names()
    );

    // On disk: what was never lost (the segment being written, read back; what waited) and
    // the gap record. Every record is acknowledged, stated lost, or on disk: exactly one.
    let on_disk: BTreeMap<u64, Vec<u8>> = read_back(&fs).into_iter().collect();
    let mut expect: BTreeSet<u64> = issued
        .keys()
        .copied()
        .filter(|s| *s > last_sealed)
        .collect();
    expect.insert(gap_seq);
    assert_eq!(on_disk.keys().copied().collect::<BTreeSet<_>>(), expect);
    for (s, l) in &on_disk {
        if *s != gap_seq {
            assert_eq!(issued.get(s), Some(l), "seq {s} altered");
        }
    }
    for s in issued.keys() {
        let n = (*s <= acked) as u8 + lost.contains(s) as u8 + on_disk.contains_key(s) as u8;
        assert_eq!(n, 1, "seq {s}");
    }
    // Counted once: what was written again is not written twice in the stats.
    assert_eq!(
        st.records_written,
        issued.len() as u64 + 1,
        "records_written"
    );
    // And it uploads.
    sp.seal().unwrap();
    let bodies = sp.bodies(1 << 20).unwrap();
    let sent: BTreeSet<u64> = bodies
        .iter()
        .flat_map(|b| split_lines(&zstd::stream::decode_all(&b.data[..]).unwrap()))
        .map(|l| seq_of(&l))
        .collect();
    assert_eq!(sent, expect);
}

#[test]
fn spool_directory_gone_for_long_backlog_bounded_in_bytes() {
    let tmp = TempDir::new("dirgone");
    let fs = FaultStorage::new(22);
    let mut cfg = small_cfg(FsyncPolicy::Always);
    cfg.memory_backlog_bytes = 8192;
    let (mut sp, _) = open_fault(&fs, cfg, tmp.path());
    let mut now = t0();
    let mut issued = BTreeMap::new();
    for i in 0..3 {
        put(&mut sp, i, now, &mut issued);
    }
    fs.lose_dir();
    fs.fail_reattach(usize::MAX);
    let mut dropped = BTreeSet::new();
    for i in 3..200 {
        now += Duration::from_millis(100);
        let out = sp.append(&mut events(i, 1), now);
        let ls = split_lines(&out.lines);
        for l in &ls[ls.len() - out.dropped..] {
            dropped.insert(seq_of(l));
        }
        for l in ls {
            issued.insert(seq_of(&l), l);
        }
        sp.tick(now);
    }
    let st = sp.stats();
    assert!(
        st.backlog_bytes <= 8192 + 512 && st.backlog_bytes > 8192 - 1000,
        "{st:?}"
    );
    assert_eq!(st.dropped.backlog_full.records, dropped.len() as u64);
    assert!(!dropped.is_empty());
    // Nothing was lost with the directory (all fsynced, all read back).
    assert_eq!(st.dropped.dir_lost.records, 0);
    fs.fail_reattach(0);
    now += Duration::from_millis(100);
    sp.tick(now);
    let gaps: Vec<_> = split_lines(&sp.take_gap_lines())
        .iter()
        .map(|l| json(l))
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0]["reason"], "backlog_full");
    assert_eq!(gaps[0]["lost_records"].as_u64(), Some(dropped.len() as u64));
    let on_disk: BTreeSet<u64> = read_back(&fs).into_iter().map(|(s, _)| s).collect();
    for s in issued.keys() {
        assert!(on_disk.contains(s) != dropped.contains(s), "seq {s}");
    }
    assert!(sp.stats().healthy);
}

/// The wall clock stepped back an hour must not stall fsync or sealing: both run on the
/// monotonic clock (before, a `SystemTime` earlier than the last write meant "not due").
#[test]
fn spool_backwards_wall_clock_stalls_neither_fsync_nor_sealing() {
    let tmp = TempDir::new("clock");
    let fs = FaultStorage::new(23);
    let mut cfg = small_cfg(FsyncPolicy::Interval(Duration::from_secs(1)));
    cfg.segment_max_age = Duration::from_secs(5);
    let (mut sp, _) = open_fault(&fs, cfg, tmp.path());
    let mut now = t0();
    let out = sp.append(&mut events(0, 1), now);
    let seq = out.first_seq.unwrap();
    assert_eq!(sp.stats().durable_seq, None);
    // One and a half seconds later on the monotonic clock, an hour earlier on the wall.
    now.mono += Duration::from_millis(1500);
    now.wall -= Duration::from_secs(3600);
    sp.tick(now);
    assert_eq!(sp.stats().durable_seq, Some(seq), "fsync ran");
    assert!(sp.pending().is_empty());
    now.mono += Duration::from_secs(5);
    now.wall -= Duration::from_secs(3600);
    sp.tick(now);
    assert_eq!(sp.pending().len(), 1, "sealed by age");
    // And a wall clock far ahead rushes nothing.
    let out = sp.append(&mut events(1, 1), now);
    now.wall += Duration::from_secs(10 * 86400);
    sp.tick(now);
    assert_eq!(sp.pending().len(), 1, "not sealed early");
    assert!(sp.stats().durable_seq < out.first_seq, "not fsynced early");
}

// ---------------------------------------------------------------------------------------
// The real file system

#[test]
fn spool_real_directory_removed_is_made_again_with_what_was_being_written() {
    let tmp = TempDir::new("realrm");
    let dir = tmp.path().join("spool");
    let mut cfg = SpoolConfig::new(&dir);
    cfg.fsync = FsyncPolicy::Always;
    let (mut sp, _) = Spool::open_dir(cfg, ident(), alloc(tmp.path())).unwrap();
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
        0o700,
        "created 0700"
    );
    let mut now = t0();
    let mut seqs = Vec::new();
    for i in 0..5 {
        let out = sp.append(&mut events(i, 1), now);
        seqs.push(out.first_seq.unwrap());
    }
    fs::remove_dir_all(&dir).unwrap();
    // Written meanwhile (into the removed file, through the open descriptor).
    let out = sp.append(&mut events(5, 1), now);
    seqs.push(out.first_seq.unwrap());
    now += Duration::from_millis(100);
    sp.tick(now);
    assert!(dir.is_dir(), "made again");
    assert_eq!(
        fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    let st = sp.stats();
    assert_eq!((st.dir_lost, st.dropped.dir_lost.records), (1, 0), "{st:?}");
    assert!(st.healthy, "{:?}", st.last_error);
    assert!(sp.take_gap_lines().is_empty(), "nothing was lost");
    let ro = FsStorage::open_read_only(&dir).unwrap();
    let back: Vec<u64> = read_back(&ro).into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        back, seqs,
        "the segment being written was read back and written again"
    );
}

#[test]
fn spool_never_writes_through_a_link_at_its_names() {
    let tmp = TempDir::new("links");
    let dir = tmp.path().join("spool");
    let target = tmp.path().join("root-only");
    fs::write(&target, "precious\n").unwrap();
    fs::create_dir(&dir).unwrap();
    // A link named like a segment: the agent refuses to start, naming it.
    let seg = dir.join(format!("{}.open", seg_name(0)));
    std::os::unix::fs::symlink(&target, &seg).unwrap();
    let e = FsStorage::open(&dir).err().unwrap().to_string();
    assert!(e.contains("symbolic link") && e.contains("seg-"), "{e}");
    fs::remove_file(&seg).unwrap();
    // Planted at run time (after the start's check) at the name of the next segment: the
    // write fails, naming it, and the records wait; the target stays as it was.
    let (mut sp, _) = Spool::open_dir(SpoolConfig::new(&dir), ident(), alloc(tmp.path())).unwrap();
    std::os::unix::fs::symlink(&target, &seg).unwrap(); // the first seq is 0
    let out = sp.append(&mut events(0, 1), t0());
    assert_eq!((out.written, out.backlogged), (0, 1));
    let e = out.error.unwrap();
    assert!(e.contains("symbolic link") && e.contains("seg-"), "{e}");
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
    // The directory itself as a link: refused.
    let link = tmp.path().join("spool-link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    drop(sp);
    let e = FsStorage::open(&link).err().unwrap().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    // Group-writable: refused with the fix.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
    let e = FsStorage::open(&dir).err().unwrap().to_string();
    assert!(e.contains("chmod go-w"), "{e}");
    assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
}
