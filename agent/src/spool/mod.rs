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
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::event::{DeltaEvent, FORMAT_VERSION, Identity, SeqAllocator};

mod fault;
mod frame;
mod storage;
#[cfg(test)]
mod tests;

pub use fault::{FaultOp, FaultStorage};
pub use frame::Damage;
pub use storage::{FsStorage, LOCK_FILE, Storage};

/// A record the spool can number and write.
pub trait SpoolRecord {
    fn set_seq(&mut self, seq: u64);
    /// One JSON object, no trailing newline, with the `seq` last given to `set_seq`.
    fn to_json_line(&self) -> Vec<u8>;
}

impl SpoolRecord for DeltaEvent {
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
    fn to_json_line(&self) -> Vec<u8> {
        // Serializing plain structs and string-keyed maps cannot fail; an empty line is
        // refused by `append` (counted as invalid_record) rather than panicking here.
        serde_json::to_vec(self).unwrap_or_default()
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
    /// Records held in memory while the disk refuses writes; beyond it records are dropped
    /// (and counted, and a gap record written once writing works again).
    pub memory_backlog_records: usize,
}

pub const DEFAULT_DIR: &str = crate::config::DEFAULT_SPOOL_DIR;

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
            memory_backlog_records: 100_000,
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

/// One upload body: whole frames of one sealed segment.
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
}

impl Drops {
    pub fn total_records(&self) -> u64 {
        self.spool_full.records
            + self.backlog_full.records
            + self.seq_unavailable.records
            + self.invalid_record.records
    }
    fn get(&mut self, r: Reason) -> &mut DropCount {
        match r {
            Reason::SpoolFull => &mut self.spool_full,
            Reason::BacklogFull => &mut self.backlog_full,
            Reason::SeqUnavailable => &mut self.seq_unavailable,
            Reason::InvalidRecord => &mut self.invalid_record,
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
    pub dropped: Drops,
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

/// A cut torn tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: String,
    pub offset: u64,
    pub bytes_cut: u64,
    pub reason: String,
}

/// A segment set aside by recovery.
#[derive(Debug, Clone)]
pub struct DamagedSegment {
    pub segment: String,
    pub set_aside_as: String,
    pub damage: Vec<Damage>,
    /// Good frames copied back into a segment of the original sealed name.
    pub frames_kept: u64,
    pub records_kept: u64,
    pub salvage_error: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub frames: u64,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub torn: Option<TornTail>,
    pub damaged: Vec<DamagedSegment>,
    /// Segments left open by the previous run, sealed now.
    pub sealed: Vec<String>,
    /// Fully acknowledged segments, empty segments and temporary files removed.
    pub removed: Vec<String>,
    /// Files set aside earlier (`*.damaged`), left alone.
    pub set_aside_earlier: Vec<String>,
    pub acked_seq: Option<u64>,
    pub cursor_problem: Option<String>,
    /// spool_full gaps the previous run had not made durable: written again now.
    pub gaps_reissued: usize,
    /// Gap records created while opening.
    pub gap_lines: Vec<u8>,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} segments, {} frames, {} records",
            self.segments, self.frames, self.records
        )?;
        if let (Some(a), Some(b)) = (self.first_seq, self.last_seq) {
            write!(f, " (seq {a}..={b})")?;
        }
        if let Some(s) = self.acked_seq {
            write!(f, ", acknowledged through seq {s}")?;
        }
        if let Some(t) = &self.torn {
            write!(
                f,
                "; cut a torn tail of {} bytes from {} at offset {} ({})",
                t.bytes_cut, t.segment, t.offset, t.reason
            )?;
        }
        for d in &self.damaged {
            write!(
                f,
                "; DAMAGED {} set aside as {}, {} records kept",
                d.segment, d.set_aside_as, d.records_kept
            )?;
            if let Some(e) = &d.salvage_error {
                write!(f, " (salvage failed: {e})")?;
            }
        }
        if !self.sealed.is_empty() {
            write!(f, "; sealed {}", self.sealed.join(", "))?;
        }
        if let Some(p) = &self.cursor_problem {
            write!(f, "; cursor: {p}")?;
        }
        if self.gaps_reissued > 0 {
            write!(f, "; reissued {} gap records", self.gaps_reissued)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
pub struct CatReport {
    pub segments: usize,
    pub frames: u64,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Damaged regions skipped: (segment, damage).
    pub damage: Vec<(String, Damage)>,
}

impl fmt::Display for CatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records in {} frames of {} segments",
            self.records, self.frames, self.segments
        )?;
        if let (Some(a), Some(b)) = (self.first_seq, self.last_seq) {
            write!(f, ", seq {a}..={b}")?;
        }
        for (seg, d) in &self.damage {
            write!(
                f,
                "; skipped {} damaged bytes at offset {} of {seg}: {}",
                d.len, d.offset, d.reason
            )?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct SegmentCheck {
    pub name: String,
    /// Still being written (`.open`).
    pub open: bool,
    pub bytes: u64,
    pub frames: u64,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub damage: Vec<Damage>,
    /// The only damage is an incomplete tail of the segment being written: what a crash
    /// (or a write in progress) leaves; recovery cuts it.
    pub torn_tail: bool,
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub segments: Vec<SegmentCheck>,
    /// Files set aside by recovery earlier (`*.damaged`).
    pub set_aside: Vec<String>,
    pub acked_seq: Option<u64>,
    pub cursor_problem: Option<String>,
    /// spool_full gaps the cursor says may not be durable as records yet.
    pub pending_gap_notes: usize,
}

impl VerifyReport {
    /// No damage other than a torn tail, and a readable cursor.
    pub fn is_clean(&self) -> bool {
        self.cursor_problem.is_none()
            && self
                .segments
                .iter()
                .all(|s| s.damage.is_empty() || s.torn_tail)
    }
    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.segments {
            write!(
                f,
                "{}{}: {} bytes, {} frames, {} records",
                s.name,
                if s.open { " (open)" } else { "" },
                s.bytes,
                s.frames,
                s.records
            )?;
            if let (Some(a), Some(b)) = (s.first_seq, s.last_seq) {
                write!(f, ", seq {a}..={b}")?;
            }
            for d in &s.damage {
                let what = if s.torn_tail { "torn tail" } else { "DAMAGE" };
                write!(
                    f,
                    "; {what} at offset {} ({} bytes): {}",
                    d.offset, d.len, d.reason
                )?;
            }
            writeln!(f)?;
        }
        for s in &self.set_aside {
            writeln!(f, "{s}: set aside earlier (damaged), not read")?;
        }
        match (self.acked_seq, &self.cursor_problem) {
            (_, Some(p)) => writeln!(f, "cursor: {p}")?,
            (Some(a), None) => writeln!(f, "cursor: acknowledged through seq {a}")?,
            (None, None) => writeln!(f, "cursor: nothing acknowledged")?,
        }
        if self.pending_gap_notes > 0 {
            writeln!(
                f,
                "cursor: {} spool_full gap records to be (re)written at next start",
                self.pending_gap_notes
            )?;
        }
        write!(
            f,
            "{} segments, {} records: {}",
            self.segments.len(),
            self.records(),
            if self.is_clean() { "ok" } else { "DAMAGED" }
        )
    }
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
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::SpoolFull => "spool_full",
            Reason::BacklogFull => "backlog_full",
            Reason::SeqUnavailable => "seq_unavailable",
            Reason::InvalidRecord => "invalid_record",
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
    created: SystemTime,
    oldest_unsynced: Option<SystemTime>,
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
    queue_records: usize,
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
            queue_records: 0,
            queue_bytes: 0,
            open_gaps: Vec::new(),
            cursor: CursorFile::default(),
            cursor_dirty: false,
            new_gap_lines: Vec::new(),
            durable_seq: None,
            max_sealed_seq: None,
            last_log: None,
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
        let now = SystemTime::now();
        sp.drain(now);
        sp.maintain(now);
        rep.gap_lines = std::mem::take(&mut sp.new_gap_lines);
        sp.stats.damaged_segments = rep.damaged.len() as u64;
        sp.stats.torn_bytes_cut = rep.torn.as_ref().map(|t| t.bytes_cut).unwrap_or(0);
        info!("spool {}: {rep}", sp.cfg.dir.display());
        Ok((sp, rep))
    }

