//! Translation of guest code into host code.
//!
//! A block starts at a guest RIP and holds the run of instructions from
//! there that may be translated *identically*: each is re-encoded from its
//! decoded form with the guest's registers renamed to host registers, and
//! runs on the host CPU exactly as it would on the guest's. Only forms on
//! the allow-list ([`identical`]) qualify: integer operations on registers
//! and immediates (and LEA, which computes but does not access), in 64-bit
//! code. They cannot fault, touch memory, transfer control or change
//! anything the interpreter checks between instructions, so the state after
//! a block is exactly the interpreter's after the same instructions. The
//! block ends before the first instruction that is not on the list, at the
//! end of the page, or after [`MAX_BLOCK`] instructions; that instruction
//! (a memory access, a branch, a privileged or sensitive instruction, ...)
//! is the interpreter's, as a callout.
//!
//! Host code of a block: a prologue that saves the callee-saved registers,
//! loads the guest's arithmetic flags into RFLAGS (POPFQ of CF, PF, AF, ZF,
//! SF and OF only) and the guest registers the block uses into host
//! registers; the translated instructions; and an epilogue that stores those
//! registers and the arithmetic flags back. Guest registers keep their own
//! host register, except RSP (the host's stack stays the host's) and RDI
//! (the pointer to the guest's registers), which take host registers the
//! block does not otherwise use.

use iced_x86::code_asm::*;
use iced_x86::{
    BlockEncoderOptions, Code, ConditionCode, Instruction, InstructionInfoFactory, MemoryOperand,
    Mnemonic as M, OpAccess, OpKind, Register, RflagsBits,
};

/// The most instructions in one block.
pub const MAX_BLOCK: usize = 64;
/// The fewest: a shorter run costs more in the block's prologue and
/// epilogue than the interpreter takes for it.
pub const MIN_BLOCK: usize = 1;

/// Whether `i` is a direct jump that may end a block: JMP or Jcc with a
/// relative target, resolved in the block's host code (a branch cannot
/// fault; a fault fetching at its target is the interpreter's).
pub fn direct_branch(i: &Instruction) -> bool {
    i.is_jcc_short_or_near() || i.is_jmp_short_or_near()
}

/// RFLAGS' arithmetic flags: CF, PF, AF, ZF, SF, OF.
const ARITH: u64 = arch::rflags::ARITH;

const GPR64: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];
const GPR32: [Register; 16] = [
    Register::EAX,
    Register::ECX,
    Register::EDX,
    Register::EBX,
    Register::ESP,
    Register::EBP,
    Register::ESI,
    Register::EDI,
    Register::R8D,
    Register::R9D,
    Register::R10D,
    Register::R11D,
    Register::R12D,
    Register::R13D,
    Register::R14D,
    Register::R15D,
];
const GPR16: [Register; 16] = [
    Register::AX,
    Register::CX,
    Register::DX,
    Register::BX,
    Register::SP,
    Register::BP,
    Register::SI,
    Register::DI,
    Register::R8W,
    Register::R9W,
    Register::R10W,
    Register::R11W,
    Register::R12W,
    Register::R13W,
    Register::R14W,
    Register::R15W,
];
/// The low bytes (SPL..DIL with a REX prefix; never AH..BH).
const GPR8: [Register; 16] = [
    Register::AL,
    Register::CL,
    Register::DL,
    Register::BL,
    Register::SPL,
    Register::BPL,
    Register::SIL,
    Register::DIL,
    Register::R8L,
    Register::R9L,
    Register::R10L,
    Register::R11L,
    Register::R12L,
    Register::R13L,
    Register::R14L,
    Register::R15L,
];

/// The encoding number (0-15) of a general-purpose register of any size,
/// or `None` for any other register and for AH, CH, DH and BH (which cannot
/// be renamed: they exist only without a REX prefix).
fn gpr_number(r: Register) -> Option<usize> {
    if matches!(r, Register::AH | Register::CH | Register::DH | Register::BH) {
        return None;
    }
    if !r.is_gpr() {
        return None;
    }
    GPR64.iter().position(|&g| g == r.full_register())
}

fn renamed(r: Register, to: usize) -> Register {
    match r.size() {
        8 => GPR64[to],
        4 => GPR32[to],
        2 => GPR16[to],
        _ => GPR8[to],
    }
}

/// The integer operations both translations take: MOV and its extending
/// forms, the two-operand ALU operations, and INC, DEC, NEG and NOT.
fn integer_op(m: M) -> bool {
    matches!(
        m,
        M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Add
            | M::Or
            | M::Adc
            | M::Sbb
            | M::And
            | M::Sub
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
    )
}

