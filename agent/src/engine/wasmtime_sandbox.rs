//! [`Wasmtime`]: the default sandbox, on wasmtime with Cranelift, or with its Pulley interpreter
//! where Cranelift has no backend (32-bit ARM; the agent then announces
//! [`Engine::WasmtimePulley`]).
//!
//! Determinism: fuel metering (the same count on every node), canonical NaNs, deterministic
//! relaxed SIMD, no threads. The wall clock only ever stops a run (epoch interruption), it never
//! changes a result. Memory is capped per store by a resource limiter that traps on a denied
//! grow, so a memory bomb ends as [`Exit::OutOfMemory`] rather than a `-1` the module ignores.
//!
//! Fuel of a run that traps. Compiled code keeps the fuel it burns in a register and writes it
//! back to the store only at calls, returns and a few traps; a trap anywhere else (the wall
//! clock, a denied grow, an out-of-bounds access) would lose what was burnt since, and a
//! busy loop stopped after 500 ms would report 15 fuel. So every run is driven as a future
//! with [`FUEL_SAVE_EVERY`] as its fuel yield interval: the count is written back at the first
//! fuel check after each such stretch, and a trapped run's receipt states the fuel it burnt to
//! within about that much. The write points come from the same translation on every node, so a
//! deterministic trap reports the same fuel on every node of one engine. Two exceptions, older
//! than this: a stack overflow comes at a depth that depends on the architecture's frames, and
//! an access whose constant offset reaches past 4 GiB is counted to the instruction on 32-bit
//! hosts (Pulley) only; such replicas can disagree on fuel, and their vote escalates.
//! The future is polled to completion on the calling (blocking) thread: nothing in the sandbox
//! returns `Pending` but the fuel yields, which ask to be polled again at once (an async host
//! function or a yielding epoch deadline would need a real executor).

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, mpsc};
use std::thread;
use std::time::Duration;

use ambient_core::{Abi, Digest, Engine, Exit, MAX_OUTPUT_BYTES, Refusals, sha3_256};
use wasmtime::{
    Extern, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module, ModuleExport,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap, ValType,
};

use super::wasi::{self, OutputTooLarge, ProcExit, WasiState};
use super::{
    Call, ExecError, Execution, Prepared, Sandbox, SandboxConfig, check_module, truncate_utf8,
};

/// Most elements any table may grow to; tables count towards a task's memory like memories do.
const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Fuel between the points where a run's burnt fuel is written back to its store (see the
/// module docs): what a run that traps reports is short by less than this. Each write-back
/// yields the run's future once, which costs well under a microsecond: under 1% of the time of
/// the fuel in between.
pub const FUEL_SAVE_EVERY: u64 = 100_000;
/// Marks a compiled artifact written by this agent (see [`Wasmtime::store_compiled`]).
const CWASM_MAGIC: &[u8; 8] = b"AMBCWASM";
/// Header of a compiled artifact: magic, module hash, engine compatibility hash, artifact hash.
const CWASM_HEADER: usize = 8 + 32 * 3;

/// The wasmtime sandbox.
///
/// Holds one engine (pooling allocator when the address space allows, on-demand otherwise:
/// always on a 32-bit host, whose address space cannot reserve a pool of linear memories),
/// a ticker thread that advances the epoch while any task runs, an in-memory map of compiled
/// modules and, with [`SandboxConfig::cache_dir`], their raw and compiled forms on disk.
pub struct Wasmtime {
    engine: wasmtime::Engine,
    plain: Linker<Ctx>,
    wasi: Linker<Ctx>,
    config: SandboxConfig,
    /// sha3-256 of the engine's precompile compatibility hash: changes whenever a compiled
    /// artifact from disk would no longer be valid for this engine.
    compat: Digest,
    pooling: bool,
    modules: Mutex<ModuleMap>,
    /// Modules refused before compiling, newest last, at most [`REMEMBERED_REFUSALS`]: a
    /// resubmission is refused without parsing again.
    refused: Mutex<Refusals>,
    ticker: Ticker,
}

