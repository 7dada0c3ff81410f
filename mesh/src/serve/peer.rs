//! Serving on a peer: the serve path's place step sends a request that routing, the response
//! cache and placement have dealt with here to the node that holds its model, as one JSON
//! request to `POST /internal/v1/serve`; the answer streams back as JSON lines and becomes
//! this node's `Served`. One format for every front door: OpenAI, v2 REST and gRPC alike.

use std::{
    collections::HashSet,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use flatmesh_runtime::{Embeddings, FinishReason, GenerateRequest, Generation};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    error::{ErrorKind, ServeError},
    generate::{Event, Generating},
    request::{Output, Served, Work},
    track::Tracker,
};
use crate::{
    metrics::Metrics,
    policy::{CachePrompt, Policies},
    units::KeepAlive,
};

/// The path peers serve forwarded requests on.
pub const PATH: &str = "/internal/v1/serve";
/// Set on a forwarded request (to the node it came from): it is never forwarded again.
pub const FORWARDED: &str = "x-flatmesh-forwarded";

/// A request as one node hands it to another: the model is the one routing chose here.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireRequest {
    pub model: String,
    pub endpoint: String,
    pub work: WireWork,
    #[serde(default)]
    pub keep_alive: Option<KeepAlive>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub stream: bool,
}

/// The work, resolved for the model's kind (v2 `infer` is already embed or generate).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireWork {
    Generate(GenerateRequest),
    Embed {
        inputs: Vec<String>,
        dimensions: Option<u32>,
    },
}

impl From<WireWork> for Work {
    fn from(w: WireWork) -> Work {
        match w {
            WireWork::Generate(g) => Work::Generate(g),
            WireWork::Embed { inputs, dimensions } => Work::Embed { inputs, dimensions },
        }
    }
}

/// One line of the answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireEvent {
    /// First, once the peer has a copy and a slot: its request id, model and node name.
    Served {
        id: String,
        model: String,
        node: String,
    },
    Text(String),
    Done(Generation),
    Embeddings(Embeddings),
    Error(WireError),
}

/// A serve error as it crosses to another node.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireError {
    pub kind: String,
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub retry_after: Option<u64>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub status: Option<u16>,
}

impl From<&ServeError> for WireError {
    fn from(e: &ServeError) -> Self {
        WireError {
            kind: e.kind.as_str().to_string(),
            code: e.code.to_string(),
            message: e.message.clone(),
            param: e.param.clone(),
            retry_after: e.retry_after,
            headers: e
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            status: e.status,
        }
    }
}

impl From<WireError> for ServeError {
    fn from(w: WireError) -> Self {
        let kind = ErrorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == w.kind)
            .unwrap_or(ErrorKind::Internal);
        let mut e = ServeError::new(kind, intern(&w.code), w.message);
        e.param = w.param;
        e.retry_after = w.retry_after;
        e.headers = w
            .headers
            .into_iter()
            .map(|(k, v)| (intern(&k), v))
            .collect();
        e.status = w.status;
        e
    }
}

/// The same `&'static str` for the same text: error codes and header names are a small,
/// fixed set, so each is leaked once.
fn intern(s: &str) -> &'static str {
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(k) = seen.get(s) {
        return k;
    }
    let k: &'static str = Box::leak(s.to_string().into_boxed_str());
    seen.insert(k);
    k
}

/// The HTTP client for peers: connections kept, a short connect timeout (a dead peer is
/// skipped quickly), no overall timeout (streams run as long as the request may).
fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .expect("the peer client builds")
    })
}

/// Where the request goes and on whose behalf.
pub struct Call<'a> {
    /// The peer's name and HTTP front door.
    pub node: &'a str,
    pub url: &'a str,
    /// This node's name (`x-flatmesh-forwarded`).
    pub origin: &'a str,
    /// The caller's `Authorization` header: the peer authenticates the caller itself.
    pub authorization: Option<&'a str>,
}

/// What the answer does once it is here: offer a generation to this node's response cache,
/// and finish this node's request metrics with it.
pub struct After {
    pub remember: Option<(Policies, CachePrompt)>,
    pub tracker: Option<Tracker>,
}

