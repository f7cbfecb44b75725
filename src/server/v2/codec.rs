//! Decoding and encoding of Open Inference Protocol (KServe v2) infer bodies, including Triton's
//! binary tensor data extension: a JSON header of `Inference-Header-Content-Length` bytes followed
//! by the raw tensors of every input that declares `binary_data_size`.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::json_data::{FlatData, JsonScalar, with_budget};
use crate::bounded_json::at_most;
use crate::json_tokens::{JsonFloat, relax_non_standard_numbers, to_vec_with_tokens};
use crate::runtime::model_config::{ModelConfig, TensorSpec};
use crate::server::error::ApiError;
use crate::tensor::{DataType, Tensor};

pub const HEADER_LENGTH: &str = "Inference-Header-Content-Length";

/// Most inputs or outputs a request may name, parameters per object, and dimensions per shape:
/// far beyond any model's, and bounded so that a body cannot make them take gigabytes.
const MAX_TENSORS: usize = 256;
const MAX_PARAMETERS: usize = 64;
const MAX_DIMENSIONS: usize = 32;

#[derive(Debug, Deserialize)]
struct InferRequestJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, deserialize_with = "parameters")]
    parameters: Map<String, Value>,
    #[serde(deserialize_with = "at_most::<_, _, MAX_TENSORS>")]
    inputs: Vec<InputJson>,
    #[serde(default, deserialize_with = "at_most::<_, _, MAX_TENSORS>")]
    outputs: Vec<OutputJson>,
}

#[derive(Debug, Deserialize)]
struct InputJson {
    name: String,
    #[serde(deserialize_with = "at_most::<_, _, MAX_DIMENSIONS>")]
    shape: Vec<i64>,
    datatype: String,
    #[serde(default, deserialize_with = "parameters")]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<FlatData>,
}

#[derive(Debug, Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default, deserialize_with = "parameters")]
    parameters: Map<String, Value>,
}

fn parameters<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Map<String, Value>, D::Error> {
    crate::bounded_json::scalar_map::<_, MAX_PARAMETERS>(deserializer)
}

/// A validated request: inputs in config order, ready for the batcher.
#[derive(Debug)]
pub struct DecodedRequest {
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    pub rows: usize,
    /// Indexes into the config's outputs, each with whether it goes back as binary.
    pub outputs: Vec<(usize, bool)>,
    pub timeout: Option<Duration>,
}

