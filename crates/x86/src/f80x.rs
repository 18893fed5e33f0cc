//! The x87's transcendental and remainder arithmetic and the packed BCD
//! conversions (SDM vol. 2: FSIN, FCOS, FSINCOS, FPTAN, FPATAN, F2XM1,
//! FYL2X, FYL2XP1, FPREM, FPREM1, FBLD, FBSTP), in integers like f80.rs.
//!
//! FPREM and FPREM1 are exact. The transcendentals are computed in `W`, a
//! float with a 128-bit significand (each operation is off by at most a
//! few units in its 128th bit), as series on reduced arguments, and the
//! result is rounded once to 64 bits per RC with a sticky bit: far within
//! the SDM's 1-ulp bound (vol. 1 8.3.10), and correctly rounded except when
//! the exact value lies within about 2^-120 of a rounding boundary. The
//! periodic functions reduce their argument modulo pi/2 as Intel's FPU
//! does, with the 66-bit approximation of pi (SDM vol. 1 8.3.10): the
//! reduction itself is exact, so FSIN(x) = sin(x - q * pi66/2) rounded
//! once, which is what this host's x87 gives too (FSIN of the 64-bit pi
//! is -2^-64: pi rounded to 64 bits minus pi66).

use crate::f80::{self, Class, Exact, Unp, BIAS, F80, INDEFINITE};

/// sig * 2^(exp - 127), sig with bit 127 set, or zero (sig 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct W {
    neg: bool,
    exp: i32,
    sig: u128,
}

const TOP: u128 = 1 << 127;
/// pi, pi/2 and pi/4 (exponents 1, 0, -1), rounded to 128 bits.
const PI: u128 = 0xc90fdaa22168c234c4c6628b80dc1cd1;
const TWO_OVER_PI: u128 = 0xa2f9836e4e441529fc2757d1f534ddc1;
const LN2: u128 = 0xb17217f7d1cf79abc9e3b39803f2f6af;
const LOG2E: u128 = 0xb8aa3b295c17f0bbbe87fed0691d3e89;
const SQRT2: u128 = 0xb504f333f9de6484597d89b3754abe9f;
/// pi/2 with 66 significant bits, in units of 2^-65 (Intel's reduction
/// constant; pi * 2^64 = 0x3243f6a8885a308d3.13...).
const PI66_HALF: u128 = 0x3243f6a8885a308d3;

fn shr_sticky(x: u128, n: u32) -> u128 {
    match n {
        0 => x,
        1..=127 => (x >> n) | ((x & ((1u128 << n) - 1)) != 0) as u128,
        _ => (x != 0) as u128,
    }
}

/// The 256-bit product: (high, low).
fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    const M: u128 = u64::MAX as u128;
    let (a1, a0, b1, b0) = (a >> 64, a & M, b >> 64, b & M);
    let (p00, p01, p10, p11) = (a0 * b0, a0 * b1, a1 * b0, a1 * b1);
    let mid = (p00 >> 64) + (p01 & M) + (p10 & M);
    (
        p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64),
        (p00 & M) | mid << 64,
    )
}

impl W {
    const ZERO: W = W {
        neg: false,
        exp: 0,
        sig: 0,
    };
    const ONE: W = W {
        neg: false,
        exp: 0,
        sig: TOP,
    };

    fn c(exp: i32, sig: u128) -> W {
        W {
            neg: false,
            exp,
            sig,
        }
    }

    /// Normalizes sig * 2^(exp - 127).
    fn norm(neg: bool, exp: i32, sig: u128) -> W {
        if sig == 0 {
            return W { neg, ..W::ZERO };
        }
        let lz = sig.leading_zeros();
        W {
            neg,
            exp: exp - lz as i32,
            sig: sig << lz,
        }
    }

    /// A finite value exactly.
    pub(crate) fn of(x: F80) -> W {
        if x.class() == Class::Zero {
            return W {
                neg: x.sign(),
                ..W::ZERO
            };
        }
        let u = x.unpack();
        W {
            neg: u.sign,
            exp: u.exp - BIAS,
            sig: u.sig,
        }
    }

