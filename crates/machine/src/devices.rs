//! Platform devices: the COM1 UART, isa-debug-exit, the ACPI PM registers
//! (power-off, PM timer), the reset control register, port 0x92, and
//! [`Platform`], which maps them with the HPET, the CMOS RTC and the i8042
//! keyboard controller.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vcpu::IrqLine;
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::bus::{Action, Device, StopReason};

/// Raises the UART's IRQ through the engine's interrupt controller, if it has one
/// (without one the guest polls the line status register).
#[derive(Clone, Default)]
pub struct IrqTrigger(pub Option<Arc<dyn IrqLine>>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        match &self.0 {
            Some(line) => line.trigger(),
            None => Ok(()),
        }
    }
}

pub type SerialOut = Box<dyn Write + Send>;

/// An output that keeps what is written to it, shared by its clones: a
/// console to read back (tests, tools).
#[derive(Clone, Debug, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A 16550A UART (vm-superio) at 8 consecutive ports.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, SerialOut>,
}

impl Serial {
    pub fn new(irq: IrqTrigger, out: SerialOut) -> Self {
        Serial {
            uart: vm_superio::Serial::new(irq, out),
        }
    }

    /// Queues host input for the guest; returns how many bytes the FIFO took.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl Device for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.uart.read((offset as u8).wrapping_add(i as u8));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        for (i, &b) in data.iter().enumerate() {
            // A failed host write loses the byte, as a disconnected line would; the
            // guest is not told and the VMM goes on.
            let _ = self.uart.write((offset as u8).wrapping_add(i as u8), b);
        }
        Action::Continue
    }
}

/// QEMU's isa-debug-exit: a write of v stops the run with status (v << 1) | 1.
pub struct DebugExit;

impl Device for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        Action::Stop(StopReason::DebugExit(u32::from_le_bytes(v)))
    }
}

/// The ACPI fixed-hardware registers at [`crate::acpi::PM_BASE`]: the PM1a
/// event block (PM1_STS, write 1 to clear; PM1_EN), the PM1a control block
/// (PM1_CNT at [`abi::port::POWER`]: SCI_EN reads 1, the machine is always
/// in ACPI mode; SLP_EN with SLP_TYP 0, the DSDT's S5, powers off: a 16-bit
/// write of [`abi::port::POWER_OFF`]) and the 24-bit PM timer at 3.579545 MHz
/// on the VM's [`vcpu::GuestClock`] (it stands while a debugger holds the
/// guest). Byte and word accesses work on each.
///
/// The fixed power button ([`Pm::press_power_button`]) sets PWRBTN_STS. The
/// SCI is the level of (PM1_STS & PM1_EN) for the events visor has (the
/// power button); the device signals the SCI's line (ISA IRQ 9) when that
/// level rises: a press the guest has enabled, or an enable of a pending
/// press. The guest lowers it by clearing the status bit (write 1).
pub struct Pm {
    regs: [u8; 8],
    clock: Arc<vcpu::GuestClock>,
    sci: Option<Arc<dyn IrqLine>>,
    /// The SCI's level now.
    sci_level: bool,
    /// Times the SCI's line was signalled.
    pub sci_raised: u64,
}

/// PM1_CNT bits.
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
/// PM1_STS and PM1_EN: the fixed power button's bit.
pub const PWRBTN: u16 = 1 << 8;
/// The PM timer's frequency.
pub const PM_TIMER_HZ: u128 = 3_579_545;

impl Default for Pm {
    fn default() -> Self {
        Pm::new(Arc::default(), None)
    }
}

impl Pm {
    /// The registers, with the PM timer on the guest's `clock`, raising
    /// the SCI on `sci` (the engine's ISA IRQ 9 line, if it has an
    /// interrupt controller).
    pub fn new(clock: Arc<vcpu::GuestClock>, sci: Option<Arc<dyn IrqLine>>) -> Pm {
        Pm {
            regs: [0; 8],
            clock,
            sci,
            sci_level: false,
            sci_raised: 0,
        }
    }

    fn timer(&self) -> u32 {
        ((self.clock.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) & 0xff_ffff) as u32
    }

