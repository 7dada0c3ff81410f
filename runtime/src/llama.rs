//! LLM engine for llama-family GGUF models, on candle's quantized kernels.

use std::{
    io::{Cursor, Read, Seek},
    ops::ControlFlow,
    path::Path,
    sync::Arc,
};

use candle_core::{
    quantized::{ggml_file, gguf_file, GgmlDType, QTensor},
    Device, Tensor,
};
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};

use crate::gguf::{bad_gguf, header_error, open_error, read_header};
use crate::{
    device::{Device as MeshDevice, Lane},
    engine::{
        Engine, FinishReason, GenerateEvent, GenerateRequest, Generation, ModelInfo, ModelKind,
        Prompt,
    },
    sampling::Sampler,
    stop::{Step, StopMatcher},
    template::ChatTemplate,
    tokenizer::{GgufTokenizer, StreamDecoder},
    Footprint, Result, RuntimeError,
};

/// Prompts are prefilled in chunks of this many tokens, which bounds the attention scratch.
const PREFILL_CHUNK: usize = 512;

/// Quantizations whose CPU matmul has no SIMD kernel in candle; their weights are converted
/// to Q8_0 at load (a near-lossless widening: each 4/5-bit value fits 8 bits with the block's
/// own scale), which roughly doubles their size and speeds decode and prefill several times.
const WIDEN_TO_Q8_0: &[GgmlDType] = &[GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

/// A loaded llama-family model. Each generation works on its own clone of the weights'
/// handles (the weights themselves are shared) with its own KV cache.
pub struct LlamaEngine {
    model: ModelWeights,
    tokenizer: Arc<GgufTokenizer>,
    template: Option<Arc<ChatTemplate>>,
    info: ModelInfo,
    size_bytes: u64,
    device: Device,
    /// The execution lane of the device it was loaded onto: each forward pass takes its turn.
    lane: Lane,
}

/// What an engine needs to read and write text, built from the GGUF metadata: kept with a
/// warm image so that a page-in from it does not build the tokenizer again.
#[derive(Clone, Debug)]
pub struct TextParts {
    tokenizer: Arc<GgufTokenizer>,
    template: Option<Arc<ChatTemplate>>,
}

impl LlamaEngine {
    /// Load a GGUF file onto `device`.
    pub fn load(path: &Path, device: &MeshDevice) -> Result<Self> {
        let lane = device.engine_lane()?;
        let (ct, reader) = read_header(path)?;
        Ok(Self::build(path, ct, reader, false, None, lane)?.0)
    }

    /// The tokenizer and chat template, shared with whoever keeps them.
    pub fn text_parts(&self) -> TextParts {
        TextParts {
            tokenizer: self.tokenizer.clone(),
            template: self.template.clone(),
        }
    }

    /// Load a GGUF file and also return its prepared weights (widened where needed) as GGUF
    /// bytes: a later load from them skips the disk and the widening.
    pub fn load_keeping_image(path: &Path, device: &MeshDevice) -> Result<(Self, Vec<u8>)> {
        let lane = device.engine_lane()?;
        let bytes = crate::file::read_regular(path, u64::MAX).map_err(|e| open_error(path, e))?;
        let mut reader = Cursor::new(bytes);
        let ct = gguf_file::Content::read(&mut reader).map_err(|e| header_error(path, e))?;
        let (engine, widened) = Self::build(path, ct, &mut reader, true, None, lane)?;
        Ok((engine, widened.unwrap_or_else(|| reader.into_inner())))
    }

    /// Load from prepared GGUF bytes in memory (see `load_keeping_image`), reusing the text
    /// parts of an earlier load of the same bytes when given.
    pub fn load_image(image: &[u8], text: Option<TextParts>, device: &MeshDevice) -> Result<Self> {
        let lane = device.engine_lane()?;
        let path = Path::new("<warm image>");
        let mut reader = Cursor::new(image);
        let ct = gguf_file::Content::read(&mut reader).map_err(|e| header_error(path, e))?;
        Ok(Self::build(path, ct, reader, false, text, lane)?.0)
    }

    /// The engine from a parsed header and a reader of the tensor data; with `keep`, also the
    /// widened GGUF bytes when widening happened.
    fn build<R: Read + Seek>(
        path: &Path,
        ct: gguf_file::Content,
        mut reader: R,
        keep: bool,
        text: Option<TextParts>,
        lane: Lane,
    ) -> Result<(Self, Option<Vec<u8>>)> {
        let bad = |reason: String| bad_gguf(path, reason);
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| bad("metadata key general.architecture is missing".into()))?;
        if arch != "llama" {
            return Err(RuntimeError::UnsupportedArchitecture(arch));
        }
        let context = ct
            .metadata
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .map_or(MAX_SEQ_LEN, |n| (n as usize).min(MAX_SEQ_LEN));
        let TextParts {
            tokenizer,
            template,
        } = match text {
            Some(parts) => parts,
            None => {
                let tokenizer = GgufTokenizer::from_gguf(&ct)?;
                let template = match ct.metadata.get("tokenizer.chat_template") {
                    Some(v) => {
                        let src = v.to_string().map_err(|e| bad(e.to_string()))?;
                        let name = |t: &Option<(u32, String)>| {
                            t.as_ref().map(|t| t.1.clone()).unwrap_or_default()
                        };
                        Some(ChatTemplate::new(
                            src,
                            &name(&tokenizer.bos),
                            &name(&tokenizer.eos),
                        )?)
                    }
                    None => None,
                };
                TextParts {
                    tokenizer: Arc::new(tokenizer),
                    template: template.map(Arc::new),
                }
            }
        };
        let device = Device::Cpu;
        let (model, size_bytes, widened) = match widen_slow_quantizations(&ct, &mut reader, &device)
            .map_err(|e| bad(e.to_string()))?
        {
            Some((ct, mut buf)) => {
                let size = measured_size(&ct);
                let model = ModelWeights::from_gguf(ct, &mut buf, &device)
                    .map_err(|e| bad(e.to_string()))?;
                (model, size, keep.then(|| buf.into_inner()))
            }
            None => {
                let size = measured_size(&ct);
                let model = ModelWeights::from_gguf(ct, &mut reader, &device)
                    .map_err(|e| bad(e.to_string()))?;
                (model, size, None)
            }
        };
        let engine = LlamaEngine {
            model,
            tokenizer,
            template,
            info: ModelInfo {
                kind: ModelKind::Llm,
                architecture: arch,
                context_length: context,
                embedding_dims: None,
            },
            size_bytes,
            device,
            lane,
        };
        Ok((engine, widened))
    }

    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    /// The prompt's tokens, after the chat template where the prompt is a chat.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = match prompt {
            Prompt::Text(t) => std::borrow::Cow::Borrowed(t.as_str()),
            Prompt::Chat(messages) => {
                let template = self.template.as_ref().ok_or(RuntimeError::InvalidRequest(
                    "this model has no chat template; use /v1/completions".into(),
                ))?;
                std::borrow::Cow::Owned(template.render(messages)?)
            }
        };
        let ids = self.tokenizer.encode(&text)?;
        if ids.is_empty() {
            return Err(RuntimeError::InvalidRequest(
                "prompt: must not be empty".into(),
            ));
        }
        Ok(ids)
    }

    fn logits(&self, model: &mut ModelWeights, ids: &[u32], pos: usize) -> Result<Vec<f32>> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let logits = {
            let _turn = self.lane.turn();
            model.forward(&input, pos)?
        };
        Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
    }
}

