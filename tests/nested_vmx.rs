//! Nested VMX: a guest that is itself a minimal hypervisor, written here in
//! x86 code with iced-x86. On the `emu` engine (visor's software CPU with
//! VMX) it enables VMX, enters VMX operation, sets up a VMCS from the
//! capability MSRs and EPT tables, launches a nested guest that executes
//! CPUID, an OUT, an exception in the exception bitmap (UD2), a load from a
//! guest-physical address EPT does not map, and HLT, handles each exit by
//! its reason, resumes, and finally leaves VMX operation and reports success.

use iced_x86::code_asm::*;
use vcpu::Regs;
use visor::{Engine, Outcome, Stats, Vm, VmOptions};
use vm_memory::{Bytes, GuestAddress};

/// The hypervisor (L1) and its exit handler.
const L1: u64 = 0x10_0000;
const L1_EXIT: u64 = 0x10_8000;
/// The nested guest (L2).
const L2: u64 = 0x12_0000;
const VMXON_REGION: u64 = 0x13_0000;
const VMCS_REGION: u64 = 0x13_1000;
/// L1's scratch data: the two region pointers, SGDT/SIDT results.
const DATA: u64 = 0x13_2000;
const L1_STACK: u64 = 0x8_0000;
const L2_STACK: u64 = 0x14_0000;
/// L1's EPT tables: PML4, PDPT, PD (guest-physical 0..16 MiB, 2 MiB pages).
const EPT: u64 = 0x13_4000;
/// A guest-physical address EPT does not map.
const UNMAPPED: u64 = 0x100_0000;
/// What L1 reports in R15.
const SUCCESS: u64 = 0x600d;
const FAILURE: u64 = 0xbad;
/// The port L1 relays L2's output to.
const RELAY_PORT: u8 = 0x80;

// VMCS field encodings and exit reasons (Intel SDM vol. 3C, appendix B and C).
const PIN_BASED: u32 = 0x4000;
const PROC_BASED: u32 = 0x4002;
const EXCEPTION_BITMAP: u32 = 0x4004;
const EXIT_CONTROLS: u32 = 0x400c;
const ENTRY_CONTROLS: u32 = 0x4012;
const EXIT_REASON: u32 = 0x4402;
const EXIT_INTR_INFO: u32 = 0x4404;
const EXIT_INSTRUCTION_LEN: u32 = 0x440c;
const EXIT_QUALIFICATION: u32 = 0x6400;
const GUEST_RIP: u32 = 0x681e;

const REASON_EXCEPTION: u64 = 0;
const REASON_CPUID: u64 = 10;
const REASON_HLT: u64 = 12;
const REASON_IO: u64 = 30;
const REASON_EPT_VIOLATION: u64 = 48;
const GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;

type A<'a> = &'a mut CodeAssembler;
type Res = Result<(), IcedError>;

/// VMWRITE of `src` to `field`; a failure jumps to `fail`.
fn vmwrite(a: A, field: u32, src: AsmRegister64, fail: CodeLabel) -> Res {
    a.mov(rdx, field as u64)?;
    a.vmwrite(rdx, src)?;
    a.jbe(fail)
}

/// VMWRITE of the constant `v` to `field`.
fn vmwrite_imm(a: A, field: u32, v: u64, fail: CodeLabel) -> Res {
    a.mov(rax, v)?;
    vmwrite(a, field, rax, fail)
}

/// A control field: the `want` bits adjusted to the allowed-0 and
/// allowed-1 settings of capability MSR `msr`.
fn control(a: A, field: u32, msr: u32, want: u32, fail: CodeLabel) -> Res {
    a.mov(ecx, msr)?;
    a.rdmsr()?;
    a.or(eax, want as i32)?;
    a.and(eax, edx)?;
    vmwrite(a, field, rax, fail)
}

/// Ends with R15 = FAILURE and HLT.
fn fail_here(a: A, fail: &mut CodeLabel) -> Res {
    a.set_label(fail)?;
    a.mov(r15, FAILURE)?;
    a.hlt()
}

