//! Live windows as JSON: `{"unit": "...", "channels": [names], "values": [[row], ...]}`, one
//! object, an array of them, or `{"windows": [...]}`. `values` holds one row per cycle, oldest
//! first, one value per entry of `channels`. Channels are matched by name in any order; missing,
//! unknown or duplicated channels, rows of the wrong width, more rows than the window, no rows
//! and NaN/Inf/null values are refused with a message that names them. Fewer rows than the
//! window are padded by the model's policy (`repeat_first`) and reported as `padded`.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::json_tokens::relax_non_standard_numbers;
use crate::sensors::SensorError;
use crate::sensors::channels::ChannelMap;
use crate::sensors::params::SensorParams;
use crate::sensors::window::{Scaler, describe_non_finite, fits_f32, single_window};

/// Windows refused in one message, at most.
const MAX_REPORTED: usize = 10;

/// Windows one request may hold: a request is parsed and scored whole, so a fleet's worth
/// belongs in a job.
pub const MAX_WINDOWS: usize = 10_000;

/// Rows of one window, and values of one row, kept while parsing; the rest is only counted.
/// A model whose window or channels exceed them scores archives only (`prepare` says so), so
/// a window a model takes live is always kept whole, and a body of millions of rows takes
/// memory in step with what a model could use (a 64 MB body of one-value rows took 1.3 GB
/// before).
pub const MAX_ROWS_KEPT: usize = 512;
pub const MAX_VALUES_KEPT: usize = 256;

/// A number that may arrive as NaN/Infinity (bare, as Python's json writes them, or quoted) or
/// null, so such values can be refused by position instead of failing the whole parse.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading(pub f64);

impl<'de> Deserialize<'de> for Reading {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ReadingVisitor;
        impl Visitor<'_> for ReadingVisitor {
            type Value = Reading;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Reading, E> {
                Ok(Reading(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Reading, E> {
                Ok(Reading(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Reading, E> {
                Ok(Reading(v as f64))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Reading, E> {
                Ok(Reading(f64::NAN))
            }
            fn visit_none<E: de::Error>(self) -> Result<Reading, E> {
                Ok(Reading(f64::NAN))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Reading, E> {
                match v.trim().to_ascii_lowercase().as_str() {
                    "nan" => Ok(Reading(f64::NAN)),
                    "inf" | "+inf" | "infinity" | "+infinity" => Ok(Reading(f64::INFINITY)),
                    "-inf" | "-infinity" => Ok(Reading(f64::NEG_INFINITY)),
                    other => other
                        .parse::<f64>()
                        .map(Reading)
                        .map_err(|_| E::custom(format!("\"{v}\" is not a number"))),
                }
            }
        }
        deserializer.deserialize_any(ReadingVisitor)
    }
}

/// Longest unit name, in bytes.
const MAX_UNIT_BYTES: usize = 256;

/// One live window as sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveWindow {
    /// A string or number naming the unit; echoed back.
    #[serde(default, deserialize_with = "unit_name")]
    pub unit: serde_json::Value,
    #[serde(deserialize_with = "channel_names")]
    pub channels: Vec<String>,
    pub values: Rows,
}

fn unit_name<'de, D: Deserializer<'de>>(deserializer: D) -> Result<serde_json::Value, D::Error> {
    crate::bounded_json::short_scalar::<_, MAX_UNIT_BYTES>(deserializer)
}

/// At most as many names as a row keeps values.
fn channel_names<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    crate::bounded_json::at_most::<_, _, MAX_VALUES_KEPT>(deserializer)
}

fn some_channel_names<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<String>>, D::Error> {
    channel_names(deserializer).map(Some)
}

/// A window's rows: the values of the first `MAX_ROWS_KEPT` rows, at most `MAX_VALUES_KEPT`
/// of each, kept one after the other in one allocation, and how many of each were sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    kept: Vec<Reading>,
    /// Per kept row: values sent, values kept.
    widths: Vec<(usize, usize)>,
    sent: usize,
}

impl Rows {
    /// Rows sent.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// The kept rows: values sent in the row, and the values kept of it.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &[Reading])> {
        self.widths.iter().scan(0, |start, &(sent, kept)| {
            let row = &self.kept[*start..*start + kept];
            *start += kept;
            Some((sent, row))
        })
    }
}

impl<'de> Deserialize<'de> for Rows {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowsVisitor;
        impl<'de> Visitor<'de> for RowsVisitor {
            type Value = Rows;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of rows, each a list of numbers")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Rows, A::Error> {
                let mut rows = Rows::default();
                while rows.widths.len() < MAX_ROWS_KEPT {
                    let before = rows.kept.len();
                    match seq.next_element_seed(RowSeed(&mut rows.kept))? {
                        Some(sent) => rows.widths.push((sent, rows.kept.len() - before)),
                        None => break,
                    }
                }
                rows.sent = rows.widths.len() + count_rest(&mut seq)?;
                Ok(rows)
            }
        }
        deserializer.deserialize_seq(RowsVisitor)
    }
}

