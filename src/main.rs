//! `visor`: the command line. Thin: parse, build the VM, run it, report.

use std::path::PathBuf;
use std::process::ExitCode;

mod compare;
mod plot;

use clap::{Parser, Subcommand};
use machine::devices::Platform;
use machine::loader::{self, BootOptions, Initrd, KernelKind};
use machine::MemoryLayout;
use visor::{exit_status, Engine, HolePolicy, Stats, Vm, VmOptions};

#[derive(Parser)]
#[command(
    name = "visor",
    version,
    about = "An x86-64 hypervisor with every classic CPU-virtualization design side by side"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a kernel (Linux bzImage, Multiboot, or ELF64); the embedded demo guest without one.
    Run(RunArgs),
    /// List the engines and whether each can run on this host.
    Engines,
    /// Run the demo OS's nanobenchmarks on every engine and mode, side by side.
    Compare(compare::CompareArgs),
}

#[derive(clap::Args, Default)]
struct RunArgs {
    /// Kernel image: Linux bzImage, Multiboot v1 (ELF32 or a.out kludge) or ELF64.
    kernel: Option<PathBuf>,
    /// Engine: auto, or one listed by `visor engines`.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// Guest RAM, e.g. 256M or 2G.
    #[arg(long, default_value = "512M")]
    mem: String,
    /// Initial ramdisk (Linux) or boot module (Multiboot).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Hide visor's paravirtual interface (CPUID leaves 0x40000000.., hypercall page).
    #[arg(long)]
    no_pv: bool,
    /// Print exit statistics at the end of the run.
    #[arg(long)]
    stats: bool,
    /// Stop the guest after SECONDS (exit status 8, with a register dump).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Write the statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Engine trap: end the run at the first virtualization hole (a sensitive
    /// instruction that ran deprivileged without trapping), with an explanation.
    #[arg(long)]
    strict_holes: bool,
    /// Engine trap: model an x86 where the sensitive unprivileged instructions
    /// trap too, and emulate them.
    #[arg(long, conflicts_with = "strict_holes")]
    trap_sensitive: bool,
    /// Log each VMX operation and each VM exit, decoded (engine vmx; on emu, the guest's own).
    #[arg(long)]
    trace_vmx: bool,
    /// Engine vmx: print the VMCS, grouped by area, when the run ends.
    #[arg(long)]
    dump_vmcs: bool,
    /// Engine bt: the size of the code cache (e.g. 16M; default 64M). A full
    /// cache is emptied whole.
    #[arg(long, value_name = "SIZE")]
    bt_cache: Option<String>,
    /// Engine bt: translate a block once the interpreter has reached its
    /// start N times (default 32; 0 translates everything at first sight).
    #[arg(long, value_name = "N")]
    bt_hot: Option<u32>,
    /// Wait for gdb on [HOST:]PORT (host 127.0.0.1 by default) or a Unix
    /// socket path, with the guest stopped before its first instruction
    /// (`target remote :PORT` in gdb; `monitor help` for visor's commands).
    #[arg(long, value_name = "[HOST:]PORT|PATH")]
    gdb: Option<String>,
}

fn main() -> ExitCode {
    die_of_sigpipe();
    let cli = Cli::parse();
    let code = match cli.cmd.unwrap_or(Cmd::Run(RunArgs {
        engine: "auto".into(),
        mem: "512M".into(),
        ..Default::default()
    })) {
        Cmd::Engines => {
            engines();
            0
        }
        Cmd::Run(args) => run(args).unwrap_or_else(error),
        Cmd::Compare(args) => compare::compare(args).unwrap_or_else(error),
    };
    ExitCode::from(code as u8)
}

