//! Lets aya read and write the shared map types from userspace.

use crate::maps::{AllowValue, Config, Event, KnockBucket, WhitelistKey, WhitelistValue};

// SAFETY: each type is `#[repr(C)]`, made only of integers and byte arrays,
// with every padding byte spelled out as a field, so any bit pattern is valid.
unsafe impl aya::Pod for WhitelistKey {}
unsafe impl aya::Pod for WhitelistValue {}
unsafe impl aya::Pod for AllowValue {}
unsafe impl aya::Pod for KnockBucket {}
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for Event {}
