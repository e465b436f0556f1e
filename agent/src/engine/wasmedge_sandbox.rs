//! [`WasmEdge`]: a second sandbox on the WasmEdge C library (the seed's runtime), for devices
//! where that library is installed. Built with `--features wasmedge`.
//!
//! Deliberately minimal, because it cannot be exercised on the build machines (the C library
//! is not installable there; the crate only type-checks with `DOCS_RS=1`):
//!
//! - Plain ABI only; WASI tasks are rejected.
//! - Fuel is **not metered**: wasmedge-sys 0.21's `Statistics` frees its context when the
//!   value handed to `Executor::create` is dropped, so a cost limit cannot be attached safely
//!   through the SDK. Receipts say `fuel_used = 0`, which will not agree with wasmtime replicas
//!   in a `replicate:k` quorum; the wall clock (`timeout_ms`) is the only bound.
//! - Memory is capped through `max_memory_pages`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambient_core::{Abi, Digest, Engine, Exit, MAX_OUTPUT_BYTES, ModuleError, sha3_256};
use wasmedge_sdk::config::{CommonConfigOptions, ConfigBuilder, RuntimeConfigOptions};
use wasmedge_sdk::vm::SyncInst;
use wasmedge_sdk::{AsInstance as _, Module, Store, Vm, WasmValue};

use super::{Call, ExecError, Execution, Prepared, Sandbox, SandboxConfig, check_module};

/// The WasmEdge sandbox: keeps validated module bytes and instantiates per run.
pub struct WasmEdge {
    config: SandboxConfig,
    modules: Mutex<HashMap<Digest, Arc<Prepared>>>,
}

/// Validated module bytes (a WasmEdge module is not `Send`, so each run loads its own).
struct Bytes(Vec<u8>);

impl WasmEdge {
    /// Creates the sandbox; nothing touches the C library until the first module.
    ///
    /// # Errors
    /// Never in this version; the signature matches [`super::Wasmtime::new`].
    pub fn new(config: SandboxConfig) -> Result<Self, ExecError> {
        Ok(Self {
            config,
            modules: Mutex::new(HashMap::new()),
        })
    }

    fn edge_config(&self, memory_bytes: u64) -> Result<wasmedge_sdk::config::Config, String> {
        let pages = u32::try_from(memory_bytes / 65_536)
            .unwrap_or(u32::MAX)
            .max(1);
        ConfigBuilder::new(CommonConfigOptions::default().threads(false))
            .with_runtime_config(RuntimeConfigOptions::new().max_memory_pages(pages))
            .build()
            .map_err(|e| e.to_string())
    }

