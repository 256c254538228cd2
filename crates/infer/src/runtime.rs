//! The distributed runtime: every worker of a mesh runs the same [`Worker::step`]
//! over the same [`Placement`], computing its own parts and exchanging activations.
//!
//! A step walks the stages in order. The activations live on a set of *holders*
//! (first the embedding's workers). Before a stage runs, every worker of the stage
//! that does not hold them receives them from a holder (a pipeline hand-off, or the
//! fan-out to a tensor-parallel group); inside a tensor-parallel stage each block's
//! two partial sums are all-reduced over the stage's group. At the end, the result
//! (pooled embeddings, next tokens, or logits) travels to rank 0, the *front*, which
//! talks to users. Because every worker derives every transfer from the placement and
//! the request's shape, sends and receives always pair up.
//!
//! Worker 0 drives ([`crate::protocol`]): the front sends each request's command
//! to the others, who wait until told to stop.

use std::ops::Range;
use std::time::{Duration, Instant};

use burn::nn::RotaryEncoding;
use burn::prelude::*;
use hetero_comm::Mesh;

use crate::InferError;
use crate::bert::{BertConfig, BertEmbeddings, BertLayer, mean_pool, padding_mask};
use crate::llama::{KvCache, LlamaConfig, LlamaEmbeddings, LlamaHead, LlamaLayer};
use crate::placement::{Mode, Placement, Stage};
use crate::weights::Weights;
use hetero_models::LayerKind;
use hetero_models::checkpoint::span;
use hetero_models::decoupled_bert::DecoupledBertConfig;
use hetero_models::decoupled_llama::{DecoupledLlamaConfig, LlamaSubBlocks};
use hetero_models::sub_blocks::{Masking, SubBlocks, from_slices, to_slices};

/// Which model, and its shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Arch {
    /// An encoder.
    Bert(BertConfig),
    /// An encoder whose layers are decoupled ([`crate::export`]'s folders).
    DecoupledBert(DecoupledBertConfig),
    /// A decoder.
    Llama(LlamaConfig),
    /// A decoder whose layers are decoupled ([`crate::export`]'s files).
    DecoupledLlama(DecoupledLlamaConfig),
}

impl Arch {
    /// Transformer blocks.
    pub fn layers(&self) -> usize {
        match self {
            Arch::Bert(c) => c.layers,
            Arch::DecoupledBert(c) => c.original().layers,
            Arch::Llama(c) => c.layers,
            Arch::DecoupledLlama(c) => c.original().layers,
        }
    }

    /// Width of the hidden states.
    pub fn hidden(&self) -> usize {
        match self {
            Arch::Bert(c) => c.hidden,
            Arch::DecoupledBert(c) => c.original().hidden,
            Arch::Llama(c) => c.hidden,
            Arch::DecoupledLlama(c) => c.original().hidden,
        }
    }

    /// Whether it returns sentence embeddings (rather than tokens).
    pub fn is_encoder(&self) -> bool {
        self.bert().is_some()
    }

    /// The encoder's configuration (a decoupled encoder's original's).
    pub fn bert(&self) -> Option<&BertConfig> {
        match self {
            Arch::Bert(c) => Some(c),
            Arch::DecoupledBert(c) => Some(c.original()),
            Arch::Llama(_) | Arch::DecoupledLlama(_) => None,
        }
    }

    /// The decoder's configuration (a decoupled decoder's original's).
    pub fn llama(&self) -> Option<&LlamaConfig> {
        match self {
            Arch::Llama(c) => Some(c),
            Arch::DecoupledLlama(c) => Some(c.original()),
            Arch::Bert(_) | Arch::DecoupledBert(_) => None,
        }
    }

    /// N_d of a decoupled model; 1 for an ordinary one.
    fn divisions(&self) -> usize {
        match self {
            Arch::DecoupledBert(c) => c.decoupling().divisions,
            Arch::DecoupledLlama(c) => c.decoupling().divisions,
            _ => 1,
        }
    }
}

/// What a request wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Pooled, normalised sentence embeddings (encoders).
    Embedding,
    /// The greedy next token of each row (decoders).
    NextToken,
    /// The full next-token logits of each row (decoders; for checks).
    Logits,
}

/// One forward pass over a batch of equally long rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Token ids, `[batch][seq]`; rows shorter than `seq` are padded (encoders).
    pub ids: Vec<Vec<u32>>,
    /// Real tokens in each row (encoders; decoders use every token).
    pub lengths: Vec<usize>,
    /// Decoders: forget the KV cache first (a new sequence).
    pub reset: bool,
    /// What to return.
    pub want: Want,
}

