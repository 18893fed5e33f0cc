//! The legacy interrupt platform of the engines on the software CPU, as KVM
//! models it in the kernel (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2): a pair of
//! 8259A PICs (ports 0x20-0x21 and 0xa0-0xa1, ELCR at 0x4d0-0x4d1, slave on
//! IRQ 2) and an 8254 PIT (ports 0x40-0x43, channel 2's gate and output in
//! port 0x61) counting at 1.193182 MHz on the host's monotonic clock.
//! Channel 0 drives IRQ 0; the PICs' output reaches the CPU through the
//! local APIC's LINT0 in ExtINT mode (the virtual-wire mode firmware sets up).
//! Devices raise ISA IRQs through [`IrqPin`] (the engine's `irq_line`); each
//! ISA IRQ also reaches the I/O APIC ([`crate::ioapic`]), which the guest
//! uses instead of the PICs once it leaves virtual-wire mode.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ioapic::{isa_pin, Ioapic};
use crate::lapic::Lines;

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;

/// Whether the engine, not the VMM, answers port `port`.
pub fn claims_port(port: u16) -> bool {
    matches!(
        port,
        0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 | 0x40..=0x43 | 0x61
    )
}

/// One 8259A.
#[derive(Default, Debug, Clone, Copy)]
struct Pic8259 {
    irr: u8,
    isr: u8,
    imr: u8,
    /// ICW2: the vector of IRQ 0 (low 3 bits zero).
    base: u8,
    /// The next data-port write is ICW2, ICW3 or ICW4 (2, 3, 4), or OCW1 (0).
    icw: u8,
    /// ICW1 said ICW4 follows / the chip is alone (no ICW3).
    want_icw4: bool,
    single: bool,
    auto_eoi: bool,
    /// OCW3: the command port reads the ISR (else the IRR).
    read_isr: bool,
    /// Edge/level control register (kept for the guest; lines are edges).
    elcr: u8,
}

impl Pic8259 {
    /// The highest-priority requested, unmasked IRQ above everything in
    /// service (fixed priority: IRQ 0 highest).
    fn ready(&self) -> Option<u8> {
        let req = self.irr & !self.imr;
        if req == 0 {
            return None;
        }
        let irq = req.trailing_zeros() as u8;
        let served = if self.isr == 0 {
            8
        } else {
            self.isr.trailing_zeros() as u8
        };
        (irq < served).then_some(irq)
    }

    fn write_cmd(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1.
            self.want_icw4 = v & 1 != 0;
            self.single = v & 2 != 0;
            self.icw = 2;
            self.imr = 0;
            self.isr = 0;
            self.irr = 0;
            self.auto_eoi = false;
            self.read_isr = false;
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & 2 != 0 {
                self.read_isr = v & 1 != 0;
            }
        } else {
            // OCW2: EOIs (the rotations count as EOIs; priorities stay fixed).
            match v >> 5 {
                1 | 5 if self.isr != 0 => self.isr &= self.isr - 1,
                3 | 7 => self.isr &= !(1 << (v & 7)),
                _ => {}
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.icw {
            2 => {
                self.base = v & 0xf8;
                self.icw = if !self.single {
                    3
                } else if self.want_icw4 {
                    4
                } else {
                    0
                };
            }
            3 => self.icw = if self.want_icw4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 2 != 0;
                self.icw = 0;
            }
            _ => self.imr = v,
        }
    }

    fn read_cmd(&self) -> u8 {
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }

    /// INTA for `irq`: from requested to in service.
    fn accept(&mut self, irq: u8) {
        self.irr &= !(1 << irq);
        if !self.auto_eoi {
            self.isr |= 1 << irq;
        }
    }
}

/// The master and slave 8259A.
#[derive(Default, Debug)]
pub struct Pic {
    master: Pic8259,
    slave: Pic8259,
}

impl Pic {
    /// An edge on ISA IRQ `irq` (0-15).
    pub fn raise(&mut self, irq: u8) {
        match irq {
            0..=7 => self.master.irr |= 1 << irq,
            8..=15 => self.slave.irr |= 1 << (irq - 8),
            _ => {}
        }
    }