impl Engine for LlamaEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.tokenizer.encode(text)?.len())
    }

    fn generate(
        &self,
        req: &GenerateRequest,
        on_event: &mut dyn FnMut(GenerateEvent) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let prompt = self.prompt_tokens(&req.prompt)?;
        let context = self.info.context_length;
        let room = context.saturating_sub(prompt.len());
        let max_tokens = req.max_tokens.unwrap_or(room);
        if room == 0 || max_tokens > room {
            return Err(RuntimeError::ContextOverflow {
                prompt_tokens: prompt.len(),
                max_tokens: req.max_tokens.unwrap_or(0),
                context,
            });
        }

        let mut model = self.model.clone();
        let mut logits = Vec::new();
        for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
            logits = self.logits(&mut model, chunk, i * PREFILL_CHUNK)?;
        }
        let mut result = Generation {
            text: String::new(),
            prompt_tokens: prompt.len(),
            completion_tokens: 0,
            finish_reason: FinishReason::Length,
        };
        if on_event(GenerateEvent::Started {
            prompt_tokens: prompt.len(),
        })
        .is_break()
        {
            result.finish_reason = FinishReason::Cancelled;
            return Ok(result);
        }

        let mut sampler = Sampler::new(req.sampling.clone());
        let mut decoder = StreamDecoder::default();
        let mut stops = StopMatcher::new(&req.stop);
        let mut pos = prompt.len();
        while result.completion_tokens < max_tokens {
            let token = sampler.sample(&mut logits);
            result.completion_tokens += 1;
            if self.tokenizer.end_of_generation.contains(&token) {
                result.finish_reason = FinishReason::Stop;
                break;
            }
            if let Some(delta) = decoder.push(&self.tokenizer, token)? {
                let (text, stopped) = match stops.push(&delta) {
                    Step::Emit(t) => (t, false),
                    Step::Stop(t) => (t, true),
                };
                if !text.is_empty() && on_event(GenerateEvent::Text(text)).is_break() {
                    result.finish_reason = FinishReason::Cancelled;
                    break;
                }
                if stopped {
                    result.finish_reason = FinishReason::Stop;
                    break;
                }
            }
            if result.completion_tokens == max_tokens {
                break;
            }
            logits = self.logits(&mut model, &[token], pos)?;
            pos += 1;
        }
        if result.finish_reason != FinishReason::Cancelled {
            let rest = stops.flush();
            if !rest.is_empty() {
                let _ = on_event(GenerateEvent::Text(rest));
            }
        }
        result.text = stops.into_text();
        Ok(result)
    }
}

