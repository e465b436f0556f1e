//! The execution engine: one trait, [`Sandbox`], and its wasmtime implementation.
//!
//! A sandbox turns module bytes into a [`Prepared`] module once (validated, compiled, cached by
//! sha3-256), then runs it many times, each run in a fresh instance held to [`Limits`]. Every
//! way a run can end maps onto one [`Exit`]; nothing a module does panics the agent.
//!
//! ```
//! use ambient_agent::engine::{Call, Sandbox, SandboxConfig, Wasmtime};
//! use ambient_core::{Abi, Exit, Limits, sha3_256};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sandbox = Wasmtime::new(SandboxConfig::default())?;
//! // (module (func (export "_start")))
//! let bytes = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x03\x02\x01\0\x07\x0a\x01\x06_start\0\0\x0a\x04\x01\x02\0\x0b";
//! let module = sandbox.prepare(sha3_256(bytes), bytes)?;
//! let run = sandbox.execute(&module, &Call::new(Abi::Wasi, "_start", b"", Limits::default(), 7));
//! assert_eq!(run.exit, Exit::Ok);
//! # Ok(())
//! # }
//! ```

use std::any::Any;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambient_core::{
    Abi, Digest, Engine, Exit, Limits, MAX_MODULE_BYTES, ModuleError, TaskId, sha3_256,
};

mod wasi;
#[cfg(feature = "wasmedge")]
mod wasmedge_sandbox;
mod wasmtime_sandbox;

#[cfg(feature = "wasmedge")]
pub use wasmedge_sandbox::WasmEdge;
pub use wasmtime_sandbox::{FUEL_SAVE_EVERY, Wasmtime};

/// A WASM runtime that validates, compiles, caches and runs task modules under limits.
///
/// Implementations are shared between threads: `prepare` and `execute` block and belong on a
/// blocking thread pool (`tokio::task::spawn_blocking`), never on an async executor thread.
pub trait Sandbox: Send + Sync {
    /// Which engine this is; written into every receipt.
    fn engine(&self) -> Engine;

    /// Validates, compiles and caches the module whose sha3-256 is `hash`.
    ///
    /// # Errors
    /// [`ExecError`] when the bytes do not match `hash`, are larger than the configured cap,
    /// do not validate, take longer than the compile-time cap, or import anything the sandbox
    /// does not offer. Such a module is reported with [`Exit::Rejected`].
    fn prepare(&self, hash: Digest, bytes: &[u8]) -> Result<Arc<Prepared>, ExecError>;

    /// The prepared module for `hash` if it is in memory, or on disk in the sandbox's cache
    /// directory (verified by hash); `None` if it must be fetched. May compile, so it blocks.
    ///
    /// # Errors
    /// [`ExecError`] when a stored module exists but no longer compiles (for example after
    /// the node's limits changed); the stored copy is discarded.
    fn load(&self, hash: &Digest) -> Result<Option<Arc<Prepared>>, ExecError>;

    /// The prepared module for `hash` if it is already in memory; never blocks.
    fn cached(&self, hash: &Digest) -> Option<Arc<Prepared>>;

    /// Runs a prepared module once under `call.limits`. Blocks until the run ends.
    fn execute(&self, module: &Prepared, call: &Call<'_>) -> Execution;
}

/// What one execution asks for.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// Calling convention.
    pub abi: Abi,
    /// Export to call for [`Abi::Plain`]; ignored for [`Abi::Wasi`] (always `_start`).
    pub entry: &'a str,
    /// Input bytes: the entry's argument (Plain) or stdin (WASI).
    pub input: &'a [u8],
    /// Memory, wall-clock and fuel limits.
    pub limits: Limits,
    /// Seeds the WASI `random_get` stream; see [`task_seed`].
    pub seed: u64,
}

impl<'a> Call<'a> {
    /// A call with every field given.
    pub fn new(abi: Abi, entry: &'a str, input: &'a [u8], limits: Limits, seed: u64) -> Self {
        Self {
            abi,
            entry,
            input,
            limits,
            seed,
        }
    }
}

/// How a run ended and what it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// The task's output; empty unless `exit` is [`Exit::Ok`].
    pub output: Vec<u8>,
    /// Fuel consumed: the limit minus what was left (the whole limit on [`Exit::OutOfFuel`]).
    pub fuel_used: u64,
    /// How the run ended.
    pub exit: Exit,
    /// Human-readable detail for anything but [`Exit::Ok`]; empty on success.
    pub message: String,
}

impl Execution {
    /// A run refused before it started.
    pub fn rejected(error: &ExecError) -> Self {
        Self {
            output: Vec::new(),
            fuel_used: 0,
            exit: Exit::Rejected,
            message: error.to_string(),
        }
    }
}

/// A module that passed validation and compilation, ready to instantiate.
///
/// The compiled form is private to the sandbox that made it; handing it to another sandbox
/// makes `execute` reject the run rather than misbehave.
pub struct Prepared {
    hash: Digest,
    len: usize,
    inner: Box<dyn Any + Send + Sync>,
}

