//! Gaps in an archive's sensor values (NaN, ±Inf, values beyond float32): a job either fails at
//! the first one (the default) or holds the unit's last finite value of that channel over it,
//! the usual treatment of sensor dropouts, and counts what it held so results can be filtered.

use serde::{Deserialize, Serialize};

use crate::sensors::channels::ChannelMap;
use crate::sensors::window::fits_f32;

/// What a job does with a value the model cannot take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MissingPolicy {
    /// The job fails, naming the row, the channel and the value.
    #[default]
    Fail,
    /// The unit's last finite value of the channel stands in; a unit's first value of a
    /// channel has nothing before it, so a gap there still fails the job.
    Hold,
}

impl MissingPolicy {
    pub fn name(self) -> &'static str {
        match self {
            MissingPolicy::Fail => "fail",
            MissingPolicy::Hold => "hold",
        }
    }
}

/// A gap `hold` cannot fill: the first value of its channel in its unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeadingGap {
    /// Row within the rows given to [`GapFiller::fill`].
    pub row: usize,
    /// Model channel.
    pub channel: usize,
}

/// Holds values over gaps, row by row through an archive: the last finite value of each model
/// channel is carried across chunks and forgotten where a unit starts.
pub struct GapFiller {
    last: Vec<Option<f64>>,
}

impl GapFiller {
    pub fn new(channels: usize) -> GapFiller {
        GapFiller {
            last: vec![None; channels],
        }
    }

    /// Fills the gaps of the model's columns of `raw` (rows of `map.source_width` values) in
    /// place and appends, per row, how many of its values were held to `held`. `unit_starts(i)`
    /// says whether row `i` is its unit's first row. A gap with nothing to hold is written as 0
    /// when `discarded(i)` (a row read only for context, whose windows are not kept), and
    /// returned otherwise, with the rows before it filled.
    pub fn fill(
        &mut self,
        raw: &mut [f64],
        map: &ChannelMap,
        unit_starts: impl Fn(usize) -> bool,
        discarded: impl Fn(usize) -> bool,
        held: &mut Vec<u16>,
    ) -> Result<(), LeadingGap> {
        let width = map.source_width;
        // A map feeds at least one model channel; every row must get its count.
        assert!(width > 0, "an archive row of no columns");
        for (row, values) in raw.chunks_exact_mut(width).enumerate() {
            if unit_starts(row) {
                self.last.fill(None);
            }
            let mut count = 0u16;
            for (channel, &column) in map.columns.iter().enumerate() {
                let value = &mut values[column];
                if fits_f32(*value) {
                    self.last[channel] = Some(*value);
                    continue;
                }
                match self.last[channel] {
                    Some(last) => {
                        *value = last;
                        count += 1;
                    }
                    None if discarded(row) => *value = 0.0,
                    None => return Err(LeadingGap { row, channel }),
                }
            }
            held.push(count);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two model channels read from columns 2 and 0 of three.
    fn map() -> ChannelMap {
        ChannelMap {
            columns: vec![2, 0],
            source_width: 3,
        }
    }

    #[test]
    fn gaps_take_the_units_last_finite_value_and_are_counted() {
        let nan = f64::NAN;
        let mut raw = vec![
            1.0,
            9.0,
            10.0, // unit A
            nan,
            nan,
            11.0, // column 1 is not a model channel: left alone
            nan,
            9.0,
            f64::INFINITY,
            5.0,
            9.0,
            20.0, // unit B
            nan,
            9.0,
            1e39, // beyond float32
        ];
        let mut held = Vec::new();
        let mut filler = GapFiller::new(2);
        filler
            .fill(
                &mut raw,
                &map(),
                |row| row == 0 || row == 3,
                |_| false,
                &mut held,
            )
            .unwrap();
        assert_eq!(held, [0, 1, 2, 0, 2]);
        assert_eq!([raw[3], raw[5]], [1.0, 11.0]);
        assert!(raw[4].is_nan());
        assert_eq!([raw[6], raw[8]], [1.0, 11.0]);
        assert_eq!([raw[12], raw[14]], [5.0, 20.0]);
    }

    #[test]
    fn the_last_value_carries_over_chunks_but_not_into_the_next_unit() {
        let mut filler = GapFiller::new(2);
        let mut held = Vec::new();
        let mut first = vec![3.0, 0.0, 4.0];
        filler
            .fill(&mut first, &map(), |row| row == 0, |_| false, &mut held)
            .unwrap();
        let mut second = vec![f64::NAN, 0.0, f64::NAN];
        filler
            .fill(&mut second, &map(), |_| false, |_| false, &mut held)
            .unwrap();
        assert_eq!([second[0], second[2]], [3.0, 4.0]);
        let mut next_unit = vec![1.0, 0.0, f64::NAN];
        let gap = filler
            .fill(&mut next_unit, &map(), |_| true, |_| false, &mut held)
            .unwrap_err();
        assert_eq!(gap, LeadingGap { row: 0, channel: 0 });
        assert_eq!(held, [0, 2]);
    }

    #[test]
    fn a_leading_gap_in_a_discarded_row_is_zeroed() {
        let mut filler = GapFiller::new(2);
        let mut held = Vec::new();
        let mut raw = vec![f64::NAN, 0.0, 2.0, 1.0, 0.0, 2.0];
        filler
            .fill(&mut raw, &map(), |_| false, |row| row == 0, &mut held)
            .unwrap();
        assert_eq!(raw[0], 0.0);
        assert_eq!(held, [0, 0]);
    }
}
