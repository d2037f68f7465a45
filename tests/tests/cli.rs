//! The CLI refuses bad input with one clear line and a non-zero exit, and
//! never touches a gate when it does.

use std::process::{Command, Output};

use anyhow::Result;
use gatekeeper_tests::lab::{Pins, gatekeeper_bin};

fn gatekeeper(args: &[&str]) -> Result<Output> {
    Ok(Command::new(gatekeeper_bin()?).args(args).output()?)
}

/// Runs a command that must fail; returns its first stderr line.
fn refused(args: &[&str]) -> Result<String> {
    let out = gatekeeper(args)?;
    assert!(!out.status.success(), "`gatekeeper {}` should fail", args.join(" "));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    Ok(stderr.lines().next().unwrap_or_default().to_string())
}

#[test]
fn bad_map_arguments_are_named() -> Result<()> {
    let pins = Pins::new()?;
    let dir = pins.dir().to_str().expect("utf-8 path");
    for (args, needle) in [
        (
            vec!["whitelist", "add", "300.1.1.1/tcp", "--ports", "22", "--ttl", "60s"],
            "300.1.1.1",
        ),
        (
            vec!["whitelist", "add", "10.0.0.2/tcp", "--ports", "0", "--ttl", "60s"],
            "\"0\"",
        ),
        (
            vec!["whitelist", "add", "10.0.0.2/tcp", "--ports", "22", "--ttl", "0s"],
            "zero",
        ),
        (
            vec!["whitelist", "add", "10.0.0.2/sctp", "--ports", "22", "--ttl", "60s"],
            "sctp",
        ),
        (
            vec!["whitelist", "add", "10.0.0.2:0/tcp", "--ports", "22", "--ttl", "60s"],
            "\"0\"",
        ),
        (vec!["allow", "add", "10.0.0.0/40", "--ttl", "1h"], "10.0.0.0/40"),
        (vec!["whitelist", "list", "--pin-dir", dir], "no gate is pinned"),
        (vec!["stats", "--pin-dir", dir], "no gate is pinned"),
        (
            vec!["whitelist", "flush", "--iface", "no-such-gate"],
            "no gate is pinned",
        ),
    ] {
        let line = refused(&args)?;
        assert!(
            line.contains(needle),
            "`{}` said {line:?}, expected it to mention {needle}",
            args.join(" ")
        );
    }
    Ok(())
}

#[test]
fn bad_daemon_settings_are_refused_before_anything_is_loaded() -> Result<()> {
    let pins = Pins::new()?;
    let dir = pins.dir().join("gate");
    let dir = dir.to_str().expect("utf-8 path");
    let config = std::env::temp_dir().join(format!("gk-cli-test-{}.toml", std::process::id()));
    for (body, needle) in [
        ("protect = \"tcp/22\"\nprotec = 1\n", "protec"),
        ("protect = \"tcp/70000\"\n", "tcp/70000"),
        ("protect = \"tcp/22\"\nidle_timeout = \"later\"\n", "later"),
        ("protect = \"tcp/22\"\n[knock]\nrate = 0\n", "knock.rate"),
    ] {
        std::fs::write(&config, body)?;
        let out = gatekeeper(&[
            "run",
            "--iface",
            "lo",
            "--pin-dir",
            dir,
            "--config",
            config.to_str().expect("utf-8"),
        ])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "config {body:?}: {stderr}"
        );
    }
    std::fs::remove_file(&config)?;
    let line = refused(&["run", "--iface", "lo", "--pin-dir", dir])?;
    assert!(line.contains("--protect"), "{line}");
    let line = refused(&["run", "--iface", "gk-missing0", "--protect", "tcp/22", "--pin-dir", dir])?;
    assert!(line.contains("gk-missing0"), "{line}");
    assert!(
        !std::path::Path::new(dir).exists(),
        "nothing was pinned for a refused start"
    );
    Ok(())
}

#[test]
fn help_teaches_the_syntax() -> Result<()> {
    let out = gatekeeper(&["whitelist", "add", "--help"])?;
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("ADDR[:SRCPORT]/PROTO") && help.contains("--ttl"),
        "{help}"
    );
    let out = gatekeeper(&["run", "--help"])?;
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--protect") && help.contains("detach"), "{help}");
    Ok(())
}

