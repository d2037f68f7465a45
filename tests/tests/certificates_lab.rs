//! The portal's certificate as strangers meet it: obtained from Pebble, an
//! ACME CA, by TLS-ALPN-01 on the portal's own port; checked by curl and
//! headless Chromium trusting Pebble's root and nothing else, and by
//! testssl.sh; renewed while sessions are up. Needs root.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gatekeeper_tests::{
    lab::{ChildGuard, Daemon, Lab, Role, eventually, output_within, round_trip},
    pebble::Pebble,
};

const NAME: &str = "portal.lab.test";
const PORTAL: &str = "10.77.0.1:443";
const UPSTREAM_PORT: u16 = 9000;
const GUIDANCE_MARK: &str = "This gateway is private";
const LIMIT: Duration = Duration::from_secs(90);

/// Where the daemon finds the CA: its directory URL and the root of its API.
struct Ca {
    directory: String,
    trust: PathBuf,
}

/// The daemon with the portal, its certificate from `ca`; `extra` is
/// added to `[portal.acme]`.
fn start_daemon(lab: &Lab, ca: &Ca, extra: &str) -> Result<Daemon> {
    let config = lab.scratch().join("acme.toml");
    std::fs::write(
        &config,
        format!(
            "[portal]\nhsts = \"365d\"\n\n[portal.acme]\ndirectory = \"{}\"\ncontact = \"mailto:ops@lab.test\"\ndomains = [\"{NAME}\"]\ntrust = \"{}\"\n{extra}",
            ca.directory,
            ca.trust.display()
        ),
    )?;
    let upstream = format!("127.0.0.1:{UPSTREAM_PORT}");
    let mut daemon = lab.start_daemon(&[
        "--protect",
        "all",
        "--portal",
        PORTAL,
        "--portal-upstream",
        &upstream,
        "--config",
        config.to_str().context("utf-8 path")?,
    ])?;
    daemon.wait_for("portal listening", LIMIT)?;
    Ok(daemon)
}

/// The serials of the certificates the portal was given, oldest first.
fn obtained(lab: &Lab) -> Result<Vec<String>> {
    Ok(lab
        .audit()?
        .iter()
        .filter(|l| l["event"] == "certificate_obtained")
        .filter_map(|l| l["serial"].as_str().map(str::to_string))
        .collect())
}

fn wait_obtained(lab: &Lab, count: usize) -> Result<Vec<String>> {
    let got = eventually(LIMIT, || Ok(obtained(lab)?.len() >= count))?;
    let failures: Vec<_> = lab
        .audit()?
        .into_iter()
        .filter(|l| l["event"] == "certificate_renewal_failed")
        .collect();
    ensure!(got, "no certificate number {count} from the CA; failures: {failures:?}");
    obtained(lab)
}

/// curl from the client, checking the chain against `root` alone (no -k):
/// the body, then the status, HTTP version and HSTS header.
fn curl(lab: &Lab, root: &Path) -> Result<(String, String)> {
    let resolve = format!("{NAME}:443:10.77.0.1");
    let url = format!("https://{NAME}/");
    let out = lab.exec(
        Role::Client,
        &[
            "curl",
            "-s",
            "--max-time",
            "15",
            "--cacert",
            root.to_str().context("utf-8")?,
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_code} %{http_version} %header{strict-transport-security}",
            &url,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, tail) = text.rsplit_once('\n').context("curl printed nothing")?;
    Ok((body.to_string(), tail.to_string()))
}

/// The portal's certificate as the status shows it.
fn served(lab: &Lab) -> Result<serde_json::Value> {
    let status: serde_json::Value = serde_json::from_str(&lab.state_cli(&["status", "--json"])?)?;
    status["certificates"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["serves"] == serde_json::json!(["portal"])))
        .cloned()
        .with_context(|| format!("no portal certificate in {status}"))
}

