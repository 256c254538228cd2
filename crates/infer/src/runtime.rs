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

use std::time::{Duration, Instant};

use burn::nn::RotaryEncoding;
use burn::prelude::*;
use hetero_comm::Mesh;

use crate::InferError;
use crate::activations::{Exchange, Held, flat};
use crate::bert::{BertConfig, BertEmbeddings, BertLayer, mean_pool, padding_mask};
use crate::llama::{KvCache, LlamaConfig, LlamaEmbeddings, LlamaHead, LlamaLayer};
use crate::placement::{Layout, Original, Placement};
use crate::qllama::{self, QEmbeddings, QHead, QKvCache, QLlamaLayer, Rope, Scratch};
use crate::weights::Weights;
use hetero_kernels::Kernels;
use hetero_models::LayerKind;
use hetero_models::decoupled_bert::DecoupledBertConfig;
use hetero_models::decoupled_llama::{DecoupledLlamaConfig, LlamaSubBlocks};
use hetero_models::sub_blocks::{Masking, SubBlocks};

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

    /// Every tensor's name and shape.
    pub fn tensor_shapes(&self) -> std::collections::BTreeMap<String, Vec<usize>> {
        match self {
            Arch::Bert(c) => c.tensor_shapes(),
            Arch::DecoupledBert(c) => c.tensor_shapes(),
            Arch::Llama(c) => c.tensor_shapes(),
            Arch::DecoupledLlama(c) => c.tensor_shapes(),
        }
    }

    /// The model's shape in one line: what a profile was measured on.
    pub fn summary(&self) -> String {
        let (kind, layers, width, heads) = match (self.bert(), self.llama()) {
            (Some(c), _) => ("encoder", c.layers, c.hidden, c.heads),
            (None, Some(c)) => ("decoder", c.layers, c.hidden, c.heads),
            (None, None) => unreachable!("a model is an encoder or a decoder"),
        };
        let decoupled = match self {
            Arch::DecoupledBert(c) => Some(c.decoupling()),
            Arch::DecoupledLlama(c) => Some(c.decoupling()),
            Arch::Bert(_) | Arch::Llama(_) => None,
        };
        let mut s = format!("{kind}, {layers} layers, width {width}, {heads} heads");
        if let Some(d) = decoupled {
            s += &format!(", decoupled {}x{} {}", d.divisions, d.blocks, d.variant);
        }
        s
    }

    /// Which layers are decoupled, and into how many sub-blocks: what a
    /// placement is checked against.
    pub fn layout(&self) -> Layout {
        let decoupling = match self {
            Arch::DecoupledBert(c) => c.decoupling(),
            Arch::DecoupledLlama(c) => c.decoupling(),
            Arch::Bert(_) | Arch::Llama(_) => return Layout::plain(self.layers()),
        };
        Layout {
            kinds: decoupling.layer_kinds(self.layers()),
            divisions: decoupling.divisions,
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
    /// Decoders: the KV cache slot each row continues (row `b` in slot `b` unless
    /// a running batch says otherwise; several slots need quantized blocks).
    pub slots: Vec<usize>,
    /// Decoders: empty the rows' slots first (new sequences).
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
            slots: (0..rows.len()).collect(),
            reset: true,
            want: Want::Embedding,
        }
    }

    /// A decoder request: `rows` (equally long) continue the cached sequence, or
    /// start a new one when `reset`.
    pub fn decode(rows: Vec<Vec<u32>>, reset: bool, want: Want) -> Self {
        let slots = (0..rows.len()).collect();
        Self::in_slots(rows, slots, reset, want)
    }

    /// A decoder request of a running batch: row `b` continues the sequence in
    /// cache slot `slots[b]` (or starts one there, when `reset`).
    pub fn in_slots(rows: Vec<Vec<u32>>, slots: Vec<usize>, reset: bool, want: Want) -> Self {
        Request {
            lengths: rows.iter().map(Vec::len).collect(),
            ids: rows,
            slots,
            reset,
            want,
        }
    }

    /// Whether row `b` uses slot `b` (what every block can run).
    fn plain_slots(&self) -> bool {
        self.slots.iter().enumerate().all(|(b, &s)| b == s)
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

// One per worker, built once and never moved in a loop: boxing its large variants
// would buy nothing (clippy's large_enum_variant).
#[allow(clippy::large_enum_variant)]
enum Embed<B: Backend> {
    Bert(BertEmbeddings<B>),
    Llama(LlamaEmbeddings<B>),
    /// The table of a quantized file, as stored.
    QLlama(QEmbeddings),
}

/// A decoder's output head, or this worker's rows of it.
#[allow(clippy::large_enum_variant)] // one per worker: see `Embed`
enum Head<B: Backend> {
    Burn(LlamaHead<B>),
    Quantized(QHead),
}

/// What the quantized path keeps between steps: its kernels, the buffers its
/// blocks share, and the rotary table.
struct Quantized {
    kernels: Kernels,
    scratch: Scratch,
    rope: Rope,
}

/// This worker's part of one layer. (One per layer, built once: see `Embed`.)
#[allow(clippy::large_enum_variant)]
enum Block<B: Backend> {
    /// An encoder layer (its tensor-parallel part, or whole).
    Bert(BertLayer<B>),
    /// A decoder layer and this worker's cache of the sequence's keys and values.
    Llama(LlamaLayer<B>, KvCache<B>),
    /// This worker's sub-blocks of a decoupled encoder layer.
    SubBlocks(SubBlocks<B>),
    /// This worker's sub-blocks of a decoupled decoder layer and their cache.
    LlamaSubBlocks(LlamaSubBlocks<B>, KvCache<B>),
    /// A decoder layer (or part) on quantized weights, and its cache.
    QLlama(QLlamaLayer, QKvCache),
}

/// One worker's share of a placed model.
pub struct Worker<B: Backend> {
    rank: usize,
    arch: Arch,
    layout: Layout,
    placement: Placement,
    embed: Option<Embed<B>>,
    /// This worker's part of each layer (`None` where it has none).
    blocks: Vec<Option<Block<B>>>,
    head: Option<Head<B>>,
    rope: Option<RotaryEncoding<B>>,
    /// Set when the weights stay quantized ([`crate::qllama`]).
    quantized: Option<Quantized>,
    device: B::Device,
    /// Time spent in the last step.
    pub timing: Timing,
}

impl<B: Backend> Worker<B> {
    /// Loads what `rank` needs under `placement`, and nothing else: its part of
    /// each of its stages' layers (sub-blocks of decoupled layers, a part or the
    /// whole of original ones), the embedding if it is in the first stage, its
    /// part of the output head if it is in the last.
    pub fn load(
        arch: Arch,
        weights: &dyn Weights,
        placement: Placement,
        rank: usize,
        device: &B::Device,
    ) -> Result<Self, InferError> {
        let layout = arch.layout();
        placement.check(&layout)?;
        if rank >= placement.workers {
            return Err(InferError::Placement(format!(
                "worker {rank} is not among the placement's {} workers",
                placement.workers
            )));
        }
        let tensor = &mut |n: &str, s: &[usize]| weights.expect(n, s);
        // A llama file whose block matrices are stored quantized runs on them as stored.
        let quantized = qllama::runs_on_blocks(&arch, weights);
        let first = &placement.stages[0];
        let last = placement.stages.last().expect("checked: at least one stage");
        let embed = match (first.workers.contains(&rank), arch.bert(), arch.llama()) {
            (false, ..) => None,
            (true, Some(c), _) => Some(Embed::Bert(BertEmbeddings::load(tensor, c, device)?)),
            (true, None, Some(c)) if quantized => Some(Embed::QLlama(QEmbeddings::load(weights, c)?)),
            (true, None, Some(c)) => Some(Embed::Llama(LlamaEmbeddings::load(tensor, c, device)?)),
            (true, None, None) => unreachable!("a model is an encoder or a decoder"),
        };
        let mut blocks: Vec<Option<Block<B>>> = (0..layout.layers()).map(|_| None).collect();
        for stage in &placement.stages {
            let Some(pos) = stage.workers.iter().position(|&w| w == rank) else {
                continue;
            };
            let groups = stage.sub_block_ranges(layout.divisions)[pos].clone();
            let part = stage.original_part(rank);
            for layer in stage.layers.clone() {
                blocks[layer] = match (layout.kinds[layer], &arch) {
                    (LayerKind::Decoupled, _) if groups.is_empty() => None,
                    (LayerKind::Decoupled, Arch::DecoupledBert(c)) => Some(Block::SubBlocks(c.load_sub_blocks(
                        tensor,
                        layer,
                        groups.clone(),
                        device,
                    )?)),
                    (LayerKind::Decoupled, Arch::DecoupledLlama(c)) => Some(Block::LlamaSubBlocks(
                        c.load_sub_blocks(tensor, layer, groups.clone(), device)?,
                        KvCache::new(),
                    )),
                    (LayerKind::Decoupled, _) => unreachable!("only decoupled models have decoupled layers"),
                    (LayerKind::Original, _) => match (part, arch.bert(), arch.llama()) {
                        (None, ..) => None,
                        (Some(part), Some(c), _) => Some(Block::Bert(BertLayer::load(tensor, c, layer, part, device)?)),
                        (Some(part), None, Some(c)) if quantized => Some(Block::QLlama(
                            QLlamaLayer::load(weights, c, layer, part)?,
                            QKvCache::new(),
                        )),
                        (Some(part), None, Some(c)) => Some(Block::Llama(
                            LlamaLayer::load(tensor, c, layer, part, device)?,
                            KvCache::new(),
                        )),
                        (Some(_), None, None) => unreachable!("a model is an encoder or a decoder"),
                    },
                };
            }
        }
        let (head, rope) = match arch.llama() {
            Some(c) => {
                let head = match last.head_part(rank) {
                    Some(part) if quantized => Some(Head::Quantized(QHead::load(weights, c, part)?)),
                    Some(part) => Some(Head::Burn(LlamaHead::load(tensor, c, part, device)?)),
                    None => None,
                };
                let rope = (!quantized && blocks.iter().any(Option::is_some)).then(|| c.rope(c.context, device));
                (head, rope)
            }
            None => (None, None),
        };
        let quantized = match (quantized, arch.llama()) {
            (true, Some(c)) => Some(Quantized {
                kernels: Kernels::detect(),
                scratch: Scratch::default(),
                rope: Rope::new(c.head_dim(), c.rope_base, c.context),
            }),
            _ => None,
        };
        Ok(Worker {
            rank,
            arch,
            layout,
            placement,
            embed,
            blocks,
            head,
            rope,
            quantized,
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

    /// Positions cached for the sequence in `slot` (0 for encoders).
    pub fn cached(&self, slot: usize) -> usize {
        self.blocks
            .iter()
            .flatten()
            .find_map(|b| match b {
                Block::Llama(_, cache) | Block::LlamaSubBlocks(_, cache) => {
                    Some(if slot == 0 { cache.len() } else { 0 })
                }
                Block::QLlama(_, cache) => Some(cache.len(slot)),
                Block::Bert(_) | Block::SubBlocks(_) => None,
            })
            .unwrap_or(0)
    }

    /// Whether this worker's blocks run a batch of sequences at different points
    /// (a running batch: every decoder block on quantized weights).
    pub fn batches(&self) -> bool {
        !self.arch.is_encoder() && self.blocks.iter().flatten().all(|b| matches!(b, Block::QLlama(..)))
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
        if !req.plain_slots() && !self.batches() {
            return Err(InferError::Request(
                "sequences in cache slots other than their rows need quantized decoder blocks".into(),
            ));
        }
        if req.reset {
            for block in self.blocks.iter_mut().flatten() {
                match block {
                    Block::Llama(_, cache) | Block::LlamaSubBlocks(_, cache) => *cache = KvCache::new(),
                    Block::QLlama(_, cache) => cache.reset(&req.slots),
                    Block::Bert(_) | Block::SubBlocks(_) => {}
                }
            }
        }
        let cached = req.slots.iter().map(|&slot| self.cached(slot)).max().unwrap_or(0);
        if let Some(q) = &mut self.quantized {
            q.rope.cover(cached + seq);
        }
        let clock = Instant::now();
        let x = match &self.embed {
            Some(Embed::Bert(e)) => Some(crate::bert::embed(e, &req.ids, &self.device)?),
            Some(Embed::Llama(e)) => Some(crate::llama::embed(e, &req.ids, &self.device)?),
            Some(Embed::QLlama(e)) => Some(Tensor::from_data(
                TensorData::new(e.lookup(&req.ids)?, [batch, seq, self.arch.hidden()]),
                &self.device,
            )),
            None => None,
        };
        let mask = padding_mask::<B>(&req.lengths, seq, &self.device);
        let dims = [batch, seq, self.arch.hidden()];
        let Worker {
            layout,
            placement,
            blocks,
            rope,
            quantized,
            timing,
            device,
            ..
        } = &mut *self;
        let mut ex = Exchange {
            mesh: &mut *mesh,
            dims,
            divisions: layout.divisions,
            timing,
            device,
        };
        let mut held = Held::Whole {
            x,
            holders: placement.stages[0].workers.clone(),
        };
        for stage in &placement.stages {
            let ranges = stage.sub_block_ranges(layout.divisions);
            // Where original layers run, and the group that sums their parts.
            let originals_on = stage.holders_after();
            let group = match stage.originals() == Original::TensorParallel && stage.workers.len() > 1 {
                true => stage.workers.clone(),
                false => vec![],
            };
            for layer in stage.layers.clone() {
                let block = blocks[layer].as_mut();
                held = match layout.kinds[layer] {
                    LayerKind::Decoupled => match ex.sliced(held, &stage.workers, &ranges)? {
                        Held::Sliced {
                            mine: Some(x),
                            workers,
                            ranges,
                        } => {
                            let y = match block {
                                Some(Block::SubBlocks(sub)) => sub.forward(x, &Masking::Padding(mask.clone())),
                                Some(Block::LlamaSubBlocks(sub, cache)) => {
                                    sub.forward(x, rope.as_ref().expect("blocks have a rope"), cache)
                                }
                                _ => unreachable!("a worker holding slices holds their sub-blocks"),
                            };
                            Held::Sliced {
                                mine: Some(y),
                                workers,
                                ranges,
                            }
                        }
                        other => other,
                    },
                    LayerKind::Original => match (ex.whole(held, &originals_on)?, block) {
                        (Held::Whole { x: Some(h), holders }, Some(block)) => {
                            let mut reduce = |t: Tensor<B, 3>| ex.reduce(&group, t);
                            let h = match block {
                                Block::Bert(b) => b.forward(h, &mask, &mut reduce)?,
                                Block::Llama(l, cache) => {
                                    l.forward(h, rope.as_ref().expect("blocks have a rope"), cache, &mut reduce)?
                                }
                                Block::QLlama(l, cache) => {
                                    let q = quantized.as_mut().expect("quantized blocks have their kernels");
                                    let mut flat = flat(h);
                                    l.forward(
                                        &mut flat,
                                        &req.slots,
                                        seq,
                                        &q.rope,
                                        cache,
                                        &mut q.scratch,
                                        &q.kernels,
                                        &mut |o| ex.reduce_slice(&group, o),
                                    )?;
                                    Tensor::from_data(TensorData::new(flat, dims), ex.device)
                                }
                                Block::SubBlocks(_) | Block::LlamaSubBlocks(..) => {
                                    unreachable!("an original layer's part")
                                }
                            };
                            Held::Whole { x: Some(h), holders }
                        }
                        (other, _) => other,
                    },
                };
            }
            held = ex.whole(held, &originals_on)?;
        }
        let Held::Whole { x, holders } = held else {
            unreachable!("made whole after the last stage")
        };
        // What is left of the step's wall time after communication was compute.
        let result = self.finish(mesh, x, &holders, req)?;
        self.timing.compute = clock.elapsed().saturating_sub(self.timing.communication);
        Ok(result)
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
                let group: Vec<usize> = match last.originals() {
                    Original::TensorParallel => last.workers.clone(),
                    Original::Replicated | Original::Gather => vec![leader],
                };
                if !group.contains(&self.rank) {
                    (None, if req.want == Want::Logits { c.vocab } else { 1 })
                } else {
                    let x = x.clone().expect("head workers hold the activations");
                    let (part, rows) = match self.head.as_ref().expect("head workers hold a head part") {
                        Head::Burn(head) => (flat(head.forward(x)), head.rows()),
                        Head::Quantized(head) => {
                            let q = self.quantized.as_mut().expect("a quantized head has its kernels");
                            (head.forward(&flat(x), batch, &mut q.scratch, &q.kernels)?, head.rows())
                        }
                    };
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
    if req.slots.len() != batch {
        return Err(InferError::Request(format!(
            "{batch} rows name {} cache slots",
            req.slots.len()
        )));
    }
    if let Some(&slot) = req.slots.iter().find(|&&s| s >= crate::qllama::MAX_SLOTS) {
        return Err(InferError::Request(format!(
            "cache slot {slot}: a worker holds at most {} sequences",
            crate::qllama::MAX_SLOTS
        )));
    }
    if (1..batch).any(|i| req.slots[..i].contains(&req.slots[i])) {
        return Err(InferError::Request(
            "two rows of a batch name the same cache slot".into(),
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
    use hetero_models::checkpoint::span;

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
            attention_bias: false,
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

    /// Placements of a decoupled model of four layers (decoupled, original,
    /// decoupled, original) cut into `divisions` sub-blocks: the built-in ones,
    /// and decoupled stages over 2, 3 and 4 workers with the sub-blocks even and
    /// uneven (some workers holding none) and original layers in each of the three
    /// modes, alone and mixed in two stages on different workers.
    fn decoupled_placements(layout: &Layout) -> Vec<Placement> {
        let d = layout.divisions;
        let mut out = vec![
            Placement::single(4),
            Placement::tensor_parallel(4, 2),
            Placement::tensor_parallel(4, 4),
            Placement::pipeline(4, 3),
        ];
        let stage = |workers: &[usize], sub_blocks: Vec<usize>, original: &str| {
            format!(
                "mode = \"decoupled\"\nworkers = {workers:?}\nsub_blocks = {sub_blocks:?}\noriginal = \"{original}\"\n"
            )
        };
        for original in ["replicated", "tensor-parallel", "gather"] {
            for (workers, sub_blocks) in [
                (vec![0, 1], vec![d / 2, d - d / 2]),
                (vec![1, 0], vec![d - 1, 1]),
                (vec![0, 1, 2], vec![1, 0, d - 1]),
                (vec![0, 1, 2, 3], (0..4).map(|w| span(d, w, 4).len()).collect()),
                (vec![3, 1, 0, 2], vec![0, 2, 1, d - 3]),
            ] {
                let text = format!(
                    "workers = {}\n[[stage]]\nlayers = \"all\"\n{}",
                    workers.len(),
                    stage(&workers, sub_blocks, original)
                );
                out.push(Placement::parse(&text, layout).unwrap());
            }
        }
        let mixed = format!(
            "workers = 4\n[[stage]]\nlayers = \"0..2\"\n{}[[stage]]\nlayers = \"2..4\"\n{}",
            stage(&[2, 3], vec![1, d - 1], "gather"),
            stage(&[0, 1, 3], vec![d - 2, 1, 1], "tensor-parallel")
        );
        out.push(Placement::parse(&mixed, layout).unwrap());
        out
    }

    fn decoupling(divisions: usize, variant: hetero_models::Variant) -> hetero_models::Decoupling {
        hetero_models::Decoupling {
            divisions,
            blocks: 2,
            variant,
        }
    }

    /// A decoupled encoder runs under every placement as its module does on one
    /// device: slices stay where their sub-blocks are and meet only for original
    /// layers.
    #[test]
    fn decoupled_encoder_placements_agree_with_its_module() {
        use hetero_models::Variant;
        use hetero_models::bert::padded_ids;
        use hetero_models::decoupled_bert::DecoupledBert;
        let rows = [vec![2, 7, 9, 4, 3], vec![2, 11, 3]];
        let c = BertConfig {
            hidden: 48,
            heads: 4,
            layers: 4,
            ..small_bert()
        };
        for (divisions, variant) in [(4, Variant::SplitHeads), (6, Variant::FullHeads)] {
            let config = DecoupledBertConfig::new(c.clone(), decoupling(divisions, variant)).unwrap();
            let w = RandomWeights::new(config.tensor_shapes(), 4);
            let module = DecoupledBert::<B>::load(&mut |n, s| w.expect(n, s), &config, &Default::default()).unwrap();
            let (ids, lengths) = padded_ids::<B, _>(&rows, &Default::default());
            let want = vec![Output::Embeddings(mean_pool(module.forward(ids, &lengths), &lengths))];
            let arch = Arch::DecoupledBert(config);
            for placement in decoupled_placements(&arch.layout()) {
                let got = run_placed(&arch, &w, &placement, &[Request::embed(&rows)]);
                assert_close(&want, &got, &format!("{divisions} {variant}: {}", placement.to_toml()));
            }
        }
    }

    /// A decoupled decoder runs under every placement as its module does on one
    /// device, through a prefill and cached decode steps: each worker keeps the
    /// keys and values of its own sub-blocks only.
    #[test]
    fn decoupled_decoder_placements_agree_with_its_module() {
        use hetero_models::Variant;
        use hetero_models::decoupled_llama::DecoupledLlama;
        let c = LlamaConfig {
            separate_head: true,
            attention_bias: false,
            layers: 4,
            ..small_llama()
        };
        for (divisions, variant) in [(3, Variant::SplitHeads), (4, Variant::FullHeads)] {
            let config = DecoupledLlamaConfig::new(c.clone(), decoupling(divisions, variant)).unwrap();
            let w = RandomWeights::new(config.tensor_shapes(), 5);
            let device = Default::default();
            let module = DecoupledLlama::<B>::load(&mut |n, s| w.expect(n, s), &config, c.context, &device).unwrap();
            let mut caches = module.caches();
            let steps = [
                vec![vec![1, 5, 9, 17], vec![3, 3, 8, 40]],
                vec![vec![22], vec![7]],
                vec![vec![13], vec![60]],
            ];
            let mut want = Vec::new();
            for step in &steps {
                let ids = crate::bert::ids_tensor::<B>(step, c.vocab, &device).unwrap();
                let logits = module.forward(ids, &mut caches);
                let [batch, seq, vocab] = logits.dims();
                let last = logits.slice([0..batch, seq - 1..seq]).reshape([batch, vocab]);
                let rows = last.into_data().to_vec::<f32>().unwrap();
                want.push(Output::Logits(rows.chunks(vocab).map(<[f32]>::to_vec).collect()));
            }
            let reqs: Vec<Request> = steps
                .iter()
                .enumerate()
                .map(|(i, s)| Request::decode(s.clone(), i == 0, Want::Logits))
                .collect();
            let arch = Arch::DecoupledLlama(config);
            for placement in decoupled_placements(&arch.layout()) {
                let got = run_placed(&arch, &w, &placement, &reqs);
                assert_close(&want, &got, &format!("{divisions} {variant}: {}", placement.to_toml()));
            }
        }
    }

    /// All-gathers move each slice across a link once: a decoupled stage over
    /// four workers sends no more than a tensor-parallel one's share of a layer's
    /// all-reduce, and nothing at all between decoupled layers.
    #[test]
    fn a_decoupled_stage_sends_only_what_its_original_layers_need() {
        use hetero_models::Variant;
        let c = BertConfig {
            hidden: 48,
            heads: 4,
            layers: 4,
            ..small_bert()
        };
        let config = DecoupledBertConfig::new(c.clone(), decoupling(4, Variant::SplitHeads)).unwrap();
        let w = RandomWeights::new(config.tensor_shapes(), 4);
        let arch = Arch::DecoupledBert(config);
        let rows = [vec![2, 7, 9, 4, 3]];
        let sent = |placement: &Placement| {
            let meshes = hetero_comm::mesh::loopback(placement.workers, "bytes", "t").unwrap();
            std::thread::scope(|s| {
                let handles: Vec<_> = meshes
                    .into_iter()
                    .enumerate()
                    .map(|(rank, mut mesh)| {
                        let (arch, placement, w, rows) = (arch.clone(), placement.clone(), &w, &rows);
                        s.spawn(move || {
                            let mut worker = Worker::<B>::load(arch, w, placement, rank, &Default::default()).unwrap();
                            worker.step(&mut mesh, &Request::embed(rows)).unwrap();
                            mesh.bytes_sent()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<u64>>()
            })
        };
        let layout = arch.layout();
        // One hidden state: 5 tokens × 48 values × 4 bytes; a quarter per worker.
        let state = 5 * 48 * 4;
        let frame = 5;
        // Two original layers, each after an all-gather in which every worker
        // sends its quarter to three others; the result goes from worker 0 nowhere.
        let replicated = sent(&Placement::named("decoupled-replicated", &layout, 4).unwrap());
        for (rank, bytes) in replicated.iter().enumerate() {
            assert_eq!(*bytes, 2 * 3 * (state / 4 + frame), "rank {rank}");
        }
        // Gathering to worker 0: the three others send their quarter in, and the
        // root scatters them their slices back for the next decoupled layer.
        let gather = sent(&Placement::named("decoupled-gather", &layout, 4).unwrap());
        assert_eq!(gather[0], 3 * (state / 4 + frame), "the root scatters once");
        for bytes in &gather[1..] {
            assert_eq!(*bytes, 2 * (state / 4 + frame));
        }
    }

    #[test]
    fn decoder_placements_agree_with_one_device_through_prefill_and_decode() {
        for attention_bias in [false, true] {
            decoder_placements_agree(LlamaConfig {
                attention_bias,
                ..small_llama()
            });
        }
    }

    fn decoder_placements_agree(c: LlamaConfig) {
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
            &Layout::plain(3),
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
