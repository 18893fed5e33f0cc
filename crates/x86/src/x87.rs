//! The x87 FPU's data instructions (SDM vol. 1 ch. 8 and the instruction
//! pages of vol. 2): the register stack (TOP, tags, ST(i)), loads and
//! stores, the arithmetic, comparisons, FCMOVcc, the environment
//! (FNSTENV/FLDENV, FNSAVE/FRSTOR), with the exception flags, the masked
//! responses and #MF for a pending unmasked exception. The arithmetic
//! itself is in f80.rs.

use arch::paging::Access;
use arch::{cr0, rflags, vector};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::f80::{self, Class, Exact, Unp, F80, INDEFINITE};
use crate::f80x;
use crate::{exc, Cpu, R};

const C0: u16 = 0x100;
const C1: u16 = 0x200;
const C2: u16 = 0x400;
const C3: u16 = 0x4000;
const SF: u16 = 0x40;
const ES: u16 = 0x8080;

/// The constants of FLD1, FLDL2T, FLDL2E, FLDPI, FLDLG2, FLDLN2 and FLDZ:
/// biased exponent and 128 significand bits (rounded per RC on load).
const CONSTS: [(M, u16, u128); 6] = [
    (M::Fld1, 0x3fff, 1 << 127),
    (M::Fldpi, 0x4000, 0xc90fdaa22168c234c4c6628b80dc1cd1),
    (M::Fldl2e, 0x3fff, 0xb8aa3b295c17f0bbbe87fed0691d3e88),
    (M::Fldl2t, 0x4000, 0xd49a784bcd1b8afe492bf6ff4dafdb4c),
    (M::Fldlg2, 0x3ffd, 0x9a209a84fbcff7988f8959ac0b7c9178),
    (M::Fldln2, 0x3ffe, 0xb17217f7d1cf79abc9e3b39803f2f6af),
];

/// Whether `m` is an x87 instruction handled here.
pub(crate) fn is_x87(m: M) -> bool {
    use M::*;
    matches!(
        m,
        Fld | Fst
            | Fstp
            | Fstpnce
            | Fild
            | Fist
            | Fistp
            | Fisttp
            | Fxch
            | Fld1
            | Fldz
            | Fldpi
            | Fldl2e
            | Fldl2t
            | Fldlg2
            | Fldln2
            | Fincstp
            | Fdecstp
            | Ffree
            | Ffreep
            | Fnstenv
            | Fstenv
            | Fldenv
            | Fnsave
            | Fsave
            | Frstor
            | Fstsw
            | Fstcw
            | Fldcw
            | Finit
            | Fclex
            | Fnop
            | Fneni
            | Fndisi
            | Feni
            | Fdisi
            | Fnsetpm
            | Fsetpm
            | Frstpm
            | Fadd
            | Faddp
            | Fiadd
            | Fsub
            | Fsubp
            | Fisub
            | Fsubr
            | Fsubrp
            | Fisubr
            | Fmul
            | Fmulp
            | Fimul
            | Fdiv
            | Fdivp
            | Fidiv
            | Fdivr
            | Fdivrp
            | Fidivr
            | Fchs
            | Fabs
            | Fsqrt
            | Frndint
            | Fscale
            | Fxtract
            | Fprem
            | Fprem1
            | Fsin
            | Fcos
            | Fsincos
            | Fptan
            | Fpatan
            | F2xm1
            | Fyl2x
            | Fyl2xp1
            | Fbld
            | Fbstp
            | Fcom
            | Fcomp
            | Fcompp
            | Fucom
            | Fucomp
            | Fucompp
            | Ficom
            | Ficomp
            | Ftst
            | Fxam
            | Fcomi
            | Fcomip
            | Fucomi
            | Fucomip
            | Fcmovb
            | Fcmove
            | Fcmovbe
            | Fcmovu
            | Fcmovnb
            | Fcmovne
            | Fcmovnbe
            | Fcmovnu
    )
}

/// The alignment #AC checks for an x87 memory operand of `sz` bytes
/// (SDM vol. 3 table 6-7): its size, 8 for the 80-bit formats.
fn x87_alignment(sz: usize) -> usize {
    if sz == 10 {
        8
    } else {
        sz.clamp(1, 8)
    }
}

/// A real-mode FPU pointer as the environment image gives it: the linear
/// address of selector:offset.
fn fpu_linear(sel: u16, off: u64) -> u32 {
    ((sel as u32) << 4).wrapping_add(off as u32)
}

fn st_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ST0 as usize) & 7
}

/// The integer value of `x` rounded per `rc`, if it fits in `bits` bits
/// (two's complement): (value, inexact, rounded up in magnitude); None for
/// NaN, infinity, unsupported formats and out-of-range values.
fn to_int(x: F80, rc: u16, bits: u32) -> Option<(i64, bool, bool)> {
    match x.class() {
        Class::Zero => return Some((0, false, false)),
        Class::Normal | Class::Denormal => {}
        _ => return None,
    }
    let u = x.unpack();
    let e = u.exp - f80::BIAS;
    let (int, frac_bits): (u128, u128) = if e >= 127 {
        return None;
    } else if e < -1 {
        (0, 1)
    } else {
        split(u.sig, e)
    };
    let frac = if e < -1 { 0 } else { frac_bits };
    let tiny = e < -1;
    let inexact = frac != 0 || tiny;
    let half = 1u128 << 127;
    let inc = inexact
        && match rc & 3 {
            0 => !tiny && (frac > half || (frac == half && int & 1 == 1)),
            1 => u.sign,
            2 => !u.sign,
            _ => false,
        };
    let m = int + inc as u128;
    let limit = 1u128 << (bits - 1);
    if (u.sign && m > limit) || (!u.sign && m >= limit) {
        return None;
    }
    let v = if u.sign {
        (m as i128).wrapping_neg() as i64
    } else {
        m as i64
    };
    Some((v, inexact, inc))
}

/// The integer part and the fraction (scaled so that 1/2 is 1 << 127) of
/// sig * 2^(e - 127), for -1 <= e < 127.
fn split(sig: u128, e: i32) -> (u128, u128) {
    if e < 0 {
        return (0, sig);
    }
    let n = (127 - e) as u32;
    (sig >> n, (sig & ((1u128 << n) - 1)) << (128 - n))
}

