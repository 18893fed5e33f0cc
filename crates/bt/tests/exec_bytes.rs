//! The fuzzing harness on engine `bt` (`visor_bt::exec_bytes_differential`,
//! also the cargo-fuzz target fuzz/fuzz_targets/exec_bytes_bt.rs) on
//! pseudo-random inputs from a fixed seed: no input may panic, and with `emu`
//! as the oracle every input ends the same way, with the same registers and
//! memory. Half of the inputs are runs of register arithmetic (what `bt`
//! translates) with random bytes between them.

use softplat::fuzz::Rng;
use visor_bt::exec_bytes_differential;

const INPUTS: usize = 1_000;

/// Register-only instructions on the allow-list, stack-relative loads,
/// stores and read-modify-writes (the TLB probe's memory forms), some with flags carried
/// from one to the next, and a backward conditional jump. An instruction
/// that leaves flags undefined by the SDM (MUL, IMUL, ROL by 7) is followed
/// by one that defines them all, so that no undefined flag, which the host
/// and the software CPU may compute differently, reaches a result.
const ARITH: &[&[u8]] = &[
    &[0x48, 0x01, 0xd8],                               // add rax, rbx
    &[0x48, 0x11, 0xca],                               // adc rdx, rcx
    &[0x48, 0x29, 0xf7],                               // sub rdi, rsi
    &[0x48, 0xc1, 0xc3, 0x07, 0x48, 0x83, 0xc0, 0x00], // rol rbx, 7; add rax, 0
    &[0x48, 0x8d, 0x74, 0x90, 0x0c],                   // lea rsi, [rax+rdx*4+12]
    &[0x48, 0x6b, 0xfe, 0x03, 0x48, 0x83, 0xc0, 0x00], // imul rdi, rsi, 3; add rax, 0
    &[0x48, 0x83, 0xc4, 0x08],                         // add rsp, 8
    &[0x48, 0x83, 0xec, 0x08],                         // sub rsp, 8
    &[0x0f, 0x94, 0xc1],                               // sete cl
    &[0x48, 0x0f, 0x45, 0xc3],                         // cmovne rax, rbx
    &[0x48, 0xf7, 0xd8],                               // neg rax
    &[0x48, 0x0f, 0xc8],                               // bswap rax
    &[0xff, 0xc9],                                     // dec ecx
    &[0x75, 0xf0],                                     // jnz -16
    &[0x48, 0x99],                                     // cqo
    &[0x48, 0x89, 0x44, 0x24, 0xf8],                   // mov [rsp-8], rax
    &[0x48, 0x03, 0x44, 0x24, 0xf0],                   // add rax, [rsp-16]
    &[0x48, 0x8b, 0x5c, 0x24, 0xf8],                   // mov rbx, [rsp-8]
    &[0x48, 0x83, 0x6c, 0x24, 0xf8, 0x03],             // sub qword [rsp-8], 3
    &[0x0f, 0xb6, 0x4c, 0x24, 0xf9],                   // movzx ecx, byte [rsp-7]
    &[0x48, 0xf7, 0xe3, 0x48, 0x83, 0xc0, 0x00],       // mul rbx; add rax, 0
];

#[test]
fn random_inputs_agree_with_emu() {
    let mut rng = Rng(0xb7_5eed);
    let mut translated_kinds = 0;
    for n in 0..INPUTS {
        let len = (rng.next_u64() % 200) as usize;
        let mut data: Vec<u8> = (0..=len).map(|_| rng.next_u64() as u8).collect();
        if n % 2 == 0 {
            data.truncate(1);
            for _ in 0..(rng.next_u64() % 40) {
                let s = ARITH[(rng.next_u64() % ARITH.len() as u64) as usize];
                data.extend_from_slice(s);
                if rng.next_u64().is_multiple_of(8) {
                    data.push(rng.next_u64() as u8);
                }
            }
            data.push(0xf4); // hlt
        }
        let (oracle, bt) = exec_bytes_differential(&data);
        assert!(
            bt.instructions <= visor_emu_budget() + visor_bt::BUDGET_SLACK,
            "input {n}: past the budget"
        );
        if data[0] & 2 == 0 {
            assert_eq!(oracle, bt, "input {n} ({data:02x?}) diverges");
        }
        translated_kinds += usize::from(n % 2 == 0 && bt.instructions > 3);
    }
    assert!(translated_kinds > INPUTS / 4, "{translated_kinds}");
}

fn visor_emu_budget() -> u64 {
    softplat::fuzz::BUDGET
}
