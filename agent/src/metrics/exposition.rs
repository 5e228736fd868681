//! A [`Scrape`] as Prometheus text: OpenMetrics 1.0 (what Prometheus asks for) or the
//! classic text format 0.0.4 (curl, promtool, older scrapers).
//!
//! prometheus-client writes OpenMetrics; the classic format differs only in what is
//! rewritten by [`to_classic`]: counters are named with their `_total` in HELP and TYPE,
//! and there is no `# EOF`.
use std::fmt::Write as _;

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::Scrape;
use crate::{
    event::Traffic,
    poller::{TICK_BUCKETS_MS, TickTimes},
};

/// What the scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Classic,
}

impl Format {
    /// OpenMetrics when the Accept header names it (Prometheus does), else classic.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let wants = accept.is_some_and(|a| {
            a.split(',').any(|part| {
                let mut it = part.split(';').map(str::trim);
                let ty = it.next().unwrap_or("");
                let refused = it.any(|p| p.replace(' ', "") == "q=0");
                ty.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if wants {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Encodes the scrape.
pub fn render(s: Scrape, format: Format) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(s));
    let mut out = String::with_capacity(64 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &reg)
        .expect("writing to a String does not fail");
    match format {
        Format::OpenMetrics => out,
        Format::Classic => to_classic(&out),
    }
}

/// OpenMetrics text to the classic 0.0.4 format (for the families this module writes:
/// counters, gauges, histograms, no units, no exemplars).
pub fn to_classic(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Written once its TYPE says whether the name needs `_total`.
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let suffix = if ty == "counter" { "_total" } else { "" };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                let _ = writeln!(out, "# HELP {name}{suffix} {text}");
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {ty}");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A label value, escaped as both formats require (labels and process names may hold
/// quotes or backslashes; the encoder writes values as they are).
#[derive(Clone, Copy)]
struct Lv<'a>(&'a str);

impl EncodeLabelValue for Lv<'_> {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => e.write_str("\\\\")?,
                '"' => e.write_str("\\\"")?,
                '\n' => e.write_str("\\n")?,
                c => e.write_char(c)?,
            }
        }
        Ok(())
    }
}

type Labels<'a> = Vec<(&'static str, Lv<'a>)>;

/// Writes families; `name` is without `_total` for counters (the encoder adds it).
struct Out<'a, 'b>(&'a mut DescriptorEncoder<'b>);

impl Out<'_, '_> {
    fn counter<V: EncodeCounterValue>(&mut self, name: &str, help: &str, v: V) -> std::fmt::Result {
        let c = ConstCounter::new(v);
        let m = self
            .0
            .encode_descriptor(name, help, None, c.metric_type())?;
        c.encode(m)
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) -> std::fmt::Result {
        let g = ConstGauge::new(v);
        let m = self
            .0
            .encode_descriptor(name, help, None, g.metric_type())?;
        g.encode(m)
    }

