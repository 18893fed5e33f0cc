//! x87 arithmetic on the 80-bit double extended-precision format, in
//! integers (SDM vol. 1 ch. 4 and 8): classification, exact unpacking,
//! one rounding step for every destination (precision control's 24, 53 or
//! 64 bits; the single, double and extended exponent ranges), add,
//! multiply, divide, square root, and the conversions. Every result is
//! computed exactly (or with a sticky bit) and rounded once.

/// Exception flags (status and control word bit positions).
pub const IE: u16 = 0x01;
pub const DE: u16 = 0x02;
pub const ZE: u16 = 0x04;
pub const OE: u16 = 0x08;
pub const UE: u16 = 0x10;
pub const PE: u16 = 0x20;

/// An 80-bit value: sign and biased exponent, and the significand with its
/// explicit integer bit 63.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct F80 {
    pub se: u16,
    pub sig: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    Zero,
    /// Denormal or pseudo-denormal (exponent 0, significand non-zero).
    Denormal,
    Normal,
    Inf,
    QNan,
    SNan,
    /// Unnormal, pseudo-NaN, pseudo-infinity: invalid operands.
    Unsupported,
}

pub const BIAS: i32 = 16383;

/// The "real indefinite" QNaN.
pub const INDEFINITE: F80 = F80 {
    se: 0xffff,
    sig: 0xc000_0000_0000_0000,
};

impl F80 {
    pub const ZERO: F80 = F80 { se: 0, sig: 0 };

    pub fn from_bytes(b: &[u8]) -> F80 {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[..8]);
        F80 {
            sig: u64::from_le_bytes(s),
            se: u16::from_le_bytes([b[8], b[9]]),
        }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.sig.to_le_bytes());
        b[8..10].copy_from_slice(&self.se.to_le_bytes());
        b
    }

    pub fn sign(self) -> bool {
        self.se & 0x8000 != 0
    }

    pub fn exp(self) -> u16 {
        self.se & 0x7fff
    }

    pub fn neg(self) -> F80 {
        F80 {
            se: self.se ^ 0x8000,
            sig: self.sig,
        }
    }

    pub fn abs(self) -> F80 {
        F80 {
            se: self.se & 0x7fff,
            sig: self.sig,
        }
    }

    pub fn inf(sign: bool) -> F80 {
        F80 {
            se: 0x7fff | (sign as u16) << 15,
            sig: 1 << 63,
        }
    }

    pub fn zero(sign: bool) -> F80 {
        F80 {
            se: (sign as u16) << 15,
            sig: 0,
        }
    }

    pub fn class(self) -> Class {
        let int = self.sig >> 63 != 0;
        match self.exp() {
            0 if self.sig == 0 => Class::Zero,
            0 => Class::Denormal,
            0x7fff if !int => Class::Unsupported,
            0x7fff if self.sig << 1 == 0 => Class::Inf,
            0x7fff if self.sig & (1 << 62) != 0 => Class::QNan,
            0x7fff => Class::SNan,
            _ if int => Class::Normal,
            _ => Class::Unsupported,
        }
    }

    pub fn is_nan(self) -> bool {
        matches!(self.class(), Class::QNan | Class::SNan)
    }

    /// Finite non-zero: (sign, exponent, significand normalized to bit 127)
    /// with value sig * 2^(exp - BIAS - 127).
    pub fn unpack(self) -> Unp {
        let mut exp = self.exp() as i32;
        if exp == 0 {
            exp = 1;
        }
        let mut sig = (self.sig as u128) << 64;
        let lz = sig.leading_zeros();
        sig <<= lz;
        exp -= lz as i32;
        Unp {
            sign: self.sign(),
            exp,
            sig,
        }
    }

    pub fn quiet(self) -> F80 {
        F80 {
            se: self.se,
            sig: self.sig | 1 << 62,
        }
    }

    /// The exact value of an i64.
    pub fn from_i64(n: i64) -> F80 {
        if n == 0 {
            return F80::ZERO;
        }
        let m = n.unsigned_abs();
        let shift = m.leading_zeros();
        F80 {
            se: (BIAS as u16 + 63 - shift as u16) | if n < 0 { 0x8000 } else { 0 },
            sig: m << shift,
        }
    }

    /// An IEEE binary32 or binary64 value (`frac` fraction bits, `ebits`
    /// exponent bits), exactly; flags: IE for an SNaN (quieted), DE for a
    /// denormal.
    pub fn from_ieee(bits: u64, frac: u32, ebits: u32) -> (F80, u16) {
        let sign = (bits >> (frac + ebits)) & 1 != 0;
        let emax = (1u64 << ebits) - 1;
        let e = (bits >> frac) & emax;
        let f = bits & ((1u64 << frac) - 1);
        let s = (sign as u16) << 15;
        let bias = (emax >> 1) as i32;
        if e == emax {
            let sig = 1 << 63 | f << (63 - frac);
            if f == 0 {
                return (F80::inf(sign), 0);
            }
            let x = F80 {
                se: s | 0x7fff,
                sig,
            };
            if f >> (frac - 1) == 0 {
                return (x.quiet(), IE);
            }
            return (x, 0);
        }
        if e == 0 {
            if f == 0 {
                return (F80::zero(sign), 0);
            }
            // Denormal: normalize.
            let lz = f.leading_zeros() - (64 - frac);
            let sig = f << (63 - frac + lz + 1);
            let exp = BIAS - bias + 1 - lz as i32 - 1;
            return (
                F80 {
                    se: s | exp as u16,
                    sig,
                },
                DE,
            );
        }
        (
            F80 {
                se: s | (e as i32 - bias + BIAS) as u16,
                sig: 1 << 63 | f << (63 - frac),
            },
            0,
        )
    }
}

