//! Tokenizers built from GGUF metadata, and incremental detokenization for streams.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::{
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::{Vocab, BPE},
    pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence},
    AddedToken, Tokenizer,
};

use crate::{Result, RuntimeError};

/// GGUF token type of control tokens (`<|im_start|>` and the like).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of user-defined tokens, matched in text as they are.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Names that end a turn in common chat formats, besides the GGUF's own EOS.
const END_OF_GENERATION: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// A tokenizer read from a GGUF file, with what generation needs to know about it.
#[derive(Debug)]
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub add_bos: bool,
    /// Tokens that end generation.
    pub end_of_generation: Vec<u32>,
}

impl GgufTokenizer {
    /// Build the tokenizer from `tokenizer.ggml.*` metadata. Only `gpt2` (byte-level BPE)
    /// is supported; pre-tokenizers follow llama.cpp's names.
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let md = &ct.metadata;
        let bad = |reason: String| RuntimeError::InvalidRequest(format!("tokenizer: {reason}"));
        let model = get_str(md, "tokenizer.ggml.model").map_err(bad)?;
        if model != "gpt2" {
            return Err(RuntimeError::UnsupportedArchitecture(format!(
                "tokenizer model {model:?} (only gpt2 byte-level BPE is supported)"
            )));
        }
        let tokens = get_strings(md, "tokenizer.ggml.tokens").map_err(bad)?;
        let merges = get_strings(md, "tokenizer.ggml.merges").map_err(bad)?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => v.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(format!("merge {m:?} is not two tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(crate::error::first_line(&e.to_string())))?;

        let pre = match md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
        {
            None => "default",
            Some(p) => p.as_str(),
        };
        let byte_level = ByteLevel::new(false, true, true);
        let mut tokenizer = Tokenizer::new(bpe);
        match pre {
            // Digits one by one, then the GPT-2 split (llama.cpp: LLAMA_VOCAB_PRE_TYPE_SMOLLM,
            // STARCODER, REFACT, ...).
            "smollm" | "starcoder" | "refact" | "codeshell" => {
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    byte_level.into(),
                ])));
            }
            "default" | "gpt-2" | "gpt2" => {
                tokenizer.with_pre_tokenizer(Some(byte_level));
            }
            other => {
                return Err(RuntimeError::UnsupportedArchitecture(format!(
                    "pre-tokenizer {other:?}"
                )))
            }
        }
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let special: Vec<AddedToken> = (0..tokens.len())
            .filter(|&i| types.get(i) == Some(&TOKEN_TYPE_CONTROL))
            .map(|i| AddedToken::from(tokens[i].clone(), true))
            .collect();
        let user: Vec<AddedToken> = (0..tokens.len())
            .filter(|&i| types.get(i) == Some(&TOKEN_TYPE_USER_DEFINED))
            .map(|i| AddedToken::from(tokens[i].clone(), false))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| bad(crate::error::first_line(&e.to_string())))?;
        tokenizer
            .add_tokens(user)
            .map_err(|e| bad(crate::error::first_line(&e.to_string())))?;

        let named = |key: &str| {
            md.get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokens.get(id as usize).map(|t| (id, t.clone())))
        };
        let bos = named("tokenizer.ggml.bos_token_id");
        let eos = named("tokenizer.ggml.eos_token_id");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let mut end_of_generation: Vec<u32> = END_OF_GENERATION
            .iter()
            .filter_map(|name| vocab_id(&tokens, &types, name))
            .collect();
        if let Some((id, _)) = &eos {
            end_of_generation.push(*id);
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Ok(GgufTokenizer {
            tokenizer,
            bos,
            eos,
            add_bos,
            end_of_generation,
        })
    }

    /// Token ids of a text. Control tokens written in the text (`<|im_start|>`) are parsed
    /// as such; a BOS is added only when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| RuntimeError::Inference(format!("tokenize: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some((bos, _))) = (self.add_bos, &self.bos) {
            ids.push(*bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The bytes a token stands for: a byte-level piece mapped back to its bytes, an added
    /// (control or user-defined) token as its own text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let added = self.tokenizer.get_added_vocabulary().simple_id_to_token(id);
        if let Some(text) = added {
            return text.into_bytes();
        }
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        let mut bytes = Vec::with_capacity(piece.len());
        for c in piece.chars() {
            match byte_of(c) {
                Some(b) => bytes.push(b),
                None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        bytes
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| RuntimeError::Inference(format!("detokenize: {e}")))
    }
}

/// The byte a byte-level BPE character stands for (GPT-2's table: printable bytes stand for
/// themselves, the other 68 are shifted to U+0100 onwards in byte order).
fn byte_of(c: char) -> Option<u8> {
    let printable = |b: u32| matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
    let code = c as u32;
    if printable(code) {
        return Some(code as u8);
    }
    let shifted = code.checked_sub(0x100)?;
    (0u32..=255)
        .filter(|&b| !printable(b))
        .nth(shifted as usize)
        .map(|b| b as u8)
}

fn vocab_id(tokens: &[String], types: &[i32], name: &str) -> Option<u32> {
    tokens
        .iter()
        .position(|t| t == name)
        .filter(|&i| types.get(i) == Some(&TOKEN_TYPE_CONTROL))
        .map(|i| i as u32)
}

fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> std::result::Result<&'a str, String> {
    md.get(key)
        .ok_or_else(|| format!("metadata key {key} is missing"))?
        .to_string()
        .map(|s| s.as_str())
        .map_err(|e| format!("{key}: {e}"))
}

fn get_strings(md: &HashMap<String, Value>, key: &str) -> std::result::Result<Vec<String>, String> {
    let values = md
        .get(key)
        .ok_or_else(|| format!("metadata key {key} is missing"))?
        .to_vec()
        .map_err(|e| format!("{key}: {e}"))?;
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| format!("{key}: {e}")))
        .collect()
}

/// Turns a growing list of token ids into text deltas without splitting a UTF-8 character
/// (a multi-byte character may span several byte-level tokens).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    /// Add one token; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &GgufTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len()
            && after.is_char_boundary(before.len())
            && !after.ends_with('\u{FFFD}')
        {
            let delta = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }
}