/// The elements left in `seq`, skipped unparsed (past what a list keeps) and only counted.
fn count_rest<'de, A: de::SeqAccess<'de>>(seq: &mut A) -> Result<usize, A::Error> {
    let mut rest = 0;
    while seq.next_element::<de::IgnoredAny>()?.is_some() {
        rest += 1;
    }
    Ok(rest)
}

/// One row appended to the kept values (up to `MAX_VALUES_KEPT`); yields the values sent.
struct RowSeed<'a>(&'a mut Vec<Reading>);

impl<'de> de::DeserializeSeed<'de> for RowSeed<'_> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        struct RowVisitor<'a>(&'a mut Vec<Reading>);
        impl<'de> Visitor<'de> for RowVisitor<'_> {
            type Value = usize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row: a list of numbers")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
                let mut sent = 0;
                while sent < MAX_VALUES_KEPT {
                    match seq.next_element::<Reading>()? {
                        Some(value) => self.0.push(value),
                        None => return Ok(sent),
                    }
                    sent += 1;
                }
                Ok(sent + count_rest(&mut seq)?)
            }
        }
        deserializer.deserialize_seq(RowVisitor(self.0))
    }
}

/// The body: one window, `{"windows": [...]}`, or an array.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectBody {
    #[serde(default, deserialize_with = "unit_name")]
    unit: serde_json::Value,
    #[serde(default, deserialize_with = "some_channel_names")]
    channels: Option<Vec<String>>,
    values: Option<Rows>,
    windows: Option<BoundedWindows>,
}

/// A list of windows read up to `MAX_WINDOWS`; the rest is skipped unparsed and only counted.
struct BoundedWindows {
    windows: Vec<LiveWindow>,
    sent: usize,
}

impl<'de> Deserialize<'de> for BoundedWindows {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = BoundedWindows;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of windows")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut windows = Vec::new();
                while windows.len() < MAX_WINDOWS {
                    let index = windows.len();
                    match seq
                        .next_element::<LiveWindow>()
                        .map_err(|error| in_window(index, error))?
                    {
                        Some(window) => windows.push(window),
                        None => {
                            return Ok(BoundedWindows {
                                sent: windows.len(),
                                windows,
                            });
                        }
                    }
                }
                let sent = windows.len() + count_rest(&mut seq)?;
                Ok(BoundedWindows { windows, sent })
            }
        }
        deserializer.deserialize_seq(ListVisitor)
    }
}

/// A window's error, named by its index in the list. serde_json adds the position to the error
/// that reaches the top; the window's own is left out, so it is said once.
fn in_window<E: de::Error>(index: usize, error: E) -> E {
    let text = error.to_string();
    let text = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(t, _)| t);
    E::custom(format!("window {index}: {text}"))
}

impl BoundedWindows {
    fn checked(self) -> Result<Vec<LiveWindow>, SensorError> {
        if self.sent > MAX_WINDOWS {
            return Err(SensorError::TooMany(format!(
                "{} windows in one request; at most {MAX_WINDOWS} (score more as a job: POST \
                 /v1/jobs with an archive)",
                self.sent
            )));
        }
        Ok(self.windows)
    }
}

/// Parses a request body; Err is a message for 400 (not JSON at all) or 422 (JSON but not windows).
pub fn parse_windows(body: &[u8]) -> Result<Vec<LiveWindow>, SensorError> {
    match parse_strict(body) {
        Ok(windows) => windows,
        Err(error) => match relax_non_standard_numbers(body) {
            Some(relaxed) => parse_strict(&relaxed).map_err(|_| syntax(error))?,
            None => Err(syntax(error)),
        },
    }
}

