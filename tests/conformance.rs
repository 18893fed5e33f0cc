//! The conformance suite: tiny guests, assembled here with iced-x86, each run on
//! every engine it applies to through one macro, with expected registers, exits
//! and device traffic.

mod common;

use iced_x86::code_asm::*;
use machine::bus::StopReason;
use visor::{Engine, Outcome, VmOptions};
use vm_memory::{Bytes, GuestAddress};

use common::guest::*;

/// Runs each case on each listed engine, where it works on this host. An
/// engine that is not available here is reported on stderr, not silently
/// passed.
macro_rules! on_engines {
    (@case $case:ident [$($engine:ident),*]) => {
        mod $case {
            $(
                #[test]
                fn $engine() {
                    let engine = visor::Engine::from_name(stringify!($engine)).unwrap();
                    super::run_case(engine, super::$case);
                }
            )*
        }
    };
    ($engines:tt: $($case:ident),* $(,)?) => {
        $( on_engines!(@case $case $engines); )*
    };
}

fn run_case(engine: Engine, case: fn(Engine)) {
    if common::engines::available(engine) {
        case(engine)
    }
}

// Engine `pv` runs a deprivileged kernel: at CPL 1, with every privileged
// operation a hypercall, so HLT, IN/OUT, WRMSR, MOV from CR2 and IRETQ end
// its run (docs/hypercalls.md). These cases need them: each ends with HLT;
// port_io, rep_outsb_insb and debug_exit are port I/O; guest_page_fault reads
// CR2 and, with int3_breakpoint, returns with IRETQ; hypercalls counts the
// WRMSR that registers its page. What a PV kernel does instead is in
// tests/pv.rs.
on_engines!(
    [kvm, emu, trap, vmx, bt]:
    arithmetic_hlt,
    port_io,
    rep_outsb_insb,
    mmio_unbacked,
    cpuid,
    timing_leaf,
    guest_page_fault,
    debug_exit,
    int3_breakpoint,
    fwait,
    hypercalls,
);

// The CPU model advertises RDTSCP; `kvm` shows the guest what this host's
// KVM supports (a PVM host offers no RDTSCP), so the case is the software
// engines'.
on_engines!([emu, trap, vmx, bt]: rdtscp);

// Cases a PV kernel can run too: they use no privileged instruction (the
// hypercall page is registered as each engine's kernel can, see
// `hypercall_page`).
on_engines!(
    [kvm, emu, trap, vmx, bt, pv]:
    triple_fault,
    mmu_update_flushes_stale_translations,
    hypercall_arguments_near_the_top,
);

fn arithmetic_hlt(engine: Engine) {
    let code = asm64(|a| {
        a.mov(rax, 6u64)?;
        a.mov(rbx, 7u64)?;
        a.imul_2(rax, rbx)?; // 42
        a.mov(rcx, 0xffff_ffff_ffff_fff0u64)?;
        a.add(rcx, 0x20)?; // 0x10, carry out
        a.setc(dl)?;
        a.movzx(rdx, dl)?;
        a.mov(rsi, 1000u64)?;
        a.xor(edi, edi)?;
        let mut lp = a.create_label();
        a.set_label(&mut lp)?;
        a.add(rdi, rsi)?;
        a.dec(rsi)?;
        a.jnz(lp)?; // rdi = 500500
        a.mov(r8, 0x1234_5678_9abc_def0u64)?;
        a.bswap(r8)?;
        a.mov(rax, rax)?;
        a.hlt()
    });
    let mut g = Guest::long_mode(engine, &code);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.rax, 42);
    assert_eq!(r.rcx, 0x10);
    assert_eq!(r.rdx, 1, "carry from the 64-bit add");
    assert_eq!(r.rdi, 500_500);
    assert_eq!(r.r8, 0xf0de_bc9a_7856_3412);
    assert_eq!(r.rip, CODE + code.len() as u64, "rip after HLT");
    assert_eq!(g.exits("hlt"), 1);
}

fn port_io(engine: Engine) {
    let code = asm64(|a| {
        a.mov(edx, PORT_BASE as u32)?;
        a.mov(eax, 0x1122_3344u32)?;
        a.out(dx, al)?;
        a.out(dx, ax)?;
        a.out(dx, eax)?;
        a.mov(edx, PORT_BASE as u32 + 2)?;
        a.xor(eax, eax)?;
        a.in_(al, dx)?;
        a.mov(ebx, eax)?;
        a.in_(eax, dx)?;
        a.mov(ecx, eax)?;
        a.mov(edx, 0x1234u32)?; // nobody listens: reads all-ones, writes dropped
        a.in_(al, dx)?;
        a.movzx(esi, al)?;
        a.out(dx, al)?;
        a.hlt()
    });
    let mut g = Guest::long_mode(engine, &code);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.rbx, 0xa2);
    assert_eq!(r.rcx, 0xa5a4_a3a2);
    assert_eq!(r.rsi, 0xff);
    let p = g.ports.lock().unwrap();
    assert_eq!(
        p.writes,
        vec![
            (0, vec![0x44]),
            (0, vec![0x44, 0x33]),
            (0, vec![0x44, 0x33, 0x22, 0x11])
        ]
    );
    assert_eq!(p.reads, vec![(2, 1), (2, 4)]);
    assert_eq!(g.exits("io_out"), 4);
    assert_eq!(g.exits("io_in"), 3);
    assert_eq!(g.stats.unclaimed_pio, 2);
}

fn rep_outsb_insb(engine: Engine) {
    let code = asm64(|a| {
        a.cld()?;
        a.mov(rsi, DATA)?;
        a.mov(ecx, 5u32)?;
        a.mov(edx, PORT_BASE as u32 + 1)?;
        a.rep().outsb()?;
        a.mov(rdi, DATA + 0x100)?;
        a.mov(ecx, 3u32)?;
        a.rep().insb()?;
        a.mov(rax, qword_ptr(DATA + 0x100))?;
        a.hlt()
    });
    let mut g = Guest::long_mode(engine, &code);
    g.vm.mem.write_slice(b"hello", GuestAddress(DATA)).unwrap();
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.rcx, 0, "rcx counts down to 0");
    assert_eq!(r.rsi, DATA + 5);
    assert_eq!(r.rdi, DATA + 0x103);
    assert_eq!(r.rax & 0xff_ffff, 0xa1a1a1, "three reads of port+1");
    let p = g.ports.lock().unwrap();
    let sent: Vec<u8> = p.writes.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(sent, b"hello");
    assert!(p.writes.iter().all(|(off, d)| *off == 1 && d.len() == 1));
    assert_eq!(p.reads.len(), 3);
}

fn mmio_unbacked(engine: Engine) {
    let code = asm64(|a| {
        a.mov(rbx, MMIO_BASE + 0x10)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.mov(ecx, dword_ptr(rbx + 4))?;
        a.mov(rdx, 0x0102_0304_0506_0708u64)?;
        a.mov(qword_ptr(rbx + 8), rdx)?;
        a.mov(byte_ptr(rbx), 0x5a)?;
        a.hlt()
    });
    let mut g = Guest::long_mode(engine, &code);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.rax, 0xb7b6_b5b4_b3b2_b1b0);
    assert_eq!(r.rcx, 0xb7b6_b5b4);
    let m = g.mmio.lock().unwrap();
    assert_eq!(m.reads, vec![(0x10, 8), (0x14, 4)]);
    assert_eq!(
        m.writes,
        vec![
            (0x18, 0x0102_0304_0506_0708u64.to_le_bytes().to_vec()),
            (0x10, vec![0x5a])
        ]
    );
    assert_eq!(g.exits("mmio_read"), 2);
    assert_eq!(g.exits("mmio_write"), 2);
}

fn cpuid(engine: Engine) {
    let code = asm64(|a| {
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.mov(r8, rbx)?;
        a.mov(r9, rdx)?;
        a.mov(r10, rcx)?;
        a.mov(r11, rax)?;
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.mov(r12, rdx)?;
        a.hlt()
    });
    let mut g = Guest::long_mode(engine, &code);
    assert_halted(&g.run());
    let r = g.regs();
    let mut vendor = Vec::new();
    for w in [r.r8, r.r9, r.r10] {
        vendor.extend_from_slice(&(w as u32).to_le_bytes());
    }
    let host = std::arch::x86_64::__cpuid(0);
    let mut hv = Vec::new();
    for w in [host.ebx, host.edx, host.ecx] {
        hv.extend_from_slice(&w.to_le_bytes());
    }
    if engine == Engine::Kvm {
        assert_eq!(vendor, hv, "vendor string");
    } else {
        // The software CPU's model, whatever the host is.
        assert_eq!(&vendor[..], x86::model::VENDOR, "vendor string");
        assert_eq!(r.r11, x86::model::MAX_BASIC as u64, "max basic leaf");
    }
    assert!(r.r11 >= 1, "max basic leaf");
    assert_ne!(r.r12 & (1 << 26), 0, "SSE2 in leaf 1 EDX");
    assert_ne!(r.r12 & (1 << 0), 0, "FPU in leaf 1 EDX");
}

/// visor's timing leaf (`hypercall::CPUID_TIMING_LEAF`), reached from leaf
/// 0x4000_0000 with and without the paravirtual interface: the TSC's
/// frequency in kHz (the software CPU's TSC counts nanoseconds); no local
/// APIC timer here (no irqchip).
fn timing_leaf(engine: Engine) {
    for pv in [false, true] {
        let code = asm64(|a| {
            a.mov(eax, hypercall::CPUID_SIGNATURE_LEAF)?;
            a.cpuid()?;
            a.mov(r8, rax)?;
            a.mov(eax, hypercall::CPUID_TIMING_LEAF)?;
            a.xor(ecx, ecx)?;
            a.cpuid()?;
            a.mov(r9, rax)?;
            a.mov(r10, rbx)?;
            a.hlt()
        });
        let opts = VmOptions {
            pv,
            ..VmOptions::default()
        };
        let mut g = Guest::long_mode_with(engine, &code, opts);
        assert_halted(&g.run());
        let r = g.regs();
        assert!(
            r.r8 >= hypercall::CPUID_TIMING_LEAF as u64,
            "max leaf {:#x}",
            r.r8
        );
        assert!(r.r9 > 0, "TSC kHz");
        if engine != Engine::Kvm {
            assert_eq!(r.r9, x86::TSC_KHZ as u64);
        }
        assert_eq!(r.r10, 0, "no APIC timer (pv {pv})");
    }
}

fn guest_page_fault(engine: Engine) {
    const HANDLER: u64 = CODE + 0x800;
    const RESUME: u64 = CODE + 0x900;
    const UNMAPPED: u64 = 0x1_4000_0000; // 5 GiB: beyond the boot identity map
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(r15, 0u64).unwrap();
    a.mov(rbx, UNMAPPED).unwrap();
    a.mov(rax, qword_ptr(rbx)).unwrap(); // #PF
    a.mov(r13, 0xbadu64).unwrap(); // skipped by the handler
    a.hlt().unwrap();
    let mut main = a.assemble(CODE).unwrap();
    main.resize((HANDLER - CODE) as usize, 0xcc);
    let mut h = CodeAssembler::new(64).unwrap();
    h.pop(r14).unwrap(); // error code
    h.mov(r15, cr2).unwrap();
    h.mov(rax, RESUME).unwrap();
    h.mov(qword_ptr(rsp), rax).unwrap(); // return to RESUME
    h.iretq().unwrap();
    let hcode = h.assemble(HANDLER).unwrap();
    main.extend_from_slice(&hcode);
    main.resize((RESUME - CODE) as usize, 0xcc);
    let mut r = CodeAssembler::new(64).unwrap();
    r.mov(r12, 0x600du64).unwrap();
    r.hlt().unwrap();
    main.extend_from_slice(&r.assemble(RESUME).unwrap());

    let mut g = Guest::long_mode(engine, &main);
    set_gate(&mut g, 14, HANDLER);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.r15, UNMAPPED, "CR2 holds the faulting address");
    assert_eq!(r.r14, 0, "error code: not present, read, supervisor");
    assert_eq!(r.r12, 0x600d, "handler resumed at RESUME");
    assert_ne!(r.r13, 0xbad, "faulting path skipped");
    assert_eq!(r.rsp, STACK, "IRETQ restored the stack");
}

