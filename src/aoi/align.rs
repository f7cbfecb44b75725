//! Misregistration: the integer shift of the template that best explains the test image.
//!
//! Exhaustive over `[-R, R]²` in a fixed order (by dx²+dy², then dy, then dx; the first minimum
//! wins), but branch-and-bound: a shift is abandoned as soon as its running XOR count reaches the
//! best so far. Counts only grow, so the answer is exactly the exhaustive one, and on aligned
//! boards almost every shift is abandoned after a few rows.

use crate::aoi::bitimage::{BitImage, shift_row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shift {
    pub dx: isize,
    pub dy: isize,
    /// XOR pixel count at this shift (on the sampling grid).
    pub xor_count: u64,
}

/// Candidate shifts in evaluation order.
pub fn shift_order(radius: isize) -> Vec<(isize, isize)> {
    let mut shifts: Vec<(isize, isize)> = (-radius..=radius)
        .flat_map(|dy| (-radius..=radius).map(move |dx| (dx, dy)))
        .collect();
    shifts.sort_by_key(|&(dx, dy)| (dx * dx + dy * dy, dy, dx));
    shifts
}

/// The shift (dx, dy) of `template` minimising `#(test XOR template shifted)`, where the shifted
/// template is background outside its source. `step` > 1 counts only pixels with
/// `x % step == 0 && y % step == 0`.
pub fn estimate_shift(test: &BitImage, template: &BitImage, radius: usize, step: usize) -> Shift {
    let radius = radius as isize;
    let step = step.max(1);
    let words = test.words_per_row();
    let width = test.width();
    let height = test.height();
    let column_mask = sampling_mask(words, step);
    // Template rows shifted horizontally once per dx, reused for every dy.
    let mut by_dx: Vec<Vec<u64>> = Vec::with_capacity((2 * radius + 1) as usize);
    for dx in -radius..=radius {
        let mut shifted = vec![0u64; words * height];
        for y in 0..height {
            shift_row(
                template.row(y),
                &mut shifted[y * words..(y + 1) * words],
                dx,
                width,
            );
        }
        by_dx.push(shifted);
    }
    let sampled_rows: Vec<usize> = (0..height).step_by(step).collect();
    let mut best: Option<Shift> = None;
    for (dx, dy) in shift_order(radius) {
        let shifted = &by_dx[(dx + radius) as usize];
        let bound = best.map_or(u64::MAX, |b| b.xor_count);
        let mut count = 0u64;
        for &y in &sampled_rows {
            let test_row = test.row(y);
            let source = y as isize - dy;
            if source < 0 || source >= height as isize {
                count += test_row
                    .iter()
                    .zip(&column_mask)
                    .map(|(t, m)| (t & m).count_ones() as u64)
                    .sum::<u64>();
            } else {
                let template_row = &shifted[source as usize * words..(source as usize + 1) * words];
                count += test_row
                    .iter()
                    .zip(template_row)
                    .zip(&column_mask)
                    .map(|((t, s), m)| ((t ^ s) & m).count_ones() as u64)
                    .sum::<u64>();
            }
            if count >= bound {
                break;
            }
        }
        if count < bound {
            best = Some(Shift {
                dx,
                dy,
                xor_count: count,
            });
        }
    }
    best.expect("at least the zero shift is evaluated")
}

fn sampling_mask(words: usize, step: usize) -> Vec<u64> {
    let mut mask = vec![0u64; words];
    for x in (0..words * 64).step_by(step) {
        mask[x / 64] |= 1 << (x % 64);
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_board(width: usize, height: usize, seed: u64) -> BitImage {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut image = BitImage::new(width, height);
        // Blocky features, like traces and pads.
        for _ in 0..40 {
            let (x, y) = (rng.usize(0..width - 12), rng.usize(0..height - 12));
            let (w, h) = (rng.usize(2..12), rng.usize(2..12));
            for yy in y..y + h {
                for xx in x..x + w {
                    image.set(xx, yy);
                }
            }
        }
        image
    }

    fn exhaustive(test: &BitImage, template: &BitImage, radius: isize) -> Shift {
        let mut best: Option<Shift> = None;
        for (dx, dy) in shift_order(radius) {
            let count = test.xor(&template.shifted(dx, dy)).count_ones();
            if best.is_none_or(|b| count < b.xor_count) {
                best = Some(Shift {
                    dx,
                    dy,
                    xor_count: count,
                });
            }
        }
        best.unwrap()
    }

    #[test]
    fn order_starts_at_zero_and_breaks_ties_by_dy_then_dx() {
        let order = shift_order(1);
        assert_eq!(&order[..5], &[(0, 0), (0, -1), (-1, 0), (1, 0), (0, 1)]);
        assert_eq!(order.len(), 9);
    }

    #[test]
    fn recovers_a_known_shift_like_the_exhaustive_search() {
        let template = random_board(100, 80, 5);
        for (dx, dy) in [(0isize, 0isize), (3, -2), (-4, 4), (1, 0)] {
            let test = template.shifted(dx, dy);
            let found = estimate_shift(&test, &template, 5, 1);
            assert_eq!((found.dx, found.dy), (dx, dy));
            assert_eq!(found, exhaustive(&test, &template, 5));
        }
    }

    #[test]
    fn subsampled_count_uses_the_grid() {
        let template = random_board(90, 60, 9);
        let test = template.shifted(2, 1);
        let found = estimate_shift(&test, &template, 3, 2);
        assert_eq!((found.dx, found.dy, found.xor_count), (2, 1, 0));
    }
}