/// Output into a closed pipe (`visor engines | head -1`, the guest's console
/// into a pager that was quit) ends visor quietly, killed by SIGPIPE as `ls`
/// or `cat` are, where Rust's runtime would ignore the signal and a write
/// would panic. The gdb stub's sockets send with MSG_NOSIGNAL: a debugger that
/// goes away is an error on its connection, not the end of the VM.
fn die_of_sigpipe() {
    // SAFETY: restoring the default disposition of one signal at the start
    // of main, before any thread exists; no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Reports bad input or a VMM error: one line, status 2.
fn error(e: String) -> i32 {
    eprintln!("visor: error: {e}");
    exit_status::ERROR
}

fn engines() {
    println!("{:<8} {:<12} design", "engine", "available");
    for &e in Engine::ALL {
        let avail = match e.unavailable_reason() {
            None => "yes".to_string(),
            Some(why) => format!("no ({why})"),
        };
        println!("{:<8} {:<12} {}", e.name(), avail, e.design());
    }
    for &e in Engine::ALL {
        let params = e.linux_parameters();
        if !params.is_empty() {
            println!("linux parameters for {e} here: {}", params.join(" "));
        }
    }
}

fn read_file(what: &str, path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// The engine `--engine` names for a kernel of kind `kind`. On a host where
/// an engine cannot run Linux to user space (KVM on PVM), `auto` passes it
/// over for a Linux kernel and says so, and naming it explicitly warns.
fn select_engine(name: &str, kind: KernelKind) -> Result<Engine, String> {
    let linux = kind == KernelKind::Linux;
    if name == "auto" {
        let (e, passed) = Engine::auto(linux)?;
        if let Some(why) = passed {
            eprintln!("visor: {why}; using engine {e}");
        }
        return Ok(e);
    }
    let e = Engine::from_name(name).ok_or_else(|| {
        format!(
            "unknown engine {name:?} (engines: auto, {})",
            Engine::names()
        )
    })?;
    if let Some(why) = e.unavailable_reason() {
        return Err(format!("engine {e} is not available: {why}"));
    }
    if let Some(why) = e.linux_limit().filter(|_| linux) {
        eprintln!("visor: warning: {why}: the kernel will not reach init on engine {e}");
    }
    Ok(e)
}

fn run(args: RunArgs) -> Result<i32, String> {
    // Everything about the input is checked before an engine is touched.
    let mem_size = machine::memory::parse_size(&args.mem).map_err(|e| format!("--mem: {e}"))?;
    let layout = MemoryLayout::new(mem_size).map_err(|e| e.to_string())?;
    let timeout = args
        .timeout
        .map(|t| {
            std::time::Duration::try_from_secs_f64(t)
                .map_err(|_| format!("--timeout {t}: not a number of seconds"))
        })
        .transpose()?;
    let bt_cache = args
        .bt_cache
        .as_deref()
        .map(|c| {
            let n = machine::memory::parse_size(c).map_err(|e| format!("--bt-cache: {e}"))?;
            if !(64 << 10..=1 << 30).contains(&n) {
                return Err(format!("--bt-cache {c}: between 64K and 1G"));
            }
            usize::try_from(n).map_err(|_| format!("--bt-cache {c}: too large"))
        })
        .transpose()?;
    let gdb_addr = args
        .gdb
        .as_deref()
        .map(visor::gdb::parse_addr)
        .transpose()?;
    let (image, kernel_name) = match &args.kernel {
        Some(p) => (read_file("kernel", p)?, p.display().to_string()),
        None => (visor::DEMO_GUEST.to_vec(), "demo".to_string()),
    };
    let initrd = match &args.initrd {
        Some(p) => Some((read_file("initrd", p)?, p.display().to_string())),
        None => None,
    };
    let kind = loader::detect(&image).map_err(|e| format!("{kernel_name}: {e}"))?;
    // An unavailable engine is reported after the kernel is checked.
    let engine = select_engine(&args.engine, kind);
    let mut cmdline = args.cmdline.clone();
    if let (KernelKind::Linux, Ok(engine)) = (kind, &engine) {
        let needs = engine.linux_parameters();
        match &cmdline {
            None if !needs.is_empty() => {
                cmdline = Some(format!(
                    "{} {}",
                    loader::DEFAULT_LINUX_CMDLINE,
                    needs.join(" ")
                ))
            }
            Some(c) => {
                for p in needs
                    .iter()
                    .filter(|p| !c.split_whitespace().any(|w| w == **p))
                {
                    eprintln!("visor: warning: engine {engine} on this host needs `{p}` on the Linux command line");
                }
            }
            None => {}
        }
    }
    let mem = layout.create().map_err(|e| e.to_string())?;
    let boot = BootOptions {
        kernel_name: &kernel_name,
        cmdline: cmdline.as_deref(),
        initrd: initrd.as_ref().map(|(data, name)| Initrd { name, data }),
    };
    let loaded =
        loader::load(&mem, &layout, &image, &boot).map_err(|e| format!("{kernel_name}: {e}"))?;
    // What QEMU's fw_cfg device tells a guest (docs/platform.md).
    let fw_cfg = machine::fw_cfg::FwCfg::new(machine::fw_cfg::Config {
        cpus: loader::CPUS as u16,
        ram: layout.size,
        e820: layout.e820(),
        kernel: Some((image, loaded.kernel, loaded.cpu.regs.rip)),
        cmdline: Some((loaded.cmdline.clone(), loaded.cmdline_addr)),
        initrd: initrd
            .map(|(data, _)| data)
            .zip(loaded.initrd)
            .map(|(data, (at, _))| (data, at)),
    });

    let engine = engine?;
    engine
        .boots(kind)
        .map_err(|e| format!("{kernel_name}: {e}"))?;
    let gdb = gdb_addr
        .as_ref()
        .map(visor::gdb::Listener::bind)
        .transpose()?;
    // The platform every kernel sees: PIC, IOAPIC, local APIC and PIT.
    let opts = VmOptions {
        irqchip: true,
        pv: !args.no_pv,
        holes: if args.strict_holes {
            HolePolicy::Strict
        } else if args.trap_sensitive {
            HolePolicy::Trap
        } else {
            HolePolicy::Report
        },
        trace_vmx: args.trace_vmx,
        dump_vmcs: args.dump_vmcs,
        bt_cache,
        bt_hot: args.bt_hot,
    };
    let mut vm = Vm::with_memory(engine, layout, mem, opts)?;
    vm.set_cpu_state(&loaded.cpu.regs, &loaded.cpu.sregs)
        .map_err(|e| format!("engine {engine}: setting the boot CPU state: {e}"))?;
    let mut isa_irqs = Vec::new();
    for irq in 0..16 {
        isa_irqs.push(
            vm.engine_vm
                .irq_line(irq)
                .map_err(|e| format!("engine {engine}: {e}"))?,
        );
    }
    let platform = Platform::attach(
        &mut vm.pio,
        &mut vm.mmio,
        isa_irqs,
        Box::new(std::io::stdout()),
        vm.clock.clone(),
        &vm.layout,
    )
    .map_err(|e| e.to_string())?;
    // SIGTERM presses the power button (docs/platform.md).
    vm.set_power_button(platform.pm.clone());
    vm.pio
        .insert(
            machine::fw_cfg::SELECTOR as u64,
            2,
            std::sync::Arc::new(std::sync::Mutex::new(fw_cfg)),
        )
        .map_err(|e| e.to_string())?;

    let raw = std::sync::Arc::new(visor::console::RawMode::enable());
    let raw_q = raw.clone();
    visor::console::spawn_stdin(platform.serial.clone(), move || {
        if let Some(r) = raw_q.as_ref() {
            r.restore();
        }
        eprintln!("\r\nvisor: quit (Ctrl-A x)");
        std::process::exit(exit_status::OK);
    });

    if let Some(d) = timeout {
        vm.stopper().stop_after(d);
    }
    let mut stats = Stats::new(engine.name());
    let result = match gdb {
        Some(listener) => visor::gdb::serve(&mut vm, &mut stats, listener),
        None => vm
            .run(&mut stats)
            .map_err(|e| format!("engine {engine}: {e}")),
    };
    if let Some(r) = raw.as_ref() {
        r.restore();
    }
    let outcome = result?;
    let code = outcome.exit_status();
    match &outcome {
        visor::Outcome::Stopped(_) => {}
        o => {
            eprintln!("visor: {}", o.describe());
            if let Some(d) = o.dump() {
                eprintln!("{d}");
            }
        }
    }
    if args.stats {
        eprint!("{}", stats.table());
        eprintln!("  outcome: {} (exit status {code})", outcome.describe());
    }
    if let Some(path) = &args.stats_json {
        std::fs::write(path, stats.to_json(&outcome.describe(), code))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(code)
}
