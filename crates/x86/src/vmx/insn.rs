//! The VMX instructions in VMX root operation (and VMXON outside VMX
//! operation): operand decoding, the #UD/#GP checks, and the flags of the
//! result. In VMX non-root operation they cause VM exits (intercept.rs).

use iced_x86::{Instruction, Mnemonic as M};

use super::{error, VmFail, CR0_FIXED0};
use crate::{exc, exc_code, Cpu, R};
use arch::msr::feature_control;
use arch::rflags::VM;
use arch::{cr0, cr4, efer, vector};

/// A mnemonic in lower case, for traces.
struct Name(M);

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format!("{:?}", self.0).to_lowercase())
    }
}

/// Whether `m` is one of the VMX instructions.
pub(crate) fn is_vmx(m: M) -> bool {
    matches!(
        m,
        M::Vmxon
            | M::Vmxoff
            | M::Vmclear
            | M::Vmptrld
            | M::Vmptrst
            | M::Vmread
            | M::Vmwrite
            | M::Vmlaunch
            | M::Vmresume
            | M::Invept
            | M::Invvpid
            | M::Vmcall
    )
}

impl Cpu {
    /// #UD outside protected mode, in virtual-8086 mode and in compatibility
    /// mode.
    pub(crate) fn vmx_mode_check(&self) -> R<()> {
        if self.cr0 & cr0::PE == 0
            || self.rflags & VM != 0
            || (self.efer & efer::LMA != 0 && !self.long64)
        {
            return exc(vector::UD);
        }
        Ok(())
    }

    /// Operand size of VMREAD/VMWRITE and the INVEPT/INVVPID type register.
    fn vmx_opsz(&self) -> usize {
        if self.long64 {
            8
        } else {
            4
        }
    }

    /// Executes a VMX instruction outside VMX non-root operation.
    pub(crate) fn exec_vmx(&mut self, i: &Instruction) -> R<()> {
        let m = i.mnemonic();
        if m == M::Vmcall {
            if !self.vmx.on {
                return exc(vector::UD);
            }
            self.vmx_mode_check()?;
            self.require_cpl0()?;
            self.vm_fail(VmFail::Valid(error::VMCALL_IN_ROOT));
            return Ok(());
        }
        self.vmx_mode_check()?;
        if m == M::Vmxon {
            if self.cr4 & cr4::VMXE == 0 {
                return exc(vector::UD);
            }
            self.require_cpl0()?;
            if !self.vmx.on {
                let fc = self.vmx.feature_control;
                if self.cr0 & CR0_FIXED0 != CR0_FIXED0
                    || fc & feature_control::LOCK == 0
                    || fc & feature_control::VMXON_OUTSIDE_SMX == 0
                {
                    return exc_code(vector::GP, 0);
                }
            }
            let l = self.mem_lin(i)?;
            let ptr = self.rd(l, 8)?;
            let r = self.vmxon(ptr);
            self.vm_result(r);
            self.vmx_trace(format_args!("vmxon {ptr:#x} -> {r:?}"));
            return Ok(());
        }
        if !self.vmx.on {
            return exc(vector::UD);
        }
        self.require_cpl0()?;
        let r = match m {
            M::Vmxoff => self.vmxoff(),
            M::Vmclear | M::Vmptrld => {
                let l = self.mem_lin(i)?;
                let ptr = self.rd(l, 8)?;
                let r = if m == M::Vmclear {
                    self.vmclear(ptr)
                } else {
                    self.vmptrld(ptr)
                };
                self.vmx_trace(format_args!("{} {ptr:#x} -> {r:?}", Name(m)));
                self.vm_result(r);
                return Ok(());
            }
            M::Vmptrst => {
                let l = self.mem_lin(i)?;
                self.wr(l, 8, self.vmx.current)?;
                Ok(())
            }
            M::Vmread => {
                let sz = self.vmx_opsz();
                let enc = self.reg(i.op1_register());
                match self.vmread(enc) {
                    Ok(v) => {
                        self.write_op(i, 0, sz, v & crate::alu::mask(sz))?;
                        self.vmx_trace(format_args!(
                            "vmread {} -> {v:#x}",
                            super::fields::name(enc as u32).unwrap_or("?")
                        ));
                        Ok(())
                    }
                    Err(f) => Err(f),
                }
            }
            M::Vmwrite => {
                let sz = self.vmx_opsz();
                let enc = self.reg(i.op0_register());
                let v = self.read_op(i, 1, sz)?;
                self.vmx_trace(format_args!(
                    "vmwrite {} <- {v:#x}",
                    super::fields::name(enc as u32).unwrap_or("?")
                ));
                self.vmwrite(enc, v)
            }
            M::Vmlaunch | M::Vmresume => {
                let r = self.vm_entry(m == M::Vmlaunch);
                if let Err(f) = r {
                    self.vmx_trace(format_args!("{} failed: {f:?}", Name(m)));
                    self.vm_fail(f);
                }
                return Ok(());
            }
            M::Invept | M::Invvpid => {
                let sz = self.vmx_opsz();
                let kind = self.reg(i.op0_register()) & crate::alu::mask(sz);
                let l = self.mem_lin(i)?;
                let lo = self.rd(l, 8)?;
                let hi = self.rd(l.wrapping_add(8), 8)?;
                if m == M::Invept {
                    self.invept(kind, lo)
                } else {
                    self.invvpid(kind, lo, hi)
                }
            }
            _ => return exc(vector::UD),
        };
        if !matches!(m, M::Vmread | M::Vmwrite) {
            self.vmx_trace(format_args!("{} -> {r:?}", Name(m)));
        }
        self.vm_result(r);
        Ok(())
    }

    /// INVEPT of type `kind` (1 single-context for the EPT pointer `eptp`,
    /// 2 all-context): drops the guest translations made through EPT.
    pub fn invept(&mut self, kind: u64, eptp: u64) -> super::VmResult {
        match kind {
            1 => self.tlb_drop_ept(Some(eptp)),
            2 => self.tlb_drop_ept(None),
            _ => return Err(VmFail::Valid(error::INVALID_INVEPT_INVVPID_OPERAND)),
        }
        Ok(())
    }

    /// INVVPID of type `kind` with the descriptor (`lo`: VPID in bits 15:0,
    /// `hi`: linear address).
    pub fn invvpid(&mut self, kind: u64, lo: u64, hi: u64) -> super::VmResult {
        let vpid = lo & 0xffff;
        let bad = kind > 3
            || lo >> 16 != 0
            || (kind != 2 && vpid == 0)
            || (kind == 0 && ((hi as i64) << 16 >> 16) as u64 != hi);
        if bad {
            return Err(VmFail::Valid(error::INVALID_INVEPT_INVVPID_OPERAND));
        }
        let vpid = vpid as u16;
        match kind {
            0 => self.tlb_drop_vpid(Some(vpid), Some(hi)),
            2 => self.tlb_drop_vpid(None, None),
            _ => self.tlb_drop_vpid(Some(vpid), None),
        }
        Ok(())
    }
}
