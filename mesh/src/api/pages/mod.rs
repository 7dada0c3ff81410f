//! Plain server-rendered pages for tenants and operators under `/pages` and `/status/tenants`:
//! a tenant's own usage, budget, limits and invoice, the operators' view over every tenant,
//! and the model comparison page. No scripts and no external assets; every string a tenant or
//! an operator supplied is escaped by `maud`, and a Content-Security-Policy forbids scripts
//! should anything slip through.
//!
//! A tenant signs in with its own API key: as `Authorization: Bearer <key>`, or, in a
//! browser, through the form at `/pages/login`, which puts the key in an `HttpOnly`,
//! `SameSite=Strict` cookie scoped to `/pages` (scripts cannot read it; other sites' forms and
//! links do not carry it). Only these pages read the cookie, never the API.

mod compare;
mod tenant;

use axum::{
    extract::{Path, Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::AppState;
use crate::tenancy::Caller;

/// The cookie that carries a tenant's key to the pages.
pub const COOKIE: &str = "flatmesh_key";
/// How long a browser keeps the key (seconds).
const COOKIE_MAX_AGE: u64 = 12 * 3600;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/pages/login", get(login_form).post(sign_in))
        .route("/pages/logout", post(logout))
        .route("/pages/tenants", get(own_page))
        .route("/pages/tenants/{id}", get(tenant::tenant_page))
        .route(
            "/pages/compare",
            get(compare::form_page).post(compare::run_page),
        )
        .route("/status/tenants", get(tenant::all_tenants_page))
        .route("/status/tenants/{id}", get(tenant::operator_tenant_page))
}

/// The shared style sheet.
const STYLE: &str = "
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:80em} h1{font-size:1.3em} h2{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse} td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd;vertical-align:top}
td.n,th.n{text-align:right} .bar{display:inline-block;width:160px;height:10px;background:#eee;vertical-align:middle}
.bar div{height:10px;background:#3a7} .error{color:#c22} .muted{color:#777} nav a{margin-right:1em}
.answers{display:flex;gap:1em;flex-wrap:wrap} .answer{flex:1 1 20em;border:1px solid #ccc;padding:.6em}
.answer pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em} textarea{width:100%;max-width:50em}
";

/// A whole page: the title and the body's contents.
fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width";
                title { "flatmesh · " (title) }
                style { (PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
}

/// An HTML answer: private (never cached), scripts forbidden, not framed by other sites.
fn page(status: StatusCode, markup: Markup) -> Response {
    let mut r = (status, markup.into_string()).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        // Not `no-referrer`: with it a browser posts these pages' forms with `Origin: null`.
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// A page that says what went wrong.
fn error_page(status: StatusCode, message: &str) -> Response {
    let body = html! {
        h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
        p.error { (message) }
        nav { a href="/pages/login" { "Sign in" } }
    };
    page(status, layout("error", body))
}

/// `id` as one path segment (tenant ids from the config may hold any character).
fn segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The key a request presents: the `Authorization` header, else the pages' cookie.
fn presented_key(h: &HeaderMap) -> Option<String> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return Some(v.to_string());
    }
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| !v.is_empty())
}

/// The tenant behind the request's key; a 401 sign-in page otherwise. With tenancy on, a
/// page needs a real key (the anonymous tier is no tenant of its own); single-tenant, every
/// caller is `anonymous`. (The page is boxed: a `Response` is large.)
fn signed_in(state: &AppState, h: &HeaderMap, anonymous_ok: bool) -> Result<Caller, Box<Response>> {
    let key = presented_key(h);
    let why = match state.tenancy.authenticate(key.as_deref()) {
        Ok(c) if c.authorization.is_some() || state.tenancy.is_open() || anonymous_ok => {
            return Ok(c)
        }
        Ok(_) | Err(crate::tenancy::AuthError::Missing) => "this page needs your API key",
        Err(_) => "that API key is not valid",
    };
    Err(Box::new(sign_in_form(StatusCode::UNAUTHORIZED, Some(why))))
}

/// The sign-in form, with `message` above it.
fn sign_in_form(status: StatusCode, message: Option<&str>) -> Response {
    let body = html! {
        h1 { "Sign in with your API key" }
        @if let Some(m) = message { p.error { (m) } }
        form method="post" action="/pages/login" {
            p {
                label for="key" { "API key " }
                input #key type="password" name="key" autocomplete="off" required size="50";
            }
            p { button type="submit" { "Sign in" } }
        }
        p.muted {
            "The key is kept in a cookie that only these pages read (HttpOnly, SameSite=Strict) "
            "for " (COOKIE_MAX_AGE / 3600) " hours, or until you sign out."
        }
    };
    let mut r = page(status, layout("sign in", body));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"flatmesh\""),
        );
    }
    r
}

async fn login_form() -> Response {
    sign_in_form(StatusCode::OK, None)
}

