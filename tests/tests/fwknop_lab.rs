//! The stock fwknop client (Debian's `fwknop-client`) against the real
//! daemon: enrolled with `client add --fwknop`, knocking over each carrier
//! it offers, from IPv4 and IPv6, with replays and wrong keys refused and
//! audited. Needs root (namespaces, XDP, fwknop's raw sockets).

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use gatekeeper_tests::{
    fwknop,
    lab::{Daemon, Lab, Role, eventually, gw},
};

const KNOCK_PORT: u16 = 62201;
const PROTECT: &str = "tcp/22-23,udp/5353,icmp";
/// An unprotected port on the gateway where the test answers fwknop's
/// `-R` question (what is my address?).
const RESOLVER_PORT: u16 = 8080;
const RESOLVER_URL: &str = "http://10.77.0.1:8080/";

/// A lab with an echo service on tcp/22, client `laptop` enrolled with
/// fwknop keys and allowed tcp/22, its `.fwknoprc` written into the
/// scratch directory, and the daemon started with `config` (a
/// `--config` file's text) if any.
fn lab_with_fwknop_client(config: Option<&str>) -> Result<(Lab, Daemon, PathBuf, String)> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    lab.init()?;
    let cred = lab.scratch().join("laptop.credential.toml");
    let cred = cred.to_str().context("utf-8 path")?;
    let said = lab.state_cli(&[
        "client", "add", "laptop", "--allow", "tcp/22", "--fwknop", "--out", cred,
    ])?;
    let (rc, stanza) = fwknop::write_stanza(&lab, &said, "laptop")?;
    assert!(stanza.contains("SPA_SERVER          10.77.0.1"), "{stanza}");
    let mut args = vec!["--protect".to_string(), PROTECT.to_string()];
    if let Some(text) = config {
        let path = lab.scratch().join("gatekeeper.toml");
        std::fs::write(&path, text)?;
        args.extend(["--config".to_string(), path.to_str().context("utf-8 path")?.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = lab.start_daemon(&args)?;
    Ok((lab, daemon, rc, stanza))
}

/// Runs the stock fwknop client on the client's host with `rc`'s stanza
/// `laptop` and `extra` arguments; the packet it made.
fn fwknop(lab: &Lab, rc: &Path, extra: &[&str]) -> Result<Vec<u8>> {
    fwknop::knock(lab, Role::Client, rc, "laptop", extra)
}

/// Waits (bounded) for an audit line that `wanted` picks, and returns it.
fn audited(lab: &Lab, what: &str, wanted: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value> {
    let mut found = None;
    eventually(Duration::from_secs(5), || {
        found = lab.audit()?.into_iter().find(|l| wanted(l));
        Ok(found.is_some())
    })?;
    found.with_context(|| format!("no audit line for {what}: {:?}", lab.audit()))
}

/// Whether the client reaches the echo service on tcp/22 within a few
/// seconds.
fn client_gets_in(lab: &Lab, to: SocketAddr) -> Result<bool> {
    eventually(Duration::from_secs(5), || lab.tcp_echo_works(Role::Client, to, None))
}

#[test]
fn the_stock_fwknop_client_knocks_with_the_stanza_it_was_given() -> Result<()> {
    let (lab, _daemon, rc, stanza) = lab_with_fwknop_client(None)?;

    // The real client, unchanged, lets the device in, and nobody else.
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "closed before the knock"
    );
    let packet = fwknop(&lab, &rc, &[])?;
    assert!(
        client_gets_in(&lab, gw(22))?,
        "fwknop's knock did not open tcp/22: {:?}",
        lab.audit()?
    );
    assert!(
        !lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "the intruder still sees nothing"
    );
    let line = audited(&lab, "the knock", |l| l["result"] == "accepted")?;
    assert_eq!(line["format"], "fwknop", "{line}");
    assert_eq!(line["carrier"], "udp", "{line}");
    assert_eq!(line["client"], "laptop", "{line}");
    assert_eq!(line["request"]["access"], "tcp/22", "{line}");

    // The same packet again, from the client and from the intruder: replays.
    lab.send_udp(Role::Client, gw(KNOCK_PORT), packet.clone())?;
    lab.send_udp(Role::Intruder, gw(KNOCK_PORT), packet)?;
    audited(&lab, "the replays", |l| {
        l["reason"] == "replay" || l["reasons"]["replay"].as_u64().is_some()
    })?;
    assert!(
        !lab.tcp_echo_works(Role::Intruder, gw(22), None)?,
        "a replay opened nothing"
    );

    // The right HMAC key with another encryption key: authenticated, then
    // refused by name; another HMAC key: nobody's packet, refused as such.
    let replace = |field: &str, value: &str| -> Result<String> {
        let line = stanza
            .lines()
            .find(|l| l.starts_with(field))
            .with_context(|| format!("no {field}"))?;
        Ok(stanza.replace(line, &format!("{field:<20}{value}")))
    };
    gatekeeper::private_file::write(
        &rc,
        &replace("KEY_BASE64", "YW5vdGhlciBlbmNyeXB0aW9uIGtleSwgMzIgYnl0ZXM=")?,
    )?;
    fwknop(&lab, &rc, &[])?;
    let line = audited(&lab, "the wrong key", |l| l["reason"] == "bad_payload")?;
    assert_eq!(line["client"], "laptop", "{line}");
    gatekeeper::private_file::write(
        &rc,
        &replace(
            "HMAC_KEY_BASE64",
            "YW5vdGhlciBITUFDIGtleSwgaXQgaXMgYWxzbyAzMiBieXRlcyBsb25nIQ==",
        )?,
    )?;
    fwknop(&lab, &rc, &[])?;
    let line = audited(&lab, "the wrong HMAC key", |l| l["reason"] == "unknown_key")?;
    assert_eq!(line["format"], "fwknop", "{line}");
    assert!(line["client"].is_null(), "nobody's packet names no client: {line}");
    Ok(())
}

/// Answers fwknop's `-R` question on the gateway: the body is the address
/// the request came from, as its own resolver service does. Serves up to
/// `n` requests, each within the lab's life.
fn serve_what_is_my_address(lab: &Lab, n: usize) -> Result<()> {
    let listener = lab.in_ns(Role::Gateway, || TcpListener::bind(("0.0.0.0", RESOLVER_PORT)))??;
    listener.set_nonblocking(false)?;
    std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut conn, peer)) = listener.accept() else {
                return;
            };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut request = [0u8; 1024];
            let _ = conn.read(&mut request);
            let body = peer.ip().to_string();
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}

