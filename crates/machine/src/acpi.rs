//! The ACPI tables visor gives every guest, built with rust-vmm's
//! `acpi_tables`: RSDP, XSDT, FADT (with FACS), DSDT, MADT and HPET, in the
//! BIOS area at [`ACPI_BASE`] (reserved in the memory map), where a kernel
//! that scans for the RSDP finds it; Linux is also told through the zero
//! page's `acpi_rsdp_addr`. docs/platform.md describes the machine they
//! describe.
//!
//! The fixed hardware they name is in [`crate::devices`]: the PM1a event and
//! control blocks and the PM timer at [`PM_BASE`] (power-off through SLP_EN
//! with the S5 sleep type 0 of the DSDT), and the reset register at
//! [`RESET_PORT`].

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes};

use crate::GuestMemory;

/// Where the tables go: the RSDP first (16-byte aligned, inside the BIOS
/// area 0xe0000-0xfffff that kernels scan), then the others.
pub const ACPI_BASE: u64 = 0xe_0000;
/// Bytes the tables may take from [`ACPI_BASE`].
pub const ACPI_SIZE: u64 = 0x1_0000;
/// The PM1a event block (status, enable: 4 bytes), then the PM1a control
/// block (2 bytes, [`abi::port::POWER`]) and the PM timer (4 bytes).
pub const PM_BASE: u16 = 0x600;
pub const PM1A_EVT: u16 = PM_BASE;
pub const PM1A_CNT: u16 = abi::port::POWER;
pub const PM_TMR: u16 = PM_BASE + 8;
/// The reset register (the PC's reset control register, as on QEMU's and
/// real chipsets) and the value the FADT says resets.
pub const RESET_PORT: u16 = 0xcf9;
pub const RESET_VALUE: u8 = 0x06;
/// The SCI's ISA IRQ (level-triggered, active high, as on PIIX4).
pub const SCI_IRQ: u8 = 9;
/// The IOAPIC and the local APICs.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The HPET's register block.
pub const HPET_ADDR: u64 = 0xfed0_0000;
/// The HPET's Event Timer Block ID: hardware revision 1, three comparators
/// (number minus one in bits 12:8), 64-bit counter, legacy replacement
/// routing capable, vendor 0x8086 (as the HPET's capabilities register).
pub const HPET_BLOCK_ID: u32 = 0x8086_a201;

const OEM_ID: [u8; 6] = *b"VISOR ";
const OEM_TABLE: [u8; 8] = *b"VISORPC ";
const OEM_REVISION: u32 = 1;

/// The Interrupt Source Override of the MADT (type 2), which `acpi_tables`
/// does not have: ISA IRQ `source` is GSI `gsi` with MPS INTI `flags`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl InterruptSourceOverride {
    fn new(source: u8, gsi: u32, flags: u16) -> Self {
        InterruptSourceOverride {
            r#type: 2,
            length: 10,
            bus: 0,
            source,
            gsi,
            flags,
        }
    }
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// The Local APIC NMI structure of the MADT (type 4): LINT1 of every
/// processor is the NMI, as a BIOS wires it.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor: u8,
    flags: u16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MPS INTI flags: level-triggered, active high.
const LEVEL_HIGH: u16 = 0b1101;

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Sets an SDT's checksum byte so that its bytes sum to zero.
fn fix_checksum(t: &mut [u8]) {
    t[9] = 0;
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    t[9] = sum.wrapping_neg();
}

fn io_gas(port: u16, bits: u8) -> GAS {
    let size = match bits {
        8 => AccessSize::ByteAccess,
        16 => AccessSize::WordAccess,
        _ => AccessSize::DwordAccess,
    };
    GAS::new(AddressSpace::SystemIo, bits, 0, size, port as u64)
}

/// The tables, by signature, as the guest sees them, and where each is.
pub struct Tables {
    /// (signature, guest-physical address, bytes); the RSDP first.
    pub tables: Vec<([u8; 4], u64, Vec<u8>)>,
}

