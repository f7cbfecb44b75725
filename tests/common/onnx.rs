//! Tiny ONNX models written on the fly for datatype tests: a protobuf writer for the few fields
//! of `ModelProto` such graphs need (onnx.proto3 field numbers), so no Python or model file is
//! involved.

/// ONNX `TensorProto.DataType` codes.
pub const FLOAT: i64 = 1;
pub const FLOAT16: i64 = 10;
pub const BFLOAT16: i64 = 16;

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn int_field(field: u64, value: i64, out: &mut Vec<u8>) {
    varint(field << 3, out);
    varint(value as u64, out);
}

fn bytes_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint((field << 3) | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `ValueInfoProto` of a tensor `[batch, width]` whose first dimension is symbolic, and the
/// second too when `width` is -1.
fn value_info(name: &str, elem_type: i64, width: i64) -> Vec<u8> {
    let mut batch = Vec::new();
    bytes_field(2, b"batch", &mut batch); // Dimension.dim_param
    let mut second = Vec::new();
    if width < 0 {
        bytes_field(2, b"width", &mut second);
    } else {
        int_field(1, width, &mut second); // Dimension.dim_value
    }
    let mut shape = Vec::new();
    bytes_field(1, &batch, &mut shape); // TensorShapeProto.dim
    bytes_field(1, &second, &mut shape);
    let mut tensor = Vec::new();
    int_field(1, elem_type, &mut tensor); // TypeProto.Tensor.elem_type
    bytes_field(2, &shape, &mut tensor); // .shape
    let mut type_proto = Vec::new();
    bytes_field(1, &tensor, &mut type_proto); // TypeProto.tensor_type
    let mut info = Vec::new();
    bytes_field(1, name.as_bytes(), &mut info); // ValueInfoProto.name
    bytes_field(2, &type_proto, &mut info); // .type
    info
}

/// A graph node: `Identity(input)`, or `Cast(input, to)` when `cast_to` is given.
fn node(input: &str, output: &str, cast_to: Option<i64>) -> Vec<u8> {
    let op = if cast_to.is_some() {
        "Cast"
    } else {
        "Identity"
    };
    let mut node = op_node(op, &[input], output);
    if let Some(to) = cast_to {
        bytes_field(5, &int_attribute("to", to), &mut node); // NodeProto.attribute
    }
    node
}

/// A graph node `op(inputs...)` without attributes.
fn op_node(op: &str, inputs: &[&str], output: &str) -> Vec<u8> {
    let mut node = Vec::new();
    for input in inputs {
        bytes_field(1, input.as_bytes(), &mut node); // NodeProto.input
    }
    bytes_field(2, output.as_bytes(), &mut node); // .output
    bytes_field(3, output.as_bytes(), &mut node); // .name
    bytes_field(4, op.as_bytes(), &mut node); // .op_type
    node
}

/// A model `sum = Add(x, y)` of FP32 inputs `[batch, -1]`: it loads and warms up, and fails at
/// run time on widths that do not broadcast (2 and 3, say).
pub fn add_model() -> Vec<u8> {
    let mut graph = Vec::new();
    bytes_field(1, &op_node("Add", &["x", "y"], "sum"), &mut graph); // GraphProto.node
    bytes_field(2, b"add", &mut graph); // .name
    for name in ["x", "y"] {
        bytes_field(11, &value_info(name, FLOAT, -1), &mut graph); // .input
    }
    bytes_field(12, &value_info("sum", FLOAT, -1), &mut graph); // .output
    model(&graph)
}

/// A model whose every input `(name, type)` of shape `[batch, width]` (width -1: variable) comes
/// back twice: as `<name>_echo` (the same type, Identity) and as `<name>_fp32` (Cast to FLOAT).
pub fn echo_and_cast_model(inputs: &[(&str, i64)], width: i64) -> Vec<u8> {
    let mut graph = Vec::new();
    for (name, _) in inputs {
        let (echo, fp32) = (format!("{name}_echo"), format!("{name}_fp32"));
        bytes_field(1, &node(name, &echo, None), &mut graph); // GraphProto.node
        bytes_field(1, &node(name, &fp32, Some(FLOAT)), &mut graph);
    }
    bytes_field(2, b"echo_and_cast", &mut graph); // GraphProto.name
    for (name, elem_type) in inputs {
        bytes_field(11, &value_info(name, *elem_type, width), &mut graph); // .input
    }
    for (name, elem_type) in inputs {
        let echo = value_info(&format!("{name}_echo"), *elem_type, width);
        bytes_field(12, &echo, &mut graph); // .output
        let fp32 = value_info(&format!("{name}_fp32"), FLOAT, width);
        bytes_field(12, &fp32, &mut graph);
    }
    model(&graph)
}

/// `AttributeProto` of an integer.
fn int_attribute(name: &str, value: i64) -> Vec<u8> {
    let mut attribute = Vec::new();
    bytes_field(1, name.as_bytes(), &mut attribute); // AttributeProto.name
    int_field(3, value, &mut attribute); // .i
    int_field(20, 2, &mut attribute); // .type = INT
    attribute
}

/// `TensorProto` named `name` of the given dims and type, its values as little-endian bytes.
fn tensor(name: &str, dims: &[i64], elem_type: i64, raw: &[u8]) -> Vec<u8> {
    let mut tensor = Vec::new();
    for dim in dims {
        int_field(1, *dim, &mut tensor); // TensorProto.dims
    }
    int_field(2, elem_type, &mut tensor); // .data_type
    bytes_field(8, name.as_bytes(), &mut tensor); // .name
    bytes_field(9, raw, &mut tensor); // .raw_data
    tensor
}

const INT64: i64 = 7;
/// Width of the slow model's matrices.
const SLOW_WIDTH: usize = 1024;
/// Matrix products the slow model chains.
const SLOW_PRODUCTS: usize = 4;

/// A model `y = x + 0 * work(max(x))` of FP32 `x` `[batch, 1]`, where `work(k)` multiplies a
/// `k` x 1024 matrix by a 1024 x 1024 one four times: a request's largest value sets how long
/// its batch runs (about 4 M multiply-adds per unit), and the zeros of the warm-up cost nothing.
pub fn slow_model() -> Vec<u8> {
    let mut graph = Vec::new();
    let mut add_node = |op: &str, inputs: &[&str], output: &str, attributes: &[Vec<u8>]| {
        let mut node = op_node(op, inputs, output);
        for attribute in attributes {
            bytes_field(5, attribute, &mut node); // NodeProto.attribute
        }
        bytes_field(1, &node, &mut graph); // GraphProto.node
    };
    add_node("ReduceMax", &["x"], "peak", &[int_attribute("keepdims", 0)]);
    add_node(
        "Cast",
        &["peak"],
        "rows_scalar",
        &[int_attribute("to", INT64)],
    );
    add_node("Unsqueeze", &["rows_scalar", "axis_0"], "rows", &[]);
    add_node(
        "Concat",
        &["rows", "width"],
        "shape",
        &[int_attribute("axis", 0)],
    );
    let one = tensor("", &[1], FLOAT, &1.0f32.to_le_bytes());
    let mut value = Vec::new();
    bytes_field(1, b"value", &mut value); // AttributeProto.name
    bytes_field(5, &one, &mut value); // .t
    int_field(20, 4, &mut value); // .type = TENSOR
    add_node("ConstantOfShape", &["shape"], "product_0", &[value]);
    for i in 1..=SLOW_PRODUCTS {
        let (from, to) = (format!("product_{}", i - 1), format!("product_{i}"));
        add_node("MatMul", &[&from, "weights"], &to, &[]);
    }
    let last = format!("product_{SLOW_PRODUCTS}");
    add_node(
        "ReduceSum",
        &[&last],
        "total",
        &[int_attribute("keepdims", 0)],
    );
    add_node("Mul", &["total", "zero"], "nothing", &[]);
    add_node("Add", &["x", "nothing"], "y", &[]);
    bytes_field(2, b"slow", &mut graph); // GraphProto.name
    let weight = (1.0f32 / SLOW_WIDTH as f32).to_le_bytes();
    let weights: Vec<u8> = weight.repeat(SLOW_WIDTH * SLOW_WIDTH);
    let width = SLOW_WIDTH as i64;
    for initializer in [
        tensor("weights", &[width, width], FLOAT, &weights),
        tensor("axis_0", &[1], INT64, &0i64.to_le_bytes()),
        tensor("width", &[1], INT64, &width.to_le_bytes()),
        tensor("zero", &[], FLOAT, &0.0f32.to_le_bytes()),
    ] {
        bytes_field(5, &initializer, &mut graph); // GraphProto.initializer
    }
    bytes_field(11, &value_info("x", FLOAT, 1), &mut graph); // .input
    bytes_field(12, &value_info("y", FLOAT, 1), &mut graph); // .output
    model(&graph)
}

/// `ModelProto` around a graph, at opset 17.
fn model(graph: &[u8]) -> Vec<u8> {
    let mut opset = Vec::new();
    bytes_field(1, b"", &mut opset); // OperatorSetIdProto.domain (the default one)
    int_field(2, 17, &mut opset); // .version
    let mut model = Vec::new();
    int_field(1, 8, &mut model); // ModelProto.ir_version
    bytes_field(7, graph, &mut model); // .graph
    bytes_field(8, &opset, &mut model); // .opset_import
    model
}
