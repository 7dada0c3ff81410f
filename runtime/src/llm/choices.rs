//! The choices of one generation as its caller sees them: each choice's tokens turned into
//! text (stop strings cut off), with the log-probabilities of the tokens when asked for.

use crate::{
    engine::{Choice, FinishReason, Generation, TextDelta, TokenLogprob, TokenText},
    sampling::TokenScores,
    stop::{Step, StopMatcher},
    tokenizer::{GgufTokenizer, StreamDecoder},
    Result,
};

/// One choice's text so far.
#[derive(Debug)]
struct ChoiceText {
    decoder: StreamDecoder,
    stops: StopMatcher,
    /// Scores of tokens whose text has not gone out yet.
    pending: Vec<TokenLogprob>,
    logprobs: Vec<TokenLogprob>,
    completion_tokens: usize,
    finish: Option<FinishReason>,
}

/// What one token of a choice came to.
#[derive(Debug, Default)]
pub struct Stepped {
    /// Text (and scores) to hand on.
    pub delta: Option<TextDelta>,
    /// The choice met a stop string: it is done.
    pub stopped: bool,
}

/// Every choice of one generation.
#[derive(Debug)]
pub struct Choices<'a> {
    tokenizer: &'a GgufTokenizer,
    each: Vec<ChoiceText>,
    logprobs: bool,
}

impl<'a> Choices<'a> {
    pub fn new(tokenizer: &'a GgufTokenizer, n: usize, stop: &[String], logprobs: bool) -> Self {
        let each = (0..n.max(1))
            .map(|_| ChoiceText {
                decoder: StreamDecoder::default(),
                stops: StopMatcher::new(stop),
                pending: Vec::new(),
                logprobs: Vec::new(),
                completion_tokens: 0,
                finish: None,
            })
            .collect();
        Choices {
            tokenizer,
            each,
            logprobs,
        }
    }

    /// Whether some choice is still generating.
    pub fn open(&self) -> bool {
        self.each.iter().any(|c| c.finish.is_none())
    }

    fn text(&self, id: u32, logprob: f32) -> TokenText {
        let bytes = self.tokenizer.token_bytes(id);
        TokenText {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
        }
    }

    /// A token of `choice`. Tokens of a choice already done (the step loop had computed them
    /// before it saw the stop) are dropped.
    pub fn token(
        &mut self,
        choice: usize,
        token: u32,
        scores: Option<TokenScores>,
    ) -> Result<Stepped> {
        let end_of_generation = self.tokenizer.end_of_generation.contains(&token);
        let scored = match scores {
            Some(s) if self.logprobs && !end_of_generation => Some(TokenLogprob {
                chosen: self.text(token, s.logprob),
                top: s.top.iter().map(|&(id, lp)| self.text(id, lp)).collect(),
            }),
            _ => None,
        };
        let Some(c) = self.each.get_mut(choice).filter(|c| c.finish.is_none()) else {
            return Ok(Stepped::default());
        };
        c.completion_tokens += 1;
        c.pending.extend(scored);
        if end_of_generation {
            return Ok(Stepped::default());
        }
        let Some(piece) = c.decoder.push(self.tokenizer, token)? else {
            return Ok(Stepped::default());
        };
        let (text, stopped) = match c.stops.push(&piece) {
            Step::Emit(t) => (t, false),
            Step::Stop(t) => (t, true),
        };
        if stopped {
            c.finish = Some(FinishReason::Stop);
        }
        Ok(Stepped {
            delta: (!text.is_empty() || stopped).then(|| Self::delta(choice, c, text)),
            stopped,
        })
    }

    fn delta(choice: usize, c: &mut ChoiceText, text: String) -> TextDelta {
        let logprobs = std::mem::take(&mut c.pending);
        c.logprobs.extend(logprobs.iter().cloned());
        TextDelta {
            choice,
            text,
            logprobs,
        }
    }

    /// The step loop ended `choice`: what it held back goes out.
    pub fn done(&mut self, choice: usize, reason: FinishReason) -> Option<TextDelta> {
        let c = self.each.get_mut(choice).filter(|c| c.finish.is_none())?;
        c.finish = Some(reason);
        let rest = c.stops.flush();
        (!rest.is_empty() || !c.pending.is_empty()).then(|| Self::delta(choice, c, rest))
    }

    /// The generation: choice 0 at the top, the others after it; `completion_tokens` counts
    /// every choice's tokens. A cancelled generation is cancelled in every choice.
    pub fn finish(self, prompt_tokens: usize, cancelled: bool) -> Generation {
        let logprobs = self.logprobs;
        let mut choices = self.each.into_iter().map(|mut c| {
            // Scores of tokens whose text never went out (cut by a stop string) stay with it.
            c.logprobs.append(&mut c.pending);
            Choice {
                text: c.stops.into_text(),
                finish_reason: match cancelled {
                    true => FinishReason::Cancelled,
                    false => c.finish.unwrap_or(FinishReason::Length),
                },
                completion_tokens: c.completion_tokens,
                logprobs: logprobs.then_some(c.logprobs),
            }
        });
        let first = choices.next().expect("at least one choice");
        let others: Vec<Choice> = choices.collect();
        let completion_tokens =
            first.completion_tokens + others.iter().map(|c| c.completion_tokens).sum::<usize>();
        let mut g = Generation::new(
            first.text,
            prompt_tokens,
            completion_tokens,
            first.finish_reason,
        );
        g.logprobs = first.logprobs;
        g.others = others;
        g
    }
}
