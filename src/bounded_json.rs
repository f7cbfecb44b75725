//! Deserializers for the small fields of request bodies that a client could otherwise blow up:
//! parsed into a `Vec` or a `serde_json::Value`, a JSON array of 2-byte numbers takes 4 to 16
//! times its size in memory, so a 64 MB body could hold a gigabyte. Each refuses while reading,
//! before anything past its bound is allocated.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A list of at most `N` items.
pub fn at_most<'de, D, T, const N: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct AtMost<T, const N: usize>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for AtMost<T, N> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {N} items")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N));
            while let Some(item) = seq.next_element()? {
                if items.len() == N {
                    return Err(de::Error::custom(format!(
                        "a list of more than {N} items (at most {N})"
                    )));
                }
                items.push(item);
            }
            Ok(items)
        }
    }
    deserializer.deserialize_seq(AtMost::<T, N>(PhantomData))
}

/// An object of at most `N` entries whose values are booleans, numbers, strings or null (the
/// parameters of the Open Inference Protocol).
pub fn scalar_map<'de, D, const N: usize>(deserializer: D) -> Result<Map<String, Value>, D::Error>
where
    D: Deserializer<'de>,
{
    struct ScalarMap<const N: usize>;
    impl<'de, const N: usize> Visitor<'de> for ScalarMap<N> {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an object of at most {N} entries")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if entries.len() == N {
                    return Err(de::Error::custom(format!(
                        "an object of more than {N} entries (at most {N})"
                    )));
                }
                let Scalar(value) = map.next_value()?;
                entries.insert(key, value);
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_map(ScalarMap::<N>)
}

/// A string of at most `N` bytes, a number, or null; as a `Value` to be echoed back.
pub fn short_scalar<'de, D, const N: usize>(deserializer: D) -> Result<Value, D::Error>
where
    D: Deserializer<'de>,
{
    let Scalar(value) = Scalar::deserialize(deserializer)?;
    match &value {
        Value::String(text) if text.len() > N => Err(de::Error::custom(format!(
            "a string of {} bytes (at most {N})",
            text.len()
        ))),
        Value::Bool(_) => Err(de::Error::custom(
            "a boolean (a string or a number is needed)",
        )),
        _ => Ok(value),
    }
}

/// A JSON boolean, number, string or null; an array or object is refused at its first byte.
struct Scalar(Value);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a boolean, number or string")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(Value::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(Value::Number(v.into())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(Value::Number(v.into())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Number::from_f64(v)
                    .map(|n| Scalar(Value::Number(n)))
                    .ok_or_else(|| E::custom(format!("{v} is not a JSON number")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(Value::String(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(Value::String(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(Value::Null))
            }
            fn visit_none<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(Value::Null))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Scalar, D::Error> {
                Scalar::deserialize(d)
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    struct Body {
        #[serde(default, deserialize_with = "at_most::<_, _, 3>")]
        list: Vec<u32>,
        #[serde(default, deserialize_with = "scalar_map::<_, 2>")]
        parameters: Map<String, Value>,
        #[serde(default, deserialize_with = "short_scalar::<_, 4>")]
        unit: Value,
    }

    fn parse(json: &str) -> Result<Body, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn values_within_the_bounds_are_read_as_sent() {
        let body =
            parse(r#"{"list":[1,2,3],"parameters":{"a":true,"b":"x"},"unit":"u-12"}"#).unwrap();
        assert_eq!(body.list, [1, 2, 3]);
        assert_eq!(body.parameters["a"], Value::Bool(true));
        assert_eq!(body.unit, Value::String("u-12".into()));
        let body = parse(r#"{"parameters":{"t":1500,"f":0.5},"unit":7}"#).unwrap();
        assert_eq!(body.parameters["t"], 1500);
        assert_eq!(body.parameters["f"], 0.5);
        assert_eq!(body.unit, 7);
        let body = parse(r#"{"parameters":{"n":null}}"#).unwrap();
        assert_eq!(body.parameters["n"], Value::Null);
        assert_eq!(parse("{}").unwrap().unit, Value::Null);
    }

    #[test]
    fn what_passes_a_bound_is_refused_naming_it() {
        for (json, says) in [
            (r#"{"list":[1,2,3,4]}"#, "more than 3 items (at most 3)"),
            (
                r#"{"parameters":{"a":1,"b":2,"c":3}}"#,
                "more than 2 entries (at most 2)",
            ),
            (
                r#"{"parameters":{"a":[1,2]}}"#,
                "expected a boolean, number or string",
            ),
            (
                r#"{"parameters":{"a":{"b":1}}}"#,
                "expected a boolean, number or string",
            ),
            (r#"{"unit":"abcde"}"#, "a string of 5 bytes (at most 4)"),
            (
                r#"{"unit":[0,0,0]}"#,
                "expected a boolean, number or string",
            ),
            (
                r#"{"unit":true}"#,
                "a boolean (a string or a number is needed)",
            ),
        ] {
            let error = parse(json).unwrap_err();
            assert!(error.contains(says), "{json}: {error}");
        }
    }
}
