//! Request guards of the HTTP front door: bearer tokens.

use axum::http::{header, HeaderMap};

/// Whether the request carries `Authorization: Bearer <token>` (compared in constant time).
pub fn has_bearer(h: &HeaderMap, token: &str) -> bool {
    let given = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
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
