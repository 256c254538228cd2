//! Reading OpenAI's request bodies: every parameter we honour, checked and typed;
//! every other one refused by name.
//!
//! ## Design
//! A client that sets `logprobs` or `tools` and gets an answer without them has
//! been misled, so a parameter we do not implement is a 400 naming it, never
//! skipped. The body is read as a JSON object first, its keys checked against the
//! endpoint's list, then each value read with an error naming the field and what
//! it should be. `null` counts as absent, as OpenAI's own server treats it.

use hetero_infer::chat::{Message, Role};
use hetero_infer::generate::Generation;
use hetero_infer::sampling::Sampling;
use serde_json::{Map, Value};

/// The most choices one request may ask for.
pub const MAX_CHOICES: usize = 16;
/// The most stop texts one request may give (OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// The longest stop text, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// The most messages in one conversation.
pub const MAX_MESSAGES: usize = 1024;

/// Parameters both generating endpoints take.
const GENERATION_KEYS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "stream",
    "stream_options",
    "user",
];

/// A request that is not what its endpoint takes: the 400's message.
pub type Refusal = String;

/// The prompt of a generating request, before the model's chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text, continued as is.
    Text(String),
    /// A conversation, framed by the model's chat template.
    Chat(Vec<Message>),
}

/// A checked `/v1/completions` or `/v1/chat/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// At most this many new tokens; `None`: until the model stops or the context
    /// is full.
    pub max_tokens: Option<usize>,
    /// Sampling and stop texts (its `max_tokens` is set once the prompt is counted).
    pub generation: Generation,
    /// How many choices to generate.
    pub n: usize,
    /// Server-sent events instead of one reply.
    pub stream: bool,
}

/// The fields of a JSON object body, each taken at most once.
struct Fields(Map<String, Value>);

impl Fields {
    /// `body`'s fields, refusing any not in `allowed`.
    fn of(body: Value, what: &str, allowed: &[&[&str]]) -> Result<Self, Refusal> {
        let Value::Object(map) = body else {
            return Err(format!("{what}: the body must be a JSON object"));
        };
        // A null is how many clients write "unset": it is not a request for the
        // feature.
        let unknown: Vec<&str> = map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, _)| k.as_str())
            .filter(|k| !allowed.iter().any(|list| list.contains(k)))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "{what}: unsupported parameter{} {}; this server implements {}",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
                allowed.concat().join(", ")
            ));
        }
        Ok(Fields(map.into_iter().filter(|(_, v)| !v.is_null()).collect()))
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, Refusal> {
        self.take(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| format!("`{key}` must be true or false, not {v}"))
            })
            .transpose()
    }

    fn number(&mut self, key: &str) -> Result<Option<f32>, Refusal> {
        self.take(key)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| format!("`{key}` must be a number, not {v}"))
            })
            .transpose()
    }

    /// A whole number within `range`.
    fn count(&mut self, key: &str, range: std::ops::RangeInclusive<u64>) -> Result<Option<u64>, Refusal> {
        self.take(key)
            .map(|v| match v.as_u64() {
                Some(x) if range.contains(&x) => Ok(x),
                _ => Err(format!(
                    "`{key}` must be a whole number from {} to {}, not {v}",
                    range.start(),
                    range.end()
                )),
            })
            .transpose()
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, Refusal> {
        self.take(key)
            .map(|v| match v {
                Value::String(s) => Ok(s),
                v => Err(format!("`{key}` must be a string, not {v}")),
            })
            .transpose()
    }
}

