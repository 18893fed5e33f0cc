//! Engine `trap` (trap-and-emulate): its virtualization holes, the emulation of
//! each privileged instruction, shadow paging, and guests that try to escape.
//! `emu` (the guest at its real privilege) is the oracle for what a guest
//! kernel should see.

mod common;

use common::guest::*;
use iced_x86::code_asm::*;
use visor::{Engine, HolePolicy, Outcome, VmOptions};
use vm_memory::{Bytes, GuestAddress};

fn opts(holes: HolePolicy) -> VmOptions {
    VmOptions {
        holes,
        ..Default::default()
    }
}

fn counter(g: &Guest, name: &str) -> u64 {
    g.stats
        .engine_counters
        .iter()
        .find(|(k, _)| k == name)
        .map_or(0, |(_, v)| *v)
}

const IF: u64 = 1 << 9;

/// Each sensitive unprivileged instruction that x86 runs at CPL 1 without
/// faulting, executed by a guest kernel that believes it is at CPL 0.
fn sensitive_guest() -> Vec<u8> {
    asm64(|a| {
        a.mov(rax, DATA + 0x100)?;
        a.lidt(ptr(rax))?;
        a.cli()?;
        a.pushfq()?;
        a.pop(r8)?; // IF=0
        a.sti()?;
        a.pushfq()?;
        a.pop(r9)?; // IF=1
        a.push(2)?;
        a.popfq()?; // clears IF at CPL 0
        a.pushfq()?;
        a.pop(r10)?;
        a.mov(rax, DATA)?;
        a.sgdt(ptr(rax))?;
        a.mov(r11, qword_ptr(DATA + 2))?;
        a.mov(rax, DATA + 16)?;
        a.sidt(ptr(rax))?;
        a.mov(r12, qword_ptr(DATA + 18))?;
        a.xor(eax, eax)?;
        a.str(ax)?;
        a.movzx(r13, ax)?;
        a.mov(eax, 0xffffu32)?;
        a.sldt(ax)?;
        a.movzx(r14, ax)?;
        a.smsw(rax)?;
        a.mov(r15, rax)?;
        a.mov(ax, cs)?;
        a.movzx(rbx, ax)?;
        a.mov(ax, ss)?;
        a.movzx(rcx, ax)?;
        // LAR, LSL, VERR, VERW of the kernel's data selector: ZF of each.
        a.xor(esi, esi)?;
        a.mov(eax, 0x18u32)?;
        a.lar(edx, eax)?;
        a.setz(dil)?;
        a.or(sil, dil)?;
        a.lsl(edi, eax)?;
        a.setz(dil)?;
        a.shl(sil, 1)?;
        a.or(sil, dil)?;
        a.verr(ax)?;
        a.setz(dil)?;
        a.shl(sil, 1)?;
        a.or(sil, dil)?;
        a.verw(ax)?;
        a.setz(dil)?;
        a.shl(sil, 1)?;
        a.or(sil, dil)?;
        a.push(fs)?;
        a.pop(rbp)?;
        a.hlt()
    })
}

fn run_sensitive(engine: Engine, holes: HolePolicy) -> (Guest, Outcome) {
    let mut g = Guest::long_mode_with(engine, &sensitive_guest(), opts(holes));
    let mut dt = [0u8; 10];
    dt[..2].copy_from_slice(&0xfffu16.to_le_bytes());
    dt[2..].copy_from_slice(&IDT.to_le_bytes());
    g.vm.mem
        .write_slice(&dt, GuestAddress(DATA + 0x100))
        .unwrap();
    let o = g.run();
    (g, o)
}

/// The registers the sensitive guest computes.
fn seen(g: &Guest) -> [u64; 12] {
    let r = g.regs();
    [
        r.r8 & IF,
        r.r9 & IF,
        r.r10 & IF,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        r.rbx,
        r.rcx,
        r.rsi,
        r.rbp,
    ]
}

const HOLES: [&str; 13] = [
    "pushf",
    "popf",
    "sgdt",
    "sidt",
    "str",
    "sldt",
    "smsw",
    "mov from sreg",
    "lar",
    "lsl",
    "verr",
    "verw",
    "push sreg",
];