/// How many refused modules a sandbox remembers.
const REMEMBERED_REFUSALS: usize = 256;

impl Wasmtime {
    /// Builds the engine, the linkers and the epoch ticker, and creates the cache directory.
    ///
    /// # Errors
    /// [`ExecError::Setup`] when wasmtime cannot build an engine for this host (for example
    /// no compiler backend for the architecture) or the cache directory cannot be created.
    pub fn new(config: SandboxConfig) -> Result<Self, ExecError> {
        // A 32-bit address space cannot reserve a pool of linear memories: on-demand there.
        let pooled = cfg!(target_pointer_width = "64")
            .then(|| build_engine(&config, true))
            .and_then(|built| {
                built
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "pooling allocator unavailable, using on-demand allocation");
                    })
                    .ok()
            });
        let (engine, pooling) = match pooled {
            Some(engine) => (engine, true),
            None => (
                build_engine(&config, false).map_err(|e| ExecError::Setup(e.to_string()))?,
                false,
            ),
        };
        let plain = Linker::new(&engine);
        let mut wasi = Linker::new(&engine);
        wasi::add_to_linker(&mut wasi).map_err(|e| ExecError::Setup(e.to_string()))?;
        if let Some(dir) = &config.cache_dir {
            ambient_daemon::create_private_dir(dir).map_err(|e| {
                ExecError::Setup(format!("cannot create module cache {}: {e}", dir.display()))
            })?;
        }
        let compat = {
            let mut h = CollectingHasher(Vec::new());
            std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
            sha3_256(&h.0)
        };
        let ticker = Ticker::start(engine.clone(), config.epoch_tick);
        Ok(Self {
            engine,
            plain,
            wasi,
            config,
            compat,
            pooling,
            modules: Mutex::new(ModuleMap::default()),
            refused: Mutex::new(Refusals::new(REMEMBERED_REFUSALS)),
            ticker,
        })
    }

    /// Whether instances come from the pooling allocator (`false`: on-demand fallback).
    pub fn is_pooling(&self) -> bool {
        self.pooling
    }

    /// The settings this sandbox was built with.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The earlier refusal of the module `hash`, if it was refused.
    fn refusal(&self, hash: &Digest) -> Option<ExecError> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.get(hash).cloned().map(ExecError::Module)
    }

    /// Validates the module and checks its imports before anything is compiled; a refusal is
    /// remembered by hash.
    fn inspect(&self, hash: Digest, bytes: &[u8]) -> Result<(), ExecError> {
        let Err(e) = ambient_core::inspect(bytes) else {
            return Ok(());
        };
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.remember(hash, e.clone());
        Err(ExecError::Module(e))
    }

    fn compile(&self, bytes: &[u8]) -> Result<Module, ExecError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let engine = self.engine.clone();
        let owned = bytes.to_vec();
        // Compilation cannot be interrupted, so it runs on its own thread and we stop waiting
        // at the cap; a runaway compile finishes in the background and is dropped.
        thread::Builder::new()
            .name("ambient-compile".into())
            .spawn(move || {
                let _ = tx.send(Module::new(&engine, &owned));
            })
            .map_err(|e| ExecError::Setup(format!("cannot start a compile thread: {e}")))?;
        match rx.recv_timeout(self.config.compile_timeout) {
            Ok(Ok(module)) => Ok(module),
            Ok(Err(e)) => Err(ExecError::Invalid(format!(
                "module does not compile: {}",
                one_line(&e)
            ))),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ExecError::CompileTimeout {
                limit_ms: self.config.compile_timeout.as_millis() as u64,
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ExecError::Invalid(
                "the compiler stopped without an answer".into(),
            )),
        }
    }

    fn insert(&self, hash: Digest, len: usize, module: Module) -> Arc<Prepared> {
        let image = module.image_range();
        let size = (image.end as usize).saturating_sub(image.start as usize);
        let compiled = Compiled::new(module);
        let prepared = Arc::new(Prepared::new(hash, len, Box::new(compiled)));
        let mut map = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let bound = (self.config.max_cached_modules, self.config.max_cached_bytes);
        map.insert(hash, prepared.clone(), size, bound);
        prepared
    }

    fn raw_path(dir: &Path, hash: &Digest) -> PathBuf {
        dir.join(format!("{hash}.wasm"))
    }

    fn compiled_path(dir: &Path, hash: &Digest) -> PathBuf {
        dir.join(format!("{hash}.cwasm"))
    }

    /// Writes the raw module and its compiled artifact; failures only cost a recompile later.
    fn store(&self, dir: &Path, hash: &Digest, bytes: &[u8], module: &Module) {
        if let Err(e) = write_atomic(&Self::raw_path(dir, hash), &[bytes]) {
            tracing::warn!(module = %hash, error = %e, "could not store module");
            return;
        }
        let artifact = match module.serialize() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(module = %hash, error = %one_line(&e), "could not serialize module");
                return;
            }
        };
        let artifact_hash = sha3_256(&artifact);
        let header = [&CWASM_MAGIC[..], &hash.0, &self.compat.0, &artifact_hash.0].concat();
        if let Err(e) = write_atomic(&Self::compiled_path(dir, hash), &[&header, &artifact]) {
            tracing::warn!(module = %hash, error = %e, "could not store compiled module");
        }
        trim_cache_dir(dir, hash, self.config.max_cache_dir_bytes);
    }

    /// Loads a compiled artifact written by [`Wasmtime::store`], if it is intact and was
    /// made by an engine compatible with this one.
    fn load_compiled(&self, dir: &Path, hash: &Digest) -> Option<Module> {
        let path = Self::compiled_path(dir, hash);
        let file = fs::read(&path).ok()?;
        let intact = file.len() > CWASM_HEADER
            && &file[..8] == CWASM_MAGIC
            && file[8..40] == hash.0
            && file[40..72] == self.compat.0
            && file[72..104] == sha3_256(&file[CWASM_HEADER..]).0;
        if !intact {
            tracing::debug!(module = %hash, "discarding a stale or damaged compiled module");
            let _ = fs::remove_file(&path);
            return None;
        }
        // SAFETY: `Module::deserialize` trusts its input to be an artifact wasmtime produced.
        // This file lives in the agent's private (0700) state directory, carries the header
        // only `store` writes, names the module it was compiled from and the compatibility hash
        // of an engine configured exactly like this one, and its bytes hash to the digest
        // recorded when `Module::serialize` produced them, so they are that artifact unchanged.
        // (Anyone able to rewrite the state directory could also replace the node's key.)
        match unsafe { Module::deserialize(&self.engine, &file[CWASM_HEADER..]) } {
            Ok(module) => Some(module),
            Err(e) => {
                tracing::debug!(module = %hash, error = %one_line(&e), "recompiling module");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    fn new_store(&self, call: &Call<'_>, wasi: WasiState) -> Store<Ctx> {
        let ctx = Ctx {
            // Checked against `max_memory_bytes` (a usize-sized slot) before we get here.
            memory_limit: usize::try_from(call.limits.memory_bytes).unwrap_or(usize::MAX),
            wasi,
        };
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|ctx| ctx as &mut dyn ResourceLimiter);
        // Fuel metering is on for every store of this engine, and the interval is not 0, so
        // neither can fail.
        let _ = store.set_fuel(call.limits.fuel);
        let _ = store.fuel_async_yield_interval(Some(FUEL_SAVE_EVERY));
        let tick_ms = self.config.epoch_tick.as_millis().max(1) as u64;
        store.set_epoch_deadline(call.limits.timeout_ms.div_ceil(tick_ms).max(1));
        store.epoch_deadline_trap();
        store
    }

    fn run_plain(&self, compiled: &Compiled, call: &Call<'_>) -> Execution {
        let plain = match compiled
            .plain
            .get_or_init(|| plain_pre(&self.plain, &compiled.module))
        {
            Ok(plain) => plain,
            Err(e) => return Execution::rejected(&ExecError::Invalid(e.clone())),
        };
        let entry_index = match compiled.entry(call.entry) {
            Ok(index) => index,
            Err(e) => return Execution::rejected(&ExecError::Invalid(e)),
        };
        let Ok(len) = i32::try_from(call.input.len()) else {
            return Execution::rejected(&ExecError::Invalid(
                "input does not fit a 32-bit memory".into(),
            ));
        };
        let mut store = self.new_store(call, WasiState::default());
        let result = run_to_completion(async {
            let instance = plain.pre.instantiate_async(&mut store).await?;
            let missing = || wasmtime::Error::msg("module export disappeared");
            let memory = instance
                .get_module_export(&mut store, &plain.memory)
                .and_then(Extern::into_memory)
                .ok_or_else(missing)?;
            let alloc = instance
                .get_module_export(&mut store, &plain.alloc)
                .and_then(Extern::into_func)
                .ok_or_else(missing)?;
            let entry = instance
                .get_module_export(&mut store, &entry_index)
                .and_then(Extern::into_func)
                .ok_or_else(missing)?;
            let alloc = alloc.typed::<i32, i32>(&store)?;
            let entry = entry.typed::<(i32, i32), i64>(&store)?;
            let ptr = alloc.call_async(&mut store, len).await?;
            memory
                .write(&mut store, ptr as u32 as usize, call.input)
                .map_err(|_| {
                    wasmtime::Error::msg(format!("alloc({len}) returned {ptr:#x}, outside memory"))
                })?;
            let packed = entry.call_async(&mut store, (ptr, len)).await? as u64;
            let (out_ptr, out_len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
            if out_len > MAX_OUTPUT_BYTES {
                return Err(wasmtime::Error::new(OutputTooLarge));
            }
            memory
                .data(&store)
                .get(out_ptr..out_ptr + out_len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| {
                    wasmtime::Error::msg(format!(
                        "output range {out_ptr:#x}+{out_len} is outside memory"
                    ))
                })
        });
        finish(&store, call, result, None)
    }

    fn run_wasi(&self, compiled: &Compiled, call: &Call<'_>) -> Execution {
        let pre = match compiled.wasi.get_or_init(|| {
            self.wasi
                .instantiate_pre(&compiled.module)
                .map_err(|e| one_line(&e))
        }) {
            Ok(pre) => pre,
            Err(e) => return Execution::rejected(&ExecError::Invalid(e.clone())),
        };
        if let Err(e) = check_func(&compiled.module, "_start", &[], &[]) {
            return Execution::rejected(&e);
        }
        let mut store = self.new_store(call, WasiState::new(call.input, call.seed));
        let result = run_to_completion(async {
            let instance = pre.instantiate_async(&mut store).await?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            match start.call_async(&mut store, ()).await {
                Err(e) if e.downcast_ref::<ProcExit>() == Some(&ProcExit(0)) => Ok(()),
                other => other,
            }
        });
        let stderr = std::mem::take(&mut store.data_mut().wasi.stderr);
        let result = result.map(|()| std::mem::take(&mut store.data_mut().wasi.stdout));
        finish(&store, call, result, Some(&stderr))
    }
}

impl Sandbox for Wasmtime {
    fn engine(&self) -> Engine {
        if self.engine.is_pulley() {
            Engine::WasmtimePulley
        } else {
            Engine::Wasmtime
        }
    }

    fn prepare(&self, hash: Digest, bytes: &[u8]) -> Result<Arc<Prepared>, ExecError> {
        if let Some(p) = self.cached(&hash) {
            return Ok(p);
        }
        // Refused before: whatever bytes come with the hash, the module it names is refused.
        if let Some(e) = self.refusal(&hash) {
            return Err(e);
        }
        check_module(hash, bytes, self.config.max_module_bytes)?;
        self.inspect(hash, bytes)?;
        let module = self.compile(bytes);
        release_freed_memory();
        let module = module?;
        if let Some(dir) = &self.config.cache_dir {
            self.store(dir, &hash, bytes, &module);
        }
        Ok(self.insert(hash, bytes.len(), module))
    }

    fn load(&self, hash: &Digest) -> Result<Option<Arc<Prepared>>, ExecError> {
        if let Some(p) = self.cached(hash) {
            return Ok(Some(p));
        }
        let Some(dir) = &self.config.cache_dir else {
            return Ok(None);
        };
        let raw = match fs::read(Self::raw_path(dir, hash)) {
            Ok(raw) if sha3_256(&raw) == *hash => raw,
            Ok(_) => {
                tracing::warn!(module = %hash, "stored module is damaged, fetching it again");
                let _ = fs::remove_file(Self::raw_path(dir, hash));
                let _ = fs::remove_file(Self::compiled_path(dir, hash));
                return Ok(None);
            }
            Err(_) => return Ok(None),
        };
        if raw.len() <= self.config.max_module_bytes
            && let Some(module) = self.load_compiled(dir, hash)
        {
            return Ok(Some(self.insert(*hash, raw.len(), module)));
        }
        self.prepare(*hash, &raw).map(Some)
    }

    fn cached(&self, hash: &Digest) -> Option<Arc<Prepared>> {
        let map = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        map.get(hash)
    }

    fn execute(&self, module: &Prepared, call: &Call<'_>) -> Execution {
        let Some(compiled) = module.inner::<Compiled>() else {
            return Execution::rejected(&ExecError::Invalid(
                "module was prepared by another sandbox".into(),
            ));
        };
        if call.limits.memory_bytes > self.config.max_memory_bytes {
            return Execution::rejected(&ExecError::Invalid(format!(
                "task memory limit of {} bytes exceeds this node's maximum of {} bytes",
                call.limits.memory_bytes, self.config.max_memory_bytes
            )));
        }
        let _running = self.ticker.running();
        match call.abi {
            Abi::Plain => self.run_plain(compiled, call),
            Abi::Wasi => self.run_wasi(compiled, call),
        }
    }
}

/// A module compiled by this engine, with its pre-linked forms made on first use per ABI.
struct Compiled {
    module: Module,
    plain: OnceLock<Result<PlainPre, String>>,
    wasi: OnceLock<Result<InstancePre<Ctx>, String>>,
    /// Entry points already checked for the plain ABI, so a cached module's run does not
    /// repeat the type check.
    entries: RwLock<HashMap<String, Result<ModuleExport, String>>>,
}

/// A pre-linked plain-ABI module and where its exports are, so a run finds them without
/// looking names up.
struct PlainPre {
    pre: InstancePre<Ctx>,
    memory: ModuleExport,
    alloc: ModuleExport,
}

impl Compiled {
    fn new(module: Module) -> Self {
        Self {
            module,
            plain: OnceLock::new(),
            wasi: OnceLock::new(),
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The plain-ABI entry `name`, checked once.
    fn entry(&self, name: &str) -> Result<ModuleExport, String> {
        if let Some(found) = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return found.clone();
        }
        let checked = check_func(
            &self.module,
            name,
            &[ValType::I32, ValType::I32],
            &[ValType::I64],
        )
        .map_err(|e| e.to_string())
        .and_then(|()| {
            self.module
                .get_export_index(name)
                .ok_or_else(|| format!("no export `{name}`"))
        });
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        // Names come from assignments: keep the map small against a stream of bogus ones.
        if entries.len() < 64 {
            entries.insert(name.to_owned(), checked.clone());
        }
        checked
    }
}

/// Per-run store data: the memory cap and the WASI state.
pub(super) struct Ctx {
    memory_limit: usize,
    pub(super) wasi: WasiState,
}

/// A `memory.grow` (or the initial memory) past the task's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemoryDenied {
    desired: usize,
    limit: usize,
}

impl std::fmt::Display for MemoryDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory of {} bytes requested, over the {} byte limit",
            self.desired, self.limit
        )
    }
}