/// L1's entry: VMX on, the VMCS, VMLAUNCH.
/// L1. With `true_ctls` it reads its controls' allowed settings from the
/// TRUE capability MSRs (after checking IA32_VMX_BASIC bit 55), which let
/// it leave CR3-load and CR3-store exiting clear.
fn hypervisor(a: A, true_ctls: bool) -> Res {
    let mut fail = a.create_label();
    let (pin_msr, proc_msr, exit_msr, entry_msr) = if true_ctls {
        (0x48d, 0x48e, 0x48f, 0x490)
    } else {
        (0x481, 0x482, 0x483, 0x484)
    };
    // CR4.VMXE; IA32_FEATURE_CONTROL: lock with VMXON outside SMX.
    a.mov(rax, cr4)?;
    a.or(rax, 0x2000)?;
    a.mov(cr4, rax)?;
    a.mov(ecx, 0x3au32)?;
    a.rdmsr()?;
    a.or(eax, 5)?;
    a.wrmsr()?;
    // The revision identifier into both regions.
    a.mov(ecx, 0x480u32)?;
    a.rdmsr()?;
    if true_ctls {
        a.bt(edx, 55 - 32)?;
        a.jae(fail)?;
    }
    a.mov(rbx, DATA)?;
    a.mov(rcx, VMXON_REGION)?;
    a.mov(dword_ptr(rcx), eax)?;
    a.mov(qword_ptr(rbx), rcx)?;
    a.mov(rcx, VMCS_REGION)?;
    a.mov(dword_ptr(rcx), eax)?;
    a.mov(qword_ptr(rbx + 8), rcx)?;
    a.vmxon(qword_ptr(rbx))?;
    a.jbe(fail)?;
    a.vmclear(qword_ptr(rbx + 8))?;
    a.jbe(fail)?;
    a.vmptrld(qword_ptr(rbx + 8))?;
    a.jbe(fail)?;
    // Controls: HLT and unconditional I/O exiting; a 64-bit host and guest;
    // #UD in the exception bitmap.
    control(a, PIN_BASED, pin_msr, 0, fail)?;
    control(
        a,
        PROC_BASED,
        proc_msr,
        (1 << 7) | (1 << 24) | (1 << 31),
        fail,
    )?;
    // EPT (identity for guest-physical 0..16 MiB) and VPID 1.
    control(a, 0x401e, 0x48b, (1 << 1) | (1 << 5), fail)?;
    a.mov(rdi, EPT)?;
    a.mov(rax, (EPT + 0x1000) | 7)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rax, (EPT + 0x2000) | 7)?;
    a.mov(qword_ptr(rdi + 0x1000), rax)?;
    a.mov(eax, 0xb7u32)?; // RWX, write-back, 2 MiB
    a.xor(ecx, ecx)?;
    let mut pd = a.create_label();
    a.set_label(&mut pd)?;
    a.mov(qword_ptr(rdi + rcx * 8 + 0x2000), rax)?;
    a.add(rax, 0x20_0000)?;
    a.inc(ecx)?;
    a.cmp(ecx, 8)?;
    a.jne(pd)?;
    vmwrite_imm(a, 0x201a, EPT | 6 | (3 << 3), fail)?; // EPT pointer
    vmwrite_imm(a, 0x0000, 1, fail)?; // VPID
    control(a, EXIT_CONTROLS, exit_msr, 1 << 9, fail)?;
    control(a, ENTRY_CONTROLS, entry_msr, 1 << 9, fail)?;
    vmwrite_imm(a, EXCEPTION_BITMAP, 1 << 6, fail)?;
    // Host and guest control registers: L1's own.
    for (reg, host, guest) in [
        (cr0, 0x6c00, 0x6800),
        (cr3, 0x6c02, 0x6802),
        (cr4, 0x6c04, 0x6804),
    ] {
        a.mov(rsi, reg)?;
        vmwrite(a, host, rsi, fail)?;
        vmwrite(a, guest, rsi, fail)?;
    }
    // Descriptor tables: L1's own.
    a.sgdt(ptr(rbx + 16))?;
    a.sidt(ptr(rbx + 32))?;
    a.mov(rsi, qword_ptr(rbx + 18))?;
    vmwrite(a, 0x6c0c, rsi, fail)?; // host GDTR base
    vmwrite(a, 0x6816, rsi, fail)?; // guest GDTR base
    a.mov(rsi, qword_ptr(rbx + 34))?;
    vmwrite(a, 0x6c0e, rsi, fail)?; // host IDTR base
    vmwrite(a, 0x6818, rsi, fail)?; // guest IDTR base
    a.movzx(esi, word_ptr(rbx + 16))?;
    vmwrite(a, 0x4810, rsi, fail)?; // guest GDTR limit
    a.movzx(esi, word_ptr(rbx + 32))?;
    vmwrite(a, 0x4812, rsi, fail)?; // guest IDTR limit
                                    // The boot GDT: code 0x10, data 0x18, TSS 0x20 at 0.
    let fields: [(u32, u64); 30] = [
        (0x0c00, 0x18), // host ES..GS, TR selectors
        (0x0c02, 0x10),
        (0x0c04, 0x18),
        (0x0c06, 0x18),
        (0x0c08, 0x18),
        (0x0c0a, 0x18),
        (0x0c0c, 0x20),
        (0x6c14, L1_STACK),
        (0x6c16, L1_EXIT),
        (0x0800, 0x18), // guest ES..GS, TR selectors
        (0x0802, 0x10),
        (0x0804, 0x18),
        (0x0806, 0x18),
        (0x0808, 0x18),
        (0x080a, 0x18),
        (0x080e, 0x20),
        (0x4814, 0xc093), // guest access rights ES..GS, LDTR, TR
        (0x4816, 0xa09b),
        (0x4818, 0xc093),
        (0x481a, 0xc093),
        (0x481c, 0xc093),
        (0x481e, 0xc093),
        (0x4820, 1 << 16),
        (0x4822, 0x8b),
        (0x480e, 0x67), // guest TR limit
        (0x681c, L2_STACK),
        (GUEST_RIP, L2),
        (0x6820, 2),        // guest RFLAGS
        (0x2800, u64::MAX), // VMCS link pointer
        (0x681a, 0x400),    // guest DR7
    ];
    for (f, v) in fields {
        vmwrite_imm(a, f, v, fail)?;
    }
    for k in 0..6 {
        vmwrite_imm(a, 0x4800 + 2 * k, 0xffff_ffff, fail)?; // limits
    }
    a.xor(r13d, r13d)?;
    a.vmlaunch()?;
    fail_here(a, &mut fail)
}

