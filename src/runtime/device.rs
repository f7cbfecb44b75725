//! Batch inputs that already live in CUDA device memory (the GPU preprocessing's crops and
//! windows), handed to ONNX Runtime in place: the batcher joins several requests' rows with
//! device-to-device copies and the session wraps the address as a CUDA tensor, so the data
//! never returns to the host between preprocessing and inference.
//!
//! The traits keep the engine free of any CUDA binding: `preprocess::cuda` implements them.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::tensor::DataType;

/// A finished buffer in CUDA device memory: every write to it has completed, so any stream
/// (ONNX Runtime's included) may read it.
pub trait DeviceMemory: Send + Sync {
    /// The CUDA device ordinal.
    fn device_id(&self) -> i32;
    /// The address (`CUdeviceptr`) of the first byte, valid while `self` lives.
    fn address(&self) -> u64;
    fn byte_len(&self) -> usize;
    /// A copier on the same device, for a batcher that joins several requests' rows.
    fn gatherer(&self) -> Result<Box<dyn DeviceGather>, String>;
}

/// Joins device byte ranges into one buffer on the device that it owns and reuses.
pub trait DeviceGather: Send {
    /// Copies `parts` back to back, zeroes the rest up to `len` bytes (at least the parts'
    /// total), waits for the copies, and returns the buffer's address (aligned to 256 bytes,
    /// as CUDA allocations are); the buffer stays valid and unchanged until the next call.
    fn gather(&mut self, parts: &[&DeviceBytes], len: usize) -> Result<u64, String>;
}

/// A byte range of device memory, shared: slicing shares the buffer (like [`bytes::Bytes`]).
#[derive(Clone)]
pub struct DeviceBytes {
    memory: Arc<dyn DeviceMemory>,
    start: usize,
    len: usize,
}

impl DeviceBytes {
    pub fn new(memory: Arc<dyn DeviceMemory>) -> DeviceBytes {
        let len = memory.byte_len();
        DeviceBytes {
            memory,
            start: 0,
            len,
        }
    }

    /// The bytes `range` of this range. Panics when `range` is out of bounds, like slicing.
    pub fn slice(&self, range: Range<usize>) -> DeviceBytes {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "device range {range:?} out of 0..{}",
            self.len
        );
        DeviceBytes {
            memory: self.memory.clone(),
            start: self.start + range.start,
            len: range.end - range.start,
        }
    }

    pub fn address(&self) -> u64 {
        self.memory.address() + self.start as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device_id(&self) -> i32 {
        self.memory.device_id()
    }

    pub fn gatherer(&self) -> Result<Box<dyn DeviceGather>, String> {
        self.memory.gatherer()
    }
}

impl std::fmt::Debug for DeviceBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes on CUDA device {} at {:#x}",
            self.len,
            self.device_id(),
            self.address()
        )
    }
}

/// Shared bytes wherever they are: host memory, or CUDA device memory that sessions on that
/// device read in place.
#[derive(Debug, Clone)]
pub enum PlacedBytes {
    Host(Bytes),
    Device(DeviceBytes),
}

impl PlacedBytes {
    pub fn len(&self) -> usize {
        match self {
            PlacedBytes::Host(bytes) => bytes.len(),
            PlacedBytes::Device(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes `range`, sharing the buffer. Panics when `range` is out of bounds.
    pub fn slice(&self, range: Range<usize>) -> PlacedBytes {
        match self {
            PlacedBytes::Host(bytes) => PlacedBytes::Host(bytes.slice(range)),
            PlacedBytes::Device(bytes) => PlacedBytes::Device(bytes.slice(range)),
        }
    }
}

/// A dense row-major tensor in device memory.
#[derive(Debug, Clone)]
pub struct DeviceTensor {
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub data: DeviceBytes,
}

/// A range of addresses on a device, never read: for tests of the checks and arithmetic made
/// before any device memory is touched.
#[cfg(test)]
pub(crate) struct AddressesOnly {
    pub device: i32,
    pub address: u64,
    pub len: usize,
}

#[cfg(test)]
impl DeviceMemory for AddressesOnly {
    fn device_id(&self) -> i32 {
        self.device
    }
    fn address(&self) -> u64 {
        self.address
    }
    fn byte_len(&self) -> usize {
        self.len
    }
    fn gatherer(&self) -> Result<Box<dyn DeviceGather>, String> {
        Err("no device".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(address: u64, len: usize) -> DeviceBytes {
        DeviceBytes::new(Arc::new(AddressesOnly {
            device: 3,
            address,
            len,
        }))
    }

    #[test]
    fn slices_share_the_buffer_and_offset_the_address() {
        let whole = span(0x1000, 64);
        let part = whole.slice(16..48);
        assert_eq!(
            (part.address(), part.len(), part.device_id()),
            (0x1010, 32, 3)
        );
        let inner = part.slice(8..8);
        assert_eq!((inner.address(), inner.len()), (0x1018, 0));
        assert!(inner.is_empty());
    }

    #[test]
    #[should_panic(expected = "out of 0..32")]
    fn slicing_past_the_end_panics() {
        let part = span(0, 64).slice(0..32);
        let _ = part.slice(16..40);
    }
}
