//! Engine `trap` (trap-and-emulate): its virtualization holes, the emulation of
//! each privileged instruction, shadow paging, and guests that try to escape.
//! `emu` (the guest at its real privilege) is the oracle for what a guest
//! kernel should see.

mod common;

use arch::rflags::IF;
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

/// The holes table, side by side: the 13 sensitive instructions that are
/// holes under `trap` run under `bt` with exactly the results they have at
/// CPL 0 (the `emu` oracle's): binary translation leaves no hole, because
/// the guest kernel's sensitive instructions are never run deprivileged
/// (they are carried out by the software CPU at the guest's own CPL).
#[test]
fn sensitive_instructions_have_no_holes_under_bt() {
    let (oracle, _) = run_sensitive(Engine::Emu, HolePolicy::Report);
    let (trap, _) = run_sensitive(Engine::Trap, HolePolicy::Report);
    let holes = HOLES
        .iter()
        .filter(|h| counter(&trap, &format!("holes/{h}")) >= 1)
        .count();
    assert_eq!(holes, 13, "trap reports every hole");
    let (g, o) = run_sensitive(Engine::Bt, HolePolicy::Report);
    assert_halted(&o);
    assert_eq!(seen(&g), seen(&oracle));
    assert_ne!(seen(&trap), seen(&oracle), "trap's holes show");
    assert_eq!(
        g.regs().rdx & 0xff00,
        oracle.regs().rdx & 0xff00,
        "LAR rights"
    );
    assert!(counter(&g, "guest_instructions") > 0);
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
        a.cli()?;
        a.sti()?;
        a.cli()?;
        a.mov(eax, 5u32)?;
        a.mov(cr8, rax)?;
        a.mov(rax, cr8)?;
        a.mov(rbp, rax)?;
        a.mov(rax, cr0)?;
        a.mov(cr0, rax)?;
        a.lmsw(ax)?;
        a.mov(rax, DATA + 0x40)?;
        a.sidt(ptr(rax))?;
        a.lidt(ptr(rax))?;
        // Far transfers to the kernel's code segment: RETF, JMP and CALL
        // through memory (m16:64), and POP of a segment register.
        let (mut after_retf, mut after_jmp, mut callee, mut after_call) = (
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
        );
        a.push(0x10)?;
        a.lea(rax, ptr(after_retf))?;
        a.push(rax)?;
        a.db(&[0x48, 0xcb])?; // retfq
        a.set_label(&mut after_retf)?;
        a.lea(rax, ptr(after_jmp))?;
        a.mov(qword_ptr(DATA + 0x60), rax)?;
        a.mov(word_ptr(DATA + 0x68), 0x10)?;
        // jmp far qword [DATA + 0x60]: REX.W FF /5 with an absolute disp32.
        a.db(&[0x48, 0xff, 0x2c, 0x25])?;
        a.dd(&[(DATA + 0x60) as u32])?;
        a.set_label(&mut after_jmp)?;
        a.lea(rax, ptr(callee))?;
        a.mov(qword_ptr(DATA + 0x70), rax)?;
        a.mov(word_ptr(DATA + 0x78), 0x10)?;
        // call far qword [DATA + 0x70]: REX.W FF /3.
        a.db(&[0x48, 0xff, 0x1c, 0x25])?;
        a.dd(&[(DATA + 0x70) as u32])?;
        a.jmp(after_call)?;
        a.set_label(&mut callee)?;
        a.mov(rax, qword_ptr(rsp + 8))?; // the CS the call pushed
        a.mov(qword_ptr(DATA + 0x80), rax)?;
        a.db(&[0x48, 0xcb])?; // retfq
        a.set_label(&mut after_call)?;
        a.push(0x18)?;
        a.pop(fs)?;
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
        (a.r8, a.r9, a.r10, a.r11, a.r12, a.r13, a.r14, a.r15, a.rsi, a.rdi, a.rbp, a.rip),
        (b.r8, b.r9, b.r10, b.r11, b.r12, b.r13, b.r14, b.r15, b.rsi, b.rdi, b.rbp, b.rip)
    );
    assert_eq!(b.rbp, 5, "CR8");
    let pushed_cs = |g: &Guest| g.vm.mem.read_obj::<u64>(GuestAddress(DATA + 0x80)).unwrap();
    assert_eq!(
        (pushed_cs(&g), pushed_cs(&oracle)),
        (0x10, 0x10),
        "CALL far pushes CS"
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
        "cli",
        "sti",
        "mov to cr8",
        "mov from cr8",
        "mov to cr0",
        "lmsw",
        "lidt",
        "retf",
        "jmp far",
        "call far",
        "pop sreg",
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

// ---- user mode, shadow paging and hostile guests ---------------------------

const GDT2: u64 = 0x20_0000;
const TSS2: u64 = 0x20_1000;
const PML4: u64 = 0x21_0000;
const USER_CODE: u64 = 0x12_0000;
const USER_STACK: u64 = 0x13_0000;
const SECRET: u64 = 0x14_0000;
const KSTACK: u64 = 0x28_0000;
const PF_HANDLER: u64 = CODE + 0x800;
const GP_HANDLER: u64 = CODE + 0x900;
/// A linear address the kernel maps through a hostile PDE.
const HOSTILE: u64 = 0x120_0000;

/// A kernel with user segments, a TSS and its own page tables: 4 KiB pages
/// for the first 2 MiB (user code and stack pages have U; SECRET does not),
/// 2 MiB supervisor pages up to 16 MiB.
fn user_world(g: &mut Guest) {
    let m = &g.vm.mem;
    let gdt: [u64; 8] = [
        0,
        0,
        0x00af_9a00_0000_ffff, // 0x10 kernel code
        0x00cf_9200_0000_ffff, // 0x18 kernel data
        0x00cf_f200_0000_ffff, // 0x20 user data
        0x00af_fa00_0000_ffff, // 0x28 user code
        0x0000_8900_0000_0088 | ((TSS2 & 0xff_ffff) << 16) | ((TSS2 >> 24 & 0xff) << 56),
        0,
    ];
    for (i, d) in gdt.iter().enumerate() {
        m.write_obj(*d, GuestAddress(GDT2 + 8 * i as u64)).unwrap();
    }
    let mut dtr = [0u8; 10];
    dtr[..2].copy_from_slice(&(8u16 * 8 - 1).to_le_bytes());
    dtr[2..].copy_from_slice(&GDT2.to_le_bytes());
    m.write_slice(&dtr, GuestAddress(DATA + 0x300)).unwrap();
    m.write_obj(KSTACK, GuestAddress(TSS2 + 4)).unwrap();
    // I/O permission bitmap at 0x68 for ports 0..0x100: only port 0x80 allowed.
    m.write_obj(0x68u16, GuestAddress(TSS2 + 0x66)).unwrap();
    let mut bitmap = [0xffu8; 33];
    bitmap[0x80 / 8] &= !1;
    m.write_slice(&bitmap, GuestAddress(TSS2 + 0x68)).unwrap();
    let (pdpt, pd, pt) = (PML4 + 0x1000, PML4 + 0x2000, PML4 + 0x3000);
    m.write_obj(pdpt | 7, GuestAddress(PML4)).unwrap();
    m.write_obj(pd | 7, GuestAddress(pdpt)).unwrap();
    m.write_obj(pt | 7, GuestAddress(pd)).unwrap();
    for i in 1..8u64 {
        m.write_obj((i << 21) | 0x83, GuestAddress(pd + 8 * i))
            .unwrap();
    }
    for i in 0..512u64 {
        let a = i << 12;
        let user = a == USER_CODE || a == USER_STACK;
        m.write_obj(a | 3 | if user { 4 } else { 0 }, GuestAddress(pt + 8 * i))
            .unwrap();
    }
}

/// Runs `user` at CPL 3 under the kernel of [`user_world`]. The #PF handler
/// leaves vector 14, the error code, CR2, and the faulting RIP and CS in
/// RBX, R12, R13, R14, R15; the #GP handler the same (no CR2).
fn run_user(
    engine: Engine,
    kernel_extra: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    user: impl Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Guest {
    let kernel = asm64(|a| {
        a.mov(rax, DATA + 0x300)?;
        a.lgdt(ptr(rax))?;
        a.mov(eax, 0x30u32)?;
        a.ltr(ax)?;
        a.mov(rax, PML4)?;
        a.mov(cr3, rax)?;
        a.mov(rsp, KSTACK)?;
        kernel_extra(a)?;
        a.push(0x23)?;
        a.push((USER_STACK + 0x1000) as i32)?;
        a.push(0x202)?;
        a.push(0x2b)?;
        a.push(USER_CODE as i32)?;
        a.iretq()
    });
    let mut g = Guest::long_mode(engine, &kernel);
    user_world(&mut g);
    let handler = |v: u8, ip: u64| {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(ebx, v as u32).unwrap();
        a.pop(r12).unwrap();
        if v == 14 {
            a.mov(r13, cr2).unwrap();
        }
        a.mov(r14, qword_ptr(rsp)).unwrap();
        a.mov(r15, qword_ptr(rsp + 8)).unwrap();
        a.hlt().unwrap();
        a.assemble(ip).unwrap()
    };
    g.vm.mem
        .write_slice(&handler(14, PF_HANDLER), GuestAddress(PF_HANDLER))
        .unwrap();
    g.vm.mem
        .write_slice(&handler(13, GP_HANDLER), GuestAddress(GP_HANDLER))
        .unwrap();
    set_gate(&mut g, 14, PF_HANDLER);
    set_gate(&mut g, 13, GP_HANDLER);
    let mut u = CodeAssembler::new(64).unwrap();
    user(&mut u).unwrap();
    u.hlt().unwrap();
    g.vm.mem
        .write_slice(&u.assemble(USER_CODE).unwrap(), GuestAddress(USER_CODE))
        .unwrap();
    let o = g.run();
    assert_halted(&o);
    g
}

fn fault_seen(g: &Guest) -> (u64, u64, u64, u64, u64) {
    let r = g.regs();
    (r.rbx, r.r12, r.r13, r.r14, r.r15)
}

/// Guest user code cannot touch guest kernel pages, or run privileged
/// instructions: the faults reach the guest kernel with the hardware's
/// error codes, under `trap` exactly as on `emu`. Port I/O follows the guest's
/// TSS I/O bitmap.
#[test]
fn user_cannot_touch_kernel() {
    type Prog = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let cases: [(Prog, (u64, u64, u64)); 6] = [
        (|a| a.mov(rax, qword_ptr(SECRET)), (14, 5, 0)),
        (|a| a.mov(qword_ptr(SECRET), rax), (14, 7, 0)),
        (|a| a.hlt(), (13, 0, 0)),
        (|a| a.cli(), (13, 0, 0)),
        (|a| a.in_(al, 0x81), (13, 0, 0)),
        // Allowed by the bitmap: the fault is the HLT after it.
        (|a| a.in_(al, 0x80), (13, 0, 2)),
    ];
    for (user, (v, code, at)) in cases {
        let oracle = run_user(Engine::Emu, |_| Ok(()), user);
        let g = run_user(Engine::Trap, |_| Ok(()), user);
        assert_eq!(fault_seen(&g), fault_seen(&oracle));
        let (gv, gcode, gcr2, grip, gcs) = fault_seen(&g);
        assert_eq!((gv, gcode, grip, gcs), (v, code, USER_CODE + at, 0x2b));
        if v == 14 {
            assert_eq!(gcr2, SECRET);
        }
        assert!(counter(&g, "shadow/fills") > 0);
    }
}

/// A guest kernel that points its page tables at memory beyond its
/// physical-address width (where the engine keeps the shadow tables) gets a
/// reserved-bit page fault, as hardware with that width gives; a CR3 there is
/// refused with #GP. Nothing outside guest RAM is reached.
#[test]
fn hostile_page_tables_cannot_reach_vmm_memory() {
    let pd = PML4 + 0x2000;
    let read_through_hostile_pde = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        // PD entry 9 (linear 18 MiB): a 2 MiB page at physical 2^47.
        a.mov(rax, (1u64 << 47) | 0x83)?;
        a.mov(rbx, pd + 8 * 9)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(rax, qword_ptr(HOSTILE))?;
        a.hlt()
    };
    let g = run_user(Engine::Trap, read_through_hostile_pde, |_| Ok(()));
    let (vec, err, addr, _, sel) = fault_seen(&g);
    assert_eq!(
        (vec, err, addr, sel),
        (14, 0x9, HOSTILE, 0x10),
        "#PF: present, reserved bit"
    );
    assert_eq!(g.mmio.lock().unwrap().reads.len(), 0);

    let cr3_beyond = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(rax, 1u64 << 47)?;
        a.mov(cr3, rax)?;
        a.hlt()
    };
    let g = run_user(Engine::Trap, cr3_beyond, |_| Ok(()));
    assert_eq!(fault_seen(&g).0, 13, "MOV to CR3 beyond the address width");
    assert_eq!(fault_seen(&g).1, 0);
}

