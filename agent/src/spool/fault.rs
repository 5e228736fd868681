//! An in-memory [`Storage`] that fails and crashes on purpose, for tests.
//!
//! Model (stricter than ext4/xfs in practice, as it should be):
//! - a file's data is durable up to its last `sync`; after a crash a file holds its durable
//!   contents plus a random prefix of what was appended since (or, if it was truncated since,
//!   possibly its old durable contents: the truncation is lost too);
//! - `create`/`rename`/`remove` are durable after `sync_dir`; a crash keeps a random prefix of
//!   those done since;
//! - faults: ENOSPC when a capacity would be exceeded (the part that fits is written, as a
//!   short write does), EIO (or any errno) on the next N calls of an operation, a torn append
//!   (a prefix is written, then EIO), EROFS, and "kill": after N more mutating operations the
//!   process is considered dead: nothing reaches the storage any more, every call fails;
//! - the directory removed at run time ([`FaultStorage::lose_dir`]): every name is gone,
//!   calls by name fail with ENOENT, but files that were open (all of them, here) can still
//!   be appended to, synced and read back (as through an open descriptor), until `reattach`.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    sync::{Arc, Mutex, MutexGuard},
};

use super::storage::Storage;
use crate::safedir::DirStatus;

/// Which operation a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    Create,
    Append,
    Sync,
    Read,
    List,
    Rename,
    Remove,
    Truncate,
    SyncDir,
}

#[derive(Debug, Clone, Default)]
struct FileData {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Smallest length since the last sync (below `durable.len()` when truncated since).
    min_len: usize,
}

#[derive(Debug, Clone)]
enum NsOp {
    Create(String, u64),
    Rename(String, String),
    Remove(String),
}

#[derive(Debug)]
struct State {
    files: HashMap<u64, FileData>,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    ns_log: Vec<NsOp>,
    next_id: u64,
    rng: u64,
    capacity: Option<u64>,
    fail: HashMap<FaultOp, (usize, i32)>,
    tear_next: Option<usize>,
    read_only: bool,
    kill_after: Option<usize>,
    dead: bool,
    mutations: u64,
    /// The directory was removed: `names` is empty, the files it held live on in `orphans`.
    gone: bool,
    orphans: BTreeMap<String, u64>,
    /// The next `n` calls of `reattach` fail.
    reattach_fail: usize,
    reattaches: u64,
}

/// Cloneable handle: the test keeps one clone, the spool owns another.
#[derive(Clone, Debug)]
pub struct FaultStorage(Arc<Mutex<State>>);

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl State {
    fn rand(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.rand() % n }
    }
    fn used(&self) -> u64 {
        self.names
            .values()
            .filter_map(|id| self.files.get(id))
            .map(|f| f.data.len() as u64)
            .sum()
    }
    /// Common gate of every call: dead process, injected failures, read-only, kill countdown.
    fn gate(&mut self, op: FaultOp, mutating: bool) -> io::Result<()> {
        if self.dead {
            return Err(err(libc::EIO));
        }
        if let Some((n, code)) = self.fail.get_mut(&op)
            && *n > 0
        {
            *n -= 1;
            return Err(err(*code));
        }
        if mutating {
            if self.read_only {
                return Err(err(libc::EROFS));
            }
            if let Some(k) = self.kill_after.as_mut() {
                if *k == 0 {
                    self.dead = true;
                    return Err(err(libc::EIO));
                }
                *k -= 1;
            }
            self.mutations += 1;
        }
        Ok(())
    }
    fn id(&self, name: &str) -> io::Result<u64> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| err(libc::ENOENT))
    }
    /// A file by name, or one still open although its directory was removed.
    fn held_id(&self, name: &str) -> io::Result<u64> {
        self.id(name)
            .or_else(|e| self.orphans.get(name).copied().ok_or(e))
    }
    /// Calls that go through the directory fail once it was removed.
    fn by_path(&self) -> io::Result<()> {
        if self.gone {
            return Err(err(libc::ENOENT));
        }
        Ok(())
    }
}

