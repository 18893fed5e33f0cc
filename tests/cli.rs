//! The `visor` binary end to end: the embedded demo guest, statistics, Multiboot
//! information, and every kind of bad input (one clear error line, a non-zero
//! status, never a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use iced_x86::code_asm::*;
use machine::loader::elf64_image;

#[path = "common/engines.rs"]
mod engines;
#[path = "common/transcript.rs"]
mod transcript;

use transcript::transcript;

fn visor(args: &[&str]) -> Output {
    visor_env(args, &[])
}

fn visor_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_visor"));
    c.args(args).stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run visor");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "visor panicked: {err}"
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a bad-input failure: status 2 and exactly one `visor: error:` line
/// that contains `needle`.
fn assert_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].starts_with("visor: error: "), "{err}");
    assert!(lines[0].contains(needle), "{needle:?} not in {err:?}");
}

fn kvm_here() -> bool {
    engines::available(visor::Engine::Kvm)
}

fn tmp(name: &str, data: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(name);
    std::fs::write(&p, data).unwrap();
    (d, p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The counters of the demo OS's final line.
fn demo_done(out: &str, mode: &str) -> [u64; 4] {
    let line = out
        .lines()
        .find(|l| l.starts_with("demo: done "))
        .unwrap_or_else(|| panic!("no final line: {out}"));
    let mut n = [0u64; 4];
    for (i, key) in ["processes", "syscalls", "pagefaults", "timer_irqs"]
        .iter()
        .enumerate()
    {
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing: {line}"));
        n[i] = v.parse().unwrap();
    }
    assert!(line.ends_with(&format!("mode={mode}")), "{line}");
    n
}

fn stats_json(args: &[&str]) -> (Output, serde_json::Value) {
    let d = tempfile::tempdir().unwrap();
    let json = d.path().join("stats.json");
    let mut a = args.to_vec();
    a.extend_from_slice(&["--stats", "--stats-json", s(&json)]);
    let o = visor(&a);
    let v = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    (o, v)
}

/// The demo OS, paravirtualized: it finds visor's CPUID leaves and routes its
/// privileged operations through hypercalls.
#[test]
fn demo_os_pv_mode() {
    if !kvm_here() {
        return;
    }
    let (o, v) = stats_json(&["run", "--cmdline", "quiet=1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("demo: cmdline \"quiet=1\""), "{out}");
    assert!(out.contains("A: 5133 primes below 50000"), "{out}");
    let [procs, syscalls, faults, ticks] = demo_done(&out, "pv");
    assert!(
        procs >= 3 && syscalls > 100 && faults > 0 && ticks > 0,
        "{out}"
    );
    assert!(out.contains("failed=0 frames_leaked=0"), "{out}");
    let err = stderr(&o);
    assert!(
        err.contains("exit reason") && err.contains("hypercall"),
        "{err}"
    );
    assert_eq!(v["engine"], "kvm");
    let h = &v["hypercalls"];
    for name in [
        "set_trap_table",
        "mmu_update",
        "new_baseptr",
        "console_io",
        "sched_op",
        "set_timer_op",
    ] {
        assert!(h[name].as_u64().unwrap_or(0) > 0, "{name} not called: {h}");
    }
    assert!(v["wall_time_ns"].as_u64().unwrap() > 0);
    assert_eq!(v["exit_status"], 0);
}

/// The same binary with the PV leaves hidden runs on native instructions.
#[test]
fn demo_os_native_mode() {
    if !kvm_here() {
        return;
    }
    let (o, v) = stats_json(&["run", "--no-pv"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("visor demo guest: hello from 64-bit long mode"),
        "{out}"
    );
    let [procs, syscalls, faults, ticks] = demo_done(&out, "native");
    assert!(
        procs >= 3 && syscalls > 100 && faults > 0 && ticks > 0,
        "{out}"
    );
    assert!(v["hypercalls"].as_object().unwrap().is_empty(), "{v}");
    let outs = v["exits"]["io_out"].as_u64().unwrap();
    assert!(
        outs as usize >= out.len(),
        "native console: one exit per byte"
    );
}

#[test]
fn no_arguments_runs_the_demo() {
    if !kvm_here() {
        return;
    }
    let o = visor(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    demo_done(&stdout(&o), "pv");
}

/// The demo OS on the binary translator, natively and paravirtualized: the
/// same transcript as on `emu` (timing lines aside), with code run
/// translated and the rest by the software CPU.
#[test]
fn demo_os_on_bt_native_and_pv() {
    for mode in [&["--no-pv"][..], &[][..]] {
        let run = |engine: &str| {
            let mut a = vec!["run", "--engine", engine, "--cmdline", "passes=2"];
            a.extend_from_slice(mode);
            stats_json(&a)
        };
        let (emu, _) = run("emu");
        assert_eq!(emu.status.code(), Some(0), "{}", stderr(&emu));
        let (bt, v) = run("bt");
        assert_eq!(bt.status.code(), Some(0), "{}", stderr(&bt));
        let (e, b) = (stdout(&emu), stdout(&bt));
        demo_done(&b, if mode.is_empty() { "pv" } else { "native" });
        assert_eq!(transcript(&b), transcript(&e), "mode {mode:?}");
        assert_eq!(v["engine"], "bt");
        let c = &v["bt"];
        for k in ["blocks_translated", "run_translated", "run_interpreted"] {
            assert!(c[k].as_u64().unwrap_or(0) > 0, "{k}: {v}");
        }
        assert!(c["code_cache_bytes"].as_u64().unwrap() <= c["code_cache_size"].as_u64().unwrap());
    }
}

/// `--bt-cache`: a small code cache fills and is emptied whole, and the
/// guest runs on; a size outside 64K..1G is refused.
#[test]
fn bt_code_cache_is_bounded() {
    let (o, v) = stats_json(&[
        "run",
        "--engine",
        "bt",
        "--bt-cache",
        "64K",
        "--bt-hot",
        "0",
        "--cmdline",
        "passes=1",
        "--no-pv",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let c = &v["bt"];
    assert_eq!(c["code_cache_size"], 64 << 10, "{v}");
    assert!(c["code_cache_bytes"].as_u64().unwrap() <= 64 << 10);
    // The translator's metadata stays within its documented bound.
    let bound = c["metadata_bound"].as_u64().unwrap();
    assert_eq!(
        bound,
        (64 << 10) / visor_bt::CACHE_BYTES_PER_BLOCK as u64 * visor_bt::METADATA_PER_BLOCK as u64
    );
    assert!(c["metadata_bytes"].as_u64().unwrap() <= bound, "{v}");
    assert!(c["cache_flushes"].as_u64().unwrap() >= 1, "{v}");
    let o = visor(&["run", "--engine", "bt", "--bt-cache", "1K"]);
    assert_error(&o, "--bt-cache");
}

/// `--bt-hot`: by default code is interpreted until its block start has
/// been reached `DEFAULT_HOT` times; with 0 everything is translated at
/// first sight, so fewer instructions are interpreted.
#[test]
fn bt_translates_hot_code() {
    let run = |hot: &str| {
        let (o, v) = stats_json(&[
            "run",
            "--engine",
            "bt",
            "--bt-hot",
            hot,
            "--cmdline",
            "passes=1",
            "--no-pv",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        v["bt"].clone()
    };
    let (lazy, eager) = (run("32"), run("0"));
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    assert!(n(&lazy, "cold_entries") > 0, "{lazy}");
    assert_eq!(n(&eager, "cold_entries"), 0, "{eager}");
    assert!(n(&lazy, "blocks_translated") < n(&eager, "blocks_translated"));
    assert!(n(&lazy, "run_interpreted") > n(&eager, "run_interpreted"));
    // The hot code is translated all the same.
    assert!(
        n(&lazy, "run_translated") > n(&lazy, "run_interpreted"),
        "{lazy}"
    );
}

#[test]
fn engines_lists_kvm() {
    let o = visor(&["engines"]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out.lines().any(|l| l.starts_with("kvm ")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("bt ")), "{out}");
    let params = visor::Engine::Kvm.linux_parameters();
    if !params.is_empty() {
        let line = format!("linux parameters for kvm here: {}", params.join(" "));
        assert!(out.lines().any(|l| l == line), "{out}");
    }
    let o = visor_env(&["engines"], &[("VISOR_KVM_DEVICE", "/nonexistent/kvm")]);
    assert!(stdout(&o).contains("no (/nonexistent/kvm does not exist"));
}

/// Output into a pipe whose reader is gone ends visor as it ends `ls`:
/// killed by SIGPIPE, silently (no panic, nothing on stderr), for `visor
/// engines` and for the guest's console under `visor run`.
#[test]
fn closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    for args in [&["engines"][..], &["run", "--engine", "emu"][..]] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let o = Command::new(env!("CARGO_BIN_EXE_visor"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .output()
            .expect("run visor");
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}",
            o.status
        );
        assert_eq!(stderr(&o), "", "{args:?}");
    }
}

#[test]
fn missing_kernel() {
    assert_error(
        &visor(&["run", "/nonexistent/kernel"]),
        "cannot read kernel /nonexistent/kernel",
    );
}

#[test]
fn unreadable_kernel() {
    let d = tempfile::tempdir().unwrap();
    assert_error(&visor(&["run", s(d.path())]), "cannot read kernel");
}

#[test]
fn not_a_kernel() {
    let (_d, p) = tmp("junk", &[0x5a; 4096]);
    assert_error(&visor(&["run", s(&p)]), "not a kernel visor can boot");
    let (_d, p) = tmp("empty", &[]);
    assert_error(&visor(&["run", s(&p)]), "not a kernel visor can boot");
}

#[test]
fn truncated_elf() {
    let k = elf64_image(0x20_0000, &[0x90; 256]);
    let (_d, p) = tmp("trunc", &k[..k.len() - 100]);
    assert_error(&visor(&["run", s(&p)]), "truncated ELF");
    let demo = visor::DEMO_GUEST;
    // Cut inside its code (the debug information, most of the file, comes
    // after the loadable segments).
    let (_d, p) = tmp("demo-half", &demo[..0x8000]);
    assert_error(&visor(&["run", s(&p)]), "truncated ELF");
}

#[test]
fn memory_too_small() {
    assert_error(&visor(&["run", "--mem", "1M"]), "too small");
    // The demo kernel loads at 2 MiB: 2 MiB of RAM cannot hold it.
    assert_error(&visor(&["run", "--mem", "2M"]), "raise --mem");
    assert_error(&visor(&["run", "--mem", "12Q"]), "--mem");
    assert_error(&visor(&["run", "--mem", "99999999T"]), "--mem");
}

#[test]
fn initrd_does_not_fit() {
    let (_d, p) = tmp("big.cpio", &vec![0u8; 6 << 20]);
    assert_error(
        &visor(&["run", "--mem", "4M", "--initrd", s(&p)]),
        "does not fit",
    );
    assert_error(
        &visor(&["run", "--initrd", "/nonexistent/initrd"]),
        "cannot read initrd",
    );
}

#[test]
fn kvm_missing() {
    let nokvm = [("VISOR_KVM_DEVICE", "/nonexistent/kvm")];
    assert_error(
        &visor_env(&["run", "--engine", "kvm"], &nokvm),
        "engine kvm is not available: /nonexistent/kvm does not exist",
    );
    assert_error(&visor(&["run", "--engine", "warp"]), "unknown engine");
    // `--engine auto` falls back to the fastest software engine, bt.
    let code = asm(64, 0x20_0000, |a| {
        a.mov(al, 0x2a)?;
        a.out(0xf4, al)?;
        a.hlt()
    });
    let (d, p) = tmp("exit.elf", &elf64_image(0x20_0000, &code));
    let json = d.path().join("stats.json");
    let o = visor_env(&["run", s(&p), "--stats-json", s(&json)], &nokvm);
    assert_eq!(o.status.code(), Some((0x2a << 1) | 1), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["engine"], "bt");
    assert!(v["engine_counters"]["guest_instructions"].as_u64().unwrap() >= 2);
}

fn asm(bits: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

#[test]
fn triple_fault_dumps_registers() {
    if !kvm_here() {
        return;
    }
    let code = asm(64, 0x20_0000, |a| {
        a.mov(rbx, 0xfeed_u64)?;
        a.ud2()
    });
    let (_d, p) = tmp("tf.elf", &elf64_image(0x20_0000, &code));
    let o = visor(&["run", s(&p)]);
    assert_eq!(o.status.code(), Some(visor::exit_status::TRIPLE_FAULT));
    let err = stderr(&o);
    assert!(err.contains("triple-faulted"), "{err}");
    assert!(err.contains("rbx=000000000000feed"), "{err}");
    assert!(err.contains("cr0="), "{err}");
}

#[test]
fn timeout_stops_a_spinning_guest() {
    if !kvm_here() {
        return;
    }
    let code = asm(64, 0x20_0000, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.pause()?;
        a.jmp(l)
    });
    let (_d, p) = tmp("spin.elf", &elf64_image(0x20_0000, &code));
    let o = visor(&["run", s(&p), "--timeout", "0.5"]);
    assert_eq!(o.status.code(), Some(visor::exit_status::TIMEOUT));
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
    assert_error(&visor(&["run", s(&p), "--timeout=-1"]), "--timeout");
}

/// A guest whose every instruction is an exit the engine handles itself
/// (CPUID: a VM exit under `vmx`, a trap under `trap`; under `pv` and `emu`
/// it runs on the CPU) still stops on `--timeout`.
#[test]
fn timeout_stops_a_guest_that_exits_forever() {
    let code = asm(64, 0x20_0000, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.cpuid()?;
        a.jmp(l)
    });
    let (_d, p) = tmp("cpuid.elf", &elf64_image(0x20_0000, &code));
    for engine in ["emu", "vmx", "trap", "pv"] {
        let o = visor(&["run", s(&p), "--engine", engine, "--timeout", "0.3"]);
        assert_eq!(
            o.status.code(),
            Some(visor::exit_status::TIMEOUT),
            "{engine}: {}",
            stderr(&o)
        );
    }
}

/// The Multiboot header of an a.out-kludge kernel loaded at `base` whose
/// code starts right after the header (at `base` + 32), with 8 KiB of
/// load and BSS.
fn multiboot_aout_header(base: u32) -> Vec<u8> {
    const FLAGS: u32 = (1 << 16) | 2;
    let header: [u32; 8] = [
        0x1bad_b002,
        FLAGS,
        0u32.wrapping_sub(0x1bad_b002u32.wrapping_add(FLAGS)),
        base,
        base,
        0,
        base + 0x2000,
        base + 32,
    ];
    header.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A Multiboot a.out-kludge kernel at 1 MiB that prints, on COM1, the magic in
/// EAX, mem_lower, mem_upper, the command line, the module count and the first
/// byte of the module, then exits through isa-debug-exit with the info flags' low
/// byte.
fn multiboot_kernel() -> Vec<u8> {
    multiboot_kernel_at(0x10_0000, 0x10_2000)
}

/// [`multiboot_kernel`] loaded at `base`, its BSS up to `bss_end`.
fn multiboot_kernel_at(base: u32, bss_end: u32) -> Vec<u8> {
    const FLAGS: u32 = (1 << 16) | 2;
    let header: [u32; 8] = [
        0x1bad_b002,
        FLAGS,
        0u32.wrapping_sub(0x1bad_b002u32.wrapping_add(FLAGS)),
        base,
        base,
        0,
        bss_end,
        base + 32,
    ];
    let mut k: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    let code = asm(32, base as u64 + 32, |a| {
        let mut hex = a.create_label();
        let mut str_lp = a.create_label();
        let mut str_done = a.create_label();
        a.mov(esp, 0x80000u32)?;
        a.mov(ebp, ebx)?; // multiboot info
        a.call(hex)?; // EAX: the magic
        a.mov(eax, dword_ptr(ebp + 4))?; // mem_lower
        a.call(hex)?;
        a.mov(eax, dword_ptr(ebp + 8))?; // mem_upper
        a.call(hex)?;
        a.mov(eax, dword_ptr(ebp + 20))?; // mods_count
        a.call(hex)?;
        a.mov(esi, dword_ptr(ebp + 24))?; // mods_addr
        a.mov(esi, dword_ptr(esi))?; // mod_start
        a.movzx(eax, byte_ptr(esi))?;
        a.call(hex)?;
        a.mov(esi, dword_ptr(ebp + 16))?; // cmdline
        a.mov(edx, 0x3f8u32)?;
        a.set_label(&mut str_lp)?;
        a.lodsb()?;
        a.test(al, al)?;
        a.jz(str_done)?;
        a.out(dx, al)?;
        a.jmp(str_lp)?;
        a.set_label(&mut str_done)?;
        a.mov(al, 0x0a)?;
        a.out(dx, al)?;
        a.mov(eax, dword_ptr(ebp))?; // flags
        a.out(0xf4, al)?;
        a.hlt()?;
        // hex: prints EAX as 8 hex digits and a space.
        a.set_label(&mut hex)?;
        a.mov(ecx, 8u32)?;
        a.mov(ebx, eax)?;
        a.mov(edx, 0x3f8u32)?;
        let mut dig = a.create_label();
        let mut num = a.create_label();
        a.set_label(&mut dig)?;
        a.rol(ebx, 4)?;
        a.mov(eax, ebx)?;
        a.and(eax, 0xf)?;
        a.add(eax, 0x30)?;
        a.cmp(eax, 0x39)?;
        a.jbe(num)?;
        a.add(eax, 0x27)?;
        a.set_label(&mut num)?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(dig)?;
        a.mov(al, 0x20)?;
        a.out(dx, al)?;
        a.ret()
    });
    k.extend_from_slice(&code);
    k
}

/// A Multiboot kernel written for QEMU's `-kernel`: in 32-bit protected
/// mode with paging off it checks fw_cfg's signature, reads the CPU count
/// and the RAM size from it, prints `fw_cfg QEMU cpus=N ram=NM` on COM1 and
/// powers off through the ACPI PM1a control block.
fn fw_cfg_kernel() -> Vec<u8> {
    const BASE: u32 = 0x10_0000;
    let mut k = multiboot_aout_header(BASE);
    let code = asm(32, BASE as u64 + 32, |a| {
        let mut dec = a.create_label();
        let mut text = a.create_label();
        let mut read4 = a.create_label();
        let mut off = a.create_label();
        let mut no_fw_cfg = a.create_label();
        let say = |a: &mut CodeAssembler, t: &str| -> Result<(), IcedError> {
            for b in t.bytes() {
                a.mov(al, b as u32)?;
                a.out(dx, al)?;
            }
            Ok(())
        };
        a.mov(esp, 0x80000u32)?;
        // Item 0: the signature.
        a.xor(eax, eax)?;
        a.call(read4)?;
        a.cmp(eax, u32::from_le_bytes(*b"QEMU"))?;
        a.jne(no_fw_cfg)?;
        a.mov(edx, 0x3f8u32)?;
        say(a, "fw_cfg QEMU cpus=")?;
        // Item 5: the CPU count (16 bits).
        a.mov(eax, 5u32)?;
        a.call(read4)?;
        a.movzx(eax, ax)?;
        a.call(dec)?;
        a.mov(edx, 0x3f8u32)?;
        say(a, " ram=")?;
        // Item 3: the RAM size (64 bits), printed in MiB.
        a.mov(eax, 3u32)?;
        a.call(read4)?;
        a.mov(esi, eax)?;
        a.mov(edx, 0x511u32)?;
        a.in_(al, dx)?; // the high half's low byte (below 1 TiB: enough)
        a.movzx(eax, al)?;
        a.shl(eax, 12)?;
        a.shr(esi, 20)?;
        a.or(eax, esi)?;
        a.call(dec)?;
        a.mov(edx, 0x3f8u32)?;
        say(a, "M\n")?;
        a.set_label(&mut off)?;
        a.mov(edx, 0x604u32)?;
        a.mov(eax, 0x2000u32)?;
        a.out(dx, ax)?;
        a.hlt()?;
        a.set_label(&mut no_fw_cfg)?;
        a.mov(edx, 0x3f8u32)?;
        say(a, "no fw_cfg\n")?;
        a.jmp(off)?;
        // read4: selects item AX, reads 4 bytes into EAX (little-endian).
        a.set_label(&mut read4)?;
        a.mov(edx, 0x510u32)?;
        a.out(dx, ax)?;
        a.inc(edx)?;
        a.mov(ecx, 4u32)?;
        let mut more = a.create_label();
        a.set_label(&mut more)?;
        a.in_(al, dx)?;
        a.ror(eax, 8)?;
        a.dec(ecx)?;
        a.jnz(more)?;
        a.ret()?;
        // dec: prints EAX in decimal.
        a.set_label(&mut dec)?;
        a.mov(ecx, 10u32)?;
        a.xor(ebx, ebx)?;
        let mut div = a.create_label();
        a.set_label(&mut div)?;
        a.xor(edx, edx)?;
        a.div(ecx)?;
        a.add(edx, 0x30)?;
        a.push(edx)?;
        a.inc(ebx)?;
        a.test(eax, eax)?;
        a.jnz(div)?;
        a.mov(edx, 0x3f8u32)?;
        a.set_label(&mut text)?;
        a.pop(eax)?;
        a.out(dx, al)?;
        a.dec(ebx)?;
        a.jnz(text)?;
        a.ret()
    });
    k.extend_from_slice(&code);
    k
}

/// A Multiboot kernel that reads the CMOS RTC (ports 0x70/0x71) in its
/// default 24-hour BCD mode: it waits for UIP to clear and prints
/// `rtc CCYY-MM-DD hh:mm:ss wd=NN`; then sets the clock (SET, the
/// registers, SET cleared) to 2099-12-31 23:59:59, waits for the
/// update-ended flag in register C and prints the time again (`set ...`),
/// prints the RAM above 16 MiB from NVRAM bytes 0x35:0x34 (`mem NNNN`) and
/// powers off. A wait that never ends prints `stuck`.
fn rtc_kernel() -> Vec<u8> {
    const BASE: u32 = 0x10_0000;
    let mut k = multiboot_aout_header(BASE);
    let code = asm(32, BASE as u64 + 32, |a| {
        let mut rd = a.create_label();
        let mut wr = a.create_label();
        let mut hex2 = a.create_label();
        let mut nib = a.create_label();
        let mut time = a.create_label();
        let mut ready = a.create_label();
        let mut stuck = a.create_label();
        let mut off = a.create_label();
        let say = |a: &mut CodeAssembler, t: &str| -> Result<(), IcedError> {
            a.mov(edx, 0x3f8u32)?;
            for b in t.bytes() {
                a.mov(al, b as u32)?;
                a.out(dx, al)?;
            }
            Ok(())
        };
        // Prints register `r` as two hex digits (BCD reads as decimal).
        let reg = |a: &mut CodeAssembler, r: u32| -> Result<(), IcedError> {
            a.mov(al, r)?;
            a.call(rd)?;
            a.call(hex2)
        };
        a.mov(esp, 0x80000u32)?;
        // UIP (register A, bit 7) clears within 244 us.
        a.mov(ecx, 10_000_000u32)?;
        let mut uip = a.create_label();
        a.set_label(&mut uip)?;
        a.mov(al, 0x0au32)?;
        a.call(rd)?;
        a.test(al, 0x80u32)?;
        a.jz(ready)?;
        a.dec(ecx)?;
        a.jnz(uip)?;
        a.jmp(stuck)?;
        a.set_label(&mut ready)?;
        say(a, "rtc ")?;
        a.call(time)?;
        // Set 2099-12-31 23:59:59 (a Thursday) under SET.
        for (r, v) in [
            (0x0b, 0x82),
            (0x00, 0x59),
            (0x02, 0x59),
            (0x04, 0x23),
            (0x06, 0x05),
            (0x07, 0x31),
            (0x08, 0x12),
            (0x09, 0x99),
            (0x32, 0x20),
            (0x0b, 0x02),
        ] {
            a.mov(al, r as u32)?;
            a.mov(ah, v as u32)?;
            a.call(wr)?;
        }
        // Clear register C, then wait for UF (bit 4): the next update.
        a.mov(al, 0x0cu32)?;
        a.call(rd)?;
        a.mov(ecx, 100_000_000u32)?;
        let mut uf = a.create_label();
        let mut updated = a.create_label();
        a.set_label(&mut uf)?;
        a.mov(al, 0x0cu32)?;
        a.call(rd)?;
        a.test(al, 0x10u32)?;
        a.jnz(updated)?;
        a.dec(ecx)?;
        a.jnz(uf)?;
        a.jmp(stuck)?;
        a.set_label(&mut updated)?;
        say(a, "set ")?;
        a.call(time)?;
        say(a, "mem ")?;
        reg(a, 0x35)?;
        reg(a, 0x34)?;
        say(a, "\n")?;
        a.set_label(&mut off)?;
        a.mov(edx, 0x604u32)?;
        a.mov(eax, 0x2000u32)?;
        a.out(dx, ax)?;
        a.hlt()?;
        a.set_label(&mut stuck)?;
        say(a, "stuck\n")?;
        a.jmp(off)?;
        // time: prints CCYY-MM-DD hh:mm:ss wd=NN and a newline.
        a.set_label(&mut time)?;
        reg(a, 0x32)?;
        reg(a, 0x09)?;
        say(a, "-")?;
        reg(a, 0x08)?;
        say(a, "-")?;
        reg(a, 0x07)?;
        say(a, " ")?;
        reg(a, 0x04)?;
        say(a, ":")?;
        reg(a, 0x02)?;
        say(a, ":")?;
        reg(a, 0x00)?;
        say(a, " wd=")?;
        reg(a, 0x06)?;
        say(a, "\n")?;
        a.ret()?;
        // rd: AL = CMOS byte AL.
        a.set_label(&mut rd)?;
        a.out(0x70, al)?;
        a.in_(al, 0x71)?;
        a.ret()?;
        // wr: CMOS byte AL = AH.
        a.set_label(&mut wr)?;
        a.out(0x70, al)?;
        a.mov(al, ah)?;
        a.out(0x71, al)?;
        a.ret()?;
        // hex2: prints AL as two hex digits.
        a.set_label(&mut hex2)?;
        a.mov(bl, al)?;
        a.mov(edx, 0x3f8u32)?;
        a.shr(al, 4)?;
        a.call(nib)?;
        a.mov(al, bl)?;
        a.and(al, 0xfu32)?;
        a.call(nib)?;
        a.ret()?;
        a.set_label(&mut nib)?;
        let mut digit = a.create_label();
        a.add(al, 0x30u32)?;
        a.cmp(al, 0x39u32)?;
        a.jbe(digit)?;
        a.add(al, 7u32)?;
        a.set_label(&mut digit)?;
        a.out(dx, al)?;
        a.ret()
    });
    k.extend_from_slice(&code);
    k
}

/// A Multiboot kernel that takes the CPU from the Multiboot entry state
/// (32-bit protected mode, paging off) through every protected-mode paging
/// mode into long mode, saying where it is on COM1:
/// - paging off: loads its own GDT and IDT (far jump, segment loads) and
///   takes `int 0x80` through a 32-bit interrupt gate (its handler returns
///   with IRETD); loads a 32-bit TSS, goes to ring 3 with IRETD, and comes
///   back with `int 0x81` through a DPL-3 gate, on the TSS's SS0:ESP0 (the
///   handler checks the user's CS and SS in the frame);
/// - 2-level paging (4 KiB pages, and 4 MiB ones with CR4.PSE), PAE paging
///   (2 MiB pages), then long mode: EFER.LME, CR0.PG (compatibility mode,
///   where EFER.LMA reads 1), and a far jump into its 64-bit code segment.
///
/// In each paging mode it reads linear 0xb00000, which its tables map to
/// physical 0x300000 where it left a magic number (with paging off that
/// address holds 0): the translation really is the guest's. It powers off
/// through the ACPI PM1a control block.
fn mode_tour_kernel() -> Vec<u8> {
    const BASE: u32 = 0x10_0000;
    const FLAGS: u32 = (1 << 16) | 2;
    const MAGIC: u32 = 0x1234_5678;
    const B: u32 = BASE + 0x200; // the code after the first far jump
    const USER: u32 = BASE + 0x3c0; // ring 3
    const B2: u32 = BASE + 0x400; // after the return from ring 3
    const HANDLER: u32 = BASE + 0xd00;
    const HANDLER81: u32 = BASE + 0xd80;
    const TSS: u32 = BASE + 0x1600;
    const CODE64: u32 = BASE + 0xe00;
    const GDT: u32 = BASE + 0x1000;
    const GDT_PTR: u32 = BASE + 0x1040;
    const IDT: u32 = BASE + 0x1100;
    const IDT_PTR: u32 = BASE + 0x1050;
    let header: [u32; 8] = [
        0x1bad_b002,
        FLAGS,
        0u32.wrapping_sub(0x1bad_b002u32.wrapping_add(FLAGS)),
        BASE,
        BASE,
        BASE + 0x2000,
        0,
        BASE + 32,
    ];
    let say = |a: &mut CodeAssembler, t: &str| -> Result<(), IcedError> {
        a.mov(edx, 0x3f8u32)?;
        for b in t.bytes() {
            a.mov(al, b as u32)?;
            a.out(dx, al)?;
        }
        Ok(())
    };
    let far_jmp = |a: &mut CodeAssembler, sel: u16, off: u32| -> Result<(), IcedError> {
        a.db(&[0xea])?;
        a.db(&off.to_le_bytes())?;
        a.db(&sel.to_le_bytes())
    };
    let off = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(edx, 0x604u32)?;
        a.mov(eax, 0x2000u32)?;
        a.out(dx, ax)?;
        a.hlt()
    };
    let paging = |a: &mut CodeAssembler, on: bool| -> Result<(), IcedError> {
        a.mov(eax, cr0)?;
        if on {
            a.or(eax, 0x8000_0000u32 as i32)?;
        } else {
            a.and(eax, 0x7fff_ffff)?;
        }
        a.mov(cr0, eax)
    };
    let entry = asm(32, (BASE + 32) as u64, |a| {
        a.mov(esp, 0x80000u32)?;
        a.mov(dword_ptr(0x30_0000), MAGIC)?;
        say(a, "protected\n")?;
        a.lgdt(ptr(GDT_PTR))?;
        far_jmp(a, 0x08, B)
    });
    let body = asm(32, B as u64, |a| {
        a.mov(eax, 0x10u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.lidt(ptr(IDT_PTR))?;
        a.int(0x80)?;
        // Ring 3: the TSS (SS0:ESP0 = 0x10:0x70000), then IRETD to user
        // code and stack.
        a.mov(eax, 0x30u32)?;
        a.ltr(ax)?;
        a.push(0x2bu32)?;
        a.push(0x6_0000u32)?;
        a.pushfd()?;
        a.push(0x23u32)?;
        a.push(USER)?;
        a.iretd()
    });
    let user = asm(32, USER as u64, |a| {
        a.int(0x81)?;
        a.ud2()
    });
    let body2 = asm(32, B2 as u64, |a| {
        let mut bad = a.create_label();
        let mut fill = a.create_label();
        // 2-level paging: the first 4 MiB in 4 KiB pages, 4-8 MiB as a
        // 4 MiB page, and 8-12 MiB as a 4 MiB page at physical 0.
        a.mov(edi, 0x11_1000u32)?;
        a.mov(eax, 3u32)?;
        a.mov(ecx, 1024u32)?;
        a.set_label(&mut fill)?;
        a.mov(dword_ptr(edi), eax)?;
        a.add(eax, 0x1000)?;
        a.add(edi, 4)?;
        a.dec(ecx)?;
        a.jnz(fill)?;
        a.mov(dword_ptr(0x11_0000), 0x11_1003u32)?;
        a.mov(dword_ptr(0x11_0004), 0x40_0083u32)?;
        a.mov(dword_ptr(0x11_0008), 0x83u32)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x10)?;
        a.mov(cr4, eax)?;
        a.mov(eax, 0x11_0000u32)?;
        a.mov(cr3, eax)?;
        paging(a, true)?;
        a.mov(eax, dword_ptr(0xb0_0000))?;
        a.cmp(eax, MAGIC as i32)?;
        a.jne(bad)?;
        say(a, "paging32 alias ok\n")?;
        a.int(0x80)?;
        paging(a, false)?;
        // PAE: 0-8 MiB in 2 MiB pages, 10-12 MiB at physical 2 MiB.
        a.mov(dword_ptr(0x11_2000), 0x11_3001u32)?;
        for i in 0..4u32 {
            a.mov(dword_ptr(0x11_3000 + 8 * i), (i << 21) | 0x83)?;
        }
        a.mov(dword_ptr(0x11_3028), 0x20_0083u32)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, 0x11_2000u32)?;
        a.mov(cr3, eax)?;
        paging(a, true)?;
        a.mov(eax, dword_ptr(0xb0_0000))?;
        a.cmp(eax, MAGIC as i32)?;
        a.jne(bad)?;
        say(a, "pae alias ok\n")?;
        a.int(0x80)?;
        paging(a, false)?;
        // Long mode, on the PAE page directory.
        a.mov(dword_ptr(0x11_4000), 0x11_5003u32)?;
        a.mov(dword_ptr(0x11_5000), 0x11_3003u32)?;
        a.mov(eax, 0x11_4000u32)?;
        a.mov(cr3, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 0x100)?;
        a.wrmsr()?;
        paging(a, true)?;
        a.rdmsr()?;
        a.test(eax, 0x400)?;
        a.jz(bad)?;
        say(a, "lma\n")?;
        far_jmp(a, 0x18, CODE64)?;
        a.set_label(&mut bad)?;
        say(a, "bad\n")?;
        off(a)
    });
    // From ring 3: checks the frame on the TSS's stack (EIP, CS, EFLAGS,
    // ESP, SS), then goes on in the kernel on its own stack.
    let handler81 = asm(32, HANDLER81 as u64, |a| {
        let mut bad = a.create_label();
        a.cmp(esp, 0x7_0000 - 20)?;
        a.jne(bad)?;
        a.cmp(dword_ptr(esp + 4), 0x23)?;
        a.jne(bad)?;
        a.cmp(dword_ptr(esp + 16), 0x2b)?;
        a.jne(bad)?;
        a.mov(eax, 0x10u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(esp, 0x80000u32)?;
        say(a, "user int\n")?;
        a.mov(eax, B2)?;
        a.jmp(eax)?;
        a.set_label(&mut bad)?;
        say(a, "bad\n")?;
        a.hlt()
    });
    let handler = asm(32, HANDLER as u64, |a| {
        a.push(eax)?;
        a.push(edx)?;
        say(a, "int\n")?;
        a.pop(edx)?;
        a.pop(eax)?;
        a.iretd()
    });
    let code64 = asm(64, CODE64 as u64, |a| {
        let mut bad = a.create_label();
        a.mov(eax, dword_ptr(0xb0_0000))?;
        a.cmp(eax, MAGIC as i32)?;
        a.jne(bad)?;
        say(a, "long alias ok\n")?;
        off(a)?;
        a.set_label(&mut bad)?;
        say(a, "bad\n")?;
        off(a)
    });
    let mut k = vec![0u8; 0x2000];
    let mut put = |at: u32, bytes: &[u8], room: u32| {
        assert!(
            bytes.len() as u32 <= room,
            "{} bytes at {at:#x}",
            bytes.len()
        );
        let o = (at - BASE) as usize;
        k[o..o + bytes.len()].copy_from_slice(bytes);
    };
    let head: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    put(BASE, &head, 32);
    put(BASE + 32, &entry, B - BASE - 32);
    put(B, &body, USER - B);
    put(USER, &user, B2 - USER);
    put(B2, &body2, HANDLER - B2);
    put(HANDLER, &handler, HANDLER81 - HANDLER);
    put(HANDLER81, &handler81, CODE64 - HANDLER81);
    put(CODE64, &code64, GDT - CODE64);
    // Null, 32-bit code (0x08), data (0x10), 64-bit code (0x18): DPL 0;
    // user code (0x20) and data (0x28): DPL 3; the 32-bit TSS (0x30).
    let tss_desc =
        0x67u64 | ((TSS as u64 & 0xff_ffff) << 16) | (0x89u64 << 40) | ((TSS as u64 >> 24) << 56);
    let gdt: Vec<u8> = [
        0u64,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_9a00_0000_ffff,
        0x00cf_fa00_0000_ffff,
        0x00cf_f200_0000_ffff,
        tss_desc,
    ]
    .iter()
    .flat_map(|d| d.to_le_bytes())
    .collect();
    put(GDT, &gdt, 0x40);
    let mut gp = 55u16.to_le_bytes().to_vec();
    gp.extend_from_slice(&GDT.to_le_bytes());
    put(GDT_PTR, &gp, 0x10);
    let mut ip = (0x81u16 * 8 + 7).to_le_bytes().to_vec();
    ip.extend_from_slice(&IDT.to_le_bytes());
    put(IDT_PTR, &ip, 0x10);
    // Vector 0x80: a 32-bit interrupt gate, DPL 0, to the handler.
    let gate = (HANDLER as u64 & 0xffff)
        | (0x08 << 16)
        | (0x8e00u64 << 32)
        | ((HANDLER as u64 >> 16) << 48);
    put(IDT + 0x80 * 8, &gate.to_le_bytes(), 8);
    // Vector 0x81: a 32-bit interrupt gate user mode may use (DPL 3).
    let gate = (HANDLER81 as u64 & 0xffff)
        | (0x08 << 16)
        | (0xee00u64 << 32)
        | ((HANDLER81 as u64 >> 16) << 48);
    put(IDT + 0x81 * 8, &gate.to_le_bytes(), 8);
    // The TSS: ESP0 and SS0.
    put(TSS + 4, &0x7_0000u32.to_le_bytes(), 4);
    put(TSS + 8, &0x10u32.to_le_bytes(), 4);
    k
}

/// A Multiboot kernel that tries mode changes the architecture refuses, in
/// legacy protected mode, each of which must raise #GP (SDM vol. 3 4.1.1,
/// 4.4.1, 9.8.5): CR0.PG with EFER.LME but without CR4.PAE; WRMSR changing
/// EFER.LME with paging on; MOV to CR3 with PAE paging and a PDPTE with a
/// reserved bit set; CR0.NW without CD. Its #GP handler (a 32-bit gate)
/// prints `#GP` and steps over the instruction (its length in ECX).
fn refused_transitions_kernel() -> Vec<u8> {
    const BASE: u32 = 0x10_0000;
    const FLAGS: u32 = (1 << 16) | 2;
    const HANDLER: u32 = BASE + 0x800;
    const IDT: u32 = BASE + 0x1000;
    const IDT_PTR: u32 = BASE + 0x1100;
    let header: [u32; 8] = [
        0x1bad_b002,
        FLAGS,
        0u32.wrapping_sub(0x1bad_b002u32.wrapping_add(FLAGS)),
        BASE,
        BASE,
        BASE + 0x1200,
        0,
        BASE + 32,
    ];
    let say = |a: &mut CodeAssembler, t: &str| -> Result<(), IcedError> {
        a.mov(edx, 0x3f8u32)?;
        for b in t.bytes() {
            a.mov(al, b as u32)?;
            a.out(dx, al)?;
        }
        Ok(())
    };
    let code = asm(32, (BASE + 32) as u64, |a| {
        a.mov(esp, 0x80000u32)?;
        a.lidt(ptr(IDT_PTR))?;
        // 1: paging with LME but no PAE.
        say(a, "pg with lme, no pae: ")?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 0x100)?;
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(ecx, 3u32)?;
        a.mov(cr0, eax)?;
        say(a, "no fault\n")?;
        // 2: LME cleared with 32-bit paging on (LME set again first while
        // paging is off).
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.and(eax, !0x100)?;
        a.wrmsr()?;
        a.mov(dword_ptr(0x11_0000), 0x83u32)?; // 4 MiB page at 0
        a.mov(eax, cr4)?;
        a.or(eax, 0x10)?;
        a.mov(cr4, eax)?;
        a.mov(eax, 0x11_0000u32)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(cr0, eax)?;
        say(a, "lme set with paging on: ")?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 0x100)?;
        a.mov(ecx, 2u32)?;
        a.wrmsr()?;
        say(a, "no fault\n")?;
        a.mov(eax, cr0)?;
        a.and(eax, 0x7fff_ffff)?;
        a.mov(cr0, eax)?;
        // 3: PAE paging, then a CR3 whose PDPT has a reserved bit.
        a.mov(dword_ptr(0x11_2000), 0x11_3001u32)?;
        a.mov(dword_ptr(0x11_3000), 0x83u32)?;
        a.mov(dword_ptr(0x11_4000), 0x11_3001u32 | 0x80)?; // bit 7: reserved
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, 0x11_2000u32)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(cr0, eax)?;
        say(a, "pdpte with a reserved bit: ")?;
        a.mov(eax, 0x11_4000u32)?;
        a.mov(ecx, 3u32)?;
        a.mov(cr3, eax)?;
        say(a, "no fault\n")?;
        // 4: NW without CD.
        say(a, "nw without cd: ")?;
        a.mov(eax, cr0)?;
        a.and(eax, !0x4000_0000)?;
        a.or(eax, 0x2000_0000)?;
        a.mov(ecx, 3u32)?;
        a.mov(cr0, eax)?;
        say(a, "no fault\n")?;
        say(a, "paging still on: ")?;
        a.mov(eax, cr0)?;
        a.shr(eax, 31)?;
        a.add(eax, 0x30)?;
        a.mov(edx, 0x3f8u32)?;
        a.out(dx, al)?;
        a.mov(al, 0x0au32)?;
        a.out(dx, al)?;
        a.mov(edx, 0x604u32)?;
        a.mov(eax, 0x2000u32)?;
        a.out(dx, ax)?;
        a.hlt()
    });
    let handler = asm(32, HANDLER as u64, |a| {
        say(a, "#GP\n")?;
        a.add(esp, 4)?; // the error code
        a.add(dword_ptr(esp), ecx)?;
        a.iretd()
    });
    let mut k = vec![0u8; 0x1200];
    let head: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    k[..32].copy_from_slice(&head);
    assert!(code.len() <= 0x800 - 32);
    k[32..32 + code.len()].copy_from_slice(&code);
    let h = (HANDLER - BASE) as usize;
    k[h..h + handler.len()].copy_from_slice(&handler);
    // Vector 13: a 32-bit interrupt gate to the boot GDT's 32-bit code
    // segment (0x08).
    let gate = (HANDLER as u64 & 0xffff)
        | (0x08 << 16)
        | (0x8e00u64 << 32)
        | ((HANDLER as u64 >> 16) << 48);
    let g = (IDT - BASE) as usize + 13 * 8;
    k[g..g + 8].copy_from_slice(&gate.to_le_bytes());
    let i = (IDT_PTR - BASE) as usize;
    k[i..i + 2].copy_from_slice(&(14u16 * 8 - 1).to_le_bytes());
    k[i + 2..i + 6].copy_from_slice(&IDT.to_le_bytes());
    k
}

/// The transitions the architecture refuses fault alike on every engine
/// that starts a Multiboot kernel: `trap` checks them in its emulation of
/// MOV to CR0/CR3 and WRMSR to EFER.
#[test]
fn refused_mode_transitions_fault_alike() {
    let (_d, p) = tmp("refused.bin", &refused_transitions_kernel());
    let want = "pg with lme, no pae: #GP\nno fault\nlme set with paging on: #GP\nno fault\n\
                pdpte with a reserved bit: #GP\nno fault\nnw without cd: #GP\nno fault\n\
                paging still on: 1\n";
    for engine in ["emu", "trap", "vmx", "bt"] {
        let o = visor(&[
            "run",
            s(&p),
            "--engine",
            engine,
            "--mem",
            "64M",
            "--timeout",
            "20",
        ]);
        assert_eq!(stdout(&o), want, "{engine}: {}", stderr(&o));
        assert_eq!(o.status.code(), Some(0), "{engine}: {}", stderr(&o));
    }
}

/// The mode tour gives the same transcript on every engine that starts a
/// Multiboot kernel: `trap` follows the guest deprivileged from its
/// identity shadow through 2-level, PAE and 4-level shadowing, running its
/// legacy-mode code in compatibility mode. (Not `kvm` on this project's
/// PVM host, which runs 32-bit code by instruction emulation and stops at
/// the `int 0x80`: "KVM internal error 1 (instruction emulation failed)".)
#[test]
fn multiboot_mode_tour_on_every_engine() {
    let (_d, p) = tmp("tour.bin", &mode_tour_kernel());
    let want =
        "protected\nint\nuser int\npaging32 alias ok\nint\npae alias ok\nint\nlma\nlong alias ok\n";
    for engine in ["emu", "trap", "vmx", "bt"] {
        let o = visor(&[
            "run",
            s(&p),
            "--engine",
            engine,
            "--mem",
            "64M",
            "--timeout",
            "20",
        ]);
        assert_eq!(stdout(&o), want, "{engine}: {}", stderr(&o));
        assert_eq!(o.status.code(), Some(0), "{engine}: {}", stderr(&o));
    }
    // Under `trap` the transitions trapped and were emulated, and the
    // interrupt was reflected through the 32-bit gate.
    let (o, v) = stats_json(&["run", s(&p), "--engine", "trap", "--mem", "64M"]);
    assert_eq!(stdout(&o), want, "{}", stderr(&o));
    let traps = &v["traps"];
    for (t, n) in [
        ("lgdt", 1),
        ("lidt", 1),
        ("ltr", 1),
        ("jmp far", 2),
        ("mov to sreg", 5),
        ("mov to cr0", 5),
        ("mov to cr3", 3),
        ("mov to cr4", 2),
        ("wrmsr", 1),
        ("iretd", 3),
    ] {
        assert_eq!(traps[t].as_u64(), Some(n), "{t}: {traps}");
    }
    assert_eq!(v["reflected"]["soft_ints"].as_u64(), Some(4));
    assert_eq!(v["shadow"]["reflected_page_faults"].as_u64(), Some(0));
    assert!(
        v["shadow"]["fills"].as_u64().unwrap() >= 8,
        "{}",
        v["shadow"]
    );
}

/// A 64-bit kernel (visor's boot protocol) that takes device interrupts
/// through the I/O APIC as the MADT describes the machine: the PICs
/// masked, the PIT's IRQ 0 on pin 2 (the interrupt source override) to
/// vector 0x30, COM1's IRQ 4 on pin 4 to vector 0x34 (its transmitter-empty
/// interrupt). It waits with HLT for three timer interrupts and one serial
/// one, says so, and powers off. A PIT interrupt routed to any other pin
/// (pin 0, KVM's default routing of GSI 0) never comes: the run times out.
fn ioapic_routing_kernel() -> Vec<u8> {
    const BASE: u64 = 0x20_0000;
    const PIT_HANDLER: u64 = BASE + 0x800;
    const COM_HANDLER: u64 = BASE + 0x900;
    const IDT: u64 = BASE + 0x1000;
    const IDT_PTR: u64 = BASE + 0x2000;
    const PIT_COUNT: u64 = BASE + 0x2100;
    const COM_COUNT: u64 = BASE + 0x2108;
    const IOREGSEL: u64 = 0xfec0_0000;
    const IOWIN: u64 = 0xfec0_0010;
    const EOI: u64 = 0xfee0_00b0;
    let say = |a: &mut CodeAssembler, t: &str| -> Result<(), IcedError> {
        a.mov(edx, 0x3f8u32)?;
        for b in t.bytes() {
            a.mov(al, b as u32)?;
            a.out(dx, al)?;
        }
        Ok(())
    };
    let redir = |a: &mut CodeAssembler, pin: u32, low: u32| -> Result<(), IcedError> {
        a.mov(rdi, IOREGSEL)?;
        a.mov(dword_ptr(rdi), 0x10 + 2 * pin)?;
        a.mov(rdi, IOWIN)?;
        a.mov(dword_ptr(rdi), low)?;
        a.mov(rdi, IOREGSEL)?;
        a.mov(dword_ptr(rdi), 0x11 + 2 * pin)?;
        a.mov(rdi, IOWIN)?;
        a.mov(dword_ptr(rdi), 0)
    };
    let main = asm(64, BASE, |a| {
        let mut wait_pit = a.create_label();
        let mut wait_com = a.create_label();
        a.cli()?;
        a.mov(al, 0xffu32)?;
        a.out(0x21, al)?;
        a.out(0xa1, al)?;
        a.mov(rax, IDT_PTR)?;
        a.lidt(ptr(rax))?;
        // The local APIC on (spurious vector 0xff).
        a.mov(rdi, 0xfee0_00f0u64)?;
        a.mov(dword_ptr(rdi), 0x1ff)?;
        // Pin 2: vector 0x30; pin 4: vector 0x34 (fixed, physical
        // destination APIC 0, edge, unmasked).
        redir(a, 2, 0x30)?;
        redir(a, 4, 0x34)?;
        // The PIT: channel 0, rate generator, 100 Hz.
        a.mov(al, 0x34u32)?;
        a.out(0x43, al)?;
        a.mov(al, 0x9cu32)?;
        a.out(0x40, al)?;
        a.mov(al, 0x2eu32)?;
        a.out(0x40, al)?;
        a.mov(rbx, PIT_COUNT)?;
        a.sti()?;
        a.set_label(&mut wait_pit)?;
        a.hlt()?;
        a.cmp(qword_ptr(rbx), 3)?;
        a.jb(wait_pit)?;
        a.cli()?;
        redir(a, 2, 0x1_0030)?;
        say(a, "pit on ioapic pin 2\n")?;
        // COM1: the transmitter-empty interrupt, then one more byte.
        a.mov(edx, 0x3f9u32)?;
        a.mov(al, 2u32)?;
        a.out(dx, al)?;
        a.mov(rbx, COM_COUNT)?;
        say(a, "com1 ")?;
        a.sti()?;
        a.set_label(&mut wait_com)?;
        a.hlt()?;
        a.cmp(qword_ptr(rbx), 1)?;
        a.jb(wait_com)?;
        a.cli()?;
        a.mov(edx, 0x3f9u32)?;
        a.xor(eax, eax)?;
        a.out(dx, al)?;
        say(a, "on ioapic pin 4\n")?;
        a.mov(edx, 0x604u32)?;
        a.mov(eax, 0x2000u32)?;
        a.out(dx, ax)?;
        a.hlt()
    });
    let pit = asm(64, PIT_HANDLER, |a| {
        a.push(rax)?;
        a.mov(rax, PIT_COUNT)?;
        a.inc(qword_ptr(rax))?;
        a.mov(rax, EOI)?;
        a.mov(dword_ptr(rax), 0)?;
        a.pop(rax)?;
        a.iretq()
    });
    let com = asm(64, COM_HANDLER, |a| {
        a.push(rax)?;
        a.push(rdx)?;
        a.mov(edx, 0x3fau32)?;
        a.in_(al, dx)?; // IIR: acknowledges the transmitter-empty interrupt
        a.mov(rax, COM_COUNT)?;
        a.inc(qword_ptr(rax))?;
        a.mov(rax, EOI)?;
        a.mov(dword_ptr(rax), 0)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.iretq()
    });
    let mut k = vec![0u8; 0x2200];
    let mut put = |at: u64, bytes: &[u8], room: u64| {
        assert!(
            bytes.len() as u64 <= room,
            "{} bytes at {at:#x}",
            bytes.len()
        );
        let o = (at - BASE) as usize;
        k[o..o + bytes.len()].copy_from_slice(bytes);
    };
    put(BASE, &main, PIT_HANDLER - BASE);
    put(PIT_HANDLER, &pit, COM_HANDLER - PIT_HANDLER);
    put(COM_HANDLER, &com, IDT - COM_HANDLER);
    // 64-bit interrupt gates to the boot GDT's 64-bit code segment (0x10).
    for (v, h) in [(0x30u64, PIT_HANDLER), (0x34, COM_HANDLER)] {
        let lo = (h & 0xffff) | (0x10 << 16) | (0x8e00 << 32) | (((h >> 16) & 0xffff) << 48);
        let hi = h >> 32;
        put(IDT + v * 16, &lo.to_le_bytes(), 8);
        put(IDT + v * 16 + 8, &hi.to_le_bytes(), 8);
    }
    let mut idtr = (256u16 * 16 - 1).to_le_bytes().to_vec();
    idtr.extend_from_slice(&IDT.to_le_bytes());
    put(IDT_PTR, &idtr, 0x10);
    elf64_image(BASE, &k)
}

/// The PIT's and COM1's interrupts reach the guest through the I/O APIC
/// pins the MADT names, on every engine with an I/O APIC: `kvm` through
/// KVM's in-kernel PIT and IOAPIC with the GSI routing visor installs (GSI
/// 0 to pin 2, as QEMU's) and COM1's irqfd on GSI 4; `emu`, `vmx` and `bt`
/// through softplat's.
#[test]
fn device_interrupts_through_the_ioapic() {
    let (_d, p) = tmp("ioapic.elf", &ioapic_routing_kernel());
    let want = "pit on ioapic pin 2\ncom1 on ioapic pin 4\n";
    for engine in ["kvm", "emu", "vmx", "bt", "trap"] {
        if engine == "kvm" && !kvm_here() {
            continue;
        }
        let o = visor(&["run", s(&p), "--engine", engine, "--timeout", "20"]);
        assert_eq!(stdout(&o), want, "{engine}: {}", stderr(&o));
        assert_eq!(o.status.code(), Some(0), "{engine}: {}", stderr(&o));
    }
}

/// A 64-bit kernel that listens to the ACPI power button as an ACPI OS
/// does: the SCI (ISA IRQ 9) on I/O APIC pin 9, level-triggered, active
/// high as the MADT's override says, to vector 0x39; PWRBTN_EN set in
/// PM1_EN. It prints `ready`, waits with HLT; its SCI handler reads PM1_STS,
/// clears PWRBTN_STS (write 1) and sends the EOI. Then it prints the status
/// it saw and the one after clearing, and powers off through S5.
fn power_button_kernel() -> Vec<u8> {
    const BASE: u64 = 0x20_0000;
    const SCI_HANDLER: u64 = BASE + 0x800;
    const IDT: u64 = BASE + 0x1000;
    const IDT_PTR: u64 = BASE + 0x2000;
    const SEEN: u64 = BASE + 0x2100;
    const COUNT: u64 = BASE + 0x2108;
    let say = |a: &mut CodeAssembler, t: &str| -> Result<(), IcedError> {
        a.mov(edx, 0x3f8u32)?;
        for b in t.bytes() {
            a.mov(al, b as u32)?;
            a.out(dx, al)?;
        }
        Ok(())
    };
    // Prints AX as 4 hex digits and a newline.
    let hex16 = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(ebx, eax)?;
        a.mov(ecx, 4u32)?;
        a.mov(edx, 0x3f8u32)?;
        let mut dig = a.create_label();
        let mut num = a.create_label();
        a.set_label(&mut dig)?;
        a.rol(bx, 4)?;
        a.mov(eax, ebx)?;
        a.and(eax, 0xf)?;
        a.add(eax, 0x30)?;
        a.cmp(eax, 0x39)?;
        a.jbe(num)?;
        a.add(eax, 0x27)?;
        a.set_label(&mut num)?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(dig)?;
        a.mov(al, 0x0au32)?;
        a.out(dx, al)
    };
    let main = asm(64, BASE, |a| {
        let mut wait = a.create_label();
        a.cli()?;
        a.mov(al, 0xffu32)?;
        a.out(0x21, al)?;
        a.out(0xa1, al)?;
        a.mov(rax, IDT_PTR)?;
        a.lidt(ptr(rax))?;
        a.mov(rdi, 0xfee0_00f0u64)?;
        a.mov(dword_ptr(rdi), 0x1ff)?;
        // Pin 9: vector 0x39, level-triggered (bit 15), active high.
        a.mov(rdi, 0xfec0_0000u64)?;
        a.mov(dword_ptr(rdi), 0x10 + 2 * 9)?;
        a.mov(rdi, 0xfec0_0010u64)?;
        a.mov(dword_ptr(rdi), 0x8039)?;
        // PM1_EN: PWRBTN_EN.
        a.mov(edx, 0x602u32)?;
        a.mov(eax, 0x100u32)?;
        a.out(dx, ax)?;
        say(a, "ready\n")?;
        a.mov(rbx, COUNT)?;
        a.sti()?;
        a.set_label(&mut wait)?;
        a.hlt()?;
        a.cmp(qword_ptr(rbx), 1)?;
        a.jb(wait)?;
        a.cli()?;
        say(a, "sci: pm1_sts=")?;
        a.mov(rax, SEEN)?;
        a.movzx(eax, word_ptr(rax))?;
        hex16(a)?;
        say(a, "after clearing: pm1_sts=")?;
        a.mov(edx, 0x600u32)?;
        a.in_(ax, dx)?;
        hex16(a)?;
        a.mov(edx, 0x604u32)?;
        a.mov(eax, 0x2000u32)?;
        a.out(dx, ax)?;
        a.hlt()
    });
    let handler = asm(64, SCI_HANDLER, |a| {
        a.push(rax)?;
        a.push(rdx)?;
        a.mov(edx, 0x600u32)?;
        a.in_(ax, dx)?;
        a.mov(rdx, SEEN)?;
        a.mov(word_ptr(rdx), ax)?;
        a.mov(edx, 0x600u32)?;
        a.mov(eax, 0x100u32)?;
        a.out(dx, ax)?; // PWRBTN_STS: write 1 to clear
        a.mov(rax, COUNT)?;
        a.inc(qword_ptr(rax))?;
        a.mov(rax, 0xfee0_00b0u64)?;
        a.mov(dword_ptr(rax), 0)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.iretq()
    });
    let mut k = vec![0u8; 0x2200];
    k[..main.len()].copy_from_slice(&main);
    assert!(main.len() <= 0x800);
    k[0x800..0x800 + handler.len()].copy_from_slice(&handler);
    let h = SCI_HANDLER;
    let lo = (h & 0xffff) | (0x10 << 16) | (0x8e00 << 32) | (((h >> 16) & 0xffff) << 48);
    let at = (IDT - BASE + 0x39 * 16) as usize;
    k[at..at + 8].copy_from_slice(&lo.to_le_bytes());
    k[at + 8..at + 16].copy_from_slice(&(h >> 32).to_le_bytes());
    let at = (IDT_PTR - BASE) as usize;
    k[at..at + 2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    k[at + 2..at + 10].copy_from_slice(&IDT.to_le_bytes());
    elf64_image(BASE, &k)
}

/// Runs `kernel` on `engine`, sends visor SIGTERM once the guest printed
/// `ready`, and returns the output.
fn sigterm_when_ready(kernel: &Path, engine: &str) -> Output {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_visor"))
        .args(["run", s(kernel), "--engine", engine, "--timeout", "20"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "ready\n", "{engine}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut out, &mut rest).unwrap();
    let mut o = child.wait_with_output().unwrap();
    o.stdout = rest;
    o
}

/// SIGTERM presses the ACPI power button: the guest that enabled the event
/// takes the SCI through I/O APIC pin 9 (level), sees PWRBTN_STS, clears it
/// and powers off (status 0), on every engine with an I/O APIC. A guest
/// that did not enable the event is stopped (status 143).
#[test]
fn sigterm_presses_the_power_button() {
    let (_d, p) = tmp("pwrbtn.elf", &power_button_kernel());
    for engine in ["kvm", "emu", "vmx", "bt", "trap"] {
        if engine == "kvm" && !kvm_here() {
            continue;
        }
        let o = sigterm_when_ready(&p, engine);
        assert_eq!(
            stdout(&o),
            "sci: pm1_sts=0100\nafter clearing: pm1_sts=0000\n",
            "{engine}: {}",
            stderr(&o)
        );
        assert_eq!(o.status.code(), Some(0), "{engine}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("visor: SIGTERM: pressed the ACPI power button"),
            "{}",
            stderr(&o)
        );
    }
    // A kernel that never enables the event: SIGTERM stops it.
    let code = asm(64, 0x20_0000, |a| {
        let mut l = a.create_label();
        a.mov(edx, 0x3f8u32)?;
        for b in b"ready\n" {
            a.mov(al, *b as u32)?;
            a.out(dx, al)?;
        }
        a.set_label(&mut l)?;
        a.pause()?;
        a.jmp(l)
    });
    let (_d2, spin) = tmp("spin.elf", &elf64_image(0x20_0000, &code));
    let o = sigterm_when_ready(&spin, "emu");
    assert_eq!(
        o.status.code(),
        Some(visor::exit_status::TERMINATED),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("has not enabled the ACPI power button event"),
        "{}",
        stderr(&o)
    );
}

/// The engines that start Multiboot kernels, here.
fn multiboot_engines() -> Vec<&'static str> {
    ["kvm", "emu", "bt", "vmx"]
        .into_iter()
        .filter(|&e| e != "kvm" || kvm_here())
        .collect()
}

/// `visor run KERNEL --engine ENGINE --mem 64M --timeout 20` and `extra`.
fn run_multiboot(kernel: &Path, engine: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        s(kernel),
        "--engine",
        engine,
        "--mem",
        "64M",
        "--timeout",
        "20",
    ];
    args.extend_from_slice(extra);
    visor(&args)
}

/// The fw_cfg kernel prints the same line on every engine that starts a
/// Multiboot kernel and powers off (status 0): `vmx` through "unrestricted
/// guest", `trap` deprivileged on the identity shadow of paging off. `pv`,
/// whose kernels start in long mode, says so and names the engines that can
/// run it.
#[test]
fn multiboot_fw_cfg_on_every_engine() {
    let (_d, p) = tmp("fwcfg.bin", &fw_cfg_kernel());
    for engine in ["kvm", "emu", "bt", "vmx", "trap"] {
        if engine == "kvm" && !kvm_here() {
            continue;
        }
        let o = visor(&[
            "run",
            s(&p),
            "--engine",
            engine,
            "--mem",
            "64M",
            "--timeout",
            "20",
        ]);
        assert_eq!(
            stdout(&o),
            "fw_cfg QEMU cpus=1 ram=64M\n",
            "{engine}: {}",
            stderr(&o)
        );
        assert_eq!(o.status.code(), Some(0), "{engine}: {}", stderr(&o));
    }
    let o = visor(&["run", s(&p), "--engine", "pv", "--mem", "64M"]);
    assert_eq!(
        o.status.code(),
        Some(visor::exit_status::ERROR),
        "{}",
        stderr(&o)
    );
    let err = stderr(&o);
    assert!(
        err.contains("long mode") && err.contains("run it on engine kvm, emu, vmx, trap, bt"),
        "{err}"
    );
}

/// A Multiboot kernel loaded at 0x500 with its BSS up to 0x30000, over
/// the usual places of visor's boot GDT, Multiboot information and command
/// line: they move out of its way, and it boots and prints the same
/// information on every engine that starts Multiboot kernels.
#[test]
fn multiboot_below_1mib_on_every_engine() {
    let (_d, p) = tmp("low.bin", &multiboot_kernel_at(0x500, 0x3_0000));
    let (_d2, m) = tmp("module.bin", b"Zmodule");
    for engine in multiboot_engines() {
        let o = run_multiboot(&p, engine, &["--cmdline", "low=1", "--initrd", s(&m)]);
        assert_eq!(
            o.status.code(),
            Some((0x4d << 1) | 1),
            "{engine}: {}",
            stderr(&o)
        );
        let expected = format!(
            "2badb002 00000280 {:08x} 00000001 0000005a {} low=1\n",
            (64 << 10) - 1024,
            s(&p)
        );
        assert_eq!(stdout(&o), expected, "{engine}");
    }
}

/// A Multiboot kernel over what no kernel may use (the IVT and BIOS data
/// area, the EBDA/VGA/BIOS hole) gets one clear error and status 2.
#[test]
fn multiboot_over_forbidden_memory() {
    for (base, end, what) in [(0u32, 0x2000u32, "IVT"), (0x9_0000, 0xa_8000, "VGA memory")] {
        let (_d, p) = tmp("bad.bin", &multiboot_kernel_at(base, end));
        let o = visor(&["run", s(&p), "--engine", "emu"]);
        assert_error(&o, "overlaps");
        assert_error(&o, what);
        assert!(stdout(&o).is_empty());
    }
}

/// The RTC kernel on every engine that starts a Multiboot kernel: the
/// clock reads the host's UTC date and time (within a minute, its weekday
/// reckoned from the date), a time the guest sets runs on from there (the
/// update after 2099-12-31 23:59:59 is 2100-01-01 00:00:00, a Friday), and
/// NVRAM bytes 0x34-0x35 hold the RAM above 16 MiB in 64 KiB units (64 MiB:
/// 0x0300).
#[test]
fn multiboot_rtc_on_every_engine() {
    let (_d, p) = tmp("rtc.bin", &rtc_kernel());
    for engine in ["kvm", "emu", "bt", "vmx", "trap"] {
        if engine == "kvm" && !kvm_here() {
            continue;
        }
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let o = visor(&[
            "run",
            s(&p),
            "--engine",
            engine,
            "--mem",
            "64M",
            "--timeout",
            "20",
        ]);
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(o.status.code(), Some(0), "{engine}: {}", stderr(&o));
        let out = stdout(&o);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{engine}: {out}");
        let rtc = lines[0]
            .strip_prefix("rtc ")
            .unwrap_or_else(|| panic!("{engine}: {out}"));
        // CCYY-MM-DD hh:mm:ss wd=NN, each field decimal.
        let n = |at: usize, len: usize| -> i64 {
            rtc.get(at..at + len)
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("{engine}: field at {at} of {rtc:?}"))
        };
        let (y, mo, d) = (n(0, 4), n(5, 2), n(8, 2));
        let secs = n(11, 2) * 3600 + n(14, 2) * 60 + n(17, 2);
        let wd = n(23, 2);
        // The host's date and time in the same terms (civil from days).
        let civil = |t: i64| {
            let z = t.div_euclid(86_400) + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z.rem_euclid(146_097);
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let day = doy - (153 * mp + 2) / 5 + 1;
            let month = if mp < 10 { mp + 3 } else { mp - 9 };
            let year = yoe + era * 400 + i64::from(month <= 2);
            // Sunday is 1; 1970-01-01 was a Thursday.
            let weekday = (t.div_euclid(86_400) + 4).rem_euclid(7) + 1;
            (year, month, day, weekday)
        };
        let read = (y, mo, d, wd);
        let day = (before - 1..=after + 1)
            .find(|&t| civil(t) == read)
            .unwrap_or_else(|| panic!("{engine}: {rtc} is not the host's date"));
        let t = day.div_euclid(86_400) * 86_400 + secs;
        assert!(
            (before - 60..=after + 60).contains(&t),
            "{engine}: {rtc}: {t} against the host's {before}..{after}"
        );
        assert_eq!(lines[1], "set 2100-01-01 00:00:00 wd=06", "{engine}: {out}");
        assert_eq!(lines[2], "mem 0300", "{engine}: {out}");
    }
}

/// The Multiboot information a kernel finds, on every engine that starts
/// one.
#[test]
fn multiboot_info() {
    let (_d, p) = tmp("mb.bin", &multiboot_kernel());
    let (_d2, m) = tmp("module.bin", b"Zmodule");
    for engine in ["kvm", "emu", "trap", "vmx", "bt"] {
        if engine == "kvm" && !kvm_here() {
            continue;
        }
        let o = visor(&[
            "run",
            s(&p),
            "--engine",
            engine,
            "--mem",
            "64M",
            "--cmdline",
            "console=ttyS0 x=1",
            "--initrd",
            s(&m),
        ]);
        // flags = MEM|CMDLINE|MODS|MMAP|LOADER_NAME = 0x24d: status (0x4d << 1) | 1.
        assert_eq!(
            o.status.code(),
            Some((0x4d << 1) | 1),
            "{engine}: {}",
            stderr(&o)
        );
        let expected = format!(
            "2badb002 00000280 {:08x} 00000001 0000005a {} console=ttyS0 x=1\n",
            (64 << 10) - 1024,
            s(&p)
        );
        assert_eq!(stdout(&o), expected, "{engine}");
    }
}

/// FSIN, the software CPU's last unimplemented instruction (it ended the run
/// with status 10, `visor::exit_status::UNIMPLEMENTED`), runs on `emu`:
/// sin(1) compared with its value rounded to 64 bits (FCOMIP), the outcome
/// through the exit port.
#[test]
fn fsin_runs_on_emu() {
    let code = asm(64, 0x20_0000, |a| {
        let mut want = a.create_label();
        a.fninit()?;
        a.fld(tword_ptr(want))?;
        a.fld1()?;
        a.fsin()?;
        a.fcomip(st0, st1)?;
        a.mov(eax, 0x15)?;
        a.mov(ecx, 0x2a)?;
        a.cmove(eax, ecx)?;
        a.out(0xf4, al)?;
        a.hlt()?;
        a.set_label(&mut want)?;
        // sin(1) = 0x3ffe:d76aa47848677021 (rounded to nearest).
        a.db(&[0x21, 0x70, 0x67, 0x48, 0x78, 0xa4, 0x6a, 0xd7, 0xfe, 0x3f])
    });
    let (_d, p) = tmp("fsin.elf", &elf64_image(0x20_0000, &code));
    let o = visor(&["run", s(&p), "--engine", "emu"]);
    assert_eq!(o.status.code(), Some((0x2a << 1) | 1), "{}", stderr(&o));
}

/// The same demo OS, not told it is virtualized, runs on the software CPU at
/// its real privilege (`emu`) and deprivileged (`trap`) with the transcript
/// it has under `kvm`; under `trap` its privileged instructions trap, its
/// page tables are shadowed and its events are reflected.
#[test]
fn demo_os_on_emu_and_trap() {
    let short = ["--cmdline", "passes=2", "--no-pv"];
    let run = |engine: &str| {
        let mut a = vec!["run", "--engine", engine];
        a.extend_from_slice(&short);
        stats_json(&a)
    };
    let (emu, _) = run("emu");
    assert_eq!(emu.status.code(), Some(0), "{}", stderr(&emu));
    let (trap, v) = run("trap");
    assert_eq!(trap.status.code(), Some(0), "{}", stderr(&trap));
    let (e, t) = (stdout(&emu), stdout(&trap));
    demo_done(&t, "native");
    assert_eq!(transcript(&t), transcript(&e));
    if kvm_here() {
        let (kvm, _) = run("kvm");
        assert_eq!(transcript(&stdout(&kvm)), transcript(&t));
    }
    assert_eq!(v["engine"], "trap");
    for t in [
        "lgdt",
        "lidt",
        "ltr",
        "wrmsr",
        "mov to cr3",
        "invlpg",
        "sysretq",
        "out",
    ] {
        assert!(
            v["traps"][t].as_u64().unwrap_or(0) > 0,
            "{t}: {}",
            v["traps"]
        );
    }
    for k in ["interrupts", "syscalls", "soft_ints"] {
        assert!(v["reflected"][k].as_u64().unwrap_or(0) > 0, "{k}");
    }
    assert!(v["shadow"]["fills"].as_u64().unwrap() > 100);
    assert!(
        v["shadow"]["reflected_page_faults"].as_u64().unwrap() >= 15,
        "demand paging"
    );
    assert!(v["engine_counters"]["guest_instructions"].as_u64().unwrap() > 1_000_000);
}

/// A kernel that saves and restores its interrupt flag with PUSHF/POPF, the
/// classic virtualization hole: `visor run --engine trap` reports it (stderr
/// and `--stats`), `--strict-holes` stops on it, `--trap-sensitive` emulates it.
#[test]
fn popf_hole_is_reported() {
    let code = asm(64, 0x20_0000, |a| {
        a.cli()?;
        a.pushfq()?;
        a.sti()?;
        a.popfq()?; // restores IF=0, except deprivileged
        a.pushfq()?;
        a.pop(rax)?;
        a.shr(eax, 9)?;
        a.and(al, 1)?;
        a.out(0xf4, al)?; // status 1: IF=0 as intended, 3: IF stuck at 1
        a.hlt()
    });
    let (d, p) = tmp("popf.elf", &elf64_image(0x20_0000, &code));
    let json = d.path().join("stats.json");
    let o = visor(&["run", s(&p), "--engine", "trap", "--stats-json", s(&json)]);
    assert_eq!(o.status.code(), Some(3), "IF stayed set: {}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("virtualization hole: popf at 0x"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["holes"]["popf"], 1);
    assert_eq!(v["holes"]["pushf"], 2);
    let o = visor(&["run", s(&p), "--engine", "trap", "--trap-sensitive"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = visor(&["run", s(&p), "--engine", "emu"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = visor(&["run", s(&p), "--engine", "trap", "--strict-holes"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(
        stderr(&o).contains("virtualization hole (--strict-holes): pushf"),
        "{}",
        stderr(&o)
    );
}

/// The demo OS, told by CPUID that it runs deprivileged, makes every privileged
/// operation a hypercall under `pv` (`int 0x82`), with the transcript it has
/// paravirtualized under `emu` (and `kvm`).
#[test]
fn demo_os_on_pv() {
    let run = |engine: &str| stats_json(&["run", "--engine", engine, "--cmdline", "passes=2"]);
    let (pv, v) = run("pv");
    assert_eq!(pv.status.code(), Some(0), "{}", stderr(&pv));
    let out = stdout(&pv);
    assert!(out.contains("pv_ops use hypercalls, deprivileged"), "{out}");
    demo_done(&out, "pv-deprivileged");
    let (emu, _) = run("emu");
    assert_eq!(transcript(&out), transcript(&stdout(&emu)));
    if kvm_here() {
        let (kvm, _) = run("kvm");
        assert_eq!(transcript(&stdout(&kvm)), transcript(&out));
    }
    assert_eq!(v["engine"], "pv");
    let h = &v["hypercalls"];
    for name in [
        "set_hypercall_page",
        "set_gdt",
        "set_callbacks",
        "set_trap_table",
        "iret",
        "set_event_mask",
        "get_cr2",
        "mmu_update",
        "new_baseptr",
        "sched_op",
    ] {
        assert!(h[name].as_u64().unwrap_or(0) > 0, "{name} not called: {h}");
    }
    assert!(v["reflected"]["events"].as_u64().unwrap() > 0);
    assert!(v["reflected"]["syscalls"].as_u64().unwrap() > 0);
    assert!(v["reflected"]["page_faults"].as_u64().unwrap() >= 15);
}

/// `--engine vmx` with `--trace-vmx`, `--dump-vmcs` and `--stats`: the VMX
/// operations and decoded exits on stderr, the VMCS by area, exit counts by
/// VMX exit reason.
#[test]
fn vmx_trace_dump_and_stats() {
    let code = asm(64, 0x20_0000, |a| {
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.mov(al, 0x2a)?;
        a.out(0xf4, al)?;
        a.hlt()
    });
    let (d, p) = tmp("vmx.elf", &elf64_image(0x20_0000, &code));
    let json = d.path().join("stats.json");
    let o = visor(&[
        "run",
        s(&p),
        "--engine",
        "vmx",
        "--trace-vmx",
        "--dump-vmcs",
        "--stats",
        "--stats-json",
        s(&json),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some((0x2a << 1) | 1), "{err}");
    for needle in [
        "vmx: vmxon",
        "vmx: vmlaunch -> Ok(())",
        "vmx: exit CPUID",
        "vmx: exit IO_INSTRUCTION out port 0xf4 size 1 (qual 0xf40040)",
        "vmx: vmwrite GUEST_RIP",
        "guest-state area:",
        "host-state area:",
        "VM_EXIT_REASON",
        "vmx: VMCS at the first CPUID exit",
        "vmx: VMCS at the first IO_INSTRUCTION exit",
        "vmx_exits:",
        "CPUID",
    ] {
        assert!(err.contains(needle), "{needle:?} not in stderr:\n{err}");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["engine"], "vmx");
    assert_eq!(v["vmx_exits"]["CPUID"], 1);
    assert_eq!(v["vmx_exits"]["IO_INSTRUCTION"], 1);
}

/// `--trace-vmx` on `emu`: the guest's own VMX instructions (it is a
/// hypervisor) are logged.
#[test]
fn emu_traces_a_guest_hypervisor() {
    const REGION: u64 = 0x30_0000;
    let code = asm(64, 0x20_0000, |a| {
        a.mov(rax, cr4)?;
        a.or(rax, 0x2000)?;
        a.mov(cr4, rax)?;
        a.mov(ecx, 0x3au32)?;
        a.mov(eax, 5u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0x480u32)?;
        a.rdmsr()?;
        a.mov(rbx, REGION)?;
        a.mov(dword_ptr(rbx), eax)?;
        a.mov(qword_ptr(rbx + 0x1000), rbx)?;
        a.vmxon(qword_ptr(rbx + 0x1000))?;
        a.vmxoff()?;
        a.mov(al, 0x2a)?;
        a.out(0xf4, al)?;
        a.hlt()
    });
    let (_d, p) = tmp("hv.elf", &elf64_image(0x20_0000, &code));
    let o = visor(&["run", s(&p), "--engine", "emu", "--trace-vmx"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some((0x2a << 1) | 1), "{err}");
    assert!(err.contains("vmx: vmxon 0x300000 -> Ok(())"), "{err}");
    assert!(err.contains("vmx: vmxoff -> Ok(())"), "{err}");
}

/// The demo OS, natively and paravirtualized (hypercalls through VMCALL),
/// under `vmx` with the transcript it has on `emu`.
#[test]
fn demo_os_on_vmx() {
    for pv in [false, true] {
        let mut args = vec!["run", "--cmdline", "passes=2", "--engine"];
        if !pv {
            args.push("--no-pv");
        }
        let run = |engine: &str| {
            let mut a = args.clone();
            a.insert(4, engine);
            stats_json(&a)
        };
        let (vmx, v) = run("vmx");
        assert_eq!(vmx.status.code(), Some(0), "{}", stderr(&vmx));
        let out = stdout(&vmx);
        demo_done(&out, if pv { "pv" } else { "native" });
        let (emu, _) = run("emu");
        assert_eq!(transcript(&out), transcript(&stdout(&emu)));
        assert!(
            v["vmx_exits"]["EXTERNAL_INTERRUPT"].as_u64().unwrap() > 100,
            "{v}"
        );
        if pv {
            assert!(v["vmx_exits"]["VMCALL"].as_u64().unwrap() > 1000, "{v}");
        }
    }
}

/// The CPU benchmark kernel (guest/bench) boots on every available engine
/// that starts Multiboot kernels (`vmx` as an unrestricted guest, which
/// follows the kernel from paging off into long mode): Multiboot entry in
/// 32-bit protected mode, its own switch to long mode, then
/// it reads its command line and memory size from the Multiboot information and
/// refuses, through isa-debug-exit (status 3), a bad round count and too little
/// RAM. (The benchmark itself runs in bench/cpu_speed.py.)
#[test]
fn bench_kernel_checks_its_input() {
    let (_d, p) = tmp("bench.bin", visor::BENCH_KERNEL);
    let engines: &[&str] = if kvm_here() {
        &["emu", "vmx", "bt", "kvm"]
    } else {
        &["emu", "vmx", "bt"]
    };
    for engine in engines {
        for (args, error) in [
            (
                ["--cmdline", "x rounds=0"],
                "rounds=N wants a number from 1 to 10000",
            ),
            (
                ["--mem", "8M"],
                "needs RAM up to the end of the arena (16 MiB is enough)",
            ),
        ] {
            let mut a = vec!["run", s(&p), "--engine", engine];
            a.extend(args);
            let o = visor(&a);
            assert_eq!(
                o.status.code(),
                Some(3),
                "{engine} {args:?}: {}",
                stderr(&o)
            );
            assert_eq!(
                stdout(&o),
                format!("bench: error: {error}\n"),
                "{engine} {args:?}"
            );
        }
    }
}

/// The `key=value` fields of a `bench:` line.
fn bench_fields(line: &str) -> std::collections::BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// `--cmdline bench` (short loops) on every engine and guest mode of the
/// registry: one line per benchmark, each a plausible measurement or the
/// reason there is none, where the design cannot do the operation (no
/// hypercall natively, no port I/O in a deprivileged PV kernel; under `kvm`
/// on PVM hosts user-mode system-call gates). The TSC frequency comes from
/// CPUID: the software CPU's counts nanoseconds.
#[test]
fn nanobenchmarks_on_every_engine() {
    use visor::{Engine, GuestMode};
    for &engine in Engine::ALL {
        if let Some(why) = engine.unavailable_reason() {
            eprintln!("SKIPPED on engine {engine}: {why}");
            continue;
        }
        for &mode in engine.guest_modes() {
            let mut a = vec![
                "run",
                "--engine",
                engine.name(),
                "--cmdline",
                "bench iterations=40",
            ];
            if mode == GuestMode::Native {
                a.push("--no-pv");
            }
            let o = visor(&a);
            let out = stdout(&o);
            let what = format!("{engine}/{}", mode.name());
            assert_eq!(o.status.code(), Some(0), "{what}: {}{out}", stderr(&o));
            let tsc = out
                .lines()
                .find_map(|l| l.strip_prefix("bench: tsc_khz="))
                .unwrap_or_else(|| panic!("{what}: no TSC line: {out}"));
            let khz: u64 = tsc.split_whitespace().next().unwrap().parse().unwrap();
            assert!(khz > 0, "{what}: {tsc}");
            if engine != Engine::Kvm {
                assert_eq!(khz, 1_000_000, "{what}: the software CPU's TSC counts ns");
            }
            for name in abi::bench::NAMES {
                let prefix = format!("bench: name={name} ");
                let lines: Vec<&str> = out.lines().filter(|l| l.starts_with(&prefix)).collect();
                assert_eq!(lines.len(), 1, "{what} {name}: {out}");
                let line = lines[0].trim_end();
                let f = bench_fields(line);
                assert_eq!(f["mode"], mode.name(), "{what}: {line}");
                if let Some((_, why)) = line.split_once(" unavailable=") {
                    let expected = (name == "hypercall" && mode == GuestMode::Native)
                        || (name == "in" && engine == Engine::Pv);
                    assert!(
                        expected || engine == Engine::Kvm,
                        "{what}: unexpected {line}"
                    );
                    assert!(!why.trim().is_empty(), "{what}: {line}");
                    continue;
                }
                assert_eq!(f["iterations"], "40", "{what}: {line}");
                let cycles: f64 = f["cycles_per_op"].parse().unwrap();
                let ns: f64 = f["ns_per_op"].parse().unwrap();
                assert!(
                    cycles.is_finite() && cycles > 0.0 && ns.is_finite() && ns > 0.0,
                    "{what}: {line}"
                );
            }
        }
    }
}

/// `visor compare` on `emu`, `trap` and `pv` (one run, short loops): the
/// JSON has every benchmark for every engine and mode, and what one
/// operation cost in mechanism is what each design must do; the SVG chart is
/// XML with one labelled group of bars per benchmark.
#[test]
fn compare_engines_json_and_plot() {
    let d = tempfile::tempdir().unwrap();
    let (json, svg) = (d.path().join("c.json"), d.path().join("c.svg"));
    let o = visor(&[
        "compare",
        "--engines",
        "emu,trap,pv",
        "--runs",
        "1",
        "--iterations",
        "60",
        "--json",
        s(&json),
        "--plot",
        s(&svg),
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{}{out}", stderr(&o));
    for needle in [
        "benchmark",
        "emu/native",
        "emu/pv",
        "trap/native",
        "pv/pv",
        "mechanism per operation",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let cols: Vec<String> = v["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}/{}",
                c["engine"].as_str().unwrap(),
                c["mode"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(cols, ["emu/native", "emu/pv", "trap/native", "pv/pv"]);
    let benches = v["benchmarks"].as_array().unwrap();
    let names: Vec<&str> = benches
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, abi::bench::NAMES);
    let mut measured = 0;
    let result = |bench: &str, col: &str| -> &serde_json::Value {
        let b = benches.iter().find(|b| b["name"] == bench).unwrap();
        let i = cols.iter().position(|c| c == col).unwrap();
        &b["results"][i]
    };
    for b in benches {
        let results = b["results"].as_array().unwrap();
        assert_eq!(results.len(), cols.len(), "{b}");
        let mut fastest = f64::INFINITY;
        for (r, col) in results.iter().zip(&cols) {
            assert_eq!(
                format!(
                    "{}/{}",
                    r["engine"].as_str().unwrap(),
                    r["mode"].as_str().unwrap()
                ),
                *col
            );
            match r["ns_per_op"].as_f64() {
                Some(ns) => {
                    assert!(ns > 0.0 && ns.is_finite(), "{r}");
                    assert_eq!(r["runs"][0]["iterations"], 60, "{r}");
                    fastest = fastest.min(r["ratio"].as_f64().unwrap());
                    measured += 1;
                }
                None => assert!(!r["unavailable"].as_str().unwrap().is_empty(), "{r}"),
            }
            if col.starts_with("emu/") {
                for k in r["per_op"].as_object().unwrap().keys() {
                    assert!(
                        !["traps/", "reflected/", "shadow/", "holes/"]
                            .iter()
                            .any(|p| k.starts_with(p)),
                        "emu has no traps: {col} {}: {k}",
                        b["name"]
                    );
                }
            }
        }
        if fastest.is_finite() {
            assert_eq!(fastest, 1.0, "{b}");
        }
    }
    let per_op = |bench: &str, col: &str, counter: &str| -> f64 {
        result(bench, col)["per_op"][counter]
            .as_f64()
            .unwrap_or(0.0)
    };
    // A port read is one VMM exit wherever the kernel may do port I/O;
    // under `trap` it is also the trap of the deprivileged IN.
    for col in ["emu/native", "emu/pv", "trap/native"] {
        assert_eq!(per_op("in", col, "exits/io_in"), 1.0, "{col}");
    }
    assert!(per_op("in", "trap/native", "traps/in") >= 1.0);
    assert!(result("in", "pv/pv")["unavailable"].is_string());
    assert!(per_op("cr8wr", "trap/native", "traps/mov to cr8") >= 1.0);
    assert_eq!(per_op("cr8wr", "emu/native", "exits/hypercall"), 0.0);
    for col in ["emu/pv", "pv/pv"] {
        assert_eq!(
            per_op("cr8wr", col, "hypercalls/set_event_mask"),
            1.0,
            "{col}"
        );
        assert_eq!(per_op("hypercall", col, "hypercalls/version"), 1.0, "{col}");
        assert_eq!(per_op("ptemod", col, "hypercalls/mmu_update"), 1.0, "{col}");
    }
    assert_eq!(per_op("hypercall", "pv/pv", "hypercall_entries"), 1.0);
    assert!(per_op("ptemod", "trap/native", "traps/invlpg") >= 1.0);
    assert_eq!(per_op("syscall", "trap/native", "reflected/soft_ints"), 1.0);
    assert_eq!(
        per_op("syscall/sysret", "trap/native", "reflected/syscalls"),
        1.0
    );
    assert_eq!(per_op("syscall", "pv/pv", "hypercalls/iret"), 1.0);
    assert_eq!(
        per_op("divzero", "trap/native", "reflected/exceptions"),
        1.0
    );
    assert_eq!(per_op("pgfault", "pv/pv", "reflected/page_faults"), 1.0);
    assert_eq!(per_op("pgfault", "pv/pv", "hypercalls/mmu_update"), 2.0);
    assert_eq!(per_op("cpuid", "trap/native", "traps/cpuid"), 1.0);
    for col in &cols {
        assert_eq!(per_op("call/ret", col, "exits/io_out"), 0.0, "{col}");
        assert!(
            per_op("call/ret", col, "guest_instructions") >= 2.0,
            "{col}"
        );
    }

    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the chart is XML");
    assert!(doc.root_element().has_tag_name("svg"));
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    for label in names.iter().copied().chain(cols.iter().map(String::as_str)) {
        assert_eq!(texts.iter().filter(|t| **t == label).count(), 1, "{label}");
    }
    // The background, a box per column in the legend, and a bar per measurement.
    let rects = doc.descendants().filter(|n| n.has_tag_name("rect")).count();
    assert_eq!(rects, 1 + cols.len() + measured);
}

/// `visor compare` refuses bad input before it runs anything.
#[test]
fn compare_bad_input() {
    assert_error(
        &visor(&["compare", "--engines", "emu,warp"]),
        "unknown engine \"warp\"",
    );
    assert_error(&visor(&["compare", "--runs", "0"]), "--runs 0");
    assert_error(
        &visor(&["compare", "--plot", "/nonexistent/dir/chart.svg"]),
        "--plot /nonexistent/dir/chart.svg: cannot write",
    );
    assert_error(
        &visor(&["compare", "--json", "/nonexistent/dir/c.json"]),
        "--json /nonexistent/dir/c.json: cannot write",
    );
    assert_error(
        &visor(&["compare", "/nonexistent/kernel"]),
        "cannot read kernel",
    );
    let (_d, p) = tmp("junk.bin", b"no kernel");
    assert_error(&visor(&["compare", s(&p)]), "not a kernel");
}