/// CR0.WP=0 lets the guest kernel write its read-only pages (as hardware
/// does), but that never opens them to user code.
#[test]
fn write_protect_off_stays_supervisor_only() {
    let kernel = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        // Make the user stack page read-only, clear WP, write it from the kernel.
        a.mov(rbx, PML4 + 0x3000 + 8 * (USER_STACK >> 12))?;
        a.mov(rax, USER_STACK | 5)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.invlpg(qword_ptr(USER_STACK))?;
        a.mov(rax, cr0)?;
        a.btr(rax, 16)?;
        a.mov(cr0, rax)?;
        a.mov(qword_ptr(USER_STACK + 0x800), 0x55)?;
        a.mov(rbp, qword_ptr(USER_STACK + 0x800))?;
        Ok(())
    };
    // The user pushes onto its read-only stack: #PF, present + write + user.
    let user = |a: &mut CodeAssembler| a.push(rax);
    let oracle = run_user(Engine::Emu, kernel, user);
    let g = run_user(Engine::Trap, kernel, user);
    assert_eq!(g.regs().rbp, 0x55, "kernel write with WP=0");
    assert_eq!(fault_seen(&g), fault_seen(&oracle));
    assert_eq!(fault_seen(&g).1, 7);
}

/// A guest started in real mode (CS:IP 0000:7000, the IVT at 0) that reads
/// the machine status word and the IDTR, then halts: SMSW in R8W, SIDT's
/// image at 0x6000.
fn run_real_mode_smsw_sidt(engine: Engine, holes: HolePolicy) -> (Guest, Outcome) {
    const START: u64 = 0x7000;
    let mut a = CodeAssembler::new(16).unwrap();
    a.smsw(ax).unwrap();
    a.mov(bx, ax).unwrap();
    a.sidt(ptr(0x6000u64)).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(START).unwrap();
    let mut vm = visor::Vm::new(engine, 16 << 20, opts(holes)).unwrap();
    vm.mem.write_slice(&code, GuestAddress(START)).unwrap();
    let real = |selector: u16, type_: u8| vcpu::Segment {
        selector,
        base: (selector as u64) << 4,
        limit: 0xffff,
        type_,
        present: true,
        s: true,
        ..Default::default()
    };
    let sregs = vcpu::SRegs {
        cs: real(0, 0xb),
        ds: real(0, 3),
        es: real(0, 3),
        fs: real(0, 3),
        gs: real(0, 3),
        ss: real(0, 3),
        tr: vcpu::Segment {
            type_: 0xb,
            present: true,
            limit: 0xffff,
            ..Default::default()
        },
        ldt: vcpu::Segment {
            type_: 2,
            present: true,
            limit: 0xffff,
            ..Default::default()
        },
        idt: vcpu::DescriptorTable {
            base: 0,
            limit: 0x3ff,
        },
        gdt: vcpu::DescriptorTable {
            base: 0,
            limit: 0xffff,
        },
        cr0: arch::cr0::ET,
        ..Default::default()
    };
    let regs = vcpu::Regs {
        rip: START,
        rsp: 0x6800,
        rflags: 2,
        ..Default::default()
    };
    vm.set_cpu_state(&regs, &sregs).unwrap();
    let mut g = Guest::finish(vm, engine);
    let o = g.run();
    (g, o)
}

