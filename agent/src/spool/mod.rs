//! The on-disk spool: records as JSON lines, one zstd frame (content size + checksum) per
//! written batch, appended to segment files; recovered after crashes; deleted only once the
//! server acknowledged them (or under the size cap, with a `gap` record saying so).
//!
//! Layout of the spool directory (see docs/spool.md):
//! - `seg-<first seq, 20 digits>.zst.open`: the segment being written (at most one);
//! - `seg-<first seq, 20 digits>.zst`: sealed segments (fsynced, complete, uploadable);
//!   lexical order is write order is seq order;
//! - `cursor`: what the server acknowledged, and spool_full gaps not yet durable as records;
//! - `*.damaged`: segments set aside by recovery (never read again, never deleted);
//! - `lock`: held by the writing agent; `*.tmp`, `*.salvage`: transient.
use std::{
    collections::{BTreeSet, VecDeque},
    fmt,
    io::{self, Write},
    ops::{Add, AddAssign},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::event::{FORMAT_VERSION, Identity, SeqAllocator};

mod dirloss;
mod fault;
mod frame;
mod reader;
mod recovery;
mod report;
mod storage;
mod writer;

pub use reader::{cat, cat_storage, verify, verify_storage};
pub use report::*;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_safety;

pub use fault::{FaultOp, FaultStorage};
pub use frame::Damage;
pub use storage::{DIR_MODE, FsStorage, LOCK_FILE, Storage};

pub use crate::event::SpoolRecord;

/// The time as the spool sees it: a monotonic instant drives every timer and age (fsync
/// interval, sealing by age), so a wall clock stepped backwards (or forwards) stalls or
/// rushes nothing; the wall clock is only written into records (`t` of a gap record).
/// Tests drive both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    pub fn system() -> Now {
        Now {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// Both clocks advance.
impl Add<Duration> for Now {
    type Output = Now;
    fn add(self, d: Duration) -> Now {
        Now {
            mono: self.mono + d,
            wall: self.wall + d,
        }
    }
}

impl AddAssign<Duration> for Now {
    fn add_assign(&mut self, d: Duration) {
        *self = *self + d;
    }
}

/// When segment data is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before `append` returns (after the batch's frame was written).
    Always,
    /// At most this long after a frame was written (checked by `append` and `tick`).
    Interval(Duration),
    /// Only when a segment is sealed (and for the cursor file, always).
    Never,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Seal the active segment once it reaches this size.
    pub segment_max_bytes: u64,
    /// Seal the active segment once it is this old.
    pub segment_max_age: Duration,
    /// Cap on all segments together; beyond it the oldest unacknowledged sealed segments are
    /// dropped (and a gap record written). Must be at least twice `segment_max_bytes`.
    pub total_max_bytes: u64,
    pub fsync: FsyncPolicy,
    /// Compressed bytes held in memory while the disk refuses writes (or the directory is
    /// gone); beyond it records are dropped (and counted, and a gap record written once
    /// writing works again). One batch may always wait, whatever its size.
    pub memory_backlog_bytes: u64,
}

pub const DEFAULT_DIR: &str = crate::config::DEFAULT_SPOOL_DIR;

/// 32 MiB: about 95 000 typical 100 ms events (~350 compressed bytes each), 2.6 hours.
pub const DEFAULT_MEMORY_BACKLOG_BYTES: u64 = 32 << 20;
/// Below this the bound means nothing (one batch may always wait anyway).
pub const MIN_MEMORY_BACKLOG_BYTES: u64 = 4096;

/// At most this many bytes of bodies per [`Spool::bodies`] call (but always one segment).
pub const BODIES_BUDGET: u64 = 64 << 20;

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from(DEFAULT_DIR),
            segment_max_bytes: 8 << 20,
            segment_max_age: Duration::from_secs(600),
            total_max_bytes: 1 << 30,
            fsync: FsyncPolicy::Interval(Duration::from_secs(1)),
            memory_backlog_bytes: DEFAULT_MEMORY_BACKLOG_BYTES,
        }
    }
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>) -> SpoolConfig {
        SpoolConfig {
            dir: dir.into(),
            ..SpoolConfig::default()
        }
    }

    pub fn validate(&self) -> Result<(), SpoolError> {
        let bad = |m: String| Err(SpoolError::Config(m));
        if self.segment_max_bytes < 4096 {
            return bad(format!(
                "segment_max_bytes {} is below 4096",
                self.segment_max_bytes
            ));
        }
        if self.total_max_bytes < 2 * self.segment_max_bytes {
            return bad(format!(
                "total_max_bytes {} must be at least twice segment_max_bytes {}",
                self.total_max_bytes, self.segment_max_bytes
            ));
        }
        if self.segment_max_age.is_zero() {
            return bad("segment_max_age must be above zero".into());
        }
        if self.memory_backlog_bytes < MIN_MEMORY_BACKLOG_BYTES {
            return bad(format!(
                "memory_backlog_bytes {} is below {MIN_MEMORY_BACKLOG_BYTES}",
                self.memory_backlog_bytes
            ));
        }
        if self.fsync == FsyncPolicy::Interval(Duration::ZERO) {
            return bad("fsync interval must be above zero (or use Always)".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool: {op} {name}: {source}")]
    Io {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("spool config: {0}")]
    Config(String),
    #[error(
        "spool: the sequence allocator hands out {next}, but the spool already holds seq {on_disk}; \
the seq state file was reset without deleting the spool (see docs/format.md)"
    )]
    SeqBehind { next: u64, on_disk: u64 },
    #[error("spool: acknowledge: {0}")]
    Cursor(String),
    #[error("spool: {records} records still wait in memory: {last_error}")]
    Backlog { records: u64, last_error: String },
}

