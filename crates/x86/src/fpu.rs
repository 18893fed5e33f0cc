//! x87 and SSE state: FNINIT, FWAIT, FNCLEX, FNSTSW, FNSTCW, FXSAVE/FXRSTOR,
//! MXCSR, and the SSE moves; the x87 data instructions are in x87.rs (their
//! arithmetic in f80.rs), the rest of SSE/SSE2 in sse.rs and sse_fp.rs, MMX
//! in mmx.rs.

use arch::paging::Access;
use arch::{cr0, cr4, vector};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::{exc, exc_code, Cpu, R};

#[derive(Clone, Debug)]
pub struct Fpu {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word (FXSAVE format: one bit per register, 1 = valid).
    pub ftw: u8,
    pub fop: u16,
    /// The last non-control x87 instruction's offset (FIP) and code
    /// segment selector (FCS); in real and virtual-8086 mode the
    /// environment image gives them as one linear address (selector × 16
    /// + offset; one loaded from such an image has a null selector).
    pub fip: u64,
    pub fcs: u16,
    /// Its memory operand's offset (FDP) and segment selector (FDS), 0 if
    /// it had none.
    pub fdp: u64,
    pub fds: u16,
    /// ST0..ST7 (80-bit values in the low 10 bytes).
    pub st: [[u8; 16]; 8],
    pub mxcsr: u32,
    pub xmm: [u128; 16],
}

impl Default for Fpu {
    fn default() -> Self {
        Fpu {
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fcs: 0,
            fdp: 0,
            fds: 0,
            st: [[0; 16]; 8],
            mxcsr: 0x1f80,
            xmm: [0; 16],
        }
    }
}

impl Fpu {
    /// FNINIT's state: the default control word, status and tags clear,
    /// the last-instruction pointers 0 (SDM vol. 1 8.1.10; the registers
    /// and the SSE state stay).
    pub(crate) fn finit(&mut self) {
        self.fcw = 0x37f;
        self.fsw = 0;
        self.ftw = 0;
        self.fop = 0;
        self.fip = 0;
        self.fcs = 0;
        self.fdp = 0;
        self.fds = 0;
    }
}

const MXCSR_MASK: u32 = 0xffff;

fn xmm_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::XMM0 as usize) & 15
}

impl Cpu {
    fn x87_check(&self) -> R<()> {
        if self.cr0 & (cr0::EM | cr0::TS) != 0 {
            return exc(vector::NM);
        }
        Ok(())
    }

    /// CR0/CR4 allow SSE instructions (else #UD or #NM).
    pub(crate) fn sse_check(&self) -> R<()> {
        if self.cr0 & cr0::EM != 0 || self.cr4 & cr4::OSFXSR == 0 {
            return exc(vector::UD);
        }
        if self.cr0 & cr0::TS != 0 {
            return exc(vector::NM);
        }
        Ok(())
    }

    pub(crate) fn xmm_reg(&self, r: Register) -> u128 {
        self.fpu.xmm[xmm_index(r)]
    }

    pub(crate) fn set_xmm_reg(&mut self, r: Register, v: u128) {
        self.fpu.xmm[xmm_index(r)] = v;
    }

    /// The alignment check of an m128 operand at `lin`: #GP(0) unless it
    /// is 16-byte aligned for the forms that require it (`aligned`: MOVAPS,
    /// MOVDQA, the packed operations without VEX), whatever RFLAGS.AC;
    /// the unaligned forms (MOVUPS, MOVUPD, MOVDQU, LDDQU) #AC(0) when
    /// alignment checking is on (CPL 3, CR0.AM, RFLAGS.AC) and it is not
    /// (a double quadword's alignment, SDM vol. 3 table 6-7; the SDM leaves
    /// #AC for these to the implementation, this host's CPU raises it).
    /// Smaller SSE and MMX operands go through `rd`/`wr`, which check
    /// their size's alignment.
    pub(crate) fn m128_alignment(&self, lin: u64, aligned: bool, need: u8) -> R<()> {
        if aligned && lin & 15 != 0 {
            return exc_code(vector::GP, 0);
        }
        self.alignment_fault(lin, 16, need)
    }