/// Rounds `x` to an integer value per `rc` (FRNDINT): (value, inexact, up).
fn round_int(x: F80, rc: u16) -> (F80, bool, bool) {
    let u = x.unpack();
    let e = u.exp - f80::BIAS;
    if e >= 63 {
        return (x, false, false);
    }
    let (int, frac, tiny) = if e < -1 {
        (0u128, 0u128, true)
    } else {
        let (int, frac) = split(u.sig, e);
        (int, frac, false)
    };
    let inexact = frac != 0 || tiny;
    if !inexact {
        return (x, false, false);
    }
    let half = 1u128 << 127;
    let inc = match rc & 3 {
        0 => !tiny && (frac > half || (frac == half && int & 1 == 1)),
        1 => u.sign,
        2 => !u.sign,
        _ => false,
    };
    // At most 2^63 (e < 63).
    let m = (int + inc as u128) as u64;
    let r = if m == 0 {
        F80::ZERO
    } else {
        let shift = m.leading_zeros();
        F80 {
            se: (f80::BIAS as u16 + 63 - shift as u16),
            sig: m << shift,
        }
    };
    (if u.sign { r.neg() } else { r }, true, inc)
}

impl Cpu {
    fn top(&self) -> usize {
        ((self.fpu.fsw >> 11) & 7) as usize
    }

    fn set_top(&mut self, t: usize) {
        self.fpu.fsw = (self.fpu.fsw & !0x3800) | ((t as u16 & 7) << 11);
    }

    fn st_empty(&self, k: usize) -> bool {
        self.fpu.ftw & (1 << ((self.top() + k) & 7)) == 0
    }

    fn st(&self, k: usize) -> Option<F80> {
        if self.st_empty(k) {
            None
        } else {
            Some(F80::from_bytes(&self.fpu.st[k & 7]))
        }
    }

    fn set_st(&mut self, k: usize, v: F80) {
        self.fpu.st[k & 7] = v.to_bytes();
        self.fpu.ftw |= 1 << ((self.top() + k) & 7);
    }

    fn st_pop(&mut self) {
        let t = self.top();
        self.fpu.ftw &= !(1 << t);
        self.fpu.st.rotate_left(1);
        self.set_top(t + 1);
    }

    fn st_push(&mut self, v: F80) {
        let t = (self.top() + 7) & 7;
        self.fpu.st.rotate_right(1);
        self.set_top(t);
        self.set_st(0, v);
    }

    /// Sets exception flags; true if one of them is unmasked (then ES and
    /// B are set too: #MF at the next waiting x87 instruction).
    fn fraise(&mut self, flags: u16) -> bool {
        let f = flags & 0x7f;
        self.fpu.fsw |= f;
        if f & !self.fpu.fcw & 0x3f != 0 {
            self.fpu.fsw |= ES;
            return true;
        }
        false
    }

    fn set_c1(&mut self, on: bool) {
        self.fpu.fsw = (self.fpu.fsw & !C1) | if on { C1 } else { 0 };
    }

    /// C2 alone (C0 and C3 are undefined after the transcendentals: left
    /// as they were, as on this host's x87).
    fn set_c2(&mut self, on: bool) {
        self.fpu.fsw = (self.fpu.fsw & !C2) | if on { C2 } else { 0 };
    }

    fn set_cc(&mut self, c3: bool, c2: bool, c0: bool) {
        self.fpu.fsw = (self.fpu.fsw & !(C3 | C2 | C0))
            | if c3 { C3 } else { 0 }
            | if c2 { C2 } else { 0 }
            | if c0 { C0 } else { 0 };
    }

    /// Stack underflow (IE, SF, C1 = 0): true if masked (the caller then
    /// delivers the indefinite).
    fn underflow(&mut self) -> bool {
        self.set_c1(false);
        !self.fraise(f80::IE | SF)
    }

    /// Stack overflow on a push (IE, SF, C1 = 1): true if masked.
    fn overflow(&mut self) -> bool {
        self.set_c1(true);
        !self.fraise(f80::IE | SF)
    }

    /// Pushes `v`, with the overflow check.
    fn fpush(&mut self, v: F80) {
        if !self.st_empty(7) {
            if self.overflow() {
                self.st_push(INDEFINITE);
            }
            return;
        }
        self.set_c1(false);
        self.st_push(v);
    }

    /// Reads the memory operand as an 80-bit value (floating point or
    /// integer formats), with the conversion's flags.
    fn read_mem_f80(&mut self, i: &Instruction, int: bool) -> R<(F80, u16)> {
        let l = self.mem_lin(i)?;
        let sz = i.memory_size().size();
        self.alignment_fault(l, x87_alignment(sz), self.acc_r)?;
        if int {
            let v = self.rd(l, sz.clamp(2, 8))?;
            return Ok((F80::from_i64(crate::alu::sext(v, sz) as i64), 0));
        }
        match sz {
            4 => Ok(F80::from_ieee(self.rd(l, 4)?, 23, 8)),
            8 => Ok(F80::from_ieee(self.rd(l, 8)?, 52, 11)),
            _ => {
                let mut b = [0u8; 10];
                self.read_bytes(l, &mut b, self.acc_r, Access::Read)?;
                Ok((F80::from_bytes(&b), 0))
            }
        }
    }

    /// Rounds an exact result to 64 bits (the transcendentals ignore PC):
    /// Ok((value, flags, rounded up)), or Err(flags) for an unmasked
    /// invalid-operation, division-by-zero or denormal-operand exception
    /// (the operands then stay).
    fn round_ext(&self, e: Exact) -> Result<(F80, u16, bool), u16> {
        let unmasked = |f: u16| f & (f80::IE | f80::ZE | f80::DE) & !self.fpu.fcw != 0;
        match e {
            Exact::Val(_, f) if unmasked(f) => Err(f),
            Exact::Val(v, f) => Ok((v, f, false)),
            Exact::Num(_, _, f) if unmasked(f) => Err(f),
            Exact::Num(u, sticky, f) => {
                let r = f80::round(u, sticky, f80::EXT, self.fpu.fcw, true);
                Ok((r.f80(), f | r.flags, r.up))
            }
        }
    }

    /// FSINCOS and FPTAN: ST(0) = the first result, then the second
    /// pushed. Out of range (|ST(0)| >= 2^63): C2 = 1 and nothing else.
    fn trig_push(&mut self, tan: bool) {
        // C2: 1 out of range, else 0 (stack faults included); C0 and C3
        // undefined: kept, as on this host's x87.
        self.set_c2(false);
        let Some(v) = self.st(0) else {
            // Masked: the indefinite in both destinations, pushed whatever
            // ST(7) holds (as on this host's x87).
            if self.underflow() {
                self.set_st(0, INDEFINITE);
                self.st_push(INDEFINITE);
            }
            return;
        };
        if !self.st_empty(7) {
            if self.overflow() {
                self.set_st(0, INDEFINITE);
                self.st_push(INDEFINITE);
            }
            return;
        }
        if !f80x::trig_in_range(v) {
            self.set_c2(true);
            self.set_c1(false);
            return;
        }
        let (a, b) = f80x::trig(v, tan);
        match (self.round_ext(a), self.round_ext(b)) {
            (Ok((a, fa, ua)), Ok((b, fb, _))) => {
                // C1: the first result's rounding (sin, tan), as on the
                // hardware (FSINCOS checked against it bit for bit).
                self.fraise(fa | fb);
                self.set_c1(ua);
                self.set_st(0, a);
                self.st_push(b);
            }
            (Err(f), _) | (_, Err(f)) => {
                self.fraise(f);
            }
        }
    }

