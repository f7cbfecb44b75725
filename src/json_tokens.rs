//! The numbers JSON lacks, NaN, Infinity and -Infinity, as Python's `json` and NVIDIA Triton
//! write them (bare tokens): read by quoting them into strings before parsing, written as the
//! bare tokens again by [`TritonFormatter`].

use std::io;

use serde::{Serialize, Serializer};

/// The tokens and their values, "-Infinity" before "Infinity" so the longer one matches first.
const TOKENS: [(&str, f64); 3] = [
    ("-Infinity", f64::NEG_INFINITY),
    ("Infinity", f64::INFINITY),
    ("NaN", f64::NAN),
];

/// The value of a token (as read: quoted), or None for any other text.
pub fn token_value(text: &str) -> Option<f64> {
    TOKENS
        .iter()
        .find(|(token, _)| *token == text)
        .map(|(_, value)| *value)
}

/// Rewrites bare `NaN`, `Infinity` and `-Infinity` outside strings as quoted strings (Python's
/// `json.dumps` writes them); None when there is none.
pub fn relax_non_standard_numbers(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut in_string = false;
    let mut escaped = false;
    let mut changed = false;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if in_string {
            out.push(b);
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            out.push(b);
            i += 1;
            continue;
        }
        let token = TOKENS
            .iter()
            .map(|(token, _)| token.as_bytes())
            .find(|t| body[i..].starts_with(t));
        match token {
            Some(token) => {
                out.push(b'"');
                out.extend_from_slice(token);
                out.push(b'"');
                i += token.len();
                changed = true;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    changed.then_some(out)
}

/// A float for JSON output: finite values as serde_json writes them, NaN and ±Infinity as bare
/// tokens (through [`TritonFormatter`]; any other formatter writes them as arrays of bytes).
pub struct JsonFloat<T>(pub T);

impl<T: Serialize + Copy + Into<f64>> Serialize for JsonFloat<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let value: f64 = self.0.into();
        if value.is_finite() {
            self.0.serialize(serializer)
        } else if value.is_nan() {
            serializer.serialize_bytes(b"NaN")
        } else if value > 0.0 {
            serializer.serialize_bytes(b"Infinity")
        } else {
            serializer.serialize_bytes(b"-Infinity")
        }
    }
}

/// serde_json's compact output, except that byte strings are written as they are: only
/// [`JsonFloat`] writes any, for the tokens JSON lacks.
pub struct TritonFormatter;

impl serde_json::ser::Formatter for TritonFormatter {
    fn write_byte_array<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        value: &[u8],
    ) -> io::Result<()> {
        writer.write_all(value)
    }
}

/// `value` as JSON through [`TritonFormatter`].
pub fn to_vec_with_tokens<T: Serialize>(value: &T) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, TritonFormatter);
    value.serialize(&mut serializer)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_tokens_are_quoted_outside_strings_only() {
        let relaxed = relax_non_standard_numbers(br#"{"unit": "NaN x", "v": [NaN, -Infinity]}"#);
        assert_eq!(
            relaxed.unwrap(),
            br#"{"unit": "NaN x", "v": ["NaN", "-Infinity"]}"#
        );
        assert_eq!(relax_non_standard_numbers(br#"{"v": 1.5}"#), None);
    }

    #[test]
    fn floats_are_written_with_the_tokens_and_read_back_by_python_rules() {
        let values = [
            JsonFloat(1.5f32),
            JsonFloat(f32::NAN),
            JsonFloat(f32::INFINITY),
            JsonFloat(f32::NEG_INFINITY),
        ];
        let text = to_vec_with_tokens(&values).unwrap();
        assert_eq!(text, b"[1.5,NaN,Infinity,-Infinity]");
        let read: Vec<serde_json::Value> =
            serde_json::from_slice(&relax_non_standard_numbers(&text).unwrap()).unwrap();
        assert_eq!(read[1], "NaN");
    }
}
