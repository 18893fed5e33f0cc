//! Unit tests of VMX: the VMX instructions' success and failure paths with
//! their error numbers, VMREAD/VMWRITE of each width, the launch-state rules,
//! the VM-entry checks, each VM exit, and event injection.

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

use super::fields::*;
use super::{ctl, error, VmFail, NO_VMCS, REVISION};
use crate::tests::{asm, OneShot, CODE, GDT, HANDLER, IDT, STACK, T, TSS};
use crate::{Cpu, CpuExit};
use arch::msr;
use arch::{cr4, rflags};

const VMXON: u64 = 0x30_0000;
const VMCS: u64 = 0x30_1000;
const VMCS2: u64 = 0x30_2000;
const BAD_REV: u64 = 0x30_3000;
const IO_A: u64 = 0x30_4000;
const IO_B: u64 = 0x30_5000;
const MSR_BM: u64 = 0x30_6000;
const MSR_LIST: u64 = 0x30_7000;
const GUEST: u64 = 0x40_0000;
const GUEST_HANDLER: u64 = 0x41_0000;
const GUEST_STACK: u64 = 0x48_0000;
const EXIT: u64 = 0x50_0000;
const RESUME: u64 = 0x50_0100;
/// Pointers the root code's memory operands use.
const PTRS: u64 = 0x5_1000;
/// What the root code records: (RFLAGS, VM-instruction error) pairs.
const RESULTS: u64 = 0x5_0000;

type Asm<'a> = &'a mut CodeAssembler;
type Code = fn(Asm) -> Result<(), IcedError>;

/// A CPU in 64-bit mode with CR4.VMXE set, VMX enabled (and locked) in
/// IA32_FEATURE_CONTROL, VMXON/VMCS regions with the revision identifier,
/// and `code` at CODE.
fn root(code: impl FnOnce(Asm) -> Result<(), IcedError>) -> T {
    let mut t = T::long(&asm(64, CODE, code));
    t.cpu.cr4 |= cr4::VMXE;
    t.cpu.vmx.feature_control = 5;
    for r in [VMXON, VMCS, VMCS2] {
        t.mem.write_obj(REVISION, GuestAddress(r)).unwrap();
    }
    t.mem
        .write_obj(0x1234_5678u32, GuestAddress(BAD_REV))
        .unwrap();
    t
}

fn w(c: &mut Cpu, f: u32, v: u64) {
    c.vmwrite(f as u64, v).unwrap();
}

fn r(t: &T, f: u32) -> u64 {
    t.cpu.vmread(f as u64).unwrap()
}

/// `root` in VMX operation with a current VMCS holding a valid host state
/// (resuming at EXIT, `hlt`), a 64-bit guest at GUEST running `guest` with
/// the same segments and page tables, and the default controls. The root
/// code is `vmlaunch; hlt` at CODE and `vmresume; hlt` at RESUME.
fn ready(guest: impl FnOnce(Asm) -> Result<(), IcedError>) -> T {
    let mut t = root(|a| {
        a.vmlaunch()?;
        a.hlt()
    });
    t.code_at(GUEST, guest);
    t.code_at(EXIT, |a| a.hlt());
    t.code_at(RESUME, |a| {
        a.vmresume()?;
        a.hlt()
    });
    let c = &mut t.cpu;
    c.vmxon(VMXON).unwrap();
    c.vmclear(VMCS).unwrap();
    c.vmptrld(VMCS).unwrap();
    let (cr0_, cr3_, cr4_) = (c.cr0, c.cr3, c.cr4);
    for (f, v) in [
        (HOST_CR0, cr0_),
        (HOST_CR3, cr3_),
        (HOST_CR4, cr4_),
        (HOST_CS_SELECTOR, 0x10),
        (HOST_SS_SELECTOR, 0x18),
        (HOST_DS_SELECTOR, 0x18),
        (HOST_ES_SELECTOR, 0x18),
        (HOST_FS_SELECTOR, 0x18),
        (HOST_GS_SELECTOR, 0x18),
        (HOST_TR_SELECTOR, 0x38),
        (HOST_TR_BASE, TSS),
        (HOST_GDTR_BASE, GDT),
        (HOST_IDTR_BASE, IDT),
        (HOST_RSP, STACK),
        (HOST_RIP, EXIT),
        (GUEST_CR0, cr0_),
        (GUEST_CR3, cr3_),
        (GUEST_CR4, cr4_),
        (GUEST_DR7, 0x400),
        (GUEST_TR_SELECTOR, 0x38),
        (GUEST_TR_BASE, TSS),
        (GUEST_TR_LIMIT, 0x67),
        (GUEST_TR_AR_BYTES, 0x8b),
        (GUEST_LDTR_AR_BYTES, 1 << 16),
        (GUEST_GDTR_BASE, GDT),
        (GUEST_GDTR_LIMIT, 0x4f),
        (GUEST_IDTR_BASE, IDT),
        (GUEST_IDTR_LIMIT, 0xfff),
        (GUEST_RSP, GUEST_STACK),
        (GUEST_RIP, GUEST),
        (GUEST_RFLAGS, 2),
        (VMCS_LINK_POINTER, u64::MAX),
        (PIN_BASED_VM_EXEC_CONTROL, ctl::PIN_DEFAULT1 as u64),
        (CPU_BASED_VM_EXEC_CONTROL, ctl::PROC_DEFAULT1 as u64),
        (
            VM_EXIT_CONTROLS,
            (ctl::EXIT_DEFAULT1 | ctl::HOST_ADDR_SPACE_SIZE) as u64,
        ),
        (
            VM_ENTRY_CONTROLS,
            (ctl::ENTRY_DEFAULT1 | ctl::IA32E_MODE_GUEST) as u64,
        ),
    ] {
        w(c, f, v);
    }
    for k in 0..6u32 {
        let code = k == 1;
        w(c, GUEST_ES_SELECTOR + 2 * k, if code { 0x10 } else { 0x18 });
        w(c, GUEST_ES_LIMIT + 2 * k, 0xffff_ffff);
        w(
            c,
            GUEST_ES_AR_BYTES + 2 * k,
            if code { 0xa09b } else { 0xc093 },
        );
    }
    t
}

/// Runs until the CPU halts, which must be the host at EXIT: the basic exit
/// reason (with bit 31 for entry failures).
fn go(t: &mut T) -> u32 {
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.rip, EXIT + 1, "the host did not get control");
    r(t, VM_EXIT_REASON) as u32
}

fn set_rip(t: &mut T, rip: u64) {
    let mut regs = t.cpu.regs();
    regs.rip = rip;
    t.cpu.set_regs(&regs);
    t.cpu.halted = false;
}

/// VMRESUME from the host.
fn resume(t: &mut T) -> u32 {
    set_rip(t, RESUME);
    go(t)
}

/// Moves the guest past the instruction that exited.
fn skip(t: &mut T) {
    let rip = r(t, GUEST_RIP) + r(t, VM_EXIT_INSTRUCTION_LEN);
    w(&mut t.cpu, GUEST_RIP, rip);
}

fn set_bits(t: &mut T, f: u32, bits: u32) {
    let v = r(t, f) | bits as u64;
    w(&mut t.cpu, f, v);
}

/// Records RFLAGS and, after a VMfailValid, the VM-instruction error at
/// [rdi], then advances rdi by 16.
fn record(a: Asm) -> Result<(), IcedError> {
    let mut done = a.create_label();
    a.pushfq()?;
    a.pop(rax)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.jne(done)?;
    a.mov(rdx, VM_INSTRUCTION_ERROR as u64)?;
    a.vmread(rax, rdx)?;
    a.mov(qword_ptr(rdi + 8), rax)?;
    a.set_label(&mut done)?;
    a.add(rdi, 16)
}

/// RBX: the pointers, RDI: where `record` writes.
fn prologue(a: Asm) -> Result<(), IcedError> {
    a.mov(rbx, PTRS)?;
    a.mov(rdi, RESULTS)
}

/// The outcome of recorded instruction `k`: Ok, Err(Invalid) or
/// Err(Valid(error)).
fn outcome(t: &T, k: u64) -> Result<(), VmFail> {
    let f = t.read(RESULTS + 16 * k);
    if f & rflags::CF != 0 {
        Err(VmFail::Invalid)
    } else if f & rflags::ZF != 0 {
        Err(VmFail::Valid(t.read(RESULTS + 16 * k + 8) as u32))
    } else {
        Ok(())
    }
}

fn ptrs(t: &T, values: &[u64]) {
    for (k, v) in values.iter().enumerate() {
        t.mem
            .write_obj(*v, GuestAddress(PTRS + 8 * k as u64))
            .unwrap();
    }
}

/// Installs handlers that put the vector in r15 and halt, for #UD and #GP.
fn fault_handlers(t: &T) {
    for (v, at) in [(6u64, HANDLER), (13, HANDLER + 0x100)] {
        t.gate(v, at, 0, 0);
        t.code_at(at, |a| {
            a.mov(r15, v)?;
            a.hlt()
        });
    }
}

#[test]
fn capability_msrs_cpuid_and_feature_control() {
    let mut t = root(|a| {
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.mov(r8d, ecx)?;
        a.mov(ecx, 0x480u32)?;
        a.rdmsr()?;
        a.mov(r9d, eax)?;
        a.mov(r10d, edx)?;
        a.mov(ecx, 0x3au32)?;
        a.rdmsr()?;
        a.mov(r11d, eax)?;
        // Locked: the write faults.
        a.mov(eax, 0u32)?;
        a.wrmsr()?;
        a.hlt()
    });
    fault_handlers(&t);
    assert_eq!(t.run(), CpuExit::Hlt);
    let g = t.cpu.regs();
    assert_ne!(g.r8 & (1 << 5), 0, "CPUID.1:ECX.VMX");
    assert_eq!(g.r9 as u32, REVISION);
    assert_eq!(g.r10 & 0x1fff, 4096, "VMCS region size");
    assert_eq!(g.r11, 5);
    assert_eq!(g.r15, 13, "WRMSR to a locked IA32_FEATURE_CONTROL");
    let c = &mut t.cpu;
    c.vmx.feature_control = 0;
    assert!(!c.write_feature_control(1 << 3), "reserved bit");
    assert!(c.write_feature_control(5));
    assert!(!c.write_feature_control(4));
    for (m, must) in [
        (msr::VMX_PINBASED_CTLS, ctl::PIN_DEFAULT1),
        (msr::VMX_PROCBASED_CTLS, ctl::PROC_DEFAULT1),
        (msr::VMX_EXIT_CTLS, ctl::EXIT_DEFAULT1),
        (msr::VMX_ENTRY_CTLS, ctl::ENTRY_DEFAULT1),
    ] {
        let v = c.vmx_msr(m).unwrap();
        assert_eq!(v as u32, must);
        assert_eq!((v >> 32) as u32 & must, must, "allowed-1 covers allowed-0");
    }
    assert_eq!(c.vmx_msr(msr::VMX_CR0_FIXED0), Some(0x8000_0021));
    assert_eq!(c.vmx_msr(msr::VMX_CR4_FIXED0), Some(cr4::VMXE));
    assert_eq!(
        c.vmx_msr(msr::VMX_VMCS_ENUM),
        Some((highest_index() as u64) << 1)
    );
    assert_eq!(c.vmx_msr(0x10), None);
}

