//! SSE/SSE2 integer and shuffle instructions on XMM registers: the packed
//! arithmetic, comparisons, shifts, shuffles, unpacks and packs that compiled
//! C libraries use (glibc's SSE2 string functions, for one). The MMX forms
//! use the same operations (mmx.rs).

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use crate::{Cpu, R};

/// Lane `k` of `w` bytes of `v`.
#[inline]
fn lane(v: u128, w: usize, k: usize) -> u64 {
    ((v >> (k * w * 8)) & lane_mask(w)) as u64
}

#[inline]
fn lane_mask(w: usize) -> u128 {
    (1u128 << (w * 8)) - 1
}

/// Sign-extends a `w`-byte lane.
#[inline]
fn sx(v: u64, w: usize) -> i64 {
    let sh = 64 - w * 8;
    ((v << sh) as i64) >> sh
}

/// `f` over each pair of `w`-byte lanes of `a` and `b`.
pub(crate) fn map(a: u128, b: u128, w: usize, f: impl Fn(u64, u64) -> u64) -> u128 {
    let mut r = 0u128;
    for k in 0..16 / w {
        r |= ((f(lane(a, w, k), lane(b, w, k)) as u128) & lane_mask(w)) << (k * w * 8);
    }
    r
}

/// All ones in each `w`-byte lane where `a` and `b` are equal (PCMPEQ).
pub(crate) fn pcmpeq(a: u128, b: u128, w: usize) -> u128 {
    map(a, b, w, |x, y| 0u64.wrapping_sub((x == y) as u64))
}

/// Saturates `v` to a signed `w`-byte lane.
fn sat_s(v: i64, w: usize) -> u64 {
    let max = (1i64 << (w * 8 - 1)) - 1;
    v.clamp(-max - 1, max) as u64
}

/// Saturates `v` to an unsigned `w`-byte lane.
fn sat_u(v: i64, w: usize) -> u64 {
    v.clamp(0, (1i64 << (w * 8)) - 1) as u64
}

/// Interleaves the low (or high) halves' `w`-byte lanes of `a` and `b`.
pub(crate) fn unpack(a: u128, b: u128, w: usize, high: bool) -> u128 {
    let n = 8 / w;
    let base = if high { n } else { 0 };
    let mut r = 0u128;
    for k in 0..n {
        r |= (lane(a, w, base + k) as u128) << (2 * k * w * 8);
        r |= (lane(b, w, base + k) as u128) << ((2 * k + 1) * w * 8);
    }
    r
}

/// Packs the `w`-byte signed lanes of `a` then `b` into lanes of `w / 2`
/// bytes, with signed (or unsigned) saturation.
fn pack(a: u128, b: u128, w: usize, unsigned: bool) -> u128 {
    let n = 16 / w;
    let h = w / 2;
    let mut r = 0u128;
    for (k, v) in (0..n)
        .map(|k| lane(a, w, k))
        .chain((0..n).map(|k| lane(b, w, k)))
        .enumerate()
    {
        let s = sx(v, w);
        let p = if unsigned { sat_u(s, h) } else { sat_s(s, h) };
        r |= ((p as u128) & lane_mask(h)) << (k * h * 8);
    }
    r
}

/// Shifts each `w`-byte lane by `count` (left, logical right or arithmetic
/// right).
fn shift(a: u128, w: usize, count: u64, kind: u8) -> u128 {
    let bits = (w * 8) as u64;
    map(a, 0, w, |x, _| match kind {
        0 if count < bits => x << count,
        1 if count < bits => x >> count,
        2 => (sx(x, w) >> count.min(bits - 1)) as u64,
        _ => 0,
    })
}

/// PSLL, PSRL and PSRA of words, doublewords and quadwords.
fn lane_shift(m: M) -> bool {
    matches!(
        m,
        M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad
    )
}

