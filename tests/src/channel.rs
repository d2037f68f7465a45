//! Devices carrying channels: the lab's client ("alpha") and gateway
//! ("beta") with channel identities paired with each other, the intruder
//! ("mallory") with identities no one paired; the peers the channel
//! tests meet (OpenSSH, Tongsuo, tshark on the lab link).

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::lab::{ChildGuard, Daemon, Lab, Role, output_within, sh, target_dir};

/// The port inbound channels listen on in the lab (the gateway's tunnel
/// has 7443).
pub const CHANNEL_PORT: u16 = 7440;

/// An `[[inbound]]` table: `listen` on all addresses at `port`, on to
/// `backend`, for `peers`; `extra` adds lines (`source = ...`).
pub fn inbound(name: &str, port: u16, backend: &str, policy: &str, peers: &[&str], extra: &str) -> String {
    format!(
        "[[inbound]]\nname = \"{name}\"\nlisten = \"0.0.0.0:{port}\"\nbackend = \"{backend}\"\npolicy = \"{policy}\"\npeers = {peers:?}\n{extra}"
    )
}

/// An `[[outbound]]` table to beta (the lab's gateway) at `port`; `entry`
/// is its `listen = ...` or `capture = ...` line, `extra` adds lines.
pub fn outbound(name: &str, entry: &str, peer: &str, port: u16, policy: &str, extra: &str) -> String {
    let beta = Role::Gateway.addr();
    format!(
        "[[outbound]]\nname = \"{name}\"\n{entry}\npeer = \"{peer}\"\nconnect = \"{beta}:{port}\"\npolicy = \"{policy}\"\n{extra}"
    )
}

pub struct ChannelLab {
    pub lab: Lab,
}

/// A device's name in the lab.
pub fn device(role: Role) -> &'static str {
    match role {
        Role::Client => "alpha",
        Role::Gateway => "beta",
        _ => "mallory",
    }
}

impl ChannelLab {
    /// The bridged lab, each host with channel identities; alpha and beta
    /// paired with each other.
    pub fn new() -> Result<ChannelLab> {
        ChannelLab::on(Lab::new()?)
    }

    /// [`ChannelLab::new`] on a lab of the caller's (the benchmark's
    /// direct link).
    pub fn on(lab: Lab) -> Result<ChannelLab> {
        let cl = ChannelLab { lab };
        for role in [Role::Client, Role::Gateway, Role::Intruder] {
            cl.gatekeeper(&["channel", "init", "--dir", &cl.dir(role), "--name", device(role)])?;
        }
        cl.pair(Role::Client, Role::Gateway)?;
        cl.pair(Role::Gateway, Role::Client)?;
        Ok(cl)
    }

    /// A role's credentials directory.
    pub fn dir(&self, role: Role) -> String {
        self.lab.scratch().join(device(role)).display().to_string()
    }

    /// `on` pins `peer`'s certificates under the peer's name.
    pub fn pair(&self, on: Role, peer: Role) -> Result<String> {
        let public = format!("{}/public.pem", self.dir(peer));
        self.gatekeeper(&[
            "channel",
            "pair",
            "--dir",
            &self.dir(on),
            "--name",
            device(peer),
            &public,
        ])
    }

    /// Runs a short `gatekeeper` command outside the lab; its stdout.
    pub fn gatekeeper(&self, args: &[&str]) -> Result<String> {
        let out = sh(&[crate::lab::gatekeeper_bin()?.to_str().context("utf-8 path")?]
            .into_iter()
            .chain(args.iter().copied())
            .collect::<Vec<_>>())?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `channel run` on a role with `channels` (TOML, its
    /// `credentials` added) once every channel listens.
    pub fn run(&self, role: Role, channels: &str) -> Result<Daemon> {
        let path = self.lab.scratch().join(format!("{}-channels.toml", device(role)));
        std::fs::write(&path, format!("credentials = {:?}\n{channels}", self.dir(role)))?;
        let path = path.display().to_string();
        self.lab
            .start_gatekeeper_on(role, &["channel", "run", "--config", &path], "channels running")
    }

    /// Every line of a role's channel audit log.
    pub fn audit(&self, role: Role) -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(format!("{}/audit.log", self.dir(role))).unwrap_or_default();
        Ok(text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?)
    }

    /// Whether a role audited a channel opened with `peer` under `suite`.
    pub fn opened(&self, role: Role, peer: &str, suite: &str) -> Result<bool> {
        let open = self.events(role, "channel_open")?;
        Ok(open.iter().any(|l| l["peer"] == peer && l["suite"] == suite))
    }

    /// The audit lines of `event`.
    pub fn events(&self, role: Role, event: &str) -> Result<Vec<serde_json::Value>> {
        Ok(self.audit(role)?.into_iter().filter(|l| l["event"] == event).collect())
    }
}

/// An OpenSSH server on a role's loopback port 22, logging verbosely,
/// that lets in the key the returned client uses.
pub struct Sshd {
    _server: ChildGuard,
    pub log: PathBuf,
    pub key: PathBuf,
}

impl Sshd {
    pub fn start(lab: &Lab, role: Role) -> Result<Sshd> {
        let dir = lab.scratch().join("ssh");
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        for name in ["host_key", "client_key"] {
            let key = dir.join(name);
            sh(&[
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                key.to_str().context("utf-8")?,
            ])?;
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        let d = dir.display();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:22\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile none\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\n"
            ),
        )?;
        // Privilege separation needs its empty directory.
        std::fs::create_dir_all("/run/sshd")?;
        let log = dir.join("sshd.log");
        let server = Command::new("ip")
            .args(["netns", "exec", &lab.ns(role), "/usr/sbin/sshd", "-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting sshd")?;
        let sshd = Sshd {
            _server: ChildGuard::new(server),
            log,
            key: dir.join("client_key"),
        };
        let listening = crate::lab::eventually(Duration::from_secs(5), || {
            Ok(std::fs::read_to_string(&sshd.log)?.contains("listening on 127.0.0.1 port 22"))
        })?;
        if !listening {
            bail!("sshd did not start: {}", std::fs::read_to_string(&sshd.log)?);
        }
        Ok(sshd)
    }

