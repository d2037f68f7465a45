//! A lab of network namespaces: a gateway, a client and an intruder on one
//! bridge, each in its own namespace, with Gatekeeper's daemon and CLI run
//! against the gateway. Every name carries this process's id and a counter,
//! so parallel labs never collide; dropping a lab kills what it started,
//! removes the gate's pins and deletes its namespaces, and a new lab first
//! removes what dead processes left behind.
//!
//! Traffic only ever goes to addresses that exist inside these namespaces.

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use gatekeeper::{
    knock::{
        credential::Credential,
        send::{Knocker, Request},
    },
    spec::{PortRange, Proto},
};

/// Roles in the lab; each is a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Client,
    Intruder,
    /// A NAT router on the lab network (`Lab::with_nat`), masquerading a
    /// private network with two clients behind one public address.
    Router,
    NatA,
    NatB,
    /// A host of its own on the lab network (`Lab::add_host`), for a
    /// cluster's Redis.
    Store,
    /// A host of its own on the lab network (`Lab::cluster`), for a tunnel
    /// agent and the private service it publishes.
    Agent,
    /// A host of its own on the lab network (`Lab::add_host`), for an ACME CA.
    Ca,
    /// Gateway node N (1-based) of a cluster behind a router
    /// (`Lab::cluster`): its uplink is `gw0` at 10.80.N.2.
    Node(u8),
}

impl Role {
    const ALL: [Role; 3] = [Role::Gateway, Role::Client, Role::Intruder];

    fn short(self) -> String {
        match self {
            Role::Gateway => "gw".into(),
            Role::Client => "cl".into(),
            Role::Intruder => "in".into(),
            Role::Router => "rt".into(),
            Role::NatA => "na".into(),
            Role::NatB => "nb".into(),
            Role::Store => "st".into(),
            Role::Agent => "ag".into(),
            Role::Ca => "ca".into(),
            Role::Node(n) => format!("n{n}"),
        }
    }

    /// The role's address: on the lab network, or on the private network
    /// behind the router for `NatA` and `NatB`.
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Role::NatA | Role::NatB => Ipv4Addr::new(192, 168, 77, self.host()),
            Role::Node(n) => Ipv4Addr::new(10, 80, n, 2),
            _ => Ipv4Addr::new(10, 77, 0, self.host()),
        }
    }

    /// The role's IPv6 address on the lab network.
    pub fn addr6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, self.host() as u16)
    }

    fn host(self) -> u8 {
        match self {
            Role::Gateway => 1,
            Role::Client | Role::NatA => 2,
            Role::Intruder | Role::NatB => 3,
            Role::Router => 4,
            Role::Store => 5,
            Role::Agent => 6,
            Role::Ca => 7,
            Role::Node(n) => 10 + n,
        }
    }

    /// The role's interface, inside its namespace.
    pub fn iface(self) -> &'static str {
        match self {
            Role::Gateway | Role::Node(_) => GW_IFACE,
            Role::Client => "cl0",
            Role::Intruder => "in0",
            Role::Router => "rt0",
            Role::NatA => "na0",
            Role::NatB => "nb0",
            Role::Store => "st0",
            Role::Agent => "ag0",
            Role::Ca => "ca0",
        }
    }
}

/// The gateway's interface, inside its namespace.
pub const GW_IFACE: &str = "gw0";

/// The gateway's second uplink ([`Lab::add_uplink`]), inside its namespace.
pub const GW_UPLINK2: &str = "gw1";
/// With [`Lab::add_uplink`]: a service address on the gateway's loopback,
/// reached over either uplink.
pub const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// With [`Lab::add_uplink`]: the client's address on its loopback, the
/// same whichever uplink carries it.
pub const ROAMING_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

/// With [`Lab::cluster`]: the address every node answers on, to which the
/// router spreads flows by ECMP.
pub const SHARED_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);

/// The gateway's IPv4 address at `port`.
pub fn gw(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Role::Gateway.addr()), port)
}

/// What a knock asks for to open one TCP port.
pub fn tcp_request(port: u16) -> Request {
    Request {
        proto: Proto::Tcp,
        ports: PortRange { lo: port, hi: port },
        source_port: None,
    }
}