pub fn decode(
    body: Bytes,
    header_length: Option<usize>,
    config: &ModelConfig,
) -> Result<DecodedRequest, ApiError> {
    let (json, mut binary) = match header_length {
        Some(n) if n > body.len() => {
            return Err(ApiError::BadRequest(format!(
                "{HEADER_LENGTH} is {n} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body, Bytes::new()),
    };
    // Bare NaN and ±Infinity (tritonclient and Python's json write them) are quoted and parsed
    // again; an error found then is reported from the rewritten body.
    let budget = value_budget(config);
    let parse = |body: &[u8]| with_budget(budget, || serde_json::from_slice(body));
    let (parsed, exceeded) = match parse(&json) {
        (Err(error), false) if error.is_syntax() => match relax_non_standard_numbers(&json) {
            Some(relaxed) => parse(&relaxed),
            None => (Err(error), false),
        },
        first => first,
    };
    if exceeded {
        return Err(ApiError::PayloadTooLarge(format!(
            "the request's \"data\" holds more than {} values, twice what model {} takes in \
             one request; send fewer rows per request",
            budget.unwrap_or_default(),
            config.name
        )));
    }
    let request: InferRequestJson = parsed.map_err(|e| {
        let e = crate::json_error::describe(&e);
        ApiError::BadRequest(format!("malformed inference request JSON: {e}"))
    })?;

    let mut slots: Vec<Option<Tensor>> = vec![None; config.inputs.len()];
    for input in request.inputs {
        let index = config
            .inputs
            .iter()
            .position(|s| s.name == input.name)
            .ok_or_else(|| {
                ApiError::Unprocessable(format!(
                    "unknown input \"{}\"; model {} takes: {}",
                    input.name,
                    config.name,
                    names(&config.inputs)
                ))
            })?;
        if slots[index].is_some() {
            return Err(ApiError::Unprocessable(format!(
                "input \"{}\" is given twice",
                input.name
            )));
        }
        slots[index] = Some(decode_input(
            input,
            &config.inputs[index],
            config,
            &mut binary,
        )?);
    }
    if !binary.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{} bytes of binary data follow the JSON header but no input claims them \
             (set parameters.binary_data_size on the inputs)",
            binary.len()
        )));
    }
    let missing: Vec<&str> = config
        .inputs
        .iter()
        .zip(&slots)
        .filter(|(_, slot)| slot.is_none())
        .map(|(spec, _)| spec.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "missing input(s): {}",
            missing.join(", ")
        )));
    }
    let inputs: Vec<Tensor> = slots.into_iter().map(Option::unwrap).collect();
    let rows = if config.batching() {
        inputs[0].rows()
    } else {
        1
    };
    if let Some(other) = inputs
        .iter()
        .find(|t| config.batching() && t.rows() != rows)
    {
        return Err(ApiError::Unprocessable(format!(
            "inputs disagree on the batch size: {rows} and {}",
            other.rows()
        )));
    }

    let binary_default = flag(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let outputs = if request.outputs.is_empty() {
        (0..config.outputs.len())
            .map(|i| (i, binary_default))
            .collect()
    } else {
        request
            .outputs
            .iter()
            .map(|wanted| {
                let index = config
                    .outputs
                    .iter()
                    .position(|s| s.name == wanted.name)
                    .ok_or_else(|| {
                        ApiError::Unprocessable(format!(
                            "unknown output \"{}\"; model {} returns: {}",
                            wanted.name,
                            config.name,
                            names(&config.outputs)
                        ))
                    })?;
                if wanted.parameters.contains_key("classification") {
                    return Err(ApiError::Unprocessable(format!(
                        "output \"{}\" asks for classification (top-k labels), which linescan \
                         does not offer: ask for the output itself and take the top classes from \
                         its values (labels: GET /v2/models/{}/config)",
                        wanted.name, config.name
                    )));
                }
                let binary = flag(&wanted.parameters, "binary_data")?.unwrap_or(binary_default);
                Ok((index, binary))
            })
            .collect::<Result<Vec<_>, ApiError>>()?
    };
    let mut asked: Vec<usize> = outputs.iter().map(|(index, _)| *index).collect();
    asked.sort_unstable();
    if let Some(twice) = asked.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(ApiError::Unprocessable(format!(
            "output \"{}\" is requested twice",
            config.outputs[twice[0]].name
        )));
    }
    let timeout = match request.parameters.get("timeout") {
        None => None,
        Some(v) => match v.as_u64() {
            // As in Triton: 0 is no timeout of the request's own (the model's default).
            Some(0) => None,
            Some(micros) => Some(Duration::from_micros(micros)),
            None => {
                return Err(ApiError::Unprocessable(format!(
                    "parameters.timeout must be a whole number of microseconds, got {v}"
                )));
            }
        },
    };
    Ok(DecodedRequest {
        id: request.id,
        inputs,
        rows,
        outputs,
        timeout,
    })
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("{} {} {:?}", s.name, s.datatype, s.shape))
        .collect::<Vec<_>>()
        .join(", ")
}

fn flag(parameters: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match parameters.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::Unprocessable(format!(
            "parameter {key} must be true or false, got {other}"
        ))),
    }
}

