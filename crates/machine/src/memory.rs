//! Guest RAM: one region below the 32-bit MMIO hole and, for guests larger than
//! 3 GiB, one above 4 GiB.

use abi::{MEM_RAM, MEM_RESERVED, MMIO_HOLE_END, MMIO_HOLE_START};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub type GuestMemory = GuestMemoryMmap<()>;

/// Smallest guest visor accepts.
pub const MIN_MEM: u64 = 2 << 20;
/// Largest guest visor accepts.
pub const MAX_MEM: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("--mem {0} is too small: visor needs at least 2 MiB of guest RAM")]
    TooSmall(u64),
    #[error("--mem {0} is too large: visor allows at most 1 TiB")]
    TooLarge(u64),
    #[error("cannot allocate {size} bytes of guest memory: {msg}")]
    Alloc { size: u64, msg: String },
}

/// Where guest RAM lives.
#[derive(Clone, Copy, Debug)]
pub struct MemoryLayout {
    pub size: u64,
}

impl MemoryLayout {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_MEM {
            return Err(MemoryError::TooSmall(size));
        }
        if size > MAX_MEM {
            return Err(MemoryError::TooLarge(size));
        }
        Ok(MemoryLayout {
            size: size & !0xfff,
        })
    }

    /// RAM regions as (guest-physical start, length).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let low = self.size.min(MMIO_HOLE_START);
        let mut v = vec![(0, low)];
        if self.size > low {
            v.push((MMIO_HOLE_END, self.size - low));
        }
        v
    }

    /// End of RAM below the MMIO hole.
    pub fn low_end(&self) -> u64 {
        self.size.min(MMIO_HOLE_START)
    }

    /// The memory map given to guests (base, length, type): the EBDA and BIOS area
    /// between 640 KiB and 1 MiB is reserved as on a PC.
    pub fn e820(&self) -> Vec<(u64, u64, u32)> {
        let mut v = vec![
            (0, 0x9fc00, MEM_RAM),
            (0x9fc00, 0x10_0000 - 0x9fc00, MEM_RESERVED),
        ];
        for (start, len) in self.ranges() {
            let (s, l) = if start == 0 {
                (0x10_0000, len.saturating_sub(0x10_0000))
            } else {
                (start, len)
            };
            if l > 0 {
                v.push((s, l, MEM_RAM));
            }
        }
        v
    }

    pub fn create(&self) -> Result<GuestMemory, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .ranges()
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Alloc {
            size: self.size,
            msg: e.to_string(),
        })
    }
}

/// Parses sizes such as `512M`, `2G`, `65536K` or a byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (examples: 256M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn hole() {
        let l = MemoryLayout::new(4 << 30).unwrap();
        assert_eq!(
            l.ranges(),
            vec![
                (0, MMIO_HOLE_START),
                (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START)
            ]
        );
        assert!(MemoryLayout::new(1 << 20).is_err());
    }
}