/// A process's resident memory in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// The anonymous part of a process's resident memory (heap, stacks), in
/// KiB: what it allocated, without the pages of its program file or of
/// kernel memory (BPF maps) it has mapped.
pub fn anon_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "RssAnon")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// CPU time (user and system) a process has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from the
    // state on: utime and stime are the 12th and 13th, in clock ticks.
    let after = stat.rsplit_once(')').context("no command name")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let ticks = tick(11).zip(tick(12)).map(|(u, s)| u + s).context("no utime/stime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "gk";

/// A unique pin directory on bpffs for one test's gate, removed on drop.
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    pub fn new() -> Result<Pins> {
        remove_stale();
        let dir = Path::new(gatekeeper::gate::pins::BPFFS).join(unique_id());
        gatekeeper::gate::pins::prepare(&dir)?;
        Ok(Pins { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = gatekeeper::gate::unpin_all(&self.dir);
    }
}

fn unique_id() -> String {
    format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub struct Lab {
    id: String,
    namespaces: Vec<String>,
    pin_dir: PathBuf,
    /// Gateway nodes of a cluster lab, each with pins of its own.
    nodes: u8,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    scratch: PathBuf,
    /// Environment every gatekeeper process the lab starts gets.
    env: Vec<(String, PathBuf)>,
}

/// Runs a command, failing with its output when it fails.
pub fn sh(args: &[&str]) -> Result<Output> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

/// A veth pair created straight into two namespaces, never touching the
/// host's own.
fn veth(name: &str, ns: &str, peer: &str, peer_ns: &str) -> Result<()> {
    sh(&[
        "ip", "link", "add", name, "netns", ns, "type", "veth", "peer", "name", peer, "netns", peer_ns,
    ])?;
    Ok(())
}

/// The `gatekeeper` binary under test: `$GATEKEEPER_BIN`, else the one
/// cargo built next to the running executable.
pub fn gatekeeper_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("GATEKEEPER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("gatekeeper");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no gatekeeper binary next to {}: build it with `cargo build -p gatekeeper` or set GATEKEEPER_BIN",
        exe.display()
    )
}

/// Cargo's target directory, where peers the tests build once are kept.
pub fn target_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "debug" || n == "release"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("finding cargo's target directory")
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid embedded in a lab name (`gk<pid>x<n>...`), if it is one.
fn lab_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok()
}

/// Where `ip netns exec NS` finds files to bind over /etc's (`hosts`).
const NETNS_ETC: &str = "/etc/netns";

/// Removes namespaces and pins left by labs whose process has died.
fn remove_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if lab_pid(name).is_some_and(|pid| !pid_alive(pid)) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(NETNS_ETC) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if lab_pid(&name).is_some_and(|pid| !pid_alive(pid)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(gatekeeper::gate::pins::BPFFS) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if lab_pid(&name).is_some_and(|pid| !pid_alive(pid)) {
                let _ = gatekeeper::gate::unpin_all(&e.path());
            }
        }
    }
}

impl Lab {
    /// Builds the lab: gateway, client and intruder namespaces joined by a
    /// bridge in a fourth, each with an IPv4 and an IPv6 address.
    pub fn new() -> Result<Lab> {
        let mut lab = Lab::empty()?;
        let sw = format!("{}-sw", lab.id);
        lab.add_ns(&sw)?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for (i, role) in Role::ALL.into_iter().enumerate() {
            let ns = lab.ns(role);
            lab.add_ns(&ns)?;
            let outer = format!("p{i}");
            veth(role.iface(), &ns, &outer, &sw)?;
            sh(&["ip", "-n", &sw, "link", "set", &outer, "master", "br0", "up"])?;
            lab.configure(role)?;
        }
        Ok(lab)
    }

