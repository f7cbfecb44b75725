//! Classifier input: for each candidate a `crop_window`² window centred on the candidate,
//! averaged over `crop_scale`² blocks into `crop_size`² pixels, one channel per binary image
//! (test, aligned template, difference); pixels outside the board count as 0.

use crate::aoi::bitimage::BitImage;
use crate::aoi::components::Component;
use crate::aoi::params::PipelineParams;

/// Top-left corner of a candidate's `window`² window centred on it (may lie outside the image).
pub fn window_origin(candidate: &Component, window: usize) -> (isize, isize) {
    let cx = ((candidate.x1 + candidate.x2) / 2) as isize;
    let cy = ((candidate.y1 + candidate.y2) / 2) as isize;
    let half = (window / 2) as isize;
    (cx - half, cy - half)
}

/// Top-left corner of a candidate's (coarse) crop window, the frame of the regressed box.
pub fn crop_origin(candidate: &Component, params: &PipelineParams) -> (isize, isize) {
    window_origin(candidate, params.crop_window)
}

/// Appends the `[C', S, S]` float crops of every candidate to `out` (NCHW, row-major): the coarse
/// window's C channels, then, with a fine window, the same C channels at full resolution.
pub fn make_crops(
    channels: &[&BitImage],
    candidates: &[Component],
    params: &PipelineParams,
    out: &mut Vec<f32>,
) {
    let size = params.crop_size;
    let windows = params.input_channels() / channels.len();
    out.reserve(candidates.len() * channels.len() * windows * size * size);
    let mut scratch = WindowScratch::new(params.crop_window.max(params.fine_window), size);
    for candidate in candidates {
        let coarse = window_origin(candidate, params.crop_window);
        for image in channels {
            scratch.average(image, coarse, params.crop_scale, out);
        }
        if params.fine_window > 0 {
            let fine = window_origin(candidate, params.fine_window);
            for image in channels {
                scratch.average(image, fine, 1, out);
            }
        }
    }
}

/// Buffers for averaging one window, reused across candidates.
struct WindowScratch {
    window_row: Vec<u64>,
    sums: Vec<u32>,
}

impl WindowScratch {
    fn new(max_window: usize, size: usize) -> WindowScratch {
        WindowScratch {
            window_row: vec![0u64; max_window.div_ceil(64)],
            sums: vec![0u32; size],
        }
    }

    /// Appends `size`² averages of `scale`² blocks of the window at `origin` (outside = 0).
    fn average(
        &mut self,
        image: &BitImage,
        origin: (isize, isize),
        scale: usize,
        out: &mut Vec<f32>,
    ) {
        let size = self.sums.len();
        let words = (size * scale).div_ceil(64);
        let norm = (scale * scale) as f32;
        let height = image.height() as isize;
        for i in 0..size {
            self.sums.fill(0);
            for by in 0..scale as isize {
                let y = origin.1 + (scale * i) as isize + by;
                if y < 0 || y >= height {
                    continue;
                }
                let row = image.row(y as usize);
                for (k, word) in self.window_row[..words].iter_mut().enumerate() {
                    *word = bits_at(row, origin.0 + 64 * k as isize);
                }
                add_block_counts(&self.window_row[..words], scale, &mut self.sums);
            }
            out.extend(self.sums.iter().map(|s| *s as f32 / norm));
        }
    }
}

/// 64 pixels of a packed row starting at `start` (which may lie outside), zero outside the row.
fn bits_at(row: &[u64], start: isize) -> u64 {
    let word = start.div_euclid(64);
    let offset = start.rem_euclid(64) as u32;
    let at = |i: isize| {
        if i < 0 {
            0
        } else {
            row.get(i as usize).copied().unwrap_or(0)
        }
    };
    let (lo, hi) = (at(word), at(word + 1));
    if offset == 0 {
        lo
    } else {
        (lo >> offset) | (hi << (64 - offset))
    }
}

/// Adds the set pixels of each `scale`-wide block of one window row to `sums`.
fn add_block_counts(window_row: &[u64], scale: usize, sums: &mut [u32]) {
    if 64 % scale == 0 {
        let mask = if scale == 64 {
            u64::MAX
        } else {
            (1u64 << scale) - 1
        };
        let per_word = 64 / scale;
        for (word, block_sums) in window_row.iter().zip(sums.chunks_mut(per_word)) {
            for (f, sum) in block_sums.iter_mut().enumerate() {
                *sum += ((word >> (f * scale)) & mask).count_ones();
            }
        }
    } else {
        for (j, sum) in sums.iter_mut().enumerate() {
            for x in j * scale..(j + 1) * scale {
                *sum += ((window_row[x / 64] >> (x % 64)) & 1) as u32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_reads_match_pixel_reads_anywhere() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut image = BitImage::new(200, 3);
        for x in 0..200 {
            if rng.bool() {
                image.set(x, 1);
            }
        }
        for start in [-130isize, -64, -5, 0, 3, 63, 64, 150, 199, 250] {
            let word = bits_at(image.row(1), start);
            for bit in 0..64isize {
                let x = start + bit;
                let expected = (0..200).contains(&x) && image.get(x as usize, 1);
                assert_eq!((word >> bit) & 1 == 1, expected, "start {start} bit {bit}");
            }
        }
    }

    #[test]
    fn window_is_centred_averaged_and_zero_padded() {
        let params = PipelineParams {
            crop_window: 4,
            crop_scale: 2,
            crop_size: 2,
            fine_window: 0,
            ..PipelineParams::default()
        };
        let mut image = BitImage::new(4, 4);
        image.set(0, 0);
        image.set(1, 0);
        image.set(1, 1);
        // Candidate at the top-left corner: window [-2, 2) x [-2, 2), top/left blocks outside.
        let candidate = Component {
            x1: 0,
            y1: 0,
            x2: 1,
            y2: 1,
            area: 1,
        };
        assert_eq!(crop_origin(&candidate, &params), (-2, -2));
        let mut out = Vec::new();
        make_crops(&[&image, &image], &[candidate], &params, &mut out);
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.75, 0.0, 0.0, 0.0, 0.75]);
    }
}
