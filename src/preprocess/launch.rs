//! What the host hands every GPU kernel, shared by the CUDA and wgpu backends so both launch
//! the same grids with the same parameter blocks (`Params` in shaders/common.wgsl and
//! kernels/common.cuh).

use bytemuck::{Pod, Zeroable};

use crate::sensors::channels::ChannelMap;
use crate::sensors::window::{NonFinite, Scaler};

/// Threads per block / workgroup.
pub const GROUP_SIZE: u32 = 64;
/// The largest grid dimension every API allows.
const MAX_GROUPS_PER_DIMENSION: u32 = 65_535;

/// The parameter block of every kernel (32 bytes; `a`–`d` mean what each kernel says).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct LaunchParams {
    pub width: u32,
    pub height: u32,
    /// 32-bit words per image row.
    pub words: u32,
    /// Invocations that do work.
    pub count: u32,
    pub a: i32,
    pub b: i32,
    pub c: u32,
    pub d: u32,
}

impl LaunchParams {
    /// Parameters of a kernel over a `width` x `height` binary image, one invocation per word;
    /// None where the kernels' 32-bit indices cannot address it (they compare coordinates as
    /// signed integers, and index every word of the image).
    pub fn per_word(width: usize, height: usize) -> Option<LaunchParams> {
        let words = u32::try_from(width.div_ceil(64) * 2).ok()?;
        let signed = |n: usize| i32::try_from(n).ok().map(|n| n as u32);
        Some(LaunchParams {
            width: signed(width)?,
            height: signed(height)?,
            words,
            count: words.checked_mul(signed(height)?)?,
            ..LaunchParams::default()
        })
    }

    /// A 2-D grid of `GROUP_SIZE`-wide groups covering `count` invocations (kernels flatten it).
    pub fn grid(&self) -> (u32, u32) {
        let groups = self.count.div_ceil(GROUP_SIZE).max(1);
        let x = groups.min(MAX_GROUPS_PER_DIMENSION);
        (x, groups.div_ceil(x))
    }
}

/// One crop plane: a `size`² grid of `scale`² block averages of image `image` from (x, y).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct CropPlane {
    pub x: i32,
    pub y: i32,
    pub scale: u32,
    pub image: u32,
}

/// Grey pixels packed four to a word (the kernels read whole words).
pub fn pack_pixels(gray: &[u8]) -> Vec<u32> {
    gray.chunks(4)
        .map(|c| c.iter().rev().fold(0u32, |word, p| (word << 8) | *p as u32))
        .collect()
}

/// The sensor scaling kernel's inputs: f32 source values, the model's source columns and
/// (offset, scale) pairs in model order.
pub struct ScaleInputs {
    pub source: Vec<f32>,
    pub columns: Vec<u32>,
    pub affine: Vec<[f32; 2]>,
}

impl ScaleInputs {
    pub fn new(scaler: &Scaler, source: &[f64], map: &ChannelMap) -> ScaleInputs {
        ScaleInputs {
            source: source.iter().map(|v| *v as f32).collect(),
            columns: map.columns.iter().map(|c| *c as u32).collect(),
            affine: scaler
                .affine()
                .map(|(offset, scale)| [offset as f32, scale as f32])
                .collect(),
        }
    }

    /// The kernel's first bad flat index (u32::MAX: none) as the CPU would report it.
    pub fn non_finite(
        &self,
        first_bad: u32,
        source: &[f64],
        map: &ChannelMap,
    ) -> Result<(), NonFinite> {
        if first_bad == u32::MAX {
            return Ok(());
        }
        let width = self.columns.len();
        let (row, channel) = (first_bad as usize / width, first_bad as usize % width);
        Err(NonFinite {
            row,
            channel,
            value: source[row * map.source_width + map.columns[channel]],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_pack_little_endian_and_pad_the_last_word() {
        assert_eq!(
            pack_pixels(&[1, 2, 3, 4, 5]),
            vec![0x0403_0201, 0x0000_0005]
        );
    }

    #[test]
    fn grids_cover_every_invocation_within_api_limits() {
        let params = LaunchParams {
            count: 64 * 70_000 + 1,
            ..LaunchParams::default()
        };
        let (x, y) = params.grid();
        assert!(x <= MAX_GROUPS_PER_DIMENSION);
        assert!((x * y) as u64 * GROUP_SIZE as u64 >= params.count as u64);
        assert_eq!(LaunchParams::per_word(640, 2).unwrap().words, 20);
        assert_eq!(LaunchParams::per_word(65, 1).unwrap().words, 4);
        // 2^17 words a row x 2^15 rows: 2^32 words, one more than a u32 counts.
        assert_eq!(LaunchParams::per_word(1 << 22, 1 << 15), None);
        assert_eq!(LaunchParams::per_word(1 << 31, 1), None);
    }
}
