//! WASI preview 1, written by hand with `Linker::func_wrap`: every `wasi_snapshot_preview1`
//! function is linked, and each behaves the same on every node.
//!
//! Granted: stdin (fd 0) reads the task input, stdout (fd 1) is the task output, stderr (fd 2)
//! is captured (bounded) for the report message, `proc_exit`, empty args and environment, a
//! frozen clock (always 0) and a random stream seeded from the task, so every node produces the
//! same bytes. `poll_oneoff` answers every subscription at once (the clock never moves, so a
//! sleep ends immediately) and `sched_yield` returns.
//!
//! Not granted: files, directories, sockets, signals. There are no preopened directories, so
//! the functions for them answer what a program expects from a descriptor it does not have:
//! `EBADF` for any descriptor but 0 to 2, and for the standard streams the errno of a
//! character device (`ESPIPE` for seeks and positioned I/O, `ENOTDIR` for path operations,
//! `ENOTSOCK` for sockets, `ENOTSUP` otherwise); `proc_raise` is `ENOSYS`. A program that
//! merely links `fopen` runs, and one that calls it sees the call fail.

use ambient_core::{MAX_OUTPUT_BYTES, sha3_256};
use wasmtime::{Caller, Linker, Memory};

use super::wasmtime_sandbox::Ctx;

/// The import module every offered function lives in; `ambient_core::WASI_OFFERED` lists
/// them, and `ambient_core::inspect` refuses modules that import anything else.
use ambient_core::WASI_MODULE as MODULE;

/// Bytes of stderr kept for the report message; the rest is counted as written and dropped.
const STDERR_KEEP: usize = 1024;
/// Most iovecs accepted in one call (POSIX `IOV_MAX`); bounds the host work a call can ask for.
const MAX_IOVS: u32 = 1024;
/// Largest `random_get` request, in bytes; the host work is not metered by fuel.
const MAX_RANDOM_BYTES: u32 = 1 << 20;
/// The resolution `clock_res_get` reports, in nanoseconds. The clock itself never moves.
const CLOCK_RESOLUTION_NS: u64 = 1_000;

// WASI errno values used here.
const SUCCESS: i32 = 0;
const BADF: i32 = 8;
const FAULT: i32 = 21;
const INVAL: i32 = 28;
const NOSYS: i32 = 52;
const NOTDIR: i32 = 54;
const NOTSOCK: i32 = 57;
const NOTSUP: i32 = 58;
const SPIPE: i32 = 70;
/// Most subscriptions `poll_oneoff` takes in one call; the host work is not metered by fuel.
const MAX_SUBSCRIPTIONS: u32 = 1024;

/// A `proc_exit` call, carried out of the guest as the trap error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exited with status {}", self.0)
    }
}

impl std::error::Error for ProcExit {}

/// stdout grew past [`MAX_OUTPUT_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OutputTooLarge;

impl std::fmt::Display for OutputTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "output exceeds the {MAX_OUTPUT_BYTES} byte limit")
    }
}

impl std::error::Error for OutputTooLarge {}

/// Per-run WASI state: the input being read, what was written, the random stream.
#[derive(Debug, Default)]
pub(super) struct WasiState {
    input: Vec<u8>,
    read_pos: usize,
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
    random: SeededStream,
}

impl WasiState {
    pub(super) fn new(input: &[u8], seed: u64) -> Self {
        Self {
            input: input.to_vec(),
            random: SeededStream::new(seed),
            ..Self::default()
        }
    }
}

/// A deterministic byte stream: sha3-256(tag ‖ seed ‖ counter) blocks, one after another.
///
/// Not a CSPRNG for secrets (the seed is public); it exists so that replicas of a task that
/// asks for randomness compute the same result.
#[derive(Debug, Default)]
pub(super) struct SeededStream {
    seed: u64,
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl SeededStream {
    pub(super) fn new(seed: u64) -> Self {
        Self {
            seed,
            counter: 0,
            block: [0; 32],
            used: 32,
        }
    }

    pub(super) fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            if self.used == self.block.len() {
                let mut material = [0u8; 37];
                material[..21].copy_from_slice(b"ambient/wasi-rand/v1\0");
                material[21..29].copy_from_slice(&self.seed.to_le_bytes());
                material[29..].copy_from_slice(&self.counter.to_le_bytes());
                self.block = sha3_256(&material).0;
                self.counter += 1;
                self.used = 0;
            }
            *byte = self.block[self.used];
            self.used += 1;
        }
    }
}