    /// Runs `command` over ssh from a role to `host` port 22; its output.
    pub fn ssh(&self, lab: &Lab, from: Role, host: &str, command: &str) -> Result<std::process::Output> {
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(from), "ssh", "-i"])
            .arg(&self.key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                &format!("root@{host}"),
                command,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        output_within(child, Duration::from_secs(20))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Packets captured by tshark on a role's interface while `during` runs;
/// what tshark then reads out of them with `fields` (one `-e` each) for
/// packets matching `filter`, TLS decoded on `tls_port`.
pub fn on_the_wire(
    lab: &Lab,
    role: Role,
    tls_port: u16,
    filter: &str,
    fields: &[&str],
    during: impl FnOnce() -> Result<()>,
) -> Result<String> {
    let pcap = lab.scratch().join(format!("{}-{tls_port}.pcap", device(role)));
    let mut capture = Command::new("ip")
        .args(["netns", "exec", &lab.ns(role), "tshark", "-q", "-i", role.iface()])
        .args(["-f", &format!("tcp port {tls_port}"), "-a", "duration:30", "-w"])
        .arg(&pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tshark")?;
    // tshark says where it captures once it does.
    let mut stderr = capture.stderr.take().context("tshark's stderr")?;
    let ready = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("Capturing on") {
                return true;
            }
        }
        false
    });
    let started = ready.join().unwrap_or(false);
    // tshark says so a moment before its capture process has the filter
    // attached: a handshake right away could be missed.
    std::thread::sleep(Duration::from_secs(1));
    let result = if started {
        during()
    } else {
        Err(anyhow::anyhow!("tshark did not start"))
    };
    // Let the last packets land, then stop the capture cleanly.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(capture.id() as i32, libc::SIGINT) };
    let _ = output_within(capture, Duration::from_secs(10));
    result?;
    let mut read = vec![
        "tshark".to_string(),
        "-r".into(),
        pcap.display().to_string(),
        "-d".into(),
        format!("tcp.port=={tls_port},tls"),
        "-Y".into(),
        filter.into(),
        "-T".into(),
        "fields".into(),
    ];
    for f in fields {
        read.extend(["-e".to_string(), f.to_string()]);
    }
    let out = sh(&read.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Tongsuo's `openssl` command, built once from the source the
/// `tongsuo-src` crate carries and kept in `target/tongsuo/`.
pub fn tongsuo() -> Result<Tongsuo> {
    static BUILD: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let root = target_dir()?.join("tongsuo").join(tongsuo_src::version());
    let bin = root.join("src/apps/openssl");
    let tongsuo = Tongsuo {
        conf: root.join("src/apps/openssl.cnf"),
        bin: bin.clone(),
    };
    if bin.is_file() {
        return Ok(tongsuo);
    }
    eprintln!(
        "building Tongsuo {} once, into {} (about two minutes)",
        tongsuo_src::version(),
        root.display()
    );
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    sh(&[
        "cp",
        "-r",
        tongsuo_src::source_dir().to_str().context("utf-8")?,
        root.join("src").to_str().context("utf-8")?,
    ])?;
    let src = root.join("src");
    let run = |program: &str, args: &[&str]| -> Result<()> {
        let status = Command::new(program)
            .args(args)
            .current_dir(&src)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {program}"))?;
        if !status.success() {
            bail!("building Tongsuo: `{program} {}` failed", args.join(" "));
        }
        Ok(())
    };
    run("./Configure", &["no-shared", "no-tests", "enable-ntls"])?;
    let jobs = format!(
        "-j{}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
    );
    run("make", &[&jobs, "build_programs"])?;
    Ok(tongsuo)
}

/// Tongsuo's command line, with its own configuration file.
pub struct Tongsuo {
    bin: PathBuf,
    conf: PathBuf,
}

impl Tongsuo {
    /// `openssl ARGS` in a role's namespace (or outside with `None`), with
    /// Tongsuo's configuration, in the lab's scratch directory.
    fn command(&self, lab: &Lab, role: Option<Role>, args: &[&str]) -> Command {
        let mut cmd = match role {
            Some(role) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &lab.ns(role)]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(args)
            .env("OPENSSL_CONF", &self.conf)
            .current_dir(lab.scratch())
            .stdin(Stdio::piped());
        cmd
    }

    /// Runs `openssl ARGS` fed `input`; killed past `limit`.
    pub fn run(
        &self,
        lab: &Lab,
        role: Option<Role>,
        args: &[&str],
        input: &[u8],
        limit: Duration,
    ) -> Result<std::process::Output> {
        let mut child = self
            .command(lab, role, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting Tongsuo")?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let input = input.to_vec();
        // Written from a thread: a peer that reads nothing must not stall us.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
            // Held open a while: s_client quits at end of input.
            std::thread::sleep(Duration::from_secs(2));
        });
        output_within(child, limit)
    }

    /// Spawns `openssl ARGS` in a role's namespace, its output in `log`,
    /// killed when dropped.
    pub fn spawn(&self, lab: &Lab, role: Role, args: &[&str], log: &Path) -> Result<ChildGuard> {
        let child = self
            .command(lab, Some(role), args)
            .stdout(std::fs::File::create(log)?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting Tongsuo")?;
        Ok(ChildGuard::new(child))
    }
}
