#!/usr/bin/env python3
"""Run the committed task modules in wasmtime and check them against the task ABI.

    python3 -m pip install -r tasks/requirements.txt
    python3 tasks/check_modules.py

digits.wasm: classifies every held-out image in one call and must return exactly the labels
of an independent integer implementation (below, reading the weights from weights.rs), score
what train.py reported, import nothing, and trap on invalid input. wasi-upper.wasm: must
upper-case stdin to stdout, import only fd_read, fd_write and proc_exit, and exit 0.
Prints the fuel each call used (wasmtime's default cost: one unit per instruction).
"""

import pathlib
import re
import sys
import tempfile

import wasmtime

TASKS = pathlib.Path(__file__).resolve().parent
MODULES = TASKS / "modules"
WEIGHTS_RS = TASKS / "digits-model" / "src" / "weights.rs"
HELDOUT_BIN = TASKS / "digits-model" / "data" / "heldout.bin"
IMAGE_BYTES = 64
FUEL = 10**10


def engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.consume_fuel = True
    return wasmtime.Engine(config)


def read_weights():
    text = WEIGHTS_RS.read_text()

    def array(name):
        body = re.search(rf"static {name}: [^=]+= (\[.*?\]);\n", text, re.S).group(1)
        rows = re.findall(r"\[([-\d, ]+)\]", body)
        return [[int(v) for v in row.split(",")] for row in rows]

    reported = re.search(r"quantised (\d+)/(\d+)", text)
    return (array("W1"), array("B1")[0], array("W2"), array("B2")[0]), int(reported.group(1))


def reference_classify(image, weights):
    """The integer network in plain Python, written from the README's description."""
    w1, b1, w2, b2 = weights
    pixels = [min(p, 16) for p in image]
    hidden = [max(0, b + sum(w * p for w, p in zip(row, pixels))) for row, b in zip(w1, b1)]
    scores = [b + sum(w * h for w, h in zip(row, hidden)) for row, b in zip(w2, b2)]
    return scores.index(max(scores))  # first maximum, as model.rs


def check(condition, message):
    if not condition:
        sys.exit(f"check_modules.py: FAILED: {message}")
    print(f"ok: {message}")


def instantiate_digits(eng, module):
    store = wasmtime.Store(eng)
    store.set_fuel(FUEL)
    exports = wasmtime.Instance(store, module, []).exports(store)
    return store, exports


def run_digits(eng, module, data):
    store, exports = instantiate_digits(eng, module)
    ptr = exports["alloc"](store, len(data))
    exports["memory"].write(store, data, ptr)
    before = store.get_fuel()
    packed = exports["classify"](store, ptr, len(data)) & 0xFFFF_FFFF_FFFF_FFFF
    used = before - store.get_fuel()
    out_ptr, out_len = packed >> 32, packed & 0xFFFF_FFFF
    return bytes(exports["memory"].read(store, out_ptr, out_ptr + out_len)), used


def traps(eng, module, data, ptr_offset=0, length=None):
    store, exports = instantiate_digits(eng, module)
    ptr = exports["alloc"](store, len(data))
    exports["memory"].write(store, data, ptr)
    try:
        exports["classify"](store, ptr + ptr_offset, len(data) if length is None else length)
    except wasmtime.Trap:
        return True
    return False


def check_digits(eng):
    module = wasmtime.Module.from_file(eng, str(MODULES / "digits.wasm"))
    check(not module.imports, "digits.wasm imports nothing")
    exports = {e.name for e in module.exports}
    check({"memory", "alloc", "classify"} <= exports, f"digits.wasm exports {sorted(exports)}")

    weights, reported_correct = read_weights()
    heldout = HELDOUT_BIN.read_bytes()
    records = [heldout[i : i + IMAGE_BYTES + 1] for i in range(0, len(heldout), IMAGE_BYTES + 1)]
    images = b"".join(r[:IMAGE_BYTES] for r in records)
    truth = bytes(r[IMAGE_BYTES] for r in records)
    reference = bytes(reference_classify(r[:IMAGE_BYTES], weights) for r in records)

    labels, fuel = run_digits(eng, module, images)
    check(labels == reference, f"wasm labels equal the reference on all {len(records)} images")
    correct = sum(a == b for a, b in zip(labels, truth))
    check(correct == reported_correct, f"wasm scores {correct}/{len(records)} as train.py reported")
    one, fuel_one = run_digits(eng, module, images[:IMAGE_BYTES])
    check(one == labels[:1], "a one-image call agrees with the batch")
    print(f"   fuel: {fuel} for {len(records)} images ({fuel / len(records):.0f} per image), "
          f"{fuel_one} for one image")

    check(traps(eng, module, images[:IMAGE_BYTES], length=0), "len 0 traps")
    check(traps(eng, module, images[: IMAGE_BYTES + 1]), "len 65 traps")
    check(traps(eng, module, images[:IMAGE_BYTES], ptr_offset=-(1 << 16)),
          "input below the allocated region traps")
    check(traps(eng, module, images[:IMAGE_BYTES], ptr_offset=1 << 30),
          "input past the end of memory traps")


def check_wasi_upper(eng):
    module = wasmtime.Module.from_file(eng, str(MODULES / "wasi-upper.wasm"))
    imports = sorted((i.module, i.name) for i in module.imports)
    check(imports == [("wasi_snapshot_preview1", n) for n in ("fd_read", "fd_write", "proc_exit")],
          "wasi-upper.wasm imports only fd_read, fd_write and proc_exit")
    check("_start" in {e.name for e in module.exports}, "wasi-upper.wasm exports _start")

    # Longer than the module's 4 KiB buffer, with non-ASCII bytes that must pass through;
    # and nothing at all.
    for text in [("Hello, Ambient! ünïcode stays; digits 0-9 too.\n" * 200).encode(), b""]:
        stdout, status, used = run_wasi(eng, module, text)
        expected = bytes(b - 32 if 97 <= b <= 122 else b for b in text)
        check(status == 0 and stdout == expected,
              f"wasi-upper upper-cases {len(text)} bytes and exits 0 (fuel: {used})")


def run_wasi(eng, module, stdin_bytes):
    """Runs a WASI command; returns (stdout, exit status, fuel used)."""
    with tempfile.TemporaryDirectory() as tmp:
        stdin, stdout = pathlib.Path(tmp, "in"), pathlib.Path(tmp, "out")
        stdin.write_bytes(stdin_bytes)
        wasi = wasmtime.WasiConfig()
        wasi.stdin_file = str(stdin)
        wasi.stdout_file = str(stdout)
        store = wasmtime.Store(eng)
        store.set_fuel(FUEL)
        store.set_wasi(wasi)
        linker = wasmtime.Linker(eng)
        linker.define_wasi()
        start = linker.instantiate(store, module).exports(store)["_start"]
        try:
            start(store)
            status = 0
        except wasmtime.ExitTrap as exit_trap:
            status = exit_trap.code
        return stdout.read_bytes(), status, FUEL - store.get_fuel()


def main():
    eng = engine()
    check_digits(eng)
    check_wasi_upper(eng)
    print("check_modules.py: all checks passed")


if __name__ == "__main__":
    main()
