//! `hetero serve`: an HTTP API in front of a placed model.
//!
//! - `POST /v1/completions` `{"prompt", "max_tokens"?, "chat"?, "stream"?}` (decoders):
//!   the text, token counts and timings; with `"stream": true`, server-sent events,
//!   one `{"text": …}` per piece and a final `{"done": true, …}`.
//! - `POST /v1/embeddings` `{"input": "…" | ["…", …]}` (encoders): one normalised
//!   vector per input.
//! - `GET /v1/models`: the model and its placement.
//!
//! The mesh runs one request at a time: one thread owns the front and takes jobs
//! from a queue, so HTTP handlers never block the runtime (or each other's sockets).

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use hetero_infer::generate::{self, GenerationStats, chat_prompt};
use hetero_infer::{Arch, InferError};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc as async_mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use hetero_infer::Front;
use hetero_infer::tokenize::TextTokenizer;

use crate::infer_cmd::{Children, InferBackend, Placing, describe, open_model, start_front};

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
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Embeddings {
    input: Input,
}

/// `hetero serve`.
pub fn serve(model_name: &str, listen: &str, place: &Placing) -> Result<ExitCode> {
    let mut model = open_model(model_name)?;
    let Some(tokenizer) = model.tokenizer.take() else {
        anyhow::bail!("{model_name} has no tokenizer (random weights, for timing): serve a real model");
    };
    let (front, children) = start_front(model_name, &model, place)?;
    serve_front(front, children, tokenizer, model_name, &model.arch, listen)
}

/// Serves HTTP on `listen` with a formed front, until the process is stopped.
pub fn serve_front(
    mut front: Front<InferBackend>,
    children: Children,
    tokenizer: TextTokenizer,
    model_name: &str,
    arch: &Arch,
    listen: &str,
) -> Result<ExitCode> {
    let decoder = matches!(arch, Arch::Llama(_));
    let info = json!({
        "model": model_name,
        "kind": if decoder { "decoder" } else { "encoder" },
        "layers": arch.layers(),
        "workers": front.worker.placement().workers,
        "placement": describe(front.worker.placement()),
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
    let state = Served { jobs, info, decoder };
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(complete))
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
    })?;
    Ok(ExitCode::SUCCESS)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({"error": message.to_string()}))).into_response()
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

fn stats_json(stats: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated,
        "stopped": stats.stopped,
        "first_token_ms": stats.first_token.as_secs_f64() * 1e3,
        "tokens_per_second": stats.tokens_per_second(),
        "mean_token_ms": stats.mean_token_latency().as_secs_f64() * 1e3,
    })
}

async fn complete(
    State(s): State<Served>,
    body: Result<Json<Completion>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(c) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("a completion request: {e}")),
    };
    if !s.decoder {
        return error(StatusCode::BAD_REQUEST, "this model is an encoder: use /v1/embeddings");
    }
    let (pieces, mut rx) = async_mpsc::unbounded_channel();
    let prompt = if c.chat { chat_prompt(&c.prompt) } else { c.prompt };
    if s.jobs
        .send(Job::Complete {
            prompt,
            max_tokens: c.max_tokens,
            pieces,
        })
        .is_err()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the model's runtime has stopped");
    }
    if c.stream {
        let events = UnboundedReceiverStream::new(rx);
        use tokio_stream::StreamExt;
        let stream = events.map(|p| {
            Ok::<_, Infallible>(match p {
                Piece::Text(t) => Event::default().data(json!({"text": t}).to_string()),
                Piece::Done(Ok(stats)) => {
                    Event::default().data(json!({"done": true, "usage": stats_json(&stats)}).to_string())
                }
                Piece::Done(Err(e)) => Event::default().data(json!({"done": true, "error": e.to_string()}).to_string()),
            })
        });
        return Sse::new(stream).into_response();
    }
    let mut text = String::new();
    while let Some(p) = rx.recv().await {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done(Ok(stats)) => return Json(json!({"text": text, "usage": stats_json(&stats)})).into_response(),
            Piece::Done(Err(e)) => return failure(&e),
        }
    }
    error(StatusCode::INTERNAL_SERVER_ERROR, "the runtime dropped the request")
}

async fn embeddings(
    State(s): State<Served>,
    body: Result<Json<Embeddings>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(e) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("an embeddings request: {e}")),
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
            "data": vectors.iter().enumerate().map(|(i, v)| json!({"index": i, "embedding": v})).collect::<Vec<_>>()
        }))
        .into_response(),
        Ok(Err(e)) => failure(&e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the runtime dropped the request"),
    }
}
