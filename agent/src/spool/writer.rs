//! The write path: the active segment, frames, fsync, sealing, making room under the cap.
use super::*;

impl<S: Storage> Spool<S> {
    /// Makes sure the active segment exists and may be appended to.
    pub(super) fn prepare_active(&mut self, first_seq: u64, now: Now) -> io::Result<()> {
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
                created: now.mono,
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
    pub(super) fn write_frame(&mut self, f: QFrame, now: Now) -> Result<(), String> {
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
        a.oldest_unsynced.get_or_insert(now.mono);
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

    pub(super) fn sync_active(&mut self) -> Result<(), SpoolError> {
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

    pub(super) fn seal_active(&mut self) -> Result<(), SpoolError> {
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
            unacked: None,
        });
        self.max_sealed_seq = c.last_seq.or(self.max_sealed_seq);
        self.st.sync_dir().map_err(ioe("fsync dir", ""))?;
        self.durable_seq = c.last_seq.or(self.durable_seq);
        Ok(())
    }

    /// Enforces `total_max_bytes` before `incoming` more bytes are written: deletes the oldest
    /// sealed segments (never the active one). The loss is first noted durably in the cursor
    /// file, then the segments are deleted, then a gap record states it.
    pub(super) fn make_room(&mut self, incoming: u64) {
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
}
