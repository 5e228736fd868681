//! Where the spool's bytes live: a flat directory of named files behind a small trait, so
//! the spool's logic can be tested against a storage that fails and crashes on purpose
//! ([`super::fault::FaultStorage`]).
use std::{
    collections::HashMap,
    ffi::CString,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::fd::AsRawFd as _,
    os::unix::{ffi::OsStrExt as _, fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

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
}

/// Real files in one directory: appends through an `O_APPEND` descriptor, `fsync(2)` for
/// `sync`, and an `flock(2)` on `<dir>/lock` so two agents never write the same spool.
pub struct FsStorage {
    dir: PathBuf,
    /// Append handles of the files being written (the active segment, the cursor's temp file).
    handles: HashMap<String, File>,
    _lock: Option<File>,
}

/// Name of the lock file in a spool directory (never a segment).
pub const LOCK_FILE: &str = "lock";

impl FsStorage {
    /// Opens (creating it if needed, mode 0700) the spool directory for writing and takes its
    /// lock; fails if another process holds it.
    pub fn open(dir: &Path) -> io::Result<FsStorage> {
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))?;
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
        Ok(FsStorage {
            dir: dir.to_owned(),
            handles: HashMap::new(),
            _lock: Some(lock),
        })
    }

    /// Opens an existing spool directory for reading only (no lock, nothing created): what
    /// `cat` and `verify` use while an agent may be running.
    pub fn open_read_only(dir: &Path) -> io::Result<FsStorage> {
        let md = fs::metadata(dir)?;
        if !md.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{}: not a directory", dir.display()),
            ));
        }
        Ok(FsStorage {
            dir: dir.to_owned(),
            handles: HashMap::new(),
            _lock: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn handle(&mut self, name: &str) -> io::Result<&mut File> {
        if !self.handles.contains_key(name) {
            let f = OpenOptions::new().append(true).open(self.path(name))?;
            self.handles.insert(name.to_owned(), f);
        }
        Ok(self.handles.get_mut(name).expect("just inserted"))
    }
}

impl Storage for FsStorage {
    fn create(&mut self, name: &str) -> io::Result<()> {
        self.handles.remove(name);
        // O_APPEND via custom flags: std's `append` refuses to be combined with `truncate`.
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .custom_flags(libc::O_APPEND)
            .mode(0o600)
            .open(self.path(name))?;
        self.handles.insert(name.to_owned(), f);
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.handle(name)?.write_all(data)
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        match self.handles.get(name) {
            Some(f) => f.sync_all(),
            None => File::open(self.path(name))?.sync_all(),
        }
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let mut f = File::open(self.path(name))?;
        let mut v = Vec::with_capacity(f.metadata().map(|m| m.len() as usize).unwrap_or(0));
        f.read_to_end(&mut v)?;
        Ok(v)
    }

    fn list(&self) -> io::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            // A file may vanish between readdir and stat (a reader racing the agent).
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
        fs::rename(self.path(from), self.path(to))?;
        self.handles.remove(to);
        if let Some(h) = self.handles.remove(from) {
            self.handles.insert(to.to_owned(), h);
        }
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.handles.remove(name);
        fs::remove_file(self.path(name))
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        self.handle(name)?.set_len(len)
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn available(&self) -> io::Result<u64> {
        let c = CString::new(self.dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
    }
}