    fn word(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.regs[at], self.regs[at + 1]])
    }

    /// PM1_STS.
    pub fn status(&self) -> u16 {
        self.word(0)
    }

    /// PM1_EN.
    pub fn enable(&self) -> u16 {
        self.word(2)
    }

    /// The SCI's level: an enabled event's status is set (SCI_EN is always
    /// set).
    pub fn sci_level(&self) -> bool {
        self.status() & self.enable() & PWRBTN != 0
    }

    /// Whether the guest listens to the power button (PWRBTN_EN set: an
    /// ACPI OS installed its handler).
    pub fn power_button_enabled(&self) -> bool {
        self.enable() & PWRBTN != 0
    }

    /// A press of the fixed power button: PWRBTN_STS is set, and the SCI
    /// raised if the guest enabled the event.
    pub fn press_power_button(&mut self) {
        self.regs[1] |= (PWRBTN >> 8) as u8;
        self.update_sci();
    }

    /// Signals the SCI's line on a rising level.
    fn update_sci(&mut self) {
        let level = self.sci_level();
        if level && !self.sci_level {
            self.sci_raised += 1;
            if let Some(line) = &self.sci {
                // A failed signal loses this edge, as a disconnected line
                // would; the status bit stays set for the guest to see.
                let _ = line.trigger();
            }
        }
        self.sci_level = level;
    }
}

impl Device for Pm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let tmr = self.timer().to_le_bytes();
        for (k, b) in data.iter_mut().enumerate() {
            let at = offset as usize + k;
            *b = match at {
                4 => self.regs[4] | SCI_EN as u8,
                0..=7 => self.regs[at],
                8..=11 => tmr[at - 8],
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let mut control = false;
        for (k, &b) in data.iter().enumerate() {
            match offset as usize + k {
                // PM1_STS: write 1 to clear.
                at @ 0..=1 => self.regs[at] &= !b,
                at @ 2..=3 => self.regs[at] = b,
                at @ 4..=5 => {
                    self.regs[at] = b;
                    control = true;
                }
                _ => {}
            }
        }
        self.update_sci();
        let cnt = u16::from_le_bytes([self.regs[4], self.regs[5]]);
        if control && cnt & SLP_EN != 0 {
            // SLP_EN is write-only: it reads 0.
            self.regs[5] &= !((SLP_EN >> 8) as u8);
            if (cnt >> 10) & 7 == 0 {
                return Action::Stop(StopReason::PowerOff);
            }
        }
        Action::Continue
    }
}

/// The reset control register at [`crate::acpi::RESET_PORT`] (the FADT's
/// reset register): a write with bit 2 (reset CPU) set resets.
#[derive(Default)]
pub struct ResetControl(u8);

impl Device for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        let v = data.first().copied().unwrap_or(0);
        self.0 = v & !4;
        if v & 4 != 0 {
            Action::Stop(StopReason::Reset)
        } else {
            Action::Continue
        }
    }
}

/// Port 0x92, System Control Port A: bit 0 set resets the machine (fast
/// reset); bit 1 is the fast A20 gate. visor's memory never wraps at 1 MiB,
/// so A20 is always enabled and bit 1 reads 1.
#[derive(Default)]
pub struct PortA;

/// The A20 gate bit of port 0x92.
pub const A20: u8 = 2;

impl Device for PortA {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(A20);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
        if data.first().is_some_and(|v| v & 1 != 0) {
            Action::Stop(StopReason::Reset)
        } else {
            Action::Continue
        }
    }
}

/// The platform's standard devices.
pub struct Platform {
    pub serial: Arc<Mutex<Serial>>,
    /// The ACPI PM registers (the power button).
    pub pm: Arc<Mutex<Pm>>,
}

