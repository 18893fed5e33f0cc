//! SSE/SSE2 floating point: packed and scalar single and double arithmetic,
//! comparisons, conversions, the scalar moves, and MXCSR (rounding, DAZ, FTZ,
//! exception flags, #XM). SDM vol. 1 ch. 10-11 (the SIMD floating-point
//! exceptions and their priority, 11.5; the NaN results, 4.8.3 and appendix E)
//! and each instruction's page in vol. 2.
//!
//! Arithmetic is done in software with `rustc_apfloat` (IEEE 754 in every
//! rounding mode, with its status flags), never with the host's floating
//! point: the result and flags are the same on every host. What x86 does on
//! top of IEEE 754 is here: its NaN rules (the first operand's NaN, quieted;
//! the "QNaN floating-point indefinite" for invalid operations), the
//! denormal-operand flag and DAZ, flush-to-zero, and the split of exceptions
//! into pre-computation (IE, DE, ZE: nothing is computed when one of them is
//! unmasked) and post-computation ones (OE, UE, PE).

use std::cmp::Ordering;

use arch::{cr4, vector};
use iced_x86::{Instruction, Mnemonic as M, OpKind};
use rustc_apfloat::ieee::{Double, Single, X87DoubleExtended};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};

use crate::exec::reg_size;
use crate::{exc, Cpu, R};

/// MXCSR exception flags; each one's mask is the flag shifted left by 7.
pub(crate) const IE: u32 = 0x01;
pub(crate) const DE: u32 = 0x02;
pub(crate) const ZE: u32 = 0x04;
pub(crate) const OE: u32 = 0x08;
pub(crate) const UE: u32 = 0x10;
pub(crate) const PE: u32 = 0x20;
const DAZ: u32 = 0x40;
const FTZ: u32 = 0x8000;

/// An IEEE binary format of the XMM registers (single or double).
pub(crate) trait Fmt:
    Float + FloatConvert<Single> + FloatConvert<Double> + FloatConvert<Self::Wide>
{
    /// A format with more precision and range, in which an operation on two
    /// values of this one does not overflow.
    type Wide: Float;
    /// Width of the encoding.
    const WIDTH: u32;
    /// Bits of the fraction field.
    const FRAC: u32;
}

impl Fmt for Single {
    type Wide = Double;
    const WIDTH: u32 = 32;
    const FRAC: u32 = 23;
}

impl Fmt for Double {
    type Wide = X87DoubleExtended;
    const WIDTH: u32 = 64;
    const FRAC: u32 = 52;
}

fn sign<F: Fmt>() -> u64 {
    1 << (F::WIDTH - 1)
}
fn exp_mask<F: Fmt>() -> u64 {
    (sign::<F>() - 1) & !frac_mask::<F>()
}
fn frac_mask<F: Fmt>() -> u64 {
    (1 << F::FRAC) - 1
}
fn quiet_bit<F: Fmt>() -> u64 {
    1 << (F::FRAC - 1)
}
fn lane_mask<F: Fmt>() -> u64 {
    u64::MAX >> (64 - F::WIDTH)
}
pub(crate) fn is_nan<F: Fmt>(b: u64) -> bool {
    b & exp_mask::<F>() == exp_mask::<F>() && b & frac_mask::<F>() != 0
}
fn is_snan<F: Fmt>(b: u64) -> bool {
    is_nan::<F>(b) && b & quiet_bit::<F>() == 0
}
fn is_denormal<F: Fmt>(b: u64) -> bool {
    b & exp_mask::<F>() == 0 && b & frac_mask::<F>() != 0
}
/// The "QNaN floating-point indefinite": negative, quiet, no payload.
pub(crate) fn indefinite<F: Fmt>() -> u64 {
    sign::<F>() | exp_mask::<F>() | quiet_bit::<F>()
}
fn bits<F: Fmt>(x: F) -> u64 {
    x.to_bits() as u64
}

/// 2^(emax + 1) of format `F`, in format `W`: the least magnitude that
/// overflows when rounded toward zero.
fn overflow_limit<F: Fmt, W: Float>() -> W {
    W::from_u128(1).value.scalbn(F::largest().ilogb() + 1)
}

/// How far operands are scaled to see their result in the normal range.
const SCALE: i32 = 64;

/// Whether `x op y`, rounded to `F`'s precision with an unbounded exponent,
/// is below the least normal magnitude: x86 detects tininess after rounding
/// (SDM vol. 1, 4.9.1.5), while apfloat calls a result tiny only when its
/// rounding to the denormal format's precision is. They differ when the
/// latter rounds up to the least normal value, which is when this is asked.
/// The operation is done on operands scaled exactly by 2^SCALE so that the
/// result is normal.
fn tiny_unbounded<F: Fmt>(op: Op, x: F, y: F, rm: Round) -> bool {
    let (a, b) = match op {
        Op::Add | Op::Sub => (x.scalbn(SCALE), y.scalbn(SCALE)),
        // The smaller factor is below 1: scaling it up is exact.
        Op::Mul if x.abs() <= y.abs() => (x.scalbn(SCALE), y),
        Op::Mul => (x, y.scalbn(SCALE)),
        // A dividend too large to scale up has a divisor large enough to
        // scale down exactly.
        _ if x.ilogb() < F::largest().ilogb() - SCALE => (x.scalbn(SCALE), y),
        _ => (x, y.scalbn(-SCALE)),
    };
    let r = match op {
        Op::Add => a.add_r(b, rm),
        Op::Sub => a.sub_r(b, rm),
        Op::Mul => a.mul_r(b, rm),
        _ => a.div_r(b, rm),
    };
    r.value.abs() < F::smallest_normalized().scalbn(SCALE)
}

/// Whether `x op y` overflows `F` in a rounding mode that rounds it to the
/// largest finite value rather than to an infinity (apfloat reports only the
/// inexact result then; IEEE 754 and x86 raise overflow whenever the result
/// rounded with an unbounded exponent is beyond the largest finite value):
/// that is when the exact magnitude reaches 2^(emax + 1), decided in a wider
/// format rounding toward zero.
fn overflowed<F: Fmt>(op: Op, x: F, y: F) -> bool {
    let widen = |v: F| -> F::Wide { v.convert(&mut false).value };
    let (a, b) = (widen(x), widen(y));
    let rz = Round::TowardZero;
    let r = match op {
        Op::Add => a.add_r(b, rz),
        Op::Sub => a.sub_r(b, rz),
        Op::Mul => a.mul_r(b, rz),
        _ => a.div_r(b, rz),
    };
    r.value.abs() >= overflow_limit::<F, F::Wide>()
}