/// Rewrite the tensors listed in `WIDEN_TO_Q8_0` as Q8_0, returning GGUF content and bytes (in
/// memory) that read like the original file; `None` when no tensor needs it.
fn widen_slow_quantizations<R: Read + Seek>(
    ct: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
) -> candle_core::Result<Option<(gguf_file::Content, Cursor<Vec<u8>>)>> {
    if !ct
        .tensor_infos
        .values()
        .any(|t| WIDEN_TO_Q8_0.contains(&t.ggml_dtype))
    {
        return Ok(None);
    }
    let mut tensors = Vec::with_capacity(ct.tensor_infos.len());
    for (name, info) in &ct.tensor_infos {
        let t = if info.ggml_dtype == GgmlDType::Q4_1 {
            let n = info.shape.elem_count() / 32 * crate::widen::Q4_1_BLOCK;
            let mut raw = vec![0u8; n];
            reader.seek(std::io::SeekFrom::Start(
                ct.tensor_data_offset + info.offset,
            ))?;
            reader.read_exact(&mut raw)?;
            let q8 = crate::widen::q4_1_to_q8_0(&raw);
            ggml_file::qtensor_from_ggml(GgmlDType::Q8_0, &q8, info.shape.dims().to_vec(), device)?
        } else if WIDEN_TO_Q8_0.contains(&info.ggml_dtype) {
            let t = ct.tensor(reader, name, device)?;
            QTensor::quantize(&t.dequantize(device)?, GgmlDType::Q8_0)?
        } else {
            ct.tensor(reader, name, device)?
        };
        tensors.push((name.as_str(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &metadata, &tensor_refs)?;
    buf.set_position(0);
    let widened = gguf_file::Content::read(&mut buf)?;
    Ok(Some((widened, buf)))
}

/// Bytes the loaded weights occupy: quantized tensors in their in-memory type (after
/// widening), plus the token embedding table, which is dequantized to f32 for lookups (and
/// kept quantized for a tied output).
fn measured_size(ct: &gguf_file::Content) -> u64 {
    ct.tensor_infos
        .iter()
        .map(|(name, t)| {
            let dtype = if WIDEN_TO_Q8_0.contains(&t.ggml_dtype) {
                GgmlDType::Q8_0
            } else {
                t.ggml_dtype
            };
            let elems = t.shape.elem_count();
            let stored = elems / dtype.block_size() * dtype.type_size();
            let dequantized = if name == "token_embd.weight" {
                elems * 4
            } else {
                0
            };
            (stored + dequantized) as u64
        })
        .sum()
}

/// What a GGUF model will need in memory, read from its header only.
pub(crate) fn footprint(path: &Path) -> Result<Footprint> {
    let (ct, _) = read_header(path)?;
    let get = |key: &str| {
        ct.metadata
            .get(key)
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as u64)
    };
    let (layers, embd, heads) = (
        get("llama.block_count"),
        get("llama.embedding_length"),
        get("llama.attention.head_count"),
    );
    let kv_bytes_per_token = match (layers, embd, heads) {
        (Some(l), Some(e), Some(h)) if h > 0 => {
            let kv_heads = get("llama.attention.head_count_kv").unwrap_or(h);
            2 * l * kv_heads * (e / h) * 4
        }
        _ => 0,
    };
    let context =
        get("llama.context_length").map_or(MAX_SEQ_LEN, |n| (n as usize).min(MAX_SEQ_LEN));
    Ok(Footprint {
        weights: measured_size(&ct),
        kv_bytes_per_token,
        context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;

    fn demo_path() -> std::path::PathBuf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/smollm2-135m-instruct/model.gguf");
        assert!(
            path.exists(),
            "{} is missing: run deploy/fetch-models",
            path.display()
        );
        path
    }

    fn host() -> MeshDevice {
        MeshDevice::host("host0", u64::MAX)
    }

    /// The demo model, where `deploy/fetch-models` put it.
    fn demo() -> LlamaEngine {
        LlamaEngine::load(&demo_path(), &host()).unwrap()
    }

    fn greedy(e: &LlamaEngine, prompt: &str, n: usize) -> Generation {
        let req = GenerateRequest {
            prompt: Prompt::Text(prompt.into()),
            max_tokens: Some(n),
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            stop: vec![],
        };
        e.generate(&req, &mut |_| ControlFlow::Continue(()))
            .unwrap()
    }

    #[test]
    fn an_image_loads_the_same_model_again() {
        let (from_file, image) = LlamaEngine::load_keeping_image(&demo_path(), &host()).unwrap();
        // The demo file is Q4_1: the image holds the widened (Q8_0) weights.
        let file_len = std::fs::metadata(demo_path()).unwrap().len() as usize;
        assert!(image.len() > file_len, "{} vs {file_len}", image.len());
        let from_image = LlamaEngine::load_image(&image, None, &host()).unwrap();
        let with_text =
            LlamaEngine::load_image(&image, Some(from_file.text_parts()), &host()).unwrap();
        assert_eq!(from_image.size_bytes, from_file.size_bytes);
        let prompt = "The capital of France is";
        let expected = greedy(&from_file, prompt, 6).text;
        assert_eq!(greedy(&from_image, prompt, 6).text, expected);
        assert_eq!(greedy(&with_text, prompt, 6).text, expected);
        assert!(matches!(
            LlamaEngine::load_image(&image[..1000], None, &host()),
            Err(RuntimeError::BadFormat { .. })
        ));
    }

    #[test]
    fn tokenizer_matches_llama_cpp_ids() {
        let e = demo();
        let ids = e
            .prompt_tokens(&Prompt::Text("The capital of France is".into()))
            .unwrap();
        assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
        // Digits are split one by one, control tokens are parsed, no BOS is added.
        let ids = e.tokenizer().encode("<|im_start|>2024").unwrap();
        assert_eq!(ids[0], 1);
        assert_eq!(ids.len(), 5);
        assert_eq!(e.tokenizer().decode(&ids).unwrap(), "2024");
    }

    #[test]
    fn greedy_completion_is_deterministic_and_knows_paris() {
        let e = demo();
        let req = GenerateRequest {
            prompt: Prompt::Text("The capital of France is".into()),
            max_tokens: Some(8),
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            stop: vec![],
        };
        let mut streamed = String::new();
        let a = e
            .generate(&req, &mut |ev| {
                if let GenerateEvent::Text(t) = ev {
                    streamed.push_str(&t);
                }
                ControlFlow::Continue(())
            })
            .unwrap();
        assert!(a.text.starts_with(" Paris"), "{:?}", a.text);
        assert_eq!(a.text, streamed);
        assert_eq!(a.completion_tokens, 8);
        assert_eq!(a.finish_reason, FinishReason::Length);
        let b = e
            .generate(&req, &mut |_| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(a.text, b.text);
    }

    #[test]
    fn prompt_over_context_is_a_clear_error() {
        let e = demo();
        let req = GenerateRequest {
            prompt: Prompt::Text("hello ".repeat(5000)),
            max_tokens: Some(1),
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let err = e
            .generate(&req, &mut |_| ControlFlow::Continue(()))
            .unwrap_err();
        assert_eq!(err.kind(), "context_length_exceeded");
        assert!(
            err.to_string().contains("maximum context length is 4096"),
            "{err}"
        );
    }

    #[test]
    fn cancelling_stops_generation() {
        let e = demo();
        let req = GenerateRequest {
            prompt: Prompt::Text("Once upon a time".into()),
            max_tokens: Some(50),
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            stop: vec![],
        };
        let mut seen = 0;
        let g = e
            .generate(&req, &mut |ev| {
                if matches!(ev, GenerateEvent::Text(_)) {
                    seen += 1;
                }
                if seen == 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        assert_eq!(g.finish_reason, FinishReason::Cancelled);
        assert!(g.completion_tokens < 50);
    }

    #[test]
    fn missing_and_corrupt_files_are_clear_errors() {
        let err = LlamaEngine::load(Path::new("/nonexistent/model.gguf"), &host())
            .err()
            .unwrap();
        assert_eq!(err.kind(), "model_file_not_found");
        let dir = std::env::temp_dir().join(format!("flatmesh-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.gguf");
        std::fs::write(&bad, b"definitely not a gguf file").unwrap();
        let err = LlamaEngine::load(&bad, &host()).err().unwrap();
        assert_eq!(err.kind(), "bad_model_format");
        assert!(err.to_string().contains("bad.gguf"), "{err}");
    }
}