/// Whether an operand of kind `k` is an immediate.
fn immediate(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// Whether `i` is on the allow-list of instructions emitted identically.
pub fn identical(i: &Instruction) -> bool {
    // NOP (with a memory operand too: it accesses nothing) is dropped.
    if i.mnemonic() == M::Nop {
        return !i.has_lock_prefix();
    }
    let allowed = integer_op(i.mnemonic())
        || matches!(
            i.mnemonic(),
            M::Lea
            | M::Shl
            | M::Shr
            | M::Sar
            | M::Rol
            | M::Ror
            | M::Imul
            | M::Mul
            | M::Bswap
            | M::Xchg
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
            | M::Cdq
            | M::Cqo
            | M::Cdqe
            | M::Cwde
            | M::Cbw
            | M::Cwd
            | M::Nop
        ) // SETcc and CMOVcc (a Jcc's branch operand is refused below).
        || i.condition_code() != ConditionCode::None;
    if !allowed || i.has_lock_prefix() || i.has_rep_prefix() || i.has_repne_prefix() {
        return false;
    }
    for k in 0..i.op_count() {
        match i.op_kind(k) {
            OpKind::Register => {
                if gpr_number(i.op_register(k)).is_none() {
                    return false;
                }
            }
            k if immediate(k) => {}
            // LEA computes an address and accesses nothing; RIP-relative
            // forms would tie the block to one linear address.
            OpKind::Memory if i.mnemonic() == M::Lea => {
                let regs_ok = [i.memory_base(), i.memory_index()]
                    .iter()
                    .all(|&r| r == Register::None || gpr_number(r).is_some());
                if !regs_ok {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// Whether `i` is LEA of a RIP-relative address into a 32- or 64-bit
/// general-purpose register.
pub fn lea_rip(i: &Instruction) -> bool {
    i.mnemonic() == M::Lea
        && i.memory_base() == Register::RIP
        && i.op0_kind() == OpKind::Register
        && gpr_number(i.op0_register()).is_some()
        && matches!(i.op0_register().size(), 4 | 8)
}

/// Whether `i` is a form with one memory operand that translated code
/// carries out through an inline probe of the software TLB, and if so
/// whether it writes memory: MOV (load, store, store of an immediate),
/// MOVZX/MOVSX/MOVSXD loads, and the integer ALU operations, INC, DEC, NEG
/// and NOT on memory. The address must be made of general-purpose registers
/// or be RIP-relative (the block adds the offset to the guest's RIP, since
/// it is keyed by physical address and may run at more than one linear
/// address), in a segment whose base is 0 in 64-bit mode (not FS or GS),
/// and at most 8 bytes long.
pub fn memory_form(i: &Instruction) -> Option<bool> {
    if !integer_op(i.mnemonic())
        || i.has_lock_prefix()
        || i.has_rep_prefix()
        || i.has_repne_prefix()
    {
        return None;
    }
    let mut memory = None;
    for k in 0..i.op_count() {
        match i.op_kind(k) {
            OpKind::Register => gpr_number(i.op_register(k)).map(|_| ())?,
            OpKind::Memory if memory.is_none() => memory = Some(k),
            k if immediate(k) => {}
            _ => return None,
        }
    }
    let k = memory?;
    // RIP-relative: the block computes the address from the guest's RIP.
    let regs_ok = (i.memory_base() == Register::RIP && i.memory_index() == Register::None)
        || [i.memory_base(), i.memory_index()]
            .iter()
            .all(|&r| r == Register::None || gpr_number(r).is_some());
    let seg_ok = matches!(
        i.memory_segment(),
        Register::DS | Register::ES | Register::SS | Register::CS
    );
    let size = i.memory_size().size();
    if !regs_ok || !seg_ok || !(1..=8).contains(&size) {
        return None;
    }
    Some(k == 0 && !matches!(i.mnemonic(), M::Cmp | M::Test))
}

/// How the translator carries out one guest instruction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Re-encoded with registers renamed.
    Identical,
    /// Re-encoded to access the host address an inline TLB probe found;
    /// `true` if it writes.
    Memory(bool),
    /// LEA of a RIP-relative address into a 32- or 64-bit register: the
    /// guest's RIP plus an offset.
    LeaRip,
}

/// The state translated code runs on, addressed through host RDI from the
/// moment the runtime enters the code cache until it leaves it: the
/// guest's registers, RIP and arithmetic flags, the instruction budget, and
/// what the code needs to probe the software TLB and the jump cache.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct Ctx {
    /// The guest's general-purpose registers, by encoding number.
    pub gpr: [u64; 16],
    /// The guest's RIP (in 64-bit code, its linear address).
    pub rip: u64,
    /// The guest's arithmetic flags as LAHF and SETO leave them in AX:
    /// bits 15:8 SF, ZF, AF, PF and CF; bit 0 OF.
    pub flags: u64,
    /// Guest instructions that may still run.
    pub left: u64,
    /// How the code left the cache: [`SLOT_STOP`] (the interpreter runs
    /// the next instruction), [`SLOT_NONE`] (the next block is missing from
    /// the jump cache), or the host address of the patchable jump of a
    /// block's exit whose target is missing (the dispatcher links it).
    pub slot: u64,
    /// The software TLB's first entry ([`x86::TlbProbe::base`]).
    pub tlb: u64,
    /// The TLB's access bit of a read at the current CPL.
    pub acc_r: u64,
    /// The TLB's access bit of a write at the current CPL.
    pub acc_w: u64,
    /// The jump cache's first entry.
    pub jc: u64,
    /// XORed into RIP to make a jump-cache key ([`jc_key`]).
    pub key_xor: u64,
    /// Blocks entered.
    pub entries: u64,
    /// Jump-cache lookups made by generated code.
    pub lookups: u64,
    /// The block that left through a memory access or a callout, and the
    /// mnemonic (`iced_x86::Mnemonic as u32`) of the instruction it left
    /// to the interpreter (`u32::MAX` for a memory access).
    pub block: u32,
    /// See `block`.
    pub callout: u32,
}

/// [`Ctx::slot`]: the interpreter runs the next instruction.
pub const SLOT_STOP: u64 = u64::MAX;
/// [`Ctx::slot`]: the dispatcher looks the next block up.
pub const SLOT_NONE: u64 = 0;
/// [`Ctx::callout`]: a memory access whose page had no TLB entry.
pub const CALLOUT_MEMORY: u32 = u32::MAX;
/// [`Ctx::callout`]: a memory access whose page's TLB entry could not serve
/// it (a write to a page holding code, MMIO, an access across pages).
pub const CALLOUT_MEMORY_HARD: u32 = u32::MAX - 2;
/// [`Ctx::callout`]: no reason (the budget).
pub const CALLOUT_NONE: u32 = u32::MAX - 1;

impl Ctx {
    /// Takes the arithmetic flags of `rflags`.
    pub fn set_rflags(&mut self, rflags: u64) {
        let of = rflags >> 11 & 1;
        self.flags = (rflags & 0xd5 | 2) << 8 | of;
    }

    /// `rflags` with its arithmetic flags replaced by the context's.
    pub fn rflags(&self, rflags: u64) -> u64 {
        let f = (self.flags >> 8 & 0xd5) | (self.flags & 1) << 11;
        rflags & !ARITH | f
    }
}

fn ctx_off(off: usize) -> i32 {
    off as i32
}

macro_rules! ctx {
    ($field:ident) => {
        ctx_off(std::mem::offset_of!(Ctx, $field))
    };
}

/// Entries of the jump cache (a power of two).
pub const JC_ENTRIES: usize = 4096;
/// The key of an empty jump-cache entry: not canonical, so no guest RIP
/// has it.
pub const JC_EMPTY: u64 = 1 << 48;

/// One jump-cache entry: a key ([`jc_key`]) and the host address of its
/// block's code.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct JcEntry {
    /// [`jc_key`] of the block's guest RIP, or [`JC_EMPTY`].
    pub key: u64,
    /// Host address of the block's code.
    pub code: u64,
}

/// The jump cache's key of a guest RIP: the RIP with bit 63 flipped at
/// CPL 3 (what can be fetched differs between supervisor and user); keys of
/// canonical addresses never collide.
pub fn jc_key(rip: u64, user: bool) -> u64 {
    rip ^ (u64::from(user) << 63)
}

/// The slot of `key` in the jump cache (the generated lookup computes the
/// same).
pub fn jc_index(key: u64) -> usize {
    ((key ^ key >> 12) as usize) & (JC_ENTRIES - 1)
}

/// Host addresses of the runtime's routines, at the start of the code
/// cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct Runtime {
    /// `extern "sysv64" fn(ctx: *mut Ctx, code: u64)`: saves the host's
    /// callee-saved registers and jumps to a block.
    pub enter: u64,
    /// Leaves the cache with [`SLOT_STOP`].
    pub stop: u64,
    /// Leaves the cache (restores the callee-saved registers and returns).
    pub exit: u64,
    /// Looks the block at the context's RIP up in the jump cache and jumps
    /// to it, or leaves the cache.
    pub lookup: u64,
}

/// The runtime's code, for host address `base`.
pub fn runtime(base: u64) -> Result<(Vec<u8>, Runtime), IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut enter = a.create_label();
    let mut stop = a.create_label();
    let mut exit = a.create_label();
    let mut lookup = a.create_label();
    a.set_label(&mut enter)?;
    for reg in [rbx, rbp, r12, r13, r14, r15] {
        a.push(reg)?;
    }
    a.jmp(rsi)?;
    a.set_label(&mut stop)?;
    a.mov(qword_ptr(rdi + ctx!(slot)), -1)?;
    a.set_label(&mut exit)?;
    for reg in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(reg)?;
    }
    a.ret()?;
    a.set_label(&mut lookup)?;
    a.inc(qword_ptr(rdi + ctx!(lookups)))?;
    a.mov(rax, qword_ptr(rdi + ctx!(rip)))?;
    a.xor(rax, qword_ptr(rdi + ctx!(key_xor)))?;
    a.mov(rcx, rax)?;
    a.shr(rcx, 12)?;
    a.xor(rcx, rax)?;
    a.and(ecx, (JC_ENTRIES - 1) as u32)?;
    a.shl(ecx, 4)?;
    a.add(rcx, qword_ptr(rdi + ctx!(jc)))?;
    a.cmp(rax, qword_ptr(rcx))?;
    a.jne(exit)?;
    a.jmp(qword_ptr(rcx + 8))?;
    let r = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let rt = Runtime {
        enter: r.label_ip(&enter)?,
        stop: r.label_ip(&stop)?,
        exit: r.label_ip(&exit)?,
        lookup: r.label_ip(&lookup)?,
    };
    Ok((r.inner.code_buffer, rt))
}

