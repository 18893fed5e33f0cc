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
    let config = BtConfig {
        // Translate at first sight: these tests look at translated code.
        hot: 0,
        ..BtConfig::default()
    };
    let mut vm = BtVm::new(&m, config).unwrap();
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
    assert_eq!(
        counter(&bt, "guest_instructions"),
        oracle.retired,
        "instructions counted"
    );
    bt
}

/// The host address and code of the largest block (a test's loop).
fn largest_block(v: &BtVcpu) -> (u64, Vec<u8>) {
    let (_, addr, host) = v
        .blocks()
        .host_code()
        .into_iter()
        .max_by_key(|(_, _, h)| h.len())
        .expect("a block at the loop");
    (addr, host)
}

/// Asserts that counter `name` is at least `n`, showing them all if not.
fn at_least(v: &BtVcpu, name: &str, n: u64) {
    assert!(
        counter(v, name) >= n,
        "{name} < {n}: {:?}",
        v.engine_counters()
    );
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
    at_least(&v, "bt/run_translated", 9000);
    assert!(counter(&v, "bt/blocks_translated") >= 1);
}

/// A superblock: conditional branches inside a block, not taken, let it go
/// on; taken, one jumps to a later instruction of the same block (a join:
/// the flags of the compare live across it, a probe that saved them right
/// before it, and an access through the same base after it, which must
/// probe again since the branch skipped the probe), another leaves by a
/// side exit to code after the loop, another by one back to the block's
/// start. The registers (a checksum of the memory too) and the count of
/// instructions agree with `emu`; each of those three points was seen to
/// fail this test when broken.
#[test]
fn branches_inside_a_block_join_or_leave() {
    const DATA: u64 = 0x20_0000;
    let code = asm(|a| {
        let (mut init, mut outer, mut inner, mut noswap, mut odd, mut back, mut sum) = (
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
        );
        a.mov(rdi, DATA)?;
        a.mov(ecx, 64u32)?;
        a.mov(eax, 12345u32)?;
        a.set_label(&mut init)?;
        a.imul_3(eax, eax, 1_103_515_245)?;
        a.add(eax, 12345)?;
        a.mov(dword_ptr(rdi + rcx * 4 - 4), eax)?;
        a.dec(ecx)?;
        a.jnz(init)?;
        a.mov(r8d, 6u32)?;
        a.lea(rsi, qword_ptr(rdi + 0x800))?;
        a.set_label(&mut outer)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut inner)?;
        a.mov(eax, dword_ptr(rdi + rcx * 4))?;
        a.mov(edx, dword_ptr(rdi + rcx * 4 + 4))?;
        a.cmp(edx, eax)?;
        a.jae(noswap)?; // a join; CF set on the way through
        a.mov(dword_ptr(rdi + rcx * 4), edx)?;
        a.mov(dword_ptr(rdi + rcx * 4 + 4), eax)?;
        a.mov(qword_ptr(rsi), rcx)?; // a probe of its own right before the join
        a.set_label(&mut noswap)?;
        a.adc(r14, 0)?; // CF of the compare, either way
        a.add(qword_ptr(rsi + 8), 1)?; // through RSI as before the join: a probe of its own
        a.mov(r10d, dword_ptr(rdi + rcx * 4))?;
        a.add(r11, r10)?;
        a.test(r10d, 1)?;
        a.jnz(odd)?; // a side exit forward
        a.set_label(&mut back)?;
        a.inc(ecx)?;
        a.test(ecx, 15)?;
        a.jz(inner)?; // a side exit back to the start
        a.cmp(ecx, 63)?;
        a.jb(inner)?;
        a.dec(r8d)?;
        a.jnz(outer)?;
        a.mov(r12, qword_ptr(rsi))?;
        a.add(r12, qword_ptr(rsi + 8))?;
        a.mov(ecx, 64u32)?;
        a.set_label(&mut sum)?;
        a.mov(eax, dword_ptr(rdi + rcx * 4 - 4))?;
        a.imul_3(r12, r12, 31)?;
        a.add(r12, rax)?;
        a.dec(ecx)?;
        a.jnz(sum)?;
        a.hlt()?;
        a.set_label(&mut odd)?;
        a.add(r13, 3)?;
        a.jmp(back)
    });
    let v = run_both(&code);
    at_least(&v, "bt/run_translated", 3000);
    // The inner loop is one block with its branches inside.
    let (_, host) = largest_block(&v);
    let jccs = Decoder::with_ip(64, &host, 0, DecoderOptions::NONE)
        .into_iter()
        .filter(|i| i.is_jcc_short_or_near())
        .count();
    assert!(
        jccs >= 4,
        "{jccs} conditional branches in the largest block"
    );
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
    at_least(&v, "bt/invalidated_blocks/written", 1);
}

