//! How close a model is to a reference model on the same inputs — weight
//! decoupling's measure (seed 000, claim 2), before and after training:
//! - encoders (sentence embeddings): the mean cosine between the two models'
//!   embeddings of each sentence, and the Spearman correlation between the two
//!   models' pairwise sentence similarities (what retrieval and clustering see);
//! - decoders (next-token distributions): each model's perplexity on the text, and
//!   how often their top-1 next tokens agree.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator == 0.0 { 0.0 } else { dot / denominator }
}

/// The cosine similarity of every pair `(i, j)`, `i < j`, in row-major order.
pub fn pairwise_similarities(embeddings: &[Vec<f32>]) -> Vec<f64> {
    let n = embeddings.len();
    (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .map(|(i, j)| cosine(&embeddings[i], &embeddings[j]))
        .collect()
}

/// Ranks from 1, ties given their mean rank.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end (0-based) share ranks start+1..=end.
        let mean = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = mean;
        }
        start = end;
    }
    ranks
}

/// Spearman's rank correlation: Pearson's correlation of the ranks (ties
/// averaged). 0 when either side is constant.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "spearman: {} values against {}", x.len(), y.len());
    let (rx, ry) = (ranks(x), ranks(y));
    let n = rx.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx == 0.0 || syy == 0.0 {
        0.0
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

/// An encoder against its reference on the same sentences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmbeddingFidelity {
    /// Sentences compared.
    pub sentences: usize,
    /// Mean cosine between the two models' embeddings of a sentence.
    pub mean_cosine: f64,
    /// Spearman correlation of the two models' pairwise sentence similarities.
    pub spearman: f64,
}

impl EmbeddingFidelity {
    /// Compares `embeddings` with the `reference` embeddings of the same sentences.
    pub fn of(embeddings: &[Vec<f32>], reference: &[Vec<f32>]) -> Self {
        assert_eq!(embeddings.len(), reference.len(), "embeddings of different sentences");
        let n = embeddings.len().max(1) as f64;
        EmbeddingFidelity {
            sentences: embeddings.len(),
            mean_cosine: embeddings.iter().zip(reference).map(|(a, b)| cosine(a, b)).sum::<f64>() / n,
            spearman: spearman(&pairwise_similarities(embeddings), &pairwise_similarities(reference)),
        }
    }
}

/// A decoder against its reference on the same text, accumulated window by window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NextTokenFidelity {
    /// Positions scored.
    pub tokens: usize,
    /// Summed negative log-likelihood of the true next token, the model's.
    pub nll: f64,
    /// The same, the reference's.
    pub reference_nll: f64,
    /// Positions where both models' most likely next token is the same.
    pub agreeing: usize,
}

impl NextTokenFidelity {
    /// Adds one window: `logits` and `reference` `[batch, seq, vocab]` at the
    /// positions of `ids` `[batch, seq]`; position `t` predicts `ids[t + 1]`.
    pub fn add<B: Backend>(&mut self, logits: Tensor<B, 3>, reference: Tensor<B, 3>, ids: Tensor<B, 2, Int>) {
        let [batch, seq, _] = logits.dims();
        if seq < 2 {
            return;
        }
        let predicting = |l: Tensor<B, 3>| l.slice([0..batch, 0..seq - 1]);
        let (logits, reference) = (predicting(logits), predicting(reference));
        let targets = ids.slice([0..batch, 1..seq]).unsqueeze_dim::<3>(2);
        let nll = |l: Tensor<B, 3>| -> f64 {
            let picked = log_softmax(l, 2).gather(2, targets.clone());
            -f64::from(picked.sum().into_scalar().elem::<f32>())
        };
        self.nll += nll(logits.clone());
        self.reference_nll += nll(reference.clone());
        let same = logits.argmax(2).equal(reference.argmax(2));
        self.agreeing += same.int().sum().into_scalar().elem::<i64>() as usize;
        self.tokens += batch * (seq - 1);
    }

    /// The model's perplexity on the text.
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.tokens.max(1) as f64).exp()
    }

    /// The reference's perplexity on the text.
    pub fn reference_perplexity(&self) -> f64 {
        (self.reference_nll / self.tokens.max(1) as f64).exp()
    }

    /// Share of positions whose top-1 next token both models agree on.
    pub fn agreement(&self) -> f64 {
        self.agreeing as f64 / self.tokens.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    /// Spearman is 1 for any increasing map, −1 for a decreasing one, and counts
    /// ties at their mean rank (a textbook case: 0.5 exactly).
    #[test]
    fn spearman_sees_only_order() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y: Vec<f64> = x.iter().map(|v: &f64| v.powi(3) + 7.0).collect();
        assert!((spearman(&x, &y) - 1.0).abs() < 1e-12);
        let z: Vec<f64> = x.iter().map(|v| -v).collect();
        assert!((spearman(&x, &z) + 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[10.0, 20.0, 20.0, 30.0]), vec![1.0, 2.5, 2.5, 4.0]);
        // Ranks [1,2,3] against [2,1,3]: d² = 1 + 1 + 0, 1 − 6·2 / (3·8) = 0.5.
        assert!((spearman(&[1.0, 2.0, 3.0], &[2.0, 1.0, 3.0]) - 0.5).abs() < 1e-12);
    }

    /// A model compared with itself agrees everywhere, and both perplexities are
    /// e^(mean negative log-likelihood) of the true tokens.
    #[test]
    fn a_model_against_itself_agrees_fully() {
        let device = Default::default();
        let logits = Tensor::<Flex, 3>::from_data([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]], &device);
        let ids = Tensor::<Flex, 2, Int>::from_data([[1, 1, 0]], &device);
        let mut f = NextTokenFidelity::default();
        f.add(logits.clone(), logits.clone(), ids);
        assert_eq!((f.tokens, f.agreeing), (2, 2));
        // Position 0 predicts id 1 from [0, 1, 0]; position 1 predicts id 0 from [2, 0, 0].
        let lse = |v: [f64; 3]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let nll = (lse([0.0, 1.0, 0.0]) - 1.0) + (lse([2.0, 0.0, 0.0]) - 2.0);
        assert!((f.perplexity() - (nll / 2.0).exp()).abs() < 1e-5);
        assert_eq!(f.perplexity(), f.reference_perplexity());
        let same = EmbeddingFidelity::of(
            &[vec![1.0, 0.0], vec![0.5, 0.5], vec![0.0, 2.0]],
            &[vec![1.0, 0.0], vec![0.5, 0.5], vec![0.0, 2.0]],
        );
        assert!((same.mean_cosine - 1.0).abs() < 1e-12 && (same.spearman - 1.0).abs() < 1e-12);
    }
}
