use core::fmt;

/// Why [`classify_batch`](crate::classify_batch) rejected its buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchError {
    /// The input length, in bytes, is not a multiple of [`IMAGE_BYTES`](crate::IMAGE_BYTES).
    RaggedInput {
        /// Length of the input, in bytes.
        input_bytes: usize,
    },
    /// The output slice has fewer bytes than the input has images.
    OutputTooShort {
        /// Images in the input, so labels needed.
        images: usize,
        /// Length of the output slice, in bytes (one label per byte).
        output_bytes: usize,
    },
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RaggedInput { input_bytes } => write!(
                f,
                "input is {input_bytes} bytes, not a whole number of {}-byte images",
                crate::IMAGE_BYTES
            ),
            Self::OutputTooShort {
                images,
                output_bytes,
            } => write!(
                f,
                "output has room for {output_bytes} labels but the input holds {images} images"
            ),
        }
    }
}

impl core::error::Error for BatchError {}