    fn int(n: i64) -> W {
        W::norm(n < 0, 127, n.unsigned_abs() as u128)
    }

    fn neg(self) -> W {
        W {
            neg: !self.neg,
            ..self
        }
    }

    fn abs(self) -> W {
        W { neg: false, ..self }
    }

    fn is_zero(self) -> bool {
        self.sig == 0
    }

    fn scale(self, k: i32) -> W {
        W {
            exp: self.exp + k,
            ..self
        }
    }

    /// |self| < |o|.
    fn less_mag(self, o: W) -> bool {
        o.sig != 0 && (self.sig == 0 || (self.exp, self.sig) < (o.exp, o.sig))
    }

    fn add(self, o: W) -> W {
        if o.is_zero() {
            return self;
        }
        if self.is_zero() {
            return o;
        }
        let (x, y) = if o.less_mag(self) {
            (self, o)
        } else {
            (o, self)
        };
        let d = (x.exp - y.exp).min(200) as u32;
        if x.neg == y.neg {
            let (s, carry) = x.sig.overflowing_add(shr_sticky(y.sig, d));
            if carry {
                return W {
                    neg: x.neg,
                    exp: x.exp + 1,
                    sig: TOP | s >> 1 | (s & 1),
                };
            }
            return W { sig: s, ..x };
        }
        if d == 1 && x.sig - (y.sig >> 1) < TOP {
            // Cancellation: 2x - y exactly, one bit further down.
            let s = ((x.sig - (y.sig >> 1)) << 1) - (y.sig & 1);
            return W::norm(x.neg, x.exp - 1, s);
        }
        W::norm(x.neg, x.exp, x.sig - shr_sticky(y.sig, d))
    }

    fn sub(self, o: W) -> W {
        self.add(o.neg())
    }

    fn mul(self, o: W) -> W {
        let neg = self.neg != o.neg;
        if self.is_zero() || o.is_zero() {
            return W { neg, ..W::ZERO };
        }
        let (hi, lo) = mul_wide(self.sig, o.sig);
        let exp = self.exp + o.exp;
        if hi >> 127 != 0 {
            W {
                neg,
                exp: exp + 1,
                sig: hi | (lo != 0) as u128,
            }
        } else {
            W {
                neg,
                exp,
                sig: hi << 1 | lo >> 127 | (lo << 1 != 0) as u128,
            }
        }
    }

    /// self / o, o non-zero: restoring division, 128 quotient bits and a
    /// sticky bit.
    fn div(self, o: W) -> W {
        let neg = self.neg != o.neg;
        if self.is_zero() {
            return W { neg, ..W::ZERO };
        }
        let d = o.sig;
        let mut exp = self.exp - o.exp;
        let mut r = self.sig;
        if r >= d {
            r -= d;
        } else {
            // 2r >= d: r has bit 127 set.
            exp -= 1;
            r = (r << 1).wrapping_sub(d);
        }
        let mut q: u128 = 1;
        for _ in 0..127 {
            let top = r >> 127;
            r <<= 1;
            q <<= 1;
            if top == 1 || r >= d {
                r = r.wrapping_sub(d);
                q |= 1;
            }
        }
        W {
            neg,
            exp,
            sig: q | (r != 0) as u128,
        }
    }

    /// The square root of a positive value: the 66-bit root of f80.rs,
    /// then two Newton steps.
    fn sqrt(self) -> W {
        if self.is_zero() {
            return self;
        }
        let k = self.exp.div_euclid(2);
        let m = F80 {
            se: (BIAS + self.exp - 2 * k) as u16,
            sig: (self.sig >> 64) as u64,
        };
        let mut y = match f80::sqrt(m) {
            Exact::Num(u, _, _) => W::c(u.exp - BIAS, u.sig),
            Exact::Val(..) => W::ONE,
        };
        let a = W::c(self.exp - 2 * k, self.sig);
        for _ in 0..2 {
            y = y.add(a.div(y)).scale(-1);
        }
        y.scale(k)
    }

