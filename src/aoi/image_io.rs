//! Board images in: PNG, JPEG, BMP or TIFF, checked against a pixel limit from the header before
//! anything is decoded (decompression bombs), then turned into 8-bit grey the way the training
//! pipeline does (ITU-R 601-2 luma in 16.16 fixed point; 16-bit samples scaled by the depth they
//! use, see `depth_shift`).

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Limits};

use crate::aoi::decode_budget::{Claim, DECODES};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImageError {
    #[error("not an image in a supported format (PNG, JPEG, BMP, TIFF){0}")]
    Unsupported(String),
    #[error(
        "image of {width}x{height} = {pixels} pixels exceeds the limit of {limit} pixels \
         (--max-image-pixels)"
    )]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error(
        "{format} image in a layout that cannot be read here: {reason} (readable: 8- or 16-bit \
         grey, RGB or RGBA samples)"
    )]
    UnsupportedLayout { format: String, reason: String },
    #[error("corrupt or truncated {format} image: {reason}")]
    Corrupt { format: String, reason: String },
    #[error("the image is empty (0 bytes)")]
    Empty,
}

/// An 8-bit grey image.
#[derive(Debug, Clone, PartialEq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

const ACCEPTED: [ImageFormat; 4] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::Bmp,
    ImageFormat::Tiff,
];

pub fn decode_gray(bytes: &[u8], max_pixels: u64) -> Result<GrayImage, ImageError> {
    decode_gray_keeping(bytes, max_pixels, |_| 0).map(|(image, _)| image)
}

/// `decode_gray`, and a claim on the decodes' budget of `kept(pixels)` bytes, for what the
/// caller builds from the image next. The decode claims the larger of its own worst case and
/// that, and hands the claim over shrunk: the image is never held outside the budget, waiting
/// behind other claims for one of its own.
pub fn decode_gray_keeping(
    bytes: &[u8],
    max_pixels: u64,
    kept: impl FnOnce(u64) -> u64,
) -> Result<(GrayImage, Claim<'static>), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Unsupported(format!(": {e}")))?;
    let format = match reader.format() {
        Some(format) if ACCEPTED.contains(&format) => format,
        Some(other) => return Err(ImageError::Unsupported(format!(", got {other:?}"))),
        None => return Err(ImageError::Unsupported(String::new())),
    };
    let format_name = format!("{format:?}").to_uppercase();
    let corrupt = |reason: String| ImageError::Corrupt {
        format: format_name.clone(),
        reason,
    };
    // A valid file of a kind the decoder does not read (a float or palette TIFF) is not
    // corrupt: saying so would send its sender looking for damage.
    let unreadable = |error: image::ImageError| match error {
        image::ImageError::Unsupported(reason) => ImageError::UnsupportedLayout {
            format: format_name.clone(),
            reason: reason.to_string(),
        },
        other => corrupt(other.to_string()),
    };
    // Dimensions come from the header alone; nothing is decoded before the limit check.
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(unreadable)?;
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(corrupt(
            "no end-of-image marker after the scan data (the file was cut short)".into(),
        ));
    }
    let mut reader = reader;
    let mut limits = Limits::default();
    // Room for the largest pixel type (RGBA, 16 bits per channel) of an allowed image, and as
    // much again for a decoder's working buffers (TIFF's strips: the image crate hands the
    // TIFF decoder only what is left beside the output buffer).
    let most = pixels.saturating_mul(16).saturating_add(16 << 20);
    limits.max_alloc = Some(most);
    reader.limits(limits);
    let after = kept(pixels);
    let mut claim = DECODES.claim(most.max(after));
    let image = reader.decode().map_err(unreadable)?;
    let gray = to_gray(image);
    claim.shrink_to(after);
    Ok((gray, claim))
}

/// Whether a JPEG's first scan is followed by an end-of-image marker. The decoder fills a stream
/// cut short with grey instead of failing, and a half-grey board reads as one large defect.
/// Segments before the scan are skipped by their lengths, so an embedded thumbnail's markers do
/// not count; inside scan data a 0xFF byte is always followed by 0x00 or a marker.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    const SOS: u8 = 0xDA;
    const EOI: [u8; 2] = [0xFF, 0xD9];
    let mut at = 2; // after the start-of-image marker
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            return false;
        }
        match bytes[at + 1] {
            // Fill bytes before a marker.
            0xFF => at += 1,
            SOS => return bytes[at..].windows(2).any(|pair| pair == EOI),
            // Markers without a length.
            0x01 | 0xD0..=0xD7 => at += 2,
            _ => at += 2 + u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize,
        }
    }
    false
}

