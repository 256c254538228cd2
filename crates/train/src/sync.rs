//! Handing a whole training state from one worker to the others over the ring.
//!
//! When a ring re-forms (workers lost, or lost ranks rejoining), every member adopts
//! the state of the one that got furthest: its model, optimiser, position in the
//! data, history. A rejoining worker holds none of that, so the state travels
//! whole, as a message of bytes ([`Words`], little-endian, each list after its
//! length) over the ring's byte broadcast.

use hetero_comm::Ring;

use crate::TrainError;

/// A state being written as bytes.
#[derive(Debug, Default)]
pub struct Words(Vec<u8>);

impl Words {
    /// Appends an integer (eight bytes).
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a double exactly (eight bytes).
    pub fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }

    /// Appends a length, then the values (four bytes each).
    pub fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        self.0.reserve(4 * v.len());
        v.iter().for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }

    /// Appends a length, then the integers.
    pub fn u64s(&mut self, v: &[u64]) {
        self.u64(v.len() as u64);
        v.iter().for_each(|&x| self.u64(x));
    }

    /// Appends a length, then the integers.
    pub fn usizes(&mut self, v: &[usize]) {
        self.u64(v.len() as u64);
        v.iter().for_each(|&x| self.u64(x as u64));
    }

    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Reads back what [`Words`] wrote, failing clearly on a short or damaged state.
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Reads `bytes` from the start.
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], TrainError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                TrainError::Config(format!(
                    "the shared training state ends early: {what} needs {n} bytes at {} of {}",
                    self.at,
                    self.bytes.len()
                ))
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// Reads an integer.
    pub fn u64(&mut self, what: &str) -> Result<u64, TrainError> {
        let s = self.take(8, what)?;
        Ok(u64::from_le_bytes(s.try_into().expect("eight bytes")))
    }

    /// Reads a double.
    pub fn f64(&mut self, what: &str) -> Result<f64, TrainError> {
        Ok(f64::from_bits(self.u64(what)?))
    }

    /// A list's length, bounded by the bytes left at `width` bytes per item.
    fn len(&mut self, what: &str, width: usize) -> Result<usize, TrainError> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) / width;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= left)
            .ok_or_else(|| TrainError::Config(format!("the shared training state says {what} has {n} values")))
    }

    /// Reads values written by [`Words::f32s`].
    pub fn f32s(&mut self, what: &str) -> Result<Vec<f32>, TrainError> {
        let n = self.len(what, 4)?;
        let bytes = self.take(4 * n, what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("four bytes")))
            .collect())
    }

    /// Reads integers written by [`Words::u64s`].
    pub fn u64s(&mut self, what: &str) -> Result<Vec<u64>, TrainError> {
        let n = self.len(what, 8)?;
        (0..n).map(|_| self.u64(what)).collect()
    }

    /// Reads integers written by [`Words::usizes`].
    pub fn usizes(&mut self, what: &str) -> Result<Vec<usize>, TrainError> {
        self.u64s(what)?
            .into_iter()
            .map(|v| {
                usize::try_from(v)
                    .map_err(|_| TrainError::Config(format!("the shared training state's {what} holds {v}")))
            })
            .collect()
    }

    /// Fails unless everything was read.
    pub fn finish(self) -> Result<(), TrainError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(TrainError::Config(format!(
                "{} bytes left over in the shared training state",
                self.bytes.len() - self.at
            )))
        }
    }
}

/// Sends `root`'s `state` to every member of `ring` (the others' `state` is
/// replaced); members need not know its length in advance.
pub fn broadcast(ring: &mut Ring, state: &mut Vec<u8>, root: usize) -> Result<(), TrainError> {
    ring.broadcast_bytes(state, root)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_read_back_exactly() {
        let mut w = Words::default();
        w.u64(u64::MAX - 3);
        w.f64(-1.0e-300);
        w.f64(f64::NAN);
        w.f32s(&[1.5, f32::MIN_POSITIVE, -0.0]);
        w.usizes(&[0, 7, 1 << 40]);
        let slots = w.into_bytes();
        let mut r = Reader::new(&slots);
        assert_eq!(r.u64("a").unwrap(), u64::MAX - 3);
        assert_eq!(r.f64("b").unwrap(), -1.0e-300);
        assert!(r.f64("c").unwrap().is_nan());
        assert_eq!(r.f32s("d").unwrap(), [1.5, f32::MIN_POSITIVE, -0.0]);
        assert_eq!(r.usizes("e").unwrap(), vec![0, 7, 1 << 40]);
        r.finish().unwrap();
    }

    #[test]
    fn a_short_state_is_a_clear_error() {
        let mut w = Words::default();
        w.f32s(&[1.0, 2.0, 3.0]);
        let slots = w.into_bytes();
        let err = Reader::new(&slots[..12]).f32s("the model").unwrap_err().to_string();
        assert!(err.contains("the model"), "{err}");
        let mut r = Reader::new(&slots);
        r.u64("x").unwrap();
        assert!(r.finish().unwrap_err().to_string().contains("left over"));
    }

    #[test]
    fn the_state_crosses_a_ring() {
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let addrs = addrs.clone();
                std::thread::spawn(move || {
                    let config = hetero_comm::RingConfig::new(rank, 3, "sync", "k");
                    let mut ring = Ring::form(config, l, &addrs).unwrap();
                    let mut state = if rank == 1 {
                        let mut w = Words::default();
                        w.u64(42);
                        w.f32s(&[f32::NAN, 2.0]);
                        w.into_bytes()
                    } else {
                        vec![9; 17]
                    };
                    broadcast(&mut ring, &mut state, 1).unwrap();
                    let mut r = Reader::new(&state);
                    (r.u64("n").unwrap(), r.f32s("v").unwrap()[1])
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), (42, 2.0));
        }
    }
}
