//! How rank 0 drives the other workers of a mesh: the front's commands (run a
//! request, report traffic and timings, load a placement, profile, stop), [`Front`] on
//! rank 0 and [`follow`] on the others, and [`run_in_process`], every worker a
//! thread, for checks and experiments.
//!
//! A command is one message of bytes ([`Command`]); a report comes back as one
//! too. Every worker then runs the same
//! [`Worker::step`], whose transfers pair up because each derives them from the
//! placement and the request's shape.

use std::time::{Duration, Instant};

use burn::prelude::*;
use hetero_comm::Mesh;

use crate::InferError;
use crate::command::{Command, MAX_SHAPES};
use crate::placement::Placement;
use crate::profile::{
    Device, KindTimes, Kinds, Link, Profile, Shape, free_memory, measure_device, measure_link, threads,
};
use crate::runtime::{Arch, Output, Request, Timing, Worker, check_request};
use crate::weights::Weights;

/// Why [`follow`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// The front said stop.
    Stopped,
    /// The front moves to this placement (a benchmark's next one, or the
    /// planner's choice): load it and follow again.
    Place(Placement),
    /// The front moves to another model (a benchmark comparing models): open it,
    /// hold nothing of it, and follow again.
    Model(String),
}

/// Bytes one report exchange adds to a follower's traffic and the front's: the
/// command's frame (5 + 1 bytes) and the reply's (5 + 24).
pub const REPORT_EXCHANGE_BYTES: u64 = (5 + 1) + (5 + 24);

/// What one worker reports of its traffic and its last step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Report {
    /// Bytes it has sent to its peers since the mesh formed.
    pub bytes_sent: u64,
    /// Where its last step's time went.
    pub timing: Timing,
}

impl Report {
    /// Its 24 bytes: the count, then the two times in seconds (`f64`), little-endian.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = self.bytes_sent.to_le_bytes().to_vec();
        out.extend(self.timing.compute.as_secs_f64().to_le_bytes());
        out.extend(self.timing.communication.as_secs_f64().to_le_bytes());
        out
    }

    fn decode(bytes: &[u8], from: usize) -> Result<Self, InferError> {
        let words: [u8; 24] = bytes.try_into().map_err(|_| {
            InferError::Request(format!(
                "rank {from} sent a report of {} bytes (24 expected)",
                bytes.len()
            ))
        })?;
        let word = |i: usize| <[u8; 8]>::try_from(&words[8 * i..8 * i + 8]).expect("eight bytes");
        let secs = |i: usize| {
            Duration::try_from_secs_f64(f64::from_le_bytes(word(i)))
                .map_err(|_| InferError::Request(format!("rank {from} sent a report with a time that is not one")))
        };
        Ok(Report {
            bytes_sent: u64::from_le_bytes(word(0)),
            timing: Timing {
                compute: secs(1)?,
                communication: secs(2)?,
            },
        })
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
        let command = Command::Run(req.clone()).encode();
        for r in 1..self.mesh.world() {
            self.mesh.send_msg(r, &command)?;
        }
        self.worker
            .step(&mut self.mesh, req)?
            .ok_or_else(|| InferError::Placement("rank 0 got no output".into()))
    }

    /// Every worker's report, rank 0's first. Asking costs each other worker a
    /// 6-byte command frame and a 29-byte reply frame.
    pub fn reports(&mut self) -> Result<Vec<Report>, InferError> {
        let mut out = vec![Report {
            bytes_sent: self.mesh.bytes_sent(),
            timing: self.worker.timing,
        }];
        let (command, mut reply) = (Command::Report.encode(), Vec::new());
        for r in 1..self.mesh.world() {
            self.mesh.send_msg(r, &command)?;
            self.mesh.recv_msg(r, &mut reply)?;
            out.push(Report::decode(&reply, r)?);
        }
        Ok(out)
    }

    /// Moves every worker to `placement`; `worker` is rank 0's part under it.
    pub fn switch(&mut self, placement: &Placement, worker: Worker<B>) -> Result<(), InferError> {
        send_placement(&mut self.mesh, placement)?;
        self.worker = worker;
        Ok(())
    }

    /// Tells the other workers to stop.
    pub fn stop(mut self) -> Result<(), InferError> {
        stop_followers(&mut self.mesh)
    }
}

