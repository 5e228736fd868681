//! The few bpf(2) and membarrier(2) calls aya 0.14 does not offer.
//!
//! - `BPF_MAP_LOOKUP_BATCH`: aya reads a hash map one key at a time (two syscalls per
//!   entry); one batch call copies thousands of entries.
//! - `membarrier(MEMBARRIER_CMD_GLOBAL)`: waits for an RCU grace period, i.e. for every
//!   BPF program that started before the call to have finished. The poller uses it after
//!   flipping the epoch, so the slot it harvests can no longer change.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Fixed-size plain data that can be read straight out of a map.
///
/// # Safety
/// Implementors must be `repr(C)`, have no padding-dependent invariants, and accept any
/// bit pattern (the kernel writes them).
pub unsafe trait Plain: Copy + Default {}
unsafe impl Plain for u64 {}
unsafe impl Plain for u32 {}
unsafe impl Plain for agent_common::SockCounters {}
unsafe impl Plain for agent_common::SlotCounters {}
unsafe impl Plain for agent_common::Owner {}
unsafe impl Plain for agent_common::PeerKey {}
unsafe impl Plain for agent_common::Counters {}

/// Where a walk of a hash map stands between [`walk_step`] calls.
#[derive(Debug, Clone, Default)]
pub struct WalkCursor {
    /// The kernel's batch token (a bucket index for hash maps, room for a key); None
    /// before the first step.
    token: Option<[u8; 16]>,
}

impl WalkCursor {
    /// No walk under way: the next step starts a new pass.
    pub fn at_start(&self) -> bool {
        self.token.is_none()
    }
}

/// Reads every entry of a (non-per-CPU) hash map with `BPF_MAP_LOOKUP_BATCH`, appending
/// to `out`. `chunk` is the number of entries asked for per call. Not atomic across the
/// map: entries added or removed during the walk may or may not appear.
pub fn lookup_batch<K: Plain, V: Plain>(
    map: BorrowedFd<'_>,
    chunk: usize,
    out: &mut Vec<(K, V)>,
) -> io::Result<()> {
    let mut cursor = WalkCursor::default();
    while !walk_step(map, &mut cursor, chunk, out)? {}
    Ok(())
}

/// One step of a walk that may be spread over many calls: appends about `chunk` entries
/// (more when one bucket holds more) to `out` and returns true once the walk reached the
/// end (the cursor then starts over).
pub fn walk_step<K: Plain, V: Plain>(
    map: BorrowedFd<'_>,
    cursor: &mut WalkCursor,
    chunk: usize,
    out: &mut Vec<(K, V)>,
) -> io::Result<bool> {
    let mut chunk = chunk.max(16);
    let mut keys: Vec<K> = vec![K::default(); chunk];
    let mut values: Vec<V> = vec![V::default(); chunk];
    let mut token_in = cursor.token.unwrap_or([0u8; 16]);
    let mut token_out = [0u8; 16];
    loop {
        let mut attr = BatchAttr {
            in_batch: if cursor.token.is_none() {
                0
            } else {
                token_in.as_mut_ptr() as u64
            },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = if r < 0 {
            Some(io::Error::last_os_error())
        } else {
            None
        };
        let n = attr.count as usize;
        match err {
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                // One bucket holds more entries than fit: grow and retry this step.
                chunk *= 2;
                keys.resize(chunk, K::default());
                values.resize(chunk, V::default());
                continue;
            }
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
                cursor.token = None;
                return Ok(true);
            }
            Some(e) => {
                cursor.token = None;
                return Err(e);
            }
            None => {
                out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
                token_in = token_out;
                cursor.token = Some(token_in);
                return Ok(false);
            }
        }
    }
}

const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's internal "operation not supported" (not in libc).
const ENOTSUPP: i32 = 524;

/// Deletes `keys` with `BPF_MAP_DELETE_BATCH` (one call per few thousand keys instead of
/// one each); absent keys are skipped, not errors.
pub fn delete_batch<K: Plain>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_DELETE_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let done = (attr.count as usize).min(rest.len());
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // The batch stops at an absent key: skip it and go on after it.
            Some(libc::ENOENT) => rest = &rest[(done + 1).min(rest.len())..],
            // Kernels without batch ops for the map: one at a time.
            Some(libc::EINVAL) | Some(ENOTSUPP) => {
                for k in &rest[done..] {
                    delete(map, k)?;
                }
                return Ok(());
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One-key lookup; `Ok(None)` when the key is absent.
pub fn lookup<K: Plain, V: Plain>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut v = V::default();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &mut v as *mut V as u64,
        flags: 0,
    };
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            &mut attr as *mut ElemAttr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(v))
}

/// Deletes a key; absent keys are not an error.
pub fn delete<K: Plain>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: 0,
        flags: 0,
    };
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &mut attr as *mut ElemAttr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    Ok(())
}

const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// Waits until every BPF program that was running when this was called has finished
/// (the kernel runs `synchronize_rcu()` for this command).
pub fn wait_for_running_programs() -> io::Result<()> {
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
