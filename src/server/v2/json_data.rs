//! The `data` of a JSON input, read flat: nested arrays are walked as they are parsed and each
//! element kept as a 24-byte scalar. A `serde_json::Value` tree costs 32 bytes an element, plus
//! the list of references that flattened it, and multiplied a large body about twenty-fold in
//! memory before its element count could be checked against the shape. A parse can also be
//! given a budget of elements ([`with_budget`]), so a body holding far more values than its
//! model takes stops being read at the budget instead of being held whole.

use std::cell::Cell;
use std::fmt;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

use crate::json_tokens::token_value;

/// One element of a tensor's JSON data, as written.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonScalar {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    /// A string: valid only as a NaN / ±Infinity token (quoted, or bare and quoted on reading).
    Text(Box<str>),
    Null,
}

impl JsonScalar {
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            JsonScalar::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            JsonScalar::Int(i) => Some(*i),
            JsonScalar::Uint(u) => i64::try_from(*u).ok(),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            JsonScalar::Int(i) => u64::try_from(*i).ok(),
            JsonScalar::Uint(u) => Some(*u),
            _ => None,
        }
    }

    /// A JSON number as f64, or the value of a NaN / ±Infinity token.
    pub fn as_float(&self) -> Option<f64> {
        match self {
            JsonScalar::Int(i) => Some(*i as f64),
            JsonScalar::Uint(u) => Some(*u as f64),
            JsonScalar::Float(x) => Some(*x),
            JsonScalar::Text(text) => token_value(text),
            JsonScalar::Bool(_) | JsonScalar::Null => None,
        }
    }
}

/// As JSON, for error messages.
impl fmt::Display for JsonScalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonScalar::Bool(b) => write!(f, "{b}"),
            JsonScalar::Int(i) => write!(f, "{i}"),
            JsonScalar::Uint(u) => write!(f, "{u}"),
            JsonScalar::Float(x) => match serde_json::Number::from_f64(*x) {
                Some(number) => write!(f, "{number}"),
                None => write!(f, "{x}"),
            },
            JsonScalar::Text(text) => write!(f, "{}", serde_json::Value::from(&**text)),
            JsonScalar::Null => write!(f, "null"),
        }
    }
}

thread_local! {
    /// Elements the parse running on this thread may still read, and whether it ran out.
    static BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
    static EXCEEDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `parse` (a synchronous deserialisation on this thread) reading at most `limit` data
/// elements in all (None: no limit); the flag says whether a `data` array went past it, which
/// failed the parse.
pub fn with_budget<T>(limit: Option<usize>, parse: impl FnOnce() -> T) -> (T, bool) {
    BUDGET.set(limit);
    EXCEEDED.set(false);
    let parsed = parse();
    BUDGET.set(None);
    (parsed, EXCEEDED.replace(false))
}

/// Every scalar of a `data` value, depth first (a lone scalar is one element).
#[derive(Debug, Default)]
pub struct FlatData(pub Vec<JsonScalar>);

impl<'de> Deserialize<'de> for FlatData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        deserializer.deserialize_any(Flatten(&mut out))?;
        Ok(FlatData(out))
    }
}

/// Appends what it visits to the vector; arrays recurse (serde_json bounds the depth).
struct Flatten<'a>(&'a mut Vec<JsonScalar>);

impl Flatten<'_> {
    fn push<E: Error>(self, element: JsonScalar) -> Result<(), E> {
        if let Some(left) = BUDGET.get() {
            if left == 0 {
                EXCEEDED.set(true);
                return Err(E::custom("more tensor values than the model takes"));
            }
            BUDGET.set(Some(left - 1));
        }
        self.0.push(element);
        Ok(())
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("numbers, booleans or NaN/Infinity tokens, in arrays nested to the shape")
    }

    fn visit_bool<E: Error>(self, v: bool) -> Result<(), E> {
        self.push(JsonScalar::Bool(v))
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<(), E> {
        self.push(JsonScalar::Int(v))
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<(), E> {
        self.push(JsonScalar::Uint(v))
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<(), E> {
        self.push(JsonScalar::Float(v))
    }

    fn visit_str<E: Error>(self, v: &str) -> Result<(), E> {
        self.push(JsonScalar::Text(v.into()))
    }

    fn visit_unit<E: Error>(self) -> Result<(), E> {
        self.push(JsonScalar::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<Vec<JsonScalar>, serde_json::Error> {
        serde_json::from_str::<FlatData>(json).map(|d| d.0)
    }

    #[test]
    fn nested_arrays_are_read_flat_in_order() {
        use JsonScalar::*;
        assert_eq!(
            read(r#"[[1, -2], [3.5, true], ["NaN", null], 18446744073709551615]"#).unwrap(),
            [
                Uint(1),
                Int(-2),
                Float(3.5),
                Bool(true),
                Text("NaN".into()),
                Null,
                Uint(u64::MAX)
            ]
        );
        assert_eq!(read("7").unwrap(), [Uint(7)]);
        assert_eq!(read("[[], []]").unwrap(), []);
    }

    #[test]
    fn conversions_follow_json_numbers() {
        let [int, big, float, nan, word] = [
            JsonScalar::Int(-3),
            JsonScalar::Uint(u64::MAX),
            JsonScalar::Float(1.0),
            JsonScalar::Text("NaN".into()),
            JsonScalar::Text("abc".into()),
        ];
        assert_eq!(
            (int.as_i64(), int.as_u64(), int.as_float()),
            (Some(-3), None, Some(-3.0))
        );
        assert_eq!((big.as_i64(), big.as_u64()), (None, Some(u64::MAX)));
        // 1.0 is a float: not an integer, as the JSON says.
        assert_eq!((float.as_i64(), float.as_float()), (None, Some(1.0)));
        assert!(nan.as_float().unwrap().is_nan());
        assert_eq!(word.as_float(), None);
        assert_eq!(word.to_string(), "\"abc\"");
        assert_eq!(JsonScalar::Float(0.1).to_string(), "0.1");
    }

    #[test]
    fn decimals_read_as_the_nearest_f64() {
        // serde_json's default parser is off by an ulp for about a tenth of such numbers.
        let texts = [
            "-0.18889719608460778",
            "0.1",
            "2.2250738585072014e-308",
            "1.7976931348623157e308",
        ];
        for text in texts {
            let expected: f64 = text.parse().unwrap();
            assert_eq!(
                read(&format!("[{text}]")).unwrap(),
                [JsonScalar::Float(expected)],
                "{text}"
            );
        }
    }

    #[test]
    fn objects_are_not_tensor_data() {
        let error = read(r#"[1, {"a": 2}]"#).unwrap_err().to_string();
        assert!(error.contains("NaN/Infinity tokens"), "{error}");
    }

    #[test]
    fn a_budget_stops_the_parse_and_is_not_left_behind() {
        let (parsed, exceeded) = with_budget(Some(3), || read("[[1, 2], [3, 4]]"));
        assert!(parsed.is_err() && exceeded);
        let (parsed, exceeded) = with_budget(Some(4), || read("[[1, 2], [3, 4]]"));
        assert_eq!(parsed.unwrap().len(), 4);
        assert!(!exceeded);
        // Outside a budgeted parse nothing is counted.
        assert_eq!(read("[1, 2, 3, 4, 5]").unwrap().len(), 5);
    }

    #[test]
    fn an_element_takes_24_bytes() {
        assert_eq!(std::mem::size_of::<JsonScalar>(), 24);
    }
}
