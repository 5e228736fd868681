//! Spool append throughput, in-process.
use super::*;

// ---- spool --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(super) struct SpoolResult {
    pub(super) batch: usize,
    pub(super) secs: f64,
    pub(super) appends: u64,
    pub(super) events: u64,
    pub(super) frames: u64,
    pub(super) json_bytes: u64,
    pub(super) frame_bytes: u64,
    pub(super) bytes_on_disk: u64,
    pub(super) segments: usize,
    pub(super) fsyncs: u64,
    /// Records the spool did not write at once (backlogged or dropped), and errors seen.
    pub(super) not_written: u64,
    pub(super) errors: u64,
}

pub(super) const SPOOL_AGENT: &str = "3f9c2a7e51d84b0c9e6a1f2d7b8c4e05";
pub(super) const SPOOL_BOOT: &str = "7d41e0b2-9c3a-4f58-a6e1-2b8d90c4f713";

/// Delta events as a busy host writes them: five labels, unattributed traffic, one
/// interface, every number different (xorshift), one second apart.
pub(super) fn spool_events(n: usize) -> Vec<DeltaEvent> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |lo: u64, hi: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        lo + x % (hi - lo + 1)
    };
    let labels = ["nginx", "postgres", "node", "curl", "sshd"];
    let t0 = 1_767_225_600_000u64;
    (0..n)
        .map(|i| {
            let mut total = Traffic::default();
            let mut lm = BTreeMap::new();
            for l in labels {
                let (txp, rxp) = (rnd(1, 6000), rnd(1, 6000));
                let tr = Traffic {
                    tx: txp * rnd(54, 1448),
                    rx: rxp * rnd(54, 1448),
                    tx_packets: txp,
                    rx_packets: rxp,
                };
                total.add(&tr);
                lm.insert(l.to_string(), tr);
            }
            let (utp, urp) = (rnd(0, 40), rnd(0, 60));
            let un = Traffic {
                tx: utp * rnd(54, 600),
                rx: urp * rnd(54, 600),
                tx_packets: utp,
                rx_packets: urp,
            };
            total.add(&un);
            // The interface also sees traffic of processes outside the cgroup.
            let (itp, irp) = (rnd(0, 500), rnd(0, 800));
            let mut ifc = total;
            ifc.add(&Traffic {
                tx: itp * rnd(54, 1448),
                rx: irp * rnd(54, 1448),
                tx_packets: itp,
                rx_packets: irp,
            });
            DeltaEvent {
                v: FORMAT_VERSION,
                kind: "delta".into(),
                agent: SPOOL_AGENT.into(),
                boot: SPOOL_BOOT.into(),
                seq: 0,
                t: t0 + i as u64 * 1000 + rnd(0, 3),
                d: 1000 + rnd(0, 2),
                labels: lm,
                unattributed: un,
                total,
                ifaces: [("eth0".to_string(), ifc)].into(),
            }
        })
        .collect()
}

/// Appends for `secs` to a fresh spool in a temp directory (default config), `batch`
/// events per append call.
pub(super) fn spool_run(batch: usize, secs: f64) -> anyhow::Result<SpoolResult> {
    let dir = TempDir::new("benchspool");
    let cfg = SpoolConfig::new(dir.0.join("spool"));
    let identity = Identity {
        agent: SPOOL_AGENT.into(),
        boot: SPOOL_BOOT.into(),
    };
    let (mut sp, _) = Spool::open_dir(cfg, identity, SeqAllocator::ephemeral())?;
    let mut pool = spool_events(4000);
    let dur = Duration::from_secs_f64(secs);
    let (mut appends, mut events, mut not_written, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut i = 0;
    let start = Instant::now();
    while start.elapsed() < dur {
        if i + batch > pool.len() {
            i = 0;
        }
        let out = sp.append(&mut pool[i..i + batch], sockacct::spool::Now::system());
        i += batch;
        appends += 1;
        events += batch as u64;
        not_written += (out.backlogged + out.dropped) as u64;
        errors += u64::from(out.error.is_some());
    }
    let secs = start.elapsed().as_secs_f64();
    let st = sp.stats();
    drop(sp);
    drop(dir);
    Ok(SpoolResult {
        batch,
        secs,
        appends,
        events,
        frames: st.frames_written,
        json_bytes: st.json_bytes_written,
        frame_bytes: st.bytes_written,
        bytes_on_disk: st.bytes_on_disk,
        segments: st.segments,
        fsyncs: st.fsyncs,
        not_written,
        errors,
    })
}

pub(super) fn report_spool(
    out: &mut String,
    js: &mut serde_json::Map<String, Value>,
    rs: &[SpoolResult],
) {
    let mut push = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    push(String::new());
    push("== Spool append (in-process, temp dir, default config: fsync at most 1 s after a write, 8 MiB segments; delta events with 5 labels + 1 iface) ==".into());
    push(format!(
        "{:>12} {:>11} {:>10} {:>12} {:>12} {:>11} {:>7} {:>8} {:>9}",
        "events/call",
        "events/s",
        "calls/s",
        "JSON B/ev",
        "disk B/ev",
        "compression",
        "fsyncs",
        "segments",
        "seconds"
    ));
    let mut jv = vec![];
    for r in rs {
        let n = r.events.max(1) as f64;
        let (eps, cps) = (r.events as f64 / r.secs, r.appends as f64 / r.secs);
        let (jb, db) = (r.json_bytes as f64 / n, r.frame_bytes as f64 / n);
        let ratio = r.json_bytes as f64 / r.frame_bytes.max(1) as f64;
        push(format!(
            "{:>12} {:>11.0} {:>10.0} {:>12.1} {:>12.1} {:>10.2}x {:>7} {:>8} {:>9.2}",
            r.batch, eps, cps, jb, db, ratio, r.fsyncs, r.segments, r.secs
        ));
        jv.push(json!({"events_per_append": r.batch, "seconds": r.secs, "appends": r.appends, "events": r.events,
            "frames_written": r.frames, "events_per_s": eps, "appends_per_s": cps, "json_bytes_per_event": jb,
            "disk_bytes_per_event": db, "compression_ratio": ratio, "json_bytes": r.json_bytes, "frame_bytes": r.frame_bytes,
            "bytes_on_disk_at_end": r.bytes_on_disk, "segments": r.segments, "fsyncs": r.fsyncs,
            "records_not_written_at_once": r.not_written, "append_errors": r.errors}));
        if r.not_written > 0 || r.errors > 0 {
            push(format!(
                "note: batch {}: {} records backlogged or dropped, {} append errors",
                r.batch, r.not_written, r.errors
            ));
        }
    }
    push("JSON B/ev = serialized line (+ newline); disk B/ev = zstd frame bytes written per event (one frame per call); compression = JSON / disk".into());
    js.insert("spool".into(), Value::Array(jv));
}