/// One instruction's view of MXCSR: the control bits, and the exception
/// flags it raised, before and after computing.
pub(crate) struct Mx {
    csr: u32,
    pub(crate) pre: u32,
    pub(crate) post: u32,
}

impl Mx {
    pub(crate) fn new(csr: u32) -> Mx {
        Mx {
            csr,
            pre: 0,
            post: 0,
        }
    }

    /// MXCSR.RC.
    pub(crate) fn round(&self) -> Round {
        match (self.csr >> 13) & 3 {
            0 => Round::NearestTiesToEven,
            1 => Round::TowardNegative,
            2 => Round::TowardPositive,
            _ => Round::TowardZero,
        }
    }

    fn masked(&self, f: u32) -> bool {
        self.csr & (f << 7) != 0
    }

    /// The result of an operation with a NaN among `ops`: the first NaN,
    /// quieted (IE if any is a signaling NaN).
    fn nan<F: Fmt>(&mut self, ops: &[u64]) -> Option<u64> {
        let mut first = None;
        for &b in ops {
            if is_nan::<F>(b) {
                if is_snan::<F>(b) {
                    self.pre |= IE;
                }
                first.get_or_insert(b | quiet_bit::<F>());
            }
        }
        first
    }

    /// A source operand that is not a NaN: a denormal is a zero under DAZ,
    /// else it raises DE.
    fn src<F: Fmt>(&mut self, b: u64) -> F {
        if is_denormal::<F>(b) {
            if self.csr & DAZ != 0 {
                return F::from_bits((b & sign::<F>()) as u128);
            }
            self.pre |= DE;
        }
        F::from_bits(b as u128)
    }

    /// `b`, or under DAZ a zero of its sign if it is a denormal.
    fn daz<F: Fmt>(&self, b: u64) -> u64 {
        if is_denormal::<F>(b) && self.csr & DAZ != 0 {
            b & sign::<F>()
        } else {
            b
        }
    }

    /// A source operand of the conversions to integers (DAZ applies; they
    /// have no denormal exception).
    fn src_quiet<F: Fmt>(&mut self, b: u64) -> F {
        F::from_bits(self.daz::<F>(b) as u128)
    }

    /// The delivered result of a computation and its flags: the indefinite
    /// for an invalid operation; flush-to-zero of a tiny result when
    /// underflow is masked; UE for a tiny result when it is unmasked, else
    /// for a tiny and inexact one (tininess as the rounded result).
    fn result<F: Fmt>(&mut self, r: StatusAnd<F>) -> u64 {
        let s = r.status;
        let b = bits(r.value);
        if s.contains(Status::INVALID_OP) {
            self.pre |= IE;
            return indefinite::<F>();
        }
        if s.contains(Status::DIV_BY_ZERO) {
            self.pre |= ZE;
            return b;
        }
        if s.contains(Status::OVERFLOW) {
            self.post |= OE;
        }
        let tiny = s.contains(Status::UNDERFLOW) || is_denormal::<F>(b);
        if tiny {
            if !self.masked(UE) {
                self.post |= UE;
            } else if self.csr & FTZ != 0 {
                self.post |= UE | PE;
                return b & sign::<F>();
            } else if s.contains(Status::UNDERFLOW) {
                self.post |= UE;
            }
        }
        if s.contains(Status::INEXACT) {
            self.post |= PE;
        }
        b
    }
}

/// An arithmetic operation on lanes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    Sqrt,
    Rcp,
    Rsqrt,
    /// CMPPS/CMPSS/CMPPD/CMPSD with the predicate in the immediate.
    Cmp,
}

/// `op` on one lane: `a` is the destination's, `b` the source's.
pub(crate) fn lane<F: Fmt>(mx: &mut Mx, op: Op, imm: u8, a: u64, b: u64) -> u64 {
    match op {
        Op::Add | Op::Sub | Op::Mul | Op::Div => {
            if let Some(n) = mx.nan::<F>(&[a, b]) {
                return n;
            }
            let before = mx.pre;
            let (x, y) = (mx.src::<F>(a), mx.src::<F>(b));
            let rm = mx.round();
            let mut r = match op {
                Op::Add => x.add_r(y, rm),
                Op::Sub => x.sub_r(y, rm),
                Op::Mul => x.mul_r(y, rm),
                _ => x.div_r(y, rm),
            };
            if r.status == Status::INEXACT && r.value.is_largest() && overflowed(op, x, y) {
                r.status |= Status::OVERFLOW;
            }
            if r.status == Status::INEXACT
                && r.value.abs().bitwise_eq(F::smallest_normalized())
                && tiny_unbounded(op, x, y, rm)
            {
                r.status |= Status::UNDERFLOW;
            }
            if r.status.contains(Status::DIV_BY_ZERO) {
                // A denormal divided by zero: ZE alone (as the hardware
                // shows: ZE takes precedence over DE).
                mx.pre = (mx.pre & !DE) | (before & DE);
            }
            mx.result(r)
        }
        Op::Min | Op::Max => {
            // Any NaN: IE, and the second operand as it is (SDM MINPS), but
            // for DAZ, which applies first (as the hardware shows).
            let (a, b) = (mx.daz::<F>(a), mx.daz::<F>(b));
            if is_nan::<F>(a) || is_nan::<F>(b) {
                mx.pre |= IE;
                return b;
            }
            let (x, y) = (mx.src::<F>(a), mx.src::<F>(b));
            let first = match x.partial_cmp(&y) {
                Some(Ordering::Less) => op == Op::Min,
                Some(Ordering::Greater) => op == Op::Max,
                // Equal (zeros of either sign too): the second operand.
                _ => false,
            };
            bits(if first { x } else { y })
        }
        Op::Sqrt => sqrt::<F>(mx, b),
        Op::Rcp | Op::Rsqrt => approx(b, op == Op::Rsqrt),
        Op::Cmp => compare::<F>(mx, imm, a, b),
    }
}

