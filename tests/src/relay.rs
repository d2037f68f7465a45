//! The relay in the lab, as its tests, the demo and the benchmark start
//! it: a Redis host, an agent host whose only route is to Redis, a
//! private HTTP service on the agent host, gateway nodes serving relayed
//! hosts behind the shared address, and a client that knocks for the
//! relay's port.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use gatekeeper::{
    knock::{Carrier, send::Request},
    spec::{PortRange, Proto},
};

use crate::{
    cluster::shared,
    lab::{ChildGuard, Daemon, Lab, Role, SHARED_ADDR, eventually, sh},
    redis::RedisServer,
};

/// Where the gateway serves relayed hosts.
pub const RELAY_PORT: u16 = 8080;
/// Where the private service listens, on the agent host's loopback.
pub const SERVICE_PORT: u16 = 8000;
/// The host the first relay publishes.
pub const HOST: &str = "web.lab.example";
const SERVICE: &str = include_str!("http_service.py");

/// Gateway nodes serving one relayed host through the lab's Redis.
pub struct RelayLab {
    pub lab: Lab,
    pub redis: RedisServer,
    /// Node N is `daemons[N - 1]`, named `gw-N`.
    pub daemons: Vec<Daemon>,
    /// The client's knock credential (allowed the relay's port by the
    /// relay, and the portal's 443).
    pub client: PathBuf,
    /// The relay `web`'s credential, for its agent.
    pub credential: PathBuf,
    services: Vec<ChildGuard>,
}

impl RelayLab {
    /// A cluster of `nodes` behind the shared address ([`Lab::cluster`]),
    /// each serving the relay on `RELAY_PORT` with `config` as its own
    /// gatekeeper.toml (for `[relay]` settings); relay `web` issued and
    /// its private service started, but not its agent.
    pub fn start(nodes: u8, config: &str) -> Result<RelayLab> {
        let lab = Lab::cluster(nodes)?;
        only_route_to(&lab, Role::Agent, Role::Store)?;
        let redis = RedisServer::start(&lab, Role::Store)?;
        let url = redis.url();
        let first = Role::Node(1);
        lab.state_cli_on(
            first,
            &["init", "--public-addr", &SHARED_ADDR.to_string(), "--cluster", &url],
        )?;
        let client = lab.scratch().join("laptop.credential.toml");
        let client_arg = client.to_string_lossy().into_owned();
        lab.state_cli_on(
            first,
            &[
                "client",
                "add",
                "laptop",
                "--allow",
                "tcp/22,tcp/443",
                "--out",
                &client_arg,
                "--cluster",
                &url,
            ],
        )?;
        let credential = issue(&lab, &url, "web", HOST, "laptop")?;
        let listen = format!("0.0.0.0:{RELAY_PORT}");
        let mut daemons = Vec::new();
        for n in 1..=nodes {
            let node = Role::Node(n);
            let dir = lab.state_dir_of(node);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("gatekeeper.toml"), config)?;
            let name = format!("gw-{n}");
            let args = [
                "--protect",
                "tcp/22",
                "--cluster",
                &url,
                "--node",
                &name,
                "--relay-http",
                &listen,
            ];
            daemons.push(lab.start_daemon_on(node, &args)?);
        }
        let mut relay = RelayLab {
            lab,
            redis,
            daemons,
            client,
            credential,
            services: Vec::new(),
        };
        relay.serve_http(Role::Agent, SERVICE_PORT, "web")?;
        Ok(relay)
    }

    /// Starts the private HTTP service on a role's loopback.
    pub fn serve_http(&mut self, role: Role, port: u16, label: &str) -> Result<()> {
        self.services.push(serve_http(&self.lab, role, port, label)?);
        Ok(())
    }

    /// Starts the agent for `credential` in the agent host, forwarding to
    /// the private service on `port`, and waits for its first session.
    pub fn start_agent(&self, credential: &Path, port: u16) -> Result<Daemon> {
        let cred = credential.to_string_lossy().into_owned();
        let forward = format!("127.0.0.1:{port}");
        self.lab.start_gatekeeper_on(
            Role::Agent,
            &["relay-agent", "--credential", &cred, "--forward", &forward],
            "relay session established",
        )
    }

    /// Knocks from the client for the relay's port (every node opens it).
    pub fn knock(&self) -> Result<()> {
        self.knock_for(RELAY_PORT)
    }

    /// Knocks from the client for tcp/`port` on the shared address, and
    /// waits until it opens.
    pub fn knock_for(&self, port: u16) -> Result<()> {
        let req = Request {
            proto: Proto::Tcp,
            ports: PortRange { lo: port, hi: port },
            source_port: None,
        };
        self.lab.with_knocker(Role::Client, &self.client, move |k, _| {
            k.send(SHARED_ADDR.into(), &req, Carrier::Udp)?;
            Ok(())
        })?;
        ensure!(
            eventually(Duration::from_secs(3), || Ok(self
                .lab
                .tcp_connect(Role::Client, shared(port), None, Duration::from_millis(200))?
                .is_some()))?,
            "the knock did not open tcp/{port}"
        );
        Ok(())
    }

    /// `curl` from the client to the shared address (see [`curl`]).
    pub fn curl(&self, host: &str, path: &str, args: &[&str]) -> Result<Output> {
        curl(&self.lab, SHARED_ADDR.into(), host, path, args)
    }

    /// Node `n`'s `status --json`.
    pub fn status(&self, n: u8) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.lab.state_cli_on(Role::Node(n), &["status", "--json"])?,
        )?)
    }

    /// `gatekeeper ARGS --cluster URL` from node 1; its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let url = self.redis.url();
        self.lab
            .state_cli_on(Role::Node(1), &[args, &["--cluster", url.as_str()][..]].concat())
    }
}

