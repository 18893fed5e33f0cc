//! Integer arithmetic with exact flags. Every function takes operands already
//! truncated to `sz` bytes and returns (result, arithmetic flags).

use arch::rflags::*;

#[inline(always)]
pub(crate) fn mask(sz: usize) -> u64 {
    if sz >= 8 {
        !0
    } else {
        (1u64 << (sz * 8)) - 1
    }
}

#[inline(always)]
pub(crate) fn sign_bit(sz: usize) -> u64 {
    1u64 << (sz * 8 - 1)
}

/// Sign-extends the low `sz` bytes of `v`.
#[inline(always)]
pub(crate) fn sext(v: u64, sz: usize) -> u64 {
    let sh = 64 - sz * 8;
    (((v << sh) as i64) >> sh) as u64
}

static PARITY: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = if (i as u8).count_ones().is_multiple_of(2) {
            PF as u8
        } else {
            0
        };
        i += 1;
    }
    t
};

/// ZF, SF and PF of a result.
#[inline(always)]
pub(crate) fn szp(r: u64, sz: usize) -> u64 {
    let mut f = PARITY[(r & 0xff) as usize] as u64;
    if r == 0 {
        f |= ZF;
    }
    if r & sign_bit(sz) != 0 {
        f |= SF;
    }
    f
}

/// The two-operand ALU operations by their ModRM /reg number (ADD 0, OR 1,
/// ADC 2, SBB 3, AND 4, SUB 5, XOR 6, CMP 7) and TEST as 8; `cf` is the
/// carry ADC and SBB take in.
#[inline(always)]
pub(crate) fn binary(op: u8, a: u64, b: u64, cf: bool, sz: usize) -> (u64, u64) {
    match op {
        0 => add(a, b, false, sz),
        1 => logic(a | b, sz),
        2 => add(a, b, cf, sz),
        3 => sub(a, b, cf, sz),
        4 | 8 => logic(a & b, sz),
        5 | 7 => sub(a, b, false, sz),
        _ => logic(a ^ b, sz),
    }
}

/// The condition `cc` (an iced `ConditionCode as u8`) on the flags `f`.
#[inline(always)]
pub(crate) fn condition(f: u64, cc: u8) -> bool {
    use iced_x86::ConditionCode as C;
    let b = |x: u64| f & x != 0;
    const O: u8 = C::o as u8;
    const NO: u8 = C::no as u8;
    const B: u8 = C::b as u8;
    const AE: u8 = C::ae as u8;
    const E: u8 = C::e as u8;
    const NE: u8 = C::ne as u8;
    const BE: u8 = C::be as u8;
    const A: u8 = C::a as u8;
    const S: u8 = C::s as u8;
    const NS: u8 = C::ns as u8;
    const P: u8 = C::p as u8;
    const NP: u8 = C::np as u8;
    const L: u8 = C::l as u8;
    const GE: u8 = C::ge as u8;
    const LE: u8 = C::le as u8;
    const G: u8 = C::g as u8;
    match cc {
        O => b(OF),
        NO => !b(OF),
        B => b(CF),
        AE => !b(CF),
        E => b(ZF),
        NE => !b(ZF),
        BE => b(CF) || b(ZF),
        A => !b(CF) && !b(ZF),
        S => b(SF),
        NS => !b(SF),
        P => b(PF),
        NP => !b(PF),
        L => b(SF) != b(OF),
        GE => b(SF) == b(OF),
        LE => b(ZF) || b(SF) != b(OF),
        G => !b(ZF) && b(SF) == b(OF),
        _ => true,
    }
}

/// The truncated signed product of the two- and three-operand IMUL:
/// CF and OF when it does not fit.
#[inline(always)]
pub(crate) fn imul(a: u64, b: u64, sz: usize) -> (u64, u64) {
    let p = (sext(a, sz) as i64 as i128) * (sext(b, sz) as i64 as i128);
    let r = (p as u64) & mask(sz);
    let mut f = szp(r, sz);
    if sext(r, sz) as i64 as i128 != p {
        f |= CF | OF;
    }
    (r, f)
}

