//! `gatekeeper knock` and `gatekeeper connect`: the client side.

use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream, ToSocketAddrs},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use gatekeeper::{
    knock::{Carrier, send::Request},
    spec::{PortRange, Proto},
};

use super::{JournalArg, knocker};

/// Send one knock: ask the gateway to open ports to this machine.
///
/// By default a TCP request travels as a SYN to the first port (from
/// --source-port, or a random one), and UDP and ICMP requests as a UDP
/// datagram to the gateway's knock port. SYN and ICMP knocks need a raw
/// socket: root or CAP_NET_RAW on Linux, root on macOS; Windows sends no
/// SYN knock (use --via udp) and ICMP ones only for an Administrator.
///
/// Example: gatekeeper knock --credential laptop.credential.toml --proto tcp --port 22
#[derive(Args, Debug)]
pub struct Knock {
    /// The credential file from `gatekeeper client add`.
    #[arg(long, value_name = "FILE")]
    credential: PathBuf,
    /// The gateway address [default: the credential's first].
    #[arg(long, value_name = "ADDR")]
    server: Option<IpAddr>,
    /// What to open.
    #[arg(long, value_name = "PROTO")]
    proto: Proto,
    /// Destination ports to open: PORT or LOW-HIGH (not for icmp).
    #[arg(long, value_name = "PORTS")]
    port: Option<PortRange>,
    /// Bind the opening to this source port (a SYN knock always binds its own).
    #[arg(long, value_name = "PORT")]
    source_port: Option<u16>,
    /// How the knock travels [default: syn for tcp, udp otherwise].
    #[arg(long, value_enum)]
    via: Option<Carrier>,
    #[command(flatten)]
    journal: JournalArg,
}

pub fn knock(args: Knock) -> Result<()> {
    // Warnings (a journal that cannot be written) reach stderr.
    super::init_logging(super::LogFormat::Text);
    let k = knocker(&args.credential, &args.journal)?;
    let server = k.server(args.server)?;
    let via = args.via.unwrap_or(if args.proto == Proto::Tcp {
        Carrier::Syn
    } else {
        Carrier::Udp
    });
    if via == Carrier::Syn && args.proto != Proto::Tcp {
        bail!(
            "a SYN knock can only open tcp: use --via udp or --via icmp for {}",
            args.proto
        );
    }
    let ports = match (args.proto, args.port) {
        (Proto::Icmp, _) => PortRange { lo: 0, hi: u16::MAX },
        (_, Some(p)) => p,
        (p, None) => bail!("--port is required to open {p}: PORT or LOW-HIGH"),
    };
    let req = Request {
        proto: args.proto,
        ports,
        source_port: args.source_port,
    };
    let sport = k.send(server, &req, via)?;
    let target = match via {
        Carrier::Syn => format!("tcp/{} (SYN)", ports.lo),
        Carrier::Udp => format!("udp/{}", k.knock_port()),
        Carrier::Icmp => "icmp echo".to_string(),
        Carrier::ClientHello => "a TLS ClientHello".to_string(),
    };
    let what = if args.proto == Proto::Icmp {
        "icmp echo".to_string()
    } else {
        format!("{}/{ports}", args.proto)
    };
    let bound = if via == Carrier::Syn || args.source_port.is_some() {
        format!("source port {sport} only")
    } else {
        "any source port".into()
    };
    println!(
        "knocked {server} as {} via {target}: asked to open {what} ({bound})",
        k.name()
    );
    Ok(())
}

/// Knock with a TCP SYN, then connect from that same port and relay
/// stdin/stdout; works as an ssh ProxyCommand:
///
///   ssh -o ProxyCommand='gatekeeper connect --credential c.toml %h:%p' host
///
/// With --portal, TARGET is a portal (e.g. %h:443): the knock rides in the
/// TLS ClientHello and stdin/stdout reach the portal's upstream; no raw
/// socket needed.
#[derive(Args, Debug)]
pub struct Connect {
    #[arg(long, value_name = "FILE")]
    credential: PathBuf,
    /// Where to connect: HOST:PORT.
    target: String,
    /// TARGET is a portal: knock inside TLS instead of with a SYN.
    #[arg(long)]
    portal: bool,
    /// With --portal: SHA-256 pin of the portal's public key, if its
    /// certificate is not the gateway's own [default: the credential's tls_fingerprint].
    #[arg(long, value_name = "HEX", requires = "portal")]
    fingerprint: Option<tunnel::tls::Fingerprint>,
    /// How long each connection attempt may take.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = gatekeeper::spec::duration)]
    timeout: Duration,
    #[command(flatten)]
    journal: JournalArg,
}

pub fn connect(args: Connect) -> Result<()> {
    super::init_logging(super::LogFormat::Text);
    if args.portal {
        return super::portal::connect(&args.credential, &args.journal, &args.target, args.fingerprint);
    }
    let k = knocker(&args.credential, &args.journal)?;
    let target = args
        .target
        .to_socket_addrs()
        .with_context(|| format!("resolving {:?} (expected HOST:PORT)", args.target))?
        .next()
        .with_context(|| format!("{:?} resolves to no address", args.target))?;
    let stream = k.knock_and_connect(target, args.timeout, Carrier::Syn)?.with_context(|| {
        format!("{target} did not answer after two knocks: is the credential enrolled and enabled, and the port in its policy?")
    })?;
    relay(stream)
}

/// Copies stdin to the stream and the stream to stdout until both end.
fn relay(stream: TcpStream) -> Result<()> {
    let mut upstream = stream.try_clone()?;
    let to_server = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = stdin.read(&mut buf)?;
            if n == 0 {
                return upstream.shutdown(std::net::Shutdown::Write);
            }
            upstream.write_all(&buf[..n])?;
        }
    });
    let mut downstream = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = downstream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    drop(to_server);
    Ok(())
}
