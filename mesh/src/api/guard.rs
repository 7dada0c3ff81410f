//! Request guards of the HTTP front door: same-origin JSON for admin writes, bearer tokens.

use axum::{
    extract::Request,
    http::{header, HeaderMap, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::error::ApiError;

/// Browsers must not drive the admin API from other sites: a cross-origin request (an
/// `Origin` other than the `Host` it is sent to, or `Sec-Fetch-Site: cross-site`) gets 403,
/// and a write with a body must be `application/json` (415), which a plain HTML form or a
/// "simple" cross-site fetch cannot send.
pub async fn same_origin_json(req: Request, next: Next) -> Response {
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    if let Some(reason) = cross_origin(req.headers(), authority.as_deref()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "cross_origin",
            format!("the admin API refuses cross-origin browser requests ({reason})"),
        )
        .into_response();
    }
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if write && has_body(req.headers()) && !is_json(req.headers()) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "admin writes with a body need content-type: application/json".into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// Why a request comes from another origin, if it does. A browser's `Sec-Fetch-Site` says it
/// outright (and is the only word where the page's referrer policy makes the Origin `null`);
/// otherwise the Origin must name the target: the `Host` header, or the URI's authority
/// (HTTP/2) where there is none. Clients that send neither (curl, SDKs) are not browsers.
pub(super) fn cross_origin(h: &HeaderMap, uri_authority: Option<&str>) -> Option<&'static str> {
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site") {
        return match site.to_ascii_lowercase().as_str() {
            // "none": the user's own navigation (a typed address, a bookmark).
            "same-origin" | "none" => None,
            _ => Some("Sec-Fetch-Site says it comes from another site"),
        };
    }
    let origin = h.get(header::ORIGIN)?;
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    let host = get("host").or(uri_authority);
    match (authority, host) {
        (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) => None,
        _ => Some("its Origin differs from its Host"),
    }
}

fn has_body(h: &HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|n| n.trim() != "0")
}

fn is_json(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether the request carries `Authorization: Bearer <token>` (compared in constant time).
pub fn has_bearer(h: &HeaderMap, token: &str) -> bool {
    let given = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    same_secret(given, token)
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn same_secret(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn cross_origin_browser_requests_are_recognised() {
        let host = ("host", "127.0.0.1:8000");
        assert_eq!(
            cross_origin(&headers(&[host]), None),
            None,
            "curl sends no Origin"
        );
        let same = headers(&[host, ("origin", "http://127.0.0.1:8000")]);
        assert_eq!(cross_origin(&same, None), None);
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:8001",
            "null",
            "127.0.0.1:8000",
        ] {
            assert!(
                cross_origin(&headers(&[host, ("origin", origin)]), None).is_some(),
                "{origin}"
            );
        }
        let fetch = headers(&[host, ("sec-fetch-site", "cross-site")]);
        assert!(cross_origin(&fetch, None).is_some());
        let same_origin = headers(&[host, ("sec-fetch-site", "same-origin")]);
        assert_eq!(cross_origin(&same_origin, None), None);
        // A form on a page with `Referrer-Policy: no-referrer` posts `Origin: null`.
        let null = headers(&[host, ("origin", "null"), ("sec-fetch-site", "same-origin")]);
        assert_eq!(cross_origin(&null, None), None);
        for site in ["same-site", "cross-site"] {
            let other = headers(&[
                host,
                ("origin", "http://127.0.0.1:8000"),
                ("sec-fetch-site", site),
            ]);
            assert!(cross_origin(&other, None).is_some(), "{site}");
        }
        let h2 = headers(&[("origin", "http://127.0.0.1:8000")]);
        assert_eq!(cross_origin(&h2, Some("127.0.0.1:8000")), None);
        assert!(cross_origin(&h2, None).is_some());
    }

    #[test]
    fn bodies_must_be_json() {
        assert!(is_json(&headers(&[("content-type", "application/json")])));
        assert!(is_json(&headers(&[(
            "content-type",
            "Application/JSON; charset=utf-8"
        )])));
        assert!(!is_json(&headers(&[("content-type", "text/plain")])));
        assert!(!is_json(&headers(&[])));
        assert!(has_body(&headers(&[("content-length", "2")])));
        assert!(has_body(&headers(&[("transfer-encoding", "chunked")])));
        assert!(!has_body(&headers(&[("content-length", "0")])));
        assert!(!has_body(&headers(&[])));
    }

    #[test]
    fn bearer_tokens_match_exactly() {
        let h = headers(&[("authorization", "Bearer s3cret")]);
        assert!(has_bearer(&h, "s3cret"));
        assert!(!has_bearer(&h, "s3cre"));
        assert!(!has_bearer(
            &headers(&[("authorization", "Bearer s3cretx")]),
            "s3cret"
        ));
        assert!(!has_bearer(&headers(&[]), "s3cret"));
    }
}
