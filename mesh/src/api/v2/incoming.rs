//! Accepted gRPC connections: at most `server.max_connections` at once (further ones wait in
//! the listen queue), without Nagle's algorithm — small unary calls otherwise wait for the
//! peer's delayed ACK (~40 ms each, measured).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A connection that holds one of the bounded places while it is open.
pub struct Conn {
    io: TcpStream,
    _place: OwnedSemaphorePermit,
}

/// Connections from `listener`, at most `max` open at once.
pub fn bounded(listener: TcpListener, max: usize) -> impl Stream<Item = io::Result<Conn>> {
    let places = Arc::new(Semaphore::new(max.max(1)));
    futures::stream::unfold((listener, places), |(listener, places)| async move {
        let place = places
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let conn = listener.accept().await.and_then(|(io, _)| {
            io.set_nodelay(true)?;
            Ok(Conn { io, _place: place })
        });
        Some((conn, (listener, places)))
    })
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
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

    #[tokio::test]
    async fn a_connection_past_the_bound_waits_until_one_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Box::pin(super::bounded(listener, 1));
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
}
