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

/// A value that is NaN, infinite or beyond the range of the model's f32 input, by position in
/// the rows handed over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFinite {
    pub row: usize,
    /// Index into the model's channels.
    pub channel: usize,
    pub value: f64,
}

impl NonFinite {
    /// What is wrong with the value, for messages (see `describe_non_finite`).
    pub fn what(&self) -> String {
        describe_non_finite(self.value)
    }
}

/// Whether the model, which takes f32, can be given `value`: 1e39 is finite as an f64 but
/// infinite once cast, which the GPU backends (that read f32) already refuse.
pub fn fits_f32(value: f64) -> bool {
    (value as f32).is_finite()
}

/// "NaN", "Infinity", "-Infinity" or "1e39 (beyond the float32 range)".
pub fn describe_non_finite(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        format!("{value:e} (beyond the float32 range)")
    }
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
                if !fits_f32(value) {
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

/// The window ending at buffer row `last` of a unit whose first row is buffer row `first`
/// (`first <= last`). Rows before `first` repeat it (the padding policy); when the unit began
/// before the buffer, `first` is 0 and the buffer must hold the `window - 1` rows before `last`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WindowSpan {
    pub last: u32,
    pub first: u32,
}

impl WindowSpan {
    /// Rows of the window that repeat the unit's first row.
    pub fn padded(&self, window: usize) -> usize {
        (window - 1).saturating_sub((self.last - self.first) as usize)
    }

    /// Buffer row of the window's row `k` (oldest first).
    pub fn source_row(&self, window: usize, k: usize) -> usize {
        (self.last as usize + 1 + k)
            .saturating_sub(window)
            .max(self.first as usize)
    }
}

/// Appends the window of every span over `rows` (`width` values per row) to `out`:
/// `[spans, window, width]`, the reference for the GPU `stack_windows` kernels.
pub fn stack_windows(
    rows: &[f32],
    width: usize,
    window: usize,
    spans: &[WindowSpan],
    out: &mut Vec<f32>,
) {
    out.reserve(spans.len() * window * width);
    for span in spans {
        for k in 0..window {
            let row = span.source_row(window, k);
            out.extend_from_slice(&rows[row * width..(row + 1) * width]);
        }
    }
}

/// The window of a unit observed for `rows.len() / width` rows (at least one), padded by
/// policy: appended to `out`, padded row count returned.
pub fn single_window(rows: &[f32], window: usize, width: usize, out: &mut Vec<f32>) -> usize {
    let held = rows.len() / width;
    assert!(held > 0, "window of a unit with no rows");
    let span = WindowSpan {
        last: (held - 1) as u32,
        first: 0,
    };
    stack_windows(rows, width, window, &[span], out);
    span.padded(window)
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
        assert_eq!(bad.what(), "Infinity");
        // Finite as f64 but not as the model's f32: refused like infinity, named by value.
        let bad = scaler
            .scale_rows(&[0.0f64, 12.0, 2.0, 0.0, 1e39, 1.0], &map, &mut out)
            .unwrap_err();
        assert_eq!((bad.row, bad.channel, bad.value), (1, 1, 1e39));
        assert_eq!(bad.what(), "1e39 (beyond the float32 range)");
        // An unused column may hold anything.
        assert!(
            scaler
                .scale_rows(&[f64::NAN, 12.0, 2.0], &map, &mut Vec::new())
                .is_ok()
        );
    }

    #[test]
    fn windows_slide_and_short_units_repeat_their_first_row() {
        let rows = [1.0f32, 2.0, 3.0, 4.0];
        let spans: Vec<WindowSpan> = (0..4).map(|last| WindowSpan { last, first: 0 }).collect();
        let mut windows = Vec::new();
        stack_windows(&rows, 1, 3, &spans, &mut windows);
        let padded: Vec<usize> = spans.iter().map(|s| s.padded(3)).collect();
        assert_eq!(padded, vec![2, 1, 0, 0]);
        assert_eq!(
            windows,
            vec![1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 2.0, 3.0, 2.0, 3.0, 4.0]
        );
        let mut out = Vec::new();
        assert_eq!(single_window(&[7.0, 8.0], 3, 1, &mut out), 1);
        assert_eq!(out, vec![7.0, 7.0, 8.0]);
        out.clear();
        assert_eq!(single_window(&[5.0, 6.0, 7.0, 8.0], 3, 1, &mut out), 0);
        assert_eq!(out, vec![6.0, 7.0, 8.0]);
    }

    #[test]
    fn a_unit_starting_inside_the_buffer_pads_from_its_own_first_row() {
        let width = 2;
        let rows: Vec<f32> = (0..20).map(|v| v as f32).collect();
        // Rows 0-3 belong to the previous unit; the next unit starts at buffer row 4.
        let mut out = Vec::new();
        let span = WindowSpan { last: 5, first: 4 };
        stack_windows(&rows, width, 4, &[span], &mut out);
        assert_eq!(span.padded(4), 2);
        assert_eq!(out, vec![8.0, 9.0, 8.0, 9.0, 8.0, 9.0, 10.0, 11.0]);
    }
}