    fn counters<'l>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'l>, u64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in series {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauges<'l>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels<'l>, f64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in series {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// Bytes and packets by direction (and the given labels), as two families.
    fn traffic<'l>(
        &mut self,
        what: &str,
        help: &str,
        series: Vec<(Labels<'l>, &'l Traffic)>,
    ) -> std::fmt::Result {
        let dir = |labels: &Labels<'l>, d: &'static str| {
            let mut l: Labels<'l> = labels.clone();
            l.push(("direction", Lv(d)));
            l
        };
        self.counters(
            &format!("sockacct_{what}_bytes"),
            &format!("{help}: bytes (IP headers included) since the agent started"),
            series
                .iter()
                .flat_map(|(l, t)| [(dir(l, "tx"), t.tx), (dir(l, "rx"), t.rx)]),
        )?;
        self.counters(
            &format!("sockacct_{what}_packets"),
            &format!("{help}: packets since the agent started"),
            series
                .iter()
                .flat_map(|(l, t)| [(dir(l, "tx"), t.tx_packets), (dir(l, "rx"), t.rx_packets)]),
        )
    }

    fn histogram(&mut self, name: &str, help: &str, t: &TickTimes) -> std::fmt::Result {
        let mut m = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        // Per-bucket counts (the encoder makes them cumulative); the last is +Inf.
        let buckets: Vec<(f64, u64)> = TICK_BUCKETS_MS
            .iter()
            .map(|ms| ms / 1e3)
            .chain([f64::MAX])
            .zip(t.counts.iter().copied())
            .collect();
        let count = t.counts.iter().sum();
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            t.sum_ms / 1e3,
            count,
            &buckets,
            None,
        )
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut o = Out(&mut e);
        let (st, tot, p) = (&self.status, &self.totals, &self.process);
        let none = || -> Labels { vec![] };

        // What was counted (sums of the written delta events).
        o.traffic(
            "label",
            "Traffic by label",
            tot.labels()
                .map(|(l, t)| (vec![("label", Lv(l))], t))
                .collect(),
        )?;
        o.traffic(
            "unattributed",
            "Traffic no socket owner was known for",
            vec![(none(), tot.unattributed())],
        )?;
        o.traffic(
            "kernel",
            "The kernel's total of counted traffic (labels plus unattributed)",
            vec![(none(), tot.kernel())],
        )?;
        o.traffic(
            "iface",
            "Traffic by network interface (tc)",
            tot.ifaces()
                .iter()
                .map(|(i, t)| (vec![("iface", Lv(i))], t))
                .collect(),
        )?;
        o.gauge(
            "sockacct_metrics_label_series",
            "Labels with their own series in sockacct_label_*",
            tot.series() as f64,
        )?;
        o.gauge(
            "sockacct_metrics_max_label_series",
            "Most labels with their own series ([metrics] max_label_series); the rest are summed under label=\"_other\"",
            tot.max_series() as f64,
        )?;
        o.counter(
            "sockacct_metrics_label_overflow",
            "Label entries of delta events summed under label=\"_other\" because max_label_series was reached",
            tot.folded(),
        )?;

        // Drops and refusals, one family so one alert covers them.
        let mut drops: Vec<(Labels, u64)> = vec![];
        let mut drop = |stage: &'static str, reason: &'static str, v: u64| {
            drops.push((vec![("stage", Lv(stage)), ("reason", Lv(reason))], v));
        };
        for (reason, v) in &st.drops.kernel {
            drop("kernel", reason, *v);
        }
        if let Some(sp) = &st.spool {
            drop("spool", "spool_full", sp.dropped.spool_full.records);
            drop("spool", "backlog_full", sp.dropped.backlog_full.records);
            drop(
                "spool",
                "seq_unavailable",
                sp.dropped.seq_unavailable.records,
            );
            drop("spool", "invalid_record", sp.dropped.invalid_record.records);
            drop("spool", "dir_lost", sp.dropped.dir_lost.records);
        }
        if let Some(f) = &st.flows {
            drop("flows", "flow_table_full", f.table.overflow);
            drop("flows", "held_while_paused", f.dropped_while_paused);
            // The flow ledger: packets of finished sockets no flow record carries.
            for (reason, t) in &f.table.ledger.unrecorded {
                drop("flows", reason, t.tx_packets + t.rx_packets);
            }
        }
        for (reason, v) in &st.control_refused {
            drop("control", reason, *v);
        }
        drop("control", "subscriber_cut_off", st.stream.cut_off);
        if let Some(m) = &st.metrics {
            for (reason, v) in &m.refused {
                drop("metrics", reason, *v);
            }
        }
        o.counters(
            "sockacct_drops",
            "Everything dropped or refused, by stage and reason (kernel: failed map updates; spool: records; flows: observations and records; control: requests; metrics: connections)",
            drops,
        )?;
        o.counters(
            "sockacct_kernel_fallbacks",
            "A kernel ring was full and the poller took the slower way; nothing was lost",
            st.kernel_fallbacks
                .iter()
                .map(|(r, v)| (vec![("reason", Lv(r))], *v)),
        )?;
        o.counter(
            "sockacct_no_owner_bytes",
            "Bytes of sockets whose owner could not be found (counted as unattributed)",
            st.drops.no_owner_bytes,
        )?;

        // The poll loop.
        o.gauge(
            "sockacct_sockets_tracked",
            "Sockets the poller tracks",
            st.sockets_tracked as f64,
        )?;
        o.gauge(
            "sockacct_map_entries",
            "Entries in the kernel's per-socket map",
            st.map_entries as f64,
        )?;
        o.gauge(
            "sockacct_map_capacity",
            "Capacity of the kernel's per-socket map (max_sockets)",
            f64::from(st.fixed.map_capacity),
        )?;
        o.gauge(
            "sockacct_kernel_deletes_waiting",
            "Kernel entries of sockets and peers done with, not deleted yet",
            st.kernel_deletes_waiting as f64,
        )?;
        o.gauge(
            "sockacct_map_fill_ratio",
            "Map entries over capacity",
            st.map_fill,
        )?;
        o.gauge(
            "sockacct_interval_seconds",
            "Poll interval",
            st.fixed.interval_ms as f64 / 1e3,
        )?;
        o.counter("sockacct_ticks", "Poll ticks", st.ticks)?;
        o.counter(
            "sockacct_tick_failures",
            "Ticks that failed and were covered by the next one",
            st.tick_failures,
        )?;
        o.histogram(
            "sockacct_tick_work_seconds",
            "Work of each poll cycle (tick and event written), wall time",
            &st.tick_work,
        )?;
        o.histogram(
            "sockacct_tick_work_cpu_seconds",
            "CPU time of each poll cycle",
            &st.tick_work_cpu,
        )?;
        o.histogram(
            "sockacct_tick_wait_seconds",
            "Grace-period wait of each tick",
            &st.tick_wait,
        )?;
        o.counter(
            "sockacct_events",
            "Delta events produced (intervals with movement)",
            st.events,
        )?;
        o.counter(
            "sockacct_finished_sockets",
            "Finished sockets whose last counts were folded in",
            st.finished_sockets_folded_in,
        )?;
        o.gauge("sockacct_paused", "1 while paused", flag(st.paused))?;
        o.gauge(
            "sockacct_paused_bytes",
            "Bytes counted while paused (written as one event at resume)",
            st.paused_bytes as f64,
        )?;
        o.gauge(
            "sockacct_stream_subscribers",
            "Subscribers of the record stream (sockacct events, sockacct top)",
            st.stream.subscribers as f64,
        )?;
        o.gauge(
            "sockacct_labels_named",
            "Sockets named through the control socket",
            st.labels_named as f64,
        )?;
        o.gauge(
            "sockacct_labels",
            "Distinct labels held (at most max_labels, the overflow label included)",
            st.labels.labels as f64,
        )?;
        o.gauge(
            "sockacct_labels_max",
            "The cap on distinct labels (max_labels)",
            st.labels.max_labels as f64,
        )?;
        o.counter(
            "sockacct_labels_overflowed_sockets",
            "Sockets given the label _overflow because max_labels labels were in use",
            st.labels.overflowed_sockets,
        )?;

        // This endpoint.
        if let Some(m) = &st.metrics {
            o.gauge(
                "sockacct_metrics_connections_open",
                "Connections to the metrics endpoint open now",
                m.connections_open as f64,
            )?;
            o.counter(
                "sockacct_metrics_connections_accepted",
                "Connections to the metrics endpoint admitted",
                m.connections_accepted,
            )?;
            o.counter(
                "sockacct_metrics_scrapes",
                "GET /metrics answered",
                m.scrapes,
            )?;
            o.counter(
                "sockacct_metrics_connections_aged_out",
                "Kept-alive connections closed at [metrics] max_connection_age_secs",
                m.closed_at_max_age,
            )?;
        }

        // Flow records.
        if let Some(f) = &st.flows {
            let t = &f.table;
            o.gauge("sockacct_flows_tracked", "Live flows", t.tracked as f64)?;
            o.histogram(
                "sockacct_flow_work_seconds",
                "Work of each call of the flow stage (its own thread), wall time",
                &f.work,
            )?;
            o.histogram(
                "sockacct_flow_work_cpu_seconds",
                "CPU time of each call of the flow stage",
                &f.work_cpu,
            )?;
            o.gauge(
                "sockacct_flows_pending_sessions",
                "Sessions waiting for more connections to join",
                t.pending_sessions as f64,
            )?;
            o.gauge(
                "sockacct_flows_dormant_peers",
                "Idle-closed peers whose counter baseline is kept",
                t.dormant_peers as f64,
            )?;
            o.gauge(
                "sockacct_flows_queued_records",
                "Flow records waiting for the next tick (over max_records_per_tick)",
                (t.queued + t.deferred) as f64,
            )?;
            let l = &t.ledger;
            o.counters(
                "sockacct_flow_ledger_sockets",
                "Finished sockets whose flow records add up to their bytes (exact) or not (inexact)",
                [("exact", l.exact_sockets), ("inexact", l.inexact_sockets)]
                    .map(|(r, v)| (vec![("result", Lv(r))], v)),
            )?;
            o.counters(
                "sockacct_flow_unrecorded_bytes",
                "Bytes of finished sockets no flow record carries, by reason (the flow ledger)",
                l.unrecorded
                    .iter()
                    .map(|(r, t)| (vec![("reason", Lv(r))], t.tx + t.rx)),
            )?;
            o.counters(
                "sockacct_flow_unrecorded_reported_bytes",
                "Bytes no flow record carries by design: left out by the [flows] filters, or counted on TCP listening sockets (handshakes)",
                [("filtered", l.filtered), ("listening", l.listening)]
                    .map(|(r, t)| (vec![("reason", Lv(r))], t.tx + t.rx)),
            )?;
            o.counters(
                "sockacct_flow_records",
                "Flow records written, by event",
                [
                    ("open", t.opens),
                    ("update", t.updates),
                    ("close", t.closes),
                ]
                .map(|(ev, v)| (vec![("event", Lv(ev))], v)),
            )?;
        }

        // Spool.
        o.gauge(
            "sockacct_spool_enabled",
            "1 when records are kept in the spool",
            flag(st.spool.is_some()),
        )?;
        if let Some(sp) = &st.spool {
            o.gauge(
                "sockacct_spool_healthy",
                "1 while spool writes succeed and nothing waits in the memory backlog",
                flag(sp.healthy),
            )?;
            o.gauge(
                "sockacct_spool_bytes",
                "Spool segments on disk, compressed bytes",
                sp.bytes_on_disk as f64,
            )?;
            o.gauge(
                "sockacct_spool_segments",
                "Sealed segments on disk",
                sp.segments as f64,
            )?;
            o.gauge(
                "sockacct_spool_pending_segments",
                "Sealed segments not yet acknowledged by an upload",
                sp.pending_segments as f64,
            )?;
            o.gauge(
                "sockacct_spool_backlog_records",
                "Records held in memory because the disk refused writes",
                sp.backlog_records as f64,
            )?;
            o.gauge(
                "sockacct_spool_backlog_bytes",
                "Compressed bytes held in memory because the disk refused writes (or the directory was gone)",
                sp.backlog_bytes as f64,
            )?;
            o.gauge(
                "sockacct_spool_backlog_max_bytes",
                "[spool] memory_backlog_bytes: beyond it records are dropped (reason backlog_full)",
                sp.backlog_max_bytes as f64,
            )?;
            o.counter(
                "sockacct_spool_dir_lost",
                "Times the spool directory was found removed or replaced while running (it is made again)",
                sp.dir_lost,
            )?;
            if let Some(a) = sp.fs_available_bytes {
                o.gauge(
                    "sockacct_spool_fs_available_bytes",
                    "Free bytes on the spool's file system",
                    a as f64,
                )?;
            }
            o.counter(
                "sockacct_spool_records_written",
                "Records written to the spool",
                sp.records_written,
            )?;
            o.counter(
                "sockacct_spool_bytes_written",
                "Compressed bytes written to the spool",
                sp.bytes_written,
            )?;
            o.counter(
                "sockacct_spool_write_errors",
                "Spool writes that failed",
                sp.errors,
            )?;
            o.counter(
                "sockacct_spool_gap_records",
                "Gap records written (a range of sequence numbers that was lost)",
                sp.gap_records,
            )?;
        }

        // Upload.
        let up = &st.upload;
        o.gauge(
            "sockacct_upload_configured",
            "1 when an upload URL is set",
            flag(up.configured),
        )?;
        o.counter(
            "sockacct_upload_attempts",
            "Flushes (admin, or [upload] every_secs)",
            up.flushes,
        )?;
        o.counter(
            "sockacct_upload_failures",
            "Flushes that stopped at a failure",
            up.failures,
        )?;
        o.counter(
            "sockacct_upload_records",
            "Records acknowledged by the upload server",
            up.records_sent,
        )?;
        o.counter(
            "sockacct_upload_bytes",
            "Body bytes acknowledged by the upload server",
            up.bytes_sent,
        )?;
        if let Some(ms) = up.last_success_unix_ms {
            o.gauge(
                "sockacct_upload_last_success_timestamp_seconds",
                "Unix time of the last flush that uploaded everything pending",
                ms as f64 / 1e3,
            )?;
        }

        // The agent itself.
        let hooks: Vec<String> = st
            .fixed
            .hooks
            .iter()
            .map(crate::loader::hooks::HookChoice::short)
            .collect();
        let hooks = hooks.join(",");
        o.gauges(
            "sockacct_build_info",
            "Version, kernel release and the hook chosen per purpose; always 1",
            [(
                vec![
                    ("version", Lv(self.version)),
                    ("kernel", Lv(&st.fixed.kernel)),
                    ("hooks", Lv(&hooks)),
                ],
                1.0,
            )],
        )?;
        o.gauge(
            "sockacct_uptime_seconds",
            "Seconds since the agent started",
            st.uptime_s as f64,
        )?;
        o.counter(
            "process_cpu_seconds",
            "User and system CPU time of the agent process",
            p.cpu_seconds,
        )?;
        o.gauge(
            "process_resident_memory_bytes",
            "Resident memory (VmRSS)",
            p.resident_bytes as f64,
        )?;
        o.gauge(
            "process_virtual_memory_bytes",
            "Virtual memory (VmSize)",
            p.virtual_bytes as f64,
        )?;
        o.gauge(
            "process_open_fds",
            "Open file descriptors",
            p.open_fds as f64,
        )?;
        o.gauge("process_max_fds", "File descriptor limit", p.max_fds as f64)?;
        o.gauge("process_threads", "Threads", p.threads as f64)?;
        o.gauge(
            "process_start_time_seconds",
            "Unix time the process started",
            p.start_time_seconds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Classic);
        assert_eq!(Format::negotiate(None), Format::Classic);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0, text/plain")),
            Format::Classic
        );
    }

    #[test]
    fn classic_names_counters_with_total_and_has_no_eof() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\na_bytes_total{x=\"1\"} 5\n# HELP g A gauge.\n# TYPE g gauge\ng 1.0\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{x=\"1\"} 5\n# HELP g A gauge.\n# TYPE g gauge\ng 1.0\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut reg = Registry::default();
        #[derive(Debug)]
        struct C;
        impl Collector for C {
            fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
                Out(&mut e).counters("t", "h", [(vec![("label", Lv("a\"b\\c\nd"))], 1)])
            }
        }
        reg.register_collector(Box::new(C));
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &reg).unwrap();
        assert!(s.contains(r#"t_total{label="a\"b\\c\nd"} 1"#), "{s}");
    }
}