/// An unpacked finite non-zero value: sig * 2^(exp - BIAS - 127), with
/// bit 127 of `sig` set.
#[derive(Clone, Copy, Debug)]
pub struct Unp {
    pub sign: bool,
    pub exp: i32,
    pub sig: u128,
}

/// A destination format: significand precision and exponent range
/// (biased as in the 80-bit format).
#[derive(Clone, Copy, Debug)]
pub struct Fmt {
    pub prec: u32,
    pub emin: i32,
    pub emax: i32,
}

pub const EXT: Fmt = Fmt {
    prec: 64,
    emin: 1,
    emax: 0x7ffe,
};
pub const DOUBLE: Fmt = Fmt {
    prec: 53,
    emin: BIAS - 1022,
    emax: BIAS + 1023,
};
pub const SINGLE: Fmt = Fmt {
    prec: 24,
    emin: BIAS - 126,
    emax: BIAS + 127,
};

/// The extended range with precision control's significand (PC 00: 24
/// bits, 10: 53, 11 and the reserved 01: 64).
pub fn pc_fmt(fcw: u16) -> Fmt {
    let prec = match (fcw >> 8) & 3 {
        0 => 24,
        2 => 53,
        _ => 64,
    };
    Fmt { prec, ..EXT }
}

/// A rounded result.
#[derive(Clone, Copy, Debug)]
pub struct Rounded {
    /// In the destination's exponent range, biased as F80 (denormals have
    /// exponent `fmt.emin` and bit 63 clear; zero has significand 0).
    pub sign: bool,
    pub exp: i32,
    pub sig: u64,
    pub flags: u16,
    /// The significand was rounded up in magnitude (C1).
    pub up: bool,
}

fn shr_sticky(x: u128, n: u32) -> u128 {
    if n == 0 {
        x
    } else if n >= 128 {
        (x != 0) as u128
    } else {
        (x >> n) | ((x & ((1u128 << n) - 1)) != 0) as u128
    }
}

/// Rounds `sig` (bit 127 = the integer bit, 0 = below it all is sticky)
/// at `prec` bits per the rounding control `rc`; (rounded sig, inexact,
/// carry out of bit 127).
fn round_sig(sign: bool, sig: u128, prec: u32, rc: u16) -> (u128, bool, bool) {
    let drop = 128 - prec;
    let mask = (1u128 << drop) - 1;
    let rem = sig & mask;
    let trunc = sig & !mask;
    if rem == 0 {
        return (sig, false, false);
    }
    let half = 1u128 << (drop - 1);
    let lsb = (sig >> drop) & 1;
    let inc = match rc & 3 {
        0 => rem > half || (rem == half && lsb == 1),
        1 => sign,
        2 => !sign,
        _ => false,
    };
    if !inc {
        return (trunc, true, false);
    }
    let (s, carry) = trunc.overflowing_add(1u128 << drop);
    (s, true, carry)
}

