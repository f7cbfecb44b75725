//! Misregistration: the integer shift of the template that best explains the test image.
//!
//! Exhaustive over `[-R, R]²`; the answer is the first minimum in a fixed order (by dx²+dy²,
//! then dy, then dx). Every shift is scored on the same pixels: the image less a margin of R on
//! each side, which a template shifted by up to R still covers. Scored on the whole image, the
//! strip a shift brings in from outside the template would count as background and penalise
//! every true shift of a board that is mostly copper. Branch-and-bound: a shift is abandoned as
//! soon as its running XOR count shows it cannot win. Counts only grow, so the answer is exactly the exhaustive one, and on
//! aligned boards almost every shift is abandoned after a few rows.

use crate::aoi::bitimage::{BitImage, shift_row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shift {
    pub dx: isize,
    pub dy: isize,
    /// XOR pixel count at this shift (on the sampling grid, within the compared window).
    pub xor_count: u64,
    /// Pixels compared at every shift.
    pub compared: u64,
}

/// The seeding pass counts one pixel in `COARSE`² of the exact pass's grid.
const COARSE: usize = 8;

/// Candidate shifts in tie-breaking order.
pub fn shift_order(radius: isize) -> Vec<(isize, isize)> {
    let mut shifts: Vec<(isize, isize)> = (-radius..=radius)
        .flat_map(|dy| (-radius..=radius).map(move |dx| (dx, dy)))
        .collect();
    shifts.sort_by_key(|&(dx, dy)| (dx * dx + dy * dy, dy, dx));
    shifts
}

/// The shift (dx, dy) of `template` minimising `#(test XOR template shifted)` over the
/// compared window ([`window_margins`]); where an image too small for the margins lets a shift
/// reach past the template, the template is background there. `step` > 1 counts only pixels
/// with `x % step == 0 && y % step == 0`.
pub fn estimate_shift(test: &BitImage, template: &BitImage, radius: usize, step: usize) -> Shift {
    // The search is nothing but XOR population counts, which the portable build can only
    // emulate with SSE2: compile it once more for the CPU's own popcount instructions.
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vpopcntdq") {
            // SAFETY: the features it is compiled for were just detected.
            return unsafe { estimate_shift_avx512(test, template, radius, step) };
        }
        if is_x86_feature_detected!("popcnt") {
            // SAFETY: as above.
            return unsafe { estimate_shift_popcnt(test, template, radius, step) };
        }
    }
    estimate_shift_portable(test, template, radius, step)
}

/// `estimate_shift_portable` compiled for more instruction-set extensions.
macro_rules! estimate_shift_with {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        fn $name(test: &BitImage, template: &BitImage, radius: usize, step: usize) -> Shift {
            estimate_shift_portable(test, template, radius, step)
        }
    };
}

estimate_shift_with!(estimate_shift_avx512, "avx512f,avx512vpopcntdq");
estimate_shift_with!(estimate_shift_popcnt, "popcnt");

#[inline(always)]
fn estimate_shift_portable(
    test: &BitImage,
    template: &BitImage,
    radius: usize,
    step: usize,
) -> Shift {
    let order = shift_order(radius as isize);
    // Shifts are visited column by column (all dy of one dx, then the next dx) so that the
    // shifted template rows stay in one small cache plane.
    let mut visits: Vec<usize> = (0..order.len()).collect();
    visits.sort_by_key(|&index| (order[index].0, index));
    let step = step.max(1);
    let margins = window_margins(test.width(), test.height(), radius);
    let mut counter = Counter::new(test, template);
    let grid = Grid::new(test, step, margins);
    // A coarse pass on a sparser grid finds a likely winner whose exact count then bounds
    // the exact pass from its first shift on. Only speed depends on it, never the answer.
    let seed = if step < 4 {
        // The coarse pass is seeded in turn with the unshifted count (order index 0): boards
        // are usually close to aligned, so far shifts are abandoned after a few rows.
        let coarse_grid = Grid::new(test, COARSE * step, margins);
        let unshifted = counter.count(&coarse_grid, 0, 0, u64::MAX);
        let coarse = search(
            &mut counter,
            &coarse_grid,
            &order,
            &visits,
            Some((unshifted, 0)),
        );
        let exact = counter.count(&grid, coarse.dx, coarse.dy, u64::MAX);
        let index = order
            .iter()
            .position(|s| *s == (coarse.dx, coarse.dy))
            .expect("coarse winner is in the order");
        Some((exact, index))
    } else {
        None
    };
    let mut shift = search(&mut counter, &grid, &order, &visits, seed);
    shift.compared = grid.pixels();
    shift
}

/// The margins (x, y) left out of the comparison: the search radius, or less where the image
/// is too small to keep a row or column inside them.
pub fn window_margins(width: usize, height: usize, radius: usize) -> (usize, usize) {
    (
        radius.min(width.saturating_sub(1) / 2),
        radius.min(height.saturating_sub(1) / 2),
    )
}

