//! Unit tests of the serve path's pure parts: which work a model kind does, and cached answers.

use flatmesh_runtime::{FinishReason, GenerateRequest, ModelKind, Prompt};

use super::{cached_generation, check_kind, resolve_work, Endpoint, ErrorKind, Work};
use crate::policy::Answer;

fn gen() -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Text("hi".into()),
        max_tokens: Some(4),
        sampling: Default::default(),
        stop: Vec::new(),
        n: 1,
        logprobs: None,
    }
}

fn infer(n: usize) -> Work {
    Work::Infer {
        texts: vec!["x".into(); n],
        generate: gen(),
    }
}

#[test]
fn a_model_only_does_the_work_of_its_kind() {
    let embed = Work::Embed {
        inputs: vec!["x".into()],
        dimensions: None,
    };
    assert!(check_kind(&Work::Generate(gen()), ModelKind::Llm, "m").is_ok());
    assert!(check_kind(&embed, ModelKind::Embedding, "m").is_ok());
    let e = check_kind(&Work::Generate(gen()), ModelKind::Embedding, "m").unwrap_err();
    assert_eq!(
        (e.kind, e.param.as_deref()),
        (ErrorKind::InvalidRequest, Some("model"))
    );
    assert!(check_kind(&embed, ModelKind::Llm, "m").is_err());
}

#[test]
fn v2_infer_embeds_on_an_embedding_model_and_generates_one_text_on_an_llm() {
    assert!(matches!(
        resolve_work(infer(3), ModelKind::Embedding, "m").unwrap(),
        Work::Embed { inputs, dimensions: None } if inputs.len() == 3
    ));
    assert!(matches!(
        resolve_work(infer(1), ModelKind::Llm, "m").unwrap(),
        Work::Generate(_)
    ));
    let e = resolve_work(infer(2), ModelKind::Llm, "m").unwrap_err();
    assert!(e.message.contains("one element"), "{}", e.message);
}

#[test]
fn cached_answers_count_plausible_tokens() {
    let answer = |text: &str, n: u32, finish: &str| Answer {
        text: text.into(),
        finish_reason: finish.into(),
        completion_tokens: n,
    };
    let g = cached_generation(answer("hello", 1000, "length"), 7);
    assert_eq!((g.completion_tokens, g.prompt_tokens), (5, 7));
    assert_eq!(g.finish_reason, FinishReason::Length);
    let g = cached_generation(answer("hello", 0, "stop"), 1);
    assert_eq!(
        (g.completion_tokens, g.finish_reason),
        (1, FinishReason::Stop)
    );
}

#[test]
fn request_ids_name_their_endpoint() {
    assert_eq!(Endpoint::ChatCompletions.id_prefix(), "chatcmpl");
    assert_eq!(Endpoint::Embeddings.id_prefix(), "emb");
    assert_eq!(Endpoint::V2Infer.id_prefix(), "v2");
}

#[test]
fn endpoint_labels_are_the_metric_labels_and_read_back() {
    let labels: Vec<&str> = Endpoint::ALL.iter().map(|e| e.label()).collect();
    assert_eq!(
        labels,
        [
            "chat_completions",
            "completions",
            "embeddings",
            "v2_infer",
            "v2_generate",
            "v2_generate_stream",
            "v2_stream"
        ]
    );
    for e in Endpoint::ALL {
        assert_eq!(Endpoint::from_label(e.label()), Some(e));
    }
    assert_eq!(Endpoint::from_label("chat"), None);
}
