//! QEMU's firmware configuration device (fw_cfg), the port interface: a
//! 16-bit selector at [`SELECTOR`] picks an item, its bytes are read one at
//! a time from [`DATA`]. visor fills in what guests written for QEMU's
//! `-kernel` read most: the signature, the interface ID (traditional
//! interface only, no DMA), the CPU count, the RAM size, the kernel, its
//! command line and the initrd (Multiboot: the module) with their addresses,
//! and a file directory with `etc/e820` (the memory map). docs/platform.md
//! lists the items.

use std::collections::BTreeMap;

use crate::bus::{Action, Device};

/// The selector port (16-bit writes) and the data port (8-bit reads).
pub const SELECTOR: u16 = 0x510;
pub const DATA: u16 = 0x511;

/// Item keys (QEMU's FW_CFG_*).
pub mod key {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const KERNEL_ADDR: u16 = 0x07;
    pub const KERNEL_SIZE: u16 = 0x08;
    pub const KERNEL_CMDLINE: u16 = 0x09;
    pub const INITRD_ADDR: u16 = 0x0a;
    pub const INITRD_SIZE: u16 = 0x0b;
    pub const MAX_CPUS: u16 = 0x0f;
    pub const KERNEL_ENTRY: u16 = 0x10;
    pub const KERNEL_DATA: u16 = 0x11;
    pub const INITRD_DATA: u16 = 0x12;
    pub const CMDLINE_ADDR: u16 = 0x13;
    pub const CMDLINE_SIZE: u16 = 0x14;
    pub const CMDLINE_DATA: u16 = 0x15;
    pub const FILE_DIR: u16 = 0x19;
    /// The first file's key.
    pub const FILE_FIRST: u16 = 0x20;
}

/// What visor tells the guest.
#[derive(Default)]
pub struct Config {
    pub cpus: u16,
    /// RAM in bytes.
    pub ram: u64,
    /// The memory map: (base, length, E820 type).
    pub e820: Vec<(u64, u64, u32)>,
    /// The kernel image, where it was loaded ([start, end)) and its entry.
    pub kernel: Option<(Vec<u8>, (u64, u64), u64)>,
    /// The command line and where it is in guest memory.
    pub cmdline: Option<(String, u64)>,
    /// The initrd (Multiboot: the module) and where it was loaded.
    pub initrd: Option<(Vec<u8>, u64)>,
}

/// The device: its items and the read position.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: usize,
}

fn u32le(v: u64) -> Vec<u8> {
    (v as u32).to_le_bytes().to_vec()
}

impl FwCfg {
    pub fn new(c: Config) -> FwCfg {
        let mut items = BTreeMap::new();
        items.insert(key::SIGNATURE, b"QEMU".to_vec());
        // Bit 0: the traditional interface; bit 1 (DMA) clear.
        items.insert(key::ID, 1u32.to_le_bytes().to_vec());
        items.insert(key::UUID, vec![0; 16]);
        items.insert(key::RAM_SIZE, c.ram.to_le_bytes().to_vec());
        items.insert(key::NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        items.insert(key::NB_CPUS, c.cpus.to_le_bytes().to_vec());
        items.insert(key::MAX_CPUS, c.cpus.to_le_bytes().to_vec());
        if let Some((data, (start, end), entry)) = c.kernel {
            items.insert(key::KERNEL_ADDR, u32le(start));
            items.insert(key::KERNEL_SIZE, u32le(end - start));
            items.insert(key::KERNEL_ENTRY, u32le(entry));
            items.insert(key::KERNEL_DATA, data);
        }
        if let Some((line, addr)) = c.cmdline {
            let mut data = line.into_bytes();
            data.push(0);
            items.insert(key::KERNEL_CMDLINE, u32le(addr));
            items.insert(key::CMDLINE_ADDR, u32le(addr));
            items.insert(key::CMDLINE_SIZE, u32le(data.len() as u64));
            items.insert(key::CMDLINE_DATA, data);
        }
        if let Some((data, addr)) = c.initrd {
            items.insert(key::INITRD_ADDR, u32le(addr));
            items.insert(key::INITRD_SIZE, u32le(data.len() as u64));
            items.insert(key::INITRD_DATA, data);
        }
        let mut e820 = Vec::new();
        for (base, len, kind) in c.e820 {
            e820.extend_from_slice(&base.to_le_bytes());
            e820.extend_from_slice(&len.to_le_bytes());
            e820.extend_from_slice(&kind.to_le_bytes());
        }
        let files = [("etc/e820", e820)];
        // The directory: a big-endian count, then (size, key, reserved,
        // name[56]) per file, big-endian.
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (k, (name, data)) in files.into_iter().enumerate() {
            let key = key::FILE_FIRST + k as u16;
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; 56];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
            items.insert(key, data);
        }
        items.insert(key::FILE_DIR, dir);
        FwCfg {
            items,
            selected: 0,
            offset: 0,
        }
    }
}

