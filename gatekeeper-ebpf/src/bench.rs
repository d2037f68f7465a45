//! Programs for `cargo xtask bench`, kept out of the product's object:
//! bare XDP_DROP and XDP_PASS to compare the gate against, and XDP_TX, which turns
//! `BPF_PROG_TEST_RUN` live frames into a line-rate traffic source.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

#[xdp]
pub fn bare_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn transmit(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// How many sources `transmit_spray` cycles through.
const SPRAY_SOURCES: u32 = 1000;

#[map]
static SPRAY: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// XDP_TX, rewriting the last two bytes of an untagged IPv4 frame's source
/// address on every frame, so one live-frames run floods from
/// `SPRAY_SOURCES` addresses.
#[xdp]
pub fn transmit_spray(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 34 > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(n) = SPRAY.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a per-CPU slot; the 34 header bytes were bounds-checked above.
    unsafe {
        let i = (*n + 1) % SPRAY_SOURCES;
        *n = i;
        *((start + 28) as *mut u8) = (i >> 8) as u8;
        *((start + 29) as *mut u8) = i as u8;
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
