//! Descriptor tables: the GDT (in the order SYSCALL/SYSRET need), the 64-bit
//! TSS (RSP0 for traps from user mode, IST1 for NMI, #DF and #MC) and the
//! interrupt gates, installed through pv_ops.

use core::cell::UnsafeCell;

use arch::gdt_entry;

use crate::{cpu, pvops, trap, Global};

pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
/// SYSRET's base selector (STAR[63:48]): a 32-bit user code segment, then user
/// data at +8 and 64-bit user code at +16.
pub const USER32_CS: u16 = 0x20 | 3;
pub const USER_DS: u16 = 0x28 | 3;
pub const USER_CS: u16 = 0x30 | 3;
pub const TSS_SEL: u16 = 0x38;

/// A stack the CPU or the trap entry code switches to.
#[repr(C, align(16))]
pub struct Stack<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: only the CPU (through RSP) uses the bytes; Rust code never reads them.
unsafe impl<const N: usize> Sync for Stack<N> {}

impl<const N: usize> Stack<N> {
    pub const fn new() -> Self {
        Stack(UnsafeCell::new([0; N]))
    }

    pub fn top(&self) -> u64 {
        self.0.get() as u64 + N as u64
    }
}

pub const KERNEL_STACK_SIZE: usize = 16384;
/// The kernel's one stack: every trap from user mode starts at its top (the
/// kernel does not block inside a trap; a process's state is its saved frame).
pub static KERNEL_STACK: Stack<KERNEL_STACK_SIZE> = Stack::new();
static IST1_STACK: Stack<8192> = Stack::new();

#[repr(C, align(16))]
struct Gdt([u64; 9]);

static GDT: Global<Gdt> = Global::new(Gdt([
    0,
    gdt_entry(0xc09a, 0, 0xfffff), // 0x08: 32-bit kernel code (unused)
    gdt_entry(0xa09a, 0, 0xfffff), // 0x10: 64-bit kernel code
    gdt_entry(0xc092, 0, 0xfffff), // 0x18: kernel data
    gdt_entry(0xc0fa, 0, 0xfffff), // 0x20: 32-bit user code (SYSRET base, unused)
    gdt_entry(0xc0f2, 0, 0xfffff), // 0x28: user data
    gdt_entry(0xa0fa, 0, 0xfffff), // 0x30: 64-bit user code
    0,                     // 0x38: TSS, low half
    0,                     // 0x40: TSS, high half
]));

/// The 104-byte 64-bit TSS as 32-bit words (its 64-bit fields are unaligned).
#[repr(C, align(16))]
struct Tss([u32; 26]);

static TSS: Global<Tss> = Global::new(Tss([0; 26]));

/// One interrupt gate: always an interrupt gate (IF cleared on entry).
pub struct Gate {
    pub vector: u8,
    pub handler: u64,
    /// Lowest privilege allowed to raise it with INT n.
    pub dpl: u8,
    /// IST stack index (0: none). The paravirtual trap table has no IST.
    pub ist: u8,
}

impl Gate {
    /// The 16-byte hardware descriptor, as two quadwords.
    pub fn descriptor(&self) -> (u64, u64) {
        arch::Gate {
            offset: self.handler,
            selector: KERNEL_CS,
            ist: self.ist,
            type_: 0xe,
            dpl: self.dpl,
            present: true,
        }
        .descriptor()
    }
}

/// Native TSS.RSP0 update (pv_ops `set_kernel_stack`).
pub fn set_rsp0(rsp: u64) {
    TSS.with(|t| {
        t.0[1] = rsp as u32;
        t.0[2] = (rsp >> 32) as u32;
    });
}

pub fn init() {
    let tss = TSS.with(|t| {
        let ist1 = IST1_STACK.top();
        t.0[9] = ist1 as u32;
        t.0[10] = (ist1 >> 32) as u32;
        t.0[25] = 104 << 16; // I/O map base past the limit: no I/O bitmap
        t as *mut Tss as u64
    });
    let gdt = GDT.with(|g| {
        g.0[7] = gdt_entry(0x89, tss, 103); // present, 64-bit TSS (available)
        g.0[8] = tss >> 32;
        g.0.as_ptr() as u64
    });
    if pvops::deprivileged() {
        // The selectors of the boot GDT (kernel CS 0x10, data 0x18) are this
        // GDT's too, so the segment registers stay as they are.
        pvops::set_gdt(gdt, 9, TSS_SEL);
    } else {
        // SAFETY: the GDT is static and keeps the boot selectors' meaning (0x10
        // 64-bit code, 0x18 flat data), so CS stays valid; the TSS descriptor
        // points to the static TSS.
        unsafe {
            cpu::lgdt(gdt, (9 * 8 - 1) as u16);
            cpu::load_data_segments(KERNEL_DS);
            cpu::ltr(TSS_SEL);
        }
    }
    (pvops::ops().set_kernel_stack)(KERNEL_STACK.top());

    let mut gates: [Gate; trap::STUBS] = core::array::from_fn(|_| Gate {
        vector: 0,
        handler: 0,
        dpl: 0,
        ist: 0,
    });
    for (g, &[vector, handler]) in gates.iter_mut().zip(trap::stubs()) {
        g.vector = vector as u8;
        g.handler = handler;
        g.dpl = if vector == trap::INT80_VECTOR { 3 } else { 0 };
        g.ist = if matches!(vector, 2 | 8 | 18) { 1 } else { 0 };
    }
    (pvops::ops().load_idt)(&gates);
}
