//! The VM and the VMM loop, written once for every engine: run the vCPU, complete
//! its exit against the buses, count it, repeat.

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machine::bus::StopReason;
use machine::devices::Pm;
use machine::{Action, Bus, GuestMemory, MemoryLayout};
use vcpu::{Kick, Regs, SRegs, Vcpu, VcpuError, VcpuExit};

use visor_hypercalls::{After, Hypercalls};

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
    /// The run was stopped from outside (`--timeout`) before the guest stopped.
    TimedOut { regs: Box<Regs>, sregs: Box<SRegs> },
    /// The guest executed an instruction the engine does not implement.
    Unimplemented {
        what: String,
        regs: Box<Regs>,
        sregs: Box<SRegs>,
    },
    /// The engine failed to enter or run the guest.
    GuestFailure {
        what: String,
        regs: Box<Regs>,
        sregs: Box<SRegs>,
    },
    /// The vCPU stopped for the debugger ([`vcpu::Vcpu::set_guest_debug`]);
    /// `run` may be called again.
    Debug(vcpu::DebugEvent),
    /// [`Pauser::pause`] stopped the run; `run` may be called again.
    Paused,
    /// The debugger killed the guest (`--gdb`).
    Killed,
    /// SIGTERM stopped the guest: a second one after the power button, or
    /// one the guest could not take (no ACPI power-button event enabled).
    Terminated,
}

impl Outcome {
    pub fn exit_status(&self) -> i32 {
        use crate::exit_status::*;
        match self {
            Outcome::Stopped(r) => r.exit_status(),
            Outcome::Halted { .. } => OK,
            Outcome::TripleFault { .. } => TRIPLE_FAULT,
            Outcome::GuestFailure { .. } => GUEST_FAILURE,
            Outcome::TimedOut { .. } => TIMEOUT,
            Outcome::Unimplemented { .. } => UNIMPLEMENTED,
            Outcome::Debug(_) | Outcome::Paused | Outcome::Killed => OK,
            Outcome::Terminated => TERMINATED,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Outcome::Stopped(StopReason::PowerOff) => "guest powered off".into(),
            Outcome::Stopped(StopReason::Reset) => "guest reset the machine".into(),
            Outcome::Stopped(StopReason::DebugExit(v)) => {
                format!("guest wrote {v:#x} to the debug-exit port")
            }
            Outcome::Stopped(StopReason::Shutdown(code)) => {
                format!("guest shut down through sched_op with code {code}")
            }
            Outcome::Halted { regs } => {
                format!("guest halted with nothing to wake it (rip={:#x})", regs.rip)
            }
            Outcome::TripleFault { .. } => "guest triple-faulted (shutdown)".into(),
            Outcome::GuestFailure { what, .. } | Outcome::Unimplemented { what, .. } => {
                what.clone()
            }
            Outcome::Debug(e) => format!("stopped for the debugger ({e:?})"),
            Outcome::Paused => "paused".into(),
            Outcome::Killed => "the debugger killed the guest".into(),
            Outcome::Terminated => "stopped by SIGTERM".into(),
            Outcome::TimedOut { regs, .. } => {
                format!(
                    "timed out: the guest was still running at rip={:#x}",
                    regs.rip
                )
            }
        }
    }