impl Cpu {
    /// The SSE/SSE2 integer and shuffle instructions; `None` if `i` is not
    /// one (or is an MMX form).
    pub(crate) fn exec_sse_int(&mut self, i: &Instruction) -> Option<R<()>> {
        let m = i.mnemonic();
        let xmm0 = i.op0_kind() == OpKind::Register && i.op0_register().is_xmm();
        let xmm1 =
            i.op_count() > 1 && i.op1_kind() == OpKind::Register && i.op1_register().is_xmm();
        let mem1 = i.op_count() > 1 && i.op1_kind() == OpKind::Memory;
        // Two-operand forms: XMM destination, XMM or memory source.
        if xmm0 && (xmm1 || mem1) {
            let r = self.sse_binary(i, m);
            if r.is_some() {
                return r;
            }
        }
        Some(match m {
            M::Pextrw if xmm1 && i.op0_kind() == OpKind::Register => (|| {
                self.sse_check()?;
                let v = self.xmm_reg(i.op1_register());
                let w = lane(v, 2, (i.immediate(2) & 7) as usize);
                self.set_reg(i.op0_register(), w);
                Ok(())
            })(),
            M::Pinsrw if xmm0 => (|| {
                self.sse_check()?;
                let src = if i.op1_kind() == OpKind::Register {
                    self.reg(i.op1_register()) & 0xffff
                } else {
                    let l = self.mem_lin(i)?;
                    self.rd(l, 2)?
                };
                let k = (i.immediate(2) & 7) as usize * 16;
                let d = self.xmm_reg(i.op0_register());
                let v = (d & !(0xffffu128 << k)) | ((src as u128) << k);
                self.set_xmm_reg(i.op0_register(), v);
                Ok(())
            })(),
            M::Movmskps | M::Movmskpd if xmm1 => (|| {
                self.sse_check()?;
                let v = self.xmm_reg(i.op1_register());
                let w = if m == M::Movmskps { 4 } else { 8 };
                let mut r = 0u64;
                for k in 0..16 / w {
                    r |= ((v >> ((k + 1) * w * 8 - 1)) as u64 & 1) << k;
                }
                self.set_reg(i.op0_register(), r);
                Ok(())
            })(),
            _ if (lane_shift(m) || matches!(m, M::Pslldq | M::Psrldq))
                && xmm0
                && i.op_count() == 2
                && i.op1_kind() == OpKind::Immediate8 =>
            {
                (|| {
                    self.sse_check()?;
                    let a = self.xmm_reg(i.op0_register());
                    let c = i.immediate(1) & 0xff;
                    let v = Self::sse_shift(m, a, c);
                    self.set_xmm_reg(i.op0_register(), v);
                    Ok(())
                })()
            }
            M::Movhlps | M::Movlhps if xmm0 && xmm1 => (|| {
                self.sse_check()?;
                let a = self.xmm_reg(i.op0_register());
                let b = self.xmm_reg(i.op1_register());
                let v = if m == M::Movhlps {
                    (a & !(u64::MAX as u128)) | (b >> 64)
                } else {
                    (a & u64::MAX as u128) | (b << 64)
                };
                self.set_xmm_reg(i.op0_register(), v);
                Ok(())
            })(),
            M::Movhps | M::Movhpd | M::Movlps | M::Movlpd => (|| {
                self.sse_check()?;
                let high = matches!(m, M::Movhps | M::Movhpd);
                let sh = if high { 64 } else { 0 };
                if xmm0 && mem1 {
                    let l = self.mem_lin(i)?;
                    let q = self.rd(l, 8)? as u128;
                    let a = self.xmm_reg(i.op0_register());
                    let v = (a & !((u64::MAX as u128) << sh)) | (q << sh);
                    self.set_xmm_reg(i.op0_register(), v);
                    Ok(())
                } else if xmm1 && i.op0_kind() == OpKind::Memory {
                    let q = (self.xmm_reg(i.op1_register()) >> sh) as u64;
                    let l = self.mem_lin(i)?;
                    self.wr(l, 8, q)
                } else {
                    self.unknown(i)
                }
            })(),
            _ => return None,
        })
    }

    /// Packed shifts by a count.
    pub(crate) fn sse_shift(m: M, a: u128, c: u64) -> u128 {
        match m {
            M::Psllw => shift(a, 2, c, 0),
            M::Pslld => shift(a, 4, c, 0),
            M::Psllq => shift(a, 8, c, 0),
            M::Psrlw => shift(a, 2, c, 1),
            M::Psrld => shift(a, 4, c, 1),
            M::Psrlq => shift(a, 8, c, 1),
            M::Psraw => shift(a, 2, c, 2),
            M::Psrad => shift(a, 4, c, 2),
            M::Pslldq if c < 16 => a << (c * 8),
            M::Psrldq if c < 16 => a >> (c * 8),
            _ => 0,
        }
    }

