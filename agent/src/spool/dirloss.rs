//! The spool directory removed or replaced while the agent runs (docs/spool.md, "The
//! directory removed at run time"). Noticed at the next `append`, `tick`, `seal` or `flush`
//! (one `lstat` of the path against the directory opened); then:
//! - what was in it and not acknowledged is lost, except the segment being written: its
//!   fsynced part is read back through the descriptor still open on it, its unsynced frames
//!   are in memory; both are written again (bounded by `memory_backlog_bytes`);
//! - the loss is stated in a `dir_lost` gap record, exactly: seq range, records, bytes;
//! - the directory is made again (0700, checked as at start) at once and at every call
//!   after until that works; records wait in the backlog meanwhile;
//! - each change is logged once.
use super::*;
use crate::safedir::DirStatus;

impl<S: Storage> Spool<S> {
    /// Called first by every public writing call: is the directory still ours?
    pub(super) fn check_dir(&mut self, now: Now) {
        if !self.dir_lost {
            match self.st.dir_status() {
                Ok(DirStatus::Same) => return,
                Ok(how) => self.lose_dir(how, now),
                // Cannot tell (the path's parent unreadable?): carry on with what is open.
                Err(_) => return,
            }
        }
        self.reattach_dir();
    }

    fn lose_dir(&mut self, how: DirStatus, now: Now) {
        self.dir_lost = true;
        self.stats.dir_lost += 1;
        self.stats.dir_missing = true;
        let mut note = GapNote {
            reason: Reason::DirLost.as_str().into(),
            lost_first_seq: None,
            lost_last_seq: None,
            lost_records: 0,
            lost_bytes: 0,
            victims: Vec::new(),
        };
        let mut lose = |first: u64, last: u64, records: u64, bytes: u64| {
            if records == 0 {
                return;
            }
            note.lost_first_seq = Some(note.lost_first_seq.map_or(first, |x| x.min(first)));
            note.lost_last_seq = Some(note.lost_last_seq.map_or(last, |x| x.max(last)));
            note.lost_records += records;
            note.lost_bytes += bytes;
        };
        // Sealed segments: gone, but for what the server acknowledged.
        let acked = self.cursor.acked_seq;
        for s in std::mem::take(&mut self.sealed) {
            if acked.is_some_and(|a| s.last_seq <= a) {
                continue;
            }
            let (first, records, bytes) = match (acked, s.unacked) {
                (Some(a), Some(u)) if s.first_seq <= a => u,
                _ => (s.first_seq, s.records, s.bytes),
            };
            lose(first, s.last_seq, records, bytes);
        }
        // The segment being written: read back what was fsynced (the descriptor outlives
        // the name), take the rest from memory.
        let mut kept: Vec<QFrame> = Vec::new();
        if let Some(a) = self.active.take() {
            if a.synced_len > 0 {
                let held = self.st.read_held(&a.name).ok();
                let mut got = 0u64;
                if let Some(data) = held.filter(|d| d.len() as u64 >= a.synced_len) {
                    let data = &data[..a.synced_len as usize];
                    let mut dctx = zstd::bulk::Decompressor::new().ok();
                    if let Some(dctx) = dctx.as_mut() {
                        frame::scan(dctx, data, None, |m, content| {
                            got += m.records;
                            kept.push(QFrame {
                                data: data[m.offset as usize..m.end() as usize].to_vec(),
                                raw: content.len() as u64,
                                first_seq: m.first_seq,
                                last_seq: m.last_seq,
                                records: m.records,
                                gap: None,
                            });
                        });
                    }
                }
                let kept_bytes: u64 = kept.iter().map(|f| f.data.len() as u64).sum();
                lose(
                    a.first_seq,
                    a.synced.last_seq.unwrap_or(a.first_seq),
                    a.synced.records.saturating_sub(got),
                    a.synced_len.saturating_sub(kept_bytes),
                );
            }
            kept.extend(a.unsynced);
        }
        // They are written again: count them once.
        for f in &kept {
            self.stats.records_written = self.stats.records_written.saturating_sub(f.records);
            self.stats.frames_written = self.stats.frames_written.saturating_sub(1);
            self.stats.bytes_written = self.stats.bytes_written.saturating_sub(f.data.len() as u64);
            self.stats.json_bytes_written = self.stats.json_bytes_written.saturating_sub(f.raw);
        }
        // Bounded like any backlog: the oldest of what was read back goes first.
        let room = self
            .cfg
            .memory_backlog_bytes
            .saturating_sub(self.queue_bytes);
        let mut total: u64 = kept.iter().map(|f| f.data.len() as u64).sum();
        let mut kept: VecDeque<QFrame> = kept.into();
        while total > room
            && let Some(f) = kept.pop_front()
        {
            total -= f.data.len() as u64;
            lose(f.first_seq, f.last_seq, f.records, f.data.len() as u64);
        }
        let kept_records: u64 = kept.iter().map(|f| f.records).sum();
        for f in kept.into_iter().rev() {
            self.unpop_queue(f);
        }
        let what = match how {
            DirStatus::Gone => "was removed",
            _ => "was replaced by something else",
        };
        let dir = self.cfg.dir.display();
        if note.lost_records > 0 {
            warn!(
                "spool: directory {dir} {what} while the agent ran: {} records not yet acknowledged \
                 were in it and are lost (seq {}..={}, {} bytes; a dir_lost gap record says so); \
                 {kept_records} records of the segment being written are kept and written again",
                note.lost_records,
                note.lost_first_seq.unwrap_or(0),
                note.lost_last_seq.unwrap_or(0),
                note.lost_bytes,
            );
            let d = self.stats.dropped.get(Reason::DirLost);
            d.records += note.lost_records;
            d.bytes += note.lost_bytes;
            self.open_gaps.push(note);
            // Stated now, queued behind what was kept (so `take_gap_lines` has it at once,
            // and it is written as soon as the directory is back).
            self.close_gaps(now);
        } else {
            warn!(
                "spool: directory {dir} {what} while the agent ran; nothing unacknowledged was lost \
                 ({kept_records} records of the segment being written are kept and written again)"
            );
        }
        // The cursor file went with it: write it again in the new directory.
        self.cursor_dirty = true;
    }

    /// Makes the directory again (or takes the one now at the path, if it passes the checks
    /// of the start). Logs the outcome once per change.
    fn reattach_dir(&mut self) {
        let dir = self.cfg.dir.display().to_string();
        match self.st.reattach() {
            Ok(()) => {
                self.dir_lost = false;
                self.dir_error = None;
                self.stats.dir_missing = false;
                info!("spool: directory {dir} is there again; writing resumes in a new segment");
            }
            Err(e) => {
                let m = format!(
                    "directory {dir} is gone and cannot be made again ({e}); records wait in memory \
                     (up to memory_backlog_bytes = {})",
                    self.cfg.memory_backlog_bytes
                );
                if self.dir_error.as_deref() != Some(m.as_str()) {
                    warn!("spool: {m}");
                    self.dir_error = Some(m.clone());
                }
                self.stats.errors += 1;
                self.stats.last_error = Some(m);
                self.stats.healthy = false;
            }
        }
    }
}
