//! Engine `bt`: binary translation. Guest code is translated, block by
//! block, into host x86-64 code in an executable code cache ([`cache`]) and
//! run by jumping into it; what is not translated runs in visor's software
//! CPU, one instruction at a time, as a callout (see docs/bt.md).
//!
//! - Translation units ([`translate`]): from a guest RIP, the run of
//!   instructions on the allow-list of *identical* translation (integer
//!   operations on registers and immediates, LEA), re-encoded with the
//!   guest's registers renamed to host registers, the guest's arithmetic
//!   flags in the host's RFLAGS. Blocks are keyed by the guest-physical
//!   address of their first byte (they are only made of 64-bit code, and
//!   mean the same at any CPL).
//! - Everything else (memory accesses, control transfers, the privileged
//!   and sensitive instructions: CLI/STI, PUSHF/POPF, MOV to CRn, SGDT,
//!   port I/O, INT, IRET, SYSCALL, HLT, CPUID, RDMSR, ...) is carried out by
//!   the software CPU with the semantics of the CPU it models, at the
//!   guest's real privilege: the guest kernel sees exactly what it would
//!   see at CPL 0, so no virtualization hole remains.
//! - State stays precise: translated instructions cannot fault, so a fault
//!   is always raised by the interpreter at its instruction; interrupts,
//!   HLT and VMX exits are checked between instructions by the interpreter,
//!   as on `emu`.
//! - Code written while translated (by the guest, or by the VMM through
//!   `Vcpu::memory_written`) drops the software CPU's decoded page, which
//!   is logged; the engine drops the blocks of a logged page before it runs
//!   anything again. A full code cache is emptied whole.
//!
//! The run loop and the platform (local APIC, PICs, PIT) are the software
//! platform's ([`softplat`]); `bt` is its hook that runs a slice through
//! translated code.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cache;
pub mod translate;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::{Instruction, Mnemonic};
use softplat::{Platform, Step};
use vcpu::{IrqLine, Result, Vcpu, VcpuError, VcpuExit};
use vm_memory::GuestMemoryMmap;
use x86::{Accel, Cpu, CpuExit, TlbProbe};

use cache::CodeCache;
use translate::Translator;

/// The code cache's size unless `--bt-cache` says otherwise.
pub const DEFAULT_CACHE: usize = 64 << 20;

/// Options of a `bt` virtual machine.
#[derive(Clone, Copy, Debug)]
pub struct BtConfig {
    /// The software platform (local APIC, PICs, PIT); HLT then waits for it.
    pub irqchip: bool,
    /// visor's paravirtual CPUID leaves, as for `emu`.
    pub pv_signature: Option<[u8; 12]>,
    /// Size of the code cache in bytes.
    pub cache_size: usize,
}

impl Default for BtConfig {
    fn default() -> Self {
        BtConfig {
            irqchip: false,
            pv_signature: None,
            cache_size: DEFAULT_CACHE,
        }
    }
}

/// A `bt` virtual machine: guest memory and the software platform.
pub struct BtVm {
    mem: GuestMemoryMmap,
    config: BtConfig,
    platform: Arc<Platform>,
}

impl BtVm {
    /// A VM on guest memory `mem` (its regions are shared, not copied).
    pub fn new(mem: &GuestMemoryMmap, config: BtConfig) -> Result<BtVm> {
        Ok(BtVm {
            mem: mem.clone(),
            config,
            platform: Arc::new(Platform::new(config.irqchip, true)),
        })
    }

    /// The vCPU `id` of this VM.
    pub fn create_bt_vcpu(&mut self, id: u32) -> Result<BtVcpu> {
        let cpuid = self.platform.cpuid(id, self.config.pv_signature);
        let mut cpu = self.platform.create_cpu(id, &self.mem, cpuid);
        cpu.log_code_invalidations();
        let tlb_mask = cpu.tlb_probe().mask;
        let cache = CodeCache::new(self.config.cache_size)
            .map_err(|e| VcpuError::os("bt: code cache", e))?;
        Ok(BtVcpu {
            cpu,
            platform: self.platform.clone(),
            tr: Blocks::new(cache, tlb_mask),
        })
    }
}

impl vcpu::Vm for BtVm {
    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_bt_vcpu(id)?))
    }

    fn irq_line(&self, gsi: u32) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(self.platform.irq_line(gsi))
    }

    fn vector_line(&self, vector: u8) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(self.platform.apic_vector_line(vector))
    }
}

