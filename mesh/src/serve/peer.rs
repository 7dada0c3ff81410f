//! Serving on a peer: the serve path's place step sends a request that routing, the response
//! cache and placement have dealt with here to the node that holds its model, as one JSON
//! request to `POST /internal/v1/serve`; the answer streams back as JSON lines and becomes
//! this node's `Served`. One format for every front door: OpenAI, v2 REST and gRPC alike.

use parking_lot::Mutex;
use std::{
    collections::HashSet,
    sync::OnceLock,
    time::{Duration, Instant},
};

use flatmesh_runtime::{Embeddings, FinishReason, GenerateRequest, Generation, TextDelta};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    error::{ErrorKind, ServeError},
    generate::{Event, Generating},
    request::{Output, Served, Work},
};
use crate::{
    metrics::Metrics,
    policy::{CachePrompt, Policies},
    tenancy::limits::Quotas,
    units::KeepAlive,
};

/// The path peers serve forwarded requests on.
pub const PATH: &str = "/internal/v1/serve";
/// The node a forwarded request came from (the peer's trace names it: `flatmesh.origin`).
pub const FORWARDED: &str = "x-flatmesh-forwarded";
/// Proves a request to an internal endpoint comes from a node of the mesh: `mesh.token`,
/// which every node of a mesh shares (and which opens nothing else).
pub const MESH_TOKEN: &str = "x-flatmesh-mesh-token";
/// The longest line of an answer (an embeddings answer is one line).
const MAX_LINE: usize = 256 << 20;

/// A request as one node hands it to another: the model is the one routing chose here.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireRequest {
    pub model: String,
    /// The router's next choices, tried in turn where the first cannot be loaded.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    pub endpoint: String,
    pub work: WireWork,
    #[serde(default)]
    pub keep_alive: Option<KeepAlive>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub stream: bool,
    /// What was left of the client's deadline when the request was sent, in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
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
    /// New text of choice 0 without logprobs (what every generation sends).
    Text(String),
    /// New text of another choice, or with its tokens' logprobs.
    Choice(TextDelta),
    Done(Generation),
    Embeddings(Embeddings),
    Error(WireError),
}

impl WireEvent {
    /// The line's kind, for messages (never its content: generated text stays out of logs).
    fn kind(&self) -> &'static str {
        match self {
            WireEvent::Served { .. } => "served",
            WireEvent::Text(_) => "text",
            WireEvent::Choice(_) => "choice",
            WireEvent::Done(_) => "done",
            WireEvent::Embeddings(_) => "embeddings",
            WireEvent::Error(_) => "error",
        }
    }
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
    pub quotas: Option<Quotas>,
    /// A policy denial's own status.
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
            quotas: e.quotas.as_deref().copied(),
            status: e.policy_status,
        }
    }
}

impl From<WireError> for ServeError {
    fn from(w: WireError) -> Self {
        let kind = ErrorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == w.kind)
            .unwrap_or(ErrorKind::Internal);
        let mut e = ServeError::new(kind, code(&w.code), w.message);
        e.param = w.param;
        e.retry_after = w.retry_after;
        e.quotas = w.quotas.map(Box::new);
        e.policy_status = w
            .status
            .filter(|s| kind == ErrorKind::PolicyDenied && (400..600).contains(s));
        e
    }
}

/// An error code from a peer as a `&'static str`: the codes are a small set, each kept once;
/// past 256 distinct ones (a misbehaving peer), `peer_error`.
fn code(s: &str) -> &'static str {
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut seen = SEEN.get_or_init(Default::default).lock();
    if let Some(k) = seen.get(s) {
        return k;
    }
    let fits = s.len() <= 64 && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    if seen.len() >= 256 || !fits {
        return "peer_error";
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
            // A peer gone without a reset (power, network, its host) is noticed by the
            // kernel: probes after 5 s of silence, every 2 s, given up after 3 unanswered —
            // a stream from a vanished peer fails (`peer_gone`) about 11 s after its last byte.
            // A live peer's kernel answers the probes, however long its queue keeps it quiet.
            .tcp_keepalive(Duration::from_secs(5))
            .tcp_keepalive_interval(Duration::from_secs(2))
            .tcp_keepalive_retries(3)
            // Sent bytes unacknowledged this long also end the connection.
            .tcp_user_timeout(Duration::from_secs(10))
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
    /// The mesh's token, proving the request comes from a node.
    pub mesh_token: Option<&'a str>,
    /// The client's deadline. The peer is given it and stops by itself; past it and
    /// `DEADLINE_GRACE`, this node ends the stream anyway (a peer that did not).
    pub deadline: Option<Instant>,
}

