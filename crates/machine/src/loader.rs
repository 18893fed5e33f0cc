//! Kernel loaders: Linux bzImage (64-bit boot protocol), Multiboot v1 (ELF32 or
//! a.out kludge) and ELF64 kernels (visor's boot protocol, docs/boot-protocol.md).
//! Every loader checks the image against the guest's memory before writing, so a
//! corrupt or oversized kernel is an error naming the problem, never a panic.

use std::io::Cursor;

use abi::*;
use arch::rflags;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{self, CpuState};
use crate::{GuestMemory, MemoryLayout};

/// The three kinds of kernel visor boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    Linux,
    Multiboot,
    Elf64,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Linux => "Linux bzImage",
            KernelKind::Multiboot => "Multiboot",
            KernelKind::Elf64 => "ELF64",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a kernel visor can boot: no bzImage header, Multiboot header or ELF64 header found ({0} bytes)")]
    UnknownFormat(usize),
    #[error("truncated ELF: {0}")]
    TruncatedElf(String),
    #[error("invalid ELF: {0}")]
    InvalidElf(String),
    #[error("invalid Multiboot kernel: {0}")]
    InvalidMultiboot(String),
    #[error("invalid bzImage: {0}")]
    InvalidBzImage(String),
    #[error("kernel needs guest memory up to {need:#x} but the guest has RAM up to {have:#x}: raise --mem")]
    KernelTooLarge { need: u64, have: u64 },
    #[error("kernel segment at {addr:#x} overlaps visor's boot area below 1 MiB")]
    KernelTooLow { addr: u64 },
    #[error("kernel segment {start:#x}..{end:#x} overlaps {what}: a Multiboot kernel may use [0x500, 0x9fc00) and RAM from 1 MiB")]
    KernelOverlaps {
        start: u64,
        end: u64,
        what: &'static str,
    },
    #[error("no room in guest RAM for visor's Multiboot boot structures ({size} bytes) beside the kernel: raise --mem")]
    NoRoomForBootData { size: u64 },
    #[error("initrd of {size} bytes does not fit in guest memory between the kernel end ({kernel_end:#x}) and {limit:#x}: raise --mem")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("command line of {len} bytes is longer than the kernel accepts ({max})")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("writing guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A file handed to the kernel: the Linux initrd, or a Multiboot module.
pub struct Initrd<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
}

pub struct BootOptions<'a> {
    /// Name of the kernel file (Multiboot puts it first on the command line).
    pub kernel_name: &'a str,
    pub cmdline: Option<&'a str>,
    pub initrd: Option<Initrd<'a>>,
}

/// What the loader did.
#[derive(Debug)]
pub struct Loaded {
    pub kind: KernelKind,
    pub cpu: CpuState,
    /// Guest-physical [start, end) of the loaded kernel image.
    pub kernel: (u64, u64),
    /// Command line the kernel received, and its guest-physical address.
    pub cmdline: String,
    pub cmdline_addr: u64,
    /// Guest-physical address and length of the initrd (Multiboot: the
    /// module), if there is one.
    pub initrd: Option<(u64, u64)>,
}

/// Linux command line used when none is given.
pub const DEFAULT_LINUX_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Processors of a visor VM (the ACPI tables and fw_cfg say so).
pub const CPUS: u8 = 1;

const MB_MAGIC: u32 = 0x1bad_b002;
const MB_BOOT_MAGIC: u64 = 0x2bad_b002;

pub fn detect(image: &[u8]) -> Result<KernelKind, LoadError> {
    if image.len() >= 0x206 && le32(image, 0x202) == Some(0x5372_6448) {
        return Ok(KernelKind::Linux);
    }
    if find_multiboot_header(image).is_some() {
        return Ok(KernelKind::Multiboot);
    }
    if image.len() >= 5 && &image[..4] == b"\x7fELF" && image[4] == 2 {
        return Ok(if is_vmlinux(image) {
            KernelKind::Linux
        } else {
            KernelKind::Elf64
        });
    }
    Err(LoadError::UnknownFormat(image.len()))
}

pub fn load(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    image: &[u8],
    opts: &BootOptions,
) -> Result<Loaded, LoadError> {
    let kind = detect(image)?;
    // The ACPI tables, for every kind of kernel (Linux is also told where).
    crate::acpi::write(mem, CPUS)?;
    match kind {
        KernelKind::Linux if image.starts_with(b"\x7fELF") => {
            load_vmlinux(mem, layout, image, opts)
        }
        KernelKind::Linux => load_linux(mem, layout, image, opts),
        KernelKind::Multiboot => load_multiboot(mem, layout, image, opts),
        KernelKind::Elf64 => load_elf64(mem, layout, image, opts),
    }
}

fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

