//! 8-connected components of a binary image, found on runs of set pixels (one union-find node
//! per run, not per pixel), with each component's bounding box and the number of pixels of a
//! second image (`counted`) inside it.

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
pub fn components(mask: &BitImage, counted: &BitImage) -> Vec<Component> {
    let runs = find_runs(mask);
    let mut parent: Vec<usize> = (0..runs.len()).collect();
    // Runs of the previous row overlap 8-connectedly when [start-1, end+1) intersects.
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
    let mut slot_of_root = vec![usize::MAX; runs.len()];
    let mut out: Vec<Component> = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let root = find(&mut parent, i);
        if slot_of_root[root] == usize::MAX {
            slot_of_root[root] = out.len();
            out.push(Component {
                x1: run.start,
                y1: run.y,
                x2: run.end,
                y2: run.y + 1,
                area: 0,
            });
        }
        let component = &mut out[slot_of_root[root]];
        component.x1 = component.x1.min(run.start);
        component.x2 = component.x2.max(run.end);
        component.y2 = component.y2.max(run.y + 1);
        component.area += count_in_run(counted, run);
    }
    out
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
        let mut found = components(&mask, &mask);
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
        let found = components(&mask, &counted);
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
        let found = components(&mask, &mask);
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
}
