//! Choosing a decoder's next token from its logits, with the knobs OpenAI's API
//! names: `temperature`, `top_k`, `top_p`, `min_p`, `presence_penalty`,
//! `frequency_penalty` and `seed`.
//!
//! ## Design
//! The order is the one vLLM and llama.cpp use, so a user's settings mean the same
//! here as there: penalties first (on the raw logits, from the tokens generated so
//! far), then temperature; `temperature = 0` is greedy and takes the best penalised
//! logit. Otherwise the probabilities are cut by `top_k`, then to the nucleus of
//! mass `top_p`, then below `min_p` times the best one's, and one token is drawn
//! from what is left, renormalised.
//!
//! A vocabulary is ~50k tokens and a decode step a few milliseconds, so the cuts
//! never sort the whole vocabulary: the nucleus is found among the tokens above a
//! threshold that is lowered until they hold `top_p` of the mass, and only those
//! are sorted. A seeded sampler draws the same tokens for the same logits.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::InferError;

/// How to choose each next token; the default is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Divides the logits; 0 is greedy. 0..=2.
    pub temperature: f32,
    /// Keep only the `top_k` likeliest tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of likeliest tokens holding this much mass. (0, 1].
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the likeliest one's. [0, 1].
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated. -2..=2.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated. -2..=2.
    pub frequency_penalty: f32,
    /// Seeds the draws, so a request can be repeated; `None` draws a fresh seed.
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl Sampling {
    /// Refuses a setting outside its range, naming the parameter.
    pub fn check(&self) -> Result<(), InferError> {
        let bad = |name: &str, value: f32, range: &str| {
            Err(InferError::Request(format!("`{name}` is {value}; it must be {range}")))
        };
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature", self.temperature, "between 0 and 2");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "above 0 and at most 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "between 0 and 1");
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return bad(name, value, "between -2 and 2");
            }
        }
        Ok(())
    }

    /// Whether the choice is the best logit of the model's own scores: the runtime
    /// can then pick it where the logits are (no full vector to the front).
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0 && self.presence_penalty == 0.0 && self.frequency_penalty == 0.0
    }
}

/// Draws tokens for one sequence: its settings, its random stream and what it has
/// generated so far (for the penalties).
pub struct Sampler {
    params: Sampling,
    rng: StdRng,
    counts: HashMap<u32, u32>,
    /// The candidates of the current draw, `(probability, id)`; kept between draws.
    kept: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for stream `index` of a request (its `n` choices draw differently
    /// from one seed).
    pub fn new(params: &Sampling, index: u64) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Sampler {
            params: params.clone(),
            rng: StdRng::seed_from_u64(seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))),
            counts: HashMap::new(),
            kept: Vec::new(),
        }
    }

    /// Records a generated token (the penalties count it from now on).
    pub fn saw(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
    }

    /// The next token from `logits` (changed in place).
    pub fn pick(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&token, &count) in &self.counts {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Probabilities at this temperature, unnormalised (the best is 1).
        let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / p.temperature;
        let mut total = 0f32;
        for l in logits.iter_mut() {
            *l = ((*l - best) * inv_t).exp();
            total += *l;
        }
        if p.top_k == 0 && p.top_p >= 1.0 && p.min_p == 0.0 {
            // Nothing is cut: draw from the whole vocabulary as it lies, unsorted.
            let mut u = self.rng.random::<f32>() * total;
            for (i, &prob) in logits.iter().enumerate() {
                if u < prob {
                    return i as u32;
                }
                u -= prob;
            }
            return argmax(logits);
        }
        self.keep(logits, total);
        let mass: f32 = self.kept.iter().map(|c| c.0).sum();
        let mut u = self.rng.random::<f32>() * mass;
        for &(prob, id) in &self.kept {
            if u < prob {
                return id;
            }
            u -= prob;
        }
        self.kept.last().map_or_else(|| argmax(logits), |c| c.1)
    }

    /// Leaves in `self.kept` the candidates that survive `top_k`, `top_p` and
    /// `min_p`, likeliest first, from unnormalised `probs` (the best is 1) summing
    /// to `total`. As in vLLM, `top_p` is a share of what `top_k` kept.
    fn keep(&mut self, probs: &[f32], total: f32) {
        let p = &self.params;
        // Lower a threshold until the tokens above it hold every survivor: only
        // those need sorting. Survivors are a prefix of the likeliest-first order,
        // so the first cut that is whole bounds them.
        let mut threshold = 1.0 / 64.0;
        loop {
            self.kept.clear();
            let mut mass = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                if q >= threshold {
                    self.kept.push((q, i as u32));
                    mass += q;
                }
            }
            let whole_k = p.top_k > 0 && self.kept.len() >= p.top_k;
            let whole_nucleus = p.top_k == 0 && p.top_p < 1.0 && mass >= p.top_p * total;
            let whole_min_p = p.top_p == 1.0 && p.min_p > 0.0 && threshold <= p.min_p;
            if whole_k || whole_nucleus || whole_min_p || threshold == 0.0 {
                break;
            }
            threshold = if threshold < 1e-12 { 0.0 } else { threshold / 64.0 };
        }
        self.kept
            .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if p.top_k > 0 {
            self.kept.truncate(p.top_k);
        }
        if p.top_p < 1.0 {
            // Of what top_k kept, or of everything (the kept tokens may be a part).
            let of = match p.top_k {
                0 => total,
                _ => self.kept.iter().map(|c| c.0).sum(),
            };
            let want = p.top_p * of;
            let mut mass = 0.0;
            let end = self
                .kept
                .iter()
                .position(|c| {
                    mass += c.0;
                    mass >= want
                })
                .map_or(self.kept.len(), |i| i + 1);
            self.kept.truncate(end.max(1));
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * self.kept.first().map_or(1.0, |c| c.0);
            let end = self.kept.iter().position(|c| c.0 < floor).unwrap_or(self.kept.len());
            self.kept.truncate(end.max(1));
        }
    }
}

