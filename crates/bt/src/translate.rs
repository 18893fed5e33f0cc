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
    Code, ConditionCode, Instruction, InstructionInfoFactory, MemoryOperand, Mnemonic as M,
    OpAccess, OpKind, Register, RflagsBits,
};

/// The most instructions in one block.
pub const MAX_BLOCK: usize = 64;
/// The fewest: a shorter run costs more in the block's prologue and
/// epilogue than the interpreter takes for it.
pub const MIN_BLOCK: usize = 3;

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

/// Whether `i` is a form with one memory operand that translated code
/// carries out through an inline probe of the software TLB, and if so
/// whether it writes memory: MOV (load, store, store of an immediate),
/// MOVZX/MOVSX/MOVSXD loads, and the integer ALU operations, INC, DEC, NEG
/// and NOT on memory. The address must be made of general-purpose registers
/// (no RIP: a block is keyed by physical address and may run at more than
/// one linear address), in a segment whose base is 0 in 64-bit mode (not FS
/// or GS), and at most 8 bytes long.
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
    let regs_ok = [i.memory_base(), i.memory_index()]
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
}

/// A translated block, before it is placed in the code cache.
pub struct Translation {
    /// The host code.
    pub code: Vec<u8>,
    /// Guest instructions it runs (when no memory access leaves early).
    pub count: u32,
    /// Of those, the ones that access memory through the TLB probe.
    pub memory: u32,
    /// Guest bytes it covers.
    pub len: u64,
}

/// Builds blocks; keeps the instruction-information factory between them.
pub struct Translator {
    info: InstructionInfoFactory,
    /// Entries of the software TLB minus one (the index mask).
    tlb_mask: u64,
}

impl Translator {
    /// A translator for a software TLB of `tlb_mask + 1` entries.
    pub fn new(tlb_mask: u64) -> Translator {
        Translator {
            info: InstructionInfoFactory::new(),
            tlb_mask,
        }
    }

    /// Every general-purpose register `i` reads or writes, explicitly or
    /// implicitly, or `None` if it uses another kind of register.
    fn gprs_used(&mut self, i: &Instruction) -> Option<u16> {
        let mut set = 0u16;
        for u in self.info.info(i).used_registers() {
            if u.access() == OpAccess::None {
                continue;
            }
            set |= 1 << gpr_number(u.register())?;
        }
        for k in 0..i.op_count() {
            if i.op_kind(k) == OpKind::Memory {
                for r in [i.memory_base(), i.memory_index()] {
                    if r != Register::None {
                        set |= 1 << gpr_number(r)?;
                    }
                }
            }
        }
        Some(set)
    }

