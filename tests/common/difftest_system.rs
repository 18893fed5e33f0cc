//! System-level differential cases: what CPL 3 code makes the CPU do at
//! the architecture's edges, compared between engines (`kvm`, whose guest
//! ring 3 runs natively also on a PVM host, against `emu` and `bt`).
//!
//! Each sequence runs at CPL 3 like the integer ones (same page tables,
//! scratch memory and random registers) under a random *system state*:
//! IOPL 0 or 3, CR0.AM, CR4.TSD and RFLAGS.AC. A few integer instructions
//! from the integer generator surround one to three *cases*: privileged
//! instructions (#GP(0)), IOPL-sensitive ones (CLI, STI, IN, OUT, INS,
//! OUTS), page faults on special pages (read-only, not present,
//! supervisor, NX, a reserved bit, beyond the mapped GiB; reads, writes,
//! read-modify-writes, fetches, accesses that cross into the next page),
//! non-canonical addresses (#GP(0), #SS(0) through RSP/RBP), segment
//! register loads with null, out-of-limit, LDT, DPL, not-present, system,
//! read-only and execute-only selectors, INT n through gates of DPL 0 and
//! 3, INT3/INTO/INT1, #DE (division by zero and quotient overflow), #UD
//! (invalid encodings), #AC (integer, SSE, MMX and x87 accesses, the x87
//! environment and save areas, FXSAVE/FXRSTOR's #GP), PUSHF/POPF of
//! IF/IOPL/AC/DF/NT/ID, RDTSC with CR4.TSD, SMSW/SGDT/SIDT/STR/SLDT and
//! LAR/LSL/VERR/VERW. The integer generator's fillers include its SSE
//! and MMX instructions (a misaligned MOVUPS or MASKMOVQ with AC set is
//! #AC too), from the XMM, MXCSR, x87 and MM state the integer sequences
//! start from (`load_simd_state`). The sequence
//! ends with UD2, so every run ends in an exception: every vector has an
//! interrupt gate (DPL 3 for vectors 3, 4 and 0x80, else 0) to a ring-0
//! stub `out 0x81, al` (the stub's address gives the vector), on the
//! TSS's RSP0 stack.
//!
//! Compared: the vector, the error code (vectors that push one), the
//! frame (RIP, CS, RFLAGS, RSP, SS), CR2 after a #PF, every GPR at the
//! stub, RFLAGS at the stub, the selectors of DS, ES, FS and GS, and the
//! scratch memory. Arithmetic flags the SDM leaves undefined are masked as
//! for the integer sequences, IOPL as PVM reports it as 0 after an exit;
//! against `kvm`, RFLAGS.AC at the stub too: PVM enters the guest's ring 0
//! with AC clear, where the CPU keeps it (Linux clears it with CLAC at
//! every entry for that reason); the frame's RFLAGS has it on both. PVM
//! pushes RFLAGS.NT clear in the frame (POPF may set it at CPL 3), so
//! against `kvm` the frame's NT is not compared either.
//!
//! Not generated against `kvm` (the model and this host differ by design,
//! docs/cpu-model.md): RDTSCP and RDPID (the model has RDTSCP, not RDPID; a
//! PVM host offers no RDTSCP but its ring 3 runs RDPID natively). Where
//! PVM itself differs from the CPU (docs/cpu-model.md, "Differential
//! testing against PVM"), against `kvm`:
//! - ring 3 runs with the host's IOPL, 0: PUSHF shows IOPL 0, CLI and STI
//!   give #GP(0) under the guest's IOPL 3, and port I/O is allowed by the
//!   TSS I/O bitmap alone (which lets the integer sequences' final `out
//!   0x80` through): every sequence has IOPL 0;
//! - the guest's CR0.AM is ignored (ring 3 runs with the host's, set):
//!   every sequence has CR0.AM set;
//! - so is its CR4.TSD (RDTSC runs natively at CPL 3): CR4.TSD stays clear;
//! - a misaligned FXSAVE or FXRSTOR completes at CPL 3 (the SDM, and the
//!   CPU, give #GP(0)): not generated;
//! - a host interrupt between POPF and PUSHF returns to ring 3 with NT
//!   clear: POPF does not set NT;
//! - INT1 (ICEBP) delivers #DB with the RIP of INT1 in the frame, where
//!   the CPU pushes the next instruction's (a trap): not generated;
//! - segment-register loads, SGDT, SIDT, SLDT, STR, LAR, LSL, VERR and
//!   VERW run natively on the host's descriptor tables and segment
//!   registers (LSL of 0x2b finds the host's flat user data segment, MOV
//!   from GS reads 0 where the guest's GS is 0x2b): not generated;
//! - INT n from ring 3 gives #UD but for INT 3 and INT 4 (the CPU gives
//!   #GP(n * 8 + 2) through a DPL-0 gate, or delivers it through a DPL-3
//!   one): only those two are generated.

use super::*;

use arch::rflags::{AC, IF};
/// RFLAGS.NT.
const NT: u64 = 1 << 14;
use iced_x86::BlockEncoderOptions;