    fn run_plain(&self, bytes: &[u8], call: &Call<'_>) -> Result<Vec<u8>, (Exit, String)> {
        let trapped = |e: Box<wasmedge_sdk::error::WasmEdgeError>| (Exit::Trapped, e.to_string());
        let config = self
            .edge_config(call.limits.memory_bytes)
            .map_err(|e| (Exit::Rejected, e))?;
        let module = Module::from_bytes(Some(&config), bytes)
            .map_err(|e| (Exit::Rejected, e.to_string()))?;
        let store = Store::new(Some(&config), HashMap::<String, &mut dyn SyncInst>::new())
            .map_err(trapped)?;
        let mut vm = Vm::new(store);
        vm.register_module(None, module)
            .map_err(|e| (Exit::OutOfMemory, e.to_string()))?;
        let len = i32::try_from(call.input.len())
            .map_err(|_| (Exit::Rejected, "input too large".to_owned()))?;
        let timeout = Duration::from_millis(call.limits.timeout_ms);
        let ptr = vm
            .run_func(None, "alloc", [WasmValue::from_i32(len)])
            .map_err(trapped)?;
        let ptr = ptr
            .first()
            .map(WasmValue::to_i32)
            .ok_or((Exit::Rejected, "alloc returned nothing".to_owned()))?;
        {
            let instance = vm
                .active_module_mut()
                .ok_or((Exit::Rejected, "no active module".to_owned()))?;
            let mut memory = instance.get_memory_mut("memory").map_err(trapped)?;
            memory.set_data(call.input, ptr as u32).map_err(trapped)?;
        }
        let packed = vm
            .run_func_with_timeout(
                None,
                call.entry,
                [WasmValue::from_i32(ptr), WasmValue::from_i32(len)],
                timeout,
            )
            .map_err(|e| {
                let text = e.to_string();
                let exit = if text.contains("interrupt") || text.contains("timeout") {
                    Exit::TimedOut
                } else {
                    Exit::Trapped
                };
                (exit, text)
            })?;
        let packed = packed
            .first()
            .map(WasmValue::to_i64)
            .ok_or((Exit::Rejected, "entry returned nothing".to_owned()))?
            as u64;
        let (out_ptr, out_len) = ((packed >> 32) as u32, (packed & 0xffff_ffff) as u32);
        if out_len as usize > MAX_OUTPUT_BYTES {
            return Err((
                Exit::Trapped,
                format!("output exceeds the {MAX_OUTPUT_BYTES} byte limit"),
            ));
        }
        let instance = vm
            .active_module()
            .ok_or((Exit::Rejected, "no active module".to_owned()))?;
        let memory = instance.get_memory_ref("memory").map_err(trapped)?;
        memory.get_data(out_ptr, out_len).map_err(trapped)
    }
}

impl Sandbox for WasmEdge {
    fn engine(&self) -> Engine {
        Engine::WasmEdge
    }

    fn prepare(&self, hash: Digest, bytes: &[u8]) -> Result<Arc<Prepared>, ExecError> {
        if let Some(p) = self.cached(&hash) {
            return Ok(p);
        }
        check_module(hash, bytes, self.config.max_module_bytes)?;
        let config = self
            .edge_config(self.config.max_memory_bytes)
            .map_err(ExecError::Setup)?;
        let module = Module::from_bytes(Some(&config), bytes)
            .map_err(|e| ExecError::Invalid(e.to_string()))?;
        if let Some(import) = module.imports().first() {
            return Err(ExecError::Module(ModuleError::ForbiddenImport {
                module: import.module_name().into_owned(),
                name: import.name().into_owned(),
            }));
        }
        let prepared = Arc::new(Prepared::new(
            hash,
            bytes.len(),
            Box::new(Bytes(bytes.to_vec())),
        ));
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash, prepared.clone());
        Ok(prepared)
    }

    fn load(&self, hash: &Digest) -> Result<Option<Arc<Prepared>>, ExecError> {
        if let Some(p) = self.cached(hash) {
            return Ok(Some(p));
        }
        let Some(dir) = &self.config.cache_dir else {
            return Ok(None);
        };
        match std::fs::read(dir.join(format!("{hash}.wasm"))) {
            Ok(raw) if sha3_256(&raw) == *hash => self.prepare(*hash, &raw).map(Some),
            _ => Ok(None),
        }
    }

    fn cached(&self, hash: &Digest) -> Option<Arc<Prepared>> {
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            .cloned()
    }

    fn execute(&self, module: &Prepared, call: &Call<'_>) -> Execution {
        let Some(Bytes(bytes)) = module.inner::<Bytes>() else {
            return Execution::rejected(&ExecError::Invalid(
                "module was prepared by another sandbox".into(),
            ));
        };
        if call.abi == Abi::Wasi {
            return Execution::rejected(&ExecError::Invalid(
                "the WasmEdge sandbox runs plain-ABI tasks only".into(),
            ));
        }
        match self.run_plain(bytes, call) {
            Ok(output) => Execution {
                output,
                fuel_used: 0,
                exit: Exit::Ok,
                message: String::new(),
            },
            Err((exit, message)) => Execution {
                output: Vec::new(),
                fuel_used: 0,
                exit,
                message,
            },
        }
    }
}