impl Request {
    /// An encoder request for rows of different lengths, padded with id 0.
    pub fn embed(rows: &[Vec<u32>]) -> Self {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        Request {
            ids: rows
                .iter()
                .map(|r| r.iter().copied().chain(std::iter::repeat(0)).take(seq).collect())
                .collect(),
            lengths: rows.iter().map(Vec::len).collect(),
            reset: true,
            want: Want::Embedding,
        }
    }

    /// A decoder request: `rows` (equally long) continue the cached sequence, or
    /// start a new one when `reset`.
    pub fn decode(rows: Vec<Vec<u32>>, reset: bool, want: Want) -> Self {
        Request {
            lengths: rows.iter().map(Vec::len).collect(),
            ids: rows,
            reset,
            want,
        }
    }

    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.ids.len(), self.ids.first().map_or(0, Vec::len))
    }
}

/// What a step returns on the front.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// One embedding per row.
    Embeddings(Vec<Vec<f32>>),
    /// One token per row.
    Tokens(Vec<u32>),
    /// One logits vector per row.
    Logits(Vec<Vec<f32>>),
}

/// Where a step's time went on this worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// Computing.
    pub compute: Duration,
    /// Waiting on, or sending to, peers.
    pub communication: Duration,
}

enum Embed<B: Backend> {
    Bert(BertEmbeddings<B>),
    Llama(LlamaEmbeddings<B>),
}

enum Block<B: Backend> {
    Bert(BertLayer<B>),
    /// A decoupled layer's sub-blocks `groups` (of N_d): all of them, or this
    /// worker's share in a tensor-parallel stage — none when the stage has more
    /// workers than sub-blocks.
    SubBlocks(Option<SubBlocks<B>>, Range<usize>),
    /// A decoupled decoder layer's sub-blocks `groups`, as above, and this
    /// worker's cache of their keys and values.
    LlamaSubBlocks(Option<LlamaSubBlocks<B>>, Range<usize>, KvCache<B>),
    /// A decoder block and this worker's cache of the sequence's keys and values.
    Llama(LlamaLayer<B>, KvCache<B>),
}

/// One worker's share of a placed model.
pub struct Worker<B: Backend> {
    rank: usize,
    arch: Arch,
    placement: Placement,
    embed: Option<Embed<B>>,
    /// `(stage index, block)` for every block this worker holds a part of.
    blocks: Vec<(usize, Block<B>)>,
    head: Option<LlamaHead<B>>,
    rope: Option<RotaryEncoding<B>>,
    device: B::Device,
    /// Time spent in the last step.
    pub timing: Timing,
}

