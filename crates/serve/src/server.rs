//! The HTTP API in front of a placed model (`hetero serve`, an inference job's rank 0).
//!
//! The requests and replies are OpenAI's, so its clients work unchanged
//! ([`crate::requests`] lists the parameters; any other is refused by name):
//! - `POST /v1/completions` `{"prompt", "max_tokens"?, "chat"?, "stream"?, sampling…}`
//!   (decoders): a `text_completion` with the text of each of `n` choices, why it
//!   ended, token counts and (Hetero's additions to `usage`) timings; with
//!   `"stream": true`, server-sent events, one chunk per piece, one with each
//!   choice's reason, the usage on the last, then `[DONE]`. `"chat": true` frames
//!   the prompt as one user message.
//! - `POST /v1/chat/completions` `{"messages": [{"role", "content"}, …], …}`: the
//!   same for a conversation, framed by the model's chat template, as a
//!   `chat.completion` (or its chunks).
//! - `POST /v1/embeddings` `{"input": "…" | ["…", …]}` (encoders): one normalised
//!   vector per input.
//! - `GET /v1/models`: the model, with its kind and placement.
//! - `GET /metrics`: [`crate::metrics`], in Prometheus's format.
//!
//! With an API key ([`crate::auth`]) every `/v1/…` route answers 401 to a request
//! that does not present it; `/metrics` stays open.
//!
//! One thread owns the front and takes requests from a bounded queue, so HTTP
//! handlers never block the runtime (or each other's sockets); a request that
//! finds the queue full is answered 429 at once, and one whose client has gone
//! is dropped (or stopped between tokens) rather than generated for no one. That
//! thread batches generations continuously ([`crate::batcher`]).
//! Handlers check and tokenize a request before it is queued, so a bad one is a
//! 400 that costs the model nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use hetero_infer::generate::{self, Finish, Generation, GenerationStats};
use hetero_infer::{Arch, InferError};
use serde_json::{Value, json};
use tokio::sync::mpsc as async_mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use hetero_infer::Front;
use hetero_infer::tokenize::TextTokenizer;

use crate::InferBackend;
use crate::auth::ApiKey;
use crate::batcher::{self, Job, Piece};
use crate::front::{Children, start_front};
use crate::metrics::{Metrics, Outcome};
use crate::placing::{Placing, describe, open_model};
use crate::requests::{self, GenerateRequest, Prompt};

/// How the HTTP side runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The address to serve on.
    pub listen: String,
    /// Requests that may wait for the model; one more is answered 429.
    pub queue: usize,
    /// Sequences that may decode together ([`crate::batcher`]).
    pub batch: usize,
    /// Most positions one sequence may reach (`None`: the model's context).
    pub context: Option<usize>,
    /// Print each worker's memory under the placement and stop (`--dry-run`).
    pub dry_run: bool,
    /// The key `/v1/…` requests must present ([`crate::auth`]); `None`: open.
    pub api_key: Option<ApiKey>,
}

impl ServeOptions {
    /// On `listen`, with the default queue.
    pub fn on(listen: &str) -> Self {
        ServeOptions {
            listen: listen.into(),
            queue: DEFAULT_QUEUE,
            batch: DEFAULT_BATCH,
            context: None,
            dry_run: false,
            api_key: None,
        }
    }
}

/// Requests that may wait for the model by default.
pub const DEFAULT_QUEUE: usize = 64;

/// Sequences that may decode together by default.
pub const DEFAULT_BATCH: usize = 16;

