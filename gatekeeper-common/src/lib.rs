//! What the XDP program and userspace must agree on: map layouts, the knock
//! prefix, the frame parser and the packet decision.
//!
//! The crate is `no_std` so the XDP program can use it; the `user` feature
//! adds `aya::Pod` for the map types so userspace can read and write them.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod decide;
pub mod knock;
pub mod maps;
pub mod parse;
pub mod ratelimit;

#[cfg(feature = "user")]
mod pod;

/// IP protocol numbers the gate understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}