/// First minimum in `order`, visiting the shifts at the `visits` indices of `order`. `seed` =
/// (exact count, order index) of a known shift. The visit order only decides ties, which the
/// limits below resolve exactly as a visit in `order` would.
#[inline(always)]
fn search(
    counter: &mut Counter,
    grid: &Grid,
    order: &[(isize, isize)],
    visits: &[usize],
    seed: Option<(u64, usize)>,
) -> Shift {
    let (mut best_count, mut best_index) = seed.unwrap_or((u64::MAX, usize::MAX));
    for &index in visits {
        let (dx, dy) = order[index];
        // Beating the best needs a smaller count, or an equal one earlier in the order.
        let limit = if index < best_index {
            best_count.saturating_add(1)
        } else {
            best_count
        };
        let count = counter.count(grid, dx, dy, limit);
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
        compared: 0,
    }
}

/// The pixels counted: the sampled rows inside the window, those richest in edges first (a
/// wrong shift piles up XOR pixels fastest there, so it is recognised after a small fraction of
/// the rows; the order of rows cannot change a total), and a mask of the sampled columns inside
/// the window.
struct Grid {
    rows: Vec<usize>,
    column_mask: Vec<u64>,
}

impl Grid {
    fn new(image: &BitImage, step: usize, (margin_x, margin_y): (usize, usize)) -> Grid {
        let (width, height) = (image.width(), image.height());
        let inside = |v: usize, margin: usize, size: usize| v >= margin && v + margin < size;
        let mut rows: Vec<usize> = (0..height)
            .step_by(step)
            .filter(|&y| inside(y, margin_y, height))
            .collect();
        rows.sort_by_cached_key(|&y| std::cmp::Reverse(edge_count(image, y)));
        let mut column_mask = vec![0u64; image.words_per_row()];
        for x in (0..width)
            .step_by(step)
            .filter(|&x| inside(x, margin_x, width))
        {
            column_mask[x / 64] |= 1 << (x % 64);
        }
        Grid { rows, column_mask }
    }

    fn pixels(&self) -> u64 {
        let columns: u64 = self.column_mask.iter().map(|m| m.count_ones() as u64).sum();
        self.rows.len() as u64 * columns
    }
}

/// Pixels of row `y` that differ from their left neighbour or from the pixel below.
fn edge_count(image: &BitImage, y: usize) -> u32 {
    let row = image.row(y);
    let below = image.row((y + 1).min(image.height() - 1));
    let mut carry = 0u64;
    row.iter()
        .zip(below)
        .map(|(&word, &under)| {
            let left = (word << 1) | carry;
            carry = word >> 63;
            (word ^ left).count_ones() + (word ^ under).count_ones()
        })
        .sum()
}

/// XOR counts of the test image against the shifted template.
struct Counter<'a> {
    test: &'a BitImage,
    template: &'a BitImage,
    /// Template rows shifted by `plane_dx`, filled on first use (`filled` per row).
    plane: Vec<u64>,
    filled: Vec<bool>,
    plane_dx: Option<isize>,
}

impl<'a> Counter<'a> {
    fn new(test: &'a BitImage, template: &'a BitImage) -> Counter<'a> {
        Counter {
            test,
            template,
            plane: vec![0; test.height() * test.words_per_row()],
            filled: vec![false; test.height()],
            plane_dx: None,
        }
    }

    /// The count at (dx, dy) on `grid`, or any value >= `limit` once it is reached.
    #[inline(always)]
    fn count(&mut self, grid: &Grid, dx: isize, dy: isize, limit: u64) -> u64 {
        if self.plane_dx != Some(dx) {
            self.filled.fill(false);
            self.plane_dx = Some(dx);
        }
        let height = self.test.height() as isize;
        let words = self.test.words_per_row();
        let mut count = 0u64;
        for &y in &grid.rows {
            let test_row = self.test.row(y);
            let source = y as isize - dy;
            count += if source < 0 || source >= height {
                masked_ones(test_row, &grid.column_mask)
            } else {
                let source = source as usize;
                let shifted = &mut self.plane[source * words..(source + 1) * words];
                if !self.filled[source] {
                    shift_row(self.template.row(source), shifted, dx, self.test.width());
                    self.filled[source] = true;
                }
                masked_xor_ones(test_row, shifted, &grid.column_mask)
            };
            if count >= limit {
                return count;
            }
        }
        count
    }
}

#[inline(always)]
fn masked_ones(row: &[u64], mask: &[u64]) -> u64 {
    row.iter()
        .zip(mask)
        .map(|(t, m)| (t & m).count_ones() as u64)
        .sum()
}

