//! The portal: a TLS listener that authorizes a connection by a knock
//! carried inside its ClientHello, and shows everyone else a guidance page.
//!
//! - [`client_hello`]: finding, removing and inserting the knock extension
//!   in the raw ClientHello record, so both rustls peers hash the same bytes,
//!   and the nonce that binds a knock to its ClientHello.
//! - [`stream`]: the stream shims that do so on live connections.
//! - [`guidance`]: the one page every unauthorized request gets.
//! - [`server`]: the daemon's listener: read, ask, handshake, then relay or guide.
//! - [`client`]: `gatekeeper portal` and `connect --portal`.

pub mod client;
pub mod client_hello;
pub mod guidance;
pub mod server;
pub mod stream;

/// Checks a `HOST:PORT` upstream as given on the command line or in a
/// client record; it is resolved when a session needs it.
pub fn parse_upstream(s: &str) -> Result<String, String> {
    let bad = || format!("{s:?} is not HOST:PORT (for example 127.0.0.1:8080 or [::1]:8080)");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(char::is_whitespace) || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn upstreams() {
        for ok in ["127.0.0.1:8080", "[::1]:443", "service.local:80"] {
            assert_eq!(super::parse_upstream(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "8080", "host:", ":80", "host:0", "host:70000", "a b:80"] {
            assert!(super::parse_upstream(bad).is_err(), "{bad}");
        }
    }
}