fn ioe<'a>(op: &'static str, name: &'a str) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        name: name.to_owned(),
        source,
    }
}

/// Position up to which the server acknowledged: everything up to `last_seq`, which ends at
/// byte `offset` of `segment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorPos {
    pub segment: String,
    pub offset: u64,
    pub last_seq: u64,
}

/// What one `append` did with its batch. The batch's records are numbered in order; records
/// dropped are always the last `dropped` ones of the batch.
#[derive(Debug, Clone, Default)]
pub struct AppendOutcome {
    /// The batch's records that got a seq, as JSON lines (each ending in `\n`), whatever
    /// happened to them next.
    pub lines: Vec<u8>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records of the batch appended to the active segment during this call.
    pub written: usize,
    /// Records of the batch held in the memory backlog (the disk refused them for now).
    pub backlogged: usize,
    /// Records of the batch dropped (backlog full, no seq available, invalid record).
    /// Records dropped because the backlog is full, or for want of a seq, are always the
    /// last ones of the batch.
    pub dropped: usize,
    /// Gap records the spool created since the last outcome (they are written or queued).
    pub gaps: Vec<u8>,
    /// Set while the spool cannot write (the last error).
    pub error: Option<String>,
}

/// A sealed segment not yet fully acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub name: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub frames: u64,
    /// Compressed size of the file.
    pub bytes: u64,
}

/// One upload body: whole frames of one sealed segment, with the envelope its records
/// carry (the uploader sends it as it is; its idempotency key is the same on every retry).
#[derive(Debug, Clone)]
pub struct Body {
    pub segment: String,
    /// Concatenated zstd frames (a valid multi-frame zstd stream).
    pub data: Vec<u8>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub frames: u64,
    /// A single frame larger than the requested maximum, sent alone.
    pub oversize: bool,
    /// Acknowledge this once the server has stored the body.
    pub pos: CursorPos,
    /// The records' `agent` and `boot`.
    pub agent: String,
    pub boot: String,
}

impl Body {
    /// `<agent>:<boot>:<first_seq>-<last_seq>`: the same for every retry of this body.
    pub fn idempotency_key(&self) -> String {
        format!(
            "{}:{}:{}-{}",
            self.agent, self.boot, self.first_seq, self.last_seq
        )
    }
}

/// Records and bytes dropped for one reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DropCount {
    pub records: u64,
    pub bytes: u64,
}

