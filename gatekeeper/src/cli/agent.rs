//! `gatekeeper agent`: the private network's side of a published service
//! (the gateway's side is `gatekeeper tunnel`).

use std::{net::ToSocketAddrs, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use gatekeeper::{
    platform,
    spec::AllowedDest,
    tunnels::{
        Token,
        agent::{self, Publish},
    },
};

/// Run inside the private network: publish HOST:PORT through the gateway.
///
/// Knocks, dials the gateway over TLS (pinning the certificate from the
/// token), proves itself with the token and relays public connections to
/// --forward. Reconnects by itself; exits when the tunnel is revoked, or
/// when stopped: on SIGTERM or Ctrl-C it says goodbye to the gateway first,
/// and `agent --stop` ends the session from anywhere that has the token.
/// The gateway audits either as "agent disconnected by its operator".
/// Exits 0 when stopped, 4 when the gateway refused it for good (revoked,
/// re-issued, a certificate other than the pinned one), 1 on other errors.
///
/// Example: gatekeeper agent --token-file web.token --forward 127.0.0.1:8080
#[derive(Args, Debug)]
pub struct Agent {
    /// The token from `gatekeeper tunnel issue`.
    #[arg(long, conflicts_with = "token_file", required_unless_present = "token_file")]
    token: Option<String>,
    /// A file holding the token (keep it 0600).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The private service: HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", required_unless_present_any = ["stop", "socks5"], conflicts_with = "socks5")]
    forward: Option<String>,
    /// Publish a private network instead of one service: visitors speak SOCKS5 to the
    /// published port (curl --socks5-hostname GATEWAY:PORT http://host/), this agent
    /// resolves their destinations here and connects to those --allow-dest admits.
    #[arg(long, requires = "allow_dest")]
    socks5: bool,
    /// What SOCKS5 visitors may reach: CIDR:PORTS, comma-separated or repeated
    /// (192.168.1.0/24:80,10.0.0.5:8000-8100). Every destination asked for is audited
    /// on the gateway.
    #[arg(long, value_name = "CIDR:PORTS", value_delimiter = ',')]
    allow_dest: Vec<AllowedDest>,
    /// End the tunnel's running session instead (wherever its agent runs),
    /// through the gateway: knocks and proves the token like the agent.
    #[arg(long)]
    stop: bool,
}

pub fn agent(args: Agent) -> Result<()> {
    let text = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading the token file {}", f.display()))?
        }
        (None, None) => bail!("pass --token TOKEN or --token-file FILE"),
    };
    let token = Token::decode(&text)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if args.stop {
        for said in runtime.block_on(agent::stop(&token))? {
            println!("{said}");
        }
        return Ok(());
    }
    let publish = match args.forward {
        _ if args.socks5 => Publish::Socks5(args.allow_dest),
        Some(forward) => Publish::Forward(
            forward
                .to_socket_addrs()
                .with_context(|| format!("resolving --forward {forward:?} (expected HOST:PORT)"))?
                .next()
                .with_context(|| format!("--forward {forward:?} resolves to no address"))?,
        ),
        None => bail!("pass --forward HOST:PORT, or --socks5 with --allow-dest CIDR:PORTS"),
    };
    super::init_logging(super::LogFormat::Text);
    runtime.block_on(async {
        let (leave_tx, leave) = tokio::sync::watch::channel(false);
        let stopped = platform::stopped();
        let what = publish.to_string();
        let running = agent::run(token, publish, leave, |public| {
            eprintln!("gatekeeper agent: {what} is published at {public}")
        });
        tokio::pin!(running);
        tokio::select! {
            ended = &mut running => return Ok(ended?),
            stopped = stopped => stopped.context("listening for the stop signal")?,
        }
        eprintln!("gatekeeper agent: stopping; telling the gateway");
        let _ = leave_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(3), running).await {
            Ok(ended) => ended?,
            Err(_) => eprintln!("gatekeeper agent: the gateway did not hear the goodbye in time"),
        }
        anyhow::Ok(())
    })
}
