//! What the scenarios share: learnable synthetic images, loopback rings, a task
//! that records (and can die), and a membership that regroups through a board.

use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use hetero_comm::Ring;
use hetero_data::ImageDataset;
use hetero_job::Optimizer;
use hetero_models::{CnnConfig, MlpConfig};
use hetero_train::image_task::{ImageBatch, ImageTask};
use hetero_train::report::EpochRecord;
use hetero_train::{
    Evaluation, Event, Membership, OptimizerConfig, Regroup, RunSummary, Task, TrainError, TrainOptions, Trainer,
    params,
};
use rand::{Rng, SeedableRng};

pub type B = Autodiff<Flex>;

/// Random but learnable images: pixels `i` with `i % 10 == label` are bright.
pub fn synthetic(n: usize, seed: u64) -> ImageDataset {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
    let pixels = labels
        .iter()
        .flat_map(|&l| (0..784).map(move |i| if i % 10 == l as usize { 160u8 } else { 40 }))
        .map(|p| p.saturating_add(rng.random_range(0..60)))
        .collect();
    ImageDataset {
        pixels,
        labels,
        rows: 28,
        cols: 28,
    }
}

pub fn ring_of(world: usize) -> Vec<Ring> {
    hetero_comm::ring::loopback(world, "t", "k").unwrap()
}

/// Every task starts from the same weights: burn's RNG is global, so threads
/// initialising at once would otherwise draw interleaved numbers.
pub fn cnn_task() -> ImageTask<B, hetero_models::Cnn<B>> {
    static INITIAL: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let initial = INITIAL.get_or_init(|| params::flatten(&CnnConfig::new().init::<B>(&Default::default())));
    ImageTask::new(synthetic(64, 1), synthetic(20, 2), move |d| {
        params::load(CnnConfig::new().init(d), initial)
    })
}

/// A task that records which samples it trained on, and dies (panics) at its
/// `die_at`-th training batch when asked to.
pub struct Recorded {
    pub inner: ImageTask<B, hetero_models::Mlp<B>>,
    pub seen: Arc<Mutex<Vec<usize>>>,
    pub die_at: Option<usize>,
    pub calls: std::cell::Cell<usize>,
    /// Time each sample of a training batch takes on top of its compute: a
    /// slower device whose slowness no other test's load can hide.
    pub delay: Duration,
    /// The training batch from which `delay` applies (0: from the first).
    pub delay_from: usize,
    /// Time each sample takes before `delay_from`: equal workers that stay equal
    /// whatever else loads the machine, since sleeping outweighs computing.
    pub delay_before: Duration,
}

impl Task<B> for Recorded {
    type Model = hetero_models::Mlp<B>;
    type Batch = ImageBatch<B>;
    fn train_len(&self) -> usize {
        self.inner.train_len()
    }
    fn test_len(&self) -> usize {
        self.inner.test_len()
    }
    fn model(&self, device: &<B as burn::tensor::backend::BackendTypes>::Device) -> Self::Model {
        self.inner.model(device)
    }
    fn train_batch(
        &self,
        indices: &[usize],
        device: &<B as burn::tensor::backend::BackendTypes>::Device,
    ) -> Self::Batch {
        let n = self.calls.get();
        self.calls.set(n + 1);
        if Some(n) == self.die_at {
            panic!("worker killed on purpose (test)");
        }
        self.seen.lock().unwrap().extend_from_slice(indices);
        let delay = if n >= self.delay_from {
            self.delay
        } else {
            self.delay_before
        };
        std::thread::sleep(delay * indices.len() as u32);
        self.inner.train_batch(indices, device)
    }
    fn test_batch(
        &self,
        indices: &[usize],
        device: &<B as burn::tensor::backend::BackendTypes>::Device,
    ) -> Self::Batch {
        self.inner.test_batch(indices, device)
    }
    fn loss(&self, model: &Self::Model, batch: Self::Batch) -> Tensor<B, 1> {
        self.inner.loss(model, batch)
    }
    fn evaluate(&self, model: &Self::Model, batch: Self::Batch) -> Evaluation {
        self.inner.evaluate(model, batch)
    }
}

pub type Entries = Arc<(Mutex<Vec<(u64, usize, std::net::SocketAddr)>>, Condvar)>;

/// Survivors find each other through a shared board, as they would through the
/// coordinator's rendezvous: ring `generation` has `expect[generation - 1]`
/// members. With `admit_from`, lost workers wait to rejoin from that generation
/// on (the first member to ask at each boundary decides for all, as the
/// coordinator does).
pub struct Board {
    pub me: usize,
    pub expect: Vec<usize>,
    pub board: Entries,
    pub admit_from: Option<u64>,
    pub decisions: Arc<Mutex<std::collections::HashMap<(u64, usize), bool>>>,
}

