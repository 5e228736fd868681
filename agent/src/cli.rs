//! Command line: `sockacct run|check`.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Check that this host can run the agent (privileges, BTF, cgroup v2) and exit.
    Check {
        /// cgroup v2 directory to check, as for `run --cgroup`.
        #[arg(long, value_name = "PATH")]
        cgroup: Option<PathBuf>,
    },
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
    #[arg(long, value_name = "DIR", default_value = "/var/lib/sockacct")]
    pub state_dir: PathBuf,

    /// Capacity of the per-socket maps; sockets beyond it are counted as unattributed
    /// (and reported as such), never lost.
    #[arg(long, value_name = "N")]
    pub max_sockets: Option<u32>,

    /// Agent id written into every event (default: config `agent_id`, else /etc/machine-id).
    #[arg(long, value_name = "ID")]
    pub agent_id: Option<String>,
}

/// Entry point of the `sockacct` binary (in the library so test binaries can embed it).
pub fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Run(args) => crate::daemon::run(args),
        Command::Check { cgroup } => check(cgroup),
    };
    if let Err(e) = r {
        eprintln!("sockacct: error: {e:#}");
        std::process::exit(1);
    }
}

fn check(cgroup: Option<PathBuf>) -> anyhow::Result<()> {
    let path = crate::loader::preflight(cgroup.as_deref())?;
    println!("ok: privileges, BTF and cgroup v2 present; would attach to {}", path.display());
    Ok(())
}