/// The interrupt descriptor table, its ring-0 stubs, the TSS and the ring-0
/// stack, all in the supervisor-only first 2 MiB.
const IDT_BASE: u64 = 0x8000;
const STUBS: u64 = 0xa000;
const TSS: u64 = 0x700;
const KSTACK: u64 = 0x9_0000;
/// A page table for the special pages at TEST_PAGES.
const TEST_PT: u64 = 0xc000;
const TEST_PAGES: u64 = 0x80_0000;
/// The stubs write here.
const FAULT_PORT: u16 = 0x81;
/// GDT entries after the integer harness's eight.
const EXTRA_GDT: [u64; 5] = [
    gdt_entry(0xc073, 0, 0xfffff), // 0x40: user data, not present
    gdt_entry(0xc0f1, 0, 0xfffff), // 0x48: user data, read-only
    gdt_entry(0xc0f9, 0, 0xfffff), // 0x50: user code, execute-only
    gdt_entry(0xc0d3, 0, 0xfffff), // 0x58: data, DPL 2
    gdt_entry(0xc09f, 0, 0xfffff), // 0x60: conforming readable code, DPL 0
];
/// Special 4 KiB pages at TEST_PAGES + 0x1000 * index (the rest of the
/// 2 MiB is user read/write).
const PAGE_RO: u64 = 0;
const PAGE_NP: u64 = 1;
const PAGE_SUP: u64 = 2;
const PAGE_NX: u64 = 3;
const PAGE_RSVD: u64 = 4;
const PAGE_SUP_RO: u64 = 5;
const PAGE_RW: u64 = 6;
/// Vectors whose exceptions push an error code.
const ERROR_CODE: u64 = (1 << 8) | (0x1f << 10) | (1 << 17) | (1 << 21) | (3 << 29);

/// Stops the VMM loop when a ring-0 stub runs.
struct FaultPort;

impl Device for FaultPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> Action {
        Action::Stop(StopReason::DebugExit(1))
    }
}

/// Adds what the system cases need to a runner's VM: GDT entries, a TSS
/// with RSP0, the IDT and its stubs, the special pages.
pub(super) fn install(vm: &mut Vm, sregs: &mut SRegs) -> Result<(), String> {
    let mem = &vm.mem;
    let write = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|e| format!("writing {at:#x}: {e}"))
    };
    for (i, e) in EXTRA_GDT.iter().enumerate() {
        write(*e, GDT + 0x40 + 8 * i as u64)?;
    }
    sregs.gdt.limit = (0x40 + 8 * EXTRA_GDT.len() - 1) as u16;
    // The 64-bit TSS (0x20): RSP0, and an I/O bitmap for ports 0-255 that
    // lets CPL 3 use port 0x80 alone (the integer sequences end with `out
    // 0x80, al`: PVM lets ring 3 do port I/O by the bitmap, not by IOPL).
    let limit = 0x68 + 32;
    write(gdt_entry(0x008b, TSS, limit), GDT + 0x20)?;
    write(0, GDT + 0x28)?;
    for off in (0..0x68 + 40).step_by(8) {
        write(0, TSS + off)?;
    }
    write(KSTACK, TSS + 4)?;
    let mut bitmap = [0xffu8; 33];
    bitmap[0x80 / 8] &= !1;
    mem.write_slice(&bitmap, GuestAddress(TSS + 0x68))
        .map_err(|e| e.to_string())?;
    mem.write_obj(0x68u16, GuestAddress(TSS + 0x66))
        .map_err(|e| e.to_string())?;
    sregs.tr.base = TSS;
    sregs.tr.limit = limit as u32;
    for v in 0..256u64 {
        let stub = STUBS + 16 * v;
        let dpl = if matches!(v, 3 | 4 | 0x80) { 3 } else { 0 };
        let lo = (stub & 0xffff)
            | ((abi::SEL_CODE64 as u64) << 16)
            | ((0x8e | dpl << 5) << 40)
            | ((stub >> 16) & 0xffff) << 48;
        write(lo, IDT_BASE + 16 * v)?;
        write(stub >> 32, IDT_BASE + 16 * v + 8)?;
        // out 0x81, al; hlt; jmp back to the hlt
        vm.mem
            .write_slice(
                &[0xe6, FAULT_PORT as u8, 0xf4, 0xeb, 0xfd],
                GuestAddress(stub),
            )
            .map_err(|e| e.to_string())?;
    }
    sregs.idt.base = IDT_BASE;
    sregs.idt.limit = 0xfff;
    // The special pages, in a page table of their own.
    let pd = {
        let pdpt = vm
            .mem
            .read_obj::<u64>(GuestAddress(sregs.cr3))
            .map_err(|e| e.to_string())?
            & 0x000f_ffff_ffff_f000;
        vm.mem
            .read_obj::<u64>(GuestAddress(pdpt))
            .map_err(|e| e.to_string())?
            & 0x000f_ffff_ffff_f000
    };
    let write = |v: u64, at: u64| {
        vm.mem
            .write_obj(v, GuestAddress(at))
            .map_err(|e| format!("writing {at:#x}: {e}"))
    };
    for i in 0..512u64 {
        let frame = TEST_PAGES + 0x1000 * i;
        let pte = match i {
            PAGE_RO => frame | P | US,
            PAGE_NP => 0,
            PAGE_SUP => frame | P | RW,
            PAGE_NX => frame | P | RW | US | (1 << 63),
            PAGE_RSVD => frame | P | RW | US | (1 << 51),
            PAGE_SUP_RO => frame | P,
            _ => frame | P | RW | US,
        };
        write(pte, TEST_PT + 8 * i)?;
    }
    write(TEST_PT | P | RW | US, pd + 8 * (TEST_PAGES >> 21))?;
    // INT3 everywhere: a jump into an executable page stops at once (#BP).
    for a in (TEST_PAGES..TEST_PAGES + 0x8000).step_by(8) {
        write(0xcccc_cccc_cccc_cccc, a)?;
    }
    vm.pio
        .insert(FAULT_PORT as u64, 1, Arc::new(Mutex::new(FaultPort)))
        .map_err(|e| e.to_string())
}

