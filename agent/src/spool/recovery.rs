//! Recovery at open: cut torn tails, set damaged segments aside (salvaging their good
//! frames), reconcile the cursor and the sequence numbers.
use super::*;

impl<S: Storage> Spool<S> {
    pub(super) fn recover(&mut self) -> Result<RecoveryReport, SpoolError> {
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
            // Partly acknowledged: what is left, from the frames just scanned.
            let unacked = self
                .cursor
                .acked_seq
                .filter(|a| *a >= first_seq && *a < last_seq)
                .and_then(|a| {
                    let rest: Vec<_> = scan.frames.iter().filter(|f| f.last_seq > a).collect();
                    rest.first().map(|f| {
                        (
                            f.first_seq,
                            rest.iter().map(|f| f.records).sum(),
                            rest.iter().map(|f| f.len).sum(),
                        )
                    })
                });
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
                unacked,
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
    pub(super) fn salvage(
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
}
