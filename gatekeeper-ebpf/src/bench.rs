//! Programs for `cargo xtask bench`, kept out of the product's object:
//! bare XDP_DROP and XDP_PASS to compare the gate against, and XDP_TX, which turns
//! `BPF_PROG_TEST_RUN` live frames into a line-rate traffic source.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, helpers::bpf_get_prandom_u32, macros::xdp, programs::XdpContext};

#[xdp]
pub fn bare_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn transmit(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// XDP_TX, giving an untagged IPv4 frame a random source address inside
/// its first octet's /8 on every frame, so one live-frames run floods from
/// a fresh source per packet, as a spoofing attacker would. The IP
/// checksum is left stale: the gate under test drops these frames before
/// anything checks it.
#[xdp]
pub fn transmit_spray(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 34 > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: no preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    // SAFETY: the 34 header bytes were bounds-checked above.
    unsafe {
        *((start + 27) as *mut u8) = (r >> 16) as u8;
        *((start + 28) as *mut u8) = (r >> 8) as u8;
        *((start + 29) as *mut u8) = r as u8;
    }
    xdp_action::XDP_TX
}

/// What any XDP program costs a veth's throughput, before the gate's own work.
#[xdp]
pub fn bare_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