/// Nothing but the translator's templates and allow-listed instructions is
/// in the code cache, and the host code touches no memory but the context
/// (through RDI), its own stack (PUSHFQ and POPFQ), the software TLB's
/// entries (through the register a probe pointed at one: `add r, [rdi +
/// ctx.tlb]`), and guest RAM at an address a probe has just checked (right
/// after the probe's last step, `add` of the page's host address, or the
/// restore of the flags after it); its jumps stay in the block or go to the
/// runtime or to the start of a block (linked).
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
        // A group: one probe for the three.
        a.mov(r10, qword_ptr(r12 + 0x18))?;
        a.add(r10, qword_ptr(r12 + 0x10))?;
        a.mov(qword_ptr(r12 + 0x20), r10)?;
        a.mov(r9, qword_ptr(0x20_0100u64))?;
        a.mov(qword_ptr(r12 + 0x100), 7)?;
        a.xor(edx, edx)?;
        a.div(qword_ptr(r12 + 0x100))?;
        a.add(r13, rdx)?; // defines the flags DIV leaves undefined
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    let v = run_both(&code);
    assert!(counter(&v, "bt/instructions_translated_memory") >= 3);
    assert_eq!(
        counter(&v, "bt/callout/div"),
        0,
        "{:?}",
        v.engine_counters()
    );
    let rt = v.blocks().runtime();
    let runtime = [rt.enter, rt.stop, rt.exit, rt.exit_saved, rt.lookup];
    let tlb = std::mem::offset_of!(translate::Ctx, tlb) as u64;
    let blocks = v.blocks().host_code();
    assert!(!blocks.is_empty());
    let starts: Vec<u64> = blocks.iter().map(|b| b.1).collect();
    for (pa, addr, host) in blocks {
        let end = addr + host.len() as u64;
        let insns: Vec<_> = Decoder::with_ip(64, &host, addr, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let mut entry_reg = Register::None;
        // The register a probe left a checked host address in, and the
        // bytes from there it checked; the last `lea`/`mov` of a probe's
        // last-byte address (register, bytes) and the span it gave.
        let mut checked: Option<(Register, u64)> = None;
        let mut last_byte = (Register::None, 0u64);
        let mut span = 0u64;
        let mut info = iced_x86::InstructionInfoFactory::new();
        for (k, i) in insns.iter().enumerate() {
            assert!(!i.is_invalid(), "block {pa:#x}: invalid bytes");
            let template = matches!(
                i.mnemonic(),
                M::Pushfq
                    | M::Popfq
                    | M::Lahf
                    | M::Sahf
                    | M::Seto
                    | M::Shr
                    | M::Shl
                    | M::Imul
                    | M::Jmp
            ) || i.is_jcc_short_or_near();
            assert!(
                template
                    || translate::identical(i)
                    || translate::memory_form(i).is_some()
                    || (translate::division(i) && i.op0_kind() == OpKind::Register),
                "block {pa:#x}: {i} is neither a template nor allowed"
            );
            if i.is_jcc_short_or_near() || i.is_jmp_short_or_near() {
                let t = i.near_branch_target();
                assert!(
                    (addr..end).contains(&t) || runtime.contains(&t) || starts.contains(&t),
                    "block {pa:#x}: {i} leaves for {t:#x}"
                );
            }
            assert!(
                !(i.mnemonic() == M::Jmp && i.op0_kind() != OpKind::NearBranch64),
                "block {pa:#x}: indirect {i}"
            );
            if i.mnemonic() == M::Add
                && i.op1_kind() == OpKind::Memory
                && i.memory_base() == Register::RDI
                && i.memory_displacement64() == tlb
            {
                entry_reg = i.op0_register();
            }
            // Track the probe: `lea t, [a + n - 1]` (or `mov t, a`), `and t,
            // -4096` (the page of the span's last byte), ..., `add a,
            // [entry + HOST]`.
            match i.mnemonic() {
                M::Lea
                    if i.memory_base() != Register::None && i.memory_index() == Register::None =>
                {
                    last_byte = (i.op0_register(), i.memory_displacement64().wrapping_add(1));
                }
                M::Mov if i.op1_kind() == OpKind::Register && i.op0_kind() == OpKind::Register => {
                    last_byte = (i.op0_register(), 1);
                }
                M::And if i.op0_register() == last_byte.0 && i.immediate32to64() == -4096 => {
                    span = last_byte.1;
                }
                _ => {}
            }
            let probe_end = i.mnemonic() == M::Add
                && i.op1_kind() == OpKind::Memory
                && i.memory_base() == entry_reg
                && entry_reg != Register::None
                && i.memory_displacement64() as usize == x86::TLB_HOST;
            let writes: Vec<Register> = info
                .info(i)
                .used_registers()
                .iter()
                .filter(|u| {
                    matches!(
                        u.access(),
                        iced_x86::OpAccess::Write
                            | iced_x86::OpAccess::CondWrite
                            | iced_x86::OpAccess::ReadWrite
                            | iced_x86::OpAccess::ReadCondWrite
                    )
                })
                .map(|u| u.register().full_register())
                .collect();
            let memory =
                (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) && i.mnemonic() != M::Lea;
            if !memory {
                if probe_end {
                    checked = Some((i.op0_register(), span));
                } else if checked.is_some_and(|(r, _)| writes.contains(&r)) {
                    checked = None;
                }
                continue;
            }
            let ctx = i.memory_base() == Register::RDI && i.memory_index() == Register::None;
            let entry = i.memory_base() == entry_reg
                && entry_reg != Register::None
                && i.memory_index() == Register::None
                && [0, x86::TLB_HOST, x86::TLB_ALLOW]
                    .contains(&(i.memory_displacement64() as usize));
            // The probe's last step adds the page's host address from the
            // entry to the offset in the page.
            let after_probe = |j: usize| {
                insns[j].mnemonic() == M::Add
                    && insns[j].op0_register() == i.memory_base()
                    && insns[j].op1_kind() == OpKind::Memory
                    && insns[j].memory_base() == entry_reg
                    && insns[j].memory_displacement64() as usize == x86::TLB_HOST
            };
            let right_after = i.memory_index() == Register::None
                && i.memory_displacement64() == 0
                && k >= 2
                && (after_probe(k - 1)
                    || (matches!(insns[k - 1].mnemonic(), M::Popfq | M::Lea)
                        && after_probe(k - 2)));
            // In a group: within the span the probe checked from the
            // address it left.
            let in_span = checked.is_some_and(|(r, n)| {
                i.memory_base() == r
                    && i.memory_index() == Register::None
                    && i.memory_displacement64() + (i.memory_size().size() as u64) <= n
            });
            assert!(
                ctx || entry || right_after || in_span,
                "block {pa:#x}: {i} touches memory no probe checked"
            );
            if probe_end {
                checked = Some((i.op0_register(), span));
            } else if checked.is_some_and(|(r, _)| writes.contains(&r)) {
                checked = None;
            }
        }
    }
}

