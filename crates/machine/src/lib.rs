//! visor's machine model, shared by every engine: guest memory, the port-I/O and
//! MMIO buses with their devices (serial, ACPI PM registers, reset ports, HPET,
//! CMOS RTC, i8042 keyboard controller, fw_cfg), the ACPI tables, kernel loaders and the initial CPU state
//! (docs/platform.md).
//! Nothing here knows which engine runs the guest.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod fw_cfg;
pub mod hpet;
pub mod i8042;
pub mod loader;
pub mod memory;
pub mod paging;
pub mod rtc;
#[cfg(test)]
mod testing;

pub use bus::{Action, Bus, Device};
pub use memory::{GuestMemory, MemoryLayout};