    /// The master's view: its IRR with the slave's output on IRQ 2.
    fn master_ready(&self) -> Option<u8> {
        let mut m = self.master;
        if self.slave.ready().is_some() {
            m.irr |= 1 << 2;
        }
        m.ready()
    }

    /// The INTR output.
    pub fn intr(&self) -> bool {
        self.master_ready().is_some()
    }

    /// The interrupt acknowledge cycle: the vector (IRQ 7's, spurious, if the
    /// request went away).
    pub fn ack(&mut self) -> u8 {
        match self.master_ready() {
            Some(2) if self.slave.ready().is_some() => {
                let irq = self.slave.ready().unwrap_or(7);
                self.slave.accept(irq);
                self.master.accept(2);
                self.slave.base | irq
            }
            Some(irq) => {
                self.master.accept(irq);
                self.master.base | irq
            }
            None => self.master.base | 7,
        }
    }

    fn read(&self, port: u16) -> u8 {
        match port {
            0x20 => self.master.read_cmd(),
            0x21 => self.master.imr,
            0xa0 => self.slave.read_cmd(),
            0xa1 => self.slave.imr,
            0x4d0 => self.master.elcr,
            0x4d1 => self.slave.elcr,
            _ => 0xff,
        }
    }

    fn write(&mut self, port: u16, v: u8) {
        match port {
            0x20 => self.master.write_cmd(v),
            0x21 => self.master.write_data(v),
            0xa0 => self.slave.write_cmd(v),
            0xa1 => self.slave.write_data(v),
            // IRQ 0, 1, 2, 8 and 13 are always edge-triggered.
            0x4d0 => self.master.elcr = v & 0xf8,
            0x4d1 => self.slave.elcr = v & 0xde,
            _ => {}
        }
    }
}

/// One 8254 counter.
#[derive(Debug)]
struct Channel {
    mode: u8,
    /// Access: 1 low byte, 2 high byte, 3 low then high.
    access: u8,
    /// The count loaded (0 means 65536).
    reload: u32,
    /// When counting from `reload` began; `None` before a count is written
    /// (or while the gate is low).
    start: Option<Instant>,
    gate: bool,
    /// The low byte of a count being written in two steps.
    write_lo: Option<u8>,
    /// A latched count (or status) and which byte is read next.
    latch: Option<u16>,
    status: Option<u8>,
    read_hi: bool,
    /// Channel 0: when IRQ 0 next rises.
    next_edge: Option<Instant>,
}

impl Channel {
    fn new(gate: bool) -> Channel {
        Channel {
            mode: 0,
            access: 3,
            reload: 0x1_0000,
            start: None,
            gate,
            write_lo: None,
            latch: None,
            status: None,
            read_hi: false,
            next_edge: None,
        }
    }