fn syntax(error: serde_json::Error) -> SensorError {
    if error.is_data() {
        SensorError::Invalid(format!(
            "the body is not a window or a list of windows: {}",
            crate::json_error::describe(&error)
        ))
    } else {
        SensorError::Syntax(format!("the body is not valid JSON: {error}"))
    }
}

/// Outer Err: JSON syntax; inner: JSON that is not windows.
fn parse_strict(body: &[u8]) -> Result<Result<Vec<LiveWindow>, SensorError>, serde_json::Error> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        return serde_json::from_slice::<BoundedWindows>(body).map(BoundedWindows::checked);
    }
    let object: ObjectBody = serde_json::from_slice(body)?;
    let refused = |problem: &str| {
        Err(SensorError::Invalid(format!(
            "{problem}: send {{\"unit\", \"channels\", \"values\"}}, a list of them, or \
             {{\"windows\": [...]}}"
        )))
    };
    Ok(match (object.windows, object.channels, object.values) {
        (Some(windows), None, None) => windows.checked(),
        (None, Some(channels), Some(values)) => Ok(vec![LiveWindow {
            unit: object.unit,
            channels,
            values,
        }]),
        (Some(_), _, _) => refused("\"windows\" comes with \"channels\" or \"values\" beside it"),
        (None, Some(_), None) => refused("the window has \"channels\" but no \"values\""),
        (None, None, Some(_)) => refused("the window has \"values\" but no \"channels\""),
        (None, None, None) => {
            refused("the body has none of \"channels\", \"values\" and \"windows\"")
        }
    })
}

/// Where a window is refused: its index, its unit and what is wrong.
fn describe(index: usize, window: &LiveWindow, problem: &str) -> String {
    match &window.unit {
        serde_json::Value::Null => format!("window {index}: {problem}"),
        unit => format!("window {index} (unit {unit}): {problem}"),
    }
}

/// A refused live value: JSON's null arrives as NaN, so NaN is named as either.
fn show(value: f64) -> String {
    if value.is_nan() {
        "NaN/null".into()
    } else {
        describe_non_finite(value)
    }
}

/// Metadata of an accepted window.
#[derive(Debug, Clone, Serialize)]
pub struct WindowInfo {
    pub unit: serde_json::Value,
    pub rows: usize,
    pub padded: usize,
}

/// Validates every window and builds the scaled model input: `windows.len() × window × channels`
/// values in model order. Every refused window is named (up to ten in one message).
pub fn prepare(
    windows: &[LiveWindow],
    params: &SensorParams,
    scaler: &Scaler,
) -> Result<(Vec<f32>, Vec<WindowInfo>), SensorError> {
    if windows.is_empty() {
        return Err(SensorError::Invalid("no windows to score".into()));
    }
    if params.window > MAX_ROWS_KEPT || params.channels.len() > MAX_VALUES_KEPT {
        return Err(SensorError::Invalid(format!(
            "this model's windows ({} rows of {} channels) are larger than a live request \
             carries (at most {MAX_ROWS_KEPT} rows of {MAX_VALUES_KEPT}): score them as a job \
             (POST /v1/jobs with an archive)",
            params.window,
            params.channels.len()
        )));
    }
    let width = params.channels.len();
    let mut input = Vec::with_capacity(windows.len() * params.window_len());
    let mut infos = Vec::with_capacity(windows.len());
    let mut problems = Vec::new();
    let mut scaled = Vec::with_capacity(params.window_len());
    for (index, window) in windows.iter().enumerate() {
        match check(window, params) {
            Err(problem) => problems.push(describe(index, window, &problem)),
            Ok(map) => {
                let flat: Vec<f64> = window.values.kept.iter().map(|r| r.0).collect();
                scaled.clear();
                // Values were checked finite above.
                let _ = scaler.scale_rows(&flat, &map, &mut scaled);
                let padded = single_window(&scaled, params.window, width, &mut input);
                infos.push(WindowInfo {
                    unit: window.unit.clone(),
                    rows: window.values.sent(),
                    padded,
                });
            }
        }
    }
    if !problems.is_empty() {
        let total = problems.len();
        problems.truncate(MAX_REPORTED);
        let mut message = problems.join("; ");
        if total > MAX_REPORTED {
            message.push_str(&format!(" (and {} more windows)", total - MAX_REPORTED));
        }
        return Err(SensorError::Invalid(message));
    }
    Ok((input, infos))
}

