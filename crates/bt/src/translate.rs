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
    BlockEncoderOptions, Code, ConditionCode, Encoder, Instruction, InstructionInfoFactory,
    MemoryOperand, Mnemonic as M, OpAccess, OpKind, Register, RflagsBits,
};

/// The most instructions in one block.
pub const MAX_BLOCK: usize = 64;

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

/// Whether the translator can carry `i` out in a block (identically, as
/// a memory form, a RIP-relative LEA, or a checked division).
pub fn translatable(i: &Instruction) -> bool {
    identical(i) || memory_form(i).is_some() || lea_rip(i) || division(i) || stack_op(i)
}

/// Whether `i` is PUSH or POP of a 64-bit general-purpose register.
pub fn stack_op(i: &Instruction) -> bool {
    matches!(i.code(), Code::Push_r64 | Code::Pop_r64) && gpr_number(i.op0_register()).is_some()
}

/// Whether `i` is a near CALL with a relative target.
pub fn call_near(i: &Instruction) -> bool {
    i.code() == Code::Call_rel32_64
}

/// Whether `i` is a near RET (of 64 bits, with or without bytes to pop).
pub fn return_near(i: &Instruction) -> bool {
    matches!(i.code(), Code::Retnq | Code::Retnq_imm16)
}

/// Whether `i` is a near JMP or CALL through a 64-bit general-purpose
/// register.
pub fn indirect_near(i: &Instruction) -> bool {
    matches!(i.code(), Code::Jmp_rm64 | Code::Call_rm64)
        && i.op0_kind() == OpKind::Register
        && gpr_number(i.op0_register()).is_some()
}

/// Whether `i` ends a block in host code: a direct JMP or Jcc, a direct
/// CALL, a RET, or a JMP or CALL through a register.
pub fn terminator(i: &Instruction) -> bool {
    direct_branch(i) || call_near(i) || return_near(i) || indirect_near(i)
}

/// Whether `i` is DIV or IDIV by a 32- or 64-bit general-purpose register,
/// or by a doubleword or quadword in memory at an address a probe can
/// check (see [`memory_operand_ok`]): the block loads the divisor through
/// the probe and divides by the register it loaded it into.
pub fn division(i: &Instruction) -> bool {
    if !matches!(i.mnemonic(), M::Div | M::Idiv) || i.has_lock_prefix() || i.op_count() != 1 {
        return false;
    }
    match i.op0_kind() {
        OpKind::Register => {
            gpr_number(i.op0_register()).is_some() && matches!(i.op0_register().size(), 4 | 8)
        }
        OpKind::Memory => memory_operand_ok(i) && matches!(i.memory_size().size(), 4 | 8),
        _ => false,
    }
}

/// Jumps to `fault` unless division `o` (its registers renamed) cannot
/// raise #DE: a divisor that is not 0 and, for DIV, a high half of the
/// dividend below it (the quotient fits); for IDIV, a dividend that is its
/// low half sign-extended and not the most negative value divided by -1
/// (a narrower condition than the SDM's: what it leaves out goes to the
/// interpreter). Uses host register `s`; changes the flags.
fn division_check(
    a: &mut CodeAssembler,
    o: &Instruction,
    s: usize,
    fault: CodeLabel,
) -> Result<(), IcedError> {
    let d = o.op0_register();
    let wide = d.size() == 8;
    let n = gpr_number(d).unwrap_or(0);
    let (div, t) = (ASM64[n], ASM64[s]);
    let div32 = ASM32[n];
    let t32 = ASM32[s];
    if wide {
        a.test(div, div)?;
    } else {
        a.test(div32, div32)?;
    }
    a.jz(fault)?;
    if o.mnemonic() == M::Div {
        if wide {
            a.cmp(rdx, div)?;
        } else {
            a.cmp(edx, div32)?;
        }
        return a.jae(fault);
    }
    // IDIV: RDX = sign of RAX.
    if wide {
        a.mov(t, rax)?;
        a.sar(t, 63)?;
        a.cmp(t, rdx)?;
    } else {
        a.mov(t32, eax)?;
        a.sar(t32, 31)?;
        a.cmp(t32, edx)?;
    }
    a.jne(fault)?;
    let mut ok = a.create_label();
    if wide {
        a.cmp(div, -1)?;
        a.jne(ok)?;
        a.mov(t, rax)?;
        a.neg(t)?;
    } else {
        a.cmp(div32, -1)?;
        a.jne(ok)?;
        a.mov(t32, eax)?;
        a.neg(t32)?;
    }
    a.jo(fault)?;
    a.set_label(&mut ok)?;
    a.nop()
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
    let exchange = matches!(i.mnemonic(), M::Xadd | M::Cmpxchg | M::Xchg);
    // LOCK: the host's locked instruction on guest RAM is as atomic.
    let lockable = exchange
        || matches!(
            i.mnemonic(),
            M::Add
                | M::Or
                | M::Adc
                | M::Sbb
                | M::And
                | M::Sub
                | M::Xor
                | M::Inc
                | M::Dec
                | M::Neg
                | M::Not
        );
    if !(integer_op(i.mnemonic()) || exchange)
        || (i.has_lock_prefix() && !(lockable && i.op0_kind() == OpKind::Memory))
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
    if !memory_operand_ok(i) || !(1..=8).contains(&i.memory_size().size()) {
        return None;
    }
    Some((k == 0 || i.mnemonic() == M::Xchg) && !matches!(i.mnemonic(), M::Cmp | M::Test))
}

/// Whether the memory operand of `i` is one a probe can check: an address
/// of general-purpose registers, or RIP-relative (the block computes it
/// from the guest's RIP), in a segment whose base is 0 in 64-bit mode or in
/// FS or GS (the probe adds the base).
fn memory_operand_ok(i: &Instruction) -> bool {
    let regs_ok = (i.memory_base() == Register::RIP && i.memory_index() == Register::None)
        || [i.memory_base(), i.memory_index()]
            .iter()
            .all(|&r| r == Register::None || gpr_number(r).is_some());
    let seg_ok = matches!(
        i.memory_segment(),
        Register::DS | Register::ES | Register::SS | Register::CS | Register::FS | Register::GS
    );
    regs_ok && seg_ok
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
    /// DIV or IDIV of RDX:RAX (EDX:EAX) by a register, after a check that
    /// it cannot raise #DE (else the block stops before it).
    Div,
    /// PUSH or POP of a 64-bit register, through the TLB probe.
    Push,
    /// See `Push`.
    Pop,
    /// A conditional branch inside a superblock: not taken, the block goes
    /// on; taken, it jumps to a later instruction of the block (a join) or
    /// leaves by a side exit.
    Jcc,
}

/// Memory accesses that share one TLB probe: the accesses of consecutive
/// memory instructions of a block through the same base, index, scale and
/// segment (or RIP-relative ones), whose registers do not change between
/// them, within [`GROUP_SPAN`] bytes. The first (the leader) probes the
/// whole span, [`Group::low`] to [`Group::low`] + [`Group::span`], for a
/// write if any of them writes, and leaves the host address of `low` in
/// scratch 0; each then accesses `[scratch 0 + its displacement - low]`.
/// A span across a page misses at the leader every time: the dispatcher
/// then makes the leader probe alone (`solo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Group {
    leader: usize,
    /// The lowest displacement (for RIP-relative accesses, the lowest
    /// target).
    low: u64,
    /// Bytes from `low` to the end of the highest access.
    span: u32,
    write: bool,
}

/// The most bytes one probe covers for a [`Group`].
const GROUP_SPAN: u64 = 256;

/// For each instruction of a block, if it is a conditional branch inside
/// it ([`Form::Jcc`]) whose target is a later instruction of the block, the
/// index of that instruction (a join); else `None` (a side exit, or not a
/// branch).
fn joins(guest: &[Instruction], forms: &[Form]) -> Vec<Option<usize>> {
    guest
        .iter()
        .zip(forms)
        .enumerate()
        .map(|(k, (i, f))| {
            if *f != Form::Jcc {
                return None;
            }
            let t = i.near_branch_target();
            guest
                .iter()
                .enumerate()
                .skip(k + 1)
                .find(|(_, g)| g.ip() == t)
                .map(|(j, _)| j)
        })
        .collect()
}