/// IA32_VMX_BASIC bit 55 and the TRUE control MSRs, against the SDM's rules
/// (vol. 3D, A.2-A.5): each TRUE MSR has the allowed-1 settings of its plain
/// MSR; its allowed-0 settings are a subset of the plain MSR's, which are
/// the default1 class; what must be 1 may be 1. In TRUE_PROCBASED_CTLS
/// CR3-load and CR3-store exiting may be 0, and VM entry takes a VMCS
/// without them: the guest's MOV to and from CR3 do not exit.
#[test]
fn true_capability_msrs_follow_the_sdm() {
    let mut t = root(|a| {
        a.mov(ecx, 0x48eu32)?;
        a.rdmsr()?;
        a.mov(r9d, eax)?;
        a.mov(r10d, edx)?;
        a.hlt()
    });
    fault_handlers(&t);
    assert_eq!(t.run(), CpuExit::Hlt);
    let g = t.cpu.regs();
    let c = &t.cpu;
    let true_proc = c.vmx_msr(msr::VMX_TRUE_PROCBASED_CTLS).unwrap();
    assert_eq!(
        (g.r10 << 32) | g.r9,
        true_proc,
        "RDMSR of IA32_VMX_TRUE_PROCBASED_CTLS"
    );
    assert_ne!(c.vmx_msr(msr::VMX_BASIC).unwrap() & (1 << 55), 0);
    for (plain, tru, default1) in [
        (
            msr::VMX_PINBASED_CTLS,
            msr::VMX_TRUE_PINBASED_CTLS,
            ctl::PIN_DEFAULT1,
        ),
        (
            msr::VMX_PROCBASED_CTLS,
            msr::VMX_TRUE_PROCBASED_CTLS,
            ctl::PROC_DEFAULT1,
        ),
        (
            msr::VMX_EXIT_CTLS,
            msr::VMX_TRUE_EXIT_CTLS,
            ctl::EXIT_DEFAULT1,
        ),
        (
            msr::VMX_ENTRY_CTLS,
            msr::VMX_TRUE_ENTRY_CTLS,
            ctl::ENTRY_DEFAULT1,
        ),
    ] {
        let (p, q) = (c.vmx_msr(plain).unwrap(), c.vmx_msr(tru).unwrap());
        assert_eq!(p >> 32, q >> 32, "{tru:#x}: the same allowed-1 settings");
        assert_eq!(
            p as u32, default1,
            "{plain:#x}: allowed-0 is the default1 class"
        );
        assert_eq!(
            q as u32 & !(p as u32),
            0,
            "{tru:#x}: allowed-0 within the plain MSR's"
        );
        assert_eq!(
            q as u32 & !((q >> 32) as u32),
            0,
            "{tru:#x}: must-be-1 may be 1"
        );
    }
    assert_eq!(
        true_proc as u32 & (ctl::CR3_LOAD_EXITING | ctl::CR3_STORE_EXITING),
        0,
        "CR3-load/store exiting may be 0"
    );
    let mut t = ready(|a| {
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)?;
        a.mov(rbx, 0x77u64)?;
        a.hlt()
    });
    w(
        &mut t.cpu,
        CPU_BASED_VM_EXEC_CONTROL,
        (ctl::PROC_TRUE_DEFAULT1 | ctl::HLT_EXITING) as u64,
    );
    assert_eq!(go(&mut t), reason::HLT, "no CR-access exit");
    assert_eq!(t.cpu.regs().rbx, 0x77);
    // A default1 control the TRUE MSR still requires (bit 1) cannot be 0.
    let mut t = ready(|a| a.hlt());
    w(
        &mut t.cpu,
        CPU_BASED_VM_EXEC_CONTROL,
        (ctl::PROC_TRUE_DEFAULT1 & !(1 << 1)) as u64,
    );
    assert_eq!(
        t.cpu.vm_entry(true),
        Err(VmFail::Valid(error::ENTRY_INVALID_CONTROLS))
    );
}

/// A root CPU about to VMXON with the fault handlers of `fault_handlers`.
fn before_vmxon() -> T {
    let t = root(|a| {
        a.mov(rbx, PTRS)?;
        a.vmxon(qword_ptr(rbx))?;
        a.hlt()
    });
    ptrs(&t, &[VMXON]);
    fault_handlers(&t);
    t
}

#[test]
fn vmxon_needs_cr4_vmxe_and_feature_control() {
    let mut t = before_vmxon();
    t.cpu.cr4 &= !cr4::VMXE;
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.regs().r15, 6, "#UD without CR4.VMXE");
    let mut t = before_vmxon();
    t.cpu.vmx.feature_control = 1;
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.regs().r15, 13, "#GP: VMX disabled by the firmware");
    assert!(!t.cpu.vmx.on);
    let mut t = before_vmxon();
    assert_eq!(t.run(), CpuExit::Hlt);
    assert!(t.cpu.vmx.on);
    assert_eq!(t.cpu.vmx.vmxon_ptr, VMXON);
}

#[test]
fn vmxon_vmxoff_and_vmcall_results() {
    let mut t = root(|a| {
        prologue(a)?;
        // Wrong revision, not aligned, good, in root without a current VMCS.
        for slot in [0, 1, 2, 2] {
            a.vmxon(qword_ptr(rbx + 8 * slot))?;
            record(a)?;
        }
        a.vmptrld(qword_ptr(rbx + 24))?;
        record(a)?;
        a.vmxon(qword_ptr(rbx + 16))?; // in root, with a current VMCS
        record(a)?;
        a.vmcall()?;
        record(a)?;
        a.vmxoff()?;
        record(a)?;
        a.vmxoff()?; // outside VMX operation: #UD
        a.hlt()
    });
    ptrs(&t, &[BAD_REV, VMXON + 8, VMXON, VMCS]);
    fault_handlers(&t);
    assert_eq!(t.run(), CpuExit::Hlt);
    let want = [
        Err(VmFail::Invalid),
        Err(VmFail::Invalid),
        Ok(()),
        Err(VmFail::Invalid),
        Ok(()),
        Err(VmFail::Valid(error::VMXON_IN_ROOT)),
        Err(VmFail::Valid(error::VMCALL_IN_ROOT)),
        Ok(()),
    ];
    for (k, w) in want.iter().enumerate() {
        assert_eq!(outcome(&t, k as u64), *w, "instruction {k}");
    }
    assert_eq!(t.cpu.regs().r15, 6);
    assert!(!t.cpu.vmx.on);
}

#[test]
fn vmclear_vmptrld_vmptrst_paths() {
    let mut t = root(|a| {
        prologue(a)?;
        a.vmxon(qword_ptr(rbx + 16))?;
        a.vmptrst(qword_ptr(rbx + 48))?;
        a.vmclear(qword_ptr(rbx + 8))?; // no current VMCS: VMfailInvalid
        record(a)?;
        a.vmptrld(qword_ptr(rbx))?;
        record(a)?;
        a.vmptrst(qword_ptr(rbx + 56))?;
        // (VMCLEAR or VMPTRLD, pointer slot)
        for (clear, slot) in [
            (true, 1),
            (true, 2),
            (false, 1),
            (false, 4),
            (false, 2),
            (false, 3),
            (false, 5),
            (true, 5),
        ] {
            let m = qword_ptr(rbx + 8 * slot);
            if clear {
                a.vmclear(m)?;
            } else {
                a.vmptrld(m)?;
            }
            record(a)?;
        }
        a.vmptrst(qword_ptr(rbx + 64))?;
        a.hlt()
    });
    ptrs(
        &t,
        &[VMCS, VMCS + 0x10, VMXON, BAD_REV, 1 << 50, VMCS2, 0, 0, 0],
    );
    assert_eq!(t.run(), CpuExit::Hlt);
    use VmFail::*;
    let want = [
        Err(Invalid),
        Ok(()),
        Err(Valid(error::VMCLEAR_INVALID_ADDRESS)),
        Err(Valid(error::VMCLEAR_VMXON_POINTER)),
        Err(Valid(error::VMPTRLD_INVALID_ADDRESS)),
        Err(Valid(error::VMPTRLD_INVALID_ADDRESS)),
        Err(Valid(error::VMPTRLD_VMXON_POINTER)),
        Err(Valid(error::VMPTRLD_BAD_REVISION)),
        Ok(()),
        Ok(()),
    ];
    for (k, w) in want.iter().enumerate() {
        assert_eq!(outcome(&t, k as u64), *w, "instruction {k}");
    }
    assert_eq!(t.read(PTRS + 48), NO_VMCS);
    assert_eq!(t.read(PTRS + 56), VMCS);
    assert_eq!(t.read(PTRS + 64), NO_VMCS, "VMCLEAR of the current VMCS");
}

