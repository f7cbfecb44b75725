//! 8-connected components of a binary image, found on runs of set pixels (one union-find node
//! per run, not per pixel), with each component's bounding box and the number of pixels of a
//! second image (`counted`) inside it.

use std::collections::BTreeMap;

use crate::aoi::bitimage::BitImage;

/// A component: box with exclusive right/bottom edges, and its counted-pixel area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Component {
    pub x1: usize,
    pub y1: usize,
    pub x2: usize,
    pub y2: usize,
    pub area: u64,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    y: usize,
    start: usize,
    /// Exclusive.
    end: usize,
}

/// Components of `mask`; `counted` must have the same size (its pixels outside `mask` are ignored).
/// A component with a side longer than `cell` is cut into `cell`-pixel cells anchored at its own
/// top-left pixel, each non-empty cell becoming a unit (`cell` 0: never cut). Units come in the
/// order of pipeline.py: component (raster order of its first pixel), then cell row, cell column.
pub fn components(mask: &BitImage, counted: &BitImage, cell: usize) -> Vec<Component> {
    let runs = find_runs(mask);
    let labels = label_runs(&runs);
    let wholes = bounding_boxes(&runs, &labels);
    // Keyed by (component, cell row, cell column): the map's order is pipeline.py's unit order.
    let mut units: BTreeMap<(usize, usize, usize), Component> = BTreeMap::new();
    for (run, &label) in runs.iter().zip(&labels) {
        for (cell_x, cell_y, piece) in cell_pieces(run, &wholes[label], cell) {
            let area = count_in_run(counted, &piece);
            units
                .entry((label, cell_y, cell_x))
                .and_modify(|unit| unit.include(&piece, area))
                .or_insert_with(|| Component::of_run(&piece, area));
        }
    }
    units.into_values().collect()
}

impl Component {
    fn of_run(run: &Run, area: u64) -> Component {
        Component {
            x1: run.start,
            y1: run.y,
            x2: run.end,
            y2: run.y + 1,
            area,
        }
    }

    /// Grows the box over a run and adds its counted pixels.
    fn include(&mut self, run: &Run, area: u64) {
        self.x1 = self.x1.min(run.start);
        self.y1 = self.y1.min(run.y);
        self.x2 = self.x2.max(run.end);
        self.y2 = self.y2.max(run.y + 1);
        self.area += area;
    }
}

/// Component number of every run (raster order of first appearance); runs of consecutive rows
/// touch 8-connectedly when [start-1, end+1) intersects.
fn label_runs(runs: &[Run]) -> Vec<usize> {
    let mut parent: Vec<usize> = (0..runs.len()).collect();
    let mut previous = 0..0;
    let mut index = 0;
    while index < runs.len() {
        let y = runs[index].y;
        let row_start = index;
        while index < runs.len() && runs[index].y == y {
            index += 1;
        }
        let current = row_start..index;
        if previous.end > previous.start && runs[previous.start].y + 1 == y {
            let mut p = previous.start;
            for c in current.clone() {
                while p < previous.end && runs[p].end < runs[c].start {
                    p += 1;
                }
                let mut q = p;
                while q < previous.end && runs[q].start <= runs[c].end {
                    union(&mut parent, c, q);
                    q += 1;
                }
            }
        }
        previous = current;
    }
    let mut label_of_root = vec![usize::MAX; runs.len()];
    let mut next = 0;
    (0..runs.len())
        .map(|i| {
            let root = find(&mut parent, i);
            if label_of_root[root] == usize::MAX {
                label_of_root[root] = next;
                next += 1;
            }
            label_of_root[root]
        })
        .collect()
}

/// Bounding box of every component (area left 0): the split grid is anchored at its top-left.
fn bounding_boxes(runs: &[Run], labels: &[usize]) -> Vec<Component> {
    let mut boxes: Vec<Component> = Vec::new();
    for (run, &label) in runs.iter().zip(labels) {
        if label == boxes.len() {
            boxes.push(Component::of_run(run, 0));
        } else {
            boxes[label].include(run, 0);
        }
    }
    boxes
}

/// The pieces of `run` in each split cell of its component, as (cell column, cell row, piece).
/// A component no wider and no taller than `cell` is a single cell.
fn cell_pieces(run: &Run, whole: &Component, cell: usize) -> Vec<(usize, usize, Run)> {
    let big = cell > 0 && (whole.x2 - whole.x1 > cell || whole.y2 - whole.y1 > cell);
    if !big {
        return vec![(0, 0, *run)];
    }
    let cell_y = (run.y - whole.y1) / cell;
    let mut pieces = Vec::new();
    let mut start = run.start;
    while start < run.end {
        let cell_x = (start - whole.x1) / cell;
        let end = run.end.min(whole.x1 + (cell_x + 1) * cell);
        pieces.push((
            cell_x,
            cell_y,
            Run {
                y: run.y,
                start,
                end,
            },
        ));
        start = end;
    }
    pieces
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

fn union(parent: &mut [usize], a: usize, b: usize) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    if ra != rb {
        parent[ra.max(rb)] = ra.min(rb);
    }
}