    /// The nearest integer of a non-negative value below 2^64.
    fn round_int(self) -> u64 {
        if self.is_zero() || self.exp < -1 {
            return 0;
        }
        if self.exp == -1 {
            return 1;
        }
        let sh = (127 - self.exp) as u32;
        let half = (self.sig >> (sh - 1)) & 1;
        ((self.sig >> sh) + half) as u64
    }

    /// The value for rounding: inexact (sticky) by construction.
    fn exact(self, flags: u16) -> Exact {
        Exact::Num(
            Unp {
                sign: self.neg,
                exp: self.exp + BIAS,
                sig: self.sig,
            },
            true,
            flags,
        )
    }
}

/// A series term this many binary places below the sum is its last one: it
/// is added (below the 128th bit it is a sticky bit that still gives the
/// direction of the rest, whose terms shrink and alternate or keep their
/// sign), and the terms after it, which could only cancel that bit, are
/// not.
const NEGLIGIBLE: i32 = 125;

/// sin(r) and cos(r) for |r| <= about pi/4: Taylor series.
fn sin_cos(r: W) -> (W, W) {
    if r.is_zero() {
        return (r, W::ONE);
    }
    let r2 = r.mul(r);
    let (mut s, mut c, mut ts, mut tc) = (r, W::ONE, r, W::ONE);
    // Each series stops after its own last term (NEGLIGIBLE).
    let (mut s_done, mut c_done) = (false, false);
    for k in 1..60i64 {
        if !s_done {
            ts = ts.mul(r2).div(W::int(2 * k * (2 * k + 1))).neg();
            s = s.add(ts);
            s_done = ts.exp < s.exp - NEGLIGIBLE;
        }
        if !c_done {
            tc = tc.mul(r2).div(W::int((2 * k - 1) * 2 * k)).neg();
            c = c.add(tc);
            c_done = tc.exp < c.exp - NEGLIGIBLE;
        }
        if s_done && c_done {
            break;
        }
    }
    (s, c)
}

/// |x| = q * pi66/2 + r, |x| < 2^63 finite non-zero: (q mod 4, r), with r
/// exact and |r| at most about pi/4.
fn reduce(x: F80) -> (u64, W) {
    let a = W::of(x).abs();
    if a.exp < -1 {
        return (0, a);
    }
    let q = a.mul(W::c(-1, TWO_OVER_PI)).round_int();
    if q == 0 {
        return (0, a);
    }
    // |x| = m * 2^(e - 63) = (m << (e + 2)) * 2^-65, -1 <= e <= 62; the
    // difference with q * PI66_HALF is below 2^67, so it is right modulo
    // 2^128.
    let e = x.unpack().exp - BIAS;
    let xx = (x.unpack().sig >> 64) << (e + 2);
    let d = xx.wrapping_sub((q as u128).wrapping_mul(PI66_HALF)) as i128;
    (q & 3, W::norm(d < 0, 127 - 65, d.unsigned_abs()))
}

/// atan(r) for 0 <= r <= 1: halvings atan(t) = 2 atan(t / (1 + sqrt(1 +
/// t^2))) down to t < 1/128, then the series.
fn atan(r: W) -> W {
    let mut t = r;
    let mut k = 0;
    while !t.is_zero() && t.exp > -8 {
        t = t.div(W::ONE.add(W::ONE.add(t.mul(t)).sqrt()));
        k += 1;
    }
    if t.is_zero() {
        return t;
    }
    let t2 = t.mul(t);
    let (mut sum, mut p) = (t, t);
    for n in 1..80i64 {
        p = p.mul(t2).neg();
        let term = p.div(W::int(2 * n + 1));
        sum = sum.add(term);
        if term.exp < sum.exp - NEGLIGIBLE {
            break;
        }
    }
    sum.scale(k)
}

/// ln((1 + s) / (1 - s)) = 2 atanh(s), |s| <= about 0.2.
fn ln_ratio(s: W) -> W {
    if s.is_zero() {
        return s;
    }
    let s2 = s.mul(s);
    let (mut sum, mut p) = (s, s);
    for n in 1..100i64 {
        p = p.mul(s2);
        let term = p.div(W::int(2 * n + 1));
        sum = sum.add(term);
        if term.exp < sum.exp - NEGLIGIBLE {
            break;
        }
    }
    sum.scale(1)
}