/// A real-mode guest runs in virtual-8086 mode, where SMSW and SIDT do not
/// fault: reported (the default), they are holes and show the real CPU's
/// CR0 (PE set) and the VMM's empty IDT; with `--trap-sensitive` they trap
/// and the guest sees what `emu` shows, its own.
#[test]
fn real_mode_smsw_and_sidt_are_holes_under_trap() {
    let seen = |g: &Guest| {
        let idt = g.vm.mem.read_obj::<[u8; 6]>(GuestAddress(0x6000)).unwrap();
        (g.regs().rbx & 0xffff, idt)
    };
    let ivt = [0xff, 0x03, 0, 0, 0, 0];
    let (oracle, o) = run_real_mode_smsw_sidt(Engine::Emu, HolePolicy::Report);
    assert_halted(&o);
    assert_eq!(seen(&oracle).0 & 1, 0, "emu: PE clear");
    assert_eq!(seen(&oracle).1, ivt, "emu: the IVT");
    let (g, o) = run_real_mode_smsw_sidt(Engine::Trap, HolePolicy::Report);
    assert_halted(&o);
    assert_eq!(seen(&g).0 & 1, 1, "SMSW shows the real CPU's PE");
    assert_eq!(seen(&g).1, [0; 6], "SIDT shows the VMM's IDT");
    assert_eq!(counter(&g, "holes/smsw"), 1);
    assert_eq!(counter(&g, "holes/sidt"), 1);
    let (g, o) = run_real_mode_smsw_sidt(Engine::Trap, HolePolicy::Trap);
    assert_halted(&o);
    assert_eq!(seen(&g), seen(&oracle), "emulated, as on emu");
    assert_eq!(counter(&g, "traps/smsw"), 1);
    assert_eq!(counter(&g, "traps/sidt"), 1);
}

