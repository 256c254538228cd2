//! The parameter server: holds the global model and its optimiser, and turns the
//! gradients its clients push into model updates.
//!
//! Clients are workers (`parameter-server` strategy) or the leaders of resource
//! groups (`hierarchical`: each group first sums its gradients over its own ring).
//! Every client pushes gradients already weighted by its share of the batch:
//!
//! - **synchronous** (`staleness` = `None`): the server waits for one push from every
//!   client, sums them, takes one optimiser step and sends the new model to all —
//!   the same update as one machine on the global batch;
//! - **asynchronous** (`staleness` = `Some(s)`): each push is applied at once and
//!   answered with the newest model, but a client more than `s` pushes ahead of the
//!   slowest waits for it (stale-synchronous parallel), so slow devices never fall
//!   hopelessly behind.
//!
//! A `Sum` request (test-set evaluation, figures) is a barrier over all clients.
//! The server ends when every client has said goodbye, and fails — telling every
//! waiting client — when one disconnects without it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

use hetero_comm::server::{Channel, Op};

use crate::TrainError;
use crate::optim::{FlatOptimizer, OptimizerConfig, OptimizerState};

/// How the server aggregates.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// `None`: synchronous; `Some(s)`: asynchronous with staleness bound `s`.
    pub staleness: Option<usize>,
    /// The optimiser applied to pushed gradients.
    pub optimizer: OptimizerConfig,
}

/// What the server did.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerReport {
    /// Optimiser steps taken.
    pub steps: u64,
    /// Gradients received.
    pub pushes: u64,
    /// Largest lead of one client over the slowest, in pushes (asynchronous mode).
    pub widest_gap: u64,
}

struct Round {
    acc: Vec<f32>,
    arrived: usize,
    number: u64,
    result: Arc<Vec<f32>>,
}

impl Round {
    fn new() -> Round {
        Round {
            acc: Vec::new(),
            arrived: 0,
            number: 0,
            result: Arc::new(Vec::new()),
        }
    }

    /// Adds `values`; the last of `clients` arrivals computes the result with
    /// `finish`. Returns the round this arrival belongs to.
    fn arrive(
        &mut self,
        values: &[f32],
        clients: usize,
        finish: impl FnOnce(&[f32]) -> Vec<f32>,
    ) -> Result<u64, String> {
        if self.arrived == 0 {
            self.acc = values.to_vec();
        } else if self.acc.len() != values.len() {
            return Err(format!(
                "a client sent {} values, others {}",
                values.len(),
                self.acc.len()
            ));
        } else {
            self.acc.iter_mut().zip(values).for_each(|(a, v)| *a += v);
        }
        self.arrived += 1;
        let number = self.number;
        if self.arrived == clients {
            self.result = Arc::new(finish(&self.acc));
            self.arrived = 0;
            self.number += 1;
        }
        Ok(number)
    }
}

