//! `visor run --gdb` end to end: Debian's gdb (./test.sh installs it) in
//! batch mode against the demo OS on every usable engine, a raw client that
//! misbehaves, and bad `--gdb` input.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[path = "common/engines.rs"]
mod engines;
#[path = "common/transcript.rs"]
mod transcript;

use transcript::transcript;
use visor::Engine;

/// Whether gdb is here (./test.sh installs Debian's when it is missing).
fn gdb_here() -> bool {
    let ok = Command::new("gdb")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: no gdb (./test.sh installs Debian's)");
    }
    ok
}

/// The arguments of a short demo run on `engine` (natively where the
/// engine can, paravirtualized on `pv`).
fn demo_args(engine: Engine) -> Vec<String> {
    let mut a: Vec<String> = ["run", "--engine", engine.name(), "--cmdline", "passes=2"]
        .map(String::from)
        .to_vec();
    if engine != Engine::Pv {
        a.push("--no-pv".into());
    }
    a
}

/// The transcript of the same demo run without a debugger, on `emu` (the
/// oracle), natively or paravirtualized.
fn reference(pv: bool) -> &'static str {
    static REFS: [OnceLock<String>; 2] = [OnceLock::new(), OnceLock::new()];
    REFS[pv as usize].get_or_init(|| {
        let mut a = demo_args(Engine::Emu);
        if pv {
            a.pop();
        }
        let o = Command::new(env!("CARGO_BIN_EXE_visor"))
            .args(&a)
            .stdin(Stdio::null())
            .output()
            .expect("run visor");
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    })
}

/// A `visor run --gdb 127.0.0.1:0` waiting for its debugger: the port it
/// got, its stderr as it comes.
struct Visor {
    child: Child,
    port: u16,
    stderr: Arc<Mutex<String>>,
}

