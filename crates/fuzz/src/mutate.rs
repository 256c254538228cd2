//! Mutations of one input: the changes that break binary formats and text alike.
//!
//! Length and count fields are where decoders go wrong, so besides flipping bits
//! and bytes the mutator writes the values that break them — 0, 1, −1, 2³¹, 2⁶³
//! and the input's own length — as 16-, 32- and 64-bit little- and big-endian
//! integers at random places. Ranges are cut, repeated and spliced in from other
//! inputs, which is how a file ends early, repeats a section or mixes two.

use rand::Rng;
use rand::rngs::StdRng;

/// Largest input the mutator makes.
pub const MAX_LEN: usize = 1 << 20;

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Applies one to four random mutations to `input`; `others` may be spliced in.
pub fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, others: &[Vec<u8>]) {
    for _ in 0..rng.random_range(1..=4) {
        one(rng, input, others);
    }
    input.truncate(MAX_LEN);
}

fn one(rng: &mut StdRng, input: &mut Vec<u8>, others: &[Vec<u8>]) {
    let len = input.len();
    let at = |rng: &mut StdRng| if len == 0 { 0 } else { rng.random_range(0..len) };
    match rng.random_range(0..9) {
        // One bit.
        0 if len > 0 => {
            let i = at(rng);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        // One byte, random or one that matters.
        1 if len > 0 => {
            let i = at(rng);
            input[i] = match rng.random_bool(0.5) {
                true => rng.random(),
                false => INTERESTING[rng.random_range(0..5)] as u8,
            };
        }
        // An integer that breaks lengths, of a random width and byte order.
        2 if len > 0 => {
            let value = match rng.random_range(0..4) {
                0 => len as u64,
                1 => rng.random::<u64>() >> rng.random_range(0..64),
                _ => INTERESTING[rng.random_range(0..INTERESTING.len())],
            };
            let width = [2, 4, 8][rng.random_range(0..3)];
            let bytes = match rng.random_bool(0.8) {
                true => value.to_le_bytes(),
                false => value.to_be_bytes(),
            };
            let bytes = if bytes[0] == (value as u8) {
                &bytes[..width]
            } else {
                &bytes[8 - width..]
            };
            let i = at(rng);
            for (k, b) in bytes.iter().enumerate() {
                if let Some(slot) = input.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        // A range cut out.
        3 if len > 0 => {
            let start = at(rng);
            let end = (start + rng.random_range(1..=len.min(64))).min(len);
            input.drain(start..end);
        }
        // The file ends early.
        4 if len > 0 => input.truncate(at(rng)),
        // A range repeated in place.
        5 if len > 0 => {
            let start = at(rng);
            let end = (start + rng.random_range(1..=len.min(256))).min(len);
            let copy = input[start..end].to_vec();
            let times = rng.random_range(1..=8);
            for _ in 0..times {
                input.splice(start..start, copy.iter().copied());
            }
        }
        // Random bytes inserted.
        6 => {
            let i = at(rng);
            let n = rng.random_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            input.splice(i..i, bytes);
        }
        // Another input's range spliced in.
        7 if !others.is_empty() => {
            let other = &others[rng.random_range(0..others.len())];
            if !other.is_empty() {
                let start = rng.random_range(0..other.len());
                let end = (start + rng.random_range(1..=other.len().min(256))).min(other.len());
                let i = at(rng);
                input.splice(i..i, other[start..end].iter().copied());
            }
        }
        // Text formats: a character that matters to a parser.
        _ => {
            let i = at(rng);
            const MARKS: &[u8] = b"\"'[]{}=,:\n\\0-.e";
            let c = MARKS[rng.random_range(0..MARKS.len())];
            input.insert(i.min(input.len()), c);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn mutants_differ_stay_bounded_and_are_reproducible_from_a_seed() {
        let seed = b"GGUF\x03\x00\x00\x00 some header bytes".to_vec();
        let run = |s: u64| {
            let mut rng = StdRng::seed_from_u64(s);
            (0..200)
                .map(|_| {
                    let mut m = seed.clone();
                    mutate(&mut rng, &mut m, std::slice::from_ref(&seed));
                    m
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(5), run(5));
        assert_eq!(a, b, "the same seed, the same mutants");
        assert!(a.iter().filter(|m| **m != seed).count() > 190);
        assert!(a.iter().all(|m| m.len() <= MAX_LEN));
        // Empty inputs grow.
        let mut rng = StdRng::seed_from_u64(1);
        let mut empty = Vec::new();
        for _ in 0..20 {
            mutate(&mut rng, &mut empty, &[]);
        }
        assert!(!empty.is_empty());
    }
}
