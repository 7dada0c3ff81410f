//! `LlmEngine`: a loaded llama-family copy. Callers block on their own sequence while the
//! copy's step loop batches every sequence it holds.

use std::{
    ops::ControlFlow,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
};

use candle_core::quantized::gguf_file;

use super::{
    batch::{BatchConfig, SeqEvent, StepBackend, StepLoop, Submit},
    choices::Choices,
    cpu::Cpu,
    kv::KvPool,
    model::Model,
};
use crate::bytes::Bytes;
use crate::gguf::{bad_gguf, open_error};
use crate::{
    constrain::Grammars,
    device::{Device, DeviceKind, Lane},
    engine::{
        Engine, GenerateEvent, GenerateRequest, Generation, ModelInfo, ModelKind, Prompt,
        MAX_CHOICES, MAX_TOP_LOGPROBS,
    },
    template::ChatTemplate,
    tokenizer::GgufTokenizer,
    Result, RuntimeError,
};

/// What an engine needs to read and write text, built from the GGUF metadata: kept with a
/// warm image so that a page-in from it does not build the tokenizer again.
#[derive(Clone, Debug)]
pub struct TextParts {
    tokenizer: Arc<GgufTokenizer>,
    template: Option<Arc<ChatTemplate>>,
}

impl TextParts {
    fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<TextParts> {
        let tokenizer = GgufTokenizer::from_gguf(ct)?;
        let template = match ct.metadata.get("tokenizer.chat_template") {
            Some(v) => {
                let src = v
                    .to_string()
                    .map_err(|e| bad_gguf(path, crate::error::message(e)))?;
                let name =
                    |t: &Option<(u32, String)>| t.as_ref().map(|t| t.1.clone()).unwrap_or_default();
                Some(Arc::new(ChatTemplate::new(
                    src,
                    &name(&tokenizer.bos),
                    &name(&tokenizer.eos),
                )?))
            }
            None => None,
        };
        Ok(TextParts {
            tokenizer: Arc::new(tokenizer),
            template,
        })
    }
}

/// A loaded llama-family model: weights in place, a KV block pool, a step loop.
pub struct LlmEngine {
    model: Arc<Model>,
    text: TextParts,
    info: ModelInfo,
    size_bytes: u64,
    kv_bytes: u64,
    kernels: &'static str,
    submit: Mutex<mpsc::Sender<Submit>>,
    grammars: Grammars,
}

impl std::fmt::Debug for LlmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LlmEngine({}, {} bytes)",
            self.model.arch, self.size_bytes
        )
    }
}

impl LlmEngine {
    /// Map a GGUF file and load it onto `device`.
    pub fn load(path: &Path, device: &Device, config: BatchConfig) -> Result<Self> {
        let (file, _) = crate::file::open_regular(path).map_err(|e| open_error(path, e))?;
        let bytes = Bytes::map(&file).map_err(|e| open_error(path, e))?;
        Self::from_bytes(bytes, path, None, device, config)
    }

    /// Read a GGUF file into memory (the warm tier keeps those bytes) and load it from them.
    pub fn load_keeping_image(
        path: &Path,
        device: &Device,
        config: BatchConfig,
    ) -> Result<(Self, Arc<Vec<u8>>)> {
        let bytes =
            Arc::new(crate::file::read_regular(path, u64::MAX).map_err(|e| open_error(path, e))?);
        let engine = Self::from_bytes(Bytes::Shared(bytes.clone()), path, None, device, config)?;
        Ok((engine, bytes))
    }

    /// Load from GGUF bytes already in memory: the weights are used where they are.
    pub fn load_image(
        image: Arc<Vec<u8>>,
        text: Option<TextParts>,
        device: &Device,
        config: BatchConfig,
    ) -> Result<Self> {
        Self::from_bytes(
            Bytes::Shared(image),
            Path::new("<warm image>"),
            text,
            device,
            config,
        )
    }

    fn from_bytes(
        bytes: Bytes,
        path: &Path,
        text: Option<TextParts>,
        device: &Device,
        config: BatchConfig,
    ) -> Result<Self> {
        let lane = device.engine_lane()?;
        if config.block_tokens == 0 || config.step_tokens == 0 || config.kv_tokens == 0 {
            return Err(RuntimeError::InvalidRequest(format!(
                "batch settings must be positive: {config:?}"
            )));
        }
        let (model, text) = parts(bytes, path, text)?;
        let shape = &model.shape;
        match device.kind() {
            DeviceKind::Host => {
                let kv = KvPool::new(
                    config.kv_tokens,
                    config.block_tokens,
                    shape.layers,
                    shape.kv_dim(),
                )
                .with_prefix_cache(config.prefix_cache);
                let bytes = model.weight_bytes() + kv.bytes();
                let cpu = Cpu::new(kv, lane.threads()).packing(&model).map_err(|e| {
                    RuntimeError::Inference(format!("no memory for the packed weights: {e}"))
                })?;
                let kernels = super::kernels::Kernels::best().name();
                Self::launch(model, text, (cpu, bytes, kernels), lane, config)
            }
            DeviceKind::Cuda { ordinal } => {
                let gpu = crate::cuda::copy::backend(ordinal, device.name(), &model, &config)?;
                let bytes = gpu.held_bytes();
                Self::launch(model, text, (gpu, bytes, "cuda"), lane, config)
            }
        }
    }

