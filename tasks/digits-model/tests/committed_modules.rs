//! The committed task modules in tasks/modules/ are what tasks/build.sh builds from the sources.
//!
//! Runs on the host with the normal toolchain: it does not rebuild anything, it recomputes the
//! sources hash exactly as build.sh does and compares it with tasks/modules/SOURCES.sha3, so a
//! change to a module's sources without a rebuild fails here (and `tasks/build.sh --check`
//! proves the bytes themselves). It also reads each module's import and export sections.

use sha3::{Digest, Sha3_256};
use std::path::{Path, PathBuf};

/// What build.sh hashes for each module: files, or directories taken recursively (names
/// starting with '.' skipped), relative to tasks/. Keep in step with `SOURCES` in build.sh.
const DIGITS_SOURCES: &[&str] = &[
    "digits-wasm/Cargo.toml",
    "digits-wasm/Cargo.lock",
    "digits-wasm/src",
    "digits-model/Cargo.toml",
    "digits-model/src",
    "digits-model/data",
];
const WASI_UPPER_SOURCES: &[&str] = &[
    "wasi-upper/Cargo.toml",
    "wasi-upper/Cargo.lock",
    "wasi-upper/src",
];

fn tasks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("digits-model lives in tasks/")
        .to_path_buf()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; run tasks/build.sh", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The two hashes SOURCES.sha3 records for `module`: (wasm, sources).
fn recorded(module: &str) -> (String, String) {
    let text = String::from_utf8(read(&tasks_dir().join("modules/SOURCES.sha3")))
        .expect("SOURCES.sha3 is UTF-8");
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| match line.split(' ').collect::<Vec<_>>()[..] {
            [name, wasm, sources] if name == module => Some((wasm.to_owned(), sources.to_owned())),
            _ => None,
        })
        .unwrap_or_else(|| {
            panic!("tasks/modules/SOURCES.sha3 has no line for {module}: run tasks/build.sh")
        })
}

fn collect_files(tasks: &Path, entry: &str, files: &mut Vec<String>) {
    let path = tasks.join(entry);
    if path.is_file() {
        files.push(entry.to_owned());
        return;
    }
    let listing =
        std::fs::read_dir(&path).unwrap_or_else(|e| panic!("cannot list {}: {e}", path.display()));
    for child in listing {
        let name = child.expect("directory entry").file_name();
        let name = name.to_str().expect("source file names are UTF-8");
        if !name.starts_with('.') {
            collect_files(tasks, &format!("{entry}/{name}"), files);
        }
    }
}

/// For each file in byte order of its path relative to tasks/: the path (UTF-8), one 0x00
/// byte, the content length as u64 big-endian, the content. Same as build.sh.
fn sources_hash(entries: &[&str]) -> String {
    let tasks = tasks_dir();
    let mut files = Vec::new();
    for entry in entries {
        collect_files(&tasks, entry, &mut files);
    }
    files.sort_unstable();
    files.dedup();
    let mut hasher = Sha3_256::new();
    for file in &files {
        let content = read(&tasks.join(file));
        hasher.update(file.as_bytes());
        hasher.update([0]);
        hasher.update((content.len() as u64).to_be_bytes());
        hasher.update(&content);
    }
    hex(&hasher.finalize())
}

fn assert_built_from_current_sources(module: &str, entries: &[&str]) {
    let (_, recorded_sources) = recorded(module);
    assert_eq!(
        sources_hash(entries),
        recorded_sources,
        "tasks/modules/{module} is stale: run tasks/build.sh"
    );
}

fn assert_matches_recorded_hash(module: &str) {
    let (recorded_wasm, _) = recorded(module);
    let wasm = read(&tasks_dir().join("modules").join(module));
    assert_eq!(
        hex(&Sha3_256::digest(&wasm)),
        recorded_wasm,
        "tasks/modules/{module} is not the module SOURCES.sha3 records: run tasks/build.sh"
    );
}

#[test]
fn the_digits_module_was_rebuilt_after_its_sources_last_changed() {
    assert_built_from_current_sources("digits.wasm", DIGITS_SOURCES);
}

#[test]
fn the_wasi_upper_module_was_rebuilt_after_its_sources_last_changed() {
    assert_built_from_current_sources("wasi-upper.wasm", WASI_UPPER_SOURCES);
}