    /// Translates the run of instructions from the start of `guest`
    /// (decoded in order from one page of 64-bit code) that are identical
    /// or memory forms, and a direct branch after them. `None` if that
    /// run is too short to be worth a block.
    pub fn translate(&mut self, guest: &[Instruction]) -> Option<Translation> {
        let mut used = 0u16;
        let mut taken = Vec::new();
        let mut forms = Vec::new();
        for i in guest.iter().take(MAX_BLOCK) {
            let form = if identical(i) {
                Form::Identical
            } else if let Some(w) = memory_form(i) {
                Form::Memory(w)
            } else {
                break;
            };
            let Some(u) = self.gprs_used(i) else { break };
            let all = used | u;
            let memory = forms.contains(&Form::Memory(false))
                || forms.contains(&Form::Memory(true))
                || matches!(form, Form::Memory(_));
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
        let regs = Registers::new(used, forms.iter().any(|f| *f != Form::Identical));
        let code = self
            .emit(&taken, &forms, branch.as_ref(), used, &regs)
            .ok()?;
        let memory = forms.iter().filter(|f| **f != Form::Identical).count() as u32;
        taken.extend(branch);
        Some(Translation {
            code,
            count: taken.len() as u32,
            memory,
            len: taken.iter().map(|i| i.len() as u64).sum(),
        })
    }

    /// The block's host code; it returns (RAX) how far RIP moves, past the
    /// block or to the branch's target, and (RDX) how many guest
    /// instructions it completed: fewer than the block's when a memory
    /// access finds no usable TLB entry (the interpreter carries that one
    /// out).
    fn emit(
        &self,
        guest: &[Instruction],
        forms: &[Form],
        branch: Option<&Instruction>,
        used: u16,
        r: &Registers,
    ) -> Result<Vec<u8>, IcedError> {
        let start = guest.first().or(branch).map_or(0, |i| i.ip());
        let end = branch.or(guest.last()).map_or(start, |i| i.next_ip());
        let mut a = CodeAssembler::new(64)?;
        let callee_saved = [rbx, rbp, r12, r13, r14, r15];
        for reg in callee_saved {
            a.push(reg)?;
        }
        // [rsp + 8]: the guest's RFLAGS; [rsp]: the TLB probe.
        a.push(rsi)?;
        a.push(rdx)?;
        // The guest's arithmetic flags into RFLAGS (DF, TF, AC and the
        // system flags stay the host's).
        a.push(qword_ptr(rsi))?;
        a.and(qword_ptr(rsp), ARITH as i32)?;
        a.popfq()?;
        for g in (0..16).filter(|g| used & (1 << g) != 0) {
            a.add_instruction(Instruction::with2(
                Code::Mov_r64_rm64,
                GPR64[r.map[g]],
                MemoryOperand::with_base_displ(Register::RDI, 8 * g as i64),
            )?)?;
        }
        // Which guest flags must hold their true value right after each
        // instruction's probe: what it or a later instruction reads before
        // writing it with a defined value (a flag the SDM leaves undefined
        // may keep its old value on the host), where any later memory
        // instruction counts as reading every flag (its probe may leave the
        // block there, and the interpreter, or the handler of a fault it
        // raises, sees the flags), as does the block's end.
        let all = RflagsBits::OF
            | RflagsBits::SF
            | RflagsBits::ZF
            | RflagsBits::AF
            | RflagsBits::CF
            | RflagsBits::PF;
        let mut needed = vec![all; guest.len()];
        let mut live = all;
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
            let defined = if shift {
                0
            } else {
                i.rflags_written() | i.rflags_cleared() | i.rflags_set()
            };
            needed[k] = i.rflags_read() | (live & !defined);
            live = if *form == Form::Identical {
                needed[k]
            } else {
                all
            };
        }
        let mut misses = Vec::new();
        for (k, (i, form)) in guest.iter().zip(forms).enumerate() {
            let mut o = rename(i, &r.map);
            if let Form::Memory(write) = *form {
                let miss = a.create_label();
                self.probe(&mut a, i, write, r, miss, needed[k] & all != 0)?;
                let host = GPR64[r.scratch[0]];
                o.set_memory_base(host);
                o.set_memory_index(Register::None);
                o.set_memory_index_scale(1);
                o.set_memory_displacement64(0);
                o.set_memory_displ_size(0);
                o.set_segment_prefix(Register::None);
                misses.push((miss, k));
            }
            // No IP: the assembler takes an instruction's IP for a label.
            o.set_ip(0);
            a.add_instruction(o)?;
        }
        epilogue(
            &mut a,
            used,
            &r.map,
            Exit::End { start, end, branch },
            guest.len() + usize::from(branch.is_some()),
        )?;
        for (mut miss, k) in misses {
            a.set_label(&mut miss)?;
            a.popfq()?;
            let at = guest[k].ip().wrapping_sub(start);
            epilogue(&mut a, used, &r.map, Exit::At(at), k)?;
        }
        a.assemble(0)
    }