/// Moves L2's RIP past the instruction that exited (`len` in RSI).
fn skip_rsi(a: A, fail: CodeLabel) -> Res {
    a.mov(rdx, GUEST_RIP as u64)?;
    a.vmread(r9, rdx)?;
    a.add(r9, rsi)?;
    a.vmwrite(rdx, r9)?;
    a.jbe(fail)
}

/// The handling of exit `reason` (in ECX): `body`, then L2's RIP past the
/// instruction and VMRESUME.
fn on_reason(
    a: A,
    reason: u64,
    labels: (CodeLabel, CodeLabel),
    body: impl FnOnce(A) -> Res,
) -> Res {
    let (resume, fail) = labels;
    let mut next = a.create_label();
    a.cmp(ecx, reason as i32)?;
    a.jne(next)?;
    body(a)?;
    skip_rsi(a, fail)?;
    a.jmp(resume)?;
    a.set_label(&mut next)
}

/// L1's exit handler: R13 collects the exit reasons seen (a bit each).
fn exit_handler(a: A) -> Res {
    let mut fail = a.create_label();
    let mut resume = a.create_label();
    let labels = (resume, fail);
    a.mov(rdx, EXIT_REASON as u64)?;
    a.vmread(rcx, rdx)?;
    a.jbe(fail)?;
    a.bts(r13, rcx)?;
    a.mov(rdx, EXIT_INSTRUCTION_LEN as u64)?;
    a.vmread(rsi, rdx)?;
    // CPUID: L1's answer in EAX.
    on_reason(a, REASON_CPUID, labels, |a| a.mov(eax, 0x1234_abcdu32))?;
    // OUT: the port from the qualification; the byte relayed to RELAY_PORT.
    on_reason(a, REASON_IO, labels, |a| {
        a.mov(rdx, EXIT_QUALIFICATION as u64)?;
        a.vmread(r14, rdx)?;
        a.shr(r14, 16)?;
        a.out(RELAY_PORT as u32, al)
    })?;
    // #UD: UD2 is skipped (2 bytes).
    on_reason(a, REASON_EXCEPTION, labels, |a| {
        a.mov(rdx, EXIT_INTR_INFO as u64)?;
        a.vmread(r11, rdx)?;
        a.mov(esi, 2u32)
    })?;
    // EPT violation: the guest-physical address in R10; the 3-byte load
    // is skipped.
    on_reason(a, REASON_EPT_VIOLATION, labels, |a| {
        a.mov(rdx, GUEST_PHYSICAL_ADDRESS as u64)?;
        a.vmread(r10, rdx)?;
        a.mov(esi, 3u32)
    })?;
    // HLT: the nested guest is done; leave VMX operation.
    a.cmp(ecx, REASON_HLT as i32)?;
    a.jne(fail)?;
    a.vmxoff()?;
    a.jbe(fail)?;
    a.mov(r15, SUCCESS)?;
    a.hlt()?;
    a.set_label(&mut resume)?;
    a.vmresume()?;
    fail_here(a, &mut fail)
}

