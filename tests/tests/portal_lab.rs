//! The portal end to end: the daemon serves TLS on the gateway's port 443
//! (the gate, protecting everything else, lets it through) in front of a
//! real HTTP server. Strangers (curl, headless Chromium) get the guidance
//! page; `gatekeeper portal` and `connect --portal` get the upstream;
//! replayed, transplanted, revoked and malformed ClientHellos get the
//! guidance page or a closed connection, and never the upstream. Needs root.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use gatekeeper::{
    knock::{
        credential::Credential,
        send::{Knocker, Request},
    },
    portal::{
        client_hello::{binding_nonce, insert_knock},
        stream::{Knocking, Seal},
    },
    spec::{PortRange, Proto},
};
use gatekeeper_tests::{
    lab::{ChildGuard, Daemon, Lab, Role, eventually, output_within},
    nmap,
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::TlsConnector;

const PORTAL: &str = "10.77.0.1:443";
const UPSTREAM: &str = "127.0.0.1:8080";
/// What only the upstream serves.
const UPSTREAM_MARK: &str = "UPSTREAM-INDEX-5c1e";
const SECRET_MARK: &str = "UPSTREAM-SECRET-93ab";
/// What only the guidance page says.
const GUIDANCE_MARK: &str = "This gateway is private";
const LIMIT: Duration = Duration::from_secs(20);

/// A lab whose gateway runs an HTTP server on loopback and the daemon with
/// the portal in front of it; `laptop` may use the portal.
const WINDOWS_DOWNLOAD: &str = "https://downloads.example/gatekeeper.exe";

fn setup() -> Result<(Lab, Daemon, PathBuf, ChildGuard)> {
    let lab = Lab::new()?;
    let cred = lab.enroll("laptop", &["--allow", "tcp/443"])?;
    let www = lab.scratch().join("www");
    std::fs::create_dir_all(www.join("secret"))?;
    std::fs::write(www.join("index.html"), format!("<h1>{UPSTREAM_MARK}</h1>\n"))?;
    std::fs::write(www.join("secret/page.html"), format!("<p>{SECRET_MARK}</p>\n"))?;
    let upstream = ChildGuard::new(
        Command::new("ip")
            .args(["netns", "exec", &lab.ns(Role::Gateway), "python3", "-m", "http.server"])
            .args(["8080", "--bind", "127.0.0.1", "--directory"])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting python3 -m http.server")?,
    );
    let up_url = format!("http://{UPSTREAM}/");
    ensure!(
        eventually(LIMIT, || Ok(lab
            .exec(Role::Gateway, &["curl", "-sf", "--max-time", "2", &up_url])
            .is_ok()))?,
        "the upstream HTTP server never came up"
    );
    // The guidance page offers the client's downloads.
    let local = lab.scratch().join("portal.toml");
    std::fs::write(
        &local,
        format!(
            "[portal.downloads]\nWindows = \"{WINDOWS_DOWNLOAD}\"\n\"Debian (amd64)\" = \"https://downloads.example/gatekeeper.deb\"\n"
        ),
    )?;
    let mut daemon = lab.start_daemon(&[
        "--protect",
        "all",
        "--portal",
        PORTAL,
        "--portal-upstream",
        UPSTREAM,
        "--config",
        local.to_str().context("utf-8 path")?,
    ])?;
    daemon.wait_for("portal listening", LIMIT)?;
    Ok((lab, daemon, cred, upstream))
}

/// curl from `role`; returns the body and the status code.
fn curl(lab: &Lab, role: Role, args: &[&str]) -> Result<(String, u16)> {
    let mut full = vec!["curl", "-sk", "--max-time", "15", "-o", "-", "-w", "\n%{http_code}"];
    full.extend_from_slice(args);
    let out = lab.exec(role, &full)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
    Ok((body.to_string(), code.trim().parse()?))
}

fn portal_lines(lab: &Lab) -> Result<Vec<serde_json::Value>> {
    Ok(lab.audit()?.into_iter().filter(|l| l["event"] == "portal").collect())
}

fn chromium(lab: &Lab, what: &str, url: &str) -> Result<std::process::Output> {
    let profile = lab.scratch().join(format!("chromium-{}", what.trim_start_matches('-')));
    let profile = format!("--user-data-dir={}", profile.display());
    let ns = lab.ns(Role::Client);
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
        ])
        .args([
            "--ignore-certificate-errors",
            "--no-first-run",
            "--window-size=1024,768",
        ])
        .args([profile.as_str(), what, url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting chromium")?;
    output_within(child, Duration::from_secs(60))
}

/// Pixels of the guidance page's accent colour (#2f6f4f) in a PNG.
fn accent_pixels(png_path: &Path) -> Result<usize> {
    let decoder = png::Decoder::new(std::fs::File::open(png_path)?);
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    let channels = info.color_type.samples();
    ensure!(channels >= 3, "unexpected PNG colour type {:?}", info.color_type);
    Ok(buf[..info.buffer_size()]
        .chunks(channels)
        .filter(|p| p[0].abs_diff(0x2f) < 12 && p[1].abs_diff(0x6f) < 12 && p[2].abs_diff(0x4f) < 12)
        .count())
}

#[test]
fn strangers_get_the_same_guidance_page_whatever_they_ask() -> Result<()> {
    let (lab, mut daemon, _cred, _upstream) = setup()?;
    let requests: [&[&str]; 4] = [
        &["https://10.77.0.1/"],
        &["https://10.77.0.1/admin/login?next=/secret/page.html"],
        &[
            "-X",
            "POST",
            "-d",
            "user=root&password=x",
            "https://10.77.0.1/api/v1/session",
        ],
        &["-X", "DELETE", "https://10.77.0.1/secret/page.html"],
    ];
    let mut pages = Vec::new();
    for args in requests {
        let (body, status) = curl(&lab, Role::Client, args)?;
        assert_eq!(status, 200, "{args:?}");
        assert!(body.contains(GUIDANCE_MARK), "{args:?} got: {body:.200}");
        assert!(
            !body.contains(UPSTREAM_MARK) && !body.contains(SECRET_MARK),
            "{args:?} leaked the upstream"
        );
        pages.push(body);
    }
    assert!(
        pages.windows(2).all(|w| w[0] == w[1]),
        "every request gets the same page"
    );
    let head = lab.exec(
        Role::Client,
        &[
            "curl",
            "-sk",
            "--max-time",
            "15",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "https://10.77.0.1/x",
        ],
    )?;
    let head = String::from_utf8_lossy(&head.stdout).to_ascii_lowercase();
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert!(
        !head.contains("simplehttp") && !head.contains("python"),
        "no upstream header leaks: {head}"
    );

    // openssl s_client, a third stock TLS client, handshakes normally too.
    let openssl = lab.exec(
        Role::Client,
        &[
            "sh",
            "-c",
            "printf 'GET /anything HTTP/1.0\\r\\n\\r\\n' | timeout 15 openssl s_client -connect 10.77.0.1:443 -ign_eof 2>&1",
        ],
    )?;
    let openssl = String::from_utf8_lossy(&openssl.stdout);
    assert!(openssl.contains("TLSv1.3"), "{openssl:.1500}");
    assert!(openssl.contains(GUIDANCE_MARK), "{openssl:.1500}");

    // A real browser: the DOM is the guidance page, its inlined script ran,
    // and the screenshot shows its inlined stylesheet and logo.
    let dom = chromium(&lab, "--dump-dom", "https://10.77.0.1/any/path")?;
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("id=\"gk-guidance\""),
        "the DOM is the guidance page: {dom:.300}"
    );
    assert!(
        dom.contains("<span id=\"gk-host\">10.77.0.1</span>"),
        "the inlined script filled in the host: {dom:.2000}"
    );
    assert!(
        dom.contains(&format!(
            "<a href=\"{WINDOWS_DOWNLOAD}\" rel=\"noreferrer\">Windows</a>"
        )),
        "the page links to the configured downloads: {dom:.3000}"
    );
    let shot = lab.scratch().join("guidance.png");
    chromium(&lab, &format!("--screenshot={}", shot.display()), "https://10.77.0.1/")?;
    let accent = accent_pixels(&shot)?;
    assert!(
        accent > 500,
        "the screenshot shows the styled page ({accent} accent pixels)"
    );

    let scan = nmap::scan(&lab, Role::Intruder, "-sS", "22,443,8080", "10.77.0.1")?;
    assert_eq!(scan.open, vec![443], "only the portal is visible: {scan:?}");
    assert!(scan.closed.is_empty(), "{scan:?}");

    let lines = portal_lines(&lab)?;
    assert!(lines.len() >= 6, "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l["decision"] == "guidance" && l["reason"] == "no_knock"),
        "{lines:?}"
    );
    assert!(daemon.running());
    Ok(())
}