    /// The inline TLB probe before memory instruction `i`: the guest's
    /// linear address in scratch 0, then, with the flags saved on the
    /// stack, the entry for its page checked (tag, access bit for the
    /// current CPL, RAM, the access within the page) and the host address
    /// put in scratch 0; on any failure a jump to `miss` (flags still
    /// saved). On the hit path the flags are restored when `flags_live`
    /// (POPFQ is slow), else their saved copy is dropped.
    fn probe(
        &self,
        a: &mut CodeAssembler,
        i: &Instruction,
        write: bool,
        r: &Registers,
        miss: CodeLabel,
        flags_live: bool,
    ) -> Result<(), IcedError> {
        let s1 = GPR64[r.scratch[0]];
        let [s1a, s2a, s3a] = r.scratch.map(|n| ASM64[n]);
        let s3ab = ASM8[r.scratch[2]];
        let ren = |reg: Register| match gpr_number(reg) {
            Some(n) => renamed(reg, r.map[n]),
            None => reg,
        };
        let size = i.memory_size().size() as i32;
        // LEA leaves the flags alone.
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
        a.pushfq()?;
        // [rsp + 8]: the probe (the saved flags are at [rsp]).
        a.mov(s3a, qword_ptr(rsp + 8))?;
        a.mov(s2a, s1a)?;
        a.shr(s2a, 12)?;
        a.and(s2a, self.tlb_mask as i32)?;
        a.imul_3(s2a, s2a, x86::TLB_ENTRY_SIZE as i32)?;
        a.add(s2a, qword_ptr(s3a))?;
        let acc = if write { 24 } else { 16 };
        a.mov(s3a, qword_ptr(s3a + acc))?;
        a.test(byte_ptr(s2a + x86::TLB_ALLOW as i32), s3ab)?;
        a.jz(miss)?;
        a.mov(s3a, s1a)?;
        a.and(s3a, 0xfff)?;
        a.cmp(s3a, 0x1000 - size)?;
        a.ja(miss)?;
        a.mov(s3a, s1a)?;
        a.and(s3a, -0x1000)?;
        a.cmp(s3a, qword_ptr(s2a + x86::TLB_VPAGE as i32))?;
        a.jne(miss)?;
        a.mov(s3a, qword_ptr(s2a + x86::TLB_HOST as i32))?;
        a.test(s3a, s3a)?;
        a.jz(miss)?;
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

/// Where a block's exit sends RIP.
enum Exit<'a> {
    /// The end of the block, or its branch's target.
    End {
        start: u64,
        end: u64,
        branch: Option<&'a Instruction>,
    },
    /// The guest instruction at this offset from the block's start (the
    /// interpreter runs it).
    At(u64),
}

/// Stores the guest's registers and arithmetic flags back and returns
/// (where RIP goes, `count` instructions completed).
fn epilogue(
    a: &mut CodeAssembler,
    used: u16,
    map: &[usize; 16],
    exit: Exit,
    count: usize,
) -> Result<(), IcedError> {
    for g in (0..16).filter(|g| used & (1 << g) != 0) {
        a.add_instruction(Instruction::with2(
            Code::Mov_rm64_r64,
            MemoryOperand::with_base_displ(Register::RDI, 8 * g as i64),
            GPR64[map[g]],
        )?)?;
    }
    // Where RIP goes (MOV and CMOVcc leave the flags alone).
    match exit {
        Exit::End { start, end, branch } => {
            a.mov(rax, end.wrapping_sub(start))?;
            if let Some(b) = branch {
                a.mov(rcx, b.near_branch_target().wrapping_sub(start))?;
                if b.is_jmp_short_or_near() {
                    a.mov(rax, rcx)?;
                } else {
                    cmov(a, b.condition_code())?;
                }
            }
        }
        Exit::At(at) => a.mov(rax, at)?,
    }
    // The arithmetic flags back into the guest's RFLAGS.
    a.pushfq()?;
    a.pop(rcx)?;
    a.mov(r8, qword_ptr(rsp + 8))?;
    a.and(rcx, ARITH as i32)?;
    a.mov(r9, qword_ptr(r8))?;
    a.and(r9, !(ARITH as i32))?;
    a.or(r9, rcx)?;
    a.mov(qword_ptr(r8), r9)?;
    a.mov(edx, count as u32)?;
    a.add(rsp, 16)?;
    for reg in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(reg)?;
    }
    a.ret()
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

/// `cmovcc rax, rcx` for the condition of a Jcc.
fn cmov(a: &mut CodeAssembler, cc: ConditionCode) -> Result<(), IcedError> {
    use ConditionCode as C;
    match cc {
        C::o => a.cmovo(rax, rcx),
        C::no => a.cmovno(rax, rcx),
        C::b => a.cmovb(rax, rcx),
        C::ae => a.cmovae(rax, rcx),
        C::e => a.cmove(rax, rcx),
        C::ne => a.cmovne(rax, rcx),
        C::be => a.cmovbe(rax, rcx),
        C::a => a.cmova(rax, rcx),
        C::s => a.cmovs(rax, rcx),
        C::ns => a.cmovns(rax, rcx),
        C::p => a.cmovp(rax, rcx),
        C::np => a.cmovnp(rax, rcx),
        C::l => a.cmovl(rax, rcx),
        C::ge => a.cmovge(rax, rcx),
        C::le => a.cmovle(rax, rcx),
        C::g => a.cmovg(rax, rcx),
        C::None => Ok(()),
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
        let t = Translator::new(1023).translate(&g).unwrap();
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
        let t = Translator::new(1023).translate(&g).unwrap();
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