/// A translated block, before it is placed in the code cache.
pub struct Translation {
    /// The host code, for the host address it was translated for.
    pub code: Vec<u8>,
    /// Guest instructions it runs (when no memory access leaves early).
    pub count: u32,
    /// Of those, the ones that access memory through the TLB probe.
    pub memory: u32,
    /// Guest bytes it covers.
    pub len: u64,
    /// The guest instruction it leaves to the interpreter at its end, if
    /// it ends before one.
    pub callout: Option<M>,
}

/// Where a probe goes when it cannot serve the access.
#[derive(Clone, Copy)]
struct Miss {
    cold: CodeLabel,
    hard: CodeLabel,
}

/// How a block's host code ends.
enum End<'a> {
    /// A direct JMP or Jcc, resolved in host code.
    Branch(&'a Instruction),
    /// Past the last instruction; `Some` if the interpreter runs the next
    /// one (its mnemonic).
    Next(Option<M>),
}

/// Builds blocks; keeps the instruction-information factory between them.
pub struct Translator {
    info: InstructionInfoFactory,
    /// Entries of the software TLB minus one (the index mask).
    tlb_mask: u64,
    /// The runtime's routines in the code cache.
    rt: Runtime,
}

impl Translator {
    /// A translator for a software TLB of `tlb_mask + 1` entries, whose
    /// blocks leave through the runtime `rt`.
    pub fn new(tlb_mask: u64, rt: Runtime) -> Translator {
        Translator {
            info: InstructionInfoFactory::new(),
            tlb_mask,
            rt,
        }
    }

