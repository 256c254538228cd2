//! How rank 0 drives the other workers of a mesh: the front's commands (run a
//! request, report traffic and timings, switch placements, stop), [`Front`] on
//! rank 0 and [`follow`] on the others, and [`run_in_process`], every worker a
//! thread, for checks and experiments.
//!
//! A command is a header of five floats (op code and arguments), then for a run
//! the rows' lengths and token ids. Every worker then runs the same
//! [`Worker::step`], whose transfers pair up because each derives them from the
//! placement and the request's shape.

use std::time::Duration;

use burn::prelude::*;
use hetero_comm::Mesh;

use crate::InferError;
use crate::placement::Placement;
use crate::runtime::{Arch, Output, Request, Timing, Want, Worker, check_request};
use crate::weights::Weights;

/// Op codes of the front's commands.
const RUN: f32 = 1.0;
const STOP: f32 = 2.0;
const REPORT: f32 = 3.0;
const SWITCH: f32 = 4.0;

/// Why [`follow`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    /// The front said stop.
    Stopped,
    /// The front moves to the placement of this index (in a list all workers were
    /// given): load it and follow again.
    Switch(usize),
}

/// What one worker reports of its traffic and its last step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Report {
    /// Bytes it has sent to its peers since the mesh formed.
    pub bytes_sent: u64,
    /// Where its last step's time went.
    pub timing: Timing,
}

impl Report {
    /// As floats that survive the trip exactly (16 bits per float).
    fn encode(&self) -> [f32; 6] {
        let b = self.bytes_sent;
        [
            (b & 0xFFFF) as f32,
            ((b >> 16) & 0xFFFF) as f32,
            ((b >> 32) & 0xFFFF) as f32,
            (b >> 48) as f32,
            self.timing.compute.as_secs_f32(),
            self.timing.communication.as_secs_f32(),
        ]
    }

    fn decode(v: &[f32; 6]) -> Self {
        let part = |i: usize| (v[i] as u64) << (16 * i);
        Report {
            bytes_sent: part(0) | part(1) | part(2) | part(3),
            timing: Timing {
                compute: Duration::from_secs_f32(v[4].max(0.0)),
                communication: Duration::from_secs_f32(v[5].max(0.0)),
            },
        }
    }
}

/// Rank 0's side: sends each request to the other workers, then runs its own part.
pub struct Front<B: Backend> {
    /// Rank 0's worker.
    pub worker: Worker<B>,
    /// Its mesh.
    pub mesh: Mesh,
}

impl<B: Backend> Front<B> {
    /// Runs `req` on every worker; returns its output.
    pub fn run(&mut self, req: &Request) -> Result<Output, InferError> {
        check_request(self.worker.arch(), req)?;
        let (batch, seq) = req.shape();
        let want = match req.want {
            Want::Embedding => 0.0,
            Want::NextToken => 1.0,
            Want::Logits => 2.0,
        };
        let header = [RUN, batch as f32, seq as f32, want, if req.reset { 1.0 } else { 0.0 }];
        let mut body: Vec<f32> = req.lengths.iter().map(|&l| l as f32).collect();
        body.extend(req.ids.iter().flatten().map(|&t| t as f32));
        for r in 1..self.mesh.world() {
            self.mesh.send(r, &header)?;
            self.mesh.send(r, &body)?;
        }
        self.worker
            .step(&mut self.mesh, req)?
            .ok_or_else(|| InferError::Placement("rank 0 got no output".into()))
    }

    /// Every worker's report, rank 0's first. Asking costs each other worker one
    /// 25-byte command and a 29-byte reply.
    pub fn reports(&mut self) -> Result<Vec<Report>, InferError> {
        let mut out = vec![Report {
            bytes_sent: self.mesh.bytes_sent(),
            timing: self.worker.timing,
        }];
        for r in 1..self.mesh.world() {
            self.mesh.send(r, &[REPORT, 0.0, 0.0, 0.0, 0.0])?;
            let mut v = [0f32; 6];
            self.mesh.recv(r, &mut v)?;
            out.push(Report::decode(&v));
        }
        Ok(out)
    }