/// Everything wrong with one window, or its channel map.
fn check(window: &LiveWindow, params: &SensorParams) -> Result<ChannelMap, String> {
    let map = ChannelMap::new(&params.channels, &window.channels, false).map_err(|problems| {
        format!(
            "{problems} (the model takes {})",
            params.channels.join(", ")
        )
    })?;
    let rows = window.values.sent();
    if rows == 0 || rows > params.window {
        return Err(format!(
            "has {rows} rows; the model takes windows of {} rows, one per cycle, oldest first \
             (fewer are padded by repeating the first row)",
            params.window
        ));
    }
    let width = window.channels.len();
    let mut problems = Vec::new();
    for (row, (sent, _)) in window.values.iter().enumerate() {
        if sent != width {
            problems.push(format!("row {row} has {sent} values for {width} channels"));
        }
    }
    if !problems.is_empty() {
        problems.truncate(MAX_REPORTED);
        return Err(problems.join(", "));
    }
    // Non-finite values, by channel.
    for (column, name) in window.channels.iter().enumerate() {
        let bad: Vec<String> = window
            .values
            .iter()
            .enumerate()
            .filter(|(_, (_, values))| !fits_f32(values[column].0))
            .map(|(row, (_, values))| format!("{} at row {row}", show(values[column].0)))
            .collect();
        if !bad.is_empty() {
            problems.push(format!("channel {name}: {}", bad.join(", ")));
        }
    }
    if !problems.is_empty() {
        return Err(format!("non-finite values: {}", problems.join("; ")));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sensors::params::Padding;

    fn params() -> SensorParams {
        SensorParams {
            window: 3,
            channels: vec!["a".into(), "b".into()],
            scaling: "minmax".into(),
            offset: vec![0.0, 0.0],
            scale: vec![1.0, 10.0],
            rul_cap: 125.0,
            padding: Padding::RepeatFirst,
        }
    }

    fn run(body: &str) -> Result<(Vec<f32>, Vec<WindowInfo>), String> {
        let params = params();
        let windows = parse_windows(body.as_bytes()).map_err(|e| e.to_string())?;
        prepare(&windows, &params, &Scaler::new(&params)).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_one_many_and_wrapped_windows_in_any_channel_order() {
        let (input, infos) =
            run(r#"{"unit": "e1", "channels": ["b", "a"], "values": [[1, 2], [3, 4], [5, 6]]}"#)
                .unwrap();
        assert_eq!(input, vec![2.0, 10.0, 4.0, 30.0, 6.0, 50.0]);
        assert_eq!(infos[0].padded, 0);
        let (input, infos) = run(
            r#"[{"unit": 1, "channels": ["a", "b"], "values": [[1, 2]]}, {"channels": ["a", "b"], "values": [[1, 1], [2, 2]]}]"#,
        )
        .unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].padded, 2);
        assert_eq!(&input[..6], &[1.0, 20.0, 1.0, 20.0, 1.0, 20.0]);
        let (_, infos) =
            run(r#"{"windows": [{"channels": ["a", "b"], "values": [[1, 2]]}]}"#).unwrap();
        assert_eq!(infos.len(), 1);
    }

    #[test]
    fn names_what_is_wrong() {
        let error =
            run(r#"{"unit": "e1", "channels": ["a", "x"], "values": [[1, 2]]}"#).unwrap_err();
        assert!(error.contains("unit \"e1\""), "{error}");
        assert!(error.contains("missing channels: b"), "{error}");
        assert!(error.contains("unknown channels: x"), "{error}");
        let error = run(r#"{"channels": ["a", "b"], "values": [[1, 2], [1, 2], [1, 2], [1, 2]]}"#)
            .unwrap_err();
        assert!(error.contains("has 4 rows"), "{error}");
        let error = run(r#"{"channels": ["a", "b"], "values": [[1, 2], [1]]}"#).unwrap_err();
        assert!(
            error.contains("row 1 has 1 values for 2 channels"),
            "{error}"
        );
        let error =
            run(r#"{"channels": ["a", "b"], "values": [[NaN, 2], [1, "inf"], [null, -Infinity]]}"#)
                .unwrap_err();
        assert!(
            error.contains("channel a: NaN/null at row 0, NaN/null at row 2"),
            "{error}"
        );
        assert!(
            error.contains("channel b: Infinity at row 1, -Infinity at row 2"),
            "{error}"
        );
        // Finite as f64, infinite as the model's f32.
        let error =
            run(r#"{"channels": ["a", "b"], "values": [[1e39, 2], [1, -3.5e38]]}"#).unwrap_err();
        assert!(
            error.contains("channel a: 1e39 (beyond the float32 range) at row 0"),
            "{error}"
        );
        assert!(
            error.contains("channel b: -3.5e38 (beyond the float32 range) at row 1"),
            "{error}"
        );
        let error = run(r#"[{"channels": ["a", "b"], "values": []}]"#).unwrap_err();
        assert!(error.contains("window 0: has 0 rows"), "{error}");
    }

    #[test]
    fn rows_and_values_beyond_what_a_model_takes_are_counted_not_kept() {
        let rows = vec!["[1, 2]"; 100_000].join(", ");
        let body = format!(r#"{{"channels": ["a", "b"], "values": [{rows}]}}"#);
        let windows = parse_windows(body.as_bytes()).unwrap();
        let values = &windows[0].values;
        assert_eq!(
            (values.sent(), values.iter().count()),
            (100_000, MAX_ROWS_KEPT)
        );
        assert_eq!(values.kept.len(), 2 * MAX_ROWS_KEPT);
        let error = prepare(&windows, &params(), &Scaler::new(&params())).unwrap_err();
        assert!(error.to_string().contains("has 100000 rows"), "{error}");
        let wide = vec!["1"; 1_000].join(", ");
        let body = format!(r#"{{"channels": ["a", "b"], "values": [[1, 2], [{wide}]]}}"#);
        let windows = parse_windows(body.as_bytes()).unwrap();
        assert_eq!(windows[0].values.kept.len(), 2 + MAX_VALUES_KEPT);
        let error = prepare(&windows, &params(), &Scaler::new(&params())).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("row 1 has 1000 values for 2 channels"),
            "{error}"
        );
        // A model with longer windows than a request keeps scores archives only.
        let long = SensorParams {
            window: MAX_ROWS_KEPT + 1,
            ..params()
        };
        let error = prepare(&windows, &long, &Scaler::new(&long)).unwrap_err();
        assert!(error.to_string().contains("score them as a job"), "{error}");
    }

    #[test]
    fn syntax_errors_are_told_apart_from_wrong_content() {
        assert!(matches!(
            parse_windows(b"{not json"),
            Err(SensorError::Syntax(_))
        ));
        // What is missing is named.
        let refused = |body: &[u8]| match parse_windows(body) {
            Err(SensorError::Invalid(message)) => message,
            other => panic!("{other:?}"),
        };
        assert!(
            refused(b"{\"channels\": [\"a\"]}")
                .starts_with("the window has \"channels\" but no \"values\"")
        );
        assert!(
            refused(b"{\"values\": [[1]]}")
                .starts_with("the window has \"values\" but no \"channels\"")
        );
        assert!(refused(b"{\"unit\": 1}").starts_with("the body has none of"));
        assert!(refused(b"{\"nope\": 1}").contains("unknown field `nope`"));
        // In a list, the window is named by its index, and the position is said once.
        let listed =
            refused(b"[{\"channels\": [\"a\"], \"values\": [[1]]}, {\"channels\": [\"a\"]}]");
        assert!(
            listed.contains("window 1: missing field `values` at line 1 column"),
            "{listed}"
        );
        assert_eq!(listed.matches(" at line ").count(), 1, "{listed}");
        assert!(refused(b"{\"windows\": [], \"values\": [[1]]}").contains("beside it"));
    }

    #[test]
    fn more_windows_than_a_request_may_hold_are_refused_with_their_count() {
        let list = |count: usize| {
            let window = r#"{"channels": ["a"], "values": [[1]]}"#;
            format!("[{}]", vec![window; count].join(","))
        };
        let at_limit = parse_windows(list(MAX_WINDOWS).as_bytes()).unwrap();
        assert_eq!(at_limit.len(), MAX_WINDOWS);
        for body in [
            list(MAX_WINDOWS + 5),
            format!("{{\"windows\": {}}}", list(MAX_WINDOWS + 5)),
        ] {
            match parse_windows(body.as_bytes()) {
                Err(SensorError::TooMany(message)) => {
                    assert!(message.starts_with("10005 windows"), "{message}")
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
