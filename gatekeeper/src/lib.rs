//! Gatekeeper's userspace, in the order data flows through it:
//!
//! - [`spec`]: what operators type: ports, tuples, prefixes, durations, sizes.
//! - [`gate`]: the XDP gate and its handles: pins, loader, maps, the ring,
//!   the interfaces it may span, the sweeper.
//! - [`store`]: the one owner of the gateway's state (keys, identity,
//!   clients, tunnels, config) behind a trait, its local-files backend, and
//!   the watcher that keeps revocations in force.
//! - [`knock`]: knock v1 both ways: keys, wire format, payload,
//!   credentials, verification, and the client that sends knocks.
//! - [`daemon`]: the running daemon, the interfaces it covers, and its
//!   knock service.
//! - [`portal`]: the TLS listener that finds knocks in ClientHellos, and
//!   its client.
//! - [`tunnels`]: publishing private services: tokens, the gateway's
//!   listener, the agent.
//! - [`relay`]: HTTP through Redis, for agents that can reach nothing else.
//! - [`channel`]: unmodified applications wrapped in a mandated cipher suite.
//! - [`audit`]: the audit trail, written by one thread, bounded.
//! - [`metrics`]: what Prometheus scrapes: event counts and the status.
//! - [`control`]: the daemon's control socket, and the CLI's side of it.
//! - [`clock`]: monotonic nanoseconds for the gate, unix seconds for people.
//! - [`private_file`]: files only their owner reads, written whole.
//! - [`encrypted_file`]: device files encrypted at rest with a passphrase.
//! - [`platform`]: what differs between Linux, macOS and Windows.
//! - [`hex`]: the text form of nonces, digests and secrets.
//!
//! Two builds: the default `gateway` feature has everything (Linux only);
//! `--no-default-features --features client` has what a device runs
//! (knocks, the portal and tunnel clients, the agent, the key tools) and
//! builds on stable Rust for Linux, macOS and Windows.

#[cfg(all(feature = "gateway", not(target_os = "linux")))]
compile_error!(
    "the gateway (XDP) runs on Linux only; for this system build the client: --no-default-features --features client"
);

pub mod clock;
pub mod encrypted_file;
pub mod hex;
pub mod knock;
pub mod platform;
pub mod portal;
pub mod private_file;
pub mod spec;
pub mod tunnels;

#[cfg(feature = "gateway")]
pub mod audit;
#[cfg(feature = "gateway")]
pub mod channel;
#[cfg(feature = "gateway")]
pub mod control;
#[cfg(feature = "gateway")]
pub mod daemon;
#[cfg(feature = "gateway")]
pub mod gate;
#[cfg(feature = "gateway")]
pub mod metrics;
#[cfg(feature = "gateway")]
pub mod relay;
#[cfg(feature = "gateway")]
pub mod store;

/// The release and the git revision this binary was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("GATEKEEPER_REVISION"), ")");

/// An error and each of its causes, once each: `a: b: c`. For logs and
/// audit lines, where `{}` alone would drop the causes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(all(test, feature = "gateway"))]
mod tests {
    use std::{io, path::PathBuf};

    /// No message repeats the cause printed after it in the chain.
    #[test]
    fn each_cause_is_printed_once() {
        let io = || io::Error::from(io::ErrorKind::PermissionDenied);
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(crate::store::StoreError::Io {
                path: PathBuf::from("/state/clients"),
                source: io(),
            }),
            Box::new(crate::store::config::ConfigError::Read {
                path: PathBuf::from("/etc/gk.toml"),
                source: io(),
            }),
            Box::new(crate::encrypted_file::EncryptedError::Read {
                path: PathBuf::from("laptop.toml"),
                source: io(),
            }),
            Box::new(crate::gate::pins::PinError::Io {
                path: PathBuf::from("/sys/fs/bpf/gk"),
                source: io(),
            }),
            Box::new(crate::tunnels::gateway::GatewayError::Bind {
                port: 7443,
                source: io(),
            }),
            Box::new(crate::portal::listener::PortalError::Bind {
                addr: "0.0.0.0:443".parse().unwrap(),
                source: io(),
            }),
            Box::new(crate::knock::send::ClientError::Io {
                what: "sending".into(),
                source: io(),
            }),
            Box::new(crate::store::StoreError::Config(
                crate::store::config::ConfigError::Read {
                    path: PathBuf::from("/etc/gk.toml"),
                    source: io(),
                },
            )),
        ];
        for e in errors {
            let chain = crate::error_chain(e.as_ref());
            let cause = io().to_string();
            assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
        }
    }
}
