//! `hetero serve` as an API user meets it: OpenAI's sampling parameters (seeded,
//! checked, the unsupported ones refused by name), stop texts, the model's own chat
//! template, the context limit, `/metrics`, a bounded queue that answers 429, a
//! client that leaves mid-answer, and continuous batching that changes no answer.
//! Real SmolLM2, real HTTP on loopback.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{get, post_json as post, serve};
use serde_json::{Value, json};

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The value of the metric sample `line_start` (`name{labels}`) on `/metrics`.
fn metric(addr: &str, line_start: &str) -> f64 {
    let (status, text) = get(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with(line_start) && l[line_start.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Polls `/metrics` until `line_start` reads `value` (bounded: a stuck server fails
/// the test rather than hanging it).
fn wait_for(addr: &str, line_start: &str, value: f64) {
    for _ in 0..3000 {
        if metric(addr, line_start) == value {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{line_start} never reached {value}");
}

#[test]
fn sampling_is_seeded_stops_where_asked_and_refuses_what_it_does_not_do() {
    let server = serve(&["smollm2"]);
    let addr = server.1.as_str();
    let completion = |body: &str| {
        let (status, reply) = post(addr, "/v1/completions", body);
        assert_eq!(status, 200, "{body}: {reply}");
        json(&reply)
    };

    // A seed repeats its draws; `n` gives that many choices, counted in the usage.
    let sampled = r#"{"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9,
                      "top_p": 0.95, "top_k": 50, "min_p": 0.01, "seed": 11, "n": 2,
                      "presence_penalty": 0.3, "frequency_penalty": 0.3}"#;
    let (a, b) = (completion(sampled), completion(sampled));
    let texts = |r: &Value| -> Vec<String> {
        let choices = r["choices"].as_array().unwrap();
        choices
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(texts(&a), texts(&b), "the same seed draws the same text");
    assert_eq!(texts(&a).len(), 2, "{a}");
    assert_eq!(a["choices"][1]["index"], 1, "{a}");
    let generated = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((2..=24).contains(&generated), "{a}");

    // Temperature 0 is the greedy default; a stop text ends the answer before it.
    let greedy = completion(r#"{"prompt": "The capital of France is", "max_tokens": 4}"#);
    assert!(
        greedy["choices"][0]["text"].as_str().unwrap().starts_with(" Paris."),
        "{greedy}"
    );
    let cold = completion(r#"{"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}"#);
    assert_eq!(cold["choices"], greedy["choices"]);
    let stopped = completion(r#"{"prompt": "The capital of France is", "max_tokens": 8, "stop": ["."]}"#);
    assert_eq!(stopped["choices"][0]["text"], " Paris", "{stopped}");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop", "{stopped}");
    // Streamed, the held-back text never leaks the stop text.
    let (status, body) = post(
        addr,
        "/v1/completions",
        r#"{"prompt": "The capital of France is", "max_tokens": 8, "stop": ". T", "stream": true}"#,
    );
    assert_eq!(status, 200, "{body}");
    let chunks: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(json)
        .collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    let whole = completion(r#"{"prompt": "The capital of France is", "max_tokens": 8, "stop": ". T"}"#);
    assert_eq!(whole["choices"][0]["text"].as_str(), Some(text.as_str()), "{body}");
    assert!(!text.contains(". T"), "{text}");

    // The model's own chat template frames a conversation: SmolLM2's adds its
    // default system message, so the chat equals that raw prompt.
    let (status, models) = get(addr, "/v1/models");
    assert_eq!(status, 200);
    assert!(models.contains("tokenizer.chat_template"), "{models}");
    let (status, chat) = post(
        addr,
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 6}"#,
    );
    assert_eq!(status, 200, "{chat}");
    let chat = json(&chat);
    let raw = completion(
        r#"{"prompt": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", "max_tokens": 6}"#,
    );
    assert_eq!(
        chat["usage"]["prompt_tokens"], raw["usage"]["prompt_tokens"],
        "{chat}\n{raw}"
    );
    assert_eq!(chat["choices"][0]["message"]["content"], raw["choices"][0]["text"]);

    // Refusals name what is wrong.
    for (path, body, says) in [
        (
            "/v1/completions",
            r#"{"prompt": "Hi", "logprobs": 3}"#,
            "unsupported parameter `logprobs`",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "Hi", "temperature": 7}"#,
            "`temperature` is 7",
        ),
        (
            "/v1/completions",
            r#"{"prompt": "Hi", "max_tokens": 100000}"#,
            "context is 8192 tokens",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "Hi"}], "tools": []}"#,
            "unsupported parameter `tools`",
        ),
    ] {
        let (status, reply) = post(addr, path, body);
        assert_eq!(status, 400, "{body}: {reply}");
        assert!(reply.contains(says), "{body}: {reply}");
    }

    // The figures: every answered request's first token, and the refusals.
    assert!(metric(addr, "hetero_time_to_first_token_seconds_count") >= 9.0);
    assert!(metric(addr, "hetero_time_per_output_token_seconds_count") > 0.0);
    assert!(metric(addr, "hetero_generation_tokens_total") >= 24.0);
    assert_eq!(metric(addr, "hetero_requests_total{outcome=\"refused\"}"), 4.0);
    assert_eq!(metric(addr, "hetero_queue_depth"), 0.0);
}

#[test]
fn a_full_queue_answers_busy_and_a_client_that_leaves_stops_its_generation() {
    // One sequence at a time, so the long answer holds the runtime.
    let server = serve(&["smollm2", "--queue", "1", "--batch", "1"]);
    let addr = server.1.clone();
    // A long streamed answer holds the runtime.
    let mut long = std::net::TcpStream::connect(&addr).unwrap();
    let body = r#"{"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 4000, "stream": true}"#;
    write!(
        long,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 512];
    let n = long.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("200 OK"));
    wait_for(&addr, "hetero_running_sequences", 1.0);
    // One more waits in the queue…
    let waiting = {
        let addr = addr.clone();
        std::thread::spawn(move || post(&addr, "/v1/completions", r#"{"prompt": "Hi", "max_tokens": 1}"#))
    };
    wait_for(&addr, "hetero_queue_depth", 1.0);
    // …and the next is told the server is busy, at once.
    let (status, reply) = post(&addr, "/v1/completions", r#"{"prompt": "Hi", "max_tokens": 1}"#);
    assert_eq!(status, 429, "{reply}");
    assert!(reply.contains("busy"), "{reply}");
    // The long answer's client leaves: its generation stops, the waiting one runs.
    drop(long);
    let (status, reply) = waiting.join().unwrap();
    assert_eq!(status, 200, "{reply}");
    wait_for(&addr, "hetero_requests_total{outcome=\"cancelled\"}", 1.0);
    assert_eq!(metric(&addr, "hetero_requests_total{outcome=\"busy\"}"), 1.0);
    assert!(metric(&addr, "hetero_generation_tokens_total") < 4000.0);
}

#[test]
fn batched_greedy_answers_are_the_answers_alone() {
    let server = serve(&["smollm2", "--batch", "4"]);
    let addr = server.1.clone();
    let prompts = [
        "The capital of France is",
        "1, 2, 3, 4,",
        "Once upon a time, in a small village by the sea, there lived",
        "def fibonacci(n):",
        "The colour of the sky on a clear day is",
    ];
    let answer = |addr: &str, prompt: &str| {
        let body = json!({"prompt": prompt, "max_tokens": 12}).to_string();
        let (status, reply) = post(addr, "/v1/completions", &body);
        assert_eq!(status, 200, "{reply}");
        json(&reply)["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let alone: Vec<String> = prompts.iter().map(|p| answer(&addr, p)).collect();
    let steps_alone = metric(&addr, "hetero_decode_steps_total");
    assert_eq!(
        metric(&addr, "hetero_decoded_sequences_total"),
        steps_alone,
        "one at a time, one per step"
    );

    // A long answer runs while the five arrive: they join its batch (four slots, so
    // one waits for a slot), each in a cache slot of its own, at its own position.
    let mut long = std::net::TcpStream::connect(&addr).unwrap();
    let body = r#"{"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 4000, "stream": true}"#;
    write!(
        long,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 512];
    let n = long.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("200 OK"));
    wait_for(&addr, "hetero_running_sequences", 1.0);
    let together: Vec<String> = prompts
        .iter()
        .map(|p| {
            let (addr, p) = (addr.clone(), p.to_string());
            std::thread::spawn(move || answer(&addr, &p))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    drop(long);
    assert_eq!(together, alone, "a sequence's answer does not depend on its neighbours");
    let steps = metric(&addr, "hetero_decode_steps_total") - steps_alone;
    let rows = metric(&addr, "hetero_decoded_sequences_total") - steps_alone;
    assert!(
        rows > steps + 5.0,
        "the five were decoded beside the long one: {rows} rows in {steps} steps"
    );
    wait_for(&addr, "hetero_running_sequences", 0.0);
}

#[test]
fn with_an_api_key_only_requests_that_present_it_reach_the_model() {
    let server = serve(&["minilm", "--api-key", "sk-hetero-test"]);
    let addr = server.1.as_str();
    let body = r#"{"input": "a key opens the door"}"#;
    let embed = |headers: &[(&str, &str)]| {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        common::request(addr, "POST", "/v1/embeddings", &all, body)
    };

    let (status, reply) = embed(&[]);
    assert_eq!(status, 401, "{reply}");
    assert_eq!(json(&reply)["error"]["code"], "invalid_api_key", "{reply}");
    assert!(reply.contains("an API key is required"), "{reply}");
    let (status, reply) = embed(&[("Authorization", "Bearer sk-hetero-tes")]);
    assert_eq!(status, 401, "{reply}");
    assert!(reply.contains("the API key is wrong"), "{reply}");
    let (status, _) = common::request(addr, "GET", "/v1/models", &[], "");
    assert_eq!(status, 401, "listing the model needs the key too");

    let (status, reply) = embed(&[("Authorization", "Bearer sk-hetero-test")]);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(common::embeddings_of(&reply).len(), 1);
    // Refused requests never reached the model; metrics stay open to a scraper.
    assert_eq!(metric(addr, "hetero_requests_total{outcome=\"done\"}"), 1.0);
}
