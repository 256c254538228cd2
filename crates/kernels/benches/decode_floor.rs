//! How fast the kernels stream weights: one 1536 × 576 product on one thread, and
//! the matrix products of one decoded SmolLM2-135M token (30 layers and the tied
//! head) on the process's pool — the floor under decode speed, before norms,
//! attention and everything else.
//!
//! `cargo bench -p hetero-kernels --bench decode_floor [-- TYPE]` (TYPE: Q4_1 by
//! default, or Q8_0, …); `RAYON_NUM_THREADS` sets the pool, `HETERO_SIMD` the level.

use std::time::Instant;

use hetero_kernels::{Kernels, Level, Pool, QActs, QMatrix, QType};

fn matrix(ty: QType, rows: usize, cols: usize, seed: usize) -> QMatrix {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| (((i + seed) * 2_654_435_761 % 1_000_003) as f32 / 1_000_003.0 - 0.5) * 0.1)
        .collect();
    QMatrix::quantize(ty, &values, rows, cols).expect("whole blocks")
}

fn acts(ty: QType, cols: usize) -> QActs {
    let x: Vec<f32> = (0..cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    let mut a = QActs::new();
    a.quantize(ty.act(), &x, 1, cols).expect("whole blocks");
    a
}

/// Seconds per call of `f`, the best of five rounds of `reps` calls.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let name = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "Q4_1".into());
    let ty = QType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"));
    let single: &'static Pool = Box::leak(Box::new(Pool::new(1)));
    println!(
        "type {ty}; levels {:?}",
        Level::available().iter().map(|l| l.name()).collect::<Vec<_>>()
    );

    let w = matrix(ty, 1536, 576, 1);
    let x = acts(ty, 576);
    let mut out = vec![0.0; 1536];
    for level in Level::available() {
        let k = Kernels::new(level, single);
        let s = time(200, || k.matmul(&w, &x, &mut out).unwrap());
        println!(
            "1536×576 matvec, 1 thread, {:>6}: {:7.1} µs  {:5.1} GB/s of weights",
            level.name(),
            s * 1e6,
            w.bytes().len() as f64 / s / 1e9
        );
    }

    // One layer's products (q|k|v, o, gate|up, down) for a 128-token prefill, and
    // for the running batches a server decodes (a row per sequence).
    let layer = [
        matrix(ty, 576, 576, 1),
        matrix(ty, 192, 576, 2),
        matrix(ty, 192, 576, 3),
        matrix(ty, 576, 576, 4),
        matrix(ty, 1536, 576, 5),
        matrix(ty, 1536, 576, 6),
        matrix(ty, 576, 1536, 7),
    ];
    let k = Kernels::detect();
    let layer_seconds = |rows: usize, reps: usize| {
        let xs = |cols: usize| {
            let x: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let mut a = QActs::new();
            a.quantize(ty.act(), &x, rows, cols).expect("whole blocks");
            a
        };
        let (p576, p1536) = (xs(576), xs(1536));
        let [wq, wk, wv, wo, wg, wu, wd] = &layer;
        let (mut q, mut kk, mut v) = (vec![0.0; rows * 576], vec![0.0; rows * 192], vec![0.0; rows * 192]);
        let (mut o, mut g, mut u, mut d) = (
            vec![0.0; rows * 576],
            vec![0.0; rows * 1536],
            vec![0.0; rows * 1536],
            vec![0.0; rows * 576],
        );
        time(reps, || {
            k.matmul_many(&[wq, wk, wv], &p576, &mut [&mut q, &mut kk, &mut v])
                .unwrap();
            k.matmul(wo, &p576, &mut o).unwrap();
            k.matmul_many(&[wg, wu], &p576, &mut [&mut g, &mut u]).unwrap();
            k.matmul(wd, &p1536, &mut d).unwrap();
        })
    };
    let macs = |rows: usize| layer.iter().map(|m| m.rows() * m.cols()).sum::<usize>() * rows;
    let rows = 128;
    let s = layer_seconds(rows, 3);
    println!(
        "one layer's products for a {rows}-token prefill, {k:?}: {:.2} ms  {:.1} G MAC/s  (30 layers: {:.0} tokens/s at most)",
        s * 1e3,
        macs(rows) as f64 / s / 1e9,
        rows as f64 / (30.0 * s)
    );
    for batch in [1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 16] {
        let s = layer_seconds(batch, 50);
        println!(
            "one layer's products for a decode step of {batch:>2} sequences: {:.3} ms  {:.1} G MAC/s",
            s * 1e3,
            macs(batch) as f64 / s / 1e9
        );
    }

    // One token of SmolLM2-135M: per layer q|k|v, o, gate|up, down; then the head.
    let layers: Vec<[QMatrix; 7]> = (0..30)
        .map(|l| {
            [
                matrix(ty, 576, 576, 10 * l),
                matrix(ty, 192, 576, 10 * l + 1),
                matrix(ty, 192, 576, 10 * l + 2),
                matrix(ty, 576, 576, 10 * l + 3),
                matrix(ty, 1536, 576, 10 * l + 4),
                matrix(ty, 1536, 576, 10 * l + 5),
                matrix(ty, 576, 1536, 10 * l + 6),
            ]
        })
        .collect();
    let head = matrix(QType::Q8_0, 49152, 576, 99);
    let (x576, x1536, xhead) = (acts(ty, 576), acts(ty, 1536), acts(QType::Q8_0, 576));
    let bytes: usize = layers.iter().flatten().map(|m| m.bytes().len()).sum::<usize>() + head.bytes().len();
    let k = Kernels::detect();
    let (mut q, mut kk, mut v, mut o) = (vec![0.0; 576], vec![0.0; 192], vec![0.0; 192], vec![0.0; 576]);
    let (mut g, mut u, mut d, mut logits) = (vec![0.0; 1536], vec![0.0; 1536], vec![0.0; 576], vec![0.0; 49152]);
    let s = time(20, || {
        for [wq, wk, wv, wo, wg, wu, wd] in &layers {
            k.matmul_many(&[wq, wk, wv], &x576, &mut [&mut q, &mut kk, &mut v])
                .unwrap();
            k.matmul(wo, &x576, &mut o).unwrap();
            k.matmul_many(&[wg, wu], &x576, &mut [&mut g, &mut u]).unwrap();
            k.matmul(wd, &x1536, &mut d).unwrap();
        }
        k.matmul(&head, &xhead, &mut logits).unwrap();
    });
    println!(
        "one SmolLM2 token's products ({:.1} MB), {:?}: {:.2} ms  {:.1} GB/s  ({:.0} tokens/s at most)",
        bytes as f64 / 1e6,
        k,
        s * 1e3,
        bytes as f64 / s / 1e9,
        1.0 / s
    );
}