/// Reads the parameters both endpoints share into `prompt`'s request.
fn generation(mut f: Fields, prompt: Prompt, max_tokens_key: &str) -> Result<GenerateRequest, Refusal> {
    let defaults = Sampling::default();
    let mut max_tokens = f.count("max_tokens", 1..=u32::MAX as u64)?;
    if max_tokens.is_none() {
        max_tokens = f.count(max_tokens_key, 1..=u32::MAX as u64)?;
    }
    let sampling = Sampling {
        temperature: f.number("temperature")?.unwrap_or(defaults.temperature),
        top_k: f.count("top_k", 0..=u32::MAX as u64)?.unwrap_or(0) as usize,
        top_p: f.number("top_p")?.unwrap_or(defaults.top_p),
        min_p: f.number("min_p")?.unwrap_or(defaults.min_p),
        presence_penalty: f.number("presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: f.number("frequency_penalty")?.unwrap_or(0.0),
        seed: f.count("seed", 0..=u64::MAX)?,
    };
    sampling.check().map_err(|e| e.to_string())?;
    let stop = match f.take("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                v => Err(format!("`stop` must hold strings, not {v}")),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(format!("`stop` must be a string or a list of strings, not {v}")),
    };
    if stop.len() > MAX_STOPS {
        return Err(format!("`stop` has {} texts; at most {MAX_STOPS}", stop.len()));
    }
    if let Some(s) = stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(format!("`stop` text {s:?} must have 1 to {MAX_STOP_BYTES} bytes"));
    }
    let n = f.count("n", 1..=MAX_CHOICES as u64)?.unwrap_or(1) as usize;
    let stream = f.bool("stream")?.unwrap_or(false);
    if let Some(options) = f.take("stream_options") {
        // Usage always comes with the last chunk, so `include_usage` is honoured
        // either way; anything else in it is not implemented.
        match options.as_object() {
            Some(o) if o.keys().all(|k| k == "include_usage") => {}
            _ => return Err(format!("`stream_options` supports only `include_usage`, not {options}")),
        }
    }
    // The model is the one served; a client naming it is fine, any string is.
    f.string("model")?;
    f.string("user")?;
    Ok(GenerateRequest {
        prompt,
        max_tokens: max_tokens.map(|m| m as usize),
        generation: Generation {
            max_tokens: 0,
            sampling,
            stop,
        },
        n,
        stream,
    })
}

/// A `/v1/completions` body.
pub fn completion(body: Value) -> Result<GenerateRequest, Refusal> {
    let what = "a completion request";
    let mut f = Fields::of(body, what, &[GENERATION_KEYS, &["prompt", "chat"]])?;
    let text = match f.take("prompt") {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return Err(format!(
                "{what}: give one prompt per request (`n` asks for several choices)"
            ));
        }
        Some(v) => return Err(format!("{what}: `prompt` must be a string, not {v}")),
        None => return Err(format!("{what}: `prompt` is missing")),
    };
    let prompt = match f.bool("chat")?.unwrap_or(false) {
        true => Prompt::Chat(vec![Message::new(Role::User, text)]),
        false => Prompt::Text(text),
    };
    generation(f, prompt, "max_tokens").map_err(|e| prefixed(what, e))
}