/// Serve `wire` on the peer. `Err` when the peer could not be reached, or went away before
/// its first token or its embeddings (with `after` given back): nothing has reached the
/// client, so the caller serves the request itself.
pub async fn serve(
    call: Call<'_>,
    wire: &WireRequest,
    metrics: &Metrics,
    after: After,
) -> Result<Result<Served, ServeError>, (anyhow::Error, After)> {
    let started = Instant::now();
    let span = tracing::info_span!(target: crate::telemetry::TARGET, "forward", otel.name = "forward", otel.kind = "client", flatmesh.peer = %call.url, flatmesh.node = %call.node);
    let sent = tracing::Instrument::instrument(send(&call, wire, &span), span.clone()).await;
    let outcome = if sent.is_ok() { "ok" } else { "error" };
    metrics
        .mesh_forwarded
        .with_label_values(&[call.url, outcome])
        .inc();
    let (first, mut lines) = match sent {
        Ok(r) => r,
        Err(e) => {
            crate::telemetry::failed(&span, "unreachable", &e.to_string());
            return Err((e, after));
        }
    };
    metrics
        .mesh_forward_seconds
        .with_label_values(&[call.url])
        .observe(started.elapsed().as_secs_f64());
    let (id, model, node) = match first {
        WireEvent::Served { id, model, node } => (id, model, node),
        WireEvent::Error(e) => {
            let e = ServeError::from(e);
            if let Some(t) = after.tracker {
                t.finish(e.http_status());
            }
            return Ok(Err(e));
        }
        other => return Err((anyhow::anyhow!("the peer answered {other:?} first"), after)),
    };
    // The next line decides: the peer gone before it (nothing has reached the client) means
    // the request is served here after all.
    let next = match lines.next().await {
        Some(Ok(line)) => line,
        Some(Err(e)) => return Err((e, after)),
        None => return Err((anyhow::anyhow!("node {node:?} went away"), after)),
    };
    let output = match (&wire.work, next) {
        (_, WireEvent::Error(e)) => {
            let e = ServeError::from(e);
            if let Some(t) = after.tracker {
                t.finish(e.http_status());
            }
            return Ok(Err(e));
        }
        (WireWork::Embed { .. }, WireEvent::Embeddings(e)) => Output::Embeddings(e),
        (WireWork::Generate(_), first @ (WireEvent::Text(_) | WireEvent::Done(_))) => {
            let lines = futures::stream::once(async { Ok(first) })
                .chain(lines)
                .boxed();
            Output::Text(relay(lines, node.clone(), after))
        }
        (_, other) => return Err((anyhow::anyhow!("the peer sent {other:?}"), after)),
    };
    Ok(Ok(Served {
        id,
        model,
        route: None,
        cache: None,
        node: Some(node),
        output,
    }))
}

type Lines = futures::stream::BoxStream<'static, anyhow::Result<WireEvent>>;

/// Send the request; the first line of the answer and the rest as a stream.
async fn send(
    call: &Call<'_>,
    wire: &WireRequest,
    span: &tracing::Span,
) -> anyhow::Result<(WireEvent, Lines)> {
    let mut req = client()
        .post(format!("{}{PATH}", call.url.trim_end_matches('/')))
        .headers(crate::telemetry::trace_headers(span))
        .header(FORWARDED, call.origin)
        .json(wire);
    if let Some(auth) = call.authorization {
        req = req.header(reqwest::header::AUTHORIZATION, auth);
    }
    let resp = req.send().await?;
    if !resp.status().is_success() {
        // Not the serve path's answer (an old or misconfigured peer): serve here.
        anyhow::bail!("the peer answered {}", resp.status());
    }
    let mut lines = json_lines(resp.bytes_stream());
    let first = lines
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("the peer closed the answer before its first line"))??;
    Ok((first, lines))
}

/// The JSON lines of a byte stream.
fn json_lines<S, B, E>(bytes: S) -> Lines
where
    S: futures::Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + Send + Sync + 'static,
{
    let state = (Box::pin(bytes), Vec::<u8>::new());
    futures::stream::unfold(state, |(mut bytes, mut buf)| async move {
        loop {
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let parsed = serde_json::from_slice::<WireEvent>(&line).map_err(Into::into);
                return Some((parsed, (bytes, buf)));
            }
            match bytes.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(chunk.as_ref()),
                Some(Err(e)) => return Some((Err(e.into()), (bytes, buf))),
                None => return None,
            }
        }
    })
    .boxed()
}

/// The peer went away after it had started answering.
fn gone(node: &str) -> ServeError {
    let mut e = ServeError::new(
        ErrorKind::Unavailable,
        "peer_gone",
        format!("node {node:?}, which was serving the request, went away; retry"),
    );
    e.retry_after = Some(1);
    e
}