/// Issues relay `name` for `host`, allowed client `allow`; returns its
/// credential's path.
pub fn issue(lab: &Lab, url: &str, name: &str, host: &str, allow: &str) -> Result<PathBuf> {
    let path = lab.scratch().join(format!("{name}.relay"));
    let out = path.to_string_lossy().into_owned();
    lab.state_cli_on(
        Role::Node(1),
        &[
            "relay",
            "issue",
            name,
            "--host",
            host,
            "--owner",
            "ops",
            "--allow",
            allow,
            "--out",
            &out,
            "--cluster",
            url,
        ],
    )?;
    Ok(path)
}

/// Leaves `role` a route to `to`'s address and nothing else.
pub fn only_route_to(lab: &Lab, role: Role, to: Role) -> Result<()> {
    let ns = lab.ns(role);
    sh(&["ip", "-n", &ns, "route", "flush", "dev", role.iface()])?;
    sh(&["ip", "-n", &ns, "-6", "addr", "flush", "dev", role.iface()])?;
    let dest = format!("{}/32", to.addr());
    sh(&["ip", "-n", &ns, "route", "add", &dest, "dev", role.iface()])?;
    Ok(())
}

/// The test service (`http_service.py`) on a role's loopback.
pub fn serve_http(lab: &Lab, role: Role, port: u16, label: &str) -> Result<ChildGuard> {
    let script = lab.scratch().join("http_service.py");
    if !script.exists() {
        std::fs::write(&script, SERVICE)?;
    }
    let log = std::fs::File::create(lab.scratch().join(format!("http-{label}.log")))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.ns(role), "python3"])
        .arg(&script)
        .args(["127.0.0.1", &port.to_string(), label])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the private HTTP service (python3)")?;
    let guard = ChildGuard::new(child);
    let up = eventually(Duration::from_secs(10), || {
        Ok(lab
            .tcp_connect(role, ([127, 0, 0, 1], port).into(), None, Duration::from_millis(200))?
            .is_some())
    })?;
    if !up {
        bail!("the private HTTP service on port {port} did not come up");
    }
    Ok(guard)
}

/// `curl -sS` from the client to the relay's port at `addr` asking for
/// `host`, bounded to 60 s (less if `args` says so); a status line
/// `HTTP <code>` is appended to stdout.
pub fn curl(lab: &Lab, addr: IpAddr, host: &str, path: &str, args: &[&str]) -> Result<Output> {
    let url = format!("http://{}{path}", SocketAddr::new(addr, RELAY_PORT));
    curl_url(lab, &url, host, args)
}

/// [`curl`] for any `url`.
pub fn curl_url(lab: &Lab, url: &str, host: &str, args: &[&str]) -> Result<Output> {
    let host_header = format!("Host: {host}");
    let ns = lab.ns(Role::Client);
    let mut full = vec![
        "netns",
        "exec",
        &ns,
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-H",
        &host_header,
        "-w",
        "\nHTTP %{http_code}",
    ];
    full.extend_from_slice(args);
    full.push(url);
    Ok(Command::new("ip").args(&full).stdin(Stdio::null()).output()?)
}

/// The status code curl printed last (see [`curl`]).
pub fn status_of(out: &Output) -> Option<u16> {
    String::from_utf8_lossy(&out.stdout)
        .rsplit("HTTP ")
        .next()?
        .trim()
        .parse()
        .ok()
}
