//! Engine `pv` (paravirtualization): hypercalls through `int 0x82`, and a
//! deprivileged kernel that may not execute a privileged instruction or make
//! an invalid request.

mod common;

use common::guest::*;
use hypercall::nr;
use iced_x86::code_asm::*;
use visor::{Engine, Outcome};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 0x20_0000;
const PTE: u64 = DATA + 0x800;

/// The deprivileged kernel's bootstrap: the hypercall page at PAGE through a
/// bare `int 0x82` (RAX: the result).
fn set_hypercall_page(a: &mut CodeAssembler) -> Result<(), IcedError> {
    hypercall_page(a, Engine::Pv, PAGE)
}

fn stub(n: u64) -> u64 {
    common::guest::stub(PAGE, n)
}

/// The hypercall page is registered with a bare `int 0x82`; `mmu_update`
/// refuses an entry that maps memory outside the guest and accepts one that
/// does not; `set_gdt` refuses a call gate; the first privileged instruction
/// ends the run with its RIP, unemulated.
#[test]
fn deprivileged_kernel_is_checked() {
    let mut cli_at = 0;
    let code = asm64(|a| {
        set_hypercall_page(a)?;
        a.mov(r12, rax)?;
        a.mov(rdi, DATA)?;
        a.mov(esi, 1u32)?;
        a.mov(rax, stub(nr::MMU_UPDATE))?;
        a.call(rax)?;
        a.mov(r13, rax)?;
        a.mov(rdi, DATA + 16)?;
        a.mov(esi, 1u32)?;
        a.mov(rax, stub(nr::MMU_UPDATE))?;
        a.call(rax)?;
        a.mov(r14, rax)?;
        a.mov(rdi, DATA + 0x100)?;
        a.mov(esi, 2u32)?;
        a.xor(edx, edx)?;
        a.mov(rax, stub(nr::SET_GDT))?;
        a.call(rax)?;
        a.mov(r15, rax)?;
        a.nop()?;
        a.cli()?;
        a.hlt()
    });
    // The CLI is two bytes before the end (CLI, HLT).
    cli_at += CODE + code.len() as u64 - 2;
    let mut g = Guest::long_mode(Engine::Pv, &code);
    let m = &g.vm.mem;
    // mmu_update requests: a PTE mapping 1 TiB (outside the guest), then 20 KiB.
    for (i, v) in [PTE, (1u64 << 40) | 3, PTE, 0x5000 | 3].iter().enumerate() {
        m.write_obj(*v, GuestAddress(DATA + 8 * i as u64)).unwrap();
    }
    // A GDT with a null entry and a 64-bit call gate.
    m.write_obj(0u64, GuestAddress(DATA + 0x100)).unwrap();
    m.write_obj(0x0000_8c00_0010_0000u64, GuestAddress(DATA + 0x108))
        .unwrap();
    let o = g.run();
    let r = g.regs();
    assert_eq!(r.r12, 0, "set_hypercall_page");
    assert_eq!(
        r.r13, 0,
        "mmu_update of a frame outside guest RAM is refused"
    );
    assert_eq!(r.r14, 1, "a valid mmu_update is done");
    assert_eq!(
        r.r15 as i64,
        -hypercall::errno::EINVAL,
        "set_gdt with a call gate"
    );
    assert_eq!(g.vm.mem.read_obj::<u64>(GuestAddress(PTE)).unwrap(), 0x5003);
    match o {
        Outcome::GuestFailure { what, .. } => {
            assert!(
                what.contains(&format!("privileged instruction cli at {cli_at:#x}")),
                "{what}"
            );
        }
        o => panic!("expected the CLI to end the run, got {o:?}"),
    }
    assert_eq!(g.stats.hypercalls.get("mmu_update"), Some(&2));
}

/// Outside the hypercall page's entry, `int 0x82` is a software interrupt
/// like any other: from the kernel with no hypercall page it is still a
/// hypercall (the bootstrap), but the VMM refuses an unknown number.
#[test]
fn unknown_hypercall_is_enosys() {
    let code = asm64(|a| {
        a.mov(eax, 0x7777u32)?;
        a.int(0x82)?;
        a.mov(rbx, rax)?;
        a.mov(al, 0x21)?;
        a.out(0xf4, al)?;
        a.hlt()
    });
    let mut g = Guest::long_mode(Engine::Pv, &code);
    let o = g.run();
    assert_eq!(g.regs().rbx as i64, -hypercall::errno::ENOSYS);
    // The OUT is privileged too: the run ends there.
    assert!(matches!(o, Outcome::GuestFailure { .. }), "{o:?}");
}