/// Links every offered function into `linker`.
pub(super) fn add_to_linker(linker: &mut Linker<Ctx>) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "fd_read", fd_read)?;
    linker.func_wrap(MODULE, "fd_write", fd_write)?;
    linker.func_wrap(MODULE, "fd_close", |_: Caller<'_, Ctx>, fd: i32| -> i32 {
        if is_std(fd) { SUCCESS } else { BADF }
    })?;
    linker.func_wrap(MODULE, "fd_fdstat_get", fd_fdstat_get)?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |_: Caller<'_, Ctx>, fd: i32, _offset: i64, _whence: i32, _out: i32| -> i32 {
            if is_std(fd) { SPIPE } else { BADF }
        },
    )?;
    // No preopened directories: the answer wasi-libc expects when there is no filesystem.
    linker.func_wrap(
        MODULE,
        "fd_prestat_get",
        |_: Caller<'_, Ctx>, _fd: i32, _out: i32| -> i32 { BADF },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |_: Caller<'_, Ctx>, _fd: i32, _path: i32, _len: i32| -> i32 { BADF },
    )?;
    linker.func_wrap(
        MODULE,
        "proc_exit",
        |_: Caller<'_, Ctx>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(ProcExit(code)))
        },
    )?;
    linker.func_wrap(MODULE, "args_sizes_get", write_two_zeros)?;
    linker.func_wrap(
        MODULE,
        "args_get",
        |_: Caller<'_, Ctx>, _argv: i32, _buf: i32| -> i32 { SUCCESS },
    )?;
    linker.func_wrap(MODULE, "environ_sizes_get", write_two_zeros)?;
    linker.func_wrap(
        MODULE,
        "environ_get",
        |_: Caller<'_, Ctx>, _env: i32, _buf: i32| -> i32 { SUCCESS },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut caller: Caller<'_, Ctx>, id: i32, _precision: i64, out: i32| {
            clock_write(&mut caller, id, out, 0)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut caller: Caller<'_, Ctx>, id: i32, out: i32| {
            clock_write(&mut caller, id, out, CLOCK_RESOLUTION_NS)
        },
    )?;
    linker.func_wrap(MODULE, "random_get", random_get)?;
    linker.func_wrap(MODULE, "sched_yield", |_: Caller<'_, Ctx>| -> i32 {
        SUCCESS
    })?;
    linker.func_wrap(MODULE, "poll_oneoff", poll_oneoff)?;
    add_denied(linker)
}

/// What a call on `fd` answers when the sandbox does not grant the capability: `on_std` for
/// the standard streams, `EBADF` for any other descriptor (none is open).
fn denied(fd: i32, on_std: i32) -> i32 {
    if is_std(fd) { on_std } else { BADF }
}