/// Rounds the exact value `u` (with `sticky`, non-zero bits below `u.sig`)
/// into `fmt` per the control word's rounding control and the overflow
/// and underflow masks. With `biased` (a register destination), an
/// unmasked overflow or underflow gives the result with its exponent
/// adjusted by 24576 (SDM vol. 1 8.5.4, 8.5.5).
pub fn round(u: Unp, sticky: bool, fmt: Fmt, fcw: u16, biased: bool) -> Rounded {
    let rc = (fcw >> 10) & 3;
    let sig0 = u.sig | sticky as u128;
    // Rounded with an unbounded exponent: tininess (SDM vol. 1 4.9.1.5).
    let (s1, inexact1, carry1) = round_sig(u.sign, sig0, fmt.prec, rc);
    let (s1, e1) = if carry1 {
        (1u128 << 127, u.exp + 1)
    } else {
        (s1, u.exp)
    };
    let mut flags = 0;
    if e1 < fmt.emin {
        // Tiny.
        if fcw & UE == 0 && biased {
            let exp = e1 + 24576;
            return Rounded {
                sign: u.sign,
                exp,
                sig: (s1 >> 64) as u64,
                flags: UE | if inexact1 { PE } else { 0 },
                up: carry1 || (s1 >> 64) as u64 > (u.sig >> 64) as u64,
            };
        }
        let d = shr_sticky(sig0, (fmt.emin - u.exp).min(200) as u32);
        let (s2, inexact2, _) = round_sig(u.sign, d, fmt.prec, rc);
        if inexact2 {
            flags |= PE | UE;
        } else if fcw & UE == 0 {
            flags |= UE;
        }
        let up = inexact2 && (s2 >> 64) as u64 > (d >> 64) as u64;
        return Rounded {
            sign: u.sign,
            exp: fmt.emin,
            sig: (s2 >> 64) as u64,
            flags,
            up,
        };
    }
    let up = inexact1 && (carry1 || (s1 >> 64) as u64 > (sig0 >> 64) as u64);
    if inexact1 {
        flags |= PE;
    }
    if e1 > fmt.emax {
        flags |= OE | PE;
        if fcw & OE == 0 && biased {
            return Rounded {
                sign: u.sign,
                exp: e1 - 24576,
                sig: (s1 >> 64) as u64,
                flags,
                up,
            };
        }
        // Masked: infinity or the largest finite value (SDM Table 4-10).
        let to_inf = match rc {
            0 => true,
            1 => u.sign,
            2 => !u.sign,
            _ => false,
        };
        if to_inf {
            return Rounded {
                sign: u.sign,
                exp: 0x7fff,
                sig: 1 << 63,
                flags,
                up: true,
            };
        }
        let max = !0u64 << (64 - fmt.prec);
        return Rounded {
            sign: u.sign,
            exp: fmt.emax,
            sig: max,
            flags,
            up: false,
        };
    }
    Rounded {
        sign: u.sign,
        exp: e1,
        sig: (s1 >> 64) as u64,
        flags,
        up,
    }
}

impl Rounded {
    /// As an 80-bit value (a result in the extended range).
    pub fn f80(self) -> F80 {
        let exp = if self.sig >> 63 == 0 { 0 } else { self.exp };
        F80 {
            se: (self.sign as u16) << 15 | (exp as u16 & 0x7fff),
            sig: self.sig,
        }
    }

    /// As an IEEE value with `frac` fraction bits and `ebits` exponent bits
    /// (`self` rounded into that format).
    pub fn ieee(self, frac: u32, ebits: u32) -> u64 {
        let s = (self.sign as u64) << (frac + ebits);
        let bias = (1i32 << (ebits - 1)) - 1;
        let emax = (1u64 << ebits) - 1;
        if self.exp == 0x7fff {
            return s | emax << frac;
        }
        let f = (self.sig >> (63 - frac)) & ((1u64 << frac) - 1);
        if self.sig >> 63 == 0 {
            return s | f;
        }
        s | ((self.exp - BIAS + bias) as u64) << frac | f
    }
}

