//! A tenant's page (`/pages/tenants/{id}`, the tenant's own key) and the operators' view over
//! every tenant (`/status/tenants`, the admin token): this month's usage by model and day, the
//! budget left, the tier's limits and the invoice so far, all from the ledger's queries and
//! the invoice path of `/admin/invoice`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
};
use maud::{html, Markup};

use super::{error_page, layout, operator, page, segment, signed_in, TenantId};
use crate::{
    api::{
        error::ApiError,
        mesh_ledger::{self, Period},
        AppState,
    },
    ledger::{InvoiceLine, Record, Usage},
    tenancy::{
        limits::{month_bounds, month_label},
        Tier,
    },
    util::now_ms,
};

/// The current calendar month (UTC), in Unix milliseconds `[start, end)`.
struct Month {
    start: u64,
    end: u64,
    label: String,
}

fn this_month() -> Month {
    let (start, end) = month_bounds(now_ms());
    Month {
        start,
        end,
        label: month_label(start),
    }
}

/// The month as the ledger's API takes it (Unix seconds; month bounds are whole seconds).
fn period(m: &Month) -> Period {
    Period {
        from: Some(m.start / 1000),
        to: Some(m.end / 1000),
        tenant: None,
        format: None,
    }
}

/// What the pages show of a month, for every tenant.
struct Figures {
    usage: Vec<Usage>,
    lines: Vec<InvoiceLine>,
    /// `plugin` or `built-in`, as `/admin/invoice` says.
    pricing: &'static str,
    /// In a mesh: the nodes whose records are in, and those that did not answer.
    nodes: Vec<String>,
    unreachable: Vec<String>,
}

impl Figures {
    fn usage_of(&self, tenant: &str) -> Usage {
        self.usage
            .iter()
            .find(|u| u.tenant == tenant)
            .cloned()
            .unwrap_or_default()
    }

    fn lines_of<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a InvoiceLine> + 'a {
        self.lines.iter().filter(move |l| l.tenant == tenant)
    }

    fn amount_of(&self, tenant: &str) -> f64 {
        self.lines_of(tenant).map(|l| l.amount).sum::<f64>() + 0.0
    }
}

/// Usage of the month over the mesh and the invoice of it: the pricing plugin's lines when
/// one is loaded, else the built-in flat rate (the path `/admin/invoice` takes).
async fn month_figures(state: &AppState, m: &Month) -> Result<Figures, ApiError> {
    let p = period(m);
    let got = mesh_ledger::gather(state, None, &p).await?;
    let tenants = state.tenancy.tenants();
    let tiers = state.tenancy.tiers();
    let settled = crate::api::admin::settle(state, &p, &tenants, &tiers, &got.usage).await?;
    let (lines, pricing) = match settled {
        Some(lines) => (lines, "plugin"),
        None => (
            crate::ledger::flat_rate_invoice(&tenants, &tiers, &got.usage),
            "built-in",
        ),
    };
    Ok(Figures {
        usage: got.usage,
        lines,
        pricing,
        nodes: got.nodes,
        unreachable: got.unreachable,
    })
}

/// One row of usage by day and model.
#[derive(Default)]
struct Row {
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    device_seconds: f64,
}