fn write_cmdline(mem: &GuestMemory, at: u64, cmdline: &str, max: usize) -> Result<(), LoadError> {
    let max = max.min(BOOT_CMDLINE_MAX - 1);
    if cmdline.len() > max {
        return Err(LoadError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(at))?;
    mem.write_obj(0u8, GuestAddress(at + cmdline.len() as u64))?;
    Ok(())
}

/// Places `data` page-aligned as high as possible below `limit` and above
/// `kernel_end`; returns its address.
fn place_high(
    mem: &GuestMemory,
    data: &[u8],
    kernel_end: u64,
    limit: u64,
) -> Result<u64, LoadError> {
    let size = data.len() as u64;
    let too_large = LoadError::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(LoadError::InitrdTooLarge {
            size,
            kernel_end,
            limit,
        });
    }
    mem.write_slice(data, GuestAddress(addr))?;
    Ok(addr)
}

fn check_fits(layout: &MemoryLayout, start: u64, end: u64) -> Result<(), LoadError> {
    if start < KERNEL_MIN_ADDR {
        return Err(LoadError::KernelTooLow { addr: start });
    }
    if end > layout.low_end() {
        return Err(LoadError::KernelTooLarge {
            need: end,
            have: layout.low_end(),
        });
    }
    Ok(())
}

/// One loadable segment of an ELF file.
struct Segment {
    offset: u64,
    filesz: u64,
    paddr: u64,
    memsz: u64,
}

/// Parses the PT_LOAD program headers of an ELF32 or ELF64 file and checks that
/// each lies inside the file.
fn elf_segments(image: &[u8], class64: bool) -> Result<(u64, Vec<Segment>), LoadError> {
    let trunc = |what: &str| LoadError::TruncatedElf(what.to_string());
    let (entry, phoff, phentsize, phnum) = if class64 {
        (
            le64(image, 24).ok_or_else(|| trunc("ELF header"))?,
            le64(image, 32).ok_or_else(|| trunc("ELF header"))?,
            le16(image, 54).ok_or_else(|| trunc("ELF header"))? as u64,
            le16(image, 56).ok_or_else(|| trunc("ELF header"))? as u64,
        )
    } else {
        (
            le32(image, 24).ok_or_else(|| trunc("ELF header"))? as u64,
            le32(image, 28).ok_or_else(|| trunc("ELF header"))? as u64,
            le16(image, 42).ok_or_else(|| trunc("ELF header"))? as u64,
            le16(image, 44).ok_or_else(|| trunc("ELF header"))? as u64,
        )
    };
    let min_ent = if class64 { 56 } else { 32 };
    if phnum == 0 {
        return Err(LoadError::InvalidElf("no program headers".into()));
    }
    if phentsize < min_ent {
        return Err(LoadError::InvalidElf(format!(
            "program header size {phentsize} is smaller than {min_ent}"
        )));
    }
    let mut segs = Vec::new();
    for i in 0..phnum {
        let off = phoff
            .checked_add(i * phentsize)
            .filter(|o| o.saturating_add(phentsize) <= image.len() as u64)
            .ok_or_else(|| trunc(&format!("program header {i} lies past the end of the file")))?
            as usize;
        let p_type = le32(image, off).unwrap_or(0);
        if p_type != 1 {
            continue;
        }
        let seg = if class64 {
            Segment {
                offset: le64(image, off + 8).unwrap_or(0),
                paddr: le64(image, off + 24).unwrap_or(0),
                filesz: le64(image, off + 32).unwrap_or(0),
                memsz: le64(image, off + 40).unwrap_or(0),
            }
        } else {
            Segment {
                offset: le32(image, off + 4).unwrap_or(0) as u64,
                paddr: le32(image, off + 12).unwrap_or(0) as u64,
                filesz: le32(image, off + 16).unwrap_or(0) as u64,
                memsz: le32(image, off + 20).unwrap_or(0) as u64,
            }
        };
        if seg
            .offset
            .checked_add(seg.filesz)
            .is_none_or(|end| end > image.len() as u64)
        {
            return Err(trunc(&format!(
                "segment {i} ({} bytes at file offset {:#x}) extends past the end of the {}-byte file",
                seg.filesz,
                seg.offset,
                image.len()
            )));
        }
        if seg.memsz < seg.filesz {
            return Err(LoadError::InvalidElf(format!(
                "segment {i} has memsz < filesz"
            )));
        }
        segs.push(seg);
    }
    if segs.is_empty() {
        return Err(LoadError::InvalidElf("no loadable segment".into()));
    }
    Ok((entry, segs))
}

/// The lowest and highest physical addresses of `segs`, each checked by
/// `check` (start, end); `ranges` gets each segment's [start, end).
fn segments_range(
    layout: &MemoryLayout,
    segs: &[Segment],
    check: fn(&MemoryLayout, u64, u64) -> Result<(), LoadError>,
    ranges: &mut Vec<(u64, u64)>,
) -> Result<(u64, u64), LoadError> {
    let mut lo = u64::MAX;
    let mut hi = 0;
    for s in segs {
        let end = s
            .paddr
            .checked_add(s.memsz)
            .ok_or(LoadError::KernelTooLarge {
                need: u64::MAX,
                have: layout.low_end(),
            })?;
        check(layout, s.paddr, end)?;
        ranges.push((s.paddr, end));
        lo = lo.min(s.paddr);
        hi = hi.max(end);
    }
    Ok((lo, hi))
}

