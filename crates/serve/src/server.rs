//! The HTTP API in front of a placed model (`hetero serve`, an inference job's rank 0).
//!
//! The requests and replies are OpenAI's, so its clients work unchanged:
//! - `POST /v1/completions` `{"prompt", "max_tokens"?, "chat"?, "stream"?}` (decoders):
//!   a `text_completion` with the text, why it ended, token counts and (Hetero's
//!   additions to `usage`) timings; with `"stream": true`, server-sent events, one
//!   chunk per piece, a last one with the reason and the usage, then `[DONE]`.
//!   `"chat": true` frames the prompt as one user message.
//! - `POST /v1/chat/completions` `{"messages": [{"role", "content"}, …], …}`: the
//!   same for a conversation, as a `chat.completion` (or its chunks).
//! - `POST /v1/embeddings` `{"input": "…" | ["…", …]}` (encoders): one normalised
//!   vector per input.
//! - `GET /v1/models`: the model, with its kind and placement.
//!
//! The mesh runs one request at a time: one thread owns the front and takes jobs
//! from a queue, so HTTP handlers never block the runtime (or each other's sockets).

use std::convert::Infallible;
use std::sync::mpsc;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use hetero_infer::generate::{self, GenerationStats, chat_messages_prompt, chat_prompt};
use hetero_infer::{Arch, InferError};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc as async_mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use hetero_infer::Front;
use hetero_infer::tokenize::TextTokenizer;

use crate::InferBackend;
use crate::front::{Children, Placing, describe, open_model, start_front};

/// What the runtime thread is asked to do.
enum Job {
    Complete {
        prompt: String,
        max_tokens: usize,
        /// Each piece of text, then the end.
        pieces: async_mpsc::UnboundedSender<Piece>,
    },
    Embed {
        texts: Vec<String>,
        reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, InferError>>,
    },
}

enum Piece {
    Text(String),
    Done(Result<GenerationStats, InferError>),
}

#[derive(Clone)]
struct Served {
    jobs: mpsc::Sender<Job>,
    model: String,
    info: Value,
    decoder: bool,
}

#[derive(Deserialize)]
struct Completion {
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default)]
    chat: bool,
    #[serde(default)]
    stream: bool,
}

fn default_max_tokens() -> usize {
    32
}

#[derive(Deserialize)]
struct ChatCompletion {
    messages: Vec<Message>,
    #[serde(default = "default_max_tokens", alias = "max_completion_tokens")]
    max_tokens: usize,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// Which of OpenAI's two reply shapes a completion takes.
#[derive(Clone, Copy)]
enum Reply {
    /// `/v1/completions`: `text_completion`, the text in `choices[0].text`.
    Text,
    /// `/v1/chat/completions`: `chat.completion`, the text in `choices[0].message`.
    Chat,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Embeddings {
    input: Input,
}

/// Opens `model_name`, places it and serves it on `listen` until the process is
/// stopped (`hetero serve`).
pub fn serve(model_name: &str, listen: &str, place: &Placing) -> Result<()> {
    let mut model = open_model(model_name)?;
    let Some(tokenizer) = model.tokenizer.take() else {
        anyhow::bail!("{model_name} has no tokenizer (random weights, for timing): serve a real model");
    };
    let started = start_front(model_name, &model, place)?;
    serve_front(
        started.front,
        started.children,
        tokenizer,
        model_name,
        &model.arch,
        listen,
    )
}

/// Serves HTTP on `listen` with a formed front, until the process is stopped.
pub fn serve_front(
    mut front: Front<InferBackend>,
    children: Children,
    tokenizer: TextTokenizer,
    model_name: &str,
    arch: &Arch,
    listen: &str,
) -> Result<()> {
    let decoder = !arch.is_encoder();
    let info = json!({
        "object": "list",
        "data": [{
            "id": model_name,
            "object": "model",
            "owned_by": "hetero",
            "kind": if decoder { "decoder" } else { "encoder" },
            "layers": arch.layers(),
            "workers": front.worker.placement().workers,
            "placement": describe(front.worker.placement()),
        }],
    });
    let (jobs, queue) = mpsc::channel::<Job>();
    std::thread::spawn(move || {
        let _children = children;
        for job in queue {
            match job {
                Job::Complete {
                    prompt,
                    max_tokens,
                    pieces,
                } => {
                    let out = generate::generate(&mut front, &tokenizer, &prompt, max_tokens, &mut |p| {
                        let _ = pieces.send(Piece::Text(p.to_string()));
                    });
                    let _ = pieces.send(Piece::Done(out.map(|(_, stats)| stats)));
                }
                Job::Embed { texts, reply } => {
                    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                    let _ = reply.send(generate::embed(&mut front, &tokenizer, &refs));
                }
            }
        }
    });
    let state = Served {
        jobs,
        model: model_name.to_string(),
        info,
        decoder,
    };
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(complete))
        .route("/v1/chat/completions", post(chat_complete))
        .route("/v1/embeddings", post(embeddings))
        .with_state(state);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        println!("serving {model_name} on http://{}", listener.local_addr()?);
        use std::io::Write;
        std::io::stdout().flush()?;
        axum::serve(listener, app).await.context("the HTTP server stopped")
    })
}

/// A request's body, or a 400 that says what was wrong with `what`.
#[allow(clippy::result_large_err)] // the error is the reply, returned at once
fn parsed<T>(body: Result<Json<T>, JsonRejection>, what: &str) -> Result<T, Response> {
    body.map(|Json(t)| t)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("{what}: {e}")))
}

/// OpenAI's error object, `{"error": {"message", "type"}}`, for a reply of `status`.
fn error_body(status: StatusCode, message: impl std::fmt::Display) -> Value {
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    json!({"error": {"message": message.to_string(), "type": kind}})
}