/// The random system state of one sequence.
#[derive(Clone, Copy, Debug)]
struct Knobs {
    iopl3: bool,
    am: bool,
    tsd: bool,
    ac: bool,
}

/// How a system sequence ended: the exception and the state at its stub.
struct Ended {
    vector: u64,
    error: Option<u64>,
    /// RIP, CS, RFLAGS, RSP, SS pushed.
    frame: [u64; 5],
    cr2: u64,
    /// DS, ES, FS, GS.
    selectors: [u16; 4],
    regs: Regs,
    mem: Vec<u8>,
}

impl Runner {
    /// Runs `code` at CPL 3 under `knobs` until the exception that ends it.
    fn run_system(
        &mut self,
        code: &[u8],
        init: &Regs,
        scratch: &[u8],
        knobs: Knobs,
    ) -> Result<Ended, String> {
        self.vm.write_memory(CODE, code)?;
        self.vm.write_memory(SCRATCH, scratch)?;
        self.vm.write_memory(KSTACK - 0x100, &[0u8; 0x100])?;
        // The special pages as `install` left them (earlier sequences may
        // have written the writable ones).
        self.vm.write_memory(TEST_PAGES, &[0xcc; 0x8000])?;
        let mut s = self.sregs;
        if knobs.am {
            s.cr0 |= arch::cr0::AM;
        }
        if knobs.tsd {
            s.cr4 |= arch::cr4::TSD;
        }
        s.cr2 = 0;
        self.vm.set_cpu_state(init, &s).map_err(|e| e.to_string())?;
        let out = self.vm.run(&mut self.stats).map_err(|e| e.to_string())?;
        if !matches!(out, Outcome::Stopped(StopReason::DebugExit(1))) {
            return Err(format!(
                "no exception stub reached: {}\n{}",
                out.describe(),
                out.dump().unwrap_or_default()
            ));
        }
        let regs = self.vm.vcpu.regs().map_err(|e| e.to_string())?;
        let sr = self.vm.vcpu.sregs().map_err(|e| e.to_string())?;
        let off = regs.rip.wrapping_sub(STUBS + 2);
        if off % 16 != 0 || off >= 0x1000 {
            return Err(format!(
                "stopped at {:#x}, not after a stub's OUT",
                regs.rip
            ));
        }
        let vector = off / 16;
        let read = |a: u64| {
            self.vm
                .mem
                .read_obj::<u64>(GuestAddress(a))
                .map_err(|e| format!("reading the frame at {a:#x}: {e}"))
        };
        let has_error = vector < 32 && ERROR_CODE >> vector & 1 != 0;
        let mut at = regs.rsp;
        let error = if has_error {
            at += 8;
            Some(read(regs.rsp)?)
        } else {
            None
        };
        let mut frame = [0u64; 5];
        for (k, f) in frame.iter_mut().enumerate() {
            *f = read(at + 8 * k as u64)?;
        }
        let mut mem = vec![0u8; SCRATCH_LEN];
        self.vm
            .mem
            .read_slice(&mut mem, GuestAddress(SCRATCH))
            .map_err(|e| e.to_string())?;
        Ok(Ended {
            vector,
            error,
            frame,
            cr2: sr.cr2,
            selectors: [
                sr.ds.selector,
                sr.es.selector,
                sr.fs.selector,
                sr.gs.selector,
            ],
            regs,
            mem,
        })
    }
}