    /// Every general-purpose register `i` reads or writes, explicitly or
    /// implicitly, or `None` if it uses another kind of register.
    fn gprs_used(&mut self, i: &Instruction) -> Option<u16> {
        if i.mnemonic() == M::Nop {
            return Some(0);
        }
        let mut set = 0u16;
        for u in self.info.info(i).used_registers() {
            if u.access() == OpAccess::None || u.register() == Register::RIP {
                continue;
            }
            set |= 1 << gpr_number(u.register())?;
        }
        for k in 0..i.op_count() {
            if i.op_kind(k) == OpKind::Memory {
                for r in [i.memory_base(), i.memory_index()] {
                    if r != Register::None && r != Register::RIP {
                        set |= 1 << gpr_number(r)?;
                    }
                }
            }
        }
        Some(set)
    }

    /// Translates the run of instructions from the start of `guest`
    /// (decoded in order from one page of 64-bit code) that are identical
    /// or memory forms, and a direct branch after them, into host code for
    /// host address `at`, as block number `id`. `callout` is the mnemonic
    /// of the instruction after `guest` if the interpreter must run it.
    /// `None` if that run is too short to be worth a block.
    pub fn translate(
        &mut self,
        guest: &[Instruction],
        callout: Option<M>,
        at: u64,
        id: u32,
    ) -> Option<Translation> {
        let mut used = 0u16;
        let mut taken = Vec::new();
        let mut forms = Vec::new();
        for i in guest.iter().take(MAX_BLOCK) {
            let form = if identical(i) {
                Form::Identical
            } else if lea_rip(i) {
                Form::LeaRip
            } else if let Some(w) = memory_form(i) {
                Form::Memory(w)
            } else {
                break;
            };
            // A RIP-relative operand's offset from the block's start must
            // fit a displacement.
            let start = guest[0].ip();
            if i.is_ip_rel_memory_operand()
                && i32::try_from(i.memory_displacement64().wrapping_sub(start) as i64).is_err()
            {
                break;
            }
            let Some(u) = self.gprs_used(i) else { break };
            let all = used | u;
            let memory = forms
                .iter()
                .chain([&form])
                .any(|f| matches!(f, Form::Memory(_)));
            // RSP, RDI and, with memory accesses, three scratch registers
            // need host registers the block leaves free.
            let need = (all >> 4 & 1) + (all >> 7 & 1) + if memory { 3 } else { 0 };
            let free = (!all & !(1 << 4 | 1 << 7)).count_ones() as u16;
            if free < need {
                break;
            }
            used = all;
            taken.push(*i);
            forms.push(form);
        }
        let branch = guest
            .get(taken.len())
            .filter(|i| direct_branch(i) && taken.len() < MAX_BLOCK)
            .copied();
        if taken.len() + usize::from(branch.is_some()) < MIN_BLOCK {
            return None;
        }
        // The interpreter's instruction comes next only if the block took
        // everything it was given; else the next one starts a block.
        let callout = if taken.len() == guest.len() {
            callout
        } else {
            None
        };
        let end = match &branch {
            Some(b) => End::Branch(b),
            None => End::Next(callout),
        };
        let regs = Registers::new(used, forms.iter().any(|f| matches!(f, Form::Memory(_))));
        let code = self.emit(&taken, &forms, end, used, &regs, at, id).ok()?;
        let memory = forms
            .iter()
            .filter(|f| matches!(f, Form::Memory(_)))
            .count() as u32;
        taken.extend(branch);
        Some(Translation {
            code,
            count: taken.len() as u32,
            memory,
            len: taken.iter().map(|i| i.len() as u64).sum(),
            callout: if branch.is_some() { None } else { callout },
        })
    }