    /// FPATAN, FYL2X, FYL2XP1: ST(1) = f(ST(0), ST(1)), then a pop.
    fn binary_pop(&mut self, f: fn(F80, F80) -> Exact) {
        let (Some(x), Some(y)) = (self.st(0), self.st(1)) else {
            if self.underflow() {
                self.set_st(1, INDEFINITE);
                self.st_pop();
            }
            return;
        };
        if self.store_result(1, f(x, y), f80::EXT) {
            self.st_pop();
        }
    }

    /// FPREM (`ieee` false) and FPREM1: C2 = 1 for a partial remainder,
    /// else C0, C3, C1 = the quotient's bits 2, 1, 0.
    fn fprem(&mut self, ieee: bool) {
        let (Some(a), Some(b)) = (self.st(0), self.st(1)) else {
            // C2 = 0, C1 = 0, C0 and C3 kept (as this host's x87).
            self.set_c2(false);
            if self.underflow() {
                self.set_st(0, INDEFINITE);
            }
            return;
        };
        let (e, q) = f80x::fprem(a, b, ieee);
        if self.store_result(0, e, f80::EXT) {
            self.set_c2(false);
            match q {
                f80x::Quot::Bits(q) => {
                    self.set_cc(q & 2 != 0, false, q & 4 != 0);
                    self.set_c1(q & 1 != 0);
                }
                f80x::Quot::Partial => {
                    self.set_cc(false, true, false);
                    self.set_c1(false);
                }
                f80x::Quot::Kept => self.set_c1(false),
            }
        }
    }

    /// FBSTP: ST(0) rounded per RC to an 18-digit packed BCD integer;
    /// NaNs, infinities, unsupported formats and |value| >= 10^18 are
    /// invalid (masked: the packed BCD indefinite). Returns whether to pop.
    fn fbstp(&mut self, i: &Instruction) -> R<bool> {
        let l = self.mem_lin(i)?;
        self.alignment_fault(l, x87_alignment(10), self.acc_w)?;
        let Some(x) = self.st(0) else {
            if !self.underflow() {
                return Ok(false);
            }
            self.write_bytes(l, &f80x::BCD_INDEFINITE, self.acc_w)?;
            return Ok(true);
        };
        let rc = (self.fpu.fcw >> 10) & 3;
        match to_int(x, rc, 64).filter(|r| r.0.unsigned_abs() < 1_000_000_000_000_000_000) {
            Some((v, inexact, up)) => {
                self.write_bytes(l, &f80x::to_bcd(v.unsigned_abs(), x.sign()), self.acc_w)?;
                self.set_c1(up);
                if inexact {
                    self.fraise(f80::PE);
                }
            }
            None => {
                self.set_c1(false);
                if self.fraise(f80::IE) {
                    return Ok(false);
                }
                self.write_bytes(l, &f80x::BCD_INDEFINITE, self.acc_w)?;
            }
        }
        Ok(true)
    }

    /// Rounds an exact result into ST(k) per PC (or extended precision),
    /// RC and the masks; C1 = rounded up. Returns false if an unmasked
    /// pre-computation exception left the destination unchanged.
    fn store_result(&mut self, k: usize, e: Exact, fmt: f80::Fmt) -> bool {
        match e {
            Exact::Val(v, flags) => {
                if flags & (f80::IE | f80::ZE | f80::DE) & !self.fpu.fcw != 0 {
                    self.fraise(flags);
                    return false;
                }
                self.fraise(flags);
                self.set_c1(false);
                self.set_st(k, v);
                true
            }
            Exact::Num(u, sticky, flags) => {
                if flags & f80::DE & !self.fpu.fcw != 0 {
                    self.fraise(flags);
                    return false;
                }
                let r = f80::round(u, sticky, fmt, self.fpu.fcw, true);
                self.fraise(flags | r.flags);
                self.set_c1(r.up);
                self.set_st(k, r.f80());
                true
            }
        }
    }

    /// The source operand of a two-operand arithmetic instruction and the
    /// destination's stack index: (dst index, dst value, src value, flags
    /// of the source's conversion); None on stack underflow.
    fn arith_operands(&mut self, i: &Instruction) -> R<(usize, Option<F80>, Option<F80>, u16)> {
        let int = matches!(
            i.mnemonic(),
            M::Fiadd | M::Fisub | M::Fisubr | M::Fimul | M::Fidiv | M::Fidivr
        );
        if i.op_count() == 0 {
            // The P forms without operands: ST(1), ST(0).
            return Ok((1, self.st(1), self.st(0), 0));
        }
        let mem = (0..i.op_count()).find(|&n| i.op_kind(n) == OpKind::Memory);
        if let Some(_n) = mem {
            let (v, f) = self.read_mem_f80(i, int)?;
            return Ok((0, self.st(0), Some(v), f));
        }
        let d = st_index(i.op0_register());
        let s = if i.op_count() > 1 {
            st_index(i.op1_register())
        } else {
            0
        };
        Ok((d, self.st(d), self.st(s), 0))
    }