/// log2(x), x positive: x = m * 2^e with m in [sqrt(2)/2, sqrt(2)),
/// ln(m) = 2 atanh((m - 1) / (m + 1)).
fn log2(x: W) -> W {
    let (mut e, mut m) = (x.exp, W::c(0, x.sig));
    if x.sig > SQRT2 {
        e += 1;
        m = m.scale(-1);
    }
    let s = m.sub(W::ONE).div(m.add(W::ONE));
    W::int(e as i64).add(ln_ratio(s).mul(W::c(0, LOG2E)))
}

/// log2(1 + x), x > -1.
fn log2_1p(x: W) -> W {
    if x.exp < -2 {
        // |x| < 1/4: 1 + x = (1 + s) / (1 - s) with s = x / (2 + x).
        let s = x.div(W::int(2).add(x));
        return ln_ratio(s).mul(W::c(0, LOG2E));
    }
    log2(W::ONE.add(x))
}

/// e^t - 1 for |t| below about 1.4: the series.
fn expm1(t: W) -> W {
    let (mut sum, mut term) = (t, t);
    for n in 2..80i64 {
        term = term.mul(t).div(W::int(n));
        sum = sum.add(term);
        if term.is_zero() || term.exp < sum.exp - NEGLIGIBLE {
            break;
        }
    }
    sum
}

/// Pre-computation checks of a one-operand transcendental: unsupported
/// formats (IE, the indefinite), NaNs, denormals (DE).
fn pre1(x: F80) -> Result<u16, (F80, u16)> {
    match x.class() {
        Class::Unsupported => Err((INDEFINITE, f80::IE)),
        Class::QNan | Class::SNan => Err(f80::nan_result(x, None)),
        Class::Denormal => Ok(f80::DE),
        _ => Ok(0),
    }
}

/// As `pre1` for two operands.
fn pre2(a: F80, b: F80) -> Result<u16, Exact> {
    if a.class() == Class::Unsupported || b.class() == Class::Unsupported {
        return Err(Exact::Val(INDEFINITE, f80::IE));
    }
    if a.is_nan() || b.is_nan() {
        let (v, f) = f80::nan_result(a, Some(b));
        return Err(Exact::Val(v, f));
    }
    Ok(pre1(a).unwrap_or(0) | pre1(b).unwrap_or(0))
}

/// Whether |x| < 2^63 (the range of FSIN, FCOS, FSINCOS, FPTAN); NaNs,
/// infinities and unsupported formats are "in range" (their own rules).
pub(crate) fn trig_in_range(x: F80) -> bool {
    !matches!(x.class(), Class::Normal | Class::Denormal) || x.exp() < (BIAS + 63) as u16
}

/// The periodic functions of FSIN, FCOS, FSINCOS (sin, cos) and FPTAN
/// (tan, 1): two results, exact before rounding. ±0 gives (±0, 1) and
/// (±0 for tan); ±infinity is invalid.
pub(crate) fn trig(x: F80, tan: bool) -> (Exact, Exact) {
    let de = match pre1(x) {
        Ok(f) => f,
        Err((v, f)) => return (Exact::Val(v, f), Exact::Val(v, f)),
    };
    let one = F80 {
        se: BIAS as u16,
        sig: 1 << 63,
    };
    match x.class() {
        Class::Inf => {
            return (
                Exact::Val(INDEFINITE, f80::IE),
                Exact::Val(INDEFINITE, f80::IE),
            )
        }
        Class::Zero => return (Exact::Val(x, 0), Exact::Val(one, 0)),
        _ => {}
    }
    let (q, r) = reduce(x);
    let (s, c) = sin_cos(r);
    let (s, c) = match q {
        0 => (s, c),
        1 => (c, s.neg()),
        2 => (s.neg(), c.neg()),
        _ => (c.neg(), s),
    };
    let s = if x.sign() { s.neg() } else { s };
    if tan {
        return (s.div(c).exact(de), Exact::Val(one, 0));
    }
    (s.exact(de), c.exact(de))
}

