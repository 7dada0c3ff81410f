//! Log-probabilities in OpenAI's two shapes: chat's list of tokens, each with its
//! alternatives, and the legacy completions' parallel lists.

use flatmesh_runtime::{TokenLogprob, TokenText};
use serde_json::{json, Map, Value};

fn entry(t: &TokenText) -> Value {
    json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes})
}

/// Chat: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
pub fn chat(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.chosen);
            e["top_logprobs"] = t.top.iter().map(entry).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions: `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`.
/// `offset` is where the first token's text starts in the choice's text (in characters); it
/// is moved past the last token's.
pub fn completion(tokens: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(*offset);
        *offset += t.chosen.token.chars().count();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut m = Map::new();
            // Two tokens may read the same (parts of one character): the likelier one stays.
            for alt in &t.top {
                m.entry(alt.token.clone()).or_insert(json!(alt.logprob));
            }
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| &t.chosen.token).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.chosen.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(token: &str, logprob: f32) -> TokenText {
        TokenText {
            token: token.into(),
            bytes: token.as_bytes().to_vec(),
            logprob,
        }
    }

    fn tokens() -> Vec<TokenLogprob> {
        vec![
            TokenLogprob {
                chosen: text(" Par", -0.5),
                top: vec![text(" Par", -0.5), text(" the", -1.5)],
            },
            TokenLogprob {
                chosen: text("is", -0.25),
                top: vec![text("is", -0.25)],
            },
        ]
    }

    #[test]
    fn chat_logprobs_list_each_token_with_its_alternatives() {
        let v = chat(&tokens());
        let first = &v["content"][0];
        assert_eq!(first["token"], " Par");
        assert_eq!(first["logprob"], -0.5);
        assert_eq!(first["bytes"], json!([32, 80, 97, 114]));
        assert_eq!(first["top_logprobs"][1]["token"], " the");
        assert_eq!(
            first["top_logprobs"][1]["bytes"],
            json!([32, 116, 104, 101])
        );
        assert_eq!(v["content"][1]["top_logprobs"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn completion_logprobs_are_parallel_lists_with_offsets_that_go_on() {
        let mut offset = 3;
        let v = completion(&tokens(), &mut offset);
        assert_eq!(v["tokens"], json!([" Par", "is"]));
        assert_eq!(v["token_logprobs"], json!([-0.5, -0.25]));
        assert_eq!(v["top_logprobs"][0], json!({" Par": -0.5, " the": -1.5}));
        assert_eq!(v["text_offset"], json!([3, 7]));
        assert_eq!(offset, 9);
    }
}