/// CR4.TSD set by the guest kernel: RDTSC in user mode raises #GP(0) at the
/// RDTSC, as on `emu` (the real CPU runs with the guest's TSD), and the
/// kernel's own RDTSC still reads the counter (it faults at CPL 1 and runs
/// again with the kernel's privilege: one trap).
#[test]
fn rdtsc_in_user_mode_with_cr4_tsd_faults() {
    let kernel = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(rax, cr4)?;
        a.or(rax, 1 << 2)?;
        a.mov(cr4, rax)?;
        a.rdtsc()?;
        a.mov(r9, rax)?;
        a.or(r9, rdx)
    };
    let user = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.nop()?;
        a.rdtsc()
    };
    let oracle = run_user(Engine::Emu, kernel, user);
    let g = run_user(Engine::Trap, kernel, user);
    assert_eq!(fault_seen(&g), fault_seen(&oracle));
    let (v, code, _, rip, sel) = fault_seen(&g);
    assert_eq!((v, code, rip, sel), (13, 0, USER_CODE + 1, 0x2b));
    assert_ne!(g.regs().r9, 0, "the kernel read the counter");
    assert_eq!(counter(&g, "traps/rdtsc"), 1);
}

/// INT n from user mode through a gate of DPL 0 is #GP(n * 8 + 2) at the
/// INT instruction, as on `emu`: a fault of the INT itself, never a double
/// fault (n = 0x0c and 0x00 are exception vectors, but INT n is not an
/// exception).
#[test]
fn int_n_through_a_kernel_gate_faults_at_the_int() {
    type Prog = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let cases: [(Prog, u64); 3] = [
        (|a| a.int(0x0c), 0x0c),
        (|a| a.int(0x00), 0x00),
        (|a| a.int(0x0d), 0x0d),
    ];
    for (user, n) in cases {
        let oracle = run_user(Engine::Emu, |_| Ok(()), user);
        let g = run_user(Engine::Trap, |_| Ok(()), user);
        assert_eq!(fault_seen(&g), fault_seen(&oracle), "INT {n:#x}");
        let (v, code, _, rip, sel) = fault_seen(&g);
        assert_eq!((v, code, rip, sel), (13, n * 8 + 2, USER_CODE, 0x2b));
    }
}
