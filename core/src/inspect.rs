//! What a WASM module asks for, read without compiling it (feature `inspect`).
//!
//! Both sides run it before any work. The coordinator inspects at intake, so a module that
//! cannot run is refused before it is journaled and costs the client nothing; the agent
//! inspects before compiling, so a refusal costs a parse, not a Cranelift compile.
//!
//! [`inspect`] checks, cheapest first: the bytes are binary WASM (a text module gets a hint),
//! every import is a [`WASI_MODULE`] function the sandbox links ([`WASI_OFFERED`]), read from
//! the import section before any function body, and the whole module validates. The returned
//! [`ModuleInfo`] then tells with [`ModuleInfo::check_call`] whether it has what an [`Abi`] and
//! entry need.
//!
//! ```
//! use ambient_core::{Abi, inspect};
//!
//! // (module (func (export "_start")))
//! let bytes = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x03\x02\x01\0\x07\x0a\x01\x06_start\0\0\x0a\x04\x01\x02\0\x0b";
//! let info = inspect(bytes)?;
//! assert!(info.check_call(Abi::Wasi, "_start").is_ok());
//! assert!(info.check_call(Abi::Plain, "run").is_err());
//! # Ok::<(), ambient_core::ModuleError>(())
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::string::{String, ToString};
use std::vec::Vec;

use wasmparser::{ExternalKind, Parser, Payload, TypeRef, ValType, Validator, WasmFeatures};

use crate::{Abi, Digest};

/// The import module every function the sandbox offers lives in.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// Every [`WASI_MODULE`] function, all of WASI preview 1: the sandbox links each (those for
/// capabilities it does not grant answer with an errno). A module importing anything else is
/// refused.
pub const WASI_OFFERED: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// Why a module cannot run. The messages are whole sentences for the task's `rejected` event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModuleError {
    /// The bytes are not binary WASM; `text` when they look like the text format.
    NotWasm {
        /// They start like a `.wat` file.
        text: bool,
    },
    /// The module does not validate.
    Invalid(String),
    /// The module imports something the sandbox does not offer.
    ForbiddenImport {
        /// Import module name.
        module: String,
        /// Import field name.
        name: String,
    },
    /// A plain-ABI module imports something (plain modules may import nothing).
    PlainImport {
        /// Import module name.
        module: String,
        /// Import field name.
        name: String,
    },
    /// An export the ABI needs is missing.
    MissingExport {
        /// The export's name.
        name: String,
        /// `function` or `memory`.
        kind: &'static str,
        /// What to try instead, if a user mistake is likely.
        hint: &'static str,
    },
    /// An exported function has another type than the ABI needs.
    WrongSignature {
        /// The export's name.
        name: String,
        /// The type needed.
        expected: &'static str,
        /// The type found.
        found: String,
    },
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleError::NotWasm { text: true } => f.write_str(
                "module is WebAssembly text, not binary: compile it first (wat2wasm module.wat -o module.wasm)",
            ),
            ModuleError::NotWasm { text: false } => {
                f.write_str("module is not WebAssembly: it does not start with \\0asm")
            }
            ModuleError::Invalid(e) => write!(f, "module is invalid: {e}"),
            ModuleError::ForbiddenImport { module, name } => write!(
                f,
                "module imports {module}.{name}, which the sandbox does not offer (it links {WASI_MODULE} functions only)"
            ),
            ModuleError::PlainImport { module, name } => write!(
                f,
                "a plain-ABI module may import nothing, and this one imports {module}.{name}; for a WASI program, submit it with --abi wasi"
            ),
            ModuleError::MissingExport { name, kind, hint } => {
                write!(f, "module does not export a {kind} `{name}`{hint}")
            }
            ModuleError::WrongSignature {
                name,
                expected,
                found,
            } => write!(f, "export `{name}` has type {found}, not {expected}"),
        }
    }
}

impl std::error::Error for ModuleError {}

/// A function's type, as `(i32, i32) -> (i64)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature {
    params: Vec<ValType>,
    results: Vec<ValType>,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[ValType]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(f, "({}) -> ({})", list(&self.params), list(&self.results))
    }
}

/// What an inspected module offers: enough to check a call without the module's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// The first import, if it has any (all from [`WASI_MODULE`]).
    first_import: Option<(String, String)>,
    /// Exported functions and their types.
    functions: Vec<(String, Signature)>,
    /// Exports a memory named `memory`.
    memory: bool,
}

