//! Guest-physical memory as the CPU sees it: the RAM regions of the guest's
//! `GuestMemoryMmap`, accessed through their host mappings. Anything else is MMIO.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// One RAM region: guest-physical start, length and host address.
#[derive(Clone, Copy, Debug)]
struct Region {
    start: u64,
    len: u64,
    host: *mut u8,
}

/// The guest's RAM. Holds a clone of the `GuestMemoryMmap` (its regions are
/// reference-counted), so the host mappings stay valid as long as this lives.
pub struct PhysMem {
    _mem: GuestMemoryMmap<()>,
    /// Engine-private memory added with [`PhysMem::add_private`].
    _private: Vec<GuestMemoryMmap<()>>,
    regions: Vec<Region>,
    /// One past the highest RAM address.
    end: u64,
}

impl PhysMem {
    pub fn new(mem: &GuestMemoryMmap<()>) -> PhysMem {
        let regions = Self::regions_of(mem);
        let end = regions.iter().map(|r| r.start + r.len).max().unwrap_or(0);
        PhysMem {
            _mem: mem.clone(),
            _private: Vec::new(),
            regions,
            end,
        }
    }

    fn regions_of(mem: &GuestMemoryMmap<()>) -> Vec<Region> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            if let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) {
                regions.push(Region {
                    start: r.start_addr().0,
                    len: r.len(),
                    host,
                });
            }
        }
        regions.sort_by_key(|r| r.start);
        regions
    }

    /// Adds memory that only the engine gives out (the `trap` engine's shadow
    /// page tables): the CPU reaches it like RAM through page tables that map
    /// it, but it is not part of the guest's RAM (`end` does not change). It
    /// must not overlap the guest's RAM.
    pub fn add_private(&mut self, mem: &GuestMemoryMmap<()>) {
        self.regions.extend(Self::regions_of(mem));
        self.regions.sort_by_key(|r| r.start);
        self._private.push(mem.clone());
    }

    /// The physical-address width that reaches all of this memory, the
    /// engine-private part too.
    pub fn width(&self) -> u32 {
        let top = self
            .regions
            .iter()
            .map(|r| r.start + r.len)
            .max()
            .unwrap_or(0);
        64 - top.saturating_sub(1).leading_zeros()
    }

    /// One past the highest RAM address.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The host address of `len` bytes of RAM at `gpa`, if all of them are RAM
    /// in one region.
    #[inline]
    pub fn host(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            let off = gpa.wrapping_sub(r.start);
            if off < r.len && len <= r.len - off {
                // SAFETY: `off + len <= r.len`, so the result stays inside the
                // region's mapping.
                return Some(unsafe { r.host.add(off as usize) });
            }
        }
        None
    }

    /// Reads RAM at `gpa`; false if any byte is not RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.host(gpa, buf.len() as u64) {
            Some(h) => {
                // SAFETY: `host` checked that `buf.len()` bytes at `h` are mapped
                // RAM; `buf` is a distinct Rust buffer, so they do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(h, buf.as_mut_ptr(), buf.len()) };
                true
            }
            None => false,
        }
    }

    /// Writes RAM at `gpa`; false (and nothing written) if any byte is not RAM.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        match self.host(gpa, buf.len() as u64) {
            Some(h) => {
                // SAFETY: as in `read`.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), h, buf.len()) };
                true
            }
            None => false,
        }
    }

    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b).then(|| u64::from_le_bytes(b))
    }

    pub fn read_u32(&self, gpa: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b).then(|| u32::from_le_bytes(b))
    }
}

/// Loads `size` (1, 2, 4 or 8) little-endian bytes at `p`.
///
/// # Safety
/// `p..p + size` must be mapped, readable memory.
#[inline(always)]
pub(crate) unsafe fn load(p: *const u8, size: usize) -> u64 {
    // SAFETY: the caller's contract; unaligned reads are allowed.
    unsafe {
        match size {
            1 => *p as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// Stores the low `size` (1, 2, 4 or 8) bytes of `v` at `p`.
///
/// # Safety
/// `p..p + size` must be mapped, writable memory.
#[inline(always)]
pub(crate) unsafe fn store(p: *mut u8, size: usize, v: u64) {
    // SAFETY: the caller's contract; unaligned writes are allowed.
    unsafe {
        match size {
            1 => *p = v as u8,
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}
