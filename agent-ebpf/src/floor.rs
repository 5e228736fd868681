//! The floor for `cargo xtask bench`: programs at sockacct's attach points (cgroup_skb
//! ingress/egress, tc ingress/egress) that do nothing but return. What they cost is what
//! any program there costs; the bench shows sockacct's figures against them.
//!
//! And a ladder of egress programs that each do a little more of what sockacct_egress
//! does, so the bench can say what each step of the per-packet path costs.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::AtomicOrdering;

use agent_common::{Counters, SockCounters};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, TC_ACT_UNSPEC},
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_socket_cookie, bpf_sk_fullsock, bpf_sk_storage_get},
    macros::{btf_map, cgroup_skb, classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::{SkBuffContext, TcContext},
};

#[btf_map]
static LADDER_SK: SkStorage<SockCounters> = SkStorage::new();

#[map]
static LADDER_EPOCH: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static LADDER_TOTALS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(2, 0);
#[map]
static LADDER_SOCKS: HashMap<u64, SockCounters> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

#[inline(always)]
fn xadd(p: *mut u64, v: u64) {
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// The two atomic adds to a socket's sent counters of `slot`.
#[inline(always)]
fn count(e: *mut SockCounters, slot: usize, len: u64) {
    let base = unsafe { &raw mut (*e).tx as *mut agent_common::Dir };
    // A branch keeps the index a constant for the verifier.
    let d = if slot == 1 {
        unsafe { base.add(1) }
    } else {
        base
    };
    unsafe {
        xadd(&raw mut (*d).bytes, len);
        xadd(&raw mut (*d).packets, 1);
    }
}

/// Step 1: the epoch read and the per-CPU total (two atomic adds).
#[inline(always)]
fn totals(ctx: &SkBuffContext) -> (usize, u64) {
    let slot = match LADDER_EPOCH.get(0) {
        Some(e) if *e & 1 == 1 => 1,
        _ => 0,
    };
    let len = ctx.len() as u64;
    if let Some(c) = LADDER_TOTALS.get_ptr_mut(slot as u32) {
        unsafe {
            xadd(&raw mut (*c).tx_bytes, len);
            xadd(&raw mut (*c).tx_packets, 1);
        }
    }
    (slot, len)
}

#[cgroup_skb(egress)]
pub fn sockacct_ladder1_totals(ctx: SkBuffContext) -> i32 {
    totals(&ctx);
    1
}

/// Step 2: + the socket cookie.
#[cgroup_skb(egress)]
pub fn sockacct_ladder2_cookie(ctx: SkBuffContext) -> i32 {
    totals(&ctx);
    let c = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    core::hint::black_box(c);
    1
}

/// Step 3: + the socket's hash entry (created at the first packet).
#[inline(always)]
fn entry(ctx: &SkBuffContext) -> Option<(*mut SockCounters, usize, u64)> {
    let (slot, len) = totals(ctx);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let e = match LADDER_SOCKS.get_ptr_mut(cookie) {
        Some(e) => e,
        None => {
            let _ = LADDER_SOCKS.insert(cookie, SockCounters::default(), BPF_NOEXIST as u64);
            LADDER_SOCKS.get_ptr_mut(cookie)?
        }
    };
    Some((e, slot, len))
}

#[cgroup_skb(egress)]
pub fn sockacct_ladder3_lookup(ctx: SkBuffContext) -> i32 {
    core::hint::black_box(entry(&ctx));
    1
}

/// Step 4: + the two atomic adds to the socket's counters.
#[cgroup_skb(egress)]
pub fn sockacct_ladder4_count(ctx: SkBuffContext) -> i32 {
    if let Some((e, slot, len)) = entry(&ctx) {
        count(e, slot, len);
    }
    1
}

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

/// The alternative to steps 2-4: the counters in socket-local storage (full socket, then
/// bpf_sk_storage_get, created at the first packet) and the two atomic adds.
#[cgroup_skb(egress)]
pub fn sockacct_ladder5_sk_storage(ctx: SkBuffContext) -> i32 {
    let (slot, len) = totals(&ctx);
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return 1;
    }
    let map = &raw const LADDER_SK as *mut core::ffi::c_void;
    let e = unsafe {
        bpf_sk_storage_get(
            map,
            full.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    } as *mut SockCounters;
    if !e.is_null() {
        count(e, slot, len);
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
