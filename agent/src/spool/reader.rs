//! The read path: pending segments, upload bodies, acknowledgements, stats, and the
//! offline readers (`sockacct spool cat | verify`).
use super::*;

impl<S: Storage> Spool<S> {
    /// First unacknowledged seq, records and bytes of a partly acknowledged segment.
    pub(super) fn unacked_part(&self, s: &SegMeta, acked: u64) -> (u64, u64, u64) {
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

    pub(super) fn delete_acked(&mut self) {
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

    pub(super) fn segment_bodies(
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
                agent: self.id.agent.clone(),
                boot: self.id.boot.clone(),
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
        // A partly acknowledged segment: remember what is left of it (read now, while the
        // file is surely there).
        if let Some(i) = self
            .sealed
            .iter()
            .position(|s| s.first_seq <= pos.last_seq && pos.last_seq < s.last_seq)
        {
            let part = self.unacked_part(&self.sealed[i], pos.last_seq);
            self.sealed[i].unacked = Some(part);
        }
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
        s.backlog_max_bytes = self.cfg.memory_backlog_bytes;
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
pub(super) fn segment_names<S: Storage>(st: &S) -> Result<Vec<String>, SpoolError> {
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
