//! How long the training kernels take on the shapes of the models Hetero trains
//! (`hetero bench train`): the main job's CNN (batch 128, 28×28, 32 then 64
//! channels of 3×3) and the small transformer (width 64, 4 heads of 16, context 64).
//!
//! `cargo bench -p hetero-kernels --bench dense`; `RAYON_NUM_THREADS` sets the threads.
//! The whole step beside PyTorch is `benches/vs-pytorch.sh`.

use std::time::Instant;

use hetero_kernels::dense::attention::{self, Strided};
use hetero_kernels::dense::conv::{self, Conv2d};
use hetero_kernels::dense::{layer_norm, maps, pool};

/// Milliseconds per call of `f`, the best of five rounds of `reps` calls.
fn ms(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i + seed) * 2_654_435_761 % 1_000_003) as f32 / 1_000_003.0 - 0.5) * 2.0)
        .collect()
}

fn main() {
    println!("{:<52} {:>9}", "kernel (shape)", "ms/call");
    let row = |what: &str, t: f64| println!("{what:<52} {t:>9.3}");
    for (c, o, h) in [(1, 32, 28), (32, 64, 14)] {
        let g = Conv2d {
            n: 128,
            c,
            h,
            w: h,
            o,
            cg: c,
            kh: 3,
            kw: 3,
            oh: h,
            ow: h,
            groups: 1,
            stride: [1, 1],
            padding: [1, 1],
            dilation: [1, 1],
        };
        let (x, w, dy) = (
            values(128 * c * h * h, 1),
            values(o * c * 9, 2),
            values(128 * o * h * h, 3),
        );
        let bias = values(o, 4);
        let shape = format!("128×{c}×{h}×{h} → {o}, 3×3");
        row(
            &format!("conv forward ({shape})"),
            ms(3, || drop(g.forward(&x, &w, Some(&bias)))),
        );
        row(
            &format!("conv input gradient ({shape})"),
            ms(3, || drop(g.input_grad(&w, &dy))),
        );
        row(
            &format!("conv weight gradient ({shape})"),
            ms(3, || drop(g.weight_grad(&x, &dy))),
        );
        row(
            &format!("conv bias gradient ({shape})"),
            ms(3, || drop(conv::bias_grad(&dy, 128, o, h * h))),
        );
        let (y, idx) = pool::max_pool_2x2(&dy, 128 * o, h, h);
        row(
            &format!("max pool 2×2 (128×{o}×{h}×{h})"),
            ms(3, || drop(pool::max_pool_2x2(&dy, 128 * o, h, h))),
        );
        row(
            &format!("max pool 2×2 gradient (128×{o}×{h}×{h})"),
            ms(3, || drop(pool::max_unpool_2x2(&y, &idx, 128 * o, h, h))),
        );
    }
    let (b, heads, seq, d) = (128, 4, 64, 16);
    let q = values(b * heads * seq * d, 5);
    let (k, v, g) = (values(q.len(), 6), values(q.len(), 7), values(q.len(), 8));
    let view = |data| Strided {
        data,
        start: 0,
        strides: [(heads * seq * d) as isize, (seq * d) as isize, d as isize, 1],
        shape: [b, heads, seq, d],
    };
    let shape = format!("{b}×{heads}×{seq}×{d}, causal");
    let out = attention::forward(view(&q), view(&k), view(&v), None, None, true);
    row(
        &format!("attention forward ({shape})"),
        ms(3, || {
            drop(attention::forward(view(&q), view(&k), view(&v), None, None, true))
        }),
    );
    row(
        &format!("attention backward ({shape})"),
        ms(3, || {
            drop(attention::backward(
                view(&q),
                view(&k),
                view(&v),
                None,
                view(&out),
                view(&g),
                None,
                true,
            ))
        }),
    );
    let (x, grad, gamma) = (values(b * seq * 64, 9), values(b * seq * 64, 10), values(64, 11));
    row(
        "layer norm gradient (8192 rows of 64)",
        ms(10, || drop(layer_norm::backward(&x, &gamma, 1e-5, &grad))),
    );
    let big = values(b * seq * 256, 12);
    row("GELU (2 Mi values)", ms(10, || drop(maps::map(&big, maps::gelu))));
    row(
        "GELU gradient (2 Mi values)",
        ms(10, || drop(maps::zip_map(&big, &big, maps::gelu_grad))),
    );
    row("exp (2 Mi values)", ms(10, || drop(maps::map(&big, maps::exp))));
}
