//! Helpers shared by the integration tests (each test file includes what it uses).

#![allow(dead_code)]

pub mod engines;
pub mod guest;
pub mod initramfs;
pub mod transcript;