/// Raw encodings that raise #GP(0) at CPL 3 whatever IOPL is (privileged
/// instructions; RDPMC with CR4.PCE clear; SYSRET).
const PRIVILEGED: [&[u8]; 24] = [
    &[0xf4],                   // hlt
    &[0x0f, 0x06],             // clts
    &[0x0f, 0x09],             // wbinvd
    &[0x0f, 0x08],             // invd
    &[0x0f, 0x32],             // rdmsr
    &[0x0f, 0x30],             // wrmsr
    &[0x0f, 0x33],             // rdpmc
    &[0x0f, 0x01, 0xf8],       // swapgs
    &[0x0f, 0x20, 0xc0],       // mov rax, cr0
    &[0x0f, 0x22, 0xc0],       // mov cr0, rax
    &[0x0f, 0x20, 0xd0],       // mov rax, cr2
    &[0x0f, 0x22, 0xd8],       // mov cr3, rax
    &[0x0f, 0x20, 0xe0],       // mov rax, cr4
    &[0x44, 0x0f, 0x20, 0xc0], // mov rax, cr8
    &[0x0f, 0x21, 0xf8],       // mov rax, dr7
    &[0x0f, 0x23, 0xc0],       // mov dr0, rax
    &[0x41, 0x0f, 0x01, 0x17], // lgdt [r15]
    &[0x41, 0x0f, 0x01, 0x1f], // lidt [r15]
    &[0x0f, 0x00, 0xd0],       // lldt ax
    &[0x0f, 0x00, 0xd8],       // ltr ax
    &[0x41, 0x0f, 0x01, 0x3f], // invlpg [r15]
    &[0x0f, 0x01, 0xf0],       // lmsw ax
    &[0x48, 0x0f, 0x07],       // sysretq
    &[0x0f, 0x20, 0xc8],       // mov rax, cr1 (#UD or #GP: which first)
];

/// Invalid encodings (#UD) in 64-bit mode, on every x86-64 CPU.
const INVALID: [&[u8]; 30] = [
    &[0x06],                   // push es
    &[0x07],                   // pop es
    &[0x0e],                   // push cs
    &[0x16],                   // push ss
    &[0x17],                   // pop ss
    &[0x1e],                   // push ds
    &[0x1f],                   // pop ds
    &[0x27],                   // daa
    &[0x2f],                   // das
    &[0x37],                   // aaa
    &[0x3f],                   // aas
    &[0x60],                   // pusha
    &[0x61],                   // popa
    &[0xce],                   // into
    &[0xd4, 0x0a],             // aam
    &[0xd5, 0x0a],             // aad
    &[0xd6],                   // salc
    &[0x9a, 0, 0, 0, 0, 0, 0], // call far ptr16:32
    &[0xea, 0, 0, 0, 0, 0, 0], // jmp far ptr16:32
    &[0x0f, 0x0b],             // ud2
    &[0x0f, 0xb9, 0xc0],       // ud1
    &[0x0f, 0xff, 0xc0],       // ud0
    &[0xf0, 0x01, 0xc0],       // lock add eax, eax
    &[0xf0, 0x90],             // lock nop
    &[0x8d, 0xc0],             // lea eax, eax
    &[0x8e, 0xc8],             // mov cs, ax
    &[0x8e, 0xf0],             // mov sreg 6, ax
    &[0x0f, 0x01, 0xca],       // clac at CPL 3
    &[0xfe, 0xd0],             // FE /2
    &[0x0f, 0xc7, 0xc8],       // cmpxchg8b with a register
];

/// Selectors for the segment-register loads and LAR/LSL/VERR/VERW.
const SELECTORS: [u16; 24] = [
    0, 1, 3, 0x2b, 0x2a, 0x33, 0x18, 0x1b, 0x10, 0x13, 0x20, 0x23, 0x43, 0x4b, 0x48, 0x53, 0x5b,
    0x63, 0x60, 0x68, 0x6b, 0x2f, 0xfffb, 0x3b,
];