    fn ticks(&self, now: Instant) -> Option<u64> {
        self.start.map(|s| {
            (now.saturating_duration_since(s).as_nanos() as u64).saturating_mul(PIT_HZ)
                / 1_000_000_000
        })
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3 | 6 | 7)
    }

    /// The counting element.
    fn count(&self, now: Instant) -> u16 {
        let r = self.reload as u64;
        match self.ticks(now) {
            None => self.reload as u16,
            Some(t) if self.periodic() => {
                let step = if self.mode & 3 == 3 { 2 } else { 1 };
                (r - (t * step) % r) as u16
            }
            // One-shot modes wrap around through 0xffff after terminal count.
            Some(t) => (r.wrapping_sub(t) & 0xffff) as u16,
        }
    }

    /// The OUT pin.
    fn out(&self, now: Instant) -> bool {
        let r = self.reload as u64;
        match (self.mode, self.ticks(now)) {
            (0 | 1, None) => false,
            (_, None) => true,
            (0 | 1, Some(t)) => t >= r,
            (4 | 5, Some(t)) => t != r,
            (2 | 6, Some(t)) => r < 2 || t % r != r - 1,
            (_, Some(t)) => t % r < r.div_ceil(2),
        }
    }

    /// Time of tick `t` after `start`.
    fn at(start: Instant, t: u64) -> Instant {
        start + Duration::from_nanos(t.saturating_mul(1_000_000_000) / PIT_HZ)
    }

    /// Loads the count (counting starts now, if the gate is high).
    fn load(&mut self, count: u16, now: Instant) {
        self.reload = if count == 0 { 0x1_0000 } else { count as u32 };
        if self.mode & 3 == 3 && self.reload == 1 {
            self.reload = 2;
        }
        self.start = self.gate.then_some(now);
        self.next_edge = self.start.map(|s| {
            // Periodic modes: the end of each period; mode 0/4: terminal count.
            Self::at(s, self.reload as u64)
        });
    }

    fn write(&mut self, v: u8, now: Instant) {
        match self.access {
            1 => self.load(v as u16, now),
            2 => self.load((v as u16) << 8, now),
            _ => match self.write_lo.take() {
                None => self.write_lo = Some(v),
                Some(lo) => self.load(lo as u16 | ((v as u16) << 8), now),
            },
        }
    }

    fn read(&mut self, now: Instant) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        let v = self.latch.unwrap_or_else(|| self.count(now));
        match self.access {
            1 => {
                self.latch = None;
                v as u8
            }
            2 => {
                self.latch = None;
                (v >> 8) as u8
            }
            _ => {
                let b = if self.read_hi {
                    (v >> 8) as u8
                } else {
                    v as u8
                };
                if self.read_hi {
                    self.latch = None;
                }
                self.read_hi = !self.read_hi;
                b
            }
        }
    }

    fn set_gate(&mut self, gate: bool, now: Instant) {
        if gate && !self.gate && self.start.is_none() && self.write_lo.is_none() {
            // A rising gate starts (or, in the periodic and triggered
            // modes, restarts) counting.
            self.start = Some(now);
        } else if gate && !self.gate && self.mode != 0 {
            self.start = Some(now);
        } else if !gate && self.periodic() {
            self.start = None;
        }
        self.gate = gate;
        self.next_edge = self.start.map(|s| Self::at(s, self.reload as u64));
    }
}

/// The 8254 and port 0x61.
#[derive(Debug)]
pub struct Pit {
    ch: [Channel; 3],
    /// Port 0x61 bits 0 (gate 2) and 1 (speaker data).
    port61: u8,
    /// The refresh-request bit of port 0x61 toggles on each read.
    refresh: bool,
}

impl Default for Pit {
    fn default() -> Pit {
        Pit {
            ch: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
            refresh: false,
        }
    }
}

impl Pit {
    fn control(&mut self, v: u8, now: Instant) {
        let sel = (v >> 6) as usize;
        if sel == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
            for (k, c) in self.ch.iter_mut().enumerate() {
                if v & (2 << k) == 0 {
                    continue;
                }
                if v & 0x10 == 0 && c.status.is_none() {
                    let null = c.start.is_none() as u8;
                    c.status = Some(
                        ((c.out(now) as u8) << 7) | (null << 6) | (c.access << 4) | (c.mode << 1),
                    );
                }
                if v & 0x20 == 0 && c.latch.is_none() {
                    c.latch = Some(c.count(now));
                    c.read_hi = false;
                }
            }
            return;
        }
        let c = &mut self.ch[sel];
        let access = (v >> 4) & 3;
        if access == 0 {
            if c.latch.is_none() {
                c.latch = Some(c.count(now));
                c.read_hi = false;
            }
            return;
        }
        c.access = access;
        c.mode = (v >> 1) & 7;
        c.write_lo = None;
        c.latch = None;
        c.read_hi = false;
        c.start = None;
        c.next_edge = None;
    }

    /// Whether channel 0 had a rising edge (IRQ 0) up to `now` (missed
    /// periods collapse into one).
    fn tick(&mut self, now: Instant) -> bool {
        let c = &mut self.ch[0];
        let Some(edge) = c.next_edge else {
            return false;
        };
        if now < edge {
            return false;
        }
        c.next_edge = match (c.periodic(), c.start) {
            (true, Some(s)) => {
                let t = c.ticks(now).unwrap_or(0);
                let r = c.reload as u64;
                Some(Channel::at(s, (t / r + 1) * r))
            }
            _ => None,
        };
        true
    }

    fn read(&mut self, port: u16, now: Instant) -> u8 {
        match port {
            0x40..=0x42 => self.ch[(port - 0x40) as usize].read(now),
            0x61 => {
                self.refresh = !self.refresh;
                self.port61 | ((self.refresh as u8) << 4) | ((self.ch[2].out(now) as u8) << 5)
            }
            _ => 0xff,
        }
    }

    fn write(&mut self, port: u16, v: u8, now: Instant) {
        match port {
            0x40..=0x42 => self.ch[(port - 0x40) as usize].write(v, now),
            0x43 => self.control(v, now),
            0x61 => {
                self.port61 = v & 3;
                self.ch[2].set_gate(v & 1 != 0, now);
            }
            _ => {}
        }
    }
}