/// INT3 in the guest kernel reaches the guest's #BP handler with RIP after the
/// INT3 on the stack (trap semantics).
fn int3_breakpoint(engine: Engine) {
    const HANDLER: u64 = CODE + 0x800;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rbx, 0x1111u64).unwrap();
    a.int3().unwrap();
    a.mov(rbx, 0x2222u64).unwrap();
    a.hlt().unwrap();
    let mut code = a.assemble(CODE).unwrap();
    let after_int3 = CODE + 10 + 1;
    code.resize((HANDLER - CODE) as usize, 0xcc);
    let mut h = CodeAssembler::new(64).unwrap();
    h.mov(r15, qword_ptr(rsp)).unwrap(); // saved RIP
    h.mov(r14, rbx).unwrap();
    h.iretq().unwrap();
    code.extend_from_slice(&h.assemble(HANDLER).unwrap());
    let mut g = Guest::long_mode(engine, &code);
    set_gate(&mut g, 3, HANDLER);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.r15, after_int3, "#BP pushes the address after INT3");
    assert_eq!(r.r14, 0x1111, "handler ran between the two moves");
    assert_eq!(r.rbx, 0x2222, "execution resumed after INT3");
    assert_eq!(r.rsp, STACK);
}

/// FWAIT with no pending x87 exception is a no-op.
fn fwait(engine: Engine) {
    let code = asm64(|a| {
        a.fninit()?;
        a.wait()?;
        a.mov(rbx, 0x77u64)?;
        a.wait()?;
        a.hlt()
    });
    let mut g = Guest::long_mode(engine, &code);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.rbx, 0x77);
    assert_eq!(r.rip, CODE + code.len() as u64);
}