impl Gen<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.a.db(b).unwrap();
    }

    /// Makes every arithmetic flag defined (before PUSHF reads them).
    fn define_flags(&mut self) {
        if self.defined != ARITH {
            self.a.cmp(rax, rax).unwrap();
            self.defined = ARITH;
        }
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.below(from.len() as u64) as usize]
    }

    fn privileged(&mut self) {
        let b = self.pick(&PRIVILEGED);
        self.bytes(b);
    }

    /// `if_ok`: CLI and STI may be generated.
    fn iopl_sensitive(&mut self, if_ok: bool) {
        self.a.mov(edx, 0x84u32).unwrap();
        let k = self.rng.below(9);
        let k = if !if_ok && matches!(k, 0 | 1 | 8) {
            2 + k % 6
        } else {
            k
        };
        match k {
            0 => self.a.cli().unwrap(),
            1 => self.a.sti().unwrap(),
            2 => self.a.in_(al, dx).unwrap(),
            3 => self.a.out(dx, al).unwrap(),
            4 => self.a.in_(eax, 0x84).unwrap(),
            5 => self.a.out(0x84, ax).unwrap(),
            6 => {
                let d = self.disp();
                self.a.lea(rdi, ptr(r15 + d)).unwrap();
                self.a.insb().unwrap()
            }
            7 => {
                let d = self.disp();
                self.a.lea(rsi, ptr(r15 + d)).unwrap();
                self.a.outsb().unwrap()
            }
            _ => {
                // STI; HLT: HLT faults at CPL 3 in STI's shadow too.
                self.a.sti().unwrap();
                self.a.hlt().unwrap()
            }
        }
    }

    /// `aligned`: only naturally aligned accesses within one page.
    fn page_fault(&mut self, aligned: bool) {
        let page = self.rng.below(8);
        let base = match page {
            7 => [0x1000, 0x4000_0000, 0x7fff_ffff_f000][self.rng.below(3) as usize],
            p => TEST_PAGES + 0x1000 * p,
        };
        let off = if aligned {
            self.rng.below(0x1ff) * 8
        } else if self.rng.chance(4) {
            0xffc
        } else {
            self.rng.below(0xff8)
        };
        // Sometimes from the page before, across into this one.
        let base = if off == 0xffc && (1..=PAGE_RW).contains(&page) && self.rng.chance(2) {
            base - 0x1000
        } else {
            base
        };
        self.a.mov(rbx, base + off).unwrap();
        match self.rng.below(6) {
            0 => self.a.mov(rax, qword_ptr(rbx)).unwrap(),
            1 => self.a.mov(dword_ptr(rbx), ecx).unwrap(),
            2 => {
                self.a.add(dword_ptr(rbx), ecx).unwrap();
                self.flags(ARITH, 0);
            }
            3 => self.a.jmp(rbx).unwrap(),
            4 => self.a.call(rbx).unwrap(),
            _ => self.a.xchg(qword_ptr(rbx), rcx).unwrap(),
        }
    }

    /// `aligned`: only naturally aligned addresses.
    fn non_canonical(&mut self, aligned: bool) {
        let addr = match self.rng.below(5) {
            0 => 0x8000_0000_0000,
            1 => 0xffff_7fff_ffff_fff8,
            2 => 0x7fff_ffff_fffc,
            3 => 0xffff_8000_0000_0000u64.wrapping_sub(4),
            _ => {
                (self.rng.next() | 0x8000_0000_0000) & !0xffff_8000_0000_0000
                    | 0x0001_0000_0000_0000
            }
        };
        let addr = if aligned { addr & !7 } else { addr };
        match self.rng.below(6) {
            0 => {
                self.a.mov(rbx, addr).unwrap();
                self.a.mov(rax, qword_ptr(rbx)).unwrap()
            }
            1 => {
                self.a.mov(rbx, addr).unwrap();
                self.a.mov(qword_ptr(rbx), rax).unwrap()
            }
            2 => {
                self.a.mov(rbp, addr).unwrap();
                self.a.mov(eax, dword_ptr(rbp)).unwrap()
            }
            3 => {
                self.a.mov(rbx, addr).unwrap();
                self.a.jmp(rbx).unwrap()
            }
            4 => {
                self.a.mov(rsp, addr).unwrap();
                self.a.push(rax).unwrap()
            }
            _ => {
                self.a.mov(rbx, addr).unwrap();
                self.a.mov(eax, dword_ptr(rsp + rbx)).unwrap()
            }
        }
    }

    fn segment_load(&mut self) {
        let sel = self.pick(&SELECTORS) as u32;
        self.a.mov(eax, sel).unwrap();
        // mov sreg, ax (ES, SS, DS, FS, GS), or push/pop FS/GS
        match self.rng.below(7) {
            5 => {
                self.a.push(rax).unwrap();
                self.bytes(&[0x0f, 0xa1]) // pop fs
            }
            6 => {
                self.a.push(rax).unwrap();
                self.bytes(&[0x0f, 0xa9]) // pop gs
            }
            k => {
                let reg = [0u8, 2, 3, 4, 5][k as usize];
                self.bytes(&[0x8e, 0xc0 | reg << 3])
            }
        }
        // Read one back: mov ecx, sreg.
        let reg = [0u8, 2, 3, 4, 5][self.rng.below(5) as usize];
        self.bytes(&[0x8c, 0xc1 | reg << 3]);
    }

    /// INT3, INT1, INTO or INT n; `native`: INT n only for 3 and 4 (under
    /// PVM any other INT n from ring 3 gives #UD).
    fn int_n(&mut self, native: bool) {
        match self.rng.below(6) {
            0 => self.bytes(&[0xcc]),
            // (Under PVM, INT1's #DB pushes the RIP of INT1, not the next.)
            1 if !native => self.bytes(&[0xf1]),
            1 => self.bytes(&[0xcc]),
            2 => self.bytes(&[0xce]),
            _ => {
                let v = match self.rng.below(4) {
                    0 => self.pick(&[3u8, 4, 0x80]),
                    1 => self.rng.below(32) as u8,
                    _ => self.rng.below(256) as u8,
                };
                let v = if native { 3 + (v & 1) } else { v };
                self.bytes(&[0xcd, v])
            }
        }
    }

    fn divide_error(&mut self) {
        match self.rng.below(5) {
            0 => {
                self.a.xor(ecx, ecx).unwrap();
                self.a.div(ecx).unwrap()
            }
            1 => {
                self.a.mov(eax, 0x8000_0000u32).unwrap();
                self.a.cdq().unwrap();
                self.a.mov(ecx, -1).unwrap();
                self.a.idiv(ecx).unwrap()
            }
            2 => {
                self.a.mov(rax, i64::MIN).unwrap();
                self.a.cqo().unwrap();
                self.a.mov(rcx, -1i64).unwrap();
                self.a.idiv(rcx).unwrap()
            }
            3 => {
                self.a.mov(ax, 0x8000u32).unwrap();
                self.a.mov(cl, -1).unwrap();
                self.a.idiv(cl).unwrap()
            }
            // Random operands: overflow (#DE) or a quotient.
            _ => self.a.div(rcx).unwrap(),
        }
        self.flags(0, ARITH);
    }

    fn invalid(&mut self) {
        let b = self.pick(&INVALID);
        self.bytes(b);
    }

    /// RFLAGS.AC set or cleared by POPF (if `pushf`, else as it starts),
    /// then an access that may be misaligned (#AC with CR0.AM at CPL 3):
    /// integer, SSE, MMX or x87 (`fp_access`; `native` as there).
    fn alignment(&mut self, pushf: bool, knobs: Knobs, native: bool) {
        let mut ac = knobs.ac;
        if pushf {
            self.define_flags();
            self.a.pushfq().unwrap();
            ac = !self.rng.chance(3);
            if ac {
                self.a.or(qword_ptr(rsp), AC as i32).unwrap();
            } else {
                self.a.and(qword_ptr(rsp), !(AC as i32)).unwrap();
            }
            self.a.popfq().unwrap();
        }
        let d = self.disp();
        match self.rng.below(6) {
            0 => self.a.mov(ax, word_ptr(r15 + d)).unwrap(),
            1 => self.a.mov(dword_ptr(r15 + d), eax).unwrap(),
            2 => self.a.mov(rax, qword_ptr(r15 + d)).unwrap(),
            3 | 4 => self.fp_access(d, ac && knobs.am, native),
            _ => {
                self.a.lea(rsp, ptr(rsp - (d & 7))).unwrap();
                self.a.push(rax).unwrap()
            }
        }
    }

    /// An SSE, MMX or x87 access at [r15 + `d`] that may be misaligned.
    /// The x87 environment and save areas only when it is misaligned and
    /// alignment checking is on (`checked`: #AC, nothing stored or
    /// loaded); FXSAVE and FXRSTOR only misaligned (#GP(0)), and not
    /// against `kvm` (`native`: this host completes them).
    fn fp_access(&mut self, d: i32, checked: bool, native: bool) {
        let m = r15 + d;
        let a = &mut self.a;
        let env = d & 3 != 0 && checked;
        let misaligned = d | (1 + (d >> 4 & 7));
        let k = self.rng.below(if env { 16 } else { 12 });
        let k = if native && (10..12).contains(&k) {
            k - 10
        } else {
            k
        };
        match k {
            0 => a.movups(xmm1, xmmword_ptr(m)),
            1 => a.movdqu(xmmword_ptr(m), xmm2),
            2 => a.movupd(xmm3, xmmword_ptr(m)),
            3 => a.movss(xmm4, dword_ptr(m)),
            4 => a.movsd_2(qword_ptr(m), xmm5),
            5 => a.movq(mm1, qword_ptr(m)),
            6 => a.movd(dword_ptr(m), mm2),
            7 => a.fld(tword_ptr(m)),
            8 => a.fld(qword_ptr(m)),
            9 => a.fnstcw(word_ptr(m)),
            10 => a.fxsave(ptr(r15 + misaligned)),
            11 => a.fxrstor(ptr(r15 + misaligned)),
            k => {
                // FNSTENV, FNSAVE, FLDENV, FRSTOR [r15 + d], 16-bit
                // operand size (2-byte aligned area) if d is odd.
                let op = [[0xd9, 0xb7], [0xdd, 0xb7], [0xd9, 0xa7], [0xdd, 0xa7]][k as usize - 12];
                let mut b = if d & 1 != 0 { vec![0x66] } else { vec![] };
                b.extend_from_slice(&[0x41, op[0], op[1]]);
                b.extend_from_slice(&d.to_le_bytes());
                a.db(&b)
            }
        }
        .unwrap();
    }

    /// PUSHF/POPF of the system flags at CPL 3: IF only with IOPL 3, IOPL
    /// never; the result pushed again. Not NT against `kvm` (`native`):
    /// PVM returns to ring 3 with NT clear after an exit (a host
    /// interrupt between the POPF and the PUSHF).
    fn pushf_popf(&mut self, native: bool) {
        self.define_flags();
        let mut mask = 0i32;
        for f in [IF, IOPL, AC, 1 << 10, NT, 1 << 21] {
            if self.rng.chance(2) && !(native && f == NT) {
                mask |= f as i32;
            }
        }
        if self.rng.chance(4) {
            self.bytes(&[0x66, 0x9c]); // pushf (16-bit)
            self.a.xor(word_ptr(rsp), mask & 0xffff).unwrap();
            self.bytes(&[0x66, 0x9d]); // popf (16-bit)
        } else {
            self.a.pushfq().unwrap();
            self.a.xor(qword_ptr(rsp), mask).unwrap();
            self.a.popfq().unwrap();
        }
        self.a.pushfq().unwrap();
        self.a.pop(rax).unwrap();
        self.a.cld().unwrap();
    }

    fn store_descriptor_tables(&mut self) {
        let d = self.disp() & !0xf;
        match self.rng.below(6) {
            0 => self.bytes(&[0x66, 0x0f, 0x01, 0xe0]), // smsw ax
            1 => self.a.smsw(word_ptr(r15 + d)).unwrap(),
            2 => self.a.sgdt(ptr(r15 + d)).unwrap(),
            3 => self.a.sidt(ptr(r15 + d)).unwrap(),
            4 => self.bytes(&[0x0f, 0x00, 0xc8]), // str eax
            _ => self.bytes(&[0x0f, 0x00, 0xc0]), // sldt eax
        }
    }

    fn verify_selector(&mut self) {
        let sel = self.pick(&SELECTORS) as u32;
        self.a.mov(ecx, sel).unwrap();
        match self.rng.below(6) {
            0 => self.bytes(&[0x0f, 0x02, 0xc1]),       // lar eax, ecx
            1 => self.bytes(&[0x48, 0x0f, 0x03, 0xc1]), // lsl rax, rcx
            2 => self.bytes(&[0x0f, 0x03, 0xc1]),       // lsl eax, ecx
            3 => self.bytes(&[0x66, 0x0f, 0x02, 0xc1]), // lar ax, cx
            4 => self.bytes(&[0x0f, 0x00, 0xe1]),       // verr cx
            _ => self.bytes(&[0x0f, 0x00, 0xe9]),       // verw cx
        }
        self.flags(ZF, 0);
    }

    /// One system-level case; `native`: the oracle runs ring 3 natively on
    /// this host (instructions whose presence is the host's are left out,
    /// and PUSHF under IOPL 3, which PVM shows as IOPL 0).
    fn system_case(&mut self, knobs: Knobs, native: bool) {
        let pushf = !(native && knobs.iopl3);
        // Which of #AC and #PF a misaligned access to a bad page raises is
        // the implementation's (one priority class, SDM vol. 3 table 6-2):
        // this host gives #PF for a page that is not present, #AC for a
        // supervisor one; against it they are not mixed (RFLAGS.AC may be
        // set by POPF along the way).
        let aligned = native;
        match self.rng.below(if native { 13 } else { 14 }) {
            0 => self.privileged(),
            1 => self.iopl_sensitive(pushf),
            2 | 3 => self.page_fault(aligned),
            4 => self.non_canonical(aligned),
            5 if !native => self.segment_load(),
            5 => self.page_fault(aligned),
            6 => self.int_n(native),
            7 => self.divide_error(),
            8 => self.invalid(),
            9 => self.alignment(pushf, knobs, native),
            10 if pushf => self.pushf_popf(native),
            10 => self.alignment(false, knobs, native),
            11 if knobs.tsd => self.bytes(&[0x0f, 0x31]), // rdtsc: #GP(0)
            // (Under PVM these read the host's tables.)
            11 if !native => self.store_descriptor_tables(),
            12 if !native => self.verify_selector(),
            11 | 12 => self.privileged(),
            _ => {
                if knobs.tsd {
                    self.bytes(&[0x0f, 0x01, 0xf9]); // rdtscp: #GP(0)
                } else {
                    self.bytes(&[0xf3, 0x0f, 0xc7, 0xf8]); // rdpid rax: #UD
                }
            }
        }
    }
}