/// The PICs, the I/O APIC and the PIT of one VM.
#[derive(Debug)]
pub struct Legacy {
    /// The master and slave 8259A.
    pub pic: Pic,
    /// The I/O APIC (ID 1, after the one local APIC).
    pub ioapic: Ioapic,
    /// The 8254.
    pub pit: Pit,
}

impl Default for Legacy {
    fn default() -> Legacy {
        Legacy {
            pic: Pic::default(),
            ioapic: Ioapic::new(1),
            pit: Pit::default(),
        }
    }
}

impl Legacy {
    /// Brings the PIT's IRQ 0 up to `now`; true if the PICs request an
    /// interrupt.
    pub fn poll(&mut self, now: Instant) -> bool {
        if self.pit.tick(now) {
            self.raise_isa(0);
        }
        self.pic.intr()
    }

    /// The vCPU was stopped for `paused` (a debugger): the counters go on
    /// from where they were, as if no time had passed.
    pub fn time_paused(&mut self, paused: Duration) {
        for c in &mut self.pit.ch {
            c.start = c.start.map(|t| t + paused);
            c.next_edge = c.next_edge.map(|t| t + paused);
        }
    }

    /// An edge on ISA IRQ `irq`: to the PICs, and to the I/O APIC's pin for
    /// it ([`isa_pin`]).
    pub fn raise_isa(&mut self, irq: u8) {
        self.pic.raise(irq);
        self.ioapic.raise(isa_pin(irq));
    }

    /// When channel 0 next raises IRQ 0.
    pub fn deadline(&self) -> Option<Instant> {
        self.pit.ch[0].next_edge
    }

    /// A byte read of one of the chips' ports.
    pub fn read(&mut self, port: u16) -> u8 {
        let now = Instant::now();
        match port {
            0x40..=0x43 | 0x61 => self.pit.read(port, now),
            _ => self.pic.read(port),
        }
    }

    /// A byte write of one of the chips' ports.
    pub fn write(&mut self, port: u16, v: u8) {
        let now = Instant::now();
        match port {
            0x40..=0x43 | 0x61 => self.pit.write(port, v, now),
            _ => self.pic.write(port, v),
        }
    }

    /// Port input into (or output from) `data`, `size` bytes per access
    /// from `port` up (the chips' registers are bytes).
    pub fn transfer(&mut self, port: u16, size: usize, data: &mut [u8], input: bool) {
        let size = size.max(1);
        for (k, b) in data.iter_mut().enumerate() {
            let p = port.wrapping_add((k % size) as u16);
            if input {
                *b = self.read(p);
            } else {
                self.write(p, *b);
            }
        }
    }
}

/// ISA IRQ `irq` of a VM's PICs, for a device: an edge, and a wake-up for a
/// halted vCPU.
pub struct IrqPin {
    /// The VM's PICs.
    pub legacy: Arc<Mutex<Legacy>>,
    /// The vCPU's lines (to wake it).
    pub lines: Arc<Lines>,
    /// The ISA IRQ (0-15).
    pub irq: u8,
}

impl vcpu::IrqLine for IrqPin {
    fn trigger(&self) -> std::io::Result<()> {
        self.legacy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .raise_isa(self.irq);
        self.lines.external();
        Ok(())
    }
}

