//! The ACPI tables a guest finds, checked with ACPICA's `iasl` (Debian's
//! `acpica-tools`, installed by ./test.sh): a kernel is loaded as `visor run`
//! loads it, the RSDP is found by scanning the BIOS area as a kernel scans
//! it, every table is followed from it (XSDT, FADT, FACS, DSDT, MADT, HPET),
//! dumped, and disassembled without an error or warning; the DSDT's source
//! compiles again without one.

use std::process::Command;

use machine::loader::{self, BootOptions};
use machine::MemoryLayout;
use vm_memory::{Bytes, GuestAddress};

fn read(mem: &machine::GuestMemory, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(at)).unwrap();
    b
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// A table at `at` whose length is at offset 4 (every SDT and the FACS).
fn table(mem: &machine::GuestMemory, at: u64) -> Vec<u8> {
    let len = u32_at(&read(mem, at, 8), 4) as usize;
    assert!(
        (36..0x1_0000).contains(&len) || len == 64,
        "length {len} at {at:#x}"
    );
    read(mem, at, len)
}

#[test]
fn iasl_disassembles_every_table() {
    let layout = MemoryLayout::new(16 << 20).unwrap();
    let mem = layout.create().unwrap();
    let kernel = loader::elf64_image(0x20_0000, &[0xf4]);
    let opts = BootOptions {
        kernel_name: "k",
        cmdline: None,
        initrd: None,
    };
    loader::load(&mem, &layout, &kernel, &opts).unwrap();
    // The RSDP, on a 16-byte boundary in 0xe0000-0xfffff.
    let bios = read(&mem, 0xe_0000, 0x2_0000);
    let off = (0..bios.len())
        .step_by(16)
        .find(|&o| bios[o..].starts_with(b"RSD PTR "))
        .expect("no RSDP in the BIOS area");
    let rsdp = bios[off..off + 36].to_vec();
    let mut tables = vec![("rsdp".to_string(), rsdp.clone())];
    let xsdt = table(&mem, u64_at(&rsdp, 24));
    for k in (36..xsdt.len()).step_by(8) {
        let t = table(&mem, u64_at(&xsdt, k));
        let sig = String::from_utf8_lossy(&t[..4]).to_lowercase();
        if sig == "facp" {
            tables.push(("facs".into(), table(&mem, u64_at(&t, 132))));
            tables.push(("dsdt".into(), table(&mem, u64_at(&t, 140))));
        }
        tables.push((sig, t));
    }
    tables.push(("xsdt".into(), xsdt));
    let mut names: Vec<_> = tables.iter().map(|t| t.0.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        ["apic", "dsdt", "facp", "facs", "hpet", "rsdp", "xsdt"]
    );

    // iasl 20200925 (Debian 12) reads the length of every binary table at
    // offset 4, which in the RSDP is part of its signature: it refuses a
    // standalone RSDP ("Binary file does not contain a valid ACPI table").
    // The RSDP's two checksums are checked here instead.
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision 2 (XSDT)");
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in tables.iter().filter(|t| t.0 != "rsdp") {
        let dat = dir.path().join(format!("{name}.dat"));
        std::fs::write(&dat, bytes).unwrap();
        let out = Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(dir.path())
            .output()
            .expect("iasl is missing: ./test.sh installs acpica-tools");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name}: {text}");
        for bad in ["Error", "Warning", "Invalid", "Unknown"] {
            assert!(!text.contains(bad), "{name}: {text}");
        }
        let dsl = std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap();
        assert!(
            !dsl.contains("**** "),
            "{name}: iasl flagged the table:\n{dsl}"
        );
        if name == "dsdt" {
            assert!(dsl.contains("Name (_S5, Package (0x04)"), "{dsl}");
            // The disassembly compiles back.
            let out = Command::new("iasl")
                .arg("dsdt.dsl")
                .current_dir(dir.path())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}");
            assert!(text.contains(" 0 Errors, 0 Warnings"), "{text}");
        }
        if name == "facp" {
            for want in [
                "PM1A Control Block Address : 00000604",
                "PM Timer Block Address : 00000608",
                "Reset Register Supported (V2) : 1",
            ] {
                assert!(dsl.contains(want), "{want}:\n{dsl}");
            }
        }
        if name == "apic" {
            assert!(
                dsl.contains("[I/O APIC]") && dsl.contains("Address : FEC00000"),
                "{dsl}"
            );
            assert!(dsl.contains("[Interrupt Source Override]"), "{dsl}");
        }
    }
}