    /// XMM op= XMM/m128 forms (with an immediate for the shuffles).
    fn sse_binary(&mut self, i: &Instruction, m: M) -> Option<R<()>> {
        if lane_shift(m) {
            return Some(self.sse_shift_by_xmm(i, m));
        }
        let op = int_op(m)?;
        Some((|| {
            self.sse_check()?;
            // The SSE2 forms of all of these take an aligned m128.
            let b = self.read_xmm_op(i, 1, true)?;
            let a = self.xmm_reg(i.op0_register());
            let imm = if i.op_count() > 2 {
                i.immediate(2) as u8
            } else {
                0
            };
            self.set_xmm_reg(i.op0_register(), op(a, b, imm));
            Ok(())
        })())
    }
}

/// The integer, logic and shuffle operations on XMM registers, by
/// mnemonic: `f(destination, source, immediate)`. MMX forms use the same on
/// zero-extended 64-bit operands (see `Cpu::exec_mmx`).
pub(crate) fn int_op(m: M) -> Option<fn(u128, u128, u8) -> u128> {
    Some(match m {
        M::Pxor | M::Xorps | M::Xorpd => |a, b, _| a ^ b,
        M::Por | M::Orps | M::Orpd => |a, b, _| a | b,
        M::Pand | M::Andps | M::Andpd => |a, b, _| a & b,
        M::Pandn | M::Andnps | M::Andnpd => |a, b, _| !a & b,
        M::Pcmpeqb => |a, b, _| pcmpeq(a, b, 1),
        M::Pcmpeqw => |a, b, _| pcmpeq(a, b, 2),
        M::Pcmpeqd => |a, b, _| pcmpeq(a, b, 4),
        M::Paddq => |a, b, _| map(a, b, 8, u64::wrapping_add),
        M::Psubq => |a, b, _| map(a, b, 8, u64::wrapping_sub),
        M::Punpcklqdq => |a, b, _| unpack(a, b, 8, false),
        M::Punpckhqdq => |a, b, _| unpack(a, b, 8, true),
        M::Pshufw => |_, b, imm| {
            (0..4).fold(0u128, |r, k| {
                r | ((lane(b, 2, (imm as usize >> (2 * k)) & 3) as u128) << (16 * k))
            })
        },
        M::Paddb => |a, b, _| map(a, b, 1, u64::wrapping_add),
        M::Paddw => |a, b, _| map(a, b, 2, u64::wrapping_add),
        M::Paddd => |a, b, _| map(a, b, 4, u64::wrapping_add),
        M::Psubb => |a, b, _| map(a, b, 1, u64::wrapping_sub),
        M::Psubw => |a, b, _| map(a, b, 2, u64::wrapping_sub),
        M::Psubd => |a, b, _| map(a, b, 4, u64::wrapping_sub),
        M::Paddusb => |a, b, _| map(a, b, 1, |x, y| (x + y).min(0xff)),
        M::Paddusw => |a, b, _| map(a, b, 2, |x, y| (x + y).min(0xffff)),
        M::Psubusb => |a, b, _| map(a, b, 1, u64::saturating_sub),
        M::Psubusw => |a, b, _| map(a, b, 2, u64::saturating_sub),
        M::Paddsb => |a, b, _| map(a, b, 1, |x, y| sat_s(sx(x, 1) + sx(y, 1), 1)),
        M::Paddsw => |a, b, _| map(a, b, 2, |x, y| sat_s(sx(x, 2) + sx(y, 2), 2)),
        M::Psubsb => |a, b, _| map(a, b, 1, |x, y| sat_s(sx(x, 1) - sx(y, 1), 1)),
        M::Psubsw => |a, b, _| map(a, b, 2, |x, y| sat_s(sx(x, 2) - sx(y, 2), 2)),
        M::Pminub => |a, b, _| map(a, b, 1, u64::min),
        M::Pmaxub => |a, b, _| map(a, b, 1, u64::max),
        M::Pminsw => |a, b, _| map(a, b, 2, |x, y| sx(x, 2).min(sx(y, 2)) as u64),
        M::Pmaxsw => |a, b, _| map(a, b, 2, |x, y| sx(x, 2).max(sx(y, 2)) as u64),
        M::Pavgb => |a, b, _| map(a, b, 1, |x, y| (x + y + 1) >> 1),
        M::Pavgw => |a, b, _| map(a, b, 2, |x, y| (x + y + 1) >> 1),
        M::Pcmpgtb => |a, b, _| {
            map(a, b, 1, |x, y| {
                0u64.wrapping_sub((sx(x, 1) > sx(y, 1)) as u64)
            })
        },
        M::Pcmpgtw => |a, b, _| {
            map(a, b, 2, |x, y| {
                0u64.wrapping_sub((sx(x, 2) > sx(y, 2)) as u64)
            })
        },
        M::Pcmpgtd => |a, b, _| {
            map(a, b, 4, |x, y| {
                0u64.wrapping_sub((sx(x, 4) > sx(y, 4)) as u64)
            })
        },
        M::Pmullw => |a, b, _| map(a, b, 2, u64::wrapping_mul),
        M::Pmulhw => |a, b, _| map(a, b, 2, |x, y| ((sx(x, 2) * sx(y, 2)) >> 16) as u64),
        M::Pmulhuw => |a, b, _| map(a, b, 2, |x, y| (x * y) >> 16),
        M::Pmuludq => |a, b, _| {
            let p0 = lane(a, 4, 0) * lane(b, 4, 0);
            let p1 = lane(a, 4, 2) * lane(b, 4, 2);
            (p0 as u128) | ((p1 as u128) << 64)
        },
        M::Pmaddwd => |a, b, _| {
            let mut r = 0u128;
            for k in 0..4 {
                let p = |j: usize| sx(lane(a, 2, j), 2) * sx(lane(b, 2, j), 2);
                let s = (p(2 * k) + p(2 * k + 1)) as u32;
                r |= (s as u128) << (32 * k);
            }
            r
        },
        M::Psadbw => |a, b, _| {
            let half = |h: usize| -> u128 {
                (0..8)
                    .map(|k| lane(a, 1, 8 * h + k).abs_diff(lane(b, 1, 8 * h + k)))
                    .sum::<u64>() as u128
            };
            half(0) | (half(1) << 64)
        },
        M::Punpcklbw => |a, b, _| unpack(a, b, 1, false),
        M::Punpcklwd => |a, b, _| unpack(a, b, 2, false),
        M::Punpckldq | M::Unpcklps => |a, b, _| unpack(a, b, 4, false),
        M::Unpcklpd => |a, b, _| unpack(a, b, 8, false),
        M::Punpckhbw => |a, b, _| unpack(a, b, 1, true),
        M::Punpckhwd => |a, b, _| unpack(a, b, 2, true),
        M::Punpckhdq | M::Unpckhps => |a, b, _| unpack(a, b, 4, true),
        M::Unpckhpd => |a, b, _| unpack(a, b, 8, true),
        M::Packsswb => |a, b, _| pack(a, b, 2, false),
        M::Packuswb => |a, b, _| pack(a, b, 2, true),
        M::Packssdw => |a, b, _| pack(a, b, 4, false),
        M::Pshufd => |_, b, imm| {
            (0..4).fold(0, |r, k| {
                r | ((lane(b, 4, (imm as usize >> (2 * k)) & 3) as u128) << (32 * k))
            })
        },
        M::Pshuflw => |_, b, imm| {
            let lo = (0..4).fold(0u128, |r, k| {
                r | ((lane(b, 2, (imm as usize >> (2 * k)) & 3) as u128) << (16 * k))
            });
            lo | (b & !(u64::MAX as u128))
        },
        M::Pshufhw => |_, b, imm| {
            let hi = (0..4).fold(0u128, |r, k| {
                r | ((lane(b, 2, 4 + ((imm as usize >> (2 * k)) & 3)) as u128) << (16 * k))
            });
            (b & u64::MAX as u128) | (hi << 64)
        },
        M::Shufps => |a, b, imm| {
            let s = |v: u128, k: usize| lane(v, 4, (imm as usize >> (2 * k)) & 3) as u128;
            s(a, 0) | (s(a, 1) << 32) | (s(b, 2) << 64) | (s(b, 3) << 96)
        },
        M::Shufpd => |a, b, imm| {
            let lo = lane(a, 8, (imm & 1) as usize) as u128;
            let hi = lane(b, 8, ((imm >> 1) & 1) as usize) as u128;
            lo | (hi << 64)
        },
        _ => return None,
    })
}

impl Cpu {
    /// PSLL/PSRL/PSRA by the count in an XMM register or m128.
    fn sse_shift_by_xmm(&mut self, i: &Instruction, m: M) -> R<()> {
        self.sse_check()?;
        let c = self.read_xmm_op(i, 1, true)? as u64;
        let a = self.xmm_reg(i.op0_register());
        self.set_xmm_reg(i.op0_register(), Self::sse_shift(m, a, c));
        Ok(())
    }
}
