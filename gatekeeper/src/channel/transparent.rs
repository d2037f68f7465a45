//! Sockets that act for addresses not their host's (IP_TRANSPARENT, which
//! needs CAP_NET_ADMIN): the listener TPROXY hands captured connections
//! to, and the connection an inbound channel makes from its client's
//! address.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn transparent(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_ip_transparent_v4(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A listener on `addr` that accepts connections TPROXY diverts to it;
/// each accepted socket's local address is the destination its client
/// dialed.
pub fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = transparent(addr)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Connects to `backend` from `source`, an address of another host.
pub async fn connect_from(source: SocketAddr, backend: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = transparent(source)?;
    socket.bind(&source.into())?;
    TcpSocket::from_std_stream(socket.into()).connect(backend).await
}
