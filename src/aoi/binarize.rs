//! Otsu's threshold with a plateau rule, so binarised inputs (whose histograms have a wide empty
//! gap) get a threshold in the middle of the gap, insensitive to ±1 differences between JPEG
//! decoders. A bit-exact port of `otsu_threshold` in models/train/aoi/pipeline.py.

/// Threshold t in [0, 254] (foreground = pixel > t), or `fallback` for a constant image.
pub fn otsu_threshold(gray: &[u8], fallback: u8) -> u8 {
    otsu_from_histogram(&histogram(gray), fallback)
}

/// Pixels per grey level.
pub fn histogram(gray: &[u8]) -> [u32; 256] {
    // Four partial histograms: runs of equal pixels (most of a binarised board) would otherwise
    // serialise on one counter's store-to-load dependency.
    let mut partial = [[0u32; 256]; 4];
    let mut quads = gray.chunks_exact(4);
    for quad in &mut quads {
        for (lane, pixel) in quad.iter().enumerate() {
            partial[lane][*pixel as usize] += 1;
        }
    }
    for pixel in quads.remainder() {
        partial[0][*pixel as usize] += 1;
    }
    std::array::from_fn(|v| partial.iter().map(|p| p[v]).sum())
}

/// Otsu's threshold from a histogram (what the GPU backends compute on the device).
pub fn otsu_from_histogram(counts: &[u32; 256], fallback: u8) -> u8 {
    // Exact integer sums; i128 keeps N * s(t) exact for any allowed image size.
    let histogram = counts.map(|c| c as i128);
    let total: i128 = histogram.iter().sum();
    let sum_all: i128 = histogram
        .iter()
        .enumerate()
        .map(|(v, h)| v as i128 * h)
        .sum();
    let (mut count, mut sum) = (0i128, 0i128);
    let mut best: Option<f64> = None;
    let (mut first, mut last) = (0usize, 0usize);
    for (t, h) in histogram.iter().enumerate().take(255) {
        count += h;
        sum += h * t as i128;
        if count <= 0 || count >= total {
            continue;
        }
        let d = (total * sum - sum_all * count) as f64;
        let v = (d * d) / ((count * (total - count)) as f64);
        match best {
            Some(b) if v < b => {}
            Some(b) if v == b => last = t,
            _ => {
                best = Some(v);
                first = t;
                last = t;
            }
        }
    }
    match best {
        Some(_) => ((first + last) / 2) as u8,
        None => fallback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binarised_image_gets_the_middle_of_the_gap() {
        let mut image = vec![3u8; 600];
        image.extend(vec![250u8; 400]);
        // Every t in 3..=249 separates the two levels equally well: the middle is 126.
        assert_eq!(otsu_threshold(&image, 127), 126);
    }

    #[test]
    fn histogram_counts_every_pixel_including_the_tail() {
        let image: Vec<u8> = (0..1027u32).map(|i| (i % 7) as u8).collect();
        let counts = histogram(&image);
        assert_eq!(counts.iter().sum::<u32>(), 1027);
        assert_eq!(counts[0], 147);
        assert_eq!(counts[6], 146);
    }

    #[test]
    fn constant_image_uses_the_fallback() {
        assert_eq!(otsu_threshold(&[80u8; 100], 127), 127);
    }

    #[test]
    fn grey_bimodal_image_splits_between_modes() {
        let mut rng = fastrand::Rng::with_seed(1);
        let image: Vec<u8> = (0..10_000)
            .map(|i| {
                if i % 2 == 0 {
                    60 + rng.u8(0..20)
                } else {
                    180 + rng.u8(0..20)
                }
            })
            .collect();
        let t = otsu_threshold(&image, 127);
        assert!((80..180).contains(&t), "{t}");
    }
}
