//! What the devices' unit tests share.

use std::sync::atomic::{AtomicU32, Ordering};

use vcpu::IrqLine;

/// An interrupt line that counts its edges.
#[derive(Default)]
pub struct Edges(AtomicU32);

impl IrqLine for Edges {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Edges {
    /// The edges so far.
    pub fn count(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}
