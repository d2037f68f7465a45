//! The two ends of an agent's session: the handshake (the agent presents
//! its token; the gateway checks it, binds the public port, and only then
//! answers with that port, or with a [`Farewell`] saying why not), then the
//! gateway relaying public connections into streams and the agent relaying
//! streams to the private service.

use std::net::SocketAddr;

use bytes::Bytes;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::debug;

use crate::{
    frame::{Farewell, Frame, FrameError, Kind},
    mux::{Incoming, Mux},
    splice::{Spliced, splice},
};

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the gateway refused the agent: {0}")]
    Refused(Farewell),
    #[error("the peer broke the handshake: {0}")]
    Protocol(String),
}

/// A tunnel as the gateway's records describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelInfo {
    pub name: String,
    pub owner: String,
    pub public_port: u16,
    /// The token the agent proved itself with.
    pub token_id: String,
    /// The agent publishes a network through SOCKS5 rather than one
    /// service: the gateway speaks SOCKS5 to visitors and sends each
    /// destination with its stream.
    pub socks5: bool,
}

/// Checks an agent's token; `Err` is what the agent is told.
pub trait Authority: Send + Sync {
    fn authenticate(&self, token_id: &str, secret: &[u8]) -> Result<TunnelInfo, Farewell>;
}

/// Agent side: presents the token, saying whether it publishes through
/// SOCKS5; returns the public port it was given.
pub async fn hello<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    token_id: &str,
    secret: &[u8],
    socks5: bool,
) -> Result<u16, SessionError> {
    // The first line: the token's id, and the mode if not the plain one.
    let mut payload = token_id.as_bytes().to_vec();
    if socks5 {
        payload.extend_from_slice(b" socks5");
    }
    payload.push(b'\n');
    payload.extend_from_slice(secret);
    Frame::new(Kind::Hello, 0, payload).write(io).await?;
    tokio::io::AsyncWriteExt::flush(io).await.map_err(FrameError::from)?;
    match Frame::read(io).await? {
        Some(f) if f.kind == Kind::Welcome && f.payload.len() == 2 => {
            Ok(u16::from_be_bytes([f.payload[0], f.payload[1]]))
        }
        Some(f) if f.kind == Kind::Goodbye => Err(SessionError::Refused(Farewell::from_payload(&f.payload))),
        Some(f) => Err(SessionError::Protocol(format!("expected a welcome, got {:?}", f.kind))),
        None => Err(SessionError::Protocol(
            "the gateway closed the connection during the handshake".into(),
        )),
    }
}

/// Gateway side, first half: reads the agent's hello and checks its token.
/// A refused agent is told why here; an accepted one waits for
/// [`answer`], which the gateway sends once the public port is bound.
pub async fn hear_hello<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    authority: &dyn Authority,
) -> Result<TunnelInfo, SessionError> {
    let hello = match Frame::read(io).await? {
        Some(f) if f.kind == Kind::Hello => f.payload,
        Some(f) => return Err(SessionError::Protocol(format!("expected a hello, got {:?}", f.kind))),
        None => {
            return Err(SessionError::Protocol(
                "the agent closed the connection before its hello".into(),
            ));
        }
    };
    let split = hello.iter().position(|&b| b == b'\n');
    let checked = match split.map(|i| (std::str::from_utf8(&hello[..i]), &hello[i + 1..])) {
        Some((Ok(line), secret)) => match line.split_once(' ') {
            None => authority.authenticate(line, secret),
            Some((id, "socks5")) => authority
                .authenticate(id, secret)
                .map(|info| TunnelInfo { socks5: true, ..info }),
            Some(_) => Err(Farewell::Refused("malformed hello: unknown mode".into())),
        },
        _ => Err(Farewell::Refused("malformed hello".into())),
    };
    match checked {
        Ok(info) => Ok(info),
        Err(why) => {
            answer(io, Err(&why)).await?;
            Err(SessionError::Refused(why))
        }
    }
}