#[inline(always)]
fn masked_xor_ones(a: &[u64], b: &[u64], mask: &[u64]) -> u64 {
    a.iter()
        .zip(b)
        .zip(mask)
        .map(|((a, b), m)| ((a ^ b) & m).count_ones() as u64)
        .sum()
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

    /// The definition, pixel by pixel: the window's pixels with `x % step == 0 && y % step == 0`.
    fn exhaustive(test: &BitImage, template: &BitImage, radius: usize, step: usize) -> Shift {
        let (width, height) = (test.width(), test.height());
        let (mx, my) = window_margins(width, height, radius);
        let pixels: Vec<(usize, usize)> = (my..height - my)
            .flat_map(|y| (mx..width - mx).map(move |x| (x, y)))
            .filter(|&(x, y)| x % step == 0 && y % step == 0)
            .collect();
        let compared = pixels.len() as u64;
        let mut best: Option<Shift> = None;
        for (dx, dy) in shift_order(radius as isize) {
            let xor = test.xor(&template.shifted(dx, dy));
            let count = pixels.iter().filter(|&&(x, y)| xor.get(x, y)).count() as u64;
            if best.is_none_or(|b| count < b.xor_count) {
                best = Some(Shift {
                    dx,
                    dy,
                    xor_count: count,
                    compared,
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
            assert_eq!(found, exhaustive(&test, &template, 5, 1));
        }
    }

    #[test]
    fn grid_rows_visit_every_sampled_row_once_edges_first() {
        let mut test = BitImage::new(70, 37);
        for x in (0..70).step_by(2) {
            test.set(x, 21);
        }
        for step in [1usize, 3] {
            let mut rows = Grid::new(&test, step, (0, 0)).rows;
            // Row 21 alternates (70 transitions, 35 differences below); row 20 differs from
            // it in 35 pixels; every other row is blank.
            assert_eq!(&rows[..2], if step == 1 { &[21, 20] } else { &[21, 0] });
            rows.sort_unstable();
            assert_eq!(rows, (0..37).step_by(step).collect::<Vec<_>>());
        }
    }

    #[test]
    fn every_compiled_variant_finds_the_same_shift() {
        let template = random_board(150, 90, 11);
        let mut test = template.shifted(-2, 3);
        test.set(70, 40);
        for step in [1usize, 2] {
            let portable = estimate_shift_portable(&test, &template, 4, step);
            assert_eq!(estimate_shift(&test, &template, 4, step), portable);
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("popcnt") {
                // SAFETY: the feature was just detected.
                let popcnt = unsafe { estimate_shift_popcnt(&test, &template, 4, step) };
                assert_eq!(popcnt, portable);
            }
        }
    }

    #[test]
    fn a_board_moved_on_a_larger_panel_is_found_despite_what_moves_in() {
        // Template and test are two views of one larger board, the test moved by (dx, dy):
        // the strip that comes in is board, not background, and must not pull the answer
        // towards (0, 0). The board is mostly copper in vertical traces, with a few small
        // holes, so a vertical shift costs little and a scored strip would outweigh it.
        let mut rng = fastrand::Rng::with_seed(3);
        let holes: Vec<(usize, usize)> = (0..8)
            .map(|_| (rng.usize(0..137), rng.usize(0..117)))
            .collect();
        let copper = |x: usize, y: usize| {
            x % 10 >= 2
                && !holes
                    .iter()
                    .any(|&(hx, hy)| (hx..hx + 3).contains(&x) && (hy..hy + 3).contains(&y))
        };
        let view = |x0: usize, y0: usize| {
            let mut image = BitImage::new(100, 80);
            for y in 0..80 {
                for x in 0..100 {
                    if copper(x0 + x, y0 + y) {
                        image.set(x, y);
                    }
                }
            }
            image
        };
        let template = view(20, 20);
        for (dx, dy) in [(0isize, -10isize), (8, 8), (-7, 0), (3, -5)] {
            let test = view((20 - dx) as usize, (20 - dy) as usize);
            let found = estimate_shift(&test, &template, 12, 1);
            assert_eq!((found.dx, found.dy, found.xor_count), (dx, dy, 0));
            assert_eq!(found, exhaustive(&test, &template, 12, 1));
            assert_eq!(found.compared, (100 - 24) * (80 - 24));
        }
    }

    #[test]
    fn images_smaller_than_the_margins_keep_a_window() {
        assert_eq!(window_margins(640, 640, 12), (12, 12));
        assert_eq!(window_margins(10, 1, 12), (4, 0));
        let template = random_board(30, 14, 4);
        let test = template.shifted(1, -1);
        let found = estimate_shift(&test, &template, 12, 1);
        assert_eq!(found, exhaustive(&test, &template, 12, 1));
        assert_eq!(found.compared, (30 - 24) * (14 - 12));
    }

    #[test]
    fn a_sampled_grid_keeps_image_coordinates_inside_the_window() {
        let template = random_board(90, 60, 9);
        let mut test = template.shifted(2, -3);
        test.set(45, 30);
        test.set(7, 50);
        for (step, radius) in [(2usize, 5usize), (3, 5), (3, 12)] {
            let found = estimate_shift(&test, &template, radius, step);
            assert_eq!(
                found,
                exhaustive(&test, &template, radius, step),
                "step {step}"
            );
        }
        // Tiny: the margins shrink and shifts reach past the template.
        let small = random_board(20, 16, 2);
        let moved = small.shifted(-1, 2);
        for step in [1usize, 2, 3] {
            let found = estimate_shift(&moved, &small, 12, step);
            assert_eq!(found, exhaustive(&moved, &small, 12, step), "step {step}");
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