#[inline(always)]
pub(crate) fn add(a: u64, b: u64, carry: bool, sz: usize) -> (u64, u64) {
    let m = mask(sz);
    let r = a.wrapping_add(b).wrapping_add(carry as u64) & m;
    let cf = if carry { r <= a } else { r < a };
    let mut f = szp(r, sz) | ((a ^ b ^ r) & AF);
    if cf {
        f |= CF;
    }
    if (a ^ r) & (b ^ r) & sign_bit(sz) != 0 {
        f |= OF;
    }
    (r, f)
}

#[inline(always)]
pub(crate) fn sub(a: u64, b: u64, borrow: bool, sz: usize) -> (u64, u64) {
    let m = mask(sz);
    let r = a.wrapping_sub(b).wrapping_sub(borrow as u64) & m;
    let cf = if borrow { a <= b } else { a < b };
    let mut f = szp(r, sz) | ((a ^ b ^ r) & AF);
    if cf {
        f |= CF;
    }
    if (a ^ b) & (a ^ r) & sign_bit(sz) != 0 {
        f |= OF;
    }
    (r, f)
}

#[inline(always)]
pub(crate) fn logic(r: u64, sz: usize) -> (u64, u64) {
    (r, szp(r, sz))
}

/// Shifts and rotates. `op`: 0 ROL, 1 ROR, 2 RCL, 3 RCR, 4 SHL, 5 SHR, 7 SAR.
/// `count` is already masked (to 5 or 6 bits) and non-zero. Returns the
/// result and the new full arithmetic flags given the old ones.
pub(crate) fn shift(op: u8, a: u64, count: u32, sz: usize, old: u64) -> (u64, u64) {
    let bits = (sz * 8) as u32;
    let m = mask(sz);
    let msb = |v: u64| (v >> (bits - 1)) & 1;
    let mut f = old & ARITH;
    let set = |f: &mut u64, bit: u64, on: bool| {
        if on {
            *f |= bit
        } else {
            *f &= !bit
        }
    };
    match op {
        0 => {
            let c = count % bits;
            let r = if c == 0 {
                a
            } else {
                ((a << c) | (a >> (bits - c))) & m
            };
            set(&mut f, CF, r & 1 != 0);
            set(&mut f, OF, (msb(r) ^ (r & 1)) != 0);
            (r, f)
        }
        1 => {
            let c = count % bits;
            let r = if c == 0 {
                a
            } else {
                ((a >> c) | (a << (bits - c))) & m
            };
            set(&mut f, CF, msb(r) != 0);
            set(&mut f, OF, (msb(r) ^ ((r >> (bits - 2)) & 1)) != 0);
            (r, f)
        }
        2 | 3 => {
            let c = count % (bits + 1);
            let mut r = a;
            let mut cf = old & CF != 0;
            for _ in 0..c {
                if op == 2 {
                    let out = msb(r) != 0;
                    r = ((r << 1) | cf as u64) & m;
                    cf = out;
                } else {
                    let out = r & 1 != 0;
                    r = (r >> 1) | ((cf as u64) << (bits - 1));
                    cf = out;
                }
            }
            set(&mut f, CF, cf);
            if op == 2 {
                set(&mut f, OF, (msb(r) != 0) ^ cf);
            } else {
                set(&mut f, OF, (msb(r) ^ ((r >> (bits - 2)) & 1)) != 0);
            }
            (r, f)
        }
        4 | 6 => {
            let wide = (a as u128) << count;
            let r = (wide as u64) & m;
            let cf = (wide >> bits) & 1 != 0;
            f = szp(r, sz);
            set(&mut f, CF, cf);
            set(&mut f, OF, (msb(r) != 0) ^ cf);
            (r, f)
        }
        5 => {
            let r = if count >= 64 { 0 } else { a >> count };
            let cf = if count > bits {
                false
            } else {
                (a >> (count - 1)) & 1 != 0
            };
            f = szp(r, sz);
            set(&mut f, CF, cf);
            set(&mut f, OF, msb(a) != 0);
            (r, f)
        }
        _ => {
            let s = sext(a, sz) as i64;
            let r = (s >> count.min(63)) as u64 & m;
            let cf = (s >> (count - 1).min(63)) & 1 != 0;
            f = szp(r, sz);
            set(&mut f, CF, cf);
            (r, f)
        }
    }
}

