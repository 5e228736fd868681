//! Command line: `sockacct run|check`.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    control::Request,
    daemon::RunOptions,
    settings::{Overrides, Settings},
    stream::RecordKind,
};

#[derive(Debug, Parser)]
#[command(
    name = "sockacct",
    version,
    about = "Counts every byte each socket sends and receives, with eBPF, and reports labelled deltas",
    long_about = "sockacct attaches eBPF programs to a cgroup v2 directory and counts, per socket, the \
bytes and packets sent and received (IP header + transport header + payload). Every interval it \
writes one delta event: bytes per label (by default the owning process's name; see --config for \
rules), bytes it could not attribute to a socket, and the kernel's total, which the two always add \
up to. Needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN), a kernel with BTF, and cgroup v2."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent until SIGINT or SIGTERM (then detach everything after a final poll).
    Run(RunArgs),
    /// Check that this host can run the agent and exit: privileges, BTF and cgroup v2, then
    /// loads and attaches the real programs (and detaches them again) and lists, per
    /// capability, which hook this kernel gives and what is lost without one. Exits 1
    /// exactly when `run` would fail to start.
    Check {
        /// Configuration file, as for `run --config` (its cgroup, interfaces, map size and
        /// flow settings decide what is loaded).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// cgroup v2 directory to check, as for `run --cgroup`.
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
        /// Also check counting per interface with tc, as for `run --iface`.
        #[arg(long = "iface", value_name = "IFACE")]
        interfaces: Vec<String>,
    },
    /// Ask the running agent to seal its spool and upload everything pending; prints a
    /// receipt and exits non-zero if anything failed.
    Flush(ControlArgs),
    /// Show the running agent's state: sockets, map fill, events, spool, upload, drops.
    Status(ControlArgs),
    /// Stop writing events (counting goes on; see docs/operations.md for what happens
    /// to bytes counted while paused).
    Pause(ControlArgs),
    /// Resume writing events.
    Resume(ControlArgs),
    /// Give one of your own sockets a label (its cookie from getsockopt SO_COOKIE).
    Label {
        #[arg(long)]
        cookie: u64,
        label: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Print the records the running agent writes (delta, flow, gap), one JSON line each,
    /// as they are written (for jq). Without --follow, stops after the first record of the
    /// first --type (delta by default).
    Events {
        /// Keep printing until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only these record types (repeatable; default the written ones: delta, flow,
        /// gap, agent). `conn`: live per-connection counters of each tick (not written anywhere).
        #[arg(long = "type", value_name = "TYPE", value_parser = ["delta", "flow", "gap", "agent", "conn"])]
        types: Vec<String>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// A live view of the running agent: rates and totals per label, and its connections.
    /// Keys: c switch view, s sort, p pause, q quit. Without a terminal (or with --once):
    /// one plain table of the next --seconds.
    Top {
        /// Print one plain table of the next --seconds and exit.
        #[arg(long)]
        once: bool,
        /// How long --once listens.
        #[arg(long, value_name = "S", default_value_t = 1.0)]
        seconds: f64,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Print the DDL of the store the upload can feed (docs/clickhouse.md).
    Schema {
        #[command(subcommand)]
        store: SchemaStore,
    },
    /// Read the on-disk spool without the agent.
    Spool {
        #[command(subcommand)]
        cmd: SpoolCmd,
        /// Spool directory (as `run --spool-dir`).
        #[arg(
            long,
            value_name = "DIR",
            default_value = crate::config::DEFAULT_SPOOL_DIR,
            global = true
        )]
        spool_dir: PathBuf,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SchemaStore {
    /// ClickHouse: the table the upload inserts into and the views to query.
    Clickhouse {
        /// Replicated tables on every shard of this cluster and Distributed tables over
        /// them (sharded by agent); without it, plain MergeTree on one server.
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// Database for the tables.
        #[arg(long, value_name = "DB", default_value = "sockacct")]
        database: String,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum SpoolCmd {
    /// Print every spooled record as a JSON line, oldest first.
    Cat,
    /// Check every frame of every segment and report records and damage (changes nothing).
    Verify,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// TOML config file: labelling rules and defaults (see docs/config.example.toml).
    /// Flags given here override the file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// cgroup v2 directory to count under (its whole subtree). Default: the root of the
    /// cgroup2 mount found in /proc/self/mountinfo, i.e. the whole host.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Poll interval in milliseconds: one delta event per interval in which something moved.
    #[arg(long, value_name = "MS")]
    pub interval: Option<u64>,

    /// Write each delta event as one JSON line to standard output.
    #[arg(long)]
    pub stdout: bool,

    /// Also count bytes per network interface with tc (repeatable, e.g. --iface eth0).
    #[arg(long = "iface", value_name = "IFACE")]
    pub ifaces: Vec<String>,

    /// Directory for state that must survive restarts (the sequence-number reservation).
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// Capacity of the per-socket maps; sockets beyond it are counted as unattributed
    /// (and reported as such), never lost.
    #[arg(long, value_name = "N")]
    pub max_sockets: Option<u32>,

    /// Agent id written into every event (default: config `agent_id`, else /etc/machine-id).
    #[arg(long, value_name = "ID")]
    pub agent_id: Option<String>,

    /// Spool directory: events are kept here, zstd-compressed, until uploaded
    /// (default: config [spool] dir, else /var/lib/sockacct/spool).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Do not spool events to disk (only --stdout, if given).
    #[arg(long)]
    pub no_spool: bool,

    /// Where `sockacct flush` uploads the spool (http or https; may carry a query string).
    /// Credentials are refused here (argv is readable by every user): put a bearer token in
    /// the file named by [upload] token_file, or a password in [upload] password_file.
    #[arg(long, value_name = "URL")]
    pub upload_url: Option<String>,

    /// Control socket for flush/status/pause/resume/label
    /// (default: config [control] socket, else /run/sockacct/control.sock).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Group whose members may use the control socket for `status` and `label`.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,

    /// Serve Prometheus metrics on ADDR:PORT (default: config [metrics] listen, else
    /// 127.0.0.1:9474; port 0 picks a free one, shown by `sockacct status`).
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "no_metrics")]
    pub metrics_listen: Option<String>,

    /// Do not serve Prometheus metrics.
    #[arg(long)]
    pub no_metrics: bool,
}

impl RunArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            cgroup: self.cgroup.clone(),
            interval_ms: self.interval,
            interfaces: self.ifaces.clone(),
            max_sockets: self.max_sockets,
            agent_id: self.agent_id.clone(),
            spool_dir: self.spool_dir.clone(),
            upload_url: self.upload_url.clone(),
            control_socket: self.control_socket.clone(),
            control_group: self.control_group.clone(),
            metrics_listen: self.metrics_listen.clone(),
            no_metrics: self.no_metrics,
        }
    }

    fn run_options(&self) -> RunOptions {
        RunOptions {
            stdout: self.stdout,
            state_dir: self.state_dir.clone(),
            spool: !self.no_spool,
        }
    }
}

