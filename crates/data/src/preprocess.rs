//! Image preprocessing: resizing at load time, normalisation, and the random
//! augmentations applied to each training sample as it is batched.
//!
//! Augmentations draw from a generator the caller seeds, so a run is reproducible
//! from the job's seed; test samples are only normalised.

use rand::Rng;

use crate::ImageDataset;

/// How pixel values (0–255) become model inputs: `(p / 255 − mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    /// Mean of `p / 255`.
    pub mean: f32,
    /// Standard deviation of `p / 255`.
    pub std: f32,
}

impl Normalize {
    /// `p / 255` unchanged.
    pub const IDENTITY: Normalize = Normalize { mean: 0.0, std: 1.0 };

    /// The mean and standard deviation of `p / 255` over every pixel of `data`.
    pub fn of(data: &ImageDataset) -> Normalize {
        let n = data.pixels.len().max(1) as f64;
        let (sum, sq) = data.pixels.iter().fold((0f64, 0f64), |(s, q), &p| {
            let x = p as f64 / 255.0;
            (s + x, q + x * x)
        });
        let mean = sum / n;
        let std = (sq / n - mean * mean).max(0.0).sqrt();
        Normalize {
            mean: mean as f32,
            std: if std > 1e-6 { std as f32 } else { 1.0 },
        }
    }

    /// One pixel as a model input.
    pub fn apply(&self, p: u8) -> f32 {
        (p as f32 / 255.0 - self.mean) / self.std
    }
}

/// Random changes to a training image, each off at its default.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Augment {
    /// Pad by this many pixels (with the background value) and crop back to the
    /// original size at a random offset: shifts of up to ± this many pixels.
    pub crop_padding: usize,
    /// Mirror left–right with probability ½.
    pub horizontal_flip: bool,
    /// Standard deviation of Gaussian noise added to the normalised input.
    pub noise_std: f32,
}

impl Augment {
    /// Whether this changes nothing.
    pub fn is_identity(&self) -> bool {
        self.crop_padding == 0 && !self.horizontal_flip && self.noise_std == 0.0
    }

    /// Augments one normalised `rows × cols` image in place; `background` is the
    /// normalised value of a zero pixel (what padding shows).
    pub fn apply(&self, image: &mut [f32], rows: usize, cols: usize, background: f32, rng: &mut impl Rng) {
        debug_assert_eq!(image.len(), rows * cols);
        if self.crop_padding > 0 {
            let p = self.crop_padding as i64;
            let dy = rng.random_range(-p..=p) as isize;
            let dx = rng.random_range(-p..=p) as isize;
            if dx != 0 || dy != 0 {
                let source = image.to_vec();
                for y in 0..rows as isize {
                    for x in 0..cols as isize {
                        let (sy, sx) = (y + dy, x + dx);
                        let inside = (0..rows as isize).contains(&sy) && (0..cols as isize).contains(&sx);
                        image[(y as usize) * cols + x as usize] = if inside {
                            source[sy as usize * cols + sx as usize]
                        } else {
                            background
                        };
                    }
                }
            }
        }
        if self.horizontal_flip && rng.random_bool(0.5) {
            for row in image.chunks_exact_mut(cols) {
                row.reverse();
            }
        }
        if self.noise_std > 0.0 {
            for v in image.iter_mut() {
                *v += self.noise_std * standard_normal(rng);
            }
        }
    }
}

/// One draw from N(0, 1) (Box–Muller).
fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// `data` with every image resized to `rows × cols` (bilinear, pixel centres aligned).
pub fn resize(data: &ImageDataset, rows: usize, cols: usize) -> ImageDataset {
    if (data.rows, data.cols) == (rows, cols) {
        return data.clone();
    }
    let mut pixels = Vec::with_capacity(data.len() * rows * cols);
    for i in 0..data.len() {
        pixels.extend(resize_image(data.image(i), data.rows, data.cols, rows, cols));
    }
    ImageDataset {
        pixels,
        labels: data.labels.clone(),
        rows,
        cols,
    }
}