/// Validates `bytes` and checks their imports; see the module docs.
///
/// # Errors
/// [`ModuleError::NotWasm`], [`ModuleError::ForbiddenImport`] (found before any function body
/// is read) or [`ModuleError::Invalid`].
pub fn inspect(bytes: &[u8]) -> Result<ModuleInfo, ModuleError> {
    if !bytes.starts_with(b"\0asm") {
        let text = bytes.trim_ascii_start().starts_with(b"(module")
            || bytes.trim_ascii_start().starts_with(b";;");
        return Err(ModuleError::NotWasm { text });
    }
    let invalid = |e: wasmparser::BinaryReaderError| ModuleError::Invalid(e.to_string());
    // The sections before the code: imports are refused before a function body is read.
    let mut first_import = None;
    let mut exports = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(invalid)?;
                    let offered = import.module == WASI_MODULE
                        && WASI_OFFERED.contains(&import.name)
                        && matches!(import.ty, TypeRef::Func(_));
                    if !offered {
                        return Err(ModuleError::ForbiddenImport {
                            module: import.module.into(),
                            name: import.name.into(),
                        });
                    }
                    first_import.get_or_insert((import.module.into(), import.name.into()));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let e = export.map_err(invalid)?;
                    exports.push((e.name.to_owned(), e.kind, e.index));
                }
            }
            Payload::CodeSectionStart { .. } | Payload::End(_) => break,
            _ => {}
        }
    }
    let types = Validator::new_with_features(WasmFeatures::default())
        .validate_all(bytes)
        .map_err(invalid)?;
    let types = types.as_ref();
    let mut info = ModuleInfo {
        first_import,
        functions: Vec::new(),
        memory: false,
    };
    for (name, kind, index) in exports {
        match kind {
            ExternalKind::Func => {
                let ty = types[types.core_function_at(index)].unwrap_func();
                let signature = Signature {
                    params: ty.params().to_vec(),
                    results: ty.results().to_vec(),
                };
                info.functions.push((name, signature));
            }
            ExternalKind::Memory if name == "memory" => info.memory = true,
            _ => {}
        }
    }
    Ok(info)
}

impl ModuleInfo {
    /// Whether a call with `abi` and `entry` can run this module: for [`Abi::Wasi`] an export
    /// `_start: () -> ()`; for [`Abi::Plain`] no imports, a memory `memory`, `alloc: (i32) ->
    /// (i32)` and `entry: (i32, i32) -> (i64)`.
    ///
    /// # Errors
    /// [`ModuleError::PlainImport`], [`ModuleError::MissingExport`] or
    /// [`ModuleError::WrongSignature`], naming what is missing and, where a mistake is likely,
    /// what to try.
    pub fn check_call(&self, abi: Abi, entry: &str) -> Result<(), ModuleError> {
        use ValType::{I32, I64};
        match abi {
            Abi::Wasi => self.check_func("_start", &[], &[], "() -> ()", {
                if self.function("alloc").is_some() {
                    ": it looks like a plain-ABI module, submit it with --abi plain --entry <export>"
                } else {
                    ": a WASI program needs one (build it as a command, not a library)"
                }
            }),
            Abi::Plain => {
                if let Some((module, name)) = &self.first_import {
                    return Err(ModuleError::PlainImport {
                        module: module.clone(),
                        name: name.clone(),
                    });
                }
                if !self.memory {
                    return Err(ModuleError::MissingExport {
                        name: "memory".into(),
                        kind: "memory",
                        hint: "",
                    });
                }
                self.check_func("alloc", &[I32], &[I32], "(i32) -> (i32)", "")?;
                let hint = if self.function("_start").is_some() {
                    ": it looks like a WASI program, submit it with --abi wasi"
                } else {
                    ""
                };
                self.check_func(entry, &[I32, I32], &[I64], "(i32, i32) -> (i64)", hint)
            }
        }
    }

    fn function(&self, name: &str) -> Option<&Signature> {
        self.functions
            .iter()
            .find_map(|(n, s)| (n == name).then_some(s))
    }

    fn check_func(
        &self,
        name: &str,
        params: &[ValType],
        results: &[ValType],
        expected: &'static str,
        hint: &'static str,
    ) -> Result<(), ModuleError> {
        let Some(found) = self.function(name) else {
            return Err(ModuleError::MissingExport {
                name: name.into(),
                kind: "function",
                hint,
            });
        };
        if found.params != params || found.results != results {
            return Err(ModuleError::WrongSignature {
                name: name.into(),
                expected,
                found: found.to_string(),
            });
        }
        Ok(())
    }
}