#[test]
fn sensitive_instructions_at_cpl0_on_emu() {
    let (g, o) = run_sensitive(Engine::Emu, HolePolicy::Report);
    assert_halted(&o);
    let s = seen(&g);
    assert_eq!(&s[..3], &[0, IF, 0], "IF after cli, sti, popf");
    assert_eq!(s[3], 0x500, "sgdt: the boot GDT");
    assert_eq!(s[4], IDT, "sidt");
    assert_eq!(s[5], 0x20, "str");
    assert_eq!(s[8], 0x10, "cs");
    assert_eq!(
        s[10], 0b1111,
        "lar, lsl, verr, verw all see the DPL-0 segment"
    );
}

/// Reported (the default): the holes happen, as on real x86, and each is
/// counted by mnemonic.
#[test]
fn sensitive_instructions_are_holes_under_trap() {
    let (g, o) = run_sensitive(Engine::Trap, HolePolicy::Report);
    assert_halted(&o);
    let s = seen(&g);
    assert_eq!(s[2], IF, "POPF at CPL 1 did not clear IF: the hole");
    assert_eq!(s[0], IF, "PUSHF shows the real IF, not the guest's");
    assert_eq!(s[4], 0, "SIDT shows the VMM's IDT");
    assert_eq!(s[5], 0, "STR shows the VMM's task register");
    assert_eq!(s[8], 0x11, "MOV from CS shows RPL 1");
    assert_eq!(s[10], 0, "DPL-0 descriptors invisible at CPL 1");
    for h in HOLES {
        assert!(
            counter(&g, &format!("holes/{h}")) >= 1,
            "hole {h} not reported"
        );
    }
    assert_eq!(counter(&g, "holes/pushf"), 3);
    assert_eq!(counter(&g, "traps/cli"), 1);
    assert_eq!(counter(&g, "traps/sti"), 1);
    assert_eq!(counter(&g, "traps/lidt"), 1);
}

/// `--trap-sensitive`: a virtualizable x86, where they trap and the VMM
/// emulates them: the guest sees exactly what it sees at its real privilege.
#[test]
fn sensitive_instructions_emulated_with_trap_sensitive() {
    let (oracle, _) = run_sensitive(Engine::Emu, HolePolicy::Report);
    let (g, o) = run_sensitive(Engine::Trap, HolePolicy::Trap);
    assert_halted(&o);
    assert_eq!(seen(&g), seen(&oracle));
    assert_eq!(
        g.regs().rdx & 0xff00,
        oracle.regs().rdx & 0xff00,
        "LAR rights"
    );
    for h in HOLES {
        assert!(counter(&g, &format!("traps/{h}")) >= 1, "{h} did not trap");
        assert_eq!(counter(&g, &format!("holes/{h}")), 0, "{h} is no hole here");
    }
}

/// `--strict-holes`: the first hole ends the run with the explanation.
#[test]
fn strict_holes_stop_at_the_first() {
    let (_, o) = run_sensitive(Engine::Trap, HolePolicy::Strict);
    match o {
        Outcome::GuestFailure { what, .. } => {
            assert!(
                what.contains("pushf") && what.contains("did not trap"),
                "{what}"
            );
            assert!(what.contains("IF=1") && what.contains("IF=0"), "{what}");
        }
        o => panic!("expected a guest failure, got {o:?}"),
    }
}