impl<B: Backend> Worker<B> {
    /// Loads what `rank` needs under `placement`, and nothing else: its stages'
    /// blocks (its part of each), the embedding if it is in the first stage, the
    /// output head if it is in the last.
    pub fn load(
        arch: Arch,
        weights: &dyn Weights,
        placement: Placement,
        rank: usize,
        device: &B::Device,
    ) -> Result<Self, InferError> {
        placement.check(arch.layers())?;
        if rank >= placement.workers {
            return Err(InferError::Placement(format!(
                "worker {rank} is not among the placement's {} workers",
                placement.workers
            )));
        }
        let first = &placement.stages[0];
        let last = placement.stages.last().expect("checked: at least one stage");
        let embed = if first.workers.contains(&rank) {
            Some(match &arch {
                Arch::Bert(_) | Arch::DecoupledBert(_) => Embed::Bert(BertEmbeddings::load(
                    &mut |n, s| weights.expect(n, s),
                    arch.bert().expect("an encoder"),
                    device,
                )?),
                Arch::Llama(_) | Arch::DecoupledLlama(_) => Embed::Llama(LlamaEmbeddings::load(
                    &mut |n, s| weights.expect(n, s),
                    arch.llama().expect("a decoder"),
                    device,
                )?),
            })
        } else {
            None
        };
        let kinds = match &arch {
            Arch::DecoupledBert(c) => c.decoupling().layer_kinds(arch.layers()),
            Arch::DecoupledLlama(c) => c.decoupling().layer_kinds(arch.layers()),
            _ => vec![LayerKind::Original; arch.layers()],
        };
        let mut blocks = Vec::new();
        for (si, stage) in placement.stages.iter().enumerate() {
            let Some(part) = stage.part_of(rank) else { continue };
            for layer in stage.layers.clone() {
                blocks.push((
                    si,
                    match (&arch, kinds[layer]) {
                        (Arch::DecoupledBert(c), LayerKind::Decoupled) => {
                            let groups = span(c.decoupling().divisions, part.0, part.1);
                            let sub = share(&groups, |g| {
                                c.load_sub_blocks(&mut |n, s| weights.expect(n, s), layer, g, device)
                            })?;
                            Block::SubBlocks(sub, groups)
                        }
                        (Arch::DecoupledBert(c), LayerKind::Original) => Block::Bert(BertLayer::load(
                            &mut |n, s| weights.expect(n, s),
                            c.original(),
                            layer,
                            part,
                            device,
                        )?),
                        (Arch::Bert(c), _) => Block::Bert(BertLayer::load(
                            &mut |n, s| weights.expect(n, s),
                            c,
                            layer,
                            part,
                            device,
                        )?),
                        (Arch::DecoupledLlama(c), LayerKind::Decoupled) => {
                            let groups = span(c.decoupling().divisions, part.0, part.1);
                            let sub = share(&groups, |g| {
                                c.load_sub_blocks(&mut |n, s| weights.expect(n, s), layer, g, device)
                            })?;
                            Block::LlamaSubBlocks(sub, groups, KvCache::new())
                        }
                        (Arch::DecoupledLlama(c), LayerKind::Original) => Block::Llama(
                            LlamaLayer::load(&mut |n, s| weights.expect(n, s), c.original(), layer, part, device)?,
                            KvCache::new(),
                        ),
                        (Arch::Llama(c), _) => Block::Llama(
                            LlamaLayer::load(&mut |n, s| weights.expect(n, s), c, layer, part, device)?,
                            KvCache::new(),
                        ),
                    },
                ));
            }
        }
        let (head, rope) = match arch.llama() {
            Some(c) => {
                let head = match head_part(last, rank) {
                    Some(part) => Some(LlamaHead::load(&mut |n, s| weights.expect(n, s), c, part, device)?),
                    None => None,
                };
                let rope = (!blocks.is_empty()).then(|| c.rope(c.context, device));
                (head, rope)
            }
            None => (None, None),
        };
        Ok(Worker {
            rank,
            arch,
            placement,
            embed,
            blocks,
            head,
            rope,
            device: device.clone(),
            timing: Timing::default(),
        })
    }

    /// The model this worker serves.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The placement it runs under.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Tokens in the decoder's KV cache (0 for encoders, or a worker without blocks).
    pub fn cached(&self) -> usize {
        self.blocks
            .iter()
            .find_map(|(_, b)| match b {
                Block::Llama(_, cache) | Block::LlamaSubBlocks(Some(_), _, cache) => Some(cache.len()),
                Block::Bert(_) | Block::SubBlocks(..) | Block::LlamaSubBlocks(None, ..) => None,
            })
            .unwrap_or(0)
    }