/// One translated block.
struct Block {
    /// Offset in the code cache; `None`: the instruction here is not
    /// translated (the interpreter runs it; remembered so that it is not
    /// looked at again).
    code: Option<usize>,
    /// Host code bytes.
    code_len: usize,
    /// Guest instructions and bytes.
    count: u32,
    len: u64,
    /// Times run.
    runs: u64,
    /// The instruction after the block, which the interpreter runs.
    next: Option<Mnemonic>,
}

/// What the engine counts (`--stats`, key `bt`).
#[derive(Default)]
struct Stats {
    blocks: u64,
    /// Guest instructions put into blocks.
    translated: u64,
    flushes: u64,
    invalidated: u64,
    invalidations_all: u64,
    translate_time: Duration,
    /// Guest instructions run by translated code.
    identical_runs: u64,
    /// Of the instructions put into blocks, those that access memory
    /// through the inline TLB probe.
    translated_memory: u64,
    /// Blocks left early at a memory access the probe could not serve.
    side_exits: u64,
}

/// The translated blocks of one vCPU and their code cache: the
/// accelerator the software CPU calls ([`x86::Accel`]).
pub struct Blocks {
    cache: CodeCache,
    translator: Translator,
    blocks: Vec<Block>,
    /// Block index by guest-physical address (looked up before every
    /// instruction the interpreter would run: a multiplicative hash).
    at: HashMap<u64, u32, BuildHasherDefault<AddrHasher>>,
    /// Guest-physical addresses of the blocks of each physical page.
    by_page: HashMap<u64, Vec<u64>>,
    /// What the blocks' TLB probes read (`Cpu::tlb_probe`, refreshed before
    /// each run).
    probe: Option<TlbProbe>,
    stats: Stats,
}

impl Blocks {
    /// The block at the CPU's RIP for a debugger: guest instructions and
    /// host code, each as address, bytes and mnemonic.
    fn describe_at(&mut self, cpu: &mut Cpu) -> String {
        let rip = cpu.rip;
        let Some(pa) = cpu.code_phys() else {
            return format!("rip {rip:#x}: not mapped for execution");
        };
        if cpu.code_bits() != 64 {
            return format!("rip {rip:#x}: not 64-bit code (the interpreter runs it)");
        }
        let ix = match self.at.get(&pa) {
            Some(&ix) => ix,
            None => self.translate(cpu, pa),
        };
        let b = &self.blocks[ix as usize];
        let mut s = format!(
            "block at rip {rip:#x} (guest-physical {pa:#x}): {} guest instructions, {} bytes, run {} times\n",
            b.count, b.len, b.runs
        );
        let Some(off) = b.code else {
            s.push_str("not translated: the interpreter runs the instruction here");
            if let Some(m) = b.next {
                s.push_str(&format!(" ({m:?})"));
            }
            return s;
        };
        let list = |out: &mut String, bytes: &[u8], ip: u64| {
            let mut d = iced_x86::Decoder::with_ip(64, bytes, ip, iced_x86::DecoderOptions::NONE);
            while d.can_decode() {
                let i = d.decode();
                let at = (i.ip() - ip) as usize;
                let hex: Vec<String> = bytes[at..at + i.len()]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                out.push_str(&format!(
                    "  {:#018x}  {:<30} {:?}\n",
                    i.ip(),
                    hex.join(" "),
                    i.mnemonic()
                ));
            }
        };
        let mut guest = vec![0u8; b.len as usize];
        if cpu.debug_read_phys(pa, &mut guest) {
            s.push_str("guest code:\n");
            list(&mut s, &guest, rip);
        }
        let host = self.cache.code(off, b.code_len);
        s.push_str(&format!(
            "host code ({} bytes in the code cache):\n",
            host.len()
        ));
        list(&mut s, host, host.as_ptr() as u64);
        if let Some(m) = b.next {
            s.push_str(&format!("then the interpreter runs {m:?}\n"));
        }
        s
    }

    fn new(cache: CodeCache, tlb_mask: u64) -> Blocks {
        Blocks {
            cache,
            translator: Translator::new(tlb_mask),
            probe: None,
            blocks: Vec::new(),
            at: HashMap::default(),
            by_page: HashMap::new(),
            stats: Stats::default(),
        }
    }

    /// Forgets every block (and the code cache's contents).
    fn flush(&mut self) {
        self.blocks.clear();
        self.at.clear();
        self.by_page.clear();
        self.cache.clear();
        self.stats.flushes += 1;
    }

