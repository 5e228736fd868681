//! The delta event: one JSON object per line (format documented in docs/format.md).
use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read as _, Write as _},
    path::Path,
};

use crate::safedir::{DirStatus, SafeDir};

use agent_common::Counters;
use serde::{Deserialize, Serialize};

/// Format version of every record this agent writes.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes and packets each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub tx: u64,
    pub rx: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
}

impl Traffic {
    pub fn is_zero(&self) -> bool {
        *self == Traffic::default()
    }
    pub fn add(&mut self, o: &Traffic) {
        self.tx += o.tx;
        self.rx += o.rx;
        self.tx_packets += o.tx_packets;
        self.rx_packets += o.rx_packets;
    }
}

impl From<Counters> for Traffic {
    fn from(c: Counters) -> Self {
        Traffic {
            tx: c.tx_bytes,
            rx: c.rx_bytes,
            tx_packets: c.tx_packets,
            rx_packets: c.rx_packets,
        }
    }
}

/// One interval's movement. Conservation: sum(labels) + unattributed == total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaEvent {
    pub v: u32,
    #[serde(rename = "type")]
    pub kind: String,
    pub agent: String,
    pub boot: String,
    pub seq: u64,
    /// Interval start, Unix ms.
    pub t: u64,
    /// Interval length, ms.
    pub d: u64,
    pub labels: BTreeMap<String, Traffic>,
    pub unattributed: Traffic,
    pub total: Traffic,
    pub ifaces: BTreeMap<String, Traffic>,
}

impl DeltaEvent {
    /// Sum over labels plus unattributed.
    pub fn attributed_sum(&self) -> Traffic {
        let mut s = self.unattributed;
        for t in self.labels.values() {
            s.add(t);
        }
        s
    }
    pub fn conserves(&self) -> bool {
        self.attributed_sum() == self.total
    }

    /// Folds a later event into this one: the result covers both intervals (and the
    /// time between them). Used while logging is paused, so nothing counted is lost.
    pub fn absorb(&mut self, later: &DeltaEvent) {
        for (l, t) in &later.labels {
            self.labels.entry(l.clone()).or_default().add(t);
        }
        for (l, t) in &later.ifaces {
            self.ifaces.entry(l.clone()).or_default().add(t);
        }
        self.unattributed.add(&later.unattributed);
        self.total.add(&later.total);
        self.d = (later.t + later.d).saturating_sub(self.t);
    }
}

/// Who is writing: a stable agent id and this boot's id.
#[derive(Debug, Clone)]
pub struct Identity {
    pub agent: String,
    pub boot: String,
}

impl Identity {
    /// `agent` from the config if set, else the host's machine id, else the host name.
    pub fn detect(configured: Option<&str>) -> Identity {
        let agent = configured
            .map(str::to_owned)
            .or_else(|| read_trim("/etc/machine-id"))
            .or_else(|| read_trim("/proc/sys/kernel/hostname"))
            .unwrap_or_else(|| "unknown".into());
        let boot = read_trim("/proc/sys/kernel/random/boot_id").unwrap_or_else(|| "unknown".into());
        Identity { agent, boot }
    }
}

fn read_trim(p: &str) -> Option<String> {
    fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Hands out sequence numbers that are never reused, across restarts too: numbers are
/// reserved in blocks whose upper bound is written (and fsynced) to a state file before
/// any number of the block is used. A crash wastes at most one block; it never repeats.
///
/// The state file is reached through its directory's descriptor without following links
/// (a link planted at `seq` is refused, one at `seq.tmp` removed, never written through);
/// if the directory is removed while running, it is made again (0700) at the next block.
pub struct SeqAllocator {
    file: Option<SeqFile>,
    next: u64,
    reserved_until: u64,
}

struct SeqFile {
    dir: SafeDir,
    name: String,
}

const SEQ_BLOCK: u64 = 4096;

impl SeqAllocator {
    /// Persistent allocator whose state lives at `path` (its directory must exist).
    pub fn open(path: &Path) -> io::Result<SeqAllocator> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a file path", path.display()),
                )
            })?
            .to_owned();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = SafeDir::open(parent)?;
        let next = match dir.open_file(&name, libc::O_RDONLY, 0) {
            Ok(mut f) => {
                let mut s = String::new();
                f.read_to_string(&mut s)?;
                s.trim().parse::<u64>().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: not a sequence number: {:?} (delete the file only if no event was ever written)", path.display(), s.trim()),
                    )
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(SeqAllocator {
            file: Some(SeqFile { dir, name }),
            next,
            reserved_until: next,
        })
    }

    /// In-memory allocator starting at 0 (tests).
    pub fn ephemeral() -> SeqAllocator {
        SeqAllocator {
            file: None,
            next: 0,
            reserved_until: u64::MAX,
        }
    }

    pub fn next(&mut self) -> io::Result<u64> {
        if self.next >= self.reserved_until {
            let until = self.next + SEQ_BLOCK;
            if let Some(f) = &mut self.file {
                f.reserve(until)?;
            }
            self.reserved_until = until;
        }
        let s = self.next;
        self.next += 1;
        Ok(s)
    }
}

impl SeqFile {
    /// Writes the new upper bound durably: temp file, fsync, rename, fsync of the directory.
    fn reserve(&mut self, until: u64) -> io::Result<()> {
        let r = self.write(until);
        if r.is_ok() || self.dir.status().is_ok_and(|s| s == DirStatus::Same) {
            return r;
        }
        // The state directory was removed or replaced: make it again (checked as at start)
        // and write there. The bound in memory is what counts: nothing is handed out twice.
        let d = SafeDir::create(self.dir.path(), 0o700)?;
        d.check_trusted()?;
        log::warn!(
            "state directory {} was removed or replaced while running; made again",
            d.path().display()
        );
        self.dir = d;
        self.write(until)
    }