    /// Runs one request with the other workers of `mesh`; returns the output on
    /// rank 0 and `None` elsewhere.
    pub fn step(&mut self, mesh: &mut Mesh, req: &Request) -> Result<Option<Output>, InferError> {
        if mesh.rank() != self.rank || mesh.world() != self.placement.workers {
            return Err(InferError::Placement(format!(
                "worker {} of {} runs on rank {} of a mesh of {}",
                self.rank,
                self.placement.workers,
                mesh.rank(),
                mesh.world()
            )));
        }
        check_request(&self.arch, req)?;
        self.timing = Timing::default();
        let (batch, seq) = req.shape();
        let d = self.arch.hidden();
        if req.reset {
            self.blocks.iter_mut().for_each(|(_, b)| {
                if let Block::Llama(_, cache) | Block::LlamaSubBlocks(_, _, cache) = b {
                    *cache = KvCache::new()
                }
            });
        }
        let clock = Instant::now();
        let mut x = match &self.embed {
            Some(Embed::Bert(e)) => Some(crate::bert::embed(e, &req.ids, &self.device)?),
            Some(Embed::Llama(e)) => Some(crate::llama::embed(e, &req.ids, &self.device)?),
            None => None,
        };
        self.timing.compute += clock.elapsed();
        let mask = padding_mask::<B>(&req.lengths, seq, &self.device);
        let divisions = self.arch.divisions();
        let mut holders = self.placement.stages[0].workers.clone();
        for si in 0..self.placement.stages.len() {
            let stage = self.placement.stages[si].clone();
            x = self.hand_over(mesh, x, &holders, &stage.workers, [batch, seq, d])?;
            holders = stage.workers.clone();
            let Some(mut h) = x.take() else { continue };
            // A tensor-parallel stage's group sums partial results and gathers slices.
            let group: &[usize] = match stage.mode == Mode::TensorParallel && stage.workers.len() > 1 {
                true => &stage.workers,
                false => &[],
            };
            let (timing, device) = (&mut self.timing, &self.device);
            // Inside a run of decoupled layers: this worker's slices (none when it
            // holds no sub-blocks) and which they are. Nothing crosses slices until
            // the run ends, at an original layer or the stage's end.
            let mut slices: Option<(Option<Tensor<B, 4>>, Range<usize>)> = None;
            for (_, block) in self.blocks.iter_mut().filter(|(s, _)| *s == si) {
                if let Block::SubBlocks(_, groups) | Block::LlamaSubBlocks(_, groups, _) = &*block {
                    let groups = groups.clone();
                    let mine = match slices.take() {
                        Some((mine, _)) => mine,
                        None => (!groups.is_empty())
                            .then(|| to_slices(h.clone(), divisions).narrow(0, groups.start, groups.len())),
                    };
                    let out = match (&mut *block, mine) {
                        (Block::SubBlocks(Some(sub), _), Some(x)) => {
                            Some(sub.forward(x, &Masking::Padding(mask.clone())))
                        }
                        (Block::LlamaSubBlocks(Some(sub), _, cache), Some(x)) => {
                            Some(sub.forward(x, self.rope.as_ref().expect("blocks have a rope"), cache))
                        }
                        _ => None,
                    };
                    slices = Some((out, groups));
                    continue;
                }
                if let Some((mine, groups)) = slices.take() {
                    h = gather_slices(mesh, group, mine, groups, divisions, [batch, seq, d], timing, device)?;
                }
                let mut reduce = |t: Tensor<B, 3>| reduce_over(mesh, group, t, timing, device);
                h = match block {
                    Block::Bert(b) => b.forward(h, &mask, &mut reduce)?,
                    Block::Llama(l, cache) => {
                        l.forward(h, self.rope.as_ref().expect("blocks have a rope"), cache, &mut reduce)?
                    }
                    Block::SubBlocks(..) | Block::LlamaSubBlocks(..) => unreachable!("handled above"),
                };
            }
            if let Some((mine, groups)) = slices.take() {
                h = gather_slices(mesh, group, mine, groups, divisions, [batch, seq, d], timing, device)?;
            }
            x = Some(h);
        }
        // What is left of the step's wall time after communication was compute.
        let result = self.finish(mesh, x, &holders, req)?;
        self.timing.compute = clock.elapsed().saturating_sub(self.timing.communication);
        Ok(result)
    }

    /// Moves the activations from `holders` to every worker of `to` that lacks them.
    fn hand_over(
        &mut self,
        mesh: &mut Mesh,
        x: Option<Tensor<B, 3>>,
        holders: &[usize],
        to: &[usize],
        dims: [usize; 3],
    ) -> Result<Option<Tensor<B, 3>>, InferError> {
        let clock = Instant::now();
        let needers: Vec<usize> = to.iter().copied().filter(|w| !holders.contains(w)).collect();
        let mut x = x;
        let mut sent = None;
        for (j, &w) in needers.iter().enumerate() {
            let source = holders[j % holders.len()];
            if self.rank == source {
                let values = sent.get_or_insert_with(|| {
                    x.clone()
                        .expect("a holder holds the activations")
                        .into_data()
                        .to_vec::<f32>()
                        .expect("f32 activations")
                });
                mesh.send(w, values)?;
            } else if self.rank == w {
                let mut values = vec![0f32; dims.iter().product()];
                mesh.recv(source, &mut values)?;
                x = Some(Tensor::from_data(TensorData::new(values, dims), &self.device));
            }
        }
        self.timing.communication += clock.elapsed();
        // Holders that are not in the next stage drop theirs.
        Ok(if to.contains(&self.rank) { x } else { None })
    }

