//! How rank 0 drives the other workers of a mesh: the front's commands (run a
//! request, report traffic and timings, load a placement, profile, stop), [`Front`] on
//! rank 0 and [`follow`] on the others, and [`run_in_process`], every worker a
//! thread, for checks and experiments.
//!
//! A command is a header of five floats (op code and arguments), then for a run
//! the rows' lengths and token ids. Every worker then runs the same
//! [`Worker::step`], whose transfers pair up because each derives them from the
//! placement and the request's shape.

use std::time::{Duration, Instant};

use burn::prelude::*;
use hetero_comm::Mesh;

use crate::InferError;
use crate::placement::Placement;
use crate::profile::{
    Device, KindTimes, Kinds, Link, Profile, Shape, free_memory, measure_device, measure_link, threads,
};
use crate::runtime::{Arch, Output, Request, Timing, Want, Worker, check_request};
use crate::weights::Weights;

/// Op codes of the front's commands.
const RUN: f32 = 1.0;
const STOP: f32 = 2.0;
const REPORT: f32 = 3.0;
/// Profiling (`crate::profile`): time your layer kinds; all at once; a link.
const MEASURE: f32 = 5.0;
const CROWD: f32 = 6.0;
const LINK: f32 = 7.0;
/// Load the placement whose TOML follows (a benchmark's next, or the planner's choice).
const PLACE: f32 = 8.0;
/// Open the model whose name follows and wait, holding nothing, for a placement.
const MODEL: f32 = 9.0;

/// The largest text (a placement, a model's name) the front may send, bytes.
const MAX_TEXT: usize = 1 << 20;

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
        body.extend(req.slots.iter().map(|&s| s as f32));
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
    for r in 1..mesh.world() {
        mesh.send(r, &[STOP, 0.0, 0.0, 0.0, 0.0])?;
    }
    Ok(())
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
        if header[0] == MEASURE {
            let shapes = recv_shapes(mesh, header[1] as usize)?;
            let (times, _) =
                measure_device::<B>(worker.arch(), &shapes, mesh.world(), &Default::default(), Kinds::All)?;
            let mut reply = vec![threads() as f32, (free_memory() >> 20) as f32];
            reply.extend(times.iter().flat_map(flat_times));
            mesh.send(0, &reply)?;
            continue;
        }
        if header[0] == CROWD {
            let shapes = recv_shapes(mesh, 1)?;
            mesh.send(0, &[crowded_time::<B>(worker.arch(), shapes[0])? as f32])?;
            continue;
        }
        if header[0] == LINK {
            let (a, b) = (header[1] as usize, header[2] as usize);
            let me = mesh.rank();
            let peer = if me == a { b } else { a };
            let (latency, up, down) = measure_link(mesh, peer)?;
            if me == a.min(b) {
                mesh.send(0, &[latency as f32, up as f32, down as f32])?;
            }
            continue;
        }
        if header[0] == MODEL {
            return Ok(Followed::Model(recv_text(mesh, header[1] as usize)?));
        }
        if header[0] == PLACE {
            let text = recv_text(mesh, header[1] as usize)?;
            return Ok(Followed::Place(Placement::parse(&text, &worker.arch().layout())?));
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
        let mut body = vec![0f32; 2 * batch + batch * seq];
        mesh.recv(0, &mut body)?;
        let lengths = body[..batch].iter().map(|&l| l as usize).collect();
        let slots = body[batch..2 * batch].iter().map(|&s| s as usize).collect();
        let ids = body[2 * batch..]
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
            slots,
            reset: header[4] != 0.0,
            want,
        };
        worker.step(mesh, &req)?;
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
    let body: Vec<f32> = shapes
        .iter()
        .flat_map(|s| [s.batch as f32, s.tokens as f32, s.context as f32])
        .collect();
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
        mesh.send(r, &[MEASURE, shapes.len() as f32, 0.0, 0.0, 0.0])?;
        mesh.send(r, &body)?;
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
                mesh.send(r, &[CROWD, 0.0, 0.0, 0.0, 0.0])?;
                mesh.send(r, &body[..3])?;
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
                mesh.send(r, &[LINK, a as f32, b as f32, 0.0, 0.0])?;
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
    send_text(mesh, PLACE, &placement.to_toml())
}

/// Tells every other worker to open the model `name` (as `hetero_infer::models::open`
/// reads names) and wait for a placement of it.
pub fn send_model(mesh: &mut Mesh, name: &str) -> Result<(), InferError> {
    send_text(mesh, MODEL, name)
}

fn send_text(mesh: &mut Mesh, op: f32, text: &str) -> Result<(), InferError> {
    let bytes: Vec<f32> = text.bytes().map(f32::from).collect();
    for r in 1..mesh.world() {
        mesh.send(r, &[op, bytes.len() as f32, 0.0, 0.0, 0.0])?;
        mesh.send(r, &bytes)?;
    }
    Ok(())
}

/// A text of `len` bytes from the front, bounded by [`MAX_TEXT`].
fn recv_text(mesh: &mut Mesh, len: usize) -> Result<String, InferError> {
    if len > MAX_TEXT {
        return Err(InferError::Request(format!(
            "the front sent a text of {len} bytes (at most {MAX_TEXT})"
        )));
    }
    let mut bytes = vec![0f32; len];
    mesh.recv(0, &mut bytes)?;
    String::from_utf8(bytes.iter().map(|&b| b as u8).collect())
        .map_err(|_| InferError::Request("the front sent a text that is not UTF-8".into()))
}

/// The most shapes one profile times.
const MAX_SHAPES: usize = 64;

fn recv_shapes(mesh: &mut Mesh, n: usize) -> Result<Vec<Shape>, InferError> {
    if n == 0 || n > MAX_SHAPES {
        return Err(InferError::Profile(format!(
            "the front asked for {n} shapes (1 to {MAX_SHAPES})"
        )));
    }
    let mut body = vec![0f32; 3 * n];
    mesh.recv(0, &mut body)?;
    Ok(body
        .chunks_exact(3)
        .map(|c| Shape {
            batch: c[0] as usize,
            tokens: c[1] as usize,
            context: c[2] as usize,
        })
        .collect())
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
        assert_eq!(Report::decode(&r.encode()), r);
    }
}