    fn recover(&mut self) -> Result<RecoveryReport, SpoolError> {
        let mut rep = RecoveryReport::default();
        let files = self.st.list().map_err(ioe("list", ""))?;
        let mut dir_changed = false;
        for (n, _) in &files {
            if n.ends_with(".tmp") {
                self.st.remove(n).map_err(ioe("remove", n))?;
                rep.removed.push(n.clone());
                dir_changed = true;
            }
        }
        let (cursor, problem) = read_cursor(&self.st);
        self.cursor = cursor;
        rep.cursor_problem = problem;
        rep.acked_seq = self.cursor.acked_seq;

        // A salvage interrupted by a crash: finish it if the damaged original was already set
        // aside (the salvage file was complete and fsynced before that), else start over.
        let names: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
        for n in &names {
            if let Some((first, SegKind::Salvage)) = parse_seg(n) {
                let base = seg_name(first);
                if names.contains(&base) || names.contains(&format!("{base}.open")) {
                    self.st.remove(n).map_err(ioe("remove", n))?;
                    rep.removed.push(n.clone());
                } else {
                    self.st.rename(n, &base).map_err(ioe("rename", n))?;
                }
                dir_changed = true;
            }
        }
        if dir_changed {
            self.st.sync_dir().map_err(ioe("fsync dir", ""))?;
        }

        let files = self.st.list().map_err(ioe("list", ""))?;
        let mut names: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
        let mut segs: Vec<(u64, SegKind, String)> = files
            .iter()
            .filter_map(|(n, _)| {
                parse_seg(n)
                    .filter(|(_, k)| *k != SegKind::Salvage)
                    .map(|(s, k)| (s, k, n.clone()))
            })
            .collect();
        segs.sort();
        rep.set_aside_earlier = files
            .iter()
            .filter(|(n, _)| n.ends_with(".damaged"))
            .map(|(n, _)| n.clone())
            .collect();

        let mut dctx = zstd::bulk::Decompressor::new().map_err(|e| SpoolError::Io {
            op: "zstd init",
            name: String::new(),
            source: e,
        })?;
        let mut prev: Option<u64> = None;
        let mut gaps_seen = Vec::new();
        let nsegs = segs.len();
        for (i, (first, kind, name)) in segs.into_iter().enumerate() {
            // Only the segment being written when the process ended can have a torn tail: a
            // sealed segment was fsynced before it was renamed, so damage there is damage.
            let may_be_torn = i + 1 == nsegs && kind == SegKind::Open;
            let data = self.st.read(&name).map_err(ioe("read", &name))?;
            let scan = frame::scan(&mut dctx, &data, prev, |_, _| {});
            let base = seg_name(first);
            let mut bytes = data.len() as u64;
            let mut live = name.clone();
            let (frames, records, first_seq, last_seq);
            if scan.damage.is_empty() || (may_be_torn && !scan.good_after_damage()) {
                if !scan.damage.is_empty() {
                    // Torn tail of the newest segment: cut it.
                    let keep = scan.good_prefix();
                    let d = &scan.damage[0];
                    warn!(
                        "spool: cutting a torn tail of {} bytes from {name} at offset {keep}: {}",
                        bytes - keep,
                        d.reason
                    );
                    rep.torn = Some(TornTail {
                        segment: name.clone(),
                        offset: keep,
                        bytes_cut: bytes - keep,
                        reason: d.reason.clone(),
                    });
                    self.st
                        .truncate(&name, keep)
                        .map_err(ioe("truncate", &name))?;
                    self.st.sync(&name).map_err(ioe("fsync", &name))?;
                    bytes = keep;
                }
                gaps_seen.extend(scan.gaps.iter().cloned());
                frames = scan.frames.len() as u64;
                records = scan.records();
                first_seq = scan.frames.first().map(|f| f.first_seq);
                last_seq = scan.last_seq();
            } else {
                let d = self.salvage(&name, &base, &data, &scan, &mut names)?;
                warn!(
                    "spool: {name} is damaged ({}); set aside as {}, {} good records kept",
                    d.damage
                        .iter()
                        .map(|x| format!("{} bytes at {}: {}", x.len, x.offset, x.reason))
                        .collect::<Vec<_>>()
                        .join("; "),
                    d.set_aside_as,
                    d.records_kept
                );
                let kept = d.salvage_error.is_none() && d.frames_kept > 0;
                rep.damaged.push(d);
                if kept {
                    gaps_seen.extend(scan.gaps.iter().cloned());
                    frames = scan.frames.len() as u64;
                    records = scan.records();
                    first_seq = scan.frames.first().map(|f| f.first_seq);
                    last_seq = scan.last_seq();
                    bytes = scan.frames.iter().map(|f| f.len).sum();
                    live = base.clone();
                } else {
                    continue;
                }
            }
            if frames == 0 {
                self.st.remove(&live).map_err(ioe("remove", &live))?;
                self.st.sync_dir().map_err(ioe("fsync dir", ""))?;
                rep.removed.push(live);
                continue;
            }
            if live.ends_with(".open") {
                // Left open by the previous run: seal it; new records go to a new segment.
                self.st.sync(&live).map_err(ioe("fsync", &live))?;
                self.st.rename(&live, &base).map_err(ioe("rename", &live))?;
                self.st.sync_dir().map_err(ioe("fsync dir", ""))?;
                rep.sealed.push(base.clone());
            }
            let (first_seq, last_seq) = (
                first_seq.expect("frames > 0"),
                last_seq.expect("frames > 0"),
            );
            prev = Some(last_seq);
            rep.frames += frames;
            rep.records += records;
            rep.first_seq.get_or_insert(first_seq);
            rep.last_seq = Some(last_seq);
            self.sealed.push_back(SegMeta {
                name: base,
                first_seq,
                last_seq,
                records,
                frames,
                bytes,
            });
        }

        // spool_full losses the previous run noted but may not have written as gap records.
        let notes = std::mem::take(&mut self.cursor.pending_gaps);
        let notes_before = notes.len();
        let mut keep_notes = Vec::new();
        for note in notes {
            let on_disk = gaps_seen.iter().any(|g| {
                g.reason == note.reason
                    && g.lost_first_seq == note.lost_first_seq
                    && g.lost_last_seq == note.lost_last_seq
            });
            if on_disk {
                continue;
            }
            // Finish deleting its victims (the deletions may not have been durable).
            for v in &note.victims {
                if let Some(i) = self.sealed.iter().position(|s| &s.name == v) {
                    let s = self.sealed.remove(i).expect("position found");
                    self.st.remove(&s.name).map_err(ioe("remove", &s.name))?;
                    rep.removed.push(s.name);
                }
            }
            self.open_gaps.push(note.clone());
            keep_notes.push(note);
            rep.gaps_reissued += 1;
        }
        if keep_notes.len() != notes_before {
            self.cursor_dirty = true; // some were durable after all: forget them
        }
        self.cursor.pending_gaps = keep_notes;

        // Floor for the allocator.
        let mut floor = prev.max(self.cursor.acked_seq);
        for n in &self.cursor.pending_gaps {
            floor = floor.max(n.lost_last_seq);
        }
        self.max_sealed_seq = prev;
        self.seq_floor = floor;
        self.durable_seq = prev;

        // Fully acknowledged segments go now.
        self.delete_acked();
        rep.segments = self.sealed.len();
        Ok(rep)
    }