/// Entry point of the `sockacct` binary (in the library so test binaries can embed it).
pub fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Run(args) => Settings::build(&args.overrides())
            .map_err(anyhow::Error::from)
            .and_then(|s| crate::daemon::run(s, args.run_options())),
        Command::Check {
            config,
            cgroup,
            interfaces,
        } => check(config, cgroup, interfaces),
        Command::Flush(c) => control(&c, Request::Flush, Duration::from_secs(3600)),
        Command::Status(c) => control(&c, Request::Status, Duration::from_secs(10)),
        Command::Pause(c) => control(&c, Request::Pause, Duration::from_secs(10)),
        Command::Resume(c) => control(&c, Request::Resume, Duration::from_secs(10)),
        Command::Label {
            cookie,
            label,
            control: c,
        } => control(
            &c,
            Request::Label { cookie, label },
            Duration::from_secs(10),
        ),
        Command::Events {
            follow,
            types,
            control: c,
        } => {
            let types: Vec<RecordKind> = types
                .iter()
                .map(|t| match t.as_str() {
                    "delta" => RecordKind::Delta,
                    "flow" => RecordKind::Flow,
                    "conn" => RecordKind::Conn,
                    "agent" => RecordKind::Agent,
                    _ => RecordKind::Gap,
                })
                .collect();
            crate::live::events(&c.control_socket, &types, follow)
        }
        Command::Top {
            once,
            seconds,
            control: c,
        } => {
            use std::io::IsTerminal as _;
            if once || !std::io::stdout().is_terminal() {
                crate::live::once(&c.control_socket, seconds.clamp(0.1, 3600.0))
            } else {
                crate::live::tui::run(&c.control_socket)
            }
        }
        Command::Schema {
            store: SchemaStore::Clickhouse { cluster, database },
        } => {
            print!(
                "{}",
                crate::schema::clickhouse(&database, cluster.as_deref())
            );
            Ok(())
        }
        Command::Spool { cmd, spool_dir } => spool(cmd, &spool_dir),
    };
    if let Err(e) = r {
        eprintln!("sockacct: error: {e:#}");
        std::process::exit(1);
    }
}

