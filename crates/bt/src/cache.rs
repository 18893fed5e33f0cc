//! The code cache: one memfd mapped twice, writable at one address and
//! executable at another, so no page is ever writable and executable at the
//! same address. Blocks are appended; when the cache is full it is emptied
//! whole (the translator forgets every block first).

use std::io;

use x86::TlbProbe;

/// The signature of a translated block: the guest's GPRs (`Cpu::gpr`, 16
/// in the order of their encoding numbers), RFLAGS, and the software TLB
/// it probes for memory accesses.
pub type BlockFn =
    unsafe extern "sysv64" fn(gpr: *mut u64, rflags: *mut u64, tlb: *const TlbProbe) -> BlockExit;

/// What a block returns (in RAX and RDX).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockExit {
    /// How far RIP moves.
    pub delta: u64,
    /// Guest instructions completed.
    pub count: u64,
}

/// Executable memory for translated blocks.
pub struct CodeCache {
    fd: libc::c_int,
    /// The writable view.
    rw: *mut u8,
    /// The executable view of the same pages.
    rx: *const u8,
    size: usize,
    used: usize,
}

// SAFETY: the cache owns both mappings; nothing else refers to them, and it
// moves between threads only with the vCPU that owns it.
unsafe impl Send for CodeCache {}

impl CodeCache {
    /// A cache of `size` bytes (rounded up to whole pages).
    pub fn new(size: usize) -> io::Result<CodeCache> {
        let size = size.max(4096).next_multiple_of(4096);
        // SAFETY: memfd_create with a NUL-terminated name and plain flags.
        let fd = unsafe { libc::memfd_create(c"visor-bt".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cache = CodeCache {
            fd,
            rw: std::ptr::null_mut(),
            rx: std::ptr::null(),
            size,
            used: 0,
        };
        // SAFETY: ftruncate of the memfd this function just created.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        cache.rw = map(fd, size, libc::PROT_READ | libc::PROT_WRITE)?.cast();
        cache.rx = map(fd, size, libc::PROT_READ | libc::PROT_EXEC)?
            .cast_const()
            .cast();
        Ok(cache)
    }

    /// Bytes of code in the cache.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The cache's size.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Copies `code` into the cache: its offset, or `None` if it does not
    /// fit (the caller empties the cache and translates again).
    pub fn add(&mut self, code: &[u8]) -> Option<usize> {
        let at = self.used.next_multiple_of(16);
        if at.checked_add(code.len())? > self.size {
            return None;
        }
        // SAFETY: `at + code.len() <= size` bytes of the writable mapping are
        // ours, and `code` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(at), code.len()) };
        self.used = at + code.len();
        Some(at)
    }

    /// Forgets every block.
    pub fn clear(&mut self) {
        self.used = 0;
    }

    /// The code at `offset`, in the executable view.
    pub fn code(&self, offset: usize, len: usize) -> &[u8] {
        let end = offset.saturating_add(len).min(self.used);
        let start = offset.min(end);
        // SAFETY: `start..end` lies within the bytes written so far, in a
        // mapping that lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.rx.add(start), end - start) }
    }

    /// Runs the block at `offset` on the guest's registers.
    ///
    /// The one place where visor jumps into generated code. It is sound
    /// because of how every block is built (translate.rs): only instructions
    /// of the allow-list, re-encoded with registers renamed, between a
    /// prologue and an epilogue of the translator's own; they access no
    /// memory but `gpr[0..16]`, `*rflags`, the host stack frame the prologue
    /// makes, the software TLB's entries through `tlb` (reads), and guest
    /// RAM through a host address an entry gives, only after the probe has
    /// checked the entry's tag, its access bit, that its page is RAM and
    /// that the access stays within the page (the CPU's own fast path relies
    /// on the same entries, which map whole pages of guest RAM); nothing
    /// faults; a guest branch at the end is turned into a CMOVcc of the
    /// value returned, the only host jumps go to the block's own exits; the epilogue
    /// restores every callee-saved register and returns. `offset` was
    /// returned by [`CodeCache::add`] since the last [`CodeCache::clear`]
    /// (the translator drops its blocks when it clears the cache).
    pub fn run(
        &self,
        offset: usize,
        gpr: &mut [u64; 16],
        rflags: &mut u64,
        tlb: &TlbProbe,
    ) -> BlockExit {
        debug_assert!(offset < self.used);
        // SAFETY: see above; the executable view maps the bytes `add` wrote
        // at `offset`, a whole block, and the pointers passed are valid for
        // the accesses the block makes for the duration of the call.
        unsafe {
            let f: BlockFn = std::mem::transmute(self.rx.add(offset));
            f(gpr.as_mut_ptr(), rflags, tlb)
        }
    }
}

fn map(fd: libc::c_int, size: usize, prot: libc::c_int) -> io::Result<*mut libc::c_void> {
    // SAFETY: a new shared mapping of `size` bytes of the memfd `fd`, at an
    // address the kernel picks; nothing is overwritten.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), size, prot, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p)
}

impl Drop for CodeCache {
    fn drop(&mut self) {
        // SAFETY: the mappings and the fd were made by `new` and are released
        // once; no block can run after the cache is gone.
        unsafe {
            if !self.rw.is_null() {
                libc::munmap(self.rw.cast(), self.size);
            }
            if !self.rx.is_null() {
                libc::munmap(self.rx.cast_mut().cast(), self.size);
            }
            libc::close(self.fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_and_executable_views_differ_and_share_bytes() {
        let mut c = CodeCache::new(8192).unwrap();
        let at = c.add(&[0xc3]).unwrap();
        assert_eq!(c.code(at, 1), &[0xc3]);
        assert_ne!(c.rw.cast_const(), c.rx);
        assert!(c.add(&[0; 9000]).is_none(), "bounded");
        c.clear();
        assert_eq!(c.used(), 0);
    }
}
