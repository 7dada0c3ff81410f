//! Tests of constrained decoding over a small vocabulary of bytes and multi-byte tokens.

use super::*;

/// Every byte, some multi-byte tokens as a BPE vocabulary has them, a control token that no
/// grammar may allow, and an end-of-generation token (the last).
fn words() -> Vec<Vec<u8>> {
    let mut w: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for t in [
        "{\"", "\": ", ", \"", "\"}", "true", "false", "name", "age", " {", "}\n", "12", "\"",
    ] {
        w.push(t.as_bytes().to_vec());
    }
    w.push(b"\xFF<|im_start|>".to_vec());
    w.push(b"\xFF<|im_end|>".to_vec());
    w
}

fn constraint(grammar: &Grammar) -> Constraint {
    let w = words();
    let info = TokRxInfo::new(w.len() as u32, w.len() as u32 - 1);
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &w)));
    let factory = new_factory(&env).unwrap();
    Constraint {
        matcher: compile(&factory, grammar).unwrap(),
    }
}

fn allowed(c: &mut Constraint) -> Vec<usize> {
    let mut logits = vec![0.0f32; words().len()];
    c.mask(&mut logits).unwrap();
    (0..logits.len()).filter(|&i| logits[i] == 0.0).collect()
}

/// A small deterministic generator (no dependency for a test).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// Sample among the allowed tokens until the grammar is complete; the text.
fn random_output(grammar: &Grammar, seed: u64) -> String {
    let w = words();
    let eos = w.len() - 1;
    let mut c = constraint(grammar);
    let mut rng = Lcg(seed);
    let mut out = Vec::new();
    for _ in 0..400 {
        let ok = allowed(&mut c);
        assert!(
            !ok.is_empty(),
            "no token allowed after {:?}",
            String::from_utf8_lossy(&out)
        );
        // Half the time close what is open when that is allowed: a free walk through JSON
        // rarely ends.
        let closers: Vec<usize> = ok
            .iter()
            .copied()
            .filter(|&t| t == eos || [&b"}"[..], b"]", b"\"", b"\"}"].contains(&&w[t][..]))
            .collect();
        let t = if !closers.is_empty() && rng.below(2) == 0 {
            closers[rng.below(closers.len())]
        } else {
            ok[rng.below(ok.len())]
        };
        if t == eos {
            return String::from_utf8(out).unwrap();
        }
        out.extend_from_slice(&w[t]);
        if c.commit(t as u32).unwrap() {
            return String::from_utf8(out).unwrap();
        }
    }
    panic!(
        "no complete output in 400 tokens: {}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn the_mask_allows_only_tokens_that_can_start_an_object() {
    let w = words();
    let mut c = constraint(&Grammar::JsonObject);
    let ok = allowed(&mut c);
    assert!(!ok.is_empty());
    for t in &ok {
        assert_eq!(
            w[*t][0],
            b'{',
            "token {:?} allowed first",
            String::from_utf8_lossy(&w[*t])
        );
    }
    // The control tokens and the end of generation are not allowed before the object ends.
    assert!(!ok.contains(&(w.len() - 2)) && !ok.contains(&(w.len() - 1)));
}

#[test]
fn json_mode_outputs_always_parse_as_objects() {
    for seed in 0..20 {
        let text = random_output(&Grammar::JsonObject, seed);
        assert!(text.starts_with('{') && text.ends_with('}'), "{text}");
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => assert!(v.is_object(), "{text}"),
            // Valid JSON whose exponent overflows an f64 (`1e833641`): serde refuses it.
            Err(e) => assert!(
                e.to_string().contains("number out of range"),
                "{text:?}: {e}"
            ),
        }
    }
}