/// `YYYY-MM-DD` (UTC) of a Unix millisecond.
fn day(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| jiff::tz::TimeZone::UTC.to_datetime(t).date().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The tenant's records of the month, summed by day and model: from the shared ledger when
/// there is one and it answers; else this node's from its ledger and, in a mesh, every live
/// peer's (those that do not answer are named).
async fn by_day_and_model(
    state: &AppState,
    tenant: &str,
    m: &Month,
) -> Result<(BTreeMap<(String, String), Row>, Vec<String>), ApiError> {
    match state
        .serve
        .ledger
        .shared_by_day_and_model(tenant, m.start, m.end)
        .await
    {
        Some(Ok(sums)) => {
            let rows = sums
                .into_iter()
                .map(|(start, model, u)| {
                    let row = Row {
                        requests: u.requests,
                        input_tokens: u.input_tokens,
                        output_tokens: u.output_tokens,
                        device_seconds: u.device_seconds,
                    };
                    ((day(start), model), row)
                })
                .collect();
            return Ok((rows, vec![]));
        }
        Some(Err(e)) => tracing::warn!(
            error = format!("{e:#}"),
            "The shared ledger cannot be read; asking the nodes instead"
        ),
        None => {}
    }
    let ledger = state.serve.ledger.clone();
    let (who, from, to) = (tenant.to_string(), m.start, m.end);
    let mut records = tokio::task::spawn_blocking(move || ledger.records(Some(&who), from, to))
        .await
        .map_err(|e| ApiError::internal(format!("the ledger query failed: {e}")))?
        .map_err(|e| ApiError::internal(format!("cannot read the ledger: {e:#}")))?;
    let (more, unreachable) = peer_records(state, tenant, m).await;
    records.extend(more);
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for r in records {
        let row = rows.entry((day(r.finished_ms), r.model)).or_default();
        row.requests += 1;
        row.input_tokens += r.input_tokens;
        row.output_tokens += r.output_tokens;
        row.device_seconds += r.device_seconds;
    }
    Ok((rows, unreachable))
}

/// The tenant's records of the month on every live peer (with the mesh token).
async fn peer_records(state: &AppState, tenant: &str, m: &Month) -> (Vec<Record>, Vec<String>) {
    let Some(cluster) = &state.cluster else {
        return (vec![], vec![]);
    };
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    else {
        return (
            vec![],
            cluster.peers().into_iter().map(|(n, _)| n).collect(),
        );
    };
    let query = [
        ("tenant", tenant.to_string()),
        ("from", (m.start / 1000).to_string()),
        ("to", (m.end / 1000).to_string()),
    ];
    let asks = cluster.peers().into_iter().map(|(node, http)| {
        let mut req = client
            .get(format!(
                "{}{}",
                http.trim_end_matches('/'),
                mesh_ledger::PATH
            ))
            .query(&query);
        if let Some(token) = &state.mesh_token {
            req = req.header(crate::serve::peer::MESH_TOKEN, token);
        }
        async move {
            let got = async {
                req.send()
                    .await?
                    .error_for_status()?
                    .json::<serde_json::Value>()
                    .await
            }
            .await;
            let records = got
                .ok()
                .and_then(|v| serde_json::from_value::<Vec<Record>>(v["records"].clone()).ok());
            (node, records)
        }
    });
    let mut all = Vec::new();
    let mut unreachable = Vec::new();
    for (node, records) in futures::future::join_all(asks).await {
        match records {
            Some(r) => all.extend(r),
            None => unreachable.push(node),
        }
    }
    (all, unreachable)
}

/// Who is looking: the tenant itself, or an operator.
#[derive(Clone, Copy, PartialEq)]
enum Viewer {
    Tenant,
    Operator,
}

/// `GET /pages/tenants/{id}`: the signed-in tenant's own page; any other tenant's is 403.
pub(super) async fn tenant_page(
    State(state): State<AppState>,
    axum::extract::Path(id): TenantId,
    headers: HeaderMap,
) -> Response {
    let caller = match signed_in(&state, &headers, false) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    if caller.tenant != id {
        return error_page(
            StatusCode::FORBIDDEN,
            "this key belongs to another tenant: a key opens its own tenant's page only",
        );
    }
    tenant_view(&state, &id, caller.tier, Viewer::Tenant).await
}

/// `GET /status/tenants/{id}`: any tenant's page, for operators.
pub(super) async fn operator_tenant_page(
    State(state): State<AppState>,
    axum::extract::Path(id): TenantId,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = operator(&state, &headers) {
        return *r;
    }
    let Some(tier) = state.tenancy.tier_of(&id) else {
        return error_page(StatusCode::NOT_FOUND, &format!("no tenant named {id:?}"));
    };
    tenant_view(&state, &id, tier, Viewer::Operator).await
}

async fn tenant_view(state: &AppState, id: &str, tier: Arc<Tier>, viewer: Viewer) -> Response {
    let m = this_month();
    let figures = match month_figures(state, &m).await {
        Ok(f) => f,
        Err(e) => return error_page(e.status, &e.message),
    };
    let (rows, mut unreachable) = match by_day_and_model(state, id, &m).await {
        Ok(r) => r,
        Err(e) => return error_page(e.status, &e.message),
    };
    unreachable.extend(figures.unreachable.iter().cloned());
    unreachable.sort();
    unreachable.dedup();
    let body = html! {
        h1 { "Tenant " (id) }
        nav {
            @if viewer == Viewer::Operator {
                a href="/status/tenants" { "All tenants" }
                a href="/status" { "Status" }
            } @else {
                a href="/pages/compare" { "Compare models" }
                form method="post" action="/pages/logout" style="display:inline" {
                    button type="submit" { "Sign out" }
                }
            }
        }
        p.muted {
            "Month " (m.label) " (UTC), from the ledger"
            @if !figures.nodes.is_empty() { " of nodes " (figures.nodes.join(", ")) }
            "."
        }
        @if !unreachable.is_empty() {
            p.error { "Not counted (unreachable): " (unreachable.join(", ")) }
        }
        (month_totals(&figures.usage_of(id)))
        (budget(&tier, &figures.usage_of(id)))
        (limits(&tier))
        (usage_table(&rows))
        (invoice(&figures, id))
    };
    page(StatusCode::OK, layout(&format!("tenant {id}"), body))
}

fn month_totals(u: &Usage) -> Markup {
    html! {
        h2 { "This month" }
        table {
            tr { th { "requests" } td.n #requests { (u.requests) } }
            tr { th { "input tokens" } td.n #input-tokens { (u.input_tokens) } }
            tr { th { "output tokens" } td.n #output-tokens { (u.output_tokens) } }
            tr { th { "device seconds" } td.n #device-seconds { (format!("{:.3}", u.device_seconds)) } }
        }
    }
}

fn budget(tier: &Tier, u: &Usage) -> Markup {
    let used = u.input_tokens + u.output_tokens;
    html! {
        h2 { "Budget" }
        @if tier.token_budget == 0 {
            p #budget-left { "No monthly token budget on tier " (tier.name) "." }
        } @else {
            @let pct = (used as f64 / tier.token_budget as f64 * 100.0).min(100.0);
            table {
                tr { th { "tokens this month" } td.n #budget-used { (used) } }
                tr { th { "monthly budget" } td.n #budget { (tier.token_budget) } }
                tr {
                    th { "left" }
                    td.n #budget-left { (tier.token_budget.saturating_sub(used)) }
                    td {
                        div.bar title=(format!("{pct:.0}% used")) {
                            div style=(format!("width:{pct:.1}%")) {}
                        }
                    }
                }
            }
        }
    }
}

/// A limit of 0 means none.
fn limit(n: u64) -> String {
    if n == 0 {
        "no limit".into()
    } else {
        n.to_string()
    }
}

fn limits(tier: &Tier) -> Markup {
    html! {
        h2 { "Tier " (tier.name) }
        table #limits {
            tr { th { "price per month" } td.n { (format!("{:.2}", tier.price)) } }
            tr { th { "share weight" } td.n { (tier.weight) } }
            tr { th { "requests at once" } td.n { (limit(u64::from(tier.max_concurrency))) } }
            tr { th { "requests per minute" } td.n { (limit(tier.requests_per_minute)) } }
            tr { th { "tokens per minute" } td.n { (limit(tier.tokens_per_minute)) } }
            tr { th { "tokens per month" } td.n { (limit(tier.token_budget)) } }
            tr { th { "models" } td { (tier.models.join(", ")) } }
        }
    }
}

fn usage_table(rows: &BTreeMap<(String, String), Row>) -> Markup {
    html! {
        h2 { "Usage by day and model" }
        table #by-day {
            tr {
                th { "day" } th { "model" } th.n { "requests" } th.n { "input tokens" }
                th.n { "output tokens" } th.n { "device seconds" }
            }
            @if rows.is_empty() {
                tr { td colspan="6" { "no requests this month" } }
            }
            @for ((day, model), r) in rows {
                tr {
                    td { (day) } td { (model) } td.n { (r.requests) } td.n { (r.input_tokens) }
                    td.n { (r.output_tokens) } td.n { (format!("{:.3}", r.device_seconds)) }
                }
            }
        }
    }
}

fn invoice(f: &Figures, tenant: &str) -> Markup {
    html! {
        h2 { "Invoice so far" }
        table #invoice {
            tr { th { "description" } th.n { "amount" } }
            @for l in f.lines_of(tenant) {
                tr { td { (l.description) } td.n { (format!("{:.2}", l.amount)) } }
            }
            tr { th { "total" } th.n #invoice-total { (format!("{:.2}", f.amount_of(tenant))) } }
        }
        p.muted { "Priced by the " (f.pricing) " pricing." }
    }
}

/// `GET /status/tenants`: every tenant's month, for operators.
pub(super) async fn all_tenants_page(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = operator(&state, &headers) {
        return *r;
    }
    let m = this_month();
    let f = match month_figures(&state, &m).await {
        Ok(f) => f,
        Err(e) => return error_page(e.status, &e.message),
    };
    let tenants = state.tenancy.tenants();
    // Usage of callers that are no configured tenant (the anonymous tier) is shown too.
    let others: Vec<&Usage> = f
        .usage
        .iter()
        .filter(|u| !tenants.iter().any(|(t, _)| *t == u.tenant))
        .collect();
    let total: f64 = f.lines.iter().map(|l| l.amount).sum::<f64>() + 0.0;
    let body = html! {
        h1 { "Tenants · " (m.label) }
        nav { a href="/status" { "Status" } a href="/pages/compare" { "Compare models" } }
        @if !f.unreachable.is_empty() {
            p.error { "Not counted (unreachable): " (f.unreachable.join(", ")) }
        }
        table #tenants {
            tr {
                th { "tenant" } th { "tier" } th.n { "requests" } th.n { "input tokens" }
                th.n { "output tokens" } th.n { "device seconds" } th.n { "budget left" }
                th.n { "invoice" }
            }
            @for (tenant, tier_name) in &tenants {
                @let u = f.usage_of(tenant);
                @let tier = state.tenancy.tier_of(tenant);
                @let left = tier.as_ref().filter(|t| t.token_budget > 0).map_or("—".to_string(), |t| {
                    t.token_budget.saturating_sub(u.input_tokens + u.output_tokens).to_string()
                });
                tr data-tenant=(tenant) {
                    td { a href=(format!("/status/tenants/{}", segment(tenant))) { (tenant) } }
                    td { (tier_name) } td.n { (u.requests) } td.n { (u.input_tokens) }
                    td.n { (u.output_tokens) } td.n { (format!("{:.3}", u.device_seconds)) }
                    td.n { (left) } td.n { (format!("{:.2}", f.amount_of(tenant))) }
                }
            }
            @for u in &others {
                tr data-tenant=(u.tenant) {
                    td { (u.tenant) } td { (u.tier) } td.n { (u.requests) } td.n { (u.input_tokens) }
                    td.n { (u.output_tokens) } td.n { (format!("{:.3}", u.device_seconds)) }
                    td.n { "—" } td.n { "—" }
                }
            }
            tr { th colspan="7" { "total" } th.n #invoice-total { (format!("{:.2}", total)) } }
        }
        p.muted { "Priced by the " (f.pricing) " pricing; figures from the ledger." }
    };
    page(StatusCode::OK, layout("tenants", body))
}