/// Gateway side, second half: the public port the agent was given, or why
/// it gets none.
pub async fn answer<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    outcome: Result<u16, &Farewell>,
) -> Result<(), SessionError> {
    let reply = match outcome {
        Ok(port) => Frame::new(Kind::Welcome, 0, port.to_be_bytes().to_vec()),
        Err(why) => Frame::new(Kind::Goodbye, 0, why.to_payload()),
    };
    reply.write(io).await?;
    tokio::io::AsyncWriteExt::flush(io).await.map_err(FrameError::from)?;
    Ok(())
}

/// Gateway side: relays every connection accepted on `public` into a new
/// stream of `mux`, until `stop` turns true. `done` hears of each finished
/// connection.
pub async fn serve_public(
    mux: Mux,
    public: TcpListener,
    stop: watch::Receiver<bool>,
    done: impl Fn(SocketAddr, Spliced) + Send + Sync + Clone + 'static,
) {
    let mut stop_accepting = stop.clone();
    loop {
        let (tcp, visitor) = tokio::select! {
            accepted = public.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = stop_accepting.changed() => return,
        };
        let stream = match mux.open(Bytes::from(visitor.to_string())).await {
            Ok(s) => s,
            Err(_) => return,
        };
        let (stop, done) = (stop.clone(), done.clone());
        tokio::spawn(async move { done(visitor, splice(tcp, stream, stop).await) });
    }
}

