//! A WASI preview 1 command: reads all of stdin and writes it to stdout in ASCII upper case.
//!
//! Exports `memory` and `_start`; imports only `fd_read`, `fd_write` and `proc_exit` from
//! `wasi_snapshot_preview1`, declared by hand so no WASI library (and nothing else) comes along.
//! Bytes outside `a..=z` pass through unchanged, so UTF-8 input stays valid UTF-8. Returning
//! from `_start` is exit status 0; a failed read exits 1, a failed write exits 2.
#![no_std]

const STDIN: i32 = 0;
const STDOUT: i32 = 1;
const EXIT_READ_FAILED: i32 = 1;
const EXIT_WRITE_FAILED: i32 = 2;
/// WASI's `errno::success`.
const ESUCCESS: i32 = 0;

/// WASI's `iovec` / `ciovec`: a buffer address and its length in bytes.
#[repr(C)]
struct IoVec {
    buf: *mut u8,
    len: usize,
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    fn fd_read(fd: i32, iovs: *const IoVec, iovs_len: usize, nread: *mut usize) -> i32;
    fn fd_write(fd: i32, iovs: *const IoVec, iovs_len: usize, nwritten: *mut usize) -> i32;
    fn proc_exit(code: i32) -> !;
}

/// The command's entry point, called once by the host.
#[unsafe(no_mangle)]
pub extern "C" fn _start() {
    let mut buf = [0_u8; 4096];
    loop {
        let Some(chunk) = read(STDIN, &mut buf) else {
            exit(EXIT_READ_FAILED)
        };
        if chunk.is_empty() {
            return;
        }
        chunk.make_ascii_uppercase();
        if !write_all(STDOUT, chunk) {
            exit(EXIT_WRITE_FAILED)
        }
    }
}

/// Reads once from `fd` into `buf`; returns the bytes read (empty at end of input), or `None`
/// when the host reports an error or claims more bytes than `buf` holds.
fn read(fd: i32, buf: &mut [u8]) -> Option<&mut [u8]> {
    let iov = IoVec {
        buf: buf.as_mut_ptr(),
        len: buf.len(),
    };
    let mut nread = 0;
    // SAFETY: `iov` describes `buf`, which is writable for its whole length and outlives the
    // call; `nread` is a valid place for the host to store a count.
    let errno = unsafe { fd_read(fd, &iov, 1, &mut nread) };
    if errno != ESUCCESS {
        return None;
    }
    buf.get_mut(..nread)
}

/// Writes all of `bytes` to `fd`, retrying after short writes; `false` when the host reports
/// an error or stops accepting bytes.
fn write_all(fd: i32, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        let iov = IoVec {
            buf: bytes.as_ptr().cast_mut(),
            len: bytes.len(),
        };
        let mut written = 0;
        // SAFETY: `iov` describes `bytes`, readable for its whole length; `fd_write` only reads
        // through the pointer (it is WASI's `ciovec`). `written` is a valid place for a count.
        let errno = unsafe { fd_write(fd, &iov, 1, &mut written) };
        match bytes.get(written..) {
            Some(rest) if errno == ESUCCESS && written > 0 => bytes = rest,
            _ => return false,
        }
    }
    true
}

fn exit(code: i32) -> ! {
    // SAFETY: `proc_exit` takes any status and does not return.
    unsafe { proc_exit(code) }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}