fn decode_input(
    input: InputJson,
    spec: &TensorSpec,
    config: &ModelConfig,
    binary: &mut Bytes,
) -> Result<Tensor, ApiError> {
    let name = &input.name;
    let dtype = DataType::parse(&input.datatype).ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "input \"{name}\": datatype \"{}\" is not supported (supported: {})",
            input.datatype,
            DataType::supported_names()
        ))
    })?;
    if dtype != spec.datatype {
        return Err(ApiError::Unprocessable(format!(
            "input \"{name}\": datatype {dtype} given, model {} expects {}",
            config.name, spec.datatype
        )));
    }
    let shape = check_shape(name, &input.shape, spec, config)?;
    let byte_len = shape
        .iter()
        .try_fold(dtype.size(), |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| ApiError::Unprocessable(format!("input \"{name}\": shape is too large")))?;
    let binary_size = match input.parameters.get("binary_data_size") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ApiError::Unprocessable(format!(
                "input \"{name}\": binary_data_size must be a byte count, got {v}"
            ))
        })? as usize),
    };
    let data = match (binary_size, input.data) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(format!(
                "input \"{name}\" has both \"data\" and binary_data_size"
            )));
        }
        (None, None) => {
            return Err(ApiError::Unprocessable(format!(
                "input \"{name}\" has no data (give \"data\" or binary_data_size)"
            )));
        }
        (Some(size), None) => {
            if size != byte_len {
                return Err(ApiError::Unprocessable(format!(
                    "input \"{name}\": binary_data_size is {size} bytes, shape {:?} of {dtype} needs {byte_len}",
                    input.shape
                )));
            }
            if size > binary.len() {
                return Err(ApiError::BadRequest(format!(
                    "input \"{name}\": binary_data_size is {size} bytes but only {} remain in the body",
                    binary.len()
                )));
            }
            let data = binary.split_to(size);
            // One byte per BOOL, 0 or 1, as the JSON form allows only false and true.
            if dtype == DataType::Bool
                && let Some(at) = data.iter().position(|b| *b > 1)
            {
                return Err(ApiError::Unprocessable(format!(
                    "input \"{name}\": BOOL element {at} is byte {}, not 0 or 1",
                    data[at]
                )));
            }
            data
        }
        (None, Some(FlatData(elements))) => Bytes::from(json_to_bytes(
            &elements,
            dtype,
            byte_len / dtype.size(),
            name,
        )?),
    };
    Ok(Tensor { dtype, shape, data })
}

/// Twice the values a legal request to the model holds (each input once, at the largest
/// batch), or None when an input has a variable dimension. The slack leaves a request just
/// over the limits to the shape checks, whose messages say which limit.
fn value_budget(config: &ModelConfig) -> Option<usize> {
    let rows = if config.batching() {
        config.max_batch_size
    } else {
        1
    };
    config
        .inputs
        .iter()
        .try_fold(0usize, |sum, spec| {
            let row = spec.shape.iter().try_fold(1usize, |product, d| {
                product.checked_mul(usize::try_from(*d).ok()?)
            })?;
            sum.checked_add(row.checked_mul(rows)?)
        })?
        .checked_mul(2)
}

fn check_shape(
    name: &str,
    given: &[i64],
    spec: &TensorSpec,
    config: &ModelConfig,
) -> Result<Vec<usize>, ApiError> {
    let expected = spec.full_shape(config.batching());
    let mismatch = || {
        ApiError::Unprocessable(format!(
            "input \"{name}\": shape {given:?} does not match the model's {expected:?}{}",
            if config.batching() {
                format!(
                    " (first dimension is the batch, 1..={})",
                    config.max_batch_size
                )
            } else {
                String::new()
            }
        ))
    };
    if let Some(index) = given.iter().position(|d| *d < 1) {
        return Err(ApiError::Unprocessable(format!(
            "input \"{name}\": shape {given:?} has dimension {} at index {index}; a request's \
             dimensions are sizes of at least 1 (-1 is only for the model's metadata)",
            given[index]
        )));
    }
    if given.len() != expected.len() {
        return Err(mismatch());
    }
    if !given.iter().zip(&expected).all(|(g, e)| *e == -1 || g == e) {
        return Err(mismatch());
    }
    if config.batching() && given[0] as usize > config.max_batch_size {
        return Err(ApiError::Unprocessable(format!(
            "input \"{name}\": batch size {} exceeds max_batch_size {} of model {}",
            given[0], config.max_batch_size, config.name
        )));
    }
    Ok(given.iter().map(|d| *d as usize).collect())
}