impl std::error::Error for MemoryDenied {}

impl ResourceLimiter for Ctx {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            // An error (not `Ok(false)`) traps the guest: a denied grow ends the run
            // deterministically instead of returning -1 to a loop that may spin on it.
            return Err(wasmtime::Error::new(MemoryDenied {
                desired,
                limit: self.memory_limit,
            }));
        }
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        Err(error)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(MemoryDenied {
                desired,
                limit: MAX_TABLE_ELEMENTS,
            }));
        }
        Ok(true)
    }
}

fn build_engine(config: &SandboxConfig, pooling: bool) -> wasmtime::Result<wasmtime::Engine> {
    let mut c = wasmtime::Config::new();
    c.consume_fuel(true)
        .epoch_interruption(true)
        .cranelift_nan_canonicalization(true)
        .relaxed_simd_deterministic(true)
        // Trap messages name the trap; backtraces would cost time on every trap and not fit
        // in a 160-byte report message anyway.
        .wasm_backtrace_max_frames(None);
    if pooling {
        let slots = config.max_instances.max(1);
        let max_memory = usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(slots)
            // Each run executes on a fiber stack (see `run_to_completion`).
            .total_stacks(slots)
            .total_memories(slots)
            .total_tables(slots)
            .max_memory_size(max_memory)
            .table_elements(MAX_TABLE_ELEMENTS)
            // Small tasks touch little memory: zeroing the first 64 KiB of a reused slot with
            // memset is cheaper than an madvise system call and the page faults after it.
            // (Measured on the trivial-task benchmark: 4.3 µs → 2.8 µs; 8 KiB kept resident did
            // no better.)
            .linear_memory_keep_resident(64 << 10)
            .table_keep_resident(16 << 10)
            // Decommit at once, not in batches: a batched slot sits in a per-thread queue, and
            // an instantiation racing another thread's flush of that queue fails with "maximum
            // concurrent limit … reached" although fewer runs than slots are live (seen with 4
            // runs on an 8-slot pool). A run must never fail for a reason its neighbours cause.
            .decommit_batch_size(1);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    wasmtime::Engine::new(&c)
}

fn plain_pre(linker: &Linker<Ctx>, module: &Module) -> Result<PlainPre, String> {
    if let Some(import) = module.imports().next() {
        return Err(format!(
            "plain-ABI modules may not import anything, and this one imports {}.{}",
            import.module(),
            import.name()
        ));
    }
    if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
        return Err("module does not export its memory as `memory`".into());
    }
    check_func(module, "alloc", &[ValType::I32], &[ValType::I32]).map_err(|e| e.to_string())?;
    let index = |name: &str| {
        module
            .get_export_index(name)
            .ok_or_else(|| format!("no export `{name}`"))
    };
    Ok(PlainPre {
        pre: linker.instantiate_pre(module).map_err(|e| one_line(&e))?,
        memory: index("memory")?,
        alloc: index("alloc")?,
    })
}

