//! What a run attached with netlink tc (kernels without tcx), kept in the state directory
//! while it runs, so the next run can undo what a killed one left behind. cgroup, tracing
//! and tcx links die with the process that holds them; netlink filters (and the clsact
//! qdisc under them) stay until someone deletes them, and keep counting into maps nobody
//! reads.
//!
//! A filter is ours only if its program id is one this record names, for the boot it names
//! (ids are unique per boot): a name alone would also match the filters of an agent that
//! is running right now (`sockacct check`, a second instance). A qdisc is removed only if
//! the killed run added it and no filter of anyone else is left on it.
use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::clsact;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TcRecord {
    /// /proc/sys/kernel/random/boot_id when the filters were attached.
    pub boot: String,
    pub ifaces: Vec<TcIface>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TcIface {
    pub name: String,
    pub ifindex: u32,
    /// The run added the clsact qdisc (there was none).
    pub added_clsact: bool,
    /// Ids of the programs it attached here.
    pub prog_ids: Vec<u32>,
}

pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Reads the record; None when there is none (the last run stopped cleanly, or never
/// used netlink tc). A symlink is never followed.
pub fn read(path: &Path) -> io::Result<Option<TcRecord>> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    match f {
        Ok(f) => serde_json::from_reader(f)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the record durably (a new file renamed over the old one; neither is followed
/// through a symlink).
pub fn write(path: &Path, r: &TcRecord) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(r).map_err(io::Error::other)?)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub fn remove(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!("removing {}: {e}", path.display()),
    }
}

/// What cleaning up after a killed run did.
#[derive(Debug, Default, PartialEq)]
pub struct Cleaned {
    pub filters: usize,
    pub qdiscs: usize,
}

/// Removes what the run recorded in `path` left attached, then the record. Best effort:
/// each failure is logged and the start goes on (the stale filters then keep counting
/// into maps nobody reads, but ours count too).
pub fn clean_stale(path: &Path) -> Cleaned {
    let mut done = Cleaned::default();
    let rec = match read(path) {
        Ok(Some(r)) => r,
        Ok(None) => return done,
        Err(e) => {
            warn!(
                "reading {} (tc filters of a previous run): {e}; not cleaning up after it",
                path.display()
            );
            remove(path);
            return done;
        }
    };
    if rec.boot != boot_id() {
        // A reboot removed them all.
        remove(path);
        return done;
    }
    for i in &rec.ifaces {
        // The interface may be gone, or its index reused by another one.
        if super::ifindex(&i.name) != Some(i.ifindex) {
            continue;
        }
        let mut left_by_others = 0;
        for parent in [clsact::INGRESS, clsact::EGRESS] {
            let list = match clsact::filters(i.ifindex, parent) {
                Ok(l) => l,
                Err(e) => {
                    warn!("listing the tc filters on {}: {e}", i.name);
                    left_by_others += 1; // unknown: keep the qdisc
                    continue;
                }
            };
            for f in list {
                let ours = f.kind == "bpf"
                    && f.prog_id.is_some_and(|id| i.prog_ids.contains(&id))
                    && f.name
                        .as_deref()
                        .is_some_and(|n| n.starts_with("sockacct_tc_"));
                if !ours {
                    left_by_others += 1;
                    continue;
                }
                match clsact::delete_filter(i.ifindex, &f) {
                    Ok(()) => done.filters += 1,
                    Err(e) => {
                        warn!(
                            "removing the stale tc filter {:?} on {}: {e}",
                            f.name, i.name
                        );
                        left_by_others += 1;
                    }
                }
            }
        }
        if i.added_clsact && left_by_others == 0 {
            match clsact::remove(i.ifindex) {
                Ok(()) => done.qdiscs += 1,
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOENT)
                        || e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => warn!(
                    "removing the clsact qdisc a previous run added to {}: {e}",
                    i.name
                ),
            }
        }
    }
    if done != Cleaned::default() {
        info!(
            "removed what a killed run left attached: {} tc filter(s), {} clsact qdisc(s) on {:?}",
            done.filters,
            done.qdiscs,
            rec.ifaces.iter().map(|i| &i.name).collect::<Vec<_>>()
        );
    }
    remove(path);
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_round_trip_and_symlinks_are_not_followed() {
        let dir = std::env::temp_dir().join(format!("sockacct-tcrec-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tc.json");
        assert_eq!(read(&p).unwrap(), None);
        let r = TcRecord {
            boot: "b".into(),
            ifaces: vec![TcIface {
                name: "lo".into(),
                ifindex: 1,
                added_clsact: true,
                prog_ids: vec![7, 8],
            }],
        };
        write(&p, &r).unwrap();
        assert_eq!(read(&p).unwrap(), Some(r.clone()));
        // A planted symlink at the path is replaced, its target untouched.
        let target = dir.join("target");
        fs::write(&target, "keep").unwrap();
        fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        assert!(read(&p).is_err(), "read followed a symlink");
        write(&p, &r).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(read(&p).unwrap(), Some(r));
        // A record from another boot names nothing that still exists.
        write(
            &p,
            &TcRecord {
                boot: "another boot".into(),
                ifaces: vec![],
            },
        )
        .unwrap();
        assert_eq!(clean_stale(&p), Cleaned::default());
        assert!(!p.exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