fn json_to_bytes(
    elements: &[JsonScalar],
    dtype: DataType,
    count: usize,
    name: &str,
) -> Result<Vec<u8>, ApiError> {
    if elements.len() != count {
        return Err(ApiError::Unprocessable(format!(
            "input \"{name}\": {} values given, its shape holds {count}",
            elements.len()
        )));
    }
    let mut out = Vec::with_capacity(count * dtype.size());
    let bad = |v: &JsonScalar| {
        ApiError::Unprocessable(format!(
            "input \"{name}\": {v} is not a valid {dtype} value"
        ))
    };
    macro_rules! integers {
        ($t:ty) => {
            for v in elements {
                let x = v
                    .as_i64()
                    .and_then(|i| <$t>::try_from(i).ok())
                    .or_else(|| v.as_u64().and_then(|u| <$t>::try_from(u).ok()))
                    .ok_or_else(|| bad(v))?;
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    // Rounded to the nearest value of the type; a finite number that became infinite lay beyond
    // the type's range. An integer is rounded from its exact value: through f64, one above
    // 2^53 would be rounded twice.
    macro_rules! narrow_floats {
        ($from_float:expr, $from_integer:expr, $range:literal) => {
            for v in elements {
                let integer = v.as_i64().map(i128::from).or(v.as_u64().map(i128::from));
                let (x, finite) = match integer {
                    Some(i) => (($from_integer)(i), true),
                    None => {
                        let wide = v.as_float().ok_or_else(|| bad(v))?;
                        (($from_float)(wide), wide.is_finite())
                    }
                };
                if x.is_infinite() && finite {
                    return Err(ApiError::Unprocessable(format!(
                        "input \"{name}\": {v} is beyond the {dtype} range ({})",
                        $range
                    )));
                }
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match dtype {
        DataType::Bool => {
            for v in elements {
                out.push(v.as_bool().ok_or_else(|| bad(v))? as u8);
            }
        }
        DataType::Uint8 => integers!(u8),
        DataType::Uint16 => integers!(u16),
        DataType::Uint32 => integers!(u32),
        DataType::Uint64 => integers!(u64),
        DataType::Int8 => integers!(i8),
        DataType::Int16 => integers!(i16),
        DataType::Int32 => integers!(i32),
        DataType::Int64 => integers!(i64),
        DataType::Fp16 => narrow_floats!(
            |x| half::f16::from_f32(round_to_odd(x)),
            |i| half::f16::from_f32(integer_to_odd_f32(i)),
            "±65504"
        ),
        DataType::Bf16 => narrow_floats!(
            |x| half::bf16::from_f32(round_to_odd(x)),
            |i| half::bf16::from_f32(integer_to_odd_f32(i)),
            "±3.39e38"
        ),
        DataType::Fp32 => narrow_floats!(|x| x as f32, |i| i as f32, "±3.4e38"),
        DataType::Fp64 => {
            for v in elements {
                out.extend_from_slice(&v.as_float().ok_or_else(|| bad(v))?.to_le_bytes());
            }
        }
    }
    Ok(out)
}

/// `x` as an FP32 rounded to odd: toward zero, with the last bit set when inexact. Rounding
/// that again to nearest-even at 16 bits gives the correctly rounded result, which rounding
/// twice to nearest (what `half`'s f64 conversions do) misses near ties.
fn round_to_odd(x: f64) -> f32 {
    let nearest = x as f32;
    if !nearest.is_finite() {
        return nearest;
    }
    let back = f64::from(nearest);
    odd_from_nearest(nearest, back == x, back.abs() > x.abs())
}

/// The integer `i` (at most 64 bits) as an FP32 rounded to odd, like [`round_to_odd`].
fn integer_to_odd_f32(i: i128) -> f32 {
    let nearest = i as f32;
    // Exact: every f32 of a 64-bit integer's size is an integer that fits in i128.
    let back = nearest as i128;
    odd_from_nearest(nearest, back == i, back.abs() > i.abs())
}

/// Rounding to odd from the nearest FP32 of a value: kept when exact, else one step toward
/// zero when it rounded away from it, with the last bit set.
fn odd_from_nearest(nearest: f32, exact: bool, rounded_away: bool) -> f32 {
    if exact {
        return nearest;
    }
    let mut bits = nearest.to_bits();
    if rounded_away {
        bits -= 1; // one step toward zero, in either sign
    }
    f32::from_bits(bits | 1)
}

/// Serialises a tensor's payload as a flat JSON array without an intermediate `Value`.
struct JsonData<'a>(&'a Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let tensor = self.0;
        let size = tensor.dtype.size();
        let mut seq = serializer.serialize_seq(Some(tensor.data.len() / size))?;
        // Each element as read, or through `$write` (floats: NaN and ±Infinity as tokens,
        // 16-bit floats as the FP32 numbers they are exactly).
        macro_rules! each {
            ($t:ty, $n:literal $(, $write:expr)?) => {
                for chunk in tensor.data.chunks_exact($n) {
                    let x = <$t>::from_le_bytes(chunk.try_into().unwrap());
                    $(let x = ($write)(x);)?
                    seq.serialize_element(&x)?;
                }
            };
        }
        match tensor.dtype {
            DataType::Bool => {
                for b in tensor.data.iter() {
                    seq.serialize_element(&(*b != 0))?;
                }
            }
            DataType::Uint8 => each!(u8, 1),
            DataType::Uint16 => each!(u16, 2),
            DataType::Uint32 => each!(u32, 4),
            DataType::Uint64 => each!(u64, 8),
            DataType::Int8 => each!(i8, 1),
            DataType::Int16 => each!(i16, 2),
            DataType::Int32 => each!(i32, 4),
            DataType::Int64 => each!(i64, 8),
            DataType::Fp16 => each!(half::f16, 2, |x: half::f16| JsonFloat(x.to_f32())),
            DataType::Bf16 => each!(half::bf16, 2, |x: half::bf16| JsonFloat(x.to_f32())),
            DataType::Fp32 => each!(f32, 4, JsonFloat),
            DataType::Fp64 => each!(f64, 8, JsonFloat),
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct OutputJsonOut<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct InferResponseJson<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputJsonOut<'a>>,
}

/// An encoded response body, with the JSON header length when binary outputs follow it.
pub struct EncodedResponse {
    pub body: Bytes,
    pub header_length: Option<usize>,
}

/// `outputs` pairs each returned tensor with its spec and whether it goes back as binary.
pub fn encode(
    model: &str,
    version: u64,
    id: Option<&str>,
    outputs: &[(&TensorSpec, &Tensor, bool)],
) -> EncodedResponse {
    let json = InferResponseJson {
        model_name: model,
        model_version: version.to_string(),
        id,
        outputs: outputs
            .iter()
            .map(|(spec, tensor, binary)| OutputJsonOut {
                name: &spec.name,
                datatype: tensor.dtype.name(),
                shape: &tensor.shape,
                parameters: binary
                    .then(|| serde_json::json!({ "binary_data_size": tensor.data.len() })),
                data: (!binary).then_some(JsonData(tensor)),
            })
            .collect(),
    };
    let header = to_vec_with_tokens(&json).expect("response JSON serialises");
    let binary_len: usize = outputs
        .iter()
        .filter(|(_, _, binary)| *binary)
        .map(|(_, t, _)| t.data.len())
        .sum();
    if binary_len == 0 && outputs.iter().all(|(_, _, binary)| !binary) {
        return EncodedResponse {
            body: Bytes::from(header),
            header_length: None,
        };
    }
    let mut body = BytesMut::with_capacity(header.len() + binary_len);
    body.put_slice(&header);
    for (_, tensor, _) in outputs.iter().filter(|(_, _, binary)| *binary) {
        body.put_slice(&tensor.data);
    }
    EncodedResponse {
        body: body.freeze(),
        header_length: Some(header.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        toml::from_str(
            r#"
            name = "m"
            max_batch_size = 4
            [[input]]
            name = "x"
            datatype = "FP32"
            shape = [2]
            [[input]]
            name = "k"
            datatype = "INT8"
            shape = [-1]
            [[output]]
            name = "y"
            datatype = "FP32"
            shape = [2]
            "#,
        )
        .unwrap()
    }

    fn json(body: &str) -> Result<DecodedRequest, ApiError> {
        decode(Bytes::from(body.to_string()), None, &config())
    }

    #[test]
    fn decodes_json_inputs_in_config_order() {
        let decoded = json(
            r#"{"id":"7","inputs":[
                {"name":"k","shape":[2,3],"datatype":"INT8","data":[[1,2,3],[-4,5,6]]},
                {"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,3,4]}],
               "parameters":{"timeout":1500}}"#,
        )
        .unwrap();
        assert_eq!(decoded.rows, 2);
        assert_eq!(
            decoded.inputs[0].to_f32_vec().unwrap(),
            vec![1.0, 2.5, 3.0, 4.0]
        );
        assert_eq!(&decoded.inputs[1].data[..], &[1, 2, 3, 252, 5, 6]);
        assert_eq!(decoded.outputs, vec![(0, false)]);
        assert_eq!(decoded.timeout, Some(Duration::from_micros(1500)));
    }

    #[test]
    fn sixteen_bit_floats_are_rounded_once_to_nearest() {
        let tiny = 2f64.powi(-40);
        // Just above the tie between two BF16 neighbours of 1: up, not down to the even one.
        assert_eq!(
            half::bf16::from_f32(round_to_odd(1.00390625 + tiny)).to_f64(),
            1.0078125
        );
        assert_eq!(half::bf16::from_f64(1.00390625 + tiny).to_f64(), 1.0);
        // The same for FP16 (its neighbours of 1 are 2^-10 apart), both signs.
        let above_tie = 1.0 + 2f64.powi(-11) + tiny;
        assert_eq!(
            half::f16::from_f32(round_to_odd(above_tie)).to_f64(),
            1.0 + 2f64.powi(-10)
        );
        assert_eq!(
            half::f16::from_f32(round_to_odd(-above_tie)).to_f64(),
            -1.0 - 2f64.powi(-10)
        );
        // Exact ties still go to even, exact values stay, and overflow stays overflow.
        assert_eq!(
            half::f16::from_f32(round_to_odd(1.0 + 2f64.powi(-11))).to_f64(),
            1.0
        );
        assert_eq!(round_to_odd(0.5), 0.5);
        assert!(round_to_odd(1e39).is_infinite());
    }

    #[test]
    fn large_integers_are_rounded_once_from_their_exact_value() {
        // 2^62 + 2^38 + 1 is just above the tie between two FP32 neighbours; through f64 it
        // became the tie itself and went down to the even one.
        let decoded = json(
            r#"{"inputs":[
                {"name":"x","shape":[1,2],"datatype":"FP32","data":[4611686293305294849,-4611686293305294849]},
                {"name":"k","shape":[1,1],"datatype":"INT8","data":[1]}]}"#,
        )
        .unwrap();
        let up = (2f64.powi(62) + 2f64.powi(39)) as f32;
        assert_eq!(decoded.inputs[0].to_f32_vec().unwrap(), vec![up, -up]);
        // The same for BF16 (neighbours 2^55 apart there), both signs; exact values stay.
        let bf16 = |i: i128| half::bf16::from_f32(integer_to_odd_f32(i)).to_f64();
        let above_tie = (1i128 << 62) + (1 << 54) + 1;
        assert_eq!(bf16(above_tie), 2f64.powi(62) + 2f64.powi(55));
        assert_eq!(bf16(-above_tie), -(2f64.powi(62) + 2f64.powi(55)));
        assert_eq!(bf16((1i128 << 62) + (1 << 54)), 2f64.powi(62));
        // Inexact: toward zero, with the last bit set (2^64 - 2^40, whose last bit is 1).
        assert_eq!(
            integer_to_odd_f32(u64::MAX.into()),
            f32::from_bits(2f32.powi(64).to_bits() - 1)
        );
        assert_eq!(integer_to_odd_f32(-3), -3.0);
    }

    #[test]
    fn nan_and_infinity_are_read_and_written_as_triton_does() {
        let decoded = json(
            r#"{"inputs":[
                {"name":"k","shape":[1,3],"datatype":"INT8","data":[1,2,3]},
                {"name":"x","shape":[1,2],"datatype":"FP32","data":[NaN,-Infinity]}]}"#,
        )
        .unwrap();
        let x = decoded.inputs[0].to_f32_vec().unwrap();
        assert!(x[0].is_nan());
        assert_eq!(x[1], f32::NEG_INFINITY);
        // Not in integers, nor as a finite number's overflow.
        let error = json(
            r#"{"inputs":[
                {"name":"k","shape":[1,3],"datatype":"INT8","data":[1,NaN,3]},
                {"name":"x","shape":[1,2],"datatype":"FP32","data":[1,1e39]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("\"NaN\" is not a valid INT8"), "{error}");
        let spec = &config().outputs[0];
        let tensor = Tensor::from_f32(vec![1, 3], &[f32::NAN, f32::INFINITY, 0.5]);
        let text = encode("m", 1, None, &[(spec, &tensor, false)]);
        let body = std::str::from_utf8(&text.body).unwrap();
        assert!(body.contains(r#""data":[NaN,Infinity,0.5]"#), "{body}");
    }

    #[test]
    fn decodes_binary_inputs_after_the_header() {
        let header = r#"{"inputs":[
            {"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}},
            {"name":"k","shape":[1,1],"datatype":"INT8","parameters":{"binary_data_size":1}}],
            "outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(bytemuck::cast_slice(&[0.5f32, -1.0]));
        body.push(9);
        let decoded = decode(Bytes::from(body), Some(header.len()), &config()).unwrap();
        assert_eq!(decoded.inputs[0].to_f32_vec().unwrap(), vec![0.5, -1.0]);
        assert_eq!(&decoded.inputs[1].data[..], &[9]);
        assert_eq!(decoded.outputs, vec![(0, true)]);
    }

    #[test]
    fn binary_bools_are_0_or_1() {
        let config: ModelConfig = toml::from_str(
            r#"
            name = "b"
            max_batch_size = 4
            [[input]]
            name = "flags"
            datatype = "BOOL"
            shape = [3]
            [[output]]
            name = "y"
            datatype = "FP32"
            shape = [1]
            "#,
        )
        .unwrap();
        let header = r#"{"inputs":[{"name":"flags","shape":[1,3],"datatype":"BOOL",
            "parameters":{"binary_data_size":3}}]}"#;
        let request = |flags: [u8; 3]| {
            let mut body = header.as_bytes().to_vec();
            body.extend_from_slice(&flags);
            decode(Bytes::from(body), Some(header.len()), &config)
        };
        assert!(request([0, 1, 1]).is_ok());
        let error = request([0, 2, 1]).err().unwrap().to_string();
        assert!(
            error.contains("BOOL element 1 is byte 2, not 0 or 1"),
            "{error}"
        );
    }

    #[test]
    fn rejections_name_the_problem() {
        let cases = [
            (r#"{"inputs": ["#, "malformed"),
            (
                r#"{"inputs":[{"name":"z","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#,
                "unknown input \"z\"",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"BYTES","data":[1,2]}]}"#,
                "not supported",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"INT32","data":[1,2]}]}"#,
                "expects FP32",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}"#,
                "does not match",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[9,2],"datatype":"FP32","data":[]}]}"#,
                "exceeds max_batch_size",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1]}]}"#,
                "1 values given",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,"a"]}]}"#,
                "not a valid FP32",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#,
                "missing input(s): k",
            ),
            (
                r#"{"inputs":[{"name":"k","shape":[1,1],"datatype":"INT8","data":[300]}]}"#,
                "not a valid INT8",
            ),
        ];
        for (body, expected) in cases {
            let error = json(body).unwrap_err().to_string();
            assert!(error.contains(expected), "{body}: {error}");
        }
        let error = decode(Bytes::from_static(b"{}"), Some(10), &config()).unwrap_err();
        assert!(matches!(error, ApiError::BadRequest(_)));
    }

    #[test]
    fn encodes_json_and_binary_outputs() {
        let spec = &config().outputs[0];
        let tensor = Tensor::from_f32(vec![1, 2], &[1.5, -2.0]);
        let text = encode("m", 1, Some("a"), &[(spec, &tensor, false)]);
        assert_eq!(text.header_length, None);
        let value: Value = serde_json::from_slice(&text.body).unwrap();
        assert_eq!(value["outputs"][0]["data"], serde_json::json!([1.5, -2.0]));
        assert_eq!(value["model_version"], "1");

        let binary = encode("m", 1, None, &[(spec, &tensor, true)]);
        let n = binary.header_length.unwrap();
        let header: Value = serde_json::from_slice(&binary.body[..n]).unwrap();
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(
            &binary.body[n..],
            bytemuck::cast_slice::<f32, u8>(&[1.5, -2.0])
        );
    }
}