#[test]
fn vmread_vmwrite_each_width() {
    let mut t = root(|a| {
        prologue(a)?;
        a.vmxon(qword_ptr(rbx))?;
        a.mov(rdx, GUEST_RIP as u64)?;
        a.vmread(rax, rdx)?; // no current VMCS
        record(a)?;
        a.vmptrld(qword_ptr(rbx + 8))?;
        a.mov(rsi, 0x1234_5678_9abc_def0u64)?;
        a.mov(r8, 0x100u64)?;
        for (k, f) in [GUEST_ES_SELECTOR, GUEST_ES_LIMIT, TSC_OFFSET, GUEST_RIP]
            .into_iter()
            .enumerate()
        {
            a.mov(rdx, f as u64)?;
            a.vmwrite(rdx, rsi)?;
            record(a)?;
            // Read back into memory at PTRS + 0x100 + 8k.
            a.vmread(qword_ptr(rbx + r8 + 8 * k as i32), rdx)?;
        }
        // The high half of the 64-bit field.
        a.mov(rdx, (TSC_OFFSET | 1) as u64)?;
        a.mov(rax, 0x11u64)?;
        a.vmwrite(rdx, rax)?;
        a.vmread(r9, rdx)?;
        a.mov(rdx, TSC_OFFSET as u64)?;
        a.vmread(r10, rdx)?;
        // VMWRITE from memory.
        a.mov(rdx, GUEST_RSP as u64)?;
        a.vmwrite(rdx, qword_ptr(rbx + 16))?;
        a.vmread(r11, rdx)?;
        // Failures.
        a.mov(rdx, VM_EXIT_REASON as u64)?;
        a.vmwrite(rdx, rax)?;
        record(a)?;
        a.mov(rdx, 0x0002u64)?; // posted-interrupt vector: not supported
        a.vmread(rax, rdx)?;
        record(a)?;
        a.mov(rdx, (GUEST_RIP | 1) as u64)?; // high access to a natural field
        a.vmwrite(rdx, rax)?;
        record(a)?;
        a.mov(rdx, (1u64 << 32) | GUEST_RIP as u64)?;
        a.vmread(rax, rdx)?;
        record(a)?;
        a.mov(rdx, VM_EXIT_REASON as u64)?;
        a.vmread(r12, rdx)?; // read-only fields can be read
        record(a)?;
        a.hlt()
    });
    ptrs(&t, &[VMXON, VMCS, 0xfeed_f00d]);
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(outcome(&t, 0), Err(VmFail::Invalid));
    for k in 1..=4 {
        assert_eq!(outcome(&t, k), Ok(()));
    }
    let got: Vec<u64> = (0..4).map(|k| t.read(PTRS + 0x100 + 8 * k)).collect();
    assert_eq!(
        got,
        [
            0xdef0,
            0x9abc_def0,
            0x1234_5678_9abc_def0,
            0x1234_5678_9abc_def0
        ]
    );
    let g = t.cpu.regs();
    assert_eq!(g.r9, 0x11);
    assert_eq!(g.r10, 0x11_9abc_def0);
    assert_eq!(g.r11, 0xfeed_f00d);
    use VmFail::*;
    assert_eq!(outcome(&t, 5), Err(Valid(error::VMWRITE_READ_ONLY)));
    assert_eq!(outcome(&t, 6), Err(Valid(error::UNSUPPORTED_FIELD)));
    assert_eq!(outcome(&t, 7), Err(Valid(error::UNSUPPORTED_FIELD)));
    assert_eq!(outcome(&t, 8), Err(Valid(error::UNSUPPORTED_FIELD)));
    assert_eq!(outcome(&t, 9), Ok(()));
}

#[test]
fn fields_are_sorted_named_and_fit_the_region() {
    assert!(FIELDS.windows(2).all(|p| p[0].0 < p[1].0));
    assert!(FIELDS.iter().all(|f| f.0 & 1 == 0));
    assert!(super::REGION_FIELDS + 8 * FIELDS.len() as u64 <= super::REGION_SIZE);
    assert_eq!(name(GUEST_RIP), Some("GUEST_RIP"));
    assert_eq!(name(TSC_OFFSET | 1), Some("TSC_OFFSET"));
    assert_eq!(area(HOST_RIP), Area::Host);
    assert_eq!(area(VM_EXIT_REASON), Area::ReadOnly);
    assert_eq!(width(GUEST_ES_SELECTOR), Width::W16);
    assert_eq!(width(EPT_POINTER), Width::W64);
    assert_eq!(width(EXCEPTION_BITMAP), Width::W32);
    assert_eq!(width(GUEST_CR0), Width::Natural);
}

#[test]
fn launch_state_rules_and_vmcs_kept_in_memory() {
    let mut t = ready(|a| {
        a.cpuid()?;
        a.cpuid()
    });
    // VMRESUME of a clear VMCS.
    set_rip(&mut t, RESUME);
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.rip, RESUME + 4, "VMRESUME fell through");
    assert_ne!(t.cpu.rflags & rflags::ZF, 0);
    assert_eq!(
        r(&t, VM_INSTRUCTION_ERROR) as u32,
        error::VMRESUME_NONLAUNCHED
    );
    // VMLAUNCH.
    set_rip(&mut t, CODE);
    assert_eq!(go(&mut t), reason::CPUID);
    assert!(t.cpu.vmx.vmcs.launched);
    assert_eq!(r(&t, GUEST_RIP), GUEST);
    assert_eq!(r(&t, VM_EXIT_INSTRUCTION_LEN), 2);
    // VMLAUNCH of a launched VMCS.
    set_rip(&mut t, CODE);
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.rip, CODE + 4);
    assert_eq!(r(&t, VM_INSTRUCTION_ERROR) as u32, error::VMLAUNCH_NONCLEAR);
    skip(&mut t);
    assert_eq!(resume(&mut t), reason::CPUID);
    assert_eq!(r(&t, GUEST_RIP), GUEST + 2);
    // VMCLEAR writes the VMCS to its region with the launch state clear;
    // VMPTRLD brings it back.
    t.cpu.vmclear(VMCS).unwrap();
    assert_eq!(t.mem.read_obj::<u32>(GuestAddress(VMCS + 8)).unwrap(), 0);
    let slot = slot(GUEST_RIP).unwrap() as u64;
    assert_eq!(
        t.read(VMCS + super::REGION_FIELDS + 8 * slot),
        GUEST + 2,
        "field slot in the region"
    );
    assert_eq!(t.cpu.vmread(GUEST_RIP as u64), Err(VmFail::Invalid));
    t.cpu.vmptrld(VMCS).unwrap();
    assert_eq!(r(&t, GUEST_RIP), GUEST + 2);
    assert!(!t.cpu.vmx.vmcs.launched);
    assert_eq!(t.cpu.vm_entry(false), Err(VmFail::Valid(5)));
    // A second VMCS does not disturb the first.
    t.cpu.vmptrld(VMCS2).unwrap();
    w(&mut t.cpu, GUEST_RIP, 0x1234);
    t.cpu.vmptrld(VMCS).unwrap();
    assert_eq!(r(&t, GUEST_RIP), GUEST + 2);
    t.cpu.vmptrld(VMCS2).unwrap();
    assert_eq!(r(&t, GUEST_RIP), 0x1234);
}

/// A VMCS field to change before VMLAUNCH, and what the entry must do.
enum Want {
    Fail(u32),
    Exit(u32, u64),
}

#[test]
fn vm_entry_checks() {
    use Want::*;
    let cases: &[(&str, u32, u64, Want)] = &[
        (
            "pin-based default1 bit clear",
            PIN_BASED_VM_EXEC_CONTROL,
            0,
            Fail(7),
        ),
        (
            "TPR shadow not offered",
            CPU_BASED_VM_EXEC_CONTROL,
            (ctl::PROC_DEFAULT1 | 1 << 21) as u64,
            Fail(7),
        ),
        ("five CR3 targets", CR3_TARGET_COUNT, 5, Fail(7)),
        (
            "exit controls default1 bit clear",
            VM_EXIT_CONTROLS,
            ctl::HOST_ADDR_SPACE_SIZE as u64,
            Fail(7),
        ),
        (
            "reserved injection type",
            VM_ENTRY_INTR_INFO_FIELD,
            0x8000_0100,
            Fail(7),
        ),
        (
            "#UD injected with an error code",
            VM_ENTRY_INTR_INFO_FIELD,
            0x8000_0b06,
            Fail(7),
        ),
        (
            "software interrupt without a length",
            VM_ENTRY_INTR_INFO_FIELD,
            0x8000_0480,
            Fail(7),
        ),
        ("host CR0.PE clear", HOST_CR0, 0x8005_0032, Fail(8)),
        ("host CR4.VMXE clear", HOST_CR4, 0x6a0, Fail(8)),
        ("host CS selector 0", HOST_CS_SELECTOR, 0, Fail(8)),
        (
            "host SS selector with RPL 3",
            HOST_SS_SELECTOR,
            0x1b,
            Fail(8),
        ),
        ("host RIP not canonical", HOST_RIP, 1 << 60, Fail(8)),
        (
            "host GDTR base not canonical",
            HOST_GDTR_BASE,
            1 << 50,
            Fail(8),
        ),
        (
            "32-bit host from long mode",
            VM_EXIT_CONTROLS,
            ctl::EXIT_DEFAULT1 as u64,
            Fail(8),
        ),
        ("guest CR0.PG clear", GUEST_CR0, 0x0005_0033, Exit(33, 0)),
        ("guest CR4.VMXE clear", GUEST_CR4, 0x6a0, Exit(33, 0)),
        ("guest RFLAGS bit 1 clear", GUEST_RFLAGS, 0, Exit(33, 0)),
        ("guest CS is data", GUEST_CS_AR_BYTES, 0xc093, Exit(33, 0)),
        ("guest TR unusable", GUEST_TR_AR_BYTES, 1 << 16, Exit(33, 0)),
        (
            "guest SS RPL differs from CS",
            GUEST_SS_SELECTOR,
            0x1b,
            Exit(33, 0),
        ),
        (
            "guest limit with G clear",
            GUEST_DS_AR_BYTES,
            0x4093,
            Exit(33, 0),
        ),
        ("guest RIP not canonical", GUEST_RIP, 1 << 60, Exit(33, 0)),
        (
            "guest activity state 3",
            GUEST_ACTIVITY_STATE,
            3,
            Exit(33, 0),
        ),
        (
            "STI blocking with IF clear",
            GUEST_INTERRUPTIBILITY_INFO,
            1,
            Exit(33, 0),
        ),
        (
            "guest IDTR limit above 16 bits",
            GUEST_IDTR_LIMIT,
            0x1_0000,
            Exit(33, 0),
        ),
        ("VMCS link pointer", VMCS_LINK_POINTER, 0x1000, Exit(33, 4)),
    ];
    for (what, f, v, want) in cases {
        let mut t = ready(|a| a.cpuid());
        w(&mut t.cpu, *f, *v);
        assert_eq!(t.run(), CpuExit::Hlt, "{what}");
        match want {
            Fail(n) => {
                assert_eq!(t.cpu.rip, CODE + 4, "{what}: VMLAUNCH fell through");
                assert_ne!(t.cpu.rflags & rflags::ZF, 0, "{what}");
                assert_eq!(r(&t, VM_INSTRUCTION_ERROR), *n as u64, "{what}");
            }
            Exit(reason, qual) => {
                assert_eq!(t.cpu.rip, EXIT + 1, "{what}: host resumed");
                assert_eq!(
                    r(&t, VM_EXIT_REASON),
                    (*reason | reason::ENTRY_FAILURE) as u64,
                    "{what}"
                );
                assert_eq!(r(&t, EXIT_QUALIFICATION), *qual, "{what}");
                assert!(!t.cpu.vmx.non_root);
                assert!(!t.cpu.vmx.vmcs.launched, "{what}: a failed launch");
            }
        }
    }
}

