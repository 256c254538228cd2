//! The runtime thread of `hetero serve`: continuous batching of generations.
//!
//! ## Design
//! One thread owns the front; HTTP handlers hand it [`Job`]s through the bounded
//! queue. Each of a generation job's `n` choices becomes a *sequence* with a KV
//! cache slot of its own, and the thread loops:
//! 1. Sequences whose client has gone end as cancelled, freeing their slots.
//! 2. Free slots are filled — waiting choices first, then new jobs from the queue
//!    — and the admitted choices prefilled: a job's share one prefill request, its
//!    rows all the same prompt. Their first tokens come out of it. (At most
//!    `batch` sequences run at once.)
//! 3. One decode step runs every running sequence — one token each, one request
//!    to the workers, a batch of rows in their own slots.
//!
//! A sequence that ends (a stop, its length, its client gone) frees its slot at
//! the step it ends, and the next waiting one takes it before the following step:
//! a short answer never waits for a long one, and a new request waits at most one
//! step (plus the prefills admitted with it) rather than a whole generation — the
//! difference from static batching. Prefills go first, as in vLLM's default:
//! the running sequences pause for them, which keeps time to first token short.
//!
//! Why prefills are steps of their own: the rows of one request are equally long,
//! so mixing a prompt of hundreds of tokens with decode rows of one would pad every
//! decode row to the prompt's length. A prefill is one long step for the running
//! sequences; their per-token timings say so.
//!
//! Models whose blocks hold one sequence only (the float path) and encoders run a
//! batch of one: the same loop, one sequence at a time.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::Instant;

use hetero_infer::generate::{self, Decoding, Finish, Generation, GenerationStats, Pick};
use hetero_infer::qllama::MAX_SLOTS;
use hetero_infer::tokenize::TextTokenizer;
use hetero_infer::{Front, InferError, Output, Request, Want};
use tokio::sync::mpsc as async_mpsc;

use crate::InferBackend;
use crate::metrics::{Metrics, Outcome};

/// What the runtime thread is asked to do.
pub(crate) enum Job {
    Generate {
        ids: Vec<u32>,
        generation: Generation,
        /// How many choices.
        n: usize,
        /// Each piece of text, then each choice's end.
        pieces: async_mpsc::UnboundedSender<Piece>,
        arrived: Instant,
    },
    Embed {
        texts: Vec<String>,
        reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, InferError>>,
    },
}

/// What a generation sends back, per choice.
pub(crate) enum Piece {
    Text(usize, String),
    /// A choice's end; one error may end several choices, hence shared.
    Done(usize, Result<GenerationStats, Arc<InferError>>),
}

/// A generation job while any of its choices waits or runs.
struct Asked {
    ids: Vec<u32>,
    generation: Generation,
    n: usize,
    pieces: async_mpsc::UnboundedSender<Piece>,
    arrived: Instant,
    /// Choices admitted so far (they are admitted in order).
    started: usize,
    /// Choices not yet done.
    unfinished: usize,
    cancelled: bool,
}

/// One running choice.
struct Sequence {
    /// Index of its job in the batcher's list.
    job: usize,
    choice: usize,
    slot: usize,
    decoding: Decoding,
    /// The token to feed at the next step.
    next: u32,
}

/// The runtime thread's state.
struct Batcher<'a> {
    front: &'a mut Front<InferBackend>,
    tokenizer: &'a TextTokenizer,
    metrics: &'a Metrics,
    /// Jobs with choices waiting or running; `None` once done (a place sequences
    /// refer to stays put; a new job takes a free place, so the list is never
    /// longer than `batch` plus one).
    jobs: Vec<Option<Asked>>,
    running: Vec<Sequence>,
    free: Vec<usize>,
}

/// Runs jobs from `queue` on `front` until every sender has gone; at most
/// `batch` sequences decode together (one when the model's blocks hold a single
/// sequence).
pub(crate) fn run(
    front: &mut Front<InferBackend>,
    tokenizer: &TextTokenizer,
    metrics: &Metrics,
    queue: mpsc::Receiver<Job>,
    batch: usize,
) {
    let batch = match front.worker.batches() {
        true => batch.clamp(1, MAX_SLOTS),
        false => 1,
    };
    let mut b = Batcher {
        front,
        tokenizer,
        metrics,
        jobs: Vec::new(),
        running: Vec::new(),
        free: (0..batch).rev().collect(),
    };
    loop {
        b.drop_cancelled();
        // Published before the queue may block: a batch emptied by clients that
        // left reads 0 while the thread waits for work.
        b.metrics.running.store(b.running.len() as u64, Relaxed);
        // Fill the free slots: waiting choices first, then new jobs from the queue
        // (blocking only when nothing runs). A job is taken only when a slot is
        // free for it, so the queue's bound stays the bound on waiting requests
        // (and its 429s mean something).
        loop {
            b.admit();
            if b.free.is_empty() {
                break;
            }
            let idle = b.running.is_empty();
            let job = match idle {
                true => queue.recv().ok(),
                false => queue.try_recv().ok(),
            };
            match job {
                Some(job) => {
                    b.metrics.queued.fetch_sub(1, Relaxed);
                    b.accept(job);
                }
                None if idle => return,
                None => break,
            }
        }
        b.metrics.running.store(b.running.len() as u64, Relaxed);
        if !b.running.is_empty() {
            b.step();
            b.metrics.running.store(b.running.len() as u64, Relaxed);
        }
    }
}