/// The nested guest; with `move_cr3` it first reads and writes back CR3, which
/// exits to L1 only if L1 asked for CR3 exiting (L1's handler fails on a
/// CR-access exit).
fn nested_guest(a: A, move_cr3: bool) -> Res {
    if move_cr3 {
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)?;
    }
    a.xor(eax, eax)?;
    a.cpuid()?;
    a.mov(ebx, eax)?;
    a.mov(al, 0x42)?;
    a.out(0x81, al)?;
    a.ud2()?;
    a.mov(rdi, UNMAPPED)?;
    a.mov(rax, qword_ptr(rdi))?;
    a.hlt()
}

fn assemble(at: u64, f: impl FnOnce(A) -> Res) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(at).unwrap()
}

fn run_nested(engine: Engine, true_ctls: bool) -> (Outcome, Stats) {
    let mut vm = Vm::new(engine, 16 << 20, VmOptions::default()).expect("create vm");
    let sregs = machine::boot::long_mode(&vm.mem).unwrap();
    for (at, code) in [
        (L1, assemble(L1, |a| hypervisor(a, true_ctls))),
        (L1_EXIT, assemble(L1_EXIT, exit_handler)),
        (L2, assemble(L2, |a| nested_guest(a, true_ctls))),
    ] {
        vm.mem.write_slice(&code, GuestAddress(at)).unwrap();
    }
    let regs = Regs {
        rip: L1,
        rsp: L1_STACK,
        rflags: 2,
        ..Default::default()
    };
    vm.set_cpu_state(&regs, &sregs).unwrap();
    let mut stats = Stats::new(engine.name());
    let out = vm.run(&mut stats).expect("engine error");
    (out, stats)
}

#[test]
fn nested_hypervisor_on_emu() {
    check_nested(false);
}

/// L1 clears CR3-load and CR3-store exiting through the TRUE controls: L2's
/// MOV from and to CR3 run without an exit (a CR-access exit would end L1
/// with FAILURE), the rest as before.
#[test]
fn nested_hypervisor_with_true_controls() {
    check_nested(true);
}

fn check_nested(true_ctls: bool) {
    let (out, stats) = run_nested(Engine::Emu, true_ctls);
    let Outcome::Halted { regs } = out else {
        panic!("expected HLT, got {out:?}");
    };
    assert_eq!(regs.r15, SUCCESS, "L1 reports success: {regs}");
    let seen = (1 << REASON_CPUID)
        | (1 << REASON_IO)
        | (1 << REASON_EXCEPTION)
        | (1 << REASON_EPT_VIOLATION)
        | (1 << REASON_HLT);
    assert_eq!(regs.r13, seen, "exit reasons L1 handled");
    assert_eq!(regs.rbx, 0x1234_abcd, "L2 got L1's CPUID answer");
    assert_eq!(regs.r14, 0x81, "the port of L2's OUT");
    assert_eq!(regs.r11, 0x8000_0306, "#UD as a hardware exception");
    assert_eq!(
        regs.r10, UNMAPPED,
        "the EPT violation's guest-physical address"
    );
    let io_out = stats.exits.get("io_out").map_or(0, |e| e.count);
    assert_eq!(io_out, 1, "only L1's relay reaches the VMM");
}