    /// Register dump for outcomes that are failures.
    pub fn dump(&self) -> Option<String> {
        match self {
            Outcome::TripleFault { regs, sregs }
            | Outcome::TimedOut { regs, sregs }
            | Outcome::GuestFailure { regs, sregs, .. } => Some(format!("{regs}\n{sregs}")),
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
    /// The paravirtual interface (hypercall page, hypercalls); its timer
    /// thread may hold an interrupt line of the engine VM.
    pub hypercalls: Hypercalls,
    pub layout: MemoryLayout,
    pub mem: GuestMemory,
    /// The guest's time for the devices on the host clock (HPET, PM timer,
    /// the PV timer): stands while a debugger holds the guest.
    pub clock: Arc<vcpu::GuestClock>,
    /// Set by [`Stopper::stop`]; the loop ends with [`Outcome::TimedOut`].
    stop: Arc<AtomicBool>,
    /// Set by [`Pauser::pause`]; the loop ends with [`Outcome::Paused`].
    pause: Arc<AtomicBool>,
    /// The ACPI PM registers SIGTERM presses the power button of
    /// ([`Vm::set_power_button`]).
    power_button: Option<Arc<Mutex<Pm>>>,
    /// SIGTERM pressed the power button already.
    power_pressed: bool,
}

/// Pauses a running [`Vm`] from another thread (a debugger's Ctrl-C): its
/// `run` returns [`Outcome::Paused`], and may be called again.
#[derive(Clone)]
pub struct Pauser {
    flag: Arc<AtomicBool>,
    kick: Arc<Kick>,
}

impl Pauser {
    /// Pauses the VM.
    pub fn pause(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.kick.kick();
    }

    /// Whether a pause was asked and not yet taken by the run.
    pub fn pending(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Forgets a pause the run has not taken (it ended for another reason).
    pub fn clear(&self) {
        self.flag.store(false, Ordering::SeqCst);
    }

    /// Repeats the kick while the pause has not been taken (see
    /// [`Stopper::stop_after`]).
    pub fn kick_again(&self) {
        if self.pending() {
            self.kick.kick();
        }
    }
}

/// Stops a running [`Vm`] from another thread: sets the flag and kicks the
/// vCPU (see [`vcpu::Kick`]).
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    kick: Arc<Kick>,
}

extern "C" fn kick_handler(_: libc::c_int) {}

/// Set by SIGUSR2: the loop prints the vCPU's registers and goes on.
static DUMP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// The kick of the vCPU that runs now, for SIGUSR2's handler. Each
/// [`Vm::run`] of another vCPU stores its own; the previous one is leaked (a
/// handler may be using it): one `Kick` per vCPU that ever ran.
static SIGNAL_KICK: AtomicPtr<Kick> = AtomicPtr::new(std::ptr::null_mut());

/// Set by SIGTERM once [`Vm::set_power_button`] installed its handler: the
/// loop presses the guest's power button.
static POWER_BUTTON: AtomicBool = AtomicBool::new(false);

extern "C" fn dump_handler(_: libc::c_int) {
    DUMP_REQUESTED.store(true, Ordering::SeqCst);
    kick_running_vcpu();
}

extern "C" fn power_button_handler(_: libc::c_int) {
    POWER_BUTTON.store(true, Ordering::SeqCst);
    kick_running_vcpu();
}

/// Kicks the vCPU that runs now (from a signal handler).
fn kick_running_vcpu() {
    let k = SIGNAL_KICK.load(Ordering::SeqCst);
    // SAFETY: a non-null SIGNAL_KICK came from `Arc::into_raw` and is never
    // released, so it points at a live Kick; `Kick::kick` only touches
    // atomics and makes async-signal-safe system calls.
    if let Some(k) = unsafe { k.as_ref() } {
        k.kick();
    }
}

/// The kick signal interrupts a vCPU thread blocked in KVM_RUN (no-op
/// handler, no SA_RESTART); SIGUSR2 asks for a register dump (`kill -USR2
/// <pid>` on a guest that seems stuck).
fn install_signal_handlers() {
    install_handlers(&[
        (
            vcpu::KICK_SIGNAL,
            kick_handler as extern "C" fn(libc::c_int),
        ),
        (libc::SIGUSR2, dump_handler),
    ]);
}

fn install_handlers(handlers: &[(libc::c_int, extern "C" fn(libc::c_int))]) {
    for &(sig, handler) in handlers {
        // SAFETY: the handlers only store to atomics and make
        // async-signal-safe system calls; without SA_RESTART a blocking
        // KVM_RUN returns EINTR to the loop.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

impl Stopper {
    /// Stops the VM: its run ends with [`Outcome::TimedOut`].
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.kick.kick();
    }

    /// Stops the VM after `after`. A kick that reaches a KVM vCPU just before
    /// it enters the guest is seen only at the guest's next exit, so the
    /// kick is repeated until the engine has taken it.
    pub fn stop_after(self, after: Duration) {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            self.stop();
            while self.kick.pending() {
                std::thread::sleep(Duration::from_millis(20));
                if self.kick.pending() {
                    self.kick.kick();
                }
            }
        });
    }
}

impl Vm {
    pub fn new(engine: Engine, mem_size: u64, opts: VmOptions) -> Result<Vm, String> {
        let layout = MemoryLayout::new(mem_size).map_err(|e| e.to_string())?;
        let mem = layout.create().map_err(|e| e.to_string())?;
        Vm::with_memory(engine, layout, mem, opts)
    }