/// Three accesses through one base register, [r12], [r12+8] and [r12+16],
/// in a loop: `groups` at the start of a page (one probe for the three,
/// none alone), and across a page (the group's probe misses every time, so
/// the leader is made to probe alone, and the block runs on).
fn grouped_loop(base: u64) -> Vec<u8> {
    asm(|a| {
        a.mov(ecx, 300u32)?;
        a.mov(r12, base)?;
        a.mov(qword_ptr(r12), 5)?;
        a.mov(qword_ptr(r12 + 8), 7)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(r12))?;
        a.add(rax, qword_ptr(r12 + 8))?;
        a.mov(qword_ptr(r12 + 16), rax)?;
        a.add(rbx, rax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(rdx, qword_ptr(r12 + 16))?;
        a.hlt()
    })
}

#[test]
fn accesses_through_one_base_share_a_probe() {
    let v = run_both(&grouped_loop(0x20_0000));
    assert_eq!(
        counter(&v, "bt/solo_probes"),
        0,
        "{:?}",
        v.engine_counters()
    );
    assert!(counter(&v, "bt/run_translated") >= 1500);
    // The loop's block probes once for its three accesses.
    let (addr, host) = largest_block(&v);
    let probes = Decoder::with_ip(64, &host, addr, DecoderOptions::NONE)
        .into_iter()
        .filter(|i| {
            i.mnemonic() == M::Add
                && i.op1_kind() == OpKind::Memory
                && i.memory_displacement64() as usize == x86::TLB_HOST
        })
        .count();
    assert_eq!(probes, 1);
}