#[derive(Clone)]
struct Served {
    jobs: mpsc::SyncSender<Job>,
    model: String,
    info: Value,
    decoder: bool,
    tokenizer: Arc<TextTokenizer>,
    /// The decoder's context, in tokens.
    context: usize,
    queue: usize,
    metrics: Arc<Metrics>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Embeddings {
    input: Input,
    #[serde(default)]
    #[allow(dead_code)] // the served model, whatever a client names
    model: Option<String>,
    /// `float` (the default) or `base64` (little-endian f32s, as OpenAI's own
    /// Python client asks for).
    #[serde(default)]
    encoding_format: EncodingFormat,
    #[serde(default)]
    #[allow(dead_code)] // accepted as OpenAI does; not used
    user: Option<String>,
}

#[derive(serde::Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

/// Which of OpenAI's two reply shapes a completion takes.
#[derive(Clone, Copy)]
enum Reply {
    /// `/v1/completions`: `text_completion`, the text in `choices[i].text`.
    Text,
    /// `/v1/chat/completions`: `chat.completion`, the text in `choices[i].message`.
    Chat,
}

/// Opens `model_name`, places it and serves it until the process is stopped
/// (`hetero serve`).
pub fn serve(model_name: &str, options: &ServeOptions, place: &Placing) -> Result<()> {
    let mut model = open_model(model_name)?;
    let Some(tokenizer) = model.tokenizer.take() else {
        anyhow::bail!("{model_name} has no tokenizer (random weights, for timing): serve a real model");
    };
    let mut place = place.clone();
    if let Some(c) = model.arch.llama() {
        let context = options.context.unwrap_or(c.context);
        if context == 0 || context > c.context {
            anyhow::bail!("--context {context}: from 1 to the model's context, {}", c.context);
        }
        // Quantized decoders run --batch sequences at once; the f32 path one.
        let quantized = hetero_infer::qllama::runs_on_blocks(&model.arch, model.weights.as_ref());
        place.budget.sequences = if quantized { options.batch } else { 1 };
        place.budget.positions = context;
    }
    if options.dry_run {
        return crate::memory::dry_run(model_name, &model, &place);
    }
    let started = start_front(model_name, &model, &place)?;
    serve_front(
        started.front,
        started.children,
        tokenizer,
        model_name,
        &model.arch,
        options,
    )
}

/// Serves HTTP with a formed front, until the process is stopped.
pub fn serve_front(
    mut front: Front<InferBackend>,
    children: Children,
    tokenizer: TextTokenizer,
    model_name: &str,
    arch: &Arch,
    options: &ServeOptions,
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
            "chat_template": format!("{:?}", tokenizer.chat.origin),
        }],
    });
    let tokenizer = Arc::new(tokenizer);
    let metrics = Arc::new(Metrics::default());
    let (jobs, queue) = mpsc::sync_channel::<Job>(options.queue.max(1));
    let batch = options.batch;
    {
        let (tokenizer, metrics) = (tokenizer.clone(), metrics.clone());
        std::thread::spawn(move || {
            let _children = children;
            batcher::run(&mut front, &tokenizer, &metrics, queue, batch);
        });
    }
    let state = Served {
        jobs,
        model: model_name.to_string(),
        info,
        decoder,
        tokenizer,
        context: arch
            .llama()
            .map_or(0, |c| options.context.unwrap_or(c.context).min(c.context)),
        queue: options.queue.max(1),
        metrics,
    };
    let mut api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(complete))
        .route("/v1/chat/completions", post(chat_complete))
        .route("/v1/embeddings", post(embeddings));
    if let Some(key) = &options.api_key {
        api = api.route_layer(axum::middleware::from_fn_with_state(key.clone(), crate::auth::require));
    }
    let app = api.route("/metrics", get(metrics_text)).with_state(state);
    let rt = tokio::runtime::Runtime::new()?;
    let listen = &options.listen;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        println!("serving {model_name} on http://{addr}");
        if options.api_key.is_none() && !addr.ip().is_loopback() {
            eprintln!(
                "warning: serving on {addr} with no API key: anyone who reaches this address may use the \
                 model (give --api-key, --api-key-file or HETERO_API_KEY)"
            );
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        axum::serve(listener, app).await.context("the HTTP server stopped")
    })
}