/// Links the functions for capabilities the sandbox does not grant (see the module docs).
/// None of them reads or writes guest memory.
fn add_denied(linker: &mut Linker<Ctx>) -> wasmtime::Result<()> {
    type C<'a> = Caller<'a, Ctx>;
    // Descriptors.
    linker.func_wrap(
        MODULE,
        "fd_advise",
        |_: C<'_>, fd: i32, _: i64, _: i64, _: i32| denied(fd, SPIPE),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_allocate",
        |_: C<'_>, fd: i32, _: i64, _: i64| denied(fd, SPIPE),
    )?;
    linker.func_wrap(MODULE, "fd_datasync", |_: C<'_>, fd: i32| denied(fd, INVAL))?;
    linker.func_wrap(MODULE, "fd_sync", |_: C<'_>, fd: i32| denied(fd, INVAL))?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_flags",
        |_: C<'_>, fd: i32, _: i32| denied(fd, NOTSUP),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_rights",
        |_: C<'_>, fd: i32, _: i64, _: i64| denied(fd, NOTSUP),
    )?;
    linker.func_wrap(MODULE, "fd_filestat_get", |_: C<'_>, fd: i32, _: i32| {
        denied(fd, NOTSUP)
    })?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_set_size",
        |_: C<'_>, fd: i32, _: i64| denied(fd, INVAL),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_set_times",
        |_: C<'_>, fd: i32, _: i64, _: i64, _: i32| denied(fd, INVAL),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_pread",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i64, _: i32| denied(fd, SPIPE),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_pwrite",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i64, _: i32| denied(fd, SPIPE),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_readdir",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i64, _: i32| denied(fd, NOTDIR),
    )?;
    linker.func_wrap(MODULE, "fd_renumber", |_: C<'_>, fd: i32, to: i32| {
        if is_std(fd) && is_std(to) {
            NOTSUP
        } else {
            BADF
        }
    })?;
    linker.func_wrap(MODULE, "fd_tell", |_: C<'_>, fd: i32, _: i32| {
        denied(fd, SPIPE)
    })?;
    // Paths: relative to a directory descriptor, and there is none.
    linker.func_wrap(
        MODULE,
        "path_create_directory",
        |_: C<'_>, fd: i32, _: i32, _: i32| denied(fd, NOTDIR),
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_get",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i32, _: i32| denied(fd, NOTDIR),
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_set_times",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32| denied(fd, NOTDIR),
    )?;
    linker.func_wrap(
        MODULE,
        "path_link",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| denied(fd, NOTDIR),
    )?;
    linker.func_wrap(
        MODULE,
        "path_open",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32, _: i32| {
            denied(fd, NOTDIR)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_readlink",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i32, _: i32, _: i32| denied(fd, NOTDIR),
    )?;
    linker.func_wrap(
        MODULE,
        "path_remove_directory",
        |_: C<'_>, fd: i32, _: i32, _: i32| denied(fd, NOTDIR),
    )?;
    linker.func_wrap(
        MODULE,
        "path_rename",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i32, _: i32, _: i32| denied(fd, NOTDIR),
    )?;
    linker.func_wrap(
        MODULE,
        "path_symlink",
        |_: C<'_>, _: i32, _: i32, fd: i32, _: i32, _: i32| denied(fd, NOTDIR),
    )?;
    linker.func_wrap(
        MODULE,
        "path_unlink_file",
        |_: C<'_>, fd: i32, _: i32, _: i32| denied(fd, NOTDIR),
    )?;
    // Sockets and signals.
    linker.func_wrap(
        MODULE,
        "sock_accept",
        |_: C<'_>, fd: i32, _: i32, _: i32| denied(fd, NOTSOCK),
    )?;
    linker.func_wrap(
        MODULE,
        "sock_recv",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i32, _: i32, _: i32| denied(fd, NOTSOCK),
    )?;
    linker.func_wrap(
        MODULE,
        "sock_send",
        |_: C<'_>, fd: i32, _: i32, _: i32, _: i32, _: i32| denied(fd, NOTSOCK),
    )?;
    linker.func_wrap(MODULE, "sock_shutdown", |_: C<'_>, fd: i32, _: i32| {
        denied(fd, NOTSOCK)
    })?;
    linker.func_wrap(MODULE, "proc_raise", |_: C<'_>, _: i32| NOSYS)?;
    Ok(())
}

/// `poll_oneoff(in, out, nsubscriptions, nevents)`: every subscription is answered at once.
/// The clock never moves, so a clock subscription has expired by definition; the standard
/// streams never block (stdin is all there, stdout and stderr take everything); any other
/// descriptor answers `EBADF` in its event.
fn poll_oneoff(mut caller: Caller<'_, Ctx>, subs: i32, events: i32, n: i32, nevents: i32) -> i32 {
    // subscription: userdata u64 @0, tag u8 @8, then for fd_read/fd_write the fd u32 @16; 48 bytes.
    // event: userdata u64 @0, error u16 @8, type u8 @10, nbytes u64 @16, flags u16 @24; 32 bytes.
    const SUBSCRIPTION: u32 = 48;
    const EVENT: u32 = 32;
    const CLOCK: u8 = 0;
    let Ok(n) = u32::try_from(n) else {
        return INVAL;
    };
    if n == 0 || n > MAX_SUBSCRIPTIONS {
        return INVAL;
    }
    let Some(memory) = memory(&mut caller) else {
        return FAULT;
    };
    let mem = memory.data_mut(&mut caller);
    let (Some(input), Some(output)) = (
        range(mem.len(), subs as u32, n * SUBSCRIPTION),
        range(mem.len(), events as u32, n * EVENT),
    ) else {
        return FAULT;
    };
    let input = mem[input].to_vec();
    let output = &mut mem[output];
    for (sub, event) in input
        .chunks_exact(SUBSCRIPTION as usize)
        .zip(output.chunks_exact_mut(EVENT as usize))
    {
        let tag = sub[8];
        let fd = i32::from_le_bytes(sub[16..20].try_into().unwrap_or_default());
        let error = if tag == CLOCK || (tag <= 2 && is_std(fd)) {
            SUCCESS
        } else if tag <= 2 {
            BADF
        } else {
            INVAL
        };
        event.fill(0);
        event[..8].copy_from_slice(&sub[..8]);
        event[8..10].copy_from_slice(&(error as u16).to_le_bytes());
        event[10] = tag;
    }
    match write_bytes(mem, nevents as u32, &n.to_le_bytes()) {
        Some(()) => SUCCESS,
        None => FAULT,
    }
}