    /// A VM on guest memory that is already populated (a kernel loaded into it).
    pub fn with_memory(
        engine: Engine,
        layout: MemoryLayout,
        mem: GuestMemory,
        opts: VmOptions,
    ) -> Result<Vm, String> {
        let mut engine_vm = engine
            .create_vm(&mem, opts)
            .map_err(|e| format!("engine {engine}: {e}"))?;
        let vcpu = engine_vm
            .create_vcpu(0)
            .map_err(|e| format!("engine {engine}: {e}"))?;
        let clock: Arc<vcpu::GuestClock> = Arc::default();
        let mut hypercalls = Hypercalls::new(
            opts.pv || engine == Engine::Pv,
            engine.hypercall_stub(),
            Box::new(std::io::stdout()),
        );
        hypercalls.set_clock(clock.clone());
        Ok(Vm {
            vcpu,
            engine_vm,
            engine,
            pio: Bus::new(),
            mmio: Bus::new(),
            layout,
            mem,
            hypercalls,
            clock,
            stop: Arc::new(AtomicBool::new(false)),
            pause: Arc::new(AtomicBool::new(false)),
            power_button: None,
            power_pressed: false,
        })
    }

    /// Makes SIGTERM press the guest's ACPI power button (`pm`'s), as
    /// QEMU's `system_powerdown` does: an ACPI guest that enabled the event
    /// gets the SCI and powers off by itself (status 0). A SIGTERM the guest
    /// cannot take (the event not enabled), or a second one, stops the run
    /// ([`Outcome::Terminated`]).
    pub fn set_power_button(&mut self, pm: Arc<Mutex<Pm>>) {
        self.power_button = Some(pm);
        install_handlers(&[(libc::SIGTERM, power_button_handler)]);
    }

    /// A SIGTERM: presses the power button, or says why the run stops.
    fn power_button_request(&mut self) -> Option<Outcome> {
        let Some(pm) = self.power_button.as_ref() else {
            return Some(Outcome::Terminated);
        };
        if self.power_pressed {
            eprintln!("\r\nvisor: SIGTERM again: stopping the guest\r");
            return Some(Outcome::Terminated);
        }
        let mut pm = pm.lock().unwrap_or_else(|p| p.into_inner());
        if !pm.power_button_enabled() {
            eprintln!(
                "\r\nvisor: SIGTERM: the guest has not enabled the ACPI power button event (PM1_EN.PWRBTN_EN): stopping it\r"
            );
            return Some(Outcome::Terminated);
        }
        pm.press_power_button();
        self.power_pressed = true;
        eprintln!(
            "\r\nvisor: SIGTERM: pressed the ACPI power button; SIGTERM again stops the guest at once\r"
        );
        None
    }

    /// A handle that stops this VM's run; call on the thread that will run it.
    pub fn stopper(&self) -> Stopper {
        install_signal_handlers();
        Stopper {
            flag: self.stop.clone(),
            kick: self.vcpu.kick(),
        }
    }

    /// A handle that pauses this VM's run; call on the thread that will
    /// run it.
    pub fn pauser(&self) -> Pauser {
        install_signal_handlers();
        Pauser {
            flag: self.pause.clone(),
            kick: self.vcpu.kick(),
        }
    }

    /// Writes `data` to guest memory at `gpa` between runs, and tells the
    /// engine (which may cache code decoded or translated from there).
    pub fn write_memory(&mut self, gpa: u64, data: &[u8]) -> Result<(), String> {
        vm_memory::Bytes::write_slice(&self.mem, data, vm_memory::GuestAddress(gpa))
            .map_err(|e| format!("writing {} bytes at {gpa:#x}: {e}", data.len()))?;
        self.vcpu.memory_written(gpa, data.len() as u64);
        Ok(())
    }

    pub fn set_cpu_state(&mut self, regs: &Regs, sregs: &SRegs) -> Result<(), VcpuError> {
        self.vcpu.set_sregs(sregs)?;
        self.vcpu.set_regs(regs)
    }

