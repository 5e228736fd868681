//! The few bpf(2) commands the bench needs: program ids and infos (run time and count), and
//! switching bpf_stats on.
use super::*;

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Prefix of `struct bpf_prog_info` (include/uapi/linux/bpf.h). The kernel fills
/// min(info_len, its own size) bytes, so a prefix is enough.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProgInfoPrefix {
    pub prog_type: u32,
    pub id: u32,
    pub tag: [u8; 8],
    pub jited_prog_len: u32,
    pub xlated_prog_len: u32,
    pub jited_prog_insns: u64,
    pub xlated_prog_insns: u64,
    pub load_time: u64,
    pub created_by_uid: u32,
    pub nr_map_ids: u32,
    pub map_ids: u64,
    pub name: [u8; 16],
    pub ifindex: u32,
    pub gpl_compatible: u32, // bit field :1, then 31 bits of padding
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub nr_jited_ksyms: u32,
    pub nr_jited_func_lens: u32,
    pub jited_ksyms: u64,
    pub jited_func_lens: u64,
    pub btf_id: u32,
    pub func_info_rec_size: u32,
    pub func_info: u64,
    pub nr_func_info: u32,
    pub nr_line_info: u32,
    pub line_info: u64,
    pub jited_line_info: u64,
    pub nr_jited_line_info: u32,
    pub line_info_rec_size: u32,
    pub jited_line_info_rec_size: u32,
    pub nr_prog_tags: u32,
    pub prog_tags: u64,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}
// The documented layout (checked against linux/bpf.h with offsetof).
const _: () = {
    assert!(offset_of!(ProgInfoPrefix, id) == 4);
    assert!(offset_of!(ProgInfoPrefix, load_time) == 40);
    assert!(offset_of!(ProgInfoPrefix, name) == 64);
    assert!(offset_of!(ProgInfoPrefix, netns_dev) == 88);
    assert!(offset_of!(ProgInfoPrefix, btf_id) == 128);
    assert!(offset_of!(ProgInfoPrefix, prog_tags) == 184);
    assert!(offset_of!(ProgInfoPrefix, run_time_ns) == 192);
    assert!(offset_of!(ProgInfoPrefix, run_cnt) == 200);
    assert!(size_of::<ProgInfoPrefix>() == 208);
};

/// Prefix of `struct bpf_map_info`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MapInfoPrefix {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub name: [u8; 16],
}
const _: () = assert!(offset_of!(MapInfoPrefix, name) == 24);

#[repr(C)]
struct GetIdAttr {
    start_or_id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
struct EnableStatsAttr {
    stats_type: u32,
}

fn sys<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Kernel-wide run-time stats, on while the returned fd stays open.
pub fn enable_stats() -> io::Result<OwnedFd> {
    let fd = sys(
        BPF_ENABLE_STATS,
        &mut EnableStatsAttr {
            stats_type: BPF_STATS_RUN_TIME,
        },
    )?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn next_id(cmd: libc::c_long, start: u32) -> io::Result<Option<u32>> {
    let mut a = GetIdAttr {
        start_or_id: start,
        next_id: 0,
        open_flags: 0,
    };
    match sys(cmd, &mut a) {
        Ok(_) => Ok(Some(a.next_id)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<OwnedFd> {
    let mut a = GetIdAttr {
        start_or_id: id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = sys(cmd, &mut a)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn info_into<T: Copy>(fd: &OwnedFd, v: &mut T) -> io::Result<()> {
    let mut a = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: v as *mut T as u64,
    };
    sys(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
    Ok(())
}

fn info<T: Copy>(fd: &OwnedFd) -> io::Result<T> {
    let mut v: T = unsafe { std::mem::zeroed() };
    info_into(fd, &mut v)?;
    Ok(v)
}

/// A program's info plus the address of its JITed main function (0 if not given).
pub struct Prog {
    pub info: ProgInfoPrefix,
    pub addr: u64,
}

pub fn name_of(raw: &[u8; 16]) -> String {
    let n = raw.iter().position(|&b| b == 0).unwrap_or(16);
    String::from_utf8_lossy(&raw[..n]).into_owned()
}

/// Every loaded program (ids that vanish during the walk are skipped).
pub fn all_programs() -> io::Result<Vec<Prog>> {
    let mut out = vec![];
    let mut id = 0;
    while let Some(next) = next_id(BPF_PROG_GET_NEXT_ID, id)? {
        id = next;
        let Ok(fd) = fd_by_id(BPF_PROG_GET_FD_BY_ID, id) else {
            continue;
        };
        // Ask for the first JITed symbol address too (one slot: the main function).
        let mut addr = 0u64;
        let mut i: ProgInfoPrefix = unsafe { std::mem::zeroed() };
        i.nr_jited_ksyms = 1;
        i.jited_ksyms = &mut addr as *mut u64 as u64;
        if info_into(&fd, &mut i).is_ok() {
            if i.jited_ksyms == 0 {
                addr = 0;
            }
            out.push(Prog { info: i, addr });
        }
    }
    Ok(out)
}

/// An fd for the map with this id, with its info.
pub fn map_by_id(id: u32) -> io::Result<(OwnedFd, MapInfoPrefix)> {
    let fd = fd_by_id(BPF_MAP_GET_FD_BY_ID, id)?;
    let i = info::<MapInfoPrefix>(&fd)?;
    Ok((fd, i))
}
