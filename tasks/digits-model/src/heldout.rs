use crate::IMAGE_BYTES;

/// Bytes per record in `data/heldout.bin`: an image followed by its true label.
pub const HELDOUT_RECORD_BYTES: usize = IMAGE_BYTES + 1;

static HELDOUT: &[u8] = include_bytes!("../data/heldout.bin");

const _: () = assert!(
    HELDOUT.len().is_multiple_of(HELDOUT_RECORD_BYTES),
    "data/heldout.bin is not a whole number of records: rerun tasks/train.py"
);

/// The held-out images (20 % of the data set, never used in training) with their true labels.
///
/// Yields `(image, label)`: 64 pixels in `0..=16` and the digit a person wrote, in the order
/// `tasks/train.py` stored them. Use it to measure accuracy or as known-good task input.
pub fn heldout() -> impl ExactSizeIterator<Item = (&'static [u8; IMAGE_BYTES], u8)> + Clone {
    let (records, _) = HELDOUT.as_chunks::<HELDOUT_RECORD_BYTES>();
    records.iter().map(|record| {
        let [image @ .., label] = record;
        (image, *label)
    })
}