/// The NaN result of an operation with NaN operands (SDM vol. 1 Table
/// 4-7): an SNaN is quieted; of two NaNs the one with the larger
/// significand (an SNaN with a QNaN: the QNaN). IE for an SNaN.
pub fn nan_result(a: F80, b: Option<F80>) -> (F80, u16) {
    let snan = |x: F80| x.class() == Class::SNan;
    let flags = if snan(a) || b.is_some_and(snan) {
        IE
    } else {
        0
    };
    let r = match b {
        Some(b) if b.is_nan() && a.is_nan() => {
            if snan(a) && !snan(b) {
                b
            } else if snan(b) && !snan(a) {
                a
            } else if (b.sig << 1) > (a.sig << 1) || ((b.sig << 1) == (a.sig << 1) && !b.sign()) {
                b
            } else {
                a
            }
        }
        Some(b) if b.is_nan() => b,
        _ => a,
    };
    (r.quiet(), flags)
}

/// The outcome of an arithmetic operation before rounding.
pub enum Exact {
    /// A special result (exact): NaN, infinity, zero, or the indefinite.
    Val(F80, u16),
    /// A finite non-zero value with a sticky bit, and the flags so far.
    Num(Unp, bool, u16),
}

/// Pre-computation checks common to two-operand arithmetic: NaNs,
/// unsupported formats (IE, indefinite), denormal operands (DE).
fn pre2(a: F80, b: F80) -> Result<u16, (F80, u16)> {
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Unsupported || cb == Class::Unsupported {
        return Err((INDEFINITE, IE));
    }
    if a.is_nan() || b.is_nan() {
        return Err(nan_result(a, Some(b)));
    }
    Ok(if ca == Class::Denormal || cb == Class::Denormal {
        DE
    } else {
        0
    })
}

/// a + b (or a - b with `sub`): exact.
pub fn add(a: F80, b: F80, sub: bool, rc: u16) -> Exact {
    let de = match pre2(a, b) {
        Ok(f) => f,
        Err((v, f)) => return Exact::Val(v, f),
    };
    let b = if sub { b.neg() } else { b };
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Inf || cb == Class::Inf {
        if ca == Class::Inf && cb == Class::Inf && a.sign() != b.sign() {
            return Exact::Val(INDEFINITE, IE | de);
        }
        return Exact::Val(if ca == Class::Inf { a } else { b }, de);
    }
    if ca == Class::Zero && cb == Class::Zero {
        let sign = if a.sign() == b.sign() {
            a.sign()
        } else {
            rc & 3 == 1
        };
        return Exact::Val(F80::zero(sign), de);
    }
    if ca == Class::Zero {
        return Exact::Num(b.unpack(), false, de);
    }
    if cb == Class::Zero {
        return Exact::Num(a.unpack(), false, de);
    }
    let (x, y) = (a.unpack(), b.unpack());
    let (x, y) = if (x.exp, x.sig) >= (y.exp, y.sig) {
        (x, y)
    } else {
        (y, x)
    };
    // Work with one guard bit of headroom: significands at bit 126.
    let d = (x.exp - y.exp) as u32;
    let xs = x.sig >> 1;
    let ys_full = y.sig >> 1;
    let ys = shr_sticky(ys_full, d);
    let (mut sig, mut exp) = if x.sign == y.sign {
        (xs + ys, x.exp + 1)
    } else {
        (xs - ys, x.exp + 1)
    };
    if sig == 0 {
        return Exact::Val(F80::zero(rc & 3 == 1), de);
    }
    let lz = sig.leading_zeros();
    // A shift left beyond the guard bits happens only when d <= 1 (exact).
    sig <<= lz;
    exp -= lz as i32;
    Exact::Num(
        Unp {
            sign: x.sign,
            exp,
            sig,
        },
        false,
        de,
    )
}