/// A random system sequence: code, defined flags at its end, knobs.
/// A random system sequence: its code, the arithmetic flags defined along
/// it, and its knobs.
fn generate_system(rng: &mut Rng, native: bool, user_iopl3: bool) -> (Vec<u8>, Defined, Knobs) {
    // Under PVM, the guest's ring 3 runs with the host's IOPL (0: CLI,
    // STI, IN and OUT give #GP(0) whatever the guest's), CR0.AM (Linux sets
    // it: RFLAGS.AC alone enables #AC) and CR4.TSD (clear: RDTSC runs
    // natively at CPL 3). `user_iopl3`: ring 3 may get IOPL 3 (not under
    // `trap`, which does not virtualize it: docs/deprivileged.md).
    let knobs = Knobs {
        iopl3: rng.chance(2) && !native && user_iopl3,
        am: rng.chance(2) || native,
        tsd: rng.chance(4) && !native,
        ac: rng.chance(2),
    };
    let mut g = Gen {
        rng,
        a: CodeAssembler::new(64).unwrap(),
        defined: ARITH,
        x87: false,
        cc_skip: 0,
        sse: true,
    };
    // A label before each group of instructions (an integer instruction
    // or a case), with the flags defined there.
    let mut marks: Vec<(CodeLabel, u64, usize)> = Vec::new();
    let mut mark = |g: &mut Gen| {
        let n = g.a.instructions().len();
        match marks.last_mut() {
            // Nothing since the last mark: it stands for here too.
            Some(m) if m.2 == n => m.1 = g.defined,
            _ => {
                let mut l = g.a.create_label();
                g.a.set_label(&mut l).unwrap();
                marks.push((l, g.defined, n));
            }
        }
    };
    g.load_simd_state();
    for _ in 0..1 + g.rng.below(3) {
        for _ in 0..g.rng.below(3) {
            mark(&mut g);
            g.insn();
        }
        mark(&mut g);
        g.system_case(knobs, native);
    }
    mark(&mut g);
    g.a.ud2().unwrap();
    let r =
        g.a.assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .unwrap();
    let at = marks
        .iter()
        .map(|(l, d, _)| (r.label_ip(l).unwrap(), *d))
        .collect();
    (r.inner.code_buffer, Defined(at), knobs)
}