/// A 403 page for a form posted from another site.
fn cross_site(h: &HeaderMap, req_authority: Option<&str>) -> Option<Response> {
    super::guard::cross_origin(h, req_authority).map(|why| {
        error_page(
            StatusCode::FORBIDDEN,
            &format!("forms here are accepted from these pages only ({why})"),
        )
    })
}

/// Check the posted key; set the cookie and go to the tenant's page, or show the form again.
async fn sign_in(State(state): State<AppState>, req: Request) -> Response {
    let authority = req.uri().authority().map(|a| a.to_string());
    if let Some(r) = cross_site(req.headers(), authority.as_deref()) {
        return r;
    }
    let body = match axum::body::to_bytes(req.into_body(), 64 << 10).await {
        Ok(b) => b,
        Err(_) => return error_page(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"),
    };
    let form = match Form::parse(&body) {
        Ok(f) => f,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e),
    };
    let key = form.one("key").unwrap_or_default().trim().to_string();
    // What a cookie value may hold; a key with anything else is no key we issued.
    if key.is_empty()
        || !key
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b";,\"\\".contains(&b))
    {
        return sign_in_form(
            StatusCode::UNAUTHORIZED,
            Some("key: that API key is not valid"),
        );
    }
    let caller = match state.tenancy.authenticate(Some(&key)) {
        Ok(c) if c.authorization.is_some() => c,
        _ => {
            return sign_in_form(
                StatusCode::UNAUTHORIZED,
                Some("key: that API key is not valid"),
            )
        }
    };
    let cookie =
        format!("{COOKIE}={key}; Path=/pages; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE}");
    redirect(
        &format!("/pages/tenants/{}", segment(&caller.tenant)),
        Some(&cookie),
    )
}

/// Forget the key and go back to the sign-in form.
async fn logout(req: Request) -> Response {
    let authority = req.uri().authority().map(|a| a.to_string());
    if let Some(r) = cross_site(req.headers(), authority.as_deref()) {
        return r;
    }
    let cookie = format!("{COOKIE}=; Path=/pages; HttpOnly; SameSite=Strict; Max-Age=0");
    redirect("/pages/login", Some(&cookie))
}

/// A 303 to `to`, setting `cookie` when given.
fn redirect(to: &str, cookie: Option<&str>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `/pages/tenants`: the signed-in tenant's own page.
async fn own_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match signed_in(&state, &headers, false) {
        Ok(c) => redirect(&format!("/pages/tenants/{}", segment(&c.tenant)), None),
        Err(r) => *r,
    }
}

/// The operator's check, as the status page makes it (admin token as bearer or Basic).
fn operator(state: &AppState, h: &HeaderMap) -> Result<(), Box<Response>> {
    match &state.admin_token {
        Some(token) if !super::status::allowed(h, token) => Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"flatmesh\"")],
                "this page needs the admin token (Bearer, or as the Basic auth password)",
            )
                .into_response(),
        )),
        _ => Ok(()),
    }
}

/// The tenant id in a path, as given.
type TenantId = Path<String>;

/// An `application/x-www-form-urlencoded` body: its fields in order (a name may repeat).
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Result<Form, String> {
        let text = std::str::from_utf8(body).map_err(|_| "the form is not UTF-8".to_string())?;
        let fields = text
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                Ok((decode(name)?, decode(value)?))
            })
            .collect::<Result<_, String>>()?;
        Ok(Form(fields))
    }

    fn one(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Percent-decode one form field (`+` is a space).
fn decode(s: &str) -> Result<String, String> {
    let bad = || format!("the form field {s:?} is not properly encoded");
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
                let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_repeated_fields_and_escapes() {
        let f = Form::parse(b"prompt=%3Cscript%3E+hi&model=a&model=b%3Ac&max_tokens=").unwrap();
        assert_eq!(f.one("prompt").as_deref(), Some("<script> hi"));
        assert_eq!(f.all("model"), vec!["a", "b:c"]);
        assert_eq!(f.one("max_tokens").as_deref(), Some(""));
        assert!(Form::parse(b"prompt=%zz").is_err());
        assert!(Form::parse(b"prompt=%e2%82").is_err());
    }

    #[test]
    fn the_key_comes_from_the_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert(
            header::COOKIE,
            "a=b; flatmesh_key=fm-123; c=d".parse().unwrap(),
        );
        assert_eq!(presented_key(&h).as_deref(), Some("fm-123"));
        h.insert(header::AUTHORIZATION, "Bearer fm-9".parse().unwrap());
        assert_eq!(presented_key(&h).as_deref(), Some("Bearer fm-9"));
    }

    #[test]
    fn tenant_ids_become_one_path_segment() {
        assert_eq!(segment("city-a.b:c_d"), "city-a.b:c_d");
        assert_eq!(segment("a/b c<"), "a%2Fb%20c%3C");
    }
}
