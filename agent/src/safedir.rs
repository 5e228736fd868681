//! Directories the root daemon keeps its state and spool in, opened so that no other local
//! user can redirect its writes (docs/spool.md, "Paths"):
//! - the directory is opened once, without following a symlink at its last component, and
//!   every file in it is opened relative to that descriptor with `O_NOFOLLOW`: a link planted
//!   at `running`, `seq` or a segment name is never written through;
//! - [`SafeDir::check_trusted`]: the directory must be owned by us (root) and not writable by
//!   group or others, and so must its parent (a sticky parent such as /tmp is fine: nobody
//!   else can rename or remove a root-owned entry in it);
//! - [`SafeDir::status`] tells whether the path still names the directory opened (one
//!   `lstat`), so a directory removed or replaced at run time is noticed.
use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

/// Why a directory is not used.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// Unsafe to use: what is wrong and what to do.
    #[error("{path}: {what}; {fix}")]
    Unsafe {
        path: String,
        what: String,
        fix: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl From<PathError> for io::Error {
    fn from(e: PathError) -> io::Error {
        match e {
            PathError::Io { ref source, .. } => io::Error::new(source.kind(), e.to_string()),
            PathError::Unsafe { .. } => {
                io::Error::new(io::ErrorKind::PermissionDenied, e.to_string())
            }
        }
    }
}

/// What the path names now, compared with the directory opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirStatus {
    /// The same directory.
    Same,
    /// Nothing is there any more.
    Gone,
    /// Something else is there (another directory, a link, a file).
    Replaced,
}

/// An open directory. Files in it are reached through its descriptor only.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
    dev: u64,
    ino: u64,
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// A plain file name (no `/`, not `.` or `..`): everything here is one level deep.
fn name_c(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    cstr(name.as_bytes())
}

fn fstat(fd: i32) -> io::Result<libc::stat> {
    // SAFETY: fstat writes into the zeroed struct; fd is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_link(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

/// `lstat(2)`: None if nothing is there.
pub fn lstat(path: &Path) -> io::Result<Option<libc::stat>> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: lstat writes into the zeroed struct; the path is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::lstat(c.as_ptr(), &mut st) } != 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(st))
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