    fn write(&self, until: u64) -> io::Result<()> {
        let tmp = format!("{}.tmp", self.name);
        // Whatever is at the temp name (a leftover, or a planted link) goes; then a new file.
        match self.dir.remove(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f =
            self.dir
                .open_file(&tmp, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600)?;
        writeln!(f, "{until}")?;
        f.sync_all()?;
        self.dir.rename(&tmp, &self.name)?;
        self.dir.sync()
    }
}

/// A record with the envelope every record carries: (agent, boot, seq). The producers
/// (poller, flow table) leave it empty; it is stamped exactly once, where the record is
/// written: by the spool as it numbers records, or by the writer when there is no spool.
pub trait SpoolRecord: Serialize {
    fn stamp(&mut self, id: &Identity, seq: u64);
    /// One JSON object, no trailing newline, with the envelope last given to `stamp`.
    fn to_json_line(&self) -> Vec<u8> {
        // Records are plain structs and string-keyed maps: serializing cannot fail; an
        // empty line is refused by `append` (counted as invalid_record), never a panic.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl SpoolRecord for DeltaEvent {
    fn stamp(&mut self, id: &Identity, seq: u64) {
        self.agent.clone_from(&id.agent);
        self.boot.clone_from(&id.boot);
        self.seq = seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_never_repeats_across_reopen() {
        let dir = std::env::temp_dir().join(format!("sockacct-seq-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("seq");
        let _ = fs::remove_file(&p);
        let mut a = SeqAllocator::open(&p).unwrap();
        let first: Vec<u64> = (0..10).map(|_| a.next().unwrap()).collect();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        drop(a); // a crash: the rest of the block is skipped, never reused
        let mut b = SeqAllocator::open(&p).unwrap();
        assert_eq!(b.next().unwrap(), SEQ_BLOCK);
        fs::write(&p, "garbage").unwrap();
        let e = SeqAllocator::open(&p).err().unwrap().to_string();
        assert!(e.contains("not a sequence number"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seq_never_writes_through_a_link() {
        let dir = std::env::temp_dir().join(format!("sockacct-seqlink-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("state")).unwrap();
        let target = dir.join("root-only");
        fs::write(&target, "precious\n").unwrap();
        // A link at `seq`: refused, naming it.
        std::os::unix::fs::symlink(&target, dir.join("state/seq")).unwrap();
        let e = SeqAllocator::open(&dir.join("state/seq"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("symbolic link") && e.contains("state/seq"),
            "{e}"
        );
        fs::remove_file(dir.join("state/seq")).unwrap();
        // A link at the temp name: removed, never followed.
        std::os::unix::fs::symlink(&target, dir.join("state/seq.tmp")).unwrap();
        let mut a = SeqAllocator::open(&dir.join("state/seq")).unwrap();
        assert_eq!(a.next().unwrap(), 0);
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
        assert_eq!(fs::read_to_string(dir.join("state/seq")).unwrap(), "4096\n");
        // The directory removed while running: made again at the next block.
        for _ in 1..SEQ_BLOCK {
            a.next().unwrap();
        }
        fs::remove_dir_all(dir.join("state")).unwrap();
        assert_eq!(a.next().unwrap(), SEQ_BLOCK);
        assert_eq!(fs::read_to_string(dir.join("state/seq")).unwrap(), "8192\n");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn absorb_covers_both_intervals_and_conserves() {
        let t = |tx| Traffic {
            tx,
            rx: 1,
            tx_packets: 1,
            rx_packets: 1,
        };
        let ev = |t0, label: &str, tr: Traffic| DeltaEvent {
            v: 1,
            kind: "delta".into(),
            agent: "a".into(),
            boot: "b".into(),
            seq: 0,
            t: t0,
            d: 100,
            labels: [(label.to_string(), tr)].into_iter().collect(),
            unattributed: Traffic::default(),
            total: tr,
            ifaces: BTreeMap::new(),
        };
        let mut a = ev(1000, "x", t(5));
        a.absorb(&ev(1300, "x", t(7)));
        a.absorb(&ev(1400, "y", t(1)));
        assert_eq!((a.t, a.d), (1000, 500));
        assert_eq!(a.labels["x"].tx, 12);
        assert_eq!(a.labels["y"].tx, 1);
        assert!(a.conserves());
    }

    #[test]
    fn event_json_shape_and_conservation() {
        let mut labels = BTreeMap::new();
        labels.insert(
            "curl".to_string(),
            Traffic {
                tx: 100,
                rx: 50,
                tx_packets: 2,
                rx_packets: 1,
            },
        );
        let e = DeltaEvent {
            v: FORMAT_VERSION,
            kind: "delta".into(),
            agent: "a".into(),
            boot: "b".into(),
            seq: 7,
            t: 1000,
            d: 100,
            labels,
            unattributed: Traffic {
                tx: 0,
                rx: 60,
                tx_packets: 0,
                rx_packets: 1,
            },
            total: Traffic {
                tx: 100,
                rx: 110,
                tx_packets: 2,
                rx_packets: 2,
            },
            ifaces: BTreeMap::new(),
        };
        assert!(e.conserves());
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.starts_with(r#"{"v":1,"type":"delta","agent":"a","boot":"b","seq":7,"t":1000,"d":100,"labels":{"curl":{"tx":100"#), "{s}");
        let back: DeltaEvent = serde_json::from_str(&s).unwrap();
        assert_eq!(back, e);
        let mut bad = e.clone();
        bad.total.rx += 1;
        assert!(!bad.conserves());
    }
}
