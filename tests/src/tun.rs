//! A tun device in a lab namespace, driven by the test the way a VPN
//! daemon drives one: packets written to it arrive at the host as if
//! received on the device, bare IP with no Ethernet header, and what the
//! host routes out of it is read back.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::lab::{Lab, Role};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

pub struct Tun {
    file: File,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Creates tun device `name` in a role's namespace with `local` and
    /// the point-to-point `peer` address (`10.90.0.1`, `10.90.0.2`), up.
    pub fn create(lab: &Lab, role: Role, name: &str, local: &str, peer: &str) -> Result<Tun> {
        let ifname = name.to_string();
        let file = lab.in_ns(role, move || -> Result<File> {
            let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: IFF_TUN | IFF_NO_PI,
                _pad: [0; 22],
            };
            req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
            // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
            if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
                return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
            }
            Ok(file)
        })??;
        lab.exec(role, &["ip", "addr", "add", local, "peer", peer, "dev", name])?;
        lab.exec(role, &["ip", "link", "set", name, "up"])?;
        Ok(Tun { file })
    }

    /// Hands the host one packet, as received on the device.
    pub fn send(&mut self, packet: &[u8]) -> Result<()> {
        self.file.write_all(packet)?;
        Ok(())
    }

    /// The first packet the host sends out of the device that `wanted`
    /// accepts, or `None` when none comes within `limit`.
    pub fn receive(&mut self, limit: Duration, wanted: impl Fn(&[u8]) -> bool) -> Result<Option<Vec<u8>>> {
        let end = Instant::now() + limit;
        let mut buf = vec![0u8; 65536];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let mut fds = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut fds, 1, left.as_millis().max(1) as libc::c_int) };
            if ready < 0 {
                bail!("poll: {}", std::io::Error::last_os_error());
            }
            if ready == 0 {
                break;
            }
            let n = self.file.read(&mut buf)?;
            if wanted(&buf[..n]) {
                return Ok(Some(buf[..n].to_vec()));
            }
        }
        Ok(None)
    }
}