/// The group of each instruction of a block (`None`: it probes alone, or
/// does not access memory through a probe). `solo` has bit k set if
/// instruction k must probe alone. `cross`: the last instruction crosses
/// into the next page (the check before it takes the scratch registers).
fn groups(
    guest: &[Instruction],
    forms: &[Form],
    writes: &[u16],
    solo: u64,
    cross: bool,
    joins: u64,
) -> Vec<Option<Group>> {
    let mut out: Vec<Option<Group>> = vec![None; guest.len()];
    // The open group: its key and members.
    type Key = (Register, Register, u32, Register);
    let mut open: Option<(Key, Group, Vec<usize>)> = None;
    let close = |open: &mut Option<(_, Group, Vec<usize>)>, out: &mut Vec<Option<Group>>| {
        if let Some((_, g, members)) = open.take() {
            if members.len() > 1 {
                for m in members {
                    out[m] = Some(g);
                }
            }
        }
    };
    for (k, (i, f)) in guest.iter().zip(forms).enumerate() {
        let crossing = cross && k + 1 == guest.len();
        // A join is reached from a branch too, past the leader.
        if joins >> k & 1 != 0 {
            close(&mut open, &mut out);
        }
        match f {
            Form::Memory(write) if solo >> k & 1 == 0 && !crossing => {
                let key = (
                    i.memory_base(),
                    i.memory_index(),
                    i.memory_index_scale(),
                    i.memory_segment(),
                );
                let disp = i.memory_displacement64();
                let size = i.memory_size().size() as u64;
                let joined = match &mut open {
                    Some((okey, g, members)) if *okey == key => {
                        // The span from the lowest to the highest end, both
                        // relative to the group's low displacement.
                        let rel = disp.wrapping_sub(g.low) as i64;
                        let lo = rel.min(0);
                        let hi = (rel + size as i64).max(i64::from(g.span));
                        if (hi - lo) as u64 <= GROUP_SPAN {
                            g.low = g.low.wrapping_add(lo as u64);
                            g.span = (hi - lo) as u32;
                            g.write |= *write;
                            members.push(k);
                            true
                        } else {
                            false
                        }
                    }
                    _ => false,
                };
                if !joined {
                    close(&mut open, &mut out);
                    if size <= GROUP_SPAN {
                        let g = Group {
                            leader: k,
                            low: disp,
                            span: size as u32,
                            write: *write,
                        };
                        open = Some((key, g, vec![k]));
                    }
                }
            }
            Form::Identical | Form::LeaRip | Form::Jcc if !crossing => {}
            // They probe (or divide) with the scratch registers.
            _ => close(&mut open, &mut out),
        }
        // A write to the group's registers ends it.
        if let Some(((base, index, _, _), _, _)) = &open {
            let hit = |r: &Register| gpr_number(*r).is_some_and(|n| writes[k] >> n & 1 != 0);
            if hit(base) || hit(index) {
                close(&mut open, &mut out);
            }
        }
    }
    close(&mut open, &mut out);
    out
}

/// The state translated code runs on, addressed through host RDI from the
/// moment the runtime enters the code cache until it leaves it. While code
/// in the cache runs, the guest's registers other than RSP, RDI and R15
/// live in the host registers of the same numbers and its arithmetic flags
/// in the host's RFLAGS (its *home* state); `gpr` holds them only outside
/// the cache and while a block has borrowed their host register. RSP and
/// RDI (host RSP is the host's stack, host RDI points here) and R15 (host
/// R15 counts the instructions run) live in `gpr` and are loaded into
/// borrowed host registers by the blocks that use them.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct Ctx {
    /// The guest's general-purpose registers, by encoding number.
    pub gpr: [u64; 16],
    /// The linear address of the page of the block that runs (64-bit
    /// code: RIP's page).
    pub vpage: u64,
    /// Where the code left: RIP minus `vpage`.
    pub next: u64,
    /// The guest's arithmetic flags as LAHF and SETO leave them in AX:
    /// bits 15:8 SF, ZF, AF, PF and CF; bit 0 OF.
    pub flags: u64,
    /// Where a block that uses guest RAX parks the guest's flags (in the
    /// form of `flags`) while its TLB probes change the host's.
    pub park: u64,
    /// Guest instructions run since the runtime entered the cache, shifted
    /// left by [`COUNT_SHIFT`], plus the blocks entered (host R15 while the
    /// code runs): see [`Ctx::instructions`] and [`Ctx::blocks`].
    pub count: u64,
    /// The budget, shifted as `count`: a loop's backward jump and a lookup
    /// leave the cache once `count` reaches it (a run of forward jumps
    /// within one page may go past it, by less than a page of
    /// instructions).
    pub limit: u64,
    /// How the code left the cache: [`SLOT_STOP`] (the interpreter runs
    /// the next instruction, or the budget is spent), [`SLOT_NONE`] (the
    /// next block is missing from the jump cache), or the offset in the
    /// cache of the patchable jump of a block's exit whose target is not
    /// linked yet (the dispatcher links it).
    pub slot: u64,
    /// The host address the runtime jumps to.
    pub code: u64,
    /// The software TLB's first entry ([`x86::TlbProbe::base`]).
    pub tlb: u64,
    /// The TLB's access bit of a read at the current CPL.
    pub acc_r: u64,
    /// The TLB's access bit of a write at the current CPL.
    pub acc_w: u64,
    /// The TLB's access bit of an instruction fetch at the current CPL.
    pub acc_x: u64,
    /// The software TLB's index mask.
    pub tlb_mask: u64,
    /// The jump cache's first entry.
    pub jc: u64,
    /// XORed into RIP to make a jump-cache key ([`jc_key`]).
    pub key_xor: u64,
    /// Jump-cache lookups made by generated code.
    pub lookups: u64,
    /// The lookup's RIP.
    pub rip: u64,
    /// The lookup's scratch: the physical page of the entry it found.
    pub jc_ppage: u64,
    /// The FS and GS segment bases (64-bit code adds them to FS: and GS:
    /// addresses; they change only in the interpreter).
    pub fs_base: u64,
    /// See `fs_base`.
    pub gs_base: u64,
    /// The block that left through a memory access or a callout, and the
    /// mnemonic (`iced_x86::Mnemonic as u32`) of the instruction it left
    /// to the interpreter, or [`CALLOUT_MEMORY`], [`CALLOUT_MEMORY_HARD`]
    /// or [`CALLOUT_NONE`].
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

/// Guest registers that live in host registers of the same number while
/// code in the cache runs (all but RSP, RDI and R15).
const HOMED: u16 = !(1 << 4 | 1 << 7 | 1 << 15);
/// The others: loaded from the context by the blocks that use them.
const IN_CONTEXT: [usize; 3] = [4, 7, 15];

/// Where the instruction count starts in [`Ctx::count`] (the blocks
/// entered are counted below it: fewer than 2^24 in one run, whose budget
/// is far smaller).
pub const COUNT_SHIFT: u32 = 24;

impl Ctx {
    /// Guest instructions run since the runtime entered the cache.
    pub fn instructions(&self) -> u64 {
        self.count >> COUNT_SHIFT
    }

    /// Blocks entered since the runtime entered the cache.
    pub fn blocks(&self) -> u64 {
        self.count & ((1 << COUNT_SHIFT) - 1)
    }

    /// Sets the budget to `left` instructions.
    pub fn set_limit(&mut self, left: u64) {
        self.limit = left.min(1 << 38) << COUNT_SHIFT;
    }

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

    /// The guest's RIP where the code left the cache.
    pub fn rip_out(&self) -> u64 {
        self.vpage.wrapping_add(self.next)
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

/// The context's slot of guest register `g`.
fn gpr_slot(g: usize) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::RDI, ctx!(gpr) as i64 + 8 * g as i64)
}

/// `mov [ctx.gpr[g]], host` (no flag changes).
fn spill(a: &mut CodeAssembler, g: usize, host: usize) -> Result<(), IcedError> {
    a.add_instruction(Instruction::with2(
        Code::Mov_rm64_r64,
        gpr_slot(g),
        GPR64[host],
    )?)
}

/// `mov host, [ctx.gpr[g]]` (no flag changes).
fn fill(a: &mut CodeAssembler, host: usize, g: usize) -> Result<(), IcedError> {
    a.add_instruction(Instruction::with2(
        Code::Mov_r64_rm64,
        GPR64[host],
        gpr_slot(g),
    )?)
}

/// Entries of the jump cache (a power of two).
pub const JC_ENTRIES: usize = 4096;
/// The key of an empty jump-cache entry: not canonical, so no guest RIP
/// has it.
pub const JC_EMPTY: u64 = 1 << 48;

/// One jump-cache entry: a key ([`jc_key`]), the host address of its
/// block's code, and the guest-physical page the block was translated from.
/// A hit needs the software TLB to map the RIP's page to that page, with
/// fetch access at the current CPL: so entries outlive TLB flushes (a page
/// whose mapping changed misses, and the dispatcher finds the block anew).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct JcEntry {
    /// [`jc_key`] of the block's guest RIP, or [`JC_EMPTY`].
    pub key: u64,
    /// Host address of the block's code.
    pub code: u64,
    /// The block's guest-physical page.
    pub ppage: u64,
    /// Padding to 32 bytes (the lookup scales the index by shifting).
    pub pad: u64,
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
    /// `extern "sysv64" fn(ctx: *mut Ctx)`: saves the host's callee-saved
    /// registers, loads the guest's home state and jumps to `ctx.code`.
    pub enter: u64,
    /// Leaves the cache with [`SLOT_STOP`].
    pub stop: u64,
    /// Leaves the cache: stores the home state and returns.
    pub exit: u64,
    /// Looks the block at `ctx.vpage + ctx.next` up in the jump cache and
    /// jumps to it, or leaves the cache (not found, or the budget spent).
    pub lookup: u64,
    /// [`Runtime::lookup`] for the RIP in `ctx.rip` (a return).
    pub lookup_abs: u64,
    /// Leaves the cache with the flags already in `ctx.flags`.
    pub exit_saved: u64,
}

