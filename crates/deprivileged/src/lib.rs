//! Engines that deprivilege the guest kernel on visor's software CPU.
//!
//! - [`trap`]: trap-and-emulate with shadow page tables (design 1).
//! - [`pv`]: paravirtualization: hypercalls through `int 0x82` (design 3).
//!
//! They share the VMM's view of the guest CPU ([`virt`]), its walk of the
//! guest's page tables ([`walk`]) and the shadow tables ([`shadow`]).

pub mod pv;
pub mod shadow;
pub mod trap;
pub mod virt;
pub mod walk;

pub use pv::PvVm;
pub use trap::{HolePolicy, TrapConfig, TrapVm};
