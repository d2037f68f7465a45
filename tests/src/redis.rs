//! Redis servers and Sentinels of the lab's own, started inside a lab
//! namespace (never the machine's), with nothing kept on disk, as
//! Debian's default runs them.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::lab::{ChildGuard, Lab, Role, eventually};

pub const PORT: u16 = 6379;
/// The service the lab's Sentinels watch.
pub const SERVICE: &str = "gk";

pub struct RedisServer {
    role: Role,
    ns: String,
    /// Where it may write (a replica's sync): the lab's scratch directory.
    dir: PathBuf,
    addr: String,
    port: u16,
    /// Extra `redis-server` arguments (a replica's `--replicaof`, TLS).
    args: Vec<String>,
    /// With TLS: the CA file redis-cli checks the server with.
    ca: Option<PathBuf>,
    server: Option<ChildGuard>,
}

impl RedisServer {
    /// Starts redis-server on `role`'s address and waits until it answers.
    pub fn start(lab: &Lab, role: Role) -> Result<RedisServer> {
        RedisServer::start_with(lab, role, PORT, &[])
    }

    /// A replica of `primary` on `port`, in the same namespace.
    pub fn replica_of(lab: &Lab, primary: &RedisServer, port: u16) -> Result<RedisServer> {
        let p = primary.port.to_string();
        let replica = RedisServer::start_with(lab, primary.role, port, &["--replicaof", &primary.addr, &p])?;
        ensure_eventually(
            || Ok(replica.cli(&["INFO", "replication"])?.contains("master_link_status:up")),
            "the replica to sync",
        )?;
        Ok(replica)
    }

    /// A server that speaks only TLS, with the certificate and key in
    /// `cert`/`key` (PEM) signed by `ca`.
    pub fn start_tls(lab: &Lab, role: Role, port: u16, cert: &Path, key: &Path, ca: &Path) -> Result<RedisServer> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let port_arg = port.to_string();
        let (cert, key, ca_arg) = (path(cert), path(key), path(ca));
        let args = [
            "--port",
            "0",
            "--tls-port",
            &port_arg,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca_arg,
            "--tls-auth-clients",
            "no",
        ];
        RedisServer::launch(lab, role, port, &args, Some(ca))
    }

    fn start_with(lab: &Lab, role: Role, port: u16, args: &[&str]) -> Result<RedisServer> {
        let port_arg = port.to_string();
        let args: Vec<&str> = ["--port", &port_arg].into_iter().chain(args.iter().copied()).collect();
        RedisServer::launch(lab, role, port, &args, None)
    }

    /// Starts redis-server with `args` on `role`'s address; `ca`: it speaks
    /// TLS under a certificate this CA signed.
    fn launch(lab: &Lab, role: Role, port: u16, args: &[&str], ca: Option<&Path>) -> Result<RedisServer> {
        let mut r = RedisServer {
            role,
            ns: lab.ns(role),
            dir: lab.scratch().join(format!("redis-{port}")),
            addr: role.addr().to_string(),
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
            ca: ca.map(Path::to_path_buf),
            server: None,
        };
        r.restart()?;
        Ok(r)
    }

    /// `redis://ADDR:PORT` (`rediss://` with TLS), for `--cluster`.
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://{}:{}", self.addr, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().and_then(ChildGuard::id)
    }

    /// Stops the server (SIGKILL): what it held is gone.
    pub fn stop(&mut self) {
        self.server = None;
    }

    /// Starts it again, empty.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        std::fs::create_dir_all(&self.dir)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "redis-server"])
            .args(["--bind", &self.addr])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        self.server = Some(ChildGuard::new(child));
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.cli(&["PING"]).is_ok_and(|o| o.trim() == "PONG") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "redis-server in {} on port {} did not answer within 10 s",
            self.ns,
            self.port
        )
    }

    /// Runs redis-cli against the server; its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "redis-cli", "-h", &self.addr])
            .args(["-p", &self.port.to_string()]);
        if let Some(ca) = &self.ca {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        let out = cmd.args(args).output()?;
        if !out.status.success() {
            bail!("redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Sentinels watching one primary, each on its own port.
pub struct Sentinels {
    ns: String,
    addr: String,
    ports: Vec<u16>,
    _sentinels: Vec<ChildGuard>,
}

impl Sentinels {
    /// `count` Sentinels on ports 26379 and up, watching `primary` as
    /// [`SERVICE`] with a quorum of a majority; a primary silent for one
    /// second is failed over.
    pub fn start(lab: &Lab, primary: &RedisServer, count: u16) -> Result<Sentinels> {
        let role = primary.role;
        let quorum = count / 2 + 1;
        let mut sentinels = Vec::new();
        let mut ports = Vec::new();
        for i in 0..count {
            let port = 26379 + i;
            // Sentinel rewrites its config file, so each gets its own.
            let conf = lab.scratch().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind {addr}\nprotected-mode no\n\
                     sentinel monitor {SERVICE} {addr} {primary_port} {quorum}\n\
                     sentinel down-after-milliseconds {SERVICE} 1000\n\
                     sentinel failover-timeout {SERVICE} 5000\n",
                    addr = primary.addr,
                    primary_port = primary.port,
                ),
            )?;
            let child = Command::new("ip")
                .args(["netns", "exec", &lab.ns(role), "redis-sentinel"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting redis-sentinel (apt-get install redis-sentinel)")?;
            sentinels.push(ChildGuard::new(child));
            ports.push(port);
        }
        let s = Sentinels {
            ns: lab.ns(role),
            addr: primary.addr.clone(),
            ports,
            _sentinels: sentinels,
        };
        // Every Sentinel knows the primary and has found the others.
        ensure_eventually(
            || {
                Ok(s.ports.iter().all(|p| {
                    s.cli(*p, &["SENTINEL", "sentinels", SERVICE])
                        .is_ok_and(|o| o.matches("runid").count() == usize::from(count - 1))
                }))
            },
            "the Sentinels to find each other",
        )?;
        Ok(s)
    }

    /// `redis+sentinel://ADDR:P1,ADDR:P2,.../SERVICE`, for `--cluster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.ports.iter().map(|p| format!("{}:{p}", self.addr)).collect();
        format!("redis+sentinel://{}/{SERVICE}", hosts.join(","))
    }

    /// The port of the primary the first Sentinel names now.
    pub fn primary_port(&self) -> Result<u16> {
        let out = self.cli(self.ports[0], &["SENTINEL", "get-master-addr-by-name", SERVICE])?;
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("no primary in {out:?}"))
    }

    fn cli(&self, port: u16, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "redis-cli", "-h", &self.addr])
            .args(["-p", &port.to_string()])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("redis-cli -p {port} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn ensure_eventually(check: impl FnMut() -> Result<bool>, what: &str) -> Result<()> {
    if !eventually(Duration::from_secs(15), check)? {
        bail!("waited 15 s for {what}");
    }
    Ok(())
}
