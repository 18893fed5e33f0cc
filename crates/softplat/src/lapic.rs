//! The local APIC of the software engines (xAPIC registers at 0xfee0_0000,
//! movable through IA32_APIC_BASE): ID, version, TPR/PPR, EOI, SVR, ISR/IRR/TMR,
//! ESR, ICR (fixed and NMI self-IPIs), the LVT with LINT1 (NMI or fixed), and
//! the timer (one-shot and periodic); software disable (SVR) and global
//! disable (IA32_APIC_BASE bit 11: the APIC is off the bus, the PICs' INTR
//! reaches the CPU directly, and it comes back in its power-up state). The timer counts at 1 GHz before the
//! divider, as KVM's does, against the host's monotonic clock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vcpu::Kick;

use crate::ioapic::IOAPIC_BASE;
use crate::legacy::Legacy;

/// The guest-physical address of the local APIC's registers.
pub const APIC_BASE: u64 = 0xfee0_0000;

/// Fixed interrupts raised from other threads (vector lines), and the wake-up
/// of a halted vCPU through its [`Kick`].
pub struct Lines {
    pending: [AtomicU64; 4],
    /// An edge on LINT1.
    lint1: AtomicBool,
    /// Something else (the PICs) has an interrupt for the vCPU.
    kicked: AtomicBool,
    /// The vCPU's kick: its futex word wakes a waiting vCPU, and a VMM kick
    /// ends the wait too.
    kick: Arc<Kick>,
}

impl Default for Lines {
    fn default() -> Self {
        Lines::new(Kick::new())
    }
}

impl Lines {
    /// Lines that wake the vCPU of `kick`.
    pub fn new(kick: Arc<Kick>) -> Lines {
        Lines {
            pending: Default::default(),
            lint1: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            kick,
        }
    }

    /// The vCPU's kick.
    pub fn kick_handle(&self) -> &Arc<Kick> {
        &self.kick
    }

    /// Raises fixed interrupt `vector`.
    pub fn raise(&self, vector: u8) {
        self.pending[vector as usize / 64].fetch_or(1 << (vector % 64), Ordering::SeqCst);
        self.kick.wake();
    }

    /// An edge on the LINT1 pin (wired to NMI sources): the LAPIC delivers
    /// it as its LVT LINT1 entry says.
    pub fn lint1(&self) {
        self.lint1.store(true, Ordering::SeqCst);
        self.kick.wake();
    }

    /// Wakes the vCPU to look at its interrupt sources other than the lines
    /// (the PICs have an interrupt for it).
    pub fn external(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        self.kick.wake();
    }

    /// Takes the raised lines (one bit per vector), clearing them.
    pub fn take(&self) -> [u64; 4] {
        self.kicked.store(false, Ordering::SeqCst);
        let mut out = [0u64; 4];
        for (o, p) in out.iter_mut().zip(&self.pending) {
            if p.load(Ordering::Relaxed) != 0 {
                *o = p.swap(0, Ordering::SeqCst);
            }
        }
        out
    }

    fn any(&self) -> bool {
        self.kicked.load(Ordering::SeqCst)
            || self.lint1.load(Ordering::SeqCst)
            || self.pending.iter().any(|p| p.load(Ordering::SeqCst) != 0)
    }

    /// Waits until a line is raised, the vCPU is kicked, or `timeout` passes
    /// (`None`: no timeout).
    pub fn wait(&self, timeout: Option<Duration>) {
        let seen = self.kick.seen();
        if self.any() {
            return;
        }
        self.kick.wait(seen, timeout);
    }
}

