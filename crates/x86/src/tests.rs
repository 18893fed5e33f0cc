//! Unit tests of the CPU: tiny programs assembled with iced-x86, run on 16 MiB
//! of guest RAM.

use iced_x86::code_asm::*;
use vcpu::{DescriptorTable, Regs, SRegs, Segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use arch::{gdt_entry, rflags};

use crate::{Cpu, CpuExit, CpuidTable, PhysMem};

pub(crate) const CODE: u64 = 0x10_0000;
pub(crate) const STACK: u64 = 0x8_0000;
pub(crate) const IDT: u64 = 0x8000;
pub(crate) const GDT: u64 = 0x9000;
pub(crate) const TSS: u64 = 0xa000;
pub(crate) const PML4: u64 = 0x20_0000;
pub(crate) const HANDLER: u64 = 0x18_0000;
pub(crate) const KSTACK: u64 = 0x7_0000;

pub(crate) struct T {
    pub(crate) cpu: Cpu,
    pub(crate) mem: GuestMemoryMmap<()>,
}

pub(crate) fn asm(
    bits: u32,
    at: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).unwrap();
    f(&mut a).unwrap();
    a.assemble(at).unwrap()
}

impl T {
    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// 64-bit mode, CPL 0, paging: 0..16 MiB identity-mapped with 2 MiB user
    /// pages, plus kernel and user segments, a TSS and an empty IDT.
    pub(crate) fn long(code: &[u8]) -> T {
        let mem = Self::mem();
        let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).unwrap();
        // GDT: 0x10 kernel code64, 0x18 kernel data, 0x20 (STAR base), 0x28
        // user data, 0x30 user code64, 0x38 TSS (16 bytes), 0x48 code32.
        let entries = [
            0,
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            0,
            gdt_entry(0xc0f3, 0, 0xfffff),
            gdt_entry(0xa0fb, 0, 0xfffff),
            gdt_entry(0x0089, TSS, 0x67),
            0,
            gdt_entry(0xc09b, 0, 0xfffff),
        ];
        for (k, e) in entries.iter().enumerate() {
            w(*e, GDT + 8 * k as u64);
        }
        w(KSTACK, TSS + 4); // RSP0
        w(0x6_0000, TSS + 0x24); // IST1
        w((PML4 + 0x1000) | 7, PML4);
        w((PML4 + 0x2000) | 7, PML4 + 0x1000);
        for k in 0..8u64 {
            w((k << 21) | 0x87, PML4 + 0x2000 + 8 * k);
        }
        mem.write_slice(code, GuestAddress(CODE)).unwrap();
        let mut cpu = Cpu::new(PhysMem::new(&mem), CpuidTable::software_cpu(false, None));
        let data = Segment::flat(0x18, false, false, true);
        let sregs = SRegs {
            cs: Segment::flat(0x10, true, true, false),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: Segment::tss(0x38, TSS, 0x67),
            ldt: Segment {
                unusable: true,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: GDT,
                limit: (entries.len() * 8 - 1) as u16,
            },
            idt: DescriptorTable {
                base: IDT,
                limit: 256 * 16 - 1,
            },
            cr0: 0x8005_0033,
            cr3: PML4,
            cr4: 0x6a0,
            efer: 0xd01,
            ..Default::default()
        };
        cpu.set_sregs(&sregs);
        cpu.set_regs(&Regs {
            rip: CODE,
            rsp: STACK,
            rflags: 2,
            ..Default::default()
        });
        T { cpu, mem }
    }

    /// Installs a 64-bit gate (type 0xe interrupt, 0xf trap) for `v`.
    pub(crate) fn gate(&self, v: u64, handler: u64, dpl: u64, ist: u64) {
        let lo = (handler & 0xffff)
            | (0x10 << 16)
            | (ist << 32)
            | ((0x8e00 | (dpl << 13)) << 32)
            | ((handler >> 16 & 0xffff) << 48);
        self.mem.write_obj(lo, GuestAddress(IDT + v * 16)).unwrap();
        self.mem
            .write_obj(handler >> 32, GuestAddress(IDT + v * 16 + 8))
            .unwrap();
    }

    pub(crate) fn code_at(
        &self,
        at: u64,
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) {
        let c = asm(64, at, f);
        self.mem.write_slice(&c, GuestAddress(at)).unwrap();
    }

    pub(crate) fn run(&mut self) -> CpuExit {
        self.cpu.note_external_writes();
        loop {
            match self.cpu.run(10_000_000) {
                CpuExit::Budget => continue,
                e => return e,
            }
        }
    }

    pub(crate) fn read(&self, a: u64) -> u64 {
        self.mem.read_obj(GuestAddress(a)).unwrap()
    }
}