#[test]
fn vm_entry_msr_load_list() {
    let mut t = ready(|a| a.cpuid());
    // One good entry (IA32_SYSENTER_ESP), then the x2APIC range.
    for (k, (index, value)) in [(0x175u64, 0x4242u64), (0x808, 0)].iter().enumerate() {
        let at = MSR_LIST + 16 * k as u64;
        t.mem.write_obj(*index, GuestAddress(at)).unwrap();
        t.mem.write_obj(*value, GuestAddress(at + 8)).unwrap();
    }
    w(&mut t.cpu, VM_ENTRY_MSR_LOAD_ADDR, MSR_LIST);
    w(&mut t.cpu, VM_ENTRY_MSR_LOAD_COUNT, 1);
    assert_eq!(go(&mut t), reason::CPUID);
    assert_eq!(r(&t, GUEST_SYSENTER_ESP), 0x4242);
    w(&mut t.cpu, VM_ENTRY_MSR_LOAD_COUNT, 2);
    assert_eq!(
        resume(&mut t),
        reason::MSR_LOAD_FAIL | reason::ENTRY_FAILURE
    );
    assert_eq!(r(&t, EXIT_QUALIFICATION), 2);
    w(&mut t.cpu, VM_ENTRY_MSR_LOAD_ADDR, MSR_LIST + 8);
    set_rip(&mut t, RESUME);
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(
        r(&t, VM_INSTRUCTION_ERROR) as u32,
        error::ENTRY_INVALID_CONTROLS,
        "misaligned MSR-load list"
    );
}

#[test]
fn exit_saves_guest_state_and_loads_host_state() {
    let mut t = ready(|a| {
        a.mov(rax, 0x1111u64)?;
        a.mov(rsp, 0x47_0000u64)?;
        a.stc()?;
        a.cpuid()
    });
    assert_eq!(go(&mut t), reason::CPUID);
    assert_eq!(r(&t, GUEST_RSP), 0x47_0000);
    assert_ne!(r(&t, GUEST_RFLAGS) & rflags::CF, 0);
    assert_eq!(r(&t, GUEST_CS_SELECTOR), 0x10);
    assert_eq!(r(&t, GUEST_CS_AR_BYTES) & 0xffff, 0xa09b);
    assert_eq!(r(&t, GUEST_TR_BASE), TSS);
    let g = t.cpu.regs();
    assert_eq!(g.rax, 0x1111, "general registers are not switched");
    assert_eq!(g.rsp, STACK);
    assert_eq!(g.rflags, 2);
    assert!(!t.cpu.vmx.non_root);
    assert_eq!(t.cpu.sregs().cs.selector, 0x10);
    assert!(t.cpu.sregs().cs.l);
    assert_eq!(t.cpu.vmx.exit_counts[reason::CPUID as usize], 1);
}

/// Runs `guest` with `proc` added to the primary controls and returns the
/// first exit reason.
fn exit_of(proc: u32, guest: impl FnOnce(Asm) -> Result<(), IcedError>) -> (T, u32) {
    let mut t = ready(guest);
    set_bits(&mut t, CPU_BASED_VM_EXEC_CONTROL, proc);
    let e = go(&mut t);
    (t, e)
}

#[test]
fn instruction_exits() {
    type A = CodeAssembler;
    // (MONITOR and MWAIT are not in the CPU model: their #UD has priority
    // over the VM exit, SDM vol. 3 26.1.1.)
    let cases: [(u32, u32, Code, u64); 9] = [
        (ctl::HLT_EXITING, reason::HLT, A::hlt, 1),
        (ctl::RDTSC_EXITING, reason::RDTSC, A::rdtsc, 2),
        (ctl::RDPMC_EXITING, reason::RDPMC, A::rdpmc, 2),
        (ctl::PAUSE_EXITING, reason::PAUSE, A::pause, 2),
        (0, reason::INVD, A::invd, 2),
        (0, reason::VMCALL, A::vmcall, 3),
        (0, reason::VMXOFF, A::vmxoff, 3),
        (0, reason::VMLAUNCH, A::vmlaunch, 3),
        (0, reason::VMRESUME, A::vmresume, 3),
    ];
    for (proc, want, code, len) in cases {
        let (t, e) = exit_of(proc, |a| {
            code(a)?;
            a.hlt()
        });
        assert_eq!(e, want, "{}", reason::name(want));
        assert_eq!(
            r(&t, VM_EXIT_INSTRUCTION_LEN),
            len,
            "{}",
            reason::name(want)
        );
        assert_eq!(r(&t, GUEST_RIP), GUEST);
    }
}

#[test]
fn vmx_instructions_in_the_guest_exit_with_information() {
    let (t, e) = exit_of(0, |a| {
        a.mov(rdx, GUEST_RIP as u64)?;
        a.vmread(rcx, rdx)
    });
    assert_eq!(e, reason::VMREAD);
    // Register form (bit 10), reg1 = RCX (1), reg2 = RDX (2).
    assert_eq!(
        r(&t, VMX_INSTRUCTION_INFO),
        (1 << 10) | (1 << 3) | (2 << 28)
    );
    let (t, e) = exit_of(0, |a| {
        a.mov(rbx, 0x1000u64)?;
        a.vmptrld(qword_ptr(rbx + 0x20))
    });
    assert_eq!(e, reason::VMPTRLD);
    assert_eq!(r(&t, EXIT_QUALIFICATION), 0x20, "displacement");
    // 64-bit addressing, DS, no index, base RBX.
    assert_eq!(
        r(&t, VMX_INSTRUCTION_INFO),
        (2 << 7) | (3 << 15) | (1 << 22) | (3 << 23)
    );
    for (want, f) in [
        (reason::VMXON, 0),
        (reason::VMCLEAR, 1),
        (reason::VMPTRST, 2),
        (reason::INVEPT, 3),
        (reason::INVVPID, 4),
        (reason::VMWRITE, 5),
    ] {
        let (_, e) = exit_of(0, |a| {
            a.mov(rbx, 0x1000u64)?;
            match f {
                0 => a.vmxon(qword_ptr(rbx)),
                1 => a.vmclear(qword_ptr(rbx)),
                2 => a.vmptrst(qword_ptr(rbx)),
                3 => a.invept(rax, xmmword_ptr(rbx)),
                4 => a.invvpid(rax, xmmword_ptr(rbx)),
                _ => a.vmwrite(rax, qword_ptr(rbx)),
            }
        });
        assert_eq!(e, want, "{}", reason::name(want));
    }
}

#[test]
fn io_exits_unconditional_and_bitmaps() {
    // Unconditional: OUT imm8, AL.
    let (t, e) = exit_of(ctl::UNCOND_IO_EXITING, |a| {
        a.mov(al, 0x42)?;
        a.out(0x80, al)
    });
    assert_eq!(e, reason::IO_INSTRUCTION);
    assert_eq!(r(&t, EXIT_QUALIFICATION), (0x80 << 16) | (1 << 6));
    assert_eq!(r(&t, VM_EXIT_INSTRUCTION_LEN), 2);
    // IN EAX, DX.
    let (t, e) = exit_of(ctl::UNCOND_IO_EXITING, |a| {
        a.mov(edx, 0x3f8u32)?;
        a.in_(eax, dx)
    });
    assert_eq!(e, reason::IO_INSTRUCTION);
    assert_eq!(r(&t, EXIT_QUALIFICATION), (0x3f8 << 16) | (1 << 3) | 3);
    // REP OUTSB: string, REP, the linear address of the source.
    let (t, e) = exit_of(ctl::UNCOND_IO_EXITING, |a| {
        a.mov(edx, 0x3f8u32)?;
        a.mov(rsi, 0x42_0000u64)?;
        a.mov(ecx, 4u32)?;
        a.rep().outsb()
    });
    assert_eq!(e, reason::IO_INSTRUCTION);
    assert_eq!(
        r(&t, EXIT_QUALIFICATION),
        (0x3f8 << 16) | (1 << 5) | (1 << 4)
    );
    assert_eq!(r(&t, GUEST_LINEAR_ADDRESS), 0x42_0000);
    assert_eq!(r(&t, VMX_INSTRUCTION_INFO), (2 << 7) | (3 << 15));
    // Bitmaps: port 0x80 (A) and 0x8001 (B) exit, 0x81 does not (it reaches
    // the VMM as ordinary port output).
    let mut t = ready(|a| {
        a.mov(al, 1)?;
        a.out(0x81, al)?;
        a.out(0x80, al)?;
        a.mov(edx, 0x8001u32)?;
        a.out(dx, al)?;
        a.hlt()
    });
    set_bits(
        &mut t,
        CPU_BASED_VM_EXEC_CONTROL,
        ctl::USE_IO_BITMAPS | ctl::UNCOND_IO_EXITING,
    );
    w(&mut t.cpu, IO_BITMAP_A, IO_A);
    w(&mut t.cpu, IO_BITMAP_B, IO_B);
    t.mem.write_obj(1u8, GuestAddress(IO_A + 0x10)).unwrap();
    t.mem.write_obj(2u8, GuestAddress(IO_B)).unwrap();
    assert_eq!(
        t.run(),
        CpuExit::IoOut {
            port: 0x81,
            size: 1,
            count: 1
        }
    );
    assert_eq!(go(&mut t), reason::IO_INSTRUCTION);
    assert_eq!(r(&t, EXIT_QUALIFICATION) >> 16, 0x80);
    skip(&mut t);
    assert_eq!(resume(&mut t), reason::IO_INSTRUCTION);
    assert_eq!(r(&t, EXIT_QUALIFICATION) >> 16, 0x8001);
}

