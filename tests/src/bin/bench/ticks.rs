//! Poller::tick in-process with 1k/10k/100k sockets.
use super::*;

// ---- poll ticks ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub(super) struct TickResult {
    pub(super) sockets: u64,
    pub(super) setup_s: f64,
    pub(super) map_entries: usize,
    pub(super) tracked: usize,
    pub(super) first_work_ms: f64,
    pub(super) first_wait_ms: f64,
    pub(super) work_ms: Vec<f64>,
    pub(super) wait_ms: Vec<f64>,
    pub(super) batch_read_ms: Vec<f64>,
    pub(super) events: usize,
    pub(super) setup_progs: Option<ProgDelta>,
}

/// Connections per helper process (two sockets each).
pub(super) const HELPER_PAIRS: usize = 9000;

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Times a bare BPF_MAP_LOOKUP_BATCH walk of the socket map (what a tick reads), to tell
/// the kernel copy apart from the poller's own work.
pub(super) fn time_batch_reads(n: usize) -> Vec<f64> {
    let ids: BTreeSet<u64> = fdinfo_values(std::process::id() as i32, "map_id")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for id in ids {
        let Ok((fd, info)) = bpf::map_by_id(id as u32) else {
            continue;
        };
        if bpf::name_of(&info.name) != agent_common::MAP_SOCKS {
            continue;
        }
        use std::os::fd::AsFd;
        let mut out: Vec<(u64, agent_common::SockCounters)> = Vec::new();
        let mut times = vec![];
        for _ in 0..n {
            out.clear();
            let t = Instant::now();
            if sockacct::bpfsys::lookup_batch(fd.as_fd(), 8192, &mut out).is_err() {
                break;
            }
            times.push(ms(t.elapsed()));
        }
        return times;
    }
    vec![]
}

/// With `stats`, bpf_stats are on while the sockets are opened and closed (not during the
/// ticks): the per-socket programs (sock_create, sock_release, tcp_state) get enough runs
/// there to give a stable average.
pub(super) fn tick_size(n: usize, ticks: usize, stats: bool) -> anyhow::Result<TickResult> {
    let cg = TestCgroup::new(&format!("ticks{n}"));
    let mut loaded = loader::load(&LoadOptions {
        cgroup: Some(cg.path.clone()),
        ..Default::default()
    })?;
    let labeler = Arc::new(Labeler::new(&Config::parse("", "bench")?, 0)?);
    let mut poller = Poller::new(&mut loaded, labeler, vec![])?;

    let me = std::process::id() as i32;
    let stats_fd = if stats {
        Some(bpf::enable_stats()?)
    } else {
        None
    };
    let before = prog_snapshot(&[me]);
    let setup = Instant::now();
    // Several helper processes when one cannot hold them all (without CAP_SYS_RESOURCE the
    // hard RLIMIT_NOFILE cannot be raised; 9000 pairs fit under the common 20000).
    let pairs = (n / 2).max(1);
    let procs = pairs.div_ceil(HELPER_PAIRS);
    let mut helpers: Vec<Peer> = (0..procs)
        .map(|i| {
            let mine = pairs / procs + usize::from(i < pairs % procs);
            let active = if i == 0 { "32" } else { "0" };
            Peer::spawn(
                Some(&cg),
                None,
                "bench-socks",
                &["hold-many", &mine.to_string(), active, &(2 + i).to_string()],
            )
        })
        .collect();
    let sockets: u64 = helpers.iter_mut().map(|h| h.value("sockets")).sum();
    let setup_s = setup.elapsed().as_secs_f64();
    let setup_progs = stats_fd.map(|fd| {
        let d = prog_delta(&before, &prog_snapshot(&[me]));
        drop(fd);
        d
    });
    progress(format!(
        "ticks {n}: {sockets} sockets open in {setup_s:.1} s ({procs} helper processes)"
    ));

    let interval = Duration::from_millis(100);
    let mut events = 0;
    let mut next = Instant::now();
    let mut tick = |poller: &mut Poller| -> anyhow::Result<(f64, f64)> {
        let now = Instant::now();
        if now < next {
            thread::sleep(next - now);
        }
        next = Instant::now() + interval;
        if poller.tick()?.is_some() {
            events += 1;
        }
        Ok((
            ms(poller.stats.last_tick_work),
            ms(poller.stats.last_tick_wait),
        ))
    };
    // Tick 1 harvests everything counted while the sockets were opened and labels every
    // socket; tick 2 harvests the other slot. Steady state from tick 3.
    let (first_work_ms, first_wait_ms) = tick(&mut poller)?;
    tick(&mut poller)?;
    let (mut work_ms, mut wait_ms) = (vec![], vec![]);
    for _ in 0..ticks {
        let (w, g) = tick(&mut poller)?;
        work_ms.push(w);
        wait_ms.push(g);
    }
    let map_entries = poller.stats.map_entries;
    let tracked = poller.stats.sockets_tracked;
    let batch_read_ms = time_batch_reads(10);
    // Close every socket with the programs still attached (sock_release, tcp_state).
    let stats_fd = if stats {
        Some(bpf::enable_stats()?)
    } else {
        None
    };
    let before = prog_snapshot(&[me]);
    for h in &mut helpers {
        h.send_line("stop");
    }
    for mut h in helpers {
        h.expect_line("closing");
        h.finish();
    }
    let setup_progs = match (setup_progs, stats_fd) {
        (Some(mut d), Some(fd)) => {
            for (n, (t, c)) in prog_delta(&before, &prog_snapshot(&[me])) {
                let e = d.entry(n).or_default();
                e.0 += t;
                e.1 += c;
            }
            drop(fd);
            Some(d)
        }
        (d, _) => d,
    };
    drop(poller);
    drop(loaded);
    Ok(TickResult {
        sockets,
        setup_s,
        map_entries,
        tracked,
        first_work_ms,
        first_wait_ms,
        work_ms,
        wait_ms,
        batch_read_ms,
        events,
        setup_progs,
    })
}
