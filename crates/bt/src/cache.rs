//! The code cache: one memfd mapped twice, writable at one address and
//! executable at another, so no page is ever writable and executable at the
//! same address. Blocks are appended; when the cache is full it is emptied
//! whole (the translator forgets every block first).

use std::io;

use crate::translate::{self, Ctx, Runtime};

/// The runtime's entry ([`crate::translate::Runtime::enter`]): the context
/// translated code runs on (`ctx.code`: the block to start).
pub type EnterFn = unsafe extern "sysv64" fn(ctx: *mut Ctx);

/// The largest cache: every jump within it, from a block to the runtime or
/// to another block, is in reach of a 32-bit displacement.
pub const MAX_SIZE: usize = 1 << 30;

/// Executable memory for translated blocks.
pub struct CodeCache {
    fd: libc::c_int,
    /// The writable view.
    rw: *mut u8,
    /// The executable view of the same pages.
    rx: *const u8,
    size: usize,
    used: usize,
    /// Bytes at the start that hold the runtime (kept by `clear`).
    reserved: usize,
    rt: Runtime,
}

// SAFETY: the cache owns both mappings; nothing else refers to them, and it
// moves between threads only with the vCPU that owns it.
unsafe impl Send for CodeCache {}

impl CodeCache {
    /// A cache of `size` bytes (rounded up to whole pages, at most
    /// [`MAX_SIZE`]).
    pub fn new(size: usize) -> io::Result<CodeCache> {
        let size = size.clamp(4096, MAX_SIZE).next_multiple_of(4096);
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
            reserved: 0,
            rt: Runtime::default(),
        };
        // SAFETY: ftruncate of the memfd this function just created.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        cache.rw = map(fd, size, libc::PROT_READ | libc::PROT_WRITE)?.cast();
        cache.rx = map(fd, size, libc::PROT_READ | libc::PROT_EXEC)?
            .cast_const()
            .cast();
        let (code, rt) = translate::runtime(cache.rx as u64)
            .map_err(|e| io::Error::other(format!("bt runtime: {e}")))?;
        cache
            .add(&code)
            .ok_or_else(|| io::Error::other("bt: code cache too small"))?;
        cache.reserved = cache.used;
        cache.rt = rt;
        Ok(cache)
    }

    /// The runtime's routines.
    pub fn runtime(&self) -> Runtime {
        self.rt
    }

    /// The host (executable) address the next block added will have.
    pub fn next_addr(&self) -> u64 {
        self.rx as u64 + self.used.next_multiple_of(16) as u64
    }

    /// The host address of `offset`.
    pub fn addr(&self, offset: usize) -> u64 {
        self.rx as u64 + offset as u64
    }

    /// Points the patchable jump (`E9 rel32`) at offset `off` to host
    /// address `to`: where it went before, or `None` (nothing changed) if
    /// there is no such jump in the part of the cache in use, or `to` is
    /// out of its reach.
    pub fn link(&mut self, off: u64, to: u64) -> Option<u64> {
        let off = usize::try_from(off).ok()?;
        let slot = self.rx as u64 + off as u64;
        if off < self.reserved || off.saturating_add(5) > self.used {
            return None;
        }
        let rel = i32::try_from(to.wrapping_sub(slot + 5) as i64).ok()?;
        // SAFETY: `off..off + 5` lies within the bytes written so far, in
        // the writable view this cache owns; the jump is only ever executed
        // by this vCPU's thread, which is here, not in the cache.
        unsafe {
            let p = self.rw.add(off);
            if *p != 0xe9 {
                return None;
            }
            let mut old = [0u8; 4];
            std::ptr::copy_nonoverlapping(p.add(1), old.as_mut_ptr(), 4);
            std::ptr::copy_nonoverlapping(rel.to_le_bytes().as_ptr(), p.add(1), 4);
            Some((slot + 5).wrapping_add(i32::from_le_bytes(old) as i64 as u64))
        }
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

    /// Forgets every block (the runtime stays).
    pub fn clear(&mut self) {
        self.used = self.reserved;
    }

    /// The code at `offset`, in the executable view.
    pub fn code(&self, offset: usize, len: usize) -> &[u8] {
        let end = offset.saturating_add(len).min(self.used);
        let start = offset.min(end);
        // SAFETY: `start..end` lies within the bytes written so far, in a
        // mapping that lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.rx.add(start), end - start) }
    }

    /// Runs translated code from the block at host address `ctx.code` on
    /// the context `ctx`, until it leaves the cache.
    ///
    /// The one place where visor jumps into generated code. It is sound
    /// because of how the runtime and every block are built (translate.rs):
    /// only instructions of the allow-list, re-encoded with registers
    /// renamed, between templates of the translator's own. They access no
    /// memory but the context (through RDI), the host stack frame the
    /// runtime makes, the software TLB's entries and the jump cache through
    /// the addresses in the context (reads), and guest RAM through a host
    /// address a TLB entry gives, only after the probe has checked the
    /// entry's tag, its access bit, that its page is RAM and that the
    /// access stays within the page (the CPU's own fast path relies on the
    /// same entries, which map whole pages of guest RAM); nothing faults.
    /// Host jumps go only to the block's own labels, to the runtime, to a
    /// block the dispatcher linked (a block in the cache), or, from the
    /// lookup, to the code address of a jump-cache entry whose key matched
    /// (the dispatcher fills entries only with blocks in the cache and
    /// empties the table whenever blocks are dropped; an empty entry's key
    /// matches no RIP). The runtime restores every callee-saved register
    /// and returns. `ctx.code` is a block's address since the last
    /// [`CodeCache::clear`], and `ctx.tlb` and `ctx.jc` point at the
    /// vCPU's TLB and jump cache.
    pub fn run(&self, ctx: &mut Ctx) {
        debug_assert!(ctx.code >= self.rx as u64 + self.reserved as u64);
        debug_assert!(ctx.code < self.rx as u64 + self.used as u64);
        // SAFETY: see above; `enter` is the runtime at the start of the
        // executable view, and `ctx` is valid for the accesses the code
        // makes for the duration of the call.
        unsafe {
            let f: EnterFn = std::mem::transmute(self.rt.enter);
            f(ctx)
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
        let rt = c.used();
        let at = c.add(&[0xc3]).unwrap();
        assert_eq!(c.code(at, 1), &[0xc3]);
        assert_ne!(c.rw.cast_const(), c.rx);
        assert!(c.add(&[0; 9000]).is_none(), "bounded");
        c.clear();
        assert_eq!(c.used(), rt, "the runtime stays");
    }
}