/// One vCPU's local APIC.
pub struct Lapic {
    id: u32,
    tpr: u32,
    svr: u32,
    ldr: u32,
    dfr: u32,
    esr: u32,
    icr: [u32; 2],
    isr: [u32; 8],
    irr: [u32; 8],
    tmr: [u32; 8],
    /// Timer, thermal, perf, LINT0, LINT1, error.
    lvt: [u32; 6],
    timer_init: u32,
    timer_div: u32,
    /// When the current count reaches zero.
    deadline: Option<Instant>,
    lines: Arc<Lines>,
    /// The PICs and the PIT, whose interrupts come in through LINT0.
    legacy: Option<Arc<Mutex<Legacy>>>,
    /// Fixed interrupts the APIC dropped because it was software-disabled.
    pub dropped: u64,
    /// The registers' physical page (IA32_APIC_BASE).
    base: u64,
    /// Globally enabled (IA32_APIC_BASE bit 11).
    global: bool,
    /// An NMI waits for the CPU.
    nmi: bool,
}

const LVT_MASKED: u32 = 1 << 16;

impl Lapic {
    /// The APIC of vCPU `id`, fed by `lines`, in the state a BIOS leaves.
    pub fn new(id: u32, lines: Arc<Lines>) -> Lapic {
        Lapic {
            id,
            tpr: 0,
            svr: 0xff,
            ldr: 0,
            dfr: 0xffff_ffff,
            esr: 0,
            icr: [0; 2],
            isr: [0; 8],
            irr: [0; 8],
            tmr: [0; 8],
            // LINT0 ExtINT and LINT1 NMI: the virtual-wire setup a BIOS leaves.
            lvt: [LVT_MASKED, LVT_MASKED, LVT_MASKED, 0x700, 0x400, LVT_MASKED],
            timer_init: 0,
            timer_div: 0,
            deadline: None,
            lines,
            legacy: None,
            dropped: 0,
            base: APIC_BASE,
            global: true,
            nmi: false,
        }
    }

    /// Back to the power-up state (SDM vol. 3 10.4.7.1), keeping the ID, the
    /// lines and the PICs: software-disabled, every LVT entry masked.
    fn power_up(&mut self) {
        let mut fresh = Lapic::new(self.id, self.lines.clone());
        fresh.legacy = self.legacy.take();
        fresh.dropped = self.dropped;
        fresh.lvt = [LVT_MASKED; 6];
        *self = fresh;
    }

    /// Connects the VM's PICs (and PIT) to LINT0.
    pub fn with_legacy(mut self, legacy: Arc<Mutex<Legacy>>) -> Lapic {
        self.legacy = Some(legacy);
        self
    }

    fn legacy(&self) -> Option<std::sync::MutexGuard<'_, Legacy>> {
        self.legacy
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// LINT0 is unmasked and in ExtINT mode, and the PICs request an
    /// interrupt.
    fn extint(&self) -> bool {
        let lint0 = self.lvt[3];
        lint0 & LVT_MASKED == 0
            && (lint0 >> 8) & 7 == 7
            && self.legacy().is_some_and(|l| l.pic.intr())
    }

    fn enabled(&self) -> bool {
        self.svr & 0x100 != 0
    }

    fn divisor(&self) -> u64 {
        let d = (self.timer_div & 3) | ((self.timer_div >> 1) & 4);
        if d == 7 {
            1
        } else {
            2 << d
        }
    }

    fn period(&self) -> Duration {
        Duration::from_nanos(self.timer_init as u64 * self.divisor())
    }

    fn highest(v: &[u32; 8]) -> Option<u8> {
        for k in (0..8).rev() {
            if v[k] != 0 {
                return Some((k * 32 + 31 - v[k].leading_zeros() as usize) as u8);
            }
        }
        None
    }

