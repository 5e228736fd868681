//! What recovery, `cat` and `verify` report.
use super::*;

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