impl Visor {
    fn start(args: &[String]) -> Visor {
        let mut child = Command::new(env!("CARGO_BIN_EXE_visor"))
            .args(args)
            .args(["--gdb", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start visor");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let port = line
            .split("waiting for gdb on 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        let stderr = Arc::new(Mutex::new(line));
        let s = stderr.clone();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
            s.lock().unwrap().push_str(&rest);
        });
        Visor {
            child,
            port,
            stderr,
        }
    }

    /// Waits for the end (at most `limit`): status, stdout, stderr.
    fn finish(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.code();
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("visor did not end: {}", self.stderr.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        // The stderr thread ends with the process.
        std::thread::sleep(Duration::from_millis(100));
        let err = self.stderr.lock().unwrap().clone();
        assert!(!err.contains("panicked"), "visor panicked: {err}");
        (status, out, err)
    }
}

/// A test that fails leaves no visor behind (it would wait for its
/// debugger forever, holding what the test's parent gave it).
impl Drop for Visor {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs gdb in batch mode with `script` on `elf`, at most `limit`.
fn gdb(elf: &Path, script: &str, limit: Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cmds = dir.path().join("cmds.gdb");
    std::fs::write(&cmds, script).unwrap();
    let mut child = Command::new("gdb")
        .args(["-batch", "-nx", "-x"])
        .arg(&cmds)
        .arg(elf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gdb");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o: Output = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The value of gdb's `$N = 0x...` line after the line that contains
/// `after`.
fn hex_after(out: &str, marker: &str) -> u64 {
    let line = out
        .lines()
        .skip_while(|l| !l.contains(marker))
        .find(|l| l.starts_with('$'))
        .unwrap_or_else(|| panic!("no value after {marker:?}:\n{out}"));
    let v = line.split(" = ").nth(1).unwrap().trim();
    u64::from_str_radix(v.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{line:?}:\n{out}"))
}

/// The demo kernel's ELF, with its symbols and debug information.
fn demo_elf() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("demo.elf");
    std::fs::write(&p, visor::DEMO_GUEST).unwrap();
    (d, p)
}

/// Segment-register writes at CPL 0 in the demo kernel's GDT (0x10 64-bit
/// kernel code, 0x18 kernel data, 0x28 user data, 0x38 the TSS, 9 entries)
/// and whether each loads: an unusable selector gets an error reply and
/// changes nothing.
const SEGMENT_WRITES: [(&str, bool); 8] = [
    ("set $es = 0x2b", true),
    ("set $fs = 0x2b", true),
    ("set $ds = 0x38", false),    // a system descriptor (the TSS)
    ("set $ds = 0x1000", false),  // beyond the GDT's limit
    ("set $ds = 0x0c", false),    // in an LDT, and there is none
    ("set $ss = 0x2b", false),    // DPL 3 is not the CPL
    ("set $cs = 0x18", false),    // data is no code
    ("set $es = 0x10000", false), // no selector
];

/// gdb commands that run each of `cmds`, printing `@ok CMD` or `@refused
/// CMD: ERROR` (an error does not end the script).
fn try_each(cmds: &[&str]) -> String {
    let list: Vec<String> = cmds.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "python
for c in [{}]:
    try:
        gdb.execute(c)
        print('@ok ' + c)
    except gdb.error as e:
        print('@refused ' + c + ': ' + str(e))
end
",
        list.join(", ")
    )
}

/// Checks what [`try_each`] printed for [`SEGMENT_WRITES`]: the refusals are
/// gdb's error for the stub's `E` reply.
fn check_segment_writes(out: &str, ctx: &str) {
    for (cmd, ok) in SEGMENT_WRITES {
        if ok {
            assert!(out.contains(&format!("@ok {cmd}\n")), "{cmd}: {ctx}");
        } else {
            let refused = out
                .lines()
                .find(|l| l.starts_with(&format!("@refused {cmd}:")))
                .unwrap_or_else(|| panic!("{cmd} not refused: {ctx}"));
            assert!(refused.contains("E16"), "{refused}: {ctx}");
        }
    }
}

/// The session of the issue on one engine: a watchpoint hit, a breakpoint
/// at a named function, RIP and a register checked, one step, known memory
/// read, breakpoints deleted, and the guest run to its end with the
/// transcript it has without a debugger.
fn debug_session(engine: Engine) {
    if !engines::available(engine) || !gdb_here() {
        return;
    }
    // KVM on a PVM host runs guest ring 0 in PVM's emulator, which does
    // not check the debug registers for data accesses: no watchpoint there
    // (and no exact step over an instruction that exits, below).
    let watch = engine != Engine::Kvm || visor_kvm::linux_userspace_unsupported().is_none();
    let (_d, elf) = demo_elf();
    let v = Visor::start(&demo_args(engine));
    let watch_cmds = if watch {
        "watch *(unsigned long *)&'demo::PASSES'
continue
echo @passes\\n
print/x *(unsigned long *)&'demo::PASSES'
delete
rwatch *(unsigned long *)&'demo::PASSES'
continue
delete
"
    } else {
        ""
    };
    // Stepping over an instruction that exits to the VMM: OUT to the
    // serial port (native), the hypercall's INT 0x82 (pv).
    let exit_cmds = if engine == Engine::Pv {
        "break *((char *)&'demo::pvops::pv::console_write' + 26)
continue
stepi
stepi
echo @exit\\n
print/x $pc
x/i $pc
stepi
echo @after\\n
print/x $pc
delete
"
    } else {
        "break *((char *)&'demo::cpu::outb' + 4)
continue
echo @exit\\n
print/x $pc
x/i $pc
stepi
echo @after\\n
print/x $pc
delete
"
    };
    // The engine's own window: what `monitor` shows besides stats and regs.
    let (special, shows) = match engine {
        Engine::Vmx => ("vmcs", "VMCS at 0x"),
        Engine::Trap | Engine::Pv => ("virt", "virtual cpl="),
        Engine::Bt => ("translation", "block at rip 0x"),
        _ => ("vmcs", "`vmcs` is for engine vmx"),
    };
    let segment_cmds = format!(
        "set $save_es = $es
set $save_fs = $fs
set $save_fs_base = $fs_base
set $fs = 0x18
set $fs_base = 0x5000
{tries}maintenance flush register-cache
echo @es\\n
print/x $es
echo @fs_base_loaded\\n
print/x $fs_base
monitor regs
set $es = $save_es
set $fs = $save_fs
set $fs_base = $save_fs_base
",
        tries = try_each(&SEGMENT_WRITES.map(|(c, _)| c))
    );
    let script = format!(
        "set pagination off
set confirm off
target remote 127.0.0.1:{port}
set language c
echo @start\\n
x/4xb _start
{watch_cmds}break demo::proc::Kernel::tick
continue
echo @rip\\n
print/x $rip
echo @rdi\\n
print/x $rdi
echo @kernel\\n
print/x &'demo::proc::KERNEL'
set $save_rbx = $rbx
set $save_fs_base = $fs_base
set $save_byte = *(unsigned char *)&'demo::PASSES'
set $rbx = 0x1122334455667788
set $fs_base = 0x5000
set *(unsigned char *)&'demo::PASSES' = 0x5a
maintenance flush register-cache
echo @rbx\\n
print/x $rbx
echo @fs_base\\n
print/x $fs_base
echo @byte\\n
print/x *(unsigned char *)&'demo::PASSES'
set $rbx = $save_rbx
set $fs_base = $save_fs_base
set *(unsigned char *)&'demo::PASSES' = $save_byte
{segment_cmds}stepi
echo @stepped\\n
print/x $rip
delete
hbreak demo::proc::Kernel::tick
continue
echo @hbreak\\n
print/x $rip
delete
{exit_cmds}monitor help
monitor stats
monitor regs
monitor {special}
continue
",
        port = v.port
    );
    let out = gdb(&elf, &script, Duration::from_secs(240));
    let (status, stdout, stderr) = v.finish(Duration::from_secs(240));
    let ctx = format!("engine {engine}\n--- gdb:\n{out}\n--- visor stderr:\n{stderr}");
    // The first instruction, before the guest ran: `and rsp, -16`.
    assert!(out.contains("0x48\t0x83\t0xe4\t0xf0"), "{ctx}");
    if watch {
        assert!(out.contains("Hardware watchpoint 1"), "{ctx}");
        assert!(out.contains("New value = 2"), "{ctx}");
        assert_eq!(hex_after(&out, "@passes"), 2, "{ctx}");
    }
    if watch {
        assert!(out.contains("Hardware read watchpoint 2"), "{ctx}");
        assert!(out.contains("Value = 2"), "{ctx}");
    }
    let n = if watch { 3 } else { 1 };
    assert!(
        out.contains(&format!("Breakpoint {n}, demo::proc::Kernel::tick")),
        "{ctx}"
    );
    let at: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("Breakpoint {n} at 0x")))
        .and_then(|r| u64::from_str_radix(r.split(':').next()?, 16).ok())
        .unwrap_or_else(|| panic!("no breakpoint address: {ctx}"));
    let rip = hex_after(&out, "@rip");
    assert_eq!(rip, at, "{ctx}");
    // Registers and memory written, read back from the engine (and put
    // back, so that the guest runs on as it would have).
    assert_eq!(hex_after(&out, "@rbx"), 0x1122_3344_5566_7788, "{ctx}");
    assert_eq!(hex_after(&out, "@fs_base"), 0x5000, "{ctx}");
    assert_eq!(hex_after(&out, "@byte"), 0x5a, "{ctx}");
    // `tick(&mut self)`: RDI is the kernel state.
    assert_eq!(hex_after(&out, "@rdi"), hex_after(&out, "@kernel"), "{ctx}");
    check_segment_writes(&out, &ctx);
    // The demo's user data segment (DPL 3) in ES, FS's base from its
    // descriptor (base 0) over the 0x5000 set before.
    assert_eq!(hex_after(&out, "@es"), 0x2b, "{ctx}");
    assert_eq!(hex_after(&out, "@fs_base_loaded"), 0, "{ctx}");
    assert!(
        out.contains("es=002b base=0000000000000000 limit=ffffffff type=3 dpl=3"),
        "{ctx}"
    );
    assert!(out.contains("Hardware assisted breakpoint"), "{ctx}");
    assert_eq!(hex_after(&out, "@hbreak"), at, "{ctx}");
    let stepped = hex_after(&out, "@stepped");
    assert!(
        stepped > rip && stepped < rip + 16,
        "one instruction: {ctx}"
    );
    let (exit, after) = (hex_after(&out, "@exit"), hex_after(&out, "@after"));
    if engine == Engine::Pv {
        assert!(out.contains("int    $0x82"), "{ctx}");
        assert_eq!(after, exit + 2, "{ctx}");
    } else {
        assert!(out.contains("out    %al,(%dx)"), "{ctx}");
        // PVM emulates a batch of ring-0 instructions after a trap: its
        // step over the OUT runs the RET after it too.
        if watch {
            assert_eq!(after, exit + 1, "{ctx}");
        }
    }
    for (what, line) in [
        ("help", "translation "),
        ("stats", &format!("visor stats: engine {engine}")),
        ("regs", "cr0="),
        (special, shows),
    ] {
        assert!(out.contains(line), "monitor {what}: {ctx}");
    }
    // (`pv` has no local APIC: events come through its trap table; under
    // `kvm` the state is KVM's in-kernel APIC.)
    if engine != Engine::Pv {
        assert!(out.contains("apic id=0"), "monitor regs: {ctx}");
    }
    assert!(out.contains("exited normally"), "{ctx}");
    assert_eq!(status, Some(0), "{ctx}");
    assert_eq!(
        transcript(&stdout),
        transcript(reference(engine == Engine::Pv)),
        "{ctx}"
    );
}

#[test]
fn gdb_session_emu() {
    debug_session(Engine::Emu);
}

#[test]
fn gdb_session_vmx() {
    debug_session(Engine::Vmx);
}

#[test]
fn gdb_session_trap() {
    debug_session(Engine::Trap);
}

#[test]
fn gdb_session_pv() {
    debug_session(Engine::Pv);
}

#[test]
fn gdb_session_bt() {
    debug_session(Engine::Bt);
}

#[test]
fn gdb_session_kvm() {
    debug_session(Engine::Kvm);
}

/// Where tiny guests are loaded and entered (visor's ELF64 protocol:
/// 64-bit mode, the first 4 GiB identity-mapped, RSP = 0x80000).
const ENTRY: u64 = 0x20_0000;

/// The guest `a` assembled at [`ENTRY`] as an ELF64 kernel file (no
/// symbols), and the addresses of `labels`.
fn tiny_elf(
    mut a: iced_x86::code_asm::CodeAssembler,
    labels: &[iced_x86::code_asm::CodeLabel],
) -> (tempfile::TempDir, std::path::PathBuf, Vec<u64>) {
    let res = a
        .assemble_options(
            ENTRY,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
    let at = labels.iter().map(|l| res.label_ip(l).unwrap()).collect();
    let d = tempfile::tempdir().unwrap();
    let elf = d.path().join("guest.elf");
    std::fs::write(
        &elf,
        machine::loader::elf64_image(ENTRY, &res.inner.code_buffer),
    )
    .unwrap();
    (d, elf, at)
}

/// A gdb session on `elf` under `engine` that stops at `mark`, holds the
/// guest stopped there for two seconds, goes on to `then`, prints `regs`
/// (each after a line `@name`, for [`hex_after`]) and lets the guest run to
/// its end: gdb's output, visor's exit status, and the context a failure
/// shows (gdb's output and visor's stderr). Asserts that the stop lasted.
fn stopped_two_seconds(
    engine: Engine,
    elf: &Path,
    mark: u64,
    then: u64,
    regs: &[&str],
) -> (String, Option<i32>, String) {
    let v = Visor::start(&[
        "run".into(),
        elf.display().to_string(),
        "--engine".into(),
        engine.name().into(),
    ]);
    let prints: String = regs
        .iter()
        .map(|r| format!("echo @{r}\\n\nprint/x ${r}\n"))
        .collect();
    let script = format!(
        "set pagination off
set confirm off
target remote 127.0.0.1:{port}
break *{mark:#x}
break *{then:#x}
continue
shell sleep 2
continue
{prints}continue
",
        port = v.port
    );
    let start = Instant::now();
    let out = gdb(elf, &script, Duration::from_secs(120));
    let took = start.elapsed();
    let (status, _, stderr) = v.finish(Duration::from_secs(60));
    let ctx = format!("engine {engine}\n--- gdb:\n{out}\n--- visor stderr:\n{stderr}");
    assert!(took >= Duration::from_secs(2), "{ctx}");
    (out, status, ctx)
}

/// The guest's view of a stop: a guest reads its clocks (the TSC, the HPET
/// main counter, the ACPI PM timer, the local APIC timer's current count),
/// gdb holds it at a breakpoint for 2 s, and the guest reads them again.
/// On the software engines they moved on by far less than the stop, and an
/// HPET one-shot due 300 ms after the start neither fell due during the
/// stop nor was lost: the guest sees it fire after 300 ms of its own time
/// (status 0x21; 0x23 if it did not within a second). Under `kvm` the
/// clocks run on through the stop, all of them alike (README).
fn time_while_stopped(engine: Engine) {
    use iced_x86::code_asm::*;
    if !engines::available(engine) || !gdb_here() {
        return;
    }
    const HPET: u64 = 0xfed0_0000;
    const APIC: u64 = 0xfee0_0000;
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut mark, mut end, mut wait, mut fired) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    (|| -> Result<(), IcedError> {
        // visor's timing leaf: the TSC's and the APIC timer's kHz.
        a.mov(eax, 0x4000_0010u32)?;
        a.cpuid()?;
        a.mov(ebp, eax)?;
        a.mov(ecx, ebx)?;
        a.mov(rbx, HPET)?;
        a.mov(rsi, APIC)?;
        // The APIC timer: divide by 1, masked one-shot, the longest count.
        a.mov(dword_ptr(rsi + 0x3e0), 0xb)?;
        a.mov(dword_ptr(rsi + 0x320), 0x1_0040)?;
        a.mov(dword_ptr(rsi + 0x380), -1)?;
        // HPET timer 2: one-shot, level (its status bit shows it fired),
        // IRQ 5, due at 30,000,000 ticks (300 ms); then the counter runs.
        a.mov(qword_ptr(rbx + 0x140), 0xa06)?;
        a.mov(qword_ptr(rbx + 0x148), 30_000_000)?;
        a.mov(qword_ptr(rbx + 0x10), 1)?;
        let read = |a: &mut CodeAssembler, regs: [AsmRegister64; 4]| -> Result<(), IcedError> {
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.mov(regs[0], rax)?;
            a.mov(regs[1], qword_ptr(rbx + 0xf0))?;
            a.mov(dx, machine::acpi::PM_TMR as u32)?;
            a.in_(eax, dx)?;
            a.mov(regs[2], rax)?;
            a.mov(eax, dword_ptr(rsi + 0x390))?;
            a.mov(regs[3], rax)
        };
        read(&mut a, [r8, r9, r10, r15])?;
        a.set_label(&mut mark)?;
        a.nop()?;
        read(&mut a, [r11, r12, r13, r14])?;
        a.mov(rdi, qword_ptr(rbx + 0x20))?;
        a.set_label(&mut end)?;
        a.nop()?;
        // Wait for the one-shot, at most a second of the guest's time.
        a.set_label(&mut wait)?;
        a.test(byte_ptr(rbx + 0x20), 4)?;
        a.jnz(fired)?;
        a.mov(rax, qword_ptr(rbx + 0xf0))?;
        a.sub(rax, r9)?;
        a.cmp(rax, 100_000_000)?;
        a.jb(wait)?;
        a.mov(al, 0x11)?;
        a.out(abi::port::DEBUG_EXIT as i32, al)?;
        a.set_label(&mut fired)?;
        a.mov(al, 0x10)?;
        a.out(abi::port::DEBUG_EXIT as i32, al)?;
        a.hlt()
    })()
    .unwrap();
    let (_d, elf, at) = tiny_elf(a, &[mark, end]);
    let (mark, end) = (at[0], at[1]);
    let regs = [
        "rbp", "rcx", "r8", "r9", "r10", "r15", "r11", "r12", "r13", "r14", "rdi",
    ];
    let (out, status, ctx) = stopped_two_seconds(engine, &elf, mark, end, &regs);
    let r = |name: &str| hex_after(&out, &format!("@{name}"));
    let (tsc_khz, apic_khz) = (r("rbp"), r("rcx"));
    // Each clock's advance across the stop, in µs (`None`: the timing leaf
    // gives no frequency; KVM's has the TSC's where the host tells it).
    let us = |ticks: u64, khz: u64| (khz > 0).then(|| ticks.saturating_mul(1000) / khz);
    let tsc = us(r("r11").wrapping_sub(r("r8")), tsc_khz);
    let hpet = us(r("r12").wrapping_sub(r("r9")), 100_000);
    let pm = us(
        r("r13").wrapping_sub(r("r10")) & 0xff_ffff,
        3_579_545 / 1000,
    );
    let apic = us(r("r15").wrapping_sub(r("r14")) & 0xffff_ffff, apic_khz);
    let hpet_status = r("rdi");
    let ctx = format!("tsc {tsc:?} µs, hpet {hpet:?} µs, pm {pm:?} µs, apic {apic:?} µs; {ctx}");
    if engine.time_stands_when_stopped() {
        // Far less than the 2 s stop (and less than the one-shot's 300 ms).
        for us in [tsc, hpet, pm, apic] {
            assert!(us.is_some_and(|us| us < 250_000), "{ctx}");
        }
        assert_eq!(
            hpet_status & 4,
            0,
            "the one-shot fell due in the stop: {ctx}"
        );
    } else {
        // kvm: every clock ran on through the stop.
        for us in [tsc, hpet, pm].into_iter().flatten() {
            assert!(us >= 1_900_000, "{ctx}");
        }
    }
    assert_eq!(status, Some(0x21), "the one-shot fired: {ctx}");
}

/// The guest's view of a stop under `pv`, whose deprivileged kernel has no
/// HPET, PM timer or local APIC to read (the privileged test kernel above
/// cannot run there): its clocks are the TSC and the PV one-shot timer. A
/// PV tiny guest (hypercalls through `int 0x82`) binds the timer's event to
/// a vector of its trap table, reads the TSC, arms the timer 300 ms ahead
/// and stops at a breakpoint for 2 s; after the stop it reads the TSC again
/// and spins until the event, whose handler reads the TSC and shuts down
/// (status 0x21). The TSC moved on by far less than the stop, and the
/// timer neither fell due during the stop (it would then fire at once
/// after it) nor was lost: it fires 300 ms of guest time after it was armed.
fn time_while_stopped_pv_guest() {
    use hypercall::{event, nr, sched, STUB_SIZE};
    use iced_x86::code_asm::*;
    let engine = Engine::Pv;
    if !engines::available(engine) || !gdb_here() {
        return;
    }
    const PAGE: u64 = 0x30_0000;
    const VECTOR: u32 = 0x40;
    const ARMED_NS: u32 = 300_000_000;
    let stub = |n: u64| PAGE + n * STUB_SIZE as u64;
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut mark, mut spin, mut handler, mut fired) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    (|| -> Result<(), IcedError> {
        let tsc = |a: &mut CodeAssembler, to: AsmRegister64| -> Result<(), IcedError> {
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.mov(to, rax)
        };
        // visor's timing leaf: the TSC's kHz.
        a.mov(eax, hypercall::CPUID_TIMING_LEAF)?;
        a.cpuid()?;
        a.mov(ebp, eax)?;
        a.mov(eax, nr::SET_HYPERCALL_PAGE as u32)?;
        a.mov(rdi, PAGE | 1)?;
        a.int(hypercall::HYPERCALL_VECTOR as u32)?;
        // The trap table: VECTOR to the handler (kernel code, IF cleared).
        a.lea(rax, ptr(handler))?;
        a.sub(rsp, 16)?;
        a.mov(byte_ptr(rsp), VECTOR)?;
        a.mov(byte_ptr(rsp + 1), 4)?;
        a.mov(word_ptr(rsp + 2), 0x10)?;
        a.mov(dword_ptr(rsp + 4), 0)?;
        a.mov(qword_ptr(rsp + 8), rax)?;
        a.mov(rdi, rsp)?;
        a.mov(esi, 1)?;
        a.mov(rax, stub(nr::SET_TRAP_TABLE))?;
        a.call(rax)?;
        a.add(rsp, 16)?;
        a.mov(edi, event::BIND_VIRQ as u32)?;
        a.mov(esi, event::VIRQ_TIMER as u32)?;
        a.mov(edx, VECTOR)?;
        a.mov(rax, stub(nr::EVENT_CHANNEL_OP))?;
        a.call(rax)?;
        tsc(&mut a, r8)?;
        a.mov(edi, ARMED_NS)?;
        a.mov(rax, stub(nr::SET_TIMER_OP))?;
        a.call(rax)?;
        a.xor(edi, edi)?;
        a.mov(rax, stub(nr::SET_EVENT_MASK))?;
        a.call(rax)?;
        a.set_label(&mut mark)?;
        a.nop()?;
        tsc(&mut a, r11)?;
        a.set_label(&mut spin)?;
        a.pause()?;
        a.jmp(spin)?;
        a.set_label(&mut handler)?;
        tsc(&mut a, r12)?;
        a.set_label(&mut fired)?;
        a.mov(edi, sched::SHUTDOWN as u32)?;
        a.mov(esi, 0x21)?;
        a.mov(rax, stub(nr::SCHED_OP))?;
        a.call(rax)?;
        a.hlt()
    })()
    .unwrap();
    let (_d, elf, at) = tiny_elf(a, &[mark, fired]);
    let (mark, fired) = (at[0], at[1]);
    let (out, status, ctx) =
        stopped_two_seconds(engine, &elf, mark, fired, &["rbp", "r8", "r11", "r12"]);
    let r = |name: &str| hex_after(&out, &format!("@{name}"));
    let khz = r("rbp");
    assert!(khz > 0, "{ctx}");
    let us = |from: &str, to: &str| r(to).wrapping_sub(r(from)).saturating_mul(1000) / khz;
    let (stop, event) = (us("r8", "r11"), us("r8", "r12"));
    let ctx = format!("across the stop {stop} µs, to the event {event} µs; {ctx}");
    // Far less than the 2 s stop (and than the timer's 300 ms).
    assert!(stop < 250_000, "{ctx}");
    // The event at its own time for the guest: not at once after the stop.
    let armed = ARMED_NS as u64 / 1000;
    assert!(event >= armed - 5_000 && event < armed + 700_000, "{ctx}");
    assert_eq!(status, Some(0x21), "{ctx}");
}

#[test]
fn time_while_stopped_pv() {
    time_while_stopped_pv_guest();
}

#[test]
fn time_while_stopped_emu() {
    time_while_stopped(Engine::Emu);
}

#[test]
fn time_while_stopped_bt() {
    time_while_stopped(Engine::Bt);
}

#[test]
fn time_while_stopped_vmx() {
    time_while_stopped(Engine::Vmx);
}

#[test]
fn time_while_stopped_trap() {
    time_while_stopped(Engine::Trap);
}

#[test]
fn time_while_stopped_kvm() {
    time_while_stopped(Engine::Kvm);
}

/// A breakpoint in code the guest rewrites stays correct: the guest calls
/// a function (`mov eax, 1; ret`) at a breakpoint, rewrites its immediate
/// to 2 and calls it again. gdb stops at it both times, the second time
/// seeing the new instruction (no breakpoint byte in the guest's memory),
/// and the guest gets 1 then 2 (status 0x25).
fn breakpoint_in_rewritten_code(engine: Engine) {
    use iced_x86::code_asm::*;
    if !engines::available(engine) || !gdb_here() {
        return;
    }
    let mut a = CodeAssembler::new(64).unwrap();
    let mut f = a.create_label();
    (|| -> Result<(), IcedError> {
        a.lea(rbx, ptr(f))?;
        a.call(f)?;
        a.mov(r8, rax)?;
        a.mov(dword_ptr(rbx + 1), 2)?;
        a.call(f)?;
        a.shl(r8, 4)?;
        a.or(rax, r8)?;
        a.out(abi::port::DEBUG_EXIT as i32, al)?;
        a.hlt()?;
        a.set_label(&mut f)?;
        a.mov(eax, 1)?;
        a.ret()
    })()
    .unwrap();
    let (_d, elf, at) = tiny_elf(a, &[f]);
    let v = Visor::start(&[
        "run".into(),
        elf.display().to_string(),
        "--engine".into(),
        engine.name().into(),
    ]);
    let script = format!(
        "set pagination off
set confirm off
target remote 127.0.0.1:{port}
break *{f:#x}
continue
echo @first\\n
x/i $pc
continue
echo @second\\n
x/i $pc
x/6xb $pc
continue
",
        port = v.port,
        f = at[0]
    );
    let out = gdb(&elf, &script, Duration::from_secs(60));
    let (status, _, stderr) = v.finish(Duration::from_secs(60));
    let ctx = format!("engine {engine}\n--- gdb:\n{out}\n--- visor stderr:\n{stderr}");
    let after = |m: &str| {
        out.split(m)
            .nth(1)
            .unwrap_or_else(|| panic!("no {m}: {ctx}"))
    };
    let pc = format!("=> {:#x}:", at[0]);
    assert!(after("@first").trim_start().starts_with(&pc), "{ctx}");
    assert!(after("@first").contains("mov    $0x1,%eax"), "{ctx}");
    assert!(after("@second").trim_start().starts_with(&pc), "{ctx}");
    assert!(after("@second").contains("mov    $0x2,%eax"), "{ctx}");
    assert!(
        after("@second").contains("0xb8\t0x02\t0x00\t0x00\t0x00\t0xc3"),
        "{ctx}"
    );
    assert_eq!(status, Some(0x25), "{ctx}");
}

#[test]
fn breakpoint_in_rewritten_code_emu() {
    breakpoint_in_rewritten_code(Engine::Emu);
}

#[test]
fn breakpoint_in_rewritten_code_bt() {
    breakpoint_in_rewritten_code(Engine::Bt);
}

#[test]
fn breakpoint_in_rewritten_code_vmx() {
    breakpoint_in_rewritten_code(Engine::Vmx);
}

#[test]
fn breakpoint_in_rewritten_code_trap() {
    breakpoint_in_rewritten_code(Engine::Trap);
}

#[test]
fn breakpoint_in_rewritten_code_kvm() {
    breakpoint_in_rewritten_code(Engine::Kvm);
}

/// A segment selector gdb writes is loaded from the guest's GDT: a tiny
/// guest loads a GDT of its own whose 0x20 is a data segment based at
/// 0x30_0000 and stops; gdb writes 0x20 to FS, and FS's base is the
/// descriptor's (0x30_0000, over the 0x5000 written before), so the
/// guest's next instruction, `mov rax, fs:[8]`, reads 0x30_0008 (status
/// 0x21; 0x23 if it read something else). The writes of [`SEGMENT_WRITES`]
/// are answered the same way in this GDT (after a refused one the session
/// goes on, the registers as they were), and so is a non-present segment;
/// a null selector in GS leaves it unusable with base 0.
fn segment_from_the_gdt(engine: Engine) {
    use iced_x86::code_asm::*;
    if !engines::available(engine) || !gdb_here() {
        return;
    }
    const DATA: u64 = 0x30_0000;
    const VALUE: u64 = 0x1122_3344_5566_7788;
    let gdt = [
        0,
        0,
        arch::gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit kernel code
        arch::gdt_entry(0xc093, 0, 0xfffff), // 0x18: kernel data
        arch::gdt_entry(0xc093, DATA, 0xfffff), // 0x20: kernel data at DATA
        arch::gdt_entry(0xc0f3, 0, 0xfffff), // 0x28: user data
        arch::gdt_entry(0xc013, 0, 0xfffff), // 0x30: not present
        arch::gdt_entry(0x0089, 0x1000, 0x67), // 0x38: a TSS
        0,
    ];
    let mut a = CodeAssembler::new(64).unwrap();
    let (mut table, mut mark, mut bad) = (a.create_label(), a.create_label(), a.create_label());
    (|| -> Result<(), IcedError> {
        a.lea(rax, ptr(table))?;
        a.sub(rsp, 16)?;
        a.mov(word_ptr(rsp), (gdt.len() * 8 - 1) as u32)?;
        a.mov(qword_ptr(rsp + 2), rax)?;
        a.lgdt(ptr(rsp))?;
        a.add(rsp, 16)?;
        a.mov(rcx, VALUE)?;
        a.mov(rax, DATA)?;
        a.mov(qword_ptr(rax + 8), rcx)?;
        a.xor(eax, eax)?;
        a.set_label(&mut mark)?;
        a.mov(rax, qword_ptr(0).fs() + 8)?;
        a.cmp(rax, rcx)?;
        a.jne(bad)?;
        a.mov(al, 0x10)?;
        a.out(abi::port::DEBUG_EXIT as i32, al)?;
        a.set_label(&mut bad)?;
        a.mov(al, 0x11)?;
        a.out(abi::port::DEBUG_EXIT as i32, al)?;
        a.hlt()?;
        a.set_label(&mut table)?;
        a.dq(&gdt)
    })()
    .unwrap();
    let (_d, elf, at) = tiny_elf(a, &[mark]);
    let v = Visor::start(&[
        "run".into(),
        elf.display().to_string(),
        "--engine".into(),
        engine.name().into(),
    ]);
    let tries = try_each(&SEGMENT_WRITES.map(|(c, _)| c));
    let not_present = try_each(&["set $fs = 0x30"]);
    let script = format!(
        "set pagination off
set confirm off
target remote 127.0.0.1:{port}
break *{mark:#x}
continue
{tries}set $fs_base = 0x5000
set $fs = 0x20
{not_present}set $gs = 0x18
set $gs_base = 0x4000
set $gs = 0
set $ss = 0x20
maintenance flush register-cache
echo @ss\\n
print/x $ss
echo @gs_base\\n
print/x $gs_base
echo @fs\\n
print/x $fs
echo @fs_base\\n
print/x $fs_base
echo @es\\n
print/x $es
monitor regs
stepi
echo @rax\\n
print/x $rax
continue
",
        port = v.port,
        mark = at[0]
    );
    let out = gdb(&elf, &script, Duration::from_secs(60));
    let (status, _, stderr) = v.finish(Duration::from_secs(60));
    let ctx = format!("engine {engine}\n--- gdb:\n{out}\n--- visor stderr:\n{stderr}");
    check_segment_writes(&out, &ctx);
    let refused = out
        .lines()
        .find(|l| l.starts_with("@refused set $fs = 0x30:"));
    assert!(refused.is_some_and(|l| l.contains("E16")), "{ctx}");
    // FS is the segment at DATA (the refused 0x30 changed nothing).
    assert_eq!(hex_after(&out, "@fs"), 0x20, "{ctx}");
    assert_eq!(hex_after(&out, "@fs_base"), DATA, "{ctx}");
    assert_eq!(hex_after(&out, "@es"), 0x2b, "{ctx}");
    // SS takes a writable DPL 0 data segment at CPL 0 (under `trap` the
    // engine runs it with RPL 1; gdb sees the guest's selector).
    assert_eq!(hex_after(&out, "@ss"), 0x20, "{ctx}");
    // A null selector empties GS, its base too (as Intel's CPUs do).
    assert_eq!(hex_after(&out, "@gs_base"), 0, "{ctx}");
    assert!(out.contains("gs=0000 base=0000000000000000"), "{ctx}");
    assert!(
        out.contains("fs=0020 base=0000000000300000 limit=ffffffff type=3 dpl=0"),
        "{ctx}"
    );
    assert_eq!(hex_after(&out, "@rax"), VALUE, "{ctx}");
    assert_eq!(status, Some(0x21), "{ctx}");
}

#[test]
fn segment_from_the_gdt_emu() {
    segment_from_the_gdt(Engine::Emu);
}

#[test]
fn segment_from_the_gdt_bt() {
    segment_from_the_gdt(Engine::Bt);
}

#[test]
fn segment_from_the_gdt_vmx() {
    segment_from_the_gdt(Engine::Vmx);
}

#[test]
fn segment_from_the_gdt_trap() {
    segment_from_the_gdt(Engine::Trap);
}

#[test]
fn segment_from_the_gdt_kvm() {
    segment_from_the_gdt(Engine::Kvm);
}

/// A raw remote-protocol client.
struct Client<S = TcpStream>(S);

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client(s)
    }
}

impl<S: Read + Write> Client<S> {
    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    fn packet(&mut self, body: &str) {
        let sum = body.bytes().fold(0u8, |s, b| s.wrapping_add(b));
        self.send(format!("${body}#{sum:02x}").as_bytes());
    }

    /// The next reply packet's body (acks before it skipped).
    fn reply(&mut self) -> String {
        self.try_reply().expect("a reply")
    }

    /// The next reply packet's body, or `None` if the connection ended.
    fn try_reply(&mut self) -> Option<String> {
        let mut body = Vec::new();
        let mut b = [0u8];
        loop {
            self.0.read_exact(&mut b).ok()?;
            if b[0] == b'$' {
                break;
            }
        }
        loop {
            self.0.read_exact(&mut b).ok()?;
            if b[0] == b'#' {
                break;
            }
            body.push(b[0]);
        }
        let mut sum = [0u8; 2];
        self.0.read_exact(&mut sum).ok()?;
        // Run-length encoding: `X*n` is X and n - 29 more of it.
        let mut out = Vec::new();
        let mut i = 0;
        while i < body.len() {
            if body[i] == b'*' && i + 1 < body.len() && !out.is_empty() {
                let last = *out.last().unwrap();
                out.extend(std::iter::repeat_n(last, (body[i + 1] - 29) as usize));
                i += 2;
            } else {
                out.push(body[i]);
                i += 1;
            }
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    /// The next byte (an ack or a nack).
    fn byte(&mut self) -> u8 {
        let mut b = [0u8];
        self.0.read_exact(&mut b).unwrap();
        b[0]
    }

    fn ask(&mut self, body: &str) -> String {
        self.packet(body);
        self.reply()
    }
}

/// Garbage, a bad checksum, a packet gdbstub cannot parse, unmapped memory,
/// a second client, Ctrl-C while running, a client gone in the middle of a
/// packet: the VMM answers with errors, keeps running, and takes the next
/// client, which kills the guest.
#[test]
fn protocol_robustness() {
    // The full demo run: long enough to be stopped while it runs.
    let v = Visor::start(&["run", "--engine", "emu", "--no-pv"].map(String::from));
    let mut c = Client::connect(v.port);
    c.send(b"hello \x00\xff garbage");
    let stop = c.ask("?");
    assert!(stop.starts_with('T') || stop.starts_with('S'), "{stop}");
    c.send(b"$g#00");
    assert_eq!(c.byte(), b'-', "a bad checksum is refused");
    let regs = c.ask("g");
    // RIP (after 16 registers) is the entry point, 0x200000.
    assert_eq!(&regs[256..272], "0000200000000000", "{regs}");
    assert!(c.ask("mfffffffffffff000,10").starts_with('E'));
    assert!(c.ask("mffffffffffffffff,10").starts_with('E'));
    assert!(c.ask("m200000,4").starts_with("4883e4f0"));
    assert!(c.ask("m zz").starts_with('E'), "unparsable: an error");
    // Requests at the edges: each gets an answer (an error, "not
    // supported" or a refusal), and the stub goes on.
    let monitor_junk: String = b"no-such-command \xff"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for (ask, ok) in [
        ("Z2,0,ffffffffffffffff", "OK"),
        ("z2,0,ffffffffffffffff", "OK"),
        ("Z0,ffffffffffffffff,1", "OK"),
        ("z0,ffffffffffffffff,1", "OK"),
        ("Z2,fffffffffffffffe,8", "OK"),
        ("z2,fffffffffffffffe,8", "OK"),
        ("Z2,0,0", "E"),
        ("Mfffffffffffff000,4:00000000", "E"),
        ("Mffffffffffffffff,2:0000", "E"),
        ("mfffffffffffff000,100000", "E"),
        ("G00", "E"),
        ("P99=00", ""),
        ("P10=zz", "E"),
        ("pffff", ""),
        ("qRcmd,zz", "E"),
        ("qXfer:features:read:target.xml:fffffff,ffff", "l"),
        ("vMustReplyEmpty", ""),
    ] {
        let r = c.ask(ask);
        // An empty `ok`: the empty reply (not supported).
        assert!(
            r.starts_with(ok) && (!ok.is_empty() || r.is_empty()),
            "{ask}: {r}"
        );
    }
    // An unknown monitor command: a line that says so, then OK.
    c.packet(&format!("qRcmd,{monitor_junk}"));
    let said = c.reply();
    let said = (1..said.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(said.get(i..i + 2)?, 16).ok())
        .collect::<Vec<u8>>();
    assert!(
        String::from_utf8_lossy(&said).contains("unknown monitor command"),
        "{said:?}"
    );
    assert_eq!(c.reply(), "OK");
    // A long read gives at most one reply's worth (2048 bytes, in hex).
    assert_eq!(c.ask("m0,ffffffffffffffff").len(), 4096);
    // Five hardware breakpoints: the fifth finds no debug register free.
    for n in 0..5 {
        let r = c.ask(&format!("Z1,{:x},1", 0x20_0000 + n));
        assert_eq!(r, if n < 4 { "OK" } else { "E16" }, "Z1 number {n}");
    }
    for n in 0..4 {
        assert_eq!(c.ask(&format!("z1,{:x},1", 0x20_0000 + n)), "OK");
    }
    assert!(c.ask("m200000,4").starts_with("4883e4f0"));
    // A second client is closed at once.
    let mut second = TcpStream::connect(("127.0.0.1", v.port)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(second.read(&mut buf).unwrap_or(0), 0, "refused");
    // The first one still works; the guest runs and Ctrl-C stops it.
    assert!(c.ask("m200000,1").starts_with("48"));
    c.packet("c");
    assert_eq!(c.byte(), b'+');
    std::thread::sleep(Duration::from_millis(300));
    c.send(&[3]);
    let stop = c.reply();
    assert!(stop.starts_with("T02") || stop.starts_with("S02"), "{stop}");
    // Gone in the middle of a packet: the guest runs on.
    c.packet("c");
    c.send(b"$m2000");
    drop(c);
    // The next client: refused until the VMM has seen the first one go
    // (a loaded machine may take a while).
    let start = Instant::now();
    let (mut c, stop) = loop {
        std::thread::sleep(Duration::from_millis(200));
        let mut c = Client::connect(v.port);
        c.packet("?");
        match c.try_reply() {
            Some(stop) => break (c, stop),
            None => assert!(start.elapsed() < Duration::from_secs(30), "never taken"),
        }
    };
    assert!(stop.starts_with('T') || stop.starts_with('S'), "{stop}");
    c.packet("k");
    let (status, _, err) = v.finish(Duration::from_secs(60));
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("refused a second gdb client"), "{err}");
    assert!(err.contains("the debugger killed the guest"), "{err}");
}

/// Ctrl-C stops a running guest on every engine (`bt` in its translated
/// code too): the stub answers SIGINT, the registers read, and the guest
/// runs on and is stopped again; then `k` ends the run.
fn ctrl_c(engine: Engine) {
    if !engines::available(engine) {
        return;
    }
    // The full demo run: long enough to be stopped while it runs.
    let mut args = demo_args(engine);
    args.truncate(3);
    if engine != Engine::Pv {
        args.push("--no-pv".into());
    }
    let v = Visor::start(&args);
    let mut c = Client::connect(v.port);
    for _ in 0..2 {
        c.packet("c");
        assert_eq!(c.byte(), b'+');
        std::thread::sleep(Duration::from_millis(150));
        c.send(&[3]);
        let stop = c.reply();
        assert!(
            stop.starts_with("T02") || stop.starts_with("S02"),
            "{engine}: {stop}"
        );
        let regs = c.ask("g");
        // RIP (after 16 registers) moved on from the entry point.
        assert!(regs.len() >= 272, "{engine}: {regs}");
        assert_ne!(&regs[256..272], "0000200000000000", "{engine}: {regs}");
    }
    c.packet("k");
    let (status, _, err) = v.finish(Duration::from_secs(60));
    assert_eq!(status, Some(0), "{engine}: {err}");
}

#[test]
fn ctrl_c_emu() {
    ctrl_c(Engine::Emu);
}

#[test]
fn ctrl_c_bt() {
    ctrl_c(Engine::Bt);
}

#[test]
fn ctrl_c_vmx() {
    ctrl_c(Engine::Vmx);
}

#[test]
fn ctrl_c_trap() {
    ctrl_c(Engine::Trap);
}

#[test]
fn ctrl_c_pv() {
    ctrl_c(Engine::Pv);
}

#[test]
fn ctrl_c_kvm() {
    ctrl_c(Engine::Kvm);
}

/// `--gdb PATH`: a Unix socket. A client reaches the stub through it, reads
/// memory, runs the guest to its end (the exit reply), and the socket is
/// gone after the run.
#[test]
fn unix_socket() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("visor.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_visor"))
        .args(demo_args(Engine::Emu))
        .arg("--gdb")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start visor");
    let start = Instant::now();
    let s = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(30), "{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut c = Client(s);
    let stop = c.ask("?");
    assert!(stop.starts_with('T') || stop.starts_with('S'), "{stop}");
    assert!(c.ask("m200000,4").starts_with("4883e4f0"));
    // Run to the end: the stub reports the exit (status 0).
    assert_eq!(c.ask("c"), "W00");
    drop(c);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("visor did not end");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("waiting for gdb on {}", sock.display())),
        "{err}"
    );
    assert!(!sock.exists(), "the socket is removed");
}

/// Asserts one `visor: error:` line and status 2.
fn assert_error(args: &[&str], needle: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_visor"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("visor: error: --gdb"), "{err}");
    assert!(lines[0].contains(needle), "{needle:?}: {err}");
}

#[test]
fn bad_gdb_addresses() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    assert_error(&["run", "--engine", "emu", "--gdb", &port], "cannot listen");
    for bad in [
        "12x",
        "host:",
        "127.0.0.1:99999",
        ":",
        "no.such.host.invalid:1",
    ] {
        assert_error(&["run", "--engine", "emu", "--gdb", bad], "--gdb");
    }
    let d = tempfile::tempdir().unwrap();
    let in_missing_dir = d.path().join("no/such/dir/sock");
    assert_error(
        &[
            "run",
            "--engine",
            "emu",
            "--gdb",
            in_missing_dir.to_str().unwrap(),
        ],
        "cannot listen",
    );
}