    /// Start the copy's step loop over `backend`, which holds `bytes` on its device (the
    /// weights the copy uses, its KV pool, its buffers).
    pub(crate) fn launch<B: StepBackend>(
        model: Model,
        text: TextParts,
        (mut backend, size_bytes, kernels): (B, u64, &'static str),
        lane: Lane,
        config: BatchConfig,
    ) -> Result<Self> {
        let shape = &model.shape;
        let kv_bytes = backend.kv().bytes();
        let info = ModelInfo {
            kind: ModelKind::Llm,
            architecture: model.arch.clone(),
            // One sequence may use the whole pool, but never more than the model was trained for.
            context_length: shape.context.min(backend.kv().capacity()),
            embedding_dims: None,
        };
        let model = Arc::new(model);
        let (tx, rx) = mpsc::channel();
        let eog = text.tokenizer.end_of_generation.clone();
        let grammars = Grammars::new(text.tokenizer.clone(), model.shape.vocab);
        let step = StepLoop::new(model.clone(), backend, lane, config, eog);
        std::thread::Builder::new()
            .name("flatmesh-steps".into())
            .spawn(move || step.run(rx))
            .map_err(|e| RuntimeError::Inference(format!("the step loop did not start: {e}")))?;
        Ok(LlmEngine {
            model,
            text,
            info,
            size_bytes,
            kv_bytes,
            kernels,
            submit: Mutex::new(tx),
            grammars,
        })
    }

    /// The tokenizer and chat template, shared with whoever keeps them.
    pub fn text_parts(&self) -> TextParts {
        self.text.clone()
    }

    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.text.tokenizer
    }

    /// Bytes of the KV block pool (part of `size_bytes`).
    pub fn kv_bytes(&self) -> u64 {
        self.kv_bytes
    }

    /// The kernels this copy computes with (`Kernels::name`, or "cuda").
    pub fn kernels(&self) -> &'static str {
        self.kernels
    }

    /// The prompt's tokens, after the chat template where the prompt is a chat.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = match prompt {
            Prompt::Text(t) => std::borrow::Cow::Borrowed(t.as_str()),
            Prompt::Chat(messages) => {
                let template = self
                    .text
                    .template
                    .as_ref()
                    .ok_or(RuntimeError::InvalidRequest(
                        "this model has no chat template; use /v1/completions".into(),
                    ))?;
                std::borrow::Cow::Owned(template.render(messages)?)
            }
        };
        let ids = self.text.tokenizer.encode(&text)?;
        if ids.is_empty() {
            return Err(RuntimeError::InvalidRequest(
                "prompt: must not be empty".into(),
            ));
        }
        Ok(ids)
    }

    /// Hand a sequence (one choice, no scores) to the step loop; its tokens come back on the
    /// returned channel.
    pub fn start(
        &self,
        prompt: Vec<u32>,
        max_tokens: usize,
        sampling: crate::SamplingParams,
        cancel: Arc<AtomicBool>,
    ) -> Result<mpsc::Receiver<SeqEvent>> {
        let (events, rx) = mpsc::channel();
        let constraint = self.grammars.constraint(sampling.grammar.as_ref())?;
        self.submit(Submit {
            prompt,
            max_tokens,
            sampling,
            n: 1,
            logprobs: None,
            events,
            cancel,
            stopped: Arc::new([AtomicBool::new(false)]),
            constraint,
        })?;
        Ok(rx)
    }

    fn submit(&self, submit: Submit) -> Result<()> {
        self.submit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(submit)
            .map_err(|_| RuntimeError::Inference("the copy's step loop has stopped".into()))
    }
}

