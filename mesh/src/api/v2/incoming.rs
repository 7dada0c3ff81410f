//! Accepted gRPC connections: at most `server.max_connections` at once (further ones wait in
//! the listen queue) and at most `server.grpc_max_connections_per_peer` from one address
//! (further ones are closed at once), each closed unless it sends the HTTP/2 preface within
//! `server.grpc_handshake_timeout`; without Nagle's algorithm — small unary calls otherwise
//! wait for the peer's delayed ACK (~40 ms each, measured).

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The HTTP/2 client preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`: what a client sends first.
const PREFACE_LEN: usize = 24;

/// What the gRPC listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; further ones wait in the listen queue.
    pub max: usize,
    /// Connections open at once from one address; further ones are closed at once.
    pub per_peer: usize,
    /// How long a new connection may take to send the HTTP/2 preface; then it is closed.
    pub handshake: Duration,
}

/// Open connections by peer address.
type PerPeer = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A connection's count in its address's tally, taken back when it closes.
struct Counted {
    peers: PerPeer,
    ip: IpAddr,
}

impl Counted {
    /// Count a connection from `ip`, unless that address already holds `cap`.
    fn take(peers: &PerPeer, ip: IpAddr, cap: usize) -> Option<Counted> {
        let mut open = peers.lock();
        let n = open.entry(ip).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Counted {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.peers.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A connection that holds one of the bounded places while it is open.
pub struct Conn {
    io: TcpStream,
    /// Until the preface is in: its deadline, and how many of its bytes are still to come.
    handshake: Option<(Pin<Box<Sleep>>, usize)>,
    limit: Duration,
    _peer: Counted,
    _place: OwnedSemaphorePermit,
}

/// Connections from `listener` within `limits`.
pub fn bounded(listener: TcpListener, limits: Limits) -> impl Stream<Item = io::Result<Conn>> {
    let places = Arc::new(Semaphore::new(limits.max.max(1)));
    let peers = PerPeer::default();
    let state = (listener, places, peers);
    futures::stream::unfold(state, move |(listener, places, peers)| async move {
        let conn = loop {
            let place = places
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let (io, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => break Err(e),
            };
            let ip = remote.ip().to_canonical();
            let Some(peer) = Counted::take(&peers, ip, limits.per_peer.max(1)) else {
                tracing::debug!(%remote, "Closing a gRPC connection: its address holds its share");
                continue; // dropped: closed at once, its place free again
            };
            break io.set_nodelay(true).map(|()| Conn {
                io,
                handshake: Some((Box::pin(tokio::time::sleep(limits.handshake)), PREFACE_LEN)),
                limit: limits.handshake,
                _peer: peer,
                _place: place,
            });
        };
        Some((conn, (listener, places, peers)))
    })
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    /// Fails with `TimedOut` once the handshake deadline passes before the preface is in.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some((deadline, left)) = &mut this.handshake else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                *left = left.saturating_sub(buf.filled().len() - before);
                if *left == 0 {
                    this.handshake = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no HTTP/2 preface within {:?}", this.limit),
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::Limits;

    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn limits(max: usize, per_peer: usize, handshake_ms: u64) -> Limits {
        Limits {
            max,
            per_peer,
            handshake: Duration::from_millis(handshake_ms),
        }
    }

    async fn listen(
        l: Limits,
    ) -> (
        std::net::SocketAddr,
        std::pin::Pin<Box<impl futures::Stream<Item = std::io::Result<super::Conn>>>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, Box::pin(super::bounded(listener, l)))
    }

    #[tokio::test]
    async fn a_connection_past_the_bound_waits_until_one_closes() {
        let (addr, mut conns) = listen(limits(1, 1, 5_000)).await;
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let first = conns.next().await.unwrap().unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), conns.next()).await;
        assert!(
            waited.is_err(),
            "a second connection is not served while one is open"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), conns.next()).await;
        assert!(matches!(second, Ok(Some(Ok(_)))));
    }

    #[tokio::test]
    async fn a_connection_without_the_preface_is_closed_after_the_handshake_timeout() {
        let (addr, mut conns) = listen(limits(4, 4, 200)).await;
        let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        let mut buf = [0u8; 64];
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
        let e = read.expect("ended by the handshake timeout").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
        // Half a preface is no better.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(&PREFACE[..10]).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        let mut got = 0;
        let e = loop {
            match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
                Ok(Ok(n)) => got += n,
                Ok(Err(e)) => break e,
                Err(_) => panic!("never timed out"),
            }
        };
        assert_eq!((got, e.kind()), (10, std::io::ErrorKind::TimedOut));
    }

    #[tokio::test]
    async fn a_connection_that_sends_the_preface_in_time_stays_open() {
        let (addr, mut conns) = listen(limits(4, 4, 200)).await;
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(PREFACE).await.unwrap();
        let mut conn = conns.next().await.unwrap().unwrap();
        let mut preface = [0u8; 24];
        conn.read_exact(&mut preface).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        client.write_all(b"more").await.unwrap();
        let mut more = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut more)).await;
        assert!(matches!(read, Ok(Ok(4))), "{read:?}");
    }

    #[tokio::test]
    async fn connections_beyond_the_per_peer_share_are_closed_at_once() {
        let (addr, mut conns) = listen(limits(8, 2, 5_000)).await;
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let first = conns.next().await.unwrap().unwrap();
        let _second = conns.next().await.unwrap().unwrap();
        // A third from the same address is accepted and closed: it reads the end at once.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accept = tokio::time::timeout(Duration::from_millis(300), conns.next()).await;
        assert!(accept.is_err(), "the third is not handed to the server");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "closed: {n:?}");
        // One closes: the address may open one again.
        drop(first);
        let _d = tokio::net::TcpStream::connect(addr).await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(5), conns.next()).await;
        assert!(matches!(again, Ok(Some(Ok(_)))));
    }
}