fn find_runs(mask: &BitImage) -> Vec<Run> {
    let mut runs = Vec::new();
    for y in 0..mask.height() {
        let row = mask.row(y);
        let mut x = 0;
        let width = mask.width();
        while x < width {
            // Skip clear words quickly.
            let word = row[x / 64] >> (x % 64);
            if word == 0 {
                x = (x / 64 + 1) * 64;
                continue;
            }
            x += word.trailing_zeros() as usize;
            let start = x;
            while x < width && mask.get(x, y) {
                x += 1;
            }
            runs.push(Run { y, start, end: x });
        }
    }
    runs
}

fn count_in_run(counted: &BitImage, run: &Run) -> u64 {
    (run.start..run.end)
        .filter(|x| counted.get(*x, run.y))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(rows: &[&str]) -> BitImage {
        let mut image = BitImage::new(rows[0].len(), rows.len());
        for (y, row) in rows.iter().enumerate() {
            for (x, c) in row.chars().enumerate() {
                if c == '#' {
                    image.set(x, y);
                }
            }
        }
        image
    }

    #[test]
    fn diagonal_pixels_connect_and_boxes_are_exclusive() {
        let mask = image(&["#....##", ".#...#.", "..#....", "......#"]);
        let mut found = components(&mask, &mask, 0);
        found.sort_by_key(|c| (c.y1, c.x1));
        assert_eq!(
            found,
            vec![
                Component {
                    x1: 0,
                    y1: 0,
                    x2: 3,
                    y2: 3,
                    area: 3
                },
                Component {
                    x1: 5,
                    y1: 0,
                    x2: 7,
                    y2: 2,
                    area: 3
                },
                Component {
                    x1: 6,
                    y1: 3,
                    x2: 7,
                    y2: 4,
                    area: 1
                },
            ]
        );
    }

    #[test]
    fn u_shape_merges_into_one_component_and_counts_other_image() {
        let mask = image(&["#...#", "#...#", "#####"]);
        let counted = image(&["#....", ".....", "....#"]);
        let found = components(&mask, &counted, 0);
        assert_eq!(
            found,
            vec![Component {
                x1: 0,
                y1: 0,
                x2: 5,
                y2: 3,
                area: 2
            }]
        );
    }

    #[test]
    fn runs_across_word_boundaries() {
        let mut mask = BitImage::new(200, 2);
        for x in 60..140 {
            mask.set(x, 0);
        }
        mask.set(140, 1);
        let found = components(&mask, &mask, 0);
        assert_eq!(
            found,
            vec![Component {
                x1: 60,
                y1: 0,
                x2: 141,
                y2: 2,
                area: 81
            }]
        );
    }

    fn bar(mask: &mut BitImage, xs: std::ops::Range<usize>, ys: std::ops::Range<usize>) {
        for y in ys {
            for x in xs.clone() {
                mask.set(x, y);
            }
        }
    }

    fn boxes(found: &[Component]) -> Vec<(usize, usize, usize, usize, u64)> {
        found
            .iter()
            .map(|c| (c.x1, c.y1, c.x2, c.y2, c.area))
            .collect()
    }

    #[test]
    fn long_components_are_cut_into_cells_anchored_at_their_top_left() {
        let mut mask = BitImage::new(200, 10);
        bar(&mut mask, 10..160, 4..7);
        assert_eq!(
            boxes(&components(&mask, &mask, 64)),
            vec![
                (10, 4, 74, 7, 192),
                (74, 4, 138, 7, 192),
                (138, 4, 160, 7, 66)
            ]
        );
    }

    #[test]
    fn components_up_to_the_cell_size_stay_whole_and_zero_never_cuts() {
        let mut mask = BitImage::new(200, 4);
        bar(&mut mask, 0..64, 0..1);
        bar(&mut mask, 100..165, 2..3);
        assert_eq!(
            boxes(&components(&mask, &mask, 64)),
            vec![(0, 0, 64, 1, 64), (100, 2, 164, 3, 64), (164, 2, 165, 3, 1)]
        );
        assert_eq!(
            boxes(&components(&mask, &mask, 0)),
            vec![(0, 0, 64, 1, 64), (100, 2, 165, 3, 65)]
        );
    }

    #[test]
    fn cells_come_by_cell_row_then_column_not_by_first_pixel() {
        // A T on its head: the middle cell's first pixel (row 0) precedes the left cell's (row 40),
        // yet pipeline.py orders units by (component, cell row, cell column).
        let mut mask = BitImage::new(140, 50);
        bar(&mut mask, 0..140, 40..43);
        bar(&mut mask, 100..102, 0..40);
        assert_eq!(
            boxes(&components(&mask, &mask, 64)),
            vec![
                (0, 40, 64, 43, 192),
                (64, 0, 128, 43, 272),
                (128, 40, 140, 43, 36)
            ]
        );
    }
}