/// How long past the client's deadline a peer's stream may go on before this node ends it.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// What the answer does once it is here: offer a generation to this node's response cache,
/// and keep this node's serve span open until the stream ends.
pub struct After {
    pub remember: Option<(Policies, CachePrompt)>,
    pub span: tracing::Span,
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
            return Ok(Err(e));
        }
        other => {
            let e = anyhow::anyhow!("the peer answered {} first", other.kind());
            return Err((e, after));
        }
    };
    // The next line decides: the connection lost before it (nothing has reached the client)
    // means the request is served here after all. (A peer still alive then records the
    // cancelled prompt as well: a rare double record, preferred to a failed request.)
    let next = match lines.next().await {
        Some(Ok(line)) => line,
        Some(Err(Broken::Transport(e))) => return Err((e, after)),
        None => return Err((anyhow::anyhow!("node {node:?} went away"), after)),
        Some(Err(Broken::Malformed(e))) => {
            let e = ServeError::internal(format!("node {node:?} answered badly: {e}"));
            return Ok(Err(e));
        }
    };
    let output = match (&wire.work, next) {
        (_, WireEvent::Error(e)) => {
            let e = ServeError::from(e);
            return Ok(Err(e));
        }
        (WireWork::Embed { .. }, WireEvent::Embeddings(e)) => Output::Embeddings(e),
        (
            WireWork::Generate(_),
            first @ (WireEvent::Text(_) | WireEvent::Choice(_) | WireEvent::Done(_)),
        ) => {
            let lines = futures::stream::once(async { Ok(first) })
                .chain(lines)
                .boxed();
            let until = call.deadline.map(|d| d + DEADLINE_GRACE);
            Output::Text(relay(lines, node.clone(), after, until))
        }
        (_, other) => {
            let e = ServeError::internal(format!("node {node:?} sent {} first", other.kind()));
            return Ok(Err(e));
        }
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

type Lines = futures::stream::BoxStream<'static, Result<WireEvent, Broken>>;

/// Why a line could not be read.
enum Broken {
    /// The connection failed: the peer may be gone.
    Transport(anyhow::Error),
    /// The peer sent something that is not a line of the format.
    Malformed(anyhow::Error),
}

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
    if let Some(token) = call.mesh_token {
        req = req.header(MESH_TOKEN, token);
    }
    let resp = req.send().await?;
    if !resp.status().is_success() {
        // Not the serve path's answer (an old or misconfigured peer): serve here.
        anyhow::bail!("the peer answered {}", resp.status());
    }
    let mut lines = json_lines(resp.bytes_stream());
    match lines.next().await {
        Some(Ok(first)) => Ok((first, lines)),
        Some(Err(Broken::Transport(e) | Broken::Malformed(e))) => Err(e),
        None => anyhow::bail!("the peer closed the answer before its first line"),
    }
}

/// The JSON lines of a byte stream (each at most `MAX_LINE` bytes).
fn json_lines<S, B, E>(bytes: S) -> Lines
where
    S: futures::Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + Send + Sync + 'static,
{
    // The buffer, and how much of it is known to hold no newline.
    let state = (Box::pin(bytes), Vec::<u8>::new(), 0usize);
    futures::stream::unfold(state, |(mut bytes, mut buf, mut scanned)| async move {
        loop {
            if let Some(at) = buf[scanned..].iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=scanned + at).collect();
                let parsed = serde_json::from_slice::<WireEvent>(&line)
                    .map_err(|e| Broken::Malformed(e.into()));
                return Some((parsed, (bytes, buf, 0)));
            }
            scanned = buf.len();
            if buf.len() > MAX_LINE {
                let e = anyhow::anyhow!("a line of more than {MAX_LINE} bytes");
                return Some((Err(Broken::Malformed(e)), (bytes, Vec::new(), 0)));
            }
            match bytes.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(chunk.as_ref()),
                Some(Err(e)) => return Some((Err(Broken::Transport(e.into())), (bytes, buf, 0))),
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
fn relay(mut lines: Lines, node: String, after: After, until: Option<Instant>) -> Generating {
    let (tx, events) = mpsc::channel(64);
    let After { remember, span } = after;
    tokio::spawn(async move {
        let past = async {
            match until {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(past);
        let done = loop {
            let line = tokio::select! {
                l = lines.next() => l,
                _ = tx.closed() => return, // the client left
                _ = &mut past => break Err(ServeError::past_deadline()),
            };
            match line {
                Some(Ok(WireEvent::Text(t))) => {
                    if tx.send(Event::Text(t.into())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(WireEvent::Choice(d))) => {
                    if tx.send(Event::Text(d)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(WireEvent::Done(g))) => break Ok(g),
                Some(Ok(WireEvent::Error(e))) => break Err(ServeError::from(e)),
                Some(Ok(other)) => {
                    break Err(ServeError::internal(format!(
                        "node {node:?} sent {} in a generation",
                        other.kind()
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
        let _ = tx.send(Event::Done(done)).await;
        drop(span); // this node's part of the trace ends with the stream
    });
    Generating::from_events(events)
}

/// The answer of the serve path on the serving node, as JSON lines.
/// A text delta on the wire: plain text where that says all of it (what peers without
/// `n` or logprobs read), else the whole delta.
fn wire_text(d: TextDelta) -> WireEvent {
    if d.choice == 0 && d.logprobs.is_empty() {
        WireEvent::Text(d.text)
    } else {
        WireEvent::Choice(d)
    }
}

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
                        Event::Text(t) => wire_text(t),
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
mod tests;