/// Refusals remembered by module hash, the newest `capacity` of them, so a module sent again
/// is refused without being read again.
#[derive(Debug)]
pub struct Refusals {
    entries: VecDeque<(Digest, ModuleError)>,
    capacity: usize,
}

impl Refusals {
    /// Remembers at most `capacity` refusals; the oldest go first.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity,
        }
    }

    /// Why the module `hash` was refused, if it was.
    pub fn get(&self, hash: &Digest) -> Option<&ModuleError> {
        self.entries
            .iter()
            .find_map(|(h, e)| (h == hash).then_some(e))
    }

    /// Remembers that the module `hash` was refused for `error`.
    pub fn remember(&mut self, hash: Digest, error: ModuleError) {
        if self.capacity == 0 || self.get(&hash).is_some() {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((hash, error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wat(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    const PLAIN: &str = r#"(module
        (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) (i32.const 16))
        (func (export "run") (param i32 i32) (result i64) (i64.const 0)))"#;

    #[test]
    fn a_plain_module_passes_for_its_entry_and_is_told_apart_from_wasi() {
        let info = inspect(&wat(PLAIN)).unwrap();
        assert_eq!(info.check_call(Abi::Plain, "run"), Ok(()));
        let missing = info.check_call(Abi::Plain, "classify").unwrap_err();
        assert_eq!(
            missing.to_string(),
            "module does not export a function `classify`"
        );
        let wasi = info.check_call(Abi::Wasi, "_start").unwrap_err();
        assert!(wasi.to_string().contains("--abi plain"), "{wasi}");
    }

    #[test]
    fn a_wasi_program_submitted_as_plain_is_told_to_use_abi_wasi() {
        let bytes = wat(r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")))"#);
        let info = inspect(&bytes).unwrap();
        assert_eq!(info.check_call(Abi::Wasi, "_start"), Ok(()));
        let plain = info.check_call(Abi::Plain, "run").unwrap_err();
        assert_eq!(
            plain.to_string(),
            "a plain-ABI module may import nothing, and this one imports wasi_snapshot_preview1.fd_write; for a WASI program, submit it with --abi wasi"
        );
    }

    #[test]
    fn an_import_the_sandbox_does_not_offer_is_named() {
        for (module, name) in [
            ("env", "memcpy"),
            (WASI_MODULE, "fd_open"),
            ("wasi_unstable", "fd_read"),
        ] {
            let bytes = wat(&format!(
                r#"(module (import "{module}" "{name}" (func)) (func (export "_start")))"#
            ));
            assert_eq!(
                inspect(&bytes),
                Err(ModuleError::ForbiddenImport {
                    module: module.into(),
                    name: name.into()
                })
            );
        }
    }

    #[test]
    fn text_garbage_and_invalid_bytes_are_refused_with_what_they_are() {
        assert_eq!(
            inspect(b"(module)"),
            Err(ModuleError::NotWasm { text: true })
        );
        assert_eq!(
            inspect(b"MZ\x90\0"),
            Err(ModuleError::NotWasm { text: false })
        );
        // A function whose body returns nothing although it promises an i64.
        let e = inspect(&wat("(module (func (result i64)))")).unwrap_err();
        assert!(matches!(e, ModuleError::Invalid(_)), "{e:?}");
        assert!(e.to_string().starts_with("module is invalid: "));
        assert!(!e.to_string().contains("invalid: module is invalid"));
    }

    #[test]
    fn refusals_keep_the_newest() {
        let mut r = Refusals::new(2);
        let e = ModuleError::NotWasm { text: false };
        for i in 0..3u8 {
            r.remember(Digest([i; 32]), e.clone());
        }
        assert_eq!(r.get(&Digest([0; 32])), None);
        assert_eq!(r.get(&Digest([2; 32])), Some(&e));
    }

    #[test]
    fn a_wrong_entry_type_names_both_types() {
        let bytes = wat(r#"(module
            (memory (export "memory") 1)
            (func (export "alloc") (param i32) (result i32) (i32.const 16))
            (func (export "run") (param i32) (result i32) (i32.const 0)))"#);
        let e = inspect(&bytes)
            .unwrap()
            .check_call(Abi::Plain, "run")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "export `run` has type (i32) -> (i32), not (i32, i32) -> (i64)"
        );
    }
}