    /// Moves every worker to placement `index` of the list they were all given;
    /// `worker` is rank 0's part under it.
    pub fn switch(&mut self, index: usize, worker: Worker<B>) -> Result<(), InferError> {
        for r in 1..self.mesh.world() {
            self.mesh.send(r, &[SWITCH, index as f32, 0.0, 0.0, 0.0])?;
        }
        self.worker = worker;
        Ok(())
    }

    /// Tells the other workers to stop.
    pub fn stop(mut self) -> Result<(), InferError> {
        for r in 1..self.mesh.world() {
            self.mesh.send(r, &[STOP, 0.0, 0.0, 0.0, 0.0])?;
        }
        Ok(())
    }
}

/// A worker other than rank 0: runs the front's requests until it says stop (or
/// to switch placements).
pub fn follow<B: Backend>(worker: &mut Worker<B>, mesh: &mut Mesh) -> Result<Followed, InferError> {
    loop {
        let mut header = [0f32; 5];
        mesh.recv(0, &mut header)?;
        if header[0] == STOP {
            return Ok(Followed::Stopped);
        }
        if header[0] == SWITCH {
            return Ok(Followed::Switch(header[1] as usize));
        }
        if header[0] == REPORT {
            let report = Report {
                bytes_sent: mesh.bytes_sent(),
                timing: worker.timing,
            };
            mesh.send(0, &report.encode())?;
            continue;
        }
        if header[0] != RUN {
            return Err(InferError::Request(format!(
                "unknown command {} from the front",
                header[0]
            )));
        }
        let (batch, seq) = (header[1] as usize, header[2] as usize);
        let mut body = vec![0f32; batch + batch * seq];
        mesh.recv(0, &mut body)?;
        let lengths = body[..batch].iter().map(|&l| l as usize).collect();
        let ids = body[batch..]
            .chunks_exact(seq.max(1))
            .map(|r| r.iter().map(|&t| t as u32).collect())
            .collect();
        let want = match header[3] as u8 {
            0 => Want::Embedding,
            1 => Want::NextToken,
            _ => Want::Logits,
        };
        let req = Request {
            ids,
            lengths,
            reset: header[4] != 0.0,
            want,
        };
        worker.step(mesh, &req)?;
    }
}

/// Runs `requests` in order under `placement` with every worker a thread of this
/// process, joined by a loopback mesh; returns the front's outputs. For checks and
/// experiments: the workers share one copy of `weights`.
pub fn run_in_process<B: Backend>(
    arch: &Arch,
    weights: &dyn Weights,
    placement: &Placement,
    requests: &[Request],
) -> Result<Vec<Output>, InferError> {
    let meshes = hetero_comm::mesh::loopback(placement.workers, "in-process", "in-process")?;
    std::thread::scope(|s| {
        let handles: Vec<_> = meshes
            .into_iter()
            .enumerate()
            .map(|(rank, mut mesh)| {
                let (arch, placement) = (arch.clone(), placement.clone());
                s.spawn(move || -> Result<Vec<Output>, InferError> {
                    let mut worker = Worker::<B>::load(arch, weights, placement, rank, &Default::default())?;
                    if rank == 0 {
                        let mut front = Front { worker, mesh };
                        let out = requests.iter().map(|r| front.run(r)).collect::<Result<Vec<_>, _>>()?;
                        front.stop()?;
                        Ok(out)
                    } else {
                        follow(&mut worker, &mut mesh)?;
                        Ok(vec![])
                    }
                })
            })
            .collect();
        let mut results = handles.into_iter().map(|h| {
            h.join()
                .map_err(|_| InferError::Placement("a worker thread panicked".into()))?
        });
        let front = results.next().expect("at least one worker");
        // A follower's error explains a front's broken pipe better than the pipe does.
        for r in results {
            r?;
        }
        front
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_survive_their_encoding() {
        let r = Report {
            bytes_sent: 0x1234_5678_9ABC_DEF0,
            timing: Timing {
                compute: Duration::from_millis(1500),
                communication: Duration::from_millis(250),
            },
        };
        assert_eq!(Report::decode(&r.encode()), r);
    }
}