impl Device for FwCfg {
    /// Offset 0: the selector (reads 0); offset 1: the data port. Past an
    /// item's end, and for an item visor does not have, the data reads 0.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 1 {
            data.fill(0);
            return;
        }
        let item = self.items.get(&self.selected);
        for b in data.iter_mut() {
            *b = item.and_then(|i| i.get(self.offset)).copied().unwrap_or(0);
            self.offset = self.offset.saturating_add(1);
        }
    }

    /// A write to the selector selects an item and rewinds; writes to the
    /// data port are ignored (as on QEMU since 2.4).
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        if offset == 0 {
            let mut b = [0u8; 2];
            let n = data.len().min(2);
            b[..n].copy_from_slice(&data[..n]);
            self.selected = u16::from_le_bytes(b);
            self.offset = 0;
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(f: &mut FwCfg, k: u16, len: usize) -> Vec<u8> {
        f.write(0, &k.to_le_bytes());
        let mut v = vec![0u8; len];
        for b in v.iter_mut() {
            let mut one = [0u8];
            f.read(1, &mut one);
            *b = one[0];
        }
        v
    }

    #[test]
    fn items_and_file_directory() {
        let mut f = FwCfg::new(Config {
            cpus: 1,
            ram: 64 << 20,
            e820: vec![(0, 0x9fc00, 1), (0x10_0000, 63 << 20, 1)],
            kernel: Some((vec![1, 2, 3], (0x10_0000, 0x10_3000), 0x10_000c)),
            cmdline: Some(("a=1".into(), 0x2_0000)),
            initrd: Some((vec![9; 5], 0x300_0000)),
        });
        assert_eq!(item(&mut f, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(item(&mut f, key::ID, 4), [1, 0, 0, 0]);
        assert_eq!(item(&mut f, key::NB_CPUS, 2), [1, 0]);
        assert_eq!(item(&mut f, key::RAM_SIZE, 8), (64u64 << 20).to_le_bytes());
        assert_eq!(
            item(&mut f, key::KERNEL_ENTRY, 4),
            0x10_000cu32.to_le_bytes()
        );
        assert_eq!(item(&mut f, key::CMDLINE_DATA, 5), b"a=1\0\0");
        assert_eq!(item(&mut f, key::CMDLINE_SIZE, 4), [4, 0, 0, 0]);
        assert_eq!(item(&mut f, key::INITRD_SIZE, 4), [5, 0, 0, 0]);
        assert_eq!(item(&mut f, key::INITRD_DATA, 6), [9, 9, 9, 9, 9, 0]);
        assert_eq!(item(&mut f, 0x7777, 2), [0, 0], "no such item");
        let dir = item(&mut f, key::FILE_DIR, 4 + 64);
        assert_eq!(&dir[..4], &1u32.to_be_bytes());
        assert_eq!(&dir[4..8], &40u32.to_be_bytes(), "two e820 entries");
        assert_eq!(&dir[8..10], &key::FILE_FIRST.to_be_bytes());
        assert!(dir[12..].starts_with(b"etc/e820\0"));
        let e820 = item(&mut f, key::FILE_FIRST, 40);
        assert_eq!(&e820[20..28], &0x10_0000u64.to_le_bytes());
    }
}