    /// The block's host code, for host address `at`: it checks the budget,
    /// loads what it needs of the context, runs the guest's instructions,
    /// stores the registers and flags back, and leaves: to the next block
    /// through a patchable jump (a target in the same guest page, which the
    /// dispatcher links once the target exists), through the jump cache
    /// (another page), or out of the cache (the interpreter's instruction
    /// is next, or a memory access found no usable TLB entry: the block
    /// stops before it).
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        guest: &[Instruction],
        forms: &[Form],
        end: End,
        used: u16,
        r: &Registers,
        at: u64,
        id: u32,
    ) -> Result<Vec<u8>, IcedError> {
        let branch = match end {
            End::Branch(b) => Some(b),
            End::Next(_) => None,
        };
        let start = guest.first().or(branch).map_or(0, |i| i.ip());
        let next = branch.or(guest.last()).map_or(start, |i| i.next_ip());
        let count = guest.len() + usize::from(branch.is_some());
        let mut a = CodeAssembler::new(64)?;
        // Which guest flags must hold their true value right after each
        // instruction's probe: what it or a later instruction reads before
        // writing it with a defined value (a flag the SDM leaves undefined
        // may keep its old value on the host), where any later memory
        // instruction counts as reading every flag (its probe may leave the
        // block there, and the interpreter, or the handler of a fault it
        // raises, sees the flags), as does the block's end. What is live
        // before the first instruction is loaded from the context.
        let all = RflagsBits::OF
            | RflagsBits::SF
            | RflagsBits::ZF
            | RflagsBits::AF
            | RflagsBits::CF
            | RflagsBits::PF;
        let mut needed = vec![all; guest.len()];
        let mut live = all;
        let mut writes_flags = false;
        for (k, (i, form)) in guest.iter().zip(forms).enumerate().rev() {
            // Shifts and rotates leave every flag alone when their masked
            // count is 0, which CL (or the immediate) decides at run time.
            let shift = matches!(
                i.mnemonic(),
                M::Shl
                    | M::Shr
                    | M::Sar
                    | M::Sal
                    | M::Rol
                    | M::Ror
                    | M::Rcl
                    | M::Rcr
                    | M::Shld
                    | M::Shrd
            );
            writes_flags |= shift || i.rflags_modified() != 0;
            let defined = if shift {
                0
            } else {
                i.rflags_written() | i.rflags_cleared() | i.rflags_set()
            };
            needed[k] = i.rflags_read() | (live & !defined);
            live = if matches!(form, Form::Memory(_)) {
                all
            } else {
                needed[k]
            };
        }
        let flags_in = live & all != 0;
        let mut slots = Vec::new();

        // Entry: the budget, then the context.
        let mut over = a.create_label();
        a.sub(qword_ptr(rdi + ctx!(left)), count as i32)?;
        a.jb(over)?;
        if flags_in {
            // OF from AL (1 + 0x7f overflows, 0 + 0x7f does not), the
            // others from AH.
            a.movzx(eax, word_ptr(rdi + ctx!(flags)))?;
            a.add(al, 0x7f)?;
            a.sahf()?;
        }
        for g in (0..16).filter(|g| used & (1 << g) != 0) {
            a.add_instruction(Instruction::with2(
                Code::Mov_r64_rm64,
                GPR64[r.map[g]],
                MemoryOperand::with_base_displ(Register::RDI, ctx!(gpr) as i64 + 8 * g as i64),
            )?)?;
        }
        let mut misses = Vec::new();
        for (k, (i, form)) in guest.iter().zip(forms).enumerate() {
            let mut o = rename(i, &r.map);
            if *form == Form::LeaRip {
                // The guest's RIP is the block's start until it leaves.
                let dst = renamed(
                    i.op0_register(),
                    r.map[gpr_number(i.op0_register()).unwrap_or(0)],
                );
                let full = GPR64[r.map[gpr_number(i.op0_register()).unwrap_or(0)]];
                a.add_instruction(Instruction::with2(
                    Code::Mov_r64_rm64,
                    full,
                    MemoryOperand::with_base_displ(Register::RDI, ctx!(rip) as i64),
                )?)?;
                let code = if dst.size() == 8 {
                    Code::Lea_r64_m
                } else {
                    Code::Lea_r32_m
                };
                a.add_instruction(Instruction::with2(
                    code,
                    dst,
                    MemoryOperand::with_base_displ(
                        full,
                        i.memory_displacement64().wrapping_sub(start) as i64,
                    ),
                )?)?;
                continue;
            }
            if let Form::Memory(write) = *form {
                let miss = Miss {
                    cold: a.create_label(),
                    hard: a.create_label(),
                };
                self.probe(&mut a, i, write, r, miss, needed[k] & all != 0, start)?;
                let host = GPR64[r.scratch[0]];
                o.set_memory_base(host);
                o.set_memory_index(Register::None);
                o.set_memory_index_scale(1);
                o.set_memory_displacement64(0);
                o.set_memory_displ_size(0);
                o.set_segment_prefix(Register::None);
                misses.push((miss, k));
            }
            if i.mnemonic() == M::Nop {
                continue;
            }
            // No IP: the assembler takes an instruction's IP for a label.
            o.set_ip(0);
            a.add_instruction(o)?;
        }
        store(&mut a, used, &r.map, writes_flags)?;
        let page = start & !0xfff;
        let mut leave = |a: &mut CodeAssembler, target: u64, stop: Option<M>| {
            let delta = target.wrapping_sub(start);
            add_rip(a, delta)?;
            if let Some(m) = stop {
                a.mov(dword_ptr(rdi + ctx!(block)), id)?;
                a.mov(dword_ptr(rdi + ctx!(callout)), m as u32)?;
                a.jmp(self.rt.stop)
            } else if target & !0xfff == page {
                // Linked by the dispatcher once the target is translated.
                let mut slot = a.create_label();
                a.lea(rax, ptr(slot))?;
                a.mov(qword_ptr(rdi + ctx!(slot)), rax)?;
                a.set_label(&mut slot)?;
                a.db(&[0xe9, 0, 0, 0, 0])?;
                slots.push(slot);
                Ok(())
            } else {
                a.mov(qword_ptr(rdi + ctx!(slot)), SLOT_NONE as i32)?;
                a.jmp(self.rt.lookup)
            }
        };
        match end {
            End::Branch(b) if b.is_jmp_short_or_near() => {
                leave(&mut a, b.near_branch_target(), None)?;
            }
            End::Branch(b) => {
                let mut taken = a.create_label();
                jcc(&mut a, b.condition_code(), taken)?;
                leave(&mut a, next, None)?;
                a.set_label(&mut taken)?;
                leave(&mut a, b.near_branch_target(), None)?;
            }
            End::Next(stop) => leave(&mut a, next, stop)?,
        }
        for (mut miss, k) in misses {
            let mut flags = a.create_label();
            a.set_label(&mut miss.hard)?;
            a.mov(dword_ptr(rdi + ctx!(callout)), CALLOUT_MEMORY_HARD)?;
            a.jmp(flags)?;
            a.set_label(&mut miss.cold)?;
            a.mov(dword_ptr(rdi + ctx!(callout)), CALLOUT_MEMORY)?;
            a.set_label(&mut flags)?;
            a.popfq()?;
            store(&mut a, used, &r.map, writes_flags)?;
            // The budget was taken for the whole block.
            a.add(qword_ptr(rdi + ctx!(left)), (count - k) as i32)?;
            add_rip(&mut a, guest[k].ip().wrapping_sub(start))?;
            a.mov(dword_ptr(rdi + ctx!(block)), id)?;
            a.jmp(self.rt.stop)?;
        }
        // Not enough budget for the block: give it back and stop.
        a.set_label(&mut over)?;
        a.add(qword_ptr(rdi + ctx!(left)), count as i32)?;
        a.jmp(self.rt.stop)?;
        let res = a.assemble_options(at, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        let mut code = res.inner.code_buffer.clone();
        // The slots leave the cache until the dispatcher links them (a
        // lookup that hit would never let it).
        for slot in &slots {
            let ip = res.label_ip(slot)?;
            let off = (ip - at) as usize;
            // The cache is at most [`crate::cache::MAX_SIZE`]: in reach.
            let rel = self.rt.exit.wrapping_sub(ip + 5) as i32;
            code[off + 1..off + 5].copy_from_slice(&rel.to_le_bytes());
        }
        Ok(code)
    }

    /// The inline TLB probe before memory instruction `i`: the guest's
    /// linear address in scratch 0, then, with the flags saved on the
    /// stack, the entry for its page checked (tag, access bit for the
    /// current CPL, RAM, the access within the page) and the host address
    /// put in scratch 0; on any failure a jump to `miss` (flags still
    /// saved): `miss.cold` if the entry is another page's, `miss.hard` if
    /// it is this page's but cannot serve the access. On the hit path the flags are restored when `flags_live`
    /// (POPFQ is slow), else their saved copy is dropped.
    fn probe(
        &self,
        a: &mut CodeAssembler,
        i: &Instruction,
        write: bool,
        r: &Registers,
        miss: Miss,
        flags_live: bool,
        start: u64,
    ) -> Result<(), IcedError> {
        let s1 = GPR64[r.scratch[0]];
        let [s1a, s2a, s3a] = r.scratch.map(|n| ASM64[n]);
        let s3ab = ASM8[r.scratch[2]];
        let ren = |reg: Register| match gpr_number(reg) {
            Some(n) => renamed(reg, r.map[n]),
            None => reg,
        };
        let size = i.memory_size().size() as i32;
        // LEA leaves the flags alone; so does MOV. The guest's RIP is the
        // block's start until it leaves.
        if i.is_ip_rel_memory_operand() {
            a.mov(s1a, qword_ptr(rdi + ctx!(rip)))?;
            let off = i.memory_displacement64().wrapping_sub(start) as i32;
            a.lea(s1a, qword_ptr(s1a + off))?;
        } else {
            a.add_instruction(Instruction::with2(
                Code::Lea_r64_m,
                s1,
                MemoryOperand::new(
                    ren(i.memory_base()),
                    ren(i.memory_index()),
                    i.memory_index_scale(),
                    i.memory_displacement64() as i64,
                    i.memory_displ_size(),
                    false,
                    Register::None,
                ),
            )?)?;
        }
        a.pushfq()?;
        a.mov(s2a, s1a)?;
        a.shr(s2a, 12)?;
        a.and(s2a, self.tlb_mask as i32)?;
        a.imul_3(s2a, s2a, x86::TLB_ENTRY_SIZE as i32)?;
        a.add(s2a, qword_ptr(rdi + ctx!(tlb)))?;
        // Not this page's entry: a cold miss, which the interpreter's walk
        // fills.
        a.mov(s3a, s1a)?;
        a.and(s3a, -0x1000)?;
        a.cmp(s3a, qword_ptr(s2a + x86::TLB_VPAGE as i32))?;
        a.jne(miss.cold)?;
        // The page's entry, but no fast access: a write to a page that
        // holds code (or not yet dirty), MMIO, or an access across pages.
        let acc = if write { ctx!(acc_w) } else { ctx!(acc_r) };
        a.mov(s3a, qword_ptr(rdi + acc))?;
        a.test(byte_ptr(s2a + x86::TLB_ALLOW as i32), s3ab)?;
        a.jz(miss.hard)?;
        a.mov(s3a, s1a)?;
        a.and(s3a, 0xfff)?;
        a.cmp(s3a, 0x1000 - size)?;
        a.ja(miss.hard)?;
        a.mov(s3a, qword_ptr(s2a + x86::TLB_HOST as i32))?;
        a.test(s3a, s3a)?;
        a.jz(miss.hard)?;
        a.sub(s3a, qword_ptr(s2a + x86::TLB_VPAGE as i32))?;
        a.add(s1a, s3a)?;
        if flags_live {
            a.popfq()
        } else {
            // Nothing can see the flags before they are written again:
            // drop the saved copy (LEA leaves the flags alone; a miss still
            // restores it).
            a.lea(rsp, qword_ptr(rsp + 8))
        }
    }
}

