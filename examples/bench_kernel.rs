//! Writes visor's CPU benchmark kernel (guest/bench, a flat Multiboot v1 image)
//! to the path given: `cargo run --release --example bench_kernel -- OUT.bin`.
//! bench/cpu_speed.py runs it under visor, QEMU and Bochs.

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: bench_kernel OUT.bin");
        std::process::exit(2)
    });
    if let Err(e) = std::fs::write(&out, visor::BENCH_KERNEL) {
        eprintln!("bench_kernel: {out}: {e}");
        std::process::exit(2)
    }
}