    /// Sets a damaged segment aside as `*.damaged` and copies its good frames (before and
    /// after the damage) into a segment of the original (sealed) name. Crash-safe: the copy is
    /// complete and fsynced as `<base>.salvage` before the original is renamed away.
    fn salvage(
        &mut self,
        name: &str,
        base: &str,
        data: &[u8],
        scan: &frame::Scan,
        names: &mut BTreeSet<String>,
    ) -> Result<DamagedSegment, SpoolError> {
        let mut aside = format!("{name}.damaged");
        let mut k = 1;
        while names.contains(&aside) {
            k += 1;
            aside = format!("{name}.{k}.damaged");
        }
        names.insert(aside.clone());
        let tmp = format!("{base}.salvage");
        let mut salvage_error = None;
        if !scan.frames.is_empty() {
            let r = (|| -> io::Result<()> {
                self.st.create(&tmp)?;
                for f in &scan.frames {
                    self.st
                        .append(&tmp, &data[f.offset as usize..f.end() as usize])?;
                }
                self.st.sync(&tmp)
            })();
            if let Err(e) = r {
                let _ = self.st.remove(&tmp);
                salvage_error = Some(e.to_string());
            }
        }
        self.st.rename(name, &aside).map_err(ioe("rename", name))?;
        self.st.sync_dir().map_err(ioe("fsync dir", ""))?;
        let kept = !scan.frames.is_empty() && salvage_error.is_none();
        if kept {
            self.st.rename(&tmp, base).map_err(ioe("rename", &tmp))?;
            self.st.sync_dir().map_err(ioe("fsync dir", ""))?;
        }
        Ok(DamagedSegment {
            segment: name.to_owned(),
            set_aside_as: aside,
            damage: scan.damage.clone(),
            frames_kept: if kept { scan.frames.len() as u64 } else { 0 },
            records_kept: if kept { scan.records() } else { 0 },
            salvage_error,
        })
    }

