//! linescan: an inspection server for factories.
//!
//! Layers, with dependencies pointing down: `server` (HTTP) → `engine` (dynamic batching) →
//! `runtime` (ONNX Runtime sessions, model repository) → `tensor`.

pub mod aoi;
pub mod bench;
pub mod bounded_json;
pub mod byte_size;
pub mod cli;
pub mod config;
pub mod disk_reserve;
pub mod durable;
pub mod engine;
pub mod jobs;
pub mod json_error;
pub mod json_tokens;
pub mod log_limit;
pub mod metrics;
pub mod preprocess;
pub mod process_stats;
pub mod python_env;
pub mod runtime;
pub mod sensors;
pub mod server;
pub mod signals;
pub mod tensor;
