//! MMX: the integer instructions on MM0-7, which alias the significands of
//! the x87 registers R0-R7 (SDM vol. 1 ch. 9). Every MMX instruction sets
//! the x87 TOP to 0 and tags every register valid (EMMS: empty), and a write to
//! MMi sets the exponent and sign field of Ri to all ones (9.5). The
//! operations are those of the XMM forms (sse.rs) on zero-extended 64-bit
//! operands; the MMX conversions (CVTPI2PS and the rest) use sse_fp.rs.

use arch::{cr0, vector};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};
use rustc_apfloat::ieee::{Double, Single};

use crate::sse::{int_op, unpack};
use crate::sse_fp::{self, Mx};
use crate::{exc, Cpu, R};

fn mm_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::MM0 as usize) & 7
}

/// Whether `i` has an MM register operand.
pub(crate) fn has_mm(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_mm())
}

impl Cpu {
    /// CR0 and the x87 state allow an MMX instruction: #UD with CR0.EM, #NM
    /// with CR0.TS, #MF with an unmasked x87 exception pending.
    fn mmx_check(&self) -> R<()> {
        if self.cr0 & cr0::EM != 0 {
            return exc(vector::UD);
        }
        if self.cr0 & cr0::TS != 0 {
            return exc(vector::NM);
        }
        if self.fpu.fsw & 0x80 != 0 {
            return exc(vector::MF);
        }
        Ok(())
    }

    /// The transition to MMX: TOP = 0 (so that ST(i) is Ri), all tags
    /// valid.
    fn mmx_enter(&mut self) {
        let top = ((self.fpu.fsw >> 11) & 7) as usize;
        // ST(i) is R((TOP + i) mod 8): with TOP = 0, Rj moves to index j.
        self.fpu.st.rotate_right(top);
        self.fpu.fsw &= !0x3800;
        self.fpu.ftw = 0xff;
    }