/// RDTSCP, which CPUID advertises (leaf 0x8000_0001 EDX bit 27), reads the
/// TSC, moving forward, and IA32_TSC_AUX as the kernel wrote it (on `vmx`
/// the engine's VMM enables it through its secondary controls).
fn rdtscp(engine: Engine) {
    let code = asm64(|a| {
        a.mov(eax, 0x8000_0001u32)?;
        a.cpuid()?;
        a.mov(r8, rdx)?;
        a.mov(ecx, 0xc000_0103u32)?; // IA32_TSC_AUX
        a.mov(eax, 0x2au32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.rdtscp()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(r9, rax)?;
        a.mov(r10, rcx)?;
        a.rdtscp()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(r11, rax)?;
        a.hlt()
    });
    let mut g = Guest::long_mode(engine, &code);
    assert_halted(&g.run());
    let r = g.regs();
    assert_ne!(r.r8 & (1 << 27), 0, "RDTSCP advertised");
    assert_eq!(r.r10, 0x2a, "IA32_TSC_AUX in ECX");
    assert!(r.r11 > r.r9, "the TSC moves: {:#x} then {:#x}", r.r9, r.r11);
}

fn triple_fault(engine: Engine) {
    // No IDT (limit 0): #UD cannot be delivered, nor the #GP, nor the #DF.
    let code = asm64(|a| {
        a.mov(rax, 0x7357u64)?;
        a.ud2()
    });
    let mut g = Guest::long_mode(engine, &code);
    let o = g.run();
    assert!(matches!(o, Outcome::TripleFault { .. }), "got {o:?}");
    assert_eq!(o.exit_status(), visor::exit_status::TRIPLE_FAULT);
    let dump = o.dump().expect("register dump");
    assert!(dump.contains("rax=0000000000007357"), "{dump}");
    assert_eq!(g.exits("shutdown"), 1);
}

fn debug_exit(engine: Engine) {
    let code = asm64(|a| {
        a.mov(al, 0x21)?;
        a.out(abi::port::DEBUG_EXIT as i32, al)?;
        a.hlt()
    });
    let mut g = Guest::long_mode(engine, &code);
    let o = g.run();
    assert!(
        matches!(o, Outcome::Stopped(StopReason::DebugExit(0x21))),
        "{o:?}"
    );
    assert_eq!(o.exit_status(), 0x43);
}

/// The paravirtual interface: the hypercall page through its MSR, then version,
/// console_io, mmu_update (one valid request, then an invalid one), multicall
/// and sched_op(SHUTDOWN).
fn hypercalls(engine: Engine) {
    use hypercall::nr;
    const PAGE: u64 = 0x12_0000;
    const REQS: u64 = DATA + 0x200;
    const MC: u64 = DATA + 0x400;
    const MAPPED: u64 = 0x4000_0000; // PD 1, entry 0 of the boot tables
    let stub = |n: u64| PAGE + n * hypercall::STUB_SIZE as u64;
    let code = asm64(|a| {
        hypercall_page(a, engine, PAGE)?;
        a.mov(rax, stub(nr::VERSION))?;
        a.call(rax)?;
        a.mov(r12, rax)?;
        a.mov(edi, hypercall::console::WRITE as u32)?;
        a.mov(rsi, DATA)?;
        a.mov(edx, 6u32)?;
        a.mov(rax, stub(nr::CONSOLE_IO))?;
        a.call(rax)?;
        a.mov(r13, rax)?;
        a.mov(rdi, REQS)?;
        a.mov(esi, 2u32)?;
        a.mov(rax, stub(nr::MMU_UPDATE))?;
        a.call(rax)?;
        a.mov(r14, rax)?;
        a.mov(rbx, MAPPED + 8)?;
        a.mov(r15, qword_ptr(rbx))?;
        a.mov(rdi, MC)?;
        a.mov(esi, 2u32)?;
        a.mov(rax, stub(nr::MULTICALL))?;
        a.call(rax)?;
        a.mov(rbp, rax)?;
        a.mov(edi, hypercall::sched::SHUTDOWN as u32)?;
        a.mov(esi, 7u32)?;
        a.mov(rax, stub(nr::SCHED_OP))?;
        a.call(rax)?;
        a.hlt()
    });
    let mut g = Guest::long_mode_with(
        engine,
        &code,
        VmOptions {
            pv: true,
            ..Default::default()
        },
    );
    let console = machine::devices::Capture::default();
    g.vm.hypercalls =
        visor_hypercalls::Hypercalls::new(true, engine.hypercall_stub(), Box::new(console.clone()));
    let mem = &g.vm.mem;
    mem.write_slice(b"hello!", GuestAddress(DATA)).unwrap();
    mem.write_obj(0x5555_aaaa_u64, GuestAddress(0x60_0008))
        .unwrap();
    // Request 0 maps 1 GiB -> 6 MiB with a 2 MiB page; request 1 points outside RAM.
    let pde = abi::BOOT_PD + 0x1000;
    for (i, (ptr, val)) in [(pde, 0x60_0000u64 | 0x83), (0x7fff_0000_0000, 0x3)]
        .iter()
        .enumerate()
    {
        mem.write_obj(*ptr, GuestAddress(REQS + 16 * i as u64))
            .unwrap();
        mem.write_obj(*val, GuestAddress(REQS + 16 * i as u64 + 8))
            .unwrap();
    }
    for i in 0..2u64 {
        let e = MC + 56 * i;
        mem.write_obj(nr::VERSION, GuestAddress(e)).unwrap();
        mem.write_obj(-1i64, GuestAddress(e + 48)).unwrap();
    }
    let o = g.run();
    assert!(
        matches!(o, Outcome::Stopped(StopReason::Shutdown(7))),
        "{o:?}"
    );
    assert_eq!(o.exit_status(), 7);
    let r = g.regs();
    assert_eq!(r.r12, hypercall::VERSION as u64, "version");
    assert_eq!(r.r13, 6, "console_io wrote 6 bytes");
    assert_eq!(console.contents(), b"hello!");
    assert_eq!(
        r.r14, 1,
        "mmu_update applied the valid request and stopped at the invalid one"
    );
    assert_eq!(r.r15, 0x5555_aaaa, "the new mapping is live");
    assert_eq!(r.rbp, 0, "multicall");
    for i in 0..2u64 {
        let res: i64 = g.vm.mem.read_obj(GuestAddress(MC + 56 * i + 48)).unwrap();
        assert_eq!(res, hypercall::VERSION as i64);
    }
    assert_eq!(g.stats.hypercalls.get("mmu_update"), Some(&1));
    assert_eq!(
        g.stats.hypercalls.get("version"),
        Some(&1),
        "multicall entries count separately"
    );
    assert_eq!(g.vm.hypercalls.counts[nr::VERSION as usize], 3);
    assert_eq!(g.exits("hypercall"), 5);
    assert_eq!(g.exits("msr_write"), 1, "the hypercall-page MSR");
}

/// A guest with visor's paravirtual interface, `code` at CODE.
fn pv_guest(engine: Engine, code: &[u8]) -> Guest {
    let opts = VmOptions {
        pv: true,
        ..Default::default()
    };
    Guest::long_mode_with(engine, code, opts)
}

/// `mmu_update` takes effect at once: the translation the kernel used before
/// the update is not served from a stale TLB entry afterwards, even a global
/// one (the engine's `flush_tlb`: a TLB flush, dropped shadow tables,
/// INVVPID, an MMU reset in KVM).
fn mmu_update_flushes_stale_translations(engine: Engine) {
    use hypercall::nr;
    const PAGE: u64 = 0x12_0000;
    const LIN: u64 = 0x60_0000;
    let code = asm64(|a| {
        hypercall_page(a, engine, PAGE)?;
        a.mov(rbx, qword_ptr(LIN))?;
        a.mov(rdi, DATA)?;
        a.mov(esi, 1u32)?;
        a.mov(rax, stub(PAGE, nr::MMU_UPDATE))?;
        a.call(rax)?;
        a.mov(r12, rax)?;
        a.mov(rcx, qword_ptr(LIN))?;
        a.mov(rax, stub(PAGE, nr::SCHED_OP))?;
        a.mov(edi, hypercall::sched::SHUTDOWN as u32)?;
        a.mov(esi, 7u32)?;
        a.call(rax)
    });
    let mut g = pv_guest(engine, &code);
    let mut s = g.vm.vcpu.sregs().unwrap();
    s.cr4 |= arch::cr4::PGE;
    g.vm.vcpu.set_sregs(&s).unwrap();
    let m = &g.vm.mem;
    // The boot tables map 2 MiB pages: find the PD entry of LIN, and make
    // its translation global.
    let pml4e: u64 = m.read_obj(GuestAddress(s.cr3 & !0xfff)).unwrap();
    let pdpte: u64 = m.read_obj(GuestAddress(pml4e & 0xf_ffff_f000)).unwrap();
    let pde = (pdpte & 0xf_ffff_f000) + 8 * (LIN >> 21);
    let boot: u64 = m.read_obj(GuestAddress(pde)).unwrap();
    m.write_obj(boot | 0x100, GuestAddress(pde)).unwrap();
    m.write_obj(pde, GuestAddress(DATA)).unwrap();
    m.write_obj(0x80_0000u64 | 0x83, GuestAddress(DATA + 8))
        .unwrap();
    m.write_obj(0x1111u64, GuestAddress(LIN)).unwrap();
    m.write_obj(0x2222u64, GuestAddress(0x80_0000)).unwrap();
    let o = g.run();
    assert!(
        matches!(o, Outcome::Stopped(StopReason::Shutdown(7))),
        "{o:?}"
    );
    let r = g.regs();
    assert_eq!((r.rbx, r.r12, r.rcx), (0x1111, 1, 0x2222));
}

/// Hypercall arguments at the top of the address space, which the guest
/// maps so that they translate and only the VMM's address arithmetic can
/// fail: an array whose next element would lie at 2^64. Each call gets the
/// error docs/hypercalls.md gives, in a debug build too (no overflow panic),
/// and the VMM runs on to the guest's shutdown.
fn hypercall_arguments_near_the_top(engine: Engine) {
    use hypercall::{errno, nr};
    const PAGE: u64 = 0x12_0000;
    const TABLES: u64 = 0x40_0000;
    const FRAME: u64 = 0x60_0000;
    /// 16 bytes below 2^64: one `TrapInfo`, `MmuUpdate` or two GDT entries fit.
    const NEAR_TOP: u64 = 0xffff_ffff_ffff_fff0;
    /// One `MulticallEntry` (56 bytes) below 2^64.
    const LAST_ENTRY: u64 = u64::MAX - 55;
    let top_pa = |va: u64| FRAME + (va - TOP);
    let call = |a: &mut CodeAssembler, n: u64, out: AsmRegister64| -> Result<(), IcedError> {
        a.mov(rax, stub(PAGE, n))?;
        a.call(rax)?;
        a.mov(out, rax)
    };
    let code = asm64(|a| {
        hypercall_page(a, engine, PAGE)?;
        // set_trap_table(2^64 - 16, 2): entry 1 would lie at 2^64.
        a.mov(rdi, NEAR_TOP)?;
        a.mov(esi, 2u32)?;
        call(a, nr::SET_TRAP_TABLE, r12)?;
        // mmu_update(2^64 - 16, 2): request 0 applies, request 1 would lie at
        // 2^64 and ends the batch.
        a.mov(rdi, NEAR_TOP)?;
        a.mov(esi, 2u32)?;
        call(a, nr::MMU_UPDATE, r14)?;
        // multicall(2^64 - 56, 2): entry 0 runs (its result overwrites the
        // request above), entry 1 would lie at 2^64.
        a.mov(rdi, LAST_ENTRY)?;
        a.mov(esi, 2u32)?;
        call(a, nr::MULTICALL, r13)?;
        // set_gdt(2^64 - 16, 3, 0): entry 2 would lie at 2^64.
        a.mov(rdi, NEAR_TOP)?;
        a.mov(esi, 3u32)?;
        a.xor(edx, edx)?;
        call(a, nr::SET_GDT, r15)?;
        // console_io(WRITE, 2^64 - 16, 17): the buffer would cross 2^64.
        a.xor(edi, edi)?;
        a.mov(rsi, NEAR_TOP)?;
        a.mov(edx, 17u32)?;
        call(a, nr::CONSOLE_IO, rbp)?;
        // iret with its frame at 2^64 - 24 (the stub's return address
        // pushed below 2^64 - 16): the fourth word would lie at 2^64.
        a.mov(rsp, NEAR_TOP)?;
        call(a, nr::IRET, r8)?;
        a.mov(rsp, STACK)?;
        // The VMM runs on.
        call(a, nr::VERSION, r9)?;
        a.mov(edi, hypercall::sched::SHUTDOWN as u32)?;
        a.mov(esi, 7u32)?;
        a.mov(rax, stub(PAGE, nr::SCHED_OP))?;
        a.call(rax)
    });
    let mut g = pv_guest(engine, &code);
    map_top(&g, TABLES, FRAME);
    let m = &g.vm.mem;
    // The multicall's entry 0: version. The mmu_update's request 0 maps
    // 1 GiB (PD 1, entry 0) to 6 MiB.
    let pde = abi::BOOT_PD + 0x1000;
    m.write_obj(nr::VERSION, GuestAddress(top_pa(LAST_ENTRY)))
        .unwrap();
    m.write_obj(-1i64, GuestAddress(top_pa(LAST_ENTRY) + 48))
        .unwrap();
    m.write_obj(pde, GuestAddress(top_pa(NEAR_TOP))).unwrap();
    m.write_obj(0x60_0083u64, GuestAddress(top_pa(NEAR_TOP) + 8))
        .unwrap();
    let o = g.run();
    assert!(
        matches!(o, Outcome::Stopped(StopReason::Shutdown(7))),
        "{o:?}"
    );
    let r = g.regs();
    let efault = -errno::EFAULT as u64;
    assert_eq!(r.r12, efault, "set_trap_table");
    assert_eq!(r.r13, efault, "multicall");
    let entry0: i64 =
        g.vm.mem
            .read_obj(GuestAddress(top_pa(LAST_ENTRY) + 48))
            .unwrap();
    assert_eq!(entry0, hypercall::VERSION as i64, "multicall entry 0 ran");
    assert_eq!(r.r14, 1, "mmu_update applied request 0 and stopped");
    let pde_now: u64 = g.vm.mem.read_obj(GuestAddress(pde)).unwrap();
    assert_eq!(pde_now, 0x60_0083);
    assert_eq!(r.r15, efault, "set_gdt");
    assert_eq!(r.rbp, efault, "console_io");
    assert_eq!(r.r8, efault, "iret");
    assert_eq!(r.r9, hypercall::VERSION as u64, "the VMM runs on");
    for name in [
        "set_trap_table",
        "multicall",
        "mmu_update",
        "set_gdt",
        "iret",
    ] {
        assert_eq!(g.stats.hypercalls.get(name), Some(&1), "{name}");
    }
}

// The CPU model's checks and faults (issue 16), on the software engines:
// the values expected are the SDM's, with the model's MAXPHYADDR (46).
on_engines!(
    [emu, trap, vmx, bt]:
    reserved_bits_give_rsvd_page_faults,
    cr0_high_bits_give_gp,
    invlpg_of_a_noncanonical_address_is_a_noop,
    rdpru_gives_ud,
    rdpmc_without_counters_gives_gp,
    rdtsc_in_the_kernel_with_cr4_tsd,
    unknown_msr_gives_gp,
);

// SSE exceptions, on the software engines: on this (PVM) host, `kvm` runs
// guest ring 0 in KVM's instruction emulator, which has no SSE (README, PVM
// hosts); the differential tester compares SSE against the hardware at CPL 3.
on_engines!(
    [emu, trap, vmx, bt]:
    unmasked_simd_exception_gives_xm,
);

// The x87's remainders, transcendentals and packed BCD (issue 16: the
// model advertises FPU), on the software engines.
on_engines!(
    [emu, trap, vmx, bt]:
    x87_remainders_transcendentals_and_bcd_run,
);

// NMIs through the local APIC (an irqchip), and its global disable.
on_engines!(
    [emu, trap, vmx, bt]:
    self_nmi_is_delivered_once_and_blocked_until_iret,
);
on_engines!(
    [emu, trap, vmx, bt]:
    apic_global_disable,
);

/// Where a fault handler for the cases below lives, and what it records:
/// R12 = 0xfa17, R13 = the RIP pushed, R14 = the error code (if any), R15 =
/// CR2; then HLT.
const CATCH: u64 = CODE + 0x800;

/// `main` at CODE (ending in HLT) with a handler for `vector` at [`CATCH`].
fn catching(engine: Engine, vector: u64, code: bool, main: &[u8]) -> Guest {
    let mut bytes = main.to_vec();
    assert!(bytes.len() <= (CATCH - CODE) as usize);
    bytes.resize((CATCH - CODE) as usize, 0xcc);
    let mut h = CodeAssembler::new(64).unwrap();
    if code {
        h.pop(r14).unwrap();
    }
    h.mov(r13, qword_ptr(rsp)).unwrap();
    h.mov(r15, cr2).unwrap();
    h.mov(r12, 0xfa17u64).unwrap();
    h.hlt().unwrap();
    bytes.extend_from_slice(&h.assemble(CATCH).unwrap());
    let mut g = Guest::long_mode(engine, &bytes);
    set_gate(&mut g, vector, CATCH);
    g
}

/// A PTE, PDE, PDPTE or PML4E with a reserved bit set, at each level, for
/// reads, writes and fetches: #PF with P and RSVD (and W or I/D) in the
/// error code, CR2 the address (SDM vol. 3 4.7, 4.5.4).
fn reserved_bits_give_rsvd_page_faults(engine: Engine) {
    const LIN: u64 = 0x80_0000_0000; // PML4 entry 1
    const PDPT: u64 = 0x30_0000;
    const PD: u64 = PDPT + 0x1000;
    const PT: u64 = PDPT + 0x2000;
    const FRAME: u64 = 0x31_0000;
    const PML4E: u64 = abi::BOOT_PML4 + 8;
    let b = |n: u32| 1u64 << n;
    // (what, entry address, value, access: 0 read, 1 write, 2 fetch, code)
    let cases: [(&str, u64, u64, u8, u32); 11] = [
        ("PML4E bit 51", PML4E, PDPT | 3 | b(51), 0, 9),
        ("PML4E PS", PML4E, PDPT | 3 | b(7), 0, 9),
        ("PDPTE bit 51", PDPT, PD | 3 | b(51), 0, 9),
        ("1 GiB PDPTE bit 13", PDPT, 0x83 | b(13), 0, 9),
        ("PDE bit 51", PD, PT | 3 | b(51), 0, 9),
        ("2 MiB PDE bit 13", PD, 0x20_0000 | 0x83 | b(13), 0, 9),
        ("PTE bit 51", PT, FRAME | 3 | b(51), 0, 9),
        ("PTE bit 46 (MAXPHYADDR)", PT, FRAME | 3 | b(46), 0, 9),
        ("PTE bit 51, write", PT, FRAME | 3 | b(51), 1, 0xb),
        ("PTE bit 51, fetch", PT, FRAME | 3 | b(51), 2, 0x19),
        ("PTE bit 45 is an address bit", PT, FRAME | 3 | b(45), 0, 0),
    ];
    for (what, at, value, access, want) in cases {
        let main = asm64(|a| {
            a.mov(rbx, LIN)?;
            match access {
                0 => a.mov(rax, qword_ptr(rbx))?,
                1 => a.mov(qword_ptr(rbx), rax)?,
                _ => a.call(rbx)?,
            }
            a.mov(r11, 0xd0e5u64)?;
            a.hlt()
        });
        let mut g = catching(engine, 14, true, &main);
        let m = &g.vm.mem;
        for (ta, v) in [
            (PML4E, PDPT | 3),
            (PDPT, PD | 3),
            (PD, PT | 3),
            (PT, FRAME | 3),
        ] {
            m.write_obj(v, GuestAddress(ta)).unwrap();
        }
        m.write_obj(value, GuestAddress(at)).unwrap();
        let o = g.run();
        let r = g.regs();
        if want == 0 {
            // Bit 45 is below MAXPHYADDR: a frame outside RAM, read as MMIO.
            assert_ne!(r.r12, 0xfa17, "{what}: {o:?}");
            continue;
        }
        assert_halted(&o);
        assert_eq!(r.r12, 0xfa17, "{what}: no #PF");
        assert_eq!(r.r14, want as u64, "{what}: error code");
        assert_eq!(r.r15, LIN, "{what}: CR2");
        let fault_rip = if access == 2 { LIN } else { CODE + 10 };
        assert_eq!(r.r13, fault_rip, "{what}: RIP of the fault");
    }
}

/// MOV to CR0 with bit 32 set raises #GP(0) (SDM vol. 2 MOV CR); CR0 is
/// unchanged.
fn cr0_high_bits_give_gp(engine: Engine) {
    let main = asm64(|a| {
        a.mov(rax, cr0)?;
        a.mov(rbp, rax)?;
        a.bts(rax, 32)?;
        a.mov(cr0, rax)?;
        a.mov(r11, 0xd0e5u64)?;
        a.hlt()
    });
    let mut g = catching(engine, 13, true, &main);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.r12, 0xfa17, "#GP");
    assert_eq!(r.r14, 0, "error code");
    assert_eq!(r.r13, CODE + 11, "RIP of MOV to CR0");
    assert_eq!(g.vm.vcpu.sregs().unwrap().cr0, r.rbp, "CR0 unchanged");
}