/// SHLD/SHRD: shifts `a` by `count` (masked, non-zero), filling from `b`.
pub(crate) fn shld(left: bool, a: u64, b: u64, count: u32, sz: usize, old: u64) -> (u64, u64) {
    let bits = (sz * 8) as u32;
    let m = mask(sz);
    let (r, cf) = if left {
        // (a:b) << count, take the high part.
        let wide = ((a as u128) << bits) | b as u128;
        let sh = wide << count;
        let r = ((sh >> bits) as u64) & m;
        let cf = if count <= bits {
            (a >> (bits - count)) & 1 != 0
        } else {
            (b >> (2 * bits - count)) & 1 != 0
        };
        (r, cf)
    } else {
        let wide = ((b as u128) << bits) | a as u128;
        let r = ((wide >> count) as u64) & m;
        let cf = ((wide >> (count - 1)) & 1) != 0;
        (r, cf)
    };
    let mut f = szp(r, sz) | (old & AF);
    if cf {
        f |= CF;
    }
    if ((r ^ a) >> (bits - 1)) & 1 != 0 {
        f |= OF;
    }
    (r, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sub_flags() {
        let (r, f) = add(0xff, 1, false, 1);
        assert_eq!(r, 0);
        assert_eq!(f & (CF | ZF | AF | OF), CF | ZF | AF);
        let (r, f) = add(0x7f, 1, false, 1);
        assert_eq!(r, 0x80);
        assert_eq!(f & (CF | OF | SF), OF | SF);
        let (r, f) = add(u64::MAX, 0x20, false, 8);
        assert_eq!(r, 0x1f);
        assert_ne!(f & CF, 0);
        let (r, f) = sub(0, 1, false, 4);
        assert_eq!(r, 0xffff_ffff);
        assert_eq!(f & (CF | SF | OF), CF | SF);
        let (_, f) = sub(0x80, 1, false, 1);
        assert_eq!(f & OF, OF);
        let (r, f) = add(5, 5, true, 2);
        assert_eq!((r, f & CF), (11, 0));
        let (r, f) = sub(5, 5, true, 2);
        assert_eq!((r, f & CF), (0xffff, CF));
    }

    #[test]
    fn shifts() {
        assert_eq!(shift(4, 0x81, 1, 1, 0), (0x02, CF | OF));
        let (r, f) = shift(5, 0x81, 1, 1, 0);
        assert_eq!(r, 0x40);
        assert_eq!(f & (CF | OF), CF | OF);
        let (r, f) = shift(7, 0x81, 1, 1, 0);
        assert_eq!(r, 0xc0);
        assert_eq!(f & (CF | OF), CF);
        assert_eq!(shift(0, 0x81, 1, 1, 0).0, 0x03);
        assert_eq!(shift(1, 0x81, 1, 1, 0).0, 0xc0);
        assert_eq!(shift(2, 0x80, 1, 1, CF).0, 0x01);
        assert_eq!(shift(3, 0x01, 1, 1, CF).0, 0x80);
        assert_eq!(shift(4, 1, 63, 8, 0).0, 1 << 63);
        assert_eq!(shld(true, 0x1234, 0xabcd, 4, 2, 0).0, 0x234a);
        assert_eq!(shld(false, 0x1234, 0xabcd, 4, 2, 0).0, 0xd123);
    }
}
