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

thread_local! {
    /// Shifted-row cache buffers, reused by every search on this thread (they are a megabyte or
    /// more; allocating them per board costs page faults).
    static CACHE: std::cell::Cell<(Vec<u64>, Vec<bool>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
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
    let order = shift_order(radius as isize);
    let step = step.max(1);
    // A coarse pass on a 4x sparser grid finds a likely winner whose exact count then bounds
    // the exact pass from its first shift on. Only speed depends on it, never the answer.
    let seed = if step < 4 {
        let coarse = search(test, template, &order, 4 * step, None);
        let exact = count_at(test, template, coarse.dx, coarse.dy, step, u64::MAX);
        let index = order
            .iter()
            .position(|s| *s == (coarse.dx, coarse.dy))
            .expect("coarse winner is in the order");
        Some((exact, index))
    } else {
        None
    };
    search(test, template, &order, step, seed)
}

/// First minimum in `order`. `seed` = (exact count, order index) of a known shift: shifts are
/// abandoned as soon as they cannot beat it, ties going to the earlier shift in the order.
fn search(
    test: &BitImage,
    template: &BitImage,
    order: &[(isize, isize)],
    step: usize,
    seed: Option<(u64, usize)>,
) -> Shift {
    let radius = order.iter().map(|(dx, _)| dx.abs()).max().unwrap_or(0);
    let mut counter = Counter::new(test, template, step, radius);
    let (mut best_count, mut best_index) = seed.unwrap_or((u64::MAX, usize::MAX));
    for (index, &(dx, dy)) in order.iter().enumerate() {
        // Beating the best needs a smaller count, or an equal one earlier in the order.
        let limit = if index < best_index {
            best_count.saturating_add(1)
        } else {
            best_count
        };
        let count = counter.count(dx, dy, limit);
        if count < limit {
            best_count = count;
            best_index = index;
        }
    }
    let (dx, dy) = order[best_index];
    Shift {
        dx,
        dy,
        xor_count: best_count,
    }
}

fn count_at(
    test: &BitImage,
    template: &BitImage,
    dx: isize,
    dy: isize,
    step: usize,
    limit: u64,
) -> u64 {
    Counter::new(test, template, step, dx.abs()).count(dx, dy, limit)
}

impl Drop for Counter<'_> {
    fn drop(&mut self) {
        CACHE.set((
            std::mem::take(&mut self.shifted),
            std::mem::take(&mut self.filled),
        ));
    }
}

/// XOR counts on the sampling grid. Rows are visited interleaved (every 16th, then the rows
/// between...), so a partial count grows in proportion to the final one and a losing shift is
/// recognised after a small fraction of the rows. The order of rows cannot change a total.
struct Counter<'a> {
    test: &'a BitImage,
    template: &'a BitImage,
    rows: Vec<usize>,
    column_mask: Vec<u64>,
    /// Template rows shifted by each dx, filled on first use (`filled` per dx and row).
    shifted: Vec<u64>,
    filled: Vec<bool>,
    radius: isize,
}

impl<'a> Counter<'a> {
    fn new(test: &'a BitImage, template: &'a BitImage, step: usize, radius: isize) -> Counter<'a> {
        let sampled: Vec<usize> = (0..test.height()).step_by(step).collect();
        let mut rows = Vec::with_capacity(sampled.len());
        for stride in [16usize, 8, 4, 2, 1] {
            rows.extend(
                (0..sampled.len())
                    .filter(|i| i % stride == 0 && (stride == 16 || i % (2 * stride) != 0))
                    .map(|i| sampled[i]),
            );
        }
        let words = test.words_per_row();
        let slots = (2 * radius + 1) as usize * test.height();
        let (mut shifted, mut filled) = CACHE.take();
        shifted.resize(slots * words, 0);
        filled.clear();
        filled.resize(slots, false);
        Counter {
            test,
            template,
            rows,
            column_mask: sampling_mask(words, step),
            shifted,
            filled,
            radius,
        }
    }

    /// Caches row `source` of the template shifted by `dx`; returns its slot.
    fn shifted_slot(&mut self, dx: isize, source: usize) -> usize {
        let words = self.test.words_per_row();
        let slot = (dx + self.radius) as usize * self.test.height() + source;
        if !self.filled[slot] {
            let row = &mut self.shifted[slot * words..(slot + 1) * words];
            shift_row(self.template.row(source), row, dx, self.test.width());
            self.filled[slot] = true;
        }
        slot
    }

    /// The count at (dx, dy), or any value >= `limit` once it is reached.
    fn count(&mut self, dx: isize, dy: isize, limit: u64) -> u64 {
        let height = self.test.height() as isize;
        let mut count = 0u64;
        for index in 0..self.rows.len() {
            let y = self.rows[index];
            let test_row = self.test.row(y);
            let source = y as isize - dy;
            if source < 0 || source >= height {
                count += test_row
                    .iter()
                    .zip(&self.column_mask)
                    .map(|(t, m)| (t & m).count_ones() as u64)
                    .sum::<u64>();
            } else {
                let slot = self.shifted_slot(dx, source as usize);
                let words = test_row.len();
                let shifted = &self.shifted[slot * words..(slot + 1) * words];
                count += test_row
                    .iter()
                    .zip(shifted)
                    .zip(&self.column_mask)
                    .map(|((t, s), m)| ((t ^ s) & m).count_ones() as u64)
                    .sum::<u64>();
            }
            if count >= limit {
                return count;
            }
        }
        count
    }
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
    fn interleaved_rows_visit_every_sampled_row_once() {
        let test = BitImage::new(10, 37);
        for step in [1usize, 3] {
            let mut rows = Counter::new(&test, &test, step, 0).rows.clone();
            rows.sort_unstable();
            assert_eq!(rows, (0..37).step_by(step).collect::<Vec<_>>());
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