#[test]
fn the_committed_digits_module_is_the_one_sources_sha3_records() {
    assert_matches_recorded_hash("digits.wasm");
}

#[test]
fn the_committed_wasi_upper_module_is_the_one_sources_sha3_records() {
    assert_matches_recorded_hash("wasi-upper.wasm");
}

/// The (module, name) of every import and the (name, kind) of every export of a module.
#[derive(Debug, Default)]
struct Interface {
    imports: Vec<(String, String)>,
    exports: Vec<(String, ExportKind)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExportKind {
    Function,
    Table,
    Memory,
    Global,
}

/// Just enough of the WebAssembly binary format to list imports and exports.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        let (&first, rest) = self.bytes.split_first().expect("truncated module");
        self.bytes = rest;
        first
    }

    fn take(&mut self, len: usize) -> &'a [u8] {
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        head
    }

    fn leb_u32(&mut self) -> u32 {
        let mut value = 0_u32;
        for shift in (0..35).step_by(7) {
            let byte = self.byte();
            value |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return value;
            }
        }
        panic!("LEB128 longer than 5 bytes")
    }

    fn name(&mut self) -> String {
        let len = self.leb_u32() as usize;
        String::from_utf8(self.take(len).to_vec()).expect("names are UTF-8")
    }

    fn limits(&mut self) {
        let flags = self.byte();
        self.leb_u32();
        if flags & 1 == 1 {
            self.leb_u32();
        }
    }
}

fn interface(module: &str) -> Interface {
    let wasm = read(&tasks_dir().join("modules").join(module));
    let mut reader = Reader { bytes: &wasm };
    assert_eq!(
        reader.take(8),
        b"\0asm\x01\0\0\0",
        "{module} is not a WebAssembly 1 module"
    );
    let mut found = Interface::default();
    while !reader.bytes.is_empty() {
        let id = reader.byte();
        let size = reader.leb_u32() as usize;
        let mut section = Reader {
            bytes: reader.take(size),
        };
        match id {
            2 => {
                for _ in 0..section.leb_u32() {
                    let import = (section.name(), section.name());
                    match section.byte() {
                        0 => drop(section.leb_u32()),
                        1 => {
                            section.byte();
                            section.limits();
                        }
                        2 => section.limits(),
                        3 => drop(section.take(2)),
                        kind => panic!("unknown import kind {kind}"),
                    }
                    found.imports.push(import);
                }
            }
            7 => {
                for _ in 0..section.leb_u32() {
                    let name = section.name();
                    let kind = match section.byte() {
                        0 => ExportKind::Function,
                        1 => ExportKind::Table,
                        2 => ExportKind::Memory,
                        3 => ExportKind::Global,
                        kind => panic!("unknown export kind {kind}"),
                    };
                    section.leb_u32();
                    found.exports.push((name, kind));
                }
            }
            _ => {}
        }
    }
    found
}

fn exports(interface: &Interface, name: &str) -> Option<ExportKind> {
    interface
        .exports
        .iter()
        .find_map(|(export, kind)| (export == name).then_some(*kind))
}

#[test]
fn the_digits_module_imports_nothing_and_exports_the_task_abi() {
    let digits = interface("digits.wasm");

    assert_eq!(digits.imports, []);
    assert_eq!(exports(&digits, "memory"), Some(ExportKind::Memory));
    assert_eq!(exports(&digits, "alloc"), Some(ExportKind::Function));
    assert_eq!(exports(&digits, "classify"), Some(ExportKind::Function));
}

#[test]
fn the_wasi_upper_module_imports_only_fd_read_fd_write_and_proc_exit() {
    let upper = interface("wasi-upper.wasm");

    let mut imports = upper.imports.clone();
    imports.sort();
    let wasi = |name: &str| ("wasi_snapshot_preview1".to_owned(), name.to_owned());
    assert_eq!(
        imports,
        [wasi("fd_read"), wasi("fd_write"), wasi("proc_exit")]
    );
    assert_eq!(exports(&upper, "memory"), Some(ExportKind::Memory));
    assert_eq!(exports(&upper, "_start"), Some(ExportKind::Function));
}
