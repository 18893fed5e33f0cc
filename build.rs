//! Builds the guests with the host's rustc for x86_64-unknown-linux-gnu, static,
//! non-PIE, without a red zone, and leaves them in OUT_DIR for `include_bytes!`:
//! the demo OS (guest/demo, an ELF64 kernel) and the CPU benchmark (guest/bench,
//! a flat Multiboot image).
//!
//! The guests are compiled without SSE (and must not call into precompiled `core`
//! code that uses it, such as `core::fmt`): some KVM hosts (PVM, the
//! pagetable-based KVM this project's machines run) emulate a batch of guest
//! kernel instructions after each trap, and their emulator cannot decode SSE.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn rustc(args: &[&str]) {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let common = [
        "--edition=2021",
        "--target=x86_64-unknown-linux-gnu",
        "-Copt-level=2",
        "-Cpanic=abort",
        "-Crelocation-model=static",
        "-Cno-redzone=yes",
        "-Cdebuginfo=0",
        "-Cstrip=debuginfo",
        "-Ctarget-feature=-mmx,-sse,-sse2",
    ];
    let out = Command::new(&rustc)
        .args(common)
        .args(args)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc}: {e}"));
    if !out.status.success() {
        panic!(
            "building a guest failed: rustc {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let guest_out = out.join("guest");
    std::fs::create_dir_all(&guest_out).unwrap();
    let g = guest_out.to_str().unwrap();
    rustc(&[
        "--crate-name=abi",
        "--crate-type=rlib",
        "crates/abi/src/lib.rs",
        "--out-dir",
        g,
    ]);
    rustc(&[
        "--crate-name=hypercall",
        "--crate-type=rlib",
        "crates/hypercall/src/lib.rs",
        "--out-dir",
        g,
    ]);
    rustc(&[
        "--crate-name=arch",
        "--crate-type=rlib",
        "crates/arch/src/lib.rs",
        "--out-dir",
        g,
    ]);
    let abi = format!("abi={g}/libabi.rlib");
    let arch = format!("arch={g}/libarch.rlib");
    let hypercall = format!("hypercall={g}/libhypercall.rlib");
    let kernel = |name: &str, externs: &[&str], extra: &[&str], out_file: &str| {
        let main = format!("guest/{name}/main.rs");
        let script = format!("-Clink-arg=-Wl,-Tguest/{name}/link.ld");
        let out_path = out.join(out_file);
        let mut args = vec![
            "--crate-name",
            name,
            "--crate-type=bin",
            &main,
            "-L",
            g,
            "-Clink-arg=-nostartfiles",
            "-Clink-arg=-nostdlib",
            "-Clink-arg=-static",
            "-Clink-arg=-no-pie",
            &script,
            "-Clink-arg=-Wl,--build-id=none",
        ];
        for e in externs {
            args.extend(["--extern", e]);
        }
        args.extend(extra);
        args.extend(["-o", out_path.to_str().unwrap()]);
        rustc(&args);
    };
    // The demo kernel keeps its symbols and debug information (gdb's source
    // lines and Rust names: `visor run --gdb`); a copy goes beside the
    // visor binary (target/<profile>/demo.elf) for gdb to load.
    kernel(
        "demo",
        &[&abi, &arch, &hypercall],
        &["-Cdebuginfo=2", "-Cstrip=none"],
        "demo.elf",
    );
    if let Some(profile_dir) = out.ancestors().nth(3) {
        // OUT_DIR is target/<profile>/build/visor-<hash>/out.
        let _ = std::fs::copy(out.join("demo.elf"), profile_dir.join("demo.elf"));
    }
    // The linker writes the benchmark as a raw image (Multiboot a.out kludge).
    kernel(
        "bench",
        &[&abi],
        &["-Clink-arg=-Wl,--oformat=binary"],
        "bench.bin",
    );
    for p in [
        "guest",
        "crates/abi/src",
        "crates/arch/src",
        "crates/hypercall/src",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
}