#[test]
fn every_carrier_of_the_stock_client_opens_the_gate() -> Result<()> {
    let (lab, _daemon, rc, stanza) = lab_with_fwknop_client(Some("[knock]\nfwknop_tcp = true\n"))?;
    serve_what_is_my_address(&lab, 1)?;
    // A device that asks a resolver for its address has no `ALLOW_IP`.
    let resolving = lab.scratch().join("fwknoprc-resolving");
    gatekeeper::private_file::write(&resolving, &stanza.replace("ALLOW_IP            source\n", ""))?;
    // The stanza says `ALLOW_IP source`, which fwknop sends as 0.0.0.0.
    let knocks: [(&str, &Path, &[&str], &str, &str); 4] = [
        // A SYN with the packet in it: nothing answers it.
        (
            "tcpraw",
            &rc,
            &["-P", "tcpraw", "-A", "tcp/22", "-a", "10.77.0.2"],
            "tcp",
            "10.77.0.2",
        ),
        // Echo replies, fwknop's default ICMP type, and echo requests.
        ("icmp", &rc, &["-P", "icmp"], "icmp", "0.0.0.0"),
        (
            "icmp echo request",
            &rc,
            &["-P", "icmp", "--icmp-type", "8"],
            "icmp",
            "0.0.0.0",
        ),
        // A connection the daemon reads (`[knock] fwknop_tcp`), with the
        // address to open asked of a resolver first.
        (
            "tcp and -R",
            &resolving,
            &["-P", "tcp", "-R", "--resolve-http-only", "--resolve-url", RESOLVER_URL],
            "tcp",
            "10.77.0.2",
        ),
    ];
    let accepted = || -> Result<Vec<serde_json::Value>> {
        Ok(lab.audit()?.into_iter().filter(|l| l["result"] == "accepted").collect())
    };
    for (i, (name, rc, args, carrier, allow_ip)) in knocks.into_iter().enumerate() {
        fwknop(&lab, rc, args)?;
        let arrived = eventually(Duration::from_secs(5), || Ok(accepted()?.len() > i))?;
        anyhow::ensure!(arrived, "{name} was not accepted: {:?}", lab.audit()?);
        let line = &accepted()?[i];
        assert_eq!(line["format"], "fwknop", "{name}: {line}");
        assert_eq!(line["carrier"], carrier, "{name}: {line}");
        assert_eq!(line["request"]["allow_ip"], allow_ip, "{name}: {line}");
    }
    assert!(client_gets_in(&lab, gw(22))?, "tcp/22 is open to the client");
    assert!(!lab.tcp_echo_works(Role::Intruder, gw(22), None)?, "and to nobody else");
    Ok(())
}