/// SQRTPS/SS/PD/SD: correctly rounded, from an integer square root with a
/// sticky bit below the rounding position.
fn sqrt<F: Fmt>(mx: &mut Mx, b: u64) -> u64 {
    if let Some(n) = mx.nan::<F>(&[b]) {
        return n;
    }
    // A negative denormal is an invalid operand, without DE (as the
    // hardware shows: the invalid operation takes precedence).
    let b = mx.daz::<F>(b);
    if is_denormal::<F>(b) && b & sign::<F>() != 0 {
        mx.pre |= IE;
        return indefinite::<F>();
    }
    let x = mx.src::<F>(b);
    if x.is_zero() {
        return bits(x);
    }
    if x.is_negative() {
        mx.pre |= IE;
        return indefinite::<F>();
    }
    if x.is_infinite() {
        return bits(x);
    }
    let v = bits(x);
    let bias = (exp_mask::<F>() >> (F::FRAC + 1)) as i32;
    let biased = (v >> F::FRAC) as i32;
    let frac = v & frac_mask::<F>();
    // x = m * 2^e with m an integer.
    let (m, e) = if biased == 0 {
        (frac, 1 - bias - F::FRAC as i32)
    } else {
        (frac | 1 << F::FRAC, biased - bias - F::FRAC as i32)
    };
    // Scale m so that its root has the format's precision plus several
    // more bits, with an even exponent left over.
    let want = 2 * (F::FRAC as i32 + 1) + 8;
    let mut s = want - (64 - m.leading_zeros() as i32);
    if (e - s) & 1 != 0 {
        s += 1;
    }
    let m = (m as u128) << s;
    let mut r = m.isqrt();
    if r * r != m {
        r |= 1;
    }
    let rounded = F::from_u128_r(r, mx.round());
    let value = rounded.value.scalbn((e - s) / 2);
    mx.result(rounded.status.and(value))
}

/// RCPPS/RCPSS and RSQRTPS/RSQRTSS: within the SDM's relative error of
/// 1.5 * 2^-12 (here: the exact value rounded to 12 fraction bits). Denormal
/// inputs are zeros, tiny results are flushed to zero; no exceptions.
fn approx(b: u64, rsqrt: bool) -> u64 {
    let b = b & 0xffff_ffff;
    if is_nan::<Single>(b) {
        return b | quiet_bit::<Single>();
    }
    let neg = b & 0x8000_0000;
    let zero = b & 0x7f80_0000 == 0;
    if zero {
        return neg | 0x7f80_0000;
    }
    if b == 0x7f80_0000 || (b == 0xff80_0000 && !rsqrt) {
        return neg;
    }
    if rsqrt && neg != 0 {
        return indefinite::<Single>();
    }
    let x: Double = Single::from_bits(b as u128).convert(&mut false).value;
    let mut scratch = Mx::new(0x1f80);
    let d = if rsqrt {
        Double::from_bits(sqrt::<Double>(&mut scratch, bits(x)) as u128)
    } else {
        x
    };
    let q = bits(
        Double::from_u128(1)
            .value
            .div_r(d, Round::NearestTiesToEven)
            .value,
    );
    // Round to 12 fraction bits (a carry moves into the exponent).
    let drop = Double::FRAC - 12;
    let q = (q + (1 << (drop - 1))) & !((1u64 << drop) - 1);
    let s: Single = Double::from_bits(q as u128)
        .convert_r(Round::TowardZero, &mut false)
        .value;
    let s = bits(s);
    if s & 0x7f80_0000 == 0 {
        return s & 0x8000_0000;
    }
    s
}

/// CMPPS/CMPSS/CMPPD/CMPSD: all ones where the predicate holds. LT, LE,
/// NLT and NLE signal IE on any NaN; EQ, UNORD, NEQ and ORD on a SNaN.
fn compare<F: Fmt>(mx: &mut Mx, imm: u8, a: u64, b: u64) -> u64 {
    let pred = imm & 7;
    let ord = ordering::<F>(mx, a, b, matches!(pred, 1 | 2 | 5 | 6));
    let lt_le = |o: Option<Ordering>| matches!(o, Some(Ordering::Less | Ordering::Equal));
    let r = match pred {
        0 => ord == Some(Ordering::Equal),
        1 => ord == Some(Ordering::Less),
        2 => lt_le(ord),
        3 => ord.is_none(),
        4 => ord != Some(Ordering::Equal),
        5 => ord != Some(Ordering::Less),
        6 => !lt_le(ord),
        _ => ord.is_some(),
    };
    if r {
        lane_mask::<F>()
    } else {
        0
    }
}

/// How `a` compares with `b` (None: unordered); IE for a SNaN, or for any
/// NaN if `signal_qnan`.
fn ordering<F: Fmt>(mx: &mut Mx, a: u64, b: u64, signal_qnan: bool) -> Option<Ordering> {
    if is_nan::<F>(a) || is_nan::<F>(b) {
        if signal_qnan || is_snan::<F>(a) || is_snan::<F>(b) {
            mx.pre |= IE;
        }
        return None;
    }
    let (x, y) = (mx.src::<F>(a), mx.src::<F>(b));
    x.partial_cmp(&y)
}

/// A float to a `width`-bit integer, rounded by MXCSR.RC or truncated: the
/// integer indefinite (only the sign bit) for a NaN or out of range, with IE.
pub(crate) fn to_int<F: Fmt>(mx: &mut Mx, a: u64, width: usize, truncate: bool) -> u64 {
    let indefinite = 1u64 << (width - 1);
    if is_nan::<F>(a) {
        mx.pre |= IE;
        return indefinite;
    }
    let x = mx.src_quiet::<F>(a);
    let rm = if truncate {
        Round::TowardZero
    } else {
        mx.round()
    };
    let r = x.to_i128_r(width, rm, &mut false);
    if r.status.contains(Status::INVALID_OP) {
        mx.pre |= IE;
        return indefinite;
    }
    if r.status.contains(Status::INEXACT) {
        mx.post |= PE;
    }
    (r.value as u64) & (u64::MAX >> (64 - width))
}

/// A signed integer to a float, rounded by MXCSR.RC.
pub(crate) fn from_int<F: Fmt>(mx: &mut Mx, v: i64) -> u64 {
    let r = F::from_i128_r(v as i128, mx.round());
    mx.result(r)
}

