//! Text in, text out on the front: greedy generation for decoders (prefill, then one
//! token at a time through the KV caches) and sentence embeddings for encoders, with
//! the timings users compare (time to first token, per-token latency, tokens/s).

use std::time::{Duration, Instant};

use burn::prelude::Backend;

use crate::InferError;
use crate::protocol::Front;
use crate::runtime::{Output, Request, Want};
use crate::tokenize::TextTokenizer;

/// SmolLM2-Instruct's chat framing (ChatML) around one user message.
pub fn chat_prompt(user: &str) -> String {
    chat_messages_prompt(&[("user", user)])
}

/// SmolLM2-Instruct's chat framing (ChatML) of a conversation, `(role, content)`
/// in order, ending where the assistant's next turn begins.
pub fn chat_messages_prompt(messages: &[(&str, &str)]) -> String {
    let mut prompt = String::new();
    for (role, content) in messages {
        prompt.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    prompt.push_str("<|im_start|>assistant\n");
    prompt
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
    /// Whether a stop token ended it (rather than the token limit).
    pub stopped: bool,
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

/// Greedily continues `prompt` by at most `max_tokens` tokens; `on_text` hears each
/// new piece of text as it is decoded.
pub fn generate<B: Backend>(
    front: &mut Front<B>,
    tokenizer: &TextTokenizer,
    prompt: &str,
    max_tokens: usize,
    on_text: &mut dyn FnMut(&str),
) -> Result<(String, GenerationStats), InferError> {
    let ids = tokenizer.encode(prompt, false)?;
    if ids.is_empty() {
        return Err(InferError::Request("the prompt has no tokens".into()));
    }
    let mut stats = GenerationStats {
        prompt_tokens: ids.len(),
        ..Default::default()
    };
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut next = Request::decode(vec![ids], true, Want::NextToken);
    while generated.len() < max_tokens {
        let clock = Instant::now();
        let Output::Tokens(tokens) = front.run(&next)? else {
            return Err(InferError::Request("this model does not generate tokens".into()));
        };
        let took = clock.elapsed();
        if generated.is_empty() {
            stats.first_token = took;
        } else {
            stats.per_token.push(took);
        }
        let token = tokens[0];
        if tokenizer.stop.contains(&token) {
            stats.stopped = true;
            break;
        }
        generated.push(token);
        // Decode the whole text each time: a byte-level piece may complete only with
        // the next token (multi-byte characters).
        let text = tokenizer.decode(&generated)?;
        if let Some(new) = text.strip_prefix(printed.as_str())
            && !new.is_empty()
            && !new.ends_with('\u{FFFD}')
        {
            on_text(new);
            printed = text;
        }
        next = Request::decode(vec![vec![token]], false, Want::NextToken);
    }
    stats.generated = generated.len();
    Ok((tokenizer.decode(&generated)?, stats))
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