/// F2XM1: 2^x - 1. Defined for -1 <= x <= 1; beyond, this computes the
/// same function (the SDM leaves the result undefined): 2^x - 1 rounded,
/// overflowing to infinity, -1 + a tiny value for very negative x.
pub(crate) fn f2xm1(x: F80) -> Exact {
    let de = match pre1(x) {
        Ok(f) => f,
        Err((v, f)) => return Exact::Val(v, f),
    };
    match x.class() {
        Class::Zero => return Exact::Val(x, 0),
        Class::Inf if x.sign() => return Exact::Val(F80::from_i64(-1), 0),
        Class::Inf => return Exact::Val(x, 0),
        _ => {}
    }
    let w = W::of(x);
    if w.exp <= 0 {
        if w.exp == 0 && w.sig == TOP {
            // 2 - 1 and 1/2 - 1: exact.
            let v = if x.sign() {
                F80 {
                    se: 0xbffe,
                    sig: 1 << 63,
                }
            } else {
                F80 {
                    se: BIAS as u16,
                    sig: 1 << 63,
                }
            };
            return Exact::Val(v, de);
        }
        return expm1(w.mul(W::c(-1, LN2))).exact(de);
    }
    if w.exp >= 15 {
        // Far beyond the exponent range: overflow, or -1 + 2^x.
        if x.sign() {
            return W::int(-1).add(W::c(-40000, TOP)).exact(de);
        }
        return W::c(40000, TOP).exact(de);
    }
    // x = n + f with n an integer, 0 <= f < 1: 2^x - 1 = 2^n (1 + (2^f - 1)) - 1.
    let u = x.unpack();
    let e = u.exp - BIAS;
    let n = (u.sig >> (127 - e)) as i64;
    let f = W::norm(false, e, u.sig & ((1u128 << (127 - e)) - 1));
    let (n, f) = if x.sign() {
        if f.is_zero() {
            (-n, f)
        } else {
            (-n - 1, W::ONE.sub(f))
        }
    } else {
        (n, f)
    };
    if f.is_zero() {
        // An integer: 2^n - 1 exactly (rounded once).
        let v = W::ONE.scale(n as i32).sub(W::ONE);
        return f80::Exact::Num(
            Unp {
                sign: v.neg,
                exp: v.exp + BIAS,
                sig: v.sig,
            },
            false,
            de,
        );
    }
    let p = W::ONE.add(expm1(f.mul(W::c(-1, LN2)))).scale(n as i32);
    p.sub(W::ONE).exact(de)
}

/// FYL2X: y * log2(x) (SDM vol. 2 FYL2X's table).
pub(crate) fn fyl2x(x: F80, y: F80) -> Exact {
    let de = match pre2(x, y) {
        Ok(f) => f,
        Err(e) => return e,
    };
    let (cx, cy) = (x.class(), y.class());
    let inv = Exact::Val(INDEFINITE, f80::IE);
    if x.sign() && cx != Class::Zero {
        return inv;
    }
    if cx == Class::Zero {
        return times_log2_zero(y, de);
    }
    if cx == Class::Inf {
        return match cy {
            Class::Zero => inv,
            _ => Exact::Val(F80::inf(y.sign()), de),
        };
    }
    let w = W::of(x);
    if w.sig == TOP {
        // A power of two: y * e exactly (0 * inf invalid, y * 0 a zero).
        return match f80::mul(y, F80::from_i64(w.exp as i64)) {
            Exact::Val(v, f) if f & f80::IE != 0 => Exact::Val(v, f),
            Exact::Val(v, f) => Exact::Val(v, f | de),
            Exact::Num(u, s, f) => Exact::Num(u, s, f | de),
        };
    }
    product(y, log2(w), de)
}

/// y * log2(0) = y * -inf: 0 * inf is invalid, a finite y divides by
/// zero (ZE alone, #Z ranking above #D), an infinite one is exact.
fn times_log2_zero(y: F80, de: u16) -> Exact {
    match y.class() {
        Class::Zero => Exact::Val(INDEFINITE, f80::IE),
        Class::Inf => Exact::Val(F80::inf(!y.sign()), de),
        _ => Exact::Val(F80::inf(!y.sign()), f80::ZE),
    }
}

