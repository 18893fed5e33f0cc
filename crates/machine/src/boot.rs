//! Initial CPU state and the boot structures every loader shares: the boot GDT
//! and identity-mapped page tables.

use abi::*;
use arch::pte::{P, PS, RW};
use arch::{cr0, cr4, efer, gdt_entry};
use vcpu::{DescriptorTable, Regs, SRegs, Segment};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;

/// The CPU state a loader wants at the first instruction.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuState {
    pub regs: Regs,
    pub sregs: SRegs,
}

/// Writes the boot GDT: null, 32-bit code (0x08), 64-bit code (0x10), flat data
/// (0x18) and a 64-bit TSS (0x20, 16 bytes).
pub fn write_gdt(mem: &GuestMemory) -> Result<DescriptorTable, vm_memory::GuestMemoryError> {
    write_gdt_at(mem, BOOT_GDT)
}

/// [`write_gdt`] at guest-physical `base`.
pub fn write_gdt_at(
    mem: &GuestMemory,
    base: u64,
) -> Result<DescriptorTable, vm_memory::GuestMemoryError> {
    let entries: [u64; 6] = [
        0,
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
        0,
    ];
    for (i, e) in entries.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(base + 8 * i as u64))?;
    }
    Ok(DescriptorTable {
        base,
        limit: (entries.len() * 8 - 1) as u16,
    })
}

/// Writes page tables identity-mapping the first 4 GiB with 2 MiB pages.
pub fn write_identity_page_tables(mem: &GuestMemory) -> Result<u64, vm_memory::GuestMemoryError> {
    const P_RW: u64 = P | RW;
    mem.write_obj(BOOT_PDPT | P_RW, GuestAddress(BOOT_PML4))?;
    for i in 0..4u64 {
        mem.write_obj(
            (BOOT_PD + i * 0x1000) | P_RW,
            GuestAddress(BOOT_PDPT + i * 8),
        )?;
    }
    for i in 0..2048u64 {
        mem.write_obj((i << 21) | P_RW | PS, GuestAddress(BOOT_PD + i * 8))?;
    }
    Ok(BOOT_PML4)
}

fn base_sregs(gdt: DescriptorTable) -> SRegs {
    SRegs {
        gdt,
        tr: Segment::tss(SEL_TSS, 0, 0x67),
        ldt: Segment {
            type_: 2,
            present: true,
            unusable: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// 64-bit long mode with paging on the boot page tables, flat segments, SSE enabled.
pub fn long_mode(mem: &GuestMemory) -> Result<SRegs, vm_memory::GuestMemoryError> {
    let gdt = write_gdt(mem)?;
    let cr3 = write_identity_page_tables(mem)?;
    let data = Segment::flat(SEL_DATA, false, false, true);
    Ok(SRegs {
        cs: Segment::flat(SEL_CODE64, true, true, false),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        cr0: cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG,
        cr3,
        cr4: cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT,
        efer: efer::LME | efer::LMA | efer::SCE | efer::NXE,
        ..base_sregs(gdt)
    })
}

/// 32-bit protected mode, paging off, flat segments (the Multiboot entry state).
pub fn protected_mode(mem: &GuestMemory) -> Result<SRegs, vm_memory::GuestMemoryError> {
    protected_mode_at(mem, BOOT_GDT)
}

/// [`protected_mode`] with the boot GDT at guest-physical `gdt`.
pub fn protected_mode_at(
    mem: &GuestMemory,
    gdt: u64,
) -> Result<SRegs, vm_memory::GuestMemoryError> {
    let gdt = write_gdt_at(mem, gdt)?;
    let data = Segment::flat(SEL_DATA, false, false, true);
    let mut tr = Segment::tss(SEL_TSS, 0, 0x67);
    tr.type_ = 0xb; // busy 32-bit TSS
    Ok(SRegs {
        cs: Segment::flat(SEL_CODE32, true, false, true),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr,
        cr0: cr0::PE | cr0::ET,
        ..base_sregs(gdt)
    })
}