#[test]
fn a_packet_from_an_ipv6_source_opens_for_that_source() -> Result<()> {
    let (lab, _daemon, rc, _) = lab_with_fwknop_client(None)?;
    // fwknop's client sends over IPv4 only; its packet, made with `--test`,
    // travels here over IPv6 as it would from any other sender.
    let packet = fwknop(&lab, &rc, &["--test"])?;
    let gw6 = |port| SocketAddr::new(IpAddr::V6(Role::Gateway.addr6()), port);
    assert!(
        !lab.tcp_echo_works(Role::Client, gw6(22), None)?,
        "closed before the knock"
    );
    lab.send_udp(Role::Client, gw6(KNOCK_PORT), packet)?;
    let line = audited(&lab, "the IPv6 knock", |l| l["result"] == "accepted")?;
    assert_eq!(line["src"], Role::Client.addr6().to_string(), "{line}");
    assert!(client_gets_in(&lab, gw6(22))?, "tcp/22 over IPv6: {line}");
    assert!(
        !lab.tcp_echo_works(Role::Client, gw(22), None)?,
        "the client's IPv4 address was not named, so it stays closed"
    );
    Ok(())
}

/// An access.conf as a gateway running fwknopd might have it: a device
/// with base64 keys, one restricted to a network with text keys, and a
/// GPG device without an HMAC key.
const ACCESS_CONF: &str = "\
# /etc/fwknop/access.conf
SOURCE                  ANY
OPEN_PORTS              tcp/22
KEY_BASE64              Zndrbm9wIGltcG9ydDogYSAzMi1ieXRlIGtleSEhISE=
HMAC_KEY_BASE64         Zndrbm9wIGltcG9ydDogdGhlIEhNQUMga2V5LCBzaXh0eS1mb3VyIGJ5dGVzIG9mIGl0IGF0IGxlYXN0ISEhIQ==
FW_ACCESS_TIMEOUT       60
REQUIRE_SOURCE_ADDRESS  Y

SOURCE                  10.77.0.0/24
OPEN_PORTS              tcp/22, udp/5353
KEY                     passphrase-of-the-second-device
HMAC_KEY                hmac-passphrase-of-the-second-device
ACCESS_EXPIRE           12/31/2099

SOURCE                  ANY
OPEN_PORTS              tcp/22
GPG_REMOTE_ID           7234ABCD
GPG_DECRYPT_ID          EBCD1234
";