/// y * l for a finite non-zero irrational l: zeros and infinities of y
/// are exact.
fn product(y: F80, l: W, de: u16) -> Exact {
    let sign = y.sign() != l.neg;
    match y.class() {
        Class::Zero => Exact::Val(F80::zero(sign), de),
        Class::Inf => Exact::Val(F80::inf(sign), de),
        _ => W::of(y).mul(l).exact(de),
    }
}

/// FYL2XP1: y * log2(x + 1). Defined for |x| < 1 - sqrt(2)/2; beyond,
/// this computes the same function (x < -1 invalid, -1 as log2(0)).
pub(crate) fn fyl2xp1(x: F80, y: F80) -> Exact {
    let de = match pre2(x, y) {
        Ok(f) => f,
        Err(e) => return e,
    };
    let (cx, cy) = (x.class(), y.class());
    let inv = Exact::Val(INDEFINITE, f80::IE);
    if cx == Class::Zero {
        // y * ±0: 0 * inf invalid.
        return f80::mul(y, x);
    }
    if cx == Class::Inf {
        return if x.sign() || cy == Class::Zero {
            inv
        } else {
            Exact::Val(F80::inf(y.sign()), de)
        };
    }
    let w = W::of(x);
    if x.sign() && !w.abs().less_mag(W::ONE) {
        if w.sig == TOP && w.exp == 0 {
            // log2(0): as FYL2X of zero.
            return times_log2_zero(y, de);
        }
        return inv;
    }
    let p = W::ONE.add(w);
    if p.sig == TOP && w.exp >= -63 {
        // 1 + x (exact) a power of two: log2 is an integer.
        return f80::mul(y, F80::from_i64(p.exp as i64));
    }
    product(y, log2_1p(w), de)
}

/// FPATAN: atan(y / x) with the quadrant of (x, y) (SDM vol. 2 FPATAN's
/// table: zeros and infinities give ±0, ±pi/4, ±pi/2, ±3pi/4, ±pi).
pub(crate) fn fpatan(x: F80, y: F80) -> Exact {
    let de = match pre2(x, y) {
        Ok(f) => f,
        Err(e) => return e,
    };
    let (cx, cy) = (x.class(), y.class());
    let pi = W::c(1, PI);
    let signed = |v: W| if y.sign() { v.neg() } else { v };
    let zero = Exact::Val(F80::zero(y.sign()), de);
    let theta = match (cx, cy) {
        (Class::Inf, Class::Inf) => {
            if x.sign() {
                W::c(1, 0x96cbe3f9990e91a79394c9e8a0a5159d) // 3pi/4
            } else {
                W::c(-1, PI)
            }
        }
        (_, Class::Inf) | (Class::Zero, _) if cy != Class::Zero => W::c(0, PI),
        (Class::Inf, _) | (_, Class::Zero) => {
            if x.sign() {
                pi
            } else {
                return zero;
            }
        }
        _ => {
            let (a, b) = (W::of(y).abs(), W::of(x).abs());
            let t = if b.less_mag(a) {
                W::c(0, PI).sub(atan(b.div(a)))
            } else {
                atan(a.div(b))
            };
            if x.sign() {
                pi.sub(t)
            } else {
                t
            }
        }
    };
    signed(theta).exact(de)
}

/// What FPREM and FPREM1 leave in C0, C1, C3 (C2: 1 for a partial
/// remainder, else 0).
pub(crate) enum Quot {
    /// The quotient's bits 2, 0, 1 (Q2, Q0, Q1).
    Bits(u64),
    /// A partial remainder: C0, C1, C3 cleared.
    Partial,
    /// A NaN or an invalid operation: C1 cleared, C0 and C3 kept (what
    /// this host's x87 does; the SDM does not say).
    Kept,
}

