//! Binary images packed 64 pixels to a word (pixel x of a row is bit x % 64 of word x / 64), so
//! XOR, AND, shifts and morphology run a word at a time. Bits past the width are always zero.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitImage {
    width: usize,
    height: usize,
    words_per_row: usize,
    bits: Vec<u64>,
}

impl BitImage {
    pub fn new(width: usize, height: usize) -> BitImage {
        let words_per_row = width.div_ceil(64);
        BitImage {
            width,
            height,
            words_per_row,
            bits: vec![0; words_per_row * height],
        }
    }

    /// Foreground where `pixel > threshold`.
    pub fn from_threshold(gray: &[u8], width: usize, height: usize, threshold: u8) -> BitImage {
        assert_eq!(gray.len(), width * height, "gray buffer size");
        let mut image = BitImage::new(width, height);
        for (y, row) in gray.chunks_exact(width).enumerate() {
            for (word, pixels) in image.row_mut(y).iter_mut().zip(row.chunks(64)) {
                *word = pack_above(pixels, threshold);
            }
        }
        image
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes the pixels take in memory.
    pub fn memory_bytes(&self) -> usize {
        self.bits.len() * size_of::<u64>()
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn words_per_row(&self) -> usize {
        self.words_per_row
    }

    pub fn row(&self, y: usize) -> &[u64] {
        &self.bits[y * self.words_per_row..(y + 1) * self.words_per_row]
    }

    pub fn row_mut(&mut self, y: usize) -> &mut [u64] {
        &mut self.bits[y * self.words_per_row..(y + 1) * self.words_per_row]
    }

    #[inline]
    pub fn get(&self, x: usize, y: usize) -> bool {
        (self.bits[y * self.words_per_row + x / 64] >> (x % 64)) & 1 == 1
    }

    pub fn set(&mut self, x: usize, y: usize) {
        self.bits[y * self.words_per_row + x / 64] |= 1 << (x % 64);
    }

    /// The packed pixels as 32-bit words (row stride `2 * words_per_row`): the GPU kernels' layout.
    pub fn as_u32_words(&self) -> &[u32] {
        bytemuck::cast_slice(&self.bits)
    }

    /// An image from 32-bit words in the layout of [`BitImage::as_u32_words`].
    pub fn from_u32_words(width: usize, height: usize, words: &[u32]) -> BitImage {
        let mut image = BitImage::new(width, height);
        bytemuck::cast_slice_mut::<u64, u32>(&mut image.bits).copy_from_slice(words);
        image
    }

    pub fn count_ones(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// `out[y][x] = self[y - dy][x - dx]`, background where that source is outside.
    pub fn shifted(&self, dx: isize, dy: isize) -> BitImage {
        let mut out = BitImage::new(self.width, self.height);
        let mut row_buffer = vec![0u64; self.words_per_row];
        for y in 0..self.height {
            let source = y as isize - dy;
            if source < 0 || source >= self.height as isize {
                continue;
            }
            shift_row(self.row(source as usize), &mut row_buffer, dx, self.width);
            out.row_mut(y).copy_from_slice(&row_buffer);
        }
        out
    }

    /// True inside the rectangle where a `shifted(dx, dy)` image has a source pixel.
    pub fn valid_after_shift(width: usize, height: usize, dx: isize, dy: isize) -> BitImage {
        let mut valid = BitImage::new(width, height);
        let (x0, x1) = (
            dx.max(0) as usize,
            (width as isize + dx.min(0)).max(0) as usize,
        );
        let (y0, y1) = (
            dy.max(0) as usize,
            (height as isize + dy.min(0)).max(0) as usize,
        );
        if x0 >= x1 {
            return valid;
        }
        let mut row = vec![0u64; valid.words_per_row];
        for (i, word) in row.iter_mut().enumerate() {
            let (lo, hi) = (i * 64, i * 64 + 64);
            let (from, to) = (x0.max(lo), x1.min(hi));
            if from < to {
                let bits = to - from;
                let mask = if bits == 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                };
                *word = mask << (from - lo);
            }
        }
        for y in y0..y1 {
            valid.row_mut(y).copy_from_slice(&row);
        }
        valid
    }

    pub fn xor(&self, other: &BitImage) -> BitImage {
        self.combine(other, |a, b| a ^ b)
    }

    pub fn and(&self, other: &BitImage) -> BitImage {
        self.combine(other, |a, b| a & b)
    }

    fn combine(&self, other: &BitImage, op: impl Fn(u64, u64) -> u64) -> BitImage {
        assert_eq!((self.width, self.height), (other.width, other.height));
        BitImage {
            bits: self
                .bits
                .iter()
                .zip(&other.bits)
                .map(|(a, b)| op(*a, *b))
                .collect(),
            ..*self
        }
    }

    /// Erosion with a k×k square anchored at -(k-1)/2 (centred for odd k): a pixel stays when
    /// every pixel of `[y+lo, y+lo+k) × [x+lo, x+lo+k)` is set; outside counts as background.
    pub fn erode_square(&self, k: usize) -> BitImage {
        let lo = -(((k as isize) - 1) / 2);
        // X[y + o][x] for o in lo..lo+k, then the same along x.
        self.separable(k, |o| -(lo + o), u64::MAX, |a, b| a & b)
    }

    /// Dilation with the reflected k×k square: `out[y][x] = OR of self[y - o][x - p]` for
    /// o, p in `lo..lo+k`; outside counts as background.
    pub fn dilate_square(&self, k: usize) -> BitImage {
        let lo = -(((k as isize) - 1) / 2);
        self.separable(k, |o| lo + o, 0, |a, b| a | b)
    }

    /// Opening: the union of all k×k squares that fit inside the set.
    pub fn open_square(&self, k: usize) -> BitImage {
        if k <= 1 {
            return self.clone();
        }
        self.erode_square(k).dilate_square(k)
    }

    /// Combines `k` copies shifted by `shift(o)` (o = 0..k) along y, then along x.
    fn separable(
        &self,
        k: usize,
        shift: impl Fn(isize) -> isize,
        identity: u64,
        op: impl Fn(u64, u64) -> u64,
    ) -> BitImage {
        let width_mask = last_word_mask(self.width);
        let mut vertical = BitImage::new(self.width, self.height);
        for y in 0..self.height {
            let out = &mut vertical.bits[y * self.words_per_row..(y + 1) * self.words_per_row];
            out.fill(identity);
            for o in 0..k as isize {
                let source = y as isize - shift(o);
                if source < 0 || source >= self.height as isize {
                    // Background row: AND clears, OR leaves unchanged.
                    for word in out.iter_mut() {
                        *word = op(*word, 0);
                    }
                    continue;
                }
                let row = &self.bits[source as usize * self.words_per_row
                    ..(source as usize + 1) * self.words_per_row];
                for (word, source_word) in out.iter_mut().zip(row) {
                    *word = op(*word, *source_word);
                }
            }
            if let Some(last) = out.last_mut() {
                *last &= width_mask;
            }
        }
        let mut result = BitImage::new(self.width, self.height);
        let mut shifted = vec![0u64; self.words_per_row];
        for y in 0..self.height {
            let out = &mut result.bits[y * self.words_per_row..(y + 1) * self.words_per_row];
            out.fill(identity);
            for o in 0..k as isize {
                shift_row(vertical.row(y), &mut shifted, shift(o), self.width);
                for (word, shifted_word) in out.iter_mut().zip(&shifted) {
                    *word = op(*word, *shifted_word);
                }
            }
            if let Some(last) = out.last_mut() {
                *last &= width_mask;
            }
        }
        result
    }
}

/// Bit i set where `pixels[i] > threshold` (at most 64 pixels).
fn pack_above(pixels: &[u8], threshold: u8) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if pixels.len() == 64 {
            // SSE2 is part of x86_64: 16 unsigned compares and one movemask per 16 pixels.
            use std::arch::x86_64::*;
            let mut word = 0u64;
            // SAFETY: SSE2 is always available on x86_64; loads are unaligned and in bounds.
            unsafe {
                let bias = _mm_set1_epi8(i8::MIN);
                let limit = _mm_xor_si128(_mm_set1_epi8(threshold as i8), bias);
                for k in 0..4 {
                    let chunk = _mm_loadu_si128(pixels.as_ptr().add(16 * k) as *const __m128i);
                    let above = _mm_cmpgt_epi8(_mm_xor_si128(chunk, bias), limit);
                    word |= (_mm_movemask_epi8(above) as u16 as u64) << (16 * k);
                }
            }
            return word;
        }
    }
    pixels
        .iter()
        .enumerate()
        .fold(0u64, |w, (i, p)| w | (((*p > threshold) as u64) << i))
}