    fn ppr(&self) -> u32 {
        let isrv = Self::highest(&self.isr).map_or(0, |v| v as u32);
        if (self.tpr >> 4) >= (isrv >> 4) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    fn set_irr(&mut self, v: u8) {
        if v < 16 {
            self.esr |= 1 << 6; // illegal vector received
            return;
        }
        self.irr[v as usize / 32] |= 1 << (v % 32);
    }

    fn current_count(&self) -> u32 {
        match self.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now()).as_nanos() as u64;
                left.div_ceil(self.divisor()).min(self.timer_init as u64) as u32
            }
            None => 0,
        }
    }

    fn read_reg(&self, reg: u64) -> u32 {
        match reg {
            0x20 => self.id << 24,
            0x30 => 0x0005_0014,
            0x80 => self.tpr,
            0xa0 => self.ppr(),
            0xd0 => self.ldr,
            0xe0 => self.dfr,
            0xf0 => self.svr,
            0x100..=0x170 => self.isr[((reg - 0x100) >> 4) as usize],
            0x180..=0x1f0 => self.tmr[((reg - 0x180) >> 4) as usize],
            0x200..=0x270 => self.irr[((reg - 0x200) >> 4) as usize],
            0x280 => self.esr,
            0x300 => self.icr[0],
            0x310 => self.icr[1],
            0x320..=0x370 => self.lvt[((reg - 0x320) >> 4) as usize],
            0x380 => self.timer_init,
            0x390 => self.current_count(),
            0x3e0 => self.timer_div,
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u64, v: u32) {
        match reg {
            0x80 => self.tpr = v & 0xff,
            0xb0 => {
                if let Some(h) = Self::highest(&self.isr) {
                    let (w, bit) = (h as usize / 32, 1 << (h % 32));
                    self.isr[w] &= !bit;
                    if self.tmr[w] & bit != 0 {
                        // A level-triggered interrupt: the EOI goes to the
                        // I/O APIC, whose Remote IRR clears.
                        self.tmr[w] &= !bit;
                        if let Some(mut l) = self.legacy() {
                            l.ioapic.eoi(h);
                        }
                    }
                }
            }
            0xd0 => self.ldr = v & 0xff00_0000,
            0xe0 => self.dfr = v | 0x0fff_ffff,
            0xf0 => {
                self.svr = v & 0x13ff;
                if !self.enabled() {
                    for l in self.lvt.iter_mut() {
                        *l |= LVT_MASKED;
                    }
                }
            }
            0x280 => self.esr = 0,
            0x300 => {
                self.icr[0] = v & !(1 << 12);
                let shorthand = (v >> 18) & 3;
                let mode = (v >> 8) & 7;
                let to_self = shorthand == 1
                    || shorthand == 2
                    || (shorthand == 0 && self.icr[1] >> 24 == self.id);
                match mode {
                    0 if to_self => self.set_irr(v as u8),
                    // NMI: the vector is ignored (SDM vol. 3 10.6.1).
                    4 if to_self => self.nmi = true,
                    _ => {}
                }
            }
            0x310 => self.icr[1] = v & 0xff00_0000,
            0x320..=0x370 => {
                let i = ((reg - 0x320) >> 4) as usize;
                let mut v = v & if i == 0 { 0x700ff } else { 0x1_07ff };
                if !self.enabled() {
                    v |= LVT_MASKED;
                }
                self.lvt[i] = v;
            }
            0x380 => {
                self.timer_init = v;
                self.deadline = (v != 0).then(|| Instant::now() + self.period());
            }
            0x3e0 => self.timer_div = v & 0xb,
            _ => {}
        }
    }

    fn fire_timer(&mut self, now: Instant) {
        let Some(d) = self.deadline else { return };
        if now < d {
            return;
        }
        let lvt = self.lvt[0];
        if lvt & LVT_MASKED == 0 {
            self.set_irr(lvt as u8);
        }
        let periodic = (lvt >> 17) & 3 == 1;
        let period = self.period();
        self.deadline = if periodic && !period.is_zero() {
            // Missed periods collapse into one interrupt.
            let late = now.duration_since(d).as_nanos() % period.as_nanos().max(1);
            Some(now + period - Duration::from_nanos(late as u64))
        } else {
            None
        };
    }
}