impl Served {
    /// Queues `job`, or answers why it cannot wait.
    #[allow(clippy::result_large_err)] // the error is the reply, returned at once
    fn enqueue(&self, job: Job) -> Result<(), Response> {
        // Counted first: the runtime may take it (and count it out) at once.
        self.metrics.queued.fetch_add(1, Relaxed);
        let sent = self.jobs.try_send(job);
        if sent.is_err() {
            self.metrics.queued.fetch_sub(1, Relaxed);
        }
        match sent {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(_)) => {
                self.metrics.ended(Outcome::Busy);
                Err(error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "the server is busy: {} requests are waiting; try again shortly",
                        self.queue
                    ),
                ))
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                self.metrics.ended(Outcome::Failed);
                Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the model's runtime has stopped",
                ))
            }
        }
    }

    /// A 400 for `message`, counted.
    fn refuse(&self, message: impl std::fmt::Display) -> Response {
        self.metrics.ended(Outcome::Refused);
        error(StatusCode::BAD_REQUEST, message)
    }
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

async fn metrics_text(State(s): State<Served>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// OpenAI's `usage` over all choices, with Hetero's timings (the first
/// choice's) beside its token counts.
fn usage(stats: &[GenerationStats]) -> Value {
    let prompt = stats.first().map_or(0, |s| s.prompt_tokens);
    let generated: usize = stats.iter().map(|s| s.generated).sum();
    let first = stats.first().cloned().unwrap_or_default();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "first_token_ms": first.first_token.as_secs_f64() * 1e3,
        "tokens_per_second": first.tokens_per_second(),
        "mean_token_ms": first.mean_token_latency().as_secs_f64() * 1e3,
    })
}

/// OpenAI's `finish_reason`.
fn finish_reason(stats: &GenerationStats) -> &'static str {
    match stats.finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::Cancelled => "cancelled",
    }
}

/// A completion's id (unique in this process) and creation time (Unix seconds).
fn completion_id() -> (String, u64) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Relaxed);
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (format!("cmpl-{created}-{n}"), created)
}

async fn complete(State(s): State<Served>, body: Result<Json<Value>, JsonRejection>) -> Response {
    match body {
        Ok(Json(body)) => match requests::completion(body) {
            Ok(r) => generate_reply(s, r, Reply::Text).await,
            Err(e) => s.refuse(e),
        },
        Err(e) => s.refuse(format!("a completion request: {e}")),
    }
}

async fn chat_complete(State(s): State<Served>, body: Result<Json<Value>, JsonRejection>) -> Response {
    match body {
        Ok(Json(body)) => match requests::chat_completion(body) {
            Ok(r) => generate_reply(s, r, Reply::Chat).await,
            Err(e) => s.refuse(e),
        },
        Err(e) => s.refuse(format!("a chat completion request: {e}")),
    }
}

