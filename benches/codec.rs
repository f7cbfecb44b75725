//! The HTTP side of the inference path: decoding a request (JSON arrays vs Triton binary tensors)
//! and encoding a response, for the AOI classifier's input (6 x 64 x 64 FP32, 98 KB a row). Run
//! with `cargo bench --bench codec`.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use linescan::runtime::ModelConfig;
use linescan::server::v2::codec;
use linescan::tensor::Tensor;
use serde_json::json;

const ROWS: usize = 8;
/// Test, template and their XOR, in a coarse and a fine window: what `aoi_defect` takes (and
/// the config above declares).
const CHANNELS: usize = 6;

fn config() -> ModelConfig {
    toml::from_str(
        r#"
        name = "bench"
        max_batch_size = 64
        [[input]]
        name = "crops"
        datatype = "FP32"
        shape = [6, 64, 64]
        [[output]]
        name = "class_probs"
        datatype = "FP32"
        shape = [7]
        "#,
    )
    .unwrap()
}

fn codec_benches(c: &mut Criterion) {
    let config = config();
    let values: Vec<f32> = (0..ROWS * CHANNELS * 64 * 64)
        .map(|i| (i % 255) as f32 / 255.0)
        .collect();
    let json_body = Bytes::from(
        serde_json::to_vec(&json!({"inputs": [{"name": "crops", "datatype": "FP32",
            "shape": [ROWS, CHANNELS, 64, 64], "data": values}]}))
        .unwrap(),
    );
    let header = serde_json::to_vec(&json!({"inputs": [{"name": "crops", "datatype": "FP32",
        "shape": [ROWS, CHANNELS, 64, 64], "parameters": {"binary_data_size": values.len() * 4}}]}))
    .unwrap();
    let header_length = header.len();
    let mut binary = header;
    binary.extend_from_slice(bytemuck::cast_slice(&values));
    let binary_body = Bytes::from(binary);

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("decode_json_8x6x64x64", |b| {
        b.iter(|| codec::decode(json_body.clone(), None, &config).unwrap())
    });
    group.bench_function("decode_binary_8x6x64x64", |b| {
        b.iter(|| codec::decode(binary_body.clone(), Some(header_length), &config).unwrap())
    });
    let output = Tensor::from_f32(vec![ROWS, 7], &[0.1; ROWS * 7]);
    let spec = &config.outputs[0];
    group.bench_function("encode_json_8x7", |b| {
        b.iter(|| codec::encode("bench", 1, None, &[(spec, &output, false)]))
    });
    group.finish();
}

criterion_group!(benches, codec_benches);
criterion_main!(benches);