/// The general-purpose registers for the assembler, by encoding number.
const ASM64: [AsmRegister64; 16] = [
    rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];
/// Their low bytes.
const ASM8: [AsmRegister8; 16] = [
    al, cl, dl, bl, spl, bpl, sil, dil, r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b,
];

/// Stores the guest's registers back into the context, then (if the block
/// writes any) its arithmetic flags; neither changes the host's flags.
fn store(
    a: &mut CodeAssembler,
    used: u16,
    map: &[usize; 16],
    flags: bool,
) -> Result<(), IcedError> {
    for g in (0..16).filter(|g| used & (1 << g) != 0) {
        a.add_instruction(Instruction::with2(
            Code::Mov_rm64_r64,
            MemoryOperand::with_base_displ(Register::RDI, ctx!(gpr) as i64 + 8 * g as i64),
            GPR64[map[g]],
        )?)?;
    }
    if flags {
        a.lahf()?;
        a.seto(al)?;
        a.mov(word_ptr(rdi + ctx!(flags)), ax)?;
    }
    Ok(())
}

/// Moves the context's RIP by `delta`.
fn add_rip(a: &mut CodeAssembler, delta: u64) -> Result<(), IcedError> {
    match i32::try_from(delta as i64) {
        Ok(d) => a.add(qword_ptr(rdi + ctx!(rip)), d),
        Err(_) => {
            a.mov(rax, delta)?;
            a.add(qword_ptr(rdi + ctx!(rip)), rax)
        }
    }
}