#[test]
fn a_group_across_pages_probes_alone() {
    let v = run_both(&grouped_loop(0x20_0ff0));
    // The leader, and the leader of the rest of the group in the block that
    // starts after it (the side exits resume there).
    at_least(&v, "bt/solo_probes", 1);
    assert!(counter(&v, "bt/run_translated") >= 1000);
}

/// A group whose second access is an instruction across a page: the check
/// of the next page before that instruction takes the scratch registers,
/// so it probes alone (before, it accessed the host address the check had
/// left in scratch 0: a guest linear address).
#[test]
fn an_instruction_across_pages_is_not_in_a_group() {
    let looped = CODE + 0x1000 - 6;
    let mut code = asm(|a| {
        a.mov(ecx, 100u32)?;
        a.mov(r12, 0x20_0000u64)?;
        a.mov(qword_ptr(r12), 5)?;
        a.mov(qword_ptr(r12 + 8), 7)?;
        a.mov(rax, looped)?;
        a.jmp(rax)
    });
    let mut l = CodeAssembler::new(64).unwrap();
    let mut top = l.create_label();
    l.set_label(&mut top).unwrap();
    l.mov(rax, qword_ptr(r12)).unwrap(); // 4 bytes
    l.add(rax, qword_ptr(r12 + 8)).unwrap(); // 5 bytes, across the page
    l.add(rbx, rax).unwrap();
    l.dec(ecx).unwrap();
    l.jnz(top).unwrap();
    l.hlt().unwrap();
    let l = l.assemble(looped).unwrap();
    assert_eq!(l[..4], [0x49, 0x8b, 0x04, 0x24]);
    code.resize((looped - CODE) as usize, 0x90);
    code.extend_from_slice(&l);
    let v = run_both(&code);
    at_least(&v, "bt/run_translated", 300);
}

/// A loop that reads, changes and stores guest RAX through memory, with
/// `op` in the middle.
fn rax_loop(op: impl FnOnce(&mut CodeAssembler) -> std::result::Result<(), IcedError>) -> Vec<u8> {
    asm(|a| {
        a.mov(ecx, 200u32)?;
        a.mov(r12, 0x20_0000u64)?;
        a.mov(qword_ptr(r12), 3)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(r12))?;
        op(a)?;
        a.mov(qword_ptr(r12 + 8), rax)?;
        a.add(qword_ptr(r12), 1)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    })
}