    pub(crate) fn read_xmm_op(&mut self, i: &Instruction, n: u32, aligned: bool) -> R<u128> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if r.is_xmm() {
                    Ok(self.fpu.xmm[xmm_index(r)])
                } else {
                    Ok(self.reg(r) as u128)
                }
            }
            _ => {
                let l = self.mem_lin(i)?;
                let sz = i.memory_size().size();
                if sz == 16 {
                    self.m128_alignment(l, aligned, self.acc_r)?;
                    let mut b = [0u8; 16];
                    self.read_bytes(l, &mut b, self.acc_r, Access::Read)?;
                    Ok(u128::from_le_bytes(b))
                } else {
                    Ok(self.rd(l, sz.clamp(1, 8))? as u128)
                }
            }
        }
    }

    fn write_xmm_op(&mut self, i: &Instruction, n: u32, v: u128, aligned: bool) -> R<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if r.is_xmm() {
                    self.fpu.xmm[xmm_index(r)] = v;
                } else {
                    self.set_reg(r, v as u64);
                }
                Ok(())
            }
            _ => {
                let l = self.mem_lin(i)?;
                let sz = i.memory_size().size();
                if sz == 16 {
                    self.m128_alignment(l, aligned, self.acc_w)?;
                    self.write_bytes(l, &v.to_le_bytes(), self.acc_w)
                } else {
                    self.wr(l, sz.clamp(1, 8), v as u64)
                }
            }
        }
    }

    /// FXSAVE's and FXRSTOR's 512-byte area must be 16-byte aligned, else
    /// #GP(0). With alignment checking on (CPL 3, CR0.AM, RFLAGS.AC) the
    /// SDM lets the implementation raise #AC(0) instead; the model keeps
    /// #GP(0) (SDM vol. 2 FXSAVE, "#AC": where #AC is not signaled, #GP
    /// is).
    fn fxsave_alignment(&self, lin: u64) -> R<()> {
        if lin & 15 != 0 {
            return exc_code(vector::GP, 0);
        }
        Ok(())
    }

    fn fxsave(&mut self, i: &Instruction) -> R<()> {
        let l = self.mem_lin(i)?;
        self.fxsave_alignment(l)?;
        let f = &self.fpu;
        let mut b = [0u8; 512];
        b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
        b[4] = f.ftw;
        b[6..8].copy_from_slice(&f.fop.to_le_bytes());
        b[8..16].copy_from_slice(&f.fip.to_le_bytes());
        b[16..24].copy_from_slice(&f.fdp.to_le_bytes());
        b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
        for (k, st) in f.st.iter().enumerate() {
            b[32 + 16 * k..32 + 16 * k + 10].copy_from_slice(&st[..10]);
        }
        let nx = if self.long64 { 16 } else { 8 };
        for k in 0..nx {
            b[160 + 16 * k..176 + 16 * k].copy_from_slice(&f.xmm[k].to_le_bytes());
        }
        // Bytes 416-511 (and XMM8-15's outside 64-bit mode) are not
        // written, as on the hardware.
        self.write_bytes(l, &b[..160 + 16 * nx], self.acc_w)
    }

    fn fxrstor(&mut self, i: &Instruction) -> R<()> {
        let l = self.mem_lin(i)?;
        self.fxsave_alignment(l)?;
        let mut b = [0u8; 512];
        self.read_bytes(l, &mut b, self.acc_r, Access::Read)?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let mxcsr = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
        if mxcsr & !MXCSR_MASK != 0 {
            return exc_code(vector::GP, 0);
        }
        let nx = if self.long64 { 16 } else { 8 };
        let f = &mut self.fpu;
        f.fcw = u16_at(0);
        f.fsw = u16_at(2);
        f.ftw = b[4];
        f.fop = u16_at(6);
        f.fip = u64_at(8);
        f.fdp = u64_at(16);
        f.mxcsr = mxcsr;
        for k in 0..8 {
            f.st[k] = [0; 16];
            f.st[k][..10].copy_from_slice(&b[32 + 16 * k..42 + 16 * k]);
        }
        for k in 0..nx {
            let mut x = [0u8; 16];
            x.copy_from_slice(&b[160 + 16 * k..176 + 16 * k]);
            f.xmm[k] = u128::from_le_bytes(x);
        }
        Ok(())
    }

    pub(crate) fn exec_fpu(&mut self, i: &Instruction) -> R<()> {
        match i.mnemonic() {
            M::Fninit => {
                self.x87_check()?;
                self.fpu.finit();
                Ok(())
            }
            M::Wait => {
                if self.cr0 & (cr0::TS | cr0::MP) == cr0::TS | cr0::MP {
                    return exc(vector::NM);
                }
                if self.fpu.fsw & 0x80 != 0 {
                    return exc(vector::MF);
                }
                Ok(())
            }
            M::Fnclex => {
                self.x87_check()?;
                self.fpu.fsw &= 0x7f00;
                Ok(())
            }
            M::Fnstsw => {
                self.x87_check()?;
                let v = self.fpu.fsw as u64;
                self.write_op(i, 0, 2, v)
            }
            M::Fnstcw => {
                self.x87_check()?;
                let v = self.fpu.fcw as u64;
                self.write_op(i, 0, 2, v)
            }
            M::Fxsave | M::Fxsave64 => {
                self.x87_check()?;
                self.fxsave(i)
            }
            M::Fxrstor | M::Fxrstor64 => {
                self.x87_check()?;
                self.fxrstor(i)
            }
            M::Ldmxcsr => {
                self.sse_check()?;
                let v = self.read_op(i, 0, 4)? as u32;
                if v & !MXCSR_MASK != 0 {
                    return exc_code(vector::GP, 0);
                }
                self.fpu.mxcsr = v;
                Ok(())
            }
            M::Stmxcsr => {
                self.sse_check()?;
                let v = self.fpu.mxcsr as u64;
                self.write_op(i, 0, 4, v)
            }
            m if crate::x87::is_x87(m) => self.exec_x87(i),
            M::Emms | M::Cvtpi2ps | M::Cvtpi2pd => self.exec_mmx(i),
            _ if crate::mmx::has_mm(i) => self.exec_mmx(i),
            M::Movaps
            | M::Movapd
            | M::Movdqa
            | M::Movups
            | M::Movupd
            | M::Movdqu
            | M::Movntps
            | M::Movntpd
            | M::Movntdq
            | M::Lddqu => {
                self.sse_check()?;
                let aligned = matches!(
                    i.mnemonic(),
                    M::Movaps | M::Movapd | M::Movdqa | M::Movntps | M::Movntpd | M::Movntdq
                );
                let v = self.read_xmm_op(i, 1, aligned)?;
                self.write_xmm_op(i, 0, v, aligned)
            }
            M::Movq | M::Movd => {
                self.sse_check()?;
                let sz = if i.mnemonic() == M::Movd { 4 } else { 8 };
                let v = self.read_xmm_op(i, 1, false)?
                    & if sz == 4 {
                        0xffff_ffff
                    } else {
                        u64::MAX as u128
                    };
                if i.op0_kind() == OpKind::Register && i.op0_register().is_xmm() {
                    self.fpu.xmm[xmm_index(i.op0_register())] = v;
                    Ok(())
                } else if i.op0_kind() == OpKind::Register {
                    let r = i.op0_register();
                    self.set_reg(r, v as u64);
                    Ok(())
                } else {
                    let l = self.mem_lin(i)?;
                    self.wr(l, sz, v as u64)
                }
            }
            M::Movnti => {
                let sz = self.opsz(i, 0);
                let v = self.reg(i.op1_register());
                self.write_op(i, 0, sz, v)
            }
            M::Pmovmskb => {
                self.sse_check()?;
                let v = self.fpu.xmm[xmm_index(i.op1_register())];
                let m = (0..16).fold(0, |m, k| m | (((v >> (k * 8 + 7)) & 1) as u64) << k);
                self.set_reg(i.op0_register(), m);
                Ok(())
            }
            M::Xgetbv
            | M::Xsetbv
            | M::Xsave
            | M::Xrstor
            | M::Xsaveopt
            | M::Rdrand
            | M::Rdseed
            | M::Rdpid
            | M::Rdfsbase
            | M::Rdgsbase
            | M::Wrfsbase
            | M::Wrgsbase
            | M::Monitor
            | M::Mwait
            | M::Invpcid
            | M::Clac
            | M::Stac
            | M::Vmcall
            | M::Vmmcall => {
                // Not offered by CPUID.
                exc(vector::UD)
            }
            _ => match self.exec_sse_fp(i).or_else(|| self.exec_sse_int(i)) {
                Some(r) => r,
                None => self.unknown(i),
            },
        }
    }
}