/// FPREM (`ieee` false: the quotient truncated) and FPREM1 (rounded to
/// nearest): ST(0) = a, ST(1) = b: the result and what C0, C1, C3 become. The exponent difference D is reduced by at
/// most 63 per execution: for D >= 64, by D - N with N = 32 + D mod 32
/// (what this host's x87 does; the SDM allows any N in 32..63), with the
/// quotient truncated.
pub(crate) fn fprem(a: F80, b: F80, ieee: bool) -> (Exact, Quot) {
    let de = match pre2(a, b) {
        Ok(f) => f,
        Err(e) => return (e, Quot::Kept),
    };
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Inf || cb == Class::Zero {
        // Invalid: IE alone (no DE beside it, as this host's x87).
        return (Exact::Val(INDEFINITE, f80::IE), Quot::Kept);
    }
    if ca == Class::Zero {
        return (Exact::Val(a, de), Quot::Bits(0));
    }
    // ST(0) unchanged in value (a pseudo-denormal comes out normalized).
    let same = (Exact::Num(a.unpack(), false, de), Quot::Bits(0));
    if cb == Class::Inf {
        return same;
    }
    let (ua, ub) = (a.unpack(), b.unpack());
    let d = ua.exp - ub.exp;
    if d < -1 {
        return same;
    }
    let (d, shift, partial) = if d >= 64 {
        let n = 32 + d % 32;
        (n, d - n, true)
    } else {
        (d, 0, false)
    };
    // a = n * 2^(eb - 64 + shift), b = dd * 2^(eb - 64).
    let n = (ua.sig >> 64) << (d + 1);
    let dd = (ub.sig >> 64) << 1;
    let (mut q, mut r) = (n / dd, n % dd);
    let mut sign = a.sign();
    if ieee && !partial && (2 * r > dd || (2 * r == dd && q & 1 == 1)) {
        q += 1;
        r = dd - r;
        sign = !sign;
    }
    let quot = if partial {
        Quot::Partial
    } else {
        Quot::Bits(q as u64)
    };
    if r == 0 {
        return (Exact::Val(F80::zero(a.sign()), de), quot);
    }
    let lz = r.leading_zeros() as i32;
    let u = Unp {
        sign,
        exp: ub.exp + 63 - lz + shift,
        sig: r << lz,
    };
    (Exact::Num(u, false, de), quot)
}

/// FBLD: the 18 packed BCD digits (two a byte, the low digit in the low
/// nibble, byte 0 the lowest) and the sign in bit 7 of byte 9. Digits
/// above 9 are undefined in the SDM; they count with their binary value
/// (digit * 10^k), which is what this host's x87 does.
pub(crate) fn from_bcd(b: &[u8; 10]) -> F80 {
    let v = b[..9].iter().rev().fold(0u64, |v, &byte| {
        (v * 10 + (byte >> 4) as u64) * 10 + (byte & 15) as u64
    });
    let x = F80::from_i64(v as i64);
    if b[9] & 0x80 != 0 {
        x.neg()
    } else {
        x
    }
}

/// The packed BCD integer indefinite (SDM vol. 1 Table 4-3).
pub(crate) const BCD_INDEFINITE: [u8; 10] = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff];

/// FBSTP's encoding of the integer `v` (|v| < 10^18) with `neg`'s sign.
pub(crate) fn to_bcd(v: u64, neg: bool) -> [u8; 10] {
    let mut b = [0u8; 10];
    let mut v = v;
    for byte in b.iter_mut().take(9) {
        *byte = (v % 10) as u8 | ((v / 10 % 10) as u8) << 4;
        v /= 100;
    }
    b[9] = if neg { 0x80 } else { 0 };
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_arithmetic() {
        let three = W::int(3);
        let third = W::ONE.div(three);
        assert_eq!(third.sig, 0xaaaa_aaaa_aaaa_aaaa_aaaa_aaaa_aaaa_aaab);
        assert!(third.mul(three).sub(W::ONE).exp < -120);
        let r2 = W::int(2).sqrt();
        assert_eq!(r2.sig >> 4, SQRT2 >> 4);
        // x - tiny is just below x.
        let v = W::ONE.sub(W::c(-5000, TOP));
        assert_eq!((v.exp, v.sig), (-1, u128::MAX - 1));
    }
}