impl FaultStorage {
    pub fn new(seed: u64) -> FaultStorage {
        FaultStorage(Arc::new(Mutex::new(State {
            files: HashMap::new(),
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            ns_log: Vec::new(),
            next_id: 1,
            rng: seed ^ 0x5EED_0F5A_CC7A_11E5,
            capacity: None,
            fail: HashMap::new(),
            tear_next: None,
            read_only: false,
            kill_after: None,
            dead: false,
            mutations: 0,
            gone: false,
            orphans: BTreeMap::new(),
            reattach_fail: 0,
            reattaches: 0,
        })))
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// ENOSPC once all files together would exceed `bytes` (None: unlimited).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.st().capacity = bytes;
    }
    /// ENOSPC after `bytes` more bytes.
    pub fn enospc_after(&self, bytes: u64) {
        let mut s = self.st();
        s.capacity = Some(s.used() + bytes);
    }
    /// The next `n` calls of `op` fail with `errno` (e.g. `libc::EIO`).
    pub fn fail_next(&self, op: FaultOp, n: usize, errno: i32) {
        self.st().fail.insert(op, (n, errno));
    }
    /// The next append writes only its first `keep` bytes, then fails with EIO.
    pub fn tear_next_append(&self, keep: usize) {
        self.st().tear_next = Some(keep);
    }
    pub fn set_read_only(&self, ro: bool) {
        self.st().read_only = ro;
    }
    /// After `n` more mutating operations the process "dies": every later call fails with EIO
    /// and changes nothing, until [`FaultStorage::crash`].
    pub fn kill_after(&self, n: usize) {
        self.st().kill_after = Some(n);
    }
    pub fn is_dead(&self) -> bool {
        self.st().dead
    }
    /// Mutating operations done so far.
    pub fn mutations(&self) -> u64 {
        self.st().mutations
    }
    /// Removes every injected fault (capacity, failures, tearing, read-only, kill).
    pub fn clear_faults(&self) {
        let mut s = self.st();
        s.capacity = None;
        s.fail.clear();
        s.tear_next = None;
        s.read_only = false;
        s.kill_after = None;
        s.dead = false;
    }
    /// The directory is removed (`rm -rf`) while the spool runs: see the module doc.
    pub fn lose_dir(&self) {
        let mut s = self.st();
        let names = std::mem::take(&mut s.names);
        s.orphans.extend(names);
        s.durable_names.clear();
        s.ns_log.clear();
        s.gone = true;
    }
    /// The next `n` calls of `reattach` fail (the directory cannot be made again).
    pub fn fail_reattach(&self, n: usize) {
        self.st().reattach_fail = n;
    }
    /// Successful `reattach` calls so far.
    pub fn reattaches(&self) -> u64 {
        self.st().reattaches
    }
    /// Power loss: keep what was durable plus random parts of what was not (see module doc).
    /// Clears every injected fault.
    pub fn crash(&self) {
        let mut s = self.st();
        // Namespace: a random prefix of the operations since the last sync_dir.
        let n = s.ns_log.len() as u64 + 1;
        let k = s.below(n) as usize;
        let log = std::mem::take(&mut s.ns_log);
        let mut names = s.durable_names.clone();
        for op in &log[..k] {
            match op {
                NsOp::Create(n, id) => {
                    names.insert(n.clone(), *id);
                }
                NsOp::Rename(a, b) => {
                    if let Some(id) = names.remove(a) {
                        names.insert(b.clone(), id);
                    }
                }
                NsOp::Remove(n) => {
                    names.remove(n);
                }
            }
        }
        // Data: durable + a random prefix of the rest.
        let ids: Vec<u64> = s.files.keys().copied().collect();
        for id in ids {
            let (min_len, len, truncated) = {
                let f = &s.files[&id];
                (f.min_len, f.data.len(), f.min_len < f.durable.len())
            };
            let lose_truncation = truncated && s.below(4) == 0;
            let span = (len - min_len) as u64 + 1;
            let keep = min_len + s.below(span) as usize;
            let f = s.files.get_mut(&id).expect("listed");
            if lose_truncation {
                f.data = f.durable.clone();
            } else {
                f.data.truncate(keep);
            }
            f.durable = f.data.clone();
            f.min_len = f.data.len();
        }
        let live: std::collections::HashSet<u64> = names.values().copied().collect();
        s.files.retain(|id, _| live.contains(id));
        s.names = names.clone();
        s.durable_names = names;
        s.capacity = None;
        s.fail.clear();
        s.tear_next = None;
        s.read_only = false;
        s.kill_after = None;
        s.dead = false;
        // A removed directory is made again by the next open.
        s.gone = false;
        s.orphans.clear();
    }

    /// Test access: current contents of a file.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let s = self.st();
        s.names.get(name).map(|id| s.files[id].data.clone())
    }
    /// Test access: replace a file's contents (durably), bypassing faults.
    pub fn put(&self, name: &str, data: &[u8]) {
        let mut s = self.st();
        let id = match s.names.get(name) {
            Some(id) => *id,
            None => {
                let id = s.next_id;
                s.next_id += 1;
                s.names.insert(name.to_owned(), id);
                s.durable_names.insert(name.to_owned(), id);
                id
            }
        };
        s.files.insert(
            id,
            FileData {
                data: data.to_vec(),
                durable: data.to_vec(),
                min_len: data.len(),
            },
        );
    }
    /// Test access: every file name.
    pub fn names(&self) -> Vec<String> {
        self.st().names.keys().cloned().collect()
    }
}

