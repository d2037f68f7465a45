//! Key lifecycle end to end: devices that make their own keys and enroll
//! by request and approval, credentials that name the gateway by a DNS
//! name (served by the lab's own resolver: a hosts file only the client's
//! namespace sees), and a rotation of the gateway's knock key that a
//! refreshed device rides through while a stale one is refused once the
//! overlap ends. Real daemon, real CLI in the namespaces. Needs root.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gatekeeper_tests::lab::{Lab, Role, eventually, gatekeeper_bin, gw};
use serde_json::Value;

const GATEWAY_NAME: &str = "gw.lab.test";

/// `gatekeeper ARGS` run by a user on a role's host (`ip netns exec`, so
/// it sees that host's /etc/hosts).
fn on(lab: &Lab, role: Role, args: &[&str]) -> Result<Output> {
    on_with(lab, role, None, args)
}

/// [`on`] with the device's passphrase in the environment, if given.
fn on_with(lab: &Lab, role: Role, passphrase: Option<&str>, args: &[&str]) -> Result<Output> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &lab.ns(role)])
        .arg(gatekeeper_bin()?)
        .args(args);
    if let Some(p) = passphrase {
        c.env("GATEKEEPER_PASSPHRASE", p);
    }
    Ok(c.output()?)
}

/// [`on`], failing unless it succeeds; its stdout.
fn on_ok(lab: &Lab, role: Role, args: &[&str]) -> Result<String> {
    let out = on(lab, role, args)?;
    ensure!(
        out.status.success(),
        "`gatekeeper {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text.trim()).with_context(|| format!("not JSON: {text}"))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 scratch path")
}

/// `gatekeeper init` for the lab's gateway.
fn init(lab: &Lab) -> Result<()> {
    lab.state_cli(&["init", "--public-addr", &Role::Gateway.addr().to_string()])?;
    Ok(())
}

/// A UDP knock for tcp/22 from `role` with `cred`, bound to `sport`.
fn knock(lab: &Lab, role: Role, cred: &Path, sport: u16) -> Result<Output> {
    lab.udp_knock(role, cred, 22, Some(sport), &[])
}

/// Waits (bounded) for the audit line of the knock `client` sent from
/// source port `sport` to tcp/22.
fn knock_line(lab: &Lab, client: &str, sport: u16) -> Result<Value> {
    let mut found = None;
    eventually(Duration::from_secs(5), || {
        found = lab
            .audit()?
            .into_iter()
            .find(|l| l["event"] == "knock" && l["client"] == client && l["request"]["local_port"] == sport);
        Ok(found.is_some())
    })?;
    found.with_context(|| {
        format!(
            "no audit line for {client}'s knock from port {sport}: {:?}",
            lab.audit()
        )
    })
}

/// Whether `role` reaches the gateway's tcp/22 from `sport` (bounded wait).
fn reaches(lab: &Lab, role: Role, sport: u16) -> Result<bool> {
    eventually(Duration::from_secs(2), || lab.tcp_echo_works(role, gw(22), Some(sport)))
}