/// Checks an ELF64 file's segments against guest memory, loads them (with
/// linux-loader) and returns (entry, lowest, highest) physical addresses.
fn load_elf64_segments(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    image: &[u8],
) -> Result<(u64, u64, u64), LoadError> {
    let (entry, segs) = elf_segments(image, true)?;
    let (lo, hi) = segments_range(layout, &segs, check_fits, &mut Vec::new())?;
    if !(lo..hi).contains(&entry) {
        return Err(LoadError::InvalidElf(format!(
            "entry point {entry:#x} is outside the loaded segments {lo:#x}..{hi:#x}"
        )));
    }
    Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(KERNEL_MIN_ADDR)),
    )
    .map_err(|e| LoadError::InvalidElf(e.to_string()))?;
    Ok((entry, lo, hi))
}

fn load_elf64(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    image: &[u8],
    opts: &BootOptions,
) -> Result<Loaded, LoadError> {
    if image.len() < 64 {
        return Err(LoadError::TruncatedElf(format!(
            "{} bytes is shorter than the 64-byte ELF64 header",
            image.len()
        )));
    }
    if image[5] != 1 || le16(image, 18) != Some(62) {
        return Err(LoadError::InvalidElf(
            "not a little-endian x86-64 ELF64 file".into(),
        ));
    }
    let (entry, lo, hi) = load_elf64_segments(mem, layout, image)?;

    let cmdline = opts.cmdline.unwrap_or("").to_string();
    write_cmdline(mem, BOOT_CMDLINE, &cmdline, BOOT_CMDLINE_MAX)?;
    let (initrd_addr, initrd_len) = match &opts.initrd {
        Some(i) => (
            place_high(mem, i.data, hi, layout.low_end().min(BOOT_IDENTITY_MAPPED))?,
            i.data.len() as u64,
        ),
        None => (0, 0),
    };
    let e820 = layout.e820();
    for (i, &(base, len, kind)) in e820.iter().enumerate().take(BOOT_MMAP_MAX) {
        let r = MemoryRegion {
            base,
            len,
            kind,
            _pad: 0,
        };
        let a = BOOT_MMAP + (i * std::mem::size_of::<MemoryRegion>()) as u64;
        mem.write_obj(r.base, GuestAddress(a))?;
        mem.write_obj(r.len, GuestAddress(a + 8))?;
        mem.write_obj(r.kind, GuestAddress(a + 16))?;
        mem.write_obj(0u32, GuestAddress(a + 20))?;
    }
    let info = [
        BOOT_INFO_MAGIC,
        1 | ((e820.len().min(BOOT_MMAP_MAX) as u64) << 32),
        BOOT_MMAP,
        BOOT_CMDLINE,
        cmdline.len() as u64,
        initrd_addr,
        initrd_len,
    ];
    for (i, v) in info.iter().enumerate() {
        mem.write_obj(*v, GuestAddress(BOOT_INFO + 8 * i as u64))?;
    }
    let sregs = boot::long_mode(mem)?;
    let regs = vcpu::Regs {
        rip: entry,
        rdi: BOOT_INFO,
        rsp: BOOT_STACK_TOP,
        rflags: rflags::FIXED,
        ..Default::default()
    };
    Ok(Loaded {
        kind: KernelKind::Elf64,
        cpu: CpuState { regs, sregs },
        kernel: (lo, hi),
        cmdline,
        cmdline_addr: BOOT_CMDLINE,
        initrd: opts.initrd.as_ref().map(|_| (initrd_addr, initrd_len)),
    })
}

/// Offset of a valid Multiboot v1 header in the first 8 KiB.
fn find_multiboot_header(image: &[u8]) -> Option<usize> {
    let end = image.len().min(8192);
    (0..end.saturating_sub(11)).step_by(4).find(|&off| {
        let magic = le32(image, off);
        let flags = le32(image, off + 4);
        let sum = le32(image, off + 8);
        matches!((magic, flags, sum), (Some(m), Some(f), Some(s))
            if m == MB_MAGIC && m.wrapping_add(f).wrapping_add(s) == 0)
    })
}