impl Platform {
    /// Creates the devices and maps them on `pio` and `mmio`; `isa_irqs`
    /// holds the engine's line of ISA IRQ n at index n, where it has one;
    /// the timers (HPET, PM timer, RTC) keep the guest's time on `clock`;
    /// `layout` is the guest's RAM (the RTC's NVRAM gives its size).
    pub fn attach(
        pio: &mut crate::Bus,
        mmio: &mut crate::Bus,
        isa_irqs: crate::hpet::IsaLines,
        serial_out: SerialOut,
        clock: Arc<vcpu::GuestClock>,
        layout: &crate::MemoryLayout,
    ) -> Result<Self, crate::bus::Overlap> {
        let serial_irq = IrqTrigger(isa_irqs.get(4).cloned().flatten());
        let sci = isa_irqs
            .get(crate::acpi::SCI_IRQ as usize)
            .cloned()
            .flatten();
        let rtc_irq = isa_irqs.get(crate::rtc::IRQ as usize).cloned().flatten();
        let kbd_irq = isa_irqs
            .get(crate::i8042::KBD_IRQ as usize)
            .cloned()
            .flatten();
        let aux_irq = isa_irqs
            .get(crate::i8042::AUX_IRQ as usize)
            .cloned()
            .flatten();
        let hpet = crate::hpet::Hpet::new(isa_irqs, clock.clone());
        let rtc_irq = rtc_irq.map(|line| -> Arc<dyn IrqLine> {
            Arc::new(crate::rtc::RtcLine {
                line,
                legacy: hpet.legacy_replacement(),
            })
        });
        mmio.insert(crate::acpi::HPET_ADDR, 0x400, Arc::new(Mutex::new(hpet)))?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_out)));
        pio.insert(abi::port::COM1 as u64, 8, serial.clone())?;
        pio.insert(
            abi::port::DEBUG_EXIT as u64,
            1,
            Arc::new(Mutex::new(DebugExit)),
        )?;
        let pm = Arc::new(Mutex::new(Pm::new(clock.clone(), sci)));
        pio.insert(crate::acpi::PM_BASE as u64, 12, pm.clone())?;
        pio.insert(
            crate::acpi::RESET_PORT as u64,
            1,
            Arc::new(Mutex::new(ResetControl::default())),
        )?;
        pio.insert(0x92, 1, Arc::new(Mutex::new(PortA)))?;
        pio.insert(
            crate::i8042::DATA_PORT as u64,
            5,
            Arc::new(Mutex::new(crate::i8042::I8042::new(kbd_irq, aux_irq))),
        )?;
        let low = layout.low_end();
        pio.insert(
            crate::rtc::INDEX_PORT as u64,
            2,
            Arc::new(Mutex::new(crate::rtc::Rtc::new(
                rtc_irq,
                low,
                layout.size - low,
                clock.clone(),
            ))),
        )?;
        Ok(Platform { serial, pm })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Edges;

    #[test]
    fn platform_ports() {
        let (mut pio, mut mmio) = (crate::Bus::new(), crate::Bus::new());
        let sink = Capture::default();
        let layout = crate::MemoryLayout::new(64 << 20).unwrap();
        let p = Platform::attach(
            &mut pio,
            &mut mmio,
            Vec::new(),
            Box::new(sink.clone()),
            Arc::default(),
            &layout,
        )
        .unwrap();
        let mut cap = [0u8; 4];
        assert!(mmio.read(crate::acpi::HPET_ADDR, &mut cap));
        assert_eq!(u32::from_le_bytes(cap), crate::acpi::HPET_BLOCK_ID);
        for &c in b"hi" {
            assert_eq!(pio.write(0x3f8, &[c]), Some(Action::Continue));
        }
        assert_eq!(sink.contents(), b"hi");
        assert_eq!(p.serial.lock().unwrap().enqueue_input(b"k"), 1);
        let mut lsr = [0];
        pio.read(0x3fd, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready after input");
        let mut d = [0];
        pio.read(0x3f8, &mut d);
        assert_eq!(d[0], b'k');
        assert_eq!(
            pio.write(0xf4, &[3]),
            Some(Action::Stop(StopReason::DebugExit(3)))
        );
        assert_eq!(
            pio.write(0x604, &[0, 0x20]),
            Some(Action::Stop(StopReason::PowerOff))
        );
        assert_eq!(pio.write(0x604, &[1, 0]), Some(Action::Continue));
        assert_eq!(
            pio.write(0x64, &[0xfe]),
            Some(Action::Stop(StopReason::Reset))
        );
        // The i8042 answers its self-test.
        assert_eq!(pio.write(0x64, &[0xaa]), Some(Action::Continue));
        let mut kbc = [0u8];
        pio.read(0x64, &mut kbc);
        assert_eq!(kbc[0] & 1, 1, "a byte waits");
        pio.read(0x60, &mut kbc);
        assert_eq!(kbc[0], 0x55);
        // ACPI: SCI_EN reads 1; SLP_TYP 5 with SLP_EN is no sleep state
        // visor has; SLP_TYP 0 (S5) powers off, also as two byte writes.
        let mut cnt = [0u8; 2];
        pio.read(0x604, &mut cnt);
        assert_eq!(cnt[0] & 1, 1);
        assert_eq!(pio.write(0x604, &[0, 0x34]), Some(Action::Continue));
        assert_eq!(pio.write(0x604, &[0, 0]), Some(Action::Continue));
        assert_eq!(pio.write(0x604, &[0]), Some(Action::Continue));
        assert_eq!(
            pio.write(0x605, &[0x20]),
            Some(Action::Stop(StopReason::PowerOff))
        );
        // PM1_STS is write-1-to-clear; PM1_EN keeps what is written.
        assert_eq!(pio.write(0x602, &[0x20, 1]), Some(Action::Continue));
        let mut en = [0u8; 2];
        pio.read(0x602, &mut en);
        assert_eq!(en, [0x20, 1]);
        // The PM timer counts (3.58 MHz: 2 ms are about 7,159 ticks).
        let mut t0 = [0u8; 4];
        pio.read(0x608, &mut t0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut t1 = [0u8; 4];
        pio.read(0x608, &mut t1);
        let d = u32::from_le_bytes(t1).wrapping_sub(u32::from_le_bytes(t0)) & 0xff_ffff;
        assert!(d >= 7_000, "{d} ticks in 2 ms");
        // The reset register and port 0x92.
        assert_eq!(pio.write(0xcf9, &[2]), Some(Action::Continue));
        assert_eq!(
            pio.write(0xcf9, &[6]),
            Some(Action::Stop(StopReason::Reset))
        );
        let mut a = [0u8];
        pio.read(0x92, &mut a);
        assert_eq!(a[0], A20);
        assert_eq!(pio.write(0x92, &[A20]), Some(Action::Continue));
        assert_eq!(
            pio.write(0x92, &[A20 | 1]),
            Some(Action::Stop(StopReason::Reset))
        );
        // The RTC: register D's VRT, and the RAM above 16 MiB in 64 KiB
        // units (48 MiB: 0x300) in bytes 0x34-0x35.
        let cmos = |r: u8| {
            assert_eq!(pio.write(0x70, &[r]), Some(Action::Continue));
            let mut v = [0u8];
            assert!(pio.read(0x71, &mut v));
            v[0]
        };
        assert_eq!(cmos(0x0d), 0x80);
        assert_eq!([cmos(0x34), cmos(0x35)], [0x00, 0x03]);
    }

    /// PM1_STS is write-1-to-clear, PM1_EN read/write; the SCI is the level
    /// of the enabled status bits, and its line is signalled when the level
    /// rises (a press the guest enabled, or an enable of a pending press).
    #[test]
    fn power_button_and_sci() {
        let line = Arc::new(Edges::default());
        let mut pm = Pm::new(Arc::default(), Some(line.clone()));
        let sts = |pm: &mut Pm| {
            let mut b = [0u8; 2];
            pm.read(0, &mut b);
            u16::from_le_bytes(b)
        };
        // Pressed while the guest has not enabled the event: the status is
        // set, no SCI.
        pm.press_power_button();
        assert_eq!(sts(&mut pm), PWRBTN);
        assert!(!pm.sci_level());
        assert_eq!(line.count(), 0);
        // Writing 0 clears nothing; writing 1 to another bit neither.
        assert_eq!(pm.write(0, &[0, 0]), Action::Continue);
        assert_eq!(pm.write(0, &[0xff, 0xfe]), Action::Continue);
        assert_eq!(sts(&mut pm), PWRBTN);
        // Enabling the pending event raises the SCI, once.
        pm.write(2, &PWRBTN.to_le_bytes());
        assert!(pm.sci_level());
        assert_eq!(line.count(), 1);
        pm.write(2, &PWRBTN.to_le_bytes());
        pm.press_power_button();
        assert_eq!(line.count(), 1, "the level stayed high: no new edge");
        let mut en = [0u8; 2];
        pm.read(2, &mut en);
        assert_eq!(u16::from_le_bytes(en), PWRBTN);
        // The guest's handler clears the status (write 1, byte access to
        // the high byte): the level falls.
        pm.write(1, &[1]);
        assert_eq!(sts(&mut pm), 0);
        assert!(!pm.sci_level());
        // The next press raises it again.
        pm.press_power_button();
        assert!(pm.sci_level());
        assert_eq!(line.count(), 2);
        assert_eq!(pm.sci_raised, 2);
        // Disabling the event lowers the level without clearing the status.
        pm.write(2, &[0, 0]);
        assert!(!pm.sci_level());
        assert_eq!(sts(&mut pm), PWRBTN);
        assert!(!pm.power_button_enabled());
    }
}
