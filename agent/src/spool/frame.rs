//! Frames: one zstd frame (content size + content checksum) per written batch of JSON lines,
//! and the scanner that finds, checks and decodes them.
use serde::Deserialize;
use zstd::zstd_safe;

/// Little-endian zstd frame magic number 0xFD2FB528.
pub(crate) const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// Largest decoded frame we accept (a batch is split into frames well below this).
pub(crate) const MAX_FRAME_CONTENT: u64 = 64 << 20;
/// Batches are split into frames of at most this many bytes of JSON.
pub(crate) const MAX_FRAME_RAW: usize = 4 << 20;
/// zstd level: the default. At one small event per frame the level hardly matters.
pub(crate) const LEVEL: i32 = 3;

pub(crate) fn compressor() -> std::io::Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::new(LEVEL)?;
    c.set_parameter(zstd_safe::CParameter::ChecksumFlag(true))?;
    c.set_parameter(zstd_safe::CParameter::ContentSizeFlag(true))?;
    c.set_parameter(zstd_safe::CParameter::DictIdFlag(false))?;
    Ok(c)
}

/// One good frame found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FrameMeta {
    pub offset: u64,
    pub len: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
}

impl FrameMeta {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A region of a segment that holds no good frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub len: u64,
    pub reason: String,
}

/// A gap record seen while scanning (to match gaps the cursor file says may be missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GapSeen {
    pub reason: String,
    pub lost_first_seq: Option<u64>,
    pub lost_last_seq: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub frames: Vec<FrameMeta>,
    pub damage: Vec<Damage>,
    pub gaps: Vec<GapSeen>,
}

impl Scan {
    pub fn records(&self) -> u64 {
        self.frames.iter().map(|f| f.records).sum()
    }
    pub fn last_seq(&self) -> Option<u64> {
        self.frames.last().map(|f| f.last_seq)
    }
    /// Offset of the end of the last good frame before any damage.
    pub fn good_prefix(&self) -> u64 {
        let first_damage = self.damage.first().map(|d| d.offset).unwrap_or(u64::MAX);
        self.frames
            .iter()
            .filter(|f| f.offset < first_damage)
            .map(|f| f.end())
            .max()
            .unwrap_or(0)
    }
    /// Is there a good frame after the first damaged region?
    pub fn good_after_damage(&self) -> bool {
        match self.damage.first() {
            Some(d) => self.frames.iter().any(|f| f.offset > d.offset),
            None => false,
        }
    }
}

#[derive(Deserialize)]
struct Probe {
    seq: u64,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    lost_first_seq: Option<u64>,
    #[serde(default)]
    lost_last_seq: Option<u64>,
}

#[derive(Debug)]
pub(crate) struct Decoded {
    pub len: u64,
    pub content: Vec<u8>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
}

/// Checks and decodes the frame at the start of `data`. A frame is good when: it has the zstd
/// magic, declares its content size and a content checksum and no dictionary, is complete,
/// decodes (the checksum verified), and holds one or more newline-terminated JSON objects
/// each with an integer `seq`, strictly increasing and above `prev_seq`.
pub(crate) fn decode_frame(
    dctx: &mut zstd::bulk::Decompressor<'static>,
    data: &[u8],
    prev_seq: Option<u64>,
    gaps: Option<&mut Vec<GapSeen>>,
) -> Result<Decoded, String> {
    if data.len() < 4 || data[..4] != MAGIC {
        return Err(if data.len() < 4 && MAGIC.starts_with(data) {
            "incomplete frame header"
        } else {
            "no zstd frame magic"
        }
        .into());
    }
    if data.len() < 6 {
        return Err("incomplete frame header".into());
    }
    let fhd = data[4];
    if fhd & 0x04 == 0 {
        return Err("frame without content checksum".into());
    }
    if fhd & 0x03 != 0 {
        return Err("frame with a dictionary id".into());
    }
    if fhd & 0x08 != 0 {
        return Err("reserved bit set in frame header".into());
    }
    let size = match zstd_safe::get_frame_content_size(data) {
        Ok(Some(s)) => s,
        Ok(None) => return Err("frame without content size".into()),
        Err(_) => return Err("incomplete or bad frame header".into()),
    };
    if size == 0 || size > MAX_FRAME_CONTENT {
        return Err(format!("implausible frame content size {size}"));
    }
    let len = match zstd_safe::find_frame_compressed_size(data) {
        Ok(n) if n <= data.len() => n,
        Ok(_) => return Err("incomplete frame".into()),
        Err(code) => {
            return Err(format!(
                "incomplete or bad frame: {}",
                zstd_safe::get_error_name(code)
            ));
        }
    };
    let content = dctx
        .decompress(&data[..len], size as usize)
        .map_err(|e| format!("frame does not decode: {e}"))?;
    if content.len() as u64 != size {
        return Err("frame content size mismatch".into());
    }
    if content.last() != Some(&b'\n') {
        return Err("frame content does not end with a newline".into());
    }
    let mut prev = prev_seq;
    let mut first = None;
    let mut records = 0u64;
    let mut gaps = gaps;
    for line in content[..content.len() - 1].split(|&b| b == b'\n') {
        let p: Probe = serde_json::from_slice(line).map_err(|e| {
            format!(
                "record {} is not a JSON record with a seq: {e}",
                records + 1
            )
        })?;
        if let Some(pr) = prev
            && p.seq <= pr
        {
            return Err(format!("seq {} does not follow {}", p.seq, pr));
        }
        if let (Some(g), Some(reason)) = (gaps.as_deref_mut(), p.reason) {
            g.push(GapSeen {
                reason,
                lost_first_seq: p.lost_first_seq,
                lost_last_seq: p.lost_last_seq,
            });
        }
        first.get_or_insert(p.seq);
        prev = Some(p.seq);
        records += 1;
    }
    Ok(Decoded {
        len: len as u64,
        content,
        first_seq: first.expect("at least one line"),
        last_seq: prev.expect("at least one line"),
        records,
    })
}

