//! The clsact qdisc that tc programs need on kernels without tcx (before 6.6), and the
//! netlink filters attached to it. The agent adds a qdisc only where none exists, and
//! removes only the ones it added: an operator's own qdisc (and its filters) is never
//! touched.
use std::io;

use aya::programs::tc::{self, TcError};

/// Adds clsact to `iface` unless it already has one. Ok(true): the agent added it and must
/// remove it; Ok(false): it was there already.
pub fn ensure(iface: &str) -> Result<bool, String> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(true),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(format!("adding a clsact qdisc to {iface}: {e}")),
    }
}

const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;
/// Parents of the clsact ingress and egress hooks (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_*)).
pub const INGRESS: u32 = 0xffff_fff2;
pub const EGRESS: u32 = 0xffff_fff3;

/// One filter on a clsact hook, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub parent: u32,
    pub handle: u32,
    /// Priority (upper 16 bits) and protocol (lower 16), as deleting it needs them.
    pub info: u32,
    pub kind: String,
    /// The BPF program's name as its loader gave it (aya: the program's name).
    pub name: Option<String>,
    /// The BPF program's id (unique per boot).
    pub prog_id: Option<u32>,
}

/// A tcmsg request: nlmsghdr (16) + tcmsg (20) + an optional TCA_KIND attribute.
fn tc_request(
    ty: u16,
    flags: u16,
    ifindex: u32,
    handle: u32,
    parent: u32,
    info: u32,
    kind: Option<&str>,
) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    msg.extend_from_slice(&ty.to_ne_bytes());
    msg.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel assigns ours
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&handle.to_ne_bytes());
    msg.extend_from_slice(&parent.to_ne_bytes());
    msg.extend_from_slice(&info.to_ne_bytes());
    if let Some(kind) = kind {
        let len = 4 + kind.len() + 1;
        msg.extend_from_slice(&(len as u16).to_ne_bytes());
        msg.extend_from_slice(&TCA_KIND.to_ne_bytes());
        msg.extend_from_slice(kind.as_bytes());
        msg.resize(msg.len() + 1 + (4 - len % 4) % 4, 0);
    }
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

/// Sends one request on a fresh NETLINK_ROUTE socket; returns the payloads of the reply
/// messages (type, bytes after the nlmsghdr) up to the ACK or the end of the dump.
fn request(msg: &[u8], dump: bool) -> io::Result<Vec<(u16, Vec<u8>)>> {
    // SAFETY: plain socket calls on a descriptor we own and close.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let r = (|| {
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and sa outlive the call.
        let sent = unsafe {
            libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = vec![];
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: buf is ours and as long as we say.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes([rest[4], rest[5]]);
                if len < 16 || len > rest.len() {
                    return Err(io::Error::other("malformed netlink reply"));
                }
                let body = &rest[16..len];
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let err = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .ok_or_else(|| io::Error::other("short netlink error"))?;
                        if err != 0 {
                            return Err(io::Error::from_raw_os_error(-err));
                        }
                        if !dump {
                            return Ok(out);
                        }
                    }
                    _ => out.push((ty, body.to_vec())),
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    })();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    r
}

/// Netlink attributes in `b`: (type, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((ty, payload))
    })
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The filters on one clsact hook (`INGRESS` or `EGRESS`) of `ifindex`; none when the
/// interface has no clsact qdisc.
pub fn filters(ifindex: u32, parent: u32) -> io::Result<Vec<Filter>> {
    let msg = tc_request(
        RTM_GETTFILTER,
        libc::NLM_F_DUMP as u16,
        ifindex,
        0,
        parent,
        0,
        None,
    );
    let replies = match request(&msg, true) {
        Ok(r) => r,
        // No qdisc there, so no filters.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut out = vec![];
    for (ty, body) in replies {
        if ty != RTM_NEWTFILTER || body.len() < 20 {
            continue;
        }
        let u32_at = |o: usize| u32::from_ne_bytes(body[o..o + 4].try_into().unwrap());
        let mut f = Filter {
            parent: u32_at(12),
            handle: u32_at(8),
            info: u32_at(16),
            kind: String::new(),
            name: None,
            prog_id: None,
        };
        for (t, p) in attrs(&body[20..]) {
            match t {
                TCA_KIND => f.kind = cstr(p),
                // TCA_KIND comes first; option numbers are the classifier's own.
                TCA_OPTIONS if f.kind == "bpf" => {
                    for (t, p) in attrs(p) {
                        match t {
                            TCA_BPF_NAME => f.name = Some(cstr(p)),
                            TCA_BPF_ID if p.len() >= 4 => {
                                f.prog_id = Some(u32::from_ne_bytes(p[..4].try_into().unwrap()))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        // A dump also lists each priority's classifier without a filter (handle 0).
        if f.handle != 0 {
            out.push(f);
        }
    }
    Ok(out)
}

/// Deletes one filter as [`filters`] listed it.
pub fn delete_filter(ifindex: u32, f: &Filter) -> io::Result<()> {
    let msg = tc_request(
        RTM_DELTFILTER,
        libc::NLM_F_ACK as u16,
        ifindex,
        f.handle,
        f.parent,
        f.info,
        Some(&f.kind),
    );
    request(&msg, false).map(drop)
}

/// Removes the clsact qdisc (and with it every filter on it) from `ifindex`.
pub fn remove(ifindex: u32) -> io::Result<()> {
    let msg = tc_request(
        RTM_DELQDISC,
        libc::NLM_F_ACK as u16,
        ifindex,
        CLSACT_HANDLE,
        TC_H_CLSACT,
        0,
        Some("clsact"),
    );
    request(&msg, false).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_laid_out_as_the_kernel_reads_them() {
        let m = remove_msg_for_test();
        // nlmsghdr 16 + tcmsg 20 + TCA_KIND "clsact\0" (11, padded to 12)
        assert_eq!(m.len(), 48);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 48);
        assert_eq!(u16::from_ne_bytes([m[36], m[37]]), 11);
        assert_eq!(&m[40..47], b"clsact\0");
        let kinds: Vec<_> = attrs(&m[36..]).collect();
        assert_eq!(kinds, vec![(TCA_KIND, &b"clsact\0"[..])]);
    }

    fn remove_msg_for_test() -> Vec<u8> {
        tc_request(
            RTM_DELQDISC,
            libc::NLM_F_ACK as u16,
            1,
            CLSACT_HANDLE,
            TC_H_CLSACT,
            0,
            Some("clsact"),
        )
    }
}