impl Batcher<'_> {
    fn accept(&mut self, job: Job) {
        match job {
            Job::Generate {
                ids,
                generation,
                n,
                pieces,
                arrived,
            } => self.place(Asked {
                ids,
                generation,
                n,
                pieces,
                arrived,
                started: 0,
                unfinished: n,
                cancelled: false,
            }),
            // Encoders never have sequences running: embeddings run at once.
            Job::Embed { texts, reply } => {
                self.metrics.running.store(texts.len() as u64, Relaxed);
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let _ = reply.send(generate::embed(self.front, self.tokenizer, &refs));
                self.metrics.running.store(0, Relaxed);
            }
        }
    }

    /// Puts `job` in the first free place of the list.
    fn place(&mut self, job: Asked) {
        match self.jobs.iter().position(Option::is_none) {
            Some(at) => self.jobs[at] = Some(job),
            None => self.jobs.push(Some(job)),
        }
    }

    /// Ends the sequences (and waiting choices) whose client has gone.
    fn drop_cancelled(&mut self) {
        let gone = |job: &Option<Asked>| job.as_ref().is_some_and(|j| j.pieces.is_closed());
        for at in 0..self.jobs.len() {
            if !gone(&self.jobs[at]) {
                continue;
            }
            let Some(job) = self.jobs[at].as_mut() else { continue };
            let unstarted = job.n - job.started;
            job.started = job.n;
            for _ in 0..unstarted {
                self.done(at, usize::MAX, Ok(cancelled_stats(0)));
            }
            while let Some(i) = self.running.iter().position(|s| s.job == at) {
                let mut s = self.running.swap_remove(i);
                s.decoding.cancel();
                self.free.push(s.slot);
                let (_, stats) = s.decoding.finish(&mut |_| false);
                self.done(at, s.choice, Ok(stats));
            }
        }
    }

    /// Prefills waiting choices into free slots, oldest job first.
    fn admit(&mut self) {
        while !self.free.is_empty() {
            let Some(at) = self
                .jobs
                .iter()
                .position(|j| j.as_ref().is_some_and(|j| j.started < j.n))
            else {
                return;
            };
            let Some(job) = self.jobs[at].as_mut() else { return };
            let count = (job.n - job.started).min(self.free.len());
            let choices = job.started..job.started + count;
            job.started += count;
            let slots: Vec<usize> = (0..count).filter_map(|_| self.free.pop()).collect();
            self.prefill(at, choices, slots);
        }
    }

    /// Runs the prompt of job `at` for `choices`, in `slots`; the sequences that go
    /// on join the running batch.
    fn prefill(&mut self, at: usize, choices: std::ops::Range<usize>, slots: Vec<usize>) {
        let Some(job) = self.jobs[at].as_ref() else { return };
        if job.pieces.is_closed() {
            // Its client left while it waited.
            self.free.extend(slots);
            for _ in choices {
                self.done(at, usize::MAX, Ok(cancelled_stats(0)));
            }
            return;
        }
        let made: Result<Vec<Decoding>, _> = choices
            .clone()
            .map(|c| Decoding::new(job.ids.len(), &job.generation, c as u64))
            .collect();
        let mut decodings = match made {
            Ok(d) => d,
            Err(e) => return self.fail(at, choices, slots, Arc::new(e)),
        };
        let want = decodings[0].want();
        let rows = vec![job.ids.clone(); choices.len()];
        let clock = Instant::now();
        let output = self.front.run(&Request::in_slots(rows, slots.clone(), true, want));
        let took = clock.elapsed();
        let mut output = match output {
            Ok(o) => o,
            Err(e) => return self.fail(at, choices, slots, Arc::new(e)),
        };
        for (b, ((choice, slot), decoding)) in choices.zip(slots).zip(decodings.drain(..)).enumerate() {
            let sequence = Sequence {
                job: at,
                choice,
                slot,
                decoding,
                next: 0,
            };
            self.take(sequence, pick(&mut output, b), took);
        }
    }

    /// One decode step of every running sequence.
    fn step(&mut self) {
        let want = match self.running.iter().any(|s| s.decoding.want() == Want::Logits) {
            true => Want::Logits,
            false => Want::NextToken,
        };
        self.metrics.decode_steps.fetch_add(1, Relaxed);
        self.metrics.decoded_rows.fetch_add(self.running.len() as u64, Relaxed);
        let rows = self.running.iter().map(|s| vec![s.next]).collect();
        let slots = self.running.iter().map(|s| s.slot).collect();
        let clock = Instant::now();
        let output = self.front.run(&Request::in_slots(rows, slots, false, want));
        let took = clock.elapsed();
        let running = std::mem::take(&mut self.running);
        match output {
            Ok(mut output) => {
                for (b, sequence) in running.into_iter().enumerate() {
                    self.take(sequence, pick(&mut output, b), took);
                }
            }
            // The front cannot tell which sequences a broken step left intact: all
            // of them end with its error.
            Err(e) => {
                let e = Arc::new(e);
                for s in running {
                    self.free.push(s.slot);
                    self.done(s.job, s.choice, Err(e.clone()));
                }
            }
        }
    }

    /// Hands `sequence` its pick of a step; it runs on or ends.
    fn take(&mut self, mut sequence: Sequence, pick: Result<Pick<'_>, InferError>, took: std::time::Duration) {
        let Some(job) = self.jobs[sequence.job].as_ref() else {
            self.free.push(sequence.slot);
            return;
        };
        let pieces = job.pieces.clone();
        let choice = sequence.choice;
        let mut on_text = |p: &str| pieces.send(Piece::Text(choice, p.to_string())).is_ok();
        let next = pick.and_then(|pick| sequence.decoding.take(self.tokenizer, pick, took, &mut on_text));
        match next {
            Ok(Some(token)) => {
                sequence.next = token;
                self.running.push(sequence);
            }
            Ok(None) => {
                self.free.push(sequence.slot);
                let (_, stats) = sequence.decoding.finish(&mut on_text);
                self.done(sequence.job, choice, Ok(stats));
            }
            Err(e) => {
                self.free.push(sequence.slot);
                self.done(sequence.job, choice, Err(Arc::new(e)));
            }
        }
    }

    /// Ends `choices` of job `at` with `e` before they ran; frees `slots`.
    fn fail(&mut self, at: usize, choices: std::ops::Range<usize>, slots: Vec<usize>, e: Arc<InferError>) {
        self.free.extend(slots);
        for choice in choices {
            self.done(at, choice, Err(e.clone()));
        }
    }

    /// Reports choice `choice` of job `at` done (`usize::MAX`: a choice that never
    /// started, nobody listening); counts the job when its last choice is.
    fn done(&mut self, at: usize, choice: usize, out: Result<GenerationStats, Arc<InferError>>) {
        let Some(job) = self.jobs[at].as_mut() else { return };
        if let Ok(stats) = &out {
            job.cancelled |= stats.finish == Finish::Cancelled;
            self.metrics.tokens_in.fetch_add(stats.prompt_tokens as u64, Relaxed);
            self.metrics.tokens_out.fetch_add(stats.generated as u64, Relaxed);
            if stats.generated > 0 || stats.finish != Finish::Cancelled {
                self.metrics.first_token.observe(stats.first_token);
            }
            for &d in &stats.per_token {
                self.metrics.per_token.observe(d);
            }
        }
        if choice != usize::MAX {
            let _ = job.pieces.send(Piece::Done(choice, out));
        }
        job.unfinished -= 1;
        if job.unfinished == 0 {
            self.metrics.request.observe(job.arrived.elapsed());
            if job.cancelled {
                // The client left: its handler is gone and cannot count it.
                self.metrics.ended(Outcome::Cancelled);
            }
            self.jobs[at] = None;
        }
    }
}

/// Row `b`'s share of a step's output.
fn pick(output: &mut Output, b: usize) -> Result<Pick<'_>, InferError> {
    match output {
        Output::Tokens(tokens) => Ok(Pick::Token(tokens[b])),
        Output::Logits(rows) => Ok(Pick::Logits(&mut rows[b])),
        Output::Embeddings(_) => Err(InferError::Request("this model does not generate tokens".into())),
    }
}

/// The stats of a choice cancelled before it started.
fn cancelled_stats(prompt_tokens: usize) -> GenerationStats {
    GenerationStats {
        prompt_tokens,
        finish: Finish::Cancelled,
        ..Default::default()
    }
}