/// Every privileged instruction the guest kernel uses faults at CPL 1 and
/// is emulated on the virtual CPU: the results match the guest at CPL 0.
fn privileged_guest() -> Vec<u8> {
    asm64(|a| {
        a.mov(rax, cr0)?;
        a.mov(r8, rax)?;
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)?; // flushes the shadow
        a.mov(r9, rax)?;
        a.mov(rax, cr4)?;
        a.mov(r10, rax)?;
        a.mov(rax, 0x1234_5000u64)?;
        a.mov(cr2, rax)?;
        a.mov(rax, cr2)?;
        a.mov(r11, rax)?;
        a.mov(rax, 0x400u64)?;
        a.mov(dr7, rax)?;
        a.mov(rax, dr7)?;
        a.mov(r12, rax)?;
        // MSRs the VMM keeps (LSTAR, KERNEL_GS_BASE) and one the CPU keeps (TSC_AUX).
        a.mov(ecx, 0xc000_0082u32)?;
        a.mov(eax, 0x8765_4321u32)?;
        a.mov(edx, 0xffff_ffffu32)?;
        a.wrmsr()?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.rdmsr()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(r13, rax)?;
        a.mov(ecx, 0xc000_0102u32)?;
        a.mov(eax, 0x5000u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.swapgs()?;
        a.mov(ecx, 0xc000_0101u32)?;
        a.rdmsr()?;
        a.mov(r14, rax)?; // GS base after SWAPGS
        a.swapgs()?;
        a.mov(ecx, 0xc000_0103u32)?;
        a.mov(eax, 77u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.rdtscp()?;
        a.mov(r15, rcx)?;
        // Descriptor tables and segments.
        a.mov(rax, DATA)?;
        a.sgdt(ptr(rax))?;
        a.lgdt(ptr(rax))?;
        a.mov(eax, 0x18u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(rbx, DATA + 0x200)?;
        a.invlpg(ptr(rbx))?;
        a.mov(qword_ptr(rbx), 0x77)?;
        a.wbinvd()?;
        a.clts()?;
        // IRETQ to the kernel itself.
        let mut back = a.create_label();
        a.mov(rax, rsp)?;
        a.push(0x18)?;
        a.push(rax)?;
        a.pushfq()?;
        a.push(0x10)?;
        a.lea(rax, ptr(back))?;
        a.push(rax)?;
        a.iretq()?;
        a.set_label(&mut back)?;
        a.mov(rsi, qword_ptr(rbx))?;
        a.mov(edx, PORT_BASE as u32)?;
        a.mov(al, 0x42)?;
        a.out(dx, al)?;
        a.in_(al, dx)?;
        a.movzx(rdi, al)?;
        a.hlt()
    })
}

#[test]
fn privileged_instructions_are_emulated() {
    let run = |engine| {
        let mut g = Guest::long_mode_with(engine, &privileged_guest(), opts(HolePolicy::Trap));
        let o = g.run();
        assert_halted(&o);
        g
    };
    let oracle = run(Engine::Emu);
    let g = run(Engine::Trap);
    let (a, b) = (g.regs(), oracle.regs());
    assert_eq!(
        (a.r8, a.r9, a.r10, a.r11, a.r12, a.r13, a.r14, a.r15, a.rsi, a.rdi, a.rip),
        (b.r8, b.r9, b.r10, b.r11, b.r12, b.r13, b.r14, b.r15, b.rsi, b.rdi, b.rip)
    );
    assert_eq!(b.r13, 0xffff_ffff_8765_4321);
    assert_eq!(b.r14, 0x5000);
    assert_eq!(b.r15, 77);
    assert_eq!(b.rsi, 0x77);
    for t in [
        "mov from cr0",
        "mov from cr3",
        "mov to cr3",
        "mov from cr4",
        "mov to cr2",
        "mov from cr2",
        "mov to dr",
        "mov from dr",
        "wrmsr",
        "rdmsr",
        "swapgs",
        "lgdt",
        "mov to sreg",
        "invlpg",
        "wbinvd",
        "clts",
        "iretq",
        "out",
        "in",
        "hlt",
    ] {
        assert!(counter(&g, &format!("traps/{t}")) >= 1, "{t} did not trap");
    }
    assert!(
        counter(&g, "shadow/flushes") >= 2,
        "CR3 write drops the shadow"
    );
    assert!(counter(&g, "shadow/invalidations") >= 1);
    let s = g.vm.vcpu.sregs().unwrap();
    assert_eq!(s.cs.selector, 0x10, "the guest sees its own CS");
    assert_eq!(s.ss.selector, 0x18);
}