impl x86::Local for Lapic {
    /// The local APIC's page, and with the legacy platform the I/O APIC's
    /// (answered inside the engine, as KVM's in-kernel irqchip does).
    fn claims(&self, addr: u64) -> bool {
        (self.global && addr & !0xfff == self.base)
            || (addr & !0xfff == IOAPIC_BASE && self.legacy.is_some())
    }

    fn read(&mut self, addr: u64, data: &mut [u8]) {
        if addr & !0xfff == IOAPIC_BASE {
            if let Some(l) = self.legacy() {
                l.ioapic.read(addr & 0xfff, data);
            }
            return;
        }
        let off = addr & 0xfff;
        let v = self.read_reg(off & !0xf).to_le_bytes();
        for (k, b) in data.iter_mut().enumerate() {
            let at = (off & 0xf) as usize + k;
            *b = if at < 4 { v[at] } else { 0 };
        }
    }

    fn write(&mut self, addr: u64, data: &[u8]) {
        if addr & !0xfff == IOAPIC_BASE {
            if let Some(mut l) = self.legacy() {
                l.ioapic.write(addr & 0xfff, data);
            }
            return;
        }
        let off = addr & 0xfff;
        if off & 0xf != 0 || data.len() < 4 {
            return; // only aligned 32-bit writes are defined
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(off, v);
    }

    fn poll(&mut self) -> bool {
        let now = Instant::now();
        self.fire_timer(now);
        let messages = self.legacy().map(|mut l| {
            l.poll(now);
            l.ioapic.take()
        });
        for m in messages.unwrap_or_default() {
            if !m.accepted_by(self.id, self.ldr) {
                continue;
            }
            if !self.enabled() {
                self.dropped += 1;
                continue;
            }
            self.set_irr(m.vector);
            let (w, bit) = (m.vector as usize / 32, 1u32 << (m.vector % 32));
            if m.level {
                self.tmr[w] |= bit;
            } else {
                self.tmr[w] &= !bit;
            }
        }
        if self.lines.lint1.swap(false, Ordering::SeqCst) {
            let lint1 = self.lvt[4];
            if self.global && lint1 & LVT_MASKED == 0 {
                match (lint1 >> 8) & 7 {
                    4 => self.nmi = true,
                    0 => self.set_irr(lint1 as u8),
                    _ => {}
                }
            }
        }
        let raised = self.lines.take();
        if raised.iter().any(|&w| w != 0) {
            for (k, w) in raised.iter().enumerate() {
                let mut w = *w;
                while w != 0 {
                    let b = w.trailing_zeros();
                    w &= w - 1;
                    if self.global && self.enabled() {
                        self.set_irr((k * 64 + b as usize) as u8);
                    } else {
                        self.dropped += 1;
                    }
                }
            }
        }
        self.pending()
    }

    fn pending(&self) -> bool {
        if !self.global {
            // No APIC: the PICs' INTR goes to the CPU.
            return self.legacy().is_some_and(|l| l.pic.intr());
        }
        if self.extint() {
            return true;
        }
        match Self::highest(&self.irr) {
            Some(v) => (v as u32 & 0xf0) > (self.ppr() & 0xf0),
            None => false,
        }
    }

    fn ack(&mut self) -> Option<u8> {
        if !self.global || self.extint() {
            // The PICs give the vector (INTA); the APIC keeps no state.
            return self.legacy().map(|mut l| l.pic.ack());
        }
        if !self.pending() {
            return None;
        }
        let v = Self::highest(&self.irr)?;
        self.irr[v as usize / 32] &= !(1 << (v % 32));
        self.isr[v as usize / 32] |= 1 << (v % 32);
        Some(v)
    }

    fn set_tpr(&mut self, cr8: u64) {
        self.tpr = ((cr8 & 0xf) << 4) as u32;
    }

    fn describe(&self) -> String {
        let bits = |r: &[u32; 8]| {
            (0..256u32)
                .filter(|&v| r[(v / 32) as usize] & (1 << (v % 32)) != 0)
                .map(|v| format!("{v:#x}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let left = self
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let mut s = format!(
            "apic id={} tpr={:#x} svr={:#x} isr=[{}] irr=[{}] esr={:#x}\n\
             apic lvt timer={:#x} lint0={:#x} lint1={:#x} error={:#x}\n\
             apic timer initial={:#x} divide={:#x} next in {:?}",
            self.id,
            self.tpr,
            self.svr,
            bits(&self.isr),
            bits(&self.irr),
            self.esr,
            self.lvt[0],
            self.lvt[3],
            self.lvt[4],
            self.lvt[5],
            self.timer_init,
            self.timer_div,
            left,
        );
        if let Some(l) = self.legacy() {
            s.push_str(&format!(
                "\npic/pit: irq 0 next at {:?}",
                l.deadline()
                    .map(|d| d.saturating_duration_since(Instant::now()))
            ));
        }
        s
    }

    fn time_paused(&mut self, paused: Duration) {
        self.deadline = self.deadline.map(|t| t + paused);
        if let Some(mut l) = self.legacy() {
            l.time_paused(paused);
        }
    }

    fn set_base(&mut self, base: u64, enabled: bool) {
        if enabled && !self.global {
            self.power_up();
        }
        self.base = base;
        self.global = enabled;
        if !enabled {
            self.nmi = false;
            self.deadline = None;
        }
    }

    fn nmi_pending(&self) -> bool {
        self.nmi
    }

    fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi)
    }

    fn deadline(&self) -> Option<Instant> {
        let pit = self.legacy().and_then(|l| l.deadline());
        match (self.deadline, pit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x86::Local;

    fn w(l: &mut Lapic, reg: u64, v: u32) {
        l.write(APIC_BASE + reg, &v.to_le_bytes());
    }

    fn r(l: &mut Lapic, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        l.read(APIC_BASE + reg, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn priorities_and_eoi() {
        let lines = std::sync::Arc::new(Lines::default());
        let mut l = Lapic::new(0, lines.clone());
        lines.raise(0x40);
        assert!(!l.poll(), "software-disabled APIC drops fixed interrupts");
        w(&mut l, 0xf0, 0x1ff);
        lines.raise(0x40);
        lines.raise(0x80);
        assert!(l.poll());
        assert_eq!(l.ack(), Some(0x80));
        assert!(!l.pending(), "0x40 is below the in-service 0x80");
        w(&mut l, 0xb0, 0);
        assert_eq!(l.ack(), Some(0x40));
        w(&mut l, 0xb0, 0);
        w(&mut l, 0x80, 0x50);
        lines.raise(0x45);
        assert!(!l.poll(), "TPR masks the class");
        w(&mut l, 0x80, 0);
        assert!(l.pending());
        assert_eq!(r(&mut l, 0x30) & 0xff, 0x14);
    }

    /// NMIs: a self-NMI through the ICR (the vector field ignored), LINT1
    /// in NMI mode and masked, and none while globally disabled, after
    /// which the APIC comes back in its power-up state.
    #[test]
    fn nmis_and_global_disable() {
        let lines = std::sync::Arc::new(Lines::default());
        let mut l = Lapic::new(0, lines.clone());
        w(&mut l, 0xf0, 0x1ff);
        w(&mut l, 0x300, (1 << 18) | (4 << 8) | 0x33);
        assert!(l.nmi_pending());
        assert!(l.take_nmi());
        assert!(!l.take_nmi(), "delivered once");
        assert_eq!(l.ack(), None, "no fixed interrupt for it");
        lines.lint1(); // LINT1 in NMI mode (reset state)
        l.poll();
        assert!(l.take_nmi());
        w(&mut l, 0x360, LVT_MASKED | 0x400);
        lines.lint1();
        l.poll();
        assert!(!l.take_nmi(), "masked");
        l.set_base(APIC_BASE, false);
        assert!(!l.claims(APIC_BASE), "off the bus");
        assert!(!l.nmi_pending());
        l.set_base(APIC_BASE, true);
        assert!(l.claims(APIC_BASE));
        assert_eq!(r(&mut l, 0xf0), 0xff, "software-disabled after power-up");
        assert_eq!(r(&mut l, 0x360), LVT_MASKED, "LVT masked after power-up");
    }

    #[test]
    fn timer_one_shot_and_periodic() {
        let lines = std::sync::Arc::new(Lines::default());
        let mut l = Lapic::new(0, lines);
        w(&mut l, 0xf0, 0x1ff);
        w(&mut l, 0x3e0, 0xb); // divide by 1
        w(&mut l, 0x320, 0x30);
        w(&mut l, 0x380, 1_000_000); // 1 ms one-shot
        assert!(r(&mut l, 0x390) > 0);
        std::thread::sleep(Duration::from_millis(3));
        assert!(l.poll());
        assert_eq!(l.ack(), Some(0x30));
        w(&mut l, 0xb0, 0);
        assert_eq!(r(&mut l, 0x390), 0, "one-shot stopped");
        w(&mut l, 0x320, (1 << 17) | 0x31);
        w(&mut l, 0x380, 500_000);
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(2));
            assert!(l.poll());
            assert_eq!(l.ack(), Some(0x31));
            w(&mut l, 0xb0, 0);
        }
        assert!(l.deadline().is_some(), "periodic keeps running");
    }

    /// With the legacy platform the local APIC answers the I/O APIC's page:
    /// a device's ISA IRQ 4, routed on pin 4 to vector 0x44, and the PIT's
    /// IRQ 0 on pin 2 arrive as fixed interrupts; a level-triggered entry
    /// waits for the EOI.
    #[test]
    fn ioapic_routes_isa_irqs() {
        let lines = std::sync::Arc::new(Lines::default());
        let legacy = Arc::new(Mutex::new(Legacy::default()));
        let mut l = Lapic::new(0, lines.clone()).with_legacy(legacy.clone());
        w(&mut l, 0xf0, 0x1ff);
        w(&mut l, 0x350, LVT_MASKED); // LINT0 masked: the PICs are not used
        let io = |l: &mut Lapic, reg: u32, v: u32| {
            l.write(IOAPIC_BASE, &reg.to_le_bytes());
            l.write(IOAPIC_BASE + 0x10, &v.to_le_bytes());
        };
        assert!(l.claims(IOAPIC_BASE + 0x10));
        io(&mut l, 0x10 + 8, 0x44); // pin 4: vector 0x44, edge, APIC 0
        io(&mut l, 0x10 + 9, 0);
        let pin = crate::legacy::IrqPin {
            legacy: legacy.clone(),
            lines: lines.clone(),
            irq: 4,
        };
        vcpu::IrqLine::trigger(&pin).unwrap();
        assert!(l.poll());
        assert_eq!(l.ack(), Some(0x44));
        w(&mut l, 0xb0, 0);
        // Pin 2 level-triggered at vector 0x50: no second delivery before
        // the EOI.
        io(&mut l, 0x10 + 4, 0x50 | (1 << 15));
        io(&mut l, 0x10 + 5, 0);
        legacy.lock().unwrap().raise_isa(0);
        assert!(l.poll());
        assert_eq!(l.ack(), Some(0x50));
        legacy.lock().unwrap().raise_isa(0);
        assert!(!l.poll(), "Remote IRR set");
        w(&mut l, 0xb0, 0);
        legacy.lock().unwrap().raise_isa(0);
        assert!(l.poll(), "after the EOI");
        let mut b = [0u8; 4];
        l.write(IOAPIC_BASE, &1u32.to_le_bytes());
        l.read(IOAPIC_BASE + 0x10, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0017_0011, "version register");
    }
}