#[test]
fn enrollment_guards_keys_and_names() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let dir = std::env::temp_dir().join(format!("gk-cli-enroll-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    let state = state.to_str().expect("utf-8 path");
    let out = gatekeeper(&["init", "--state-dir", state, "--public-addr", "192.0.2.1"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mode = |p: &str| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&format!("{state}/server.key"))?, 0o600);
    let line = refused(&["init", "--state-dir", state, "--public-addr", "192.0.2.1"])?;
    assert!(
        line.contains("--force"),
        "an existing key is not replaced silently: {line}"
    );

    let cred = dir.join("laptop.toml");
    let cred = cred.to_str().expect("utf-8 path");
    let out = gatekeeper(&[
        "client",
        "add",
        "laptop",
        "--allow",
        "tcp/22",
        "--open-for",
        "2m",
        "--out",
        cred,
        "--state-dir",
        state,
    ])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(cred)?, 0o600, "the credential holds a secret");
    let server_copy = std::fs::read_to_string(format!("{state}/clients/laptop.toml"))?;
    let secret = std::fs::read_to_string(cred)?;
    let secret_line = secret
        .lines()
        .find(|l| l.starts_with("secret_key"))
        .expect("a secret in the credential");
    let secret_value = secret_line.split('"').nth(1).expect("quoted");
    assert!(
        !server_copy.contains(secret_value),
        "the gateway keeps only the public key"
    );

    for (args, needle) in [
        (vec!["client", "add", "laptop", "--allow", "tcp/22"], "already enrolled"),
        (
            vec!["client", "add", "bad/name", "--allow", "tcp/22"],
            "bad client name",
        ),
        (vec!["client", "add", "x", "--allow", "tcp/0"], "\"0\""),
        (
            vec!["client", "add", "x", "--allow", "tcp/22", "--open-for", "500ms"],
            "500ms is under a second",
        ),
        (vec!["client", "revoke", "nobody"], "no client named"),
    ] {
        let mut full = args.clone();
        full.extend(["--state-dir", state]);
        let line = refused(&full)?;
        assert!(line.contains(needle), "`{}` said {line:?}", full.join(" "));
    }
    let line = refused(&[
        "knock",
        "--credential",
        "/nonexistent.toml",
        "--proto",
        "tcp",
        "--port",
        "22",
    ])?;
    assert!(line.contains("/nonexistent.toml"), "{line}");
    let line = refused(&[
        "client",
        "add",
        "y",
        "--allow",
        "tcp/22",
        "--state-dir",
        &format!("{state}-missing"),
    ])?;
    assert!(line.contains("gatekeeper init"), "{line}");
    let list = gatekeeper(&["client", "list", "--json", "--state-dir", state])?;
    let json: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    assert_eq!(json["clients"][0]["name"], "laptop");
    assert_eq!(json["clients"][0]["status"], "enabled");
    assert_eq!(json["clients"][0]["open_for_secs"], 120);
    assert_eq!(json["problems"], serde_json::json!([]));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn the_relay_refuses_what_it_cannot_use_and_says_why() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("gk-cli-relay-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let state = dir.to_str().expect("utf-8 path");
    let cred = dir.join("bad.relay");
    std::fs::write(
        &cred,
        "name = \"a:b\"\nhost = \"x.example\"\nsecret_key = \"AAAA\"\nrelay_public_key = \"AAAA\"\nredis = \"redis://127.0.0.1:9\"\n",
    )?;
    let cred = cred.to_str().expect("utf-8 path").to_string();
    for (args, needle) in [
        (
            vec![
                "relay",
                "issue",
                "web",
                "--host",
                "web.example",
                "--owner",
                "ops",
                "--state-dir",
                state,
            ],
            "--cluster",
        ),
        (
            vec![
                "relay-agent",
                "--credential",
                "/nonexistent/web.relay",
                "--forward",
                "127.0.0.1:80",
            ],
            "/nonexistent/web.relay",
        ),
        (
            vec!["relay-agent", "--credential", &cred, "--forward", "127.0.0.1:80"],
            "bad relay name \"a:b\"",
        ),
        (
            vec!["relay-agent", "--credential", &cred, "--forward", "nowhere"],
            "nowhere",
        ),
        (
            vec![
                "run",
                "--iface",
                "lo",
                "--protect",
                "tcp/22",
                "--relay-http",
                "127.0.0.1:8080",
                "--state-dir",
                state,
            ],
            "--cluster",
        ),
    ] {
        let line = refused(&args)?;
        assert!(
            line.contains(needle),
            "`{}` said {line:?}, expected it to mention {needle}",
            args.join(" ")
        );
    }
    let out = gatekeeper(&["relay", "issue", "--help"])?;
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--redis-user") && help.contains("Example"), "{help}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn channel_commands_guard_keys_and_name_what_is_wrong() -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("gk-cli-channel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let path = |p: &str| scratch.join(p).display().to_string();
    let made = gatekeeper(&["channel", "init", "--dir", &path("a"), "--name", "alpha", "--json"])?;
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let made: serde_json::Value = serde_json::from_slice(&made.stdout)?;
    assert_eq!(made["sm2"].as_str().map(str::len), Some(64), "{made}");
    let config = path("channels.toml");
    let channel = |extra: &str| -> Result<()> {
        let text = format!(
            "credentials = \"a\"\n[[outbound]]\nname = \"ssh\"\nlisten = \"127.0.0.1:2222\"\npeer = \"beta\"\n\
             connect = \"10.0.0.2:7440\"\npolicy = \"sm\"\n{extra}"
        );
        Ok(std::fs::write(&config, text)?)
    };
    channel("")?;
    for (args, needle) in [
        (
            vec!["channel", "init", "--dir", &path("a"), "--name", "alpha"],
            "--force",
        ),
        (vec!["channel", "init", "--dir", &path("b"), "--name", "a/b"], "\"a/b\""),
        (
            vec![
                "channel",
                "pair",
                "--dir",
                &path("a"),
                "--name",
                "beta",
                &path("a/sm2.key"),
            ],
            "no certificate",
        ),
        (
            vec![
                "channel",
                "pair",
                "--dir",
                &path("a"),
                "--name",
                "beta",
                &path("none.pem"),
            ],
            "none.pem",
        ),
        (
            vec!["channel", "run", "--config", &config],
            "peer \"beta\" is not paired",
        ),
    ] {
        let line = refused(&args)?;
        assert!(
            line.contains(needle),
            "`{}` said {line:?}, expected {needle:?}",
            args.join(" ")
        );
    }
    channel("colour = \"blue\"\n")?;
    assert!(refused(&["channel", "run", "--config", &config])?.contains("unknown field `colour`"));
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}
