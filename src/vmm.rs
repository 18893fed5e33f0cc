//! The VM and the VMM loop, written once for every engine: run the vCPU, complete
//! its exit against the buses, count it, repeat.

use std::time::Instant;

use machine::bus::StopReason;
use machine::{Action, Bus, GuestMemory, MemoryLayout};
use vcpu::{Regs, SRegs, Vcpu, VcpuError, VcpuExit};

use crate::{Engine, Stats, VmOptions};

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// A device stopped the machine (power-off, reset, debug-exit).
    Stopped(StopReason),
    /// HLT with no interrupt source that could wake the vCPU.
    Halted { regs: Box<Regs> },
    /// Triple fault.
    TripleFault { regs: Box<Regs>, sregs: Box<SRegs> },
    /// The engine failed to enter or run the guest.
    GuestFailure {
        what: String,
        regs: Box<Regs>,
        sregs: Box<SRegs>,
    },
}

impl Outcome {
    pub fn exit_status(&self) -> i32 {
        use crate::exit_status::*;
        match self {
            Outcome::Stopped(r) => r.exit_status(),
            Outcome::Halted { .. } => OK,
            Outcome::TripleFault { .. } => TRIPLE_FAULT,
            Outcome::GuestFailure { .. } => GUEST_FAILURE,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Outcome::Stopped(StopReason::PowerOff) => "guest powered off".into(),
            Outcome::Stopped(StopReason::Reset) => "guest reset the machine".into(),
            Outcome::Stopped(StopReason::DebugExit(v)) => {
                format!("guest wrote {v:#x} to the debug-exit port")
            }
            Outcome::Halted { regs } => {
                format!("guest halted with nothing to wake it (rip={:#x})", regs.rip)
            }
            Outcome::TripleFault { .. } => "guest triple-faulted (shutdown)".into(),
            Outcome::GuestFailure { what, .. } => what.clone(),
        }
    }

    /// Register dump for outcomes that are failures.
    pub fn dump(&self) -> Option<String> {
        match self {
            Outcome::TripleFault { regs, sregs } | Outcome::GuestFailure { regs, sregs, .. } => {
                Some(format!("{regs}\n{sregs}"))
            }
            _ => None,
        }
    }
}

/// A virtual machine: guest memory, the two buses and one vCPU on an engine.
pub struct Vm {
    // Field order is drop order: the vCPU and engine VM go before the memory they map.
    pub vcpu: Box<dyn Vcpu>,
    pub engine_vm: Box<dyn vcpu::Vm>,
    pub engine: Engine,
    pub pio: Bus,
    pub mmio: Bus,
    pub layout: MemoryLayout,
    pub mem: GuestMemory,
}

impl Vm {
    pub fn new(engine: Engine, mem_size: u64, opts: VmOptions) -> Result<Vm, String> {
        let layout = MemoryLayout::new(mem_size).map_err(|e| e.to_string())?;
        let mem = layout.create().map_err(|e| e.to_string())?;
        let mut engine_vm = engine
            .create_vm(&mem, opts)
            .map_err(|e| format!("engine {engine}: {e}"))?;
        let vcpu = engine_vm
            .create_vcpu(0)
            .map_err(|e| format!("engine {engine}: {e}"))?;
        Ok(Vm {
            vcpu,
            engine_vm,
            engine,
            pio: Bus::new(),
            mmio: Bus::new(),
            layout,
            mem,
        })
    }

    pub fn set_cpu_state(&mut self, regs: &Regs, sregs: &SRegs) -> Result<(), VcpuError> {
        self.vcpu.set_sregs(sregs)?;
        self.vcpu.set_regs(regs)
    }

    /// Runs the vCPU until the machine stops, recording every exit in `stats`.
    pub fn run(&mut self, stats: &mut Stats) -> Result<Outcome, VcpuError> {
        let start = Instant::now();
        let out = self.run_loop(stats);
        stats.wall_time += start.elapsed();
        stats.engine_counters = self.vcpu.engine_counters();
        out
    }

    fn run_loop(&mut self, stats: &mut Stats) -> Result<Outcome, VcpuError> {
        loop {
            let entered = Instant::now();
            let exit = self.vcpu.run()?;
            let exited = Instant::now();
            stats.guest_time += exited - entered;
            let name = exit.name();
            let mut stop = None;
            match exit {
                VcpuExit::IoIn { port, size, data } => {
                    for chunk in data.chunks_mut(size.max(1) as usize) {
                        if !self.pio.read(port as u64, chunk) {
                            stats.unclaimed_pio += 1;
                        }
                    }
                }
                VcpuExit::IoOut { port, size, data } => {
                    for chunk in data.chunks(size.max(1) as usize) {
                        match self.pio.write(port as u64, chunk) {
                            Some(Action::Stop(r)) => {
                                stop = Some(Outcome::Stopped(r));
                                break;
                            }
                            Some(Action::Continue) => {}
                            None => stats.unclaimed_pio += 1,
                        }
                    }
                }
                VcpuExit::MmioRead { addr, data } => {
                    if !self.mmio.read(addr, data) {
                        stats.unclaimed_mmio += 1;
                    }
                }
                VcpuExit::MmioWrite { addr, data } => match self.mmio.write(addr, data) {
                    Some(Action::Stop(r)) => stop = Some(Outcome::Stopped(r)),
                    Some(Action::Continue) => {}
                    None => stats.unclaimed_mmio += 1,
                },
                VcpuExit::Interrupted => {}
                VcpuExit::Hlt => {
                    stop = Some(Outcome::Halted {
                        regs: Box::new(self.vcpu.regs()?),
                    })
                }
                VcpuExit::Shutdown => {
                    stop = Some(Outcome::TripleFault {
                        regs: Box::new(self.vcpu.regs()?),
                        sregs: Box::new(self.vcpu.sregs()?),
                    })
                }
                VcpuExit::FailEntry { reason } => {
                    stop = Some(self.failure(format!(
                        "engine {} could not enter the guest (hardware entry failure reason {reason:#x})",
                        self.engine
                    ))?)
                }
                VcpuExit::Other { reason } => {
                    let what = format!("engine {} stopped the guest: {reason}", self.engine);
                    stop = Some(self.failure(what)?)
                }
            }
            stats.record_exit(name, exited.elapsed());
            if let Some(o) = stop {
                return Ok(o);
            }
        }
    }

    fn failure(&self, what: String) -> Result<Outcome, VcpuError> {
        Ok(Outcome::GuestFailure {
            what,
            regs: Box::new(self.vcpu.regs()?),
            sregs: Box::new(self.vcpu.sregs()?),
        })
    }
}
