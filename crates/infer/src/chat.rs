//! Chat templates: how a model wants a conversation framed as one prompt.
//!
//! ## Design
//! A chat model was trained on one framing of turns (ChatML's `<|im_start|>`,
//! Llama 3's headers, Mistral's `[INST]`…), and only that framing gets its best
//! answers. The model says which in its own files — a GGUF's
//! `tokenizer.chat_template`, a Hugging Face folder's `tokenizer_config.json` — as a
//! Jinja template, the same one `transformers` renders. We render it with
//! `minijinja` (plus its Python-method compatibility, since templates call
//! `.strip()` and friends) and fall back to ChatML only when the model has none.
//! A template is compiled when the model opens, so a broken one is an error at
//! start, naming where it came from, not at the first request.

use std::sync::Arc;

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use crate::InferError;

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions framing the conversation.
    System,
    /// The person.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role a message's `role` names, if it is one we frame.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// Where a model's template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The model's own file or folder (named).
    Model(String),
    /// The model has none: ChatML.
    ChatMlFallback,
}

/// ChatML, for models that carry no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content \
                      + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template and the special tokens it may print.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: String,
    bos: String,
    eos: String,
    /// Where the template came from.
    pub origin: Origin,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).finish()
    }
}

impl ChatTemplate {
    /// ChatML, the fallback.
    pub fn chatml() -> Self {
        Self::compile(CHATML.into(), "", "", Origin::ChatMlFallback).expect("ChatML compiles")
    }

    /// The model's template `source`, read from `from`, with its `bos`/`eos` tokens.
    pub fn from_model(source: String, bos: &str, eos: &str, from: &str) -> Result<Self, InferError> {
        Self::compile(source, bos, eos, Origin::Model(from.into()))
    }

    fn compile(source: String, bos: &str, eos: &str, origin: Origin) -> Result<Self, InferError> {
        let mut env = Environment::new();
        // Templates are written for Python's Jinja: string methods, `raise_exception`.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.clone()).map_err(|e| {
            let from = match &origin {
                Origin::Model(from) => from.as_str(),
                Origin::ChatMlFallback => "ChatML",
            };
            InferError::Tokenizer(format!("the chat template in {from} does not compile: {e}"))
        })?;
        Ok(ChatTemplate {
            env: Arc::new(env),
            source,
            bos: bos.into(),
            eos: eos.into(),
            origin,
        })
    }

    /// The model's own template's source and its BOS and EOS texts (`None` for
    /// the ChatML fallback), to write beside the model.
    pub fn model_template(&self) -> Option<(&str, &str, &str)> {
        match self.origin {
            Origin::Model(_) => Some((&self.source, &self.bos, &self.eos)),
            Origin::ChatMlFallback => None,
        }
    }

    /// The prompt for `messages`, ending where the assistant's next turn begins.
    pub fn render(&self, messages: &[Message]) -> Result<String, InferError> {
        let template = self.env.get_template("chat").expect("added at compile");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            // A template that refuses the conversation (`raise_exception`, e.g. roles
            // out of order) is the request's fault.
            .map_err(|e| InferError::Request(format!("the model's chat template refused the messages: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_frames_each_turn_and_opens_the_answer() {
        let prompt = ChatTemplate::chatml()
            .render(&[Message::new(Role::System, "Be brief."), Message::new(Role::User, "Hi")])
            .unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_models_template_sees_python_methods_and_special_tokens() {
        // Mistral-style: BOS, [INST] pairs, strip(), and a refusal of bad order.
        let source = "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}\
                      {{ raise_exception('roles must alternate user/assistant') }}{% endif %}\
                      {% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}";
        let t = ChatTemplate::from_model(source.into(), "<s>", "</s>", "test").unwrap();
        let prompt = t
            .render(&[
                Message::new(Role::User, "  Hi  "),
                Message::new(Role::Assistant, "Hello"),
                Message::new(Role::User, "Bye"),
            ])
            .unwrap();
        assert_eq!(prompt, "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]");
        let refused = t.render(&[Message::new(Role::Assistant, "first")]).unwrap_err();
        assert!(refused.to_string().contains("roles must alternate"), "{refused}");
    }

    #[test]
    fn a_broken_template_is_an_error_naming_its_source() {
        let e = ChatTemplate::from_model("{% for %}".into(), "", "", "model.gguf").unwrap_err();
        assert!(e.to_string().contains("model.gguf"), "{e}");
    }
}