impl SafeDir {
    /// Opens an existing directory. A symbolic link at `path` itself is refused (links in
    /// the components above it are followed, as any path is).
    pub fn open(path: &Path) -> Result<SafeDir, PathError> {
        let p = path.display().to_string();
        let io_err = |source| PathError::Io {
            path: p.clone(),
            source,
        };
        let c = cstr(path.as_os_str().as_bytes()).map_err(io_err)?;
        // SAFETY: the path is NUL-terminated; the fd returned is ours.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let link = lstat(path).ok().flatten().is_some_and(|s| is_link(&s));
            if link {
                return Err(PathError::Unsafe {
                    path: p,
                    what: "is a symbolic link".into(),
                    fix: "sockacct does not follow a link here (another user could point it anywhere): \
                          remove the link and give the real directory's path"
                        .into(),
                });
            }
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                return Err(PathError::Unsafe {
                    path: p,
                    what: "is not a directory".into(),
                    fix: "remove it or give another path".into(),
                });
            }
            return Err(io_err(e));
        }
        // SAFETY: fd was just returned by open and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(fd.as_raw_fd()).map_err(io_err)?;
        Ok(SafeDir {
            fd,
            path: path.to_owned(),
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// Opens the directory, creating it (and missing parents) first if needed; a directory
    /// created here gets `mode`.
    pub fn create(path: &Path, mode: u32) -> Result<SafeDir, PathError> {
        let io_err = |source| PathError::Io {
            path: path.display().to_string(),
            source,
        };
        if lstat(path).map_err(io_err)?.is_none() {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| PathError::Io {
                    path: parent.display().to_string(),
                    source,
                })?;
            }
            let c = cstr(path.as_os_str().as_bytes()).map_err(io_err)?;
            // SAFETY: NUL-terminated path.
            if unsafe { libc::mkdir(c.as_ptr(), mode as libc::mode_t) } != 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(io_err(e));
                }
            } else {
                let d = SafeDir::open(path)?;
                // mkdir's mode is cut by the umask; set exactly what was asked.
                // SAFETY: fd is an open directory.
                if unsafe { libc::fchmod(d.fd.as_raw_fd(), mode as libc::mode_t) } != 0 {
                    return Err(io_err(io::Error::last_os_error()));
                }
                return Ok(d);
            }
        }
        SafeDir::open(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory must be ours (root) and not writable by group or others, and so must
    /// its parent (sticky and root-owned is fine): otherwise another user could replace or
    /// plant files the daemon writes as root.
    pub fn check_trusted(&self) -> Result<(), PathError> {
        let p = self.path.display().to_string();
        let st = fstat(self.fd.as_raw_fd()).map_err(|source| PathError::Io {
            path: p.clone(),
            source,
        })?;
        let me = euid();
        if st.st_uid != me {
            return Err(PathError::Unsafe {
                path: p.clone(),
                what: format!(
                    "is owned by uid {} (expected {me}, the agent's user)",
                    st.st_uid
                ),
                fix: format!(
                    "another user could replace the files the agent writes: chown {me} {p}"
                ),
            });
        }
        if st.st_mode & 0o022 != 0 {
            return Err(PathError::Unsafe {
                path: p.clone(),
                what: format!(
                    "is writable by group or others (mode {:o})",
                    st.st_mode & 0o7777
                ),
                fix: format!("another user could plant files there: chmod go-w {p}"),
            });
        }
        // The parent: whoever may rename entries there could swap the whole directory.
        let parent = self.path.parent().unwrap_or(Path::new("/"));
        let pp = if parent.as_os_str().is_empty() {
            ".".to_string()
        } else {
            parent.display().to_string()
        };
        let dotdot = cstr(b"..").expect("no NUL");
        // SAFETY: openat on our directory fd; the fd returned is closed below.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                dotdot.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(PathError::Io {
                path: pp,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: just opened, ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ps = fstat(fd.as_raw_fd()).map_err(|source| PathError::Io {
            path: pp.clone(),
            source,
        })?;
        if ps.st_uid != 0 && ps.st_uid != me {
            return Err(PathError::Unsafe {
                path: pp.clone(),
                what: format!(
                    "(the parent of {p}) is owned by uid {} (expected root)",
                    ps.st_uid
                ),
                fix: format!(
                    "its owner could swap {p} for a directory of their own: chown root {pp}, or use a path under a root-owned directory"
                ),
            });
        }
        let sticky = ps.st_mode & libc::S_ISVTX != 0;
        if ps.st_mode & 0o022 != 0 && !sticky {
            return Err(PathError::Unsafe {
                path: pp.clone(),
                what: format!(
                    "(the parent of {p}) is writable by group or others (mode {:o})",
                    ps.st_mode & 0o7777
                ),
                fix: format!(
                    "another user could rename {p} away and put their own in its place: chmod go-w {pp} (or set the sticky bit)"
                ),
            });
        }
        Ok(())
    }

    /// Sets the directory's mode (e.g. tightening an older spool directory to 0700).
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        // SAFETY: fd is an open directory.
        if unsafe { libc::fchmod(self.fd.as_raw_fd(), mode as libc::mode_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Mode bits of the directory.
    pub fn mode(&self) -> io::Result<u32> {
        Ok(fstat(self.fd.as_raw_fd())?.st_mode & 0o7777)
    }

    /// Whether the path still names this directory (one `lstat`).
    pub fn status(&self) -> io::Result<DirStatus> {
        Ok(match lstat(&self.path)? {
            None => DirStatus::Gone,
            Some(st) if is_dir(&st) && st.st_dev == self.dev && st.st_ino == self.ino => {
                DirStatus::Same
            }
            Some(_) => DirStatus::Replaced,
        })
    }

    /// Opens `name` in this directory with `flags` (O_NOFOLLOW and O_CLOEXEC added; `mode`
    /// for O_CREAT). A symbolic link at `name` is refused with an error naming it, and so is
    /// anything that is not a regular file.
    pub fn open_file(&self, name: &str, flags: i32, mode: u32) -> io::Result<File> {
        let c = name_c(name)?;
        // O_NONBLOCK: opening a FIFO planted at our name must not hang the daemon.
        let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: openat on our directory fd with a NUL-terminated plain name.
        let fd =
            unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ELOOP) {
                return Err(self.link_error(name));
            }
            return Err(e);
        }
        // SAFETY: just opened, ours.
        let f = unsafe { File::from_raw_fd(fd) };
        let st = fstat(f.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::other(format!(
                "{}: not a regular file; sockacct only writes its own files here: remove it",
                self.path.join(name).display()
            )));
        }
        // Back to blocking mode for the regular file (O_NONBLOCK means nothing for regular
        // files, but keep the descriptor plain).
        // SAFETY: fcntl on our fd.
        unsafe {
            let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        Ok(f)
    }

    fn link_error(&self, name: &str) -> io::Error {
        io::Error::other(format!(
            "{}: is a symbolic link; sockacct never writes through links in {} (remove it: sockacct did not make it)",
            self.path.join(name).display(),
            self.path.display()
        ))
    }

    /// What is at `name` (not following a link): None if nothing.
    pub fn stat_at(&self, name: &str) -> io::Result<Option<libc::stat>> {
        let c = name_c(name)?;
        // SAFETY: fstatat on our directory fd; writes into the zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::NotFound {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(st))
    }

    /// Err (naming the path and the fix) if `name` is a symbolic link or not a regular file.
    pub fn refuse_non_file(&self, name: &str) -> io::Result<()> {
        match self.stat_at(name)? {
            Some(st) if is_link(&st) => Err(self.link_error(name)),
            Some(st) if st.st_mode & libc::S_IFMT != libc::S_IFREG => {
                Err(io::Error::other(format!(
                    "{}: not a regular file; sockacct only keeps its own files here: remove it",
                    self.path.join(name).display()
                )))
            }
            _ => Ok(()),
        }
    }

    /// `renameat(2)` within this directory (a link is renamed, never followed).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (a, b) = (name_c(from)?, name_c(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: renameat on our directory fd with NUL-terminated plain names.
        if unsafe { libc::renameat(fd, a.as_ptr(), fd, b.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `unlinkat(2)` of a file (a link is removed, never followed).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let c = name_c(name)?;
        // SAFETY: unlinkat on our directory fd with a NUL-terminated plain name.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// fsync of the directory (makes creations, renames and removals durable).
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: fsync on our fd.
        if unsafe { libc::fsync(self.fd.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A path that reaches this very directory (not whatever its path names now), for
    /// `read_dir`: the descriptor's entry in /proc.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Bytes free for us on its file system.
    pub fn available(&self) -> io::Result<u64> {
        // SAFETY: fstatvfs writes into the zeroed struct we pass.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatvfs(self.fd.as_raw_fd(), &mut s) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, os::unix::fs::PermissionsExt};

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("sockacct-safedir-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn a_link_is_never_written_through() {
        let base = tmp("link");
        let d = SafeDir::create(&base.join("state"), 0o700).unwrap();
        assert_eq!(d.mode().unwrap(), 0o700);
        d.check_trusted().unwrap();
        let target = base.join("target");
        fs::write(&target, "precious\n").unwrap();
        std::os::unix::fs::symlink(&target, base.join("state/running")).unwrap();
        let e = d
            .open_file(
                "running",
                libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
                0o600,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link") && e.contains("running"), "{e}");
        assert!(d.refuse_non_file("running").is_err());
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
        // A directory given as a link is refused too.
        std::os::unix::fs::symlink(base.join("state"), base.join("linked")).unwrap();
        let e = SafeDir::open(&base.join("linked")).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn group_or_other_writable_directories_are_refused() {
        let base = tmp("perm");
        let p = base.join("spool");
        let d = SafeDir::create(&p, 0o700).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
        let e = d.check_trusted().unwrap_err().to_string();
        assert!(
            e.contains("writable by group or others") && e.contains("chmod go-w"),
            "{e}"
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
        d.check_trusted().unwrap();
        // The parent writable by others without the sticky bit.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o777)).unwrap();
        let e = d.check_trusted().unwrap_err().to_string();
        assert!(e.contains("parent"), "{e}");
        // Sticky (like /tmp): fine.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o1777)).unwrap();
        d.check_trusted().unwrap();
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn status_tells_gone_and_replaced() {
        let base = tmp("status");
        let p = base.join("spool");
        let d = SafeDir::create(&p, 0o700).unwrap();
        assert_eq!(d.status().unwrap(), DirStatus::Same);
        fs::remove_dir(&p).unwrap();
        assert_eq!(d.status().unwrap(), DirStatus::Gone);
        fs::create_dir(&p).unwrap();
        assert_eq!(d.status().unwrap(), DirStatus::Replaced);
        fs::remove_dir_all(&base).unwrap();
    }
}