/// INVLPG of a non-canonical address does nothing (SDM vol. 2 INVLPG).
fn invlpg_of_a_noncanonical_address_is_a_noop(engine: Engine) {
    let main = asm64(|a| {
        a.mov(rbx, 0x8000_0000_0000u64)?;
        a.invlpg(ptr(rbx))?;
        a.mov(r11, 0xd0e5u64)?;
        a.hlt()
    });
    let mut g = catching(engine, 13, true, &main);
    assert_halted(&g.run());
    let r = g.regs();
    assert_ne!(r.r12, 0xfa17, "no #GP");
    assert_eq!(r.r11, 0xd0e5, "INVLPG returned");
}

/// RDPRU is not in the model: #UD in the guest, not the end of the run.
fn rdpru_gives_ud(engine: Engine) {
    let mut main = vec![0x31, 0xc9]; // xor ecx, ecx
    main.extend_from_slice(&[0x0f, 0x01, 0xfd]); // rdpru
    main.push(0xf4);
    let mut g = catching(engine, 6, false, &main);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.r12, 0xfa17, "#UD");
    assert_eq!(r.r13, CODE + 2, "RIP of RDPRU");
}

/// CR4.TSD restricts RDTSC to CPL 0 (SDM vol. 2 RDTSC): the kernel still
/// reads the counter, no fault (`trap` runs its kernel at CPL 1 with the
/// guest's TSD, so RDTSC faults there and the VMM runs it with the kernel's
/// privilege; user mode's #GP is in the system differential test).
fn rdtsc_in_the_kernel_with_cr4_tsd(engine: Engine) {
    let main = asm64(|a| {
        a.mov(rax, cr4)?;
        a.or(rax, 1 << 2)?; // TSD
        a.mov(cr4, rax)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.rdtsc()?;
        a.mov(r8, rax)?;
        a.or(r8, rdx)?;
        a.hlt()
    });
    let mut g = catching(engine, 13, true, &main);
    assert_halted(&g.run());
    let r = g.regs();
    assert_ne!(r.r12, 0xfa17, "no #GP at CPL 0");
    assert_ne!(r.r8, 0, "the time-stamp counter");
}

/// RDPMC of counter 0 in the kernel: the model has no performance counters
/// (CPUID leaf 0xa version 0), so the index is invalid and RDPMC raises
/// #GP(0) (SDM vol. 2 RDPMC), on every engine alike (`trap` lets the CPU
/// decide, with the kernel's privilege).
fn rdpmc_without_counters_gives_gp(engine: Engine) {
    let mut main = vec![0x31, 0xc9]; // xor ecx, ecx
    main.extend_from_slice(&[0x0f, 0x33]); // rdpmc
    main.push(0xf4);
    let mut g = catching(engine, 13, true, &main);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.r12, 0xfa17, "#GP");
    assert_eq!(r.r13, CODE + 2, "RIP of RDPMC");
    assert_eq!(r.r14, 0, "error code 0");
}

/// An unmasked SIMD floating-point exception (divide-by-zero, ZE unmasked in
/// MXCSR) raises #XM with the destination unchanged and MXCSR.ZE set; with
/// CR4.OSXMMEXCPT clear it raises #UD instead (SDM vol. 3 6.15, interrupt
/// 19; vol. 1 11.5.1).
fn unmasked_simd_exception_gives_xm(engine: Engine) {
    for (osxmmexcpt, vector) in [(true, 19), (false, 6)] {
        let pre = asm64(|a| {
            if !osxmmexcpt {
                a.mov(rax, cr4)?;
                a.btr(rax, 10)?;
                a.mov(cr4, rax)?;
            }
            a.mov(eax, 0x3f80_0000)?; // 1.0
            a.movd(xmm0, eax)?;
            a.xorps(xmm1, xmm1)?;
            a.mov(dword_ptr(rsp - 8), 0x1f80 & !(4 << 7))?;
            a.ldmxcsr(dword_ptr(rsp - 8))
        });
        let mut main = pre.clone();
        main.extend(asm64(|a| {
            a.divss(xmm0, xmm1)?;
            a.mov(r11, 0xd0e5u64)?;
            a.hlt()
        }));
        main.resize((CATCH - CODE) as usize, 0xcc);
        // The handler: R13 = the RIP pushed, RBX = MXCSR, R10 = XMM0's low
        // lane, R12 = 0xfa17.
        main.extend(asm64(|a| {
            a.mov(r13, qword_ptr(rsp))?;
            a.stmxcsr(dword_ptr(rsp - 8))?;
            a.mov(ebx, dword_ptr(rsp - 8))?;
            a.movd(r10d, xmm0)?;
            a.mov(r12, 0xfa17u64)?;
            a.hlt()
        }));
        let mut g = Guest::long_mode(engine, &main);
        set_gate(&mut g, vector, CATCH);
        assert_halted(&g.run());
        let r = g.regs();
        assert_eq!(r.r12, 0xfa17, "vector {vector}");
        assert_ne!(r.r11, 0xd0e5, "DIVSS did not complete");
        assert_eq!(r.r13, CODE + pre.len() as u64, "RIP of DIVSS");
        assert_eq!(r.r10, 0x3f80_0000, "XMM0 unchanged");
        assert_eq!(r.rbx, (0x1f80 & !(4 << 7)) | 4, "MXCSR.ZE set");
    }
}

/// FPREM, FPREM1, FSIN, FPTAN, FPATAN, F2XM1, FYL2X, FBLD and FBSTP run
/// with the SDM's results (the exact values, rounded to nearest): each
/// result is stored as an 80-bit value and read back into two registers.
fn x87_remainders_transcendentals_and_bcd_run(engine: Engine) {
    let main = asm64(|a| {
        let mut n = 0;
        let mut save = |a: &mut CodeAssembler| -> Result<(), IcedError> {
            a.fstp(tword_ptr(rsp - 0x100 - 16 * n))?;
            n += 1;
            Ok(())
        };
        a.fninit()?;
        a.mov(dword_ptr(rsp - 8), 3)?;
        a.mov(dword_ptr(rsp - 12), 7)?;
        a.fild(dword_ptr(rsp - 8))?;
        a.fild(dword_ptr(rsp - 12))?;
        a.fprem()?; // 7 rem 3 = 1, quotient 2: C3
        a.fnstsw(ax)?;
        a.movzx(r15d, ax)?;
        save(a)?;
        a.mov(dword_ptr(rsp - 12), 8)?;
        a.fild(dword_ptr(rsp - 12))?;
        a.fprem1()?; // 8 - 3 * 3 = -1
        save(a)?; // 1
        a.fstp(st0)?;
        a.fld1()?;
        a.fsin()?; // sin(1)
        save(a)?; // 2
        a.fld1()?;
        a.fptan()?; // tan(1), 1.0 pushed
        save(a)?; // 3: 1.0
        save(a)?; // 4: tan(1)
        a.fld1()?;
        a.fld1()?;
        a.fpatan()?; // atan(1/1) = pi/4
        save(a)?; // 5
        a.fld1()?;
        a.fchs()?;
        a.fld1()?;
        a.fscale()?; // 0.5
        a.fstp(st1)?;
        a.f2xm1()?; // sqrt(2) - 1
        save(a)?; // 6
        a.fild(dword_ptr(rsp - 8))?;
        a.fild(dword_ptr(rsp - 12))?;
        a.fyl2x()?; // 3 * log2(8) = 9
        save(a)?; // 7
                  // FBLD of -123456789012345678, FBSTP back to another place.
        a.mov(rax, 0x3456_7890_1234_5678u64)?;
        a.mov(qword_ptr(rsp - 0x40), rax)?;
        a.mov(word_ptr(rsp - 0x38), 0x8012)?;
        a.fbld(tword_ptr(rsp - 0x40))?;
        a.fld(st0)?;
        save(a)?; // 8
        a.fbstp(tword_ptr(rsp - 0x60))?;
        a.mov(r13, qword_ptr(rsp - 0x60))?;
        a.movzx(r14d, word_ptr(rsp - 0x58))?;
        a.hlt()
    });
    let mut g = Guest::long_mode(engine, &main);
    assert_halted(&g.run());
    let r = g.regs();
    // The low memory is identity-mapped; RSP is back at STACK.
    assert_eq!(r.rsp, STACK);
    let read = |k: u64| -> (u16, u64) {
        let at = STACK - 0x100 - 16 * k;
        let sig: u64 = g.vm.mem.read_obj(GuestAddress(at)).unwrap();
        let se: u16 = g.vm.mem.read_obj(GuestAddress(at + 8)).unwrap();
        (se, sig)
    };
    assert_eq!(r.r15 & 0x4700, 0x4000, "FPREM: C3 = Q1, C2 = 0");
    assert_eq!(read(0), (0x3fff, 1 << 63), "FPREM");
    assert_eq!(read(1), (0xbfff, 1 << 63), "FPREM1");
    assert_eq!(read(2), (0x3ffe, 0xd76a_a478_4867_7021), "FSIN");
    assert_eq!(read(3), (0x3fff, 1 << 63), "FPTAN's 1.0");
    assert_eq!(read(4), (0x3fff, 0xc759_22e5_f71d_2dc5), "FPTAN");
    assert_eq!(read(5), (0x3ffe, 0xc90f_daa2_2168_c235), "FPATAN");
    assert_eq!(read(6), (0x3ffd, 0xd413_cccf_e779_9211), "F2XM1");
    assert_eq!(read(7), (0x4002, 0x9000_0000_0000_0000), "FYL2X");
    assert_eq!(read(8), (0xc037, 0xdb4d_a5d3_1879_a700), "FBLD");
    assert_eq!((r.r13, r.r14), (0x3456_7890_1234_5678, 0x8012), "FBSTP");
}

/// An MSR outside the model (AMD's performance counter 0xc001_0000) raises
/// #GP in the guest; the VMM sees no exit for it.
fn unknown_msr_gives_gp(engine: Engine) {
    let main = asm64(|a| {
        a.mov(ecx, 0xc001_0000u32)?;
        a.rdmsr()?;
        a.hlt()
    });
    let mut g = catching(engine, 13, true, &main);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.r12, 0xfa17, "#GP");
    assert_eq!(r.r13, CODE + 5, "RIP of RDMSR");
    if engine != Engine::Vmx {
        // (The vmx engine's VMM hands its guest's MSR exits to visor's.)
        assert_eq!(g.exits("msr_read"), 0);
    }
}

const APIC: u64 = 0xfee0_0000;
/// ICR: NMI delivery mode, shorthand "self".
const ICR_SELF_NMI: u32 = (1 << 18) | (4 << 8);

