//! The front's commands to the other workers of a mesh, and their bytes.
//!
//! A command travels as one message frame (`Mesh::send_msg`): an op byte, then its
//! fields little-endian, token ids as `u32`. [`Command::decode`] bounds every count
//! by the bytes that are actually there, so a damaged or hostile message is an
//! error naming what is wrong, never an allocation on its word.

use crate::InferError;
use crate::profile::Shape;
use crate::runtime::{Request, Want};

/// The largest text (a placement, a model's name) the front may send, bytes.
pub(crate) const MAX_TEXT: usize = 1 << 20;

/// The most shapes one profile times.
pub(crate) const MAX_SHAPES: usize = 64;

/// The bytes of [`Command::Run`] for `batch` rows of `seq` tokens: the op, what is
/// wanted, the reset flag, the two counts, then a length, a slot and `seq` ids per
/// row.
pub(crate) fn run_bytes(batch: usize, seq: usize) -> usize {
    3 + 8 + 4 * batch * (2 + seq)
}

/// What the front tells a follower to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run this request (every worker runs its part of the same step).
    Run(Request),
    /// Stop following.
    Stop,
    /// Reply with a [`crate::protocol::Report`].
    Report,
    /// Time your layer kinds at these shapes; reply with the times.
    Measure(Vec<Shape>),
    /// Time an original layer at this shape while another device times its own.
    Crowd(Shape),
    /// Measure the link between ranks `a` and `b` (the lower replies).
    Link {
        /// One end.
        a: usize,
        /// The other end.
        b: usize,
    },
    /// Load the placement whose TOML this is.
    Place(String),
    /// Open the model of this name and wait for a placement.
    Model(String),
}

/// Op bytes, one per command.
mod op {
    pub const RUN: u8 = 1;
    pub const STOP: u8 = 2;
    pub const REPORT: u8 = 3;
    pub const MEASURE: u8 = 5;
    pub const CROWD: u8 = 6;
    pub const LINK: u8 = 7;
    pub const PLACE: u8 = 8;
    pub const MODEL: u8 = 9;
}

impl Command {
    /// The command's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Command::Run(req) => {
                let (batch, seq) = req.shape();
                out.push(op::RUN);
                out.push(match req.want {
                    Want::Embedding => 0,
                    Want::NextToken => 1,
                    Want::Logits => 2,
                });
                out.push(u8::from(req.reset));
                u32s(&mut out, [batch as u32, seq as u32]);
                u32s(&mut out, req.lengths.iter().map(|&l| l as u32));
                u32s(&mut out, req.slots.iter().map(|&s| s as u32));
                u32s(&mut out, req.ids.iter().flatten().copied());
            }
            Command::Stop => out.push(op::STOP),
            Command::Report => out.push(op::REPORT),
            Command::Measure(shapes) => {
                out.push(op::MEASURE);
                u32s(&mut out, std::iter::once(shapes.len() as u32));
                for s in shapes {
                    u32s(&mut out, [s.batch, s.tokens, s.context].into_iter().map(|v| v as u32));
                }
            }
            Command::Crowd(s) => {
                out.push(op::CROWD);
                u32s(&mut out, [s.batch, s.tokens, s.context].into_iter().map(|v| v as u32));
            }
            Command::Link { a, b } => {
                out.push(op::LINK);
                u32s(&mut out, [*a as u32, *b as u32]);
            }
            Command::Place(text) | Command::Model(text) => {
                out.push(if matches!(self, Command::Place(_)) {
                    op::PLACE
                } else {
                    op::MODEL
                });
                out.extend_from_slice(text.as_bytes());
            }
        }
        out
    }

    /// Reads a command back, refusing anything [`Command::encode`] cannot have
    /// written.
    pub fn decode(bytes: &[u8]) -> Result<Command, InferError> {
        let (&code, rest) = bytes
            .split_first()
            .ok_or_else(|| InferError::Request("the front sent an empty command".into()))?;
        let mut r = Fields { bytes: rest, at: 0 };
        let command = match code {
            op::RUN => {
                let want = match r.u8("what the request wants")? {
                    0 => Want::Embedding,
                    1 => Want::NextToken,
                    2 => Want::Logits,
                    w => return Err(InferError::Request(format!("the front asked for output kind {w}"))),
                };
                let reset = match r.u8("the reset flag")? {
                    0 => false,
                    1 => true,
                    f => return Err(InferError::Request(format!("the front sent a reset flag of {f}"))),
                };
                let (batch, seq) = (r.u32("the batch")? as usize, r.u32("the sequence length")? as usize);
                if batch == 0 {
                    return Err(InferError::Request("the front sent a run of no rows".into()));
                }
                let ids_len = batch.checked_mul(seq).filter(|&n| n <= r.left() / 4).ok_or_else(|| {
                    InferError::Request(format!(
                        "the front sent a run of {batch} rows × {seq} tokens in {} bytes",
                        bytes.len()
                    ))
                })?;
                let lengths = r.usizes(batch, "the rows' lengths")?;
                let slots = r.usizes(batch, "the rows' slots")?;
                let flat = r.u32s(ids_len, "the token ids")?;
                let ids = flat.chunks(seq.max(1)).map(<[u32]>::to_vec).collect();
                Command::Run(Request {
                    ids: if seq == 0 { vec![Vec::new(); batch] } else { ids },
                    lengths,
                    slots,
                    reset,
                    want,
                })
            }
            op::STOP => Command::Stop,
            op::REPORT => Command::Report,
            op::MEASURE => {
                let n = r.u32("the number of shapes")? as usize;
                if n == 0 || n > MAX_SHAPES {
                    return Err(InferError::Profile(format!(
                        "the front asked for {n} shapes (1 to {MAX_SHAPES})"
                    )));
                }
                Command::Measure((0..n).map(|_| r.shape()).collect::<Result<_, _>>()?)
            }
            op::CROWD => Command::Crowd(r.shape()?),
            op::LINK => Command::Link {
                a: r.u32("the link's first rank")? as usize,
                b: r.u32("the link's second rank")? as usize,
            },
            op::PLACE | op::MODEL => {
                if rest.len() > MAX_TEXT {
                    return Err(InferError::Request(format!(
                        "the front sent a text of {} bytes (at most {MAX_TEXT})",
                        rest.len()
                    )));
                }
                let text = String::from_utf8(rest.to_vec())
                    .map_err(|_| InferError::Request("the front sent a text that is not UTF-8".into()))?;
                r.at = rest.len();
                if code == op::PLACE {
                    Command::Place(text)
                } else {
                    Command::Model(text)
                }
            }
            other => return Err(InferError::Request(format!("unknown command {other} from the front"))),
        };
        if r.left() != 0 {
            return Err(InferError::Request(format!(
                "{} bytes left over after the front's command {code}",
                r.left()
            )));
        }
        Ok(command)
    }
}