    /// Turns the last stage's activations into the output and brings it to rank 0.
    fn finish(
        &mut self,
        mesh: &mut Mesh,
        x: Option<Tensor<B, 3>>,
        holders: &[usize],
        req: &Request,
    ) -> Result<Option<Output>, InferError> {
        let (batch, _) = req.shape();
        let leader = holders[0];
        let last = self.placement.stages.last().expect("checked").clone();
        // The leader's result, as a flat buffer, and how to read it back.
        let (flat, width): (Option<Vec<f32>>, usize) = match &self.arch {
            Arch::Bert(_) | Arch::DecoupledBert(_) => {
                let flat = (self.rank == leader)
                    .then(|| mean_pool(x.clone().expect("the leader holds the activations"), &req.lengths).concat());
                (flat, self.arch.hidden())
            }
            Arch::Llama(_) | Arch::DecoupledLlama(_) => {
                let c = self.arch.llama().expect("a decoder");
                let group: Vec<usize> = match last.mode {
                    Mode::TensorParallel => last.workers.clone(),
                    _ => vec![leader],
                };
                if !group.contains(&self.rank) {
                    (None, if req.want == Want::Logits { c.vocab } else { 1 })
                } else {
                    let head = self.head.as_ref().expect("head workers hold a head part");
                    let logits = head.forward(x.clone().expect("head workers hold the activations"));
                    let rows = head.rows();
                    let part = logits.into_data().to_vec::<f32>().expect("f32 logits");
                    let clock = Instant::now();
                    let out = match req.want {
                        Want::Logits => {
                            let mut all = vec![0f32; batch * c.vocab];
                            for b in 0..batch {
                                all[b * c.vocab + rows.start..b * c.vocab + rows.end]
                                    .copy_from_slice(&part[b * rows.len()..(b + 1) * rows.len()]);
                            }
                            mesh.allreduce_sum(&group, &mut all)?;
                            (Some(all).filter(|_| self.rank == leader), c.vocab)
                        }
                        _ => {
                            // Each part's best (score, id) per row; the group picks the best.
                            let slot = group.iter().position(|&w| w == self.rank).unwrap_or(0);
                            let mut best = vec![0f32; batch * 2 * group.len()];
                            for b in 0..batch {
                                let row = &part[b * rows.len()..(b + 1) * rows.len()];
                                let (i, v) = argmax(row);
                                let at = (b * group.len() + slot) * 2;
                                best[at] = v;
                                best[at + 1] = (rows.start + i) as f32;
                            }
                            mesh.allreduce_sum(&group, &mut best)?;
                            let tokens: Vec<f32> = (0..batch)
                                .map(|b| {
                                    let cands = &best[b * group.len() * 2..(b + 1) * group.len() * 2];
                                    let (mut score, mut id) = (f32::NEG_INFINITY, 0f32);
                                    for c in cands.chunks_exact(2) {
                                        if c[0] > score {
                                            (score, id) = (c[0], c[1]);
                                        }
                                    }
                                    id
                                })
                                .collect();
                            (Some(tokens).filter(|_| self.rank == leader), 1)
                        }
                    };
                    self.timing.communication += clock.elapsed();
                    out
                }
            }
        };
        // Bring it to the front.
        let clock = Instant::now();
        let flat = if leader == 0 {
            flat
        } else if self.rank == leader {
            mesh.send(0, flat.as_deref().expect("the leader has the result"))?;
            None
        } else if self.rank == 0 {
            let mut v = vec![0f32; batch * width];
            mesh.recv(leader, &mut v)?;
            Some(v)
        } else {
            None
        };
        self.timing.communication += clock.elapsed();
        if self.rank != 0 {
            return Ok(None);
        }
        let flat = flat.expect("rank 0 has the result");
        let rows = |w: usize| flat.chunks_exact(w).map(<[f32]>::to_vec).collect::<Vec<_>>();
        Ok(Some(match (&self.arch, req.want) {
            (Arch::Bert(_) | Arch::DecoupledBert(_), _) => Output::Embeddings(rows(width)),
            (Arch::Llama(_) | Arch::DecoupledLlama(_), Want::Logits) => Output::Logits(rows(width)),
            (Arch::Llama(_) | Arch::DecoupledLlama(_), _) => Output::Tokens(flat.iter().map(|&t| t as u32).collect()),
        }))
    }
}

/// A worker's share `groups` of a decoupled layer's sub-blocks, loaded by
/// `load`; `None` when the share is empty (more workers than sub-blocks).
fn share<T>(
    groups: &Range<usize>,
    load: impl FnOnce(Range<usize>) -> Result<T, InferError>,
) -> Result<Option<T>, InferError> {
    match groups.is_empty() {
        true => Ok(None),
        false => load(groups.clone()).map(Some),
    }
}

/// `t` summed over `group` (a tensor-parallel block's partial results); `t`
/// itself outside one.
fn reduce_over<B: Backend>(
    mesh: &mut Mesh,
    group: &[usize],
    t: Tensor<B, 3>,
    timing: &mut Timing,
    device: &B::Device,
) -> Result<Tensor<B, 3>, InferError> {
    if group.is_empty() {
        return Ok(t);
    }
    let clock = Instant::now();
    let dims = t.dims();
    let mut v = t.into_data().to_vec::<f32>().expect("f32 activations");
    mesh.allreduce_sum(group, &mut v)?;
    timing.communication += clock.elapsed();
    Ok(Tensor::from_data(TensorData::new(v, dims), device))
}