/// Tells every worker but rank 0 to stop following.
pub fn stop_followers(mesh: &mut Mesh) -> Result<(), InferError> {
    let stop = Command::Stop.encode();
    for r in 1..mesh.world() {
        mesh.send_msg(r, &stop)?;
    }
    Ok(())
}

/// A worker other than rank 0: runs the front's requests until it says stop (or
/// to switch placements).
pub fn follow<B: Backend>(worker: &mut Worker<B>, mesh: &mut Mesh) -> Result<Followed, InferError> {
    let mut message = Vec::new();
    loop {
        mesh.recv_msg(0, &mut message)?;
        match Command::decode(&message)? {
            Command::Stop => return Ok(Followed::Stopped),
            Command::Measure(shapes) => {
                let (times, _) =
                    measure_device::<B>(worker.arch(), &shapes, mesh.world(), &Default::default(), Kinds::All)?;
                let mut reply = vec![threads() as f32, (free_memory() >> 20) as f32];
                reply.extend(times.iter().flat_map(flat_times));
                mesh.send(0, &reply)?;
            }
            Command::Crowd(shape) => mesh.send(0, &[crowded_time::<B>(worker.arch(), shape)? as f32])?,
            Command::Link { a, b } => {
                let me = mesh.rank();
                let peer = if me == a { b } else { a };
                let (latency, up, down) = measure_link(mesh, peer)?;
                if me == a.min(b) {
                    mesh.send(0, &[latency as f32, up as f32, down as f32])?;
                }
            }
            Command::Model(name) => return Ok(Followed::Model(name)),
            Command::Place(text) => return Ok(Followed::Place(Placement::parse(&text, &worker.arch().layout())?)),
            Command::Report => {
                let report = Report {
                    bytes_sent: mesh.bytes_sent(),
                    timing: worker.timing,
                };
                mesh.send_msg(0, &report.encode())?;
            }
            Command::Run(req) => {
                worker.step(mesh, &req)?;
            }
        }
    }
}

/// Profiles the devices and links of `mesh` from rank 0 (the others are in
/// [`follow`]): every device's layer kinds alone, in turn; every pair of devices
/// at once for how much they slow each other; then every pair's link. `progress` hears what is measured.
pub fn profile_mesh<B: Backend>(
    mesh: &mut Mesh,
    arch: &Arch,
    model: &str,
    shapes: &[Shape],
    progress: &mut dyn FnMut(&str),
) -> Result<Profile, InferError> {
    let world = mesh.world();
    if shapes.is_empty() || shapes.len() > MAX_SHAPES {
        return Err(InferError::Profile(format!(
            "{} shapes to profile: 1 to {MAX_SHAPES}",
            shapes.len()
        )));
    }
    let measure = Command::Measure(shapes.to_vec()).encode();
    let crowd = Command::Crowd(shapes[0]).encode();
    progress(&format!("timing device 0 of {world}"));
    let (times, sizes) = measure_device::<B>(arch, shapes, world, &Default::default(), Kinds::All)?;
    let mut devices = vec![Device {
        rank: 0,
        address: None,
        threads: threads(),
        free_memory: free_memory(),
        times,
        alongside: vec![1.0; world],
    }];
    let per_shape = flat_times(&devices[0].times[0]).len();
    for r in 1..world {
        progress(&format!("timing device {r} of {world}"));
        mesh.send_msg(r, &measure)?;
        let mut reply = vec![0f32; 2 + shapes.len() * per_shape];
        mesh.recv(r, &mut reply)?;
        devices.push(Device {
            rank: r,
            address: None,
            threads: reply[0] as usize,
            free_memory: (reply[1] as u64) << 20,
            times: reply[2..]
                .chunks(per_shape)
                .map(|c| unflat_times(c, &devices[0].times[0]))
                .collect(),
            alongside: vec![1.0; world],
        });
    }
    // Every pair at once: how much each slows the other (a shared core, memory).
    for a in 0..world {
        for b in a + 1..world {
            progress(&format!("timing devices {a} and {b} at once"));
            for r in [a, b].into_iter().filter(|&r| r != 0) {
                mesh.send_msg(r, &crowd)?;
            }
            let mine = match a {
                0 => Some(crowded_time::<B>(arch, shapes[0])?),
                _ => None,
            };
            let mut together = [0f64; 2];
            for (t, r) in together.iter_mut().zip([a, b]) {
                *t = match (r, mine) {
                    (0, Some(m)) => m,
                    _ => {
                        let mut reply = [0f32];
                        mesh.recv(r, &mut reply)?;
                        f64::from(reply[0])
                    }
                };
            }
            let alone = |d: usize| devices[d].times[0].original[0].max(1e-9);
            let (slow_a, slow_b) = (together[0] / alone(a), together[1] / alone(b));
            devices[a].alongside[b] = slow_a.clamp(1.0, 64.0);
            devices[b].alongside[a] = slow_b.clamp(1.0, 64.0);
        }
    }
    let mut links = Vec::new();
    for a in 0..world {
        for b in a + 1..world {
            for r in [a, b].into_iter().filter(|&r| r != 0) {
                mesh.send_msg(r, &Command::Link { a, b }.encode())?;
            }
            let (latency, up, down) = if a == 0 {
                measure_link(mesh, b)?
            } else {
                let mut v = [0f32; 3];
                mesh.recv(a, &mut v)?;
                (f64::from(v[0]), f64::from(v[1]), f64::from(v[2]))
            };
            progress(&format!(
                "link {a} ↔ {b}: {:.1} / {:.1} Mbit/s, {:.3} ms",
                up * 8e-6,
                down * 8e-6,
                latency * 1e3
            ));
            links.push(Link {
                from: a,
                to: b,
                bandwidth: up,
                latency,
            });
            links.push(Link {
                from: b,
                to: a,
                bandwidth: down,
                latency,
            });
        }
    }
    Ok(Profile {
        version: crate::profile::VERSION,
        model: model.to_string(),
        arch: arch.summary(),
        shapes: shapes.to_vec(),
        sizes,
        devices,
        links,
    })
}