#[test]
fn msr_exits_with_and_without_bitmaps() {
    let guest = |a: Asm| {
        a.mov(ecx, 0x10u32)?;
        a.wrmsr()?; // not in the bitmap
        a.rdmsr()?; // in the bitmap
        a.mov(ecx, 0xc000_0080u32)?;
        a.wrmsr()?; // in the bitmap
        a.hlt()
    };
    let (t, e) = exit_of(0, guest);
    assert_eq!(e, reason::MSR_WRITE, "every MSR exits without bitmaps");
    assert_eq!(r(&t, GUEST_RIP), GUEST + 5);
    let mut t = ready(guest);
    set_bits(&mut t, CPU_BASED_VM_EXEC_CONTROL, ctl::USE_MSR_BITMAPS);
    w(&mut t.cpu, MSR_BITMAP, MSR_BM);
    t.mem.write_obj(1u8, GuestAddress(MSR_BM + 2)).unwrap(); // read 0x10
    t.mem
        .write_obj(1u8, GuestAddress(MSR_BM + 3072 + 0x10))
        .unwrap(); // write 0xc000_0080
    assert_eq!(go(&mut t), reason::MSR_READ);
    assert_eq!(r(&t, GUEST_RIP), GUEST + 7);
    skip(&mut t);
    assert_eq!(resume(&mut t), reason::MSR_WRITE);
    assert_eq!(t.cpu.regs().rcx as u32, 0xc000_0080);
}

#[test]
fn cr_access_exits_masks_and_shadows() {
    // MOV from CR0/CR4 reads the shadow in host-owned bits; MOV to CR0 that
    // changes a host-owned bit against the shadow exits.
    let mut t = ready(|a| {
        a.mov(rax, cr0)?;
        a.mov(rbx, cr4)?;
        a.mov(rcx, rax)?;
        a.and(rcx, !8i32)?; // clear TS: matches the shadow
        a.mov(cr0, rcx)?;
        a.or(rcx, 8)?; // set TS: differs from the shadow
        a.mov(cr0, rcx)?;
        a.hlt()
    });
    w(&mut t.cpu, CR0_GUEST_HOST_MASK, 8);
    w(&mut t.cpu, CR0_READ_SHADOW, 0);
    w(&mut t.cpu, CR4_GUEST_HOST_MASK, cr4::VMXE);
    w(&mut t.cpu, CR4_READ_SHADOW, 0);
    let gcr0 = r(&t, GUEST_CR0) | 8;
    w(&mut t.cpu, GUEST_CR0, gcr0);
    assert_eq!(go(&mut t), reason::CR_ACCESS);
    let g = t.cpu.regs();
    assert_eq!(g.rax & 8, 0, "CR0.TS read from the shadow");
    assert_eq!(g.rbx & cr4::VMXE, 0, "CR4.VMXE hidden");
    // MOV CR0, RCX: CR 0, type 0, register 1.
    assert_eq!(r(&t, EXIT_QUALIFICATION), 1 << 8);
    assert_ne!(r(&t, GUEST_CR0) & 8, 0, "the host-owned TS kept");
    // CR3-load and CR3-store exiting are default1 controls: both exit,
    // except loads of a CR3-target value.
    let mut t = ready(|a| {
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)
    });
    assert_eq!(go(&mut t), reason::CR_ACCESS);
    assert_eq!(r(&t, EXIT_QUALIFICATION), 3 | (1 << 4), "MOV RAX, CR3");
    skip(&mut t);
    assert_eq!(resume(&mut t), reason::CR_ACCESS);
    assert_eq!(r(&t, EXIT_QUALIFICATION), 3, "MOV CR3, RAX");
    let target = r(&t, GUEST_CR3);
    let mut t = ready(|a| {
        a.mov(rax, target)?;
        a.mov(cr3, rax)?;
        a.mov(rdx, cr3)
    });
    w(&mut t.cpu, CR3_TARGET_COUNT, 1);
    w(&mut t.cpu, CR3_TARGET_VALUE0, target);
    assert_eq!(go(&mut t), reason::CR_ACCESS);
    assert_eq!(
        r(&t, EXIT_QUALIFICATION),
        3 | (1 << 4) | (2 << 8),
        "MOV RDX, CR3"
    );
    let (t, e) = exit_of(ctl::CR8_LOAD_EXITING, |a| {
        a.xor(eax, eax)?;
        a.mov(cr8, rax)
    });
    assert_eq!(e, reason::CR_ACCESS);
    assert_eq!(r(&t, EXIT_QUALIFICATION), 8);
    // CLTS with TS host-owned and set in the shadow; LMSW.
    let mut t = ready(|a| {
        a.clts()?;
        a.mov(eax, 0x31u32)?;
        a.lmsw(ax)
    });
    w(&mut t.cpu, CR0_GUEST_HOST_MASK, 0xe);
    w(&mut t.cpu, CR0_READ_SHADOW, 8);
    assert_eq!(go(&mut t), reason::CR_ACCESS);
    assert_eq!(r(&t, EXIT_QUALIFICATION), 2 << 4);
    skip(&mut t);
    assert_eq!(resume(&mut t), reason::CR_ACCESS);
    assert_eq!(
        r(&t, EXIT_QUALIFICATION),
        (3 << 4) | (0x31 << 16),
        "LMSW AX"
    );
}

#[test]
fn mov_dr_invlpg_and_rdtsc_offsetting() {
    let (t, e) = exit_of(ctl::MOV_DR_EXITING, |a| a.mov(rbx, dr7));
    assert_eq!(e, reason::DR_ACCESS);
    assert_eq!(r(&t, EXIT_QUALIFICATION), 7 | (1 << 4) | (3 << 8));
    let (t, e) = exit_of(ctl::INVLPG_EXITING, |a| {
        a.mov(rbx, 0x12_3000u64)?;
        a.invlpg(byte_ptr(rbx + 0x45))
    });
    assert_eq!(e, reason::INVLPG);
    assert_eq!(r(&t, EXIT_QUALIFICATION), 0x12_3045);
    let (t, e) = exit_of(ctl::USE_TSC_OFFSETTING | ctl::HLT_EXITING, |a| {
        a.rdtsc()?;
        a.hlt()
    });
    let _ = t;
    assert_eq!(e, reason::HLT);
    let mut t = ready(|a| {
        a.rdtsc()?;
        a.hlt()
    });
    set_bits(
        &mut t,
        CPU_BASED_VM_EXEC_CONTROL,
        ctl::USE_TSC_OFFSETTING | ctl::HLT_EXITING,
    );
    w(&mut t.cpu, TSC_OFFSET, 1 << 50);
    assert_eq!(go(&mut t), reason::HLT);
    let g = t.cpu.regs();
    assert!((g.rdx << 32 | g.rax) >= 1 << 50, "the offset is added");
    // RDTSCP without "enable RDTSCP" is #UD in the guest.
    let mut t = ready(|a| a.rdtscp());
    set_bits(&mut t, EXCEPTION_BITMAP, 1 << 6);
    assert_eq!(go(&mut t), reason::EXCEPTION_NMI);
    assert_eq!(r(&t, VM_EXIT_INTR_INFO), 0x8000_0306);
}

#[test]
fn exception_bitmap_and_page_fault_filter() {
    // #UD in the bitmap.
    let mut t = ready(|a| a.ud2());
    set_bits(&mut t, EXCEPTION_BITMAP, 1 << 6);
    assert_eq!(go(&mut t), reason::EXCEPTION_NMI);
    assert_eq!(r(&t, VM_EXIT_INTR_INFO), 0x8000_0306);
    assert_eq!(r(&t, GUEST_RIP), GUEST, "a fault: RIP of the instruction");
    // #GP with its error code (a non-canonical access).
    let mut t = ready(|a| {
        a.mov(rax, 1u64 << 60)?;
        a.mov(rax, qword_ptr(rax))
    });
    set_bits(&mut t, EXCEPTION_BITMAP, 1 << 13);
    assert_eq!(go(&mut t), reason::EXCEPTION_NMI);
    assert_eq!(r(&t, VM_EXIT_INTR_INFO), 0x8000_0b0d);
    assert_eq!(r(&t, VM_EXIT_INTR_ERROR_CODE), 0);
    // INT3: a software exception with its length.
    let mut t = ready(|a| a.int3());
    set_bits(&mut t, EXCEPTION_BITMAP, 1 << 3);
    assert_eq!(go(&mut t), reason::EXCEPTION_NMI);
    assert_eq!(r(&t, VM_EXIT_INTR_INFO), 0x8000_0603);
    assert_eq!(r(&t, VM_EXIT_INSTRUCTION_LEN), 1);
    // #PF: a write to a read-only page (unmapped here: beyond 16 MiB), with
    // the error-code mask/match filter.
    for (bit, mask, mtch, exits) in [
        (true, 0, 0, true),
        (true, 2, 2, true),  // write faults match
        (true, 1, 1, false), // present faults only: not this one
        (false, 1, 1, true), // bit clear: the mismatches exit
    ] {
        let mut t = ready(|a| {
            a.mov(rax, 0x4000_0000u64)?;
            a.mov(qword_ptr(rax), rax)
        });
        t.gate(14, GUEST_HANDLER, 0, 0);
        t.code_at(GUEST_HANDLER, |a| {
            a.mov(r15, 14u64)?;
            a.vmcall()
        });
        if bit {
            set_bits(&mut t, EXCEPTION_BITMAP, 1 << 14);
        }
        w(&mut t.cpu, PAGE_FAULT_ERROR_CODE_MASK, mask);
        w(&mut t.cpu, PAGE_FAULT_ERROR_CODE_MATCH, mtch);
        let e = go(&mut t);
        if exits {
            assert_eq!(e, reason::EXCEPTION_NMI);
            assert_eq!(r(&t, VM_EXIT_INTR_INFO), 0x8000_0b0e);
            assert_eq!(r(&t, VM_EXIT_INTR_ERROR_CODE), 2);
            assert_eq!(
                r(&t, EXIT_QUALIFICATION),
                0x4000_0000,
                "the faulting address"
            );
            assert_eq!(t.cpu.cr2, 0, "CR2 unchanged by a #PF exit");
        } else {
            assert_eq!(e, reason::VMCALL, "delivered to the guest's handler");
            assert_eq!(t.cpu.regs().r15, 14);
            assert_eq!(t.cpu.cr2, 0x4000_0000, "CR2 set by the delivered #PF");
        }
    }
}