/// One grey image of `h × w` resized to `rows × cols` (bilinear).
pub fn resize_image(image: &[u8], h: usize, w: usize, rows: usize, cols: usize) -> Vec<u8> {
    let at = |y: usize, x: usize| image[y.min(h - 1) * w + x.min(w - 1)] as f32;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let sy = ((r as f32 + 0.5) * h as f32 / rows as f32 - 0.5).max(0.0);
        let (y0, fy) = (sy.floor() as usize, sy.fract());
        for c in 0..cols {
            let sx = ((c as f32 + 0.5) * w as f32 / cols as f32 - 0.5).max(0.0);
            let (x0, fx) = (sx.floor() as usize, sx.fract());
            let top = at(y0, x0) * (1.0 - fx) + at(y0, x0 + 1) * fx;
            let bottom = at(y0 + 1, x0) * (1.0 - fx) + at(y0 + 1, x0 + 1) * fx;
            out.push((top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn ramp() -> ImageDataset {
        ImageDataset {
            pixels: (0..16).map(|i| (i * 16) as u8).collect(),
            labels: vec![3],
            rows: 4,
            cols: 4,
        }
    }

    #[test]
    fn normalisation_of_a_dataset_has_zero_mean_and_unit_spread() {
        let d = ramp();
        let n = Normalize::of(&d);
        let values: Vec<f32> = d.pixels.iter().map(|&p| n.apply(p)).collect();
        let mean = values.iter().sum::<f32>() / 16.0;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "{mean} {var}");
        assert_eq!(Normalize::IDENTITY.apply(255), 1.0);
    }

    #[test]
    fn resizing_keeps_a_constant_image_and_scales_a_ramp() {
        let flat = resize_image(&[77; 9], 3, 3, 5, 7);
        assert_eq!(flat, vec![77; 35]);
        let d = resize(&ramp(), 8, 8);
        assert_eq!((d.rows, d.cols, d.pixels.len(), d.labels.clone()), (8, 8, 64, vec![3]));
        // Left-to-right and top-to-bottom order survive.
        assert!(d.pixels[0] < d.pixels[7] && d.pixels[7] < d.pixels[63]);
        let same = resize(&ramp(), 4, 4);
        assert_eq!(same, ramp());
    }

    #[test]
    fn augmentations_shift_flip_and_add_noise_reproducibly() {
        let image: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let none = Augment::default();
        assert!(none.is_identity());
        let mut same = image.clone();
        none.apply(&mut same, 4, 4, -1.0, &mut StdRng::seed_from_u64(1));
        assert_eq!(same, image);

        let flip = Augment {
            horizontal_flip: true,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(3);
        let flipped: Vec<Vec<f32>> = (0..20)
            .map(|_| {
                let mut x = image.clone();
                flip.apply(&mut x, 4, 4, -1.0, &mut rng);
                x
            })
            .collect();
        let mirrored: Vec<f32> = image.chunks(4).flat_map(|r| r.iter().rev().copied()).collect();
        assert!(flipped.contains(&mirrored) && flipped.contains(&image));

        let crop = Augment {
            crop_padding: 1,
            ..Default::default()
        };
        for seed in 0..20 {
            let mut x = image.clone();
            crop.apply(&mut x, 4, 4, -1.0, &mut StdRng::seed_from_u64(seed));
            // A shift by at most one pixel: every value is the source's or padding.
            assert!(x.iter().all(|v| *v == -1.0 || image.contains(v)));
            let mut again = image.clone();
            crop.apply(&mut again, 4, 4, -1.0, &mut StdRng::seed_from_u64(seed));
            assert_eq!(x, again, "same seed, same crop");
        }

        let noise = Augment {
            noise_std: 0.5,
            ..Default::default()
        };
        let mut x = vec![0.0; 4000];
        noise.apply(&mut x, 40, 100, 0.0, &mut StdRng::seed_from_u64(9));
        let var = x.iter().map(|v| v * v).sum::<f32>() / 4000.0;
        assert!((var.sqrt() - 0.5).abs() < 0.03, "noise std {}", var.sqrt());
    }
}
