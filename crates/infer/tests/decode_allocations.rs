//! Decoding on quantized weights allocates nothing per token: once the first steps
//! have grown the scratch buffers, the activations' quantization buffers and the
//! cache, a block's decode step — five products on the thread pool, norms, rotary
//! positions, attention over the cache — touches only memory it already has.
//! (A test binary of its own: the counting allocator sees the whole process.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use hetero_infer::llama::LlamaConfig;
use hetero_infer::qllama::{QKvCache, QLlamaLayer, Rope, Scratch};
use hetero_infer::weights::RandomWeights;
use hetero_kernels::{Kernels, QType};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed straight to the system allocator; the counter is
// only incremented.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_decode_step_of_a_quantized_block_allocates_nothing() {
    let c = LlamaConfig {
        layers: 2,
        vocab: 64,
        ..LlamaConfig::smol_lm2()
    };
    let w = RandomWeights::new(c.tensor_shapes(), 3).stored_as(QType::Q4_1);
    let layers: Vec<QLlamaLayer> = (0..2).map(|l| QLlamaLayer::load(&w, &c, l, (0, 1)).unwrap()).collect();
    let kernels = Kernels::detect();
    let mut rope = Rope::new(c.head_dim(), c.rope_base, c.context);
    let mut caches = vec![QKvCache::new(), QKvCache::new()];
    let mut scratch = Scratch::default();
    let mut x: Vec<f32> = (0..8 * c.hidden).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect();
    rope.cover(64);
    let step = |x: &mut [f32], seq: usize, scratch: &mut Scratch, caches: &mut Vec<QKvCache>| {
        for (layer, cache) in layers.iter().zip(caches.iter_mut()) {
            layer
                .forward(x, &[0], seq, &rope, cache, scratch, &kernels, &mut |_| Ok(()))
                .unwrap();
        }
    };
    // A prefill of 8 and a few steps grow everything (the cache to 16 positions).
    step(&mut x, 8, &mut scratch, &mut caches);
    let mut token = x[..c.hidden].to_vec();
    for _ in 0..4 {
        step(&mut token, 1, &mut scratch, &mut caches);
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    assert!(before > 0, "the counting allocator sees the loads");
    for _ in 0..3 {
        step(&mut token, 1, &mut scratch, &mut caches);
    }
    let during = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(during, 0, "three decode steps of two blocks allocated {during} times");
    assert!(token.iter().all(|v| v.is_finite()));
}
