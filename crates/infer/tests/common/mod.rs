//! What the real-model tests share: a greedy continuation under a placement.

use burn::backend::Flex;
use hetero_infer::models::Model;
use hetero_infer::{Output, Placement, Request, Want, run_in_process};

/// Greedy continuation of `prompt` for `n` tokens under `placement`, each worker
/// a thread.
pub fn greedy(m: &Model, placement: &Placement, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut reqs = vec![Request::decode(vec![prompt.to_vec()], true, Want::NextToken)];
    let mut out = Vec::new();
    for _ in 0..n {
        let got = run_in_process::<Flex>(&m.arch, m.weights.as_ref(), placement, &reqs).unwrap();
        let Output::Tokens(t) = &got[got.len() - 1] else {
            panic!("{got:?}")
        };
        out.push(t[0]);
        reqs.push(Request::decode(vec![vec![t[0]]], false, Want::NextToken));
    }
    out
}
