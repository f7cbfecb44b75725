//! Workload: Open Inference Protocol infer requests with random inputs shaped from the model's
//! metadata, as JSON tensors or Triton binary tensors. Works against any KServe v2 server.

use anyhow::Context;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;

use crate::bench::load::{Outcome, Workload, send_timed};
use crate::server::v2::codec::HEADER_LENGTH;
use crate::tensor::DataType;

/// Distinct request bodies rotated through, so no cache can answer from the previous one.
const BODY_VARIANTS: usize = 8;

#[derive(Deserialize)]
struct Metadata {
    inputs: Vec<TensorMetadata>,
}

/// What the load generator needs of `GET .../config` (Triton's extension; a server without it,
/// like the FastAPI reference, leaves the batch unchecked).
#[derive(Deserialize, Default)]
struct ConfigLimits {
    max_batch_size: Option<usize>,
}

#[derive(Deserialize)]
struct TensorMetadata {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

pub struct InferWorkload {
    server: String,
    url: String,
    model: String,
    batch: usize,
    bodies: Vec<(Bytes, Option<usize>)>,
}

impl InferWorkload {
    /// Reads the model's metadata and prepares the request bodies.
    pub async fn prepare(
        client: &reqwest::Client,
        base_url: &str,
        model: &str,
        version: Option<&str>,
        batch: usize,
        binary: bool,
    ) -> anyhow::Result<InferWorkload> {
        let path = match version {
            Some(v) => format!("{base_url}/v2/models/{model}/versions/{v}"),
            None => format!("{base_url}/v2/models/{model}"),
        };
        let response = client
            .get(&path)
            .send()
            .await
            .with_context(|| format!("cannot reach {path}"))?;
        anyhow::ensure!(
            response.status().is_success(),
            "{path} answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
        let metadata: Metadata = response.json().await.context("model metadata")?;
        // Refused here rather than by every request of the run.
        let response = client
            .get(format!("{path}/config"))
            .send()
            .await
            .with_context(|| format!("cannot reach {path}/config"))?;
        let config: ConfigLimits = if response.status().is_success() {
            response.json().await.context("model configuration")?
        } else {
            ConfigLimits::default()
        };
        match config.max_batch_size {
            None => {}
            Some(0) => anyhow::ensure!(
                batch == 1,
                "model {model} does not batch (max_batch_size = 0: a request is one whole \
                 input), so --batch must be 1, not {batch}"
            ),
            Some(limit) => anyhow::ensure!(
                batch <= limit,
                "model {model} takes at most {limit} rows per request (max_batch_size), not \
                 --batch {batch}"
            ),
        }
        let bodies = (0..BODY_VARIANTS as u64)
            .map(|seed| build_body(&metadata, batch, binary, seed))
            .collect::<anyhow::Result<_>>()?;
        Ok(InferWorkload {
            server: base_url.into(),
            url: format!("{path}/infer"),
            model: model.into(),
            batch,
            bodies,
        })
    }
}

fn build_body(
    metadata: &Metadata,
    batch: usize,
    binary: bool,
    seed: u64,
) -> anyhow::Result<(Bytes, Option<usize>)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut inputs = Vec::new();
    let mut blobs: Vec<u8> = Vec::new();
    for input in &metadata.inputs {
        let dtype = DataType::parse(&input.datatype)
            .with_context(|| format!("input {} has unsupported datatype", input.name))?;
        let shape: Vec<usize> = input
            .shape
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if i == 0 && *d == -1 {
                    batch
                } else {
                    (*d).max(1) as usize
                }
            })
            .collect();
        let count: usize = shape.iter().product();
        let values: Vec<f64> = (0..count)
            .map(|_| match dtype {
                DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => rng.f64(),
                DataType::Bool => rng.bool() as u8 as f64,
                _ => rng.u8(0..10) as f64,
            })
            .collect();
        if binary {
            let start = blobs.len();
            for v in &values {
                match dtype {
                    DataType::Fp16 => {
                        blobs.extend_from_slice(&half::f16::from_f64(*v).to_le_bytes())
                    }
                    DataType::Bf16 => {
                        blobs.extend_from_slice(&half::bf16::from_f64(*v).to_le_bytes())
                    }
                    DataType::Fp32 => blobs.extend_from_slice(&(*v as f32).to_le_bytes()),
                    DataType::Fp64 => blobs.extend_from_slice(&v.to_le_bytes()),
                    DataType::Int64 => blobs.extend_from_slice(&(*v as i64).to_le_bytes()),
                    DataType::Int32 => blobs.extend_from_slice(&(*v as i32).to_le_bytes()),
                    _ => blobs.push(*v as u8),
                }
            }
            anyhow::ensure!(
                blobs.len() - start == count * dtype.size(),
                "binary bench inputs support FP16, BF16, FP32, FP64, INT32, INT64 and 1-byte types"
            );
            inputs.push(
                json!({"name": input.name, "datatype": input.datatype, "shape": shape,
                "parameters": {"binary_data_size": blobs.len() - start}}),
            );
        } else {
            let data: Vec<serde_json::Value> = values
                .iter()
                .map(|v| match dtype {
                    DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => json!(v),
                    DataType::Bool => json!(*v != 0.0),
                    _ => json!(*v as i64),
                })
                .collect();
            inputs.push(json!({"name": input.name, "datatype": input.datatype, "shape": shape, "data": data}));
        }
    }
    let header = serde_json::to_vec(&json!({
        "inputs": inputs,
        "parameters": {"binary_data_output": binary},
    }))?;
    if binary {
        let length = header.len();
        let mut body = header;
        body.extend_from_slice(&blobs);
        Ok((Bytes::from(body), Some(length)))
    } else {
        Ok((Bytes::from(header), None))
    }
}

impl Workload for InferWorkload {
    fn send<'a>(&'a self, client: &'a reqwest::Client, sequence: u64) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let (body, header_length) = &self.bodies[sequence as usize % self.bodies.len()];
            let mut request = client.post(&self.url).body(body.clone());
            request = match header_length {
                Some(length) => request
                    .header(HEADER_LENGTH, length.to_string())
                    .header("Content-Type", "application/octet-stream"),
                None => request.header("Content-Type", "application/json"),
            };
            send_timed(request).await
        })
    }

    fn rows(&self) -> usize {
        self.batch
    }

    fn describe(&self) -> (String, String) {
        (self.url.clone(), self.model.clone())
    }

    fn server(&self) -> Option<&str> {
        Some(&self.server)
    }
}