/// Cancels the sequence when the caller leaves, however it leaves.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Engine for LlmEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.text.tokenizer.encode(text)?.len())
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
        let n = req.n.clamp(1, MAX_CHOICES);
        let prompt_tokens = prompt.len();
        let mut choices = Choices::new(&self.text.tokenizer, n, &req.stop, req.logprobs.is_some());
        if max_tokens == 0 {
            return Ok(choices.finish(prompt_tokens, false));
        }
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let stopped: Arc<[AtomicBool]> = (0..n).map(|_| AtomicBool::new(false)).collect();
        let (events, rx) = mpsc::channel();
        self.submit(Submit {
            prompt,
            max_tokens,
            sampling: req.sampling.clone(),
            n,
            logprobs: req.logprobs.map(|k| k.min(MAX_TOP_LOGPROBS)),
            events,
            cancel: cancel.0.clone(),
            stopped: stopped.clone(),
            constraint: self.grammars.constraint(req.sampling.grammar.as_ref())?,
        })?;
        let mut run = Run {
            choices: &mut choices,
            stopped: &stopped,
            on_event,
            started: false,
            prompt_tokens,
            cached_tokens: 0,
        };
        let cancelled = run.follow(&rx)?;
        let cached_tokens = run.cached_tokens;
        drop(cancel);
        let mut g = choices.finish(prompt_tokens, cancelled);
        g.cached_tokens = cached_tokens;
        Ok(g)
    }
}

/// A generation's events from the step loop to the caller.
struct Run<'r, 'c> {
    choices: &'r mut Choices<'c>,
    stopped: &'r [AtomicBool],
    on_event: &'r mut dyn FnMut(GenerateEvent) -> ControlFlow<()>,
    started: bool,
    prompt_tokens: usize,
    cached_tokens: usize,
}

impl Run<'_, '_> {
    /// Follow the step loop until every choice is done; returns whether the caller left.
    fn follow(&mut self, rx: &mpsc::Receiver<SeqEvent>) -> Result<bool> {
        while self.choices.open() {
            let flow = match rx.recv() {
                Ok(SeqEvent::Token {
                    choice,
                    token,
                    scores,
                }) => self.token(choice, token, scores)?,
                Ok(SeqEvent::Done { choice, reason }) => match self.choices.done(choice, reason) {
                    Some(delta) => (self.on_event)(GenerateEvent::Text(delta)),
                    None => ControlFlow::Continue(()),
                },
                Ok(SeqEvent::Reused(tokens)) => {
                    self.cached_tokens = tokens;
                    ControlFlow::Continue(())
                }
                Ok(SeqEvent::Failed(reason)) => return Err(RuntimeError::Inference(reason)),
                Err(_) => {
                    return Err(RuntimeError::Inference(
                        "the copy's step loop has stopped".into(),
                    ))
                }
            };
            if flow.is_break() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn token(
        &mut self,
        choice: usize,
        token: u32,
        scores: Option<crate::sampling::TokenScores>,
    ) -> Result<ControlFlow<()>> {
        if !self.started {
            self.started = true;
            let prompt_tokens = self.prompt_tokens;
            if (self.on_event)(GenerateEvent::Started { prompt_tokens }).is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        let stepped = self.choices.token(choice, token, scores)?;
        if stepped.stopped {
            // Only this choice ends: the others go on.
            self.stopped[choice].store(true, Ordering::Relaxed);
        }
        Ok(match stepped.delta {
            Some(delta) => (self.on_event)(GenerateEvent::Text(delta)),
            None => ControlFlow::Continue(()),
        })
    }
}

/// The model and its text parts from GGUF bytes, each checked against the other: a
/// tokenizer that could name a token the model has no row for is refused.
fn parts(bytes: Bytes, path: &Path, text: Option<TextParts>) -> Result<(Model, TextParts)> {
    let (model, ct) = Model::parse(bytes, path)?;
    let text = match text {
        Some(t) => t,
        None => TextParts::from_gguf(&ct, path)?,
    };
    let tokens = text.tokenizer.tokenizer.get_vocab_size(true);
    if tokens > model.shape.vocab {
        return Err(bad_gguf(
            path,
            format!(
                "the tokenizer has {tokens} tokens but the embedding table only {} rows",
                model.shape.vocab
            ),
        ));
    }
    Ok((model, text))
}

/// Read GGUF bytes as a load does — header, shape, every tensor, the tokenizer and the chat
/// template — without starting a copy: what the fuzz target drives.
pub fn check(bytes: Vec<u8>) -> Result<()> {
    parts(Bytes::Shared(Arc::new(bytes)), Path::new("<bytes>"), None).map(drop)
}

/// What a GGUF model will need in memory, read from its header only: its weights as stored
/// (they are used in place) and the KV bytes per token of its shape.
pub fn footprint(path: &Path) -> Result<crate::Footprint> {
    let ct = crate::gguf::read_header(path)?;
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad_gguf(path, "metadata key general.architecture is missing".into()))?;
    let shape = super::model::shape(&ct, &arch, path)?;
    let weights = ct
        .tensor_infos
        .values()
        .map(crate::gguf::tensor_bytes)
        .sum();
    Ok(crate::Footprint {
        weights,
        kv_bytes_per_token: shape.kv_bytes_per_token(),
        context: shape.context,
    })
}