#[test]
fn schema_violations_are_impossible() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": false,
    });
    for seed in 0..20 {
        let text = random_output(&Grammar::JsonSchema(schema.clone()), seed);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let o = v.as_object().unwrap();
        assert!(
            o.keys()
                .all(|k| ["name", "age", "ok", "tags"].contains(&k.as_str())),
            "{text}"
        );
        assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{text}");
        assert!((0..=150).contains(&o["age"].as_i64().unwrap()), "{text}");
        assert!(o["ok"].is_boolean(), "{text}");
        if let Some(tags) = o.get("tags") {
            let tags = tags.as_array().unwrap();
            assert!(
                tags.len() <= 3 && tags.iter().all(|t| t == "a" || t == "b"),
                "{text}"
            );
        }
    }
}

#[test]
fn a_closed_object_completes_the_output() {
    let schema = json!({"type": "object", "properties": {"a": {"const": true}}, "required": ["a"], "additionalProperties": false});
    let mut c = constraint(&Grammar::JsonSchema(schema));
    let w = words();
    let id = |s: &str| w.iter().position(|t| t == s.as_bytes()).unwrap() as u32;
    for t in ["{\"", "a", "\": ", "true"] {
        assert!(!c.commit(id(t)).unwrap(), "complete after {t}");
    }
    assert!(
        c.commit(id("}")).unwrap(),
        "not complete after the closing brace"
    );
}

#[test]
fn schemas_the_engine_cannot_handle_are_refused_with_a_reason() {
    assert!(check(&Grammar::JsonObject).is_ok());
    assert!(check(&Grammar::JsonSchema(
        json!({"type": "object", "properties": {"x": {"type": "number"}}})
    ))
    .is_ok());
    let refs = json!({"$defs": {"p": {"type": "object", "properties": {"n": {"type": "string"}}}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/p"}]}}});
    assert!(check(&Grammar::JsonSchema(refs)).is_ok());
    let e = check(&Grammar::JsonSchema(json!({"type": "objekt"}))).unwrap_err();
    assert!(e.contains("objekt"), "{e}");
    let e = check(&Grammar::JsonSchema(json!(["not", "a", "schema"]))).unwrap_err();
    assert!(e.contains("must be a JSON object"), "{e}");
    let e = check(&Grammar::JsonSchema(
        json!({"type": "string", "minLength": 5, "maxLength": 2}),
    ))
    .unwrap_err();
    assert!(!e.is_empty());
}

#[test]
fn byte_level_characters_map_back_to_bytes() {
    let m = byte_level_chars();
    assert_eq!(m.len(), 256);
    assert_eq!(m[&'Ġ'], b' ');
    assert_eq!(m[&'Ċ'], b'\n');
    assert_eq!(m[&'a'], b'a');
}

#[test]
fn a_grammar_travels_with_the_sampling_settings() {
    // A forwarded request carries its sampling settings as JSON to the peer.
    let schema = json!({"type": "object", "properties": {"b": {}, "a": {}}});
    let p = crate::SamplingParams {
        grammar: Some(Grammar::JsonSchema(schema)),
        ..Default::default()
    };
    let wire = serde_json::to_string(&p).unwrap();
    assert!(wire.contains(r#""grammar":{"type":"json_schema","schema":{"type":"object","properties":{"b":{},"a":{}}}}"#), "{wire}");
    assert_eq!(
        serde_json::from_str::<crate::SamplingParams>(&wire).unwrap(),
        p
    );
    let free = serde_json::to_string(&crate::SamplingParams::default()).unwrap();
    assert!(!free.contains("grammar"));
    let old: crate::SamplingParams = serde_json::from_str(&free).unwrap();
    assert_eq!(old.grammar, None);
}

#[test]
fn texts_are_checked_against_a_grammar() {
    let schema = Grammar::JsonSchema(
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    );
    assert!(accepts(&schema, r#"{"a": 12}"#, true));
    assert!(accepts(&schema, r#"{"a": 1"#, false));
    assert!(!accepts(&schema, r#"{"a": 1"#, true));
    assert!(!accepts(&schema, r#"{"a": "x"}"#, true));
    assert!(!accepts(&schema, "Sure! Here is the JSON", false));
    assert!(accepts(
        &Grammar::JsonObject,
        r#"{"b": [true, null]}"#,
        true
    ));
}
