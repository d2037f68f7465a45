//! A Redis server of the lab's own, started inside a lab namespace (never
//! the machine's), with nothing kept on disk, as Debian's default runs it.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::lab::{ChildGuard, Lab, Role};

pub const PORT: u16 = 6379;

pub struct RedisServer {
    ns: String,
    addr: String,
    server: Option<ChildGuard>,
}

impl RedisServer {
    /// Starts redis-server on `role`'s address and waits until it answers.
    pub fn start(lab: &Lab, role: Role) -> Result<RedisServer> {
        let mut r = RedisServer {
            ns: lab.ns(role),
            addr: role.addr().to_string(),
            server: None,
        };
        r.restart()?;
        Ok(r)
    }

    /// `redis://ADDR:PORT`, for `--cluster`.
    pub fn url(&self) -> String {
        format!("redis://{}:{PORT}", self.addr)
    }

    /// Stops the server (SIGKILL): what it held is gone.
    pub fn stop(&mut self) {
        self.server = None;
    }

    /// Starts it again, empty.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "redis-server"])
            .args(["--bind", &self.addr, "--port", &PORT.to_string()])
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
        bail!("redis-server in {} did not answer within 10 s", self.ns)
    }

    /// Runs redis-cli against the server; its output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "redis-cli",
                "-h",
                &self.addr,
                "-p",
                &PORT.to_string(),
            ])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