#[test]
fn the_portal_client_reaches_the_upstream() -> Result<()> {
    let (mut lab, mut daemon, cred, _upstream) = setup()?;
    let cred = cred.to_str().context("utf-8 path")?;
    let _client = ChildGuard::new(lab.spawn_gatekeeper(
        Role::Client,
        &["portal", "--credential", cred, "-L", "127.0.0.1:18443", PORTAL],
    )?);
    let local = "http://127.0.0.1:18443/";
    ensure!(
        eventually(LIMIT, || Ok(
            curl(&lab, Role::Client, &[local]).is_ok_and(|(b, _)| b.contains(UPSTREAM_MARK))
        ))?,
        "the upstream never answered through `gatekeeper portal`"
    );
    let (body, status) = curl(&lab, Role::Client, &["http://127.0.0.1:18443/secret/page.html"])?;
    assert_eq!(status, 200);
    assert!(body.contains(SECRET_MARK), "{body}");

    let dom = chromium(&lab, "--dump-dom", local)?;
    assert!(
        String::from_utf8_lossy(&dom.stdout).contains(UPSTREAM_MARK),
        "the browser gets the upstream too"
    );

    // As an ssh ProxyCommand would use it: one session over stdio.
    let mut child = lab.spawn_gatekeeper(Role::Client, &["connect", "--portal", "--credential", cred, PORTAL])?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"GET /secret/page.html HTTP/1.0\r\n\r\n")?;
    let out = output_within(child, LIMIT)?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(SECRET_MARK),
        "connect --portal: {text} / {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let lines = portal_lines(&lab)?;
    let through: Vec<_> = lines.iter().filter(|l| l["decision"] == "upstream").collect();
    assert!(through.len() >= 4, "{lines:?}");
    assert!(
        through
            .iter()
            .all(|l| l["client"] == "laptop" && l["result"] == "accepted" && l["dport"] == 443)
    );

    // A client enrolled with its own upstream (an echo service) while the
    // daemon runs goes there instead of to the web server.
    lab.serve_tcp_echo(Role::Gateway, 9000)?;
    let ops = lab.enroll("ops", &["--allow", "tcp/443", "--portal-upstream", "127.0.0.1:9000"])?;
    let ops = ops.to_str().context("utf-8 path")?;
    // Until the daemon has read the new client, its knock gets the guidance page.
    let echo = || -> Result<std::process::Output> {
        let mut child = lab.spawn_gatekeeper(Role::Client, &["connect", "--portal", "--credential", ops, PORTAL])?;
        child.stdin.take().context("stdin")?.write_all(b"echo me\n")?;
        output_within(child, LIMIT)
    };
    let mut out = echo()?;
    for _ in 0..20 {
        if out.stdout == b"echo me\n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        out = echo()?;
    }
    assert_eq!(out.stdout, b"echo me\n", "{}", String::from_utf8_lossy(&out.stderr));
    let last = portal_lines(&lab)?.pop().context("no portal line")?;
    assert_eq!(
        (&last["client"], &last["upstream"]),
        (&serde_json::json!("ops"), &serde_json::json!("127.0.0.1:9000"))
    );
    assert!(daemon.running());
    Ok(())
}