/// Checks that `module` exports a function `name` with exactly these parameter and result types.
fn check_func(
    module: &Module,
    name: &str,
    params: &[ValType],
    results: &[ValType],
) -> Result<(), ExecError> {
    let describe = |p: &[ValType], r: &[ValType]| {
        let list = |v: &[ValType]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!("({}) -> ({})", list(p), list(r))
    };
    let Some(ExternType::Func(f)) = module.get_export(name) else {
        return Err(ExecError::Invalid(format!(
            "module does not export a function `{name}`"
        )));
    };
    let same = |a: &mut dyn ExactSizeIterator<Item = ValType>, b: &[ValType]| {
        a.len() == b.len() && a.zip(b).all(|(x, y)| ValType::eq(&x, y))
    };
    if !same(&mut f.params(), params) || !same(&mut f.results(), results) {
        let actual_p: Vec<ValType> = f.params().collect();
        let actual_r: Vec<ValType> = f.results().collect();
        return Err(ExecError::Invalid(format!(
            "`{name}` has type {}, expected {}",
            describe(&actual_p, &actual_r),
            describe(params, results)
        )));
    }
    Ok(())
}

/// Polls a run's future on this thread until it is done. Runs yield only to write their fuel
/// back ([`FUEL_SAVE_EVERY`]) and ask to be polled again at once, so there is nothing to wait
/// for between polls.
fn run_to_completion<T>(run: impl std::future::Future<Output = T>) -> T {
    let mut run = std::pin::pin!(run);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(done) = run.as_mut().poll(&mut cx) {
            return done;
        }
    }
}

