//! Serving engine: the dynamic batcher per model version and the registry of loaded models.

pub mod batcher;
pub mod lanes;
pub mod registry;
pub mod stats;
pub mod withdraw;

pub use batcher::{Batcher, InferError, InferResponse};
pub use lanes::Priority;
pub use registry::{ModelRegistry, ServedModel};