fn load_multiboot(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    image: &[u8],
    opts: &BootOptions,
) -> Result<Loaded, LoadError> {
    let hdr = find_multiboot_header(image).ok_or(LoadError::UnknownFormat(image.len()))?;
    let flags = le32(image, hdr + 4).unwrap_or(0);
    let bad = |m: String| LoadError::InvalidMultiboot(m);
    // Guest-physical ranges the kernel occupies (one per ELF segment).
    let mut kernel: Vec<(u64, u64)> = Vec::new();
    let (entry, lo, hi) = if flags & (1 << 16) != 0 {
        // a.out kludge: the header gives the load addresses.
        let f = |i: usize| {
            le32(image, hdr + 12 + 4 * i)
                .map(u64::from)
                .ok_or_else(|| bad("header truncated".into()))
        };
        let (header_addr, load_addr, load_end, bss_end, entry) =
            (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?);
        if load_addr > header_addr {
            return Err(bad(format!(
                "load_addr {load_addr:#x} is above header_addr {header_addr:#x}"
            )));
        }
        let file_off = (hdr as u64)
            .checked_sub(header_addr - load_addr)
            .ok_or_else(
                || bad("header_addr - load_addr exceeds the header's file offset".into()),
            )?;
        let load_len = if load_end == 0 {
            image.len() as u64 - file_off
        } else {
            load_end
                .checked_sub(load_addr)
                .ok_or_else(|| bad("load_end_addr is below load_addr".into()))?
        };
        if file_off + load_len > image.len() as u64 {
            return Err(bad(format!(
                "image needs {} bytes from file offset {file_off:#x} but the file has {}",
                load_len,
                image.len()
            )));
        }
        let end = if bss_end == 0 {
            load_addr + load_len
        } else {
            bss_end.max(load_addr + load_len)
        };
        multiboot_range(layout, load_addr, end)?;
        if !(load_addr..end).contains(&entry) {
            return Err(bad(format!("entry {entry:#x} lies outside the image")));
        }
        mem.write_slice(
            &image[file_off as usize..(file_off + load_len) as usize],
            GuestAddress(load_addr),
        )?;
        (entry, load_addr, end)
    } else {
        if image.len() < 52 || &image[..4] != b"\x7fELF" || image[4] != 1 {
            return Err(bad(
                "no a.out kludge and not an ELF32 file (Multiboot v1 loads ELF32 only)".into(),
            ));
        }
        if le16(image, 18) != Some(3) {
            return Err(bad("ELF32 file is not for i386".into()));
        }
        let (entry, segs) = elf_segments(image, false)?;
        let (lo, hi) = segments_range(layout, &segs, multiboot_range, &mut kernel)?;
        for s in &segs {
            mem.write_slice(
                &image[s.offset as usize..(s.offset + s.filesz) as usize],
                GuestAddress(s.paddr),
            )?;
        }
        (entry, lo, hi)
    };
    if kernel.is_empty() {
        kernel.push((lo, hi));
    }

    // visor's boot structures go where the kernel is not: at their usual
    // addresses, else moved to the lowest free room.
    let cmdline = match opts.cmdline {
        Some(c) if !c.is_empty() => format!("{} {}", opts.kernel_name, c),
        _ => opts.kernel_name.to_string(),
    };
    let mut room = BootRoom::new(layout, &kernel);
    let gdt = room.take(BOOT_GDT, BOOT_GDT_SIZE)?;
    // The information structure, its memory map, module list and strings.
    let mbi = room.take(MULTIBOOT_INFO, 0x600)?;
    let cmdline_len = cmdline.len().min(BOOT_CMDLINE_MAX) as u64 + 1;
    let cmdline_addr = room.take(BOOT_CMDLINE, cmdline_len)?;
    let mmap = mbi + 0x100;
    let mods = mbi + 0x400;
    let strings = mbi + 0x500;
    write_cmdline(mem, cmdline_addr, &cmdline, BOOT_CMDLINE_MAX)?;
    let loader_name = b"visor\0";
    mem.write_slice(loader_name, GuestAddress(strings))?;
    let mut mmap_len = 0u64;
    for (base, len, kind) in layout.e820() {
        let a = mmap + mmap_len;
        mem.write_obj(20u32, GuestAddress(a))?;
        mem.write_obj(base, GuestAddress(a + 4))?;
        mem.write_obj(len, GuestAddress(a + 12))?;
        mem.write_obj(kind, GuestAddress(a + 20))?;
        mmap_len += 24;
    }
    let mut info_flags = 1 | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9);
    let mut mods_count = 0u32;
    let mut initrd = None;
    if let Some(m) = &opts.initrd {
        let above = room.end().max(hi).max(KERNEL_MIN_ADDR);
        let start = place_high(mem, m.data, above, layout.low_end())?;
        initrd = Some((start, m.data.len() as u64));
        let name_addr = strings + 16;
        let name = m.name.as_bytes();
        let name = &name[..name.len().min(0x100 - 17)];
        mem.write_slice(name, GuestAddress(name_addr))?;
        mem.write_obj(0u8, GuestAddress(name_addr + name.len() as u64))?;
        mem.write_obj(start as u32, GuestAddress(mods))?;
        mem.write_obj((start + m.data.len() as u64) as u32, GuestAddress(mods + 4))?;
        mem.write_obj(name_addr as u32, GuestAddress(mods + 8))?;
        mem.write_obj(0u32, GuestAddress(mods + 12))?;
        mods_count = 1;
    } else {
        info_flags &= !(1 << 3);
    }
    let mem_upper = (layout.low_end() - 0x10_0000) / 1024;
    let fields: [(u64, u32); 9] = [
        (0, info_flags),
        (4, 640),
        (8, mem_upper as u32),
        (16, cmdline_addr as u32),
        (20, mods_count),
        (24, mods as u32),
        (44, mmap_len as u32),
        (48, mmap as u32),
        (64, strings as u32),
    ];
    mem.write_slice(&[0u8; 0x80], GuestAddress(mbi))?;
    for (off, v) in fields {
        mem.write_obj(v, GuestAddress(mbi + off))?;
    }
    let sregs = boot::protected_mode_at(mem, gdt)?;
    let regs = vcpu::Regs {
        rip: entry,
        rax: MB_BOOT_MAGIC,
        rbx: mbi,
        rflags: rflags::FIXED,
        ..Default::default()
    };
    Ok(Loaded {
        kind: KernelKind::Multiboot,
        cpu: CpuState { regs, sregs },
        kernel: (lo, hi),
        cmdline,
        cmdline_addr,
        initrd,
    })
}