/// What the test's own knocking client needs inside the client namespace.
struct Knocks {
    knocker: Arc<Knocker>,
    connector: TlsConnector,
}

/// What a knocked ClientHello looked like on the wire, for replaying.
#[derive(Clone, Default)]
struct Capture {
    record: Vec<u8>,
    knock: Vec<u8>,
}

impl Knocks {
    fn new(cred: &Path) -> Result<Knocks> {
        let cred = Credential::load(cred)?;
        let pin = cred
            .tls_fingerprint
            .clone()
            .context("the credential pins the gateway")?
            .parse()?;
        Ok(Knocks {
            knocker: Arc::new(Knocker::new(cred)?),
            connector: TlsConnector::from(tunnel::tls::client_config(pin)?),
        })
    }

    /// A proper knock for this connection's ClientHello, recorded in `capture`.
    async fn honest(&self, capture: Arc<Mutex<Capture>>) -> Result<String> {
        let tcp = TcpStream::connect(PORTAL).await?;
        let local = tcp.local_addr()?;
        let gw = tcp.peer_addr()?.ip();
        let req = Request {
            proto: Proto::Tcp,
            ports: PortRange { lo: 443, hi: 443 },
            source_port: None,
        };
        let payload = self.knocker.payload_from(gw, &req, local);
        let knocker = self.knocker.clone();
        let seal: Seal = Box::new(move |record| {
            let knock = knocker
                .seal_with_nonce(&payload, &binding_nonce(record))
                .map_err(std::io::Error::other)?;
            let knocked = insert_knock(record, &knock).map_err(std::io::Error::other)?;
            *capture.lock().map_err(|_| std::io::Error::other("poisoned"))? = Capture {
                record: knocked,
                knock: knock.clone(),
            };
            Ok(knock)
        });
        self.get(Knocking::new(seal, tcp)).await
    }

