//! Constrained decoding: a grammar (JSON mode, a JSON schema) turned into a per-token mask
//! over the model's own vocabulary, with `llguidance` as the engine.
//!
//! A [`Grammar`] travels with the request's sampling settings; [`Grammars`] (one per copy,
//! built from the tokenizer on first use) compiles it into a [`Constraint`] for one sequence.
//! The batch step asks the constraint to [`mask`](Constraint::mask) the logits before the
//! sampler runs and [`commit`](Constraint::commit)s the sampled token, which says when the
//! output is complete.

use std::sync::{Arc, OnceLock};

use llguidance::{
    api::TopLevelGrammar,
    toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie},
    Matcher, ParserFactory,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{tokenizer::GgufTokenizer, Result, RuntimeError};

/// What the output must be, token by token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "schema", rename_all = "snake_case")]
pub enum Grammar {
    /// Any JSON object.
    JsonObject,
    /// A JSON value valid under this JSON schema.
    JsonSchema(Value),
}

impl Grammar {
    /// The grammar as llguidance takes it. JSON is written compactly with a space after `:`
    /// and `,` (no free whitespace: a small model could otherwise fill `max_tokens` with it).
    fn top_level(&self) -> std::result::Result<TopLevelGrammar, String> {
        let mut schema = match self {
            Grammar::JsonObject => json!({"type": "object"}),
            Grammar::JsonSchema(Value::Object(s)) => Value::Object(s.clone()),
            Grammar::JsonSchema(other) => {
                return Err(format!("the schema must be a JSON object, got {other}"))
            }
        };
        let layout =
            json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false});
        if let Value::Object(s) = &mut schema {
            s.entry("x-guidance").or_insert(layout);
        }
        Ok(TopLevelGrammar::from_json_schema(schema))
    }
}

/// Compile `grammar` against a byte-level vocabulary, without a model: the check a request
/// gets before it is admitted, so that a schema the engine cannot handle is refused at once.
/// The error says what was wrong.
pub fn check(grammar: &Grammar) -> std::result::Result<(), String> {
    compile(bytes_factory()?, grammar).map(drop)
}

/// The compiler over a vocabulary of the 256 bytes (token `b` is the byte `b`).
fn bytes_factory() -> std::result::Result<&'static ParserFactory, String> {
    static BYTES: OnceLock<std::result::Result<ParserFactory, String>> = OnceLock::new();
    BYTES
        .get_or_init(|| new_factory(&ApproximateTokEnv::single_byte_env()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether `text` follows `grammar`: as a whole (`complete`), or as a beginning of it (an
/// answer cut short by `max_tokens`). What a cached answer is checked with before it is
/// served for a constrained request.
pub fn accepts(grammar: &Grammar, text: &str, complete: bool) -> bool {
    let Ok(mut m) = bytes_factory().and_then(|f| compile(f, grammar)) else {
        return false;
    };
    let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
    m.consume_tokens(&bytes).is_ok() && (!complete || m.is_accepting().unwrap_or(false))
}

fn new_factory(env: &TokEnv) -> std::result::Result<ParserFactory, String> {
    let mut factory = ParserFactory::new_simple(env).map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

fn compile(factory: &ParserFactory, grammar: &Grammar) -> std::result::Result<Matcher, String> {
    let parser = factory
        .create_parser(grammar.top_level()?)
        .map_err(|e| first_line(&e.to_string()))?;
    let matcher = Matcher::new(Ok(parser));
    match matcher.get_error() {
        Some(e) => Err(first_line(&e)),
        None => Ok(matcher),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

/// The grammar compiler of one model: its vocabulary as token bytes, built on first use.
pub struct Grammars {
    tokenizer: Arc<GgufTokenizer>,
    /// Logits per row (the embedding table may have more rows than the tokenizer has tokens).
    vocab: usize,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grammars({} tokens)", self.vocab)
    }
}

impl Grammars {
    pub fn new(tokenizer: Arc<GgufTokenizer>, vocab: usize) -> Self {
        Grammars {
            tokenizer,
            vocab,
            factory: OnceLock::new(),
        }
    }

    /// A fresh constraint for one sequence, or `None` when the sampling has no grammar.
    pub fn constraint(&self, grammar: Option<&Grammar>) -> Result<Option<Constraint>> {
        let Some(grammar) = grammar else {
            return Ok(None);
        };
        let factory = self
            .factory
            .get_or_init(|| new_factory(&token_env(&self.tokenizer, self.vocab)))
            .as_ref()
            .map_err(|e| RuntimeError::Inference(format!("constrained decoding: {e}")))?;
        let matcher = compile(factory, grammar).map_err(|e| {
            RuntimeError::InvalidRequest(format!("response_format.json_schema: {e}"))
        })?;
        Ok(Some(Constraint { matcher }))
    }
}

/// The vocabulary as llguidance sees it: each token's bytes (control tokens marked as
/// special, so no grammar ever allows them), the end-of-generation tokens as its EOS.
fn token_env(tok: &GgufTokenizer, vocab: usize) -> TokEnv {
    let mut words = vec![Vec::new(); vocab];
    let unicode = byte_level_chars();
    for (text, id) in tok.tokenizer.get_vocab(false) {
        if let Some(w) = words.get_mut(id as usize) {
            *w = text
                .chars()
                .map(|c| unicode.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| text.as_bytes().to_vec());
        }
    }
    for (id, added) in tok.tokenizer.get_added_tokens_decoder() {
        if let Some(w) = words.get_mut(id as usize) {
            *w = added.content.as_bytes().to_vec();
            if added.special {
                w.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
            }
        }
    }
    let eog = &tok.end_of_generation;
    let eos = tok.eos.as_ref().map(|e| e.0).or(eog.first().copied());
    let info = TokRxInfo::new(vocab as u32, eos.unwrap_or(0));
    let mut trie = TokTrie::from(&info, &words);
    if !eog.is_empty() {
        trie = trie.with_eos_tokens(eog);
    }
    Arc::new(ApproximateTokEnv::new(trie))
}

/// The byte-level BPE alphabet: each byte is written as one printable character in the
/// vocabulary; printable ASCII and Latin-1 stand for themselves, the rest from U+0100 on.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let stands_for_itself = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if stands_for_itself {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below U+0200")
        };
        map.insert(c, b);
    }
    map
}

/// The grammar state of one sequence.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Set the logits of every token that cannot come next to -inf.
    pub fn mask(&mut self, logits: &mut [f32]) -> std::result::Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| first_line(&e.to_string()))?;
        allowed.iter_unset_entries(|i| {
            if let Some(l) = logits.get_mut(i) {
                *l = f32::NEG_INFINITY;
            }
        });
        Ok(())
    }

    /// Take the sampled token; returns whether the output is now complete (nothing but the
    /// end of generation may follow).
    pub fn commit(&mut self, token: u32) -> std::result::Result<bool, String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| first_line(&e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}

#[cfg(test)]
#[path = "constrain_tests.rs"]
mod tests;
