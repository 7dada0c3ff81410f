//! The HTTP accept loop: a bound on open connections, header and body read timeouts, bodies
//! declared too large refused up front, and a graceful drain on shutdown.

use std::{
    future::Future,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Router,
};
use bytes::Bytes;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{watch, Semaphore},
};

/// How long clients may take, and how many may be connected at once.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// To send a request's headers, and the longest a connection stays idle between
    /// requests; then the connection is closed.
    pub header_read_timeout: Duration,
    /// To send a request's body, from the end of its headers; then 408.
    pub body_read_timeout: Duration,
    /// Connections open at once; further ones wait in the listen queue.
    pub max_connections: usize,
    /// A request whose `Content-Length` is larger gets 413 before its body is read.
    pub max_body_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_body_bytes: 4 << 20,
        }
    }
}

/// Accept connections until `shutdown` resolves, then stop accepting, ask open connections to
/// finish their requests, and wait up to `grace` for them. `on_shutdown` runs once shutdown
/// begins (before the drain).
pub async fn run(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send,
    on_shutdown: impl FnOnce(),
    grace: Duration,
) -> std::io::Result<()> {
    let (body_timeout, max_body) = (limits.body_read_timeout, limits.max_body_bytes);
    let app = app
        .layer(axum::middleware::from_fn(move |req, next| {
            body_deadline(req, next, body_timeout)
        }))
        .layer(axum::middleware::from_fn(move |req, next| {
            declared_too_large(req, next, max_body)
        }));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a clone of `open_rx`; all are gone once `closed` resolves.
    let (open_tx, open_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "Accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let open = open_rx.clone();
        let header_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let _open = open;
            // HTTP/1 only, as before; the header timer also closes connections left idle.
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%remote, error = %e, "Connection ended with an error");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    on_shutdown();
    let _ = stop_tx.send(true);
    drop(open_rx);
    if tokio::time::timeout(grace, open_tx.closed()).await.is_err() {
        tracing::warn!("Grace period over; closing the connections still open");
    }
    Ok(())
}

/// A body its `Content-Length` says is over `max` is refused at once, with the 413 the body
/// limit answers once `max` bytes have come (not a wait for a body that will not be read).
async fn declared_too_large(req: Request, next: Next, max: usize) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        let mut r = super::error::ApiError::too_large().into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    next.run(req).await
}

/// Give the request body `timeout` from now to arrive in full; a body still incomplete then
/// ends in an error, and the answer becomes 408 with the connection closed.
async fn body_deadline(req: Request, next: Next, timeout: Duration) -> Response {
    let expired = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(DeadlineBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            expired: expired.clone(),
        })
    });
    let response = next.run(req).await;
    if !expired.load(Ordering::Relaxed) {
        return response;
    }
    let mut r = (
        StatusCode::REQUEST_TIMEOUT,
        axum::Json(serde_json::json!({"error": {
            "message": format!("the request body did not arrive within {} s", timeout.as_secs_f64()),
            "type": "invalid_request_error",
            "code": "request_timeout",
        }})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A request body that fails once its deadline passes before its last byte.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.expired.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(axum::Error::new("request body read timed out"))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server with tight limits on a free port.
    async fn start(limits: ServerLimits) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/echo", post(|body: Bytes| async move { body }));
        let (tx, mut rx) = watch::channel(false);
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        tokio::spawn(run(
            listener,
            app,
            limits,
            stop,
            || {},
            Duration::from_secs(5),
        ));
        (addr, tx)
    }

    fn tight() -> ServerLimits {
        ServerLimits {
            header_read_timeout: Duration::from_millis(300),
            body_read_timeout: Duration::from_millis(300),
            max_connections: 2,
            max_body_bytes: 64,
        }
    }

    /// Read until the peer closes (or 5 s pass); what was read.
    async fn read_to_close(s: &mut tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn partial_headers_are_cut_off() {
        let (addr, _stop) = start(tight()).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        read_to_close(&mut s).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_short_body_gets_408_and_a_full_one_is_served() {
        let (addr, _stop) = start(tight()).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let answer = read_to_close(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await
        .unwrap();
        let answer = read_to_close(&mut s).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("abc"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn a_body_declared_over_the_limit_gets_413_at_once() {
        let (addr, _stop) = start(ServerLimits {
            body_read_timeout: Duration::from_secs(30),
            ..tight()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nabc")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let answer = read_to_close(&mut s).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("\"request_too_large\""), "{answer}");
        // At the limit, the body is read as before.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = "x".repeat(64);
        let req = format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\nConnection: close\r\n\r\n{body}");
        s.write_all(req.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut s).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with(&body),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_wait_for_a_free_one() {
        let (addr, _stop) = start(ServerLimits {
            header_read_timeout: Duration::from_secs(30),
            ..tight()
        })
        .await;
        let idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let request = async {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await
                .unwrap();
            read_to_close(&mut s).await
        };
        let mut request = pin!(request);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), request.as_mut())
                .await
                .is_err(),
            "a third connection is not served while two are open"
        );
        drop(idle1);
        let answer = tokio::time::timeout(Duration::from_secs(5), request)
            .await
            .expect("served once a connection closed");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(idle2);
    }
}