/// The peer's generation as this node's stream of events. Dropping it drops the connection
/// to the peer, which stops the generation there.
fn relay(mut lines: Lines, node: String, after: After) -> Generating {
    let (tx, events) = mpsc::channel(64);
    let After {
        remember,
        mut tracker,
    } = after;
    tokio::spawn(async move {
        let done = loop {
            let line = tokio::select! {
                l = lines.next() => l,
                _ = tx.closed() => return, // the client left; `tracker` records 499
            };
            match line {
                Some(Ok(WireEvent::Text(t))) => {
                    if let Some(t) = &mut tracker {
                        t.first_token();
                    }
                    if tx.send(Event::Text(t)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(WireEvent::Done(g))) => break Ok(g),
                Some(Ok(WireEvent::Error(e))) => break Err(ServeError::from(e)),
                Some(Ok(other)) => {
                    break Err(ServeError::internal(format!(
                        "the peer sent {other:?} in a generation"
                    )))
                }
                Some(Err(_)) | None => break Err(gone(&node)),
            }
        };
        if let (Ok(g), Some((policies, cp))) = (&done, &remember) {
            if g.finish_reason != FinishReason::Cancelled {
                super::generate::offer(policies, cp, g).await;
            }
        }
        let status = match &done {
            Ok(g) if g.finish_reason == FinishReason::Cancelled => 499,
            Ok(_) => 200,
            Err(e) => e.http_status(),
        };
        if tx.send(Event::Done(done)).await.is_ok() {
            if let Some(t) = tracker {
                t.finish(status);
            }
        }
    });
    Generating::from_events(events)
}

/// The answer of the serve path on the serving node, as JSON lines.
pub fn answer(result: Result<Served, ServeError>, node: &str) -> mpsc::Receiver<WireEvent> {
    let (tx, rx) = mpsc::channel(64);
    let node = node.to_string();
    tokio::spawn(async move {
        let served = match result {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(WireEvent::Error((&e).into())).await;
                return;
            }
        };
        let head = WireEvent::Served {
            id: served.id,
            model: served.model,
            node,
        };
        if tx.send(head).await.is_err() {
            return;
        }
        match served.output {
            Output::Embeddings(e) => {
                let _ = tx.send(WireEvent::Embeddings(e)).await;
            }
            Output::Text(mut g) => {
                while let Some(ev) = g.next_for(&tx).await {
                    let line = match ev {
                        Event::Text(t) => WireEvent::Text(t),
                        Event::Done(Ok(g)) => WireEvent::Done(g),
                        Event::Done(Err(e)) => WireEvent::Error((&e).into()),
                    };
                    if tx.send(line).await.is_err() {
                        return; // the origin left: dropping `g` stops the generation
                    }
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_crosses_with_its_kind_code_and_headers() {
        let mut e = ServeError::new(ErrorKind::RateLimited, "rate_limited", "slow down");
        e.retry_after = Some(7);
        e.headers = vec![("x-ratelimit-limit-requests", "10".into())];
        let back = ServeError::from(
            serde_json::from_str::<WireError>(
                &serde_json::to_string(&WireError::from(&e)).unwrap(),
            )
            .unwrap(),
        );
        assert_eq!(back.kind, ErrorKind::RateLimited);
        assert_eq!(back.code, "rate_limited");
        assert_eq!(back.retry_after, Some(7));
        assert_eq!(back.headers, e.headers);
        assert_eq!(back.http_status(), 429);
    }

    /// A peer that answers `served` and then dies.
    async fn dying_peer() -> String {
        let app = axum::Router::new().route(
            PATH,
            axum::routing::post(|| async {
                let head = serde_json::to_vec(&WireEvent::Served {
                    id: "x".into(),
                    model: "m".into(),
                    node: "dying".into(),
                })
                .unwrap();
                let lines = futures::stream::iter(vec![
                    Ok::<_, std::io::Error>([head, b"\n".to_vec()].concat()),
                    Err(std::io::Error::other("killed")),
                ]);
                axum::body::Body::from_stream(lines)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    #[tokio::test]
    async fn a_peer_gone_before_its_first_token_hands_the_request_back() {
        let url = dying_peer().await;
        let call = Call {
            node: "dying",
            url: &url,
            origin: "here",
            authorization: None,
        };
        let wire = WireRequest {
            model: "m".into(),
            endpoint: "chat_completions".into(),
            work: WireWork::Generate(GenerateRequest {
                prompt: flatmesh_runtime::Prompt::Text("hi".into()),
                max_tokens: Some(4),
                sampling: Default::default(),
                stop: Vec::new(),
            }),
            keep_alive: None,
            client_id: None,
            stream: true,
        };
        let after = After {
            remember: None,
            tracker: None,
        };
        let got = serve(call, &wire, &Metrics::new(), after).await;
        assert!(
            got.is_err(),
            "the caller serves it: nothing reached the client"
        );
    }

    #[tokio::test]
    async fn lines_split_across_chunks_are_joined() {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
            Ok(br#"{"text":"he"#.to_vec()),
            Ok(b"llo\"}\n{\"text\":\"!\"}\n".to_vec()),
        ];
        let got: Vec<_> = json_lines(futures::stream::iter(chunks)).collect().await;
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0], Ok(WireEvent::Text(t)) if t == "hello"));
    }
}