    fn mm(&self, r: Register) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.fpu.st[mm_index(r)][..8]);
        u64::from_le_bytes(b)
    }

    fn set_mm(&mut self, r: Register, v: u64) {
        let st = &mut self.fpu.st[mm_index(r)];
        st[..8].copy_from_slice(&v.to_le_bytes());
        st[8..10].copy_from_slice(&[0xff, 0xff]);
    }

    /// Operand `n`: an MM register, a general register or m64 (or the
    /// memory operand's size).
    fn mm_src(&mut self, i: &Instruction, n: u32) -> R<u64> {
        match i.op_kind(n) {
            OpKind::Register if i.op_register(n).is_mm() => Ok(self.mm(i.op_register(n))),
            OpKind::Register if i.op_register(n).is_xmm() => {
                Ok(self.xmm_reg(i.op_register(n)) as u64)
            }
            OpKind::Register => Ok(self.reg(i.op_register(n))),
            OpKind::Memory => {
                let l = self.mem_lin(i)?;
                let sz = i.memory_size().size().clamp(1, 8);
                self.rd(l, sz)
            }
            _ => Ok(i.immediate(n)),
        }
    }

    /// The instructions with an MM register operand, and EMMS.
    pub(crate) fn exec_mmx(&mut self, i: &Instruction) -> R<()> {
        let m = i.mnemonic();
        match m {
            M::Cvtpi2ps | M::Cvtpi2pd => return self.cvt_from_pi(i, m == M::Cvtpi2pd),
            M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi => return self.cvt_to_pi(i, m),
            M::Movq2dq | M::Movdq2q => self.sse_check()?,
            _ => {}
        }
        self.mmx_check()?;
        if m == M::Emms {
            // TOP = 0 as after every MMX instruction (SDM vol. 3 12.2:
            // "each time an MMX instruction is executed, the TOS value is
            // set to 000B"), then every register empty.
            self.mmx_enter();
            self.fpu.ftw = 0;
            return Ok(());
        }
        self.mmx_enter();
        let r0 = i.op0_register();
        let mm0 = i.op0_kind() == OpKind::Register && r0.is_mm();
        match m {
            M::Movd | M::Movq | M::Movntq => {
                let mask = if m == M::Movd { 0xffff_ffff } else { u64::MAX };
                let v = self.mm_src(i, 1)? & mask;
                if mm0 {
                    self.set_mm(r0, v);
                    Ok(())
                } else {
                    let sz = if m == M::Movd { 4 } else { 8 };
                    self.write_op(i, 0, sz, v)
                }
            }
            M::Movq2dq => {
                let v = self.mm(i.op1_register());
                self.set_xmm_reg(r0, v as u128);
                Ok(())
            }
            M::Movdq2q => {
                let v = self.xmm_reg(i.op1_register()) as u64;
                self.set_mm(r0, v);
                Ok(())
            }
            M::Pmovmskb => {
                let v = self.mm(i.op1_register());
                let bits = (0..8).fold(0, |r, k| r | ((v >> (8 * k + 7)) & 1) << k);
                self.set_reg(r0, bits);
                Ok(())
            }
            M::Pextrw => {
                let v = self.mm(i.op1_register());
                let w = (v >> (16 * (i.immediate(2) & 3))) & 0xffff;
                self.set_reg(r0, w);
                Ok(())
            }
            M::Pinsrw => {
                let w = self.mm_src(i, 1)? & 0xffff;
                let k = 16 * (i.immediate(2) & 3);
                let v = (self.mm(r0) & !(0xffff << k)) | (w << k);
                self.set_mm(r0, v);
                Ok(())
            }
            M::Maskmovq => {
                let n = i.op_count();
                let v = self.mm(i.op_register(n - 2));
                let mask = self.mm(i.op_register(n - 1));
                self.mask_store(i, v as u128, mask as u128, 8)
            }
            _ if mm0 && i.op_count() >= 2 => {
                let a = self.mm(r0) as u128;
                let shift = matches!(
                    m,
                    M::Psllw
                        | M::Pslld
                        | M::Psllq
                        | M::Psrlw
                        | M::Psrld
                        | M::Psrlq
                        | M::Psraw
                        | M::Psrad
                );
                let v = if shift {
                    let c = self.mm_src(i, 1)?;
                    Self::sse_shift(m, a, c)
                } else {
                    let Some(op) = int_op(m) else {
                        return self.unknown(i);
                    };
                    let b = self.mm_src(i, 1)? as u128;
                    let imm = if i.op_count() > 2 {
                        i.immediate(2) as u8
                    } else {
                        0
                    };
                    match m {
                        // The high halves of 64-bit operands.
                        M::Punpckhbw => unpack(a >> 32, b >> 32, 1, false),
                        M::Punpckhwd => unpack(a >> 32, b >> 32, 2, false),
                        M::Punpckhdq => unpack(a >> 32, b >> 32, 4, false),
                        // The packed halves of each operand, side by side.
                        M::Packsswb | M::Packssdw | M::Packuswb => {
                            let r = op(a, b, imm);
                            (r & 0xffff_ffff) | ((r >> 64) & 0xffff_ffff) << 32
                        }
                        _ => op(a, b, imm),
                    }
                };
                self.set_mm(r0, v as u64);
                Ok(())
            }
            _ => self.unknown(i),
        }
    }

    /// CVTPI2PS (two int32 to the low two singles, the rest kept) and
    /// CVTPI2PD (to two doubles). Only an MM source makes the MMX transition.
    fn cvt_from_pi(&mut self, i: &Instruction, dbl: bool) -> R<()> {
        self.sse_check()?;
        if i.op1_kind() == OpKind::Register {
            self.mmx_check()?;
            self.mmx_enter();
        }
        let b = self.mm_src(i, 1)?;
        let mut mx = Mx::new(self.fpu.mxcsr);
        let a = self.xmm_reg(i.op0_register());
        let int = |k: u32| (b >> (32 * k)) as u32 as i32 as i64;
        let r = if dbl {
            (0..2).fold(0u128, |r, k| {
                r | (sse_fp::from_int::<Double>(&mut mx, int(k)) as u128) << (64 * k)
            })
        } else {
            let lo = (0..2).fold(0u128, |r, k| {
                r | (sse_fp::from_int::<Single>(&mut mx, int(k)) as u128) << (32 * k)
            });
            (a & !(u64::MAX as u128)) | lo
        };
        self.mx_commit(&mx)?;
        self.set_xmm_reg(i.op0_register(), r);
        Ok(())
    }

    /// CVT(T)PS2PI (the low two singles of an XMM register or m64) and
    /// CVT(T)PD2PI (two doubles, an aligned m128) to two int32 in an MM
    /// register.
    fn cvt_to_pi(&mut self, i: &Instruction, m: M) -> R<()> {
        self.sse_check()?;
        self.mmx_check()?;
        let b = self.read_xmm_op(i, 1, true)?;
        let truncate = matches!(m, M::Cvttps2pi | M::Cvttpd2pi);
        let mut mx = Mx::new(self.fpu.mxcsr);
        let mut v = 0u64;
        for k in 0..2 {
            let x = if matches!(m, M::Cvtpd2pi | M::Cvttpd2pi) {
                sse_fp::to_int::<Double>(&mut mx, (b >> (64 * k)) as u64, 32, truncate)
            } else {
                sse_fp::to_int::<Single>(
                    &mut mx,
                    (b >> (32 * k)) as u64 & 0xffff_ffff,
                    32,
                    truncate,
                )
            };
            v |= x << (32 * k);
        }
        self.mx_commit(&mx)?;
        self.mmx_enter();
        self.set_mm(i.op0_register(), v);
        Ok(())
    }
}
