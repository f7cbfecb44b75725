//! Scaling and windowing, the CPU half of the sensor pipeline.
//!
//! A window is the `window` rows (cycles) ending at the current row, oldest first, channels in
//! model order, each value scaled as `(x - offset) * scale` in f64 and cast to f32 (exactly what
//! the training scripts do). **Padding policy** (`repeat_first`, the only one the models were
//! trained with): a unit observed for fewer than `window` rows gets its first observed row
//! repeated at the front; the number of repeated rows is reported as `padded` with every result,
//! so short units are scored and flagged, never dropped.

use crate::sensors::channels::ChannelMap;
use crate::sensors::params::SensorParams;

/// A value that is NaN or infinite, by position in the rows handed over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFinite {
    pub row: usize,
    /// Index into the model's channels.
    pub channel: usize,
    pub value: f64,
}

/// Per-channel affine scaling in model channel order.
#[derive(Debug, Clone)]
pub struct Scaler {
    offset: Vec<f64>,
    scale: Vec<f64>,
}

impl Scaler {
    pub fn new(params: &SensorParams) -> Scaler {
        Scaler {
            offset: params.offset.clone(),
            scale: params.scale.clone(),
        }
    }

    pub fn width(&self) -> usize {
        self.offset.len()
    }

    /// (offset, scale) per model channel, for the GPU kernels.
    pub fn affine(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.offset.iter().copied().zip(self.scale.iter().copied())
    }

    /// Scales rows laid out as the source has them (`map.source_width` values per row) into
    /// model-order rows appended to `out`. The first non-finite value used by the model stops it.
    pub fn scale_rows<T: Copy + Into<f64>>(
        &self,
        source: &[T],
        map: &ChannelMap,
        out: &mut Vec<f32>,
    ) -> Result<(), NonFinite> {
        let width = map.source_width;
        if width == 0 {
            return Ok(());
        }
        out.reserve(source.len() / width * self.width());
        for (row, values) in source.chunks_exact(width).enumerate() {
            for (channel, &column) in map.columns.iter().enumerate() {
                let value: f64 = values[column].into();
                if !value.is_finite() {
                    return Err(NonFinite {
                        row,
                        channel,
                        value,
                    });
                }
                out.push(((value - self.offset[channel]) * self.scale[channel]) as f32);
            }
        }
        Ok(())
    }
}

/// Builds the window ending at each row of one unit at a time, over rows that arrive in pieces
/// (archive chunks): it keeps only the rows the next windows still need.
#[derive(Debug, Clone)]
pub struct Windower {
    window: usize,
    width: usize,
    /// Scaled rows of the current unit, row `0` being the unit's row number `base`.
    rows: Vec<f32>,
    base: usize,
}

/// Rows kept before the buffer is compacted to its last `window - 1` rows.
const COMPACT_ROWS: usize = 4096;

impl Windower {
    pub fn new(window: usize, width: usize) -> Windower {
        Windower {
            window,
            width,
            rows: Vec::with_capacity((COMPACT_ROWS + window) * width),
            base: 0,
        }
    }

    /// Values per window.
    pub fn window_len(&self) -> usize {
        self.window * self.width
    }

    /// Starts a unit; `position` is the unit row number of the next row pushed (0 for the
    /// unit's first row; more when the stream starts inside the unit to give context).
    pub fn start_unit(&mut self, position: usize) {
        self.rows.clear();
        self.base = position;
    }

    fn held_rows(&self) -> usize {
        self.rows.len() / self.width
    }

    /// Unit row number of the last pushed row.
    pub fn position(&self) -> usize {
        (self.base + self.held_rows()).saturating_sub(1)
    }

    /// Appends one scaled row of the current unit.
    pub fn push(&mut self, row: &[f32]) {
        debug_assert_eq!(row.len(), self.width);
        if self.held_rows() >= COMPACT_ROWS {
            let keep = self.window.saturating_sub(1);
            let drop = self.held_rows() - keep;
            self.rows.drain(..drop * self.width);
            self.base += drop;
        }
        self.rows.extend_from_slice(row);
    }

