//! Text in, text out on the front: generation for decoders (prefill, then one
//! token at a time through the KV caches, each chosen by a [`Sampler`]), and
//! sentence embeddings for encoders, with the timings users compare (time to first
//! token, per-token latency, tokens/s).

use std::time::{Duration, Instant};

use burn::prelude::Backend;

use crate::InferError;
use crate::chat::{Message, Role};
use crate::protocol::Front;
use crate::runtime::{Output, Request, Want};
use crate::sampling::{Sampler, Sampling};
use crate::tokenize::TextTokenizer;

/// One user message framed by the model's chat template.
pub fn chat_prompt(tokenizer: &TextTokenizer, user: &str) -> Result<String, InferError> {
    tokenizer.chat.render(&[Message::new(Role::User, user)])
}

/// What to generate: how much, how each token is chosen, where to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// At most this many new tokens.
    pub max_tokens: usize,
    /// How each token is chosen (greedy by default).
    pub sampling: Sampling,
    /// Texts that end the generation where they appear (not included in it).
    pub stop: Vec<String>,
}

impl Generation {
    /// Greedy, up to `max_tokens`, ending only at the model's stop token.
    pub fn greedy(max_tokens: usize) -> Self {
        Generation {
            max_tokens,
            sampling: Sampling::default(),
            stop: vec![],
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Finish {
    /// The model's stop token or one of the request's stop texts.
    Stop,
    /// `max_tokens` tokens were generated.
    #[default]
    Length,
    /// The listener went away.
    Cancelled,
}

/// Timings of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated: usize,
    /// Prefill, up to the first new token.
    pub first_token: Duration,
    /// Each later token's latency.
    pub per_token: Vec<Duration>,
    /// Why it ended.
    pub finish: Finish,
}

impl GenerationStats {
    /// Decode throughput: tokens after the first per second.
    pub fn tokens_per_second(&self) -> f64 {
        let total: f64 = self.per_token.iter().map(Duration::as_secs_f64).sum();
        if total > 0.0 {
            self.per_token.len() as f64 / total
        } else {
            0.0
        }
    }

    /// The mean per-token decode latency.
    pub fn mean_token_latency(&self) -> Duration {
        if self.per_token.is_empty() {
            return Duration::ZERO;
        }
        self.per_token.iter().sum::<Duration>() / self.per_token.len() as u32
    }

    /// The `q`-quantile (0..=1) of per-token latency.
    pub fn token_latency_quantile(&self, q: f64) -> Duration {
        let mut sorted = self.per_token.clone();
        sorted.sort();
        sorted
            .get(((sorted.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// The token ids of `prompt` and how many tokens may follow it: `max_tokens`, or
/// by default the rest of the model's context of `context` tokens. Refused when
/// the prompt is empty or it and `max_tokens` would not fit the context.
pub fn prompt_ids(
    tokenizer: &TextTokenizer,
    prompt: &str,
    max_tokens: Option<usize>,
    context: usize,
) -> Result<(Vec<u32>, usize), InferError> {
    let ids = tokenizer.encode(prompt, false)?;
    if ids.is_empty() {
        return Err(InferError::Request("the prompt has no tokens".into()));
    }
    let room = context.saturating_sub(ids.len());
    match max_tokens {
        Some(asked) if asked > room => Err(InferError::Request(format!(
            "the model's context is {context} tokens, but the prompt has {} and `max_tokens` asks for {asked} more",
            ids.len()
        ))),
        None if room == 0 => Err(InferError::Request(format!(
            "the model's context is {context} tokens, and the prompt has {}: no room to answer",
            ids.len()
        ))),
        _ => Ok((ids, max_tokens.unwrap_or(room))),
    }
}

/// Text generated so far, and how much of it may be shown: a piece that could be
/// the start of a stop text is held back until the next tokens tell.
struct StopText {
    stop: Vec<String>,
    /// Bytes of the text already shown.
    shown: usize,
}

impl StopText {
    /// Where in `text` a stop text begins, if one does.
    fn found(&self, text: &str) -> Option<usize> {
        // Only the unshown tail can hold a new match (shown text held none).
        let from = self
            .shown
            .saturating_sub(self.stop.iter().map(String::len).max().unwrap_or(0));
        let from = (0..=from).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        self.stop
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
            .min()
    }

    /// How much of `text` can be shown: all but a tail that is a stop text's
    /// beginning, or a character still incomplete.
    fn showable(&self, text: &str) -> usize {
        if text.ends_with('\u{FFFD}') {
            return self.shown;
        }
        let held = self
            .stop
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        (text.len() - held).max(self.shown)
    }
}

/// What the model gave one sequence at a step.
pub enum Pick<'a> {
    /// The token it chose (plain greedy decoding, on the workers).
    Token(u32),
    /// The next-token logits, for the sequence's sampler.
    Logits(&'a mut [f32]),
}

/// One sequence being generated, between the model's steps: its sampler, its
/// tokens and text so far, its timings. The model is run elsewhere — by
/// [`generate`] for one sequence, by a server's scheduler for a running batch —
/// and each step's output for this sequence handed to [`Decoding::take`].
pub struct Decoding {
    max_tokens: usize,
    greedy: bool,
    sampler: Sampler,
    stop: StopText,
    generated: Vec<u32>,
    text: String,
    stats: GenerationStats,
    /// Model outputs taken (the prefill's is the first token's).
    steps: usize,
}

impl Decoding {
    /// A sequence continuing a prompt of `prompt_tokens` as `generation` says;
    /// `stream` numbers it among a request's several (their samplers draw
    /// differently).
    pub fn new(prompt_tokens: usize, generation: &Generation, stream: u64) -> Result<Self, InferError> {
        generation.sampling.check()?;
        Ok(Decoding {
            max_tokens: generation.max_tokens,
            greedy: generation.sampling.is_plain_greedy(),
            sampler: Sampler::new(&generation.sampling, stream),
            stop: StopText {
                stop: generation.stop.clone(),
                shown: 0,
            },
            generated: Vec::new(),
            text: String::new(),
            stats: GenerationStats {
                prompt_tokens,
                ..Default::default()
            },
            steps: 0,
        })
    }

    /// What this sequence needs from the model: plain greedy picks where the
    /// logits are; anything else needs them here.
    pub fn want(&self) -> Want {
        match self.greedy {
            true => Want::NextToken,
            false => Want::Logits,
        }
    }

    /// Takes the model's output for this sequence after a step that took `took`
    /// (the prefill, then one token each); `on_text` hears any new text and
    /// returns `false` to cancel. Returns the token to feed next, or `None` when
    /// the sequence has ended.
    pub fn take(
        &mut self,
        tokenizer: &TextTokenizer,
        pick: Pick<'_>,
        took: Duration,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Option<u32>, InferError> {
        let token = match pick {
            Pick::Token(t) => t,
            Pick::Logits(logits) if self.greedy => crate::sampling::argmax(logits),
            Pick::Logits(logits) => self.sampler.pick(logits),
        };
        match self.steps {
            0 => self.stats.first_token = took,
            _ => self.stats.per_token.push(took),
        }
        self.steps += 1;
        if tokenizer.stop.contains(&token) {
            self.stats.finish = Finish::Stop;
            return Ok(None);
        }
        self.generated.push(token);
        self.sampler.saw(token);
        // Decode the whole text each time: a byte-level piece may complete only with
        // the next token (multi-byte characters).
        self.text = tokenizer.decode(&self.generated)?;
        let end = match self.stop.found(&self.text) {
            Some(at) => {
                self.text.truncate(at);
                self.stats.finish = Finish::Stop;
                at.max(self.stop.shown)
            }
            None => self.stop.showable(&self.text),
        };
        if let Some(piece) = self.text.get(self.stop.shown..end).filter(|p| !p.is_empty()) {
            if !on_text(piece) {
                self.stats.finish = Finish::Cancelled;
                return Ok(None);
            }
            self.stop.shown = end;
        }
        let more = self.stats.finish != Finish::Stop && self.generated.len() < self.max_tokens;
        Ok(more.then_some(token))
    }

    /// Ends the sequence as cancelled (its listener left before it finished).
    pub fn cancel(&mut self) {
        self.stats.finish = Finish::Cancelled;
    }

    /// The whole text and its timings; a held-back tail that was not a stop
    /// text after all goes to `on_text` first.
    pub fn finish(mut self, on_text: &mut dyn FnMut(&str) -> bool) -> (String, GenerationStats) {
        self.stats.generated = self.generated.len();
        if self.stats.finish == Finish::Length
            && let Some(tail) = self.text.get(self.stop.shown..).filter(|t| !t.is_empty())
        {
            on_text(tail);
        }
        (self.text, self.stats)
    }
}

/// Continues the prompt `ids` as `generation` says; `on_text` hears each new piece
/// of text as it is decoded and returns `false` to cancel. `stream` numbers this
/// sequence among a request's several (their samplers draw differently).
pub fn generate<B: Backend>(
    front: &mut Front<B>,
    tokenizer: &TextTokenizer,
    ids: Vec<u32>,
    generation: &Generation,
    stream: u64,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<(String, GenerationStats), InferError> {
    let mut sequence = Decoding::new(ids.len(), generation, stream)?;
    let want = sequence.want();
    let mut next = Request::decode(vec![ids], true, want);
    if generation.max_tokens > 0 {
        loop {
            let clock = Instant::now();
            let mut output = front.run(&next)?;
            let took = clock.elapsed();
            let pick = match output {
                Output::Tokens(ref tokens) => Pick::Token(tokens[0]),
                Output::Logits(ref mut rows) => Pick::Logits(&mut rows[0]),
                Output::Embeddings(_) => return Err(InferError::Request("this model does not generate tokens".into())),
            };
            let Some(token) = sequence.take(tokenizer, pick, took, on_text)? else {
                break;
            };
            next = Request::decode(vec![vec![token]], false, want);
        }
    }
    Ok(sequence.finish(on_text))
}

/// The normalised sentence embedding of each text.
pub fn embed<B: Backend>(
    front: &mut Front<B>,
    tokenizer: &TextTokenizer,
    texts: &[&str],
) -> Result<Vec<Vec<f32>>, InferError> {
    if texts.is_empty() {
        return Err(InferError::Request("no texts to embed".into()));
    }
    let rows = texts
        .iter()
        .map(|t| tokenizer.encode(t, true))
        .collect::<Result<Vec<_>, _>>()?;
    match front.run(&Request::embed(&rows))? {
        Output::Embeddings(e) => Ok(e),
        _ => Err(InferError::Request("this model does not embed text".into())),
    }
}