    /// The bridged lab plus a NAT router on the bridge (10.77.0.4) that
    /// masquerades a private network (192.168.77.0/24) with two clients.
    pub fn with_nat() -> Result<Lab> {
        let mut lab = Lab::new()?;
        let (sw, rt) = (format!("{}-sw", lab.id), lab.ns(Role::Router));
        lab.add_ns(&rt)?;
        veth(Role::Router.iface(), &rt, "p9", &sw)?;
        sh(&["ip", "-n", &sw, "link", "set", "p9", "master", "br0", "up"])?;
        lab.configure(Role::Router)?;
        sh(&["ip", "-n", &rt, "link", "add", "br1", "type", "bridge"])?;
        sh(&["ip", "-n", &rt, "addr", "add", "192.168.77.1/24", "dev", "br1"])?;
        sh(&["ip", "-n", &rt, "link", "set", "br1", "up"])?;
        for (i, role) in [Role::NatA, Role::NatB].into_iter().enumerate() {
            let ns = lab.ns(role);
            lab.add_ns(&ns)?;
            let outer = format!("q{i}");
            veth(role.iface(), &ns, &outer, &rt)?;
            sh(&["ip", "-n", &rt, "link", "set", &outer, "master", "br1", "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", role.addr()),
                "dev",
                role.iface(),
            ])?;
            for link in [role.iface(), "lo"] {
                sh(&["ip", "-n", &ns, "link", "set", link, "up"])?;
            }
            sh(&["ip", "-n", &ns, "route", "add", "default", "via", "192.168.77.1"])?;
        }
        lab.exec(Role::Router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        lab.exec(
            Role::Router,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                Role::Router.iface(),
                "-j",
                "MASQUERADE",
            ],
        )?;
        Ok(lab)
    }

    /// A cluster of `nodes` gateways behind one address: a router on the
    /// lab network (10.77.0.4) spreads flows to [`SHARED_ADDR`] over one
    /// link per node (10.80.N.0/24, the node's `gw0` at .2) by ECMP with
    /// L4 hashing, so a knock and the connection after it may land on
    /// different nodes; each node holds the shared address on its
    /// loopback. The client and the intruder route to it via the router;
    /// a Redis host (`Role::Store`, 10.77.0.5) sits on the lab network.
    pub fn cluster(nodes: u8) -> Result<Lab> {
        let mut lab = Lab::empty()?;
        let sw = format!("{}-sw", lab.id);
        lab.add_ns(&sw)?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for role in [Role::Client, Role::Intruder, Role::Router, Role::Store, Role::Agent] {
            lab.add_host(role)?;
        }
        let rt = lab.ns(Role::Router);
        lab.exec(Role::Router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        lab.exec(Role::Router, &["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"])?;
        let mut hops = Vec::new();
        for n in 1..=nodes {
            let node = Role::Node(n);
            let ns = lab.ns(node);
            lab.add_ns(&ns)?;
            lab.nodes = n;
            let (link, near) = (format!("r{n}"), format!("10.80.{n}.1"));
            veth(node.iface(), &ns, &link, &rt)?;
            sh(&["ip", "-n", &rt, "addr", "add", &format!("{near}/24"), "dev", &link])?;
            sh(&["ip", "-n", &rt, "link", "set", &link, "up"])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", node.addr()),
                "dev",
                node.iface(),
            ])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{SHARED_ADDR}/32"),
                "dev",
                "lo",
            ])?;
            for dev in [node.iface(), "lo"] {
                sh(&["ip", "-n", &ns, "link", "set", dev, "up"])?;
            }
            sh(&["ip", "-n", &ns, "route", "add", "default", "via", &near])?;
            hops.extend([
                "nexthop".to_string(),
                "via".into(),
                node.addr().to_string(),
                "dev".into(),
                link,
            ]);
        }
        let mut route = vec!["ip".to_string(), "-n".into(), rt.clone(), "route".into(), "add".into()];
        route.push(format!("{SHARED_ADDR}/32"));
        route.extend(hops);
        sh(&route.iter().map(String::as_str).collect::<Vec<_>>())?;
        for role in [Role::Client, Role::Intruder, Role::Store, Role::Agent] {
            let ns = lab.ns(role);
            for net in [format!("{SHARED_ADDR}/32"), "10.80.0.0/16".to_string()] {
                sh(&[
                    "ip",
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &net,
                    "via",
                    &Role::Router.addr().to_string(),
                ])?;
            }
        }
        Ok(lab)
    }

    /// Adds `role` as one more host on the lab network, with its address.
    pub fn add_host(&mut self, role: Role) -> Result<()> {
        let (sw, ns) = (format!("{}-sw", self.id), self.ns(role));
        self.add_ns(&ns)?;
        let outer = format!("h{}", role.host());
        veth(role.iface(), &ns, &outer, &sw)?;
        sh(&["ip", "-n", &sw, "link", "set", &outer, "master", "br0", "up"])?;
        self.configure(role)
    }

    /// A gateway and a client joined by one veth pair and nothing else,
    /// for measurements where a bridge would be the bottleneck.
    pub fn direct() -> Result<Lab> {
        let mut lab = Lab::empty()?;
        let (gw, cl) = (lab.ns(Role::Gateway), lab.ns(Role::Client));
        lab.add_ns(&gw)?;
        lab.add_ns(&cl)?;
        veth(GW_IFACE, &gw, Role::Client.iface(), &cl)?;
        lab.configure(Role::Gateway)?;
        lab.configure(Role::Client)?;
        Ok(lab)
    }

    /// Adds a second uplink: a second bridge (10.78.0.0/24) with the
    /// gateway (`gw1`, .1), the client (`cl1`, .2) and the intruder
    /// (`in1`, .3) on it; and an address on the gateway's and the client's
    /// loopback ([`SERVICE_ADDR`], [`ROAMING_ADDR`]) that a route on each
    /// side sends over either uplink; traffic between them starts on the
    /// first ([`Lab::route_via`]).
    pub fn add_uplink(&self) -> Result<()> {
        let sw = format!("{}-sw", self.id);
        sh(&["ip", "-n", &sw, "link", "add", "br1", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br1", "up"])?;
        for (i, (role, iface)) in [
            (Role::Gateway, GW_UPLINK2),
            (Role::Client, "cl1"),
            (Role::Intruder, "in1"),
        ]
        .into_iter()
        .enumerate()
        {
            let (ns, outer) = (self.ns(role), format!("u{i}"));
            veth(iface, &ns, &outer, &sw)?;
            sh(&["ip", "-n", &sw, "link", "set", &outer, "master", "br1", "up"])?;
            let addr = format!("10.78.0.{}/24", role.host());
            sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", iface])?;
            sh(&["ip", "-n", &ns, "link", "set", iface, "up"])?;
        }
        for (role, lo) in [(Role::Gateway, SERVICE_ADDR), (Role::Client, ROAMING_ADDR)] {
            sh(&[
                "ip",
                "-n",
                &self.ns(role),
                "addr",
                "add",
                &format!("{lo}/32"),
                "dev",
                "lo",
            ])?;
        }
        self.route_via(1)
    }

    /// A VXLAN that the gateway terminates (`vx0`, VNI 42, 10.88.0.1, its
    /// peer the client) and that `from` joins uninvited: with the VNI and
    /// the gateway as its remote, it is learned as a peer, as a default
    /// VXLAN device does. Returns the gateway's address inside it. Its
    /// outer packets go to udp/4789, so a gate on the uplink that does not
    /// protect that lets them in, and the frames inside reach the host's
    /// services through `vx0`.
    pub fn vxlan_to_gateway(&self, from: Role) -> Result<IpAddr> {
        let (gw_addr, from_addr) = (Role::Gateway.addr().to_string(), from.addr().to_string());
        let peer = Role::Client.addr().to_string();
        for (role, local, remote, host) in [
            (Role::Gateway, &gw_addr, &peer, 1),
            (from, &from_addr, &gw_addr, from.host()),
        ] {
            let ns = self.ns(role);
            sh(&[
                "ip",
                "-n",
                &ns,
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                "42",
                "dstport",
                "4789",
                "local",
                local,
                "remote",
                remote,
                "dev",
                role.iface(),
            ])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.88.0.{host}/24"),
                "dev",
                "vx0",
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", "vx0", "up"])?;
        }
        Ok(Ipv4Addr::new(10, 88, 0, 1).into())
    }

    /// Sends the traffic between [`ROAMING_ADDR`] and [`SERVICE_ADDR`] over
    /// uplink 1 (the lab network) or 2 (`gw1`), both ways.
    pub fn route_via(&self, uplink: u8) -> Result<()> {
        let net = if uplink == 1 { "10.77.0" } else { "10.78.0" };
        let (gw, cl) = (self.ns(Role::Gateway), self.ns(Role::Client));
        let to_client = format!("{ROAMING_ADDR}/32");
        let to_service = format!("{SERVICE_ADDR}/32");
        let (via_client, via_gateway) = (format!("{net}.2"), format!("{net}.1"));
        let roaming = ROAMING_ADDR.to_string();
        sh(&["ip", "-n", &gw, "route", "replace", &to_client, "via", &via_client])?;
        sh(&[
            "ip",
            "-n",
            &cl,
            "route",
            "replace",
            &to_service,
            "via",
            &via_gateway,
            "src",
            &roaming,
        ])?;
        Ok(())
    }

    fn empty() -> Result<Lab> {
        remove_stale();
        let id = unique_id();
        let scratch = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&scratch)?;
        Ok(Lab {
            pin_dir: Path::new(gatekeeper::gate::pins::BPFFS).join(&id),
            nodes: 0,
            id,
            namespaces: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            scratch,
            env: Vec::new(),
        })
    }

    /// Gives a role's host its own /etc/hosts, which programs started with
    /// [`Lab::exec`] (`ip netns exec`) see in place of the machine's: a
    /// name resolver private to this lab. Removed with the lab.
    pub fn set_hosts(&self, role: Role, hosts: &str) -> Result<()> {
        let dir = Path::new(NETNS_ETC).join(self.ns(role));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), hosts)?;
        Ok(())
    }

    /// Sets `key` to `path` in the environment of every gatekeeper process
    /// the lab starts from now on (the CLI, daemons, agents).
    pub fn set_gatekeeper_env(&mut self, key: &str, path: &Path) {
        self.env.push((key.to_string(), path.to_path_buf()));
    }

    /// Addresses the role's interface and brings it and loopback up.
    fn configure(&self, role: Role) -> Result<()> {
        let ns = self.ns(role);
        let iface = role.iface();
        for addr in [format!("{}/24", role.addr()), format!("{}/64", role.addr6())] {
            sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", iface, "nodad"])?;
        }
        for link in [iface, "lo"] {
            sh(&["ip", "-n", &ns, "link", "set", link, "up"])?;
        }
        Ok(())
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        sh(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    /// The namespace a role lives in.
    pub fn ns(&self, role: Role) -> String {
        let role = role.short();
        format!("{}-{role}", self.id)
    }

    /// Where this lab's gate pins its maps.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Where a gateway role's gate pins its maps.
    pub fn pin_dir_of(&self, role: Role) -> PathBuf {
        match role {
            Role::Node(n) => Path::new(gatekeeper::gate::pins::BPFFS).join(format!("{}n{n}", self.id)),
            _ => self.pin_dir.clone(),
        }
    }

    /// A scratch directory removed with the lab.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    /// The gateway's state directory (keys, clients, audit log); the daemon
    /// is always started with it.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir_of(Role::Gateway)
    }

    /// A gateway role's state directory.
    pub fn state_dir_of(&self, role: Role) -> PathBuf {
        match role {
            Role::Node(n) => self.scratch.join(format!("state-n{n}")),
            _ => self.scratch.join("state"),
        }
    }

    /// Runs a `gatekeeper` command that takes `--state-dir`, in the
    /// gateway's network namespace where it has one (a cluster's Redis is
    /// reached from there); returns stdout.
    pub fn state_cli(&self, args: &[&str]) -> Result<String> {
        self.state_cli_on(Role::Gateway, args)
    }

    /// [`Lab::state_cli`] on a gateway role.
    pub fn state_cli_on(&self, role: Role, args: &[&str]) -> Result<String> {
        let out = self
            .gateway_command(role)?
            .args(args)
            .arg("--state-dir")
            .arg(self.state_dir_of(role))
            .stdin(Stdio::null())
            .output()?;
        stdout_of(args, out)
    }

    /// Runs `gatekeeper init` for the gateway's addresses, unless done.
    pub fn init(&self) -> Result<()> {
        if !self.state_dir().join("server.key").exists() {
            self.state_cli(&[
                "init",
                "--public-addr",
                &format!("{},{}", Role::Gateway.addr(), Role::Gateway.addr6()),
            ])?;
        }
        Ok(())
    }

    /// Enrolls a device (running `gatekeeper init` first if needed) and
    /// returns the path of its credential.
    pub fn enroll(&self, name: &str, extra: &[&str]) -> Result<PathBuf> {
        self.init()?;
        let cred = self.scratch.join(format!("{name}.credential.toml"));
        let mut args = vec![
            "client",
            "add",
            name,
            "--out",
            cred.to_str().context("utf-8 scratch path")?,
        ];
        args.extend_from_slice(extra);
        self.state_cli(&args)?;
        Ok(cred)
    }

    /// Starts `gatekeeper ARGS` inside a role's namespace with piped stdio,
    /// as a user on that host would run it.
    pub fn spawn_gatekeeper(&self, role: Role, args: &[&str]) -> Result<Child> {
        self.spawn_program(role, &gatekeeper_bin()?, args)
    }

    /// Starts `program ARGS` inside a role's namespace with piped stdio.
    pub fn spawn_program(&self, role: Role, program: &Path, args: &[&str]) -> Result<Child> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }

    /// Runs `gatekeeper ARGS` in a role's namespace with `input` on its
    /// stdin; its output, once it exits (killed past `limit`).
    pub fn gatekeeper_with_input(&self, role: Role, args: &[&str], input: &[u8], limit: Duration) -> Result<Output> {
        let mut child = self.spawn_gatekeeper(role, args)?;
        child.stdin.take().context("stdin")?.write_all(input)?;
        output_within(child, limit)
    }

    /// `gatekeeper knock` run on a role's host (`ip netns exec`, so it sees
    /// that host's /etc/hosts) with `credential` and `env`: a UDP knock for
    /// TCP `port`, bound to `source_port` if given. Its output, whether or
    /// not it succeeded.
    pub fn udp_knock(
        &self,
        role: Role,
        credential: &Path,
        port: u16,
        source_port: Option<u16>,
        env: &[(&str, &str)],
    ) -> Result<Output> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(role)])
            .arg(gatekeeper_bin()?)
            .args(["knock", "--credential"])
            .arg(credential)
            .args(["--proto", "tcp", "--port", &port.to_string(), "--via", "udp"])
            .envs(env.iter().copied());
        if let Some(sport) = source_port {
            c.args(["--source-port", &sport.to_string()]);
        }
        Ok(c.stdin(Stdio::null()).output()?)
    }

    /// Sends `bytes` in one UDP datagram from a role to `to`.
    pub fn send_udp(&self, from: Role, to: SocketAddr, bytes: Vec<u8>) -> Result<()> {
        self.in_ns(from, move || -> Result<()> {
            let any: IpAddr = if to.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            UdpSocket::bind((any, 0))?.send_to(&bytes, to)?;
            Ok(())
        })?
    }

    /// Runs `f` with the credential's knocker inside a role's namespace,
    /// where it sees that host's own address as its `local_ip`; `f` also
    /// gets the gateway's IPv4 address.
    pub fn with_knocker<T: Send + 'static>(
        &self,
        role: Role,
        credential: &Path,
        f: impl FnOnce(&Knocker, IpAddr) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let k = Knocker::new(Credential::load(credential)?)?;
        self.in_ns(role, move || f(&k, Role::Gateway.addr().into()))?
    }

    /// Every line of the audit log, parsed.
    pub fn audit(&self) -> Result<Vec<serde_json::Value>> {
        self.audit_of(Role::Gateway)
    }

    /// Every line of a gateway role's audit log, parsed.
    pub fn audit_of(&self, role: Role) -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(self.state_dir_of(role).join("audit.log")).unwrap_or_default();
        Ok(text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?)
    }

    /// Runs a program inside a role's namespace (`ip netns exec`, which
    /// also gives it a private /sys: fine for anything but bpffs).
    pub fn exec(&self, role: Role, args: &[&str]) -> Result<Output> {
        let ns = self.ns(role);
        let mut full = vec!["ip", "netns", "exec", ns.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `f` on a thread that has entered a role's network namespace.
    /// Sockets it creates stay in that namespace wherever they are used.
    pub fn in_ns<T: Send + 'static>(&self, role: Role, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.ns(role));
        std::thread::spawn(move || -> Result<T> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("lab thread panicked"))?
    }

    /// An echo service on a TCP port of a role, until the lab is dropped.
    pub fn serve_tcp_echo(&mut self, role: Role, port: u16) -> Result<()> {
        // `[::]` is dual-stack: it serves IPv4 and IPv6 alike.
        let listener = self.in_ns(role, move || TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))??;
        // A blocking accept that gives up every 100 ms to look at `stop`:
        // connections are taken at once, and the thread still ends.
        socket2::SockRef::from(&listener).set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok((conn, _)) = listener.accept() {
                    let _ = conn.set_nodelay(true);
                    let stop = stop.clone();
                    std::thread::spawn(move || echo_stream(conn, &stop));
                }
            }
        }));
        Ok(())
    }

    /// An echo service on a UDP port of a role, until the lab is dropped.
    pub fn serve_udp_echo(&mut self, role: Role, port: u16) -> Result<()> {
        let sock = self.in_ns(role, move || UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)))??;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        }));
        Ok(())
    }

    /// Opens a TCP connection from a role (from `src_port`, or any), or
    /// `None` when it does not come up within `timeout`.
    pub fn tcp_connect(
        &self,
        role: Role,
        to: SocketAddr,
        src_port: Option<u16>,
        timeout: Duration,
    ) -> Result<Option<TcpStream>> {
        self.in_ns(role, move || -> Result<Option<TcpStream>> {
            let domain = if to.is_ipv4() {
                socket2::Domain::IPV4
            } else {
                socket2::Domain::IPV6
            };
            let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
            sock.set_reuse_address(true)?;
            if let Some(p) = src_port {
                let any: IpAddr = if to.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                sock.bind(&SocketAddr::new(any, p).into())?;
            }
            match sock.connect_timeout(&to.into(), timeout) {
                Ok(()) => {
                    let stream: TcpStream = sock.into();
                    stream.set_read_timeout(Some(timeout))?;
                    Ok(Some(stream))
                }
                Err(_) => Ok(None),
            }
        })?
    }

    /// Whether a role can connect to `to` and get `ping` echoed back.
    pub fn tcp_echo_works(&self, role: Role, to: SocketAddr, src_port: Option<u16>) -> Result<bool> {
        let Some(mut s) = self.tcp_connect(role, to, src_port, Duration::from_secs(2))? else {
            return Ok(false);
        };
        Ok(round_trip(&mut s, b"ping").unwrap_or(false))
    }

    /// Whether `len` bytes sent from a role to an echo service at `to` all
    /// come back unchanged: a bulk transfer, in big segments.
    pub fn tcp_bulk_echo_works(&self, role: Role, to: SocketAddr, len: usize) -> Result<bool> {
        let Some(stream) = self.tcp_connect(role, to, None, Duration::from_secs(2))? else {
            return Ok(false);
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut writer = stream.try_clone()?;
        let payload = sent.clone();
        let send = std::thread::spawn(move || writer.write_all(&payload));
        let mut got = vec![0u8; len];
        let read = (&stream).read_exact(&mut got);
        let wrote = send.join().map_err(|_| anyhow!("writer panicked"))?;
        Ok(read.is_ok() && wrote.is_ok() && got == sent)
    }

    /// Whether a UDP datagram from a role to `to` comes back within a second.
    pub fn udp_echo_works(&self, role: Role, to: SocketAddr) -> Result<bool> {
        self.in_ns(role, move || -> Result<bool> {
            let any: IpAddr = if to.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            let sock = UdpSocket::bind((any, 0))?;
            sock.set_read_timeout(Some(Duration::from_millis(300)))?;
            let mut buf = [0u8; 64];
            for _ in 0..3 {
                sock.send_to(b"ping", to)?;
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    return Ok(&buf[..n] == b"ping");
                }
            }
            Ok(false)
        })?
    }

    /// Runs the `gatekeeper` CLI on this lab's gate (adds `--pin-dir`), in
    /// the gateway's network namespace where it has one (only that: the
    /// CLI sees the same bpffs as the daemon).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.cli_on(Role::Gateway, args)
    }

    /// [`Lab::cli`] on a gateway role's gate.
    pub fn cli_on(&self, role: Role, args: &[&str]) -> Result<Output> {
        let out = self
            .gateway_command(role)?
            .args(args)
            .arg("--pin-dir")
            .arg(self.pin_dir_of(role))
            .stdin(Stdio::null())
            .output()?;
        Ok(out)
    }

    /// `gatekeeper`, to be run in the gateway's network namespace where it
    /// has one (only that: it sees the same bpffs as the daemon).
    fn gateway_command(&self, role: Role) -> Result<Command> {
        let netns = format!("/run/netns/{}", self.ns(role));
        let mut c = if Path::new(&netns).exists() {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={netns}")).arg(gatekeeper_bin()?);
            c
        } else {
            Command::new(gatekeeper_bin()?)
        };
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        Ok(c)
    }

    /// Like [`Lab::cli`], failing unless the command succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        stdout_of(args, self.cli(args)?)
    }

    /// Starts the daemon in the gateway's namespace with `args` after
    /// `run --iface gw0 --pin-dir <lab pins>`, and waits until the gate is up.
    /// Only the network namespace is entered, so daemon and CLI see the
    /// same bpffs.
    pub fn start_daemon(&self, args: &[&str]) -> Result<Daemon> {
        self.start_daemon_on(Role::Gateway, args)
    }

    /// [`Lab::start_daemon`] on a gateway role.
    pub fn start_daemon_on(&self, role: Role, args: &[&str]) -> Result<Daemon> {
        let pins = self.pin_dir_of(role);
        let state = self.state_dir_of(role);
        let mut full = vec!["run", "--iface", role.iface(), "--pin-dir"];
        full.push(pins.to_str().context("utf-8 pin path")?);
        full.extend(["--state-dir", state.to_str().context("utf-8 state path")?]);
        full.extend_from_slice(args);
        self.start_gatekeeper_on(role, &full, "gate up")
    }

    /// Starts a long-running `gatekeeper ARGS` (a daemon, an agent) in a
    /// role's network namespace, its output in a log of its own, and
    /// waits until the log says `ready`.
    pub fn start_gatekeeper_on(&self, role: Role, args: &[&str], ready: &str) -> Result<Daemon> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let log_path = self.scratch.join(format!("{}-{n}.log", args[0]));
        let log = File::create(&log_path)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns(role)))
            .arg(gatekeeper_bin()?)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting gatekeeper {}", args[0]))?;
        let mut d = Daemon {
            child: Some(child),
            log: log_path,
        };
        d.wait_for(ready, Duration::from_secs(20))?;
        Ok(d)
    }
}

