//! The fuzzing harness (`visor_emu::fuzz::exec_bytes`, also the cargo-fuzz
//! target fuzz/fuzz_targets/exec_bytes.rs) on pseudo-random inputs from a fixed
//! seed, so that every `cargo test` runs it on stable Rust: no input may panic
//! the software CPU or run past its budget.

use std::collections::BTreeMap;

use visor_emu::fuzz::Rng;
use visor_emu::fuzz::{exec_bytes, End, BUDGET};

const INPUTS: usize = 3_000;

/// Instructions that exit or change the machine (with the harness's initial
/// registers: RCX = 1 is an MSR the CPU does not know, R9 the local APIC, R10
/// the first byte above RAM), spliced into half of the inputs so that more than
/// their first bytes decode to something that matters.
const SNIPPETS: &[&[u8]] = &[
    // RDMSR and WRMSR of an MSR in the VMM's range (others fault in the CPU
    // model, docs/cpu-model.md), and of whatever ECX holds.
    &[0xb9, 0x00, 0x02, 0x00, 0x40, 0x0f, 0x32], // mov ecx, 0x4000_0200; rdmsr
    &[0xb9, 0x00, 0x02, 0x00, 0x40, 0x0f, 0x30], // mov ecx, 0x4000_0200; wrmsr
    &[0x0f, 0x32],                               // rdmsr
    &[0x0f, 0x30],                               // wrmsr
    &[0xec],                                     // in al, dx
    &[0xee],                                     // out dx, al
    &[0xf3, 0x6c],                               // rep insb
    &[0xf3, 0x6e],                               // rep outsb
    &[0x41, 0x8a, 0x02],                         // mov al, [r10]
    &[0x41, 0x88, 0x02],                         // mov [r10], al
    &[0x41, 0x8b, 0x01],                         // mov eax, [r9]
    &[0x41, 0x89, 0x01],                         // mov [r9], eax
    &[0x0f, 0xa2],                               // cpuid
    &[0x0f, 0x05],                               // syscall
    &[0xcd, 0x80],                               // int 0x80
    &[0x48, 0xcf],                               // iretq
    &[0xfb],                                     // sti
    &[0x0f, 0x22, 0xd8],                         // mov cr3, rax
];

fn input(rng: &mut Rng) -> Vec<u8> {
    let len = 1 + (rng.next_u64() % 256) as usize;
    let spliced = rng.next_u64() & 1 != 0;
    let mut data = Vec::with_capacity(len + 4);
    while data.len() < len {
        let r = rng.next_u64();
        if spliced && r & 7 == 0 {
            data.extend_from_slice(SNIPPETS[(r >> 8) as usize % SNIPPETS.len()]);
        } else {
            data.push((r >> 16) as u8);
        }
    }
    data
}

#[test]
fn random_inputs_never_panic() {
    let mut rng = Rng(0x0f0f_5eed_e7ec_b7e5);
    let mut ends: BTreeMap<End, usize> = BTreeMap::new();
    let mut exits = [0u64; 6];
    let (mut user, mut kernel) = (0, 0);
    for n in 0..INPUTS {
        let data = input(&mut rng);
        let r = exec_bytes(&data);
        let end = r
            .end
            .unwrap_or_else(|| panic!("input {n} did not run: {data:02x?}"));
        assert!(
            r.instructions <= BUDGET,
            "input {n} retired {} instructions: {data:02x?}",
            r.instructions
        );
        *ends.entry(end).or_default() += 1;
        for (t, e) in exits.iter_mut().zip(r.exits) {
            *t += e;
        }
        if data[0] & 1 == 0 {
            user += r.instructions;
        } else {
            kernel += r.instructions;
        }
    }
    eprintln!("exec_bytes: {INPUTS} inputs, ends {ends:?}, exits {exits:?}, instructions at CPL 3 {user}, at CPL 0 {kernel}");
    // The inputs reach well past their first instruction at both privilege
    // levels, and exercise every answer the harness gives.
    assert!(user > INPUTS as u64 && kernel > INPUTS as u64);
    assert!(ends.contains_key(&End::Hlt) && ends.contains_key(&End::Budget));
    for (kind, n) in [
        "port in",
        "port out",
        "MMIO read",
        "MMIO write",
        "RDMSR",
        "WRMSR",
    ]
    .iter()
    .zip(exits)
    {
        assert!(n > 0, "no {kind} exit in {INPUTS} inputs");
    }
}

/// An empty input does nothing; one byte of flags runs zero bytes of code.
#[test]
fn degenerate_inputs() {
    assert_eq!(exec_bytes(&[]).end, None);
    for flags in 0..=255u8 {
        let r = exec_bytes(&[flags]);
        // Zeroed memory is `add [rax], al`: it runs until the budget ends, or
        // faults into the handler when RAX points nowhere writable.
        assert!(r.end.is_some() && r.instructions <= BUDGET, "{flags:#x}");
    }
}