    /// Drops the blocks the CPU's log of dropped code pages names.
    fn invalidate(&mut self, cpu: &mut Cpu) {
        match cpu.take_code_invalidations() {
            None => {
                self.stats.invalidations_all += 1;
                self.stats.invalidated += self.at.len() as u64;
                self.blocks.clear();
                self.at.clear();
                self.by_page.clear();
            }
            Some(pages) => {
                for p in pages {
                    for pa in self.by_page.remove(&p).unwrap_or_default() {
                        if self.at.remove(&pa).is_some() {
                            self.stats.invalidated += 1;
                        }
                    }
                }
            }
        }
    }

    /// Translates the block at RIP (guest-physical `pa`).
    fn translate(&mut self, cpu: &mut Cpu, pa: u64) -> u32 {
        let start = Instant::now();
        let mut guest: Vec<Instruction> = Vec::new();
        let mut rip = cpu.rip;
        let page = pa & !0xfff;
        let mut next = None;
        while guest.len() < translate::MAX_BLOCK {
            let Some((i, ipa)) = cpu.decode_for_translation(rip) else {
                break;
            };
            if ipa & !0xfff != page {
                next = Some(i.mnemonic());
                break;
            }
            if !translate::identical(&i) && translate::memory_form(&i).is_none() {
                if translate::direct_branch(&i) {
                    guest.push(i);
                } else {
                    next = Some(i.mnemonic());
                }
                break;
            }
            rip = i.next_ip();
            guest.push(i);
        }
        let t = self.translator.translate(&guest);
        let mut block = Block {
            code: None,
            code_len: 0,
            count: 0,
            len: 0,
            runs: 0,
            next,
        };
        if let Some(t) = t {
            let off = match self.cache.add(&t.code) {
                Some(o) => Some(o),
                None => {
                    self.flush();
                    self.cache.add(&t.code)
                }
            };
            if let Some(off) = off {
                // The translator may stop short of what was decoded (no
                // host registers left): the interpreter's instruction is
                // then the first one it left.
                if let Some(i) = guest.get(t.count as usize) {
                    block.next = Some(i.mnemonic());
                }
                block.code = Some(off);
                block.code_len = t.code.len();
                block.count = t.count;
                block.len = t.len;
                self.stats.blocks += 1;
                self.stats.translated += t.count as u64;
                self.stats.translated_memory += t.memory as u64;
            }
        }
        let ix = self.blocks.len() as u32;
        self.blocks.push(block);
        self.at.insert(pa, ix);
        self.by_page.entry(page).or_default().push(pa);
        self.stats.translate_time += start.elapsed();
        ix
    }

    /// The host code in the cache, block by block: (guest-physical
    /// address, host bytes), for tests that check what was generated.
    pub fn host_code(&self) -> Vec<(u64, Vec<u8>)> {
        self.at
            .iter()
            .filter_map(|(&pa, &ix)| {
                let b = &self.blocks[ix as usize];
                b.code
                    .map(|off| (pa, self.cache.code(off, b.code_len).to_vec()))
            })
            .collect()
    }
}

/// A hasher for guest-physical addresses: one multiplication (Fibonacci
/// hashing), far cheaper than SipHash on the lookup before every
/// interpreted instruction; the keys are not chosen by an adversary that
/// could gain anything from collisions but time.
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl Accel for Blocks {
    /// Runs blocks back to back from RIP, until one is missing (the
    /// interpreter's instruction comes next) or `left` would be exceeded.
    #[inline]
    fn run(&mut self, cpu: &mut Cpu, left: u64) -> Option<u64> {
        if cpu.code_bits() != 64 {
            return Some(0);
        }
        let mut done = 0;
        loop {
            if cpu.code_invalidated() {
                self.invalidate(cpu);
            }
            let Some(pa) = cpu.code_phys() else {
                return Some(done);
            };
            let ix = match self.at.get(&pa) {
                Some(&ix) => ix,
                None => self.translate(cpu, pa),
            };
            let b = &mut self.blocks[ix as usize];
            let Some(off) = b.code else {
                // Nothing translatable starts here: a fact of these bytes,
                // which the CPU remembers for the first one.
                return if done == 0 { None } else { Some(done) };
            };
            let n = b.count as u64;
            if done + n > left {
                return Some(done);
            }
            b.runs += 1;
            let probe = self.probe.insert(cpu.tlb_probe());
            let exit = self.cache.run(off, &mut cpu.gpr, &mut cpu.rflags, probe);
            cpu.rip = cpu.rip.wrapping_add(exit.delta);
            cpu.retired += exit.count;
            self.stats.identical_runs += exit.count;
            done += exit.count;
            if exit.count < n {
                // A memory access found no usable TLB entry: the
                // interpreter carries it out (and fills the entry).
                self.stats.side_exits += 1;
                return Some(done);
            }
        }
    }
}