    /// Appends the window ending at the last pushed row to `out`; returns how many rows were
    /// padded (`repeat_first`). Needs the unit's first row or `window - 1` earlier rows pushed.
    pub fn window_into(&self, out: &mut Vec<f32>) -> usize {
        let held = self.held_rows();
        assert!(held > 0, "window of a unit with no rows");
        let position = self.base + held - 1;
        if position + 1 >= self.window {
            let start = held
                .checked_sub(self.window)
                .expect("the stream starts at least window - 1 rows before the first scored row");
            out.extend_from_slice(&self.rows[start * self.width..]);
            0
        } else {
            assert_eq!(self.base, 0, "short-unit windows need the unit's first row");
            let padded = self.window - held;
            for _ in 0..padded {
                out.extend_from_slice(&self.rows[..self.width]);
            }
            out.extend_from_slice(&self.rows);
            padded
        }
    }
}

/// The window of a unit observed for `rows.len() / width` rows (1..=window), padded by policy:
/// appended to `out`, padded row count returned.
pub fn single_window(rows: &[f32], window: usize, width: usize, out: &mut Vec<f32>) -> usize {
    let mut windower = Windower::new(window, width);
    for row in rows.chunks_exact(width) {
        windower.push(row);
    }
    windower.window_into(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SensorParams {
        SensorParams {
            window: 3,
            channels: vec!["a".into(), "b".into()],
            scaling: "minmax".into(),
            offset: vec![1.0, 10.0],
            scale: vec![2.0, 0.5],
            rul_cap: 125.0,
            padding: crate::sensors::params::Padding::RepeatFirst,
        }
    }

    #[test]
    fn scales_in_model_order_and_finds_non_finite_values() {
        let scaler = Scaler::new(&params());
        let map = ChannelMap::new(
            &params().channels,
            &["x".into(), "b".into(), "a".into()],
            true,
        )
        .unwrap();
        let mut out = Vec::new();
        scaler
            .scale_rows(&[0.0f64, 12.0, 2.0, 5.0, 10.0, 1.0], &map, &mut out)
            .unwrap();
        assert_eq!(out, vec![2.0, 1.0, 0.0, 0.0]);
        let bad = scaler
            .scale_rows(
                &[0.0f32, 12.0, 2.0, f32::NAN, 10.0, f32::INFINITY],
                &map,
                &mut out,
            )
            .unwrap_err();
        assert_eq!((bad.row, bad.channel), (1, 0));
        // An unused column may hold anything.
        assert!(
            scaler
                .scale_rows(&[f64::NAN, 12.0, 2.0], &map, &mut Vec::new())
                .is_ok()
        );
    }

    #[test]
    fn windows_slide_and_short_units_repeat_their_first_row() {
        let mut windower = Windower::new(3, 1);
        let mut windows = Vec::new();
        let mut padded = Vec::new();
        for value in [1.0f32, 2.0, 3.0, 4.0] {
            windower.push(&[value]);
            padded.push(windower.window_into(&mut windows));
        }
        assert_eq!(padded, vec![2, 1, 0, 0]);
        assert_eq!(
            windows,
            vec![1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 2.0, 3.0, 2.0, 3.0, 4.0]
        );
        let mut out = Vec::new();
        assert_eq!(single_window(&[7.0, 8.0], 3, 1, &mut out), 1);
        assert_eq!(out, vec![7.0, 7.0, 8.0]);
    }

    #[test]
    fn compaction_and_mid_unit_starts_keep_windows_exact() {
        let width = 2;
        let rows: Vec<f32> = (0..(COMPACT_ROWS * 3) as u32 * 2)
            .map(|v| v as f32)
            .collect();
        let mut windower = Windower::new(30, width);
        let mut last = Vec::new();
        for (i, row) in rows.chunks_exact(width).enumerate() {
            windower.push(row);
            if i >= 29 {
                last.clear();
                windower.window_into(&mut last);
                assert_eq!(last[..], rows[(i - 29) * width..(i + 1) * width], "row {i}");
            }
        }
        // Starting at unit row 100 with 29 rows of context gives the same window at row 129.
        let mut context = Windower::new(30, width);
        context.start_unit(100);
        for row in rows[100 * width..130 * width].chunks_exact(width) {
            context.push(row);
        }
        assert_eq!(context.position(), 129);
        let mut window = Vec::new();
        assert_eq!(context.window_into(&mut window), 0);
        assert_eq!(window[..], rows[100 * width..130 * width]);
    }
}
