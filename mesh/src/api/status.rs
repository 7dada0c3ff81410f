//! The status page for operators (`GET /status`): this node — or every node of its mesh —
//! with devices, models and their copies, tiers with their queue and this month's use against
//! their budget, and recent page-ins and evictions, with a link to every tenant's month
//! (`/status/tenants`, in `pages`); plain HTML,
//! refreshed every two seconds, no scripts. Protected like `/admin` (a bearer token, or the
//! admin token as the password of HTTP Basic auth, so a browser can open it).

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::get,
    Router,
};
use base64::Engine as _;
use maud::{html, Markup, PreEscaped};

use super::AppState;
use crate::cache::EventKind;
use crate::ledger::ShipState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/status", get(page))
}

/// The page's style sheet (no scripts anywhere).
const STYLE: &str = "
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222} h1{font-size:1.3em} h2{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse} td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd}
.bar{display:inline-block;width:160px;height:10px;background:#eee;vertical-align:middle} .bar div{height:10px;background:#3a7}
.ready{color:#2a2} .loading{color:#c80} .failed{color:#c22} .cold{color:#888}
";

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// A bar filled to `width` percent, titled `title` percent.
fn meter(title: f64, width: f64) -> Markup {
    html! {
        div.bar title=(format!("{title:.0}%")) { div style=(format!("width:{width:.1}%")) {} }
    }
}

/// A used/capacity bar.
fn bar(used: u64, capacity: u64) -> Markup {
    let pct = if capacity == 0 {
        0.0
    } else {
        (used as f64 / capacity as f64 * 100.0).min(100.0)
    };
    html! { (meter(pct, pct)) " " (mib(used)) " / " (mib(capacity)) }
}

/// The admin token as a bearer token, or as the password of Basic auth.
pub(super) fn allowed(h: &HeaderMap, token: &str) -> bool {
    if super::guard::has_bearer(h, token) {
        return true;
    }
    let basic = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    basic
        .and_then(|b| b.split_once(':').map(|(_, p)| p.to_string()))
        .is_some_and(|p| super::guard::same_secret(&p, token))
}

async fn page(State(state): State<AppState>, req: Request) -> Response {
    if let Some(token) = &state.admin_token {
        if !allowed(req.headers(), token) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"flatmesh\"")],
                "the status page needs the admin token (Bearer, or as the Basic auth password)",
            )
                .into_response();
        }
    }
    Html(render(&state)).into_response()
}

fn render(state: &AppState) -> String {
    let node = state
        .cluster
        .as_ref()
        .map_or("this node".to_string(), |c| c.node().to_string());
    let page = html! {
        (PreEscaped("<!doctype html>"))
        html {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="2";
                title { "flatmesh · " (node) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "flatmesh · " (node) }
                p {
                    a href="/status/tenants" { "Tenants: usage, budgets and invoices this month" }
                    " · "
                    a href="/pages/compare" { "Compare models" }
                }
                @if let Some(c) = &state.cluster {
                    (nodes(c))
                }
                (devices(state))
                (models(state))
                (tiers(state))
                @if let Some(shared) = state.serve.ledger.shared() {
                    (shared_ledger(state, &shared.state()))
                }
                (events(state))
            }
        }
    };
    page.into_string()
}

