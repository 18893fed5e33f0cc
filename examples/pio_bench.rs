//! The port-I/O round-trip benchmark guest, and a bare KVM_RUN loop to compare
//! visor with (bench/exit-overhead.sh).
//!
//! `pio_bench elf PATH N`: writes an ELF64 kernel that executes `out 0x80, al`
//! N times, then writes 0 to the isa-debug-exit port.
//! `pio_bench raw N`: runs the same guest on KVM with nothing but a KVM_RUN loop
//! (no buses, no statistics, no trait objects) and prints the time per exit.

use std::time::Instant;

use iced_x86::code_asm::*;
use kvm_ioctls::VcpuExit;
use machine::MemoryLayout;
use vcpu::Vcpu;

const ENTRY: u64 = 0x20_0000;

fn guest(n: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut lp = a.create_label();
    a.mov(ecx, n).unwrap();
    a.set_label(&mut lp).unwrap();
    a.out(0x80, al).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(lp).unwrap();
    a.xor(eax, eax).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    machine::loader::elf64_image(ENTRY, &a.assemble(ENTRY).unwrap())
}

fn raw(n: u32) {
    let layout = MemoryLayout::new(64 << 20).unwrap();
    let mem = layout.create().unwrap();
    let opts = machine::loader::BootOptions {
        kernel_name: "pio",
        cmdline: None,
        initrd: None,
    };
    let loaded = machine::loader::load(&mem, &layout, &guest(n), &opts).unwrap();
    // Same VM as visor's kvm engine builds (memory slots, CPUID, boot state); only
    // the loop differs: this one is bare KVM_RUN.
    let mut vm = visor_kvm::KvmVm::new(&mem, visor_kvm::KvmConfig::default()).unwrap();
    let mut vcpu = vm.create_kvm_vcpu(0).unwrap();
    vcpu.set_sregs(&loaded.cpu.sregs).unwrap();
    vcpu.set_regs(&loaded.cpu.regs).unwrap();
    let fd = vcpu.fd();
    let start = Instant::now();
    let mut exits = 0u64;
    loop {
        match fd.run() {
            Ok(VcpuExit::IoOut(0xf4, _)) => break,
            Ok(VcpuExit::IoOut(..)) => exits += 1,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let ns = start.elapsed().as_nanos() as u64;
    println!(
        "raw_kvm exits={exits} total_ns={ns} ns_per_exit={}",
        ns / exits.max(1)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("elf") if args.len() == 4 => {
            let n: u32 = args[3].parse().expect("N");
            std::fs::write(&args[2], guest(n)).expect("write elf");
        }
        Some("raw") if args.len() == 3 => raw(args[2].parse().expect("N")),
        _ => {
            eprintln!("usage: pio_bench elf PATH N | pio_bench raw N");
            std::process::exit(2);
        }
    }
}
