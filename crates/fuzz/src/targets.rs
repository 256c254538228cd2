//! The fuzz targets: each takes any bytes, feeds them to one decoder of outside
//! input the way the product does, and returns how the decoder answered. An error
//! is a good answer; a panic, a hang or an abort is the bug a target exists to find.
//!
//! The outcome string is the fuzzer's only view of what happened inside: inputs
//! that reach a new outcome (another error, a success) are kept and mutated
//! further, which walks the fuzzer past the first checks into the later ones.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// One decoder under test.
#[derive(Clone, Copy)]
pub struct Target {
    /// Its name: the corpus folder and the command-line argument.
    pub name: &'static str,
    /// What it reads.
    pub what: &'static str,
    /// Runs one input; returns a short description of the answer.
    pub run: fn(&[u8]) -> String,
}

/// Every target.
pub const ALL: &[Target] = &[
    Target {
        name: "frame",
        what: "data-plane frames, plain and sealed (comm::frame, comm::link)",
        run: frame,
    },
    Target {
        name: "handshake",
        what: "the data-plane handshake, as the accepting and the connecting side",
        run: handshake,
    },
    Target {
        name: "spec",
        what: "job specs, TOML and the stored JSON (job::spec)",
        run: spec,
    },
    Target {
        name: "idx",
        what: "IDX datasets, raw or gzip (data::idx)",
        run: idx,
    },
    Target {
        name: "csv",
        what: "CSV datasets, raw or gzip (data::csv)",
        run: csv,
    },
    Target {
        name: "safetensors",
        what: "safetensors weight files (infer::tensor_files)",
        run: safetensors,
    },
    Target {
        name: "gguf",
        what: "GGUF model files: header, metadata, tensor directory and tensors (infer::gguf)",
        run: gguf,
    },
    Target {
        name: "command",
        what: "the inference front's commands to its followers (infer::command)",
        run: command,
    },
    Target {
        name: "request",
        what: "the OpenAI API's request bodies (serve::requests)",
        run: request,
    },
];

/// The first words of an answer: enough to tell outcomes apart, not so much that
/// every input looks new.
fn outcome<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    outcome_in(r, None)
}

/// [`outcome`] for a decoder that read the file `path`, whose name errors repeat.
fn outcome_in<T, E: std::fmt::Display>(r: Result<T, E>, path: Option<&std::path::Path>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => {
            // The first words say which check failed; what follows (numbers, names,
            // quoted input) differs from input to input and would make every input
            // look new.
            let mut text = e.to_string();
            if let Some(p) = path {
                text = text.replace(&p.display().to_string(), "");
            }
            let words: Vec<&str> = text
                .split(|c: char| !c.is_alphabetic())
                .filter(|w| w.len() > 2)
                .take(8)
                .collect();
            format!("error: {}", words.join(" "))
        }
    }
}

fn frame(data: &[u8]) -> String {
    use hetero_comm::frame::{FrameKind, read_frame};
    use hetero_comm::link::Receiver;
    let mut answers = Vec::new();
    let mut plain = data;
    let mut buf = Vec::new();
    for _ in 0..4 {
        match read_frame(&mut plain, &mut buf, 1 << 20, "fuzz", "fuzzing") {
            Ok(FrameKind::Data) => answers.push("data".to_string()),
            Ok(kind) => answers.push(format!("{kind:?}")),
            Err(e) => {
                answers.push(outcome::<(), _>(Err(e)));
                break;
            }
        }
    }
    let mut sealed = Receiver::new(data, Some(&[7u8; 32]));
    for _ in 0..4 {
        if let Err(e) = sealed.recv(&mut buf, 1 << 20, "fuzz", "fuzzing") {
            answers.push(outcome::<(), _>(Err(e)));
            break;
        }
    }
    answers.join(" | ")
}

/// A loopback listener shared by the handshake target's runs.
fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("a loopback port for the handshake target"))
}

/// A connected pair of loopback streams: (ours, theirs).
fn pair() -> (TcpStream, TcpStream) {
    let l = listener();
    let ours = TcpStream::connect(l.local_addr().expect("bound")).expect("loopback connect");
    let (theirs, _) = l.accept().expect("loopback accept");
    for s in [&ours, &theirs] {
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    }
    (ours, theirs)
}