/// A self-NMI through the ICR is delivered once; a second one sent from the
/// NMI handler waits until its IRET (SDM vol. 3 6.7.1, 10.6.1).
fn self_nmi_is_delivered_once_and_blocked_until_iret(engine: Engine) {
    const NMI: u64 = CODE + 0x800;
    let main = asm64(|a| {
        a.xor(r12d, r12d)?;
        a.mov(rbx, APIC + 0x300)?;
        a.mov(dword_ptr(rbx), ICR_SELF_NMI)?;
        // Some instructions for the NMI to arrive in.
        a.mov(ecx, 100u32)?;
        let mut lp = a.create_label();
        a.set_label(&mut lp)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.mov(al, 0)?;
        a.out(abi::port::DEBUG_EXIT as i32, al)
    });
    let mut code = main;
    code.resize((NMI - CODE) as usize, 0xcc);
    let mut h = CodeAssembler::new(64).unwrap();
    let mut second = h.create_label();
    h.inc(r12).unwrap();
    h.cmp(r12, 1).unwrap();
    h.jne(second).unwrap();
    // The first NMI sends another and runs on: it stays pending.
    h.mov(dword_ptr(rbx), ICR_SELF_NMI).unwrap();
    for _ in 0..20 {
        h.nop().unwrap();
    }
    h.mov(r13, r12).unwrap();
    h.set_label(&mut second).unwrap();
    h.iretq().unwrap();
    code.extend_from_slice(&h.assemble(NMI).unwrap());
    let opts = VmOptions {
        irqchip: true,
        ..VmOptions::default()
    };
    let mut g = Guest::long_mode_with(engine, &code, opts);
    set_gate(&mut g, 2, NMI);
    let o = g.run();
    assert!(
        matches!(o, Outcome::Stopped(StopReason::DebugExit(0))),
        "{o:?}"
    );
    let r = g.regs();
    assert_eq!(r.r13, 1, "the second NMI waited for IRET");
    assert_eq!(r.r12, 2, "two NMIs, each delivered once");
    assert_eq!(r.rsp, STACK);
}

/// Clearing IA32_APIC_BASE's global enable takes the APIC out of CPUID
/// (leaf 1 EDX bit 9) and off the bus; setting it brings it back (SDM vol.
/// 3 10.4.3).
fn apic_global_disable(engine: Engine) {
    let main = asm64(|a| {
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.mov(r8, rdx)?;
        a.mov(ecx, 0x1bu32)?;
        a.rdmsr()?;
        a.mov(r9, rax)?;
        a.and(eax, !(1u32 << 11) as i32)?;
        a.wrmsr()?;
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.mov(r10, rdx)?;
        // The version register is no longer there.
        a.mov(rbx, APIC + 0x30)?;
        a.mov(r11d, dword_ptr(rbx))?;
        a.mov(ecx, 0x1bu32)?;
        a.mov(rax, r9)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(r12d, dword_ptr(rbx))?;
        a.mov(al, 0)?;
        a.out(abi::port::DEBUG_EXIT as i32, al)
    });
    let opts = VmOptions {
        irqchip: true,
        ..VmOptions::default()
    };
    let mut g = Guest::long_mode_with(engine, &main, opts);
    let o = g.run();
    assert!(
        matches!(o, Outcome::Stopped(StopReason::DebugExit(0))),
        "{o:?}"
    );
    let r = g.regs();
    assert_ne!(r.r8 & (1 << 9), 0, "APIC in CPUID");
    assert_eq!(r.r9 & !0xfff, 0xfee0_0000);
    assert_eq!(r.r10 & (1 << 9), 0, "APIC gone from CPUID");
    assert_eq!(r.r11 as u32, 0xffff_ffff, "no APIC on the bus");
    assert_eq!(r.r12 as u8, 0x14, "the APIC is back (version 0x14)");
}

// Debug registers and single-step (SDM vol. 3 ch. 18).
on_engines!(
    [emu, trap, vmx, bt]:
    dr0_execute_breakpoint,
    dr1_write_watchpoint,
);
// (Engine `trap` emulates MOV SS, IRETQ, CLI and MOV CRn of its
// deprivileged kernel: each owes the single-step trap the CPU gives.)
on_engines!(
    [emu, trap, vmx, bt]:
    single_step_across_mov_ss,
    single_step_across_emulated_instructions,
);

/// A #DB handler at [`CATCH`]: R12 counts, R13 = the RIP pushed, R14 = DR6,
/// R15 = the RFLAGS pushed; it clears DR6, sets RF in the frame (so an
/// instruction breakpoint lets the instruction run) and returns.
fn debug_guest(engine: Engine, main: &[u8]) -> Guest {
    let mut bytes = main.to_vec();
    bytes.resize((CATCH - CODE) as usize, 0xcc);
    let mut h = CodeAssembler::new(64).unwrap();
    h.inc(r12).unwrap();
    h.mov(r13, qword_ptr(rsp)).unwrap();
    h.mov(r15, qword_ptr(rsp + 16)).unwrap();
    h.mov(rax, dr6).unwrap();
    h.mov(r14, rax).unwrap();
    h.xor(eax, eax).unwrap();
    h.mov(dr6, rax).unwrap();
    h.or(qword_ptr(rsp + 16), 0x10000).unwrap();
    h.iretq().unwrap();
    bytes.extend_from_slice(&h.assemble(CATCH).unwrap());
    let mut g = Guest::long_mode(engine, &bytes);
    set_gate(&mut g, 1, CATCH);
    g
}

/// DR0 execute breakpoint: #DB before the instruction (a fault: RIP is the
/// instruction, RF pushed clear), DR6.B0; with RF set in the frame the
/// instruction then runs once.
fn dr0_execute_breakpoint(engine: Engine) {
    let target = CODE + 0x40;
    let mut main = asm64(|a| {
        a.xor(r12d, r12d)?;
        a.mov(rax, target)?;
        a.mov(dr0, rax)?;
        a.mov(eax, 1u32)?; // L0, execute, length 1
        a.mov(dr7, rax)?;
        a.xor(ebx, ebx)?;
        a.mov(rax, target)?;
        a.jmp(rax)
    });
    main.resize((target - CODE) as usize, 0x90);
    main.extend_from_slice(&[0xff, 0xc3]); // inc ebx
    main.push(0xf4); // hlt
    let mut g = debug_guest(engine, &main);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.r12, 1, "one #DB");
    assert_eq!(r.r13, target, "a fault: RIP of the instruction");
    assert_eq!(r.r14, 0xffff_0ff1, "DR6.B0");
    assert_eq!(r.r15 & 0x10000, 0, "RF pushed clear");
    assert_eq!(r.rbx, 1, "the instruction ran once");
}

/// DR1 write watchpoint (4 bytes): a read does not trigger it; a write
/// does, as a trap after the instruction, with DR6.B1.
fn dr1_write_watchpoint(engine: Engine) {
    const WATCHED: u64 = DATA + 8;
    let main = asm64(|a| {
        a.xor(r12d, r12d)?;
        a.mov(rax, WATCHED)?;
        a.mov(dr1, rax)?;
        // L1, R/W1 = 01 (writes), LEN1 = 11 (4 bytes).
        a.mov(eax, (1u32 << 2) | (1 << 20) | (3 << 22))?;
        a.mov(dr7, rax)?;
        a.mov(rbx, WATCHED)?;
        a.mov(ecx, dword_ptr(rbx))?; // read: nothing
        a.mov(dword_ptr(rbx + 4), ecx)?; // next to it: nothing
        a.mov(word_ptr(rbx + 2), cx)?; // inside: #DB
        a.mov(r8, 0x5a5au64)?;
        a.hlt()
    });
    let mut g = debug_guest(engine, &main);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.r12, 1, "one #DB");
    // The instruction after the 4-byte write (mov [rbx+2], cx: 4 bytes).
    let after = main.len() as u64 - 11;
    assert_eq!(r.r13, CODE + after, "a trap: RIP after the write");
    assert_eq!(r.r14, 0xffff_0ff2, "DR6.B1");
    assert_eq!(r.r8, 0x5a5a);
}