/// Tells every other worker to load `placement` (rank 0 loads its own part).
pub fn send_placement(mesh: &mut Mesh, placement: &Placement) -> Result<(), InferError> {
    send_text(mesh, Command::Place(placement.to_toml()))
}

/// Tells every other worker to open the model `name` (as `hetero_infer::models::open`
/// reads names) and wait for a placement of it.
pub fn send_model(mesh: &mut Mesh, name: &str) -> Result<(), InferError> {
    send_text(mesh, Command::Model(name.to_string()))
}

fn send_text(mesh: &mut Mesh, command: Command) -> Result<(), InferError> {
    let bytes = command.encode();
    for r in 1..mesh.world() {
        mesh.send_msg(r, &bytes)?;
    }
    Ok(())
}

/// How long two devices time an original layer at once: long enough that their
/// windows overlap for most of it although they start a message apart and load at
/// their own speed.
const TOGETHER: Duration = Duration::from_millis(1500);

/// An original layer's time at `shape` while another device times its own: the
/// median of measurements repeated for [`TOGETHER`].
fn crowded_time<B: Backend>(arch: &Arch, shape: Shape) -> Result<f64, InferError> {
    let start = Instant::now();
    let mut times = Vec::new();
    while times.is_empty() || start.elapsed() < TOGETHER {
        let (t, _) = measure_device::<B>(arch, &[shape], 1, &Default::default(), Kinds::OriginalWhole)?;
        times.push(t[0].original[0]);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn flat_times(t: &KindTimes) -> Vec<f32> {
    std::iter::once(t.embed)
        .chain(t.original.iter().chain(&t.sub_blocks).chain(&t.head).copied())
        .map(|v| v as f32)
        .collect()
}

/// Times read back in the layout of `like`.
fn unflat_times(v: &[f32], like: &KindTimes) -> KindTimes {
    let mut it = v.iter().map(|&x| f64::from(x));
    let mut take = |n: usize| it.by_ref().take(n).collect::<Vec<_>>();
    KindTimes {
        embed: take(1)[0],
        original: take(like.original.len()),
        sub_blocks: take(like.sub_blocks.len()),
        head: take(like.head.len()),
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
        assert_eq!(Report::decode(&r.encode(), 1).unwrap(), r);
        let exchange = 10 + Command::Report.encode().len() + r.encode().len();
        assert_eq!(exchange as u64, REPORT_EXCHANGE_BYTES);
        assert!(
            Report::decode(&r.encode()[..20], 1)
                .unwrap_err()
                .to_string()
                .contains("rank 1")
        );
    }
}
