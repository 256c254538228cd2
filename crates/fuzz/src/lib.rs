//! Fuzzing every decoder of outside input, on stable Rust.
//!
//! ## Design
//! [`targets`] names the decoders (frames, handshakes, job specs, IDX, CSV,
//! safetensors, GGUF, API request bodies); `corpus/<target>/` holds valid inputs
//! to start from. [`fuzz`] runs every seed, then mutates seeds — bit flips, bytes
//! and 32/64-bit values that break lengths (0, −1, 2³¹ …), cut, repeated and
//! spliced ranges ([`mutate`]) — and keeps each mutant whose outcome (the decoder's
//! answer, reduced to its words) is new, so the corpus grows past the first checks
//! into the later ones. A panic is a crash: the input is written to
//! `target/fuzz-crashes/` and the run fails naming it. Hangs and aborts (a stack
//! overflow, an allocation the machine cannot give) end the process, which fails
//! the run just as loudly.
//!
//! `cargo test -p hetero-fuzz` (part of the suite) runs each target for a fixed
//! number of inputs; `hetero-fuzz all --seconds 600` (or one target) runs longer.
//! The targets are plain `fn(&[u8])`, so a coverage-guided fuzzer (cargo-fuzz on a
//! nightly toolchain) can drive the same functions.

pub mod mutate;
pub mod targets;

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::targets::Target;

/// How long a run goes on.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// This many mutated inputs (the tests: the same inputs every run).
    Inputs(u64),
    /// Until this much time has passed.
    Time(Duration),
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Inputs run, seeds included.
    pub inputs: u64,
    /// Distinct outcomes seen.
    pub outcomes: usize,
    /// Inputs kept (seeds and mutants that reached a new outcome).
    pub corpus: usize,
}

/// A panic, and the input that caused it.
#[derive(Debug)]
pub struct Crash {
    /// The target.
    pub target: &'static str,
    /// The panic's message.
    pub message: String,
    /// Where the input was written.
    pub saved: PathBuf,
}

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} crashed: {} (input in {}; replay: hetero-fuzz {} --replay {})",
            self.target,
            self.message,
            self.saved.display(),
            self.target,
            self.saved.display()
        )
    }
}

/// The committed seeds of `target`.
pub fn seeds(target: &Target) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target.name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.into_iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Most inputs (and outcomes) a run keeps, so that a long run's memory stays flat.
const MAX_KEPT: usize = 4096;

/// Where the last panic happened (the fuzzer's panic hook writes it).
static PANICKED_AT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Runs `input` through `target`, a panic caught and returned as its message.
pub fn run_one(target: &Target, input: &[u8]) -> Result<String, String> {
    catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into());
        match PANICKED_AT.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(at) => format!("{message} at {at}"),
            None => message,
        }
    })
}

/// Fuzzes `target` from `seeds` within `budget`; `seed` fixes the mutations.
/// `progress` is called now and then with the report so far.
pub fn fuzz(
    target: &Target,
    seeds: Vec<Vec<u8>>,
    budget: Budget,
    seed: u64,
    mut progress: impl FnMut(&Report),
) -> Result<Report, Crash> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut report = Report::default();
    let started = Instant::now();
    let quiet = std::panic::take_hook();
    // The crash report says it once, with where it happened.
    std::panic::set_hook(Box::new(|info| {
        if std::env::var_os("HETERO_FUZZ_DEBUG").is_some() {
            eprintln!("panic: {info}");
        }
        if let Some(at) = info.location() {
            *PANICKED_AT.lock().unwrap_or_else(|e| e.into_inner()) = Some(at.to_string());
        }
    }));
    let result = (|| {
        let mut queue: Vec<Vec<u8>> = if seeds.is_empty() { vec![Vec::new()] } else { seeds };
        let mut mutants = 0u64;
        loop {
            let input = match queue.pop() {
                Some(seed) => seed,
                None => {
                    let done = match budget {
                        Budget::Inputs(n) => mutants >= n,
                        Budget::Time(t) => started.elapsed() >= t,
                    };
                    if done {
                        return Ok(());
                    }
                    mutants += 1;
                    let mut input = corpus[rand::Rng::random_range(&mut rng, 0..corpus.len())].clone();
                    mutate::mutate(&mut rng, &mut input, &corpus);
                    input
                }
            };
            report.inputs += 1;
            match run_one(target, &input) {
                Ok(outcome) => {
                    if seen.len() < MAX_KEPT && seen.insert(outcome) || corpus.is_empty() {
                        if corpus.len() < MAX_KEPT {
                            corpus.push(input);
                        } else {
                            let i = rand::Rng::random_range(&mut rng, 0..corpus.len());
                            corpus[i] = input;
                        }
                    }
                }
                Err(message) => return Err(save_crash(target, &input, message)),
            }
            report.outcomes = seen.len();
            report.corpus = corpus.len();
            if report.inputs.is_multiple_of(500) {
                progress(&report);
            }
        }
    })();
    std::panic::set_hook(quiet);
    result.map(|()| report)
}

fn save_crash(target: &Target, input: &[u8], message: String) -> Crash {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-crashes");
    let _ = std::fs::create_dir_all(&dir);
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let saved = dir.join(format!("{}-{hash:016x}", target.name));
    let _ = std::fs::write(&saved, input);
    Crash {
        target: target.name,
        message,
        saved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target, from its committed seeds, through a fixed set of mutants:
    /// no input may make a decoder panic.
    #[test]
    fn no_decoder_panics_on_thousands_of_mutated_inputs() {
        for target in targets::ALL {
            let seeds = seeds(target);
            assert!(!seeds.is_empty(), "no seeds in corpus/{}", target.name);
            let inputs = if target.name == "handshake" { 400 } else { 1500 };
            match fuzz(target, seeds, Budget::Inputs(inputs), 20261206, |_| {}) {
                Ok(report) => assert!(report.outcomes > 1, "{}: every input answered alike", target.name),
                Err(crash) => panic!("{crash}"),
            }
        }
    }

    /// The harness itself: a decoder that panics on one byte is caught, and the
    /// input that did it is saved.
    #[test]
    fn a_panicking_decoder_is_caught_and_its_input_saved() {
        fn fragile(data: &[u8]) -> String {
            if data.contains(&0xEE) {
                panic!("0xEE is not handled");
            }
            format!("{} bytes", data.len().min(3))
        }
        let target = Target {
            name: "fragile",
            what: "a test",
            run: fragile,
        };
        let crash = fuzz(&target, vec![b"abc".to_vec()], Budget::Inputs(100_000), 1, |_| {}).unwrap_err();
        assert!(crash.message.contains("0xEE is not handled"), "{crash}");
        assert!(std::fs::read(&crash.saved).unwrap().contains(&0xEE));
        let _ = std::fs::remove_file(&crash.saved);
    }
}