/// The arithmetic flags defined before each group of instructions (by
/// address).
struct Defined(Vec<(u64, u64)>);

impl Defined {
    /// The flags defined wherever execution stopped at `rip` (the fault's,
    /// or the next instruction's after a trap): those defined both before
    /// and after its group.
    fn at(&self, rip: u64) -> u64 {
        let last = self.0.last().map_or(CODE, |m| m.0);
        if !(CODE..=last).contains(&rip) {
            // Outside the code (a jump's target): defined all along.
            return self.0.iter().fold(ARITH, |d, m| d & m.1);
        }
        let k = self.0.iter().rposition(|&(ip, _)| ip <= rip).unwrap_or(0);
        let before = self.0.get(k).map_or(ARITH, |m| m.1);
        let after = self.0.get(k + 1).map_or(before, |m| m.1);
        before & after
    }
}

/// Runs `opts.count` system sequences on both engines and compares them;
/// as [`run`].
pub fn run_system(
    opts: &Options,
    divergence: impl FnMut(&str),
    progress: impl FnMut(u64, u64),
) -> Result<Summary, String> {
    let seed = opts.seed;
    let native = opts.oracle == Engine::Kvm || opts.subject == Engine::Kvm;
    let user_iopl3 = opts.oracle != Engine::Trap && opts.subject != Engine::Trap;
    let salt = 0x5157_e3ca_5e00_0000;
    drive(
        opts,
        seed ^ salt,
        divergence,
        progress,
        |rng, hw, sw, scratch| {
            let (code, defined, knobs) = generate_system(rng, native, user_iopl3);
            let mut init = random_regs(rng);
            init.rflags = FIXED_FLAGS
                | IF
                | if knobs.iopl3 { IOPL } else { 0 }
                | if knobs.ac { AC } else { 0 }
                | (rng.next() & ARITH);
            fill_fp_scratch(rng, scratch);
            let h = hw.run_system(&code, &init, scratch, knobs);
            let s = sw.run_system(&code, &init, scratch, knobs);
            let (what, detail) = compare_system(hw.engine, sw.engine, h, s, &defined, native)?;
            Some(format!(
                "system divergence (seed {seed:#x}): {what}\n\
             state: {knobs:?}\ncode:\n{}initial:\n{init}\n{detail}",
                disassemble(&code)
            ))
        },
    )
}