pub fn mul(a: F80, b: F80) -> Exact {
    let de = match pre2(a, b) {
        Ok(f) => f,
        Err((v, f)) => return Exact::Val(v, f),
    };
    let sign = a.sign() != b.sign();
    let (ca, cb) = (a.class(), b.class());
    if ca == Class::Inf || cb == Class::Inf {
        if ca == Class::Zero || cb == Class::Zero {
            return Exact::Val(INDEFINITE, IE | de);
        }
        return Exact::Val(F80::inf(sign), de);
    }
    if ca == Class::Zero || cb == Class::Zero {
        return Exact::Val(F80::zero(sign), de);
    }
    let (x, y) = (a.unpack(), b.unpack());
    let p = (x.sig >> 64) * (y.sig >> 64);
    let lz = p.leading_zeros();
    Exact::Num(
        Unp {
            sign,
            exp: x.exp + y.exp - BIAS + 1 - lz as i32,
            sig: p << lz,
        },
        false,
        de,
    )
}

pub fn div(a: F80, b: F80) -> Exact {
    let de = match pre2(a, b) {
        Ok(f) => f,
        Err((v, f)) => return Exact::Val(v, f),
    };
    let sign = a.sign() != b.sign();
    let (ca, cb) = (a.class(), b.class());
    match (ca, cb) {
        (Class::Inf, Class::Inf) | (Class::Zero, Class::Zero) => {
            return Exact::Val(INDEFINITE, IE | de)
        }
        (Class::Inf, _) => return Exact::Val(F80::inf(sign), de),
        (_, Class::Inf) | (Class::Zero, _) => return Exact::Val(F80::zero(sign), de),
        // #Z ranks above #D (SDM vol. 1 4.9.2): a denormal dividend
        // gives ZE alone.
        (_, Class::Zero) => return Exact::Val(F80::inf(sign), ZE),
        _ => {}
    }
    let (x, y) = (a.unpack(), b.unpack());
    let (n, d) = ((x.sig >> 64) as u64, (y.sig >> 64) as u64);
    let mut exp = x.exp - y.exp + BIAS;
    // n / d in [1/2, 2): make the quotient's integer bit bit 127.
    let top = if n >= d {
        (n as u128) << 63
    } else {
        exp -= 1;
        (n as u128) << 64
    };
    let q1 = top / d as u128;
    let r1 = top % d as u128;
    let q2 = (r1 << 64) / d as u128;
    let r2 = (r1 << 64) % d as u128;
    Exact::Num(
        Unp {
            sign,
            exp,
            sig: q1 << 64 | q2,
        },
        r2 != 0,
        de,
    )
}

