//! The floor for `cargo xtask bench`: programs at sockacct's attach points (cgroup_skb
//! ingress/egress, tc ingress/egress) that do nothing but return. What they cost is what
//! any program there costs; the bench shows sockacct's figures against them.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};

#[cgroup_skb(ingress)]
pub fn sockacct_floor_ingress(_ctx: SkBuffContext) -> i32 {
    1
}

#[cgroup_skb(egress)]
pub fn sockacct_floor_egress(_ctx: SkBuffContext) -> i32 {
    1
}

#[classifier]
pub fn sockacct_floor_tc_ingress(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[classifier]
pub fn sockacct_floor_tc_egress(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
