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
struct StopText<'a> {
    stop: &'a [String],
    /// Bytes of the text already shown.
    shown: usize,
}

impl StopText<'_> {
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
    generation.sampling.check()?;
    let mut stats = GenerationStats {
        prompt_tokens: ids.len(),
        ..Default::default()
    };
    let mut sampler = Sampler::new(&generation.sampling, stream);
    // Plain greedy picks where the logits are; anything else needs them here.
    let want = match generation.sampling.is_plain_greedy() {
        true => Want::NextToken,
        false => Want::Logits,
    };
    let mut stop = StopText {
        stop: &generation.stop,
        shown: 0,
    };
    let mut generated: Vec<u32> = Vec::new();
    let mut text = String::new();
    let mut next = Request::decode(vec![ids], true, want);
    while generated.len() < generation.max_tokens {
        let clock = Instant::now();
        let token = match front.run(&next)? {
            Output::Tokens(tokens) => tokens[0],
            Output::Logits(mut rows) => sampler.pick(&mut rows[0]),
            Output::Embeddings(_) => return Err(InferError::Request("this model does not generate tokens".into())),
        };
        let took = clock.elapsed();
        if generated.is_empty() {
            stats.first_token = took;
        } else {
            stats.per_token.push(took);
        }
        if tokenizer.stop.contains(&token) {
            stats.finish = Finish::Stop;
            break;
        }
        generated.push(token);
        sampler.saw(token);
        // Decode the whole text each time: a byte-level piece may complete only with
        // the next token (multi-byte characters).
        text = tokenizer.decode(&generated)?;
        let end = match stop.found(&text) {
            Some(at) => {
                text.truncate(at);
                stats.finish = Finish::Stop;
                at.max(stop.shown)
            }
            None => stop.showable(&text),
        };
        if let Some(piece) = text.get(stop.shown..end).filter(|p| !p.is_empty()) {
            if !on_text(piece) {
                stats.finish = Finish::Cancelled;
                break;
            }
            stop.shown = end;
        }
        if stats.finish == Finish::Stop {
            break;
        }
        next = Request::decode(vec![vec![token]], false, want);
    }
    stats.generated = generated.len();
    if stats.finish == Finish::Length
        && let Some(tail) = text.get(stop.shown..).filter(|t| !t.is_empty())
    {
        // The held-back tail was not a stop text after all.
        on_text(tail);
    }
    Ok((text, stats))
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
