//! The engine on small guests, with `emu` as the oracle.

use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions, Mnemonic as M, OpKind, Register};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use vcpu::Regs;

const CODE: u64 = 0x10_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn asm(f: impl FnOnce(&mut CodeAssembler) -> std::result::Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

/// Runs `code` at CODE in 64-bit mode until HLT on engine `bt` and on the
/// software CPU alone; both end with the same registers. Returns the `bt`
/// vCPU.
fn run_both(code: &[u8]) -> BtVcpu {
    let m = mem();
    m.write_slice(code, GuestAddress(CODE)).unwrap();
    let sregs = machine::boot::long_mode(&m).unwrap();
    let regs = Regs {
        rip: CODE,
        rsp: 0x8_0000,
        rflags: 2,
        rbx: 0x1234_5678_9abc_def0,
        ..Default::default()
    };
    let mut vm = BtVm::new(&m, BtConfig::default()).unwrap();
    let mut bt = vm.create_bt_vcpu(0).unwrap();
    bt.set_sregs(&sregs).unwrap();
    bt.set_regs(&regs).unwrap();
    assert_eq!(bt.run().unwrap().name(), "hlt");
    // The oracle on a memory of its own (the guest may write its code).
    let m2 = mem();
    m2.write_slice(code, GuestAddress(CODE)).unwrap();
    let sregs = machine::boot::long_mode(&m2).unwrap();
    let mut oracle =
        Platform::new(false, false).create_cpu(0, &m2, x86::CpuidTable::software_cpu(false, None));
    oracle.set_sregs(&sregs);
    oracle.set_regs(&regs);
    loop {
        match oracle.run(1_000_000) {
            CpuExit::Budget => {}
            CpuExit::Hlt => break,
            e => panic!("oracle: {e:?}"),
        }
    }
    assert_eq!(bt.regs().unwrap(), oracle.regs());
    bt
}

fn counter(v: &BtVcpu, name: &str) -> u64 {
    v.engine_counters()
        .into_iter()
        .find(|c| c.0 == name)
        .map_or(0, |c| c.1)
}

/// The loop of `arithmetic_loop_runs_translated` and `worked_example`, then
/// `tail`, then HLT.
fn arithmetic_loop(
    tail: impl FnOnce(&mut CodeAssembler) -> std::result::Result<(), IcedError>,
) -> Vec<u8> {
    asm(|a| {
        a.mov(ecx, 1000u32)?;
        a.xor(eax, eax)?;
        a.mov(rdi, 7u64)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(rax, rbx)?;
        a.adc(rdx, 0)?;
        a.rol(rbx, 7)?;
        a.lea(rsi, qword_ptr(rax + rdx * 4 + 12))?;
        a.imul_3(rdi, rsi, 3)?;
        a.add(rsp, 8)?;
        a.sub(rsp, 8)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        tail(a)?;
        a.hlt()
    })
}

/// A loop of register arithmetic, flags carried across blocks (ADC after
/// ADD, a conditional branch closing the loop), with RSP and RDI renamed.
#[test]
fn arithmetic_loop_runs_translated() {
    let code = arithmetic_loop(|a| {
        a.setc(r8b)?;
        a.cmovz(r9, rbx)
    });
    let v = run_both(&code);
    assert!(
        counter(&v, "bt/run_translated") >= 9000,
        "{:?}",
        v.engine_counters()
    );
    assert!(counter(&v, "bt/blocks_translated") >= 1);
}

/// A store into a translated block (the guest patches an immediate) drops
/// the block: the next pass runs the new bytes.
#[test]
fn self_modifying_code_invalidates_blocks() {
    let patch_at = CODE + 0x40;
    let mut blk = CodeAssembler::new(64).unwrap();
    blk.add(ebx, 0x1_0000).unwrap(); // 81 c3 imm32
    blk.add(ebx, ebx).unwrap();
    blk.xor(eax, ebx).unwrap();
    blk.ret().unwrap();
    let blk = blk.assemble(patch_at).unwrap();
    assert_eq!(blk[..2], [0x81, 0xc3]);
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(ecx, 3u32).unwrap();
    a.xor(ebx, ebx).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.mov(rax, patch_at).unwrap();
    a.call(rax).unwrap();
    a.mov(dword_ptr(patch_at + 2), 100).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(top).unwrap();
    a.hlt().unwrap();
    let mut c = a.assemble(CODE).unwrap();
    c.resize((patch_at - CODE) as usize, 0x90);
    c.extend_from_slice(&blk);
    let v = run_both(&c);
    assert!(
        counter(&v, "bt/invalidated_blocks") >= 1,
        "{:?}",
        v.engine_counters()
    );
}

/// Nothing but the translator's templates and allow-listed instructions is
/// in the code cache, and the host code touches no memory but the guest's
/// registers (through RDI), its RFLAGS (through RSI, or R8 in the
/// epilogue), its own stack, the software TLB (inside a probe, between its
/// PUSHFQ and POPFQ), and guest RAM at an address a probe has just checked
/// (right after the probe's last steps: `add` of the page's host offset,
/// then POPFQ).
#[test]
fn code_cache_holds_only_allowed_instructions() {
    let code = asm(|a| {
        a.mov(ecx, 50u32)?;
        a.mov(r12, 0x20_0000u64)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(rax, rbx)?;
        a.shl(rdx, 3)?;
        a.xor(r15, r14)?;
        a.mov(r10, rsp)?;
        a.lea(rdi, qword_ptr(rsp + rax * 2))?;
        a.bswap(r11)?;
        a.mov(qword_ptr(r12 + rcx * 8), rax)?;
        a.add(rax, qword_ptr(r12 + 8))?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    let v = run_both(&code);
    assert!(counter(&v, "bt/instructions_translated_memory") >= 2);
    let blocks = v.blocks().host_code();
    assert!(!blocks.is_empty());
    for (pa, host) in blocks {
        let insns: Vec<_> = Decoder::with_ip(64, &host, 0, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let mut in_probe = false;
        for (k, i) in insns.iter().enumerate() {
            assert!(!i.is_invalid(), "block {pa:#x}: invalid bytes");
            let template = matches!(
                i.mnemonic(),
                M::Push
                    | M::Pop
                    | M::Pushfq
                    | M::Popfq
                    | M::Ret
                    | M::Shr
                    | M::Imul
                    | M::Jne
                    | M::Je
                    | M::Ja
            ) || (i.condition_code() != iced_x86::ConditionCode::None
                && !translate::direct_branch(i));
            assert!(
                template || translate::identical(i) || translate::memory_form(i).is_some(),
                "block {pa:#x}: {i} is neither a template nor allowed"
            );
            match i.mnemonic() {
                M::Pushfq => in_probe = true,
                M::Popfq => in_probe = false,
                M::Lea if i.op0_register() == Register::RSP => in_probe = false,
                _ => {}
            }
            let memory =
                (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) && i.mnemonic() != M::Lea;
            let own = matches!(
                i.memory_base(),
                Register::RDI | Register::RSI | Register::RSP | Register::R8
            ) && i.memory_index() == Register::None;
            let checked = k >= 2
                && (insns[k - 1].mnemonic() == M::Popfq
                    || (insns[k - 1].mnemonic() == M::Lea
                        && insns[k - 1].op0_register() == Register::RSP))
                && insns[k - 2].mnemonic() == M::Add
                && insns[k - 2].op0_register() == i.memory_base()
                && i.memory_index() == Register::None
                && i.memory_displacement64() == 0;
            assert!(
                !memory || own || in_probe || checked,
                "block {pa:#x}: {i} touches memory no probe checked"
            );
        }
    }
}

/// docs/bt.md's worked example: the loop of `arithmetic_loop_runs_translated`
/// is one block of nine instructions, the Jcc resolved by a CMOVcc, guest
/// RSP and RDI in other host registers. Printed with `--nocapture`.
#[test]
fn worked_example() {
    let code = arithmetic_loop(|_| Ok(()));
    let v = run_both(&code);
    let (_, host) = v
        .blocks()
        .host_code()
        .into_iter()
        .max_by_key(|(_, h)| h.len())
        .expect("a block at the loop");
    let mut text = String::new();
    let mut cmov = false;
    for i in Decoder::with_ip(64, &host, 0, DecoderOptions::NONE) {
        cmov |= i.mnemonic() == M::Cmovne;
        assert!(
            !(i.op0_register() == Register::RSP && i.mnemonic() == M::Add && i.immediate8() == 8),
            "guest RSP is renamed"
        );
        text += &format!("{:3x}: {i}\n", i.ip());
    }
    eprintln!("{text}");
    assert!(cmov, "{text}");
}

/// The probe's flags are restored unless nothing can see them before they
/// are written again; a rotate by CL writes no flag when the masked count
/// is 0, so CF set before a probe must survive it and the rotate after it
/// to reach ADC.
#[test]
fn flags_survive_a_probe_before_a_rotate_by_zero() {
    let code = asm(|a| {
        a.mov(rbx, 0x20_0000u64)?;
        a.mov(ecx, 0x80u32)?;
        a.mov(esi, 3u32)?;
        a.xor(r12d, r12d)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.stc()?;
        a.not(byte_ptr(rbx))?;
        a.ror(r10b, cl)?;
        a.adc(r12, r8)?;
        a.dec(esi)?;
        a.jnz(top)?;
        a.hlt()
    });
    let v = run_both(&code);
    assert!(counter(&v, "bt/instructions_translated_memory") >= 1);
}