fn to_gray(image: DynamicImage) -> GrayImage {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let pixels = match image {
        DynamicImage::ImageLuma8(gray) => gray.into_raw(),
        DynamicImage::ImageLumaA8(gray) => gray.into_raw().chunks_exact(2).map(|p| p[0]).collect(),
        DynamicImage::ImageLuma16(gray) => grey_from_16_bit(&gray.into_raw(), 1, 1),
        DynamicImage::ImageLumaA16(gray) => grey_from_16_bit(&gray.into_raw(), 2, 1),
        DynamicImage::ImageRgb16(rgb) => grey_from_16_bit(&rgb.into_raw(), 3, 3),
        DynamicImage::ImageRgba16(rgba) => grey_from_16_bit(&rgba.into_raw(), 4, 3),
        other => other
            .to_rgb8()
            .into_raw()
            .chunks_exact(3)
            .map(|p| luma(p[0], p[1], p[2]))
            .collect(),
    };
    GrayImage {
        width,
        height,
        pixels,
    }
}

/// Grey from 16-bit pixels of `stride` samples whose first `colours` are grey or RGB (the rest
/// is alpha, ignored), each sample brought to 8 bits by the image's `depth_shift`.
fn grey_from_16_bit(samples: &[u16], stride: usize, colours: usize) -> Vec<u8> {
    let pixels = samples.chunks_exact(stride);
    let max = pixels
        .clone()
        .flat_map(|p| &p[..colours])
        .copied()
        .max()
        .unwrap_or(0);
    let shift = depth_shift(max);
    let eight_bit = |v: u16| (v >> shift) as u8;
    match colours {
        1 => pixels.map(|p| eight_bit(p[0])).collect(),
        _ => pixels
            .map(|p| luma(eight_bit(p[0]), eight_bit(p[1]), eight_bit(p[2])))
            .collect(),
    }
}

/// Right shift that brings 16-bit samples whose largest is `max` to 8 bits: the bits the image
/// uses less 8. Cameras store 10- and 12-bit data in 16-bit files; a plain `>> 8` would leave
/// 12-bit data 16 grey levels (and 8-bit data stored in 16 bits none). Each image is binarised by
/// its own threshold, so the scale chosen per image does not shift test against template.
fn depth_shift(max: u16) -> u32 {
    (u16::BITS - max.leading_zeros()).saturating_sub(8)
}