fn is_std(fd: i32) -> bool {
    (0..=2).contains(&fd)
}

fn memory(caller: &mut Caller<'_, Ctx>) -> Option<Memory> {
    caller.get_export("memory")?.into_memory()
}

/// The `len` bytes at guest address `ptr`, if they are inside `mem`.
fn range(mem_len: usize, ptr: u32, len: u32) -> Option<std::ops::Range<usize>> {
    let start = ptr as usize;
    let end = start.checked_add(len as usize)?;
    (end <= mem_len).then_some(start..end)
}

fn read_u32(mem: &[u8], ptr: u32) -> Option<u32> {
    let r = range(mem.len(), ptr, 4)?;
    Some(u32::from_le_bytes(mem[r].try_into().ok()?))
}

fn write_bytes(mem: &mut [u8], ptr: u32, bytes: &[u8]) -> Option<()> {
    let r = range(mem.len(), ptr, u32::try_from(bytes.len()).ok()?)?;
    mem[r].copy_from_slice(bytes);
    Some(())
}

/// The `(buf, len)` pairs of an iovec array, checked against memory bounds.
fn iovecs(mem: &[u8], iovs: i32, count: i32) -> Result<Vec<std::ops::Range<usize>>, i32> {
    let count = u32::try_from(count).map_err(|_| INVAL)?;
    if count > MAX_IOVS {
        return Err(INVAL);
    }
    let base = iovs as u32;
    (0..count)
        .map(|i| {
            let at = base.checked_add(i * 8).ok_or(FAULT)?;
            let buf = read_u32(mem, at).ok_or(FAULT)?;
            let len = read_u32(mem, at.checked_add(4).ok_or(FAULT)?).ok_or(FAULT)?;
            range(mem.len(), buf, len).ok_or(FAULT)
        })
        .collect()
}

fn fd_read(mut caller: Caller<'_, Ctx>, fd: i32, iovs: i32, iovs_len: i32, nread: i32) -> i32 {
    if fd != 0 {
        return BADF;
    }
    let Some(memory) = memory(&mut caller) else {
        return FAULT;
    };
    let (mem, ctx) = memory.data_and_store_mut(&mut caller);
    let bufs = match iovecs(mem, iovs, iovs_len) {
        Ok(b) => b,
        Err(errno) => return errno,
    };
    let wasi = &mut ctx.wasi;
    let mut total = 0usize;
    for buf in bufs {
        let rest = &wasi.input[wasi.read_pos..];
        let n = rest.len().min(buf.len());
        mem[buf.start..buf.start + n].copy_from_slice(&rest[..n]);
        wasi.read_pos += n;
        total += n;
        if wasi.read_pos == wasi.input.len() {
            break;
        }
    }
    // `total` is at most the input size (≤ 4 MiB), so it fits in 32 bits.
    match write_bytes(mem, nread as u32, &(total as u32).to_le_bytes()) {
        Some(()) => SUCCESS,
        None => FAULT,
    }
}