impl Tables {
    /// Address of the RSDP.
    pub fn rsdp(&self) -> u64 {
        ACPI_BASE
    }
}

/// The DSDT: the S5 sleep state (SLP_TYP 0 in both PM1 control blocks).
fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, OEM_REVISION);
    let s5 = aml::Package::new(vec![&aml::ZERO, &aml::ZERO, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut t);
    t.as_slice().to_vec()
}

/// The MADT: `cpus` local APICs (IDs 0..cpus), the IOAPIC (ID `cpus`, GSIs
/// 0-23), ISA IRQ 0 on GSI 2 (the PIT, as on every PC), the SCI
/// level-triggered, and LINT1 as NMI.
fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(cpus, IOAPIC_ADDR, 0));
    m.add_structure(InterruptSourceOverride::new(0, 2, 0));
    m.add_structure(InterruptSourceOverride::new(
        SCI_IRQ,
        SCI_IRQ as u32,
        LEVEL_HIGH,
    ));
    m.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor: 0xff,
        flags: 0,
        lint: 1,
    });
    let mut b = bytes(&m);
    // Flags: PCAT_COMPAT, the 8259 PICs are there too.
    b[40..44].copy_from_slice(&1u32.to_le_bytes());
    fix_checksum(&mut b);
    b
}

/// The HPET table: one timer block at [`HPET_ADDR`].
fn hpet() -> Vec<u8> {
    let mut t = Sdt::new(*b"HPET", 56, 1, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.write_u32(36, HPET_BLOCK_ID);
    let base = GAS::new(
        AddressSpace::SystemMemory,
        64,
        0,
        AccessSize::Undefined,
        HPET_ADDR,
    );
    t.write_bytes(40, &bytes(&base));
    t.write_u8(52, 0); // HPET number
    t.write_u16(53, 0x80); // minimum periodic tick, in counter ticks
    t.write_u8(55, 0); // no page protection
    t.as_slice().to_vec()
}

/// The FADT. PWR_BUTTON is clear: the power button is the fixed-feature
/// one (PWRBTN_STS/PWRBTN_EN in the PM1a event block, signalled by the SCI),
/// which an ACPI OS finds without a device in the DSDT; SLP_BUTTON is set:
/// there is no fixed sleep button (and no control-method one either).
fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.sci_int = (SCI_IRQ as u16).into();
    f.pm1a_evt_blk = (PM1A_EVT as u32).into();
    f.pm1a_cnt_blk = (PM1A_CNT as u32).into();
    f.pm_tmr_blk = (PM_TMR as u32).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.x_pm1a_evt_blk = io_gas(PM1A_EVT, 32);
    f.x_pm1a_cnt_blk = io_gas(PM1A_CNT, 16);
    f.x_pm_tmr_blk = io_gas(PM_TMR, 32);
    // No C2/C3 states.
    f.p_lvl2_lat = 101.into();
    f.p_lvl3_lat = 1001.into();
    // IA-PC boot architecture: legacy devices, an 8042 (its reset line).
    f.iapc_boot_arch = 0b11.into();
    f.reset_reg = io_gas(RESET_PORT, 8);
    f.reset_value = RESET_VALUE;
    // The CMOS RTC's century byte.
    f.century = crate::rtc::CENTURY;
    bytes(&f.finalize())
}