/// The runtime's code, for host address `base`.
pub fn runtime(base: u64) -> Result<(Vec<u8>, Runtime), IcedError> {
    let homed: Vec<usize> = (0..16).filter(|g| HOMED & (1 << g) != 0).collect();
    let mut a = CodeAssembler::new(64)?;
    let mut enter = a.create_label();
    let mut stop = a.create_label();
    let mut exit = a.create_label();
    let mut exit_saved = a.create_label();
    let mut lookup = a.create_label();
    let mut lookup_abs = a.create_label();
    let mut miss = a.create_label();
    let mut spent = a.create_label();
    a.set_label(&mut enter)?;
    for reg in [rbx, rbp, r12, r13, r14, r15] {
        a.push(reg)?;
    }
    a.mov(r15, qword_ptr(rdi + ctx!(count)))?;
    // OF from AL (1 + 0x7f overflows, 0 + 0x7f does not), the others
    // from AH.
    a.movzx(eax, word_ptr(rdi + ctx!(flags)))?;
    a.add(al, 0x7f)?;
    a.sahf()?;
    for &g in &homed {
        fill(&mut a, g, g)?;
    }
    a.jmp(qword_ptr(rdi + ctx!(code)))?;

    a.set_label(&mut stop)?;
    a.mov(qword_ptr(rdi + ctx!(slot)), -1)?;
    a.set_label(&mut exit)?;
    spill(&mut a, 0, 0)?;
    a.lahf()?;
    a.seto(al)?;
    a.mov(word_ptr(rdi + ctx!(flags)), ax)?;
    fill(&mut a, 0, 0)?;
    a.set_label(&mut exit_saved)?;
    for &g in &homed {
        spill(&mut a, g, g)?;
    }
    a.mov(qword_ptr(rdi + ctx!(count)), r15)?;
    for reg in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(reg)?;
    }
    a.ret()?;

    // The lookups borrow RAX and RCX and save the flags; `lookup` for
    // RIP = vpage + next, `lookup_abs` for RIP in `ctx.rip`.
    let mut common = a.create_label();
    a.set_label(&mut lookup)?;
    spill(&mut a, 0, 0)?;
    spill(&mut a, 1, 1)?;
    a.lahf()?;
    a.seto(al)?;
    a.mov(word_ptr(rdi + ctx!(flags)), ax)?;
    a.mov(rax, qword_ptr(rdi + ctx!(vpage)))?;
    a.add(rax, qword_ptr(rdi + ctx!(next)))?;
    a.mov(qword_ptr(rdi + ctx!(rip)), rax)?;
    a.jmp(common)?;
    a.set_label(&mut lookup_abs)?;
    spill(&mut a, 0, 0)?;
    spill(&mut a, 1, 1)?;
    a.lahf()?;
    a.seto(al)?;
    a.mov(word_ptr(rdi + ctx!(flags)), ax)?;
    a.mov(rax, qword_ptr(rdi + ctx!(rip)))?;
    a.mov(rcx, rax)?;
    a.and(rax, -0x1000)?;
    a.mov(qword_ptr(rdi + ctx!(vpage)), rax)?;
    a.and(ecx, 0xfff)?;
    a.mov(qword_ptr(rdi + ctx!(next)), rcx)?;
    a.set_label(&mut common)?;
    a.inc(qword_ptr(rdi + ctx!(lookups)))?;
    a.cmp(r15, qword_ptr(rdi + ctx!(limit)))?;
    a.jae(spent)?;
    a.mov(rax, qword_ptr(rdi + ctx!(rip)))?;
    a.xor(rax, qword_ptr(rdi + ctx!(key_xor)))?;
    a.mov(rcx, rax)?;
    a.shr(rcx, 12)?;
    a.xor(rcx, rax)?;
    a.and(ecx, (JC_ENTRIES - 1) as u32)?;
    a.shl(ecx, 5)?;
    a.add(rcx, qword_ptr(rdi + ctx!(jc)))?;
    a.cmp(rax, qword_ptr(rcx))?;
    a.jne(miss)?;
    a.mov(rax, qword_ptr(rcx + 8))?;
    a.mov(qword_ptr(rdi + ctx!(code)), rax)?;
    // The TLB must map the page to the block's, with fetch access.
    a.mov(rax, qword_ptr(rcx + 16))?;
    a.mov(qword_ptr(rdi + ctx!(jc_ppage)), rax)?;
    a.mov(rcx, qword_ptr(rdi + ctx!(rip)))?;
    a.shr(rcx, 12)?;
    a.and(rcx, qword_ptr(rdi + ctx!(tlb_mask)))?;
    a.shl(rcx, x86::TLB_ENTRY_SIZE.trailing_zeros())?;
    a.add(rcx, qword_ptr(rdi + ctx!(tlb)))?;
    a.cmp(rax, qword_ptr(rcx + x86::TLB_PPAGE as i32))?;
    a.jne(miss)?;
    a.mov(rax, qword_ptr(rdi + ctx!(rip)))?;
    a.and(rax, -0x1000)?;
    a.cmp(rax, qword_ptr(rcx + x86::TLB_VPAGE as i32))?;
    a.jne(miss)?;
    a.mov(rax, qword_ptr(rdi + ctx!(acc_x)))?;
    a.test(byte_ptr(rcx + x86::TLB_ALLOW as i32), al)?;
    a.jz(miss)?;
    a.mov(rax, qword_ptr(rdi + ctx!(rip)))?;
    a.and(rax, -0x1000)?;
    a.mov(qword_ptr(rdi + ctx!(vpage)), rax)?;
    a.movzx(eax, word_ptr(rdi + ctx!(flags)))?;
    a.add(al, 0x7f)?;
    a.sahf()?;
    fill(&mut a, 0, 0)?;
    fill(&mut a, 1, 1)?;
    a.jmp(qword_ptr(rdi + ctx!(code)))?;
    a.set_label(&mut spent)?;
    a.mov(qword_ptr(rdi + ctx!(slot)), -1)?;
    fill(&mut a, 0, 0)?;
    fill(&mut a, 1, 1)?;
    a.jmp(exit_saved)?;
    a.set_label(&mut miss)?;
    a.mov(qword_ptr(rdi + ctx!(slot)), SLOT_NONE as i32)?;
    fill(&mut a, 0, 0)?;
    fill(&mut a, 1, 1)?;
    a.jmp(exit_saved)?;

    let r = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let rt = Runtime {
        enter: r.label_ip(&enter)?,
        stop: r.label_ip(&stop)?,
        exit: r.label_ip(&exit)?,
        lookup: r.label_ip(&lookup)?,
        lookup_abs: r.label_ip(&lookup_abs)?,
        exit_saved: r.label_ip(&exit_saved)?,
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
}

/// The address a probe checks: the block's page plus an offset (a
/// RIP-relative operand), or an operand of host registers.
enum Address {
    Rip(i32),
    Mem(MemoryOperand),
}

/// Where a probe goes when it cannot serve the access.
#[derive(Clone, Copy)]
struct Miss {
    cold: CodeLabel,
    hard: CodeLabel,
}

impl Miss {
    fn new(a: &mut CodeAssembler) -> Miss {
        Miss {
            cold: a.create_label(),
            hard: a.create_label(),
        }
    }
}

/// How a block's host code ends.
#[derive(Clone, Copy)]
enum End<'a> {
    /// A direct JMP or Jcc, resolved in host code.
    Branch(&'a Instruction),
    /// Past the last instruction; `Some` if the interpreter runs the next
    /// one (its mnemonic).
    Next(Option<M>),
}

/// Branch targets below this are the assembler's label numbers (see
/// [`assemble`]); the code cache's routines and blocks are far above it.
const LABEL_LIMIT: u64 = 1 << 32;

/// The instructions of `a` encoded one after the other for host address
/// `at`, in one pass: every branch to a label is a near one (rel32),
/// patched once the label's place is known, and the rest are encoded as
/// they are. (iced-x86's block encoder also shortens branches, in passes
/// that cost most of a translation's time; a block's branches are mostly
/// to its cold paths at the end, beyond a short branch's reach anyway.)
/// Returns the code and the offset of each instruction, by index.
type Assembled = Option<(Vec<u8>, Vec<u32>)>;

