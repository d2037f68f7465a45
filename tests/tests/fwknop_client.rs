//! fwknop's packet format against the stock client (Debian's
//! fwknop-client 2.6.10): what it makes with `--test` (built, not sent)
//! opens under the right keys with the fields it printed, and its command
//! and NAT messages are refused by name. Needs no root.

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context, Result, ensure};
use base64::{Engine, engine::general_purpose::STANDARD};
use gatekeeper::{
    knock::fwknop::{FwknopError, FwknopKey, Packet, Spa},
    spec::{PortRange, Proto},
};

const KEY: &[u8] = b"a key for the fwknop format test";
const HMAC_KEY: &[u8] = b"an hmac key for the fwknop format test, of sixty-four bytes....";

/// The packet `fwknop ARGS` builds for 127.0.0.1 with the test's keys.
fn packet(args: &[&str]) -> Result<String> {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let scratch = std::env::temp_dir().join(format!("gk-fwknop-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    // Its own rc file, so the client never writes into root's home.
    let rc: PathBuf = scratch.join("fwknoprc");
    let out = Command::new("fwknop")
        .arg("--rc-file")
        .arg(&rc)
        .args(["-D", "127.0.0.1", "--use-hmac", "--test", "-v"])
        .args(["--key-base64-rijndael", &STANDARD.encode(KEY)])
        .args(["--key-base64-hmac", &STANDARD.encode(HMAC_KEY)])
        .args(args)
        .output()
        .context("running fwknop (`cargo xtask setup` installs fwknop-client)")?;
    let _ = std::fs::remove_dir_all(&scratch);
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "fwknop {args:?} failed: {text}");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Final SPA Data: "))
        .map(str::to_string)
        .with_context(|| format!("fwknop printed no packet: {text}"))
}

fn open(packet: &str) -> Result<Spa, FwknopError> {
    let key = FwknopKey::new(KEY, HMAC_KEY);
    let split = Packet::split(packet.as_bytes())?;
    if !split.authenticated_by(&key) {
        return Err(FwknopError::Unauthenticated);
    }
    split.open(&key)
}

#[test]
fn access_requests_open_with_their_fields() -> Result<()> {
    let one = open(&packet(&["-A", "tcp/22", "-a", "192.0.2.7"])?)?;
    assert_eq!(one.message_type, 1);
    assert_eq!(one.allow_ip, "192.0.2.7".parse::<std::net::IpAddr>()?);
    assert_eq!(one.access, vec![(Proto::Tcp, PortRange { lo: 22, hi: 22 })]);
    assert_eq!(one.version, "3.0.0");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    assert!(one.timestamp.abs_diff(now) < 60, "{}", one.timestamp);

    let several = open(&packet(&[
        "-A",
        "tcp/22,udp/53",
        "-a",
        "192.0.2.7",
        "--fw-timeout",
        "45",
    ])?)?;
    assert_eq!(several.message_type, 3);
    assert_eq!(several.client_timeout, Some(45));
    assert_eq!(
        several.access,
        vec![
            (Proto::Tcp, PortRange { lo: 22, hi: 22 }),
            (Proto::Udp, PortRange { lo: 53, hi: 53 })
        ]
    );

    // -s: "open for wherever the packet comes from".
    let source = open(&packet(&["-A", "tcp/22", "-s"])?)?;
    assert_eq!(source.allow_ip, "0.0.0.0".parse::<std::net::IpAddr>()?);

    // A fresh salt and random value each time: two packets for the same request differ.
    assert_ne!(
        packet(&["-A", "tcp/22", "-a", "192.0.2.7"])?,
        packet(&["-A", "tcp/22", "-a", "192.0.2.7"])?
    );
    Ok(())
}

#[test]
fn commands_nat_requests_and_other_keys_are_refused() -> Result<()> {
    let command = open(&packet(&["--server-cmd", "/bin/true", "-a", "192.0.2.7"])?);
    assert!(matches!(command, Err(FwknopError::MessageType(0, _))), "{command:?}");
    let nat = open(&packet(&["-A", "tcp/22", "-a", "192.0.2.7", "-N", "10.0.0.5:22"])?);
    assert!(matches!(nat, Err(FwknopError::MessageType(2, _))), "{nat:?}");

    let sent = packet(&["-A", "tcp/22", "-a", "192.0.2.7"])?;
    let split = Packet::split(sent.as_bytes())?;
    assert!(!split.authenticated_by(&FwknopKey::new(KEY, b"another hmac key")));
    let wrong_key = FwknopKey::new(b"another encryption key, 32 bytes", HMAC_KEY);
    assert!(split.authenticated_by(&wrong_key), "the HMAC key alone authenticates");
    assert!(split.open(&wrong_key).is_err(), "only the right key decrypts");
    Ok(())
}