/// The index of the largest value (the first, on ties).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(f: impl FnOnce(&mut Sampling)) -> Sampling {
        let mut s = Sampling {
            temperature: 1.0,
            seed: Some(7),
            ..Sampling::default()
        };
        f(&mut s);
        s
    }

    /// How often each token is drawn from `logits` in `draws` draws.
    fn histogram(s: &Sampling, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut sampler = Sampler::new(s, 0);
        let mut seen = vec![0; logits.len()];
        for _ in 0..draws {
            seen[sampler.pick(&mut logits.to_vec()) as usize] += 1;
        }
        seen
    }

    #[test]
    fn temperature_zero_is_argmax_and_penalties_move_it() {
        let logits = [0.0, 3.0, 2.9, -1.0];
        let greedy = Sampling::default();
        assert!(greedy.is_plain_greedy());
        assert_eq!(Sampler::new(&greedy, 0).pick(&mut logits.to_vec()), 1);
        let penalised = Sampling {
            presence_penalty: 0.5,
            ..Sampling::default()
        };
        assert!(!penalised.is_plain_greedy());
        let mut s = Sampler::new(&penalised, 0);
        s.saw(1);
        assert_eq!(s.pick(&mut logits.to_vec()), 2, "token 1 was penalised below token 2");
        let frequent = Sampling {
            frequency_penalty: 0.05,
            ..Sampling::default()
        };
        let mut s = Sampler::new(&frequent, 0);
        s.saw(1);
        assert_eq!(s.pick(&mut logits.to_vec()), 1, "one sighting costs 0.05 < 0.1");
        s.saw(1);
        s.saw(1);
        assert_eq!(s.pick(&mut logits.to_vec()), 2, "three cost 0.15 > 0.1");
    }

    #[test]
    fn draws_follow_the_softmax_at_temperature_one() {
        let logits = [0.0f32, 1.0, 2.0, 0.5];
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let draws = 40_000;
        let seen = histogram(&sampling(|_| {}), &logits, draws);
        for (i, &l) in logits.iter().enumerate() {
            let expected = l.exp() / z;
            let got = seen[i] as f32 / draws as f32;
            assert!((got - expected).abs() < 0.01, "token {i}: {got} vs {expected}");
        }
    }

    #[test]
    fn top_k_top_p_and_min_p_cut_the_tail() {
        // Probabilities ∝ 8, 4, 2, 1, 1 (of 16).
        let logits: Vec<f32> = [8f32, 4.0, 2.0, 1.0, 1.0].iter().map(|p| p.ln()).collect();
        let top_k = histogram(&sampling(|s| s.top_k = 2), &logits, 3000);
        assert!(
            top_k[2..].iter().all(|&c| c == 0) && top_k[0] > 0 && top_k[1] > 0,
            "{top_k:?}"
        );
        // 0.5 + 0.25 = 0.75 ≥ 0.7: the nucleus is the first two.
        let top_p = histogram(&sampling(|s| s.top_p = 0.7), &logits, 3000);
        assert!(top_p[2..].iter().all(|&c| c == 0) && top_p[1] > 0, "{top_p:?}");
        // 2/8 = 0.25 ≥ 0.2 > 1/8: three survive.
        let min_p = histogram(&sampling(|s| s.min_p = 0.2), &logits, 3000);
        assert!(min_p[3..].iter().all(|&c| c == 0) && min_p[2] > 0, "{min_p:?}");
    }

    #[test]
    fn a_seed_repeats_its_draws_and_streams_differ() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let draws = |s: &Sampling, index| {
            let mut sampler = Sampler::new(s, index);
            (0..50).map(|_| sampler.pick(&mut logits.clone())).collect::<Vec<_>>()
        };
        let s = sampling(|_| {});
        assert_eq!(draws(&s, 0), draws(&s, 0));
        assert_ne!(draws(&s, 0), draws(&s, 1));
    }

    #[test]
    fn the_nucleus_of_a_large_flat_vocabulary_is_exact() {
        // 50k equal tokens: top_p = 0.5 keeps exactly half of them (ties by id).
        let logits = vec![0f32; 50_000];
        let mut sampler = Sampler::new(&sampling(|s| s.top_p = 0.5), 0);
        let probs: Vec<f32> = vec![1.0; 50_000];
        sampler.keep(&probs, 50_000.0);
        assert_eq!(sampler.kept.len(), 25_000);
        assert!(sampler.pick(&mut logits.clone()) < 25_000);
    }

    #[test]
    fn settings_out_of_range_are_named() {
        for (s, name) in [
            (sampling(|s| s.temperature = 3.0), "temperature"),
            (sampling(|s| s.top_p = 0.0), "top_p"),
            (sampling(|s| s.min_p = -0.1), "min_p"),
            (sampling(|s| s.frequency_penalty = 2.5), "frequency_penalty"),
            (sampling(|s| s.temperature = f32::NAN), "temperature"),
        ] {
            let e = s.check().unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        assert!(sampling(|_| {}).check().is_ok());
    }
}