/// Scans a whole segment: every good frame in order, and the damaged regions between them.
/// After damage it resynchronises on the next offset where a good frame starts (a frame
/// must pass every check of [`decode_frame`], including seq order, to count). `each` gets
/// every good frame's metadata and decoded content.
pub(crate) fn scan(
    dctx: &mut zstd::bulk::Decompressor<'static>,
    data: &[u8],
    prev_seq: Option<u64>,
    mut each: impl FnMut(&FrameMeta, &[u8]),
) -> Scan {
    let mut out = Scan::default();
    let mut prev = prev_seq;
    let mut off = 0usize;
    while off < data.len() {
        match decode_frame(dctx, &data[off..], prev, Some(&mut out.gaps)) {
            Ok(d) => {
                let m = FrameMeta {
                    offset: off as u64,
                    len: d.len,
                    first_seq: d.first_seq,
                    last_seq: d.last_seq,
                    records: d.records,
                };
                each(&m, &d.content);
                prev = Some(d.last_seq);
                off += d.len as usize;
                out.frames.push(m);
            }
            Err(reason) => {
                // Resynchronise: the next magic at which a good frame starts.
                let mut next = None;
                let mut q = off + 1;
                while let Some(i) = find_magic(&data[q..]) {
                    let cand = q + i;
                    if decode_frame(dctx, &data[cand..], prev, None).is_ok() {
                        next = Some(cand);
                        break;
                    }
                    q = cand + 1;
                }
                let end = next.unwrap_or(data.len());
                out.damage.push(Damage {
                    offset: off as u64,
                    len: (end - off) as u64,
                    reason,
                });
                off = end;
            }
        }
    }
    out
}

fn find_magic(hay: &[u8]) -> Option<usize> {
    hay.windows(4).position(|w| w == MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(lines: &str) -> Vec<u8> {
        compressor().unwrap().compress(lines.as_bytes()).unwrap()
    }

    #[test]
    fn spool_frame_checks() {
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let f = frame("{\"seq\":1}\n{\"seq\":2}\n");
        let ok = decode_frame(&mut d, &f, None, None).unwrap();
        assert_eq!(
            (ok.first_seq, ok.last_seq, ok.records, ok.len),
            (1, 2, 2, f.len() as u64)
        );
        assert!(
            decode_frame(&mut d, &f, Some(1), None)
                .unwrap_err()
                .contains("does not follow")
        );
        for cut in 0..f.len() {
            assert!(
                decode_frame(&mut d, &f[..cut], None, None).is_err(),
                "cut {cut}"
            );
        }
        let mut accepted = 0;
        for i in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                // A flip is either refused or harmless (e.g. the header's unused bit): never
                // different content.
                if let Ok(x) = decode_frame(&mut d, &g, None, None) {
                    assert_eq!(
                        x.content, b"{\"seq\":1}\n{\"seq\":2}\n",
                        "flip at {i} bit {bit}"
                    );
                    accepted += 1;
                }
            }
        }
        assert!(accepted <= 8, "{accepted} harmless flips");
        // Without checksum: refused.
        let plain = zstd::bulk::compress(b"{\"seq\":1}\n", 3).unwrap();
        assert!(
            decode_frame(&mut d, &plain, None, None)
                .unwrap_err()
                .contains("checksum")
        );
        // Not JSON / no newline.
        assert!(decode_frame(&mut d, &frame("{\"seq\":1}"), None, None).is_err());
        assert!(decode_frame(&mut d, &frame("hello\n"), None, None).is_err());
        // Scan with damage in the middle resynchronises.
        let mut data = frame("{\"seq\":1}\n");
        data.extend_from_slice(b"garbage");
        data.extend_from_slice(&frame("{\"seq\":5}\n"));
        let s = scan(&mut d, &data, None, |_, _| {});
        assert_eq!(s.frames.len(), 2);
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.damage[0].len, 7);
        assert!(s.good_after_damage());
    }
}