fn assemble(a: &CodeAssembler, at: u64, enc: &mut Encoder) -> Result<Assembled, IcedError> {
    let instrs = a.instructions();
    let mut offsets = Vec::with_capacity(instrs.len());
    // The labels' numbers (the IPs the assembler gave the instructions they
    // are on; the others have IP 0).
    let placed: Vec<u64> = instrs.iter().map(|i| i.ip()).filter(|&l| l != 0).collect();
    // Label number -> offset; branches to labels not placed yet.
    let mut labels: Vec<(u64, u32)> = Vec::with_capacity(placed.len());
    let mut fixups: Vec<(u32, u64)> = Vec::new();
    let mut cur = 0u32;
    for i in instrs {
        offsets.push(cur);
        if i.ip() != 0 {
            labels.push((i.ip(), cur));
        }
        let rip = at.wrapping_add(u64::from(cur));
        let target = if i.op0_kind() == OpKind::NearBranch64 {
            Some(i.near_branch64())
        } else {
            None
        };
        let len = match target {
            Some(t) => {
                let mut b = *i;
                b.as_near_branch();
                if t < LABEL_LIMIT && placed.contains(&t) {
                    b.set_near_branch64(rip);
                    let len = enc.encode(&b, rip)?;
                    // The rel32 is the instruction's last four bytes.
                    fixups.push((cur + len as u32, t));
                    len
                } else {
                    enc.encode(&b, rip)?
                }
            }
            None => enc.encode(i, rip)?,
        };
        cur += len as u32;
    }
    let mut code = enc.take_buffer();
    for (end, label) in fixups {
        // Placed, so found.
        let Some(&(_, to)) = labels.iter().find(|(l, _)| *l == label) else {
            return Ok(None);
        };
        let rel = i64::from(to) - i64::from(end);
        let e = end as usize;
        code[e - 4..e].copy_from_slice(&(rel as i32).to_le_bytes());
    }
    Ok(Some((code, offsets)))
}

/// The value patched into the `mov [ctx.slot], imm32` of an exit's stub.
const SLOT_PLACEHOLDER: i32 = 0x7ead_beef;

/// Builds blocks; keeps the instruction-information factory between them.
pub struct Translator {
    info: InstructionInfoFactory,
    /// Entries of the software TLB minus one (the index mask).
    tlb_mask: u64,
    /// The runtime's routines in the code cache.
    rt: Runtime,
    /// Whether flags the SDM leaves undefined must come out as the software
    /// CPU computes them (see [`Translator::strict`]).
    strict: bool,
}

impl Translator {
    /// A translator for a software TLB of `tlb_mask + 1` entries, whose
    /// blocks leave through the runtime `rt`.
    pub fn new(tlb_mask: u64, rt: Runtime) -> Translator {
        Translator {
            info: InstructionInfoFactory::new(),
            tlb_mask,
            rt,
            strict: false,
        }
    }

    /// Makes blocks leave every instruction that may leave a flag the SDM
    /// calls undefined to the interpreter, unless the next instruction of
    /// the block writes that flag with a defined value first: the host CPU
    /// computes undefined flags its own way (this machine's AMD CPU sets AF
    /// after a shift, the software CPU clears it), so only then does a run
    /// match the software CPU bit for bit, pushed RFLAGS images included
    /// (the differential fuzzing harness).
    pub fn strict(&mut self) {
        self.strict = true;
    }

    /// Whether `i` uses RAX (or a part of it) other than through an
    /// explicit operand (MUL, CDQ, CMPXCHG...), so that guest RAX cannot be
    /// renamed.
    fn implicit_rax(&mut self, i: &Instruction) -> bool {
        // These use RAX whatever their explicit operands are.
        if matches!(i.mnemonic(), M::Cmpxchg | M::Div | M::Idiv)
            || (i.op_count() == 1 && matches!(i.mnemonic(), M::Mul | M::Imul))
        {
            return true;
        }
        let explicit = (0..i.op_count())
            .any(|k| i.op_kind(k) == OpKind::Register && gpr_number(i.op_register(k)) == Some(0));
        let address = (0..i.op_count()).any(|k| i.op_kind(k) == OpKind::Memory)
            && [i.memory_base(), i.memory_index()]
                .iter()
                .any(|&r| gpr_number(r) == Some(0));
        let used = self
            .info
            .info(i)
            .used_registers()
            .iter()
            .any(|u| u.access() != OpAccess::None && gpr_number(u.register()) == Some(0));
        used && !explicit && !address
    }