/// Every node of the mesh, as etcd last showed it.
fn nodes(c: &crate::cluster::Cluster) -> Markup {
    let mesh = c.status();
    let etcd = if mesh.etcd_connected {
        "connected"
    } else {
        "unreachable"
    };
    html! {
        h2 { "Nodes (etcd " (etcd) ")" }
        table {
            tr { th { "node" } th { "pool (cost)" } th { "front door" } th { "state" } th { "models ready" } th { "devices" } }
            @for n in &mesh.nodes {
                tr {
                    td { (n.node) }
                    td {
                        (n.pool) " (" (n.cost) ")"
                        @for (k, v) in &n.labels { br; (k) "=" (v) }
                    }
                    td { (n.http) }
                    td { (if n.draining { "draining" } else { "serving" }) }
                    td { (n.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")) }
                    td {
                        @for (i, d) in n.devices.iter().enumerate() {
                            @if i > 0 { br; }
                            (bar(d.used, d.capacity))
                        }
                    }
                }
            }
        }
    }
}

/// This node's devices, used against capacity.
fn devices(state: &AppState) -> Markup {
    html! {
        h2 { "Devices" }
        table {
            tr { th { "device" } th { "kind" } th { "used / capacity" } }
            @for (v, _) in state.serve.cache.device_views() {
                @let kind = match (v.gpu(), &v.unusable) {
                    (Some(g), None) => format!("cuda (GPU {g})"),
                    (Some(g), Some(why)) => format!("cuda (GPU {g}, not usable: {why})"),
                    (None, _) => "host".to_string(),
                };
                tr { td { (v.device.name()) } td { (kind) } td { (bar(v.device.used(), v.device.capacity())) } }
            }
        }
    }
}

/// The models, their state and copies.
fn models(state: &AppState) -> Markup {
    html! {
        h2 { "Models" }
        table {
            tr {
                th { "model" } th { "state" } th { "copies" } th { "leases" } th { "idle" }
                th { "keep alive" } th { "bytes" }
            }
            @for m in state.serve.cache.status() {
                @let copies: Vec<String> = m.copies.iter().map(|c| format!("{} ({})", c.device, c.state)).collect();
                tr {
                    td { (m.id) }
                    td class=(m.state) { (m.state) }
                    td { (copies.join(", ")) }
                    td { (m.leases) }
                    td { (m.idle_seconds.map_or("—".into(), |s| format!("{s:.0} s"))) }
                    td { (m.keep_alive) }
                    td { (m.bytes.map_or("—".into(), mib)) }
                }
                @if let Some(e) = &m.error {
                    tr { td {} td colspan="6" class="failed" { (e) } }
                }
            }
        }
    }
}

/// The tiers: weight, queue, and this month's use against the budget.
fn tiers(state: &AppState) -> Markup {
    let shares = state.serve.limits.largest_budget_shares(&state.tenancy);
    html! {
        h2 { "Tiers (this month)" }
        table {
            tr {
                th { "tier" } th { "weight" } th { "waiting" } th { "requests" } th { "tokens" }
                th { "budget per tenant" } th { "most used by a tenant" }
            }
            @for t in state.tenancy.tiers() {
                @let (requests, tokens) = state.serve.limits.tier_this_month(&t.name);
                @let waiting = state.serve.metrics.queue_depth.with_label_values(&[&t.name]).get();
                tr {
                    td { (t.name) }
                    td { (t.weight) }
                    td { (waiting) }
                    td { (requests) }
                    td { (tokens) }
                    @if t.token_budget > 0 {
                        @let share = shares.get(&t.name).copied().unwrap_or(0.0);
                        td { (t.token_budget) }
                        td {
                            (meter(share * 100.0, (share * 100.0).min(100.0)))
                            " " ((share * t.token_budget as f64).round() as u64)
                        }
                    } @else {
                        td { "—" }
                        td { "—" }
                    }
                }
            }
        }
    }
}

/// How this node's shipping to the shared ledger stands, with its outbox as it is now.
fn shared_ledger(state: &AppState, ship: &ShipState) -> Markup {
    let now = crate::ledger::now_ms();
    let ago = |ms: u64| format!("{:.0} s ago", now.saturating_sub(ms) as f64 / 1e3);
    let backlog = state.serve.ledger.backlog().ok();
    html! {
        h2 { "Shared ledger (PostgreSQL)" }
        p id="shared-ledger" {
            @match ship {
                ShipState::Starting => { "connecting" }
                ShipState::Shipping { at_ms } => { "shipping; last round " (ago(*at_ms)) }
                ShipState::Failing { since_ms, error } => {
                    strong { "not shipping" } " since " (ago(*since_ms)) ": " (error)
                }
                ShipState::NewerSchema { since_ms, schema } => {
                    strong { "refused" } " since " (ago(*since_ms)) ": " (schema.to_string())
                    "; nothing is shipped until this agent is upgraded"
                }
            }
            @if let Some(b) = backlog {
                " · records waiting: " (b.records)
                @if let Some(oldest) = b.oldest_ms {
                    " · the oldest finished " (ago(oldest))
                }
            }
        }
    }
}

/// The recent page-ins and evictions of this node.
fn events(state: &AppState) -> Markup {
    let now = crate::util::now_ms();
    let events = state.serve.cache.recent_events();
    html! {
        h2 { "Recent page-ins and evictions (this node)" }
        table {
            tr {
                th { "when" } th { "event" } th { "model" } th { "copy" } th { "device" }
                th { "detail" }
            }
            @if events.is_empty() {
                tr { td colspan="6" { "none yet" } }
            }
            @for e in &events {
                @let class = match e.kind {
                    EventKind::PageIn => "ready",
                    EventKind::PageInFailed => "failed",
                    EventKind::Evicted | EventKind::Unloaded => "cold",
                };
                tr {
                    td { (now.saturating_sub(e.at_ms) / 1000) " s ago" }
                    td class=(class) { (e.kind) }
                    td { (e.model) }
                    td { (e.copy) }
                    td { (e.device) }
                    td { (e.detail) }
                }
            }
        }
    }
}
