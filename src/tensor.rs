//! Tensors as they travel between HTTP, the batcher and ONNX Runtime: a datatype, a shape and
//! little-endian bytes. Keeping the payload as bytes lets binary request bodies flow through
//! without per-element conversion; typed views are made only where arithmetic needs them.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Element types of the Open Inference Protocol that linescan serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataType {
    #[serde(rename = "BOOL")]
    Bool,
    #[serde(rename = "UINT8")]
    Uint8,
    #[serde(rename = "UINT16")]
    Uint16,
    #[serde(rename = "UINT32")]
    Uint32,
    #[serde(rename = "UINT64")]
    Uint64,
    #[serde(rename = "INT8")]
    Int8,
    #[serde(rename = "INT16")]
    Int16,
    #[serde(rename = "INT32")]
    Int32,
    #[serde(rename = "INT64")]
    Int64,
    #[serde(rename = "FP16")]
    Fp16,
    #[serde(rename = "BF16")]
    Bf16,
    #[serde(rename = "FP32")]
    Fp32,
    #[serde(rename = "FP64")]
    Fp64,
}

impl DataType {
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
        }
    }

    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.name() == name)
    }

    pub fn size(self) -> usize {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
        }
    }

    pub fn supported_names() -> String {
        DataType::ALL.map(DataType::name).join(", ")
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dense tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

/// f32 values as shared bytes without a copy.
pub fn f32_bytes(values: Vec<f32>) -> Bytes {
    struct F32Owner(Vec<f32>);
    impl AsRef<[u8]> for F32Owner {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }
    Bytes::from_owner(F32Owner(values))
}

impl Tensor {
    pub fn element_count(shape: &[usize]) -> usize {
        shape.iter().product()
    }

    pub fn byte_len(dtype: DataType, shape: &[usize]) -> usize {
        Self::element_count(shape) * dtype.size()
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor {
            dtype: DataType::Fp32,
            shape,
            data: Bytes::copy_from_slice(bytemuck::cast_slice(values)),
        }
    }

    /// Rows along the first (batch) dimension.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Copies the payload into an `f32` vector (FP32 tensors only).
    pub fn to_f32_vec(&self) -> Option<Vec<f32>> {
        (self.dtype == DataType::Fp32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }
}

/// A byte buffer aligned for every element type, so batched inputs can be viewed as `&[T]`
/// without another copy (request bodies carry no alignment guarantee).
#[derive(Debug, Default)]
pub struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    pub fn with_capacity(bytes: usize) -> Self {
        AlignedBytes {
            words: Vec::with_capacity(bytes.div_ceil(8)),
            len: 0,
        }
    }

    pub fn clear(&mut self) {
        self.words.clear();
        self.len = 0;
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        if self.len.is_multiple_of(8) {
            // Word-aligned append (every batch of 4- and 8-byte rows with even row sizes):
            // each word is written once, instead of zero-filled and then overwritten.
            let (words, tail) = bytes.as_chunks::<8>();
            self.words
                .extend(words.iter().map(|word| u64::from_ne_bytes(*word)));
            if !tail.is_empty() {
                let mut last = [0u8; 8];
                last[..tail.len()].copy_from_slice(tail);
                self.words.push(u64::from_ne_bytes(last));
            }
            self.len += bytes.len();
            return;
        }
        let new_len = self.len + bytes.len();
        self.words.resize(new_len.div_ceil(8), 0);
        bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[self.len..new_len]
            .copy_from_slice(bytes);
        self.len = new_len;
    }

    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }

    /// Appends zero bytes up to `len` (nothing when already that long).
    pub fn zero_extend(&mut self, len: usize) {
        if len <= self.len {
            return;
        }
        self.words.resize(len.div_ceil(8), 0);
        // The last word written before may hold bytes past the old length.
        bytemuck::cast_slice_mut::<u64, u8>(&mut self.words)[self.len..len].fill(0);
        self.len = len;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBytes;

    #[test]
    fn zero_extend_pads_with_zeros_after_the_bytes() {
        let mut bytes = AlignedBytes::default();
        bytes.extend_from_slice(&[1, 2, 3]);
        bytes.zero_extend(11);
        assert_eq!(bytes.as_bytes(), &[1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0]);
        bytes.zero_extend(4);
        assert_eq!(bytes.len(), 11);
        // Bytes once written past the length are zero again when padded over.
        bytes.clear();
        bytes.extend_from_slice(&[9; 8]);
        bytes.clear();
        bytes.extend_from_slice(&[5]);
        bytes.zero_extend(8);
        assert_eq!(bytes.as_bytes(), &[5, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn f32_bytes_share_the_values() {
        let bytes = f32_bytes(vec![1.0, -2.5]);
        assert_eq!(bytes.len(), 8);
        assert_eq!(&bytes[4..], &(-2.5f32).to_le_bytes());
    }

    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for dtype in DataType::ALL {
            assert_eq!(DataType::parse(dtype.name()), Some(dtype));
        }
        assert_eq!(DataType::parse("BYTES"), None);
        assert_eq!(DataType::parse("fp32"), None);
    }

    #[test]
    fn aligned_bytes_keep_content_and_alignment() {
        let mut buf = AlignedBytes::with_capacity(3);
        buf.extend_from_slice(&[1, 2, 3]);
        buf.extend_from_slice(&1.5f32.to_le_bytes());
        assert_eq!(buf.len(), 7);
        assert_eq!(&buf.as_bytes()[..3], &[1, 2, 3]);
        assert_eq!(buf.as_bytes().as_ptr() as usize % 8, 0);
        buf.clear();
        buf.extend_from_slice(&2.0f32.to_le_bytes());
        let floats: &[f32] = bytemuck::cast_slice(buf.as_bytes());
        assert_eq!(floats, &[2.0]);
    }

    #[test]
    fn aligned_bytes_equal_plain_appends_in_any_mix() {
        let mut buf = AlignedBytes::default();
        let mut expected = Vec::new();
        for (i, size) in [16usize, 5, 3, 8, 0, 7, 24, 1].iter().enumerate() {
            let piece: Vec<u8> = (0..*size).map(|b| (i * 31 + b) as u8).collect();
            buf.extend_from_slice(&piece);
            expected.extend_from_slice(&piece);
            assert_eq!(buf.as_bytes(), &expected[..], "after piece {i}");
        }
    }

    #[test]
    fn f32_tensor_round_trips() {
        let t = Tensor::from_f32(vec![2, 2], &[1.0, -2.0, 3.5, 0.0]);
        assert_eq!(t.rows(), 2);
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.0, -2.0, 3.5, 0.0]);
        assert_eq!(Tensor::byte_len(DataType::Fp64, &[3, 2]), 48);
    }
}