    // -----------------------------------------------------------------------------------
    // Writing

    /// Numbers the records (in order), serializes them, and writes them as one zstd frame to
    /// the active segment (after anything waiting in the backlog). Never panics and never
    /// fails: when the disk refuses, the batch waits in the memory backlog (bounded; the rest
    /// is dropped and counted) and the outcome says so.
    pub fn append<R: SpoolRecord>(&mut self, records: &mut [R], now: SystemTime) -> AppendOutcome {
        let mut out = AppendOutcome::default();
        // Older records first: retry the backlog.
        self.drain(now);
        let room = if self.queue_records == 0 {
            usize::MAX // one batch can always wait
        } else {
            self.cfg
                .memory_backlog_records
                .saturating_sub(self.queue_records)
        };
        let n_keep = records.len().min(room);
        if n_keep > 0 && !self.open_gaps.is_empty() {
            // Losses before this batch are stated before it.
            self.close_gaps(now);
        }
        let mut chunks: Vec<(Vec<u8>, u64, u64, u64)> = Vec::new(); // (json, first, last, n)
        let mut kept_seqs: Vec<u64> = Vec::new();
        let mut numbered = 0;
        for (i, r) in records.iter_mut().enumerate() {
            let seq = match self.alloc_seq() {
                Ok(s) => s,
                Err(e) => {
                    self.note_error(e);
                    break;
                }
            };
            numbered += 1;
            r.set_seq(seq);
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
            if i >= n_keep {
                out.dropped += 1;
                self.drop_records(Reason::BacklogFull, Some(seq), 1, line.len() as u64 + 1);
                continue;
            }
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
        for (json, first, last, n) in chunks {
            match self.compress(&json) {
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
    pub fn tick(&mut self, now: SystemTime) {
        self.drain(now);
        self.maintain(now);
    }

    /// Writes what waits in the backlog and fsyncs the active segment now (shutdown).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        let now = SystemTime::now();
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
        let now = SystemTime::now();
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
        if f.gap.is_none() {
            self.queue_records += f.records as usize;
        }
        self.queue_bytes += f.data.len() as u64;
        self.queue.push_back(f);
    }

    fn pop_queue(&mut self) -> Option<QFrame> {
        let f = self.queue.pop_front()?;
        if f.gap.is_none() {
            self.queue_records -= f.records as usize;
        }
        self.queue_bytes -= f.data.len() as u64;
        Some(f)
    }

    fn unpop_queue(&mut self, f: QFrame) {
        if f.gap.is_none() {
            self.queue_records += f.records as usize;
        }
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
    fn close_gaps(&mut self, now: SystemTime) {
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
                t: unix_ms(now),
                reason: &g.reason,
                lost_first_seq: g.lost_first_seq,
                lost_last_seq: g.lost_last_seq,
                lost_records: g.lost_records,
                lost_bytes: g.lost_bytes,
            };
            let mut json = serde_json::to_vec(&rec).unwrap_or_default();
            json.push(b'\n');
            warn!(
                "spool: lost {} records ({}, seq {:?}..={:?}); gap record seq {seq}",
                g.lost_records, g.reason, g.lost_first_seq, g.lost_last_seq
            );
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
    fn drain(&mut self, now: SystemTime) {
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
        if !self.stats.healthy && self.queue.is_empty() {
            info!("spool: writing works again");
        }
        self.stats.healthy = self.queue.is_empty();
        // Gap records are made durable at once, whatever the policy: they justify deletions.
        if (self.cfg.fsync == FsyncPolicy::Always || wrote_gap)
            && let Err(e) = self.sync_active()
        {
            self.note_error(e.to_string());
        }
    }

    /// Fsync when due, seal when old or big, retry cursor write and deletions.
    fn maintain(&mut self, now: SystemTime) {
        if let FsyncPolicy::Interval(d) = self.cfg.fsync {
            let due = self
                .active
                .as_ref()
                .and_then(|a| a.oldest_unsynced)
                .map(|t| now.duration_since(t).map(|e| e >= d).unwrap_or(false))
                .unwrap_or(false);
            if due && let Err(e) = self.sync_active() {
                self.note_error(e.to_string());
            }
        }
        if let Some(a) = &self.active {
            let old = now
                .duration_since(a.created)
                .map(|e| e >= self.cfg.segment_max_age)
                .unwrap_or(false);
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

    /// Makes sure the active segment exists and may be appended to.
    fn prepare_active(&mut self, first_seq: u64, now: SystemTime) -> io::Result<()> {
        if self.active.is_none() {
            let name = format!("{}.open", seg_name(first_seq));
            self.st.create(&name)?;
            self.active = Some(Active {
                name,
                first_seq,
                len: 0,
                synced_len: 0,
                synced: Counts::default(),
                unsynced: Vec::new(),
                created: now,
                oldest_unsynced: None,
                dir_synced: false,
                needs_truncate: false,
            });
        }
        let a = self.active.as_mut().expect("just made");
        if a.needs_truncate {
            self.st.truncate(&a.name, a.len)?;
            a.needs_truncate = false;
        }
        if !a.dir_synced && self.cfg.fsync != FsyncPolicy::Never {
            self.st.sync_dir()?;
            a.dir_synced = true;
        }
        Ok(())
    }

    /// Writes one frame; on failure puts it back at the head of the queue.
    fn write_frame(&mut self, f: QFrame, now: SystemTime) -> Result<(), String> {
        if let Err(e) = self.prepare_active(f.first_seq, now) {
            let name = self
                .active
                .as_ref()
                .map(|a| a.name.clone())
                .unwrap_or_default();
            self.unpop_queue(f);
            return Err(format!("write {name}: {e}"));
        }
        self.make_room(f.data.len() as u64);
        let a = self.active.as_mut().expect("prepared");
        if let Err(e) = self.st.append(&a.name, &f.data) {
            // Cut whatever part of the frame reached the file (retried before the next write).
            a.needs_truncate = true;
            if self.st.truncate(&a.name, a.len).is_ok() {
                a.needs_truncate = false;
            }
            let m = format!("write {}: {e}", a.name);
            self.unpop_queue(f);
            return Err(m);
        }
        a.len += f.data.len() as u64;
        a.oldest_unsynced.get_or_insert(now);
        self.stats.records_written += f.records;
        self.stats.frames_written += 1;
        self.stats.bytes_written += f.data.len() as u64;
        self.stats.json_bytes_written += f.raw;
        a.unsynced.push(f);
        if a.len >= self.cfg.segment_max_bytes
            && let Err(e) = self.seal_active()
        {
            self.note_error(e.to_string());
        }
        Ok(())
    }

    fn sync_active(&mut self) -> Result<(), SpoolError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        if a.unsynced.is_empty() && a.synced_len == a.len {
            return Ok(());
        }
        if a.needs_truncate {
            // Never make a partial frame durable: cut it first.
            self.st
                .truncate(&a.name, a.len)
                .map_err(ioe("truncate", &a.name))?;
            a.needs_truncate = false;
        }
        match self.st.sync(&a.name) {
            Ok(()) => {
                self.stats.fsyncs += 1;
                let frames = std::mem::take(&mut a.unsynced);
                for f in &frames {
                    a.synced.frames += 1;
                    a.synced.records += f.records;
                    a.synced.last_seq = Some(f.last_seq);
                }
                a.synced_len = a.len;
                a.oldest_unsynced = None;
                if !a.dir_synced && self.st.sync_dir().is_ok() {
                    a.dir_synced = true;
                }
                let mut gap_durable = false;
                if a.dir_synced {
                    self.durable_seq = a.synced.last_seq.or(self.durable_seq);
                    // spool_full losses now stated durably: the cursor need not keep them.
                    for g in frames.iter().filter_map(|f| f.gap.as_ref()) {
                        if let Some(i) = self.cursor.pending_gaps.iter().position(|n| n == g) {
                            self.cursor.pending_gaps.remove(i);
                            gap_durable = true;
                        }
                    }
                }
                if gap_durable {
                    self.cursor_dirty = true;
                    let c = self.cursor.clone();
                    match write_cursor(&mut self.st, &c) {
                        Ok(()) => self.cursor_dirty = false,
                        Err(e) => self.note_error(e.to_string()),
                    }
                }
                Ok(())
            }
            Err(e) => {
                // What was written since the last fsync may be lost (and a later fsync may not
                // say so): cut it and write it again from memory.
                let name = a.name.clone();
                let frames = std::mem::take(&mut a.unsynced);
                a.len = a.synced_len;
                a.oldest_unsynced = None;
                a.needs_truncate = true;
                if self.st.truncate(&a.name, a.len).is_ok() {
                    a.needs_truncate = false;
                }
                for f in frames.into_iter().rev() {
                    self.stats.records_written -= f.records;
                    self.stats.frames_written -= 1;
                    self.stats.bytes_written -= f.data.len() as u64;
                    self.stats.json_bytes_written -= f.raw;
                    self.unpop_queue(f);
                }
                self.stats.healthy = false;
                Err(SpoolError::Io {
                    op: "fsync",
                    name,
                    source: e,
                })
            }
        }
    }

    fn seal_active(&mut self) -> Result<(), SpoolError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        if a.needs_truncate {
            self.st
                .truncate(&a.name, a.len)
                .map_err(ioe("truncate", &a.name))?;
            a.needs_truncate = false;
        }
        if a.len == 0 {
            let name = a.name.clone();
            self.active = None;
            self.st.remove(&name).map_err(ioe("remove", &name))?;
            return Ok(());
        }
        self.sync_active()?;
        let a = self.active.as_mut().expect("still active");
        if a.len == 0 {
            return Ok(()); // the failed fsync path emptied it; nothing to seal
        }
        let sealed = a.sealed_name();
        self.st
            .rename(&a.name, &sealed)
            .map_err(ioe("rename", &a.name))?;
        let a = self.active.take().expect("still active");
        let c = a.counts();
        self.sealed.push_back(SegMeta {
            name: sealed,
            first_seq: a.first_seq,
            last_seq: c.last_seq.unwrap_or(a.first_seq),
            records: c.records,
            frames: c.frames,
            bytes: a.len,
        });
        self.max_sealed_seq = c.last_seq.or(self.max_sealed_seq);
        self.st.sync_dir().map_err(ioe("fsync dir", ""))?;
        self.durable_seq = c.last_seq.or(self.durable_seq);
        Ok(())
    }

    /// Enforces `total_max_bytes` before `incoming` more bytes are written: deletes the oldest
    /// sealed segments (never the active one). The loss is first noted durably in the cursor
    /// file, then the segments are deleted, then a gap record states it.
    fn make_room(&mut self, incoming: u64) {
        let active = self.active.as_ref().map(|a| a.len).unwrap_or(0);
        let total: u64 = self.sealed.iter().map(|s| s.bytes).sum::<u64>() + active;
        if total + incoming <= self.cfg.total_max_bytes {
            return;
        }
        let acked = self.cursor.acked_seq;
        let mut freed = 0;
        let mut n = 0;
        let mut note = GapNote {
            reason: Reason::SpoolFull.as_str().into(),
            lost_first_seq: None,
            lost_last_seq: None,
            lost_records: 0,
            lost_bytes: 0,
            victims: Vec::new(),
        };
        for s in &self.sealed {
            if total - freed + incoming <= self.cfg.total_max_bytes {
                break;
            }
            freed += s.bytes;
            n += 1;
            note.victims.push(s.name.clone());
            if acked.is_some_and(|a| s.last_seq <= a) {
                continue; // acknowledged already, not a loss
            }
            let (first, records, bytes) = match acked {
                Some(a) if s.first_seq <= a => self.unacked_part(s, a),
                _ => (s.first_seq, s.records, s.bytes),
            };
            note.lost_first_seq.get_or_insert(first);
            note.lost_last_seq = Some(s.last_seq);
            note.lost_records += records;
            note.lost_bytes += bytes;
        }
        if n == 0 {
            return; // nothing sealed to drop: the cap is exceeded by the active segment alone
        }
        let lost = note.lost_records > 0;
        if lost {
            self.cursor.pending_gaps.push(note.clone());
            let c = self.cursor.clone();
            if let Err(e) = write_cursor(&mut self.st, &c) {
                self.cursor.pending_gaps.pop();
                self.note_error(format!("cannot drop old segments under the size cap: {e}"));
                return;
            }
        }
        for _ in 0..n {
            let s = self.sealed.pop_front().expect("counted");
            if let Err(e) = self.st.remove(&s.name)
                && e.kind() != io::ErrorKind::NotFound
            {
                self.note_error(format!("remove {}: {e}", s.name));
            }
        }
        if lost {
            let d = self.stats.dropped.get(Reason::SpoolFull);
            d.records += note.lost_records;
            d.bytes += note.lost_bytes;
            self.open_gaps.push(note);
        }
    }

    /// First unacknowledged seq, records and bytes of a partly acknowledged segment.
    fn unacked_part(&self, s: &SegMeta, acked: u64) -> (u64, u64, u64) {
        let fallback = (acked + 1, s.records, s.bytes);
        let Ok(data) = self.st.read(&s.name) else {
            return fallback;
        };
        let Ok(mut dctx) = zstd::bulk::Decompressor::new() else {
            return fallback;
        };
        let scan = frame::scan(&mut dctx, &data, None, |_, _| {});
        let rest: Vec<_> = scan.frames.iter().filter(|f| f.last_seq > acked).collect();
        match rest.first() {
            Some(f) => (
                f.first_seq,
                rest.iter().map(|f| f.records).sum(),
                rest.iter().map(|f| f.len).sum(),
            ),
            None => fallback,
        }
    }

    fn delete_acked(&mut self) {
        let Some(acked) = self.cursor.acked_seq else {
            return;
        };
        while let Some(s) = self.sealed.front() {
            if s.last_seq > acked {
                break;
            }
            match self.st.remove(&s.name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    let m = format!("remove {}: {e}", s.name);
                    self.note_error(m);
                    return;
                }
            }
            self.sealed.pop_front();
        }
    }

    // -----------------------------------------------------------------------------------
    // Upload

    /// Sealed segments not yet fully acknowledged, oldest first.
    pub fn pending(&self) -> Vec<SegmentInfo> {
        let acked = self.cursor.acked_seq;
        self.sealed
            .iter()
            .filter(|s| acked.is_none_or(|a| s.last_seq > a))
            .map(|s| SegmentInfo {
                name: s.name.clone(),
                first_seq: s.first_seq,
                last_seq: s.last_seq,
                records: s.records,
                frames: s.frames,
                bytes: s.bytes,
            })
            .collect()
    }

    /// Upload bodies, oldest first: the frames of the pending sealed segments after the
    /// acknowledged cursor, in bodies of at most `max_body` bytes that never span two
    /// segments (a single frame larger than `max_body` goes alone, with `oversize`).
    /// To bound memory, one call returns whole segments up to [`BODIES_BUDGET`] bytes (at
    /// least one segment): acknowledge them and call again until it returns nothing. Every
    /// frame is checked (checksum, records, seq order) before it goes out; damaged regions
    /// are skipped (and logged), and a segment with nothing good after the cursor is passed
    /// over.
    pub fn bodies(&self, max_body: u64) -> Result<Vec<Body>, SpoolError> {
        let acked = self.cursor.acked_seq;
        let mut dctx = zstd::bulk::Decompressor::new().map_err(ioe("zstd init", ""))?;
        let mut out = Vec::new();
        let mut total = 0u64;
        for seg in self
            .sealed
            .iter()
            .filter(|s| acked.is_none_or(|a| s.last_seq > a))
        {
            if total > 0 && total + seg.bytes > BODIES_BUDGET {
                break;
            }
            let b = self.segment_bodies(&mut dctx, seg, acked, max_body)?;
            if b.is_empty() {
                warn!(
                    "spool: {} has no good frame after the acknowledged seq {acked:?}; passed over",
                    seg.name
                );
            }
            total += b.iter().map(|b| b.data.len() as u64).sum::<u64>();
            out.extend(b);
        }
        Ok(out)
    }

    fn segment_bodies(
        &self,
        dctx: &mut zstd::bulk::Decompressor<'static>,
        seg: &SegMeta,
        acked: Option<u64>,
        max_body: u64,
    ) -> Result<Vec<Body>, SpoolError> {
        let data = self.st.read(&seg.name).map_err(ioe("read", &seg.name))?;
        let scan = frame::scan(dctx, &data, None, |_, _| {});
        for d in &scan.damage {
            warn!(
                "spool: {} has damage at offset {} ({} bytes): {}; skipped",
                seg.name, d.offset, d.len, d.reason
            );
        }
        let mut out: Vec<Body> = Vec::new();
        let mut cur: Option<Body> = None;
        for f in scan
            .frames
            .iter()
            .filter(|f| acked.is_none_or(|a| f.last_seq > a))
        {
            let bytes = &data[f.offset as usize..f.end() as usize];
            if let Some(b) = cur.as_mut() {
                if b.data.len() as u64 + f.len <= max_body {
                    b.data.extend_from_slice(bytes);
                    b.last_seq = f.last_seq;
                    b.records += f.records;
                    b.frames += 1;
                    b.pos.offset = f.end();
                    b.pos.last_seq = f.last_seq;
                    continue;
                }
                out.push(cur.take().expect("some"));
            }
            cur = Some(Body {
                segment: seg.name.clone(),
                data: bytes.to_vec(),
                first_seq: f.first_seq,
                last_seq: f.last_seq,
                records: f.records,
                frames: 1,
                oversize: f.len > max_body,
                pos: CursorPos {
                    segment: seg.name.clone(),
                    offset: f.end(),
                    last_seq: f.last_seq,
                },
            });
        }
        out.extend(cur);
        Ok(out)
    }

    /// Durably records that the server has everything up to `pos` (cursor file: temp, fsync,
    /// rename, fsync dir), then deletes the segments that are now entirely acknowledged.
    /// Acknowledging an older position again is a no-op. If the cursor file cannot be
    /// written, the acknowledgment still holds in memory (and `tick` retries the file), the
    /// entirely acknowledged segments are still deleted, and the error is returned: after a
    /// crash before the retry succeeds, some acknowledged records may be uploaded again.
    pub fn acknowledge(&mut self, pos: CursorPos) -> Result<(), SpoolError> {
        if self.cursor.acked_seq.is_some_and(|a| pos.last_seq <= a) {
            return Ok(());
        }
        let newest = self.max_sealed_seq;
        if newest.is_none_or(|n| pos.last_seq > n) {
            return Err(SpoolError::Cursor(format!(
                "seq {} ({} at {}) is not in a sealed segment (newest sealed seq: {newest:?})",
                pos.last_seq, pos.segment, pos.offset
            )));
        }
        if let Some(s) = self.sealed.iter().find(|s| s.name == pos.segment)
            && (pos.last_seq < s.first_seq || pos.last_seq > s.last_seq || pos.offset > s.bytes)
        {
            return Err(SpoolError::Cursor(format!(
                "seq {} at offset {} is not inside {} (seq {}..={}, {} bytes)",
                pos.last_seq, pos.offset, s.name, s.first_seq, s.last_seq, s.bytes
            )));
        }
        let mut c = self.cursor.clone();
        c.v = 1;
        c.acked_seq = Some(pos.last_seq);
        c.segment = Some(pos.segment);
        c.offset = pos.offset;
        let r = write_cursor(&mut self.st, &c);
        // Kept in memory either way (`tick` retries the file). Deleting what the server has
        // loses nothing even if the cursor file is behind, and frees space on a full disk
        // (where the cursor's temp file may not fit until something is deleted).
        self.cursor = c;
        self.cursor_dirty = r.is_err();
        if let Err(e) = &r {
            self.note_error(e.to_string());
        }
        self.delete_acked();
        r
    }

    pub fn stats(&self) -> SpoolStats {
        let mut s = self.stats.clone();
        let active = self.active.as_ref().map(|a| a.len).unwrap_or(0);
        s.bytes_on_disk = self.sealed.iter().map(|s| s.bytes).sum::<u64>() + active;
        s.segments = self.sealed.len();
        s.pending_segments = self.pending().len();
        s.active_segment = self.active.as_ref().map(|a| a.name.clone());
        s.active_bytes = active;
        s.backlog_records = self.queue.iter().map(|f| f.records).sum();
        s.backlog_bytes = self.queue_bytes;
        s.acked_seq = self.cursor.acked_seq;
        s.durable_seq = self.durable_seq;
        s.fs_available_bytes = self.st.available().ok();
        s
    }

    pub fn config(&self) -> &SpoolConfig {
        &self.cfg
    }
}

// ---------------------------------------------------------------------------------------
// Reading without the agent

/// Prints every record of every segment (acknowledged ones still present included), oldest
/// first, as JSON lines. Damaged regions are skipped and reported. Changes nothing.
pub fn cat(dir: &Path, out: &mut impl Write) -> Result<CatReport, SpoolError> {
    let st = FsStorage::open_read_only(dir).map_err(ioe("open", &dir.display().to_string()))?;
    cat_storage(&st, out)
}

/// [`cat`] on any storage.
pub fn cat_storage<S: Storage>(st: &S, out: &mut impl Write) -> Result<CatReport, SpoolError> {
    let mut rep = CatReport::default();
    let mut dctx = zstd::bulk::Decompressor::new().map_err(ioe("zstd init", ""))?;
    let mut prev = None;
    let mut werr: Option<io::Error> = None;
    for name in segment_names(st)? {
        let data = match st.read(&name) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // sealed or deleted meanwhile
            Err(e) => {
                return Err(SpoolError::Io {
                    op: "read",
                    name,
                    source: e,
                });
            }
        };
        let scan = frame::scan(&mut dctx, &data, prev, |_, content| {
            if werr.is_none()
                && let Err(e) = out.write_all(content)
            {
                werr = Some(e);
            }
        });
        if let Some(e) = werr {
            return Err(SpoolError::Io {
                op: "write",
                name: "output".into(),
                source: e,
            });
        }
        rep.segments += 1;
        rep.frames += scan.frames.len() as u64;
        rep.records += scan.records();
        if let Some(f) = scan.frames.first() {
            rep.first_seq.get_or_insert(f.first_seq);
        }
        if let Some(l) = scan.last_seq() {
            rep.last_seq = Some(l);
            prev = Some(l);
        }
        rep.damage
            .extend(scan.damage.into_iter().map(|d| (name.clone(), d)));
    }
    Ok(rep)
}

/// Segment files in write order (sealed and open; not set aside, not transient).
fn segment_names<S: Storage>(st: &S) -> Result<Vec<String>, SpoolError> {
    let mut v: Vec<(u64, SegKind, String)> = st
        .list()
        .map_err(ioe("list", ""))?
        .into_iter()
        .filter_map(|(n, _)| {
            parse_seg(&n)
                .filter(|(_, k)| *k != SegKind::Salvage)
                .map(|(s, k)| (s, k, n))
        })
        .collect();
    v.sort();
    Ok(v.into_iter().map(|(_, _, n)| n).collect())
}

/// Checks every frame of every segment and the cursor file. Changes nothing.
pub fn verify(dir: &Path) -> Result<VerifyReport, SpoolError> {
    let st = FsStorage::open_read_only(dir).map_err(ioe("open", &dir.display().to_string()))?;
    verify_storage(&st)
}

/// [`verify`] on any storage.
pub fn verify_storage<S: Storage>(st: &S) -> Result<VerifyReport, SpoolError> {
    let mut rep = VerifyReport::default();
    let mut dctx = zstd::bulk::Decompressor::new().map_err(ioe("zstd init", ""))?;
    let names = segment_names(st)?;
    let mut prev = None;
    let n = names.len();
    for (i, name) in names.into_iter().enumerate() {
        let data = match st.read(&name) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(SpoolError::Io {
                    op: "read",
                    name,
                    source: e,
                });
            }
        };
        let scan = frame::scan(&mut dctx, &data, prev, |_, _| {});
        let torn_tail = i + 1 == n
            && name.ends_with(".open")
            && !scan.damage.is_empty()
            && !scan.good_after_damage();
        if let Some(l) = scan.last_seq() {
            prev = Some(l);
        }
        rep.segments.push(SegmentCheck {
            open: name.ends_with(".open"),
            bytes: data.len() as u64,
            frames: scan.frames.len() as u64,
            records: scan.records(),
            first_seq: scan.frames.first().map(|f| f.first_seq),
            last_seq: scan.last_seq(),
            damage: scan.damage,
            torn_tail,
            name,
        });
    }
    rep.set_aside = st
        .list()
        .map_err(ioe("list", ""))?
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".damaged"))
        .collect();
    let (c, problem) = read_cursor(st);
    rep.acked_seq = c.acked_seq;
    rep.cursor_problem = problem;
    rep.pending_gap_notes = c.pending_gaps.len();
    Ok(rep)
}