/// What a Multiboot kernel may not occupy below 1 MiB, as on a PC: (start,
/// end, what). Everything else below the end of low RAM is its to use.
const MULTIBOOT_FORBIDDEN: [(u64, u64, &str); 2] = [
    (0, 0x500, "the real-mode IVT and BIOS data area"),
    (
        0x9_fc00,
        0x10_0000,
        "the EBDA, VGA memory and BIOS area (visor's ACPI tables at 0xe0000)",
    ),
];

/// Checks one range [start, end) a Multiboot kernel loads into.
fn multiboot_range(layout: &MemoryLayout, start: u64, end: u64) -> Result<(), LoadError> {
    if end > layout.low_end() {
        return Err(LoadError::KernelTooLarge {
            need: end,
            have: layout.low_end(),
        });
    }
    for (lo, hi, what) in MULTIBOOT_FORBIDDEN {
        if start < hi && lo < end {
            return Err(LoadError::KernelOverlaps { start, end, what });
        }
    }
    Ok(())
}

/// Bytes of the boot GDT (six descriptors).
const BOOT_GDT_SIZE: u64 = 0x30;

/// Free guest RAM for visor's Multiboot boot structures: everything below
/// the end of low RAM but the kernel's ranges, the ranges no kernel may
/// use, and what was already taken.
struct BootRoom {
    used: Vec<(u64, u64)>,
    limit: u64,
    end: u64,
}

impl BootRoom {
    fn new(layout: &MemoryLayout, kernel: &[(u64, u64)]) -> BootRoom {
        let mut used: Vec<(u64, u64)> = MULTIBOOT_FORBIDDEN
            .iter()
            .map(|&(a, b, _)| (a, b))
            .collect();
        used.extend_from_slice(kernel);
        BootRoom {
            used,
            limit: layout.low_end(),
            end: 0,
        }
    }

    fn free(&self, at: u64, size: u64) -> bool {
        at.checked_add(size).is_some_and(|end| {
            end <= self.limit && self.used.iter().all(|&(a, b)| end <= a || b <= at)
        })
    }

    /// `size` bytes at `usual` if free there, else at the lowest free
    /// 16-byte-aligned address (right after something in use).
    fn take(&mut self, usual: u64, size: u64) -> Result<u64, LoadError> {
        let mut starts: Vec<u64> = self
            .used
            .iter()
            .map(|&(_, b)| b.next_multiple_of(16))
            .collect();
        starts.sort_unstable();
        let at = std::iter::once(usual)
            .chain(starts)
            .find(|&a| self.free(a, size))
            .ok_or(LoadError::NoRoomForBootData { size })?;
        self.used.push((at, at + size));
        self.end = self.end.max(at + size);
        Ok(at)
    }

    /// One past the highest byte taken.
    fn end(&self) -> u64 {
        self.end
    }
}