/// A `/v1/chat/completions` body.
pub fn chat_completion(body: Value) -> Result<GenerateRequest, Refusal> {
    let what = "a chat completion request";
    let mut f = Fields::of(body, what, &[GENERATION_KEYS, &["messages", "max_completion_tokens"]])?;
    let Some(Value::Array(items)) = f.take("messages") else {
        return Err(format!(
            "{what}: `messages` must be a list of {{\"role\", \"content\"}}"
        ));
    };
    if items.is_empty() {
        return Err(format!("{what}: `messages` is empty"));
    }
    if items.len() > MAX_MESSAGES {
        return Err(format!(
            "{what}: `messages` has {}; at most {MAX_MESSAGES}",
            items.len()
        ));
    }
    let messages = items
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(m).map_err(|e| format!("{what}: message {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    generation(f, Prompt::Chat(messages), "max_completion_tokens").map_err(|e| prefixed(what, e))
}

fn prefixed(what: &str, e: Refusal) -> Refusal {
    match e.starts_with(what) {
        true => e,
        false => format!("{what}: {e}"),
    }
}

/// One message: a role we frame and text content (a string or text parts).
fn message(m: Value) -> Result<Message, Refusal> {
    let Value::Object(mut m) = m else {
        return Err("must be {\"role\", \"content\"}".into());
    };
    if let Some(k) = m.keys().find(|k| !["role", "content", "name"].contains(&k.as_str())) {
        return Err(format!("unsupported field `{k}`"));
    }
    let role = match m.remove("role") {
        Some(Value::String(r)) => {
            Role::parse(&r).ok_or_else(|| format!("role {r:?} is not system, user or assistant"))?
        }
        _ => return Err("`role` must be a string".into()),
    };
    let content = match m.remove("content") {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t),
                (Some(kind), _) => Err(format!("content parts of type {kind:?} are not supported (text only)")),
                _ => Err(format!(
                    "a content part must be {{\"type\": \"text\", \"text\"}}, not {p}"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?
            .concat(),
        _ => return Err("`content` must be a string or a list of text parts".into()),
    };
    Ok(Message::new(role, content))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_sampling_parameter_is_read() {
        let r = completion(json!({
            "model": "smollm2", "prompt": "Hi", "max_tokens": 5, "temperature": 0.7, "top_p": 0.9,
            "top_k": 40, "min_p": 0.05, "seed": 3, "stop": ["\n", "."], "presence_penalty": 0.5,
            "frequency_penalty": -0.5, "n": 2, "stream": true, "stream_options": {"include_usage": true},
            "user": "me", "logprobs": null,
        }))
        .unwrap();
        assert_eq!(r.prompt, Prompt::Text("Hi".into()));
        assert_eq!((r.max_tokens, r.n, r.stream), (Some(5), 2, true));
        let s = &r.generation.sampling;
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.min_p, s.seed),
            (0.7, 0.9, 40, 0.05, Some(3))
        );
        assert_eq!((s.presence_penalty, s.frequency_penalty), (0.5, -0.5));
        assert_eq!(r.generation.stop, ["\n", "."]);
    }

    #[test]
    fn unsupported_parameters_are_named() {
        let e = completion(json!({"prompt": "Hi", "logprobs": 2, "best_of": 3})).unwrap_err();
        assert!(e.contains("`logprobs`") && e.contains("`best_of`"), "{e}");
        let e = chat_completion(json!({"messages": [{"role": "user", "content": "Hi"}], "tools": []})).unwrap_err();
        assert!(e.contains("unsupported parameter `tools`"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        for (body, says) in [
            (json!({"prompt": "Hi", "temperature": 5}), "`temperature` is 5"),
            (
                json!({"prompt": "Hi", "temperature": "hot"}),
                "`temperature` must be a number",
            ),
            (
                json!({"prompt": "Hi", "n": 0}),
                "`n` must be a whole number from 1 to 16",
            ),
            (json!({"prompt": "Hi", "max_tokens": -1}), "`max_tokens`"),
            (json!({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}), "at most 4"),
            (json!({"prompt": "Hi", "stop": [""]}), "1 to 256 bytes"),
            (
                json!({"prompt": "Hi", "stream_options": {"continuous_usage_stats": true}}),
                "include_usage",
            ),
            (json!({"prompt": ["a", "b"]}), "one prompt per request"),
            (json!({"max_tokens": 3}), "`prompt` is missing"),
            (json!([1, 2]), "a JSON object"),
        ] {
            let e = completion(body.clone()).unwrap_err();
            assert!(e.contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn chat_messages_take_text_parts_and_refuse_others() {
        let r = chat_completion(json!({
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 7,
        }))
        .unwrap();
        let Prompt::Chat(m) = &r.prompt else { panic!("a chat") };
        assert_eq!(m[1], Message::new(Role::User, "Hi there"));
        assert_eq!(r.max_tokens, Some(7));
        for (body, says) in [
            (json!({"messages": []}), "`messages` is empty"),
            (
                json!({"messages": [{"role": "robot", "content": "hi"}]}),
                "is not system, user or assistant",
            ),
            (json!({"messages": "hi"}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
                "\"image_url\" are not supported",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
                "`tool_calls`",
            ),
        ] {
            let e = chat_completion(body.clone()).unwrap_err();
            assert!(e.contains(says), "{body}: {e}");
        }
    }
}