/// Whether some block parks the flags in the context (`mov [rdi+park], ax`).
fn parks_flags(v: &BtVcpu) -> bool {
    let park = std::mem::offset_of!(translate::Ctx, park) as u64;
    v.blocks().host_code().iter().any(|(_, addr, host)| {
        Decoder::with_ip(64, host, *addr, DecoderOptions::NONE)
            .into_iter()
            .any(|i| {
                i.op0_kind() == OpKind::Memory
                    && i.memory_base() == Register::RDI
                    && i.memory_displacement64() == park
            })
    })
}

/// Guest RAX moves to a spare host register where every use of it can
/// name another register, so the flags are saved in AX without parking;
/// a form with a fixed accumulator (`add eax, imm32`) or an implicit use
/// (MUL) keeps it in RAX, and the flags are parked.
#[test]
fn guest_rax_is_renamed_where_it_can_be() {
    let v = run_both(&rax_loop(|a| a.add(rax, rbx)));
    assert!(!parks_flags(&v));
    at_least(&v, "bt/run_translated", 1000);
    let v = run_both(&rax_loop(|a| a.add(eax, 0x1234_5678)));
    at_least(&v, "bt/run_translated", 1000);
    let v = run_both(&rax_loop(|a| a.mul(rbx)));
    assert!(parks_flags(&v));
    at_least(&v, "bt/run_translated", 1000);
}

