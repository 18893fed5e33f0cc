//! Engines that deprivilege the guest kernel on visor's software CPU.
//!
//! - [`trap`]: trap-and-emulate with shadow page tables (design 1).
//!
//! They share the VMM's view of the guest CPU ([`virt`]), its walk of the
//! guest's page tables ([`walk`]) and the shadow tables ([`shadow`]).

pub mod shadow;
pub mod trap;
pub mod virt;
pub mod walk;

pub use trap::{HolePolicy, TrapConfig, TrapVm};