fn compare_system(
    oracle: Engine,
    subject: Engine,
    h: Result<Ended, String>,
    s: Result<Ended, String>,
    defined: &Defined,
    native: bool,
) -> Option<(&'static str, String)> {
    let h = match h {
        Ok(h) => h,
        Err(e) => return Some(("oracle run", e)),
    };
    let s = match s {
        Ok(s) => s,
        Err(e) => return Some(("subject run", e)),
    };
    let mask = !(ARITH & !defined.at(h.frame[0])) & !IOPL;
    // PVM enters the guest's ring 0 with RFLAGS.AC clear (hardware keeps
    // it: the frame has it either way).
    let stub_mask = if native { mask & !AC } else { mask };
    // PVM delivers a ring-3 exception with RFLAGS.NT clear in the frame
    // (the CPU pushes it as POPF left it).
    let frame_mask = if native { mask & !NT } else { mask };
    let show = |e: &Ended| {
        format!(
            "vector {} error {:x?} frame rip {:#x} cs {:#x} rflags {:#x} rsp {:#x} ss {:#x} cr2 {:#x} ds/es/fs/gs {:x?}\n{}",
            e.vector, e.error, e.frame[0], e.frame[1], e.frame[2], e.frame[3], e.frame[4], e.cr2,
            e.selectors, e.regs
        )
    };
    let states = format!(
        "{oracle}: {}\n{subject}: {}\ncompared flags mask {mask:#x}",
        show(&h),
        show(&s)
    );
    let frame = |e: &Ended| {
        [
            e.frame[0],
            e.frame[1],
            e.frame[2] & frame_mask,
            e.frame[3],
            e.frame[4],
        ]
    };
    let what = if h.vector != s.vector {
        "vector"
    } else if h.error != s.error {
        "error code"
    } else if frame(&h) != frame(&s) {
        "exception frame"
    } else if h.vector == 14 && h.cr2 != s.cr2 {
        "CR2"
    } else if gprs(&h.regs) != gprs(&s.regs) {
        "registers"
    } else if h.regs.rflags & stub_mask != s.regs.rflags & stub_mask {
        "rflags"
    } else if h.selectors != s.selectors {
        "segment selectors"
    } else if h.mem != s.mem {
        return Some((
            "scratch memory",
            format!("{states}\n{}", mem_diff(&h.mem, &s.mem)),
        ));
    } else {
        return None;
    };
    Some((what, states))
}