/// The vCPU of engine `bt`.
pub struct BtVcpu {
    cpu: Cpu,
    platform: Arc<Platform>,
    tr: Blocks,
}

impl BtVcpu {
    /// The translated blocks (tests).
    pub fn blocks(&self) -> &Blocks {
        &self.tr
    }

    /// The software CPU (tests).
    pub fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }
}

impl softplat::Engine for BtVcpu {
    type Reply = std::convert::Infallible;

    fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }

    fn platform(&self) -> &Platform {
        &self.platform
    }

    /// A slice through translated code and the interpreter; the
    /// interpreter alone while a debugger watches the guest (it stops at
    /// instruction boundaries and on data accesses that translated code
    /// does not report).
    fn slice(&mut self) -> CpuExit {
        if self.cpu.guest_debug_active() {
            return self.cpu.run(softplat::SLICE);
        }
        self.cpu.run_accel(softplat::SLICE, &mut self.tr)
    }

    fn exit(&mut self, exit: CpuExit) -> Step<Self::Reply> {
        softplat::plain_exit(&self.platform, &self.cpu, exit)
    }

    fn reply(&mut self, reply: Self::Reply) -> VcpuExit<'_> {
        match reply {}
    }
}

impl Vcpu for BtVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        softplat::run(self)
    }

    softplat::plain_cpu_state!();

    /// `translation`: the block at RIP (translated now if it was not),
    /// its guest instructions beside the host code they became.
    fn debug_info(&mut self, what: &str) -> Option<String> {
        if what != "translation" {
            return softplat::debug_info(self, what);
        }
        Some(self.tr.describe_at(&mut self.cpu))
    }

    fn engine_counters(&self) -> Vec<(String, u64)> {
        let s = &self.tr.stats;
        let total = self.cpu.retired;
        let mut v = vec![
            ("guest_instructions".to_string(), total),
            ("bt/blocks_translated".into(), s.blocks),
            ("bt/instructions_translated".into(), s.translated),
            (
                "bt/instructions_translated_memory".into(),
                s.translated_memory,
            ),
            ("bt/run_translated".into(), s.identical_runs),
            ("bt/side_exits".into(), s.side_exits),
            (
                "bt/run_interpreted".into(),
                total.saturating_sub(s.identical_runs),
            ),
            ("bt/code_cache_bytes".into(), self.tr.cache.used() as u64),
            ("bt/code_cache_size".into(), self.tr.cache.size() as u64),
            ("bt/cache_flushes".into(), s.flushes),
            ("bt/invalidated_blocks".into(), s.invalidated),
            ("bt/invalidations_all".into(), s.invalidations_all),
            (
                "bt/translate_us".into(),
                s.translate_time.as_micros() as u64,
            ),
        ];
        // The instructions that ended blocks, as often as the interpreter
        // ran them right after a block.
        let mut after: BTreeMap<String, u64> = BTreeMap::new();
        for b in self.tr.at.values().map(|&ix| &self.tr.blocks[ix as usize]) {
            if let (Some(m), true) = (b.next, b.runs > 0) {
                *after.entry(format!("{m:?}").to_lowercase()).or_default() += b.runs;
            }
        }
        let mut after: Vec<_> = after.into_iter().collect();
        after.sort_by_key(|e| std::cmp::Reverse(e.1));
        for (m, n) in after.into_iter().take(12) {
            v.push((format!("bt/callout_after_block/{m}"), n));
        }
        v
    }
}

/// The fuzzing harness on `bt` (the cargo-fuzz target `exec_bytes_bt` and
/// crates/bt/tests/exec_bytes.rs): `data` runs on the software CPU alone
/// (`emu`, the oracle) and with translated code; neither may panic, and both
/// must end the same way with the same registers and memory. Inputs with a
/// local APIC (flags bit 1) are compared only for not panicking: its timer
/// runs on the host clock. Returns the two reports.
pub fn exec_bytes_differential(data: &[u8]) -> (softplat::fuzz::Report, softplat::fuzz::Report) {
    let oracle =
        softplat::fuzz::exec_bytes_with(data, true, |_| {}, |cpu, left, _: &mut ()| cpu.run(left));
    let bt = softplat::fuzz::exec_bytes_with(
        data,
        true,
        |cpu| {
            cpu.log_code_invalidations();
            let mask = cpu.tlb_probe().mask;
            CodeCache::new(1 << 20).ok().map(|c| Blocks::new(c, mask))
        },
        |cpu, left, blocks| match blocks {
            Some(b) => cpu.run_accel(left, b),
            None => cpu.run(left),
        },
    );
    (oracle, bt)
}

#[cfg(test)]
mod tests;