/// Drops by reason. `bytes` are compressed bytes for `spool_full`, JSON bytes otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Drops {
    /// Oldest unacknowledged segments deleted under `total_max_bytes`.
    pub spool_full: DropCount,
    /// Records refused because the memory backlog was full while the disk refused writes.
    pub backlog_full: DropCount,
    /// Records that could not get a sequence number (the seq state file could not be written).
    pub seq_unavailable: DropCount,
    /// Records whose serialization was empty or contained a newline, or that failed to compress.
    pub invalid_record: DropCount,
    /// Records not yet acknowledged in segments whose directory was removed or replaced
    /// while the agent ran (what the agent could read back of the segment it was writing is
    /// not counted: it was written again).
    pub dir_lost: DropCount,
}

impl Drops {
    pub fn total_records(&self) -> u64 {
        self.spool_full.records
            + self.backlog_full.records
            + self.seq_unavailable.records
            + self.invalid_record.records
            + self.dir_lost.records
    }
    fn get(&mut self, r: Reason) -> &mut DropCount {
        match r {
            Reason::SpoolFull => &mut self.spool_full,
            Reason::BacklogFull => &mut self.backlog_full,
            Reason::SeqUnavailable => &mut self.seq_unavailable,
            Reason::InvalidRecord => &mut self.invalid_record,
            Reason::DirLost => &mut self.dir_lost,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SpoolStats {
    /// Segments on disk (sealed + active), compressed bytes.
    pub bytes_on_disk: u64,
    /// Sealed segments on disk (including a partly acknowledged one).
    pub segments: usize,
    /// Sealed segments not yet fully acknowledged.
    pub pending_segments: usize,
    pub active_segment: Option<String>,
    pub active_bytes: u64,
    pub records_written: u64,
    pub frames_written: u64,
    /// Compressed bytes appended, and the JSON bytes they hold.
    pub bytes_written: u64,
    pub json_bytes_written: u64,
    pub fsyncs: u64,
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    /// `[spool] memory_backlog_bytes`: the bound of `backlog_bytes`.
    pub backlog_max_bytes: u64,
    pub dropped: Drops,
    /// Times the spool directory was found removed or replaced while running.
    pub dir_lost: u64,
    /// True while the directory is gone and could not be made again (records wait in the
    /// backlog); `last_error` says why.
    pub dir_missing: bool,
    pub gap_records: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    /// True while writes succeed and nothing waits in the backlog.
    pub healthy: bool,
    pub damaged_segments: u64,
    pub torn_bytes_cut: u64,
    pub acked_seq: Option<u64>,
    /// Every record with seq up to this that reached the disk is durable.
    pub durable_seq: Option<u64>,
    pub fs_available_bytes: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// Names

const CURSOR: &str = "cursor";
const CURSOR_TMP: &str = "cursor.tmp";

fn seg_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.zst")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SegKind {
    Sealed,
    Open,
    Salvage,
}

/// `seg-<20 digits>.zst[.open|.salvage]`
fn parse_seg(name: &str) -> Option<(u64, SegKind)> {
    let rest = name.strip_prefix("seg-")?;
    let (digits, rest) = rest.split_at_checked(20)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = digits.parse().ok()?;
    let kind = match rest {
        ".zst" => SegKind::Sealed,
        ".zst.open" => SegKind::Open,
        ".zst.salvage" => SegKind::Salvage,
        _ => return None,
    };
    Some((n, kind))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The cursor file

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    SpoolFull,
    BacklogFull,
    SeqUnavailable,
    InvalidRecord,
    DirLost,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::SpoolFull => "spool_full",
            Reason::BacklogFull => "backlog_full",
            Reason::SeqUnavailable => "seq_unavailable",
            Reason::InvalidRecord => "invalid_record",
            Reason::DirLost => "dir_lost",
        }
    }
}

/// A loss to be stated in a gap record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct GapNote {
    reason: String,
    lost_first_seq: Option<u64>,
    lost_last_seq: Option<u64>,
    lost_records: u64,
    lost_bytes: u64,
    /// spool_full: the segments deleted (so recovery can finish deleting them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    victims: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct CursorFile {
    v: u32,
    acked_seq: Option<u64>,
    #[serde(default)]
    segment: Option<String>,
    #[serde(default)]
    offset: u64,
    /// spool_full losses whose gap record may not be durable yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending_gaps: Vec<GapNote>,
}

