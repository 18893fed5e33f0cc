//! A vCPU and an engine VM without a CPU, for driving the hypercall service
//! outside a VM: its unit tests and the fuzzing harness ([`crate::fuzz`]).
//! They implement the engine contract for real (registers kept, TLB flushes
//! and events counted), with nothing behind them that runs guest code.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arch::efer;
use vcpu::{IrqLine, Kick, Paravirtual, Regs, Result, SRegs, Vcpu, VcpuExit};

/// The system-call MSRs of a deprivileged kernel, set by `set_callbacks`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallMsrs {
    /// LSTAR: where SYSCALL enters.
    pub entry: u64,
    /// STAR: the selectors.
    pub star: u64,
    /// FMASK: RFLAGS bits SYSCALL clears.
    pub fmask: u64,
}

/// A vCPU whose guest does nothing but make the hypercall in its registers:
/// every [`Vcpu::run`] ends in a hypercall exit (or `Interrupted` after a
/// kick).
#[derive(Clone, Debug, Default)]
pub struct RegisterVcpu {
    /// The general-purpose registers.
    pub regs: Regs,
    /// The system registers.
    pub sregs: SRegs,
    /// TLB flushes asked for ([`Vcpu::flush_tlb`]).
    pub flushes: u64,
    /// `Some` for a deprivileged kernel, whose engine offers
    /// [`Vcpu::as_pv`]: the MSRs `set_callbacks` set.
    pub syscall: Option<SyscallMsrs>,
    /// The guest-physical ranges (address, length) reported written
    /// ([`Vcpu::memory_written`]), in order.
    pub written: Vec<(u64, u64)>,
    /// The kick.
    pub kick: Arc<Kick>,
}

impl RegisterVcpu {
    /// Whether the `len` bytes at `gpa` lie in ranges reported written.
    pub fn reported(&self, gpa: u64, len: u64) -> bool {
        (gpa..gpa.saturating_add(len))
            .all(|a| self.written.iter().any(|&(at, n)| a >= at && a - at < n))
    }
}

impl Vcpu for RegisterVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if self.kick.take() {
            return Ok(VcpuExit::Interrupted);
        }
        Ok(VcpuExit::Hypercall)
    }

    fn kick(&self) -> Arc<Kick> {
        self.kick.clone()
    }

    fn memory_written(&mut self, gpa: u64, len: u64) {
        self.written.push((gpa, len));
    }

    fn regs(&self) -> Result<Regs> {
        Ok(self.regs)
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.regs = *regs;
        Ok(())
    }

    fn sregs(&self) -> Result<SRegs> {
        Ok(self.sregs)
    }

    fn set_sregs(&mut self, sregs: &SRegs) -> Result<()> {
        self.sregs = *sregs;
        Ok(())
    }

    fn flush_tlb(&mut self) -> Result<()> {
        self.flushes += 1;
        Ok(())
    }

    fn as_pv(&mut self) -> Option<&mut dyn Paravirtual> {
        match self.syscall {
            Some(_) => Some(self),
            None => None,
        }
    }
}

impl Paravirtual for RegisterVcpu {
    fn set_syscall_entry(&mut self, entry: u64, star: u64, fmask: u64) -> Result<()> {
        self.syscall = Some(SyscallMsrs { entry, star, fmask });
        self.sregs.efer |= efer::SCE;
        Ok(())
    }
}

/// An interrupt line that counts its edges.
#[derive(Debug, Default)]
pub struct CountingLine {
    /// The vector it delivers.
    pub vector: u8,
    edges: AtomicU64,
}

impl CountingLine {
    /// Edges signalled so far.
    pub fn edges(&self) -> u64 {
        self.edges.load(Ordering::SeqCst)
    }
}

impl IrqLine for CountingLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.edges.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// An engine VM of [`RegisterVcpu`]s, with event lines when `vectors` is set.
#[derive(Debug, Default)]
pub struct LineVm {
    /// Whether it delivers vectors ([`vcpu::Vm::vector_line`]).
    pub vectors: bool,
    /// The vector lines handed out, in order.
    pub lines: Mutex<Vec<Arc<CountingLine>>>,
}

impl vcpu::Vm for LineVm {
    fn create_vcpu(&mut self, _id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(RegisterVcpu::default()))
    }

    fn irq_line(&self, _gsi: u32) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(None)
    }

    fn vector_line(&self, vector: u8) -> Result<Option<Arc<dyn IrqLine>>> {
        if !self.vectors {
            return Ok(None);
        }
        let line = Arc::new(CountingLine {
            vector,
            ..Default::default()
        });
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(line.clone());
        Ok(Some(line))
    }
}
