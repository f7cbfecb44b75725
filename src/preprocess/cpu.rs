//! The CPU backend: the pipelines' own bit-packed stages, the reference for the GPU kernels.

use crate::aoi::binarize::histogram;
use crate::aoi::bitimage::BitImage;
use crate::aoi::candidates::open_and_merge;
use crate::aoi::components::Component;
use crate::aoi::crops::make_crops;
use crate::aoi::params::PipelineParams;
use crate::preprocess::{Backend, Comparison, Preprocess, PreprocessError};
use crate::sensors::channels::ChannelMap;
use crate::sensors::window::{NonFinite, Scaler, WindowSpan, stack_windows};

pub struct CpuPreprocessor;

impl Preprocess for CpuPreprocessor {
    fn backend(&self) -> Backend {
        Backend::Cpu
    }

    fn device(&self) -> &str {
        "host CPU"
    }

    fn histogram(&self, gray: &[u8]) -> Result<[u32; 256], PreprocessError> {
        Ok(histogram(gray))
    }

    fn threshold(
        &self,
        gray: &[u8],
        width: usize,
        height: usize,
        threshold: u8,
    ) -> Result<BitImage, PreprocessError> {
        Ok(BitImage::from_threshold(gray, width, height, threshold))
    }

    fn compare(
        &self,
        test: &BitImage,
        template: &BitImage,
        (dx, dy): (isize, isize),
        open_size: usize,
        merge_size: usize,
    ) -> Result<Comparison, PreprocessError> {
        let aligned = template.shifted(dx, dy);
        let valid = BitImage::valid_after_shift(test.width(), test.height(), dx, dy);
        let difference = test.xor(&aligned).and(&valid);
        let (opened, merged) = open_and_merge(&difference, open_size, merge_size);
        Ok(Comparison {
            aligned,
            difference,
            opened,
            merged,
        })
    }

    fn crops(
        &self,
        channels: &[&BitImage],
        candidates: &[Component],
        params: &PipelineParams,
        out: &mut Vec<f32>,
    ) -> Result<(), PreprocessError> {
        make_crops(channels, candidates, params, out);
        Ok(())
    }

    fn scale_rows(
        &self,
        scaler: &Scaler,
        source: &[f64],
        map: &ChannelMap,
        out: &mut Vec<f32>,
    ) -> Result<Result<(), NonFinite>, PreprocessError> {
        Ok(scaler.scale_rows(source, map, out))
    }

    fn stack_windows(
        &self,
        rows: &[f32],
        width: usize,
        window: usize,
        spans: &[WindowSpan],
        out: &mut Vec<f32>,
    ) -> Result<(), PreprocessError> {
        stack_windows(rows, width, window, spans, out);
        Ok(())
    }
}
