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
    let pixels = image.map(|pixel| i32::from(pixel.min(PIXEL_MAX)));
    let mut hidden = [0_i32; HIDDEN];
    for ((unit, weights), bias) in hidden.iter_mut().zip(&W1).zip(&B1) {
        let sum = weights
            .iter()
            .zip(&pixels)
            .fold(*bias, |acc, (&w, &x)| acc + i32::from(w) * x);
        *unit = sum.max(0);
    }

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