pub fn sqrt(a: F80) -> Exact {
    match a.class() {
        Class::Unsupported => return Exact::Val(INDEFINITE, IE),
        Class::QNan | Class::SNan => {
            let (v, f) = nan_result(a, None);
            return Exact::Val(v, f);
        }
        Class::Zero => return Exact::Val(a, 0),
        _ if a.sign() => return Exact::Val(INDEFINITE, IE),
        Class::Inf => return Exact::Val(a, 0),
        _ => {}
    }
    let de = if a.class() == Class::Denormal { DE } else { 0 };
    let x = a.unpack();
    // value = M * 2^E with M = sig / 2^127 in [1, 2). The radicand R =
    // M' * 2^130 with M' = M (E even) or 2M (E odd), so that the integer
    // root of R is sqrt(M') * 2^65 in [2^65, 2^66): 66 bits, the
    // remainder gives the sticky bit.
    let e = x.exp - BIAS;
    let s = if e & 1 == 0 { 3 } else { 4 };
    let bit = |j: i32| -> u128 {
        let k = j - s;
        if (0..128).contains(&k) {
            (x.sig >> k) & 1
        } else {
            0
        }
    };
    let (mut rem, mut root) = (0u128, 0u128);
    for k in 0..66 {
        let pair = bit(131 - 2 * k) << 1 | bit(130 - 2 * k);
        rem = rem << 2 | pair;
        let trial = root << 2 | 1;
        if rem >= trial {
            rem -= trial;
            root = root << 1 | 1;
        } else {
            root <<= 1;
        }
    }
    let e2 = if e & 1 == 0 { e } else { e - 1 };
    Exact::Num(
        Unp {
            sign: false,
            exp: BIAS + e2 / 2,
            sig: root << 62,
        },
        rem != 0,
        de,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: F80 = F80 {
        se: 0x3fff,
        sig: 1 << 63,
    };
    const THREE: F80 = F80 {
        se: 0x4000,
        sig: 0xc000_0000_0000_0000,
    };

    fn rounded(e: Exact, fmt: Fmt, fcw: u16) -> (F80, u16, bool) {
        match e {
            Exact::Val(v, f) => (v, f, false),
            Exact::Num(u, s, f) => {
                let r = round(u, s, fmt, fcw, true);
                (r.f80(), f | r.flags, r.up)
            }
        }
    }

    /// 1/3 under each precision control (SDM vol. 1 8.1.5.2) and rounding
    /// control (4.8.4): the significand is rounded at 24, 53 or 64 bits.
    #[test]
    fn precision_and_rounding_control() {
        let q = |fcw| rounded(div(ONE, THREE), pc_fmt(fcw), fcw);
        assert_eq!(q(0x037f).0.sig, 0xaaaa_aaaa_aaaa_aaab);
        assert_eq!(q(0x027f).0.sig, 0xaaaa_aaaa_aaaa_a800);
        assert_eq!(q(0x007f).0.sig, 0xaaaa_ab00_0000_0000);
        assert_eq!(q(0x037f).0.se, 0x3ffd);
        let (v, f, up) = q(0x037f);
        assert_eq!((f, up), (PE, true), "{v:?}: inexact, rounded up (C1)");
        // Down and toward zero truncate; up rounds up.
        assert_eq!(q(0x077f).0.sig, 0xaaaa_aaaa_aaaa_aaaa);
        assert_eq!(q(0x0f7f).0.sig, 0xaaaa_aaaa_aaaa_aaaa);
        assert_eq!(q(0x0b7f).0.sig, 0xaaaa_aaaa_aaaa_aaab);
        // -1/3 rounded down grows in magnitude.
        let (v, _, up) = rounded(div(ONE.neg(), THREE), EXT, 0x077f);
        assert_eq!((v.se, v.sig, up), (0xbffd, 0xaaaa_aaaa_aaaa_aaab, true));
        // Exact: no PE.
        let (v, f, _) = rounded(add(ONE, ONE, false, 0), EXT, 0x037f);
        assert_eq!((v.se, v.sig, f), (0x4000, 1 << 63, 0));
        // 1 - 1 is +0, but -0 when rounding down (4.8.3.4... IEEE 754).
        assert_eq!(
            rounded(add(ONE, ONE, true, 0), EXT, 0x37f).0,
            F80::zero(false)
        );
        assert_eq!(
            rounded(add(ONE, ONE, true, 1), EXT, 0x77f).0,
            F80::zero(true)
        );
    }

    #[test]
    fn square_root() {
        let two = F80 {
            se: 0x4000,
            sig: 1 << 63,
        };
        let (v, f, _) = rounded(sqrt(two), EXT, 0x37f);
        assert_eq!((v.se, v.sig, f), (0x3fff, 0xb504_f333_f9de_6484, PE));
        let (v, _, _) = rounded(sqrt(two), pc_fmt(0x27f), 0x27f);
        assert_eq!(v.sig, 0xb504_f333_f9de_6800);
        // sqrt(9) = 3 exactly; sqrt(-1): invalid, the indefinite.
        let nine = F80 {
            se: 0x4002,
            sig: 0x9000_0000_0000_0000,
        };
        assert_eq!(rounded(sqrt(nine), EXT, 0x37f), (THREE, 0, false));
        assert_eq!(rounded(sqrt(ONE.neg()), EXT, 0x37f).0, INDEFINITE);
    }

    /// Masked responses (SDM vol. 1 8.5): invalid operations give the
    /// indefinite, division by zero an infinity, overflow per Table 4-10,
    /// underflow a denormal with UE only if inexact.
    #[test]
    fn exceptions_and_masked_responses() {
        let inf = F80::inf(false);
        assert_eq!(rounded(add(inf, inf, true, 0), EXT, 0x37f).0, INDEFINITE);
        assert_eq!(rounded(mul(inf, F80::ZERO), EXT, 0x37f).1, IE);
        assert_eq!(rounded(div(F80::ZERO, F80::ZERO), EXT, 0x37f).1, IE);
        assert_eq!(rounded(div(ONE, F80::ZERO), EXT, 0x37f), (inf, ZE, false));
        let max = F80 {
            se: 0x7ffe,
            sig: u64::MAX,
        };
        let (v, f, up) = rounded(add(max, max, false, 0), EXT, 0x37f);
        assert_eq!((v, f, up), (inf, OE | PE, true));
        // Toward zero: the largest finite value.
        let (v, f, _) = rounded(add(max, max, false, 3), EXT, 0xf7f);
        assert_eq!((v, f), (max, OE | PE));
        // Unmasked overflow, register destination: exponent - 24576.
        let (v, f, _) = rounded(add(max, max, false, 0), EXT, 0x377);
        assert_eq!((v.se, f & OE), (0x7fff - 24576, OE));
        let min = F80 {
            se: 1,
            sig: 1 << 63,
        };
        // min / 2: a denormal, exact, so no UE when masked.
        let two = F80 {
            se: 0x4000,
            sig: 1 << 63,
        };
        let (v, f, _) = rounded(div(min, two), EXT, 0x37f);
        assert_eq!((v.se, v.sig, f), (0, 1 << 62, 0));
        // min / 3: tiny and inexact.
        let (v, f, _) = rounded(div(min, THREE), EXT, 0x37f);
        assert_eq!((v.se, v.sig, f), (0, 0x2aaa_aaaa_aaaa_aaab, UE | PE));
        // A denormal operand: DE.
        let den = F80 { se: 0, sig: 1 };
        assert_eq!(rounded(add(den, ONE, false, 0), EXT, 0x37f).1, DE | PE);
        // NaNs: the larger significand, quieted; SNaN gives IE.
        let q = F80 {
            se: 0x7fff,
            sig: 0xc000_0000_0000_0001,
        };
        let s = F80 {
            se: 0xffff,
            sig: 0x8000_0000_0000_0002,
        };
        let (v, f, _) = rounded(add(q, s, false, 0), EXT, 0x37f);
        assert_eq!((v, f), (q, IE), "SNaN and QNaN: the QNaN");
        let (v, f, _) = rounded(mul(s, ONE), EXT, 0x37f);
        assert_eq!((v, f), (s.quiet(), IE));
    }

    #[test]
    fn conversions() {
        // binary64 denormal 2^-1074, exactly; binary32 1.5.
        let (v, f) = F80::from_ieee(1, 52, 11);
        assert_eq!((v.se, v.sig, f), ((BIAS - 1074) as u16, 1 << 63, DE));
        let (v, f) = F80::from_ieee(0x3fc0_0000, 23, 8);
        assert_eq!((v.se, v.sig, f), (0x3fff, 0xc000_0000_0000_0000, 0));
        // 1/3 stored as binary32 per RC: nearest 0x3eaaaaab, chop 0x3eaaaaaa.
        let third = F80 {
            se: 0x3ffd,
            sig: 0xaaaa_aaaa_aaaa_aaab,
        };
        let r = round(third.unpack(), false, SINGLE, 0x37f, false);
        assert_eq!(r.ieee(23, 8), 0x3eaa_aaab);
        let r = round(third.unpack(), false, SINGLE, 0xf7f, false);
        assert_eq!(r.ieee(23, 8), 0x3eaa_aaaa);
        // Too small for binary32: a denormal, UE and PE.
        let tiny = F80 {
            se: (BIAS - 140) as u16,
            sig: 0xc000_0000_0000_0001,
        };
        let r = round(tiny.unpack(), false, SINGLE, 0x37f, false);
        assert_eq!((r.ieee(23, 8), r.flags), (0x300, UE | PE));
        assert_eq!(F80::from_i64(-3), THREE.neg());
    }
}