/// The live page tables are checked and protected: `new_baseptr` refuses a
/// tree that links a table outside guest RAM, and a direct write to a live
/// table (instead of `mmu_update`) ends the run.
#[test]
fn live_page_tables_are_checked_and_protected() {
    const BAD_PML4: u64 = DATA + 0x1000;
    const CR3_AT: u64 = DATA + 0x20;
    let code = asm64(|a| {
        set_hypercall_page(a)?;
        a.mov(rdi, BAD_PML4)?;
        a.mov(rax, stub(nr::NEW_BASEPTR))?;
        a.call(rax)?;
        a.mov(r12, rax)?;
        a.mov(rax, qword_ptr(CR3_AT))?;
        a.mov(rbx, qword_ptr(rax))?;
        a.mov(qword_ptr(rax), rbx)?; // a direct write to the live PML4
        a.hlt()
    });
    let mut g = Guest::long_mode(Engine::Pv, &code);
    let root = g.vm.vcpu.sregs().unwrap().cr3 & !0xfff;
    let m = &g.vm.mem;
    m.write_obj(root, GuestAddress(CR3_AT)).unwrap();
    // A PML4 whose first entry links a PDPT at 1 TiB.
    m.write_obj((1u64 << 40) | 3, GuestAddress(BAD_PML4))
        .unwrap();
    let o = g.run();
    assert_eq!(g.regs().r12 as i64, -hypercall::errno::EINVAL);
    match o {
        Outcome::GuestFailure { what, .. } => {
            assert!(what.contains("write to a live page table"), "{what}")
        }
        o => panic!("expected the direct write to end the run, got {o:?}"),
    }
}

/// An argument of the hostile hypercall: of `r`'s class, from random `x`:
/// random, just below 2^64 (0xffff_ffff_ffff_fff0 among them), at the end of
/// guest memory (16 MiB), a count around the ABI's limits, a pointer into the
/// data page.
fn hostile_arg(r: u64, x: u64) -> u64 {
    const RAM: u64 = 16 << 20;
    const COUNTS: [u64; 11] = [0, 1, 2, 3, 255, 256, 257, 1024, 1025, 1 << 20, u64::MAX];
    match r % 6 {
        0 => x,
        1 => u64::MAX - x % 64,
        2 => 0xffff_ffff_ffff_fff0 - (x % 8) * 16,
        3 => RAM - x % 64,
        4 => COUNTS[x as usize % COUNTS.len()],
        _ => DATA + x % 0x1000,
    }
}

/// Random bytes as the guest kernel's code, on both deprivileged engines:
/// whatever they do (fault, triple-fault, privileged instructions, wild
/// hypercalls with arguments near 2^64, at the end of guest memory and with
/// counts at the limits, in half of the runs with the top of the address
/// space mapped so that such arguments translate), the VMM ends the run
/// cleanly and never panics.
#[test]
fn random_kernel_code_never_panics() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // VISOR_RANDOM_COUNT runs more programs per engine (150 by default).
    let count = std::env::var("VISOR_RANDOM_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for engine in [Engine::Trap, Engine::Pv] {
        for _ in 0..count {
            let mut code = vec![0u8; 64];
            for b in code.iter_mut() {
                *b = next() as u8;
            }
            // Some runs start with a hypercall-page bootstrap and a hypercall of
            // random number and arguments.
            if next() % 2 == 0 {
                let pre = asm64(|a| {
                    set_hypercall_page(a)?;
                    a.mov(eax, (next() % 20) as u32)?;
                    a.mov(rdi, hostile_arg(next(), next()))?;
                    a.mov(rsi, hostile_arg(next(), next()))?;
                    a.mov(rdx, hostile_arg(next(), next()))?;
                    a.mov(r10, hostile_arg(next(), next()))?;
                    a.int(0x82)
                });
                code.splice(0..0, pre);
            }
            let mut g = Guest::long_mode(engine, &code);
            if next() % 2 == 0 {
                map_top(&g, 0x40_0000, 0x60_0000);
            }
            // Stopped after 20 ms if still running (a kick: the software
            // engines take it at once).
            let stopper = g.vm.stopper();
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    stopper.stop();
                });
                let _ = g.run();
            });
        }
    }
}