/// Headless Chromium in the client's namespace, with its own home whose
/// NSS database trusts `root` (when given) and nothing else; the page's DOM.
fn chromium(lab: &Lab, what: &str, root: Option<&Path>) -> Result<String> {
    let home = lab.scratch().join(format!("chromium-{what}"));
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db)?;
    let db_arg = format!("sql:{}", db.display());
    let certutil = |args: &[&str]| -> Result<()> {
        let ok = Command::new("certutil")
            .args(args)
            .stdout(Stdio::null())
            .status()?
            .success();
        ensure!(ok, "certutil {args:?} failed (Debian package libnss3-tools)");
        Ok(())
    };
    certutil(&["-N", "-d", &db_arg, "--empty-password"])?;
    if let Some(root) = root {
        certutil(&[
            "-A",
            "-d",
            &db_arg,
            "-t",
            "C,,",
            "-n",
            "lab ACME root",
            "-i",
            root.to_str().context("utf-8")?,
        ])?;
    }
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(Role::Client),
            "chromium",
            "--headless",
            "--no-sandbox",
        ])
        .args(["--disable-gpu", "--no-first-run"])
        .arg(format!("--user-data-dir={}", home.join("profile").display()))
        .arg(format!("--host-resolver-rules=MAP {NAME} 10.77.0.1"))
        .args(["--dump-dom", &format!("https://{NAME}/")])
        .env("HOME", &home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting chromium")?;
    Ok(String::from_utf8_lossy(&output_within(child, Duration::from_secs(60))?.stdout).into_owned())
}