fn fd_write(
    mut caller: Caller<'_, Ctx>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    if fd != 1 && fd != 2 {
        return Ok(BADF);
    }
    let Some(memory) = memory(&mut caller) else {
        return Ok(FAULT);
    };
    let (mem, ctx) = memory.data_and_store_mut(&mut caller);
    let bufs = match iovecs(mem, iovs, iovs_len) {
        Ok(b) => b,
        Err(errno) => return Ok(errno),
    };
    let wasi = &mut ctx.wasi;
    let mut total = 0usize;
    for buf in bufs {
        let bytes = &mem[buf];
        if fd == 1 {
            if wasi.stdout.len() + bytes.len() > MAX_OUTPUT_BYTES {
                return Err(wasmtime::Error::new(OutputTooLarge));
            }
            wasi.stdout.extend_from_slice(bytes);
        } else {
            let keep = STDERR_KEEP
                .saturating_sub(wasi.stderr.len())
                .min(bytes.len());
            wasi.stderr.extend_from_slice(&bytes[..keep]);
        }
        total += bytes.len();
    }
    // Each buffer lies inside a 32-bit memory and there are at most 1024, but the sum could
    // pass u32::MAX in theory; report what fits, as a short write.
    let total = u32::try_from(total).unwrap_or(u32::MAX);
    Ok(
        match write_bytes(mem, nwritten as u32, &total.to_le_bytes()) {
            Some(()) => SUCCESS,
            None => FAULT,
        },
    )
}

fn fd_fdstat_get(mut caller: Caller<'_, Ctx>, fd: i32, out: i32) -> i32 {
    const CHARACTER_DEVICE: u8 = 2;
    const RIGHT_FD_READ: u64 = 1 << 1;
    const RIGHT_FD_WRITE: u64 = 1 << 6;
    if !is_std(fd) {
        return BADF;
    }
    let rights = if fd == 0 {
        RIGHT_FD_READ
    } else {
        RIGHT_FD_WRITE
    };
    // struct fdstat { u8 filetype; u16 flags (at 2); u64 rights_base (at 8); u64 inheriting (at 16) }
    let mut stat = [0u8; 24];
    stat[0] = CHARACTER_DEVICE;
    stat[8..16].copy_from_slice(&rights.to_le_bytes());
    let Some(memory) = memory(&mut caller) else {
        return FAULT;
    };
    match write_bytes(memory.data_mut(&mut caller), out as u32, &stat) {
        Some(()) => SUCCESS,
        None => FAULT,
    }
}

fn write_two_zeros(mut caller: Caller<'_, Ctx>, count: i32, size: i32) -> i32 {
    let Some(memory) = memory(&mut caller) else {
        return FAULT;
    };
    let mem = memory.data_mut(&mut caller);
    match (
        write_bytes(mem, count as u32, &[0; 4]),
        write_bytes(mem, size as u32, &[0; 4]),
    ) {
        (Some(()), Some(())) => SUCCESS,
        _ => FAULT,
    }
}

fn clock_write(caller: &mut Caller<'_, Ctx>, id: i32, out: i32, value: u64) -> i32 {
    // realtime, monotonic, process cputime, thread cputime
    if !(0..=3).contains(&id) {
        return INVAL;
    }
    let Some(memory) = memory(caller) else {
        return FAULT;
    };
    match write_bytes(memory.data_mut(caller), out as u32, &value.to_le_bytes()) {
        Some(()) => SUCCESS,
        None => FAULT,
    }
}

fn random_get(mut caller: Caller<'_, Ctx>, buf: i32, len: i32) -> i32 {
    let Ok(len) = u32::try_from(len) else {
        return INVAL;
    };
    if len > MAX_RANDOM_BYTES {
        return INVAL;
    }
    let Some(memory) = memory(&mut caller) else {
        return FAULT;
    };
    let (mem, ctx) = memory.data_and_store_mut(&mut caller);
    match range(mem.len(), buf as u32, len) {
        Some(r) => {
            ctx.wasi.random.fill(&mut mem[r]);
            SUCCESS
        }
        None => FAULT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeded_stream_is_the_same_for_the_same_seed_and_differs_between_seeds() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 100];
        let mut c = [0u8; 100];
        SeededStream::new(1).fill(&mut a);
        let mut split = SeededStream::new(1);
        split.fill(&mut b[..33]);
        split.fill(&mut b[33..]);
        SeededStream::new(2).fill(&mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn a_range_past_the_end_of_memory_is_refused() {
        assert_eq!(range(10, 8, 2), Some(8..10));
        assert_eq!(range(10, 8, 3), None);
        assert_eq!(range(10, u32::MAX, u32::MAX), None);
    }
}