/// A float of format `F` to format `G`: a NaN keeps its sign and the top of
/// its payload, quieted (IE for a SNaN).
pub(crate) fn convert<F: Fmt + FloatConvert<G>, G: Fmt>(mx: &mut Mx, a: u64) -> u64 {
    if is_nan::<F>(a) {
        if is_snan::<F>(a) {
            mx.pre |= IE;
        }
        let frac = a & frac_mask::<F>();
        let frac = if G::FRAC > F::FRAC {
            frac << (G::FRAC - F::FRAC)
        } else {
            frac >> (F::FRAC - G::FRAC)
        };
        let s = if a & sign::<F>() != 0 { sign::<G>() } else { 0 };
        return s | exp_mask::<G>() | frac | quiet_bit::<G>();
    }
    let x = mx.src::<F>(a);
    let mut r: StatusAnd<G> = x.convert_r(mx.round(), &mut false);
    if r.status == Status::INEXACT && r.value.is_largest() && x.abs() >= overflow_limit::<G, F>() {
        r.status |= Status::OVERFLOW;
    }
    if r.status == Status::INEXACT && r.value.abs().bitwise_eq(G::smallest_normalized()) {
        // Tininess after rounding, as in `tiny_unbounded`.
        let scaled: G = x.scalbn(SCALE).convert_r(mx.round(), &mut false).value;
        if scaled.abs() < G::smallest_normalized().scalbn(SCALE) {
            r.status |= Status::UNDERFLOW;
        }
    }
    mx.result(r)
}

/// `f` on each `F` lane of `a` and `b` (only the lowest if `scalar`; the
/// others stay `a`'s).
pub(crate) fn lanes<F: Fmt>(
    mx: &mut Mx,
    a: u128,
    b: u128,
    scalar: bool,
    mut f: impl FnMut(&mut Mx, u64, u64) -> u64,
) -> u128 {
    let w = F::WIDTH as usize;
    let n = if scalar { 1 } else { 128 / w };
    let m = lane_mask::<F>() as u128;
    let mut r = a;
    for k in 0..n {
        let sh = k * w;
        let v = f(mx, ((a >> sh) & m) as u64, ((b >> sh) & m) as u64) as u128;
        r = (r & !(m << sh)) | ((v & m) << sh);
    }
    r
}

/// The arithmetic group: operation, double precision, scalar.
fn arith(m: M) -> Option<(Op, bool, bool)> {
    Some(match m {
        M::Addps => (Op::Add, false, false),
        M::Addss => (Op::Add, false, true),
        M::Addpd => (Op::Add, true, false),
        M::Addsd => (Op::Add, true, true),
        M::Subps => (Op::Sub, false, false),
        M::Subss => (Op::Sub, false, true),
        M::Subpd => (Op::Sub, true, false),
        M::Subsd => (Op::Sub, true, true),
        M::Mulps => (Op::Mul, false, false),
        M::Mulss => (Op::Mul, false, true),
        M::Mulpd => (Op::Mul, true, false),
        M::Mulsd => (Op::Mul, true, true),
        M::Divps => (Op::Div, false, false),
        M::Divss => (Op::Div, false, true),
        M::Divpd => (Op::Div, true, false),
        M::Divsd => (Op::Div, true, true),
        M::Minps => (Op::Min, false, false),
        M::Minss => (Op::Min, false, true),
        M::Minpd => (Op::Min, true, false),
        M::Minsd => (Op::Min, true, true),
        M::Maxps => (Op::Max, false, false),
        M::Maxss => (Op::Max, false, true),
        M::Maxpd => (Op::Max, true, false),
        M::Maxsd => (Op::Max, true, true),
        M::Sqrtps => (Op::Sqrt, false, false),
        M::Sqrtss => (Op::Sqrt, false, true),
        M::Sqrtpd => (Op::Sqrt, true, false),
        M::Sqrtsd => (Op::Sqrt, true, true),
        M::Rcpps => (Op::Rcp, false, false),
        M::Rcpss => (Op::Rcp, false, true),
        M::Rsqrtps => (Op::Rsqrt, false, false),
        M::Rsqrtss => (Op::Rsqrt, false, true),
        M::Cmpps => (Op::Cmp, false, false),
        M::Cmpss => (Op::Cmp, false, true),
        M::Cmppd => (Op::Cmp, true, false),
        M::Cmpsd => (Op::Cmp, true, true),
        _ => return None,
    })
}

/// The SSE conversions between XMM lanes (source and destination formats
/// by lane): (F→G, source lanes, destination lane width, truncating).
#[derive(Clone, Copy)]
enum Cvt {
    /// Floats (single?) to floats.
    FloatFloat(bool),
    /// Int32 lanes to floats (double?).
    IntFloat(bool),
    /// Floats (double?) to int32 lanes, truncating?
    FloatInt(bool, bool),
}

impl Cpu {
    /// An unmasked SIMD floating-point exception: #XM, or #UD with
    /// CR4.OSXMMEXCPT clear.
    fn simd_exception<T>(&self) -> R<T> {
        if self.cr4 & cr4::OSXMMEXCPT != 0 {
            exc(vector::XM)
        } else {
            exc(vector::UD)
        }
    }

    /// Sets the flags `mx` raised in MXCSR: if a pre-computation exception
    /// is unmasked, only those (and the instruction faults); else all, and
    /// the instruction faults if any is unmasked (nothing is written).
    pub(crate) fn mx_commit(&mut self, mx: &Mx) -> R<()> {
        let masks = (self.fpu.mxcsr >> 7) & 0x3f;
        if mx.pre & !masks != 0 {
            self.fpu.mxcsr |= mx.pre;
            return self.simd_exception();
        }
        let all = mx.pre | mx.post;
        self.fpu.mxcsr |= all;
        if all & !masks != 0 {
            return self.simd_exception();
        }
        Ok(())
    }