fn handshake(data: &[u8]) -> String {
    use std::io::Write;

    use hetero_comm::handshake::{accept, connect};
    use hetero_comm::link::Cipher;
    // The bytes as a stranger's opening, to the accepting side …
    let (mut ours, mut theirs) = pair();
    let _ = theirs.write_all(data);
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let accepted = outcome(accept(&mut ours, "token", "job-1", Cipher::Aes256Gcm));
    // … and as a stranger's reply, to the connecting side.
    let (mut ours, mut theirs) = pair();
    let _ = theirs.write_all(data);
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let connected = outcome(connect(&mut ours, "token", "job-1", 1, Cipher::Aes256Gcm));
    format!("{accepted} | {connected}")
}

fn spec(data: &[u8]) -> String {
    let Ok(text) = std::str::from_utf8(data) else {
        return "not UTF-8".into();
    };
    let toml = outcome(hetero_job::spec::JobSpec::parse(text));
    let json = outcome(hetero_job::spec::JobSpec::from_json(text));
    format!("{toml} | {json}")
}

fn idx(data: &[u8]) -> String {
    let parsed = outcome(hetero_data::idx::parse_idx(data));
    let path = scratch("idx.gz");
    std::fs::write(&path, data).expect("scratch file");
    format!(
        "{parsed} | {}",
        outcome_in(hetero_data::idx::read_idx(&path), Some(&path))
    )
}

fn csv(data: &[u8]) -> String {
    let path = scratch("data.csv");
    std::fs::write(&path, data).expect("scratch file");
    let free = outcome_in(hetero_data::csv::load(&path, "label", None), Some(&path));
    let shaped = outcome_in(hetero_data::csv::load(&path, "label", Some((2, 2))), Some(&path));
    format!("{free} | {shaped}")
}

fn safetensors(data: &[u8]) -> String {
    use hetero_infer::weights::Weights;
    let path = scratch("model.safetensors");
    std::fs::write(&path, data).expect("scratch file");
    match hetero_infer::tensor_files::SafeTensors::open(&path) {
        Ok(file) => {
            let names: Vec<String> = file.names().map(str::to_string).collect();
            let reads: Vec<String> = names
                .iter()
                .take(8)
                .map(|n| outcome_in(file.read(n), Some(&path)))
                .collect();
            format!("ok: {}", reads.join(", "))
        }
        Err(e) => outcome_in::<(), _>(Err(e), Some(&path)),
    }
}

fn gguf(data: &[u8]) -> String {
    use hetero_infer::weights::Weights;
    let path = scratch("model.gguf");
    std::fs::write(&path, data).expect("scratch file");
    let tensors = match hetero_infer::gguf::Gguf::open(&path) {
        Ok(file) => {
            let names: Vec<String> = file.tensors.keys().take(8).cloned().collect();
            let reads: Vec<String> = names.iter().map(|n| outcome_in(file.read(n), Some(&path))).collect();
            format!("ok: {}", reads.join(", "))
        }
        Err(e) => outcome_in::<(), _>(Err(e), Some(&path)),
    };
    // The whole model: its configuration from the metadata, its tokenizer, its shapes.
    let model = outcome_in(hetero_infer::models::open_gguf(&path), Some(&path));
    format!("{tensors} | {model}")
}

fn command(data: &[u8]) -> String {
    // What the follower decodes must encode back to the same bytes.
    match hetero_infer::command::Command::decode(data) {
        Ok(c) => {
            assert_eq!(c.encode(), data, "a command that does not encode back to its bytes");
            "ok".into()
        }
        Err(e) => outcome::<(), _>(Err(e)),
    }
}

fn request(data: &[u8]) -> String {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return "not JSON".into();
    };
    let text = outcome(hetero_serve::requests::completion(body.clone()));
    let chat = outcome(hetero_serve::requests::chat_completion(body));
    format!("{text} | {chat}")
}

/// A file of this process's own for targets whose decoder reads a path.
fn scratch(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("hetero-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a scratch folder");
        d
    });
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_alphanumeric(), "");
    dir.join(format!("{thread}-{name}"))
}
