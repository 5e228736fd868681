//! Where the spool's bytes live: a flat directory of named files behind a small trait, so
//! the spool's logic can be tested against a storage that fails and crashes on purpose
//! ([`super::fault::FaultStorage`]).
use std::{
    collections::HashMap,
    fs::{self, File},
    io::{self, Read as _, Write as _},
    os::fd::AsRawFd as _,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use crate::safedir::{DirStatus, SafeDir};

/// A flat namespace of files (no subdirectories). Names are plain file names.
///
/// Durability contract (what the spool relies on, and what `FaultStorage` models):
/// - data appended to a file is durable once `sync(name)` returned Ok;
/// - `create`, `rename` and `remove` are durable once `sync_dir()` returned Ok; before that a
///   crash may keep any prefix of them (in order);
/// - `rename` replaces an existing target atomically.
pub trait Storage {
    /// Creates an empty file (an existing one is truncated).
    fn create(&mut self, name: &str) -> io::Result<()>;
    /// Appends all of `data` to the end of the file. On error, any prefix of `data` may have
    /// been written.
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()>;
    /// Makes the file's contents durable (fsync).
    fn sync(&mut self, name: &str) -> io::Result<()>;
    /// The whole file.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Every file: name and size in bytes.
    fn list(&self) -> io::Result<Vec<(String, u64)>>;
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&mut self, name: &str) -> io::Result<()>;
    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()>;
    /// Makes creations, renames and removals durable (fsync of the directory).
    fn sync_dir(&mut self) -> io::Result<()>;
    /// Bytes free for us on the underlying file system.
    fn available(&self) -> io::Result<u64>;
    /// Whether the directory is still the one opened (checked at every tick: one `lstat`).
    fn dir_status(&self) -> io::Result<DirStatus>;
    /// The contents of `name` read through a handle still open on it: works after the file
    /// was removed along with its directory (what the spool salvages of the segment it was
    /// writing). NotFound if no handle is open.
    fn read_held(&self, name: &str) -> io::Result<Vec<u8>>;
    /// After the directory was removed or replaced: drops every handle (freeing the space of
    /// removed files) and opens the directory at the same path again, created (0700) if it
    /// is missing, checked and locked as at start.
    fn reattach(&mut self) -> io::Result<()>;
}

/// Real files in one directory, reached through its descriptor only ([`SafeDir`]: a link at
/// any of our names is never followed): appends through an `O_APPEND` descriptor,
/// `fsync(2)` for `sync`, and an `flock(2)` on `<dir>/lock` so two agents never write the
/// same spool.
pub struct FsStorage {
    dir: SafeDir,
    path: PathBuf,
    /// Handles of the files being written (the active segment, the cursor's temp file).
    /// Read-write, so the active segment can be read back if its directory is removed.
    handles: HashMap<String, File>,
    _lock: Option<File>,
}

/// Name of the lock file in a spool directory (never a segment).
pub const LOCK_FILE: &str = "lock";

/// Mode of a spool directory the agent creates.
pub const DIR_MODE: u32 = 0o700;

impl FsStorage {
    /// Opens (creating it if needed, mode 0700) the spool directory for writing and takes its
    /// lock. Fails, naming the path and the fix, if the directory is a symbolic link, is not
    /// owned by the agent's user (root), is writable by group or others (or its parent is),
    /// if it holds a symbolic link, or if another process holds the lock.
    pub fn open(dir: &Path) -> io::Result<FsStorage> {
        let (d, lock) = open_locked(dir)?;
        Ok(FsStorage {
            dir: d,
            path: dir.to_owned(),
            handles: HashMap::new(),
            _lock: Some(lock),
        })
    }