#[test]
fn device_made_keys_enroll_by_request_and_approval_and_knock_by_name() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    init(&lab)?;
    lab.set_hosts(
        Role::Client,
        &format!("127.0.0.1 localhost\n{} {GATEWAY_NAME}\n", Role::Gateway.addr()),
    )?;

    // The device asks; its key file is made on the device, 0600.
    let key = lab.scratch().join("laptop.key");
    let asked = json(&on_ok(
        &lab,
        Role::Client,
        &[
            "client",
            "request",
            "--key",
            path(&key),
            "--gateway",
            GATEWAY_NAME,
            "--name",
            "laptop",
            "--json",
        ],
    )?)?;
    ensure!(asked["key_made"] == true, "{asked}");
    ensure!(std::fs::metadata(&key)?.permissions().mode() & 0o777 == 0o600);
    let (line, fingerprint) = (
        asked["request"].as_str().context("request")?,
        asked["fingerprint"].as_str().context("fingerprint")?,
    );
    let secret = std::fs::read_to_string(&key)?
        .lines()
        .find_map(|l| l.strip_prefix("secret_key = "))
        .map(|s| s.trim_matches('"').to_string())
        .context("the key file's secret")?;
    ensure!(!line.contains(&secret), "the request carries no secret");

    // A request read back with another fingerprint enrolls nobody.
    let swapped = lab.state_cli(&[
        "client",
        "approve",
        line,
        "--allow",
        "tcp/22",
        "--fingerprint",
        "0000-0000-0000-0000-0000",
    ]);
    let why = format!("{:#}", swapped.err().context("a wrong fingerprint must be refused")?);
    ensure!(why.contains("do not approve"), "{why}");
    let listed = json(&lab.state_cli(&["client", "list", "--json"])?)?;
    ensure!(listed["clients"].as_array().is_some_and(Vec::is_empty), "{listed}");

    let approved = json(&lab.state_cli(&[
        "client",
        "approve",
        line,
        "--allow",
        "tcp/22",
        "--fingerprint",
        fingerprint,
        "--json",
    ])?)?;
    ensure!(approved["enrolled"] == "laptop", "{approved}");
    let credential_line = approved["credential"].as_str().context("credential")?;
    let cred = lab.scratch().join("laptop.credential.toml");
    on_ok(
        &lab,
        Role::Client,
        &[
            "client",
            "install",
            credential_line,
            "--key",
            path(&key),
            "--out",
            path(&cred),
        ],
    )?;
    let installed = std::fs::read_to_string(&cred)?;
    ensure!(
        !installed.contains("secret_key") && installed.contains("key_file") && installed.contains(GATEWAY_NAME),
        "the credential names the key file and the gateway by name, and holds no secret:\n{installed}"
    );
    // The secret exists in one place: the device's key file.
    for entry in std::fs::read_dir(lab.state_dir())?.chain(std::fs::read_dir(lab.state_dir().join("clients"))?) {
        let file = entry?.path();
        if file.is_file() {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            ensure!(!text.contains(&secret), "{} holds the device's secret", file.display());
        }
    }

    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;
    ensure!(!reaches(&lab, Role::Client, 41000)?, "closed before the knock");
    let sent = knock(&lab, Role::Client, &cred, 41001)?;
    ensure!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let line = knock_line(&lab, "laptop", 41001)?;
    ensure!(line["result"] == "accepted", "{line}");
    ensure!(reaches(&lab, Role::Client, 41001)?, "the knock by name opened the way");

    // A name the resolver does not know is named in the error, and nothing is sent.
    let nowhere = lab.scratch().join("nowhere.credential.toml");
    std::fs::write(&nowhere, installed.replace(GATEWAY_NAME, "nowhere.lab.test"))?;
    let lost = knock(&lab, Role::Client, &nowhere, 41002)?;
    let said = String::from_utf8_lossy(&lost.stderr);
    ensure!(
        !lost.status.success() && said.contains("resolving the gateway's name nowhere.lab.test"),
        "{said}"
    );

    // keygen, then the operator enrolls the public key alone.
    let key2 = lab.scratch().join("phone.key");
    let made = json(&on_ok(
        &lab,
        Role::Intruder,
        &["keygen", "--out", path(&key2), "--json"],
    )?)?;
    let public = made["public_key"].as_str().context("public_key")?;
    let again = on(&lab, Role::Intruder, &["keygen", "--out", path(&key2)])?;
    ensure!(!again.status.success(), "keygen never overwrites a key unasked");
    let cred2 = lab.scratch().join("phone.credential.toml");
    lab.state_cli(&[
        "client",
        "add",
        "phone",
        "--public-key",
        public,
        "--allow",
        "tcp/22",
        "--out",
        path(&cred2),
    ])?;
    ensure!(!std::fs::read_to_string(&cred2)?.contains("secret_key"));
    let dup = lab.state_cli(&["client", "add", "tablet", "--public-key", public, "--allow", "tcp/22"]);
    let why = format!("{:#}", dup.err().context("one key, one device")?);
    ensure!(why.contains("already enrolled, as client \"phone\""), "{why}");
    let raw = knock(&lab, Role::Intruder, &cred2, 41003)?;
    ensure!(
        !raw.status.success() && String::from_utf8_lossy(&raw.stderr).contains("client install"),
        "a credential without its key says how to install it: {}",
        String::from_utf8_lossy(&raw.stderr)
    );
    on_ok(
        &lab,
        Role::Intruder,
        &[
            "client",
            "install",
            path(&cred2),
            "--key",
            path(&key2),
            "--out",
            path(&cred2),
        ],
    )?;
    ensure!(!reaches(&lab, Role::Intruder, 41004)?, "closed before its knock");
    ensure!(knock(&lab, Role::Intruder, &cred2, 41004)?.status.success());
    let line = knock_line(&lab, "phone", 41004)?;
    ensure!(line["result"] == "accepted", "{line}");
    ensure!(reaches(&lab, Role::Intruder, 41004)?);

    // The key file encrypted at rest: its secret gone from the disk, and
    // every use needs the passphrase.
    let pass = Some("correct horse battery");
    let sealed = on_with(&lab, Role::Intruder, pass, &["encrypt", path(&key2)])?;
    ensure!(sealed.status.success(), "{}", String::from_utf8_lossy(&sealed.stderr));
    let phone_secret = std::fs::read_to_string(&key2)?;
    ensure!(phone_secret.contains("[encrypted]") && !phone_secret.contains("secret_key"));
    let locked = knock(&lab, Role::Intruder, &cred2, 41005)?;
    let said = String::from_utf8_lossy(&locked.stderr);
    ensure!(
        !locked.status.success() && said.contains("is encrypted: set GATEKEEPER_PASSPHRASE"),
        "{said}"
    );
    let with = |p: &'static str| [("GATEKEEPER_PASSPHRASE", p)];
    let wrong = lab.udp_knock(Role::Intruder, &cred2, 22, None, &with("wrong horse"))?;
    let said = String::from_utf8_lossy(&wrong.stderr);
    ensure!(!wrong.status.success() && said.contains("wrong passphrase"), "{said}");
    let unlocked = lab.udp_knock(Role::Intruder, &cred2, 22, Some(41006), &with("correct horse battery"))?;
    ensure!(
        unlocked.status.success(),
        "{}",
        String::from_utf8_lossy(&unlocked.stderr)
    );
    ensure!(knock_line(&lab, "phone", 41006)?["result"] == "accepted");
    ensure!(
        lab.audit()?.iter().filter(|l| l["client"] == "phone").count() == 2,
        "the locked and the wrongly unlocked knocks sent nothing"
    );

    // Typed once at a prompt (on a terminal), the passphrase is kept in the
    // kernel's keyring: the next knock does not ask; `forget` drops it.
    let key_name = path(&key2);
    let _forget = Forget(&lab, key_name.to_string());
    let typed = at_a_terminal(&lab, &cred2, 41007, "correct horse battery")?;
    ensure!(typed.status.success(), "{}", String::from_utf8_lossy(&typed.stdout));
    ensure!(knock_line(&lab, "phone", 41007)?["result"] == "accepted");
    let kept = knock(&lab, Role::Intruder, &cred2, 41008)?;
    ensure!(kept.status.success(), "{}", String::from_utf8_lossy(&kept.stderr));
    ensure!(knock_line(&lab, "phone", 41008)?["result"] == "accepted");
    let forgot = on_ok(&lab, Role::Intruder, &["forget", key_name])?;
    ensure!(forgot.contains("forgot"), "{forgot}");
    let asks = knock(&lab, Role::Intruder, &cred2, 41009)?;
    ensure!(
        !asks.status.success(),
        "after forget, the passphrase is asked for again"
    );
    Ok(())
}