#[test]
fn triple_fault_exits() {
    let mut t = ready(|a| a.ud2());
    w(&mut t.cpu, GUEST_IDTR_LIMIT, 0);
    assert_eq!(go(&mut t), reason::TRIPLE_FAULT);
}

#[test]
fn nested_fault_reports_idt_vectoring() {
    // #UD whose gate is not present: #NP (in the bitmap) during delivery.
    let mut t = ready(|a| a.ud2());
    t.gate(6, GUEST_HANDLER, 0, 0);
    let lo: u64 = t.read(IDT + 6 * 16) & !(1 << 47);
    t.mem.write_obj(lo, GuestAddress(IDT + 6 * 16)).unwrap();
    set_bits(&mut t, EXCEPTION_BITMAP, 1 << 11);
    assert_eq!(go(&mut t), reason::EXCEPTION_NMI);
    assert_eq!(r(&t, VM_EXIT_INTR_INFO), 0x8000_0b0b);
    assert_eq!(r(&t, IDT_VECTORING_INFO_FIELD), 0x8000_0306);
}

#[test]
fn external_interrupt_and_interrupt_window_exits() {
    let mut t = ready(|a| {
        a.nop()?;
        a.hlt()
    });
    set_bits(&mut t, PIN_BASED_VM_EXEC_CONTROL, ctl::EXT_INTR_EXITING);
    set_bits(&mut t, VM_EXIT_CONTROLS, ctl::ACK_INTR_ON_EXIT);
    t.cpu.local = Some(Box::new(OneShot(true)));
    // RFLAGS.IF=0 does not block external interrupts that exit.
    assert_eq!(go(&mut t), reason::EXTERNAL_INTERRUPT);
    assert_eq!(
        r(&t, VM_EXIT_INTR_INFO),
        0x8000_0040,
        "acknowledged on exit"
    );
    let mut t = ready(|a| a.hlt());
    set_bits(&mut t, CPU_BASED_VM_EXEC_CONTROL, ctl::INTR_WINDOW_EXITING);
    w(&mut t.cpu, GUEST_RFLAGS, 0x202);
    assert_eq!(go(&mut t), reason::INTERRUPT_WINDOW);
    assert_eq!(r(&t, GUEST_RIP), GUEST);
    // Without IF the window stays closed: the guest halts in non-root.
    let mut t = ready(|a| a.hlt());
    set_bits(&mut t, CPU_BASED_VM_EXEC_CONTROL, ctl::INTR_WINDOW_EXITING);
    assert_eq!(t.run(), CpuExit::Hlt);
    assert!(t.cpu.vmx.non_root);
}

#[test]
fn preemption_timer_exits_and_saves_its_value() {
    let mut t = ready(|a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.jmp(l)
    });
    set_bits(&mut t, PIN_BASED_VM_EXEC_CONTROL, ctl::PREEMPTION_TIMER);
    set_bits(&mut t, VM_EXIT_CONTROLS, ctl::SAVE_PREEMPTION_TIMER);
    w(&mut t.cpu, VMX_PREEMPTION_TIMER_VALUE, 1000);
    assert_eq!(go(&mut t), reason::PREEMPTION_TIMER);
    assert_eq!(r(&t, VMX_PREEMPTION_TIMER_VALUE), 0);
}

/// Injects `info` (with `code`, `len`) into a guest whose handler for
/// `vector` stores its stack frame in r8..r10 and exits with VMCALL.
fn inject(vector: u8, info: u32, code: u32, len: u32) -> T {
    let mut t = ready(|a| a.hlt());
    t.gate(vector as u64, GUEST_HANDLER, 3, 0);
    t.code_at(GUEST_HANDLER, |a| {
        a.mov(r8, qword_ptr(rsp))?;
        a.mov(r9, qword_ptr(rsp + 8))?;
        a.mov(r10, qword_ptr(rsp + 16))?;
        a.vmcall()
    });
    w(&mut t.cpu, VM_ENTRY_INTR_INFO_FIELD, info as u64);
    w(&mut t.cpu, VM_ENTRY_EXCEPTION_ERROR_CODE, code as u64);
    w(&mut t.cpu, VM_ENTRY_INSTRUCTION_LEN, len as u64);
    w(&mut t.cpu, GUEST_RFLAGS, 0x202);
    assert_eq!(go(&mut t), reason::VMCALL);
    assert_eq!(
        r(&t, VM_ENTRY_INTR_INFO_FIELD) >> 31,
        0,
        "the valid bit is cleared on exit"
    );
    t
}

#[test]
fn event_injection_of_each_type() {
    // External interrupt: returns to the guest RIP, IF cleared.
    let g = inject(0x40, 0x8000_0040, 0, 0).cpu.regs();
    assert_eq!((g.r8, g.r9), (GUEST, 0x10));
    assert_eq!(g.r10 & rflags::IF, rflags::IF);
    // NMI.
    let t = inject(2, 0x8000_0202, 0, 0);
    assert_eq!(t.cpu.regs().r8, GUEST);
    assert!(t.cpu.vmx.nmi_blocked);
    // Hardware exception with an error code: the code is pushed first.
    let g = inject(13, 0x8000_0b0d, 0x18, 0).cpu.regs();
    assert_eq!((g.r8, g.r9), (0x18, GUEST));
    // Software interrupt and software exception: the return address is past
    // the instruction length.
    let g = inject(0x80, 0x8000_0480, 0, 2).cpu.regs();
    assert_eq!(g.r8, GUEST + 2);
    let g = inject(3, 0x8000_0603, 0, 1).cpu.regs();
    assert_eq!(g.r8, GUEST + 1);
    // Privileged software exception (INT1).
    let g = inject(1, 0x8000_0501, 0, 1).cpu.regs();
    assert_eq!(g.r8, GUEST + 1);
}

#[test]
fn invept_and_invvpid_operands() {
    let mut t = root(|a| {
        prologue(a)?;
        a.vmxon(qword_ptr(rbx))?;
        a.vmptrld(qword_ptr(rbx + 8))?;
        a.mov(eax, 2u32)?;
        a.invept(rax, xmmword_ptr(rbx + 16))?;
        record(a)?;
        a.mov(eax, 3u32)?;
        a.invept(rax, xmmword_ptr(rbx + 16))?;
        record(a)?;
        a.mov(eax, 1u32)?; // single context, VPID 1
        a.invvpid(rax, xmmword_ptr(rbx + 32))?;
        record(a)?;
        a.mov(eax, 1u32)?; // VPID 0
        a.invvpid(rax, xmmword_ptr(rbx + 16))?;
        record(a)?;
        a.mov(eax, 0u32)?; // individual address, not canonical
        a.invvpid(rax, xmmword_ptr(rbx + 48))?;
        record(a)?;
        a.hlt()
    });
    ptrs(&t, &[VMXON, VMCS, 0, 0, 1, 0, 1, 1 << 60]);
    assert_eq!(t.run(), CpuExit::Hlt);
    let bad = Err(VmFail::Valid(error::INVALID_INVEPT_INVVPID_OPERAND));
    assert_eq!(outcome(&t, 0), Ok(()));
    assert_eq!(outcome(&t, 1), bad);
    assert_eq!(outcome(&t, 2), Ok(()));
    assert_eq!(outcome(&t, 3), bad);
    assert_eq!(outcome(&t, 4), bad);
}

#[test]
fn cr4_vmxe_and_cr0_fixed_bits_in_vmx_operation() {
    let mut t = root(|a| {
        a.mov(rbx, PTRS)?;
        a.vmxon(qword_ptr(rbx))?;
        a.mov(rax, cr4)?;
        a.and(rax, !(cr4::VMXE as i32))?;
        a.mov(cr4, rax)?;
        a.hlt()
    });
    ptrs(&t, &[VMXON]);
    fault_handlers(&t);
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.regs().r15, 13, "CR4.VMXE cannot be cleared");
    let mut t = root(|a| {
        a.mov(rbx, PTRS)?;
        a.vmxon(qword_ptr(rbx))?;
        a.mov(rax, cr0)?;
        a.and(rax, !0x20i32)?;
        a.mov(cr0, rax)?;
        a.hlt()
    });
    ptrs(&t, &[VMXON]);
    fault_handlers(&t);
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.regs().r15, 13, "CR0.NE is fixed to 1");
}

const EPT: u64 = 0x31_0000;
/// The guest-physical 2 MiB that EPT maps with 4 KiB pages.
const EPT_4K: u64 = 0x60_0000;

/// Turns EPT on: guest-physical 0..16 MiB maps to the same host-physical
/// addresses with 2 MiB pages (RWX, write-back), except EPT_4K.. which maps
/// with 4 KiB pages from the table at EPT + 0x3000.
fn with_ept(t: &mut T) {
    let put = |a: u64, v: u64| t.mem.write_obj(v, GuestAddress(a)).unwrap();
    put(EPT, (EPT + 0x1000) | 7);
    put(EPT + 0x1000, (EPT + 0x2000) | 7);
    for k in 0..8u64 {
        put(EPT + 0x2000 + 8 * k, (k << 21) | 7 | (6 << 3) | (1 << 7));
    }
    put(EPT + 0x2000 + 8 * 3, (EPT + 0x3000) | 7);
    for j in 0..512u64 {
        put(EPT + 0x3000 + 8 * j, (EPT_4K + (j << 12)) | 7 | (6 << 3));
    }
    set_bits(t, CPU_BASED_VM_EXEC_CONTROL, ctl::ACTIVATE_SECONDARY);
    set_bits(t, SECONDARY_VM_EXEC_CONTROL, ctl::ENABLE_EPT);
    w(&mut t.cpu, EPT_POINTER, EPT | 6 | (3 << 3));
}