fn long(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> T {
    T::long(&asm(64, CODE, f))
}

#[test]
fn arithmetic_and_flags() {
    let mut t = long(|a| {
        a.mov(rax, u64::MAX)?;
        a.add(rax, 1)?; // CF, ZF
        a.pushfq()?;
        a.pop(r8)?;
        a.mov(eax, 0x7fff_ffffu32)?;
        a.add(eax, 1)?; // OF, SF
        a.pushfq()?;
        a.pop(r9)?;
        a.mov(rbx, 10u64)?;
        a.stc()?;
        a.adc(rbx, 5)?; // 16
        a.mov(rcx, 3u64)?;
        a.stc()?;
        a.sbb(rcx, 5)?; // -3
        a.mov(rax, 0x1_0000_0000u64)?;
        a.mov(rdx, 0u64)?;
        a.mov(rsi, 7u64)?;
        a.div(rsi)?; // rax = 0x24924924, rdx = 4
        a.mov(r10, rax)?;
        a.mov(r11, rdx)?;
        a.mov(rax, -100i64)?;
        a.cqo()?;
        a.mov(rsi, 7u64)?;
        a.idiv(rsi)?; // -14 r -2
        a.mov(r12, rax)?;
        a.mov(r13, rdx)?;
        a.mov(rax, 0x8000_0000_0000_0000u64)?;
        a.mov(rsi, 2u64)?;
        a.mul(rsi)?; // rdx = 1, rax = 0, CF
        a.mov(r14, rdx)?;
        a.mov(eax, 0x1234u32)?;
        a.bsr(r15d, eax)?; // 12
        a.mov(edi, 0xf0u32)?;
        a.bt(edi, 4)?;
        a.setc(dil)?; // edi low byte = 1
        a.rol(eax, 4)?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.r8 & (rflags::CF | rflags::ZF), rflags::CF | rflags::ZF);
    assert_eq!(
        r.r9 & (rflags::OF | rflags::SF | rflags::CF),
        rflags::OF | rflags::SF
    );
    assert_eq!(r.rbx, 16);
    assert_eq!(r.rcx, (-3i64) as u64);
    assert_eq!((r.r10, r.r11), (0x2492_4924, 4));
    assert_eq!((r.r12, r.r13), ((-14i64) as u64, (-2i64) as u64));
    assert_eq!(r.r14, 1);
    assert_eq!(r.r15, 12);
    assert_eq!(r.rdi & 0xff, 1);
    assert_eq!(r.rax, 0x12340);
}

#[test]
fn divide_error_reaches_the_guest_handler() {
    let mut t = long(|a| {
        a.xor(ecx, ecx)?;
        a.mov(eax, 5u32)?;
        a.div(ecx)?;
        a.hlt()
    });
    t.gate(0, HANDLER, 0, 0);
    t.code_at(HANDLER, |a| {
        a.mov(r15, qword_ptr(rsp))?; // faulting RIP
        a.mov(r14, 0xdeu64)?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.r14, 0xde);
    assert_eq!(r.r15, CODE + 2 + 5, "#DE is a fault: RIP of the DIV");
}

#[test]
fn strings_and_exchanges() {
    let mut t = long(|a| {
        // memmove backwards with DF=1.
        a.mov(rsi, 0x30_0000u64 + 7)?;
        a.mov(rdi, 0x30_0000u64 + 9)?;
        a.mov(ecx, 8u32)?;
        a.std()?;
        a.rep().movsb()?;
        a.cld()?;
        // repe cmpsb stops at the first difference.
        a.mov(rsi, 0x30_0100u64)?;
        a.mov(rdi, 0x30_1000u64)?;
        a.mov(ecx, 100u32)?;
        a.repe().cmpsb()?;
        a.mov(r8, rcx)?;
        // repne scasb finds a byte.
        a.mov(rdi, 0x30_1000u64)?;
        a.mov(al, 0x33)?;
        a.mov(ecx, 100u32)?;
        a.repne().scasb()?;
        a.mov(r9, rdi)?;
        // rep stosq.
        a.mov(rdi, 0x30_2000u64)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(ecx, 4u32)?;
        a.rep().stosq()?;
        // cmpxchg and xadd.
        a.mov(rbx, 0x30_3000u64)?;
        a.mov(qword_ptr(rbx), 5)?;
        a.mov(eax, 5u32)?;
        a.mov(ecx, 9u32)?;
        a.lock().cmpxchg(qword_ptr(rbx), rcx)?;
        a.setz(r10b)?;
        a.mov(edx, 3u32)?;
        a.lock().xadd(qword_ptr(rbx), rdx)?;
        a.mov(r11, qword_ptr(rbx))?; // 12
        a.mov(r12, rdx)?; // 9
        a.hlt()
    });
    t.mem
        .write_slice(b"0123456789abcdef", GuestAddress(0x30_0000))
        .unwrap();
    t.mem
        .write_slice(b"012345x789abcdef", GuestAddress(0x30_1000))
        .unwrap();
    t.mem
        .write_slice(b"0123456789abcdef", GuestAddress(0x30_0100))
        .unwrap();
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    let mut b = [0u8; 16];
    t.mem.read_slice(&mut b, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(&b, b"0101234567abcdef");
    assert_eq!(r.r8, 100 - 7, "repe cmpsb stopped after the 7th byte");
    assert_eq!(r.r9, 0x30_1000 + 4);
    assert_eq!(t.read(0x30_2018), 0x1122_3344_5566_7788);
    assert_eq!(r.r10 & 0xff, 1);
    assert_eq!((r.r11, r.r12), (12, 9));
}

/// REP STOS and REP MOVS forward run a page at a time where the TLB maps
/// RAM (`Cpu::rep_bulk`): across pages, misaligned, past the interpreter's
/// chunk (the instruction goes on at the next step), and a MOVS whose bytes
/// overlap (element by element: it replicates its first byte), each equal
/// to the architectural element-by-element result.
#[test]
fn rep_movs_and_stos_run_in_bulk_as_element_by_element() {
    let mut t = long(|a| {
        a.mov(rdi, 0x30_0ff4u64)?;
        a.mov(eax, 0xa1b2_c3d4u32)?;
        a.mov(ecx, 1000u32)?;
        a.rep().stosd()?;
        a.mov(r8, rdi)?;
        a.mov(r9, rcx)?;
        a.mov(rsi, 0x31_0000u64)?;
        a.mov(rdi, 0x31_0001u64)?;
        a.mov(ecx, 100u32)?;
        a.rep().movsb()?;
        a.mov(rsi, 0x32_0ffdu64)?;
        a.mov(rdi, 0x33_0ffbu64)?;
        a.mov(ecx, 600u32)?;
        a.rep().movsq()?;
        a.mov(r10, rsi)?;
        a.mov(r11, rdi)?;
        a.mov(rdi, 0x34_0000u64)?;
        a.mov(al, 0x5a)?;
        a.mov(ecx, 20000u32)?;
        a.rep().stosb()?;
        a.mov(r12, rdi)?;
        a.mov(r13, rcx)?;
        a.hlt()
    });
    let src: Vec<u8> = (0..4800u32).map(|k| (k * 7 + 3) as u8).collect();
    t.mem.write_slice(&src, GuestAddress(0x32_0ffd)).unwrap();
    t.mem.write_slice(b"Q", GuestAddress(0x31_0000)).unwrap();
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    let bytes = |at: u64, n: usize| {
        let mut b = vec![0u8; n];
        t.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    };
    let want: Vec<u8> = std::iter::repeat_n(0xa1b2_c3d4u32.to_le_bytes(), 1000)
        .flatten()
        .collect();
    assert_eq!(bytes(0x30_0ff4, 4000), want, "rep stosd across pages");
    assert_eq!((r.r8, r.r9), (0x30_0ff4 + 4000, 0));
    assert_eq!(
        bytes(0x31_0000, 101),
        vec![b'Q'; 101],
        "overlapping rep movsb"
    );
    assert_eq!(
        bytes(0x33_0ffb, 4800),
        src,
        "misaligned rep movsq across pages"
    );
    assert_eq!((r.r10, r.r11), (0x32_0ffd + 4800, 0x33_0ffb + 4800));
    assert_eq!(bytes(0x34_0000, 20001)[..20000], vec![0x5a; 20000][..]);
    assert_eq!(bytes(0x34_0000 + 20000, 1), [0]);
    assert_eq!((r.r12, r.r13), (0x34_0000 + 20000, 0), "past the chunk");
}

#[test]
fn page_fault_error_codes_and_accessed_dirty_bits() {
    // A 4 KiB page table for 0x40_0000..: page 0 read-only, page 1 absent,
    // page 2 writable.
    let pt = 0x21_0000u64;
    let mut t = long(|a| {
        a.mov(rbx, 0x40_0000u64)?;
        a.mov(rax, qword_ptr(rbx))?; // read: sets A
        a.mov(qword_ptr(rbx + 0x2000), rax)?; // write: sets A and D
        a.mov(qword_ptr(rbx), rax)?; // #PF: present, write, supervisor (WP)
        a.hlt()
    });
    t.mem
        .write_obj(pt | 7, GuestAddress(PML4 + 0x2000 + 16))
        .unwrap();
    t.mem.write_obj(0x50_0000u64 | 5, GuestAddress(pt)).unwrap();
    t.mem
        .write_obj(0x50_2000u64 | 7, GuestAddress(pt + 16))
        .unwrap();
    t.gate(14, HANDLER, 0, 0);
    t.code_at(HANDLER, |a| {
        a.pop(r14)?;
        a.mov(r15, cr2)?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.r14, 3, "present | write");
    assert_eq!(r.r15, 0x40_0000);
    assert_eq!(t.read(pt) & 0x60, 0x20, "accessed, not dirty");
    assert_eq!(t.read(pt + 16) & 0x60, 0x60, "accessed and dirty");
    assert_eq!(t.read(0x50_2000), 0);
}

/// SYSCALL/SYSRET and an interrupt gate from CPL 3 with the stack switch
/// through TSS.RSP0; a privileged instruction at CPL 3 raises #GP.
#[test]
fn user_mode_syscall_int_and_gp() {
    const USER: u64 = 0x14_0000;
    const ENTRY: u64 = 0x15_0000;
    let mut t = T::long(&[]);
    // Fix the TSS descriptor type to available for LTR.
    t.mem
        .write_obj(gdt_entry(0x0089, TSS, 0x67), GuestAddress(GDT + 0x38))
        .unwrap();
    t.code_at(USER, |a| {
        a.mov(r8, 1u64)?;
        a.syscall()?;
        a.mov(r9, 2u64)?;
        a.int(0x80)?;
        a.mov(r10, 3u64)?;
        a.cli()?; // #GP at CPL 3 (IOPL 0)
        a.hlt()
    });
    t.code_at(ENTRY, |a| {
        a.mov(r12, rcx)?; // return address
        a.pushfq()?;
        a.pop(r13)?;
        a.sysretq()
    });
    t.gate(0x80, HANDLER, 3, 0);
    t.code_at(HANDLER, |a| {
        a.mov(rax, qword_ptr(rsp + 8))?; // CS
        a.mov(rbx, qword_ptr(rsp + 32))?; // SS
        a.mov(rdx, rsp)?;
        a.iretq()
    });
    t.gate(13, HANDLER + 0x100, 0, 1);
    t.code_at(HANDLER + 0x100, |a| {
        a.pop(rsi)?; // error code
        a.mov(rdi, rsp)?;
        a.hlt()
    });
    let code = asm(64, CODE, |a| {
        a.mov(ecx, 0xc000_0081u32)?;
        a.xor(eax, eax)?;
        a.mov(edx, 0x0020_0010u32)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0082u32)?;
        a.mov(eax, ENTRY as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0084u32)?;
        a.mov(eax, 0x200u32)?;
        a.wrmsr()?;
        a.mov(ax, 0x38)?;
        a.ltr(ax)?;
        a.mov(rcx, USER)?;
        a.mov(r11d, 0x202u32)?;
        a.mov(rsp, 0x9_0000u64)?;
        a.sysretq()
    });
    t.mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!((r.r8, r.r9, r.r10), (1, 2, 3));
    assert_eq!(r.r12, USER + 10 + 2, "RCX = the instruction after SYSCALL");
    assert_eq!(r.r13 & rflags::IF, 0, "FMASK cleared IF");
    assert_eq!(r.rax, 0x33, "user CS on the interrupt frame");
    assert_eq!(r.rbx, 0x2b, "user SS on the interrupt frame");
    assert_eq!(r.rdx, KSTACK - 40, "stack switched to RSP0");
    assert_eq!(r.rsi, 0, "#GP(0)");
    assert_eq!(r.rdi, 0x6_0000 - 40, "IST1 stack");
    assert_eq!(t.cpu.cpl, 0);
    assert_eq!(
        t.read(GDT + 0x38) >> 40 & 0xf,
        0xb,
        "LTR marked the TSS busy"
    );
}

#[test]
fn self_modifying_code_is_seen() {
    let mut t = long(|a| {
        let mut l = a.create_label();
        a.mov(ecx, 3u32)?;
        a.set_label(&mut l)?;
        a.mov(eax, 1u32)?; // imm32 patched below
        a.add(ebx, eax)?;
        a.mov(dword_ptr(CODE + 5 + 1), 10)?; // patch the imm32
        a.dec(ecx)?;
        a.jnz(l)?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.regs().rbx, 1 + 10 + 10);
}

/// A store into a part of a code page that holds no decoded instruction yet,
/// then a jump there: the new bytes run, not those the page held when its
/// first instruction was decoded.
#[test]
fn code_written_before_its_first_fetch_is_seen() {
    let target = CODE + 0x200;
    let mut t = long(|a| {
        a.mov(dword_ptr(target + 1), 2)?; // patch the imm32 of `mov eax, 1`
        a.mov(rbx, target)?;
        a.jmp(rbx)
    });
    t.code_at(target, |a| {
        a.mov(eax, 1u32)?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.regs().rax, 2);
}

#[test]
fn mmio_read_modify_write_restarts_cleanly() {
    let mut t = long(|a| {
        a.mov(rbx, 0xd000_0000u64)?;
        a.mov(eax, 5u32)?;
        a.add(dword_ptr(rbx + 4), eax)?;
        a.mov(ecx, dword_ptr(rbx))?;
        a.hlt()
    });
    // The MMIO hole needs identity mapping: 1 GiB pages for 3..4 GiB.
    t.mem
        .write_obj((3u64 << 30) | 0x83, GuestAddress(PML4 + 0x1000 + 24))
        .unwrap();
    assert_eq!(t.run(), CpuExit::MmioRead { addr: 0xd000_0004 });
    assert_eq!(t.cpu.exit_data().len(), 4);
    t.cpu.exit_data().copy_from_slice(&100u32.to_le_bytes());
    assert_eq!(t.run(), CpuExit::MmioWrite { addr: 0xd000_0004 });
    assert_eq!(t.cpu.exit_data(), &105u32.to_le_bytes());
    assert_eq!(t.run(), CpuExit::MmioRead { addr: 0xd000_0000 });
    t.cpu.exit_data().copy_from_slice(&7u32.to_le_bytes());
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.regs().rcx, 7);
    assert_eq!(t.cpu.retired, 5);
}

#[test]
fn unimplemented_and_invalid_instructions() {
    // FSIN was the model's last unimplemented instruction (status 10); it
    // runs now (x87_tests.rs checks its results).
    let mut t = long(|a| {
        a.nop()?;
        a.fsin()?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    // Garbage: #UD with no handler (IDT limit 0) ends in a triple fault.
    let mut t = T::long(&[0x0f, 0x0b]);
    let mut s = t.cpu.sregs();
    s.idt.limit = 0;
    t.cpu.set_sregs(&s);
    assert_eq!(t.run(), CpuExit::Shutdown);
    // An invalid encoding goes to the guest's #UD handler.
    let mut t = T::long(&[0x0f, 0xff, 0xff]);
    t.gate(6, HANDLER, 0, 0);
    t.code_at(HANDLER, |a| {
        a.mov(r15, 0x6u64)?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.regs().r15, 6);
}

#[test]
fn ports_and_msr_exits() {
    let mut t = long(|a| {
        a.mov(dx, 0x3f8)?;
        a.in_(al, dx)?;
        a.mov(bl, al)?;
        a.out(dx, al)?;
        a.mov(ecx, 0x4000_0200u32)?;
        a.rdmsr()?;
        a.mov(r8, rax)?;
        a.wrmsr()?; // refused: #GP
        a.hlt()
    });
    t.gate(13, HANDLER, 0, 0);
    t.code_at(HANDLER, |a| {
        a.mov(r15, 0x13u64)?;
        a.hlt()
    });
    assert_eq!(
        t.run(),
        CpuExit::IoIn {
            port: 0x3f8,
            size: 1,
            count: 1
        }
    );
    t.cpu.exit_data()[0] = 0x5a;
    assert_eq!(
        t.run(),
        CpuExit::IoOut {
            port: 0x3f8,
            size: 1,
            count: 1
        }
    );
    assert_eq!(t.cpu.exit_data(), &[0x5a]);
    assert_eq!(t.run(), CpuExit::MsrRead { index: 0x4000_0200 });
    t.cpu.msr_data = 0x1234_5678_9abc;
    assert!(matches!(
        t.run(),
        CpuExit::MsrWrite {
            index: 0x4000_0200,
            ..
        }
    ));
    t.cpu.msr_fault = 1;
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.rbx & 0xff, 0x5a);
    assert_eq!(r.r8, 0x5678_9abc);
    assert_eq!(r.rdx, 0x1234);
    assert_eq!(r.r15, 0x13, "refused WRMSR raised #GP");
}

#[test]
fn protected_mode_32_bit() {
    let mem = T::mem();
    let code = asm(32, CODE, |a| {
        a.mov(eax, 0x1000u32)?;
        a.push(eax)?;
        a.pop(ebx)?;
        a.lea(ecx, dword_ptr(ebx + ebx * 2 + 4))?;
        a.mov(dword_ptr(0x20_0000), ecx)?;
        a.call(CODE + 0x40)?;
        a.hlt()
    });
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let sub = asm(32, CODE + 0x40, |a| {
        a.mov(edx, 0x77u32)?;
        a.ret()
    });
    mem.write_slice(&sub, GuestAddress(CODE + 0x40)).unwrap();
    let mut cpu = Cpu::new(PhysMem::new(&mem), CpuidTable::software_cpu(false, None));
    let data = Segment::flat(0x18, false, false, true);
    cpu.set_sregs(&SRegs {
        cs: Segment::flat(0x08, true, false, true),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        cr0: 0x11,
        ..Default::default()
    });
    cpu.set_regs(&Regs {
        rip: CODE,
        rsp: STACK,
        rflags: 2,
        ..Default::default()
    });
    let mut t = T { cpu, mem };
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.rcx, 0x3004);
    assert_eq!(r.rdx, 0x77);
    assert_eq!(r.rsp, STACK);
    assert_eq!(t.read(0x20_0000) & 0xffff_ffff, 0x3004);
}

/// A local device that raises vector 0x40 once.
pub(crate) struct OneShot(pub(crate) bool);

impl crate::Local for OneShot {
    fn claims(&self, _: u64) -> bool {
        false
    }
    fn read(&mut self, _: u64, _: &mut [u8]) {}
    fn write(&mut self, _: u64, _: &[u8]) {}
    fn poll(&mut self) -> bool {
        self.0
    }
    fn pending(&self) -> bool {
        self.0
    }
    fn ack(&mut self) -> Option<u8> {
        std::mem::take(&mut self.0).then_some(0x40)
    }
}

#[test]
fn sti_hlt_wakes_on_interrupt() {
    let mut t = long(|a| {
        a.sti()?;
        a.hlt()?;
        a.mov(r8, 8u64)?;
        a.cli()?;
        a.hlt()
    });
    t.gate(0x40, HANDLER, 0, 0);
    t.code_at(HANDLER, |a| {
        a.mov(r9, qword_ptr(rsp))?;
        a.iretq()
    });
    assert_eq!(t.run(), CpuExit::Hlt, "no interrupt yet");
    t.cpu.local = Some(Box::new(OneShot(true)));
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.r9, CODE + 2, "interrupted after HLT");
    assert_eq!(r.r8, 8);
}

/// A long tight loop retires exactly the instructions it executes and computes
/// the right sum (speed is measured by benchmarks, not here).
#[test]
fn tight_loop_retires_every_instruction() {
    let n = 5_000_000u32;
    let mut t = long(|a| {
        let mut l = a.create_label();
        a.mov(ecx, n)?;
        a.xor(eax, eax)?;
        a.set_label(&mut l)?;
        a.add(rax, rcx)?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.retired, 3 + 3 * n as u64);
    assert_eq!(t.cpu.regs().rax, (n as u64) * (n as u64 + 1) / 2);
}

/// Garbage bytes (a hostile guest) never panic the CPU: random code with
/// exception handlers that skip one byte and continue, exits answered with
/// zeros, for a bounded number of steps.
#[test]
fn garbage_never_panics() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..200 {
        let mut code = vec![0u8; 4096];
        for b in code.iter_mut() {
            *b = next() as u8;
        }
        // Bias towards 64-bit ALU/memory forms now and then.
        if round % 3 == 0 {
            for k in (0..4096).step_by(7) {
                code[k] = 0x48;
            }
        }
        let mut t = T::long(&code);
        for v in 0..32u64 {
            let with_code = matches!(v, 8 | 10..=14 | 17);
            let h = HANDLER + v * 32;
            t.gate(v, h, 0, 0);
            t.code_at(h, |a| {
                if with_code {
                    a.add(rsp, 8)?;
                }
                a.add(qword_ptr(rsp), 1)?;
                a.iretq()
            });
        }
        let mut r = t.cpu.regs();
        r.rax = next();
        r.rbx = next() & 0xff_ffff;
        r.rsi = 0x30_0000;
        r.rdi = 0x30_1000;
        r.rcx = next() & 0xffff;
        t.cpu.set_regs(&r);
        for _ in 0..200 {
            match t.cpu.run(500) {
                CpuExit::Shutdown | CpuExit::Unimplemented(_) | CpuExit::Hlt => break,
                _ => {
                    for b in t.cpu.exit_data() {
                        *b = 0;
                    }
                }
            }
        }
    }
}

/// Far JMP and far CALL through an m16:32 pointer in memory: the offset, then
/// the selector; the far CALL pushes CS and the return RIP.
#[test]
fn far_jmp_and_call_through_memory() {
    const PTR: u64 = CODE + 0x800;
    const T1: u64 = CODE + 0x400;
    const T2: u64 = CODE + 0x500;
    let mut t = long(|a| {
        a.mov(rbx, PTR)?;
        a.jmp(fword_ptr(rbx))?;
        a.hlt()
    });
    let sel = t.cpu.sregs().cs.selector;
    let t1 = asm(64, T1, |a| {
        a.mov(r8, 1u64)?;
        a.mov(rbx, PTR + 8)?;
        a.call(fword_ptr(rbx))?;
        a.hlt()
    });
    t.mem.write_slice(&t1, GuestAddress(T1)).unwrap();
    t.code_at(T2, |a| {
        a.mov(r9, qword_ptr(rsp))?;
        a.mov(r10, qword_ptr(rsp + 8))?;
        a.hlt()
    });
    for (at, target) in [(PTR, T1), (PTR + 8, T2)] {
        t.mem.write_obj(target as u32, GuestAddress(at)).unwrap();
        t.mem.write_obj(sel, GuestAddress(at + 4)).unwrap();
    }
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.r8, 1, "the far JMP reached T1");
    assert_eq!(
        r.r9,
        T1 + t1.len() as u64 - 1,
        "return RIP: the HLT after the CALL"
    );
    assert_eq!(r.r10 & 0xffff, sel as u64, "CS pushed");
}

/// A far JMP to a conforming code segment keeps the CPL (SDM vol. 3
/// 5.8.1.2): from CPL 3 into a conforming DPL 0 segment the code runs at CPL
/// 3 with CS.RPL 3, and a privileged instruction there raises #GP.
#[test]
fn conforming_code_keeps_the_cpl() {
    const PTR: u64 = CODE + 0x800;
    const T1: u64 = CODE + 0x400;
    let mut t = long(|a| {
        a.mov(rbx, PTR)?;
        a.jmp(fword_ptr(rbx))?;
        a.hlt()
    });
    t.mem
        .write_obj(gdt_entry(0xa09f, 0, 0xfffff), GuestAddress(GDT + 0x50))
        .unwrap();
    let mut s = t.cpu.sregs();
    s.gdt.limit = 0x57;
    s.cs = Segment::flat(0x33, true, true, false);
    s.ss = Segment::flat(0x2b, false, false, true);
    t.cpu.set_sregs(&s);
    assert_eq!(t.cpu.cpl, 3);
    t.code_at(T1, |a| {
        a.mov(r8, 1u64)?;
        a.cli()?;
        a.hlt()
    });
    t.mem.write_obj(T1 as u32, GuestAddress(PTR)).unwrap();
    t.mem.write_obj(0x50u16, GuestAddress(PTR + 4)).unwrap();
    t.gate(13, HANDLER, 0, 0);
    t.code_at(HANDLER, |a| {
        a.mov(r9, qword_ptr(rsp + 16))?; // CS on the #GP frame
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.r8, 1, "the far JMP reached T1");
    assert_eq!(r.r9 & 0xffff, 0x53, "CLI faulted at CPL 3 (CS.RPL 3)");
    assert_eq!(t.cpu.cpl, 0, "the handler at CPL 0");
}

/// The memory forms that the uops resolve at decode time (RIP-relative,
/// FS-relative, base + index * scale, index only), byte registers that are
/// not the low byte of a GPR (left to the generic path), and the fault of a
/// non-canonical address: #GP, or #SS when the stack pointer is the base.
#[test]
fn uop_address_forms_and_canonical_faults() {
    const DATA: u64 = 0x40_0000;
    let mut t = long(|a| {
        let mut value = a.create_label();
        let mut after = a.create_label();
        a.mov(r8, qword_ptr(value))?; // RIP-relative
        a.mov(ecx, 0xc000_0100u32)?; // FS.base = DATA
        a.mov(eax, DATA as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(rsi, 2u64)?;
        a.mov(qword_ptr(rsi * 8 + 0x10).fs(), r8)?; // DATA + 0x20
        a.mov(rdi, DATA)?;
        a.mov(r9, qword_ptr(rdi + rsi * 8 + 0x10))?;
        a.add(r9, qword_ptr(rsi * 4 + (DATA as i32 + 0x18)))?;
        a.mov(ebx, 0x1234u32)?;
        a.mov(ah, bh)?; // high byte registers: generic path
        a.movzx(esi, ah)?;
        a.cmp(r9, r8)?;
        a.setne(r11b)?;
        a.mov(rdi, 0x8000_0000_0000u64)?; // non-canonical
        a.mov(r12, qword_ptr(rdi))?; // #GP
        a.mov(rsp, rdi)?;
        a.mov(r13, qword_ptr(rsp + 8))?; // #SS
        a.hlt()?;
        a.set_label(&mut value)?;
        a.dq(&[0x1122_3344_5566_7788])?;
        a.set_label(&mut after)?;
        a.nop()
    });
    t.gate(13, HANDLER, 0, 1);
    t.gate(12, HANDLER + 0x100, 0, 1);
    // Each handler records its vector in R14 (in order) and skips the
    // faulting MOV (3 and 5 bytes long).
    t.code_at(HANDLER, |a| {
        a.shl(r14, 8)?;
        a.or(r14, 13)?;
        a.add(qword_ptr(rsp + 8), 3)?; // past the error code: RIP
        a.add(rsp, 8)?;
        a.iretq()
    });
    t.code_at(HANDLER + 0x100, |a| {
        a.shl(r14, 8)?;
        a.or(r14, 12)?;
        a.mov(r15, qword_ptr(rsp + 8))?;
        a.add(r15, 5)?;
        a.mov(qword_ptr(rsp + 8), r15)?;
        a.mov(r15, STACK)?;
        a.mov(qword_ptr(rsp + 32), r15)?; // a usable RSP to return to
        a.add(rsp, 8)?;
        a.iretq()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.r8, 0x1122_3344_5566_7788);
    assert_eq!(t.read(DATA + 0x20), r.r8, "FS-relative store");
    assert_eq!(r.r9, r.r8.wrapping_mul(2), "indexed loads");
    assert_eq!(r.rax >> 8 & 0xff, 0x12, "MOV AH, BH");
    assert_eq!(r.rsi, 0x12, "MOVZX from AH");
    assert_eq!(r.r11 & 0xff, 1);
    assert_eq!(r.r12, 0, "the faulting load wrote nothing");
    assert_eq!(r.r13, 0);
    assert_eq!(r.r14, 13 << 8 | 12, "#GP, then #SS");
}

/// The SSE2 integer, shuffle, unpack and pack instructions against the host
/// CPU (its intrinsics) on random and edge-case lanes.
#[test]
fn sse2_integer_ops_match_the_host() {
    use std::arch::x86_64::*;
    const DATA: u64 = 0x40_0000;
    const N: usize = 12;
    // SAFETY: SSE2 is part of the x86-64 baseline this crate is built for.
    let cases = unsafe { sse2_cases() }; // Lanes: random bytes mixed with 0, 0x7f, 0x80 and 0xff.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut byte = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        match seed % 8 {
            0 => 0,
            1 => 0x7f,
            2 => 0x80,
            3 => 0xff,
            _ => (seed >> 24) as u8,
        }
    };
    let inputs: Vec<(u128, u128)> = (0..N)
        .map(|k| {
            let mut v = [0u8; 32];
            v.iter_mut().for_each(|b| *b = byte());
            if k == 0 {
                // Shift counts for the shifts by XMM: a small one.
                v[16..].fill(0);
                v[16] = 5;
            }
            let a = u128::from_le_bytes(v[..16].try_into().unwrap());
            let b = u128::from_le_bytes(v[16..].try_into().unwrap());
            (a, b)
        })
        .collect();
    for (name, op, host) in &cases {
        let mut t = long(|a| {
            for k in 0..N as u64 {
                a.movdqu(xmm0, xmmword_ptr(DATA + 48 * k))?;
                a.movdqu(xmm1, xmmword_ptr(DATA + 48 * k + 16))?;
                op(a)?;
                a.movdqu(xmmword_ptr(DATA + 48 * k + 32), xmm0)?;
            }
            a.hlt()
        });
        for (k, (a, b)) in inputs.iter().enumerate() {
            let at = DATA + 48 * k as u64;
            t.mem.write_obj(*a, GuestAddress(at)).unwrap();
            t.mem.write_obj(*b, GuestAddress(at + 16)).unwrap();
        }
        assert_eq!(t.run(), CpuExit::Hlt, "{name}");
        for (k, (a, b)) in inputs.iter().enumerate() {
            let got: u128 = t
                .mem
                .read_obj(GuestAddress(DATA + 48 * k as u64 + 32))
                .unwrap();
            // SAFETY: __m128i and u128 are both 16 plain bytes.
            let want: u128 = unsafe {
                std::mem::transmute::<__m128i, u128>(host(
                    std::mem::transmute::<u128, __m128i>(*a),
                    std::mem::transmute::<u128, __m128i>(*b),
                ))
            };
            assert_eq!(got, want, "{name} of {a:#034x}, {b:#034x}");
        }
    }
}

type SseOp = fn(&mut CodeAssembler) -> Result<(), IcedError>;
type SseHost =
    fn(std::arch::x86_64::__m128i, std::arch::x86_64::__m128i) -> std::arch::x86_64::__m128i;

/// Each instruction of `sse2_integer_ops_match_the_host` with its intrinsic.
#[target_feature(enable = "sse2")]
fn sse2_cases() -> Vec<(&'static str, SseOp, SseHost)> {
    use std::arch::x86_64::*;
    vec![
        ("paddb", |a| a.paddb(xmm0, xmm1), |x, y| _mm_add_epi8(x, y)),
        ("paddw", |a| a.paddw(xmm0, xmm1), |x, y| _mm_add_epi16(x, y)),
        ("paddd", |a| a.paddd(xmm0, xmm1), |x, y| _mm_add_epi32(x, y)),
        ("psubb", |a| a.psubb(xmm0, xmm1), |x, y| _mm_sub_epi8(x, y)),
        ("psubw", |a| a.psubw(xmm0, xmm1), |x, y| _mm_sub_epi16(x, y)),
        ("psubd", |a| a.psubd(xmm0, xmm1), |x, y| _mm_sub_epi32(x, y)),
        (
            "paddusb",
            |a| a.paddusb(xmm0, xmm1),
            |x, y| _mm_adds_epu8(x, y),
        ),
        (
            "paddusw",
            |a| a.paddusw(xmm0, xmm1),
            |x, y| _mm_adds_epu16(x, y),
        ),
        (
            "psubusb",
            |a| a.psubusb(xmm0, xmm1),
            |x, y| _mm_subs_epu8(x, y),
        ),
        (
            "psubusw",
            |a| a.psubusw(xmm0, xmm1),
            |x, y| _mm_subs_epu16(x, y),
        ),
        (
            "paddsb",
            |a| a.paddsb(xmm0, xmm1),
            |x, y| _mm_adds_epi8(x, y),
        ),
        (
            "paddsw",
            |a| a.paddsw(xmm0, xmm1),
            |x, y| _mm_adds_epi16(x, y),
        ),
        (
            "psubsb",
            |a| a.psubsb(xmm0, xmm1),
            |x, y| _mm_subs_epi8(x, y),
        ),
        (
            "psubsw",
            |a| a.psubsw(xmm0, xmm1),
            |x, y| _mm_subs_epi16(x, y),
        ),
        (
            "pminub",
            |a| a.pminub(xmm0, xmm1),
            |x, y| _mm_min_epu8(x, y),
        ),
        (
            "pmaxub",
            |a| a.pmaxub(xmm0, xmm1),
            |x, y| _mm_max_epu8(x, y),
        ),
        (
            "pminsw",
            |a| a.pminsw(xmm0, xmm1),
            |x, y| _mm_min_epi16(x, y),
        ),
        (
            "pmaxsw",
            |a| a.pmaxsw(xmm0, xmm1),
            |x, y| _mm_max_epi16(x, y),
        ),
        ("pavgb", |a| a.pavgb(xmm0, xmm1), |x, y| _mm_avg_epu8(x, y)),
        ("pavgw", |a| a.pavgw(xmm0, xmm1), |x, y| _mm_avg_epu16(x, y)),
        (
            "pcmpgtb",
            |a| a.pcmpgtb(xmm0, xmm1),
            |x, y| _mm_cmpgt_epi8(x, y),
        ),
        (
            "pcmpgtw",
            |a| a.pcmpgtw(xmm0, xmm1),
            |x, y| _mm_cmpgt_epi16(x, y),
        ),
        (
            "pcmpgtd",
            |a| a.pcmpgtd(xmm0, xmm1),
            |x, y| _mm_cmpgt_epi32(x, y),
        ),
        (
            "pcmpeqb",
            |a| a.pcmpeqb(xmm0, xmm1),
            |x, y| _mm_cmpeq_epi8(x, y),
        ),
        (
            "pmullw",
            |a| a.pmullw(xmm0, xmm1),
            |x, y| _mm_mullo_epi16(x, y),
        ),
        (
            "pmulhw",
            |a| a.pmulhw(xmm0, xmm1),
            |x, y| _mm_mulhi_epi16(x, y),
        ),
        (
            "pmulhuw",
            |a| a.pmulhuw(xmm0, xmm1),
            |x, y| _mm_mulhi_epu16(x, y),
        ),
        (
            "pmuludq",
            |a| a.pmuludq(xmm0, xmm1),
            |x, y| _mm_mul_epu32(x, y),
        ),
        (
            "pmaddwd",
            |a| a.pmaddwd(xmm0, xmm1),
            |x, y| _mm_madd_epi16(x, y),
        ),
        (
            "psadbw",
            |a| a.psadbw(xmm0, xmm1),
            |x, y| _mm_sad_epu8(x, y),
        ),
        (
            "punpcklbw",
            |a| a.punpcklbw(xmm0, xmm1),
            |x, y| _mm_unpacklo_epi8(x, y),
        ),
        (
            "punpcklwd",
            |a| a.punpcklwd(xmm0, xmm1),
            |x, y| _mm_unpacklo_epi16(x, y),
        ),
        (
            "punpckldq",
            |a| a.punpckldq(xmm0, xmm1),
            |x, y| _mm_unpacklo_epi32(x, y),
        ),
        (
            "punpckhbw",
            |a| a.punpckhbw(xmm0, xmm1),
            |x, y| _mm_unpackhi_epi8(x, y),
        ),
        (
            "punpckhwd",
            |a| a.punpckhwd(xmm0, xmm1),
            |x, y| _mm_unpackhi_epi16(x, y),
        ),
        (
            "punpckhdq",
            |a| a.punpckhdq(xmm0, xmm1),
            |x, y| _mm_unpackhi_epi32(x, y),
        ),
        (
            "packsswb",
            |a| a.packsswb(xmm0, xmm1),
            |x, y| _mm_packs_epi16(x, y),
        ),
        (
            "packuswb",
            |a| a.packuswb(xmm0, xmm1),
            |x, y| _mm_packus_epi16(x, y),
        ),
        (
            "packssdw",
            |a| a.packssdw(xmm0, xmm1),
            |x, y| _mm_packs_epi32(x, y),
        ),
        (
            "pshufd",
            |a| a.pshufd(xmm0, xmm1, 0x1b),
            |_, y| _mm_shuffle_epi32::<0x1b>(y),
        ),
        (
            "pshuflw",
            |a| a.pshuflw(xmm0, xmm1, 0x9c),
            |_, y| _mm_shufflelo_epi16::<0x9c>(y),
        ),
        (
            "pshufhw",
            |a| a.pshufhw(xmm0, xmm1, 0x63),
            |_, y| _mm_shufflehi_epi16::<0x63>(y),
        ),
        (
            "shufps",
            |a| a.shufps(xmm0, xmm1, 0xb4),
            |x, y| {
                _mm_castps_si128(_mm_shuffle_ps::<0xb4>(
                    _mm_castsi128_ps(x),
                    _mm_castsi128_ps(y),
                ))
            },
        ),
        ("psllw", |a| a.psllw(xmm0, 3), |x, _| _mm_slli_epi16::<3>(x)),
        (
            "pslld",
            |a| a.pslld(xmm0, 31),
            |x, _| _mm_slli_epi32::<31>(x),
        ),
        (
            "psllq",
            |a| a.psllq(xmm0, 64),
            |x, _| _mm_slli_epi64::<64>(x),
        ),
        (
            "psrlw",
            |a| a.psrlw(xmm0, 15),
            |x, _| _mm_srli_epi16::<15>(x),
        ),
        ("psrld", |a| a.psrld(xmm0, 7), |x, _| _mm_srli_epi32::<7>(x)),
        (
            "psrlq",
            |a| a.psrlq(xmm0, 33),
            |x, _| _mm_srli_epi64::<33>(x),
        ),
        (
            "psraw",
            |a| a.psraw(xmm0, 20),
            |x, _| _mm_srai_epi16::<20>(x),
        ),
        ("psrad", |a| a.psrad(xmm0, 9), |x, _| _mm_srai_epi32::<9>(x)),
        (
            "pslldq",
            |a| a.pslldq(xmm0, 5),
            |x, _| _mm_slli_si128::<5>(x),
        ),
        (
            "psrldq",
            |a| a.psrldq(xmm0, 11),
            |x, _| _mm_srli_si128::<11>(x),
        ),
        (
            "psrlw xmm",
            |a| a.psrlw(xmm0, xmm1),
            |x, y| _mm_srl_epi16(x, y),
        ),
        (
            "pslld xmm",
            |a| a.pslld(xmm0, xmm1),
            |x, y| _mm_sll_epi32(x, y),
        ),
        (
            "psrad xmm",
            |a| a.psrad(xmm0, xmm1),
            |x, y| _mm_sra_epi32(x, y),
        ),
    ]
}

/// MOV DR: DR0-DR3 hold what is written, DR4/DR5 alias DR6/DR7 (CR4.DE
/// clear), DR6/DR7 keep their fixed bits (SDM vol. 3 18.2).
#[test]
fn debug_registers_and_their_aliases() {
    let mut t = long(|a| {
        a.mov(rax, 0x1234u64)?;
        a.mov(dr0, rax)?;
        a.mov(rbx, dr0)?;
        a.xor(eax, eax)?;
        a.mov(dr6, rax)?;
        a.mov(rcx, dr4)?; // DR6
        a.mov(eax, 0xffff_dfffu32)?; // all but GD
        a.mov(dr5, rax)?; // DR7
        a.mov(rdx, dr7)?;
        a.xor(eax, eax)?;
        a.mov(dr7, rax)?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.rbx, 0x1234);
    assert_eq!(r.rcx, 0xffff_0ff0, "DR6's fixed bits through DR4");
    assert_eq!(
        r.rdx, 0xffff_07ff,
        "DR7 through DR5: bits 11-15 but GD read 0"
    );
}

/// With CR4.DE, DR4 raises #UD; with DR7.GD, MOV DR raises #DB with DR6.BD
/// before it runs, and the #DB clears GD; DR6 bits 63:32 raise #GP.
#[test]
fn debug_register_faults() {
    for (case, vector) in [(0, 6u64), (1, 1), (2, 13)] {
        let mut t = long(|a| {
            match case {
                0 => {
                    a.mov(rax, cr4)?;
                    a.bts(rax, 3)?;
                    a.mov(cr4, rax)?;
                    a.mov(rbx, dr4)?;
                }
                1 => {
                    a.mov(eax, 0x2000u32)?;
                    a.mov(dr7, rax)?;
                    a.mov(rbx, dr0)?;
                }
                _ => {
                    a.mov(rax, 1u64 << 32)?;
                    a.mov(dr6, rax)?;
                }
            }
            a.hlt()
        });
        t.gate(vector, HANDLER, 0, 0);
        t.code_at(HANDLER, |a| {
            a.mov(r15, vector)?;
            a.mov(r13, qword_ptr(rsp + if vector == 13 { 8 } else { 0 }))?;
            a.hlt()
        });
        assert_eq!(t.run(), CpuExit::Hlt);
        let r = t.cpu.regs();
        assert_eq!(r.r15, vector, "case {case}");
        if case == 1 {
            assert_eq!(r.r13, CODE + 8, "a fault: MOV DR's RIP");
            assert_ne!(t.cpu.dbg.dr6 & 0x2000, 0, "DR6.BD");
            assert_eq!(t.cpu.dbg.dr7 & 0x2000, 0, "GD cleared");
        }
    }
}

/// Reserved bits of CR4 (features the model lacks: VME, MCE, OSXSAVE) and
/// of CR3 above MAXPHYADDR raise #GP(0).
#[test]
fn control_register_reserved_bits() {
    for bad in [0u64, 6, 18] {
        let mut t = long(|a| {
            a.mov(rax, cr4)?;
            a.bts(rax, bad as i32)?;
            a.mov(cr4, rax)?;
            a.hlt()
        });
        t.gate(13, HANDLER, 0, 0);
        t.code_at(HANDLER, |a| {
            a.mov(r15, 13u64)?;
            a.hlt()
        });
        assert_eq!(t.run(), CpuExit::Hlt);
        assert_eq!(t.cpu.regs().r15, 13, "CR4 bit {bad}");
    }
    let mut t = long(|a| {
        a.mov(rax, cr3)?;
        a.bts(rax, 46)?;
        a.mov(cr3, rax)?;
        a.hlt()
    });
    t.gate(13, HANDLER, 0, 0);
    t.code_at(HANDLER, |a| {
        a.mov(r15, 13u64)?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    assert_eq!(t.cpu.regs().r15, 13, "CR3 bit 46");
}

impl T {
    /// 32-bit protected mode, paging off (machine's Multiboot entry state),
    /// `code` at CODE.
    fn protected(code: &[u8]) -> T {
        let mem = Self::mem();
        let sregs = machine::boot::protected_mode(&mem).unwrap();
        mem.write_slice(code, GuestAddress(CODE)).unwrap();
        let mut cpu = Cpu::new(PhysMem::new(&mem), CpuidTable::software_cpu(false, None));
        cpu.set_sregs(&sregs);
        cpu.set_regs(&Regs {
            rip: CODE,
            rsp: STACK,
            rflags: 2,
            ..Default::default()
        });
        T { cpu, mem }
    }
}

/// Protected mode -> real mode (16-bit segment, CR0.PE clear, far jump) ->
/// INT through the IVT and IRET -> protected mode (SDM vol. 3 9.9).
#[test]
fn real_mode_round_trip() {
    const GDTR: u64 = 0x6100;
    const IVTR: u64 = 0x6110;
    const PM16: u64 = 0x7000;
    const REAL: u64 = 0x7100;
    const INT50: u64 = 0x7200;
    const STACK16: u64 = 0x6800;
    const PM32: u64 = CODE + 0x100;
    let far = |prefix: &[u8], off: u32, width: usize, sel: u16| {
        let mut b = prefix.to_vec();
        b.push(0xea);
        b.extend_from_slice(&off.to_le_bytes()[..width]);
        b.extend_from_slice(&sel.to_le_bytes());
        b
    };
    let mut main = asm(32, CODE, |a| a.lgdt(ptr(GDTR)));
    main.extend(far(&[], PM16 as u32, 4, 0x18));
    main.resize((PM32 - CODE) as usize, 0xcc);
    let pm32 = asm(32, PM32, |a| {
        a.mov(ax, 0x10)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(eax, cr0)?;
        a.mov(edi, eax)?;
        a.hlt()
    });
    let pm32_end = PM32 + pm32.len() as u64;
    main.extend(pm32);
    let mut t = T::protected(&main);
    let mut pm16 = asm(16, PM16, |a| {
        a.mov(ax, 0x20)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(eax, cr0)?;
        a.and(eax, !1i32)?;
        a.mov(cr0, eax)
    });
    pm16.extend(far(&[], REAL as u32, 2, 0));
    let mut real = asm(16, REAL, |a| {
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, STACK16 as i32)?;
        a.lidt(ptr(IVTR))?;
        a.int(0x50)?;
        a.mov(si, bx)?;
        a.mov(bp, sp)?;
        a.mov(eax, cr0)?;
        a.or(al, 1)?;
        a.mov(cr0, eax)
    });
    real.extend(far(&[0x66], PM32 as u32, 4, 0x08));
    let handler = asm(16, INT50, |a| {
        a.mov(bx, 0x1234)?;
        a.mov(cx, sp)?;
        a.mov(dx, word_ptr(STACK16 - 4))?;
        a.iret()
    });
    let m = &t.mem;
    m.write_slice(&pm16, GuestAddress(PM16)).unwrap();
    m.write_slice(&real, GuestAddress(REAL)).unwrap();
    m.write_slice(&handler, GuestAddress(INT50)).unwrap();
    let gdt: [u64; 5] = [
        0,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x0000_9a00_0000_ffff,
        0x0000_9200_0000_ffff,
    ];
    for (k, d) in gdt.iter().enumerate() {
        m.write_obj(*d, GuestAddress(0x6000 + 8 * k as u64))
            .unwrap();
    }
    m.write_obj(0x27u16, GuestAddress(GDTR)).unwrap();
    m.write_obj(0x6000u32, GuestAddress(GDTR + 2)).unwrap();
    m.write_obj(0x3ffu16, GuestAddress(IVTR)).unwrap();
    m.write_obj(0u32, GuestAddress(IVTR + 2)).unwrap();
    m.write_obj(INT50 as u32, GuestAddress(0x50 * 4)).unwrap();
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.rsi & 0xffff, 0x1234, "the handler ran and IRET came back");
    assert_eq!(r.rcx & 0xffff, STACK16 - 6, "FLAGS, CS, IP pushed");
    assert_eq!(r.rdx & 0xffff, 0, "CS 0 pushed");
    assert_eq!(r.rbp & 0xffff, STACK16, "IRET popped them");
    assert_eq!(r.rdi & 1, 1, "protected mode again");
    assert_eq!(t.cpu.sregs().cs.selector, 0x08);
    assert_eq!(r.rip, pm32_end);
}

/// Virtual-8086 mode under a 32-bit monitor (SDM vol. 3 ch. 20): IRETD in,
/// INT n to ring 0 with the data segments pushed and nulled, IRETD back,
/// CLI with IOPL 0 #GP(0).
#[test]
fn virtual_8086_mode() {
    const V86: u64 = 0x7000;
    const INT21: u64 = CODE + 0x200;
    const GP: u64 = CODE + 0x300;
    const IDT32: u64 = 0x5000;
    const IDTR: u64 = 0x5800;
    let mut main = asm(32, CODE, |a| {
        a.lidt(ptr(IDTR))?;
        for v in [0i32, 0, 0x700, 0, 0x600, 0x100, 0x23002, 0x700, 0] {
            a.push(v)?;
        }
        a.iretd()
    });
    main.resize((INT21 - CODE) as usize, 0xcc);
    main.extend(asm(32, INT21, |a| {
        a.mov(ecx, dword_ptr(esp + 8))?;
        a.mov(edx, dword_ptr(esp + 24))?;
        a.mov(di, ds)?;
        a.and(dword_ptr(esp + 8), !0x3000)?;
        a.iretd()
    }));
    main.resize((GP - CODE) as usize, 0xcc);
    main.extend(asm(32, GP, |a| {
        a.pop(eax)?;
        a.mov(ebp, dword_ptr(esp))?;
        a.hlt()
    }));
    let v86 = asm(16, 0, |a| {
        a.mov(ax, word_ptr(0x10))?;
        a.mov(bx, ax)?;
        a.int(0x21)?;
        a.mov(si, 0x5555)?;
        a.cli()?;
        a.hlt()
    });
    let cli_at = v86.len() as u64 - 2;
    let mut t = T::protected(&main);
    let tss = t.cpu.sregs().tr.base;
    let m = &t.mem;
    m.write_slice(&v86, GuestAddress(V86)).unwrap();
    m.write_obj(0xbeefu16, GuestAddress(V86 + 0x10)).unwrap();
    m.write_obj(0x9000u32, GuestAddress(tss + 4)).unwrap();
    m.write_obj(0x18u32, GuestAddress(tss + 8)).unwrap();
    let gate = |handler: u64, dpl: u64| -> u64 {
        (handler & 0xffff) | (0x08 << 16) | ((0x8e00 | dpl << 13) << 32) | ((handler >> 16) << 48)
    };
    m.write_obj(gate(INT21, 3), GuestAddress(IDT32 + 0x21 * 8))
        .unwrap();
    m.write_obj(gate(GP, 0), GuestAddress(IDT32 + 13 * 8))
        .unwrap();
    m.write_obj(0x7ffu16, GuestAddress(IDTR)).unwrap();
    m.write_obj(IDT32 as u32, GuestAddress(IDTR + 2)).unwrap();
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.rbx & 0xffff, 0xbeef, "DS 0x700 reaches 0x7010");
    assert_eq!(r.rcx & 0x23000, 0x23000, "EFLAGS pushed with VM, IOPL 3");
    assert_eq!(r.rdx, 0x700, "DS pushed above the frame");
    assert_eq!(r.rdi & 0xffff, 0, "DS nulled in the handler");
    assert_eq!(r.rsi & 0xffff, 0x5555, "back in virtual-8086 mode");
    assert_eq!(r.rax, 0, "#GP(0)");
    assert_eq!(r.rbp, cli_at, "CLI with IOPL 0 faults");
}

/// INVLPG of any address in a 2 MiB page drops every 4 KiB piece of it the
/// TLB holds: after the page's PDE is pointed elsewhere, a piece read
/// before the INVLPG (at another address of the page) reads the new frame.
#[test]
fn invlpg_drops_every_piece_of_a_large_page() {
    let pde = PML4 + 0x2000 + 8 * 4; // 8..10 MiB
    let mut t = long(|a| {
        a.mov(rax, qword_ptr(0x80_1000u64))?;
        a.mov(rbx, qword_ptr(0x9f_f000u64))?;
        a.mov(rcx, 0xa0_0087u64)?;
        a.mov(qword_ptr(pde), rcx)?;
        a.invlpg(byte_ptr(0x80_0000u64))?;
        a.mov(rdx, qword_ptr(0x80_1000u64))?;
        a.mov(rsi, qword_ptr(0x9f_f000u64))?;
        a.hlt()
    });
    for (at, v) in [
        (0x80_1000u64, 1u64),
        (0x9f_f000, 2),
        (0xa0_1000, 3),
        (0xbf_f000, 4),
    ] {
        t.mem.write_obj(v, GuestAddress(at)).unwrap();
    }
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!((r.rax, r.rbx, r.rdx, r.rsi), (1, 2, 3, 4));
}

/// x87 stack faults and their masked responses (SDM vol. 1 8.5.1.1), FXAM's
/// classes, and #MF at the next waiting instruction after an unmasked one
/// (8.7; CR0.NE is set here).
#[test]
fn x87_stack_faults_fxam_and_mf() {
    let mut t = long(|a| {
        a.fninit()?;
        a.fadd_2(st0, st1)?; // both empty: underflow
        a.fnstsw(ax)?;
        a.movzx(r8d, ax)?;
        a.fstp(tword_ptr(rsp - 0x800))?;
        a.fninit()?;
        for _ in 0..9 {
            a.fld1()?; // the ninth overflows
        }
        a.fnstsw(ax)?;
        a.movzx(r9d, ax)?;
        a.fxam()?; // the indefinite: NaN, negative
        a.fnstsw(ax)?;
        a.movzx(r10d, ax)?;
        a.fninit()?;
        a.fxam()?; // empty
        a.fnstsw(ax)?;
        a.movzx(r11d, ax)?;
        a.mov(word_ptr(rsp - 32), 0x37e)?; // IM clear
        a.fldcw(word_ptr(rsp - 32))?;
        a.fadd_2(st0, st1)?; // unmasked underflow: nothing written
        a.fnstsw(ax)?;
        a.movzx(r12d, ax)?;
        a.fld1()?; // #MF here
        a.hlt()
    });
    t.gate(16, HANDLER, 0, 0);
    t.code_at(HANDLER, |a| {
        a.mov(r15, qword_ptr(rsp))?;
        a.movzx(r14d, word_ptr(r15))?;
        a.hlt()
    });
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    assert_eq!(r.r8, 0x0041, "IE and SF, C1 = 0 (underflow)");
    assert_eq!(t.read(STACK - 0x800), 0xc000_0000_0000_0000);
    assert_eq!(t.read(STACK - 0x7f8) & 0xffff, 0xffff, "the indefinite");
    assert_eq!(r.r9, 0x3a41, "TOP 7, C1 = 1 (overflow), IE and SF");
    assert_eq!(r.r10, 0x3b41, "FXAM: NaN (C0), sign (C1)");
    assert_eq!(r.r11 & 0x4500, 0x4100, "FXAM: empty (C3, C0)");
    assert_eq!(r.r12 & !0x4500, 0x80c1, "unmasked: ES and B, C1 = 0, TOP 0");
    assert_eq!(r.r14, 0xe8d9, "#MF is reported at the FLD1");
}

/// A CPU in the mode of `sregs` (segments, CR0), running `code` (at
/// linear `at`) from `rip`.
fn cpu_in(sregs: SRegs, at: u64, rip: u64, code: &[u8]) -> T {
    let mem = T::mem();
    mem.write_slice(code, GuestAddress(at)).unwrap();
    let mut cpu = Cpu::new(PhysMem::new(&mem), CpuidTable::software_cpu(false, None));
    cpu.set_sregs(&sregs);
    cpu.set_regs(&Regs {
        rip,
        rsp: 0xfff0,
        rflags: 2,
        ..Default::default()
    });
    T { cpu, mem }
}

/// A 16-bit segment (limit 64 KiB) at `base`.
fn seg16(selector: u16, base: u64, code: bool) -> Segment {
    Segment {
        base,
        limit: 0xffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        s: true,
        ..Default::default()
    }
}

/// The x87 environment and save images in real mode, virtual-8086 mode and
/// protected mode with a 16-bit code segment, at both operand sizes (SDM vol. 1 figures
/// 8-9 to 8-12), each loaded back and stored again unchanged.
#[test]
fn x87_environment_layouts() {
    const IP: u64 = 0x100;
    // FLD m32 (FOP 0x106) at IP 0x104; the images at DS:0x100-0x600.
    let code = asm(16, IP, |a| {
        a.fninit()?;
        a.fld1()?;
        a.fld(dword_ptr(0x10))?;
        a.fnstenv(ptr(0x100))?;
        a.db(&[0x66, 0xd9, 0x36, 0x00, 0x02])?; // fnstenv [0x200], o32
        a.fldenv(ptr(0x100))?;
        a.fnstenv(ptr(0x300))?;
        a.db(&[0x66, 0xd9, 0x26, 0x00, 0x02])?; // fldenv [0x200], o32
        a.db(&[0x66, 0xd9, 0x36, 0x00, 0x04])?; // fnstenv [0x400], o32
        a.fnsave(ptr(0x500))?;
        a.frstor(ptr(0x500))?;
        a.fnsave(ptr(0x600))?;
        a.hlt()
    });
    let words = |t: &T, at: u64, n: usize, w: usize| -> Vec<u32> {
        let mut b = vec![0u8; n * w];
        t.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b.chunks(w)
            .map(|c| c.iter().rev().fold(0u32, |v, &x| v << 8 | x as u32))
            .collect()
    };
    let check = |t: &T, data: u64, env16: &[u32], env32: &[u32]| {
        assert_eq!(words(t, data + 0x100, 7, 2), env16, "16-bit image");
        assert_eq!(words(t, data + 0x200, 7, 4), env32, "32-bit image");
        assert_eq!(words(t, data + 0x300, 7, 2), env16, "16-bit, reloaded");
        assert_eq!(words(t, data + 0x400, 7, 4), env32, "32-bit, reloaded");
        let save = words(t, data + 0x500, 47, 2);
        assert_eq!(save[..7], *env16, "FNSAVE's 16-bit environment");
        assert_eq!(
            save[7..17],
            [0, 0, 0, 0, 0, 0, 0, 0, 0x8000, 0x3fff],
            "ST0 = 0.0, ST1 = 1.0"
        );
        assert_eq!(words(t, data + 0x600, 47, 2), save, "FRSTOR, FNSAVE again");
    };

    // Real mode: CS 0x1000, DS 0x2345; the pointers as linear addresses
    // 0x10104 and 0x23460, the opcode beside the instruction pointer's.
    let (code_base, data) = (0x1_0000, 0x2_3450);
    let sregs = SRegs {
        cs: seg16(0x1000, code_base, true),
        ds: seg16(0x2345, data, false),
        es: seg16(0, 0, false),
        fs: seg16(0, 0, false),
        gs: seg16(0, 0, false),
        ss: seg16(0, 0, false),
        cr0: 0x10,
        ..Default::default()
    };
    let mut t = cpu_in(sregs, code_base + IP, IP, &code);
    assert_eq!(t.run(), CpuExit::Hlt);
    let control = [0x037f, 0x3000, 0x1fff];
    let pointers = [0x0104, 0x1106, 0x3460, 0x2000];
    let env16: Vec<u32> = control.iter().chain(&pointers).copied().collect();
    let env32: Vec<u32> = control
        .iter()
        .map(|c| c | 0xffff_0000)
        .chain(pointers)
        .collect();
    check(&t, data, &env16, &env32);

    // Virtual-8086 mode: the real-mode layouts (its HLT is #GP at CPL 3,
    // which finds no IDT here: a triple fault ends the run).
    let v86 = SRegs { cr0: 0x11, ..sregs };
    let mut t = cpu_in(v86, code_base + IP, IP, &code);
    let mut r = t.cpu.regs();
    r.rflags |= rflags::VM;
    t.cpu.set_regs(&r);
    t.cpu.set_sregs(&v86); // CPL 3 with RFLAGS.VM
    assert_eq!(t.run(), CpuExit::Shutdown);
    check(&t, data, &env16, &env32);

    // Protected mode, a 16-bit code segment: selectors and offsets, the
    // opcode beside FCS in the 32-bit image only.
    let sregs = SRegs {
        cs: seg16(0x20, code_base, true),
        ds: seg16(0x28, data, false),
        es: seg16(0x28, data, false),
        fs: seg16(0x28, data, false),
        gs: seg16(0x28, data, false),
        ss: seg16(0x28, data, false),
        cr0: 0x11,
        ..Default::default()
    };
    let mut t = cpu_in(sregs, code_base + IP, IP, &code);
    assert_eq!(t.run(), CpuExit::Hlt);
    let env16 = [0x037f, 0x3000, 0x1fff, 0x0104, 0x20, 0x10, 0x28];
    let env32 = [
        0xffff_037f,
        0xffff_3000,
        0xffff_1fff,
        0x0104,
        0x0106_0020,
        0x10,
        0x28,
    ];
    check(&t, data, &env16, &env32);
}

/// How an access at CPL 3 ended: the vector and error code of the
/// exception (#AC or #GP), or None if the code reached its HLT... which
/// at CPL 3 is itself #GP(0) at the HLT (told apart by the frame's RIP).
fn user_access(
    ac: bool,
    off: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Option<(u64, u64)> {
    const DATA: u64 = 0x50_0000;
    let mut t = T::long(&[]);
    let user = asm(64, CODE, |a| {
        a.mov(rbx, DATA + off)?;
        a.lea(rdi, qword_ptr(rbx))?;
        f(a)?;
        a.hlt()
    });
    t.mem.write_slice(&user, GuestAddress(CODE)).unwrap();
    let end = CODE + user.len() as u64 - 1;
    for (v, h) in [(17, HANDLER), (13, HANDLER + 0x100)] {
        t.gate(v, h, 0, 0);
        t.code_at(h, |a| {
            a.mov(r14, v)?;
            a.pop(rsi)?;
            a.mov(rdi, qword_ptr(rsp))?;
            a.hlt()
        });
    }
    let mut s = t.cpu.sregs();
    s.cs = Segment::flat(0x33, true, true, false);
    s.ss = Segment::flat(0x2b, false, false, true);
    s.ds = s.ss;
    s.es = s.ss;
    s.cr0 |= arch::cr0::AM;
    t.cpu.set_sregs(&s);
    let mut r = t.cpu.regs();
    r.rflags = 2 | if ac { rflags::AC } else { 0 };
    r.rsp = 0x40_0000;
    t.cpu.set_regs(&r);
    assert_eq!(t.run(), CpuExit::Hlt);
    let r = t.cpu.regs();
    if r.r14 == 13 && r.rdi == end {
        return None;
    }
    Some((r.r14, r.rsi))
}

#[test]
fn alignment_checks_of_sse_mmx_and_x87_accesses() {
    /// The exception (vector, error code), None for none.
    type Fault = Option<(u64, u64)>;
    const AC: Fault = Some((17, 0));
    const GP: Fault = Some((13, 0));
    type Asm = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let cases: [(&str, u64, Asm, Fault); 30] = [
        (
            "movups m128, 8-aligned",
            8,
            |a| a.movups(xmm0, xmmword_ptr(rbx)),
            AC,
        ),
        (
            "movups m128, aligned",
            16,
            |a| a.movups(xmm0, xmmword_ptr(rbx)),
            None,
        ),
        ("movdqu store", 1, |a| a.movdqu(xmmword_ptr(rbx), xmm1), AC),
        ("movupd", 4, |a| a.movupd(xmm1, xmmword_ptr(rbx)), AC),
        (
            "movaps: #GP whatever AC",
            8,
            |a| a.movaps(xmm0, xmmword_ptr(rbx)),
            GP,
        ),
        (
            "addps m128: #GP",
            4,
            |a| a.addps(xmm0, xmmword_ptr(rbx)),
            GP,
        ),
        ("movss m32", 2, |a| a.movss(xmm0, dword_ptr(rbx)), AC),
        (
            "movss m32, aligned",
            4,
            |a| a.movss(xmm0, dword_ptr(rbx)),
            None,
        ),
        ("addsd m64", 4, |a| a.addsd(xmm0, qword_ptr(rbx)), AC),
        ("movlps m64", 4, |a| a.movlps(xmm0, qword_ptr(rbx)), AC),
        ("pinsrw m16", 1, |a| a.pinsrw(xmm0, word_ptr(rbx), 1), AC),
        ("movq mm, m64", 4, |a| a.movq(mm0, qword_ptr(rbx)), AC),
        ("movd m32, mm", 2, |a| a.movd(dword_ptr(rbx), mm1), AC),
        ("paddb mm, m64", 4, |a| a.paddb(mm1, qword_ptr(rbx)), AC),
        ("maskmovq, mask 0", 4, |a| a.maskmovq(mm0, mm1), AC),
        (
            "maskmovdqu, 8-aligned",
            8,
            |a| a.maskmovdqu(xmm0, xmm1),
            None,
        ),
        ("maskmovdqu", 4, |a| a.maskmovdqu(xmm0, xmm1), AC),
        ("fld m80", 4, |a| a.fld(tword_ptr(rbx)), AC),
        ("fld m80, 8-aligned", 8, |a| a.fld(tword_ptr(rbx)), None),
        ("fstp m80", 2, |a| a.fstp(tword_ptr(rbx)), AC),
        ("fld m64", 4, |a| a.fld(qword_ptr(rbx)), AC),
        ("fild m16", 1, |a| a.fild(word_ptr(rbx)), AC),
        ("fst m32", 2, |a| a.fst(dword_ptr(rbx)), AC),
        ("fnstcw", 1, |a| a.fnstcw(word_ptr(rbx)), AC),
        (
            "fnstenv, 32-bit: 4-byte aligned",
            2,
            |a| a.fnstenv(ptr(rbx)),
            AC,
        ),
        ("fnstenv, 32-bit, aligned", 4, |a| a.fnstenv(ptr(rbx)), None),
        (
            "fldenv, 16-bit: 2-byte",
            2,
            |a| a.db(&[0x66, 0xd9, 0x23]),
            None,
        ),
        ("fnsave, 16-bit", 1, |a| a.db(&[0x66, 0xdd, 0x33]), AC),
        ("frstor", 2, |a| a.frstor(ptr(rbx)), AC),
        ("fxsave: #GP, not #AC", 8, |a| a.fxsave(ptr(rbx)), GP),
    ];
    for (what, off, f, want) in cases {
        assert_eq!(user_access(true, off, f), want, "{what}");
        if want == AC {
            assert_eq!(user_access(false, off, f), None, "{what}, RFLAGS.AC clear");
        }
    }
}