    fn arith(&mut self, i: &Instruction) -> R<()> {
        let (d, dv, sv, cf) = self.arith_operands(i)?;
        let pop = matches!(
            i.mnemonic(),
            M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp
        );
        let (Some(a), Some(b)) = (dv, sv) else {
            if self.underflow() {
                self.set_st(d, INDEFINITE);
                if pop {
                    self.st_pop();
                }
            }
            return Ok(());
        };
        // A memory SNaN was quieted by its conversion: the operation sees
        // it as the SNaN it was (an SNaN and a QNaN give the QNaN, SDM vol.
        // 1 Table 4-7; nan_result sets IE).
        let (b, cf) = if cf & f80::IE != 0 && b.is_nan() {
            (
                F80 {
                    sig: b.sig & !(1 << 62),
                    ..b
                },
                cf & !f80::IE,
            )
        } else {
            (b, cf)
        };
        let cf = if a.is_nan() || a.class() == Class::Unsupported {
            0
        } else {
            cf
        };
        let rc = (self.fpu.fcw >> 10) & 3;
        let e = match i.mnemonic() {
            M::Fadd | M::Faddp | M::Fiadd => f80::add(a, b, false, rc),
            M::Fsub | M::Fsubp | M::Fisub => f80::add(a, b, true, rc),
            M::Fsubr | M::Fsubrp | M::Fisubr => f80::add(b, a, true, rc),
            M::Fmul | M::Fmulp | M::Fimul => f80::mul(a, b),
            M::Fdiv | M::Fdivp | M::Fidiv => f80::div(a, b),
            _ => f80::div(b, a),
        };
        let e = match e {
            // #Z ranks above #D (SDM vol. 1 4.9.2): no DE from a
            // denormal memory operand divided by zero.
            Exact::Val(v, f) if f & f80::ZE != 0 => Exact::Val(v, f | (cf & !f80::DE)),
            Exact::Val(v, f) => Exact::Val(v, f | cf),
            Exact::Num(u, s, f) => Exact::Num(u, s, f | cf),
        };
        let e = if cf & f80::DE != 0 && cf & !self.fpu.fcw & f80::DE != 0 {
            Exact::Val(a, cf)
        } else {
            e
        };
        let fmt = f80::pc_fmt(self.fpu.fcw);
        if self.store_result(d, e, fmt) && pop {
            self.st_pop();
        }
        Ok(())
    }

    /// Compares ST(0) with `b`: C3 C2 C0 (or ZF PF CF with `eflags`).
    /// `unordered_ok`: FUCOM* (IE only for SNaN).
    fn compare(
        &mut self,
        a: Option<F80>,
        b: Option<F80>,
        unordered_ok: bool,
        eflags: bool,
    ) -> bool {
        let res = match (a, b) {
            (Some(a), Some(b)) => {
                let (ca, cb) = (a.class(), b.class());
                let mut flags = 0;
                if ca == Class::Unsupported || cb == Class::Unsupported {
                    flags |= f80::IE;
                } else if a.is_nan() || b.is_nan() {
                    if !unordered_ok || ca == Class::SNan || cb == Class::SNan {
                        flags |= f80::IE;
                    }
                } else if ca == Class::Denormal || cb == Class::Denormal {
                    flags |= f80::DE;
                }
                self.set_c1(false);
                if self.fraise(flags) && flags & (f80::IE | f80::DE) != 0 {
                    return false;
                }
                if a.is_nan() || b.is_nan() || flags & f80::IE != 0 {
                    None
                } else {
                    Some(cmp_f80(a, b))
                }
            }
            _ => {
                if !self.underflow() {
                    return false;
                }
                None
            }
        };
        let (c3, c2, c0) = match res {
            None => (true, true, true),
            Some(std::cmp::Ordering::Less) => (false, false, true),
            Some(std::cmp::Ordering::Equal) => (true, false, false),
            Some(std::cmp::Ordering::Greater) => (false, false, false),
        };
        if eflags {
            let f = &mut self.rflags;
            *f &= !(rflags::ZF | rflags::PF | rflags::CF | rflags::OF | rflags::SF | rflags::AF);
            *f |= if c3 { rflags::ZF } else { 0 }
                | if c2 { rflags::PF } else { 0 }
                | if c0 { rflags::CF } else { 0 };
        } else {
            self.set_cc(c3, c2, c0);
        }
        true
    }

    /// Stores ST(0) to memory in the instruction's format.
    fn store_mem(&mut self, i: &Instruction) -> R<bool> {
        let l = self.mem_lin(i)?;
        let sz = i.memory_size().size();
        // #AC before the status word changes.
        self.alignment_fault(l, x87_alignment(sz), self.acc_w)?;
        let int = matches!(i.mnemonic(), M::Fist | M::Fistp | M::Fisttp);
        let Some(x) = self.st(0) else {
            if !self.underflow() {
                return Ok(false);
            }
            if int {
                self.wr(l, sz, 1u64 << (sz * 8 - 1))?;
            } else {
                self.write_f(l, sz, INDEFINITE, None)?;
            }
            return Ok(true);
        };
        if int {
            let rc = if i.mnemonic() == M::Fisttp {
                3
            } else {
                (self.fpu.fcw >> 10) & 3
            };
            match to_int(x, rc, sz as u32 * 8) {
                None => {
                    self.set_c1(false);
                    if self.fraise(f80::IE) {
                        return Ok(false);
                    }
                    self.wr(l, sz, 1u64 << (sz * 8 - 1))?;
                }
                Some((v, inexact, up)) => {
                    self.wr(l, sz, v as u64)?;
                    self.set_c1(up);
                    if inexact {
                        self.fraise(f80::PE);
                    }
                }
            }
            return Ok(true);
        }
        if sz == 10 {
            self.write_f(l, 10, x, None)?;
            self.set_c1(false);
            return Ok(true);
        }
        let (fmt, frac, ebits) = if sz == 4 {
            (f80::SINGLE, 23, 8)
        } else {
            (f80::DOUBLE, 52, 11)
        };
        match x.class() {
            Class::Unsupported => {
                self.set_c1(false);
                if self.fraise(f80::IE) {
                    return Ok(false);
                }
                self.write_f(l, sz, INDEFINITE, None)?;
            }
            Class::QNan | Class::SNan => {
                self.set_c1(false);
                if x.class() == Class::SNan && self.fraise(f80::IE) {
                    return Ok(false);
                }
                self.write_f(l, sz, x.quiet(), None)?;
            }
            Class::Inf | Class::Zero => {
                self.set_c1(false);
                self.write_f(l, sz, x, None)?;
            }
            _ => {
                let r = f80::round(x.unpack(), false, fmt, self.fpu.fcw, false);
                let unmasked = r.flags & (f80::OE | f80::UE) & !self.fpu.fcw != 0;
                self.set_c1(r.up);
                self.fraise(r.flags);
                if unmasked {
                    return Ok(false);
                }
                self.wr(l, sz, r.ieee(frac, ebits))?;
            }
        }
        Ok(true)
    }

    /// Writes `x` in the format of `sz` bytes (NaN, infinity, zero, or an
    /// 80-bit value), or the pre-rounded `bits`.
    fn write_f(&mut self, l: u64, sz: usize, x: F80, bits: Option<u64>) -> R<()> {
        if let Some(b) = bits {
            return self.wr(l, sz, b);
        }
        match sz {
            10 => self.write_bytes(l, &x.to_bytes()[..10], self.acc_w),
            4 | 8 => {
                let (frac, ebits) = if sz == 4 { (23u32, 8u32) } else { (52, 11) };
                let s = (x.sign() as u64) << (frac + ebits);
                let emax = (1u64 << ebits) - 1;
                let v = match x.class() {
                    Class::Zero => s,
                    Class::Inf => s | emax << frac,
                    _ => s | emax << frac | ((x.sig << 1) >> (64 - frac)),
                };
                self.wr(l, sz, v)
            }
            _ => self.wr(l, sz, 0),
        }
    }