    /// A stock ClientHello carrying `knock` as is.
    async fn carrying(&self, knock: Vec<u8>) -> Result<String> {
        let tcp = TcpStream::connect(PORTAL).await?;
        let seal: Seal = Box::new(move |_| Ok(knock));
        self.get(Knocking::new(seal, tcp)).await
    }

    /// GET / over TLS on `io`; the whole response.
    async fn get<S: AsyncRead + AsyncWrite + Unpin>(&self, io: S) -> Result<String> {
        let name = ServerName::try_from("10.77.0.1")?.to_owned();
        let mut tls = timeout(LIMIT, self.connector.connect(name, io)).await??;
        tls.write_all(b"GET / HTTP/1.0\r\nHost: portal\r\n\r\n").await?;
        let mut body = Vec::new();
        timeout(LIMIT, tls.read_to_end(&mut body)).await??;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// Sends raw `bytes` to the portal, half-closes, and waits for the portal
/// to close; what it sent back.
async fn raw(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(PORTAL).await?;
    tcp.write_all(bytes).await?;
    tcp.shutdown().await?;
    let mut back = Vec::new();
    match timeout(LIMIT, tcp.read_to_end(&mut back)).await {
        Ok(_) => Ok(back),
        Err(_) => bail!("the portal kept a malformed connection open past {LIMIT:?}"),
    }
}

/// Splits one record into two, each with its own header.
fn two_records(record: &[u8]) -> Vec<u8> {
    let body = &record[5..];
    let (a, b) = body.split_at(body.len() / 2);
    let mut out = Vec::new();
    for part in [a, b] {
        out.extend_from_slice(&record[..3]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[test]
fn replayed_transplanted_revoked_and_malformed_client_hellos_never_reach_the_upstream() -> Result<()> {
    let (lab, mut daemon, cred, _upstream) = setup()?;
    let cred2 = cred.clone();
    let capture = lab.in_ns(Role::Client, move || -> Result<Capture> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let knocks = Knocks::new(&cred2)?;
            let capture = Arc::new(Mutex::new(Capture::default()));
            let page = knocks.honest(capture.clone()).await?;
            ensure!(
                page.contains(UPSTREAM_MARK),
                "an honest knock reaches the upstream: {page:.300}"
            );
            let captured = capture.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();

            // The captured ClientHello resent from another connection.
            raw(&captured.record).await?;
            // Its knock moved into a fresh ClientHello: the handshake
            // completes, and the page is the guidance page.
            let page = knocks.carrying(captured.knock.clone()).await?;
            ensure!(
                page.contains(GUIDANCE_MARK) && !page.contains(UPSTREAM_MARK),
                "transplanted: {page:.300}"
            );
            // A knock that is not a knock.
            let page = knocks.carrying(vec![0x5a; 120]).await?;
            ensure!(
                page.contains(GUIDANCE_MARK) && !page.contains(UPSTREAM_MARK),
                "garbage knock: {page:.300}"
            );

            // Malformed openings: each gets a closed connection.
            let record = &captured.record;
            let mut lying = record.clone();
            let at = lying
                .windows(2)
                .position(|w| w == [0xff, 0x86])
                .context("the knock extension is in the record")?;
            lying[at + 2..at + 4].copy_from_slice(&0xfff0u16.to_be_bytes());
            let mut oversized = vec![22, 3, 1, 0xff, 0xff];
            oversized.extend_from_slice(&record[5..]);
            let malformed: [(&str, Vec<u8>); 5] = [
                ("truncated", record[..record.len() / 2].to_vec()),
                ("oversized record", oversized),
                ("lying extension length", lying),
                ("two records", two_records(record)),
                ("plain HTTP", b"GET / HTTP/1.1\r\nHost: portal\r\n\r\n".to_vec()),
            ];
            for (what, bytes) in malformed {
                let back = raw(&bytes).await.with_context(|| what.to_string())?;
                ensure!(
                    !String::from_utf8_lossy(&back).contains(UPSTREAM_MARK),
                    "{what}: the upstream answered"
                );
            }
            Ok(captured)
        })
    })??;
    ensure!(!capture.record.is_empty());
    assert!(daemon.running(), "malformed ClientHellos did not bring the daemon down");

    let said = lab.state_cli(&["client", "revoke", "laptop"])?;
    ensure!(said.contains("applied by the running daemon"), "{said}");
    ensure!(
        eventually(LIMIT, || Ok(lab
            .audit()?
            .iter()
            .any(|l| l["event"] == "client_closed" && l["why"] == "revoked")))?,
        "the daemon never took the revocation in"
    );
    let cred2 = cred.clone();
    let page = lab.in_ns(Role::Client, move || -> Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async { Knocks::new(&cred2)?.honest(Arc::default()).await })
    })??;
    assert!(
        page.contains(GUIDANCE_MARK) && !page.contains(UPSTREAM_MARK),
        "a revoked client gets the guidance page: {page:.300}"
    );

    let lines = portal_lines(&lab)?;
    let reasons: Vec<&str> = lines.iter().filter_map(|l| l["reason"].as_str()).collect();
    for reason in ["replay", "unbound", "malformed", "revoked"] {
        assert!(reasons.contains(&reason), "{reason} audited: {reasons:?}");
    }
    assert_eq!(
        lines.iter().filter(|l| l["decision"] == "upstream").count(),
        1,
        "only the honest knock went through: {lines:?}"
    );
    let (body, _) = curl(&lab, Role::Client, &["https://10.77.0.1/"])?;
    assert!(body.contains(GUIDANCE_MARK), "the portal still serves");
    assert!(daemon.running());
    Ok(())
}