/// The whole hidden state `[batch, seq, hidden]` again after a run of decoupled
/// layers: outside a tensor-parallel stage this worker holds every slice;
/// inside one, each worker contributes its slices (`mine`, sub-blocks `groups`)
/// to a buffer of zeros that the group sums — an all-gather, the only traffic a
/// run of decoupled layers needs.
#[allow(clippy::too_many_arguments)]
fn gather_slices<B: Backend>(
    mesh: &mut Mesh,
    group: &[usize],
    mine: Option<Tensor<B, 4>>,
    groups: Range<usize>,
    divisions: usize,
    [batch, seq, d]: [usize; 3],
    timing: &mut Timing,
    device: &B::Device,
) -> Result<Tensor<B, 3>, InferError> {
    if group.is_empty() {
        return Ok(from_slices(mine.expect("a worker outside a group holds every slice")));
    }
    let clock = Instant::now();
    let per_group = batch * seq * (d / divisions);
    let mut all = vec![0f32; divisions * per_group];
    if let Some(mine) = mine {
        let values = mine.into_data().to_vec::<f32>().expect("f32 activations");
        all[groups.start * per_group..groups.end * per_group].copy_from_slice(&values);
    }
    mesh.allreduce_sum(group, &mut all)?;
    timing.communication += clock.elapsed();
    let slices = Tensor::from_data(TensorData::new(all, [divisions, batch, seq, d / divisions]), device);
    Ok(from_slices(slices))
}

/// The part of the output head `rank` holds: split by vocabulary in a
/// tensor-parallel last stage, else the whole head on the stage's first worker.
fn head_part(last: &Stage, rank: usize) -> Option<(usize, usize)> {
    match last.mode {
        Mode::TensorParallel => last.part_of(rank),
        _ => (last.workers[0] == rank).then_some((0, 1)),
    }
}

fn argmax(row: &[f32]) -> (usize, f32) {
    row.iter().enumerate().fold(
        (0, f32::NEG_INFINITY),
        |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
    )
}