/// A knock typed by a person at a terminal (a pty from `script`), who
/// answers the passphrase prompt with `passphrase`.
fn at_a_terminal(lab: &Lab, cred: &Path, sport: u16, passphrase: &str) -> Result<Output> {
    let command = format!(
        "ip netns exec {} {} knock --credential {} --proto tcp --port 22 --via udp --source-port {sport}",
        lab.ns(Role::Intruder),
        gatekeeper_bin()?.display(),
        cred.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // The prompt reads the terminal once it is up.
    std::thread::sleep(Duration::from_millis(500));
    std::io::Write::write_all(&mut stdin, format!("{passphrase}\n").as_bytes())?;
    let out = gatekeeper_tests::lab::output_within(child, Duration::from_secs(20))?;
    drop(stdin);
    Ok(out)
}

/// Drops a key file's passphrase from the kernel's keyring when the test
/// ends, however it ends.
struct Forget<'a>(&'a Lab, String);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let _ = on(self.0, Role::Intruder, &["forget", &self.1]);
    }
}

#[test]
fn a_rotation_keeps_a_refreshed_device_and_refuses_a_stale_one_after_the_overlap() -> Result<()> {
    let mut lab = Lab::new()?;
    lab.serve_tcp_echo(Role::Gateway, 22)?;
    let fresh = lab.enroll("fresh", &["--allow", "tcp/22"])?;
    let stale = lab.enroll("stale", &["--allow", "tcp/22"])?;
    let _daemon = lab.start_daemon(&["--protect", "tcp/22"])?;

    let rotated = json(&lab.state_cli(&["rotate-key", "--overlap", "8s", "--json"])?)?;
    ensure!(rotated["applied"] == true, "{rotated}");
    let new_key = rotated["server_public_key"].as_str().context("key")?.to_string();
    let until = rotated["previous_accepted_until"].as_u64().context("until")?;

    // During the overlap both knock; the audit names who still uses the old key.
    ensure!(knock(&lab, Role::Intruder, &stale, 42001)?.status.success());
    let line = knock_line(&lab, "stale", 42001)?;
    ensure!(
        line["result"] == "accepted" && line["server_key"] == "previous",
        "{line}"
    );
    ensure!(reaches(&lab, Role::Intruder, 42001)?);

    // The fresh device's credential is from before key pins: it pins the
    // gateway's whole certificate, and the refresh makes it pin the key.
    let cert = json(&lab.state_cli(&["cert", "show", "--json"])?)?;
    let (key_pin, whole) = (
        cert["pin"].as_str().context("pin")?,
        cert["certificate_sha256"].as_str().context("sha")?,
    );
    let text = std::fs::read_to_string(&fresh)?;
    ensure!(text.contains(key_pin), "new credentials pin the key: {text}");
    gatekeeper::private_file::write(&fresh, &text.replace(key_pin, whole))?;
    let refreshed = json(&on_ok(
        &lab,
        Role::Client,
        &["client", "refresh", "--credential", path(&fresh), "--json"],
    )?)?;
    ensure!(
        refreshed["changed"] == true
            && refreshed["server_public_key"] == new_key.as_str()
            && refreshed["repinned"] == true,
        "{refreshed}"
    );
    ensure!(
        std::fs::read_to_string(&fresh)?.contains(key_pin),
        "it pins the key now"
    );
    ensure!(
        lab.audit()?
            .iter()
            .any(|l| l["event"] == "key_note" && l["result"] == "sent")
    );
    let again = json(&on_ok(
        &lab,
        Role::Client,
        &["client", "refresh", "--credential", path(&fresh), "--json"],
    )?)?;
    ensure!(again["changed"] == false && again["repinned"] == false, "{again}");
    ensure!(knock(&lab, Role::Client, &fresh, 42002)?.status.success());
    let line = knock_line(&lab, "fresh", 42002)?;
    ensure!(
        line["result"] == "accepted" && line.get("server_key").is_none(),
        "{line}"
    );

    // After the overlap: the refreshed device still gets in. The stale
    // one's v2 knocks die in the gate (the retired key's flood tag key left
    // it with the overlap, so a leaked one is dead too); its v1 knocks,
    // whose key id names it, are refused by name. It cannot fetch the note
    // with the old key either.
    let wait = until.saturating_sub(gatekeeper::clock::unix_now()) + 1;
    ensure!(wait <= 10, "the overlap ends within the test's bound");
    std::thread::sleep(Duration::from_secs(wait));
    ensure!(knock(&lab, Role::Client, &fresh, 42003)?.status.success());
    ensure!(knock_line(&lab, "fresh", 42003)?["result"] == "accepted");
    ensure!(reaches(&lab, Role::Client, 42003)?);
    let unknown = |lab: &Lab| -> Result<u64> {
        let stats = json(&lab.cli_ok(&["stats", "--json"])?)?;
        Ok(stats["knock_unknown_key"].as_u64().unwrap_or(0))
    };
    let before = unknown(&lab)?;
    ensure!(knock(&lab, Role::Intruder, &stale, 42004)?.status.success());
    ensure!(
        eventually(Duration::from_secs(3), || Ok(unknown(&lab)? > before))?,
        "the gate drops the stale device's v2 knock by its flood tag"
    );
    ensure!(!reaches(&lab, Role::Intruder, 42004)?, "the stale device stays out");
    let stale_v1 = stale.with_extension("v1.toml");
    let text = std::fs::read_to_string(&stale)?;
    ensure!(text.contains("knock_version = 2\n"), "{text}");
    gatekeeper::private_file::write(&stale_v1, &text.replace("knock_version = 2\n", ""))?;
    ensure!(knock(&lab, Role::Intruder, &stale_v1, 42005)?.status.success());
    let line = knock_line(&lab, "stale", 42005)?;
    ensure!(
        line["result"] == "rejected" && line["reason"] == "retired_server_key",
        "{line}"
    );
    ensure!(!reaches(&lab, Role::Intruder, 42005)?, "the stale device stays out");
    ensure!(
        lab.audit()?.iter().all(|l| l["request"]["local_port"] != 42004),
        "the dropped v2 knock never reached the daemon"
    );
    let late = on(
        &lab,
        Role::Intruder,
        &["client", "refresh", "--credential", path(&stale), "--timeout", "1s"],
    )?;
    ensure!(
        !late.status.success() && String::from_utf8_lossy(&late.stderr).contains("did not answer"),
        "{}",
        String::from_utf8_lossy(&late.stderr)
    );

    // New credentials name the new key.
    let later = lab.enroll("later", &["--allow", "tcp/22"])?;
    ensure!(std::fs::read_to_string(later)?.contains(&new_key));
    Ok(())
}