/// An error reply: `status` with [`error_body`].
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(error_body(status, message))).into_response()
}

fn failure(e: &InferError) -> Response {
    let status = match e {
        InferError::Request(_) | InferError::Tokenizer(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e)
}

async fn models(State(s): State<Served>) -> Json<Value> {
    Json(s.info.clone())
}

/// OpenAI's `usage`, with Hetero's timings beside its token counts.
fn usage(stats: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated,
        "total_tokens": stats.prompt_tokens + stats.generated,
        "first_token_ms": stats.first_token.as_secs_f64() * 1e3,
        "tokens_per_second": stats.tokens_per_second(),
        "mean_token_ms": stats.mean_token_latency().as_secs_f64() * 1e3,
    })
}

/// `stop` when the model ended the text, `length` when `max_tokens` did.
fn finish_reason(stats: &GenerationStats) -> &'static str {
    if stats.stopped { "stop" } else { "length" }
}

/// A completion's id (unique in this process) and creation time (Unix seconds).
fn completion_id() -> (String, u64) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (format!("cmpl-{created}-{n}"), created)
}

async fn complete(State(s): State<Served>, body: Result<Json<Completion>, JsonRejection>) -> Response {
    let c = match parsed(body, "a completion request") {
        Ok(c) => c,
        Err(reply) => return reply,
    };
    let prompt = if c.chat { chat_prompt(&c.prompt) } else { c.prompt };
    generate_reply(s, prompt, c.max_tokens, c.stream, Reply::Text).await
}

async fn chat_complete(State(s): State<Served>, body: Result<Json<ChatCompletion>, JsonRejection>) -> Response {
    let c = match parsed(body, "a chat completion request") {
        Ok(c) => c,
        Err(reply) => return reply,
    };
    if c.messages.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "a chat completion request: `messages` is empty",
        );
    }
    if let Some(m) = c
        .messages
        .iter()
        .find(|m| !["system", "user", "assistant"].contains(&m.role.as_str()))
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "a chat completion request: role {:?} is not system, user or assistant",
                m.role
            ),
        );
    }
    let messages: Vec<(&str, &str)> = c
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    let prompt = chat_messages_prompt(&messages);
    generate_reply(s, prompt, c.max_tokens, c.stream, Reply::Chat).await
}

/// Generates from `prompt` and replies in the `reply` shape, whole or streamed.
async fn generate_reply(s: Served, prompt: String, max_tokens: usize, stream: bool, reply: Reply) -> Response {
    if !s.decoder {
        return error(StatusCode::BAD_REQUEST, "this model is an encoder: use /v1/embeddings");
    }
    let (pieces, mut rx) = async_mpsc::unbounded_channel();
    if s.jobs
        .send(Job::Complete {
            prompt,
            max_tokens,
            pieces,
        })
        .is_err()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the model's runtime has stopped");
    }
    let (id, created) = completion_id();
    let object = match (reply, stream) {
        (Reply::Text, _) => "text_completion",
        (Reply::Chat, false) => "chat.completion",
        (Reply::Chat, true) => "chat.completion.chunk",
    };
    // One choice: the text so far (or this piece of it) and why it ended.
    let choice = move |text: &str, finish: Option<&str>| match reply {
        Reply::Text => json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null}),
        Reply::Chat if stream => {
            json!({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish})
        }
        Reply::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}),
    };
    let envelope = move |choice: Value| json!({"id": id, "object": object, "created": created, "model": s.model, "choices": [choice]});
    if stream {
        let events = UnboundedReceiverStream::new(rx);
        use tokio_stream::StreamExt;
        let chunks = events.map(move |p| {
            let data = match p {
                Piece::Text(t) => envelope(choice(&t, None)),
                Piece::Done(Ok(stats)) => {
                    let mut last = envelope(choice("", Some(finish_reason(&stats))));
                    last["usage"] = usage(&stats);
                    last
                }
                Piece::Done(Err(e)) => error_body(StatusCode::INTERNAL_SERVER_ERROR, e),
            };
            Event::default().data(data.to_string())
        });
        let done = tokio_stream::once(Event::default().data("[DONE]"));
        return Sse::new(chunks.chain(done).map(Ok::<_, Infallible>)).into_response();
    }
    let mut text = String::new();
    while let Some(p) = rx.recv().await {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done(Ok(stats)) => {
                let mut whole = envelope(choice(&text, Some(finish_reason(&stats))));
                whole["usage"] = usage(&stats);
                return Json(whole).into_response();
            }
            Piece::Done(Err(e)) => return failure(&e),
        }
    }
    error(StatusCode::INTERNAL_SERVER_ERROR, "the runtime dropped the request")
}

async fn embeddings(State(s): State<Served>, body: Result<Json<Embeddings>, JsonRejection>) -> Response {
    let e = match parsed(body, "an embeddings request") {
        Ok(e) => e,
        Err(reply) => return reply,
    };
    if s.decoder {
        return error(StatusCode::BAD_REQUEST, "this model is a decoder: use /v1/completions");
    }
    let texts = match e.input {
        Input::One(t) => vec![t],
        Input::Many(ts) => ts,
    };
    let (reply, rx) = tokio::sync::oneshot::channel();
    if s.jobs.send(Job::Embed { texts, reply }).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the model's runtime has stopped");
    }
    match rx.await {
        Ok(Ok(vectors)) => Json(json!({
            "object": "list",
            "model": s.model,
            "data": vectors
                .iter()
                .enumerate()
                .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
                .collect::<Vec<_>>(),
        }))
        .into_response(),
        Ok(Err(e)) => failure(&e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the runtime dropped the request"),
    }
}