/// `gatekeeper import fwknop FILE ARGS --json` on the lab's state: its
/// exit code and what it said.
fn import(lab: &Lab, file: &Path, args: &[&str]) -> Result<(Option<i32>, serde_json::Value)> {
    let out = std::process::Command::new(gatekeeper_tests::lab::gatekeeper_bin()?)
        .args(["import", "fwknop"])
        .arg(file)
        .args(args)
        .arg("--json")
        .arg("--state-dir")
        .arg(lab.state_dir())
        .output()?;
    let said = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("import said: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok((out.status.code(), said))
}

#[test]
fn an_access_conf_imports_and_its_devices_knock_unchanged() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    lab.init()?;
    let conf = lab.scratch().join("access.conf");
    std::fs::write(&conf, ACCESS_CONF)?;

    // A dry run says what would happen and writes nothing.
    let (code, said) = import(&lab, &conf, &["--dry-run"])?;
    assert_eq!(code, Some(1), "stanzas were refused: {said}");
    assert_eq!(said["imported"][0]["name"], "fwknop-1", "{said}");
    assert_eq!(said["imported"][0]["open_for_secs"], 60, "FW_ACCESS_TIMEOUT: {said}");
    let notes = said["imported"][0]["notes"].to_string();
    assert!(notes.contains("REQUIRE_SOURCE_ADDRESS"), "{said}");
    let refused = said["refused"].to_string();
    assert!(refused.contains("--any-source") && refused.contains("GPG"), "{said}");
    assert!(
        !lab.state_cli(&["client", "list"])?.contains("fwknop-1"),
        "a dry run wrote a client"
    );

    // For real, with the networked device let in from anywhere.
    let (code, said) = import(&lab, &conf, &["--any-source"])?;
    assert_eq!(code, Some(1), "the GPG stanza is still refused: {said}");
    assert_eq!(said["imported"].as_array().map(Vec::len), Some(2), "{said}");
    assert_eq!(said["imported"][1]["allow"], "tcp/22,udp/5353", "{said}");
    assert_eq!(said["imported"][1]["expires"], "2099-12-31T00:00:00Z", "{said}");
    assert_eq!(said["refused"][0]["line"], 15, "{said}");
    let (_, again) = import(&lab, &conf, &["--any-source"])?;
    assert!(
        again["imported"].as_array().is_some_and(Vec::is_empty),
        "imported twice: {again}"
    );

    // Each device knocks with its old stanza and gets in: the first for
    // its FW_ACCESS_TIMEOUT, the second for what it asks (`-f 5`), which
    // may shorten the default, never lengthen it.
    let _daemon = lab.start_daemon(&["--protect", PROTECT])?;
    let devices = [
        (
            "KEY_BASE64 Zndrbm9wIGltcG9ydDogYSAzMi1ieXRlIGtleSEhISE=\nHMAC_KEY_BASE64 Zndrbm9wIGltcG9ydDogdGhlIEhNQUMga2V5LCBzaXh0eS1mb3VyIGJ5dGVzIG9mIGl0IGF0IGxlYXN0ISEhIQ==\n",
            &[][..],
            60,
        ),
        (
            "KEY passphrase-of-the-second-device\nHMAC_KEY hmac-passphrase-of-the-second-device\n",
            &["-f", "5"][..],
            5,
        ),
    ];
    for (n, (keys, extra, for_secs)) in devices.iter().enumerate() {
        let rc = lab.scratch().join(format!("device{n}.fwknoprc"));
        let stanza = format!("[laptop]\nSPA_SERVER 10.77.0.1\nACCESS tcp/22\nALLOW_IP 10.77.0.2\nUSE_HMAC Y\n{keys}");
        gatekeeper::private_file::write(&rc, &stanza)?;
        fwknop(&lab, &rc, extra)?;
        let name = format!("fwknop-{}", n + 1);
        let line = audited(&lab, &name, |l| {
            l["client"] == name.as_str() && l["result"] == "accepted"
        })?;
        assert_eq!(line["opened"]["for_secs"], *for_secs, "{line}");
        if n == 0 {
            // The gate's entry lasts the minute, not the default 30 s.
            let list: serde_json::Value = serde_json::from_str(&lab.cli_ok(&["whitelist", "list", "--json"])?)?;
            let ttl = list.to_string();
            let ttl_ms = list
                .as_array()
                .or(list["entries"].as_array())
                .and_then(|e| e.first())
                .and_then(|e| e["ttl_ms"].as_u64())
                .with_context(|| format!("no entry: {ttl}"))?;
            assert!((45_000..=60_000).contains(&ttl_ms), "{ttl}");
        }
    }
    assert!(client_gets_in(&lab, gw(22))?, "the imported devices got in");
    Ok(())
}
