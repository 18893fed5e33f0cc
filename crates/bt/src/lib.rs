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

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::{Instruction, Mnemonic};
use softplat::{Platform, Step};
use vcpu::{IrqLine, Result, Vcpu, VcpuError, VcpuExit};
use vm_memory::GuestMemoryMmap;
use x86::{Accel, Cpu, CpuExit};

use cache::CodeCache;
use translate::{
    Ctx, JcEntry, Translator, CALLOUT_MEMORY, CALLOUT_MEMORY_HARD, CALLOUT_NONE, JC_EMPTY,
    JC_ENTRIES, SLOT_NONE, SLOT_STOP,
};

/// The code cache's size unless `--bt-cache` says otherwise.
pub const DEFAULT_CACHE: usize = 64 << 20;

/// How many times the interpreter reaches the start of a block before it
/// is translated, unless `--bt-hot` says otherwise. Translating a block
/// costs about as much as interpreting it a few hundred times, and most
/// of a kernel's boot code runs once: interpreted, it costs a few
/// instructions' time, translated, tens of microseconds.
pub const DEFAULT_HOT: u32 = 32;

/// Options of a `bt` virtual machine.
#[derive(Clone, Copy, Debug)]
pub struct BtConfig {
    /// The software platform (local APIC, PICs, PIT); HLT then waits for it.
    pub irqchip: bool,
    /// visor's paravirtual CPUID leaves, as for `emu`.
    pub pv_signature: Option<[u8; 12]>,
    /// Size of the code cache in bytes.
    pub cache_size: usize,
    /// Translate a block once its start has been reached this many times
    /// (0 and 1: at once; at most 65535 counts); until then the
    /// interpreter runs it.
    pub hot: u32,
}

