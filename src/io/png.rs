//! PNG output: grids of images for `pipeline sample` and `pipeline inspect --out`.

use image::{GrayImage, ImageBuffer, Rgb, RgbImage};

use crate::data::ImageShape;
use crate::error::{Error, Result};

/// Gap between tiles, in pixels.
const GAP: usize = 2;
/// The gap's intensity: mid-grey, visible against both black and white digits.
const GAP_LEVEL: u8 = 96;

/// Tiles `images` (each `shape.dims()` values) into a PNG grid of `ceil(sqrt(n))` columns,
/// each pixel drawn as a `scale`×`scale` block. `levels` is 2 for binary pixels (drawn as 0 and
/// 255) or 256 for 8-bit ones.
pub fn grid_png(
    images: &[Vec<u8>],
    shape: ImageShape,
    levels: u16,
    scale: usize,
) -> Result<Vec<u8>> {
    if images.is_empty() {
        return Err(Error::Usage("no images to draw".into()));
    }
    let scale = scale.max(1);
    let cols = (images.len() as f64).sqrt().ceil() as usize;
    let rows = images.len().div_ceil(cols);
    let (tile_h, tile_w) = (shape.height * scale, shape.width * scale);
    let width = cols * tile_w + (cols + 1) * GAP;
    let height = rows * tile_h + (rows + 1) * GAP;
    let c = shape.channels;
    let mut canvas = vec![GAP_LEVEL; width * height * c];
    let intensity = |v: u8| {
        if levels == 2 {
            if v > 0 { 255 } else { 0 }
        } else {
            v
        }
    };
    for (k, img) in images.iter().enumerate() {
        let (gy, gx) = (k / cols, k % cols);
        let (oy, ox) = (GAP + gy * (tile_h + GAP), GAP + gx * (tile_w + GAP));
        for y in 0..tile_h {
            for x in 0..tile_w {
                let src = ((y / scale) * shape.width + x / scale) * c;
                let dst = ((oy + y) * width + ox + x) * c;
                for ch in 0..c {
                    canvas[dst + ch] = intensity(img[src + ch]);
                }
            }
        }
    }
    encode(canvas, width as u32, height as u32, c)
}

/// Encodes raw 8-bit pixels (1 or 3 channels) as PNG bytes.
pub fn encode(pixels: Vec<u8>, width: u32, height: u32, channels: usize) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    let result = if channels == 3 {
        let img: RgbImage = ImageBuffer::<Rgb<u8>, _>::from_raw(width, height, pixels)
            .ok_or_else(|| Error::Internal("pixel buffer does not match its size".into()))?;
        img.write_to(&mut out, image::ImageFormat::Png)
    } else {
        let img = GrayImage::from_raw(width, height, pixels)
            .ok_or_else(|| Error::Internal("pixel buffer does not match its size".into()))?;
        img.write_to(&mut out, image::ImageFormat::Png)
    };
    result.map_err(|e| Error::internal(e, "encoding PNG"))?;
    Ok(out.into_inner())
}

/// The PNG-compressed length (bytes, best compression, adaptive filters) of one image of
/// `shape` whose values are below `levels`; binary pixels are drawn as 0 / 255. The complexity
/// score's L(x).
pub fn compressed_len(pixels: &[u8], shape: ImageShape, levels: u16) -> Result<usize> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let scaled: Vec<u8> = if levels == 2 {
        pixels
            .iter()
            .map(|&v| if v != 0 { 255 } else { 0 })
            .collect()
    } else {
        pixels.to_vec()
    };
    let color = if shape.channels == 3 {
        image::ExtendedColorType::Rgb8
    } else {
        image::ExtendedColorType::L8
    };
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::Adaptive)
        .write_image(&scaled, shape.width as u32, shape.height as u32, color)
        .map_err(|e| Error::internal(e, "encoding PNG"))?;
    Ok(out.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_images_compress_shorter_than_noise() {
        let shape = ImageShape::new(16, 16, 1);
        let flat = vec![0u8; 256];
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
        let noise: Vec<u8> = (0..256).map(|_| rand::Rng::random(&mut rng)).collect();
        let (a, b) = (
            compressed_len(&flat, shape, 256).unwrap(),
            compressed_len(&noise, shape, 256).unwrap(),
        );
        assert!(a < 100 && b > a + 150, "flat {a} bytes, noise {b} bytes");
        let rgb = ImageShape::new(4, 4, 3);
        assert!(compressed_len(&[7u8; 48], rgb, 256).unwrap() > 0);
    }

    #[test]
    fn a_grid_round_trips_through_the_png_decoder() {
        let shape = ImageShape::new(2, 3, 1);
        let images = vec![vec![1, 0, 1, 0, 1, 0]; 5];
        let png = grid_png(&images, shape, 2, 1).unwrap();
        let (s, px) = crate::io::decode::decode_png(&png).unwrap();
        // 3 columns x 2 rows of 2x3 tiles with 2-pixel gaps.
        assert_eq!(
            (s.height, s.width, s.channels),
            (2 * 2 + 3 * GAP, 3 * 3 + 4 * GAP, 1)
        );
        let at = |y: usize, x: usize| px[y * s.width + x];
        assert_eq!(at(GAP, GAP), 255);
        assert_eq!(at(GAP, GAP + 1), 0);
        assert_eq!(at(0, 0), GAP_LEVEL);
    }
}