/// The host registers of a block: each guest register's (its own, but for
/// RSP and RDI, which take registers the block does not use) and, for
/// memory accesses, three scratch registers it does not use either.
struct Registers {
    map: [usize; 16],
    scratch: [usize; 3],
}

impl Registers {
    fn new(used: u16, memory: bool) -> Registers {
        let mut map: [usize; 16] = std::array::from_fn(|n| n);
        // `translate` made sure enough are free.
        let mut spare = (0..16).filter(|&n| n != 4 && n != 7 && used & (1 << n) == 0);
        for g in [4, 7] {
            if used & (1 << g) != 0 {
                map[g] = spare.next().unwrap_or(g);
            }
        }
        let mut scratch = [0; 3];
        if memory {
            for s in scratch.iter_mut() {
                *s = spare.next().unwrap_or(0);
            }
        }
        Registers { map, scratch }
    }
}

/// `i` with its registers renamed by `map`.
fn rename(i: &Instruction, map: &[usize; 16]) -> Instruction {
    let mut o = *i;
    let r = |reg: Register| match gpr_number(reg) {
        Some(n) => renamed(reg, map[n]),
        None => reg,
    };
    for k in 0..i.op_count() {
        if i.op_kind(k) == OpKind::Register {
            o.set_op_register(k, r(i.op_register(k)));
        }
    }
    if i.mnemonic() == M::Lea {
        o.set_memory_base(r(i.memory_base()));
        o.set_memory_index(r(i.memory_index()));
    }
    o
}