/// The usual initialisation of the PICs (port, value): vectors 0x20-0x27 on
/// the master and 0x28-0x2f on the slave, cascade on IRQ 2, 8086 mode.
pub const PIC_INIT: [(u16, u8); 8] = [
    (0x20, 0x11),
    (0x21, 0x20),
    (0x21, 0x04),
    (0x21, 0x01),
    (0xa0, 0x11),
    (0xa1, 0x28),
    (0xa1, 0x02),
    (0xa1, 0x01),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn init(p: &mut Pic) {
        for (port, v) in PIC_INIT {
            p.write(port, v);
        }
    }

    #[test]
    fn pic_priorities_masks_cascade_and_eoi() {
        let mut p = Pic::default();
        init(&mut p);
        assert!(!p.intr());
        p.raise(4);
        p.raise(1);
        assert!(p.intr());
        assert_eq!(p.ack(), 0x21, "IRQ 1 before IRQ 4");
        assert!(!p.intr(), "IRQ 4 waits for IRQ 1's EOI");
        p.write(0x20, 0x0b); // OCW3: read ISR
        assert_eq!(p.read(0x20), 0x02);
        p.write(0x20, 0x20); // non-specific EOI
        assert_eq!(p.ack(), 0x24);
        p.write(0x20, 0x64); // specific EOI for IRQ 4
        assert_eq!(p.read(0x20), 0);
        // Masked lines wait; the slave comes through IRQ 2.
        p.write(0x21, 0x01);
        p.raise(0);
        assert!(!p.intr());
        p.raise(12);
        assert_eq!(p.ack(), 0x2c);
        p.write(0x20, 0x0a); // read IRR
        assert_eq!(p.read(0x20), 0x01, "IRQ 0 still requested, masked");
        assert_eq!(p.read(0x21), 0x01);
        p.write(0xa0, 0x20);
        p.write(0x20, 0x20);
        p.write(0x21, 0x00);
        assert_eq!(p.ack(), 0x20);
        // Nothing requested: the spurious IRQ 7 vector.
        p.write(0x20, 0x20);
        assert_eq!(p.ack(), 0x27);
    }

    #[test]
    fn pit_channel2_one_shot_and_gate_in_port_61() {
        let mut pit = Pit::default();
        let t0 = Instant::now();
        pit.write(0x61, 0x01, t0); // gate 2 high
        pit.write(0x43, 0xb0, t0); // channel 2, lo/hi, mode 0
        pit.write(0x42, 0xe8, t0);
        pit.write(0x42, 0x03, t0); // 1000 ticks: about 838 us
        assert_eq!(pit.read(0x61, t0) & 0x20, 0, "OUT2 low while counting");
        let mid = t0 + Duration::from_micros(419);
        pit.write(0x43, 0x80, mid); // latch channel 2
        let lo = pit.read(0x42, mid) as u16;
        let hi = pit.read(0x42, mid) as u16;
        let c = lo | (hi << 8);
        assert!((495..=505).contains(&c), "half-way count {c}");
        let end = t0 + Duration::from_micros(840);
        assert_ne!(pit.read(0x61, end) & 0x20, 0, "OUT2 high at terminal count");
        // Read-back of the status: OUT high, lo/hi access, mode 0.
        pit.write(0x43, 0xe8, end);
        assert_eq!(pit.read(0x42, end), 0x80 | 0x30);
    }

    #[test]
    fn pit_channel0_periodic_raises_irq0() {
        let mut l = Legacy::default();
        init(&mut l.pic);
        let t0 = Instant::now();
        l.pit.write(0x43, 0x34, t0); // channel 0, lo/hi, mode 2
        l.pit.write(0x40, 0x9c, t0);
        l.pit.write(0x40, 0x2e, t0); // 11932 ticks: 10 ms
        assert!(!l.poll(t0));
        let d = l.deadline().unwrap();
        assert!(d > t0 + Duration::from_micros(9_990) && d < t0 + Duration::from_micros(10_010));
        assert!(
            l.poll(t0 + Duration::from_millis(35)),
            "IRQ 0 after a period"
        );
        assert_eq!(l.pic.ack(), 0x20);
        let next = l.deadline().unwrap();
        assert!(next > t0 + Duration::from_millis(39) && next < t0 + Duration::from_millis(41));
        l.pic.write(0x20, 0x20);
        assert!(
            !l.poll(t0 + Duration::from_millis(36)),
            "missed periods collapse"
        );
    }
}