impl Prepared {
    /// Wraps a sandbox's compiled form.
    pub(crate) fn new(hash: Digest, len: usize, inner: Box<dyn Any + Send + Sync>) -> Self {
        Self { hash, len, inner }
    }

    /// sha3-256 of the module bytes.
    pub fn hash(&self) -> Digest {
        self.hash
    }

    /// Size of the module bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the module had no bytes (never true for a valid module).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn inner<T: 'static>(&self) -> Option<&T> {
        self.inner.downcast_ref()
    }
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("hash", &self.hash)
            .field("len", &self.len)
            .finish()
    }
}

/// Why a module was refused before it ran. Each maps to [`Exit::Rejected`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The module is larger than the sandbox accepts.
    #[error("module is {len} bytes, more than the {max} byte limit")]
    TooLarge {
        /// Its size in bytes.
        len: usize,
        /// The cap in bytes.
        max: usize,
    },
    /// The bytes do not hash to the digest they were announced under.
    #[error("module bytes hash to {actual}, not to the requested {expected}")]
    HashMismatch {
        /// The hash asked for.
        expected: Digest,
        /// The hash of the bytes.
        actual: Digest,
    },
    /// The module is refused before compiling: not WASM, invalid, or it imports something
    /// the sandbox does not offer ([`ambient_core::inspect`]).
    #[error(transparent)]
    Module(#[from] ModuleError),
    /// The engine refused the module or the call (it does not compile, lacks an export).
    #[error("{0}")]
    Invalid(String),
    /// Compilation took longer than the cap.
    #[error("module took longer than {limit_ms} ms to compile")]
    CompileTimeout {
        /// The cap, in milliseconds.
        limit_ms: u64,
    },
    /// The engine could not be created or configured.
    #[error("engine setup failed: {0}")]
    Setup(String),
    /// The agent itself failed (a panic in the engine or the agent: a bug, not the module's
    /// doing). Its tasks are refused as unavailable, so they run elsewhere and count against
    /// this node's breaker.
    #[error("{0}")]
    Internal(String),
}

/// Sandbox settings that do not change per task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Largest module accepted, in bytes. Defaults to [`MAX_MODULE_BYTES`] (16 MiB).
    pub max_module_bytes: usize,
    /// Largest task memory limit accepted, in bytes; also the size of each pooled memory slot.
    /// A task asking for more is rejected. Defaults to 512 MiB (the seed's task default).
    pub max_memory_bytes: u64,
    /// Longest a module may take to compile. Defaults to 30 s.
    pub compile_timeout: Duration,
    /// Instances that can be live at once (pooling allocator slots). Defaults to 16.
    pub max_instances: u32,
    /// Where compiled and raw modules are kept across restarts; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Resolution of the wall-clock limit: the epoch ticker's period. Defaults to 10 ms.
    pub epoch_tick: Duration,
    /// Most modules kept compiled in memory; older ones are dropped (and reloaded from disk).
    /// Defaults to 64.
    pub max_cached_modules: usize,
    /// Most bytes of compiled code kept in memory, with the same rule; the newest module is
    /// kept whatever its size. Defaults to 128 MiB.
    pub max_cached_bytes: usize,
    /// Most bytes of raw and compiled modules kept in `cache_dir`; the least recently stored
    /// go first. Defaults to 1 GiB.
    pub max_cache_dir_bytes: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            max_module_bytes: MAX_MODULE_BYTES,
            max_memory_bytes: Limits::default().memory_bytes,
            compile_timeout: Duration::from_secs(30),
            max_instances: 16,
            cache_dir: None,
            epoch_tick: Duration::from_millis(10),
            max_cached_modules: 64,
            max_cached_bytes: 128 << 20,
            max_cache_dir_bytes: 1 << 30,
        }
    }
}

/// What every sandbox checks of a module's bytes before it looks inside: at most `max` bytes,
/// and the sha3-256 the task names.
pub(crate) fn check_module(hash: Digest, bytes: &[u8], max: usize) -> Result<(), ExecError> {
    if bytes.len() > max {
        return Err(ExecError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let actual = sha3_256(bytes);
    if actual != hash {
        return Err(ExecError::HashMismatch {
            expected: hash,
            actual,
        });
    }
    Ok(())
}

/// The seed of a task's WASI random stream: the same on every node that runs the task, so
/// replicas agree, and different between tasks.
pub fn task_seed(task_id: &TaskId, input: &[u8]) -> u64 {
    let input_hash = sha3_256(input);
    let mut material = Vec::with_capacity(32 + TaskId::MAX_LEN + 32);
    material.extend_from_slice(b"ambient/wasi-seed/v1\0");
    material.extend_from_slice(task_id.as_str().as_bytes());
    material.push(0);
    material.extend_from_slice(&input_hash.0);
    let d = sha3_256(&material);
    u64::from_le_bytes([
        d.0[0], d.0[1], d.0[2], d.0[3], d.0[4], d.0[5], d.0[6], d.0[7],
    ])
}

/// Shortens `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}
