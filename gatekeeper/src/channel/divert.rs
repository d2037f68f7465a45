//! The kernel side of transparency, set up when channels start and taken
//! down when they stop (and at the next start, after a crash):
//!
//! - capture: connections this host's applications open to a captured
//!   destination are marked on their way out (nftables, `output`), routed
//!   back into the host by the mark (a policy rule to a table whose only
//!   route is `local`), and handed by TPROXY to the outbound channel's
//!   transparent listener, whose accepted socket still carries the
//!   original destination as its local address. Only the exact
//!   (address, port, tcp) is marked: other traffic passes untouched.
//! - re-origination: an inbound channel with `source = "client"` connects
//!   to its loopback backend from the client's address; the backend's
//!   replies to that address are routed back into the host by a policy
//!   rule for loopback sources, where they reach the channel's socket.
//!
//! nftables is driven through `nft -f -` (its stable interface) and the
//! policy rules through `ip`, both run as one transaction each.

use std::{
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
};

use thiserror::Error;
use tracing::warn;

/// The nftables table that holds every rule channels add.
const TABLE: &str = "gatekeeper_channel";
/// The packet mark of captured connections, and the routing table it selects.
const CAPTURE_MARK: u32 = 0x6b7e;
/// The routing table that returns a loopback backend's replies to the host.
const RETURN_TABLE: u32 = 0x6b7f;

#[derive(Debug, Error)]
pub enum DivertError {
    #[error("running `{command}` (install nftables and iproute2)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// One captured destination and the transparent listener that takes it.
#[derive(Clone, Copy, Debug)]
pub struct Captured {
    pub destination: SocketAddr,
    pub listener: SocketAddr,
}

/// The rules in place; dropping it removes them.
#[derive(Debug)]
pub struct Diverted {
    capture: bool,
    reoriginate: bool,
}

/// Puts the rules for `captured` destinations and, if `reoriginate`, for
/// re-originated connections in place, replacing any a crashed run left.
/// Rules added before a failure are removed again.
pub fn install(captured: &[Captured], reoriginate: bool) -> Result<Diverted, DivertError> {
    remove_all();
    let diverted = Diverted {
        capture: !captured.is_empty(),
        reoriginate,
    };
    if diverted.capture {
        let mut marks = String::new();
        let mut proxies = String::new();
        for c in captured {
            let (ip, port) = (c.destination.ip(), c.destination.port());
            marks += &format!("    ip daddr {ip} tcp dport {port} meta mark set {CAPTURE_MARK:#x}\n");
            proxies += &format!(
                "    meta mark {CAPTURE_MARK:#x} ip daddr {ip} tcp dport {port} tproxy ip to {}\n",
                c.listener
            );
        }
        let ruleset = format!(
            "table ip {TABLE} {{\n  chain output {{\n    type route hook output priority mangle; policy accept;\n{marks}  }}\n  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n{proxies}  }}\n}}\n"
        );
        run("nft", &["-f", "-"], Some(&ruleset))?;
        let mark = format!("{CAPTURE_MARK:#x}");
        route_into_host(&["fwmark", &mark], CAPTURE_MARK)?;
    }
    if reoriginate {
        route_into_host(&["from", "127.0.0.0/8", "iif", "lo"], RETURN_TABLE)?;
    }
    Ok(diverted)
}

impl Drop for Diverted {
    fn drop(&mut self) {
        if self.capture || self.reoriginate {
            remove_all();
        }
    }
}

/// Removes whatever channels may have added; absent rules are no error.
fn remove_all() {
    let quiet = |args: &[&str], program: &str| {
        let _ = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    quiet(&["delete", "table", "ip", TABLE], "nft");
    for table in [CAPTURE_MARK, RETURN_TABLE] {
        let t = table.to_string();
        // A rule may have been added more than once by runs that crashed.
        for _ in 0..8 {
            let gone = Command::new("ip")
                .args(["rule", "del", "lookup", &t])
                .stderr(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true);
            if gone {
                break;
            }
        }
        quiet(&["route", "flush", "table", &t], "ip");
    }
}

/// A policy rule sending what `selector` matches to `table`, whose one
/// route delivers every address inside the host.
fn route_into_host(selector: &[&str], table: u32) -> Result<(), DivertError> {
    let table = table.to_string();
    let rule: Vec<&str> = ["rule", "add"]
        .into_iter()
        .chain(selector.iter().copied())
        .chain(["lookup", table.as_str()])
        .collect();
    run("ip", &rule, None)?;
    run(
        "ip",
        &["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", &table],
        None,
    )
}

/// Runs `program args`, with `input` on its standard input.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<(), DivertError> {
    let command = format!("{program} {}", args.join(" "));
    let spawn = |source| DivertError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        warn!(command, input, "the kernel refused a channel rule");
        return Err(DivertError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