    /// The SSE/SSE2 floating-point instructions and the scalar moves; `None`
    /// if `i` is not one.
    pub(crate) fn exec_sse_fp(&mut self, i: &Instruction) -> Option<R<()>> {
        let m = i.mnemonic();
        let xmm0 = i.op0_kind() == OpKind::Register && i.op0_register().is_xmm();
        let xmm1 =
            i.op_count() > 1 && i.op1_kind() == OpKind::Register && i.op1_register().is_xmm();
        let mem1 = i.op_count() > 1 && i.op1_kind() == OpKind::Memory;
        if let Some((op, dbl, scalar)) = arith(m) {
            if xmm0 && (xmm1 || mem1) {
                return Some(self.sse_arith(i, op, dbl, scalar));
            }
            return None;
        }
        Some(match m {
            M::Comiss | M::Ucomiss | M::Comisd | M::Ucomisd if xmm0 => self.comi(i, m),
            M::Movss | M::Movsd => self.movs(i, m == M::Movsd),
            M::Cvtsi2ss | M::Cvtsi2sd if xmm0 => (|| {
                self.sse_check()?;
                let sz = self.opsz(i, 1);
                let v = crate::alu::sext(self.read_op(i, 1, sz)?, sz) as i64;
                let mut mx = Mx::new(self.fpu.mxcsr);
                let a = self.xmm_reg(i.op0_register());
                let r = if m == M::Cvtsi2sd {
                    lanes::<Double>(&mut mx, a, 0, true, |mx, _, _| from_int::<Double>(mx, v))
                } else {
                    lanes::<Single>(&mut mx, a, 0, true, |mx, _, _| from_int::<Single>(mx, v))
                };
                self.mx_commit(&mx)?;
                self.set_xmm_reg(i.op0_register(), r);
                Ok(())
            })(),
            M::Cvtss2si | M::Cvttss2si | M::Cvtsd2si | M::Cvttsd2si
                if i.op0_kind() == OpKind::Register =>
            {
                (|| {
                    self.sse_check()?;
                    let b = self.read_xmm_op(i, 1, false)? as u64;
                    let width = reg_size(i.op0_register()) * 8;
                    let truncate = matches!(m, M::Cvttss2si | M::Cvttsd2si);
                    let mut mx = Mx::new(self.fpu.mxcsr);
                    let v = if matches!(m, M::Cvtsd2si | M::Cvttsd2si) {
                        to_int::<Double>(&mut mx, b, width, truncate)
                    } else {
                        to_int::<Single>(&mut mx, b & 0xffff_ffff, width, truncate)
                    };
                    self.mx_commit(&mx)?;
                    self.set_reg(i.op0_register(), v);
                    Ok(())
                })()
            }
            M::Cvtss2sd | M::Cvtsd2ss if xmm0 => (|| {
                self.sse_check()?;
                let b = self.read_xmm_op(i, 1, false)? as u64;
                let a = self.xmm_reg(i.op0_register());
                let mut mx = Mx::new(self.fpu.mxcsr);
                let r = if m == M::Cvtss2sd {
                    let v = convert::<Single, Double>(&mut mx, b & 0xffff_ffff);
                    (a & !(u64::MAX as u128)) | v as u128
                } else {
                    let v = convert::<Double, Single>(&mut mx, b);
                    (a & !0xffff_ffffu128) | v as u128
                };
                self.mx_commit(&mx)?;
                self.set_xmm_reg(i.op0_register(), r);
                Ok(())
            })(),
            M::Cvtps2pd if xmm0 => self.sse_cvt(i, Cvt::FloatFloat(true)),
            M::Cvtpd2ps if xmm0 => self.sse_cvt(i, Cvt::FloatFloat(false)),
            M::Cvtdq2ps if xmm0 => self.sse_cvt(i, Cvt::IntFloat(false)),
            M::Cvtdq2pd if xmm0 => self.sse_cvt(i, Cvt::IntFloat(true)),
            M::Cvtps2dq if xmm0 => self.sse_cvt(i, Cvt::FloatInt(false, false)),
            M::Cvttps2dq if xmm0 => self.sse_cvt(i, Cvt::FloatInt(false, true)),
            M::Cvtpd2dq if xmm0 => self.sse_cvt(i, Cvt::FloatInt(true, false)),
            M::Cvttpd2dq if xmm0 => self.sse_cvt(i, Cvt::FloatInt(true, true)),
            M::Maskmovdqu => self.maskmovdqu(i),
            _ => return None,
        })
    }

    fn sse_arith(&mut self, i: &Instruction, op: Op, dbl: bool, scalar: bool) -> R<()> {
        self.sse_check()?;
        // Packed forms take an aligned m128; scalar ones an m32 or m64.
        let b = self.read_xmm_op(i, 1, !scalar)?;
        let a = self.xmm_reg(i.op0_register());
        let imm = if i.op_count() > 2 {
            i.immediate(2) as u8
        } else {
            0
        };
        let mut mx = Mx::new(self.fpu.mxcsr);
        let r = if dbl {
            lanes::<Double>(&mut mx, a, b, scalar, |mx, x, y| {
                lane::<Double>(mx, op, imm, x, y)
            })
        } else {
            lanes::<Single>(&mut mx, a, b, scalar, |mx, x, y| {
                lane::<Single>(mx, op, imm, x, y)
            })
        };
        // RCP and RSQRT raise nothing, whatever MXCSR says.
        if !matches!(op, Op::Rcp | Op::Rsqrt) {
            self.mx_commit(&mx)?;
        }
        self.set_xmm_reg(i.op0_register(), r);
        Ok(())
    }

    /// COMISS/COMISD (IE on any NaN) and UCOMISS/UCOMISD (on a SNaN): ZF,
    /// PF, CF as unordered 111, greater 000, less 001, equal 100; OF, SF, AF
    /// cleared.
    fn comi(&mut self, i: &Instruction, m: M) -> R<()> {
        use arch::rflags::{ARITH, CF, PF, ZF};
        self.sse_check()?;
        let b = self.read_xmm_op(i, 1, false)? as u64;
        let a = self.xmm_reg(i.op0_register()) as u64;
        let signal = matches!(m, M::Comiss | M::Comisd);
        let mut mx = Mx::new(self.fpu.mxcsr);
        let ord = if matches!(m, M::Comisd | M::Ucomisd) {
            ordering::<Double>(&mut mx, a, b, signal)
        } else {
            ordering::<Single>(&mut mx, a & 0xffff_ffff, b & 0xffff_ffff, signal)
        };
        self.mx_commit(&mx)?;
        let f = match ord {
            None => ZF | PF | CF,
            Some(Ordering::Greater) => 0,
            Some(Ordering::Less) => CF,
            Some(Ordering::Equal) => ZF,
        };
        self.rflags = (self.rflags & !ARITH) | f;
        Ok(())
    }