fn load_linux(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    image: &[u8],
    opts: &BootOptions,
) -> Result<Loaded, LoadError> {
    let hdr_end = 0x1f1 + std::mem::size_of::<linux_loader::loader::bootparam::setup_header>();
    if image.len() < hdr_end {
        return Err(LoadError::InvalidBzImage(format!(
            "{} bytes is shorter than the setup header",
            image.len()
        )));
    }
    let version = le16(image, 0x206).unwrap_or(0);
    let xloadflags = le16(image, 0x236).unwrap_or(0);
    if version < 0x020c || xloadflags & 1 == 0 {
        return Err(LoadError::InvalidBzImage(format!(
            "boot protocol {}.{:02} without the 64-bit entry point (XLF_KERNEL_64); visor needs 2.12+",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as u64,
    };
    let payload = (setup_sects + 1) * 512;
    if payload >= image.len() as u64 {
        return Err(LoadError::InvalidBzImage(format!(
            "setup of {payload} bytes leaves no protected-mode kernel in a {}-byte file",
            image.len()
        )));
    }
    let init_size = le32(image, 0x260).unwrap_or(0) as u64;
    let kernel_end = KERNEL_MIN_ADDR + init_size.max(image.len() as u64 - payload);
    check_fits(layout, KERNEL_MIN_ADDR, kernel_end)?;

    let res = BzImage::load(
        mem,
        Some(GuestAddress(KERNEL_MIN_ADDR)),
        &mut Cursor::new(image),
        Some(GuestAddress(KERNEL_MIN_ADDR)),
    )
    .map_err(|e| LoadError::InvalidBzImage(e.to_string()))?;
    let hdr = res
        .setup_header
        .ok_or_else(|| LoadError::InvalidBzImage("no setup header".into()))?;

    boot_linux(
        mem,
        layout,
        hdr,
        kernel_end,
        res.kernel_load.0 + 0x200,
        opts,
    )
}

/// True for an ELF64 file with a "Linux" ELF note: an uncompressed Linux vmlinux.
fn is_vmlinux(image: &[u8]) -> bool {
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (le64(image, 32), le16(image, 54), le16(image, 56))
    else {
        return false;
    };
    (0..phnum as u64).any(|i| {
        let off = phoff.saturating_add(i * phentsize as u64) as usize;
        if le32(image, off) != Some(4) {
            return false;
        }
        let (Some(start), Some(size)) = (le64(image, off + 8), le64(image, off + 32)) else {
            return false;
        };
        let Some(notes) = image.get(start as usize..start.saturating_add(size) as usize) else {
            return false;
        };
        let mut p = 0usize;
        while let (Some(namesz), Some(descsz)) = (le32(notes, p), le32(notes, p + 4)) {
            let name = notes.get(p + 12..p + 12 + namesz as usize);
            if name == Some(b"Linux\0") {
                return true;
            }
            let step = 12 + (namesz as usize).div_ceil(4) * 4 + (descsz as usize).div_ceil(4) * 4;
            p = match p.checked_add(step) {
                Some(n) if n > p => n,
                _ => return false,
            };
        }
        false
    })
}

/// An uncompressed vmlinux, entered at its 64-bit entry point `startup_64` with the
/// same boot_params as a bzImage (as Firecracker does): no decompressor runs.
fn load_vmlinux(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    image: &[u8],
    opts: &BootOptions,
) -> Result<Loaded, LoadError> {
    let (entry, _lo, hi) = load_elf64_segments(mem, layout, image)?;
    let hdr = linux_loader::loader::bootparam::setup_header {
        boot_flag: 0xaa55,
        header: 0x5372_6448,
        version: 0x020f,
        kernel_alignment: 0x100_0000,
        loadflags: 1, // LOADED_HIGH
        initrd_addr_max: 0x7fff_ffff,
        cmdline_size: 2048,
        ..Default::default()
    };
    boot_linux(mem, layout, hdr, hi, entry, opts)
}

/// Writes the command line, initrd and boot_params, and returns the 64-bit entry
/// state shared by bzImage and vmlinux.
fn boot_linux(
    mem: &GuestMemory,
    layout: &MemoryLayout,
    mut hdr: linux_loader::loader::bootparam::setup_header,
    kernel_end: u64,
    entry: u64,
    opts: &BootOptions,
) -> Result<Loaded, LoadError> {
    let cmdline = opts.cmdline.unwrap_or(DEFAULT_LINUX_CMDLINE).to_string();
    let max = match hdr.cmdline_size {
        0 => 255,
        n => n as usize,
    };
    write_cmdline(mem, BOOT_CMDLINE, &cmdline, max)?;

    let mut params = boot_params::default();
    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = BOOT_CMDLINE as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    if let Some(i) = &opts.initrd {
        let limit = layout
            .low_end()
            .min(hdr.initrd_addr_max as u64 + 1)
            .min(BOOT_IDENTITY_MAPPED);
        let addr = place_high(mem, i.data, kernel_end, limit)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = i.data.len() as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = crate::acpi::ACPI_BASE;
    let e820 = layout.e820();
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(e820.iter()) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(BOOT_INFO))?;

    let sregs = boot::long_mode(mem)?;
    let regs = vcpu::Regs {
        rip: entry,
        rsi: BOOT_INFO,
        rflags: rflags::FIXED,
        ..Default::default()
    };
    Ok(Loaded {
        kind: KernelKind::Linux,
        cpu: CpuState { regs, sregs },
        kernel: (KERNEL_MIN_ADDR, kernel_end),
        cmdline,
        cmdline_addr: BOOT_CMDLINE,
        initrd: opts
            .initrd
            .as_ref()
            .map(|i| ({ params.hdr.ramdisk_image } as u64, i.data.len() as u64)),
    })
}

/// A minimal Multiboot v1 ELF32 kernel image: the Multiboot header (no
/// a.out kludge) and one PT_LOAD segment per `(paddr, bytes, memsz)`,
/// entered at `entry`. Tiny guests (tests, examples) are built with it.
pub fn multiboot_elf32_image(entry: u32, segments: &[(u32, &[u8], u32)]) -> Vec<u8> {
    let phoff = 52usize;
    let hdr_at = phoff + 32 * segments.len();
    let mut f = vec![0u8; hdr_at];
    f[..7].copy_from_slice(b"\x7fELF\x01\x01\x01");
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&3u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..28].copy_from_slice(&entry.to_le_bytes());
    f[28..32].copy_from_slice(&(phoff as u32).to_le_bytes());
    f[40..42].copy_from_slice(&52u16.to_le_bytes());
    f[42..44].copy_from_slice(&32u16.to_le_bytes());
    f[44..46].copy_from_slice(&(segments.len() as u16).to_le_bytes());
    for w in [MB_MAGIC, 0, 0u32.wrapping_sub(MB_MAGIC)] {
        f.extend_from_slice(&w.to_le_bytes());
    }
    for (k, (paddr, bytes, memsz)) in segments.iter().enumerate() {
        let offset = f.len() as u32;
        let ph = phoff + 32 * k;
        for (i, v) in [1, offset, *paddr, *paddr, bytes.len() as u32, *memsz, 7, 16]
            .iter()
            .enumerate()
        {
            f[ph + 4 * i..ph + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(bytes);
    }
    f
}

/// A minimal ELF64 kernel image: one PT_LOAD segment holding `code` at physical
/// `paddr`, entered at `paddr`. Tiny guests (tests, examples) are built with it.
pub fn elf64_image(paddr: u64, code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x78];
    f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    f[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem(size: u64) -> (MemoryLayout, GuestMemory) {
        let l = MemoryLayout::new(size).unwrap();
        let m = l.create().unwrap();
        (l, m)
    }

    fn opts() -> BootOptions<'static> {
        BootOptions {
            kernel_name: "k",
            cmdline: Some("hello"),
            initrd: None,
        }
    }

    #[test]
    fn elf64_loads() {
        let (l, m) = mem(16 << 20);
        let k = elf64_image(0x20_0000, &[0xf4; 16]);
        let r = load(&m, &l, &k, &opts()).unwrap();
        assert_eq!(r.kind, KernelKind::Elf64);
        assert_eq!(r.cpu.regs.rip, 0x20_0000);
        assert_eq!(r.cpu.regs.rdi, BOOT_INFO);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0xf4);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(BOOT_INFO)).unwrap(),
            BOOT_INFO_MAGIC
        );
        let mut c = [0u8; 6];
        m.read_slice(&mut c, GuestAddress(BOOT_CMDLINE)).unwrap();
        assert_eq!(&c, b"hello\0");
    }

    #[test]
    fn elf64_errors() {
        let (l, m) = mem(4 << 20);
        let k = elf64_image(0x20_0000, &[0xf4; 16]);
        assert!(matches!(
            load(&m, &l, &k[..k.len() - 4], &opts()),
            Err(LoadError::TruncatedElf(_))
        ));
        assert!(matches!(
            load(&m, &l, &k[..40], &opts()),
            Err(LoadError::TruncatedElf(_))
        ));
        let big = elf64_image(0x3f_fff0, &[0xf4; 32]);
        assert!(matches!(
            load(&m, &l, &big, &opts()),
            Err(LoadError::KernelTooLarge { .. })
        ));
        let low = elf64_image(0x1000, &[0xf4; 16]);
        assert!(matches!(
            load(&m, &l, &low, &opts()),
            Err(LoadError::KernelTooLow { .. })
        ));
        assert!(matches!(
            load(&m, &l, b"garbage garbage", &opts()),
            Err(LoadError::UnknownFormat(_))
        ));
        let huge = vec![1u8; 8 << 20];
        let o = BootOptions {
            initrd: Some(Initrd {
                name: "i",
                data: &huge,
            }),
            ..opts()
        };
        assert!(matches!(
            load(&m, &l, &k, &o),
            Err(LoadError::InitrdTooLarge { .. })
        ));
        let long = "x".repeat(5000);
        let o = BootOptions {
            cmdline: Some(&long),
            ..opts()
        };
        assert!(matches!(
            load(&m, &l, &k, &o),
            Err(LoadError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn multiboot_aout_kludge() {
        let (l, m) = mem(32 << 20);
        // header at file offset 0, loaded at 1 MiB; code follows the 32-byte header.
        let mut k = Vec::new();
        let flags: u32 = (1 << 16) | 2;
        for v in [
            MB_MAGIC,
            flags,
            0u32.wrapping_sub(MB_MAGIC.wrapping_add(flags)),
            0x10_0000,
            0x10_0000,
            0,
            0x10_2000,
            0x10_0020,
        ] {
            k.extend_from_slice(&v.to_le_bytes());
        }
        k.extend_from_slice(&[0xf4; 8]);
        let data = [7u8; 100];
        let o = BootOptions {
            kernel_name: "/boot/k",
            cmdline: Some("a=1"),
            initrd: Some(Initrd {
                name: "mod0 arg",
                data: &data,
            }),
        };
        let r = load(&m, &l, &k, &o).unwrap();
        assert_eq!(r.kind, KernelKind::Multiboot);
        assert_eq!(r.cpu.regs.rax, 0x2bad_b002);
        assert_eq!(r.cpu.regs.rip, 0x10_0020);
        assert_eq!(r.cmdline, "/boot/k a=1");
        let mbi = r.cpu.regs.rbx;
        let rd = |o: u64| m.read_obj::<u32>(GuestAddress(mbi + o)).unwrap();
        assert_eq!(rd(0) & 0x24f, 0x24d);
        assert_eq!(rd(4), 640);
        assert_eq!(rd(8), (32 * 1024) - 1024);
        assert_eq!(rd(20), 1);
        let mods = rd(24) as u64;
        let start = m.read_obj::<u32>(GuestAddress(mods)).unwrap() as u64;
        assert_eq!(start & 0xfff, 0);
        assert_eq!(m.read_obj::<u8>(GuestAddress(start)).unwrap(), 7);
        assert!(rd(44) >= 3 * 24);
    }

    /// A Multiboot kernel over the usual places of visor's GDT (0x500), the
    /// information structure (0x9000) and the command line (0x20000): they
    /// move out of its way, and the kernel's bytes stay as loaded.
    #[test]
    fn multiboot_below_1mib_moves_the_boot_structures() {
        let (l, m) = mem(16 << 20);
        let code = [0x90u8; 0x100];
        let k = multiboot_elf32_image(0x500, &[(0x500, &code, 0x9800), (0x1_f000, &code, 0x2000)]);
        let data = [9u8; 64];
        let o = BootOptions {
            initrd: Some(Initrd {
                name: "m",
                data: &data,
            }),
            ..opts()
        };
        let r = load(&m, &l, &k, &o).unwrap();
        assert_eq!(r.kind, KernelKind::Multiboot);
        assert_eq!(r.cpu.regs.rip, 0x500);
        assert_eq!(r.kernel, (0x500, 0x2_1000));
        let inside = |a: u64, len: u64| {
            [(0x500u64, 0x9d00u64), (0x1_f000, 0x2_1000)]
                .iter()
                .any(|&(s, e)| a < e && s < a + len)
        };
        let mbi = r.cpu.regs.rbx;
        let gdt = r.cpu.sregs.gdt.base;
        assert!(!inside(mbi, 0x600), "MBI at {mbi:#x}");
        assert!(!inside(gdt, 0x30), "GDT at {gdt:#x}");
        assert!(
            !inside(r.cmdline_addr, 8),
            "command line at {:#x}",
            r.cmdline_addr
        );
        assert_ne!(mbi, MULTIBOOT_INFO);
        assert_ne!(gdt, BOOT_GDT);
        assert_ne!(r.cmdline_addr, BOOT_CMDLINE);
        // The kernel's bytes, the BSS zero, the structures where the
        // kernel is told they are.
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x5ff)).unwrap(), 0x90);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1_f0ff)).unwrap(), 0x90);
        let rd = |a: u64| m.read_obj::<u32>(GuestAddress(a)).unwrap();
        assert_eq!(rd(mbi + 16) as u64, r.cmdline_addr);
        let mut c = [0u8; 8];
        m.read_slice(&mut c, GuestAddress(r.cmdline_addr)).unwrap();
        assert_eq!(&c, b"k hello\0");
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(gdt + 8)).unwrap() >> 40 & 0xff,
            0x9b
        );
        let start = rd(rd(mbi + 24) as u64) as u64;
        assert!(start >= KERNEL_MIN_ADDR && !inside(start, 64));
        assert_eq!(m.read_obj::<u8>(GuestAddress(start)).unwrap(), 9);
    }

    /// A Multiboot kernel over the IVT and BIOS data area, over the
    /// EBDA/VGA/BIOS hole, past the end of RAM, or leaving no room for the
    /// boot structures is refused with the reason.
    #[test]
    fn multiboot_forbidden_ranges() {
        let (l, m) = mem(2 << 20);
        let code = [0x90u8; 16];
        for (at, len, what) in [
            (0x0, 0x1000, "IVT"),
            (0x400, 0x200, "IVT"),
            (0x9_f000, 0x1000, "EBDA"),
            (0xb_8000, 0x10, "VGA"),
            (0xf_0000, 0x1_0000, "BIOS"),
        ] {
            let k = multiboot_elf32_image(at, &[(at, &code, len)]);
            match load(&m, &l, &k, &opts()) {
                Err(e @ LoadError::KernelOverlaps { .. }) => {
                    assert!(e.to_string().contains(what), "{at:#x}: {e}")
                }
                r => panic!("{at:#x}: {r:?}"),
            }
        }
        let k = multiboot_elf32_image(0x1f_0000, &[(0x1f_0000, &code, 0x2_0000)]);
        assert!(matches!(
            load(&m, &l, &k, &opts()),
            Err(LoadError::KernelTooLarge { .. })
        ));
        let k = multiboot_elf32_image(
            0x500,
            &[
                (0x500, &code, 0x9_fc00 - 0x500),
                (0x10_0000, &code, 0x10_0000),
            ],
        );
        assert!(matches!(
            load(&m, &l, &k, &opts()),
            Err(LoadError::NoRoomForBootData { .. })
        ));
    }

    #[test]
    fn bzimage_errors() {
        let (l, m) = mem(16 << 20);
        let mut k = vec![0u8; 0x1000];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
        assert!(matches!(
            load(&m, &l, &k, &opts()),
            Err(LoadError::InvalidBzImage(_))
        ));
        assert!(matches!(
            load(&m, &l, &k[..0x210], &opts()),
            Err(LoadError::InvalidBzImage(_))
        ));
    }
}