    /// The general-purpose registers `i` writes (or may write).
    fn gprs_written(&mut self, i: &Instruction) -> u16 {
        let mut set = 0u16;
        for u in self.info.info(i).used_registers() {
            if matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                if let Some(n) = gpr_number(u.register()) {
                    set |= 1 << n;
                }
            }
        }
        set
    }

    /// Every general-purpose register `i` reads or writes, explicitly or
    /// implicitly, or `None` if it uses another kind of register.
    fn gprs_used(&mut self, i: &Instruction) -> Option<u16> {
        if i.mnemonic() == M::Nop {
            return Some(0);
        }
        let mut set = 0u16;
        for u in self.info.info(i).used_registers() {
            // FS and GS (listed for their segment prefix) are the probe's:
            // it adds their bases from the context.
            if u.access() == OpAccess::None
                || u.register() == Register::RIP
                || (u.register().is_segment_register() && memory_form(i).is_some())
            {
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
    /// `cross`: the guest-physical page the last instruction of `guest`
    /// crosses into, if it does (its block checks at run time that the
    /// next linear page still maps there, with fetch access, before it).
    /// `None` if nothing at the start can be translated.
    pub fn translate(
        &mut self,
        guest: &[Instruction],
        callout: Option<M>,
        cross: Option<u64>,
        solo: u64,
        at: u64,
        id: u32,
    ) -> Option<Translation> {
        let start = guest.first()?.ip();
        // Offsets from the block's page must fit a displacement.
        let fits = |target: u64| {
            i32::try_from(((start & 0xfff) as i64).wrapping_add(target.wrapping_sub(start) as i64))
                .is_ok()
        };
        let mut used = 0u16;
        let mut taken = Vec::new();
        let mut forms = Vec::new();
        for (k, i) in guest.iter().enumerate().take(MAX_BLOCK) {
            let form = if i.is_jcc_short_or_near() && k + 1 < guest.len() {
                // A superblock goes on past it; its target is a join or
                // a side exit.
                if !fits(i.near_branch_target()) {
                    break;
                }
                Form::Jcc
            } else if identical(i) {
                Form::Identical
            } else if lea_rip(i) {
                Form::LeaRip
            } else if division(i) {
                Form::Div
            } else if stack_op(i) && i.code() == Code::Push_r64 {
                Form::Push
            } else if stack_op(i) {
                Form::Pop
            } else if let Some(w) = memory_form(i) {
                Form::Memory(w)
            } else {
                break;
            };
            if i.is_ip_rel_memory_operand() && !fits(i.memory_displacement64()) {
                break;
            }
            if self.strict && undefined_flags_live(i, guest.get(taken.len() + 1)) {
                break;
            }
            let Some(u) = self.gprs_used(i) else { break };
            let all = used | u;
            let memory = forms
                .iter()
                .chain([&form])
                .any(|f| matches!(f, Form::Memory(_) | Form::Div | Form::Push | Form::Pop))
                || (cross.is_some() && taken.len() + 1 == guest.len());
            if Registers::borrowed(all, memory) > spares(all) {
                break;
            }
            used = all;
            taken.push(*i);
            forms.push(form);
        }
        let branch = guest
            .get(taken.len())
            .filter(|i| {
                terminator(i)
                    && taken.len() < MAX_BLOCK
                    && (return_near(i) || indirect_near(i) || fits(i.near_branch_target()))
            })
            .copied();
        // A call or a return needs the stack pointer and scratch registers.
        let (used, memory) = match &branch {
            Some(b) if call_near(b) || return_near(b) || indirect_near(b) => {
                let mut all = used | 1 << 4;
                if indirect_near(b) {
                    all |= 1 << gpr_number(b.op0_register()).unwrap_or(0);
                }
                if Registers::borrowed(all, true) > spares(all) {
                    // The block ends before it, and the next one starts at
                    // it (with registers to spare), unless it is the first.
                    if taken.is_empty() {
                        return None;
                    }
                    return self.translate(&guest[..taken.len()], None, None, solo, at, id);
                }
                (all, true)
            }
            _ => (
                used,
                forms
                    .iter()
                    .any(|f| matches!(f, Form::Memory(_) | Form::Div | Form::Push | Form::Pop))
                    || cross.is_some(),
            ),
        };
        // The last instruction crosses pages only if the block took it.
        let cross = cross.filter(|_| taken.len() == guest.len());
        if taken.is_empty() && branch.is_none() {
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
        // Guest RAX moves to a spare register if every use of it can be
        // renamed, so that the flags can be saved in AX without parking.
        let rename_rax = memory
            && used & 1 != 0
            && spares(used) > Registers::borrowed(used, memory)
            && !taken
                .iter()
                .chain(branch.as_ref())
                .any(|i| self.implicit_rax(i));
        let writes: Vec<u16> = taken.iter().map(|i| self.gprs_written(i)).collect();
        let joins = joins(&taken, &forms)
            .iter()
            .flatten()
            .fold(0u64, |m, &j| m | 1 << j);
        let groups = groups(&taken, &forms, &writes, solo, cross.is_some(), joins);
        let emit = |t: &Self, rename: bool| {
            let regs = Registers::new(used, memory, rename);
            t.emit(&taken, &forms, &groups, end, cross, &regs, at, id)
        };
        // A form with a fixed accumulator operand (`add eax, imm32`, `xchg
        // rcx, rax`) cannot take another register: then without renaming.
        let code = match emit(self, rename_rax) {
            Err(_) if rename_rax => emit(self, false),
            r => r,
        }
        .ok()
        .flatten()?;
        let memory = forms
            .iter()
            .filter(|f| matches!(f, Form::Memory(_) | Form::Push | Form::Pop))
            .count() as u32;
        taken.extend(branch);
        Some(Translation {
            code,
            count: taken.len() as u32,
            memory,
            len: taken.iter().map(|i| i.len() as u64).sum(),
        })
    }

    /// The block's host code, for host address `at`. It starts in the home
    /// state (see [`Ctx`]): it counts its instructions (host R15), borrows
    /// the host registers it needs for guest RSP, RDI and R15 and for
    /// scratch (their guest values go to the context), runs the guest's
    /// instructions, gives the borrowed registers back and leaves: to the
    /// next block through a patchable jump (a target in the same guest
    /// page, which the dispatcher links once the target exists; a backward
    /// one checks the budget first), through the runtime's lookup (another
    /// page), or out of the cache (the interpreter's instruction is next,
    /// or a memory access found no usable TLB entry: the block stops
    /// before it).
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        guest: &[Instruction],
        forms: &[Form],
        groups: &[Option<Group>],
        end: End,
        cross: Option<u64>,
        r: &Registers,
        at: u64,
        id: u32,
    ) -> Result<Option<Vec<u8>>, IcedError> {
        let branch = match end {
            End::Branch(b) => Some(b),
            End::Next(_) => None,
        };
        let start = guest.first().or(branch).map_or(0, |i| i.ip());
        let next = branch.or(guest.last()).map_or(start, |i| i.next_ip());
        let count = guest.len() + usize::from(branch.is_some());
        // RIP relative to the block's page.
        let rel = |target: u64| {
            ((start & 0xfff) as i64).wrapping_add(target.wrapping_sub(start) as i64) as i32
        };
        let mut a = CodeAssembler::new(64)?;
        let mut slots = Vec::new();

        // Entry: count, borrow.
        a.lea(r15, qword_ptr(r15 + ((count as i32) << COUNT_SHIFT | 1)))?;
        r.borrow(&mut a)?;
        // A loop back to the block's own start goes past the entry, with
        // the registers still borrowed.
        let self_loop = match end {
            End::Branch(b) if !call_near(b) && !return_near(b) && !indirect_near(b) => {
                b.near_branch_target() == start
            }
            _ => false,
        };
        let mut body = a.create_label();
        if self_loop {
            a.set_label(&mut body)?;
        }
        let mut misses = Vec::new();
        // Superblocks: the instruction each conditional branch inside the
        // block joins when taken (else it leaves by a side exit), and the
        // labels of those joins.
        let join_of = joins(guest, forms);
        let mut join_at: Vec<Option<CodeLabel>> = vec![None; guest.len()];
        for &j in join_of.iter().flatten() {
            if join_at[j].is_none() {
                join_at[j] = Some(a.create_label());
            }
        }
        let mut sides = Vec::new();
        // Whether the guest's flags wait on the host stack (saved by a
        // probe) rather than in RFLAGS: a run of memory accesses that do
        // not touch the flags saves them once; the first instruction that
        // touches them restores them (POPFQ, slow) or, if it writes every
        // arithmetic flag without reading one, drops the saved copy.
        let mut saved = false;
        let restore = |a: &mut CodeAssembler, i: Option<&Instruction>| match i {
            // Dropped: nothing to do.
            Some(i) if flags_overwritten(i) => Ok(()),
            _ => r.restore_flags(a),
        };
        for (k, (i, form)) in guest.iter().zip(forms).enumerate() {
            if let Some(label) = join_at[k].as_mut() {
                // Both ways in have the flags in RFLAGS.
                if saved {
                    r.restore_flags(&mut a)?;
                    saved = false;
                }
                a.set_label(label)?;
            }
            if let Some(ppage) = cross.filter(|_| k + 1 == guest.len()) {
                // The instruction's bytes on the next page are the ones it
                // was translated from only while that page maps there.
                let miss = Miss::new(&mut a);
                self.fetch_check(&mut a, r, miss, !saved, ppage)?;
                saved = true;
                misses.push((miss, k));
            }
            if *form == Form::Jcc {
                if saved {
                    r.restore_flags(&mut a)?;
                    saved = false;
                }
                let side = a.create_label();
                jcc(&mut a, i.condition_code(), side)?;
                sides.push((side, k, i.near_branch_target()));
                continue;
            }
            if i.mnemonic() == M::Nop {
                continue;
            }
            let touches = i.rflags_read() != 0 || i.rflags_modified() != 0;
            if *form == Form::LeaRip {
                let full = r.map[gpr_number(i.op0_register()).unwrap_or(0)];
                let dst = renamed(i.op0_register(), full);
                a.add_instruction(Instruction::with2(
                    Code::Mov_r64_rm64,
                    GPR64[full],
                    MemoryOperand::with_base_displ(Register::RDI, ctx!(vpage) as i64),
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
                        GPR64[full],
                        rel(i.memory_displacement64()) as i64,
                    ),
                )?)?;
                continue;
            }
            if matches!(form, Form::Push | Form::Pop) {
                let miss = Miss::new(&mut a);
                let push = *form == Form::Push;
                self.push_pop(
                    &mut a,
                    r,
                    miss,
                    !saved,
                    push.then(|| i.op0_register()),
                    (!push).then(|| i.op0_register()),
                )?;
                saved = true;
                misses.push((miss, k));
                continue;
            }
            let mut o = rename(i, &r.map);
            let address = |i: &Instruction| {
                if i.is_ip_rel_memory_operand() {
                    Address::Rip(rel(i.memory_displacement64()))
                } else {
                    let ren = |reg: Register| match gpr_number(reg) {
                        Some(n) => renamed(reg, r.map[n]),
                        None => reg,
                    };
                    Address::Mem(MemoryOperand::new(
                        ren(i.memory_base()),
                        ren(i.memory_index()),
                        i.memory_index_scale(),
                        i.memory_displacement64() as i64,
                        i.memory_displ_size(),
                        false,
                        Register::None,
                    ))
                }
            };
            if *form == Form::Div {
                let miss = Miss::new(&mut a);
                if i.op0_kind() == OpKind::Memory {
                    // The divisor through the probe into scratch 1; the
                    // division is then by that register.
                    let size = i.memory_size().size() as i32;
                    let m = i.memory_segment();
                    self.probe(&mut a, address(i), size, false, r, miss, !saved, m)?;
                    let (host, d) = (ASM64[r.scratch[0]], r.scratch[1]);
                    let (code, reg) = if size == 8 {
                        a.mov(ASM64[d], qword_ptr(host))?;
                        (Code::Div_rm64, GPR64[d])
                    } else {
                        a.mov(ASM32[d], dword_ptr(host))?;
                        (Code::Div_rm32, GPR32[d])
                    };
                    let code = match (i.mnemonic(), code) {
                        (M::Idiv, Code::Div_rm64) => Code::Idiv_rm64,
                        (M::Idiv, _) => Code::Idiv_rm32,
                        (_, c) => c,
                    };
                    o = Instruction::with1(code, reg)?;
                } else if !saved {
                    r.save_flags(&mut a)?;
                }
                division_check(&mut a, &o, r.scratch[2], miss.hard)?;
                // Every flag is undefined after it: the saved copy goes.
                saved = false;
                misses.push((miss, k));
                o.set_ip(0);
                a.add_instruction(o)?;
                continue;
            }
            if let Form::Memory(write) = *form {
                let group = groups.get(k).copied().flatten();
                // Where the access is from the host address in scratch 0.
                let offset = group.map_or(0, |g| i.memory_displacement64().wrapping_sub(g.low));
                if group.is_none_or(|g| g.leader == k) {
                    let miss = Miss::new(&mut a);
                    let (addr, size, write) = match group {
                        Some(g) => {
                            // The whole group's span, from its lowest
                            // displacement.
                            let mut lead = *i;
                            lead.set_memory_displacement64(g.low);
                            (address(&lead), g.span as i32, g.write)
                        }
                        None => (address(i), i.memory_size().size() as i32, write),
                    };
                    self.probe(
                        &mut a,
                        addr,
                        size,
                        write,
                        r,
                        miss,
                        !saved,
                        i.memory_segment(),
                    )?;
                    saved = true;
                    misses.push((miss, k));
                }
                let host = GPR64[r.scratch[0]];
                o.set_code(without_moffs(o.code()));
                o.set_memory_base(host);
                o.set_memory_index(Register::None);
                o.set_memory_index_scale(1);
                o.set_memory_displacement64(offset);
                o.set_memory_displ_size(u32::from(offset != 0));
                o.set_segment_prefix(Register::None);
            }
            if saved && touches {
                restore(&mut a, Some(i))?;
                saved = false;
            }
            // No IP: the assembler takes an instruction's IP for a label.
            o.set_ip(0);
            a.add_instruction(o)?;
        }
        let s2 = r.scratch[1];
        match branch {
            Some(b) if call_near(b) => {
                // Push the return address (the block's page plus an
                // offset), then jump.
                let miss = Miss::new(&mut a);
                self.push_pop(&mut a, r, miss, !saved, None, None)?;
                saved = true;
                push_return(&mut a, r, ASM64[s2], rel(next))?;
                misses.push((miss, guest.len()));
            }
            Some(b) if return_near(b) => {
                // Pop the target; a non-canonical one faults (#GP) in the
                // interpreter, at the RET.
                let miss = Miss::new(&mut a);
                self.push_pop(&mut a, r, miss, !saved, None, Some(Register::None))?;
                saved = true;
                let [s1a, s2a, s3a] = r.scratch.map(|n| ASM64[n]);
                a.mov(s2a, qword_ptr(s1a))?;
                unless_canonical(&mut a, s2a, s3a, miss.hard)?;
                let pop = 8 + i32::from(b.immediate16());
                a.lea(ASM64[r.map[4]], qword_ptr(ASM64[r.map[4]] + pop))?;
                a.mov(qword_ptr(rdi + ctx!(rip)), s2a)?;
                misses.push((miss, guest.len()));
            }
            Some(b) if indirect_near(b) => {
                // The target from its register (a non-canonical one faults,
                // #GP, in the interpreter, at the JMP or CALL); a CALL
                // pushes the return address first.
                let miss = Miss::new(&mut a);
                let call = b.code() == Code::Call_rm64;
                if call {
                    self.push_pop(&mut a, r, miss, !saved, None, None)?;
                } else if !saved {
                    r.save_flags(&mut a)?;
                }
                saved = true;
                let [_, s2a, s3a] = r.scratch.map(|n| ASM64[n]);
                a.mov(s2a, ASM64[r.map[gpr_number(b.op0_register()).unwrap_or(0)]])?;
                unless_canonical(&mut a, s2a, s3a, miss.hard)?;
                if call {
                    push_return(&mut a, r, s3a, rel(next))?;
                }
                a.mov(qword_ptr(rdi + ctx!(rip)), s2a)?;
                misses.push((miss, guest.len()));
            }
            _ => {}
        }
        if saved {
            restore(&mut a, None)?;
        }
        let mut back = a.create_label();
        if let (true, End::Branch(b)) = (self_loop, &end) {
            if b.is_jmp_short_or_near() {
                a.jmp(back)?;
            } else {
                jcc(&mut a, b.condition_code(), back)?;
            }
        }
        r.give_back(&mut a)?;
        let page_start = start & !0xfff;
        let mut leave = |a: &mut CodeAssembler, target: u64, stop: Option<M>| {
            if let Some(m) = stop {
                a.mov(qword_ptr(rdi + ctx!(next)), rel(target))?;
                a.mov(dword_ptr(rdi + ctx!(block)), id)?;
                a.mov(dword_ptr(rdi + ctx!(callout)), m as u32)?;
                return a.jmp(self.rt.stop);
            }
            if target & !0xfff != page_start {
                a.mov(qword_ptr(rdi + ctx!(next)), rel(target))?;
                return a.jmp(self.rt.lookup);
            }
            // Linked by the dispatcher once the target is translated;
            // until then the jump goes to the stub, which leaves.
            let mut stub = a.create_label();
            let mut slot = a.create_label();
            // The instruction indexes the labels go to.
            let mut slot_ix = None;
            if target < next {
                // Back into this block or before it (a loop): check the
                // budget, with the flags kept in AX. Forward jumps do not:
                // each goes past the end of the block it leaves, so a run
                // of them within a page covers each byte at most once.
                let mut spent = a.create_label();
                spill(a, 0, 0)?;
                budget_check(a, spent)?;
                fill(a, 0, 0)?;
                a.set_label(&mut slot)?;
                slot_ix = Some(a.instructions().len());
                a.db(&[0xe9, 0, 0, 0, 0])?;
                a.set_label(&mut spent)?;
                a.mov(word_ptr(rdi + ctx!(flags)), ax)?;
                fill(a, 0, 0)?;
                a.mov(qword_ptr(rdi + ctx!(next)), rel(target))?;
                a.mov(qword_ptr(rdi + ctx!(slot)), -1)?;
                a.jmp(self.rt.exit_saved)?;
            } else {
                // No label here: the block's taken branch may have one on
                // this instruction; the slot is the 5 bytes before the stub.
                a.db(&[0xe9, 0, 0, 0, 0])?;
            }
            a.set_label(&mut stub)?;
            slots.push((slot_ix, a.instructions().len()));
            a.mov(qword_ptr(rdi + ctx!(slot)), SLOT_PLACEHOLDER)?;
            a.mov(qword_ptr(rdi + ctx!(next)), rel(target))?;
            a.jmp(self.rt.exit)
        };
        match end {
            End::Branch(b) if self_loop && b.is_jmp_short_or_near() => {}
            End::Branch(_) if self_loop => leave(&mut a, next, None)?,
            End::Branch(b) if return_near(b) || indirect_near(b) => a.jmp(self.rt.lookup_abs)?,
            End::Branch(b) if b.is_jmp_short_or_near() || call_near(b) => {
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
        // The taken ways of the branches inside the block: to their join
        // (without the instructions they skip in the count), or out with
        // the count of the instructions after them taken back.
        for (mut side, k, target) in sides {
            a.set_label(&mut side)?;
            match join_of[k] {
                Some(j) => {
                    let skipped = (j - k - 1) as i32;
                    if skipped > 0 {
                        a.lea(r15, qword_ptr(r15 - (skipped << COUNT_SHIFT)))?;
                    }
                    if let Some(l) = join_at[j] {
                        a.jmp(l)?;
                    }
                }
                None => {
                    let after = (count - k - 1) as i32;
                    if after > 0 {
                        a.lea(r15, qword_ptr(r15 - (after << COUNT_SHIFT)))?;
                    }
                    r.give_back(&mut a)?;
                    leave(&mut a, target, None)?;
                }
            }
        }
        if self_loop {
            // The budget, with the flags kept in AX (RAX is free if it is
            // borrowed for the flags, else its guest value waits in its
            // slot), then around again, counting the block anew.
            a.set_label(&mut back)?;
            let mut spent = a.create_label();
            if !r.rax_flags {
                spill(&mut a, 0, 0)?;
            }
            budget_check(&mut a, spent)?;
            if !r.rax_flags {
                fill(&mut a, 0, 0)?;
            }
            a.lea(r15, qword_ptr(r15 + ((count as i32) << COUNT_SHIFT | 1)))?;
            a.jmp(body)?;
            a.set_label(&mut spent)?;
            a.mov(word_ptr(rdi + ctx!(flags)), ax)?;
            if !r.rax_flags {
                fill(&mut a, 0, 0)?;
            }
            r.give_back(&mut a)?;
            a.mov(qword_ptr(rdi + ctx!(next)), rel(start))?;
            a.mov(qword_ptr(rdi + ctx!(slot)), -1)?;
            a.jmp(self.rt.exit_saved)?;
        }
        for (mut miss, k) in misses {
            let mut flags = a.create_label();
            a.set_label(&mut miss.hard)?;
            a.mov(dword_ptr(rdi + ctx!(callout)), CALLOUT_MEMORY_HARD)?;
            a.jmp(flags)?;
            a.set_label(&mut miss.cold)?;
            a.mov(dword_ptr(rdi + ctx!(callout)), CALLOUT_MEMORY)?;
            a.set_label(&mut flags)?;
            r.restore_flags(&mut a)?;
            r.give_back(&mut a)?;
            // The count was taken for the whole block.
            a.lea(r15, qword_ptr(r15 - (((count - k) as i32) << COUNT_SHIFT)))?;
            let ip = guest.get(k).or(branch).map_or(start, |i| i.ip());
            a.mov(qword_ptr(rdi + ctx!(next)), rel(ip))?;
            a.mov(dword_ptr(rdi + ctx!(block)), id)?;
            a.jmp(self.rt.stop)?;
        }
        let Some((mut code, offsets)) = assemble(&a, at, &mut Encoder::new(64))? else {
            return Ok(None);
        };
        let ip_of = |ix: usize| offsets.get(ix).map(|&o| at + u64::from(o));
        // Each slot jumps to its stub until it is linked; the stub tells
        // the dispatcher where the slot is (its offset in the cache: the
        // cache is at most [`crate::cache::MAX_SIZE`], and the runtime is
        // at its start).
        for &(slot, stub) in &slots {
            let Some(stub_ip) = ip_of(stub) else {
                return Ok(None);
            };
            let ip = match slot.map(ip_of) {
                Some(Some(ip)) => ip,
                Some(None) => return Ok(None),
                None => stub_ip - 5,
            };
            let off = (ip - at) as usize;
            let rel = stub_ip.wrapping_sub(ip + 5) as i32;
            code[off + 1..off + 5].copy_from_slice(&rel.to_le_bytes());
            let s = (stub_ip - at) as usize;
            let Some(imm) = code[s..]
                .windows(4)
                .take(16)
                .position(|w| w == SLOT_PLACEHOLDER.to_le_bytes())
            else {
                return Ok(None);
            };
            let cache_off = (ip - self.rt.enter) as u32;
            code[s + imm..s + imm + 4].copy_from_slice(&cache_off.to_le_bytes());
        }
        Ok(Some(code))
    }

    /// PUSH `push` or POP into `pop` (a 64-bit guest register) through the
    /// probe, or, with neither, only the probe of the slot a push would
    /// write (a CALL); with `pop` = `Register::None`, only the probe of the
    /// top of the stack (a RET). Scratch 0 then holds the slot's host
    /// address.
    #[allow(clippy::too_many_arguments)]
    fn push_pop(
        &self,
        a: &mut CodeAssembler,
        r: &Registers,
        miss: Miss,
        save_flags: bool,
        push: Option<Register>,
        pop: Option<Register>,
    ) -> Result<(), IcedError> {
        let stack = GPR64[r.map[4]];
        let at = if pop.is_some() { 0 } else { -8 };
        let addr = Address::Mem(MemoryOperand::with_base_displ(stack, at));
        self.probe(a, addr, 8, pop.is_none(), r, miss, save_flags, Register::SS)?;
        let slot = ASM64[r.scratch[0]];
        let host = |g: Register| ASM64[r.map[gpr_number(g).unwrap_or(0)]];
        match (push, pop) {
            (Some(g), _) => {
                a.mov(qword_ptr(slot), host(g))?;
                a.lea(host(Register::RSP), qword_ptr(host(Register::RSP) - 8))
            }
            (_, Some(Register::RSP)) => a.mov(host(Register::RSP), qword_ptr(slot)),
            (_, Some(Register::None)) | (None, None) => Ok(()),
            (_, Some(g)) => {
                a.mov(host(g), qword_ptr(slot))?;
                a.lea(host(Register::RSP), qword_ptr(host(Register::RSP) + 8))
            }
        }
    }

    /// Before an instruction that crosses into the next page: a jump to
    /// `miss.cold` unless the software TLB maps the linear page after the
    /// block's to guest-physical page `ppage` with fetch access at the
    /// current CPL. The flags are saved first if `save_flags` (else they
    /// are on the stack already), and stay there.
    fn fetch_check(
        &self,
        a: &mut CodeAssembler,
        r: &Registers,
        miss: Miss,
        save_flags: bool,
        ppage: u64,
    ) -> Result<(), IcedError> {
        let [s1a, s2a, s3a] = r.scratch.map(|n| ASM64[n]);
        let s3ab = ASM8[r.scratch[2]];
        a.mov(s1a, qword_ptr(rdi + ctx!(vpage)))?;
        a.lea(s1a, qword_ptr(s1a + 0x1000))?;
        if save_flags {
            r.save_flags(a)?;
        }
        self.entry_of(a, s1a, s2a)?;
        a.cmp(s1a, qword_ptr(s2a + x86::TLB_VPAGE as i32))?;
        a.jne(miss.cold)?;
        a.mov(s3a, ppage)?;
        a.cmp(s3a, qword_ptr(s2a + x86::TLB_PPAGE as i32))?;
        a.jne(miss.cold)?;
        a.mov(s3a, qword_ptr(rdi + ctx!(acc_x)))?;
        a.test(byte_ptr(s2a + x86::TLB_ALLOW as i32), s3ab)?;
        a.jz(miss.cold)
    }

    /// `e` = the address of the software TLB's entry for linear address
    /// `lin` (changes the flags).
    fn entry_of(
        &self,
        a: &mut CodeAssembler,
        lin: AsmRegister64,
        e: AsmRegister64,
    ) -> Result<(), IcedError> {
        // (lin >> 12 & mask) * size, the size a power of two.
        let scale = x86::TLB_ENTRY_SIZE.trailing_zeros();
        a.mov(e, lin)?;
        a.shr(e, 12 - scale)?;
        a.and(e, (self.tlb_mask << scale) as i32)?;
        a.add(e, qword_ptr(rdi + ctx!(tlb)))
    }

    /// The inline TLB probe before memory instruction `i`: the guest's
    /// linear address in scratch 0 (for a RIP-relative operand, the
    /// block's page plus `rip_rel`), then, with the guest's flags on the
    /// stack, the entry for its page checked (tag, access bit for the
    /// current CPL, RAM, the access within the page) and the host address
    /// put in scratch 0; on any failure a jump to `miss` (flags still
    /// saved): `miss.cold` if the entry is another page's, `miss.hard` if
    /// it is this page's but cannot serve the access. The flags are saved
    /// first if `save_flags` (else they are on the stack already), and stay
    /// there on the hit path.
    #[allow(clippy::too_many_arguments)]
    fn probe(
        &self,
        a: &mut CodeAssembler,
        addr: Address,
        size: i32,
        write: bool,
        r: &Registers,
        miss: Miss,
        save_flags: bool,
        segment: Register,
    ) -> Result<(), IcedError> {
        let s1 = GPR64[r.scratch[0]];
        let [s1a, s2a, s3a] = r.scratch.map(|n| ASM64[n]);
        let s3ab = ASM8[r.scratch[2]];
        // MOV and LEA leave the flags alone.
        match addr {
            Address::Rip(off) => {
                a.mov(s1a, qword_ptr(rdi + ctx!(vpage)))?;
                a.lea(s1a, qword_ptr(s1a + off))?;
            }
            Address::Mem(m) => a.add_instruction(Instruction::with2(Code::Lea_r64_m, s1, m)?)?,
        }
        if save_flags {
            r.save_flags(a)?;
        }
        match segment {
            Register::FS => a.add(s1a, qword_ptr(rdi + ctx!(fs_base)))?,
            Register::GS => a.add(s1a, qword_ptr(rdi + ctx!(gs_base)))?,
            _ => {}
        }
        self.entry_of(a, s1a, s2a)?;
        // The page of the access's last byte must be the entry's: else the
        // entry is another page's (a cold miss, which the interpreter's
        // walk fills) or the access crosses pages (the interpreter's too,
        // but it says nothing about the next time: the address moves).
        if size > 1 {
            a.lea(s3a, qword_ptr(s1a + (size - 1)))?;
        } else {
            a.mov(s3a, s1a)?;
        }
        a.and(s3a, -0x1000)?;
        a.cmp(s3a, qword_ptr(s2a + x86::TLB_VPAGE as i32))?;
        a.jne(miss.cold)?;
        // The page's entry, but no fast access: a write to a page that
        // holds code (or not yet dirty), or MMIO (which has no fast access
        // at all).
        let acc = if write { ctx!(acc_w) } else { ctx!(acc_r) };
        a.mov(s3a, qword_ptr(rdi + acc))?;
        a.test(byte_ptr(s2a + x86::TLB_ALLOW as i32), s3ab)?;
        a.jz(miss.hard)?;
        a.and(s1a, 0xfff)?;
        a.add(s1a, qword_ptr(s2a + x86::TLB_HOST as i32))
    }
}

/// The general-purpose registers for the assembler, by encoding number.
const ASM64: [AsmRegister64; 16] = [
    rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];
/// Their low doublewords.
const ASM32: [AsmRegister32; 16] = [
    eax, ecx, edx, ebx, esp, ebp, esi, edi, r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d,
];
/// Their low bytes.
const ASM8: [AsmRegister8; 16] = [
    al, cl, dl, bl, spl, bpl, sil, dil, r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b,
];

/// The host registers of a block: each guest register's (its own for the
/// homed ones; for RSP, RDI and R15, a host register the block borrows) and,
/// for memory accesses, three scratch registers it borrows too. A borrowed
/// host register is one whose guest register the block does not use: its
/// value waits in the context until the block gives it back. Host RAX is
/// never a scratch register: the guest's flags are saved through AX
/// (LAHF, SETO), where a block that does not use guest RAX keeps them
/// (RAX is borrowed), and from where one that does parks them in the
/// context (guest RAX waits in its slot meanwhile).
struct Registers {
    used: u16,
    map: [usize; 16],
    scratch: [usize; 3],
    borrowed: Vec<usize>,
    /// RAX is free to hold the saved flags (borrowed, or guest RAX is
    /// renamed).
    rax_flags: bool,
    /// The borrowed host register guest RAX is renamed to, if it is.
    rax_in: Option<usize>,
}

/// The host registers a block may borrow: the homed ones but RAX.
fn spares(used: u16) -> usize {
    (HOMED & !used & !1).count_ones() as usize
}

impl Registers {
    /// How many host registers a block using `used` borrows, besides RAX.
    fn borrowed(used: u16, memory: bool) -> usize {
        IN_CONTEXT.iter().filter(|&&g| used & (1 << g) != 0).count() + if memory { 3 } else { 0 }
    }

    /// `rename_rax`: guest RAX, which the block uses (and only through
    /// operands that can name another register), moves to a spare
    /// register (one more than [`Registers::borrowed`] must be free).
    fn new(used: u16, memory: bool, rename_rax: bool) -> Registers {
        let mut map: [usize; 16] = std::array::from_fn(|n| n);
        // `translate` made sure enough are free.
        let mut spare = (1..16).filter(|&n| HOMED & (1 << n) != 0 && used & (1 << n) == 0);
        let mut borrowed = Vec::new();
        let rax_in = rename_rax.then(|| spare.next().unwrap_or(0));
        if let Some(h) = rax_in {
            map[0] = h;
            borrowed.push(h);
        }
        for g in IN_CONTEXT {
            if used & (1 << g) != 0 {
                map[g] = spare.next().unwrap_or(0);
                borrowed.push(map[g]);
            }
        }
        let mut scratch = [0; 3];
        if memory {
            for s in scratch.iter_mut() {
                *s = spare.next().unwrap_or(0);
                borrowed.push(*s);
            }
        }
        let borrow_rax = memory && used & 1 == 0;
        if borrow_rax {
            borrowed.push(0);
        }
        Registers {
            used,
            map,
            scratch,
            borrowed,
            rax_flags: borrow_rax || rax_in.is_some(),
            rax_in,
        }
    }

    /// Saves the guest's arithmetic flags (LAHF and SETO: no PUSHFQ, which
    /// is microcoded and costs several times as much) so that the probes
    /// may change the host's: in AX if RAX is borrowed, else parked in the
    /// context, guest RAX staying in its register.
    fn save_flags(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        if !self.rax_flags {
            spill(a, 0, 0)?;
        }
        a.lahf()?;
        a.seto(al)?;
        if !self.rax_flags {
            a.mov(word_ptr(rdi + ctx!(park)), ax)?;
            fill(a, 0, 0)?;
        }
        Ok(())
    }

    /// Puts the flags [`Registers::save_flags`] saved back into RFLAGS
    /// (changes no register).
    fn restore_flags(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        if !self.rax_flags {
            spill(a, 0, 0)?;
            a.mov(ax, word_ptr(rdi + ctx!(park)))?;
        }
        // OF from AL (1 + 0x7f overflows), the others from AH.
        a.add(al, 0x7f)?;
        a.sahf()?;
        if !self.rax_flags {
            fill(a, 0, 0)?;
        }
        Ok(())
    }

    /// Borrows the host registers (their guest values to the context),
    /// moves guest RAX to its register if it is renamed, and loads guest
    /// RSP, RDI and R15 (no flag changes).
    fn borrow(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        for &h in &self.borrowed {
            spill(a, h, h)?;
        }
        if let Some(h) = self.rax_in {
            a.mov(ASM64[h], rax)?;
        }
        for &g in &IN_CONTEXT {
            if self.used & (1 << g) != 0 {
                fill(a, self.map[g], g)?;
            }
        }
        Ok(())
    }

    /// Stores guest RSP, RDI and R15 back into the context, guest RAX back
    /// into RAX if it was renamed, and gives the borrowed host registers
    /// their guest values again (no flag changes).
    fn give_back(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        for &g in &IN_CONTEXT {
            if self.used & (1 << g) != 0 {
                spill(a, g, self.map[g])?;
            }
        }
        if let Some(h) = self.rax_in {
            a.mov(rax, ASM64[h])?;
        }
        for &h in &self.borrowed {
            fill(a, h, h)?;
        }
        Ok(())
    }
}

/// Jumps to `fault` unless `v` is a canonical address (uses `t`; changes
/// the flags).
/// The budget check of a loop, with RAX free (its guest value spilled or
/// renamed): the guest's flags go to AX (LAHF, SETO), and the code jumps to
/// `spent`, flags still in AX, if the instructions counted reach the
/// slice's limit; else the flags come back from AX (OF: 1 + 0x7f
/// overflows) and the code goes on.
fn budget_check(a: &mut CodeAssembler, spent: CodeLabel) -> Result<(), IcedError> {
    a.lahf()?;
    a.seto(al)?;
    a.cmp(r15, qword_ptr(rdi + ctx!(limit)))?;
    a.jae(spent)?;
    a.add(al, 0x7f)?;
    a.sahf()
}

fn unless_canonical(
    a: &mut CodeAssembler,
    v: AsmRegister64,
    t: AsmRegister64,
    fault: CodeLabel,
) -> Result<(), IcedError> {
    a.mov(t, v)?;
    a.shl(t, 16)?;
    a.sar(t, 16)?;
    a.cmp(t, v)?;
    a.jne(fault)
}

/// Stores the return address (the block's page plus `rel`, computed in
/// `t`) into the stack slot a probe put in scratch 0, and moves guest RSP
/// down over it: the push of a CALL. No flag changes.
fn push_return(
    a: &mut CodeAssembler,
    r: &Registers,
    t: AsmRegister64,
    rel: i32,
) -> Result<(), IcedError> {
    a.mov(t, qword_ptr(rdi + ctx!(vpage)))?;
    a.lea(t, qword_ptr(t + rel))?;
    a.mov(qword_ptr(ASM64[r.scratch[0]]), t)?;
    a.lea(ASM64[r.map[4]], qword_ptr(ASM64[r.map[4]] - 8))
}

/// Whether `i` is a shift or rotate, which writes no flag when its masked
/// count is 0 (known only at run time).
fn shift_or_rotate(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        M::Shl | M::Shr | M::Sar | M::Sal | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    )
}

/// The arithmetic flags in iced-x86's notation: OF, SF, ZF, AF, CF, PF.
const ARITH_FLAGS: u32 = RflagsBits::OF
    | RflagsBits::SF
    | RflagsBits::ZF
    | RflagsBits::AF
    | RflagsBits::CF
    | RflagsBits::PF;

/// Whether `i` writes every arithmetic flag without reading one, so that
/// the flags before it are dead. Flags the SDM leaves undefined count as
/// written: the host CPU running the instruction writes them as the CPU
/// does. Shifts and rotates write none when their masked count is 0,
/// which is known only at run time.
fn flags_overwritten(i: &Instruction) -> bool {
    !shift_or_rotate(i) && i.rflags_read() == 0 && i.rflags_modified() & ARITH_FLAGS == ARITH_FLAGS
}

/// Whether `i` may leave a flag undefined that `next` (the instruction
/// after it in the block, if any) does not write with a defined value
/// before reading it. Shifts and rotates count as leaving AF and OF
/// undefined.
fn undefined_flags_live(i: &Instruction, next: Option<&Instruction>) -> bool {
    let undefined = i.rflags_undefined()
        | if shift_or_rotate(i) {
            RflagsBits::AF | RflagsBits::OF
        } else {
            0
        };
    if undefined == 0 {
        return false;
    }
    match next {
        Some(n) if identical(n) && n.rflags_read() & undefined == 0 => {
            let defined = n.rflags_written() | n.rflags_cleared() | n.rflags_set();
            shift_or_rotate(n) || defined & undefined != undefined
        }
        _ => true,
    }
}

/// The ModRM form of a MOV with an absolute address (moffs: A0-A3), which
/// cannot take the base register a probe leaves the host address in; any
/// other code unchanged.
fn without_moffs(c: Code) -> Code {
    match c {
        Code::Mov_AL_moffs8 => Code::Mov_r8_rm8,
        Code::Mov_AX_moffs16 => Code::Mov_r16_rm16,
        Code::Mov_EAX_moffs32 => Code::Mov_r32_rm32,
        Code::Mov_RAX_moffs64 => Code::Mov_r64_rm64,
        Code::Mov_moffs8_AL => Code::Mov_rm8_r8,
        Code::Mov_moffs16_AX => Code::Mov_rm16_r16,
        Code::Mov_moffs32_EAX => Code::Mov_rm32_r32,
        Code::Mov_moffs64_RAX => Code::Mov_rm64_r64,
        c => c,
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
            .translate(&g, None, None, 0, 0x1000_0000, 0)
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
            .translate(&g, None, None, 0, 0x1000_0000, 0)
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
