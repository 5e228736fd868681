//! The clsact qdisc that tc programs need on kernels without tcx (before 6.6). The agent
//! adds one only where none exists, and removes only the ones it added: an operator's
//! own qdisc (and its filters) is never touched.
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
const NLMSG_ERROR: u16 = 2;
const TCA_KIND: u16 = 1;
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;

/// Removes the clsact qdisc (and with it every filter on it) from `ifindex`.
pub fn remove(ifindex: u32) -> io::Result<()> {
    // nlmsghdr (16) + tcmsg (20) + rtattr TCA_KIND "clsact\0" (4 + 7, padded to 12)
    let mut msg = Vec::with_capacity(48);
    let len: u32 = 16 + 20 + 12;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&RTM_DELQDISC.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel assigns ours
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&CLSACT_HANDLE.to_ne_bytes());
    msg.extend_from_slice(&TC_H_CLSACT.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // tcm_info
    msg.extend_from_slice(&(4u16 + 7).to_ne_bytes());
    msg.extend_from_slice(&TCA_KIND.to_ne_bytes());
    msg.extend_from_slice(b"clsact\0\0");
    debug_assert_eq!(msg.len() as u32, len);

    // SAFETY: plain socket calls on a descriptor we own and close.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = (|| {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            if libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            let mut buf = [0u8; 4096];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
                return Err(io::Error::other("unexpected netlink reply"));
            }
            let err = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
            if err != 0 {
                return Err(io::Error::from_raw_os_error(-err));
            }
            Ok(())
        })();
        libc::close(fd);
        r
    }
}