/// testssl.sh's findings for the portal, trusting `root`.
fn testssl(lab: &Lab, root: &Path) -> Result<Vec<serde_json::Value>> {
    let report = lab.scratch().join("testssl.json");
    let root = root.to_str().context("utf-8")?;
    let report_arg = report.to_str().context("utf-8")?;
    let url = format!("https://{NAME}/");
    let args = [
        "timeout",
        "240",
        "testssl",
        "--quiet",
        "--color",
        "0",
        "--warnings",
        "off",
        "--ip",
        "10.77.0.1",
        "--add-ca",
        root,
        "-S",
        "-P",
        "--jsonfile",
        report_arg,
        &url,
    ];
    let ns = lab.ns(Role::Client);
    let mut full = vec!["ip", "netns", "exec", ns.as_str()];
    full.extend_from_slice(&args);
    // testssl.sh exits non-zero when it has findings to report.
    let _ = Command::new(full[0])
        .args(&full[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let text = std::fs::read_to_string(&report).context("testssl.sh wrote no report (Debian package testssl.sh)")?;
    Ok(serde_json::from_str(&text)?)
}

#[test]
fn the_portal_obtains_a_certificate_browsers_trust_and_renews_it_under_live_sessions() -> Result<()> {
    let mut lab = Lab::new()?;
    let pebble = Pebble::start(&mut lab, &[NAME], Role::Gateway)?;
    let ca = Ca {
        directory: pebble.directory(),
        trust: pebble.api_root.clone(),
    };
    let cred = lab.enroll("laptop", &["--allow", "tcp/443"])?;
    lab.serve_tcp_echo(Role::Gateway, UPSTREAM_PORT)?;
    let mut daemon = start_daemon(&lab, &ca, "")?;
    let first = wait_obtained(&lab, 1)?;
    let root = lab.scratch().join("pebble-root.pem");
    std::fs::write(&root, pebble.issuing_root(&lab)?)?;
    for file in ["acme/portal.key", "acme/portal.crt", "acme/account.json"] {
        let mode = std::fs::metadata(lab.state_dir().join(file))?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "{file} is {mode:o}");
    }

    // curl trusts Pebble's root alone, speaks HTTP/2, and is told to keep
    // to HTTPS.
    let (body, tail) = curl(&lab, &root)?;
    ensure!(body.contains(GUIDANCE_MARK), "{body}");
    ensure!(
        tail == "200 2 max-age=31536000",
        "status, HTTP version and HSTS: {tail}"
    );

    // Chromium trusting Pebble's root shows the page; without it, not.
    let dom = chromium(&lab, "trusting", Some(&root))?;
    ensure!(dom.contains(GUIDANCE_MARK), "Chromium trusting the root: {dom}");
    let dom = chromium(&lab, "untrusting", None)?;
    ensure!(
        !dom.contains(GUIDANCE_MARK),
        "Chromium without the root is stopped at the certificate"
    );

    let cert = served(&lab)?;
    ensure!(cert["subject"] == format!("CN={NAME}").as_str(), "{cert}");
    let logged = format!("pin={}", cert["pin"].as_str().context("pin")?);
    ensure!(
        daemon
            .log()
            .lines()
            .any(|l| l.contains("portal listening") && l.contains(&logged)),
        "the pin logged at start, before the CA's certificate came, is the one it certifies: {cert}"
    );
    ensure!(
        cert["issuer"].as_str().is_some_and(|i| i.contains("Pebble"))
            && cert["problem"].is_null()
            && cert["renews_at"].is_u64(),
        "the status shows the CA's certificate: {cert}"
    );

    // testssl.sh, trusting Pebble's root: nothing about the certificate or
    // the configuration is "NOT ok", and the server picks the cipher.
    let findings = testssl(&lab, &root)?;
    let bad: Vec<_> = findings
        .iter()
        .filter(|f| f["finding"].as_str().is_some_and(|t| t.contains("NOT ok")))
        .collect();
    ensure!(bad.is_empty(), "testssl.sh: {bad:?}");
    let finding = |id: &str| {
        findings.iter().find(|f| f["id"] == id).map(|f| {
            (
                f["severity"].as_str().unwrap_or("").to_string(),
                f["finding"].as_str().unwrap_or("").to_string(),
            )
        })
    };
    ensure!(
        finding("cert_commonName").is_some_and(|(_, cn)| cn == NAME),
        "{:?}",
        finding("cert_commonName")
    );
    ensure!(
        finding("cert_chain_of_trust").is_some_and(|(s, _)| s == "OK"),
        "{:?}",
        finding("cert_chain_of_trust")
    );
    ensure!(
        finding("cipher_order").is_some_and(|(s, _)| s == "OK"),
        "{:?}",
        finding("cipher_order")
    );

    // Renewal under live sessions: renew_before leaves the certificate
    // some 40 s from now, so the portal renews during this session.
    let (cert_pem, key_pem) = (
        std::fs::read_to_string(lab.state_dir().join("acme/portal.crt"))?,
        std::fs::read_to_string(lab.state_dir().join("acme/portal.key"))?,
    );
    let summary = tunnel::tls::Identity::from_pem(&cert_pem, &key_pem)?.summary()?;
    let before = summary.not_after - gatekeeper::clock::unix_now() - 40;
    daemon.stop()?;
    let mut daemon = start_daemon(&lab, &ca, &format!("renew_before = \"{before}s\"\n"))?;
    let pin = served(&lab)?["pin"].as_str().context("pin")?.to_string();
    let cred_arg = cred.to_str().context("utf-8")?;
    let _proxy = ChildGuard::new(lab.spawn_gatekeeper(
        Role::Client,
        &[
            "portal",
            "--credential",
            cred_arg,
            "-L",
            "127.0.0.1:8443",
            "--fingerprint",
            &pin,
            PORTAL,
        ],
    )?);
    let local: SocketAddr = "127.0.0.1:8443".parse()?;
    let mut live = None;
    eventually(Duration::from_secs(10), || {
        live = lab.tcp_connect(Role::Client, local, None, Duration::from_secs(5))?;
        Ok(live.is_some())
    })?;
    let mut live = live.context("the portal client never listened")?;
    ensure!(
        round_trip(&mut live, b"before the renewal\n")?,
        "a session through the portal"
    );
    let renewed = wait_obtained(&lab, 2)?;
    ensure!(renewed[1] != first[0], "a new certificate: {renewed:?}");
    ensure!(round_trip(&mut live, b"after the renewal\n")?, "the session carries on");
    let mut fresh = lab
        .tcp_connect(Role::Client, local, None, Duration::from_secs(5))?
        .context("no second session")?;
    ensure!(
        round_trip(&mut fresh, b"a new session\n")?,
        "a new session meets the new certificate, with the same key pin"
    );
    let now = served(&lab)?;
    ensure!(
        now["pin"] == pin.as_str() && now["issuer"].as_str().is_some_and(|i| i.contains("Pebble")),
        "{now}"
    );

    // The CA gone and the certificate due at once: the renewal fails, is
    // audited and shown, and the CA's certificate stays served.
    daemon.stop()?;
    drop(pebble);
    let summary = tunnel::tls::Identity::from_pem(
        &std::fs::read_to_string(lab.state_dir().join("acme/portal.crt"))?,
        &key_pem,
    )?
    .summary()?;
    // Renewal due a second after issue (a longer renew_before than the
    // lifetime would count as unset).
    let overdue = summary.not_after - summary.not_before - 1;
    let _daemon = start_daemon(&lab, &ca, &format!("renew_before = \"{overdue}s\"\n"))?;
    let failed = eventually(LIMIT, || {
        Ok(lab
            .audit()?
            .iter()
            .any(|l| l["event"] == "certificate_renewal_failed" && l["reason"].is_string()))
    })?;
    ensure!(failed, "the failed renewal is audited");
    let shown = served(&lab)?;
    ensure!(
        shown["problem"].as_str().is_some_and(|p| !p.is_empty())
            && shown["issuer"].as_str().is_some_and(|i| i.contains("Pebble")),
        "status shows the problem and the CA's certificate: {shown}"
    );
    let (body, tail) = curl(&lab, &root)?;
    ensure!(
        body.contains(GUIDANCE_MARK) && tail.starts_with("200 "),
        "still trusted: {tail}"
    );
    Ok(())
}
