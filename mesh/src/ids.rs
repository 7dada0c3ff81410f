//! The one rule for names clients and operators choose: model, vmodel and tenant ids.

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Check an id (`what` names it in the error: "model id", "vmodel", "tenant id"): 1 to
/// [`MAX_ID_LEN`] ASCII letters, digits and `-_.:`, not starting with a dot. So an id is
/// never a path (`/`, `..`), never blank, and never long enough to bloat logs or labels.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "{what} is {} bytes long; at most {MAX_ID_LEN} are allowed",
            id.len()
        ));
    }
    if id.starts_with('.') {
        return Err(format!("{what} {id:?} must not start with a dot"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "{what} {id:?} contains {c:?}; use ASCII letters, digits and - _ . : only"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_pass() {
        for id in [
            "smollm2-135m-instruct",
            "all-minilm-l6-v2",
            "city-a",
            "m0",
            "llama3.2:1b",
            "A_b",
        ] {
            assert_eq!(check_id("model id", id), Ok(()), "{id}");
        }
        assert!(check_id("id", &"x".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn paths_blanks_and_long_ids_are_refused() {
        let long = "x".repeat(100_000);
        for id in [
            "",
            "../../x",
            "a/b",
            ".hidden",
            "..",
            "a b",
            "tab\t",
            "é",
            "a\0",
            long.as_str(),
        ] {
            let e = check_id("vmodel", id).unwrap_err();
            assert!(e.starts_with("vmodel"), "{e}");
            assert!(e.len() < 200, "the error does not echo a long id: {e}");
        }
    }
}
