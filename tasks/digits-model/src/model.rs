use crate::BatchError;
use crate::weights::{B1, B2, CLASSES, HIDDEN, W1, W2};

/// Bytes in one image: 8 × 8 pixels, row by row from the top left, one byte per pixel.
pub const IMAGE_BYTES: usize = 64;

/// The darkest pixel value: intensities run from 0 (blank) to 16 (full ink), the scale of
/// scikit-learn's digits data set. Larger byte values are read as 16.
pub const PIXEL_MAX: u8 = 16;

/// Classifies one 8×8 image and returns its digit, 0 to 9.
///
/// `image` holds 64 pixel intensities in `0..=16` (see [`PIXEL_MAX`]), row-major. The
/// arithmetic is integer-only, so the label is the same on every target. Costs about 2,400
/// multiply-adds and no allocation.
pub fn classify(image: &[u8; IMAGE_BYTES]) -> u8 {
    // train.py computes the largest accumulator any image in 0..=16 can produce and refuses
    // to write weights for which it exceeds i32::MAX (today it is about 1.8e7), so this
    // arithmetic cannot overflow. Clamping the pixels is what makes that bound hold.
    let hidden = hidden_layer(image);
    let mut best_digit = 0;
    let mut best_score = i32::MIN;
    for (digit, (weights, bias)) in (0_u8..).zip(W2.iter().zip(&B2)) {
        let score = weights
            .iter()
            .zip(&hidden)
            .fold(*bias, |acc, (&w, &h)| acc + i32::from(w) * h);
        // Strictly greater: a tie goes to the lower digit, as in train.py's np.argmax.
        if score > best_score {
            best_digit = digit;
            best_score = score;
        }
    }
    debug_assert!(usize::from(best_digit) < CLASSES);
    best_digit
}

/// The first layer: `max(0, B1 + W1 · pixels)` per hidden unit, pixels clamped to
/// [`PIXEL_MAX`].
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
fn hidden_layer(image: &[u8; IMAGE_BYTES]) -> [i32; HIDDEN] {
    let pixels = image.map(|pixel| i32::from(pixel.min(PIXEL_MAX)));
    let mut hidden = [0_i32; HIDDEN];
    for ((unit, weights), bias) in hidden.iter_mut().zip(&W1).zip(&B1) {
        let sum = weights
            .iter()
            .zip(&pixels)
            .fold(*bias, |acc, (&w, &x)| acc + i32::from(w) * x);
        *unit = sum.max(0);
    }
    hidden
}

/// The first layer with 128-bit WASM SIMD: the same integers as the scalar version, eight
/// multiply-adds per `i32x4.dot_i16x8_s`. A pixel (at most 16) times a weight (at most 128 in
/// magnitude) fits an `i16`, and the sum of two such products an `i32`.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
fn hidden_layer(image: &[u8; IMAGE_BYTES]) -> [i32; HIDDEN] {
    use core::arch::wasm32::{
        i16x8_extend_high_i8x16, i16x8_extend_low_i8x16, i32x4_add, i32x4_dot_i16x8,
        i32x4_extract_lane, u8x16_min, u8x16_splat, u16x8_extend_high_u8x16,
        u16x8_extend_low_u8x16, v128,
    };
    let max = u8x16_splat(PIXEL_MAX);
    let mut pixels = [u8x16_splat(0); 8];
    for (pair, chunk) in pixels.chunks_exact_mut(2).zip(image.as_chunks::<16>().0) {
        let clamped = u8x16_min(load16(chunk), max);
        pair[0] = u16x8_extend_low_u8x16(clamped);
        pair[1] = u16x8_extend_high_u8x16(clamped);
    }
    let mut hidden = [0_i32; HIDDEN];
    for ((unit, weights), bias) in hidden.iter_mut().zip(&W1).zip(&B1) {
        let mut acc: v128 = u8x16_splat(0);
        for (chunk, p) in weights
            .as_chunks::<16>()
            .0
            .iter()
            .zip(pixels.chunks_exact(2))
        {
            let w = load16(chunk);
            acc = i32x4_add(acc, i32x4_dot_i16x8(i16x8_extend_low_i8x16(w), p[0]));
            acc = i32x4_add(acc, i32x4_dot_i16x8(i16x8_extend_high_i8x16(w), p[1]));
        }
        let sum = i32x4_extract_lane::<0>(acc)
            + i32x4_extract_lane::<1>(acc)
            + i32x4_extract_lane::<2>(acc)
            + i32x4_extract_lane::<3>(acc);
        *unit = (bias + sum).max(0);
    }
    hidden
}

/// One `v128.load` of 16 bytes (`u8` pixels or `i8` weights). Building the vector lane by lane
/// from the array instead costs 16 instructions, and fuel counts instructions.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[allow(unsafe_code)]
fn load16<T: Copy>(bytes: &[T; 16]) -> core::arch::wasm32::v128 {
    const { assert!(size_of::<T>() == 1) };
    // SAFETY: `bytes` is 16 readable bytes (T is one byte wide), and `v128.load` has no
    // alignment requirement.
    unsafe { core::arch::wasm32::v128_load(bytes.as_ptr().cast()) }
}

/// Classifies images packed back to back and writes one label per image into `labels`.
///
/// `images` holds N images of [`IMAGE_BYTES`] each (N may be 0); label `i` goes to
/// `labels[i]`, and bytes of `labels` past N are left untouched. Equivalent to calling
/// [`classify`] on each image.
///
/// # Errors
///
/// [`BatchError::RaggedInput`] when `images.len()` is not a multiple of 64, and
/// [`BatchError::OutputTooShort`] when `labels` is shorter than N. Nothing is written then.
pub fn classify_batch(images: &[u8], labels: &mut [u8]) -> Result<(), BatchError> {
    let (chunks, rest) = images.as_chunks::<IMAGE_BYTES>();
    if !rest.is_empty() {
        return Err(BatchError::RaggedInput {
            input_bytes: images.len(),
        });
    }
    if labels.len() < chunks.len() {
        return Err(BatchError::OutputTooShort {
            images: chunks.len(),
            output_bytes: labels.len(),
        });
    }
    for (label, image) in labels.iter_mut().zip(chunks) {
        *label = classify(image);
    }
    Ok(())
}
