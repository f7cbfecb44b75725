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
    out.reserve(candidates.len() * params.crop_values());
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
    /// One output row, padded to whole 64-pixel words so the word paths write fixed-size chunks.
    row: Vec<f32>,
}

impl WindowScratch {
    fn new(max_window: usize, size: usize) -> WindowScratch {
        WindowScratch {
            window_row: vec![0u64; max_window.div_ceil(64)],
            sums: vec![0u32; size],
            row: vec![0.0; size.div_ceil(64) * 64],
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
        // The shipped windows (fine 1:1, coarse 2:1) take word-parallel paths: crops are the
        // largest CPU stage after the classifier. Any other scale counts block by block.
        match scale {
            1 => self.copy_pixels(image, origin, out),
            2 => self.average_pairs(image, origin, out),
            _ => self.average_blocks(image, origin, scale, out),
        }
    }

    /// Scale 1: each pixel is its own average, expanded a byte at a time from a table.
    fn copy_pixels(&mut self, image: &BitImage, origin: (isize, isize), out: &mut Vec<f32>) {
        let size = self.sums.len();
        for i in 0..size {
            let y = origin.1 + i as isize;
            // Fixed-size chunks: the table rows become plain stores, not a memcpy call each.
            for (k, word_pixels) in self.row.chunks_exact_mut(64).enumerate() {
                let word = row_bits(image, y, origin.0 + 64 * k as isize);
                for (byte, pixels) in word
                    .to_le_bytes()
                    .iter()
                    .zip(word_pixels.chunks_exact_mut(8))
                {
                    pixels.copy_from_slice(&BYTE_PIXELS[*byte as usize]);
                }
            }
            out.extend_from_slice(&self.row[..size]);
        }
    }

    /// Scale 2: 2x2 block counts of 32 blocks at once from two rows (SWAR, 4-bit fields).
    fn average_pairs(&mut self, image: &BitImage, origin: (isize, isize), out: &mut Vec<f32>) {
        const NIBBLES: u64 = 0x3333_3333_3333_3333;
        let size = self.sums.len();
        for i in 0..size {
            let y = origin.1 + 2 * i as isize;
            for (k, blocks) in self.row[..size.div_ceil(32) * 32]
                .chunks_exact_mut(32)
                .enumerate()
            {
                let x = origin.0 + 64 * k as isize;
                let (top, bottom) = (
                    pair_counts(row_bits(image, y, x)),
                    pair_counts(row_bits(image, y + 1, x)),
                );
                // Block 2g's count in nibble g of `even`, block 2g + 1's in nibble g of `odd`.
                let even = (top & NIBBLES) + (bottom & NIBBLES);
                let odd = ((top >> 2) & NIBBLES) + ((bottom >> 2) & NIBBLES);
                for (g, pair) in blocks.chunks_exact_mut(2).enumerate() {
                    let counts = ((even >> (4 * g)) & 0x7) | (((odd >> (4 * g)) & 0x7) << 3);
                    pair.copy_from_slice(&PAIR_LEVELS[counts as usize]);
                }
            }
            out.extend_from_slice(&self.row[..size]);
        }
    }

    /// Any scale: the set pixels of each block summed row by row.
    fn average_blocks(
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

/// Two neighbouring 2x2 blocks' means (count / 4, exactly the generic path's division), indexed
/// by `first count | second count << 3` (counts 0..=4).
const PAIR_LEVELS: [[f32; 2]; 64] = {
    let mut table = [[0.0f32; 2]; 64];
    let mut index = 0;
    while index < 64 {
        table[index] = [(index & 7) as f32 / 4.0, (index >> 3) as f32 / 4.0];
        index += 1;
    }
    table
};

/// Pixel x of every byte value as 0.0 / 1.0.
const BYTE_PIXELS: [[f32; 8]; 256] = {
    let mut table = [[0.0f32; 8]; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut bit = 0;
        while bit < 8 {
            if (byte >> bit) & 1 == 1 {
                table[byte][bit] = 1.0;
            }
            bit += 1;
        }
        byte += 1;
    }
    table
};

/// Each 2-bit field of the result counts the set pixels of the same field of `word`.
fn pair_counts(word: u64) -> u64 {
    const EVEN_BITS: u64 = 0x5555_5555_5555_5555;
    (word & EVEN_BITS) + ((word >> 1) & EVEN_BITS)
}

/// 64 pixels of row `y` from `x` on; zero outside the image.
fn row_bits(image: &BitImage, y: isize, x: isize) -> u64 {
    if y < 0 || y >= image.height() as isize {
        0
    } else {
        bits_at(image.row(y as usize), x)
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

    #[test]
    fn word_parallel_paths_equal_block_counting() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut image = BitImage::new(150, 90);
        for y in 0..90 {
            for x in 0..150 {
                if rng.u8(..) < 100 {
                    image.set(x, y);
                }
            }
        }
        for size in [64, 7, 33, 65, 100] {
            let mut scratch = WindowScratch::new(256, size);
            for origin in [(-70isize, -3isize), (0, 0), (13, 41), (120, 80)] {
                for scale in [1, 2] {
                    let (mut fast, mut reference) = (Vec::new(), Vec::new());
                    scratch.average(&image, origin, scale, &mut fast);
                    scratch.average_blocks(&image, origin, scale, &mut reference);
                    assert_eq!(
                        fast, reference,
                        "size {size} origin {origin:?} scale {scale}"
                    );
                }
            }
        }
    }
}