    /// MOVSS and MOVSD (the SSE forms): register to register merges the low
    /// lane; a load zeroes the rest of the register; a store writes the lane.
    fn movs(&mut self, i: &Instruction, dbl: bool) -> R<()> {
        self.sse_check()?;
        let (sz, m) = if dbl {
            (8, u64::MAX as u128)
        } else {
            (4, 0xffff_ffffu128)
        };
        match (i.op0_kind(), i.op1_kind()) {
            (OpKind::Register, OpKind::Register) => {
                let a = self.xmm_reg(i.op0_register());
                let b = self.xmm_reg(i.op1_register());
                self.set_xmm_reg(i.op0_register(), (a & !m) | (b & m));
            }
            (OpKind::Register, _) => {
                let l = self.mem_lin(i)?;
                let v = self.rd(l, sz)? as u128;
                self.set_xmm_reg(i.op0_register(), v);
            }
            _ => {
                let v = self.xmm_reg(i.op1_register()) as u64;
                let l = self.mem_lin(i)?;
                self.wr(l, sz, v & (m as u64))?;
            }
        }
        Ok(())
    }

    /// The packed conversions between XMM formats.
    fn sse_cvt(&mut self, i: &Instruction, c: Cvt) -> R<()> {
        self.sse_check()?;
        // Widening forms read an m64, the others an aligned m128.
        let b = self.read_xmm_op(i, 1, true)?;
        let mut mx = Mx::new(self.fpu.mxcsr);
        let lo = |k: usize| (b >> (32 * k)) as u64 & 0xffff_ffff;
        let qo = |k: usize| (b >> (64 * k)) as u64;
        let mut r = 0u128;
        match c {
            Cvt::FloatFloat(true) => {
                for k in 0..2 {
                    r |= (convert::<Single, Double>(&mut mx, lo(k)) as u128) << (64 * k);
                }
            }
            Cvt::FloatFloat(false) => {
                for k in 0..2 {
                    r |= (convert::<Double, Single>(&mut mx, qo(k)) as u128) << (32 * k);
                }
            }
            Cvt::IntFloat(dbl) => {
                for k in 0..if dbl { 2 } else { 4 } {
                    let v = lo(k) as u32 as i32 as i64;
                    r |= if dbl {
                        (from_int::<Double>(&mut mx, v) as u128) << (64 * k)
                    } else {
                        (from_int::<Single>(&mut mx, v) as u128) << (32 * k)
                    };
                }
            }
            Cvt::FloatInt(dbl, t) => {
                for k in 0..if dbl { 2 } else { 4 } {
                    let v = if dbl {
                        to_int::<Double>(&mut mx, qo(k), 32, t)
                    } else {
                        to_int::<Single>(&mut mx, lo(k), 32, t)
                    };
                    r |= (v as u128) << (32 * k);
                }
            }
        }
        self.mx_commit(&mx)?;
        self.set_xmm_reg(i.op0_register(), r);
        Ok(())
    }

    /// MASKMOVDQU: the bytes of the first register whose mask byte (in the
    /// second) has its top bit set, stored at DS:rDI.
    fn maskmovdqu(&mut self, i: &Instruction) -> R<()> {
        self.sse_check()?;
        let n = i.op_count();
        let v = self.xmm_reg(i.op_register(n - 2));
        let mask = self.xmm_reg(i.op_register(n - 1));
        self.mask_store(i, v, mask, 16)
    }

