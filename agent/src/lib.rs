//! sockacct: eBPF per-socket traffic accounting.
//!
//! One module per stage of the data path:
//! - [`loader`]: preflight checks, loading and attaching the kernel programs, detaching.
//! - [`discover`] / [`procfs`]: owners of sockets that existed before the agent started.
//! - [`poller`]: every interval, flip the epoch, harvest the quiet slot, fold in finished
//!   sockets, and produce per-socket deltas.
//! - [`labels`] / [`config`]: the rules that give every socket exactly one label.
//! - [`event`]: the delta event written as one JSON line.
//! - [`bpfsys`]: the few bpf(2) calls aya lacks (batched map reads).
//! - [`spool`]: crash-safe zstd segments on disk (in directories opened by [`safedir`]); [`upload`]: acknowledged HTTP upload.
//! - [`status`]: the agent's health snapshot; [`control`] serves it as JSON, [`metrics`]
//!   to Prometheus (with byte totals by label); [`stream`]: the written records, live, to
//!   control-socket subscribers (`sockacct events`, `sockacct top`).
pub mod bpfsys;
pub mod btf;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod discover;
pub mod event;
pub mod flows;
pub mod labels;
pub mod lifecycle;
pub mod live;
pub mod loader;
pub mod metrics;
pub mod poller;
pub mod process;
pub mod procfs;
pub mod quota;
pub mod safedir;
pub mod schema;
pub mod secrets;
pub mod settings;
pub mod spool;
pub mod status;
pub mod stream;
pub mod upload;
