//! The quantised model against the held-out images, and the batch API against single images.

use ambient_digits::{BatchError, IMAGE_BYTES, classify, classify_batch, heldout};

/// What `python3 tasks/train.py` printed as "quantised held-out accuracy": 354/360.
/// A retrain that changes it must update these two numbers (and tasks/README.md).
const TRAIN_PY_QUANTISED_CORRECT: usize = 354;
const TRAIN_PY_HELDOUT_IMAGES: usize = 360;

fn heldout_images() -> Vec<u8> {
    heldout().flat_map(|(image, _)| *image).collect()
}

#[test]
fn the_quantised_model_scores_exactly_what_train_py_reported() {
    let total = heldout().len();
    let correct = heldout()
        .filter(|(image, label)| classify(image) == *label)
        .count();

    assert_eq!(total, TRAIN_PY_HELDOUT_IMAGES);
    assert_eq!(correct, TRAIN_PY_QUANTISED_CORRECT);
    assert!(
        correct * 100 >= 90 * total,
        "accuracy {correct}/{total} is below 90 %"
    );
}

#[test]
fn the_heldout_mistakes_are_exactly_these_six() {
    // (record index, true digit, predicted digit), as train.py's integer inference and
    // digits.wasm (tasks/check_modules.py) also predict. With the count above this pins
    // every one of the 360 labels, so any change in the arithmetic shows up here.
    let mistakes: Vec<(usize, u8, u8)> = heldout()
        .enumerate()
        .map(|(index, (image, label))| (index, label, classify(image)))
        .filter(|(_, label, predicted)| label != predicted)
        .collect();

    assert_eq!(
        mistakes,
        [
            (90, 5, 9),
            (123, 9, 8),
            (158, 8, 1),
            (194, 1, 8),
            (246, 9, 8),
            (308, 5, 4)
        ]
    );
}

#[test]
fn every_heldout_record_holds_pixels_in_range_and_a_digit_label() {
    for (image, label) in heldout() {
        assert!(
            image
                .iter()
                .all(|&pixel| pixel <= ambient_digits::PIXEL_MAX)
        );
        assert!(label <= 9);
    }
}

#[test]
fn a_batch_labels_every_image_exactly_as_one_at_a_time() {
    let images = heldout_images();
    let mut labels = vec![0xff; heldout().len()];

    classify_batch(&images, &mut labels).expect("whole images and room for every label");

    let one_at_a_time: Vec<u8> = heldout().map(|(image, _)| classify(image)).collect();
    assert_eq!(labels, one_at_a_time);
}

#[test]
fn a_batch_leaves_output_bytes_past_the_last_image_untouched() {
    let images = heldout_images();
    let mut labels = [0xaa; 4];

    classify_batch(&images[..2 * IMAGE_BYTES], &mut labels).expect("two whole images");

    assert_ne!(labels[0], 0xaa);
    assert_ne!(labels[1], 0xaa);
    assert_eq!(labels[2..], [0xaa, 0xaa]);
}

#[test]
fn an_empty_batch_is_accepted_and_writes_nothing() {
    let mut labels = [0xaa; 1];
    assert_eq!(classify_batch(&[], &mut labels), Ok(()));
    assert_eq!(labels, [0xaa]);
}

#[test]
fn a_ragged_batch_is_rejected_with_its_length_and_nothing_written() {
    let images = heldout_images();
    let mut labels = [0xaa; 2];

    let error = classify_batch(&images[..IMAGE_BYTES + 1], &mut labels).unwrap_err();

    assert_eq!(error, BatchError::RaggedInput { input_bytes: 65 });
    assert_eq!(
        error.to_string(),
        "input is 65 bytes, not a whole number of 64-byte images"
    );
    assert_eq!(labels, [0xaa, 0xaa]);
}

#[test]
fn a_batch_with_too_little_room_for_labels_is_rejected() {
    let images = heldout_images();
    let mut labels = [0xaa; 2];

    let error = classify_batch(&images[..3 * IMAGE_BYTES], &mut labels).unwrap_err();

    assert_eq!(
        error,
        BatchError::OutputTooShort {
            images: 3,
            output_bytes: 2
        }
    );
    assert_eq!(
        error.to_string(),
        "output has room for 2 labels but the input holds 3 images"
    );
    assert_eq!(labels, [0xaa, 0xaa]);
}

#[test]
fn pixels_above_16_are_read_as_16() {
    for (image, _) in heldout().take(20) {
        let mut saturated = *image;
        let mut clamped = *image;
        for (s, c) in saturated.iter_mut().zip(clamped.iter_mut()) {
            if *s == 16 {
                *s = 255;
            }
            *c = (*c).min(16);
        }
        assert_eq!(classify(&saturated), classify(&clamped));
    }
    assert!(classify(&[u8::MAX; IMAGE_BYTES]) <= 9);
}