    /// MASKMOVDQU and MASKMOVQ: the bytes of `v` (of `len`) whose byte in
    /// `mask` has its top bit set, stored at DS:rDI (or the override). The
    /// operand is checked for alignment as a whole, whatever the mask:
    /// #AC(0) if alignment checking is on and it is not 8-byte aligned
    /// (MASKMOVQ's m64; for MASKMOVDQU's m128 the SDM leaves #AC for a
    /// misalignment within 8 bytes to the implementation, and the model
    /// checks 8 bytes, as this host's CPU does).
    pub(crate) fn mask_store(&mut self, i: &Instruction, v: u128, mask: u128, len: usize) -> R<()> {
        let am = u64::MAX >> (64 - 8 * Self::string_asz(i) as u32);
        let di = self.gpr[7] & am;
        // (A non-canonical address faults below, at the first byte stored.)
        if let Ok(l) = self.lin(Self::mem_seg(i), di) {
            self.alignment_fault(l, len.min(8), self.acc_w)?;
        }
        for k in 0..len {
            if (mask >> (8 * k + 7)) & 1 != 0 {
                let ea = di.wrapping_add(k as u64) & am;
                let l = self.lin(Self::mem_seg(i), ea)?;
                self.wr(l, 1, (v >> (8 * k)) as u64 & 0xff)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{asm, CODE, HANDLER, T};
    use crate::CpuExit;
    use iced_x86::code_asm::*;

    const ONE_S: u64 = 0x3f80_0000;
    const ALL_MASKED: u32 = 0x1f80;

    fn rc(mode: u32) -> u32 {
        ALL_MASKED | mode << 13
    }

    fn op_s(csr: u32, op: Op, a: u64, b: u64) -> (u64, u32) {
        let mut mx = Mx::new(csr);
        let r = lane::<Single>(&mut mx, op, 0, a, b);
        (r, mx.pre | mx.post)
    }

    fn op_d(csr: u32, op: Op, a: u64, b: u64) -> (u64, u32) {
        let mut mx = Mx::new(csr);
        let r = lane::<Double>(&mut mx, op, 0, a, b);
        (r, mx.pre | mx.post)
    }

    /// 1 + 2^-30 and -(1 + 2^-30) in single precision, in each rounding mode
    /// (MXCSR.RC: nearest, down, up, toward zero).
    #[test]
    fn rounding_modes() {
        let tiny = 0x3080_0000; // 2^-30
        let expect = [
            (0, ONE_S, 0xbf80_0000),
            (1, ONE_S, 0xbf80_0001),
            (2, ONE_S + 1, 0xbf80_0000),
            (3, ONE_S, 0xbf80_0000),
        ];
        for (mode, pos, neg) in expect {
            assert_eq!(op_s(rc(mode), Op::Add, ONE_S, tiny), (pos, PE), "RC {mode}");
            assert_eq!(
                op_s(rc(mode), Op::Sub, 0xbf80_0000, tiny),
                (neg, PE),
                "RC {mode}"
            );
        }
        // x - x is +0, but -0 rounding down (IEEE 754 6.3).
        assert_eq!(op_s(rc(0), Op::Sub, ONE_S, ONE_S), (0, 0));
        assert_eq!(op_s(rc(1), Op::Sub, ONE_S, ONE_S), (0x8000_0000, 0));
    }

    /// Overflow: to infinity when rounding to nearest, to the largest finite
    /// value toward zero; OE and PE either way.
    #[test]
    fn overflow() {
        let max = 0x7f7f_ffff;
        assert_eq!(
            op_s(rc(0), Op::Mul, max, 0x4000_0000),
            (0x7f80_0000, OE | PE)
        );
        assert_eq!(op_s(rc(3), Op::Mul, max, 0x4000_0000), (max, OE | PE));
        assert_eq!(op_s(rc(1), Op::Mul, max, 0x4000_0000), (max, OE | PE));
        // Just above the largest finite value but below 2^128: no overflow
        // toward zero (the result rounded with an unbounded exponent is
        // the largest finite value), overflow to nearest... only from half
        // an ulp on.
        let above = op_s(rc(3), Op::Add, max, 0x7300_0000); // + 2^103
        assert_eq!(above, (max, PE));
        // Double precision, rounding down, negative.
        let (r, f) = op_d(rc(1), Op::Mul, 0xffef_ffff_ffff_ffff, 0x4000_0000_0000_0000);
        assert_eq!((r, f), (0xfff0_0000_0000_0000, OE | PE));
        let (r, f) = op_d(rc(2), Op::Mul, 0xffef_ffff_ffff_ffff, 0x4000_0000_0000_0000);
        assert_eq!((r, f), (0xffef_ffff_ffff_ffff, OE | PE));
    }

    /// Underflow: a tiny inexact result is denormal with UE and PE; a tiny
    /// exact one raises nothing while UE is masked, UE when it is not; FTZ
    /// makes a tiny result a zero with UE and PE.
    #[test]
    fn underflow_and_ftz() {
        let min = 0x0080_0000; // 2^-126
        let three = 0x4040_0000;
        let (r, f) = op_s(rc(0), Op::Div, min, three);
        assert_eq!((r, f), (0x002a_aaab, UE | PE));
        // Tininess is detected after rounding: (1 - 2^-24) * 2^-126 rounds
        // to 2^-126 in the denormal format's precision, but with 24 bits and
        // an unbounded exponent it stays below: tiny, so UE (and FTZ
        // flushes it).
        let below = 0x3f7f_ffff;
        let (r, f) = op_s(rc(2), Op::Mul, below, min);
        assert_eq!((r, f), (min, UE | PE));
        let (r, f) = op_s(rc(2) | FTZ, Op::Mul, below, min);
        assert_eq!((r, f), (0, UE | PE));
        // (1 - 2^-24) * (2^-126 + 2^-149) is above 2^-126 and rounds to it
        // to nearest: not tiny.
        let (r, f) = op_s(rc(0), Op::Mul, below, min | 1);
        assert_eq!((r, f), (min, PE));
        let half = 0x3f00_0000;
        assert_eq!(op_s(rc(0), Op::Mul, min, half), (0x0040_0000, 0));
        assert_eq!(
            op_s(rc(0) & !(UE << 7), Op::Mul, min, half),
            (0x0040_0000, UE)
        );
        assert_eq!(op_s(rc(0) | FTZ, Op::Mul, min, half), (0, UE | PE));
        assert_eq!(
            op_s(rc(0) | FTZ, Op::Mul, min | 0x8000_0000, half),
            (0x8000_0000, UE | PE)
        );
    }

    /// NaN results (SDM vol. 1, table 4-7 and appendix E): the first
    /// operand's NaN wins, quieted; a SNaN raises IE; an invalid operation
    /// gives the QNaN indefinite.
    #[test]
    fn nans() {
        let snan = 0x7f80_0001;
        let qnan = 0xffc0_1234;
        assert_eq!(op_s(rc(0), Op::Add, snan, qnan), (0x7fc0_0001, IE));
        assert_eq!(op_s(rc(0), Op::Add, qnan, snan), (qnan, IE));
        assert_eq!(op_s(rc(0), Op::Mul, ONE_S, qnan), (qnan, 0));
        assert_eq!(
            op_s(rc(0), Op::Sub, 0x7f80_0000, 0x7f80_0000),
            (0xffc0_0000, IE)
        );
        assert_eq!(op_s(rc(0), Op::Mul, 0, 0xff80_0000), (0xffc0_0000, IE));
        assert_eq!(op_s(rc(0), Op::Div, 0, 0x8000_0000), (0xffc0_0000, IE));
        assert_eq!(op_s(rc(0), Op::Div, ONE_S, 0x8000_0000), (0xff80_0000, ZE));
        assert_eq!(op_s(rc(0), Op::Sqrt, 0, 0xbf80_0000), (0xffc0_0000, IE));
        assert_eq!(op_s(rc(0), Op::Sqrt, 0, 0x8000_0000), (0x8000_0000, 0));
        // MIN/MAX: any NaN gives the second operand as it is, with IE;
        // equal zeros give the second.
        assert_eq!(op_s(rc(0), Op::Min, qnan, ONE_S), (ONE_S, IE));
        assert_eq!(op_s(rc(0), Op::Max, ONE_S, snan), (snan, IE));
        assert_eq!(op_s(rc(0), Op::Min, 0, 0x8000_0000), (0x8000_0000, 0));
        assert_eq!(op_s(rc(0), Op::Max, 0x8000_0000, 0), (0, 0));
        // Conversions: a SNaN is quieted keeping the top of its payload.
        let mut mx = Mx::new(rc(0));
        assert_eq!(
            convert::<Single, Double>(&mut mx, 0xff80_0001),
            0xfff8_0000_2000_0000
        );
        assert_eq!(mx.pre, IE);
    }

    /// DAZ reads a denormal operand as a zero of its sign and raises no DE;
    /// without it the operand raises DE.
    #[test]
    fn denormals() {
        let den = 0x0000_0001;
        assert_eq!(op_s(rc(0), Op::Add, den, 0), (den, DE));
        assert_eq!(op_s(rc(0) | DAZ, Op::Add, den, 0), (0, 0));
        assert_eq!(
            op_s(rc(0) | DAZ, Op::Add, den | 0x8000_0000, 0x8000_0000),
            (0x8000_0000, 0)
        );
        // A denormal divided by zero: ZE only.
        assert_eq!(op_s(rc(0), Op::Div, den, 0), (0x7f80_0000, ZE));
    }

    /// Square roots are correctly rounded in every mode: sqrt(2) in double
    /// precision is 0x3ff6a09e667f3bcd to nearest and upward (the exact value
    /// is below it), one less downward and toward zero.
    #[test]
    fn square_roots() {
        let two = 0x4000_0000_0000_0000;
        for (mode, r) in [
            (0, 0x3ff6_a09e_667f_3bcd),
            (1, 0x3ff6_a09e_667f_3bcc),
            (2, 0x3ff6_a09e_667f_3bcd),
            (3, 0x3ff6_a09e_667f_3bcc),
        ] {
            assert_eq!(op_d(rc(mode), Op::Sqrt, 0, two), (r, PE), "RC {mode}");
        }
        assert_eq!(op_d(rc(0), Op::Sqrt, 0, 0x4010_0000_0000_0000), (two, 0));
        // The smallest denormal: 2^-1074 has the root 2^-537.
        assert_eq!(
            op_d(rc(0), Op::Sqrt, 0, 1),
            (((1023 - 537) as u64) << 52, DE)
        );
        assert_eq!(op_s(rc(0), Op::Sqrt, 0, 0x4080_0000), (0x4000_0000, 0));
    }

    /// RCP and RSQRT are within 1.5 * 2^-12 relative error (SDM RCPPS).
    #[test]
    fn approximations() {
        let mut x = 0x0080_0000u64;
        while x < 0x7e80_0000 {
            let v = f32::from_bits(x as u32) as f64;
            let r = f32::from_bits(approx(x, false) as u32) as f64;
            let err = (r * v - 1.0).abs();
            assert!(err <= 1.5 / 4096.0, "rcp({x:#x}) = {r}");
            let s = f32::from_bits(approx(x, true) as u32) as f64;
            let err = (s * v.sqrt() - 1.0).abs();
            assert!(err <= 1.5 / 4096.0, "rsqrt({x:#x}) = {s}");
            x += 0x0001_2345;
        }
        // Tiny results are flushed to zero (2^127 has the root 2^-127).
        assert_eq!(approx(0xff00_0000, false), 0x8000_0000);
        assert_eq!(approx(0x8000_0000, false), 0xff80_0000);
        assert_eq!(approx(0x7f80_0000, true), 0);
        assert_eq!(approx(0xbf80_0000, true), 0xffc0_0000);
    }

    /// Conversions to integers: rounded by RC or truncated; out of range or
    /// NaN gives the integer indefinite with IE.
    #[test]
    fn integer_conversions() {
        let two_and_half = 0x4004_0000_0000_0000;
        let mut mx = Mx::new(rc(0));
        assert_eq!(to_int::<Double>(&mut mx, two_and_half, 32, false), 2);
        assert_eq!(to_int::<Double>(&mut mx, two_and_half, 32, true), 2);
        mx = Mx::new(rc(2));
        assert_eq!(to_int::<Double>(&mut mx, two_and_half, 32, false), 3);
        assert_eq!(mx.post, PE);
        let minus_1_5 = 0xbff8_0000_0000_0000;
        assert_eq!(to_int::<Double>(&mut mx, minus_1_5, 64, true), u64::MAX);
        let big = 0x41e0_0000_0000_0000; // 2^31
        assert_eq!(to_int::<Double>(&mut mx, big, 32, false), 0x8000_0000);
        assert_eq!(mx.pre, IE);
        let mut mx = Mx::new(rc(0));
        assert_eq!(to_int::<Double>(&mut mx, big, 64, false), 1 << 31);
        assert_eq!(mx.pre, 0);
        assert_eq!(to_int::<Single>(&mut mx, 0x7fc0_0000, 64, false), 1 << 63);
        assert_eq!(mx.pre, IE);
        // 2^24 + 1 rounds to nearest even as a single.
        let mut mx = Mx::new(rc(0));
        assert_eq!(from_int::<Single>(&mut mx, (1 << 24) + 1), 0x4b80_0000);
        assert_eq!(mx.post, PE);
    }

    /// On the CPU: an unmasked exception raises #XM (or #UD with
    /// CR4.OSXMMEXCPT clear) with the destination unchanged and the flag
    /// set; a misaligned m128 raises #GP(0); COMISD sets ZF, PF, CF.
    #[test]
    fn exceptions_on_the_cpu() {
        let prog = |a: &mut CodeAssembler| {
            a.mov(rax, 0x3ff0_0000_0000_0000u64)?; // 1.0
            a.movq(xmm0, rax)?;
            a.xorpd(xmm1, xmm1)?;
            a.mov(dword_ptr(0x30_0000), (ALL_MASKED & !(ZE << 7)) as i32)?;
            a.ldmxcsr(dword_ptr(0x30_0000))?;
            a.comisd(xmm0, xmm1)?; // 1 > 0: ZF PF CF clear
            a.pushfq()?;
            a.pop(r12)?;
            a.divsd(xmm0, xmm1)?;
            a.hlt()
        };
        for (cr4_value, vec) in [(0x6a0u64, 19u64), (0x2a0, 6)] {
            let mut t = T::long(&asm(64, CODE, prog));
            let mut s = t.cpu.sregs();
            s.cr4 = cr4_value;
            t.cpu.set_sregs(&s);
            t.gate(vec, HANDLER, 0, 0);
            t.code_at(HANDLER, |a| {
                a.stmxcsr(dword_ptr(0x30_0004))?;
                a.mov(r15, vec)?;
                a.hlt()
            });
            assert_eq!(t.run(), CpuExit::Hlt);
            assert_eq!(t.cpu.regs().r15, vec, "vector");
            assert_eq!(t.cpu.regs().r12 & 0x45, 0, "COMISD greater: ZF PF CF clear");
            assert_eq!(t.cpu.fpu.xmm[0] as u64, 0x3ff0_0000_0000_0000, "unchanged");
            assert_eq!(t.read(0x30_0004) as u32, (ALL_MASKED & !(ZE << 7)) | ZE);
        }
        let mut t = T::long(&asm(64, CODE, |a| {
            a.mov(rax, 0x30_0008u64)?;
            a.addps(xmm0, xmmword_ptr(rax))?;
            a.hlt()
        }));
        t.gate(13, HANDLER, 0, 0);
        t.code_at(HANDLER, |a| {
            a.pop(r14)?;
            a.mov(r15, 13u64)?;
            a.hlt()
        });
        assert_eq!(t.run(), CpuExit::Hlt);
        assert_eq!((t.cpu.regs().r15, t.cpu.regs().r14), (13, 0), "#GP(0)");
    }
}