/// Maps the end of a run onto an [`Execution`].
fn finish(
    store: &Store<Ctx>,
    call: &Call<'_>,
    result: wasmtime::Result<Vec<u8>>,
    stderr: Option<&[u8]>,
) -> Execution {
    let remaining = store.get_fuel().unwrap_or(0);
    let fuel_used = call.limits.fuel.saturating_sub(remaining);
    let (exit, mut message, output) = match result {
        Ok(output) => (Exit::Ok, String::new(), output),
        Err(e) => {
            let (exit, message) = classify(&e);
            (exit, message, Vec::new())
        }
    };
    if let Some(stderr) = stderr.filter(|s| exit != Exit::Ok && !s.is_empty()) {
        message.push_str("; stderr: ");
        message.push_str(String::from_utf8_lossy(stderr).trim_end());
    }
    Execution {
        output,
        fuel_used,
        exit,
        message: truncate_utf8(message, 1024),
    }
}

fn classify(e: &wasmtime::Error) -> (Exit, String) {
    if let Some(trap) = e.downcast_ref::<Trap>() {
        let exit = match trap {
            Trap::OutOfFuel => Exit::OutOfFuel,
            Trap::Interrupt => Exit::TimedOut,
            _ => Exit::Trapped,
        };
        let message = match exit {
            Exit::TimedOut => "wall-clock limit reached".to_owned(),
            _ => trap.to_string(),
        };
        return (exit, message);
    }
    if let Some(denied) = e.downcast_ref::<MemoryDenied>() {
        return (Exit::OutOfMemory, denied.to_string());
    }
    if let Some(exit) = e.downcast_ref::<ProcExit>() {
        return (Exit::ExitStatus(exit.0), exit.to_string());
    }
    (Exit::Trapped, one_line(e))
}

