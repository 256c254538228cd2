//! Tokenizers for the models, built with HF `tokenizers`: BERT's WordPiece from its
//! `tokenizer.json` (with its fixed padding to 128 turned off: the runtime pads a
//! batch itself and masks the padding), and a llama GGUF's byte-level BPE rebuilt
//! from the file's own metadata (`tokenizer.ggml.*`).

use std::path::Path;

use serde_json::json;
use tokenizers::Tokenizer;

use crate::InferError;
use crate::chat::ChatTemplate;
use crate::gguf::Gguf;

/// A tokenizer checked against the model it serves.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Ids that end a generation.
    pub stop: Vec<u32>,
    /// How the model frames a conversation.
    pub chat: ChatTemplate,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("stop", &self.stop)
            .finish()
    }
}

impl TextTokenizer {
    /// BERT's tokenizer from `tokenizer.json`, for a model of `vocab` tokens that
    /// reads at most `max_len` of them.
    pub fn bert(path: &Path, vocab: usize, max_len: usize) -> Result<Self, InferError> {
        let mut inner =
            Tokenizer::from_file(path).map_err(|e| InferError::Tokenizer(format!("{}: {e}", path.display())))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| InferError::Tokenizer(e.to_string()))?;
        Self::checked(
            inner,
            vocab,
            vec![],
            &path.display().to_string(),
            ChatTemplate::chatml(),
        )
    }

    /// The byte-level BPE tokenizer a llama GGUF file describes in its metadata.
    pub fn from_gguf(g: &Gguf, vocab: usize) -> Result<Self, InferError> {
        let model = g.meta("tokenizer.ggml.model")?.as_str().unwrap_or_default();
        if model != "gpt2" {
            return Err(InferError::Tokenizer(format!(
                "tokenizer.ggml.model is {model:?}; only byte-level BPE (gpt2) is built"
            )));
        }
        let tokens = g.meta_strings("tokenizer.ggml.tokens")?;
        let merges = g.meta_strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
            Some(crate::gguf::Value::Array(v)) => v.iter().map(|t| t.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        // Control tokens (type 3) are matched whole and never split.
        let added: Vec<_> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| types.get(*i) == Some(&3))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": true})
            })
            .collect();
        let vocab_map: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let pre = g
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        // SmolLM's pre-tokenizer splits every digit on its own before GPT-2's regex.
        let pre_tokenizer = if pre == "smollm" {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        } else {
            byte_level.clone()
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab_map, "merges": merges},
        });
        let inner: Tokenizer = serde_json::from_value::<Tokenizer>(spec)
            .map_err(|e| InferError::Tokenizer(format!("the GGUF's tokenizer metadata: {e}")))?;
        let mut stop = vec![];
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = g.metadata.get(key).and_then(|v| v.as_u64()) {
                stop.push(id as u32);
            }
        }
        let chat = match g.metadata.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(source) => {
                let token = |key: &str| {
                    let id = g.metadata.get(key).and_then(|v| v.as_u64());
                    id.and_then(|i| tokens.get(i as usize)).copied().unwrap_or_default()
                };
                let (bos, eos) = (
                    token("tokenizer.ggml.bos_token_id"),
                    token("tokenizer.ggml.eos_token_id"),
                );
                ChatTemplate::from_model(source.to_string(), bos, eos, "the GGUF's tokenizer.chat_template")?
            }
            None => ChatTemplate::chatml(),
        };
        Self::checked(inner, vocab, stop, "the GGUF's metadata", chat)
    }

    /// The tokenizer of a Hugging Face folder: `tokenizer.json`, with the chat
    /// template and special tokens of `tokenizer_config.json` (or
    /// `chat_template.jinja`) and the stop ids of `generation_config.json`, for a
    /// model of `vocab` embeddings (which may be more than the tokenizer's ids:
    /// checkpoints pad their tables).
    pub fn from_hf_folder(dir: &Path, vocab: usize) -> Result<Self, InferError> {
        let path = dir.join("tokenizer.json");
        let inner =
            Tokenizer::from_file(&path).map_err(|e| InferError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let generation = read_json(&dir.join("generation_config.json"))?;
        // Special tokens are written either as text or as {"content": text, …}.
        let special = |key: &str| {
            let v = config.as_ref().map(|c| &c[key]);
            v.and_then(|v| v.as_str().or_else(|| v["content"].as_str()))
                .map(str::to_string)
        };
        let (bos, eos) = (special("bos_token"), special("eos_token"));
        let mut stop: Vec<u32> = eos.iter().filter_map(|t| inner.token_to_id(t)).collect();
        if let Some(ids) = generation.as_ref().map(|g| &g["eos_token_id"]) {
            let ids = ids.as_array().cloned().unwrap_or_else(|| vec![ids.clone()]);
            stop.extend(ids.iter().filter_map(|i| i.as_u64()).map(|i| i as u32));
        }
        stop.sort_unstable();
        stop.dedup();
        let template = match dir.join("chat_template.jinja") {
            file if file.is_file() => Some((
                std::fs::read_to_string(&file)
                    .map_err(|e| InferError::Tokenizer(format!("{}: {e}", file.display())))?,
                "chat_template.jinja",
            )),
            _ => chat_template_in(config.as_ref()).map(|t| (t, "tokenizer_config.json")),
        };
        let chat = match template {
            Some((source, file)) => ChatTemplate::from_model(
                source,
                bos.as_deref().unwrap_or_default(),
                eos.as_deref().unwrap_or_default(),
                &dir.join(file).display().to_string(),
            )?,
            None => ChatTemplate::chatml(),
        };
        let largest = inner.get_vocab(true).into_values().max().unwrap_or(0) as usize;
        if largest >= vocab {
            return Err(InferError::Tokenizer(format!(
                "{} has token id {largest} but the model has {vocab} embeddings: not this model's tokenizer",
                path.display()
            )));
        }
        if let Some(&bad) = stop.iter().find(|&&id| id as usize >= vocab) {
            return Err(InferError::Tokenizer(format!(
                "{}: end-of-text id {bad} is outside the model's {vocab} embeddings",
                dir.display()
            )));
        }
        Ok(TextTokenizer { inner, stop, chat })
    }

    /// The tokenizer as a `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String, InferError> {
        self.inner
            .to_string(true)
            .map_err(|e| InferError::Tokenizer(format!("cannot write the tokenizer: {e}")))
    }

    /// The text of token `id` as the vocabulary spells it.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    fn checked(
        inner: Tokenizer,
        vocab: usize,
        stop: Vec<u32>,
        from: &str,
        chat: ChatTemplate,
    ) -> Result<Self, InferError> {
        let size = inner.get_vocab_size(true);
        if size != vocab {
            return Err(InferError::Tokenizer(format!(
                "{from} has {size} tokens but the model has {vocab}: not this model's tokenizer"
            )));
        }
        Ok(TextTokenizer { inner, stop, chat })
    }

    /// Token ids of `text`; with `special`, the model's framing tokens (BERT's
    /// `[CLS]`…`[SEP]`) are added.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, InferError> {
        Ok(self
            .inner
            .encode(text, special)
            .map_err(|e| InferError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, InferError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| InferError::Tokenizer(e.to_string()))
    }
}

/// The largest tokenizer side file read (`tokenizer_config.json` of big
/// vocabularies is a few MB).
const MAX_SIDE_FILE: u64 = 64 << 20;

/// `path` as JSON, `None` when there is no such file.
fn read_json(path: &Path) -> Result<Option<serde_json::Value>, InferError> {
    crate::weights::read_json(path, MAX_SIDE_FILE)
        .map_err(|why| InferError::Tokenizer(format!("{}: {why}", path.display())))
}

/// The chat template of a `tokenizer_config.json`: a text, or (several named
/// templates) the one called `default`.
fn chat_template_in(config: Option<&serde_json::Value>) -> Option<String> {
    let t = &config?["chat_template"];
    if let Some(text) = t.as_str() {
        return Some(text.to_string());
    }
    t.as_array()?
        .iter()
        .find(|named| named["name"] == "default")
        .and_then(|named| named["template"].as_str())
        .map(str::to_string)
}
