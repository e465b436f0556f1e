//! The digits task module: the Ambient task ABI around [`ambient_digits::classify_batch`].
//!
//! Exports `memory`, `alloc(len: i32) -> i32` and `classify(ptr: i32, len: i32) -> i64`, and
//! imports nothing. The host calls `alloc(len)`, writes N images of 64 bytes at the returned
//! pointer, calls `classify(ptr, len)` and reads N label bytes (one digit 0..=9 per image) at
//! the pointer in the high 32 bits of the result, the length being the low 32 bits. Any
//! invalid call traps. See tasks/README.md for the full contract.
#![no_std]

use ambient_digits::{IMAGE_BYTES, classify_batch};
use core::arch::wasm32;

/// Bytes in one page of WebAssembly linear memory.
const PAGE_BYTES: usize = 65_536;

unsafe extern "C" {
    // Defined by the linker (wasm-ld): the first address past the stack and static data.
    // Everything from here to the end of memory belongs to `alloc`.
    static __heap_base: u8;
}

/// Returns a pointer to `len` fresh, zeroed bytes of linear memory; traps if `len` is negative
/// or memory cannot grow.
///
/// Each call grows memory by whole 64 KiB pages and hands out the start of them. Nothing is
/// ever freed: the host runs each task in a fresh instance.
#[unsafe(no_mangle)]
pub extern "C" fn alloc(len: i32) -> i32 {
    let Ok(len) = usize::try_from(len) else {
        wasm32::unreachable()
    };
    grow(len).cast_signed()
}

/// Classifies the `len / 64` images at `ptr` and returns where their labels are:
/// `(out_ptr << 32) | out_len`, with `out_len == len / 64`.
///
/// Traps (the host reports a task error) when `len` is 0 or not a multiple of 64, or when
/// `ptr..ptr + len` is not memory that `alloc` handed out.
#[unsafe(no_mangle)]
pub extern "C" fn classify(ptr: i32, len: i32) -> i64 {
    let images = allocated_bytes(ptr.cast_unsigned(), len);
    if images.is_empty() || !images.len().is_multiple_of(IMAGE_BYTES) {
        wasm32::unreachable()
    }
    let count = images.len() / IMAGE_BYTES;
    let out_ptr = grow(count);
    // SAFETY: `grow` just added these `count` bytes to linear memory, so they are in bounds,
    // disjoint from `images`, and no other reference to them exists.
    let labels = unsafe { core::slice::from_raw_parts_mut(out_ptr as usize as *mut u8, count) };
    if classify_batch(images, labels).is_err() {
        wasm32::unreachable()
    }
    // `count` is at most `len` / 64, so it fits in 32 bits.
    (i64::from(out_ptr) << 32) | count as i64
}

/// Grows linear memory by enough pages for `len` bytes and returns the first new address.
fn grow(len: usize) -> u32 {
    let previous_pages = wasm32::memory_grow::<0>(len.div_ceil(PAGE_BYTES));
    if previous_pages == usize::MAX {
        wasm32::unreachable()
    }
    // A 32-bit memory holds at most 65,536 pages; only `len == 0` on a full memory reaches
    // 2^32 here, and that is refused rather than wrapped.
    match u32::try_from(previous_pages * PAGE_BYTES) {
        Ok(address) => address,
        Err(_) => wasm32::unreachable(),
    }
}

/// The `len` bytes at `ptr`, after checking they lie between the heap base and the end of
/// memory, i.e. in memory that `alloc` handed out; traps otherwise.
fn allocated_bytes(ptr: u32, len: i32) -> &'static [u8] {
    let Ok(len) = usize::try_from(len) else {
        wasm32::unreachable()
    };
    let start = ptr as usize;
    let heap_base = (&raw const __heap_base) as usize;
    let memory_end = wasm32::memory_size::<0>() * PAGE_BYTES;
    match start.checked_add(len) {
        Some(end) if start >= heap_base && end <= memory_end => {}
        _ => wasm32::unreachable(),
    }
    // SAFETY: the range is inside linear memory and at or above the heap base, so it overlaps
    // neither the stack nor any Rust static; the module is single-threaded and keeps no other
    // reference to memory it handed out, so nothing writes these bytes while the slice lives.
    unsafe { core::slice::from_raw_parts(start as *const u8, len) }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    wasm32::unreachable()
}