impl Board {
    pub fn new(me: usize, expect: &[usize], board: &Entries) -> Self {
        Board {
            me,
            expect: expect.to_vec(),
            board: board.clone(),
            admit_from: None,
            decisions: Default::default(),
        }
    }
}

impl Membership for Board {
    fn joiners_waiting(&mut self, generation: u64, epoch: usize) -> Result<bool, TrainError> {
        let admit = self.admit_from.is_some_and(|g| generation >= g);
        Ok(*self
            .decisions
            .lock()
            .unwrap()
            .entry((generation, epoch))
            .or_insert(admit))
    }

    fn regroup(&mut self, generation: u64, _reason: &str) -> Result<Regroup, TrainError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (lock, ready) = &*self.board;
        let mut entries = lock.lock().unwrap();
        entries.push((generation, self.me, listener.local_addr().unwrap()));
        ready.notify_all();
        let mut mine = loop {
            let mine: Vec<_> = entries.iter().filter(|e| e.0 == generation).copied().collect();
            if mine.len() == self.expect[(generation as usize - 1).min(self.expect.len() - 1)] {
                break mine;
            }
            entries = ready.wait(entries).unwrap();
        };
        drop(entries);
        mine.sort_by_key(|e| e.1);
        let members: Vec<usize> = mine.iter().map(|e| e.1).collect();
        let addrs: Vec<_> = mine.iter().map(|e| e.2).collect();
        let rank = members.iter().position(|&m| m == self.me).unwrap();
        let config = hetero_comm::RingConfig::new(rank, members.len(), format!("t#{generation}"), "k");
        Ok(Regroup {
            ring: Ring::form(config, listener, &addrs)?,
            members,
            weights: vec![],
        })
    }
}

/// What a worker thread of a test run ends with: its summary, model and events.
pub type Finished = (RunSummary, Vec<f32>, Vec<Event>);

/// Trains `world` workers on a loopback ring, each in a thread of its own with
/// the task and options `make(rank)` builds there; what every worker ends with.
pub fn train_ring<T: Task<B>>(world: usize, make: impl Fn(usize) -> (T, TrainOptions) + Sync) -> Vec<Finished> {
    thread::scope(|s| {
        let handles: Vec<_> = ring_of(world)
            .into_iter()
            .enumerate()
            .map(|(rank, ring)| {
                let make = &make;
                s.spawn(move || {
                    let (task, options) = make(rank);
                    let mut t = Trainer::new(task, Default::default(), ring, options).unwrap();
                    let mut events = vec![];
                    let summary = t.run(&mut |e| events.push(e)).unwrap();
                    (summary, t.parameters(), events)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A run's losses and accuracies by epoch, without each worker's own clock.
pub fn curve(history: &[EpochRecord]) -> Vec<(usize, f64, Option<f64>)> {
    history
        .iter()
        .map(|h| (h.epoch, h.train_loss, h.test_accuracy))
        .collect()
}

/// Counts how often each of `len` samples was trained on.
pub fn visits(seen: &Mutex<Vec<usize>>, len: usize) -> Vec<usize> {
    let mut counts = vec![0usize; len];
    for &i in seen.lock().unwrap().iter() {
        counts[i] += 1;
    }
    counts
}

pub fn recorded(len: usize, seen: &Arc<Mutex<Vec<usize>>>, die_at: Option<usize>) -> Recorded {
    Recorded {
        inner: ImageTask::new(synthetic(len, 3), synthetic(30, 4), |d| {
            MlpConfig::new().with_hidden(16).init(d)
        }),
        seen: seen.clone(),
        die_at,
        calls: std::cell::Cell::new(0),
        delay: Duration::ZERO,
        delay_from: 0,
        delay_before: Duration::ZERO,
    }
}

/// Starts a parameter server for `clients` on loopback, with `initial` as the
/// global model.
pub fn parameter_server(
    clients: usize,
    initial: Vec<f32>,
    staleness: Option<usize>,
) -> (
    std::net::SocketAddr,
    thread::JoinHandle<Result<hetero_train::param_server::ServerReport, TrainError>>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let channels = hetero_comm::server::accept_clients(&listener, clients, "t", "k", Duration::from_secs(20))?;
        let options = hetero_train::param_server::ServerOptions {
            staleness,
            optimizer: OptimizerConfig {
                kind: Optimizer::Sgd,
                learning_rate: 1e-2,
            },
        };
        hetero_train::param_server::serve(channels, initial, None, options)
    });
    (addr, handle)
}