fn echo_stream(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// Sends `msg` and reads it back; false on a short or wrong answer.
pub fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<bool> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    Ok(got == msg)
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = gatekeeper::gate::unpin_all(&self.pin_dir);
        for n in 1..=self.nodes {
            let _ = gatekeeper::gate::unpin_all(&self.pin_dir_of(Role::Node(n)));
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            let _ = std::fs::remove_dir_all(Path::new(NETNS_ETC).join(&ns));
        }
        // Only if no other lab's files are in it.
        let _ = std::fs::remove_dir(NETNS_ETC);
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// A running gatekeeper process (`run`, an agent); killed on drop.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Whether the daemon is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The daemon's process id (nsenter execs it in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log contains `needle`.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("daemon exited ({status}) before logging {needle:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("daemon did not log {needle:?} within {limit:?}:\n{}", self.log())
    }

    /// SIGKILL: no cleanup of any kind can run.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits (bounded) for exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("daemon already stopped")
        };
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        c.kill()?;
        bail!("daemon ignored SIGTERM for 10s")
    }

    /// Waits (bounded) for the daemon to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let Some(c) = self.child.as_mut() else {
            bail!("daemon already stopped")
        };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("daemon still running after {limit:?}")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A helper process (an agent, a server, a client) killed when dropped,
/// however the test ends.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard(Some(child))
    }

    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// Waits for the process's output, killing it past `limit`.
    pub fn output_within(mut self, limit: Duration) -> Result<Output> {
        output_within(self.0.take().context("already reaped")?, limit)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Stdout of a finished `gatekeeper` run, or its stderr as the error.
fn stdout_of(args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "gatekeeper {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits for a child's output, killing it if it runs past `limit`.
pub fn output_within(mut child: Child, limit: Duration) -> Result<Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "killed after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// Polls `check` every 50 ms until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if check()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
