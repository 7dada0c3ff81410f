//! The status page for operators (`GET /status`): this node — or every node of its mesh —
//! with devices, models and their copies, tiers with their queue and this month's use against
//! their budget, and recent page-ins and evictions; plain HTML,
//! refreshed every two seconds, no scripts. Protected like `/admin` (a bearer token, or the
//! admin token as the password of HTTP Basic auth, so a browser can open it).

use std::fmt::Write;

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::get,
    Router,
};
use base64::Engine as _;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/status", get(page))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// A used/capacity bar.
fn bar(used: u64, capacity: u64) -> String {
    let pct = if capacity == 0 {
        0.0
    } else {
        (used as f64 / capacity as f64 * 100.0).min(100.0)
    };
    format!(
        r#"<div class="bar" title="{pct:.0}%"><div style="width:{pct:.1}%"></div></div> {} / {}"#,
        mib(used),
        mib(capacity)
    )
}

/// The admin token as a bearer token, or as the password of Basic auth.
fn allowed(h: &HeaderMap, token: &str) -> bool {
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
    let mut h = String::new();
    let node = state
        .cluster
        .as_ref()
        .map_or("this node".to_string(), |c| c.node().to_string());
    let _ = write!(
        h,
        r#"<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>flatmesh · {node}</title><style>
body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}} h1{{font-size:1.3em}} h2{{font-size:1.05em;margin-top:1.4em}}
table{{border-collapse:collapse}} td,th{{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd}}
.bar{{display:inline-block;width:160px;height:10px;background:#eee;vertical-align:middle}} .bar div{{height:10px;background:#3a7}}
.ready{{color:#2a2}} .loading{{color:#c80}} .failed{{color:#c22}} .cold{{color:#888}}
</style></head><body><h1>flatmesh · {}</h1>"#,
        escape(&node)
    );
    if let Some(c) = &state.cluster {
        let mesh = c.status();
        let _ = write!(h, "<h2>Nodes (etcd {})</h2><table><tr><th>node</th><th>front door</th><th>state</th><th>models ready</th><th>devices</th></tr>",
            if mesh["etcd_connected"].as_bool().unwrap_or(false) { "connected" } else { "unreachable" });
        for n in mesh["nodes"].as_array().into_iter().flatten() {
            let models: Vec<String> = n["models"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| escape(m["id"].as_str().unwrap_or("")))
                .collect();
            let devices: Vec<String> = n["devices"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| {
                    bar(
                        d["used"].as_u64().unwrap_or(0),
                        d["capacity"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(n["node"].as_str().unwrap_or("")),
                escape(n["http"].as_str().unwrap_or("")),
                if n["draining"].as_bool().unwrap_or(false) {
                    "draining"
                } else {
                    "serving"
                },
                models.join(", "),
                devices.join("<br>")
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Devices</h2><table><tr><th>device</th><th>used / capacity</th></tr>");
    for (name, used, capacity) in state.cache.devices() {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(&name),
            bar(used, capacity)
        );
    }
    h.push_str("</table><h2>Models</h2><table><tr><th>model</th><th>state</th><th>copies</th><th>leases</th><th>idle</th><th>keep alive</th><th>bytes</th></tr>");
    for m in state.cache.status() {
        let copies: Vec<String> = m
            .copies
            .iter()
            .map(|c| format!("{} ({})", escape(&c.device), c.state))
            .collect();
        let idle = m.idle_seconds.map_or("—".into(), |s| format!("{s:.0} s"));
        let _ = write!(
            h,
            r#"<tr><td>{}</td><td class="{}">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            escape(&m.id),
            m.state,
            m.state,
            copies.join(", "),
            m.leases,
            idle,
            escape(&m.keep_alive),
            m.bytes.map_or("—".into(), mib)
        );
        if let Some(e) = &m.error {
            let _ = write!(
                h,
                r#"<tr><td></td><td colspan="6" class="failed">{}</td></tr>"#,
                escape(e)
            );
        }
    }
    let shares = state.limits.largest_budget_shares(&state.tenancy);
    h.push_str("</table><h2>Tiers (this month)</h2><table><tr><th>tier</th><th>weight</th><th>waiting</th><th>requests</th><th>tokens</th><th>budget per tenant</th><th>most used by a tenant</th></tr>");
    for t in state.tenancy.tiers() {
        let (requests, tokens) = state.limits.tier_this_month(&t.name);
        let waiting = state
            .metrics
            .queue_depth
            .with_label_values(&[&t.name])
            .get();
        let (budget, used) = if t.token_budget > 0 {
            let share = shares.get(&t.name).copied().unwrap_or(0.0);
            let used = (share * t.token_budget as f64).round() as u64;
            (
                t.token_budget.to_string(),
                format!(
                    r#"<div class="bar" title="{:.0}%"><div style="width:{:.1}%"></div></div> {used}"#,
                    share * 100.0,
                    (share * 100.0).min(100.0)
                ),
            )
        } else {
            ("—".into(), "—".into())
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{waiting}</td><td>{requests}</td><td>{tokens}</td><td>{budget}</td><td>{used}</td></tr>",
            escape(&t.name),
            t.weight
        );
    }
    h.push_str("</table><h2>Recent page-ins and evictions (this node)</h2><table><tr><th>when</th><th>event</th><th>model</th><th>copy</th><th>device</th><th>detail</th></tr>");
    let now = crate::util::now_ms();
    let events = state.cache.recent_events();
    if events.is_empty() {
        h.push_str(r#"<tr><td colspan="6">none yet</td></tr>"#);
    }
    for e in events {
        let ago = now.saturating_sub(e.at_ms) / 1000;
        let class = match e.kind {
            "page-in" => "ready",
            "page-in failed" => "failed",
            _ => "cold",
        };
        let _ = write!(
            h,
            r#"<tr><td>{ago} s ago</td><td class="{class}">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            e.kind,
            escape(&e.model),
            escape(&e.copy),
            escape(&e.device),
            escape(&e.detail)
        );
    }
    h.push_str("</table></body></html>");
    h
}
