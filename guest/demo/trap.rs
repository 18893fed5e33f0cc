//! Trap entry and exit: the interrupt and exception stubs, the `syscall`
//! entry, the one return path (IRETQ, or SYSRETQ for frames that entered
//! through `syscall`), and the dispatcher.
//!
//! Every entry builds the same [`Frame`] on the kernel stack. Traps from user
//! mode start at the top of the kernel stack (TSS.RSP0, or the `syscall`
//! entry's own switch); the only traps taken in kernel mode are interrupts in
//! the idle loop, which nest below it. The kernel is not preemptible and never
//! blocks on its stack: switching processes means swapping the frame.

use core::arch::{asm, global_asm};
use core::sync::atomic::AtomicU64;

use arch::{efer, msr};

use crate::console::Line;
use crate::desc::{KERNEL_CS, KERNEL_STACK, KERNEL_STACK_SIZE, USER32_CS, USER_CS, USER_DS};
use crate::{cpu, fail, proc, pvops};

pub const TIMER_VECTOR: u64 = 0x20;
pub const INT80_VECTOR: u64 = 0x80;
pub const SPURIOUS_VECTOR: u64 = pvops::SPURIOUS_VECTOR as u64;
/// `Frame::vector` of a frame built by the `syscall` entry: returned to with
/// SYSRETQ.
pub const SYSCALL_VECTOR: u64 = 0x100;
/// A `syscall` frame to return to with IRETQ instead.
pub const SYSCALL_IRET_VECTOR: u64 = 0x101;
/// Return from `syscall` frames with SYSRETQ (IRETQ otherwise). KVM's
/// instruction emulator, which runs this kernel's ring 0 on PVM hosts,
/// executes SYSRETQ correctly.
pub const USE_SYSRET: bool = true;

/// The registers of an interrupted context, as the entry code pushes them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl Frame {
    pub const ZERO: Frame = Frame {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rbp: 0,
        rdi: 0,
        rsi: 0,
        rdx: 0,
        rcx: 0,
        rbx: 0,
        rax: 0,
        vector: 0,
        error: 0,
        rip: 0,
        cs: 0,
        rflags: 0,
        rsp: 0,
        ss: 0,
    };

    /// A fresh user context: IF set, user selectors.
    pub fn user(rip: u64, rsp: u64, arg: u64) -> Frame {
        Frame {
            rip,
            rsp,
            rdi: arg,
            cs: USER_CS as u64,
            ss: USER_DS as u64,
            rflags: 0x202,
            ..Frame::ZERO
        }
    }

    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

const FRAME_SIZE: usize = core::mem::size_of::<Frame>();

// One stub per vector: push a zero error code where the CPU pushes none, push
// the vector, join the common path. Each stub also adds (vector, address) to
// the table `stubs` returns.
macro_rules! stubs {
    ($($kind:ident $vector:literal),* $(,)?) => {
        /// Vectors with a stub.
        pub const STUBS: usize = [$($vector),*].len();
        global_asm!(
            ".section .rodata.demo_trap_stubs, \"a\"",
            ".balign 8",
            ".global demo_trap_stubs",
            "demo_trap_stubs:",
            ".text",
            ".macro NOERR v",
            "demo_isr_\\v:",
            "    push 0",
            "    push \\v",
            "    jmp demo_trap_common",
            ".pushsection .rodata.demo_trap_stubs, \"a\"",
            "    .quad \\v, demo_isr_\\v",
            ".popsection",
            ".endm",
            ".macro ERR v",
            "demo_isr_\\v:",
            "    push \\v",
            "    jmp demo_trap_common",
            ".pushsection .rodata.demo_trap_stubs, \"a\"",
            "    .quad \\v, demo_isr_\\v",
            ".popsection",
            ".endm",
            $(concat!(stringify!($kind), " ", stringify!($vector)),)*
            ".purgem NOERR",
            ".purgem ERR",
        );
    };
}

stubs!(
    NOERR 0, NOERR 1, NOERR 2, NOERR 3, NOERR 4, NOERR 5, NOERR 6, NOERR 7,
    ERR 8, NOERR 9, ERR 10, ERR 11, ERR 12, ERR 13, ERR 14, NOERR 15,
    NOERR 16, ERR 17, NOERR 18, NOERR 19, NOERR 20, ERR 21, NOERR 22, NOERR 23,
    NOERR 24, NOERR 25, NOERR 26, NOERR 27, NOERR 28, ERR 29, ERR 30, NOERR 31,
    NOERR 32, NOERR 128, NOERR 255,
);