/// Builds the tables for a machine with `cpus` processors.
pub fn build(cpus: u8) -> Tables {
    let mut at = ACPI_BASE + 0x40;
    let mut place = |len: usize| {
        let a = at;
        at = (at + len as u64).next_multiple_of(0x40);
        a
    };
    let facs_bytes = bytes(&FACS::new());
    let facs = place(facs_bytes.len());
    let dsdt_bytes = dsdt();
    let dsdt = place(dsdt_bytes.len());
    let fadt_bytes = fadt(facs, dsdt);
    let fadt = place(fadt_bytes.len());
    let madt_bytes = madt(cpus);
    let madt = place(madt_bytes.len());
    let hpet_bytes = hpet();
    let hpet = place(hpet_bytes.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    for a in [fadt, madt, hpet] {
        xsdt.add_entry(a);
    }
    let xsdt_bytes = bytes(&xsdt);
    let xsdt_at = place(xsdt_bytes.len());
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    Tables {
        tables: vec![
            (*b"RSDP", ACPI_BASE, rsdp),
            (*b"XSDT", xsdt_at, xsdt_bytes),
            (*b"FACP", fadt, fadt_bytes),
            (*b"FACS", facs, facs_bytes),
            (*b"DSDT", dsdt, dsdt_bytes),
            (*b"APIC", madt, madt_bytes),
            (*b"HPET", hpet, hpet_bytes),
        ],
    }
}

/// Writes the tables for `cpus` processors into guest memory; returns the
/// RSDP's address.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<u64, vm_memory::GuestMemoryError> {
    let t = build(cpus);
    for (_, at, b) in &t.tables {
        debug_assert!(at + b.len() as u64 <= ACPI_BASE + ACPI_SIZE);
        mem.write_slice(b, GuestAddress(*at))?;
    }
    Ok(t.rsdp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    /// Every table sums to zero, says its own length, fits in the area, and
    /// the XSDT links the FADT, MADT and HPET; the FADT the DSDT and FACS.
    #[test]
    fn tables_are_consistent() {
        let t = build(1);
        let end = ACPI_BASE + ACPI_SIZE;
        for (sig, at, b) in &t.tables {
            assert!(at + b.len() as u64 <= end);
            match sig {
                b"RSDP" => {
                    assert_eq!(&b[..8], b"RSD PTR ");
                    assert_eq!(sum(&b[..20]), 0);
                    assert_eq!(sum(b), 0);
                }
                b"FACS" => assert_eq!(&b[..4], b"FACS"),
                _ => {
                    assert_eq!(&b[..4], sig);
                    assert_eq!(
                        u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
                        b.len()
                    );
                    assert_eq!(sum(b), 0, "{}", String::from_utf8_lossy(sig));
                }
            }
        }
        let find = |s: &[u8; 4]| t.tables.iter().find(|x| &x.0 == s).unwrap();
        let xsdt = &find(b"XSDT").2;
        let links: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            links,
            vec![find(b"FACP").1, find(b"APIC").1, find(b"HPET").1]
        );
        let rsdp = &find(b"RSDP").2;
        assert_eq!(
            u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
            find(b"XSDT").1
        );
        let fadt = &find(b"FACP").2;
        assert_eq!(
            u64::from_le_bytes(fadt[140..148].try_into().unwrap()),
            find(b"DSDT").1
        );
        assert_eq!(
            u64::from_le_bytes(fadt[132..140].try_into().unwrap()),
            find(b"FACS").1
        );
        assert_eq!(find(b"FACS").1 % 64, 0, "the FACS is 64-byte aligned");
        let madt = &find(b"APIC").2;
        assert_eq!(u32::from_le_bytes(madt[40..44].try_into().unwrap()), 1);
        // The fixed-feature power button (FADT flags bit 4 clear), the
        // SCI on IRQ 9, the PM1a event block at PM1A_EVT.
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_eq!(flags & (1 << 4), 0, "PWR_BUTTON clear: {flags:#x}");
        assert_ne!(flags & (1 << 5), 0, "no fixed sleep button: {flags:#x}");
        assert_eq!(u16::from_le_bytes(fadt[46..48].try_into().unwrap()), 9);
        assert_eq!(
            u32::from_le_bytes(fadt[56..60].try_into().unwrap()),
            PM1A_EVT as u32
        );
        assert_eq!(fadt[88], 4, "PM1_EVT_LEN");
        // The RTC's century byte; IAPC_BOOT_ARCH's "CMOS RTC not present"
        // (bit 5) clear.
        assert_eq!(fadt[108], 0x32, "CENTURY");
        assert_eq!(fadt[109] & (1 << 5), 0);
    }
}