    /// Runs the vCPU until the machine stops, recording every exit in `stats`.
    pub fn run(&mut self, stats: &mut Stats) -> Result<Outcome, VcpuError> {
        install_signal_handlers();
        let kick = self.vcpu.kick();
        if !std::ptr::eq(SIGNAL_KICK.load(Ordering::SeqCst), Arc::as_ptr(&kick)) {
            SIGNAL_KICK.store(Arc::into_raw(kick).cast_mut(), Ordering::SeqCst);
        }
        let start = Instant::now();
        let out = self.run_loop(stats);
        stats.wall_time += start.elapsed();
        stats.engine_counters = self.vcpu.engine_counters();
        out
    }

    fn run_loop(&mut self, stats: &mut Stats) -> Result<Outcome, VcpuError> {
        // Two clock reads per exit: the end of one exit's handling is the next entry.
        let mut entered = Instant::now();
        loop {
            let exit = self.vcpu.run()?;
            let exited = Instant::now();
            stats.guest_time += exited - entered;
            let mut name = exit.name();
            let mut stop = None;
            let mut hypercall = false;
            let mut written = None;
            // A benchmark phase boundary (docs/costs.md).
            let mut phase = None;
            match exit {
                VcpuExit::IoOut { port, size: 4, .. }
                    if port == hypercall::HYPERCALL_PORT as u16 && self.hypercalls.page().is_some() =>
                {
                    hypercall = true;
                    name = "hypercall";
                }
                VcpuExit::Hypercall => hypercall = true,
                VcpuExit::IoOut { port, size: 4, data } if port == abi::port::BENCH_PHASE => {
                    phase = data.get(..4).and_then(|d| d.try_into().ok()).map(u32::from_le_bytes);
                }
                VcpuExit::MsrWrite { index, value, fault } => {
                    let ok = index == hypercall::MSR_HYPERCALL_PAGE
                        && self.hypercalls.advertised
                        && self.hypercalls.set_page(&self.mem, value);
                    if !ok {
                        *fault = 1;
                    }
                    // The hypercall page was written (its stubs).
                    written = self.hypercalls.page().filter(|_| ok);
                }
                VcpuExit::MsrRead { index, data, fault } => {
                    if index == hypercall::MSR_HYPERCALL_PAGE && self.hypercalls.advertised {
                        *data = self.hypercalls.page().map_or(0, |p| p | 1);
                    } else {
                        *fault = 1;
                    }
                }
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
                VcpuExit::Interrupted => {
                    if DUMP_REQUESTED.swap(false, Ordering::SeqCst) {
                        let (r, s) = (self.vcpu.regs()?, self.vcpu.sregs()?);
                        eprintln!("\r\nvisor: SIGUSR2 register dump\r\n{r}\n{s}");
                    }
                    if POWER_BUTTON.swap(false, Ordering::SeqCst) {
                        stop = self.power_button_request();
                    }
                    if stop.is_some() {
                        // SIGTERM ended the run.
                    } else if self.stop.load(Ordering::SeqCst) {
                        stop = Some(Outcome::TimedOut {
                            regs: Box::new(self.vcpu.regs()?),
                            sregs: Box::new(self.vcpu.sregs()?),
                        })
                    } else if self.pause.swap(false, Ordering::SeqCst) {
                        stop = Some(Outcome::Paused);
                    }
                }
                VcpuExit::Debug(e) => stop = Some(Outcome::Debug(e)),
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
                VcpuExit::Unimplemented { what } => {
                    stop = Some(Outcome::Unimplemented {
                        what,
                        regs: Box::new(self.vcpu.regs()?),
                        sregs: Box::new(self.vcpu.sregs()?),
                    })
                }
                VcpuExit::Other { reason } => {
                    let what = format!("engine {} stopped the guest: {reason}", self.engine);
                    stop = Some(self.failure(what)?)
                }
            }
            if let Some(gpa) = written {
                self.vcpu.memory_written(gpa, 0x1000);
            }
            if hypercall {
                let call = self
                    .hypercalls
                    .call(&self.mem, &mut *self.vcpu, &*self.engine_vm)?;
                *stats
                    .hypercalls
                    .entry(hypercall::name(call.number).to_string())
                    .or_default() += 1;
                match call.after {
                    After::Resume => {}
                    After::Shutdown(code) => {
                        stop = Some(Outcome::Stopped(StopReason::Shutdown(code as u8)))
                    }
                    After::BenchPhase(p) => phase = Some(p),
                }
            }
            if let Some(p) = phase {
                stats.mark_phase(p, self.vcpu.engine_counters());
            }
            let handled = Instant::now();
            stats.record_exit(name, handled - exited);
            entered = handled;
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