pub(crate) fn check_request(arch: &Arch, req: &Request) -> Result<(), InferError> {
    let (batch, seq) = req.shape();
    if batch == 0 || seq == 0 {
        return Err(InferError::Request("no tokens to run".into()));
    }
    if req.ids.iter().any(|r| r.len() != seq) || req.lengths.len() != batch {
        return Err(InferError::Request(
            "rows of a batch must be equally long (pad them)".into(),
        ));
    }
    match (arch, req.want) {
        (_, Want::NextToken | Want::Logits) if !arch.is_encoder() => Ok(()),
        (_, Want::Embedding) if arch.is_encoder() => Ok(()),
        (Arch::Bert(_) | Arch::DecoupledBert(_), w) => {
            Err(InferError::Request(format!("an encoder returns embeddings, not {w:?}")))
        }
        (Arch::Llama(_) | Arch::DecoupledLlama(_), w) => Err(InferError::Request(format!(
            "a decoder returns tokens or logits, not {w:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;
    use crate::protocol::run_in_process;
    use crate::weights::RandomWeights;

    type B = Flex;

    /// Runs `requests` in order on a loopback mesh under `placement`; returns the
    /// front's outputs.
    fn run_placed(arch: &Arch, weights: &dyn Weights, placement: &Placement, requests: &[Request]) -> Vec<Output> {
        run_in_process::<B>(arch, weights, placement, requests).unwrap()
    }

    fn values(o: &Output) -> Vec<f32> {
        match o {
            Output::Embeddings(v) | Output::Logits(v) => v.concat(),
            Output::Tokens(t) => t.iter().map(|&t| t as f32).collect(),
        }
    }

    fn assert_close(a: &[Output], b: &[Output], what: &str) {
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (values(x), values(y));
            assert_eq!(x.len(), y.len());
            let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{what}: largest difference {worst}");
        }
    }

    fn small_bert() -> BertConfig {
        BertConfig {
            hidden: 60,
            layers: 3,
            heads: 5,
            intermediate: 70,
            vocab: 50,
            max_positions: 16,
            ..BertConfig::mini_lm()
        }
    }

    fn small_llama() -> LlamaConfig {
        LlamaConfig {
            hidden: 48,
            layers: 3,
            heads: 6,
            kv_heads: 3,
            ffn: 70,
            vocab: 61,
            context: 64,
            rope_base: 10_000.0,
            eps: 1e-5,
            separate_head: false,
        }
    }

    #[test]
    fn encoder_placements_agree_with_one_device() {
        let c = small_bert();
        let w = RandomWeights::new(c.tensor_shapes(), 1);
        let arch = Arch::Bert(c);
        let reqs = [Request::embed(&[vec![2, 7, 9, 4, 3], vec![2, 11, 3]])];
        let one = run_placed(&arch, &w, &Placement::single(3), &reqs);
        let Output::Embeddings(e) = &one[0] else { panic!() };
        assert_eq!((e.len(), e[0].len()), (2, 60));
        assert!(
            (e[0].iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-5,
            "normalised"
        );
        for workers in [2, 3] {
            for placement in [Placement::tensor_parallel(3, workers), Placement::pipeline(3, workers)] {
                let got = run_placed(&arch, &w, &placement, &reqs);
                assert_close(&one, &got, &format!("{placement:?}"));
            }
        }
        // Padding changes nothing: the short row alone gives the same embedding.
        let alone = run_placed(&arch, &w, &Placement::single(3), &[Request::embed(&[vec![2, 11, 3]])]);
        let Output::Embeddings(a) = &alone[0] else { panic!() };
        let worst = a[0].iter().zip(&e[1]).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{worst}");
    }

    /// A decoupled encoder runs under every placement as its module does on one
    /// device — a tensor-parallel stage spreads each decoupled layer's
    /// sub-blocks over its workers (some hold none when there are more workers
    /// than sub-blocks) and gathers the slices before an original layer.
    #[test]
    fn decoupled_encoder_placements_agree_with_its_module() {
        use hetero_models::bert::padded_ids;
        use hetero_models::decoupled_bert::DecoupledBert;
        use hetero_models::{Decoupling, Variant};
        let rows = [vec![2, 7, 9, 4, 3], vec![2, 11, 3]];
        for (divisions, variant) in [(3, Variant::FullHeads), (5, Variant::SplitHeads)] {
            let decoupling = Decoupling {
                divisions,
                blocks: 1,
                variant,
            };
            let config = DecoupledBertConfig::new(small_bert(), decoupling).unwrap();
            let w = RandomWeights::new(config.tensor_shapes(), 4);
            let module = DecoupledBert::<B>::load(&mut |n, s| w.expect(n, s), &config, &Default::default()).unwrap();
            let (ids, lengths) = padded_ids::<B, _>(&rows, &Default::default());
            let want = vec![Output::Embeddings(mean_pool(module.forward(ids, &lengths), &lengths))];
            let arch = Arch::DecoupledBert(config);
            for placement in [
                Placement::single(3),
                Placement::tensor_parallel(3, 2),
                Placement::tensor_parallel(3, 4),
                Placement::pipeline(3, 2),
                Placement::pipeline(3, 3),
            ] {
                let got = run_placed(&arch, &w, &placement, &[Request::embed(&rows)]);
                assert_close(&want, &got, &format!("{divisions} {variant}: {placement:?}"));
            }
        }
    }

    /// A decoupled decoder runs under every placement as its module does on one
    /// device, through a prefill and cached decode steps: each worker keeps the
    /// keys and values of its own sub-blocks only.
    #[test]
    fn decoupled_decoder_placements_agree_with_its_module() {
        use hetero_models::decoupled_llama::DecoupledLlama;
        use hetero_models::{Decoupling, Variant};
        let c = LlamaConfig {
            separate_head: true,
            ..small_llama()
        };
        for (divisions, variant) in [(3, Variant::SplitHeads), (2, Variant::FullHeads)] {
            let decoupling = Decoupling {
                divisions,
                blocks: 1,
                variant,
            };
            let config = DecoupledLlamaConfig::new(c.clone(), decoupling).unwrap();
            let w = RandomWeights::new(config.tensor_shapes(), 5);
            let device = Default::default();
            let module = DecoupledLlama::<B>::load(&mut |n, s| w.expect(n, s), &config, c.context, &device).unwrap();
            let mut caches = module.caches();
            let mut want = Vec::new();
            for step in [vec![vec![1, 5, 9, 17], vec![3, 3, 8, 40]], vec![vec![22], vec![7]]] {
                let ids = crate::bert::ids_tensor::<B>(&step, c.vocab, &device).unwrap();
                let logits = module.forward(ids, &mut caches);
                let [batch, seq, vocab] = logits.dims();
                let last = logits.slice([0..batch, seq - 1..seq]).reshape([batch, vocab]);
                let rows = last.into_data().to_vec::<f32>().unwrap();
                want.push(Output::Logits(rows.chunks(vocab).map(<[f32]>::to_vec).collect()));
            }
            let reqs = [
                Request::decode(vec![vec![1, 5, 9, 17], vec![3, 3, 8, 40]], true, Want::Logits),
                Request::decode(vec![vec![22], vec![7]], false, Want::Logits),
            ];
            let arch = Arch::DecoupledLlama(config);
            for placement in [
                Placement::single(3),
                Placement::tensor_parallel(3, 2),
                Placement::tensor_parallel(3, 4),
                Placement::pipeline(3, 3),
            ] {
                let got = run_placed(&arch, &w, &placement, &reqs);
                assert_close(&want, &got, &format!("{divisions} {variant}: {placement:?}"));
            }
        }
    }

    #[test]
    fn decoder_placements_agree_with_one_device_through_prefill_and_decode() {
        let c = small_llama();
        let w = RandomWeights::new(c.tensor_shapes(), 2);
        let arch = Arch::Llama(c);
        let reqs = [
            Request::decode(vec![vec![1, 5, 9, 17], vec![3, 3, 8, 40]], true, Want::Logits),
            Request::decode(vec![vec![22], vec![7]], false, Want::Logits),
            Request::decode(vec![vec![13], vec![60]], false, Want::NextToken),
        ];
        let one = run_placed(&arch, &w, &Placement::single(3), &reqs);
        let mixed = Placement::parse(
            "workers = 3\n[[stage]]\nlayers = \"0..2\"\nmode = \"tensor-parallel\"\nworkers = [1, 2]\n\
             [[stage]]\nlayers = \"2..3\"\nmode = \"tensor-parallel\"\nworkers = [0, 2]\n",
            3,
        )
        .unwrap();
        for placement in [
            Placement::tensor_parallel(3, 2),
            Placement::tensor_parallel(3, 3),
            // More workers than key/value heads: the fourth holds FFN units only.
            Placement::tensor_parallel(3, 4),
            Placement::pipeline(3, 2),
            Placement::pipeline(3, 3),
            mixed,
        ] {
            let got = run_placed(&arch, &w, &placement, &reqs);
            assert_close(&one, &got, &format!("{placement:?}"));
        }
        // The cache is real: one decode step equals the last row of a full prefill.
        let full = run_placed(
            &arch,
            &w,
            &Placement::single(3),
            &[Request::decode(vec![vec![1, 5, 9, 17, 22]], true, Want::Logits)],
        );
        let (Output::Logits(a), Output::Logits(b)) = (&full[0], &one[1]) else {
            panic!()
        };
        let worst = a[0].iter().zip(&b[0]).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{worst}");
    }

    #[test]
    fn bad_requests_and_placements_are_clear_errors() {
        let c = small_llama();
        let w = RandomWeights::new(c.tensor_shapes(), 3);
        let arch = Arch::Llama(c);
        let err = Worker::<B>::load(
            arch.clone(),
            &w,
            Placement::tensor_parallel(3, 2),
            2,
            &Default::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("worker 2 is not among the placement's 2 workers"), "{err}");
        let mut mesh = hetero_comm::mesh::loopback(1, "s", "t").unwrap().pop().unwrap();
        let mut worker = Worker::<B>::load(arch, &w, Placement::single(3), 0, &Default::default()).unwrap();
        let bad = worker.step(&mut mesh, &Request::decode(vec![vec![99]], true, Want::NextToken));
        assert!(bad.unwrap_err().to_string().contains("outside the vocabulary"));
        let ragged = worker.step(
            &mut mesh,
            &Request::decode(vec![vec![1, 2], vec![3]], true, Want::NextToken),
        );
        assert!(ragged.unwrap_err().to_string().contains("equally long"));
        let wrong = worker.step(&mut mesh, &Request::embed(&[vec![1]]));
        assert!(wrong.unwrap_err().to_string().contains("decoder returns tokens"));
        // A weights file of another shape is refused at load, naming the tensor.
        let other = RandomWeights::new(
            LlamaConfig {
                hidden: 24,
                ..small_llama()
            }
            .tensor_shapes(),
            3,
        );
        let err = Worker::<B>::load(
            Arch::Llama(small_llama()),
            &other,
            Placement::single(3),
            0,
            &Default::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("token_embd.weight: shape [61, 24]"), "{err}");
    }
}