/// Sets the EPT entry of guest-physical page EPT_4K + `page` * 4 KiB.
fn ept_pte(t: &T, page: u64, v: u64) {
    t.mem
        .write_obj(v, GuestAddress(EPT + 0x3000 + 8 * page))
        .unwrap();
}

#[test]
fn ept_translates_guest_physical_addresses() {
    let mut t = ready(|a| {
        a.mov(rbx, EPT_4K + 0x1000)?;
        a.mov(rax, qword_ptr(rbx + 8))?;
        a.mov(qword_ptr(rbx + 16), rax)?;
        a.cpuid()
    });
    with_ept(&mut t);
    ept_pte(&t, 1, 0x70_0000 | 7 | (6 << 3));
    t.mem.write_obj(0xabcdu64, GuestAddress(0x70_0008)).unwrap();
    assert_eq!(go(&mut t), reason::CPUID);
    assert_eq!(t.cpu.regs().rax, 0xabcd, "read through the remapping");
    assert_eq!(t.read(0x70_0010), 0xabcd, "written through it");
    assert_eq!(
        t.read(EPT_4K + 0x1010),
        0,
        "not at the guest-physical address"
    );
}

#[test]
fn ept_violations_and_misconfiguration() {
    // (guest code, EPT entry of page 2, exit reason, qualification, GPA)
    let read = |a: Asm| {
        a.mov(rbx, EPT_4K + 0x2000)?;
        a.mov(rax, qword_ptr(rbx + 8))
    };
    let write = |a: Asm| {
        a.mov(rbx, EPT_4K + 0x2000)?;
        a.mov(qword_ptr(rbx + 8), rax)
    };
    let fetch = |a: Asm| {
        a.mov(rbx, EPT_4K + 0x2000)?;
        a.jmp(rbx)
    };
    let page = EPT_4K + 0x2000;
    let cases: [(Code, u64, u32, u64, u64); 4] = [
        (read, 0, reason::EPT_VIOLATION, 0x181, page + 8),
        (
            write,
            page | 1 | (6 << 3),
            reason::EPT_VIOLATION,
            0x18a,
            page + 8,
        ),
        (
            fetch,
            page | 3 | (6 << 3),
            reason::EPT_VIOLATION,
            0x19c,
            page,
        ),
        (
            read,
            page | 2 | (6 << 3),
            reason::EPT_MISCONFIG,
            0,
            page + 8,
        ),
    ];
    for (k, (code, ent, want, qual, gpa)) in cases.into_iter().enumerate() {
        let mut t = ready(code);
        with_ept(&mut t);
        ept_pte(&t, 2, ent);
        assert_eq!(go(&mut t), want, "case {k}");
        assert_eq!(r(&t, GUEST_PHYSICAL_ADDRESS), gpa, "case {k}");
        if want == reason::EPT_VIOLATION {
            assert_eq!(r(&t, EXIT_QUALIFICATION), qual, "case {k}");
            assert_eq!(r(&t, GUEST_LINEAR_ADDRESS), gpa, "case {k}");
        }
    }
}

#[test]
fn ept_violation_on_a_guest_paging_structure() {
    // Guest-linear 16 MiB maps through a guest page table at guest-physical
    // EPT_4K + 0x6000, which EPT does not map.
    let mut t = ready(|a| {
        a.mov(rbx, 0x100_0000u64)?;
        a.mov(rax, qword_ptr(rbx))
    });
    with_ept(&mut t);
    ept_pte(&t, 6, 0);
    let pd = t.cpu.cr3 + 0x2000;
    t.mem
        .write_obj((EPT_4K + 0x6000) | 7, GuestAddress(pd + 8 * 8))
        .unwrap();
    assert_eq!(go(&mut t), reason::EPT_VIOLATION);
    assert_eq!(
        r(&t, EXIT_QUALIFICATION),
        0x81,
        "read, linear valid, not final"
    );
    assert_eq!(r(&t, GUEST_PHYSICAL_ADDRESS), EPT_4K + 0x6000);
    assert_eq!(r(&t, GUEST_LINEAR_ADDRESS), 0x100_0000);
    // An invalid EPT pointer fails the entry on the controls.
    let mut t = ready(|a| a.cpuid());
    with_ept(&mut t);
    w(&mut t.cpu, EPT_POINTER, EPT | 6 | (2 << 3));
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(
        r(&t, VM_INSTRUCTION_ERROR) as u32,
        error::ENTRY_INVALID_CONTROLS
    );
}

#[test]
fn monitor_trap_flag_exits_after_one_instruction() {
    let mut t = ready(|a| {
        a.mov(eax, 1u32)?;
        a.mov(ebx, 2u32)?;
        a.hlt()
    });
    set_bits(&mut t, CPU_BASED_VM_EXEC_CONTROL, ctl::MONITOR_TRAP_FLAG);
    assert_eq!(go(&mut t), reason::MONITOR_TRAP_FLAG);
    assert_eq!(r(&t, GUEST_RIP), GUEST + 5, "after the first instruction");
    assert_eq!(t.cpu.regs().rax, 1);
    assert_eq!(resume(&mut t), reason::MONITOR_TRAP_FLAG);
    assert_eq!(r(&t, GUEST_RIP), GUEST + 10);
}

#[test]
fn stop_on_exit_returns_to_a_rust_vmm() {
    let mut t = ready(|a| a.cpuid());
    t.cpu.vmx.stop_on_exit = true;
    assert_eq!(t.cpu.vm_entry(true), Ok(()));
    assert!(t.cpu.vmx.non_root);
    assert!(!t.cpu.take_vm_exit());
    assert_eq!(t.cpu.run(100), CpuExit::VmExit);
    assert!(!t.cpu.vmx.non_root);
    assert_eq!(r(&t, VM_EXIT_REASON), reason::CPUID as u64);
    assert_eq!(t.cpu.rip, EXIT, "the host RIP is loaded, not run");
    // An entry failure is reported without running anything.
    w(&mut t.cpu, GUEST_RFLAGS, 0);
    assert_eq!(t.cpu.vm_entry(false), Ok(()));
    assert!(t.cpu.take_vm_exit());
    assert_eq!(
        r(&t, VM_EXIT_REASON),
        (reason::INVALID_GUEST_STATE | reason::ENTRY_FAILURE) as u64
    );
    let dump = t.cpu.dump_vmcs();
    assert!(dump.contains("guest-state area:"), "{dump}");
    assert!(dump.contains("GUEST_RFLAGS"), "{dump}");
}

/// A guest reads linear 0x60_0000 three times, exiting (CPUID) in between;
/// the host remaps that page between the exits without telling the TLB.
fn remapped_reads(vpid: bool) -> (T, [u64; 3]) {
    let mut t = ready(|a| {
        a.mov(rdi, 0x60_0000u64)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.mov(r8, rax)?;
        a.cpuid()?;
        a.mov(rax, qword_ptr(rdi))?;
        a.mov(r9, rax)?;
        a.cpuid()?;
        a.mov(rax, qword_ptr(rdi))?;
        a.mov(r10, rax)?;
        a.cpuid()
    });
    if vpid {
        set_bits(&mut t, CPU_BASED_VM_EXEC_CONTROL, ctl::ACTIVATE_SECONDARY);
        set_bits(&mut t, SECONDARY_VM_EXEC_CONTROL, ctl::ENABLE_VPID);
        w(&mut t.cpu, VIRTUAL_PROCESSOR_ID, 7);
    }
    t.mem.write_obj(0x1111u64, GuestAddress(0x60_0000)).unwrap();
    t.mem.write_obj(0x2222u64, GuestAddress(0x80_0000)).unwrap();
    assert_eq!(go(&mut t), reason::CPUID);
    // Guest PDE 3 (linear 6 MiB) now maps physical 8 MiB.
    let pde = t.cpu.cr3 + 0x2000 + 3 * 8;
    t.mem.write_obj(0x80_0087u64, GuestAddress(pde)).unwrap();
    skip(&mut t);
    assert_eq!(resume(&mut t), reason::CPUID);
    if vpid {
        t.cpu.invvpid(1, 7, 0).unwrap();
    }
    skip(&mut t);
    assert_eq!(resume(&mut t), reason::CPUID);
    let g = t.cpu.regs();
    (t, [g.r8, g.r9, g.r10])
}

#[test]
fn vpid_tagged_translations_survive_exits_until_invvpid() {
    let (_, got) = remapped_reads(true);
    assert_eq!(got, [0x1111, 0x1111, 0x2222], "stale until INVVPID");
    let (_, got) = remapped_reads(false);
    assert_eq!(got, [0x1111, 0x2222, 0x2222], "no VPID: flushed on entry");
}

#[test]
fn invvpid_and_invept_drop_stored_translations() {
    let (mut t, _) = remapped_reads(true);
    assert_eq!(t.cpu.vmx.tlbs.len(), 1, "the guest's translations are kept");
    t.cpu.invvpid(0, 7, 0x60_0000).unwrap();
    assert_eq!(t.cpu.vmx.tlbs.len(), 1, "one page only");
    t.cpu.invvpid(1, 8, 0).unwrap();
    assert_eq!(t.cpu.vmx.tlbs.len(), 1, "another VPID");
    t.cpu.invvpid(2, 0, 0).unwrap();
    assert!(t.cpu.vmx.tlbs.is_empty(), "all contexts");
    let mut t = ready(|a| a.cpuid());
    with_ept(&mut t);
    set_bits(&mut t, SECONDARY_VM_EXEC_CONTROL, ctl::ENABLE_VPID);
    w(&mut t.cpu, VIRTUAL_PROCESSOR_ID, 1);
    assert_eq!(go(&mut t), reason::CPUID);
    assert_eq!(t.cpu.vmx.tlbs.len(), 1);
    t.cpu.invept(1, 0x1000).unwrap();
    assert_eq!(t.cpu.vmx.tlbs.len(), 1, "another EPT pointer");
    t.cpu.invept(1, EPT | 0x1e).unwrap();
    assert!(t.cpu.vmx.tlbs.is_empty());
}