/// Appends `vs` as little-endian `u32`s.
fn u32s(out: &mut Vec<u8>, vs: impl IntoIterator<Item = u32>) {
    vs.into_iter().for_each(|v| out.extend(v.to_le_bytes()));
}

/// A command's fields being read.
struct Fields<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], InferError> {
        if n > self.left() {
            return Err(InferError::Request(format!(
                "the front's command ends early: {what} needs {n} bytes, {} are left",
                self.left()
            )));
        }
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }

    fn u8(&mut self, what: &str) -> Result<u8, InferError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, InferError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("four bytes")))
    }

    fn u32s(&mut self, n: usize, what: &str) -> Result<Vec<u32>, InferError> {
        let bytes = self.take(n.saturating_mul(4), what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")))
            .collect())
    }

    fn usizes(&mut self, n: usize, what: &str) -> Result<Vec<usize>, InferError> {
        Ok(self.u32s(n, what)?.into_iter().map(|v| v as usize).collect())
    }

    fn shape(&mut self) -> Result<Shape, InferError> {
        Ok(Shape {
            batch: self.u32("a shape's batch")? as usize,
            tokens: self.u32("a shape's tokens")? as usize,
            context: self.u32("a shape's context")? as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_command() -> Vec<Command> {
        let shape = Shape {
            batch: 2,
            tokens: 128,
            context: 7,
        };
        vec![
            Command::Run(Request {
                ids: vec![vec![1, 49_151, 151_935], vec![0, 5, 16_777_217]],
                lengths: vec![3, 2],
                slots: vec![4, 0],
                reset: true,
                want: Want::Logits,
            }),
            Command::Run(Request {
                ids: vec![vec![]],
                lengths: vec![0],
                slots: vec![0],
                reset: false,
                want: Want::Embedding,
            }),
            Command::Stop,
            Command::Report,
            Command::Measure(vec![shape, Shape { context: 0, ..shape }]),
            Command::Crowd(shape),
            Command::Link { a: 1, b: 3 },
            Command::Place("workers = 2\n".into()),
            Command::Model("smollm2+f32".into()),
        ]
    }

    /// Every command reads back as itself: token ids past 2^24 (which a float
    /// carries inexactly) included.
    #[test]
    fn every_command_reads_back_as_itself() {
        for c in every_command() {
            assert_eq!(Command::decode(&c.encode()).unwrap(), c);
            if let Command::Run(req) = &c {
                let (batch, seq) = req.shape();
                assert_eq!(
                    c.encode().len(),
                    run_bytes(batch, seq),
                    "the cost model's size of a run"
                );
            }
        }
    }

    /// A command cut short, grown, or of an unknown op is an error naming it, at
    /// every cut.
    #[test]
    fn damaged_commands_are_refused() {
        for c in every_command() {
            let bytes = c.encode();
            for cut in 0..bytes.len() {
                let text = matches!(c, Command::Place(_) | Command::Model(_));
                if !(text && cut >= 1) {
                    assert!(Command::decode(&bytes[..cut]).is_err(), "{c:?} cut at {cut}");
                }
            }
            if !matches!(c, Command::Place(_) | Command::Model(_)) {
                let mut longer = bytes.clone();
                longer.push(0);
                assert!(Command::decode(&longer).unwrap_err().to_string().contains("left over"));
            }
        }
        let err = Command::decode(&[42]).unwrap_err().to_string();
        assert!(err.contains("unknown command 42"), "{err}");
        // A run announcing more ids than its bytes hold is refused before allocating.
        let mut huge = vec![op::RUN, 1, 0];
        huge.extend(u32::MAX.to_le_bytes());
        huge.extend(u32::MAX.to_le_bytes());
        assert!(Command::decode(&huge).unwrap_err().to_string().contains("rows"));
    }
}