/// Generates what `r` asks and replies in the `reply` shape, whole or streamed.
async fn generate_reply(s: Served, r: GenerateRequest, reply: Reply) -> Response {
    let arrived = Instant::now();
    if !s.decoder {
        return s.refuse("this model is an encoder: use /v1/embeddings");
    }
    let prompt = match &r.prompt {
        Prompt::Text(t) => Ok(t.clone()),
        Prompt::Chat(messages) => s.tokenizer.chat.render(messages),
    };
    let checked = prompt.and_then(|p| generate::prompt_ids(&s.tokenizer, &p, r.max_tokens, s.context));
    let (ids, max_tokens) = match checked {
        Ok(checked) => checked,
        Err(e) => return s.refuse(e),
    };
    let (pieces, mut rx) = async_mpsc::unbounded_channel();
    let job = Job::Generate {
        ids,
        generation: Generation {
            max_tokens,
            ..r.generation
        },
        n: r.n,
        pieces,
        arrived,
    };
    if let Err(busy) = s.enqueue(job) {
        return busy;
    }
    let (id, created) = completion_id();
    let stream = r.stream;
    let object = match (reply, stream) {
        (Reply::Text, _) => "text_completion",
        (Reply::Chat, false) => "chat.completion",
        (Reply::Chat, true) => "chat.completion.chunk",
    };
    // One choice: the text so far (or this piece of it) and why it ended.
    let choice = move |index: usize, text: &str, finish: Option<&str>| match reply {
        Reply::Text => json!({"index": index, "text": text, "finish_reason": finish, "logprobs": null}),
        Reply::Chat if stream => {
            json!({"index": index, "delta": {"role": "assistant", "content": text}, "finish_reason": finish})
        }
        Reply::Chat => {
            json!({"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
        }
    };
    let model = s.model.clone();
    let envelope = move |choices: Vec<Value>| json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
    let n = r.n;
    let metrics = s.metrics.clone();
    if stream {
        // Each choice's end is a chunk; the usage rides on the last one's.
        let mut ended: Vec<GenerationStats> = Vec::new();
        let events = UnboundedReceiverStream::new(rx);
        use tokio_stream::StreamExt;
        let chunks = events.map(move |p| {
            let data = match p {
                Piece::Text(i, t) => envelope(vec![choice(i, &t, None)]),
                Piece::Done(i, Ok(stats)) => {
                    let mut chunk = envelope(vec![choice(i, "", Some(finish_reason(&stats)))]);
                    ended.push(stats);
                    if ended.len() == n {
                        chunk["usage"] = usage(&ended);
                        metrics.ended(Outcome::Done);
                    }
                    chunk
                }
                Piece::Done(_, Err(e)) => {
                    metrics.ended(Outcome::Failed);
                    error_body(StatusCode::INTERNAL_SERVER_ERROR, e)
                }
            };
            Event::default().data(data.to_string())
        });
        let done = tokio_stream::once(Event::default().data("[DONE]"));
        return Sse::new(chunks.chain(done).map(Ok::<_, Infallible>)).into_response();
    }
    let mut texts = vec![String::new(); n];
    let mut ended: Vec<Option<GenerationStats>> = vec![None; n];
    while let Some(p) = rx.recv().await {
        match p {
            Piece::Text(i, t) => texts[i].push_str(&t),
            Piece::Done(i, Ok(stats)) => {
                ended[i] = Some(stats);
                if ended.iter().all(Option::is_some) {
                    let stats: Vec<GenerationStats> = ended.into_iter().flatten().collect();
                    let choices = (0..n)
                        .map(|i| choice(i, &texts[i], Some(finish_reason(&stats[i]))))
                        .collect();
                    let mut whole = envelope(choices);
                    whole["usage"] = usage(&stats);
                    s.metrics.ended(Outcome::Done);
                    return Json(whole).into_response();
                }
            }
            Piece::Done(_, Err(e)) => {
                s.metrics.ended(Outcome::Failed);
                return failure(&e);
            }
        }
    }
    s.metrics.ended(Outcome::Failed);
    error(StatusCode::INTERNAL_SERVER_ERROR, "the runtime dropped the request")
}

async fn embeddings(State(s): State<Served>, body: Result<Json<Embeddings>, JsonRejection>) -> Response {
    let e = match body {
        Ok(Json(e)) => e,
        Err(e) => return s.refuse(format!("an embeddings request: {e}")),
    };
    if s.decoder {
        return s.refuse("this model is a decoder: use /v1/completions");
    }
    let texts = match e.input {
        Input::One(t) => vec![t],
        Input::Many(ts) => ts,
    };
    let format = e.encoding_format;
    let (reply, rx) = tokio::sync::oneshot::channel();
    if let Err(busy) = s.enqueue(Job::Embed { texts, reply }) {
        return busy;
    }
    match rx.await {
        Ok(Ok(vectors)) => {
            s.metrics.ended(Outcome::Done);
            Json(json!({
                "object": "list",
                "model": s.model,
                "data": vectors
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let embedding = match format {
                            EncodingFormat::Float => json!(v),
                            EncodingFormat::Base64 => {
                                use base64::Engine;
                                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                            }
                        };
                        json!({"object": "embedding", "index": i, "embedding": embedding})
                    })
                    .collect::<Vec<_>>(),
            }))
            .into_response()
        }
        Ok(Err(e)) => {
            s.metrics.ended(Outcome::Failed);
            failure(&e)
        }
        Err(_) => {
            s.metrics.ended(Outcome::Failed);
            error(StatusCode::INTERNAL_SERVER_ERROR, "the runtime dropped the request")
        }
    }
}