/// Agent side: relays every stream the gateway opens to `forward`.
pub async fn serve_private(mut incoming: Incoming, forward: SocketAddr, stop: watch::Receiver<bool>) {
    while let Some((stream, visitor)) = incoming.recv().await {
        let stop = stop.clone();
        tokio::spawn(async move {
            match TcpStream::connect(forward).await {
                Ok(tcp) => {
                    let r = splice(tcp, stream, stop).await;
                    debug!(visitor = %String::from_utf8_lossy(&visitor), up = r.up, down = r.down, "relayed");
                }
                // Dropping the stream closes it: the visitor sees the close.
                Err(e) => debug!(error = %e, %forward, "the private service refused"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::{
        record::{Side, leave_tls},
        tls::{Identity, client_config},
    };

    struct OneToken;

    impl Authority for OneToken {
        fn authenticate(&self, token_id: &str, secret: &[u8]) -> Result<TunnelInfo, Farewell> {
            match (token_id, secret) {
                ("t1", b"s3cret") => Ok(TunnelInfo {
                    name: "web".into(),
                    owner: "ops".into(),
                    public_port: 4321,
                    token_id: "t1".into(),
                    socks5: false,
                }),
                ("t1", _) => Err(Farewell::Refused("wrong secret for token t1".into())),
                _ => Err(Farewell::Refused(format!("unknown token {token_id}"))),
            }
        }
    }

    async fn echo_service() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// A gateway on loopback with its public listener; returns the tunnel
    /// address, the public address, and the finished connections.
    async fn gateway(id: Identity) -> (SocketAddr, SocketAddr, Arc<Mutex<Vec<Spliced>>>) {
        let tunnel = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tunnel_addr, public_addr) = (tunnel.local_addr().unwrap(), public.local_addr().unwrap());
        let acceptor = TlsAcceptor::from(id.server_config().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        tokio::spawn(async move {
            let mut public = Some(public);
            while let Ok((tcp, _)) = tunnel.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let Ok(info) = hear_hello(&mut tls, &OneToken).await else {
                    continue;
                };
                // The one public listener goes to the first agent; later
                // ones are told the port is busy, before any welcome.
                if public.is_none() {
                    let busy = Farewell::Busy(format!("port {} is in use", info.public_port));
                    let _ = answer(&mut tls, Err(&busy)).await;
                    continue;
                }
                if answer(&mut tls, Ok(info.public_port)).await.is_err() {
                    continue;
                }
                let Ok((rd, wr)) = leave_tls(tls.into_inner(), Side::Gateway) else {
                    continue;
                };
                let (mux, _task) = Mux::opener(rd, wr);
                let (_stop_tx, stop) = watch::channel(false);
                let seen = seen.clone();
                if let Some(public) = public.take() {
                    tokio::spawn(async move {
                        let _keep = _stop_tx;
                        serve_public(mux, public, stop, move |_, r| seen.lock().unwrap().push(r)).await
                    });
                }
            }
        });
        (tunnel_addr, public_addr, log)
    }

    async fn agent(
        tunnel: SocketAddr,
        id: &Identity,
        token: &str,
        secret: &[u8],
        forward: SocketAddr,
    ) -> Result<u16, SessionError> {
        let tcp = TcpStream::connect(tunnel).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("gateway").unwrap();
        let mut tls = TlsConnector::from(client_config(id.fingerprint()).unwrap())
            .connect(name, tcp)
            .await
            .unwrap();
        let port = hello(&mut tls, token, secret, false).await?;
        let (rd, wr) = leave_tls(tls.into_inner(), Side::Agent).unwrap();
        let (_mux, incoming, _task) = Mux::acceptor(rd, wr);
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            let _keep = stop_tx;
            serve_private(incoming, forward, stop).await
        });
        Ok(port)
    }

    #[tokio::test]
    async fn public_connections_reach_the_private_service_through_the_agent() {
        let id = Identity::generate(&["gateway".into()]).unwrap();
        let (tunnel, public, log) = gateway(Identity::from_pem(id.to_pem().0, id.to_pem().1).unwrap()).await;
        let private = echo_service().await;
        assert_eq!(agent(tunnel, &id, "t1", b"s3cret", private).await.unwrap(), 4321);
        let mut visitor = TcpStream::connect(public).await.unwrap();
        visitor.write_all(b"through the tunnel").await.unwrap();
        let mut got = [0u8; 18];
        tokio::time::timeout(Duration::from_secs(10), visitor.read_exact(&mut got))
            .await
            .expect("bounded")
            .unwrap();
        assert_eq!(&got, b"through the tunnel");
        drop(visitor);
        let logged = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(r) = log.lock().unwrap().first().cloned() {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the connection is reported");
        assert_eq!((logged.up, logged.down), (18, 18));
    }

    #[tokio::test]
    async fn wrong_tokens_are_refused_with_a_reason() {
        let id = Identity::generate(&["gateway".into()]).unwrap();
        let (tunnel, _, _) = gateway(Identity::from_pem(id.to_pem().0, id.to_pem().1).unwrap()).await;
        let private = echo_service().await;
        let refused = agent(tunnel, &id, "t1", b"guess", private).await.unwrap_err();
        assert!(refused.to_string().contains("wrong secret"), "{refused}");
        let refused = agent(tunnel, &id, "t9", b"s3cret", private).await.unwrap_err();
        assert!(refused.to_string().contains("unknown token t9"), "{refused}");
        assert!(
            matches!(&refused, SessionError::Refused(f) if !f.retry_helps()),
            "a refused token is final: {refused:?}"
        );
    }

    #[tokio::test]
    async fn an_agent_whose_port_cannot_be_bound_is_told_so_and_never_welcomed() {
        let id = Identity::generate(&["gateway".into()]).unwrap();
        let (tunnel, _, _) = gateway(Identity::from_pem(id.to_pem().0, id.to_pem().1).unwrap()).await;
        let private = echo_service().await;
        assert_eq!(agent(tunnel, &id, "t1", b"s3cret", private).await.unwrap(), 4321);
        let second = agent(tunnel, &id, "t1", b"s3cret", private).await.unwrap_err();
        assert!(
            matches!(&second, SessionError::Refused(Farewell::Busy(w)) if w.contains("in use")),
            "{second:?}"
        );
    }
}
