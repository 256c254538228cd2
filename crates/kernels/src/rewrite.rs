//! A call's weight matrices rewritten once into a form its kernels read faster than
//! the file's: Q4_0/Q5_0 as Q8_0 for a prefill's tiles (the same scales and
//! integers, so the same bits), and Q4_1/Q5_1 as unsigned bytes for the tile unit
//! (`simd::amx`). Each participant of the pool rewrites a share of the rows.

use std::sync::Mutex;

use crate::dispatch;
use crate::matmul::Kernels;
use crate::{QMatrix, QType};

/// The largest rewrite made once per call (SmolLM2's gate and up as Q8_0: 1.9 MB);
/// larger matrices are rewritten chunk by chunk, or not at all.
pub(crate) const WHOLE_MAX: usize = 64 << 20;

/// What a matrix is rewritten as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rewrite {
    /// Q8_0 blocks (from Q4_0 or Q5_0).
    Q8_0,
    /// The tile unit's unsigned blocks (from Q4_1 or Q5_1): scale, minimum, 32 bytes.
    Unsigned,
}

impl Rewrite {
    /// Bytes of one rewritten block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Rewrite::Q8_0 => QType::Q8_0.block_bytes(),
            Rewrite::Unsigned => 36,
        }
    }

    /// Bytes of `w` rewritten.
    pub(crate) fn bytes_of(self, w: &QMatrix) -> usize {
        w.bytes().len() / w.ty().block_bytes() * self.block_bytes()
    }
}

impl Kernels {
    /// Rewrites each matrix `ws[m]` with `how[m]` into `buf` (exactly the sum of their
    /// [`Rewrite::bytes_of`]), each participant whole rows of each; returns each
    /// matrix's rewritten bytes, `None` where `how` has none.
    pub(crate) fn rewrite_whole<'a>(
        &self,
        ws: &[&QMatrix],
        how: &[Option<Rewrite>],
        buf: &'a mut [u8],
    ) -> Vec<Option<&'a [u8]>> {
        if how.iter().all(Option::is_none) {
            return vec![None; ws.len()];
        }
        let n = self.threads();
        {
            type Share<'s> = Vec<(QType, &'s [u8], &'s mut [u8])>;
            let mut shares: Vec<Mutex<Share>> = (0..n).map(|_| Mutex::new(Vec::new())).collect();
            let mut rest = &mut *buf;
            for (w, how) in ws.iter().zip(how) {
                let Some(how) = *how else { continue };
                let (mut dst, tail) = std::mem::take(&mut rest).split_at_mut(how.bytes_of(w));
                rest = tail;
                let wide_rb = dst.len() / w.rows();
                let mut src = w.bytes();
                for (t, share) in shares.iter_mut().enumerate() {
                    let take = w.rows() * (t + 1) / n - w.rows() * t / n;
                    let (s, s_tail) = src.split_at(take * w.row_bytes());
                    let (d, d_tail) = std::mem::take(&mut dst).split_at_mut(take * wide_rb);
                    share.get_mut().expect("fresh").push((w.ty(), s, d));
                    (src, dst) = (s_tail, d_tail);
                }
            }
            let level = self.level();
            self.pool().run(&|p| {
                for (ty, src, dst) in shares[p].lock().expect("a participant's blocks").iter_mut() {
                    dispatch::expand(level, *ty, src, dst);
                }
            });
        }
        let mut rest: &'a [u8] = buf;
        ws.iter()
            .zip(how)
            .map(|(w, how)| {
                let how = (*how)?;
                let (bytes, tail) = rest.split_at(how.bytes_of(w));
                rest = tail;
                Some(bytes)
            })
            .collect()
    }
}