    /// The full tag word (two bits per physical register).
    fn full_tag(&self) -> u16 {
        let top = self.top();
        (0..8).fold(0u16, |t, j| {
            let tag = if self.fpu.ftw & (1 << j) == 0 {
                3
            } else {
                let v = F80::from_bytes(&self.fpu.st[(j + 8 - top) & 7]);
                match v.class() {
                    Class::Zero => 1,
                    Class::Normal => 0,
                    _ => 2,
                }
            };
            t | tag << (2 * j)
        })
    }

    /// FNSTENV's image (SDM vol. 1 8.1.10, figures 8-9 to 8-12): 28
    /// bytes with a 32-bit operand size, 14 with a 16-bit one (`o16`); in
    /// protected mode the instruction and operand pointers as selector and
    /// offset (and the opcode beside FCS in the 32-bit format), in real and
    /// virtual-8086 mode (`real`) as linear addresses, 32 bits or 20,
    /// split in a low 16 and the bits above 16 in bits 12 up of the next
    /// field, with the opcode in the instruction pointer's. Reserved bits:
    /// those above FCW, FSW and FTW are 1s, the others 0.
    fn env_image(&self, o16: bool, real: bool) -> Vec<u8> {
        let f = &self.fpu;
        let op = f.fop as u32 & 0x7ff;
        let pointers = if real {
            let high = if o16 { 0xf } else { 0xffff };
            let ip = fpu_linear(f.fcs, f.fip);
            let dp = fpu_linear(f.fds, f.fdp);
            [
                ip & 0xffff,
                (ip >> 16 & high) << 12 | op,
                dp & 0xffff,
                (dp >> 16 & high) << 12,
            ]
        } else if o16 {
            [
                f.fip as u32 & 0xffff,
                f.fcs as u32,
                f.fdp as u32 & 0xffff,
                f.fds as u32,
            ]
        } else {
            [
                f.fip as u32,
                f.fcs as u32 | op << 16,
                f.fdp as u32,
                f.fds as u32,
            ]
        };
        let control = [f.fcw, f.fsw, self.full_tag()];
        let mut b = Vec::with_capacity(28);
        for v in control {
            if o16 {
                b.extend_from_slice(&v.to_le_bytes());
            } else {
                b.extend_from_slice(&(v as u32 | 0xffff_0000).to_le_bytes());
            }
        }
        for v in pointers {
            if o16 {
                b.extend_from_slice(&(v as u16).to_le_bytes());
            } else {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    /// FLDENV's load of an image in the layout `env_image` stores. A
    /// real-mode image's pointers become linear addresses with null
    /// selectors (so that they are stored back as they were loaded); the
    /// protected-mode 16-bit image has no opcode (FOP becomes 0).
    fn load_env(&mut self, b: &[u8], o16: bool, real: bool) {
        let w = |k: usize| -> u32 {
            if o16 {
                u16::from_le_bytes([b[2 * k], b[2 * k + 1]]) as u32
            } else {
                u32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]])
            }
        };
        let f = &mut self.fpu;
        f.fcw = w(0) as u16;
        f.fsw = w(1) as u16;
        let tag = w(2);
        f.ftw = (0..8).fold(0u8, |t, j| {
            t | if (tag >> (2 * j)) & 3 == 3 { 0 } else { 1 << j }
        });
        if real {
            let high = if o16 { 0xf } else { 0xffff };
            f.fip = ((w(4) >> 12 & high) << 16 | w(3) & 0xffff) as u64;
            f.fop = (w(4) & 0x7ff) as u16;
            f.fdp = ((w(6) >> 12 & high) << 16 | w(5) & 0xffff) as u64;
            f.fcs = 0;
            f.fds = 0;
        } else {
            f.fip = w(3) as u64;
            f.fcs = w(4) as u16;
            f.fop = if o16 {
                0
            } else {
                ((w(4) >> 16) & 0x7ff) as u16
            };
            f.fdp = w(5) as u64;
            f.fds = w(6) as u16;
        }
        // ES/B follow the loaded exception flags and masks.
        if f.fsw & !f.fcw & 0x3f != 0 {
            f.fsw |= ES;
        } else {
            f.fsw &= !ES;
        }
    }

    /// The layout of FNSTENV's, FLDENV's, FNSAVE's and FRSTOR's image:
    /// (16-bit operand size, real or virtual-8086 mode), and the #AC
    /// check of its address (SDM vol. 3 table 6-7: 2- or 4-byte aligned
    /// by operand size).
    fn env_layout(&self, i: &Instruction, l: u64, need: u8) -> R<(bool, bool)> {
        let o16 = matches!(i.memory_size().size(), 14 | 94);
        let real = self.cr0 & cr0::PE == 0 || self.rflags & rflags::VM != 0;
        self.alignment_fault(l, if o16 { 2 } else { 4 }, need)?;
        Ok((o16, real))
    }

    /// The x87 opcode (FOP): the low 3 bits of the first opcode byte
    /// (D8-DF, after the prefixes) and the ModR/M byte (SDM vol. 1 8.1.9),
    /// read back from the instruction's bytes.
    fn fop(&mut self, i: &Instruction) -> R<u16> {
        let mut b = [0u8; 15];
        let n = i.len().min(15);
        let lin = self.code_linear(self.rip);
        self.read_bytes(lin, &mut b[..n], self.acc_x, Access::Exec)?;
        Ok(
            match b[..n].iter().position(|&x| (0xd8..=0xdf).contains(&x)) {
                Some(k) if k + 1 < n => (b[k] as u16 & 7) << 8 | b[k + 1] as u16,
                _ => 0,
            },
        )
    }

