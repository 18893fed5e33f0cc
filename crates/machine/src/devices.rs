//! Platform devices: the COM1 UART, isa-debug-exit, the power port and the
//! i8042 reset line.

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

/// The power port: a 16-bit write of `abi::port::POWER_OFF` powers the machine off.
pub struct Power;

impl Device for Power {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let mut v = [0u8; 2];
        let n = data.len().min(2);
        v[..n].copy_from_slice(&data[..n]);
        if offset == 0 && u16::from_le_bytes(v) == abi::port::POWER_OFF {
            Action::Stop(StopReason::PowerOff)
        } else {
            Action::Continue
        }
    }
}

/// Just enough of an i8042 keyboard controller for the reset line: the status
/// register reads "buffers empty" and command 0xfe resets (ends the run).
/// Registered at ports 0x60..=0x64.
pub struct I8042;

impl Device for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        if offset == 4 && data.first() == Some(&abi::port::I8042_RESET) {
            Action::Stop(StopReason::Reset)
        } else {
            Action::Continue
        }
    }
}

/// The platform's standard port-I/O devices.
pub struct Platform {
    pub serial: Arc<Mutex<Serial>>,
}

impl Platform {
    /// Creates the devices and maps them on `pio`.
    pub fn attach(
        pio: &mut crate::Bus,
        serial_irq: IrqTrigger,
        serial_out: SerialOut,
    ) -> Result<Self, crate::bus::Overlap> {
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_out)));
        pio.insert(abi::port::COM1 as u64, 8, serial.clone())?;
        pio.insert(
            abi::port::DEBUG_EXIT as u64,
            1,
            Arc::new(Mutex::new(DebugExit)),
        )?;
        pio.insert(abi::port::POWER as u64, 2, Arc::new(Mutex::new(Power)))?;
        pio.insert(0x60, 5, Arc::new(Mutex::new(I8042)))?;
        Ok(Platform { serial })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_ports() {
        let mut pio = crate::Bus::new();
        let sink = Capture::default();
        let p = Platform::attach(&mut pio, IrqTrigger::default(), Box::new(sink.clone())).unwrap();
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
        assert_eq!(pio.write(0x64, &[0xaa]), Some(Action::Continue));
    }
}
