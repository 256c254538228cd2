//! Checkpoints: the whole training state in one self-checking file.
//!
//! Layout: the magic line `HETERO-CHECKPOINT\n`, a `u32` format version, a `u64`
//! header length and the JSON [`Header`], then the parameters and the optimiser's
//! moments as little-endian `f32`, then the SHA-256 of everything before it. A
//! checkpoint is written to a temporary file and renamed into place, so a crash
//! mid-write leaves the previous one intact; loading checks every length and the
//! digest, so a truncated or corrupt file is an error naming what is wrong.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::TrainError;
use crate::optim::OptimizerState;
use crate::report::EpochRecord;

const MAGIC: &[u8] = b"HETERO-CHECKPOINT\n";
const VERSION: u32 = 1;

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The next epoch to train (epochs before it are done).
    pub epoch: usize,
    /// Optimiser steps taken.
    pub step: u64,
    /// Number of parameters.
    pub parameters: usize,
    /// Number of optimiser moments (0: the optimiser state is not included).
    pub moments: usize,
    /// The strategy that trained it.
    pub strategy: String,
    /// Workers at the time.
    pub workers: usize,
    /// The epochs so far.
    pub history: Vec<EpochRecord>,
}

/// A training state that can be saved and resumed.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The next epoch to train.
    pub epoch: usize,
    /// The global model.
    pub params: Vec<f32>,
    /// The optimiser's state, when this worker held it (not with a parameter server).
    pub optimizer: Option<OptimizerState>,
    /// The strategy that trained it.
    pub strategy: String,
    /// Workers at the time.
    pub workers: usize,
    /// The epochs so far.
    pub history: Vec<EpochRecord>,
}

fn corrupt(path: &Path, why: String) -> TrainError {
    TrainError::Config(format!("checkpoint {} is unusable: {why}", path.display()))
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

impl Checkpoint {
    /// Writes the checkpoint to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let moments = self.optimizer.as_ref().map_or(0, |o| o.moment_1.len());
        let header = Header {
            epoch: self.epoch,
            step: self.optimizer.as_ref().map_or(0, |o| o.time),
            parameters: self.params.len(),
            moments,
            strategy: self.strategy.clone(),
            workers: self.workers,
            history: self.history.clone(),
        };
        let json = serde_json::to_vec(&header).expect("headers serialise");
        let mut out = Vec::with_capacity(64 + json.len() + (self.params.len() + 2 * moments) * 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        let mut put = |values: &[f32]| values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        put(&self.params);
        if let Some(o) = &self.optimizer {
            put(&o.moment_1);
            put(&o.moment_2);
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);

        // Written beside the previous checkpoint and renamed over it once whole: a
        // write that fails (a full disk) leaves the previous one as it was, and
        // takes its partial file away.
        let io = |e: std::io::Error| TrainError::Output(format!("cannot write checkpoint {}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = temporary(path);
        let written = std::fs::File::create(&tmp)
            .and_then(|mut file| file.write_all(&out).and_then(|_| file.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(())
    }

    /// Reads the checkpoint at `path` for a model of `parameters` parameters: a
    /// checkpoint of another model is refused with both sizes named.
    pub fn load_for(path: &Path, parameters: usize) -> Result<Checkpoint, TrainError> {
        let c = Checkpoint::load(path)?;
        if c.params.len() != parameters {
            return Err(TrainError::Config(format!(
                "checkpoint {} holds {} parameters; this job's model has {parameters}",
                path.display(),
                c.params.len()
            )));
        }
        Ok(c)
    }

    /// Reads and checks the checkpoint at `path`.
    pub fn load(path: &Path) -> Result<Checkpoint, TrainError> {
        let bytes = std::fs::read(path)
            .map_err(|e| TrainError::Config(format!("cannot read checkpoint {}: {e}", path.display())))?;
        let fixed = MAGIC.len() + 4 + 8;
        if bytes.len() < fixed + 32 || !bytes.starts_with(MAGIC) {
            return Err(corrupt(path, "not a Hetero checkpoint".into()));
        }
        let version = u32::from_le_bytes(bytes[MAGIC.len()..MAGIC.len() + 4].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(corrupt(
                path,
                format!("format version {version}, this build reads {VERSION}"),
            ));
        }
        let header_len = u64::from_le_bytes(bytes[MAGIC.len() + 4..fixed].try_into().expect("8 bytes")) as usize;
        let header_end = fixed
            .checked_add(header_len)
            .filter(|&e| e <= bytes.len() - 32)
            .ok_or_else(|| corrupt(path, format!("truncated ({} bytes, header says more)", bytes.len())))?;
        let header: Header =
            serde_json::from_slice(&bytes[fixed..header_end]).map_err(|e| corrupt(path, format!("bad header: {e}")))?;
        let expected = header_end + (header.parameters + 2 * header.moments) * 4 + 32;
        if bytes.len() != expected {
            return Err(corrupt(
                path,
                format!(
                    "truncated or padded: {} bytes where the header implies {expected}",
                    bytes.len()
                ),
            ));
        }
        let body = &bytes[..expected - 32];
        if Sha256::digest(body).as_slice() != &bytes[expected - 32..] {
            return Err(corrupt(path, "checksum mismatch (the file was damaged)".into()));
        }
        let p_end = header_end + header.parameters * 4;
        let m_end = p_end + header.moments * 4;
        Ok(Checkpoint {
            epoch: header.epoch,
            params: floats(&bytes[header_end..p_end]),
            optimizer: (header.moments > 0 || header.step > 0).then(|| OptimizerState {
                time: header.step,
                moment_1: floats(&bytes[p_end..m_end]),
                moment_2: floats(&bytes[m_end..expected - 32]),
            }),
            strategy: header.strategy,
            workers: header.workers,
            history: header.history,
        })
    }
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            epoch: 2,
            params: vec![1.0, -2.5, 3.25],
            optimizer: Some(OptimizerState {
                time: 40,
                moment_1: vec![0.1, 0.2, 0.3],
                moment_2: vec![0.01, 0.02, 0.03],
            }),
            strategy: "allreduce".into(),
            workers: 3,
            history: vec![EpochRecord {
                epoch: 0,
                train_loss: 0.5,
                test_accuracy: Some(0.8),
                elapsed_secs: 1.0,
                coverage: Default::default(),
                shares: vec![0.75, 0.25],
            }],
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/checkpoint.bin");
        sample().save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), sample());
        assert!(!dir.path().join("run/checkpoint.bin.partial").exists());
        let mut sgd = sample();
        sgd.optimizer = Some(OptimizerState {
            time: 7,
            moment_1: vec![],
            moment_2: vec![],
        });
        sgd.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), sgd);
    }

    #[test]
    fn damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.bin");
        sample().save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();

        std::fs::write(&path, &good[..good.len() - 10]).unwrap();
        let err = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");

        let mut flipped = good.clone();
        let at = flipped.len() - 40;
        flipped[at] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        let err = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");

        std::fs::write(&path, b"hello").unwrap();
        let err = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a Hetero checkpoint"), "{err}");

        let err = Checkpoint::load(&dir.path().join("missing.bin"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read checkpoint"), "{err}");
    }
}
