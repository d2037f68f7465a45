//! Line-rate traffic for floods and drop rates: an XDP_TX program of the
//! bench object (`gatekeeper-ebpf/src/bench.rs`), run by the kernel on live
//! frames (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`), pushes
//! frames out of the client's veth as a NIC would: far more than any
//! socket sender reaches.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};

use crate::lab::{Lab, Role};

/// However long a caller keeps asking for more, a transmission ends here.
const LONGEST: Duration = Duration::from_secs(120);

/// The bench programs (bare drop and pass, the XDP_TX transmitters), built
/// next to the product's object by the gatekeeper crate.
pub fn bench_object() -> Result<Ebpf> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/bpfel-unknown-none/release/bench-programs");
    Ebpf::load_file(&path).with_context(|| format!("loading {} (built with the gatekeeper crate)", path.display()))
}

/// The XDP program `name` of a loaded object.
pub fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    Ok(prog)
}

/// Pushes frames out of the client's veth with live frames run through
/// `program` (`transmit`, or `transmit_spray` for a fresh random source
/// per frame): each of `frames` `repeat` times in turn, one pass, then
/// more passes while `more` stays set, for two minutes at the most.
/// Returns frames sent and the time it took.
pub fn transmit(
    lab: &Lab,
    program: &'static str,
    frames: Vec<Vec<u8>>,
    repeat: u32,
    more: Arc<AtomicBool>,
) -> Result<(u64, Duration)> {
    lab.in_ns(Role::Client, move || -> Result<(u64, Duration)> {
        let mut bench = bench_object()?;
        let tx = xdp(&mut bench, program)?;
        tx.load()?;
        let ifindex = ifindex(Role::Client.iface())?;
        let started = Instant::now();
        let mut sent = 0u64;
        loop {
            for frame in &frames {
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
                let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
                let ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
                let mut opts = TestRunOptions::new();
                opts.data_in = Some(frame);
                opts.ctx_in = Some(&ctx);
                opts.repeat = repeat;
                opts.attrs = TestRunAttrs::new().xdp_live_frames(64);
                tx.test_run(opts)?;
                sent += u64::from(repeat);
            }
            if !more.load(Ordering::Relaxed) || started.elapsed() > LONGEST {
                return Ok((sent, started.elapsed()));
            }
        }
    })?
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}");
    }
    Ok(i)
}
