//! Where a run stands, and how it travels whole to the members of a re-formed ring.
//!
//! ## Design
//! [`RunState`] is everything the workers of a ring must agree on besides the
//! model and optimiser: the epoch, the step count, who is in the ring, who was lost
//! or rejoined, the data assignment and the history. When a ring re-forms (workers
//! lost, or lost ranks rejoining) every member adopts the state of the one that got
//! furthest; a rejoining worker holds none of it, so the state travels whole as a
//! [`Handover`]: one message of bytes over the ring's byte broadcast, written and
//! read by the one codec below (little-endian, each list after its length, every
//! length bounded by the bytes present).

use hetero_data::assign::Assignment;

use crate::TrainError;
use crate::report::{Coverage, EpochRecord};

/// What the members of a ring agree on about the run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RunState {
    /// The epoch being trained (or next to train).
    pub epoch: usize,
    /// Steps taken (the same on every member of the ring).
    pub updates: u64,
    /// Which samples each member trains on, and where it stands in them.
    pub assignment: Assignment,
    /// The epochs finished.
    pub history: Vec<EpochRecord>,
    /// Original rank of each current member, by current rank.
    pub members: Vec<usize>,
    /// Original ranks lost, in order.
    pub lost: Vec<usize>,
    /// Original ranks that rejoined, in order.
    pub rejoined: Vec<usize>,
    /// Times the split followed measured throughput.
    pub rebalances: usize,
    /// Workers the job started with.
    pub total_workers: usize,
    /// The epoch a resumed run started from.
    pub resumed_at: Option<usize>,
    /// The step count after which the split is first set from measured
    /// throughput (`None`: done, or the split is not weighted).
    pub measure_at: Option<u64>,
}

impl RunState {
    /// Each member's share of the global batch.
    pub fn shares(&self) -> Vec<f64> {
        let batches = self.assignment.batches();
        let total = batches.iter().sum::<usize>().max(1) as f64;
        batches.iter().map(|&b| b as f64 / total).collect()
    }
}

/// Everything another worker needs to go on from one worker's position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Handover {
    /// The model, flattened.
    pub params: Vec<f32>,
    /// The optimiser's state, flattened.
    pub optimizer: Vec<f32>,
    /// Where the run stands.
    pub run: RunState,
}

impl Handover {
    /// The handover as one message.
    pub fn to_bytes(&self) -> Vec<u8> {
        let run = &self.run;
        let mut w = Writer::default();
        w.f32s(&self.params);
        w.f32s(&self.optimizer);
        w.u64(run.updates);
        w.usize(run.epoch);
        w.usizes(&run.members);
        w.usizes(&run.lost);
        w.usizes(&run.rejoined);
        w.usize(run.rebalances);
        w.usize(run.total_workers);
        w.u64(run.resumed_at.map_or(u64::MAX, |e| e as u64));
        w.u64(run.measure_at.unwrap_or(u64::MAX));
        w.u64s(&run.assignment.to_words());
        w.usize(run.history.len());
        for h in &run.history {
            w.usize(h.epoch);
            w.f64(h.train_loss);
            w.f64(h.test_accuracy.unwrap_or(f64::NAN));
            w.f64(h.elapsed_secs);
            let c = h.coverage;
            w.usizes(&[c.samples, c.visited, c.distinct]);
            w.u64s(&h.shares.iter().map(|s| s.to_bits()).collect::<Vec<_>>());
        }
        w.0
    }

    /// Reads back what [`Handover::to_bytes`] wrote; a short, long or
    /// inconsistent message is an error naming what was wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Handover, TrainError> {
        let mut r = Reader { bytes, at: 0 };
        let params = r.f32s("the model")?;
        let optimizer = r.f32s("the optimiser")?;
        let updates = r.u64("the step count")?;
        let epoch = r.usize("the epoch")?;
        let members = r.usizes("the members")?;
        let lost = r.usizes("the lost workers")?;
        let rejoined = r.usizes("the rejoined workers")?;
        let rebalances = r.usize("the rebalance count")?;
        let total_workers = r.usize("the worker count")?;
        let resumed_at = match r.u64("the resumed epoch")? {
            u64::MAX => None,
            e => Some(usize::try_from(e).map_err(|_| bad(format!("the resumed epoch is {e}")))?),
        };
        let measure_at = Some(r.u64("the step to measure at")?).filter(|&s| s != u64::MAX);
        let assignment =
            Assignment::from_words(&r.u64s("the assignment")?).map_err(|e| bad(format!("its data assignment: {e}")))?;
        if assignment.world() != members.len() {
            return Err(bad(format!(
                "its data assignment is for {} workers, its members {}",
                assignment.world(),
                members.len()
            )));
        }
        // Each record takes at least 72 bytes: the count cannot promise more.
        let epochs = r.len("the history", 72)?;
        let mut history = Vec::with_capacity(epochs);
        for _ in 0..epochs {
            let epoch = r.usize("an epoch")?;
            let train_loss = r.f64("a training loss")?;
            let accuracy = r.f64("a test accuracy")?;
            let elapsed_secs = r.f64("a time")?;
            let coverage = match r.usizes("an epoch's coverage")?[..] {
                [samples, visited, distinct] => Coverage {
                    samples,
                    visited,
                    distinct,
                },
                _ => return Err(bad("an epoch's coverage is not three counts".into())),
            };
            let shares = r.u64s("an epoch's shares")?.into_iter().map(f64::from_bits).collect();
            history.push(EpochRecord {
                epoch,
                train_loss,
                test_accuracy: (!accuracy.is_nan()).then_some(accuracy),
                elapsed_secs,
                coverage,
                shares,
            });
        }
        r.finish()?;
        Ok(Handover {
            params,
            optimizer,
            run: RunState {
                epoch,
                updates,
                assignment,
                history,
                members,
                lost,
                rejoined,
                rebalances,
                total_workers,
                resumed_at,
                measure_at,
            },
        })
    }
}