/// An error and its causes on one line.
fn one_line(e: &wasmtime::Error) -> String {
    let parts: Vec<String> = e.chain().map(ToString::to_string).collect();
    parts.join(": ").replace('\n', " ")
}

/// Writes `parts` to a temporary file beside `path` and renames it into place, so a reader
/// never sees half a file.
fn write_atomic(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp)?;
    for p in parts {
        file.write_all(p)?;
    }
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// Compiled modules by hash with their code size, dropping the oldest past either bound (the
/// newest is always kept).
#[derive(Default)]
struct ModuleMap {
    map: HashMap<Digest, (Arc<Prepared>, usize)>,
    order: VecDeque<Digest>,
    bytes: usize,
}

impl ModuleMap {
    fn get(&self, hash: &Digest) -> Option<Arc<Prepared>> {
        self.map.get(hash).map(|(p, _)| p.clone())
    }

    fn insert(
        &mut self,
        hash: Digest,
        prepared: Arc<Prepared>,
        size: usize,
        bound: (usize, usize),
    ) {
        match self.map.insert(hash, (prepared, size)) {
            Some((_, old)) => self.bytes -= old,
            None => self.order.push_back(hash),
        }
        self.bytes += size;
        while self.map.len() > bound.0.max(1) || (self.bytes > bound.1 && self.map.len() > 1) {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, size)) = self.map.remove(&old) {
                self.bytes -= size;
            }
        }
    }
}