/// Runs `body` (given the assembler and one label per step, which it
/// sets) with TF set from its start, under a #DB handler that logs the RIP
/// of each trap at DATA and keeps every register but R8, R9, R12 (the
/// count) and R14 (DR6). Returns the label addresses, the log and the
/// final registers.
fn single_step_run(
    engine: Engine,
    steps: usize,
    body: impl Fn(&mut CodeAssembler, usize, &[CodeLabel]) -> Result<(), IcedError>,
) -> (Vec<u64>, Vec<u64>, vcpu::Regs) {
    const LOG: u64 = DATA;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut labels: Vec<CodeLabel> = (0..steps).map(|_| a.create_label()).collect();
    a.xor(r12d, r12d).unwrap();
    a.mov(edx, abi::SEL_DATA as u32).unwrap(); // (trap: MOV from SS would read RPL 1)
    a.pushfq().unwrap();
    a.or(qword_ptr(rsp), 0x100).unwrap();
    a.popfq().unwrap(); // TF from now on: no trap after this POPF
    for k in 0..steps {
        let mut l = labels[k];
        a.set_label(&mut l).unwrap();
        labels[k] = l;
        body(&mut a, k, &labels).unwrap();
    }
    let res = a
        .assemble_options(
            CODE,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
    let marks: Vec<u64> = labels.iter().map(|l| res.label_ip(l).unwrap()).collect();
    let mut bytes = res.inner.code_buffer;
    bytes.resize((CATCH - CODE) as usize, 0xcc);
    let mut h = CodeAssembler::new(64).unwrap();
    h.mov(r8, qword_ptr(rsp)).unwrap();
    h.mov(r9, LOG).unwrap();
    h.mov(qword_ptr(r9 + r12 * 8), r8).unwrap();
    h.inc(r12).unwrap();
    h.mov(r8, dr6).unwrap();
    h.mov(r14, r8).unwrap();
    h.iretq().unwrap();
    bytes.extend_from_slice(&h.assemble(CATCH).unwrap());
    let mut g = Guest::long_mode(engine, &bytes);
    set_gate(&mut g, 1, CATCH);
    assert_halted(&g.run());
    let r = g.regs();
    let log: Vec<u64> = (0..r.r12)
        .map(|k| g.vm.mem.read_obj(GuestAddress(LOG + 8 * k)).unwrap())
        .collect();
    (marks, log, r)
}

/// TF single-step: a #DB (DR6.BS) after each instruction that starts with
/// TF set; POPF setting TF traps only after the next instruction; MOV SS
/// delays the trap by one instruction (SDM vol. 3 6.8.3, 18.3.1.4).
fn single_step_across_mov_ss(engine: Engine) {
    let (marks, log, r) = single_step_run(engine, 8, |a, k, _| match k {
        0 => a.nop(),
        1 => a.mov(ss, dx),
        2 => a.nop(),
        3 => a.pushfq(),
        4 => a.and(qword_ptr(rsp), !0x100),
        5 => a.popfq(),
        6 => a.nop(),
        _ => a.hlt(),
    });
    // After nop (0), mov ss + nop together (1, 2), pushfq (3), and (4),
    // popfq (5, which clears TF but started with it).
    let want = [marks[1], marks[3], marks[4], marks[5], marks[6]];
    assert_eq!(log, want, "RIPs of the single-step traps");
    assert_ne!(r.r14 & 0x4000, 0, "DR6.BS");
}

/// TF single-step across the instructions the `trap` engine emulates for
/// its deprivileged kernel (MOV from CR0, CLI, MOV SS, IRETQ), the same on
/// every engine: a #DB after each, MOV SS's delayed to after the next
/// instruction (itself emulated), IRETQ's because TF was set when it
/// started (SDM vol. 3 18.3.1.4); POPF clearing TF still traps.
fn single_step_across_emulated_instructions(engine: Engine) {
    let (marks, log, r) = single_step_run(engine, 17, |a, k, l| match k {
        0 => a.mov(rax, cr0),
        1 => a.cli(),
        2 => a.mov(ss, dx),
        // Emulated too on `trap`: MOV SS's trap and its own are one.
        3 => a.mov(rbx, cr0),
        // An IRETQ frame back to step 12 with TF set.
        4 => a.mov(rcx, rsp),
        5 => a.push(abi::SEL_DATA as i32),
        6 => a.push(rcx),
        7 => a.pushfq(),
        8 => a.push(abi::SEL_CODE64 as i32),
        9 => a.lea(rax, ptr(l[12])),
        10 => a.push(rax),
        11 => a.iretq(),
        12 => a.pushfq(),
        13 => a.and(qword_ptr(rsp), !0x100),
        14 => a.popfq(),
        15 => a.nop(),
        _ => a.hlt(),
    });
    // A trap after every instruction from 0 to 14 (POPF, which clears TF,
    // started with it), but none after MOV SS (2): its trap comes after
    // the next instruction (3).
    let want: Vec<u64> = (1..=15).filter(|&k| k != 3).map(|k| marks[k]).collect();
    assert_eq!(log, want, "RIPs of the single-step traps");
    assert_ne!(r.r14 & 0x4000, 0, "DR6.BS");
    assert_eq!(r.rflags & 0x100, 0, "TF clear at the end");
}

/// `vm` set to start at CODE in 32-bit protected mode (the boot GDT's flat
/// segments, paging off, STACK).
fn protected_mode_guest(vm: visor::Vm, engine: Engine) -> Guest {
    let sregs = machine::boot::protected_mode(&vm.mem).unwrap();
    Guest::start(vm, engine, &sregs)
}

/// A far JMP to `sel`:`off` (`width` 2 or 4 bytes of offset) after
/// `prefix`.
fn far_jmp(prefix: &[u8], off: u32, width: usize, sel: u16) -> Vec<u8> {
    let mut b = prefix.to_vec();
    b.push(0xea);
    b.extend_from_slice(&off.to_le_bytes()[..width]);
    b.extend_from_slice(&sel.to_le_bytes());
    b
}

/// The GDT of the mode switches at `gdt` (32-bit code 0x08 and data 0x10,
/// 16-bit code 0x18 and data 0x20, limit 64 KiB), its pseudo-descriptor
/// at `gdtr`.
fn write_mode_switch_gdt(m: &machine::GuestMemory, gdt: u64, gdtr: u64) {
    let entries: [u64; 5] = [
        0,
        0x00cf_9a00_0000_ffff, // 32-bit code
        0x00cf_9200_0000_ffff, // 32-bit data
        0x0000_9a00_0000_ffff, // 16-bit code, limit 64 KiB
        0x0000_9200_0000_ffff, // 16-bit data
    ];
    for (k, d) in entries.iter().enumerate() {
        m.write_obj(*d, GuestAddress(gdt + 8 * k as u64)).unwrap();
    }
    m.write_obj(0x27u16, GuestAddress(gdtr)).unwrap();
    m.write_obj(gdt as u32, GuestAddress(gdtr + 2)).unwrap();
}

// Real mode (SDM vol. 3 9.9, 20.1): engines whose CPU runs it; `trap`
// runs a real-mode guest in virtual-8086 mode (docs/deprivileged.md).
on_engines!(
    [emu, trap, vmx, bt]:
    real_mode_round_trip,
    real_mode_flags_and_interrupts,
);
// (Not on `trap`: with ring compression FNSTENV stores the kernel's real
// CS selector, RPL 1, in protected mode, a leak like PUSH CS that the CPU
// does not intercept; and the guest's own virtual-8086 mode is not run.)
on_engines!(
    [emu, vmx, bt]:
    virtual_8086_mode,
    x87_environment_in_16_bit_and_real_mode,
);

/// FNSTENV, FLDENV, FNSAVE and FRSTOR in protected mode with a 16-bit
/// code segment and then in real mode, at both operand sizes: the
/// layouts of SDM vol. 1 figures 8-9 to 8-12 (selector and offset
/// pointers in protected mode, linear ones in real mode), each image
/// loaded back and stored again unchanged.
fn x87_environment_in_16_bit_and_real_mode(engine: Engine) {
    const GDT: u64 = 0x6000;
    const GDTR: u64 = 0x6100;
    const PM16: u64 = 0x7000;
    const PM16_DATA: u64 = 0x8000;
    const REAL_CS: u16 = 0x1700;
    const REAL: u64 = 0x1_7100;
    const REAL_DS: u16 = 0x2345;
    // The x87 block, images at DS:b+0x100..b+0x600; its FLD m32 (FOP
    // 0x106) at offset 4.
    let block = |a: &mut CodeAssembler, b: u16| -> Result<(), IcedError> {
        let o32 = |a: &mut CodeAssembler, op: u8, reg: u8, at: u16| {
            let [lo, hi] = at.to_le_bytes();
            a.db(&[0x66, op, reg << 3 | 6, lo, hi])
        };
        a.fninit()?;
        a.fld1()?;
        a.fld(dword_ptr(b as u64 + 0x10))?;
        a.fnstenv(ptr(b as u64 + 0x100))?;
        o32(a, 0xd9, 6, b + 0x200)?; // fnstenv, 32-bit
        a.fldenv(ptr(b as u64 + 0x100))?;
        a.fnstenv(ptr(b as u64 + 0x300))?;
        o32(a, 0xd9, 4, b + 0x200)?; // fldenv, 32-bit
        o32(a, 0xd9, 6, b + 0x400)?;
        a.fnsave(ptr(b as u64 + 0x500))?;
        a.frstor(ptr(b as u64 + 0x500))?;
        a.fnsave(ptr(b as u64 + 0x600))
    };
    let mut a = CodeAssembler::new(32).unwrap();
    a.lgdt(ptr(GDTR)).unwrap();
    let mut main = a.assemble(CODE).unwrap();
    main.extend(far_jmp(&[], PM16 as u32, 4, 0x18));
    // 16-bit protected mode: DS 0x20 (base 0), the block, then real mode.
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(ax, 0x20).unwrap();
    a.mov(ds, ax).unwrap();
    let pm16_fld = PM16 + a.assemble(PM16).unwrap().len() as u64 + 4;
    block(&mut a, PM16_DATA as u16).unwrap();
    a.mov(eax, cr0).unwrap();
    a.and(eax, !1i32).unwrap();
    a.mov(cr0, eax).unwrap();
    let mut pm16 = a.assemble(PM16).unwrap();
    pm16.extend(far_jmp(
        &[],
        (REAL - ((REAL_CS as u64) << 4)) as u32,
        2,
        REAL_CS,
    ));
    // Real mode: DS 0x2345, the block.
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(ax, REAL_DS as u32).unwrap();
    a.mov(ds, ax).unwrap();
    let real_fld = REAL + a.assemble(REAL).unwrap().len() as u64 + 4;
    block(&mut a, 0).unwrap();
    a.hlt().unwrap();
    let real = a.assemble(REAL - ((REAL_CS as u64) << 4)).unwrap();

    let vm = visor::Vm::new(engine, 16 << 20, VmOptions::default()).unwrap();
    let m = &vm.mem;
    m.write_slice(&main, GuestAddress(CODE)).unwrap();
    m.write_slice(&pm16, GuestAddress(PM16)).unwrap();
    m.write_slice(&real, GuestAddress(REAL)).unwrap();
    write_mode_switch_gdt(m, GDT, GDTR);
    let mut g = protected_mode_guest(vm, engine);
    assert_halted(&g.run());
    let mem = &g.vm.mem;
    let fld = |at: u64| mem.read_obj::<u16>(GuestAddress(at)).unwrap();
    assert_eq!((fld(pm16_fld), fld(real_fld)), (0x06d9, 0x06d9), "FLD m32");
    let words = |at: u64, n: usize, w: usize| -> Vec<u32> {
        let mut b = vec![0u8; n * w];
        mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b.chunks(w)
            .map(|c| c.iter().rev().fold(0u32, |v, &x| v << 8 | x as u32))
            .collect()
    };
    let check = |mode: &str, data: u64, env16: &[u32], env32: &[u32]| {
        assert_eq!(words(data + 0x100, 7, 2), env16, "{mode}: 16-bit image");
        assert_eq!(words(data + 0x200, 7, 4), env32, "{mode}: 32-bit image");
        assert_eq!(words(data + 0x300, 7, 2), env16, "{mode}: 16-bit, reloaded");
        assert_eq!(words(data + 0x400, 7, 4), env32, "{mode}: 32-bit, reloaded");
        let save = words(data + 0x500, 47, 2);
        assert_eq!(save[..7], *env16, "{mode}: FNSAVE's environment");
        assert_eq!(save[15..17], [0x8000, 0x3fff], "{mode}: FNSAVE's ST1 = 1.0");
        assert_eq!(words(data + 0x600, 47, 2), save, "{mode}: FRSTOR, FNSAVE");
    };
    // TOP 6; tags: ST0 zero, ST1 valid, the rest empty.
    let control = [0x037f, 0x3000, 0x1fff];
    let with = |pointers: [u32; 4]| -> (Vec<u32>, Vec<u32>) {
        let env16 = control.iter().chain(&pointers).copied().collect();
        let env32 = control.iter().map(|c| c | 0xffff_0000);
        (env16, env32.chain(pointers).collect())
    };
    // Protected mode: FIP, FCS 0x18, FDP, FDS 0x20; FOP beside FCS in the
    // 32-bit image only.
    let (env16, mut env32) = with([pm16_fld as u32, 0x18, PM16_DATA as u32 + 0x10, 0x20]);
    env32[4] |= 0x106 << 16;
    check("protected mode, 16-bit code", PM16_DATA, &env16, &env32);
    // Real mode: linear pointers, bits 16 up beside the low 16, FOP
    // beside the instruction pointer's.
    let data = ((REAL_DS as u64) << 4) + 0x10;
    let split = |lin: u64, op: u32| [lin as u32 & 0xffff, ((lin >> 16) as u32) << 12 | op];
    let [ip_lo, ip_hi] = split(real_fld, 0x106);
    let [dp_lo, dp_hi] = split(data, 0);
    let (env16, env32) = with([ip_lo, ip_hi, dp_lo, dp_hi]);
    check("real mode", (REAL_DS as u64) << 4, &env16, &env32);
}

/// 16-bit protected-mode code at `at` (code segment 0x18 of
/// [`write_mode_switch_gdt`]): the 16-bit data segment in DS, ES and SS,
/// CR0.PE cleared, a far jump to `real` with CS 0.
fn pm16_to_real(at: u64, real: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(ax, 0x20).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(es, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(eax, cr0).unwrap();
    a.and(eax, !1i32).unwrap();
    a.mov(cr0, eax).unwrap();
    let mut code = a.assemble(at).unwrap();
    code.extend(far_jmp(&[], real as u32, 2, 0));
    code
}

/// The start of real-mode code: DS, ES and SS 0, SP `stack`, the IVT loaded
/// from the pseudo-descriptor at `ivtr`.
fn real_mode_start(a: &mut CodeAssembler, stack: u64, ivtr: u64) {
    a.xor(ax, ax).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(es, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(sp, stack as i32).unwrap();
    a.lidt(ptr(ivtr)).unwrap();
}

/// From 32-bit protected mode to real mode (through a 16-bit code segment,
/// CR0.PE clear, a far jump), an INT through the real-mode IVT and IRET
/// back, then to protected mode again (CR0.PE set, a far jump to a 32-bit
/// segment).
fn real_mode_round_trip(engine: Engine) {
    const GDT: u64 = 0x6000;
    const GDTR: u64 = 0x6100;
    const IVTR: u64 = 0x6110;
    const PM16: u64 = 0x7000;
    const REAL: u64 = 0x7100;
    const HANDLER: u64 = 0x7200;
    const STACK16: u64 = 0x6800;
    const SCRATCH: u64 = 0x6200;
    const PM32: u64 = CODE + 0x100;
    // 32-bit: load the GDT, on to the 16-bit code segment.
    let mut a = CodeAssembler::new(32).unwrap();
    a.lgdt(ptr(GDTR)).unwrap();
    let mut main = a.assemble(CODE).unwrap();
    main.extend(far_jmp(&[], PM16 as u32, 4, 0x18));
    main.resize((PM32 - CODE) as usize, 0xcc);
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(ax, 0x10).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(es, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(esp, STACK as u32).unwrap();
    a.mov(eax, cr0).unwrap();
    a.mov(edi, eax).unwrap();
    a.hlt().unwrap();
    let pm32 = a.assemble(PM32).unwrap();
    let pm32_end = PM32 + pm32.len() as u64;
    main.extend(pm32);
    let pm16 = pm16_to_real(PM16, REAL);
    // Real mode: segments, the IVT, INT 0x50, back to protected mode.
    let mut a = CodeAssembler::new(16).unwrap();
    real_mode_start(&mut a, STACK16, IVTR);
    // Port I/O, a string OUTS with 16-bit addressing and CPUID in real
    // mode: VM exits and entries with real-mode guest state on `vmx`.
    a.in_(al, PORT_BASE as u32 + 1).unwrap();
    a.mov(byte_ptr(SCRATCH), al).unwrap();
    a.mov(al, 0x42).unwrap();
    a.out(PORT_BASE as u32, al).unwrap();
    a.mov(si, SCRATCH as u32 + 8).unwrap();
    a.mov(cx, 2).unwrap();
    a.mov(dx, PORT_BASE as u32 + 2).unwrap();
    a.rep().outsb().unwrap();
    a.xor(eax, eax).unwrap();
    a.cpuid().unwrap();
    a.mov(dword_ptr(SCRATCH + 4), ebx).unwrap();
    a.xor(bx, bx).unwrap();
    a.int(0x50).unwrap();
    a.mov(si, bx).unwrap();
    a.mov(bp, sp).unwrap();
    a.mov(eax, cr0).unwrap();
    a.or(al, 1).unwrap();
    a.mov(cr0, eax).unwrap();
    let mut real = a.assemble(REAL).unwrap();
    real.extend(far_jmp(&[0x66], PM32 as u32, 4, 0x08));
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(bx, 0x1234).unwrap();
    a.mov(cx, sp).unwrap();
    a.mov(dx, word_ptr(STACK16 - 4)).unwrap(); // the CS pushed
    a.iret().unwrap();
    let handler = a.assemble(HANDLER).unwrap();

    let vm = visor::Vm::new(engine, 16 << 20, VmOptions::default()).unwrap();
    let m = &vm.mem;
    m.write_slice(&main, GuestAddress(CODE)).unwrap();
    m.write_slice(&pm16, GuestAddress(PM16)).unwrap();
    m.write_slice(&real, GuestAddress(REAL)).unwrap();
    m.write_slice(&handler, GuestAddress(HANDLER)).unwrap();
    m.write_slice(&[0x5a, 0xa5], GuestAddress(SCRATCH + 8))
        .unwrap();
    write_mode_switch_gdt(m, GDT, GDTR);
    m.write_obj(0x3ffu16, GuestAddress(IVTR)).unwrap();
    m.write_obj(0u32, GuestAddress(IVTR + 2)).unwrap();
    // IVT entry 0x50: 0000:HANDLER.
    m.write_obj(HANDLER as u32, GuestAddress(0x50 * 4)).unwrap();
    let mut g = protected_mode_guest(vm, engine);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.rbx & 0xffff, 0x1234, "the INT handler ran");
    assert_eq!(r.rsi & 0xffff, 0x1234, "and IRET came back");
    assert_eq!(r.rcx & 0xffff, STACK16 - 6, "INT pushed FLAGS, CS, IP");
    assert_eq!(r.rdx & 0xffff, 0, "the real-mode CS pushed");
    assert_eq!(r.rbp & 0xffff, STACK16, "IRET popped them");
    assert_eq!(r.rdi & 1, 1, "protected mode again");
    let s = g.vm.vcpu.sregs().unwrap();
    assert_eq!(s.cs.selector, 0x08);
    assert!(s.cs.db, "32-bit code");
    assert_eq!(r.rip, pm32_end, "HLT in the 32-bit segment");
    let rd = |a: u64| g.vm.mem.read_obj::<u32>(GuestAddress(a)).unwrap();
    assert_eq!(rd(SCRATCH) as u8, 0xa1, "IN in real mode");
    assert_eq!(rd(SCRATCH + 4), u32::from_le_bytes(*b"Genu"), "CPUID");
    let p = g.ports.lock().unwrap();
    assert_eq!(p.reads, vec![(1, 1)]);
    assert_eq!(
        p.writes,
        vec![(0, vec![0x42]), (2, vec![0x5a]), (2, vec![0xa5])],
        "OUT and REP OUTSB in real mode"
    );
}

/// Real mode, entered from protected mode: CLI, STI, PUSHF, POPF, PUSHFD
/// and POPFD with the FLAGS the SDM gives (IF and IOPL as written, bit 1
/// set, VM and RF never pushed), a fault (#DE, the faulting IP pushed) and
/// INT3 through the interrupt vector table, IRET back, HLT. Under `trap`
/// (a virtual-8086 task at IOPL 0) each of these but INT3 and #DE traps to
/// the VMM, which the counters show.
fn real_mode_flags_and_interrupts(engine: Engine) {
    const GDT: u64 = 0x6000;
    const GDTR: u64 = 0x6100;
    const IVTR: u64 = 0x6110;
    const PM16: u64 = 0x7000;
    const REAL: u64 = 0x7100;
    const DE_HANDLER: u64 = 0x7400;
    const BP_HANDLER: u64 = 0x7480;
    const STACK16: u64 = 0x6800;
    const OUT: u64 = 0x6200;
    let mut a = CodeAssembler::new(32).unwrap();
    a.lgdt(ptr(GDTR)).unwrap();
    let mut main = a.assemble(CODE).unwrap();
    main.extend(far_jmp(&[], PM16 as u32, 4, 0x18));
    let pm16 = pm16_to_real(PM16, REAL);
    let mut a = CodeAssembler::new(16).unwrap();
    real_mode_start(&mut a, STACK16, IVTR);
    a.cli().unwrap();
    a.pushf().unwrap();
    a.pop(ax).unwrap();
    a.mov(word_ptr(OUT), ax).unwrap();
    a.mov(ax, 0x3a03).unwrap(); // IOPL 3, IF, DF, CF
    a.push(ax).unwrap();
    a.popf().unwrap();
    a.pushf().unwrap();
    a.pop(ax).unwrap();
    a.mov(word_ptr(OUT + 2), ax).unwrap();
    a.pushfd().unwrap();
    a.pop(eax).unwrap();
    a.mov(dword_ptr(OUT + 4), eax).unwrap();
    a.mov(eax, 0x0004_1000u32).unwrap(); // AC, IOPL 1, IF clear
    a.push(eax).unwrap();
    a.popfd().unwrap();
    a.pushfd().unwrap();
    a.pop(eax).unwrap();
    a.mov(dword_ptr(OUT + 8), eax).unwrap();
    a.sti().unwrap();
    a.xor(dx, dx).unwrap();
    a.mov(ax, 7).unwrap();
    a.xor(cx, cx).unwrap();
    a.div(cx).unwrap(); // #DE: the handler steps over it
    a.int3().unwrap();
    a.pushf().unwrap();
    a.pop(ax).unwrap();
    a.mov(word_ptr(OUT + 12), ax).unwrap();
    a.hlt().unwrap();
    let real = a.assemble(REAL).unwrap();
    // #DE: record the IP pushed, skip the 2-byte DIV.
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(bp, sp).unwrap();
    a.mov(si, word_ptr(bp)).unwrap();
    a.mov(word_ptr(OUT + 14), si).unwrap();
    a.mov(si, word_ptr(bp + 4)).unwrap();
    a.mov(word_ptr(OUT + 16), si).unwrap(); // FLAGS pushed
    a.add(word_ptr(bp), 2).unwrap();
    a.pushf().unwrap();
    a.pop(word_ptr(OUT + 18)).unwrap(); // IF and TF cleared
    a.iret().unwrap();
    let de = a.assemble(DE_HANDLER).unwrap();
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(bp, sp).unwrap();
    a.mov(si, word_ptr(bp)).unwrap();
    a.mov(word_ptr(OUT + 20), si).unwrap();
    a.iret().unwrap();
    let bp_h = a.assemble(BP_HANDLER).unwrap();

    let vm = visor::Vm::new(engine, 16 << 20, VmOptions::default()).unwrap();
    let m = &vm.mem;
    m.write_slice(&main, GuestAddress(CODE)).unwrap();
    m.write_slice(&pm16, GuestAddress(PM16)).unwrap();
    m.write_slice(&real, GuestAddress(REAL)).unwrap();
    m.write_slice(&de, GuestAddress(DE_HANDLER)).unwrap();
    m.write_slice(&bp_h, GuestAddress(BP_HANDLER)).unwrap();
    write_mode_switch_gdt(m, GDT, GDTR);
    m.write_obj(0x3ffu16, GuestAddress(IVTR)).unwrap();
    m.write_obj(0u32, GuestAddress(IVTR + 2)).unwrap();
    m.write_obj(DE_HANDLER as u32, GuestAddress(0)).unwrap();
    m.write_obj(BP_HANDLER as u32, GuestAddress(3 * 4)).unwrap();
    let mut g = protected_mode_guest(vm, engine);
    assert_halted(&g.run());
    let rd = |k: u64| g.vm.mem.read_obj::<u16>(GuestAddress(OUT + k)).unwrap();
    let rd32 = |k: u64| g.vm.mem.read_obj::<u32>(GuestAddress(OUT + k)).unwrap();
    assert_eq!(
        rd(0) & 0x0202,
        0x0002,
        "PUSHF after CLI: IF clear, bit 1 set"
    );
    assert_eq!(rd(2), 0x3a03, "POPF then PUSHF: IOPL 3, IF, DF, CF");
    assert_eq!(rd32(4), 0x3a03, "PUSHFD: no VM, no RF");
    assert_eq!(rd32(8), 0x0004_1002, "POPFD: AC, IOPL 1, IF clear");
    let div = REAL + real.len() as u64 - 9; // DIV, INT3, PUSHF, POP, MOV, HLT
    assert_eq!(rd(14) as u64, div, "#DE pushes the DIV's IP");
    assert_eq!(rd(16) & 0x0200, 0x0200, "the FLAGS pushed have IF");
    assert_eq!(rd(18) & 0x0300, 0, "the handler runs with IF and TF clear");
    assert_eq!(rd(20) as u64, div + 3, "INT3 pushes the next IP");
    assert_eq!(rd(12) & 0x0200, 0x0200, "IRET restored IF");
    let s = g.vm.vcpu.sregs().unwrap();
    assert_eq!(s.cr0 & 1, 0, "still in real mode");
    assert_eq!((s.cs.selector, s.cs.base), (0, 0));
    assert_eq!(g.regs().rflags & (1 << 17), 0, "the guest sees no VM flag");
    if engine == Engine::Trap {
        let n = |k: &str| {
            g.stats
                .engine_counters
                .iter()
                .find(|(name, _)| name == k)
                .map_or(0, |(_, v)| *v)
        };
        for (k, want) in [
            ("traps/cli", 1),
            ("traps/sti", 1),
            ("traps/pushf", 6),
            ("traps/popf", 2),
            ("traps/iret", 2),
            ("traps/hlt", 1),
        ] {
            assert_eq!(n(k), want, "{k}");
        }
    }
}

/// Virtual-8086 mode under a 32-bit monitor (SDM vol. 3 ch. 20): IRETD to
/// it, real-mode segments at CPL 3, INT n through a DPL-3 gate to a ring-0
/// handler (GS, FS, DS, ES pushed above the frame, the data segments
/// nulled), IRETD back, and with IOPL 0 CLI raises #GP(0).
fn virtual_8086_mode(engine: Engine) {
    const V86: u64 = 0x7000; // CS 0x700
    const INT21: u64 = CODE + 0x200;
    const GP: u64 = CODE + 0x300;
    const IDT32: u64 = 0x5000;
    const IDTR: u64 = 0x5800;
    let mut a = CodeAssembler::new(32).unwrap();
    a.lidt(ptr(IDTR)).unwrap();
    for v in [0i32, 0, 0x700, 0, 0x600, 0x100, 0x23002, 0x700, 0] {
        a.push(v).unwrap(); // GS FS DS ES SS ESP EFLAGS CS EIP
    }
    a.iretd().unwrap();
    let mut main = a.assemble(CODE).unwrap();
    main.resize((INT21 - CODE) as usize, 0xcc);
    let mut h = CodeAssembler::new(32).unwrap();
    h.mov(ecx, dword_ptr(esp + 8)).unwrap(); // EFLAGS
    h.mov(edx, dword_ptr(esp + 24)).unwrap(); // DS
    h.mov(di, ds).unwrap();
    h.and(dword_ptr(esp + 8), !0x3000).unwrap(); // back with IOPL 0
    h.iretd().unwrap();
    main.extend(h.assemble(INT21).unwrap());
    main.resize((GP - CODE) as usize, 0xcc);
    let mut h = CodeAssembler::new(32).unwrap();
    h.pop(eax).unwrap(); // error code
    h.mov(ebp, dword_ptr(esp)).unwrap(); // EIP
    h.hlt().unwrap();
    main.extend(h.assemble(GP).unwrap());
    let mut a = CodeAssembler::new(16).unwrap();
    // CPUID: on `vmx` a VM exit and an entry in virtual-8086 mode.
    a.xor(eax, eax).unwrap();
    a.cpuid().unwrap();
    a.mov(dword_ptr(0x84), ebx).unwrap();
    a.mov(ax, word_ptr(0x80)).unwrap();
    a.mov(bx, ax).unwrap();
    a.int(0x21).unwrap();
    a.mov(si, 0x5555).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    let v86 = a.assemble(0).unwrap();
    let cli_at = v86.len() as u64 - 2;

    let vm = visor::Vm::new(engine, 16 << 20, VmOptions::default()).unwrap();
    let sregs = machine::boot::protected_mode(&vm.mem).unwrap();
    let m = &vm.mem;
    m.write_slice(&main, GuestAddress(CODE)).unwrap();
    m.write_slice(&v86, GuestAddress(V86)).unwrap();
    m.write_obj(0xbeefu16, GuestAddress(V86 + 0x80)).unwrap();
    // The TSS (at 0): ESP0, SS0.
    m.write_obj(0x9000u32, GuestAddress(sregs.tr.base + 4))
        .unwrap();
    m.write_obj(abi::SEL_DATA as u32, GuestAddress(sregs.tr.base + 8))
        .unwrap();
    let gate = |handler: u64, dpl: u64| -> u64 {
        (handler & 0xffff)
            | ((abi::SEL_CODE32 as u64) << 16)
            | ((0x8e00 | dpl << 13) << 32)
            | ((handler >> 16) << 48)
    };
    m.write_obj(gate(INT21, 3), GuestAddress(IDT32 + 0x21 * 8))
        .unwrap();
    m.write_obj(gate(GP, 0), GuestAddress(IDT32 + 13 * 8))
        .unwrap();
    m.write_obj(0x7ffu16, GuestAddress(IDTR)).unwrap();
    m.write_obj(IDT32 as u32, GuestAddress(IDTR + 2)).unwrap();
    let mut g = Guest::start(vm, engine, &sregs);
    assert_halted(&g.run());
    let r = g.regs();
    assert_eq!(r.rbx & 0xffff, 0xbeef, "DS 0x700 reaches 0x7080");
    let vendor = g.vm.mem.read_obj::<u32>(GuestAddress(V86 + 0x84)).unwrap();
    assert_eq!(vendor, u32::from_le_bytes(*b"Genu"), "CPUID");
    assert_eq!(r.rcx & 0x23000, 0x23000, "EFLAGS pushed with VM and IOPL 3");
    assert_eq!(r.rdx, 0x700, "DS pushed above the frame");
    assert_eq!(r.rdi & 0xffff, 0, "DS nulled in the handler");
    assert_eq!(r.rsi & 0xffff, 0x5555, "IRETD back to virtual-8086 mode");
    assert_eq!(r.rax, 0, "#GP(0)");
    assert_eq!(r.rbp, cli_at, "CLI with IOPL 0 faults");
}

// The i8042 keyboard controller driven from a guest, its IRQ 1 through the
// engine's 8259 PIC (KVM's in-kernel one under `kvm`, softplat's on the
// software engines).
on_engines!(
    [kvm, emu, trap, vmx, bt]:
    i8042_keyboard_controller,
);

/// The guest's OUT of byte `v` to `port`.
fn outb(a: &mut CodeAssembler, port: i32, v: u32) -> Result<(), IcedError> {
    a.mov(al, v)?;
    a.out(port, al)
}

/// The guest's wait for the 8042's output buffer (status bit 0), then its
/// byte in AL; it polls at most 100,000 times (ECX).
fn i8042_read(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut poll = a.create_label();
    let mut ready = a.create_label();
    a.mov(ecx, 100_000u32)?;
    a.set_label(&mut poll)?;
    a.in_(al, 0x64)?;
    a.test(al, 1)?;
    a.jnz(ready)?;
    a.dec(ecx)?;
    a.jnz(poll)?;
    a.set_label(&mut ready)?;
    a.in_(al, 0x60)
}

/// The controller's self-test (0x55 with the status register saying a byte
/// waits, the system flag and the last write a command), a round trip of
/// its command byte, the keyboard's identify (0xfa 0xab 0x83), all with the
/// keyboard interrupt disabled: no IRQ 1; then, with CTR bit 0 set, the
/// keyboard's echo raises IRQ 1, which the PIC delivers once as vector 0x21
/// and whose handler reads the byte.
fn i8042_keyboard_controller(engine: Engine) {
    const HANDLER: u64 = CODE + 0x800;
    let main = asm64(|a| {
        a.cli()?;
        a.xor(r13d, r13d)?;
        // The PICs: vectors 0x20 and 0x28, only IRQ 1 unmasked.
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 4),
            (0x21, 1),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 2),
            (0xa1, 1),
            (0x21, 0xfd),
            (0xa1, 0xff),
        ] {
            outb(a, port, v)?;
        }
        // The command byte: system flag and translation, no interrupt.
        outb(a, 0x64, 0x60)?;
        outb(a, 0x60, 0x44)?;
        a.sti()?;
        // Self-test: the status before the read (R15), the answer (R8).
        outb(a, 0x64, 0xaa)?;
        a.in_(al, 0x64)?;
        a.movzx(r15d, al)?;
        i8042_read(a)?;
        a.movzx(r8d, al)?;
        // The command byte read back (R9).
        outb(a, 0x64, 0x20)?;
        i8042_read(a)?;
        a.movzx(r9d, al)?;
        // Identify: three bytes in R10 (first in the low byte).
        outb(a, 0x60, 0xf2)?;
        a.xor(r10d, r10d)?;
        for shift in [0, 8, 16] {
            i8042_read(a)?;
            a.movzx(ebx, al)?;
            a.shl(ebx, shift)?;
            a.or(r10d, ebx)?;
        }
        // The status with nothing left (R11), and the interrupts so far (R14).
        a.in_(al, 0x64)?;
        a.movzx(r11d, al)?;
        a.mov(r14, r13)?;
        // Keyboard interrupt on, then an echo: IRQ 1.
        outb(a, 0x64, 0x60)?;
        outb(a, 0x60, 0x45)?;
        outb(a, 0x60, 0xee)?;
        let mut wait = a.create_label();
        let mut done = a.create_label();
        a.mov(ecx, 10_000_000u32)?;
        a.set_label(&mut wait)?;
        a.test(r13, r13)?;
        a.jnz(done)?;
        a.dec(ecx)?;
        a.jnz(wait)?;
        a.set_label(&mut done)?;
        // Some more time: no second interrupt for the one byte.
        let mut more = a.create_label();
        a.mov(ecx, 10_000u32)?;
        a.set_label(&mut more)?;
        a.dec(ecx)?;
        a.jnz(more)?;
        a.cli()?;
        a.mov(al, 0)?;
        a.out(abi::port::DEBUG_EXIT as i32, al)
    });
    let mut code = main;
    assert!(code.len() <= (HANDLER - CODE) as usize);
    code.resize((HANDLER - CODE) as usize, 0xcc);
    let mut h = CodeAssembler::new(64).unwrap();
    h.push(rax).unwrap();
    h.in_(al, 0x60).unwrap();
    h.movzx(r12d, al).unwrap();
    h.inc(r13).unwrap();
    h.mov(al, 0x20u32).unwrap(); // EOI
    h.out(0x20, al).unwrap();
    h.pop(rax).unwrap();
    h.iretq().unwrap();
    code.extend_from_slice(&h.assemble(HANDLER).unwrap());
    let opts = VmOptions {
        irqchip: true,
        ..VmOptions::default()
    };
    let mut g = Guest::long_mode_with(engine, &code, opts);
    let line = g.vm.engine_vm.irq_line(1).unwrap();
    assert!(line.is_some(), "an irqchip has ISA IRQ 1");
    g.vm.pio
        .insert(
            machine::i8042::DATA_PORT as u64,
            5,
            std::sync::Arc::new(std::sync::Mutex::new(machine::i8042::I8042::new(
                line, None,
            ))),
        )
        .unwrap();
    set_gate(&mut g, 0x21, HANDLER);
    let o = g.run();
    assert!(
        matches!(o, Outcome::Stopped(StopReason::DebugExit(0))),
        "{o:?}"
    );
    let r = g.regs();
    assert_eq!(r.r15, 0x1d, "OBF, system flag, command last, not inhibited");
    assert_eq!(r.r8, 0x55, "self-test passed");
    assert_eq!(r.r9, 0x44, "the command byte read back");
    assert_eq!(r.r10, 0x83_abfa, "identify: ACK, 0xab 0x83");
    assert_eq!(r.r11, 0x14, "nothing waits after the reads");
    assert_eq!(r.r14, 0, "no IRQ 1 with CTR bit 0 clear");
    assert_eq!(r.r13, 1, "one IRQ 1 for the echo");
    assert_eq!(r.r12, 0xee, "the handler read the echo");
}