global_asm!(
    ".text",
    "demo_trap_common:",
    "    push rax",
    "    push rbx",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push rbp",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    cld",
    "    mov rdi, rsp",
    "    call {dispatch}",
    ".global demo_trap_return",
    "demo_trap_return:",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop r11",
    "    pop r10",
    "    pop r9",
    "    pop r8",
    "    pop rbp",
    "    pop rdi",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rbx",
    "    pop rax",
    "    cmp qword ptr [rip + {iret_stub}], 0",
    "    jne 3f",
    "    cmp qword ptr [rsp], {sysret}",
    "    je 2f",
    "    add rsp, 16",
    "    iretq",
    // A deprivileged kernel returns through the `iret` hypercall: RAX and
    // the interrupt frame on the stack.
    "3:  add rsp, 16",
    "    push rax",
    "    call qword ptr [rip + {iret_stub}]",
    "    ud2",
    // SYSRETQ: RIP from RCX, RFLAGS from R11 (both clobbered by `syscall`).
    "2:  mov rcx, [rsp + 16]",
    "    mov r11, [rsp + 32]",
    "    mov rsp, [rsp + 40]",
    "    sysretq",
    "",
    // `syscall`: RCX = user RIP, R11 = user RFLAGS, interrupts masked by FMASK.
    // Build the same frame as an interrupt from user mode at the stack top.
    ".global demo_syscall_entry",
    "demo_syscall_entry:",
    "    mov [rip + {scratch}], rsp",
    "    lea rsp, [rip + {stack} + {stack_size}]",
    "    push {user_ds}",
    "    push qword ptr [rip + {scratch}]",
    "    push r11",
    "    push {user_cs}",
    "    push rcx",
    "    push 0",
    "    push {sysret}",
    "    jmp demo_trap_common",
    dispatch = sym dispatch,
    iret_stub = sym pvops::IRET_STUB,
    sysret = const SYSCALL_VECTOR,
    scratch = sym SYSCALL_USER_RSP,
    stack = sym KERNEL_STACK,
    stack_size = const KERNEL_STACK_SIZE,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
);

/// The user RSP between `syscall` and the push that saves it.
static SYSCALL_USER_RSP: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static demo_trap_stubs: [[u64; 2]; STUBS];
    fn demo_trap_return();
    fn demo_syscall_entry();
}

/// (vector, stub address) of every stub.
pub fn stubs() -> &'static [[u64; 2]; STUBS] {
    // SAFETY: the table is read-only data the stubs! macro emits, STUBS entries.
    unsafe { &*core::ptr::addr_of!(demo_trap_stubs) }
}

/// The `syscall` entry point (LSTAR).
pub fn syscall_entry() -> u64 {
    demo_syscall_entry as *const () as u64
}

/// Enables `syscall`: EFER.SCE, STAR (kernel CS 0x10, SYSRET base 0x23),
/// LSTAR, and FMASK clearing IF, TF, DF and AC.
pub fn init_syscall() {
    let star = (USER32_CS as u64) << 48 | (KERNEL_CS as u64) << 32;
    if pvops::deprivileged() {
        pvops::set_syscall_callback(syscall_entry(), star, 0x4_0700);
        return;
    }
    // SAFETY: architectural MSRs; the selectors match the GDT and the entry
    // point is `demo_syscall_entry`.
    unsafe {
        cpu::wrmsr(msr::STAR, star);
        cpu::wrmsr(msr::LSTAR, syscall_entry());
        cpu::wrmsr(msr::FMASK, 0x4_0700);
        cpu::wrmsr(msr::EFER, cpu::rdmsr(msr::EFER) | efer::SCE);
    }
}

/// Enters the user context `f` (its address space already loaded) through the
/// common return path, at the top of the kernel stack.
pub fn enter_user(f: &Frame) -> ! {
    let mut f = *f;
    prepare_return(&mut f);
    // SAFETY: the kernel stack is not in use (boot runs on the boot stack);
    // the frame is copied to its top and popped by the return path.
    unsafe {
        asm!(
            "lea rsp, [rip + {stack} + {top}]",
            "mov rdi, rsp",
            "mov rcx, {words}",
            "rep movsq",
            "jmp {ret}",
            stack = sym KERNEL_STACK,
            top = const KERNEL_STACK_SIZE - FRAME_SIZE,
            words = const FRAME_SIZE / 8,
            ret = sym demo_trap_return,
            in("rsi") &f,
            options(noreturn),
        )
    }
}

/// Chooses how a frame about to be returned to leaves the kernel.
fn prepare_return(f: &mut Frame) {
    if f.vector == SYSCALL_VECTOR && (!USE_SYSRET || f.rip >= 0x0000_8000_0000_0000) {
        // SYSRETQ to a non-canonical RIP would fault in ring 0 on the user stack.
        f.vector = SYSCALL_IRET_VECTOR;
    }
}

extern "C" fn dispatch(f: &mut Frame) {
    if !f.from_user() {
        match f.vector {
            TIMER_VECTOR => proc::tick(),
            SPURIOUS_VECTOR => {}
            _ => kernel_fault(f),
        }
        return;
    }
    proc::trap(f);
    prepare_return(f);
}

pub fn exception_name(v: u64) -> &'static str {
    const NAMES: [&str; 22] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "(9)", "#TS", "#NP", "#SS",
        "#GP", "#PF", "(15)", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
    ];
    NAMES.get(v as usize).copied().unwrap_or("exception")
}

fn kernel_fault(f: &Frame) -> ! {
    Line::new()
        .s("demo: panic: kernel exception ")
        .n(f.vector)
        .s(" (")
        .s(exception_name(f.vector))
        .s(") error ")
        .x(f.error)
        .s(" rip ")
        .x(f.rip)
        .s(" cr2 ")
        .x((pvops::ops().read_cr2)())
        .s(" rsp ")
        .x(f.rsp)
        .end();
    fail(2)
}