fn read_cursor<S: Storage>(st: &S) -> (CursorFile, Option<String>) {
    match st.read(CURSOR) {
        Ok(b) => match serde_json::from_slice::<CursorFile>(&b) {
            Ok(c) => (c, None),
            Err(e) => (
                CursorFile::default(),
                Some(format!(
                    "unreadable ({e}); treating nothing as acknowledged (records may be uploaded again)"
                )),
            ),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => (CursorFile::default(), None),
        Err(e) => (
            CursorFile::default(),
            Some(format!(
                "cannot read ({e}); treating nothing as acknowledged"
            )),
        ),
    }
}

fn write_cursor<S: Storage>(st: &mut S, c: &CursorFile) -> Result<(), SpoolError> {
    let mut body = serde_json::to_vec(c).map_err(|e| SpoolError::Io {
        op: "encode",
        name: CURSOR.into(),
        source: e.into(),
    })?;
    body.push(b'\n');
    st.create(CURSOR_TMP).map_err(ioe("create", CURSOR_TMP))?;
    st.append(CURSOR_TMP, &body)
        .map_err(ioe("write", CURSOR_TMP))?;
    st.sync(CURSOR_TMP).map_err(ioe("fsync", CURSOR_TMP))?;
    st.rename(CURSOR_TMP, CURSOR)
        .map_err(ioe("rename", CURSOR_TMP))?;
    st.sync_dir().map_err(ioe("fsync dir", ""))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The spool

#[derive(Serialize)]
struct GapRecord<'a> {
    v: u32,
    #[serde(rename = "type")]
    kind: &'static str,
    agent: &'a str,
    boot: &'a str,
    seq: u64,
    t: u64,
    reason: &'a str,
    lost_first_seq: Option<u64>,
    lost_last_seq: Option<u64>,
    lost_records: u64,
    lost_bytes: u64,
}

#[derive(Debug, Clone)]
struct SegMeta {
    name: String,
    first_seq: u64,
    last_seq: u64,
    records: u64,
    frames: u64,
    bytes: u64,
    /// For a partly acknowledged segment: first seq, records and bytes of the part not
    /// acknowledged (known without reading the file, which may be gone when it is needed).
    unacked: Option<(u64, u64, u64)>,
}

/// A compressed frame waiting to be written (or written, not yet fsynced).
#[derive(Debug)]
struct QFrame {
    data: Vec<u8>,
    raw: u64,
    first_seq: u64,
    last_seq: u64,
    records: u64,
    /// The gap this frame states, if it is a gap record.
    gap: Option<GapNote>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    frames: u64,
    records: u64,
    last_seq: Option<u64>,
}

#[derive(Debug)]
struct Active {
    /// `seg-N.zst.open`
    name: String,
    first_seq: u64,
    /// Bytes of complete frames.
    len: u64,
    synced_len: u64,
    synced: Counts,
    /// Frames written since the last fsync, kept so a failed fsync can write them again.
    unsynced: Vec<QFrame>,
    created: Instant,
    oldest_unsynced: Option<Instant>,
    dir_synced: bool,
    /// A failed write may have left a partial frame beyond `len`: cut before writing again.
    needs_truncate: bool,
}

impl Active {
    fn counts(&self) -> Counts {
        let mut c = self.synced;
        for f in &self.unsynced {
            c.frames += 1;
            c.records += f.records;
            c.last_seq = Some(f.last_seq);
        }
        c
    }
    fn sealed_name(&self) -> String {
        seg_name(self.first_seq)
    }
}

pub struct Spool<S: Storage = FsStorage> {
    cfg: SpoolConfig,
    st: S,
    id: Identity,
    seq: SeqAllocator,
    /// A number drawn from the allocator at open (to check it is ahead of the spool).
    peeked_seq: Option<u64>,
    /// Highest seq the spool has seen on disk or in the cursor: the allocator must be above.
    seq_floor: Option<u64>,
    cctx: Option<zstd::bulk::Compressor<'static>>,
    sealed: VecDeque<SegMeta>,
    active: Option<Active>,
    queue: VecDeque<QFrame>,
    queue_bytes: u64,
    /// Losses not yet turned into gap records (in order).
    open_gaps: Vec<GapNote>,
    cursor: CursorFile,
    cursor_dirty: bool,
    new_gap_lines: Vec<u8>,
    durable_seq: Option<u64>,
    /// Highest seq ever sealed (acknowledging beyond it is refused).
    max_sealed_seq: Option<u64>,
    last_log: Option<Instant>,
    /// The directory was removed or replaced and is not back yet.
    dir_lost: bool,
    /// Why it could not be made again (logged once per distinct reason).
    dir_error: Option<String>,
    stats: SpoolStats,
}

impl Spool<FsStorage> {
    /// Opens (creating it if needed) and locks `cfg.dir`, then [`Spool::open`].
    pub fn open_dir(
        cfg: SpoolConfig,
        identity: Identity,
        seq: SeqAllocator,
    ) -> Result<(Spool<FsStorage>, RecoveryReport), SpoolError> {
        let st = FsStorage::open(&cfg.dir).map_err(|e| SpoolError::Io {
            op: "open",
            name: cfg.dir.display().to_string(),
            source: e,
        })?;
        Spool::open(cfg, st, identity, seq)
    }
}

impl<S: Storage> Spool<S> {
    /// Opens the spool in `storage` (for [`FsStorage`], `FsStorage::open(&cfg.dir)`), recovers
    /// it (see docs/spool.md) and reports what recovery found and did.
    pub fn open(
        cfg: SpoolConfig,
        storage: S,
        identity: Identity,
        seq: SeqAllocator,
    ) -> Result<(Spool<S>, RecoveryReport), SpoolError> {
        cfg.validate()?;
        let cctx = frame::compressor().map_err(|e| SpoolError::Io {
            op: "zstd init",
            name: String::new(),
            source: e,
        })?;
        let mut sp = Spool {
            cfg,
            st: storage,
            id: identity,
            seq,
            peeked_seq: None,
            seq_floor: None,
            cctx: Some(cctx),
            sealed: VecDeque::new(),
            active: None,
            queue: VecDeque::new(),
            queue_bytes: 0,
            open_gaps: Vec::new(),
            cursor: CursorFile::default(),
            cursor_dirty: false,
            new_gap_lines: Vec::new(),
            durable_seq: None,
            max_sealed_seq: None,
            last_log: None,
            dir_lost: false,
            dir_error: None,
            stats: SpoolStats {
                healthy: true,
                ..SpoolStats::default()
            },
        };
        let mut rep = sp.recover()?;
        // The allocator must be ahead of everything the spool holds.
        match sp.seq.next() {
            Ok(s) => {
                if let Some(f) = sp.seq_floor
                    && s <= f
                {
                    return Err(SpoolError::SeqBehind {
                        next: s,
                        on_disk: f,
                    });
                }
                sp.peeked_seq = Some(s);
            }
            Err(e) => sp.note_error(format!("sequence allocator: {e}")),
        }
        let now = Now::system();
        let errors = sp.stats.errors;
        sp.drain(now);
        sp.maintain(now);
        sp.settle(errors);
        rep.gap_lines = std::mem::take(&mut sp.new_gap_lines);
        sp.stats.damaged_segments = rep.damaged.len() as u64;
        sp.stats.torn_bytes_cut = rep.torn.as_ref().map(|t| t.bytes_cut).unwrap_or(0);
        info!("spool {}: {rep}", sp.cfg.dir.display());
        Ok((sp, rep))
    }

    /// Numbers the records (in order), serializes them, and writes them as one zstd frame to
    /// the active segment (after anything waiting in the backlog). Never panics and never
    /// fails: when the disk refuses, the batch waits in the memory backlog (bounded; the rest
    /// is dropped and counted) and the outcome says so.
    pub fn append<R: SpoolRecord>(&mut self, records: &mut [R], now: Now) -> AppendOutcome {
        let mut out = AppendOutcome::default();
        let errors = self.stats.errors;
        self.check_dir(now);
        // Older records first: retry the backlog.
        self.drain(now);
        // One batch can always wait; beyond that the backlog is bounded in bytes. The bound
        // applies to the compressed frames, so it is checked as they are queued (below).
        let bounded = !self.queue.is_empty();
        if !records.is_empty() && !bounded && !self.open_gaps.is_empty() {
            // Losses before this batch are stated before it. (While the disk refuses, losses
            // add up in one open gap, stated by `drain` once the backlog is written.)
            self.close_gaps(now);
        }
        let mut chunks: Vec<(Vec<u8>, u64, u64, u64)> = Vec::new(); // (json, first, last, n)
        let mut kept_seqs: Vec<u64> = Vec::new();
        let mut numbered = 0;
        for r in records.iter_mut() {
            let seq = match self.alloc_seq() {
                Ok(s) => s,
                Err(e) => {
                    self.note_error(e);
                    break;
                }
            };
            numbered += 1;
            r.stamp(&self.id, seq);
            let line = r.to_json_line();
            out.first_seq.get_or_insert(seq);
            out.last_seq = Some(seq);
            if line.is_empty() || line.contains(&b'\n') {
                out.dropped += 1;
                self.drop_records(Reason::InvalidRecord, Some(seq), 1, line.len() as u64);
                continue;
            }
            out.lines.extend_from_slice(&line);
            out.lines.push(b'\n');
            let need_new = match chunks.last() {
                None => true,
                Some((j, ..)) => j.len() + line.len() + 1 > frame::MAX_FRAME_RAW,
            };
            if need_new {
                chunks.push((Vec::with_capacity(line.len() + 1), seq, seq, 0));
            }
            let c = chunks.last_mut().expect("pushed");
            c.0.extend_from_slice(&line);
            c.0.push(b'\n');
            c.2 = seq;
            c.3 += 1;
            kept_seqs.push(seq);
        }
        // Records that could not be numbered.
        if numbered < records.len() {
            let n = records.len() - numbered;
            out.dropped += n;
            self.drop_records(Reason::SeqUnavailable, None, n as u64, 0);
        }
        let mut full = false;
        for (json, first, last, n) in chunks {
            let data = if full {
                None
            } else {
                Some(self.compress(&json))
            };
            // Beyond the bound: this chunk and the rest of the batch (so always the last
            // records of the batch) are dropped.
            full = full
                || bounded
                    && matches!(&data, Some(Ok(d))
                        if self.queue_bytes + d.len() as u64 > self.cfg.memory_backlog_bytes);
            if full {
                kept_seqs.retain(|s| *s < first || *s > last);
                out.dropped += n as usize;
                self.drop_records_range(Reason::BacklogFull, first, last, n, json.len() as u64);
                continue;
            }
            match data.expect("compressed unless full") {
                Ok(data) => self.push_queue(QFrame {
                    data,
                    raw: json.len() as u64,
                    first_seq: first,
                    last_seq: last,
                    records: n,
                    gap: None,
                }),
                Err(e) => {
                    self.note_error(format!("zstd: {e}"));
                    kept_seqs.retain(|s| *s < first || *s > last);
                    out.dropped += n as usize;
                    self.drop_records_range(
                        Reason::InvalidRecord,
                        first,
                        last,
                        n,
                        json.len() as u64,
                    );
                }
            }
        }
        self.drain(now);
        self.maintain(now);
        self.settle(errors);
        // Fate of the kept records: still queued, or written.
        let queued_from = self
            .queue
            .iter()
            .find(|f| f.gap.is_none())
            .map(|f| f.first_seq)
            .unwrap_or(u64::MAX);
        out.backlogged = kept_seqs.iter().filter(|s| **s >= queued_from).count();
        out.written = kept_seqs.len() - out.backlogged;
        out.gaps = std::mem::take(&mut self.new_gap_lines);
        if !self.stats.healthy {
            out.error = self.stats.last_error.clone();
        }
        out
    }

    /// Periodic work: retry the backlog, fsync when due, seal by age, retry deletions and the
    /// cursor file. Call it every few hundred milliseconds.
    pub fn tick(&mut self, now: Now) {
        let errors = self.stats.errors;
        self.check_dir(now);
        self.drain(now);
        self.maintain(now);
        self.settle(errors);
    }

    /// Writes what waits in the backlog and fsyncs the active segment now (shutdown).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        let now = Now::system();
        self.check_dir(now);
        self.drain(now);
        self.sync_active()?;
        if !self.queue.is_empty() {
            return Err(SpoolError::Backlog {
                records: self.queue.iter().map(|f| f.records).sum(),
                last_error: self.stats.last_error.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Closes the active segment: writes the backlog if it can, fsyncs, renames it to its
    /// sealed name. Afterwards it is listed by `pending()` and can be uploaded.
    pub fn seal(&mut self) -> Result<(), SpoolError> {
        let now = Now::system();
        self.check_dir(now);
        self.drain(now);
        self.seal_active()
    }

    /// Gap lines created by `tick`, `seal` or `flush` since the last outcome (appends return
    /// theirs in `AppendOutcome::gaps`).
    pub fn take_gap_lines(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.new_gap_lines)
    }

    fn compress(&mut self, json: &[u8]) -> io::Result<Vec<u8>> {
        let c = match self.cctx.as_mut() {
            Some(c) => c,
            None => self.cctx.insert(frame::compressor()?),
        };
        match c.compress(json) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.cctx = None; // start from a fresh context next time
                Err(e)
            }
        }
    }

    fn alloc_seq(&mut self) -> Result<u64, String> {
        let s = match self.peeked_seq.take() {
            Some(s) => s,
            None => self
                .seq
                .next()
                .map_err(|e| format!("sequence allocator: {e}"))?,
        };
        if let Some(f) = self.seq_floor
            && s <= f
        {
            return Err(SpoolError::SeqBehind {
                next: s,
                on_disk: f,
            }
            .to_string());
        }
        Ok(s)
    }

    fn push_queue(&mut self, f: QFrame) {
        self.queue_bytes += f.data.len() as u64;
        self.queue.push_back(f);
    }

    fn pop_queue(&mut self) -> Option<QFrame> {
        let f = self.queue.pop_front()?;
        self.queue_bytes -= f.data.len() as u64;
        Some(f)
    }

    fn unpop_queue(&mut self, f: QFrame) {
        self.queue_bytes += f.data.len() as u64;
        self.queue.push_front(f);
    }

    fn drop_records(&mut self, reason: Reason, seq: Option<u64>, n: u64, bytes: u64) {
        let d = self.stats.dropped.get(reason);
        d.records += n;
        d.bytes += bytes;
        match self.open_gaps.last_mut() {
            Some(g) if g.reason == reason.as_str() => {
                if let Some(s) = seq {
                    g.lost_first_seq = Some(g.lost_first_seq.map_or(s, |x| x.min(s)));
                    g.lost_last_seq = Some(g.lost_last_seq.map_or(s, |x| x.max(s)));
                }
                g.lost_records += n;
                g.lost_bytes += bytes;
            }
            _ => self.open_gaps.push(GapNote {
                reason: reason.as_str().into(),
                lost_first_seq: seq,
                lost_last_seq: seq,
                lost_records: n,
                lost_bytes: bytes,
                victims: Vec::new(),
            }),
        }
    }

    fn drop_records_range(&mut self, reason: Reason, first: u64, last: u64, n: u64, bytes: u64) {
        self.drop_records(reason, Some(first), 0, 0);
        self.drop_records(reason, Some(last), n, bytes);
    }

    /// Turns the open losses into gap records at the end of the queue.
    fn close_gaps(&mut self, now: Now) {
        while !self.open_gaps.is_empty() {
            let seq = match self.alloc_seq() {
                Ok(s) => s,
                Err(e) => {
                    self.note_error(e);
                    return;
                }
            };
            let g = self.open_gaps.remove(0);
            let rec = GapRecord {
                v: FORMAT_VERSION,
                kind: "gap",
                agent: &self.id.agent,
                boot: &self.id.boot,
                seq,
                t: unix_ms(now.wall),
                reason: &g.reason,
                lost_first_seq: g.lost_first_seq,
                lost_last_seq: g.lost_last_seq,
                lost_records: g.lost_records,
                lost_bytes: g.lost_bytes,
            };
            let mut json = serde_json::to_vec(&rec).unwrap_or_default();
            json.push(b'\n');
            // (A removed directory was told in full where it was noticed.)
            if g.reason != Reason::DirLost.as_str() {
                warn!(
                    "spool: lost {} records ({}, seq {:?}..={:?}); gap record seq {seq}",
                    g.lost_records, g.reason, g.lost_first_seq, g.lost_last_seq
                );
            }
            self.new_gap_lines.extend_from_slice(&json);
            match self.compress(&json) {
                Ok(data) => {
                    self.stats.gap_records += 1;
                    self.push_queue(QFrame {
                        data,
                        raw: json.len() as u64,
                        first_seq: seq,
                        last_seq: seq,
                        records: 1,
                        gap: Some(g),
                    })
                }
                Err(e) => self.note_error(format!("zstd: {e}")),
            }
        }
    }

    /// Writes the backlog in order until it is empty or the disk refuses; then states open
    /// losses as gap records and writes those too.
    fn drain(&mut self, now: Now) {
        if self.dir_lost {
            return; // nowhere to write: `check_dir` retries the directory first
        }
        let mut wrote_gap = false;
        for _round in 0..4 {
            while let Some(f) = self.pop_queue() {
                let is_gap = f.gap.is_some();
                let errors = self.stats.errors;
                match self.write_frame(f, now) {
                    Ok(()) if self.stats.errors != errors => return, // e.g. a failed fsync when sealing
                    Ok(()) => wrote_gap |= is_gap,
                    Err(e) => {
                        self.note_error(e);
                        return;
                    }
                }
            }
            if self.open_gaps.is_empty() {
                break;
            }
            self.close_gaps(now);
            if self.queue.is_empty() {
                break;
            }
        }
        // Gap records are made durable at once, whatever the policy: they justify deletions.
        if (self.cfg.fsync == FsyncPolicy::Always || wrote_gap)
            && let Err(e) = self.sync_active()
        {
            self.note_error(e.to_string());
        }
    }

    /// Fsync when due, seal when old or big, retry cursor write and deletions.
    fn maintain(&mut self, now: Now) {
        if self.dir_lost {
            return;
        }
        if let FsyncPolicy::Interval(d) = self.cfg.fsync {
            let due = self
                .active
                .as_ref()
                .and_then(|a| a.oldest_unsynced)
                .is_some_and(|t| now.mono.saturating_duration_since(t) >= d);
            if due && let Err(e) = self.sync_active() {
                self.note_error(e.to_string());
            }
        }
        if let Some(a) = &self.active {
            let old = now.mono.saturating_duration_since(a.created) >= self.cfg.segment_max_age;
            if (old || a.len >= self.cfg.segment_max_bytes)
                && let Err(e) = self.seal_active()
            {
                self.note_error(e.to_string());
            }
        }
        if self.cursor_dirty {
            let c = self.cursor.clone();
            match write_cursor(&mut self.st, &c) {
                Ok(()) => self.cursor_dirty = false,
                Err(e) => self.note_error(e.to_string()),
            }
        }
        self.delete_acked();
    }

    fn note_error(&mut self, e: String) {
        // Log a new error at once, the same one again at most once a minute.
        let again = self.stats.last_error.as_deref() == Some(e.as_str());
        if !again
            || self
                .last_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            warn!("spool: {e}");
            self.last_log = Some(Instant::now());
        }
        self.stats.errors += 1;
        self.stats.last_error = Some(e);
        self.stats.healthy = false;
    }

    /// End of a call: healthy when nothing waits, the directory is there, and the call met
    /// no error. Said once when it changes back (the failure was said by `note_error`), so a
    /// spool that keeps failing does not log "works again" between its errors.
    fn settle(&mut self, errors_before: u64) {
        let ok = self.queue.is_empty() && !self.dir_lost && self.stats.errors == errors_before;
        if ok && !self.stats.healthy {
            info!("spool: writing works again");
        }
        self.stats.healthy = ok;
    }
}