fn bad(why: String) -> TrainError {
    TrainError::Config(format!("the shared training state is damaged: {why}"))
}

/// A message being written.
#[derive(Debug, Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }

    /// A double exactly (its bits).
    fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }

    fn f32s(&mut self, v: &[f32]) {
        self.usize(v.len());
        self.0.reserve(4 * v.len());
        v.iter().for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }

    fn u64s(&mut self, v: &[u64]) {
        self.usize(v.len());
        v.iter().for_each(|&x| self.u64(x));
    }

    fn usizes(&mut self, v: &[usize]) {
        self.usize(v.len());
        v.iter().for_each(|&x| self.usize(x));
    }
}

/// A message being read; `what` names the field for the error.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], TrainError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                bad(format!(
                    "it ends early: {what} needs {n} bytes at {} of {}",
                    self.at,
                    self.bytes.len()
                ))
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self, what: &str) -> Result<u64, TrainError> {
        let s = self.take(8, what)?;
        Ok(u64::from_le_bytes(s.try_into().expect("eight bytes")))
    }

    fn usize(&mut self, what: &str) -> Result<usize, TrainError> {
        let v = self.u64(what)?;
        usize::try_from(v).map_err(|_| bad(format!("{what} is {v}")))
    }

    fn f64(&mut self, what: &str) -> Result<f64, TrainError> {
        Ok(f64::from_bits(self.u64(what)?))
    }

    /// A list's length, bounded by the bytes left at `width` bytes per item.
    fn len(&mut self, what: &str, width: usize) -> Result<usize, TrainError> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) / width;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= left)
            .ok_or_else(|| bad(format!("{what} says it has {n} values")))
    }

    fn f32s(&mut self, what: &str) -> Result<Vec<f32>, TrainError> {
        let n = self.len(what, 4)?;
        let bytes = self.take(4 * n, what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("four bytes")))
            .collect())
    }

    fn u64s(&mut self, what: &str) -> Result<Vec<u64>, TrainError> {
        let n = self.len(what, 8)?;
        (0..n).map(|_| self.u64(what)).collect()
    }

    fn usizes(&mut self, what: &str) -> Result<Vec<usize>, TrainError> {
        let n = self.len(what, 8)?;
        (0..n).map(|_| self.usize(what)).collect()
    }

    fn finish(self) -> Result<(), TrainError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            left => Err(bad(format!("{left} bytes are left over"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use hetero_comm::Ring;
    use hetero_data::shard::Split;

    use super::*;

    fn handover() -> Handover {
        let mut assignment = Assignment::new(50, &Split::weighted(&[0.6, 0.4]), 10, 3);
        assignment.begin_epoch(3, 1);
        assignment.advance();
        Handover {
            params: vec![1.5, f32::MIN_POSITIVE, -0.0, f32::NAN],
            optimizer: vec![0.25; 9],
            run: RunState {
                epoch: 1,
                updates: u64::MAX - 3,
                assignment,
                history: vec![EpochRecord {
                    epoch: 0,
                    train_loss: -1.0e-300,
                    test_accuracy: None,
                    elapsed_secs: 2.5,
                    coverage: Coverage {
                        samples: 50,
                        visited: 50,
                        distinct: 49,
                    },
                    shares: vec![0.625, 0.375],
                }],
                members: vec![0, 2],
                lost: vec![1],
                rejoined: vec![],
                rebalances: 2,
                total_workers: 3,
                resumed_at: Some(1 << 40),
                measure_at: Some(7),
            },
        }
    }

    /// Compares floats by their bits (the model may hold a NaN).
    fn same(a: &Handover, b: &Handover) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        bits(&a.params) == bits(&b.params) && a.optimizer == b.optimizer && a.run == b.run
    }

    #[test]
    fn a_handover_reads_back_as_itself() {
        let h = handover();
        assert!(same(&Handover::from_bytes(&h.to_bytes()).unwrap(), &h));
        let mut fresh = handover();
        fresh.run.resumed_at = None;
        fresh.run.measure_at = None;
        fresh.run.history[0].test_accuracy = Some(0.5);
        assert!(same(&Handover::from_bytes(&fresh.to_bytes()).unwrap(), &fresh));
    }

    #[test]
    fn every_cut_and_a_trailing_byte_are_refused() {
        let bytes = handover().to_bytes();
        for cut in 0..bytes.len() {
            let err = Handover::from_bytes(&bytes[..cut]).unwrap_err().to_string();
            assert!(err.contains("damaged"), "cut at {cut}: {err}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(
            Handover::from_bytes(&long)
                .unwrap_err()
                .to_string()
                .contains("left over")
        );
    }

    #[test]
    fn a_length_past_the_message_is_refused_before_anything_is_allocated() {
        let mut bytes = handover().to_bytes();
        bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let err = Handover::from_bytes(&bytes).unwrap_err().to_string();
        assert!(err.contains("the model says it has"), "{err}");
    }

    #[test]
    fn a_handover_crosses_a_ring() {
        let rings = hetero_comm::ring::loopback(3, "state", "k").unwrap();
        let handles: Vec<_> = rings
            .into_iter()
            .map(|mut ring: Ring| {
                std::thread::spawn(move || {
                    let mut bytes = if ring.rank() == 1 {
                        handover().to_bytes()
                    } else {
                        vec![9; 17]
                    };
                    ring.broadcast_bytes(&mut bytes, 1).unwrap();
                    Handover::from_bytes(&bytes).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert!(same(&h.join().unwrap(), &handover()));
        }
    }
}