/// `jcc label` for the condition of a guest Jcc.
fn jcc(a: &mut CodeAssembler, cc: ConditionCode, l: CodeLabel) -> Result<(), IcedError> {
    use ConditionCode as C;
    match cc {
        C::o => a.jo(l),
        C::no => a.jno(l),
        C::b => a.jb(l),
        C::ae => a.jae(l),
        C::e => a.je(l),
        C::ne => a.jne(l),
        C::be => a.jbe(l),
        C::a => a.ja(l),
        C::s => a.js(l),
        C::ns => a.jns(l),
        C::p => a.jp(l),
        C::np => a.jnp(l),
        C::l => a.jl(l),
        C::ge => a.jge(l),
        C::le => a.jle(l),
        C::g => a.jg(l),
        C::None => a.jmp(l),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    #[test]
    fn lea_imul_and_stack_arithmetic_are_translated() {
        // lea rsi, [rax+rdx*4+12]; imul rdi, rsi, 3; add rsp, 8; sub rsp, 8
        let g = decode(&[
            0x48, 0x8d, 0x74, 0x90, 0x0c, 0x48, 0x6b, 0xfe, 0x03, 0x48, 0x83, 0xc4, 0x08, 0x48,
            0x83, 0xec, 0x08,
        ]);
        for i in &g {
            assert!(identical(i), "{i:?}");
        }
        let t = Translator::new(1023, Runtime::default())
            .translate(&g, None, 0x1000_0000, 0)
            .unwrap();
        assert_eq!(t.count, 4);
    }

    #[test]
    fn allow_list() {
        let ok = |b: &[u8]| identical(&decode(b)[0]);
        assert!(ok(&[0x48, 0x01, 0xd8])); // add rax, rbx
        assert!(ok(&[0x48, 0x8d, 0x44, 0x24, 0x08])); // lea rax, [rsp+8]
        assert!(!ok(&[0x48, 0x8b, 0x03])); // mov rax, [rbx]
        assert!(!ok(&[0x48, 0x8d, 0x05, 0, 0, 0, 0])); // lea rax, [rip]
        assert!(!ok(&[0x00, 0xe0])); // add al, ah
        assert!(!ok(&[0x0f, 0x20, 0xc0])); // mov rax, cr0
        assert!(!ok(&[0x48, 0xf7, 0xf3])); // div rbx
        assert!(!ok(&[0x0f, 0x05])); // syscall
        assert!(!ok(&[0xcd, 0x80])); // int 0x80
        assert!(!ok(&[0x9c])); // pushfq
        assert!(!ok(&[0xfa])); // cli
        assert!(!ok(&[0x8c, 0xd8])); // mov eax, ds
    }

    #[test]
    fn rsp_and_rdi_are_renamed() {
        // add rsp, 8; mov rdi, rsp; inc rax
        let g = decode(&[0x48, 0x83, 0xc4, 0x08, 0x48, 0x89, 0xe7, 0x48, 0xff, 0xc0]);
        let t = Translator::new(1023, Runtime::default())
            .translate(&g, None, 0x1000_0000, 0)
            .unwrap();
        assert_eq!((t.count, t.len), (3, 10));
        let host: Vec<_> = decode(&t.code);
        let body: Vec<String> = host
            .iter()
            .filter(|i| i.mnemonic() == M::Add || (i.mnemonic() == M::Mov && i.op_count() == 2))
            .map(|i| format!("{i}"))
            .collect();
        assert!(
            !body
                .iter()
                .any(|s| s == "add rsp,8" || s.starts_with("mov rdi,rsp")),
            "{body:?}"
        );
    }
}