struct State {
    params: Vec<f32>,
    optimizer: FlatOptimizer,
    push: Round,
    sum: Round,
    /// Pushes per client (`u64::MAX` once it said goodbye).
    clocks: Vec<u64>,
    failed: Option<String>,
    report: ServerReport,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    clients: usize,
    options: ServerOptions,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds or the server failed.
    fn wait_until<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        mut done: impl FnMut(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>, String> {
        loop {
            if let Some(why) = &st.failed {
                return Err(why.clone());
            }
            if done(&st) {
                return Ok(st);
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn fail(&self, why: String) {
        let mut st = self.lock();
        st.failed.get_or_insert(why);
        self.changed.notify_all();
    }

    /// Answers one request of client `slot`.
    fn handle(&self, slot: usize, op: Op, values: Vec<f32>) -> Result<Vec<f32>, String> {
        let n = self.lock().params.len();
        match op {
            Op::Pull => Ok(self.lock().params.clone()),
            Op::Sum => {
                let mut st = self.lock();
                let round = st.sum.arrive(&values, self.clients, |acc| acc.to_vec())?;
                self.changed.notify_all();
                let st = self.wait_until(st, |s| s.sum.number > round)?;
                Ok(st.sum.result.to_vec())
            }
            Op::Push if values.len() != n + 1 => Err(format!(
                "a push of {} values for a model of {n} parameters (+1 loss)",
                values.len()
            )),
            Op::Push => match self.options.staleness {
                None => {
                    let mut st = self.lock();
                    let State {
                        params,
                        optimizer,
                        push,
                        report,
                        ..
                    } = &mut *st;
                    report.pushes += 1;
                    let round = push.arrive(&values, self.clients, |acc| {
                        optimizer.step(params, &acc[..n]);
                        report.steps += 1;
                        let mut reply = params.clone();
                        reply.push(acc[n]);
                        reply
                    })?;
                    self.changed.notify_all();
                    let st = self.wait_until(st, |s| s.push.number > round)?;
                    Ok(st.push.result.to_vec())
                }
                Some(staleness) => {
                    let mut st = self.lock();
                    let State {
                        params,
                        optimizer,
                        clocks,
                        report,
                        ..
                    } = &mut *st;
                    optimizer.step(params, &values[..n]);
                    report.steps += 1;
                    report.pushes += 1;
                    clocks[slot] += 1;
                    let slowest = clocks.iter().copied().min().unwrap_or(0);
                    report.widest_gap = report.widest_gap.max(clocks[slot] - slowest.min(clocks[slot]));
                    self.changed.notify_all();
                    let st = self.wait_until(st, |s| {
                        let slowest = s.clocks.iter().copied().min().unwrap_or(0);
                        s.clocks[slot] <= slowest.saturating_add(staleness as u64)
                    })?;
                    let mut reply = st.params.clone();
                    reply.push(values[n]);
                    Ok(reply)
                }
            },
            Op::Bye | Op::Reply => Err(format!("unexpected {op:?}")),
        }
    }

    /// Serves one client until it says goodbye.
    fn serve_client(&self, slot: usize, mut channel: Channel) -> Result<(), String> {
        loop {
            let request = match channel.recv() {
                Ok(Some(r)) => r,
                Ok(None) => return Err(format!("client {} left without saying goodbye", channel.peer())),
                Err(e) => return Err(format!("client {}: {e}", channel.peer())),
            };
            match request {
                (Op::Bye, _) => {
                    let mut st = self.lock();
                    st.clocks[slot] = u64::MAX;
                    self.changed.notify_all();
                    return Ok(());
                }
                (op, values) => match self.handle(slot, op, values) {
                    Ok(reply) => channel
                        .send(Op::Reply, &reply)
                        .map_err(|e| format!("client {}: {e}", channel.peer()))?,
                    Err(why) => {
                        channel.abort(&why);
                        return Err(why);
                    }
                },
            }
        }
    }
}

/// Serves `channels` (one per client) with the global model `params` (and the
/// optimiser continuing from `state`, when resuming) until every client has said
/// goodbye.
pub fn serve(
    channels: Vec<(u32, Channel)>,
    params: Vec<f32>,
    state: Option<OptimizerState>,
    options: ServerOptions,
) -> Result<ServerReport, TrainError> {
    let clients = channels.len();
    let mut optimizer = FlatOptimizer::new(options.optimizer, params.len());
    if let Some(state) = state {
        optimizer.restore(state).map_err(TrainError::Config)?;
    }
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            optimizer,
            params,
            push: Round::new(),
            sum: Round::new(),
            clocks: vec![0; clients],
            failed: None,
            report: ServerReport {
                steps: 0,
                pushes: 0,
                widest_gap: 0,
            },
        }),
        changed: Condvar::new(),
        clients,
        options,
    });
    let handles: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(slot, (_, channel))| {
            let shared = shared.clone();
            thread::spawn(move || {
                let outcome = shared.serve_client(slot, channel);
                if let Err(why) = &outcome {
                    shared.fail(why.clone());
                }
                outcome
            })
        })
        .collect();
    let mut first_error = None;
    for h in handles {
        if let Err(why) = h.join().unwrap_or_else(|_| Err("a client thread panicked".into())) {
            first_error.get_or_insert(why);
        }
    }
    match first_error {
        Some(why) => Err(TrainError::Config(format!("parameter server: {why}"))),
        None => Ok(shared.lock().report.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::Duration;

    use hetero_comm::server::{ServerClient, accept_clients};
    use hetero_job::Optimizer;

    use super::*;

    fn start(
        clients: usize,
        params: Vec<f32>,
        staleness: Option<usize>,
    ) -> (
        std::net::SocketAddr,
        thread::JoinHandle<Result<ServerReport, TrainError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = thread::spawn(move || {
            let channels = accept_clients(&listener, clients, "j", "t", Duration::from_secs(10))?;
            let options = ServerOptions {
                staleness,
                optimizer: OptimizerConfig {
                    kind: Optimizer::Sgd,
                    learning_rate: 0.5,
                },
            };
            serve(channels, params, None, options)
        });
        (addr, handle)
    }

    fn client(addr: std::net::SocketAddr, id: u32) -> ServerClient {
        ServerClient::connect(addr, "j", "t", id, Duration::from_secs(10)).unwrap()
    }

    /// Synchronous: the step uses the sum of all pushes, and everyone gets the
    /// same model and the summed loss.
    #[test]
    fn synchronous_pushes_are_summed_into_one_step() {
        let (addr, server) = start(2, vec![1.0, 1.0], None);
        let replies: Vec<Vec<f32>> = thread::scope(|s| {
            let a = s.spawn(|| {
                let mut c = client(addr, 0);
                let r = c.push(&[0.5, 0.0, 0.25]).unwrap();
                c.bye().unwrap();
                r
            });
            let b = s.spawn(|| {
                let mut c = client(addr, 1);
                let r = c.push(&[0.5, 2.0, 0.5]).unwrap();
                c.bye().unwrap();
                r
            });
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        // p − 0.5·(g₀ + g₁) = [1 − 0.5, 1 − 1.0]; loss 0.25 + 0.5.
        assert_eq!(replies[0], vec![0.5, 0.0, 0.75]);
        assert_eq!(replies[0], replies[1]);
        let report = server.join().unwrap().unwrap();
        assert_eq!((report.steps, report.pushes), (1, 2));
    }

    /// Asynchronous with staleness 1: a fast client may lead by one push, not more.
    #[test]
    fn a_fast_client_waits_for_the_slow_one_beyond_the_staleness_bound() {
        let (addr, server) = start(2, vec![0.0], Some(1));
        thread::scope(|s| {
            s.spawn(|| {
                let mut fast = client(addr, 0);
                for _ in 0..6 {
                    fast.push(&[1.0, 0.0]).unwrap();
                }
                let mut total = [1.0];
                fast.sum(&mut total).unwrap();
                assert_eq!(total, [2.0]);
                fast.bye().unwrap();
            });
            s.spawn(|| {
                let mut slow = client(addr, 1);
                for _ in 0..6 {
                    thread::sleep(Duration::from_millis(30));
                    slow.push(&[1.0, 0.0]).unwrap();
                }
                let mut total = [1.0];
                slow.sum(&mut total).unwrap();
                slow.bye().unwrap();
            });
        });
        let report = server.join().unwrap().unwrap();
        assert_eq!((report.steps, report.pushes), (12, 12));
        assert!(report.widest_gap <= 2, "gap {}", report.widest_gap);
    }

    #[test]
    fn a_client_that_vanishes_fails_the_server_and_frees_the_others() {
        let (addr, server) = start(2, vec![0.0], None);
        thread::scope(|s| {
            s.spawn(|| {
                let mut c = client(addr, 0);
                let err = c.push(&[1.0, 0.0]).unwrap_err();
                assert!(err.to_string().contains("without saying goodbye"), "{err}");
            });
            s.spawn(|| {
                let c = client(addr, 1);
                thread::sleep(Duration::from_millis(100));
                drop(c);
            });
        });
        let err = server.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("without saying goodbye"), "{err}");
    }
}
