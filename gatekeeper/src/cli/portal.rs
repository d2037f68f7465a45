//! `gatekeeper portal` and `gatekeeper connect --portal`: reaching what is
//! behind a portal, with the knock inside each TLS ClientHello.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::Path,
    sync::Arc,
};

use anyhow::{Context, Result};
use clap::Args;
use gatekeeper::portal::connector::PortalClient;
use rustls::pki_types::ServerName;
use tunnel::tls::Fingerprint;

use super::{JournalArg, LogFormat, knocker};

/// Listen locally and carry every connection to a portal, authorized.
///
/// Each local connection becomes one TLS session to the portal whose
/// ClientHello carries a fresh knock bound to it; the portal relays it to
/// its upstream. Point a browser, curl or any TCP client at the local
/// address. The portal's public key is pinned: by the credential's
/// tls_fingerprint (the gateway's own key), or by --fingerprint.
///
/// Example: gatekeeper portal --credential laptop.credential.toml -L 127.0.0.1:8443 gw.example.net:443
#[derive(Args, Debug)]
pub struct PortalArgs {
    /// The credential file from `gatekeeper client add`.
    #[arg(long, value_name = "FILE")]
    credential: std::path::PathBuf,
    /// Local address to listen on.
    #[arg(short = 'L', long = "listen", value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The portal: HOST:PORT.
    portal: String,
    /// SHA-256 pin of the portal's public key, if its certificate is not the
    /// gateway's own (the daemon logs it as `pin` when the portal starts,
    /// and `gatekeeper status` shows it); a whole certificate's SHA-256 also works.
    #[arg(long, value_name = "HEX")]
    fingerprint: Option<Fingerprint>,
    /// The host name to ask the portal for (TLS SNI): a relayed host
    /// reaches its relay agent instead of the portal's upstream [default:
    /// the portal's host, when it is a name].
    #[arg(long, value_name = "HOST")]
    sni: Option<String>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    journal: JournalArg,
}

/// The client for the portal at `target`, pinned to `fingerprint` or the
/// credential's, asking for `sni` or else `target`'s host name.
pub fn client(
    credential: &Path,
    journal: &JournalArg,
    target: &str,
    fingerprint: Option<Fingerprint>,
    sni: Option<String>,
) -> Result<PortalClient> {
    let k = knocker(credential, journal)?;
    let portal = target
        .to_socket_addrs()
        .with_context(|| format!("resolving the portal {target:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("the portal {target:?} resolves to no address"))?;
    let pin = match fingerprint {
        Some(f) => f,
        None => k
            .tls_fingerprint()
            .with_context(|| {
                format!(
                    "{} has no tls_fingerprint (it was enrolled before the portal existed): pass --fingerprint HEX",
                    credential.display()
                )
            })?
            .parse()
            .with_context(|| format!("the tls_fingerprint in {}", credential.display()))?,
    };
    let host = target.rsplit_once(':').map_or(target, |(host, _)| host);
    let name = sni.or_else(|| host.parse::<std::net::IpAddr>().is_err().then(|| host.to_string()));
    let sni = name
        .map(|n| ServerName::try_from(n.clone()).with_context(|| format!("--sni {n:?} is not a host name")))
        .transpose()?;
    Ok(PortalClient::new(k, portal, pin, sni)?)
}

pub fn portal(args: PortalArgs) -> Result<()> {
    super::init_logging(args.log_format);
    let client = Arc::new(client(
        &args.credential,
        &args.journal,
        &args.portal,
        args.fingerprint,
        args.sni,
    )?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}: is the port taken?", args.listen))?;
        tracing::info!(listen = %args.listen, portal = %args.portal, "carrying local connections to the portal");
        eprintln!(
            "gatekeeper: listening on {}; connections there reach {}'s upstream",
            args.listen, args.portal
        );
        tokio::select! {
            _ = client.listen(listener) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    })
}

/// `connect --portal`: one session over stdin/stdout.
pub fn connect(credential: &Path, journal: &JournalArg, target: &str, fingerprint: Option<Fingerprint>) -> Result<()> {
    let client = client(credential, journal, target, fingerprint, None)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        client
            .carry(stdio)
            .await
            .with_context(|| format!("carrying stdin/stdout to the portal {target}"))
    })?;
    Ok(())
}