/// Deletes the least recently stored modules (raw and compiled together) from `dir` until what
/// is left fits in `bound` bytes; `keep`, just stored, stays whatever its size.
fn trim_cache_dir(dir: &Path, keep: &Digest, bound: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    // Per module hash: bytes on disk and when it was last written.
    let mut modules: HashMap<String, (u64, std::time::SystemTime)> = HashMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let (Some(stem), Some("wasm" | "cwasm")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|e| e.to_str()),
        ) else {
            continue;
        };
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        let slot = modules
            .entry(stem.to_owned())
            .or_insert((0, std::time::UNIX_EPOCH));
        slot.0 += meta.len();
        slot.1 = slot.1.max(modified);
    }
    let mut total: u64 = modules.values().map(|(len, _)| len).sum();
    if total <= bound {
        return;
    }
    let keep = keep.to_hex();
    let mut oldest: Vec<_> = modules
        .into_iter()
        .filter(|(stem, _)| stem.as_str() != keep.as_str())
        .collect();
    oldest.sort_by_key(|(_, (_, modified))| *modified);
    for (stem, (len, _)) in oldest {
        if total <= bound {
            break;
        }
        let _ = fs::remove_file(dir.join(format!("{stem}.wasm")));
        let _ = fs::remove_file(dir.join(format!("{stem}.cwasm")));
        total = total.saturating_sub(len);
        tracing::debug!(module = %stem, "dropped from the module cache directory");
    }
}