impl Default for BtConfig {
    fn default() -> Self {
        BtConfig {
            irqchip: false,
            pv_signature: None,
            cache_size: DEFAULT_CACHE,
            hot: DEFAULT_HOT,
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
            tr: Blocks::new(cache, tlb_mask, self.config.hot),
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
    /// Host address of its code; `None`: the instruction here is not
    /// translated (the interpreter runs it; remembered so that it is not
    /// looked at again).
    code: Option<u64>,
    /// Host code bytes.
    code_len: usize,
    /// Guest instructions and bytes.
    count: u32,
    len: u64,
    /// Its first instruction's mnemonic when `code` is `None`.
    first: Option<Mnemonic>,
    /// The instruction the interpreter runs after it, if it ends before
    /// one.
    callout: Option<Mnemonic>,
    /// The patchable jumps linked to it: their offsets in the cache, and
    /// where each went before (its stub, which leaves the cache).
    incoming: Vec<(u64, u64)>,
}

/// What the engine counts (`--stats`, key `bt`).
#[derive(Default)]
struct Stats {
    blocks: u64,
    /// Guest instructions put into blocks.
    translated: u64,
    flushes: u64,
    /// Blocks dropped because their page was written, by the guest or the
    /// VMM (`memory_written`).
    invalidated_written: u64,
    /// Blocks dropped because the CPU dropped every decoded page.
    invalidated_all: u64,
    invalidations_all: u64,
    translate_time: Duration,
    /// Guest instructions run by translated code.
    identical_runs: u64,
    /// Of the instructions put into blocks, those that access memory
    /// through the inline TLB probe.
    translated_memory: u64,
    /// Blocks left early at a memory access the probe could not serve.
    side_exits: u64,
    /// Of those, the ones where the page's TLB entry was there but could
    /// not serve it (a write to code, MMIO, an access across pages).
    side_exits_hard: u64,
    /// Times the dispatcher (Rust) entered the code cache.
    dispatches: u64,
    /// Blocks entered (by the dispatcher, a lookup or a linked jump).
    blocks_run: u64,
    /// Patchable jumps linked to their target block, and unlinked again.
    links: u64,
    unlinks: u64,
    /// Lookups in generated code that missed (the dispatcher's work).
    lookup_misses: u64,
    /// Jump cache emptied (blocks dropped, the cache flushed).
    jc_clears: u64,
    /// Memory instructions retranslated into callouts because their probe
    /// kept missing (adaptive translation).
    adaptive: u64,
    /// Instructions translated code left to the interpreter, by mnemonic
    /// (`Mnemonic as usize`).
    callouts: Vec<u64>,
    /// Times the interpreter reached the start of a block that was not
    /// hot enough yet to be translated.
    cold: u64,
    /// Memory instructions retranslated to probe alone because the probe
    /// for their group kept missing.
    solo: u64,
}

/// Counters of visits to cold block starts ([`BtConfig::hot`]): 128 KiB.
pub const HEAT_SLOTS: usize = 1 << 16;

/// Side exits at one instruction before it is retranslated as a callout.
pub const ADAPT_AFTER: u32 = 64;

/// Code-cache bytes per block the table may hold: with a cache of S bytes
/// the engine keeps at most S / 256 blocks (translated or not) before it
/// empties everything, so the translator's metadata stays within
/// [`METADATA_PER_BLOCK`] * S / 256 bytes beside the cache (docs/bt.md).
pub const CACHE_BYTES_PER_BLOCK: usize = 256;

/// An upper bound of the metadata one block costs: 256 bytes for its entry
/// in the block table, in the address map and in its page's list with four
/// linked jumps; 32 for more linked jumps (the dispatcher links at most two
/// per block the table may hold: a superblock may have more exits, and the
/// rest then stay unlinked); and
/// 32 each for a side-exit count, an adaptive callout and a memory
/// instruction that probes alone, whose tables are emptied when they hold
/// as many entries as the block table may.
pub const METADATA_PER_BLOCK: usize = 384;

/// The translated blocks of one vCPU and their code cache: the
/// accelerator the software CPU calls ([`x86::Accel`]).
pub struct Blocks {
    cache: CodeCache,
    translator: Translator,
    blocks: Vec<Block>,
    /// Block index by guest-physical address (looked up by the dispatcher:
    /// a multiplicative hash).
    at: HashMap<u64, u32, BuildHasherDefault<AddrHasher>>,
    /// Guest-physical addresses of the blocks of each physical page.
    by_page: HashMap<u64, Vec<u64>>,
    /// The context translated code runs on (boxed: generated code holds
    /// its address while it runs).
    ctx: Box<Ctx>,
    /// The jump cache: guest RIP (and CPL class) to block, looked up by
    /// generated code for the targets it cannot link.
    jc: Box<[JcEntry]>,
    /// Side exits by guest-physical address of the memory instruction.
    misses: HashMap<u64, u32, BuildHasherDefault<AddrHasher>>,
    /// Memory instructions the translator leaves to the interpreter
    /// (adaptive translation), by guest-physical address.
    callout_at: HashSet<u64>,
    /// Memory instructions that probe alone, not for a group of accesses
    /// (their group's probe kept missing: a span across pages), by
    /// guest-physical address.
    solo_at: HashSet<u64>,
    /// [`BtConfig::hot`].
    hot: u32,
    /// Visits to block starts not translated yet, by a hash of their
    /// guest-physical address ([`HEAT_SLOTS`] counters: two starts may
    /// share one, and the second is then translated sooner).
    heat: Box<[u16]>,
    /// Entries in the blocks' `incoming` lists (linked jumps), at most two
    /// per block the table may hold (see [`METADATA_PER_BLOCK`]).
    linked: usize,
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
            "block at rip {rip:#x} (guest-physical {pa:#x}): {} guest instructions, {} bytes\n",
            b.count, b.len
        );
        let Some(addr) = b.code else {
            s.push_str("not translated: the interpreter runs the instruction here");
            if let Some(m) = b.first {
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
        let host = self
            .cache
            .code((addr - self.cache.addr(0)) as usize, b.code_len);
        s.push_str(&format!(
            "host code ({} bytes in the code cache):\n",
            host.len()
        ));
        list(&mut s, host, addr);
        if let Some(m) = b.callout {
            s.push_str(&format!("then the interpreter runs {m:?}\n"));
        }
        s
    }

    fn new(cache: CodeCache, tlb_mask: u64, hot: u32) -> Blocks {
        Blocks {
            translator: Translator::new(tlb_mask, cache.runtime()),
            cache,
            blocks: Vec::new(),
            at: HashMap::default(),
            by_page: HashMap::new(),
            ctx: Box::default(),
            jc: vec![
                JcEntry {
                    key: JC_EMPTY,
                    code: 0,
                    ppage: 0,
                    pad: 0,
                };
                JC_ENTRIES
            ]
            .into_boxed_slice(),
            misses: HashMap::default(),
            callout_at: HashSet::new(),
            solo_at: HashSet::new(),
            hot,
            heat: vec![0; HEAT_SLOTS].into_boxed_slice(),
            linked: 0,
            stats: Stats {
                callouts: vec![0; Mnemonic::values().count()],
                ..Stats::default()
            },
        }
    }

    /// Counts a callout to the interpreter's `m`.
    fn callout(&mut self, m: Mnemonic) {
        if let Some(n) = self.stats.callouts.get_mut(m as usize) {
            *n += 1;
        }
    }

    /// Empties the jump cache.
    fn clear_jc(&mut self) {
        let exit = self.cache.runtime().exit;
        for e in self.jc.iter_mut() {
            *e = JcEntry {
                key: JC_EMPTY,
                code: exit,
                ppage: 0,
                pad: 0,
            };
        }
        self.stats.jc_clears += 1;
    }

    /// Forgets every block (and the code cache's contents).
    fn flush(&mut self) {
        self.blocks.clear();
        self.at.clear();
        self.by_page.clear();
        self.misses.clear();
        self.callout_at.clear();
        self.solo_at.clear();
        self.heat.fill(0);
        self.linked = 0;
        self.cache.clear();
        self.clear_jc();
        self.stats.flushes += 1;
    }

    /// Drops the block at guest-physical `pa`: nothing reaches it any more,
    /// and the jumps linked to it leave the cache again (to the dispatcher,
    /// which links them to what is there next).
    fn drop_block(&mut self, pa: u64) -> bool {
        let Some(ix) = self.at.remove(&pa) else {
            return false;
        };
        let incoming = std::mem::take(&mut self.blocks[ix as usize].incoming);
        self.linked -= incoming.len().min(self.linked);
        for (slot, stub) in incoming {
            if self.cache.link(slot, stub).is_some() {
                self.stats.unlinks += 1;
            }
        }
        true
    }

    /// Drops the blocks the CPU's log of dropped code pages names.
    fn invalidate(&mut self, cpu: &mut Cpu) {
        match cpu.take_code_invalidations() {
            None => {
                self.stats.invalidations_all += 1;
                self.stats.invalidated_all += self.at.len() as u64;
                self.blocks.clear();
                self.at.clear();
                self.by_page.clear();
                self.callout_at.clear();
                self.solo_at.clear();
            }
            Some(pages) => {
                for p in pages {
                    for pa in self.by_page.remove(&p).unwrap_or_default() {
                        if self.drop_block(pa) {
                            self.stats.invalidated_written += 1;
                        }
                    }
                    self.callout_at.retain(|&a| a & !0xfff != p);
                    self.solo_at.retain(|&a| a & !0xfff != p);
                }
            }
        }
        self.clear_jc();
    }

    /// A side exit at the memory instruction at RIP (guest-physical `pa`)
    /// of block `ix`: after [`ADAPT_AFTER`] of them the instruction becomes
    /// the interpreter's and the block is dropped, to be translated again
    /// without it (adaptive translation).
    fn side_exit(&mut self, pa: u64, block: u32, hard: bool) {
        self.stats.side_exits += 1;
        self.stats.side_exits_hard += u64::from(hard);
        let cap = self.cache.size() / CACHE_BYTES_PER_BLOCK;
        if self.misses.len() >= cap {
            self.misses.clear();
        }
        if self.callout_at.len() >= cap {
            self.callout_at.clear();
        }
        if self.solo_at.len() >= cap {
            self.solo_at.clear();
        }
        let n = self.misses.entry(pa).or_default();
        *n += 1;
        if *n < ADAPT_AFTER {
            return;
        }
        self.misses.remove(&pa);
        if hard {
            self.callout_at.insert(pa);
            self.stats.adaptive += 1;
        } else if !self.solo_at.insert(pa) {
            // Probing alone already: the entry just keeps being another
            // page's.
            return;
        } else {
            self.stats.solo += 1;
        }
        let start = self
            .at
            .iter()
            .find(|&(_, &ix)| ix == block)
            .map(|(&start, _)| start);
        if let Some(start) = start {
            self.drop_block(start);
            self.clear_jc();
        }
    }

    /// Translates the block at RIP (guest-physical `pa`).
    fn translate(&mut self, cpu: &mut Cpu, pa: u64) -> u32 {
        if self.blocks.len() >= self.cache.size() / CACHE_BYTES_PER_BLOCK {
            // The metadata bound (blocks without code take no cache).
            self.flush();
        }
        let start = Instant::now();
        let mut guest: Vec<Instruction> = Vec::new();
        let mut rip = cpu.rip;
        let page = pa & !0xfff;
        let mut callout = None;
        // The guest-physical page the last instruction crosses into.
        let mut cross = None;
        // Instructions that must probe alone (bit k: instruction k).
        let mut solo = 0u64;
        while guest.len() < translate::MAX_BLOCK {
            let Some((i, ipa)) = cpu.decode_for_translation(rip) else {
                // An instruction across pages ends the block if it can be
                // translated; else (or a fetch fault) the interpreter runs
                // it.
                match cpu.decode_crossing_for_translation(rip) {
                    Some((i, ipa, next))
                        if ipa & !0xfff == page
                            && !self.callout_at.contains(&ipa)
                            && translate::translatable(&i) =>
                    {
                        guest.push(i);
                        cross = Some(next);
                    }
                    _ => callout = Some(Mnemonic::INVALID),
                }
                break;
            };
            if ipa & !0xfff != page {
                break;
            }
            if self.callout_at.contains(&ipa) || !translate::translatable(&i) {
                if translate::terminator(&i) && !self.callout_at.contains(&ipa) {
                    guest.push(i);
                    if i.is_jcc_short_or_near() && guest.len() < translate::MAX_BLOCK {
                        // A superblock: on past the branch not taken.
                        rip = i.next_ip();
                        continue;
                    }
                } else {
                    callout = Some(i.mnemonic());
                }
                break;
            }
            if self.solo_at.contains(&ipa) {
                solo |= 1 << guest.len();
            }
            rip = i.next_ip();
            guest.push(i);
        }
        // After a branch the interpreter's instruction is the next block's.
        if guest.last().is_some_and(translate::terminator) {
            callout = None;
        }
        let ix = self.blocks.len() as u32;
        let mut block = Block {
            code: None,
            code_len: 0,
            count: 0,
            first: guest.first().map(|i| i.mnemonic()).or(callout),
            callout,
            len: 0,
            incoming: Vec::new(),
        };
        let at = self.cache.next_addr();
        let mut t = self
            .translator
            .translate(&guest, callout, cross, solo, at, ix);
        let mut placed = t.as_ref().and_then(|t| self.cache.add(&t.code));
        if t.is_some() && placed.is_none() {
            // The cache is full: empty it and translate for the new place.
            self.flush();
            let at = self.cache.next_addr();
            t = self
                .translator
                .translate(&guest, callout, cross, solo, at, 0);
            placed = t.as_ref().and_then(|t| self.cache.add(&t.code));
        }
        let ix = self.blocks.len() as u32;
        if let (Some(t), Some(off)) = (t, placed) {
            block.code = Some(self.cache.addr(off));
            block.code_len = t.code.len();
            block.count = t.count;
            block.len = t.len;
            if (t.count as usize) < guest.len() {
                block.callout = None;
            }
            self.stats.blocks += 1;
            self.stats.translated += t.count as u64;
            self.stats.translated_memory += t.memory as u64;
        }
        self.blocks.push(block);
        self.at.insert(pa, ix);
        self.by_page.entry(page).or_default().push(pa);
        if let Some(next) = cross {
            // A write to the second page drops the block too.
            self.by_page.entry(next).or_default().push(pa);
        }
        self.stats.translate_time += start.elapsed();
        ix
    }

    /// The host code in the cache, block by block: (guest-physical
    /// address, host address, host bytes), for tests that check what was
    /// generated.
    pub fn host_code(&self) -> Vec<(u64, u64, Vec<u8>)> {
        self.at
            .iter()
            .filter_map(|(&pa, &ix)| {
                let b = &self.blocks[ix as usize];
                b.code.map(|addr| {
                    let off = (addr - self.cache.addr(0)) as usize;
                    (pa, addr, self.cache.code(off, b.code_len).to_vec())
                })
            })
            .collect()
    }

    /// An upper bound of the memory the translator's metadata takes now
    /// (see [`METADATA_PER_BLOCK`]), besides the code cache and the fixed
    /// jump cache.
    pub fn metadata_bytes(&self) -> usize {
        self.blocks.len() * 256
            + (self.misses.len() + self.callout_at.len() + self.solo_at.len()) * 32
            + self
                .blocks
                .iter()
                .map(|b| b.incoming.len().saturating_sub(4) * 16)
                .sum::<usize>()
    }

    /// The runtime's routines (tests: where blocks may jump).
    pub fn runtime(&self) -> translate::Runtime {
        self.cache.runtime()
    }

    /// Whether the block at RIP (guest-physical `pa`) is not translated
    /// and not hot enough yet to be ([`BtConfig::hot`]): its visit is
    /// counted, and the CPU told to interpret up to the next control
    /// transfer.
    fn cold(&mut self, cpu: &mut Cpu, pa: u64) -> bool {
        if self.hot <= 1 || self.at.contains_key(&pa) {
            return false;
        }
        let slot = (pa.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as usize % HEAT_SLOTS;
        let n = &mut self.heat[slot];
        *n = n.saturating_add(1);
        if u32::from(*n) < self.hot {
            self.stats.cold += 1;
            cpu.accel_cold();
            return true;
        }
        *n = 0;
        false
    }

    /// The host address of the block at RIP (guest-physical `pa`),
    /// translated if need be; `Err(first)` if nothing is translated there
    /// (`first`: the mnemonic the interpreter runs).
    fn block_at(&mut self, cpu: &mut Cpu, pa: u64) -> std::result::Result<(u32, u64), Mnemonic> {
        let ix = match self.at.get(&pa) {
            Some(&ix) => ix,
            None => self.translate(cpu, pa),
        };
        let b = &self.blocks[ix as usize];
        b.code
            .map(|c| (ix, c))
            .ok_or(b.first.unwrap_or(Mnemonic::INVALID))
    }
}

impl Drop for Blocks {
    /// With `VISOR_BT_DUMP=PATH`, writes the code cache's bytes to PATH
    /// (offsets as `perf` reports them for the `memfd:visor-bt` mapping:
    /// `objdump -D -b binary -m i386:x86-64 PATH`).
    fn drop(&mut self) {
        if let Some(path) = std::env::var_os("VISOR_BT_DUMP") {
            if let Err(e) = std::fs::write(&path, self.cache.code(0, self.cache.used())) {
                eprintln!("visor: bt: writing {}: {e}", path.to_string_lossy());
            }
        }
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
    /// Runs translated code from RIP, about `left` instructions: the
    /// dispatcher enters the code cache at the block of RIP (translating
    /// it first if need be), and the blocks go from one to the next through
    /// linked jumps and the jump cache; when the code leaves the cache for
    /// a block that is missing, the dispatcher finds it, links the jump
    /// that led there if both are in one guest page, and enters again. It
    /// returns when the interpreter's instruction is next (a callout, or a
    /// memory access the probe could not serve), or the budget is spent:
    /// loops and lookups check it, so a run of forward jumps within a page
    /// may go past it by less than a page of instructions.
    #[inline]
    fn run(&mut self, cpu: &mut Cpu, left: u64) -> Option<u64> {
        if cpu.code_bits() != 64 || left == 0 {
            return Some(0);
        }
        if cpu.code_invalidated() {
            self.invalidate(cpu);
        }
        let user = cpu.cpl() == 3;
        let pa = cpu.code_phys()?;
        if self.cold(cpu, pa) {
            return Some(0);
        }
        let code = match self.block_at(cpu, pa) {
            Ok((_, code)) => code,
            Err(m) => {
                self.callout(m);
                return None;
            }
        };
        let probe = cpu.tlb_probe();
        let ctx = &mut *self.ctx;
        ctx.gpr = cpu.gpr;
        ctx.vpage = cpu.rip & !0xfff;
        ctx.set_rflags(cpu.rflags);
        ctx.count = 0;
        ctx.set_limit(left);
        ctx.code = code;
        ctx.tlb = probe.base;
        ctx.acc_r = probe.acc_r;
        ctx.acc_w = probe.acc_w;
        ctx.acc_x = probe.acc_x;
        ctx.tlb_mask = probe.mask;
        ctx.jc = self.jc.as_ptr() as u64;
        ctx.key_xor = translate::jc_key(0, user);
        ctx.callout = CALLOUT_NONE;
        ctx.fs_base = cpu.seg[x86::sreg::FS].base;
        ctx.gs_base = cpu.seg[x86::sreg::GS].base;
        let key = translate::jc_key(cpu.rip, user);
        self.jc[translate::jc_index(key)] = JcEntry {
            key,
            code,
            ppage: pa & !0xfff,
            pad: 0,
        };
        loop {
            self.stats.dispatches += 1;
            self.cache.run(&mut self.ctx);
            let ctx = &mut *self.ctx;
            cpu.rip = ctx.rip_out();
            let slot = ctx.slot;
            if slot == SLOT_STOP {
                let (block, callout) = (ctx.block, ctx.callout);
                // A stop for the budget leaves no reason.
                ctx.callout = CALLOUT_NONE;
                if callout == CALLOUT_MEMORY {
                    // The interpreter's walk fills the TLB entry.
                    if let Some(pa) = cpu.code_phys() {
                        self.side_exit(pa, block, false);
                    }
                } else if callout == CALLOUT_MEMORY_HARD {
                    // A memory access the page's entry could not serve.
                    if let Some(pa) = cpu.code_phys() {
                        self.side_exit(pa, block, true);
                    }
                } else if let Ok(m) = Mnemonic::try_from(callout as usize) {
                    self.callout(m);
                }
                break;
            }
            if ctx.count >= ctx.limit {
                break;
            }
            self.stats.lookup_misses += 1;
            let Some(pa) = cpu.code_phys() else { break };
            if self.cold(cpu, pa) {
                break;
            }
            let flushes = self.stats.flushes;
            let ncode = match self.block_at(cpu, pa) {
                Ok((nix, ncode)) => {
                    // (Past two linked jumps per block the table may hold,
                    // the jump stays unlinked and comes here each time: a
                    // superblock has one per branch, and the metadata bound
                    // counts two per block.)
                    let room = self.linked < 2 * (self.cache.size() / CACHE_BYTES_PER_BLOCK);
                    if slot != SLOT_NONE && flushes == self.stats.flushes && room {
                        if let Some(stub) = self.cache.link(slot, ncode) {
                            self.blocks[nix as usize].incoming.push((slot, stub));
                            self.linked += 1;
                            self.stats.links += 1;
                        }
                    }
                    ncode
                }
                Err(m) => {
                    self.callout(m);
                    break;
                }
            };
            let key = translate::jc_key(cpu.rip, user);
            self.jc[translate::jc_index(key)] = JcEntry {
                key,
                code: ncode,
                ppage: pa & !0xfff,
                pad: 0,
            };
            let ctx = &mut *self.ctx;
            ctx.vpage = cpu.rip & !0xfff;
            ctx.code = ncode;
        }
        let ctx = &*self.ctx;
        cpu.gpr = ctx.gpr;
        cpu.rflags = ctx.rflags(cpu.rflags);
        let done = ctx.instructions();
        self.stats.blocks_run += ctx.blocks();
        cpu.retired += done;
        self.stats.identical_runs += done;
        Some(done)
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
            ("bt/side_exits/hard".into(), s.side_exits_hard),
            (
                "bt/run_interpreted".into(),
                total.saturating_sub(s.identical_runs),
            ),
            ("bt/code_cache_bytes".into(), self.tr.cache.used() as u64),
            ("bt/code_cache_size".into(), self.tr.cache.size() as u64),
            ("bt/metadata_bytes".into(), self.tr.metadata_bytes() as u64),
            (
                "bt/metadata_bound".into(),
                (self.tr.cache.size() / CACHE_BYTES_PER_BLOCK * METADATA_PER_BLOCK) as u64,
            ),
            ("bt/cache_flushes".into(), s.flushes),
            (
                "bt/invalidated_blocks/written".into(),
                s.invalidated_written,
            ),
            ("bt/invalidated_blocks/all".into(), s.invalidated_all),
            ("bt/invalidations_all".into(), s.invalidations_all),
            ("bt/adaptive_callouts".into(), s.adaptive),
            ("bt/solo_probes".into(), s.solo),
            ("bt/blocks_run".into(), s.blocks_run),
            ("bt/exits/dispatcher".into(), s.dispatches),
            (
                "bt/exits/chained".into(),
                s.blocks_run
                    .saturating_sub(s.dispatches)
                    .saturating_sub(self.tr.ctx.lookups.saturating_sub(s.lookup_misses)),
            ),
            ("bt/exits/lookup".into(), self.tr.ctx.lookups),
            (
                "bt/exits/lookup_hits".into(),
                self.tr.ctx.lookups.saturating_sub(s.lookup_misses),
            ),
            ("bt/exits/lookup_misses".into(), s.lookup_misses),
            ("bt/cold_entries".into(), s.cold),
            ("bt/links".into(), s.links),
            ("bt/unlinks".into(), s.unlinks),
            ("bt/jump_cache_clears".into(), s.jc_clears),
            (
                "bt/translate_us".into(),
                s.translate_time.as_micros() as u64,
            ),
        ];
        // Every instruction translated code left to the interpreter, by
        // mnemonic.
        for (m, &n) in Mnemonic::values().zip(&s.callouts) {
            if n > 0 {
                v.push((format!("bt/callout/{}", format!("{m:?}").to_lowercase()), n));
            }
        }
        v
    }
}

/// The fuzzing harness on `bt` (the cargo-fuzz target `exec_bytes_bt` and
/// crates/bt/tests/exec_bytes.rs): `data` runs with translated code and on
/// the software CPU alone (`emu`, the oracle), for as many instructions as
/// the translated run retired if it went past the harness's budget (it may,
/// by less than [`BUDGET_SLACK`]); neither may panic, and both must end the
/// same way with the same registers and memory. Its translator is strict
/// about undefined flags ([`translate::Translator::strict`]). Inputs with a local APIC
/// (flags bit 1) are compared only for not panicking: its timer runs on the
/// host clock. Returns the two reports (oracle, `bt`).
pub fn exec_bytes_differential(data: &[u8]) -> (softplat::fuzz::Report, softplat::fuzz::Report) {
    let bt = softplat::fuzz::exec_bytes_with(
        data,
        true,
        |cpu| {
            cpu.log_code_invalidations();
            let mask = cpu.tlb_probe().mask;
            CodeCache::new(1 << 20).ok().map(|c| {
                let mut b = Blocks::new(c, mask, 0);
                b.translator.strict();
                b
            })
        },
        |cpu, left, blocks| match blocks {
            Some(b) => cpu.run_accel(left, b),
            None => cpu.run(left),
        },
    );
    let budget = bt.instructions.max(softplat::fuzz::BUDGET);
    let oracle = softplat::fuzz::exec_bytes_budget(
        data,
        true,
        budget,
        |_| {},
        |cpu, left, _: &mut ()| cpu.run(left),
    );
    (oracle, bt)
}

/// How far past its budget a run of translated code may go: loops and
/// lookups check the budget, forward jumps within a page do not, and a run
/// of them covers each byte of the page at most once.
pub const BUDGET_SLACK: u64 = 4096;

#[cfg(test)]
mod tests;