    pub(crate) fn exec_x87(&mut self, i: &Instruction) -> R<()> {
        if self.cr0 & (cr0::EM | cr0::TS) != 0 {
            return exc(vector::NM);
        }
        let m = i.mnemonic();
        let no_wait = matches!(
            m,
            M::Fnstenv | M::Fnsave | M::Fneni | M::Fndisi | M::Fnsetpm | M::Frstpm
        );
        if !no_wait && self.fpu.fsw & 0x80 != 0 && self.cr0 & cr0::NE != 0 {
            return exc(vector::MF);
        }
        let control = matches!(
            m,
            M::Fnstenv
                | M::Fstenv
                | M::Fldenv
                | M::Fnsave
                | M::Fsave
                | M::Frstor
                | M::Fstsw
                | M::Fstcw
                | M::Fldcw
                | M::Finit
                | M::Fclex
                | M::Fneni
                | M::Fndisi
                | M::Feni
                | M::Fdisi
                | M::Fnsetpm
                | M::Fsetpm
                | M::Frstpm
        );
        if !control {
            self.fpu.fip = self.rip;
            self.fpu.fcs = self.seg[crate::sreg::CS].selector;
            self.fpu.fop = self.fop(i)?;
            if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
                self.fpu.fdp = self.ea(i);
                self.fpu.fds = self.seg[Self::mem_seg(i)].selector;
            } else {
                self.fpu.fdp = 0;
                self.fpu.fds = 0;
            }
        }
        match m {
            M::Fnop | M::Fneni | M::Fndisi | M::Feni | M::Fdisi | M::Fnsetpm | M::Fsetpm => Ok(()),
            M::Frstpm => exc(vector::UD),
            M::Finit => {
                self.fpu.finit();
                Ok(())
            }
            M::Fclex => {
                self.fpu.fsw &= 0x7f00;
                Ok(())
            }
            M::Fstsw => {
                let v = self.fpu.fsw as u64;
                self.write_op(i, 0, 2, v)
            }
            M::Fldcw => {
                let v = self.read_op(i, 0, 2)?;
                self.fpu.fcw = v as u16;
                // A pending exception the new masks unmask: ES and B.
                if self.fpu.fsw & !self.fpu.fcw & 0x3f != 0 {
                    self.fpu.fsw |= ES;
                } else {
                    self.fpu.fsw &= !ES;
                }
                Ok(())
            }
            M::Fstcw => {
                let v = self.fpu.fcw as u64;
                self.write_op(i, 0, 2, v)
            }
            M::Fld => {
                let v = if i.op0_kind() == OpKind::Memory {
                    let (v, mut f) = self.read_mem_f80(i, false)?;
                    if !self.st_empty(7) {
                        // Stack overflow comes before the operand's
                        // exceptions.
                        if self.overflow() {
                            self.st_push(INDEFINITE);
                        }
                        return Ok(());
                    }
                    let v = if i.memory_size().size() != 10 && v.class() == Class::SNan {
                        f |= f80::IE;
                        v.quiet()
                    } else {
                        v
                    };
                    if f & (f80::IE | f80::DE) & !self.fpu.fcw != 0 {
                        self.fraise(f);
                        return Ok(());
                    }
                    self.fraise(f);
                    Some(v)
                } else {
                    self.st(st_index(i.op0_register()))
                };
                match v {
                    Some(v) => self.fpush(v),
                    // An empty source is reported first (underflow, C1 =
                    // 0), whatever the destination holds.
                    None => {
                        if self.underflow() {
                            self.st_push(INDEFINITE);
                        }
                    }
                }
                Ok(())
            }
            M::Fild => {
                let (v, _) = self.read_mem_f80(i, true)?;
                self.fpush(v);
                Ok(())
            }
            M::Fld1 | M::Fldz | M::Fldpi | M::Fldl2e | M::Fldl2t | M::Fldlg2 | M::Fldln2 => {
                let v = match CONSTS.iter().find(|c| c.0 == m) {
                    Some(&(_, e, sig)) => {
                        let fcw = self.fpu.fcw | 0x3f;
                        let r = f80::round(
                            Unp {
                                sign: false,
                                exp: e as i32,
                                sig,
                            },
                            false,
                            f80::EXT,
                            fcw,
                            true,
                        );
                        r.f80()
                    }
                    None => F80::ZERO,
                };
                self.fpush(v);
                Ok(())
            }
            M::Fst | M::Fstp | M::Fstpnce | M::Fist | M::Fistp | M::Fisttp => {
                let pop = matches!(m, M::Fstp | M::Fstpnce | M::Fistp | M::Fisttp);
                let done = if i.op0_kind() == OpKind::Memory {
                    self.store_mem(i)?
                } else {
                    let d = st_index(i.op0_register());
                    match self.st(0) {
                        Some(v) => {
                            self.set_c1(false);
                            self.set_st(d, v);
                            true
                        }
                        // D9 D8+i (FSTPNCE, Intel XED's name: FSTP with no
                        // check of an empty ST(0)): no stack underflow,
                        // ST(i) left as it is, the pop (as this host's x87).
                        None if m == M::Fstpnce => {
                            self.set_c1(false);
                            true
                        }
                        None => {
                            if self.underflow() {
                                self.set_st(d, INDEFINITE);
                                true
                            } else {
                                false
                            }
                        }
                    }
                };
                if done && pop {
                    self.st_pop();
                }
                Ok(())
            }
            M::Fxch => {
                let k = if i.op_count() > 1 {
                    st_index(i.op1_register())
                } else {
                    1
                };
                let (a, b) = (self.st(0), self.st(k));
                if (a.is_none() || b.is_none()) && !self.underflow() {
                    return Ok(());
                }
                self.set_c1(false);
                let (a, b) = (a.unwrap_or(INDEFINITE), b.unwrap_or(INDEFINITE));
                self.set_st(0, b);
                self.set_st(k, a);
                Ok(())
            }
            M::Fincstp => {
                self.set_c1(false);
                let t = self.top();
                self.fpu.st.rotate_left(1);
                self.set_top(t + 1);
                Ok(())
            }
            M::Fdecstp => {
                self.set_c1(false);
                let t = self.top();
                self.fpu.st.rotate_right(1);
                self.set_top(t + 7);
                Ok(())
            }
            M::Ffree | M::Ffreep => {
                let k = st_index(i.op0_register());
                let t = self.top();
                self.fpu.ftw &= !(1 << ((t + k) & 7));
                if m == M::Ffreep {
                    self.st_pop();
                }
                Ok(())
            }
            M::Fstenv | M::Fnstenv | M::Fsave | M::Fnsave => {
                let l = self.mem_lin(i)?;
                let (o16, real) = self.env_layout(i, l, self.acc_w)?;
                let mut b = self.env_image(o16, real);
                if matches!(m, M::Fsave | M::Fnsave) {
                    for k in 0..8 {
                        b.extend_from_slice(&self.fpu.st[k][..10]);
                    }
                }
                self.write_bytes(l, &b, self.acc_w)?;
                if matches!(m, M::Fsave | M::Fnsave) {
                    // FNSAVE then initializes the FPU, as FNINIT.
                    self.fpu.finit();
                } else {
                    self.fpu.fcw |= 0x3f;
                }
                Ok(())
            }
            M::Fldenv | M::Frstor => {
                let l = self.mem_lin(i)?;
                let (o16, real) = self.env_layout(i, l, self.acc_r)?;
                let n = if o16 { 14 } else { 28 } + if m == M::Frstor { 80 } else { 0 };
                let mut b = vec![0u8; n];
                self.read_bytes(l, &mut b, self.acc_r, Access::Read)?;
                let env = if o16 { 14 } else { 28 };
                self.load_env(&b[..env], o16, real);
                if m == M::Frstor {
                    for k in 0..8 {
                        self.fpu.st[k] = [0; 16];
                        self.fpu.st[k][..10].copy_from_slice(&b[env + 10 * k..env + 10 * k + 10]);
                    }
                }
                Ok(())
            }
            M::Fadd
            | M::Faddp
            | M::Fiadd
            | M::Fsub
            | M::Fsubp
            | M::Fisub
            | M::Fsubr
            | M::Fsubrp
            | M::Fisubr
            | M::Fmul
            | M::Fmulp
            | M::Fimul
            | M::Fdiv
            | M::Fdivp
            | M::Fidiv
            | M::Fdivr
            | M::Fdivrp
            | M::Fidivr => self.arith(i),
            M::Fchs | M::Fabs => {
                match self.st(0) {
                    Some(v) => {
                        self.set_c1(false);
                        self.set_st(0, if m == M::Fchs { v.neg() } else { v.abs() });
                    }
                    None => {
                        if self.underflow() {
                            self.set_st(0, INDEFINITE);
                        }
                    }
                }
                Ok(())
            }
            M::Fsqrt => {
                match self.st(0) {
                    Some(v) => {
                        let fmt = f80::pc_fmt(self.fpu.fcw);
                        self.store_result(0, f80::sqrt(v), fmt);
                    }
                    None => {
                        if self.underflow() {
                            self.set_st(0, INDEFINITE);
                        }
                    }
                }
                Ok(())
            }
            M::Frndint => {
                let Some(v) = self.st(0) else {
                    if self.underflow() {
                        self.set_st(0, INDEFINITE);
                    }
                    return Ok(());
                };
                let e = match v.class() {
                    Class::Unsupported => Exact::Val(INDEFINITE, f80::IE),
                    Class::QNan | Class::SNan => {
                        let (r, f) = f80::nan_result(v, None);
                        Exact::Val(r, f)
                    }
                    Class::Zero | Class::Inf => Exact::Val(v, 0),
                    c => {
                        let de = if c == Class::Denormal { f80::DE } else { 0 };
                        if de & !self.fpu.fcw != 0 {
                            Exact::Val(v, de)
                        } else {
                            let rc = (self.fpu.fcw >> 10) & 3;
                            let (r, inexact, up) = round_int(v, rc);
                            self.fraise(de | if inexact { f80::PE } else { 0 });
                            self.set_c1(up);
                            self.set_st(0, r);
                            return Ok(());
                        }
                    }
                };
                self.store_result(0, e, f80::EXT);
                Ok(())
            }
            M::Fscale => {
                let (Some(a), Some(b)) = (self.st(0), self.st(1)) else {
                    if self.underflow() {
                        self.set_st(0, INDEFINITE);
                    }
                    return Ok(());
                };
                let e = fscale(a, b);
                self.store_result(0, e, f80::EXT);
                Ok(())
            }
            M::Fxtract => {
                let Some(a) = self.st(0) else {
                    // Masked: as FSINCOS's (trig_push).
                    if self.underflow() {
                        self.set_st(0, INDEFINITE);
                        self.st_push(INDEFINITE);
                    }
                    return Ok(());
                };
                if !self.st_empty(7) {
                    if self.overflow() {
                        self.set_st(0, INDEFINITE);
                        self.st_push(INDEFINITE);
                    }
                    return Ok(());
                }
                let (exp, sig, flags) = match a.class() {
                    Class::Unsupported => (INDEFINITE, INDEFINITE, f80::IE),
                    Class::QNan | Class::SNan => {
                        let (v, f) = f80::nan_result(a, None);
                        (v, v, f)
                    }
                    Class::Inf => (F80::inf(false), a, 0),
                    Class::Zero => (F80::inf(true), a, f80::ZE),
                    c => {
                        let u = a.unpack();
                        let e = F80::from_i64((u.exp - f80::BIAS) as i64);
                        let m = F80 {
                            se: (a.se & 0x8000) | f80::BIAS as u16,
                            sig: (u.sig >> 64) as u64,
                        };
                        (e, m, if c == Class::Denormal { f80::DE } else { 0 })
                    }
                };
                if flags & !self.fpu.fcw & (f80::IE | f80::ZE | f80::DE) != 0 {
                    self.fraise(flags);
                    return Ok(());
                }
                self.fraise(flags);
                self.set_c1(false);
                self.set_st(0, exp);
                self.st_push(sig);
                Ok(())
            }
            M::Fprem | M::Fprem1 => {
                self.fprem(m == M::Fprem1);
                Ok(())
            }
            M::Fsin | M::Fcos | M::F2xm1 => {
                // FSIN, FCOS: C2 as for FSINCOS; F2XM1 leaves it.
                if m != M::F2xm1 {
                    self.set_c2(false);
                }
                let Some(v) = self.st(0) else {
                    if self.underflow() {
                        self.set_st(0, INDEFINITE);
                    }
                    return Ok(());
                };
                let e = if m == M::F2xm1 {
                    f80x::f2xm1(v)
                } else if !f80x::trig_in_range(v) {
                    self.set_c2(true);
                    self.set_c1(false);
                    return Ok(());
                } else {
                    let (s, c) = f80x::trig(v, false);
                    if m == M::Fsin {
                        s
                    } else {
                        c
                    }
                };
                self.store_result(0, e, f80::EXT);
                Ok(())
            }
            M::Fsincos | M::Fptan => {
                self.trig_push(m == M::Fptan);
                Ok(())
            }
            M::Fpatan => {
                self.binary_pop(f80x::fpatan);
                Ok(())
            }
            M::Fyl2x => {
                self.binary_pop(f80x::fyl2x);
                Ok(())
            }
            M::Fyl2xp1 => {
                self.binary_pop(f80x::fyl2xp1);
                Ok(())
            }
            M::Fbld => {
                let l = self.mem_lin(i)?;
                self.alignment_fault(l, x87_alignment(10), self.acc_r)?;
                let mut b = [0u8; 10];
                self.read_bytes(l, &mut b, self.acc_r, Access::Read)?;
                self.fpush(f80x::from_bcd(&b));
                Ok(())
            }
            M::Fbstp => {
                if self.fbstp(i)? {
                    self.st_pop();
                }
                Ok(())
            }
            M::Fcom
            | M::Fcomp
            | M::Fcompp
            | M::Fucom
            | M::Fucomp
            | M::Fucompp
            | M::Ficom
            | M::Ficomp
            | M::Ftst => {
                let a = self.st(0);
                let (b, cf) = if m == M::Ftst {
                    (Some(F80::ZERO), 0)
                } else if matches!(m, M::Fcompp | M::Fucompp) {
                    (self.st(1), 0)
                } else if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
                    let int = matches!(m, M::Ficom | M::Ficomp);
                    let (v, f) = self.read_mem_f80(i, int)?;
                    (Some(v), f)
                } else {
                    let k = if i.op_count() > 1 {
                        st_index(i.op1_register())
                    } else if i.op_count() == 1 {
                        st_index(i.op0_register())
                    } else {
                        1
                    };
                    (self.st(k), 0)
                };
                let cf = match a {
                    Some(x) if !x.is_nan() && x.class() != Class::Unsupported => cf,
                    _ => 0,
                };
                if cf & !self.fpu.fcw & f80::DE != 0 {
                    self.fraise(cf);
                    return Ok(());
                }
                // No denormal-operand exception beside a NaN or an
                // unsupported ST(0) (IE or no exception first).
                let cf = match a {
                    Some(x) if !x.is_nan() && x.class() != Class::Unsupported => cf,
                    _ => 0,
                };
                self.fraise(cf & f80::DE);
                let unordered_ok = matches!(m, M::Fucom | M::Fucomp | M::Fucompp);
                if self.compare(a, b, unordered_ok, false) {
                    match m {
                        M::Fcomp | M::Fucomp | M::Ficomp => self.st_pop(),
                        M::Fcompp | M::Fucompp => {
                            self.st_pop();
                            self.st_pop();
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip => {
                let k = st_index(i.op1_register());
                let (a, b) = (self.st(0), self.st(k));
                let unordered_ok = matches!(m, M::Fucomi | M::Fucomip);
                if self.compare(a, b, unordered_ok, true) && matches!(m, M::Fcomip | M::Fucomip) {
                    self.st_pop();
                }
                Ok(())
            }
            M::Fxam => {
                let v = F80::from_bytes(&self.fpu.st[0]);
                self.set_c1(v.sign());
                let (c3, c2, c0) = if self.st_empty(0) {
                    (true, false, true)
                } else {
                    match v.class() {
                        Class::Unsupported => (false, false, false),
                        Class::QNan | Class::SNan => (false, false, true),
                        Class::Normal => (false, true, false),
                        Class::Inf => (false, true, true),
                        Class::Zero => (true, false, false),
                        Class::Denormal => (true, true, false),
                    }
                };
                self.set_cc(c3, c2, c0);
                Ok(())
            }
            M::Fcmovb
            | M::Fcmove
            | M::Fcmovbe
            | M::Fcmovu
            | M::Fcmovnb
            | M::Fcmovne
            | M::Fcmovnbe
            | M::Fcmovnu => {
                let k = st_index(i.op1_register());
                let f = self.rflags;
                let (cf, zf, pf) = (
                    f & rflags::CF != 0,
                    f & rflags::ZF != 0,
                    f & rflags::PF != 0,
                );
                let cond = match m {
                    M::Fcmovb => cf,
                    M::Fcmove => zf,
                    M::Fcmovbe => cf || zf,
                    M::Fcmovu => pf,
                    M::Fcmovnb => !cf,
                    M::Fcmovne => !zf,
                    M::Fcmovnbe => !cf && !zf,
                    _ => !pf,
                };
                match (self.st(0), self.st(k)) {
                    // C1 is only written on a stack underflow.
                    (Some(_), Some(v)) => {
                        if cond {
                            self.set_st(0, v);
                        }
                    }
                    _ => {
                        // Masked: the indefinite, whatever the condition.
                        if self.underflow() {
                            self.set_st(0, INDEFINITE);
                        }
                    }
                }
                Ok(())
            }
            _ => self.unknown(i),
        }
    }
}

/// FSCALE: a * 2^trunc(b), exact before rounding (SDM vol. 2 FSCALE's
/// table of special cases).
fn fscale(a: F80, b: F80) -> Exact {
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Unsupported || cb == Class::Unsupported {
        return Exact::Val(INDEFINITE, f80::IE);
    }
    if a.is_nan() || b.is_nan() {
        let (v, f) = f80::nan_result(a, Some(b));
        return Exact::Val(v, f);
    }
    let de = if ca == Class::Denormal || cb == Class::Denormal {
        f80::DE
    } else {
        0
    };
    if cb == Class::Inf {
        return match (ca, b.sign()) {
            (Class::Zero, false) | (Class::Inf, true) => Exact::Val(INDEFINITE, f80::IE | de),
            (Class::Zero, true) => Exact::Val(a, de),
            (_, false) => Exact::Val(F80::inf(a.sign()), de),
            (_, true) => Exact::Val(F80::zero(a.sign()), de),
        };
    }
    if ca == Class::Inf || ca == Class::Zero {
        return Exact::Val(a, de);
    }
    // trunc(b), clamped far beyond the exponent range.
    let n = match cb {
        Class::Zero => 0,
        _ => {
            let u = b.unpack();
            let e = u.exp - f80::BIAS;
            let m = if e < 0 {
                0
            } else if e > 20 {
                1 << 20
            } else {
                (u.sig >> (127 - e)) as i32
            };
            if b.sign() {
                -m
            } else {
                m
            }
        }
    };
    let mut u = a.unpack();
    u.exp += n;
    Exact::Num(u, false, de)
}

fn cmp_f80(a: F80, b: F80) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let za = a.class() == Class::Zero;
    let zb = b.class() == Class::Zero;
    if za && zb {
        return Ordering::Equal;
    }
    // Magnitude key: exponent (denormals as exponent 0) and significand;
    // pseudo-denormals have the value of exponent 1.
    let key = |x: F80| -> (u16, u64) {
        if x.exp() == 0 && x.sig >> 63 != 0 {
            (1, x.sig)
        } else {
            (x.exp(), x.sig)
        }
    };
    let (sa, sb) = (a.sign() && !za, b.sign() && !zb);
    match (sa, sb) {
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
        (false, false) => key(a).cmp(&key(b)),
        (true, true) => key(b).cmp(&key(a)),
    }
}
