//! Where the cluster's Redis is: one server named by its URL, or the
//! primary a set of Sentinels names, asked again at every connection so a
//! failover is followed without anyone's help.
//!
//! ```text
//! redis://[USER:PASS@]HOST[:PORT][/DB]                              one server
//! rediss://[USER:PASS@]HOST[:PORT][/DB]                             the same over TLS
//! redis+sentinel://[USER:PASS@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]
//! rediss+sentinel://...                                             Sentinels and primary over TLS
//! ```
//!
//! With Sentinel, `USER:PASS` and `DB` are the primary's; the Sentinels
//! themselves are asked without credentials (port 26379 unless given).
//! TLS certificates are checked against the system's roots; a private CA
//! is named by `SSL_CERT_FILE`.

use std::time::Duration;

use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisResult, TlsMode,
    aio::MultiplexedConnection,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};

use super::StoreError;

const SENTINEL_PORT: u16 = 26379;

/// A parsed cluster address.
#[derive(Clone)]
pub struct RedisTarget {
    kind: Kind,
    /// The address without its password, for messages and `status`.
    location: String,
}

#[derive(Clone)]
enum Kind {
    Server(Client),
    Sentinel(SentinelSpec),
}

/// Sentinels to ask, and for which primary.
#[derive(Clone)]
struct SentinelSpec {
    /// `redis://HOST:PORT` (or `rediss://`) of each Sentinel.
    sentinels: Vec<String>,
    service: String,
    primary: SentinelNodeConnectionInfo,
}

impl SentinelSpec {
    /// A client that asks the Sentinels for the primary when one is wanted.
    fn client(&self) -> RedisResult<SentinelClient> {
        SentinelClient::build(
            self.sentinels.clone(),
            &self.service,
            Some(self.primary.clone()),
            SentinelServerType::Master,
        )
    }
}

impl RedisTarget {
    pub fn parse(url: &str) -> Result<RedisTarget, StoreError> {
        let bad = |reason: String| StoreError::ClusterUrl {
            url: redact(url),
            reason,
        };
        if let Some((scheme, rest)) = url.split_once("+sentinel://") {
            let tls = match scheme {
                "redis" => false,
                "rediss" => true,
                _ => return Err(bad(format!("unknown scheme {scheme}+sentinel"))),
            };
            return sentinel(rest, tls).map_err(bad);
        }
        let client = Client::open(url).map_err(|e| bad(e.to_string()))?;
        let info = client.get_connection_info();
        let scheme = match info.addr() {
            ConnectionAddr::TcpTls { .. } => "rediss",
            _ => "redis",
        };
        let location = format!("{scheme}://{}/{}", info.addr(), info.redis_settings().db());
        Ok(RedisTarget {
            kind: Kind::Server(client),
            location,
        })
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// A client for the primary as of now.
    pub fn client(&self) -> RedisResult<Client> {
        match &self.kind {
            Kind::Server(client) => Ok(client.clone()),
            Kind::Sentinel(spec) => spec.client()?.get_client(),
        }
    }

    /// [`RedisTarget::client`] without blocking.
    pub async fn client_async(&self) -> RedisResult<Client> {
        match &self.kind {
            Kind::Server(client) => Ok(client.clone()),
            Kind::Sentinel(spec) => spec.client()?.async_get_client().await,
        }
    }

    /// A new connection to the primary as of now, shared by every task
    /// that clones it; connecting, and then each command, may take
    /// `timeout`.
    pub async fn connect(&self, timeout: Duration) -> RedisResult<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        self.client_async()
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}

const NO_SERVICE: &str = "name the primary's service after the Sentinels: redis+sentinel://HOST:26379/SERVICE";

/// `[USER:PASS@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]`
fn sentinel(rest: &str, tls: bool) -> Result<RedisTarget, String> {
    let (authority, path) = rest.split_once('/').ok_or(NO_SERVICE)?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let (service, db) = match path.split_once('/') {
        Some((service, db)) => (service, db),
        None => (path, "0"),
    };
    if service.is_empty() {
        return Err(NO_SERVICE.into());
    }
    let scheme = if tls { "rediss" } else { "redis" };
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err("name at least one Sentinel: HOST[:PORT][,HOST[:PORT]...]".into());
        }
        let has_port = host
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok());
        let url = if has_port && !host.ends_with(']') {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}:{SENTINEL_PORT}")
        };
        url.as_str()
            .into_connection_info()
            .map_err(|e| format!("Sentinel {host}: {e}"))?;
        sentinels.push(url);
    }
    // The primary's credentials and database, parsed as Redis parses them
    // (percent-decoding included).
    let settings = match userinfo {
        Some(u) => format!("redis://{u}@primary/{db}"),
        None => format!("redis://primary/{db}"),
    }
    .as_str()
    .into_connection_info()
    .map_err(|e| e.to_string())?
    .redis_settings()
    .clone();
    let db = settings.db();
    let mut primary = SentinelNodeConnectionInfo::default().set_redis_connection_info(settings);
    if tls {
        primary = primary.set_tls_mode(TlsMode::Secure);
    }
    Ok(RedisTarget {
        location: format!("{scheme}+sentinel://{hosts}/{service}/{db}"),
        kind: Kind::Sentinel(SentinelSpec {
            sentinels,
            service: service.to_string(),
            primary,
        }),
    })
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_addresses_name_hosts_service_and_database() {
        let t = RedisTarget::parse("redis+sentinel://u:secret@10.0.0.1,10.0.0.2:26380/gk/2").unwrap();
        assert_eq!(t.location(), "redis+sentinel://10.0.0.1,10.0.0.2:26380/gk/2");
        let Kind::Sentinel(spec) = &t.kind else {
            panic!("not a Sentinel target")
        };
        assert_eq!(spec.sentinels, ["redis://10.0.0.1:26379", "redis://10.0.0.2:26380"]);
        assert_eq!(spec.service, "gk");
    }

    #[test]
    fn bad_addresses_say_what_is_missing_and_hide_the_password() {
        for (url, says) in [
            ("redis+sentinel://u:secret@10.0.0.1", "name the primary's service"),
            ("redis+sentinel://10.0.0.1/", "name the primary's service"),
            ("redis+sentinel://,/gk", "name at least one Sentinel"),
            ("mongo+sentinel://10.0.0.1/gk", "unknown scheme"),
            ("http://u:secret@10.0.0.1", "bad cluster address"),
        ] {
            let e = RedisTarget::parse(url).err().expect(url).to_string();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: {e}");
        }
    }

    #[test]
    fn plain_and_tls_addresses_keep_their_scheme_without_the_password() {
        let t = RedisTarget::parse("redis://:secret@127.0.0.1:7000/3").unwrap();
        assert_eq!(t.location(), "redis://127.0.0.1:7000/3");
        let t = RedisTarget::parse("rediss://127.0.0.1:7000").unwrap();
        assert_eq!(t.location(), "rediss://127.0.0.1:7000/0");
    }
}