/// ITU-R 601-2 luma, 16.16 fixed point, as Pillow's "L" conversion.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), format)
            .unwrap();
        bytes
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image =
            image::GrayImage::from_fn(width, height, |x, y| image::Luma([((x + y) % 256) as u8]));
        encoded(&DynamicImage::ImageLuma8(image), ImageFormat::Png)
    }

    #[test]
    fn decodes_gray_png() {
        let image = decode_gray(&png(5, 3), 1000).unwrap();
        assert_eq!((image.width, image.height), (5, 3));
        assert_eq!(image.pixels[6], 2);
    }

    #[test]
    fn refuses_what_is_not_an_image_or_too_large_or_truncated() {
        assert!(matches!(
            decode_gray(b"hello world", 1000),
            Err(ImageError::Unsupported(_))
        ));
        assert!(matches!(
            decode_gray(&png(100, 100), 9999),
            Err(ImageError::TooLarge { pixels: 10000, .. })
        ));
        let bytes = png(64, 64);
        assert!(matches!(
            decode_gray(&bytes[..bytes.len() / 2], 1 << 20),
            Err(ImageError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_valid_tiff_of_a_layout_not_read_is_unsupported_not_corrupt() {
        let mut bytes = Vec::new();
        let samples: Vec<f32> = (0..64 * 64).map(|i| i as f32 / 4096.0).collect();
        tiff::encoder::TiffEncoder::new(Cursor::new(&mut bytes))
            .unwrap()
            .write_image::<tiff::encoder::colortype::Gray32Float>(64, 64, &samples)
            .unwrap();
        let error = decode_gray(&bytes, 1 << 20).unwrap_err();
        assert!(
            matches!(error, ImageError::UnsupportedLayout { .. }),
            "{error:?}"
        );
        assert!(
            error.to_string().starts_with("TIFF image in a layout"),
            "{error}"
        );
    }

    #[test]
    fn a_jpeg_cut_short_is_refused() {
        let image = image::GrayImage::from_fn(64, 64, |x, y| image::Luma([(x * y % 251) as u8]));
        let bytes = encoded(&DynamicImage::ImageLuma8(image), ImageFormat::Jpeg);
        assert!(decode_gray(&bytes, 1 << 20).is_ok());
        // Data after the end-of-image marker is tolerated, as decoders do.
        let mut trailer = bytes.clone();
        trailer.extend_from_slice(b"camera trailer");
        assert!(decode_gray(&trailer, 1 << 20).is_ok());
        // Cut inside the scan data, past the headers: the decoder alone would fill in grey.
        let cut = &bytes[..bytes.len() * 3 / 4];
        let error = decode_gray(cut, 1 << 20).unwrap_err().to_string();
        assert!(error.contains("no end-of-image marker"), "{error}");
    }

    #[test]
    fn colour_converts_like_pillow() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
    }

    #[test]
    fn sixteen_bit_samples_keep_the_range_of_the_depth_they_use() {
        // 12-bit camera data in a 16-bit PNG: the full 12-bit range becomes the full 8-bit one.
        let ramp = image::ImageBuffer::from_fn(64, 64, |x, y| image::Luma([(y * 64 + x) as u16]));
        let decoded = decode_gray(
            &encoded(&DynamicImage::ImageLuma16(ramp), ImageFormat::Png),
            1 << 20,
        )
        .unwrap();
        assert_eq!(decoded.pixels[0], 0);
        assert_eq!(decoded.pixels[64 * 64 - 1], 255);
        let levels: std::collections::BTreeSet<u8> = decoded.pixels.iter().copied().collect();
        assert_eq!(levels.len(), 256);
        // 8-bit data stored in 16 bits is used as it is, not shifted to black.
        let small = image::ImageBuffer::from_fn(4, 1, |x, _| image::Luma([x as u16 * 80]));
        let decoded = decode_gray(
            &encoded(&DynamicImage::ImageLuma16(small), ImageFormat::Png),
            100,
        )
        .unwrap();
        assert_eq!(decoded.pixels, [0, 80, 160, 240]);
        // Full 16-bit data loses its low byte, as before.
        assert_eq!(depth_shift(u16::MAX), 8);
        assert_eq!(depth_shift(0), 0);
    }

    #[test]
    fn opaque_alpha_does_not_set_the_depth_of_16_bit_colour() {
        let pixels: [[u16; 4]; 2] = [[4095, 4095, 4095, u16::MAX], [0, 0, 0, u16::MAX]];
        let rgba = image::ImageBuffer::from_fn(2, 1, |x, _| image::Rgba(pixels[x as usize]));
        let decoded = decode_gray(
            &encoded(&DynamicImage::ImageRgba16(rgba), ImageFormat::Png),
            100,
        )
        .unwrap();
        assert_eq!(decoded.pixels, [255, 0]);
    }

    #[test]
    fn colour_tiffs_of_a_board_size_decode() {
        let grey = image::GrayImage::from_fn(640, 640, |x, y| image::Luma([((x ^ y) & 255) as u8]));
        let grey = DynamicImage::ImageLuma8(grey);
        for colour in [
            DynamicImage::ImageRgb8(grey.to_rgb8()),
            DynamicImage::ImageRgba8(grey.to_rgba8()),
            DynamicImage::ImageRgb16(grey.to_rgb16()),
        ] {
            let decoded = decode_gray(&encoded(&colour, ImageFormat::Tiff), 50_000_000)
                .unwrap_or_else(|e| panic!("{:?}: {e}", colour.color()));
            assert_eq!(
                decoded.pixels,
                grey.to_luma8().into_raw(),
                "{:?}",
                colour.color()
            );
        }
    }
}