    /// Opens an existing spool directory for reading only (no lock, nothing created, links
    /// to the directory followed): what `cat` and `verify` use while an agent may be running.
    pub fn open_read_only(dir: &Path) -> io::Result<FsStorage> {
        let real = fs::canonicalize(dir)?;
        let d = SafeDir::open(&real)?;
        Ok(FsStorage {
            dir: d,
            path: dir.to_owned(),
            handles: HashMap::new(),
            _lock: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    fn handle(&mut self, name: &str) -> io::Result<&mut File> {
        if !self.handles.contains_key(name) {
            let f = self.dir.open_file(name, libc::O_RDWR | libc::O_APPEND, 0)?;
            self.handles.insert(name.to_owned(), f);
        }
        Ok(self.handles.get_mut(name).expect("just inserted"))
    }
}

/// The spool directory opened, checked and locked (see [`FsStorage::open`]).
fn open_locked(dir: &Path) -> io::Result<(SafeDir, File)> {
    let d = SafeDir::create(dir, DIR_MODE)?;
    d.check_trusted()?;
    // Nothing in it may be a link: the agent made none, so one was planted.
    for e in fs::read_dir(d.fd_path())? {
        let e = e?;
        if e.file_type()?.is_symlink() {
            let name = e.file_name().to_string_lossy().into_owned();
            d.refuse_non_file(&name)?;
        }
    }
    let lock = d.open_file(LOCK_FILE, libc::O_CREAT | libc::O_WRONLY, 0o600)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{}: spool directory is in use by another process (lock held)",
                    dir.display()
                ),
            )
        } else {
            e
        });
    }
    Ok((d, lock))
}

impl Storage for FsStorage {
    fn create(&mut self, name: &str) -> io::Result<()> {
        self.handles.remove(name);
        let f = self.dir.open_file(
            name,
            libc::O_CREAT | libc::O_RDWR | libc::O_TRUNC | libc::O_APPEND,
            0o600,
        )?;
        self.handles.insert(name.to_owned(), f);
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.handle(name)?.write_all(data)
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        match self.handles.get(name) {
            Some(f) => f.sync_all(),
            None => self.dir.open_file(name, libc::O_RDONLY, 0)?.sync_all(),
        }
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut f = self.dir.open_file(name, libc::O_RDONLY, 0)?;
        let mut v = Vec::with_capacity(f.metadata().map(|m| m.len() as usize).unwrap_or(0));
        f.read_to_end(&mut v)?;
        Ok(v)
    }

    fn list(&self) -> io::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        // Through the descriptor: the directory opened, whatever the path names now.
        for e in fs::read_dir(self.dir.fd_path())? {
            let e = e?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            // A file may vanish between readdir and stat (a reader racing the agent). The
            // entry's metadata does not follow links: a link is never listed as a file.
            let md = match e.metadata() {
                Ok(m) => m,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            if md.is_file() {
                out.push((name, md.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        self.dir.rename(from, to)?;
        // Nothing is written to a file after it was renamed (sealed segment, cursor): close
        // it rather than hold a descriptor per segment.
        self.handles.remove(to);
        self.handles.remove(from);
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.handles.remove(name);
        self.dir.remove(name)
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        self.handle(name)?.set_len(len)
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        self.dir.sync()
    }

    fn available(&self) -> io::Result<u64> {
        self.dir.available()
    }

    fn dir_status(&self) -> io::Result<DirStatus> {
        self.dir.status()
    }

    fn read_held(&self, name: &str) -> io::Result<Vec<u8>> {
        let f = self
            .handles
            .get(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let len = f.metadata()?.len() as usize;
        let mut v = vec![0u8; len];
        let mut off = 0;
        while off < len {
            match f.read_at(&mut v[off..], off as u64)? {
                0 => break,
                n => off += n,
            }
        }
        v.truncate(off);
        Ok(v)
    }

    fn reattach(&mut self) -> io::Result<()> {
        self.handles.clear();
        let (d, lock) = open_locked(&self.path)?;
        self.dir = d;
        self._lock = Some(lock);
        Ok(())
    }
}
