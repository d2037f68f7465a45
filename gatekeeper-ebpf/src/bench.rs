//! Programs for `cargo xtask bench`, kept out of the product's object:
//! bare XDP_DROP and XDP_PASS to compare the gate against, and XDP_TX, which turns
//! `BPF_PROG_TEST_RUN` live frames into a line-rate traffic source.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn bare_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn transmit(_ctx: XdpContext) -> u32 {
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
