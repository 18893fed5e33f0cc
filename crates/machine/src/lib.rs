//! visor's machine model, shared by every engine: guest memory, the port-I/O and
//! MMIO buses with their devices, kernel loaders and the initial CPU state.
//! Nothing here knows which engine runs the guest.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod devices;
pub mod fw_cfg;
pub mod hpet;
pub mod loader;
pub mod memory;
pub mod paging;

pub use bus::{Action, Bus, Device};
pub use memory::{GuestMemory, MemoryLayout};