/// Sends one control request, prints the reply (pretty JSON), exits 1 when it failed.
fn control(c: &ControlArgs, req: Request, timeout: Duration) -> anyhow::Result<()> {
    let reply = crate::control::request(&c.control_socket, &req, timeout)?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    if reply.get("ok").and_then(|v| v.as_bool()) != Some(true) {
        let why = reply
            .get("error")
            .and_then(|v| v.as_str())
            .unwrap_or("the agent reported a failure");
        anyhow::bail!("{why}");
    }
    Ok(())
}

fn check(
    config: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    interfaces: Vec<String>,
) -> anyhow::Result<()> {
    let s = Settings::build(&Overrides {
        config,
        cgroup,
        interfaces,
        ..Overrides::default()
    })?;
    // `run` refuses to start on an unusable CA, client certificate or key: so does this.
    if let Some(up) = crate::upload::UploadConfig::from_section(&s.config.upload)? {
        crate::upload::Uploader::new(up)?;
        println!("ok: upload settings (URL, TLS files) usable");
    }
    let path = crate::loader::preflight(s.config.cgroup.as_deref())?;
    println!("ok: privileges, BTF and cgroup v2 present");
    let loaded = crate::loader::load_checked(path.clone(), &s.load_options())?;
    println!(
        "ok: kernel {}: every required program loads and attaches to {}",
        crate::procfs::kernel_release(),
        path.display()
    );
    for h in &loaded.hooks {
        match (h.program, h.lost) {
            (Some(p), _) => println!(
                "  {:<18} {p} ({})",
                h.purpose,
                h.target.as_deref().unwrap_or("")
            ),
            (None, lost) => println!(
                "  {:<18} none: {}",
                h.purpose,
                lost.unwrap_or("not available")
            ),
        }
        for why in &h.passed_over {
            println!("  {:<18}   passed over {why}", "");
        }
    }
    if !loaded.interfaces.is_empty() {
        println!(
            "  {:<18} tc on {}",
            "interfaces",
            loaded
                .interfaces
                .iter()
                .map(|i| i.1.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    drop(loaded); // detaches everything again
    Ok(())
}

fn spool(cmd: SpoolCmd, dir: &std::path::Path) -> anyhow::Result<()> {
    match cmd {
        SpoolCmd::Cat => {
            let out = std::io::stdout();
            let mut out = std::io::BufWriter::new(out.lock());
            let report = crate::spool::cat(dir, &mut out)?;
            use std::io::Write as _;
            out.flush()?;
            eprintln!("{report}");
        }
        SpoolCmd::Verify => {
            let report = crate::spool::verify(dir)?;
            println!("{report}");
        }
    }
    Ok(())
}