/// docs/bt.md's worked example: the loop of `arithmetic_loop_runs_translated`
/// is one block of nine instructions; the guest's registers and flags stay
/// in host registers (guest RSP and RDI, which have none, in registers the
/// block borrows); the Jcc becomes a host Jcc between two linked exits.
/// Printed with `--nocapture`.
#[test]
fn worked_example() {
    let code = arithmetic_loop(|_| Ok(()));
    let v = run_both(&code);
    // The block of the loop, after `mov ecx, 1000; xor eax, eax; mov rdi, 7`.
    let top = CODE + 5 + 2 + 10;
    let (_, addr, host) = v
        .blocks()
        .host_code()
        .into_iter()
        .find(|b| b.0 == top)
        .expect("a block at the loop");
    let mut text = String::new();
    let mut jne = false;
    let mut back = false;
    for i in Decoder::with_ip(64, &host, addr, DecoderOptions::NONE) {
        jne |= i.mnemonic() == M::Jne;
        // The loop goes around inside its block, past the entry.
        back |= i.mnemonic() == M::Jmp && (addr + 1..addr + 0x20).contains(&i.near_branch_target());
        assert!(
            !(i.op0_register() == Register::RSP && i.mnemonic() == M::Add && i.immediate8() == 8),
            "guest RSP is renamed"
        );
        assert!(i.mnemonic() != M::Popfq, "no POPFQ: {text}");
        text += &format!("{:3x}: {i}\n", i.ip() - addr);
    }
    eprintln!("{text}");
    assert!(jne && back, "{text}");
    // One block of nine instructions, entered once, 1000 times around.
    at_least(&v, "bt/blocks_run", 1000);
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

/// Adaptive translation: a store that keeps missing the TLB's fast path
/// for a reason the interpreter must handle every time (here, a write into
/// the page that holds the translated loop, next to its code) is
/// retranslated into a callout after [`ADAPT_AFTER`] side exits, so it
/// stops leaving the block; the block it was in is dropped and the jumps
/// linked to it are unlinked.
#[test]
fn a_store_that_keeps_missing_becomes_a_callout() {
    let data = CODE + 0x800;
    let code = asm(|a| {
        a.mov(ecx, 1000u32)?;
        a.mov(rbx, data)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(eax, 3)?;
        a.mov(dword_ptr(rbx), eax)?;
        a.xor(edx, eax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    let v = run_both(&code);
    let c = |n| counter(&v, n);
    assert_eq!(c("bt/adaptive_callouts"), 1, "{:?}", v.engine_counters());
    assert!(
        c("bt/side_exits/hard") <= ADAPT_AFTER as u64 + 2,
        "{:?}",
        v.engine_counters()
    );
    assert!(c("bt/unlinks") >= 1, "{:?}", v.engine_counters());
    assert!(c("bt/callout/mov") >= 900, "{:?}", v.engine_counters());
}

/// CALL and JMP through a register, and RET, run as translated code (the
/// targets through the jump cache), with `emu`'s results.
#[test]
fn indirect_calls_and_jumps_are_translated() {
    let f = CODE + 0x200;
    let code = asm(|a| {
        a.mov(ecx, 200u32)?;
        a.mov(rax, f)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.call(rax)?;
        a.add(rbx, rdx)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()?;
        a.zero_bytes()?;
        Ok(())
    });
    let mut c = code;
    c.resize(0x200, 0x90);
    let g = CodeAssembler::new(64)
        .and_then(|mut a| {
            let mut out = a.create_label();
            a.mov(rdx, CODE + 0x280)?;
            a.add(rsi, 7)?;
            a.jmp(rdx)?;
            a.set_label(&mut out)?;
            a.ret()?;
            a.assemble(f)
        })
        .unwrap();
    c.extend_from_slice(&g);
    c.resize(0x280, 0x90);
    c.extend_from_slice(
        &asm(|a| {
            a.xor(rdx, rsi)?;
            a.ret()
        })[..],
    );
    let v = run_both(&c);
    at_least(&v, "bt/run_translated", 1000);
    at_least(&v, "bt/exits/lookup_hits", 500);
    assert_eq!(
        counter(&v, "bt/callout/call"),
        0,
        "{:?}",
        v.engine_counters()
    );
}

/// An instruction that crosses into the next page is translated (its
/// block checks that the next page is still mapped where it was), and a
/// write to its bytes on the second page drops its block: the second pass
/// adds the patched immediate, as the interpreter does.
#[test]
fn an_instruction_across_pages_is_translated_and_invalidated() {
    let at = CODE + 0xffb;
    let start = asm(|a| {
        a.mov(r8d, 2u32)?;
        a.mov(ecx, 100u32)?;
        a.xor(ebx, ebx)?;
        a.mov(rax, at)?;
        a.jmp(rax)
    });
    let mut code = start;
    code.resize((at - CODE) as usize, 0x90);
    let body = CodeAssembler::new(64)
        .and_then(|mut a| {
            let a = &mut a;
            let mut top = a.create_label();
            let mut done = a.create_label();
            a.set_label(&mut top)?;
            a.xor(edx, ebx)?; // 2 bytes, then ADD from 0xffd to 0x1002
            a.add(ebx, 0x0101_0101)?;
            a.dec(ecx)?;
            a.jnz(top)?;
            a.dec(r8d)?;
            a.jz(done)?;
            // The immediate's third byte, on the second page.
            a.mov(byte_ptr(CODE + 0x1001), 7)?;
            a.mov(ecx, 100u32)?;
            a.jmp(top)?;
            a.set_label(&mut done)?;
            a.hlt()?;
            a.assemble(at)
        })
        .unwrap();
    assert_eq!(body[2..4], [0x81, 0xc3]);
    code.extend_from_slice(&body);
    let v = run_both(&code);
    let sum = v.regs().unwrap().rbx;
    let c = |n| counter(&v, n);
    assert!(c("bt/callout/invalid") <= 2, "{:?}", v.engine_counters());
    assert!(c("bt/run_translated") >= 300, "{:?}", v.engine_counters());
    assert!(
        c("bt/invalidated_blocks/written") >= 2,
        "{:?}",
        v.engine_counters()
    );
    assert_eq!(sum, 100 * 0x0101_0101 + 100 * 0x0107_0101);
}

/// Memory operands in FS and GS (the kernel's per-CPU variables, RIP-relative
/// ones too) run as translated code, the segment's base added by the probe.
#[test]
fn fs_and_gs_operands_are_translated() {
    let data = 0x20_0000u64;
    let code = asm(|a| {
        // GS base = data, FS base = data + 0x100 (WRMSR at CPL 0).
        a.mov(ecx, 0xc000_0101u32)?;
        a.mov(eax, data as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0100u32)?;
        a.mov(eax, (data + 0x100) as u32)?;
        a.wrmsr()?;
        a.mov(ecx, 500u32)?;
        a.xor(ebx, ebx)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.add(dword_ptr(0x10).gs(), 3)?;
        a.mov(rax, qword_ptr(0x10).gs())?;
        a.mov(qword_ptr(rbx + 8).fs(), rax)?;
        a.inc(dword_ptr(0x20_0040u64).gs())?; // RIP-relative
        a.add(rbx, 8)?;
        a.and(ebx, 0x7f)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(rsi, qword_ptr(0x20).gs())?;
        a.hlt()
    });
    let v = run_both(&code);
    let c = |n| counter(&v, n);
    assert!(c("bt/run_translated") >= 3500, "{:?}", v.engine_counters());
    assert!(
        c("bt/instructions_translated_memory") >= 4,
        "{:?}",
        v.engine_counters()
    );
}

/// DIV and IDIV by a doubleword or quadword in memory run as translated
/// code (the divisor loaded through the probe, then the #DE check on it),
/// with the oracle's results.
#[test]
fn divisions_by_memory_are_translated() {
    let data = 0x20_0000u64;
    let code = asm(|a| {
        a.mov(rbx, data)?;
        a.mov(ecx, 300u32)?;
        a.mov(r8, 0x1234_5678_9abc_def0u64)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.lea(rax, qword_ptr(rcx + 3))?;
        a.mov(qword_ptr(rbx), rax)?;
        a.mov(dword_ptr(rbx + 8), ecx)?;
        a.mov(rax, r8)?;
        a.xor(edx, edx)?;
        a.div(qword_ptr(rbx))?;
        a.add(r9, rax)?;
        a.add(r10, rdx)?;
        a.mov(eax, -1_000_000i32)?;
        a.cdq()?;
        a.idiv(dword_ptr(rbx + 8))?;
        a.add(r11d, eax)?;
        a.add(r12d, edx)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    let v = run_both(&code);
    let c = |n| counter(&v, n);
    assert!(c("bt/run_translated") >= 4000, "{:?}", v.engine_counters());
    assert_eq!(
        c("bt/callout/div") + c("bt/callout/idiv"),
        0,
        "{:?}",
        v.engine_counters()
    );
}

/// #AC at CPL 3 (CR0.AM, RFLAGS.AC) on `bt`: translated code does not
/// check alignment, so while alignment checking is on the interpreter
/// runs the guest, and a misaligned SSE, MMX, x87 or integer access after
/// a translated loop raises #AC(0) at that instruction.
#[test]
fn alignment_checks_at_cpl_3_leave_translated_code() {
    const USER_PT: u64 = 0x20_0000;
    const IDT: u64 = 0x8000;
    const TSS: u64 = 0x9000;
    const HANDLER: u64 = 0x18_0000;
    const DATA: u64 = 0x50_0000;
    type Access = fn(&mut CodeAssembler) -> std::result::Result<(), IcedError>;
    let accesses: [(&str, Access); 6] = [
        ("movups", |a| a.movups(xmm0, xmmword_ptr(rbx + 8))),
        ("movq mm", |a| a.movq(mm0, qword_ptr(rbx + 4))),
        ("maskmovq", |a| {
            a.lea(rdi, qword_ptr(rbx + 2))?;
            a.maskmovq(mm0, mm1)
        }),
        ("fld m80", |a| a.fld(tword_ptr(rbx + 4))),
        ("fnstenv", |a| a.fnstenv(ptr(rbx + 2))),
        ("mov m32", |a| a.mov(dword_ptr(rbx + 1), eax)),
    ];
    for (what, access) in accesses {
        let m = mem();
        let mut sregs = machine::boot::long_mode(&m).unwrap();
        // 0..16 MiB user-accessible, a TSS with RSP0, gates for #AC and #GP.
        let w = |v: u64, at: u64| m.write_obj(v, GuestAddress(at)).unwrap();
        w((USER_PT + 0x1000) | 7, USER_PT);
        w((USER_PT + 0x2000) | 7, USER_PT + 0x1000);
        for k in 0..8u64 {
            w((k << 21) | 0x87, USER_PT + 0x2000 + 8 * k);
        }
        w(0x7_0000, TSS + 4);
        for (v, h) in [(17u64, HANDLER), (13, HANDLER + 0x100)] {
            let lo = (h & 0xffff) | 0x10 << 16 | 0x8e00 << 32 | (h >> 16 & 0xffff) << 48;
            w(lo, IDT + 16 * v);
            w(h >> 32, IDT + 16 * v + 8);
            let stub = asm_at(h, |a| {
                a.mov(r14, v)?;
                a.mov(r12, qword_ptr(rsp))?; // error code
                a.mov(r13, qword_ptr(rsp + 8))?; // RIP
                a.hlt()
            });
            m.write_slice(&stub, GuestAddress(h)).unwrap();
        }
        let mut faulting = 0;
        let code = asm(|a| {
            a.mov(rbx, DATA)?;
            a.mov(ecx, 1000u32)?;
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.add(rax, qword_ptr(rbx + 8))?;
            a.mov(qword_ptr(rbx + 16), rax)?;
            a.dec(ecx)?;
            a.jnz(top)?;
            a.pushfq()?;
            a.or(qword_ptr(rsp), 0x4_0000)?;
            a.popfq()?;
            a.mov(ecx, 100u32)?;
            let mut again = a.create_label();
            a.set_label(&mut again)?;
            a.add(rax, qword_ptr(rbx + 8))?;
            a.dec(ecx)?;
            a.jnz(again)?;
            faulting = a.instructions().len();
            access(a)?;
            a.hlt()
        });
        let d = Decoder::with_ip(64, &code, CODE, DecoderOptions::NONE);
        let insns: Vec<_> = d.into_iter().collect();
        // The access itself (after LEA for MASKMOVQ).
        let want_rip = insns
            .iter()
            .skip(faulting)
            .find(|i| i.mnemonic() != M::Lea)
            .unwrap()
            .ip();
        m.write_slice(&code, GuestAddress(CODE)).unwrap();
        sregs.cr3 = USER_PT;
        sregs.cr0 |= arch::cr0::AM;
        sregs.cs = vcpu::Segment::flat(0x33, true, true, false);
        sregs.ss = vcpu::Segment::flat(0x2b, false, false, true);
        sregs.ds = sregs.ss;
        sregs.es = sregs.ss;
        sregs.tr = vcpu::Segment::tss(0x20, TSS, 0x67);
        sregs.idt = vcpu::DescriptorTable {
            base: IDT,
            limit: 0xfff,
        };
        let mut vm = BtVm::new(&m, BtConfig::default()).unwrap();
        let mut bt = vm.create_bt_vcpu(0).unwrap();
        bt.set_sregs(&sregs).unwrap();
        bt.set_regs(&Regs {
            rip: CODE,
            rsp: 0x40_0000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(bt.run().unwrap().name(), "hlt", "{what}");
        let r = bt.regs().unwrap();
        assert_eq!((r.r14, r.r12, r.r13), (17, 0, want_rip), "{what}: #AC(0)");
        assert!(
            counter(&bt, "bt/run_translated") >= 500,
            "{what}: the first loop ran translated: {:?}",
            bt.engine_counters()
        );
    }
}

fn asm_at(
    at: u64,
    f: impl FnOnce(&mut CodeAssembler) -> std::result::Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(at).unwrap()
}
