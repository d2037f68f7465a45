//! Channels between devices in namespaces, as operators run them: the
//! real `gatekeeper channel run` on each, TPROXY capture and
//! re-origination in the kernel, the gate in front of the inbound port,
//! and the peers users have: OpenSSH, Tongsuo (an independent RFC 8998
//! implementation), tshark reading the suite off the wire.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gatekeeper::channel::header::Origin;
use gatekeeper_tests::{
    channel::{CHANNEL_PORT, ChannelLab, Sshd, device, inbound, on_the_wire, outbound, tongsuo},
    lab::{Lab, Role, eventually},
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tunnel::tls::Fingerprint;

fn beta() -> String {
    Role::Gateway.addr().to_string()
}

/// The SM2 certificate fingerprint of a role's channel identity.
fn sm2_fingerprint(cl: &ChannelLab, role: Role) -> Result<Fingerprint> {
    let pem = std::fs::read(format!("{}/sm2.crt", cl.dir(role)))?;
    Ok(Fingerprint::of(&CertificateDer::from_pem_slice(&pem)?))
}

/// `ping` through whatever listens at `to`, from a role.
fn echoes(lab: &Lab, from: Role, to: &str) -> Result<bool> {
    lab.tcp_echo_works(from, to.parse()?, None)
}

#[test]
fn ssh_to_the_real_address_is_captured_carried_under_sm_and_sshd_logs_the_original_client() -> Result<()> {
    let cl = ChannelLab::new()?;
    let lab = &cl.lab;
    // beta is a gateway: its channel port and its sshd sit behind the gate.
    let credential = lab.enroll("alpha", &["--allow", &format!("tcp/{CHANNEL_PORT}")])?;
    let _gate = lab.start_daemon(&["--protect", &format!("tcp/22,tcp/{CHANNEL_PORT}")])?;
    let sshd = Sshd::start(lab, Role::Gateway)?;
    let _beta = cl.run(
        Role::Gateway,
        &inbound(
            "ssh",
            CHANNEL_PORT,
            "127.0.0.1:22",
            "sm",
            &["alpha"],
            "source = \"client\"\n",
        ),
    )?;
    let capture = format!("capture = \"{}:22/tcp\"", beta());
    let knock = format!("knock = {:?}\n", credential.display().to_string());
    let _alpha = cl.run(
        Role::Client,
        &outbound("ssh", &capture, "beta", CHANNEL_PORT, "sm", &knock),
    )?;

    let suites = on_the_wire(
        lab,
        Role::Gateway,
        CHANNEL_PORT,
        "tls.handshake.type == 2",
        &["tls.handshake.ciphersuite"],
        || {
            let out = sshd.ssh(lab, Role::Client, &beta(), "echo through-the-channel")?;
            ensure!(
                String::from_utf8_lossy(&out.stdout).contains("through-the-channel"),
                "ssh failed: {}\nsshd: {}",
                String::from_utf8_lossy(&out.stderr),
                sshd.log()
            );
            Ok(())
        },
    )?;
    ensure!(
        suites.trim() == "0x00c6",
        "the ServerHello on the wire chose {suites:?}, not TLS_SM4_GCM_SM3"
    );

    // sshd, on loopback, saw the connection come from alpha's own address
    // and the very port ssh used there.
    let opened = cl.events(Role::Client, "channel_open")?;
    let client = opened.first().context("alpha audited no channel")?["client"]
        .as_str()
        .context("client")?
        .parse::<SocketAddr>()?;
    ensure!(client.ip() == Role::Client.addr(), "{client}");
    let accepted = format!(
        "Accepted publickey for root from {} port {}",
        client.ip(),
        client.port()
    );
    ensure!(
        sshd.log().contains(&accepted),
        "sshd logged no {accepted:?}:\n{}",
        sshd.log()
    );
    ensure!(
        cl.opened(Role::Gateway, "alpha", "TLS_SM4_GCM_SM3")?,
        "{:?}",
        cl.audit(Role::Gateway)?
    );
    // Without a knock, the intruder reaches neither sshd nor the channel.
    for port in [22, CHANNEL_PORT] {
        let to = SocketAddr::new(Role::Gateway.addr().into(), port);
        ensure!(
            lab.tcp_connect(Role::Intruder, to, None, Duration::from_millis(500))?
                .is_none(),
            "the intruder reached {to}"
        );
    }
    Ok(())
}

#[test]
fn tongsuo_interoperates_as_server_and_as_client_under_sm() -> Result<()> {
    let tongsuo = tongsuo()?;
    let mut cl = ChannelLab::new()?;
    cl.lab.serve_tcp_echo(Role::Gateway, 9000)?;
    let lab = &cl.lab;
    let limit = Duration::from_secs(20);
    // Tongsuo's own SM2 identity, certificate signed under the default ID.
    tongsuo.run(
        lab,
        None,
        &["ecparam", "-genkey", "-name", "SM2", "-out", "ts.key"],
        b"",
        limit,
    )?;
    let made = tongsuo.run(
        lab,
        None,
        &[
            "req",
            "-new",
            "-x509",
            "-key",
            "ts.key",
            "-out",
            "ts.crt",
            "-days",
            "1",
            "-subj",
            "/CN=tongsuo",
            "-sm3",
            "-sigopt",
            "distid:1234567812345678",
        ],
        b"",
        limit,
    )?;
    ensure!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let ts_crt = lab.scratch().join("ts.crt").display().to_string();
    for role in [Role::Client, Role::Gateway] {
        cl.gatekeeper(&["channel", "pair", "--dir", &cl.dir(role), "--name", "tongsuo", &ts_crt])?;
    }

    // Tongsuo serves, once under each SM suite; alpha's outbound channel
    // is its client.
    for (suite, code, port) in [("TLS_SM4_GCM_SM3", "0x00c6", 9443), ("TLS_SM4_CCM_SM3", "0x00c7", 9444)] {
        let server_log = lab.scratch().join(format!("ts-server-{port}.log"));
        let accept = port.to_string();
        let _server = tongsuo.spawn(
            lab,
            Role::Gateway,
            &[
                "s_server",
                "-accept",
                &accept,
                "-cert",
                "ts.crt",
                "-key",
                "ts.key",
                "-tls1_3",
                "-ciphersuites",
                suite,
                "-groups",
                "SM2",
                "-naccept",
                "1",
            ],
            &server_log,
        )?;
        let entry = "listen = \"127.0.0.1:6000\"";
        let _alpha = cl.run(Role::Client, &outbound("to-tongsuo", entry, "tongsuo", port, "sm", ""))?;
        let printed = || Ok::<_, anyhow::Error>(String::from_utf8_lossy(&std::fs::read(&server_log)?).into_owned());
        let suites = on_the_wire(
            lab,
            Role::Gateway,
            port,
            "tls.handshake.type == 2",
            &["tls.handshake.ciphersuite"],
            || {
                let mut app = lab
                    .tcp_connect(Role::Client, "127.0.0.1:6000".parse()?, None, Duration::from_secs(2))?
                    .context("alpha's local service")?;
                app.write_all(b"hello-tongsuo\n")?;
                let arrived = eventually(Duration::from_secs(10), || Ok(printed()?.contains("hello-tongsuo")))?;
                ensure!(arrived, "Tongsuo's server printed: {}", printed()?);
                Ok(())
            },
        )?;
        ensure!(
            suites.trim() == code,
            "{suite}: the ServerHello on the wire chose {suites:?}"
        );
        ensure!(printed()?.contains(&format!("CIPHER is {suite}")), "{}", printed()?);
    }

    // beta's inbound channel serves; Tongsuo is the client, with its
    // certificate pinned on beta and the connection header ahead of its data.
    let _beta = cl.run(
        Role::Gateway,
        &inbound("from-tongsuo", CHANNEL_PORT, "127.0.0.1:9000", "sm", &["tongsuo"], ""),
    )?;
    let mut input = Origin {
        client: "10.77.0.2:40000".parse()?,
        destination: "10.77.0.1:9000".parse()?,
    }
    .encode();
    input.extend_from_slice(b"ping-from-tongsuo\n");
    let connect = format!("{}:{CHANNEL_PORT}", beta());
    let client = tongsuo.run(
        lab,
        Some(Role::Client),
        &[
            "s_client",
            "-connect",
            &connect,
            "-cert",
            "ts.crt",
            "-key",
            "ts.key",
            "-tls1_3",
            "-ciphersuites",
            "TLS_SM4_GCM_SM3",
            "-groups",
            "SM2",
            "-sigalgs",
            "sm2sig_sm3",
        ],
        &input,
        limit,
    )?;
    let said = String::from_utf8_lossy(&client.stdout);
    ensure!(said.contains("Cipher is TLS_SM4_GCM_SM3"), "{said}");
    ensure!(
        said.contains("ping-from-tongsuo"),
        "no echo through beta's channel: {said}"
    );
    ensure!(
        cl.opened(Role::Gateway, "tongsuo", "TLS_SM4_GCM_SM3")?,
        "{:?}",
        cl.audit(Role::Gateway)?
    );
    Ok(())
}

#[test]
fn a_policy_mismatch_or_an_unpinned_peer_is_refused_and_audited_and_other_traffic_passes() -> Result<()> {
    let mut cl = ChannelLab::new()?;
    cl.lab.serve_tcp_echo(Role::Gateway, 9000)?;
    cl.lab.serve_tcp_echo(Role::Gateway, 9001)?;
    cl.pair(Role::Intruder, Role::Gateway)?;
    let lab = &cl.lab;
    let _beta = cl.run(
        Role::Gateway,
        &inbound("echo", CHANNEL_PORT, "127.0.0.1:9000", "sm", &["alpha"], ""),
    )?;
    let outbound = |name: &str, entry: &str, policy: &str| outbound(name, entry, "beta", CHANNEL_PORT, policy, "");
    let _alpha = cl.run(
        Role::Client,
        &[
            outbound("captured", &format!("capture = \"{}:9002/tcp\"", beta()), "sm"),
            outbound("aes", "listen = \"127.0.0.1:6001\"", "tls13-aes"),
        ]
        .concat(),
    )?;
    let _mallory = cl.run(Role::Intruder, &outbound("sneak", "listen = \"127.0.0.1:6002\"", "sm"))?;

    // beta has nothing on 9002: only the capture can make it answer.
    ensure!(
        echoes(lab, Role::Client, &format!("{}:9002", beta()))?,
        "the captured connection"
    );
    // Traffic no channel names passes untouched, and beta's channel never sees it.
    ensure!(
        echoes(lab, Role::Client, &format!("{}:9001", beta()))?,
        "a direct connection"
    );
    ensure!(cl.events(Role::Gateway, "channel_open")?.len() == 1);

    ensure!(
        !echoes(lab, Role::Client, "127.0.0.1:6001")?,
        "a tls13-aes peer got through an sm channel"
    );
    ensure!(
        !echoes(lab, Role::Intruder, "127.0.0.1:6002")?,
        "an unpinned peer got through"
    );
    // Both refusals are audited (the writer may lag a moment behind).
    let both = eventually(Duration::from_secs(5), || {
        Ok(cl.events(Role::Gateway, "channel_refused")?.len() >= 2)
    })?;
    ensure!(both, "{:?}", cl.events(Role::Gateway, "channel_refused")?);
    let refused = cl.events(Role::Gateway, "channel_refused")?;
    let by_policy = refused
        .iter()
        .find(|l| {
            l["remote"]
                .as_str()
                .is_some_and(|r| r.starts_with(&format!("{}:", Role::Client.addr())))
        })
        .context("no refusal of alpha's tls13-aes channel")?;
    ensure!(by_policy["policy"] == "sm", "{by_policy}");
    let offered: Vec<&str> = by_policy["offered"]
        .as_array()
        .context("offered")?
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    ensure!(
        offered == ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"],
        "{by_policy}"
    );
    ensure!(
        by_policy["reason"] == "policy"
            && by_policy["detail"]
                .as_str()
                .is_some_and(|r| r.contains("no suite of policy \"sm\"")),
        "{by_policy}"
    );
    let failed = eventually(Duration::from_secs(5), || {
        Ok(cl
            .events(Role::Client, "channel_failed")?
            .iter()
            .any(|l| l["channel"] == "aes"))
    })?;
    ensure!(failed, "alpha did not audit its refused channel");

    let mallory = sm2_fingerprint(&cl, Role::Intruder)?.to_string();
    let unpinned = refused
        .iter()
        .find(|l| {
            l["remote"]
                .as_str()
                .is_some_and(|r| r.starts_with(&format!("{}:", Role::Intruder.addr())))
        })
        .context("no refusal of mallory")?;
    ensure!(
        unpinned["reason"] == "unpinned" && unpinned["detail"].as_str().is_some_and(|r| r.contains(&mallory)),
        "the refusal does not name mallory's certificate {mallory}: {unpinned}"
    );
    ensure!(device(Role::Intruder) == "mallory");
    Ok(())
}

/// Accepts connections on a role's loopback port; each one's source
/// address and first bytes are sent down the channel returned.
fn record(lab: &Lab, role: Role, port: u16) -> Result<mpsc::Receiver<(SocketAddr, Vec<u8>)>> {
    let listener = lab.in_ns(role, move || TcpListener::bind(("127.0.0.1", port)))??;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (mut conn, from) in listener
            .incoming()
            .flatten()
            .filter_map(|c| c.peer_addr().ok().map(|a| (c, a)))
            .take(4)
        {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut first = vec![0u8; 256];
            let n = conn.read(&mut first).unwrap_or(0);
            first.truncate(n);
            let _ = conn.write_all(b"ok");
            if tx.send((from, first)).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

#[test]
fn backends_see_the_channel_or_a_proxy_v2_header_as_the_inbound_channel_says() -> Result<()> {
    let cl = ChannelLab::new()?;
    let lab = &cl.lab;
    let plain = record(lab, Role::Gateway, 9100)?;
    let proxied = record(lab, Role::Gateway, 9101)?;
    let _beta = cl.run(
        Role::Gateway,
        &[
            inbound("plain", 7440, "127.0.0.1:9100", "tls13-chacha", &["alpha"], ""),
            inbound(
                "proxied",
                7441,
                "127.0.0.1:9101",
                "tls13-aes",
                &["alpha"],
                "source = \"proxy-v2\"\n",
            ),
        ]
        .concat(),
    )?;
    let _alpha = cl.run(
        Role::Client,
        &[
            outbound("plain", "listen = \"127.0.0.1:6010\"", "beta", 7440, "tls13-chacha", ""),
            outbound("proxied", "listen = \"127.0.0.1:6011\"", "beta", 7441, "tls13-aes", ""),
        ]
        .concat(),
    )?;
    let mut apps = Vec::new();
    for port in [6010, 6011] {
        let mut app = lab
            .tcp_connect(
                Role::Client,
                SocketAddr::from(([127, 0, 0, 1], port)),
                None,
                Duration::from_secs(2),
            )?
            .context("alpha's local service")?;
        ensure!(round_trip_ok(&mut app)?, "no answer through port {port}");
        apps.push(app.local_addr()?);
    }
    let (from, first) = plain.recv_timeout(Duration::from_secs(5))?;
    ensure!(from.ip().is_loopback() && first == b"hello", "{from} {first:?}");
    let (_, first) = proxied.recv_timeout(Duration::from_secs(5))?;
    let origin = Origin::decode(&first)?;
    // The application on alpha, exactly: its address and port.
    ensure!(origin.client == apps[1], "{origin:?}, not {}", apps[1]);
    ensure!(origin.destination == "127.0.0.1:6011".parse()?, "{origin:?}");
    let suites: Vec<String> = cl
        .events(Role::Gateway, "channel_open")?
        .iter()
        .filter_map(|l| l["suite"].as_str().map(String::from))
        .collect();
    ensure!(
        suites.contains(&"TLS_CHACHA20_POLY1305_SHA256".to_string()),
        "{suites:?}"
    );
    ensure!(suites.iter().any(|s| s.starts_with("TLS_AES_")), "{suites:?}");
    Ok(())
}

/// Sends `hello`; the recording backend answers `ok`.
fn round_trip_ok(app: &mut std::net::TcpStream) -> Result<bool> {
    app.write_all(b"hello")?;
    let mut got = [0u8; 2];
    Ok(app.read_exact(&mut got).is_ok() && &got == b"ok")
}

#[test]
fn garbage_truncated_tls_and_strangers_on_a_channel_port_harm_no_channel() -> Result<()> {
    let mut cl = ChannelLab::new()?;
    cl.lab.serve_tcp_echo(Role::Gateway, 9000)?;
    let lab = &cl.lab;
    let mut beta = cl.run(
        Role::Gateway,
        &inbound("echo", CHANNEL_PORT, "127.0.0.1:9000", "sm", &["alpha"], ""),
    )?;
    let _alpha = cl.run(
        Role::Client,
        &outbound("echo", "listen = \"127.0.0.1:6000\"", "beta", CHANNEL_PORT, "sm", ""),
    )?;
    let port = SocketAddr::new(Role::Gateway.addr().into(), CHANNEL_PORT);
    // A real ClientHello (rustls, TLS 1.3), cut short.
    let hello = {
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), "beta".try_into()?)?;
        let mut bytes = Vec::new();
        conn.write_tls(&mut bytes)?;
        bytes
    };
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for payload in [noise.clone(), hello[..hello.len() / 2].to_vec(), hello.clone()] {
        let mut s = lab
            .tcp_connect(Role::Intruder, port, None, Duration::from_secs(2))?
            .context("the channel port")?;
        let _ = s.write_all(&payload);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // TLS clients outside the policy: curl, and one offering TLS 1.2 only.
    let curl = lab.exec(
        Role::Intruder,
        &["sh", "-c", &format!("curl -sk -m 3 https://{port}/ || true")],
    )?;
    ensure!(curl.stdout.is_empty(), "curl got an answer: {:?}", curl.stdout);
    let tls12 = lab.exec(
        Role::Intruder,
        &[
            "sh",
            "-c",
            &format!("openssl s_client -connect {port} -tls1_2 </dev/null 2>&1 || true"),
        ],
    )?;
    ensure!(
        !String::from_utf8_lossy(&tls12.stdout).contains("Cipher is TLS"),
        "TLS 1.2 got through"
    );

    ensure!(beta.running(), "beta's channels died: {}", beta.log());
    ensure!(
        echoes(lab, Role::Client, "127.0.0.1:6000")?,
        "alpha's channel stopped working"
    );
    let reasons = eventually(Duration::from_secs(5), || {
        let refused = cl.events(Role::Gateway, "channel_refused")?;
        let has = |r: &str| refused.iter().any(|l| l["reason"] == r);
        Ok(has("not_tls") && has("policy"))
    })?;
    ensure!(reasons, "{:?}", cl.events(Role::Gateway, "channel_refused")?);
    Ok(())
}