/// A hostile root-mode guest: random VMCS contents (controls, host and
/// guest state, injected events, EPT pointers) before VMLAUNCH and
/// VMRESUME. Whatever fails must fail as VMfail, an entry-failure exit, an
/// exception or a shutdown, never as a panic.
#[test]
fn random_vmcs_contents_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        seed
    };
    let mut entered = 0;
    for _ in 0..300 {
        let mut t = ready(|a| {
            a.cpuid()?;
            a.ud2()
        });
        for _ in 0..(next() % 12) {
            let (enc, _) = FIELDS[(next() >> 33) as usize % FIELDS.len()];
            let r = next();
            let v = match r % 5 {
                0 => r,
                1 => r & 0xffff,
                2 => 1 << (r >> 58),
                3 => r.wrapping_neg() & 0xffff_f000,
                _ => u64::MAX,
            };
            let old = r_or_zero(&t, enc);
            let v = if r % 7 == 0 { v } else { old ^ (1 << (r % 64)) };
            let _ = t.cpu.vmwrite(enc as u64 | (r >> 63 & 1), v);
        }
        for _ in 0..4 {
            let launch = !t.cpu.vmx.vmcs.launched;
            let _ = t.cpu.vm_entry(launch);
            entered += t.cpu.vmx.non_root as u32;
            let _ = t.cpu.run(20_000);
            if t.cpu.vmx.non_root {
                let _ = t.cpu.run(20_000);
            }
        }
    }
    assert!(entered > 0, "some random VMCS still enters");
}

fn r_or_zero(t: &T, enc: u32) -> u64 {
    t.cpu.vmread(enc as u64).unwrap_or(0)
}

/// Random bytes as the nested guest's code, with every exiting control the
/// CPU offers and a random exception bitmap, resumed after each exit.
#[test]
fn random_guest_code_under_vmx_never_panics() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut exits = 0;
    for _ in 0..100 {
        let mut t = ready(|a| a.nop());
        let code: Vec<u8> = (0..256).map(|_| next() as u8).collect();
        t.mem.write_slice(&code, GuestAddress(GUEST)).unwrap();
        let proc = (ctl::PROC_ALLOWED1 & !ctl::NMI_WINDOW_EXITING & !ctl::MONITOR_TRAP_FLAG)
            & (next() as u32 | ctl::PROC_DEFAULT1);
        w(&mut t.cpu, CPU_BASED_VM_EXEC_CONTROL, proc as u64);
        w(
            &mut t.cpu,
            SECONDARY_VM_EXEC_CONTROL,
            ctl::ENABLE_RDTSCP as u64,
        );
        w(&mut t.cpu, EXCEPTION_BITMAP, next() & 0xffff_ffff);
        w(&mut t.cpu, IO_BITMAP_A, IO_A);
        w(&mut t.cpu, IO_BITMAP_B, IO_B);
        w(&mut t.cpu, MSR_BITMAP, MSR_BM);
        for _ in 0..8 {
            match t.cpu.run(5_000) {
                CpuExit::Hlt if !t.cpu.vmx.non_root => {
                    exits += 1;
                    skip(&mut t);
                    set_rip(&mut t, RESUME);
                }
                CpuExit::Hlt | CpuExit::Shutdown | CpuExit::Unimplemented(_) => break,
                _ => {}
            }
        }
    }
    assert!(exits > 0);
}

/// Writes MSR-list entries (index, value) at `at`.
fn msr_list(t: &T, at: u64, entries: &[(u32, u64)]) {
    for (k, (index, value)) in entries.iter().enumerate() {
        let e = at + 16 * k as u64;
        t.mem.write_obj(*index as u64, GuestAddress(e)).unwrap();
        t.mem.write_obj(*value, GuestAddress(e + 8)).unwrap();
    }
}

#[test]
fn vm_exit_msr_store_and_load_lists() {
    let guest = |a: Asm| {
        a.mov(ecx, 0xc000_0082u32)?; // IA32_LSTAR
        a.mov(eax, 0x4444_0000u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.cpuid()
    };
    let mut t = ready(guest);
    set_bits(&mut t, CPU_BASED_VM_EXEC_CONTROL, ctl::USE_MSR_BITMAPS);
    w(&mut t.cpu, MSR_BITMAP, MSR_BM);
    msr_list(&t, MSR_LIST, &[(0xc000_0082, 0)]);
    msr_list(&t, MSR_LIST + 0x100, &[(0xc000_0082, 0x5555_0000)]);
    w(&mut t.cpu, VM_EXIT_MSR_STORE_ADDR, MSR_LIST);
    w(&mut t.cpu, VM_EXIT_MSR_STORE_COUNT, 1);
    w(&mut t.cpu, VM_EXIT_MSR_LOAD_ADDR, MSR_LIST + 0x100);
    w(&mut t.cpu, VM_EXIT_MSR_LOAD_COUNT, 1);
    assert_eq!(go(&mut t), reason::CPUID);
    assert_eq!(
        t.read(MSR_LIST + 8),
        0x4444_0000,
        "the guest's value stored"
    );
    assert_eq!(t.cpu.msr.lstar, 0x5555_0000, "the host's value loaded");
    // An MSR a list may not name: VMX abort 1, the CPU shuts down.
    let mut t = ready(guest);
    msr_list(&t, MSR_LIST, &[(0xc000_0100, 0)]);
    w(&mut t.cpu, VM_EXIT_MSR_STORE_ADDR, MSR_LIST);
    w(&mut t.cpu, VM_EXIT_MSR_STORE_COUNT, 1);
    assert_eq!(t.run(), CpuExit::Shutdown);
    assert_eq!(
        t.mem.read_obj::<u32>(GuestAddress(VMCS + 4)).unwrap(),
        1,
        "abort indicator"
    );
}

#[test]
fn nmi_window_waits_for_iret_under_virtual_nmi_blocking() {
    let nmi_ctls = |t: &mut T| {
        set_bits(
            t,
            PIN_BASED_VM_EXEC_CONTROL,
            ctl::NMI_EXITING | ctl::VIRTUAL_NMIS,
        );
        set_bits(t, CPU_BASED_VM_EXEC_CONTROL, ctl::NMI_WINDOW_EXITING);
    };
    // No blocking: the window is open before the first instruction.
    let mut t = ready(|a| a.hlt());
    nmi_ctls(&mut t);
    assert_eq!(go(&mut t), reason::NMI_WINDOW);
    assert_eq!(r(&t, GUEST_RIP), GUEST);
    // Virtual-NMI blocking: the window opens after the guest's IRET.
    let mut t = ready(|a| {
        let mut after = a.create_label();
        a.mov(rax, rsp)?;
        a.push(0x18)?;
        a.push(rax)?;
        a.pushfq()?;
        a.push(0x10)?;
        a.lea(rax, ptr(after))?;
        a.push(rax)?;
        a.iretq()?;
        a.set_label(&mut after)?;
        a.nop()?;
        a.hlt()
    });
    nmi_ctls(&mut t);
    w(&mut t.cpu, GUEST_INTERRUPTIBILITY_INFO, 8);
    assert_eq!(go(&mut t), reason::NMI_WINDOW);
    assert_eq!(r(&t, GUEST_RIP), GUEST + 19, "right after IRETQ");
    assert_eq!(r(&t, GUEST_INTERRUPTIBILITY_INFO) & 8, 0);
    // NMI-window exiting without virtual NMIs is an invalid control.
    let mut t = ready(|a| a.hlt());
    set_bits(&mut t, CPU_BASED_VM_EXEC_CONTROL, ctl::NMI_WINDOW_EXITING);
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(
        r(&t, VM_INSTRUCTION_ERROR) as u32,
        error::ENTRY_INVALID_CONTROLS
    );
}

#[test]
fn rdtscp_exits_with_rdtsc_exiting_when_enabled() {
    let mut t = ready(|a| a.rdtscp());
    set_bits(
        &mut t,
        CPU_BASED_VM_EXEC_CONTROL,
        ctl::ACTIVATE_SECONDARY | ctl::RDTSC_EXITING,
    );
    set_bits(&mut t, SECONDARY_VM_EXEC_CONTROL, ctl::ENABLE_RDTSCP);
    assert_eq!(go(&mut t), reason::RDTSCP);
    assert_eq!(r(&t, VM_EXIT_INSTRUCTION_LEN), 3);
}

#[test]
fn ept_violation_during_event_delivery_reports_idt_vectoring() {
    let mut t = ready(|a| a.ud2());
    with_ept(&mut t);
    ept_pte(&t, 7, 0);
    w(&mut t.cpu, GUEST_IDTR_BASE, EPT_4K + 0x7000);
    assert_eq!(go(&mut t), reason::EPT_VIOLATION);
    assert_eq!(r(&t, GUEST_PHYSICAL_ADDRESS), EPT_4K + 0x7000 + 6 * 16);
    assert_eq!(r(&t, EXIT_QUALIFICATION), 0x181);
    assert_eq!(
        r(&t, IDT_VECTORING_INFO_FIELD),
        0x8000_0306,
        "#UD was being delivered"
    );
    assert_eq!(r(&t, GUEST_RIP), GUEST);
}

#[test]
fn init_is_blocked_in_root_and_exits_in_non_root() {
    let mut t = ready(|a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.jmp(l)
    });
    t.cpu.signal_init(); // in root: pending
    assert!(!t.cpu.vmx.non_root);
    assert_eq!(go(&mut t), reason::INIT, "delivered once the guest runs");
    assert_eq!(r(&t, GUEST_RIP), GUEST);
    // Activity state saved as the guest had it.
    let mut t = ready(|a| a.hlt());
    assert_eq!(t.run(), CpuExit::Hlt, "halted in non-root");
    t.cpu.signal_init();
    assert_eq!(go(&mut t), reason::INIT);
    assert_eq!(r(&t, GUEST_ACTIVITY_STATE), 1, "HLT");
}