impl Storage for FaultStorage {
    fn create(&mut self, name: &str) -> io::Result<()> {
        let mut s = self.st();
        s.gate(FaultOp::Create, true)?;
        s.by_path()?;
        if let Some(id) = s.names.get(name).copied() {
            let f = s.files.get_mut(&id).expect("named file exists");
            f.data.clear();
            f.min_len = 0;
        } else {
            let id = s.next_id;
            s.next_id += 1;
            s.files.insert(id, FileData::default());
            s.names.insert(name.to_owned(), id);
            s.ns_log.push(NsOp::Create(name.to_owned(), id));
        }
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let mut s = self.st();
        s.gate(FaultOp::Append, true)?;
        let id = s.held_id(name)?;
        let mut n = data.len();
        let mut result = Ok(());
        if let Some(keep) = s.tear_next.take()
            && keep < n
        {
            n = keep;
            result = Err(err(libc::EIO));
        }
        if let Some(cap) = s.capacity {
            let free = cap.saturating_sub(s.used()) as usize;
            if free < n {
                n = free;
                result = Err(err(libc::ENOSPC));
            }
        }
        s.files
            .get_mut(&id)
            .expect("named file exists")
            .data
            .extend_from_slice(&data[..n]);
        result
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        let mut s = self.st();
        s.gate(FaultOp::Sync, true)?;
        let id = s.held_id(name)?;
        let f = s.files.get_mut(&id).expect("named file exists");
        f.durable = f.data.clone();
        f.min_len = f.data.len();
        Ok(())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut s = self.st();
        s.gate(FaultOp::Read, false)?;
        s.by_path()?;
        let id = s.id(name)?;
        Ok(s.files[&id].data.clone())
    }

    fn list(&self) -> io::Result<Vec<(String, u64)>> {
        let mut s = self.st();
        s.gate(FaultOp::List, false)?;
        s.by_path()?;
        Ok(s.names
            .iter()
            .map(|(n, id)| (n.clone(), s.files[id].data.len() as u64))
            .collect())
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        let mut s = self.st();
        s.gate(FaultOp::Rename, true)?;
        s.by_path()?;
        let id = s.id(from)?;
        s.names.remove(from);
        s.names.insert(to.to_owned(), id);
        s.ns_log.push(NsOp::Rename(from.to_owned(), to.to_owned()));
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        let mut s = self.st();
        s.gate(FaultOp::Remove, true)?;
        s.by_path()?;
        s.id(name)?;
        s.names.remove(name);
        s.ns_log.push(NsOp::Remove(name.to_owned()));
        Ok(())
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        let mut s = self.st();
        s.gate(FaultOp::Truncate, true)?;
        let id = s.held_id(name)?;
        let f = s.files.get_mut(&id).expect("named file exists");
        f.data.resize(len as usize, 0);
        f.min_len = f.min_len.min(f.data.len());
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        let mut s = self.st();
        s.gate(FaultOp::SyncDir, true)?;
        s.ns_log.clear();
        s.durable_names = s.names.clone();
        Ok(())
    }

    fn available(&self) -> io::Result<u64> {
        let s = self.st();
        Ok(match s.capacity {
            Some(c) => c.saturating_sub(s.used()),
            None => u64::MAX / 2,
        })
    }

    fn dir_status(&self) -> io::Result<DirStatus> {
        Ok(if self.st().gone {
            DirStatus::Gone
        } else {
            DirStatus::Same
        })
    }

    fn read_held(&self, name: &str) -> io::Result<Vec<u8>> {
        let s = self.st();
        let id = s.held_id(name)?;
        Ok(s.files[&id].data.clone())
    }

    fn reattach(&mut self) -> io::Result<()> {
        let mut s = self.st();
        if s.dead {
            return Err(err(libc::EIO));
        }
        if s.reattach_fail > 0 {
            s.reattach_fail -= 1;
            return Err(err(libc::EACCES));
        }
        // The removed files are closed: their data is gone for good.
        let orphans = std::mem::take(&mut s.orphans);
        for id in orphans.values() {
            if !s.names.values().any(|v| v == id) {
                s.files.remove(id);
            }
        }
        s.gone = false;
        s.reattaches += 1;
        Ok(())
    }
}