fn last_word_mask(width: usize) -> u64 {
    match width % 64 {
        0 => u64::MAX,
        bits => (1u64 << bits) - 1,
    }
}

/// `dst` bit x = `src` bit (x - dx), zero where that is outside `0..width`.
pub fn shift_row(src: &[u64], dst: &mut [u64], dx: isize, width: usize) {
    let words = src.len();
    let word_shift = (dx.unsigned_abs() / 64).min(words);
    let bit_shift = (dx.unsigned_abs() % 64) as u32;
    let kept = words - word_shift;
    // Whole words move first; the bits then carry across neighbouring words.
    if dx >= 0 {
        dst[..word_shift].fill(0);
        let (out, from) = (&mut dst[word_shift..], &src[..kept]);
        if bit_shift == 0 {
            out.copy_from_slice(from);
        } else if kept > 0 {
            out[0] = from[0] << bit_shift;
            for (o, pair) in out[1..].iter_mut().zip(from.windows(2)) {
                *o = (pair[1] << bit_shift) | (pair[0] >> (64 - bit_shift));
            }
        }
    } else {
        dst[kept..].fill(0);
        let (out, from) = (&mut dst[..kept], &src[word_shift..]);
        if bit_shift == 0 {
            out.copy_from_slice(from);
        } else if kept > 0 {
            for (o, pair) in out.iter_mut().zip(from.windows(2)) {
                *o = (pair[0] >> bit_shift) | (pair[1] << (64 - bit_shift));
            }
            out[kept - 1] = from[kept - 1] >> bit_shift;
        }
    }
    if words > 0 {
        dst[words - 1] &= last_word_mask(width);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_rows(rows: &[&str]) -> BitImage {
        let width = rows[0].len();
        let mut image = BitImage::new(width, rows.len());
        for (y, row) in rows.iter().enumerate() {
            for (x, c) in row.chars().enumerate() {
                if c == '#' {
                    image.set(x, y);
                }
            }
        }
        image
    }

    fn to_rows(image: &BitImage) -> Vec<String> {
        (0..image.height())
            .map(|y| {
                (0..image.width())
                    .map(|x| if image.get(x, y) { '#' } else { '.' })
                    .collect()
            })
            .collect()
    }

    /// Straight from the definitions, pixel by pixel.
    fn naive_morph(image: &BitImage, k: usize, erode: bool) -> BitImage {
        let lo = -(((k as isize) - 1) / 2);
        let mut out = BitImage::new(image.width(), image.height());
        let at = |x: isize, y: isize| {
            x >= 0
                && y >= 0
                && (x as usize) < image.width()
                && (y as usize) < image.height()
                && image.get(x as usize, y as usize)
        };
        for y in 0..image.height() as isize {
            for x in 0..image.width() as isize {
                let mut all = true;
                let mut any = false;
                for o in lo..lo + k as isize {
                    for p in lo..lo + k as isize {
                        if erode {
                            all &= at(x + p, y + o);
                        } else {
                            any |= at(x - p, y - o);
                        }
                    }
                }
                if (erode && all) || (!erode && any) {
                    out.set(x as usize, y as usize);
                }
            }
        }
        out
    }

    #[test]
    fn threshold_packs_pixels_above() {
        let image = BitImage::from_threshold(&[0, 200, 128, 127, 255, 10], 3, 2, 127);
        assert_eq!(to_rows(&image), vec![".##", ".#."]);
    }

    #[test]
    fn packed_threshold_matches_the_scalar_rule() {
        let mut rng = fastrand::Rng::with_seed(5);
        let gray: Vec<u8> = (0..130 * 3).map(|_| rng.u8(..)).collect();
        for threshold in [0u8, 1, 127, 128, 200, 254, 255] {
            let image = BitImage::from_threshold(&gray, 130, 3, threshold);
            for (i, pixel) in gray.iter().enumerate() {
                assert_eq!(
                    image.get(i % 130, i / 130),
                    *pixel > threshold,
                    "t {threshold} i {i}"
                );
            }
        }
    }

    #[test]
    fn shifts_move_content_and_fill_background() {
        let image = from_rows(&["#..", ".#.", "..#"]);
        assert_eq!(to_rows(&image.shifted(1, 0)), vec![".#.", "..#", "..."]);
        assert_eq!(to_rows(&image.shifted(0, -1)), vec![".#.", "..#", "..."]);
        assert_eq!(to_rows(&image.shifted(-1, 1)), vec!["...", "...", "#.."]);
    }

    #[test]
    fn row_shifts_cross_word_boundaries() {
        for width in [70usize, 128, 200] {
            let mut image = BitImage::new(width, 1);
            for x in (0..width).step_by(7) {
                image.set(x, 0);
            }
            for dx in [-300isize, -130, -65, -64, -3, 0, 1, 63, 64, 100, 260] {
                let shifted = image.shifted(dx, 0);
                for x in 0..width {
                    let source = x as isize - dx;
                    let expected =
                        source >= 0 && (source as usize) < width && image.get(source as usize, 0);
                    assert_eq!(shifted.get(x, 0), expected, "width {width} dx {dx} x {x}");
                }
            }
        }
    }

    #[test]
    fn morphology_matches_the_definition() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut image = BitImage::new(150, 40);
        for y in 0..40 {
            for x in 0..150 {
                if rng.f32() < 0.45 {
                    image.set(x, y);
                }
            }
        }
        for k in [2usize, 3, 5] {
            assert_eq!(
                image.erode_square(k),
                naive_morph(&image, k, true),
                "erode {k}"
            );
            assert_eq!(
                image.dilate_square(k),
                naive_morph(&image, k, false),
                "dilate {k}"
            );
        }
    }

    #[test]
    fn opening_removes_thin_lines_and_keeps_blocks() {
        let image = from_rows(&["#.....", "#..##.", "#..##.", "......"]);
        assert_eq!(
            to_rows(&image.open_square(2)),
            vec!["......", "...##.", "...##.", "......"]
        );
    }

    #[test]
    fn valid_region_after_shift() {
        let valid = BitImage::valid_after_shift(3, 2, 1, -1);
        assert_eq!(to_rows(&valid), vec![".##", "..."]);
    }
}