/// Gives the heap memory freed after a compile back to the system. Cranelift allocates
/// hundreds of MiB for a large module on its worker threads, and glibc keeps what they free
/// in per-thread arenas: measured with a 1.9 MB module, RSS stayed at 198 MiB after the
/// compile and fell to 40 MiB after this call.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only walks the allocator's own free lists; it takes no
        // pointers and is safe to call from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Feeds everything hashed into a buffer, so a `Hash` value can be digested with sha3.
struct CollectingHasher(Vec<u8>);

impl std::hash::Hasher for CollectingHasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

/// Advances the engine's epoch every tick while runs are in progress, and sleeps (parked)
/// once none has run for [`TICKER_LINGER`] ticks, so an idle agent does not wake 100 times a
/// second while back-to-back runs never pay for waking the thread.
struct Ticker {
    shared: Arc<TickerShared>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Idle ticks before the ticker parks.
const TICKER_LINGER: u32 = 100;

struct TickerShared {
    running: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
}

impl Ticker {
    fn start(engine: wasmtime::Engine, tick: Duration) -> Self {
        let shared = Arc::new(TickerShared {
            running: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let tick = tick.max(Duration::from_millis(1));
        let thread = thread::Builder::new()
            .name("ambient-epoch".into())
            .spawn(move || {
                let mut idle = TICKER_LINGER;
                while !s.stop.load(Ordering::SeqCst) {
                    if s.running.load(Ordering::SeqCst) > 0 {
                        idle = 0;
                    } else if idle >= TICKER_LINGER {
                        // `running()` increments before it reads `parked`, and we set `parked`
                        // before we read `running`: one of us sees the other, so a run that
                        // starts now always gets its ticks.
                        s.parked.store(true, Ordering::SeqCst);
                        if s.running.load(Ordering::SeqCst) == 0 && !s.stop.load(Ordering::SeqCst) {
                            thread::park();
                        }
                        s.parked.store(false, Ordering::SeqCst);
                        continue;
                    } else {
                        idle += 1;
                    }
                    thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .ok();
        if thread.is_none() {
            tracing::warn!("could not start the epoch thread: wall-clock limits are not enforced");
        }
        Self { shared, thread }
    }

    /// Counts a run as in progress until the guard drops.
    fn running(&self) -> RunningGuard<'_> {
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst)
            && let Some(t) = &self.thread
        {
            t.thread().unpark();
        }
        RunningGuard(self)
    }
}

struct RunningGuard<'a>(&'a Ticker);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.shared.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ambient_core::{Limits, WASI_MODULE, WASI_OFFERED};

    use super::*;

    #[test]
    fn every_wasi_function_inspection_lets_through_is_linked_and_nothing_else() {
        let s = Wasmtime::new(SandboxConfig::default()).unwrap();
        let call = Call::new(Abi::Wasi, "_start", b"", Limits::default(), 0);
        let mut store = s.new_store(&call, WasiState::default());
        let linked: BTreeSet<String> = s
            .wasi
            .iter(&mut store)
            .map(|(module, name, _)| {
                assert_eq!(module, WASI_MODULE);
                name.to_owned()
            })
            .collect();
        let offered: BTreeSet<String> = WASI_OFFERED.iter().map(|n| n.to_string()).collect();
        assert_eq!(linked, offered);
    }
}
