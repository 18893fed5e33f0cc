//! Port-I/O and MMIO buses: address ranges mapped to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What the VMM should do after a device access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The guest asked the platform to stop.
    Stop(StopReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Power-off through the power port: exit status 0.
    PowerOff,
    /// Reset through the i8042 controller (Linux `reboot=k`): exit status 0.
    Reset,
    /// isa-debug-exit write of this value: exit status (value << 1) | 1.
    DebugExit(u32),
    /// The paravirtual `sched_op(SHUTDOWN, code)`: exit status `code` (low byte).
    Shutdown(u8),
}

impl StopReason {
    pub fn exit_status(self) -> i32 {
        match self {
            StopReason::PowerOff | StopReason::Reset => 0,
            StopReason::DebugExit(v) => (((v as u64) << 1) | 1) as i32,
            StopReason::Shutdown(code) => code as i32,
        }
    }
}

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait Device: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> Action;
}

pub type SharedDevice = Arc<Mutex<dyn Device>>;

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

/// One address space (port I/O or MMIO).
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        if len == 0 || self.ranges.range(..end).any(|(&b, &(l, _))| b + l > base) {
            return Err(Overlap { base, len });
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((base, dev))
    }

    /// Reads from `addr`; returns false (and fills all-ones, as an open bus does)
    /// when no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, dev)) => {
                lock(dev).read(addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to `addr`; `None` when no device claims it (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<Action> {
        let (base, dev) = self.find(addr)?;
        Some(lock(dev).write(addr - base, data))
    }
}

fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn Device + 'static> {
    // A device whose lock was poisoned by a panicking thread still has consistent
    // register state for our simple devices; keep serving it.
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl Device for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> Action {
            self.0 = data[0];
            Action::Continue
        }
    }

    #[test]
    fn ranges() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Reg(1)))).unwrap();
        assert!(bus.insert(0x17, 1, Arc::new(Mutex::new(Reg(1)))).is_err());
        assert!(bus.insert(0x8, 9, Arc::new(Mutex::new(Reg(1)))).is_err());
        bus.insert(0x18, 1, Arc::new(Mutex::new(Reg(9)))).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x20, &mut b));
        assert_eq!(b[0], 0xff);
        assert_eq!(bus.write(0x10, &[7]), Some(Action::Continue));
        bus.read(0x10, &mut b);
        assert_eq!(b[0], 7);
        assert_eq!(bus.write(0x0, &[7]), None);
    }

    #[test]
    fn debug_exit_status() {
        assert_eq!(StopReason::DebugExit(0).exit_status(), 1);
        assert_eq!(StopReason::DebugExit(0x10).exit_status(), 0x21);
        assert_eq!(StopReason::PowerOff.exit_status(), 0);
    }
}
