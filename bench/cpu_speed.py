#!/usr/bin/env python3
"""CPU speed: visor's software CPU (engine emu) against QEMU's TCG and Bochs, on
the same kernel.

Usage: bench/cpu_speed.py [--rounds N] [--runs R] [--no-qemu] [--no-bochs]

The kernel is guest/bench (written out by `cargo run --example bench_kernel`): a
flat Multiboot v1 image doing integer work (xorshift fill, CRC-32, sieve, heap
sort over 8 MiB) that prints `bench: start`, one line per round and
`bench: checksum <hex>` on COM1, then exits through isa-debug-exit (visor, QEMU)
and Bochs' shutdown port. visor and QEMU boot it directly (`-kernel`); Bochs boots
a GRUB ISO (grub-mkrescue) whose menu entry loads it with `multiboot`.

For each emulator the script takes the wall time of the whole process and the
*work time*: from the moment `bench: start` appears on the serial output to the
moment the checksum line does (polled every 2 ms), which leaves out firmware,
GRUB and emulator start-up. The guest executes the same instructions under all
three, so visor's count (`engine_counters.guest_instructions` of
`--stats-json`) divided by each work time gives instructions per second.
All three checksums must agree. Needs qemu-system-x86, and bochs, bochsbios,
vgabios, grub-pc-bin, xorriso (installed with apt-get when missing).
"""
import argparse, glob, json, os, re, shutil, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out", "cpu_speed")
START = b"bench: start"
CHECKSUM = re.compile(rb"bench: checksum ([0-9a-f]{16})\n")
BOCHS_PACKAGES = ["bochs", "bochsbios", "vgabios", "grub-pc-bin", "xorriso"]


def apt_install(packages):
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def timed(cmd, serial, timeout, stdout=None):
    """Runs `cmd`, watching the file `serial` for the markers. Returns (wall
    seconds, work seconds or None, serial bytes, exit status)."""
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout or subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd=os.path.dirname(serial))
    t_start = t_end = None
    data = b""
    while True:
        done = p.poll() is not None
        now = time.monotonic()
        if os.path.exists(serial):
            with open(serial, "rb") as f:
                data = f.read()
        if t_start is None and START in data:
            t_start = now
        if t_end is None and CHECKSUM.search(data):
            t_end = now
        if done:
            break
        if now - start > timeout:
            p.kill()
            p.wait()
            sys.exit(f"{cmd[0]}: no result after {timeout} s; serial output:\n{data.decode(errors='replace')}")
        time.sleep(0.002)
    wall = time.monotonic() - start
    work = t_end - t_start if t_start is not None and t_end is not None else None
    return wall, work, data, p.returncode


def checksum(name, data):
    m = CHECKSUM.search(data)
    if not m:
        sys.exit(f"{name}: no checksum line; serial output:\n{data.decode(errors='replace')}")
    return m.group(1).decode()


def run_visor(kernel, rounds, timeout, engine="emu"):
    visor = os.path.join(ROOT, "target", "release", "visor")
    serial = os.path.join(OUT, f"visor-{engine}.out")
    stats = os.path.join(OUT, f"visor-{engine}.json")
    with open(serial, "wb") as out:
        wall, work, data, status = timed(
            [visor, "run", kernel, "--engine", engine, "--cmdline", f"rounds={rounds}",
             "--stats-json", stats], serial, timeout, stdout=out)
    if status != 1:  # the guest writes 0 to isa-debug-exit: status 1
        sys.exit(f"visor exited with status {status}; output:\n{data.decode(errors='replace')}")
    j = json.load(open(stats))
    return wall, work, checksum("visor", data), j["engine_counters"]["guest_instructions"], \
        j["wall_time_ns"] / 1e9


def run_qemu(kernel, rounds, timeout):
    serial = os.path.join(OUT, "qemu.out")
    with open(serial, "wb") as out:
        wall, work, data, status = timed(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "128", "-nic", "none", "-no-reboot",
             "-kernel", kernel, "-append", f"rounds={rounds}", "-nographic",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"], serial, timeout, stdout=out)
    if status != 1:
        sys.exit(f"QEMU exited with status {status}; output:\n{data.decode(errors='replace')}")
    return wall, work, checksum("QEMU", data)


def first(paths):
    return next((p for p in paths if os.path.exists(p)), None)


def bochs_setup(kernel, rounds):
    """A GRUB ISO that boots the kernel, a bochsrc, and the Bochs command line."""
    d = os.path.join(OUT, "bochs")
    iso_root = os.path.join(d, "iso")
    os.makedirs(os.path.join(iso_root, "boot", "grub"), exist_ok=True)
    shutil.copy(kernel, os.path.join(iso_root, "boot", "bench.bin"))
    with open(os.path.join(iso_root, "boot", "grub", "grub.cfg"), "w") as f:
        f.write("set timeout=0\nset default=0\n"
                f"menuentry bench {{\n  multiboot /boot/bench.bin rounds={rounds}\n  boot\n}}\n")
    iso = os.path.join(d, "bench.iso")
    subprocess.run(["grub-mkrescue", "-o", iso, iso_root], check=True, capture_output=True)
    bios = first(["/usr/share/bochs/BIOS-bochs-latest"])
    vga = first(["/usr/share/vgabios/vgabios.bin", "/usr/share/bochs/VGABIOS-lgpl-latest"])
    if not bios or not vga:
        sys.exit("Bochs: no BIOS or VGA BIOS image (apt-get install bochsbios vgabios)")
    # Debian's Bochs has no `nogui` display library: its VNC server (rfb) then
    # stands in, without waiting for a client.
    plugins = glob.glob("/usr/lib/*/bochs/plugins/libbx_*gui.so")
    nogui = not plugins or any("nogui" in p for p in plugins)
    display = "nogui" if nogui else 'rfb, options="timeout=0"'
    rc = os.path.join(d, "bochsrc")
    with open(rc, "w") as f:
        f.write(f"""megs: 64
cpu: model=corei7_skylake_x
romimage: file={bios}
vgaromimage: file={vga}
ata0-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
display_library: {display}
com1: enabled=1, mode=file, dev=com1.out
log: bochs.log
clock: sync=none
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
""")
    cmd = ["bochs", "-q", "-f", rc]
    # A Bochs built with its debugger (Debian's) stops at the first instruction
    # and waits for a command: `c` continues.
    help_text = subprocess.run(["bochs", "--help"], capture_output=True, text=True)
    if "-rc filename" in help_text.stdout + help_text.stderr:
        cmds = os.path.join(d, "continue")
        with open(cmds, "w") as f:
            f.write("c\nquit\n")
        cmd += ["-rc", cmds]
    return cmd, os.path.join(d, "com1.out")


def run_bochs(kernel, rounds, timeout):
    cmd, serial = bochs_setup(kernel, rounds)
    if os.path.exists(serial):
        os.remove(serial)
    wall, work, data, _ = timed(cmd, serial, timeout)
    # Bochs ends through its shutdown port, with status 1 (it calls that a panic).
    return wall, work, checksum("Bochs", data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2, help="rounds of work in the guest")
    ap.add_argument("--runs", type=int, default=1, help="runs of each emulator (median)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--no-bt", action="store_true", help="leave out visor's engine bt")
    ap.add_argument("--no-bochs", action="store_true")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    missing = []
    if not a.no_qemu and not shutil.which("qemu-system-x86_64"):
        missing.append("qemu-system-x86")
    if not a.no_bochs and not (shutil.which("bochs") and shutil.which("grub-mkrescue")):
        missing += BOCHS_PACKAGES
    if missing:
        apt_install(missing)
    subprocess.run(["cargo", "build", "--release", "-q", "--bin", "visor", "--example",
                    "bench_kernel"], cwd=ROOT, check=True)
    kernel = os.path.join(OUT, "bench.bin")
    subprocess.run([os.path.join(ROOT, "target", "release", "examples", "bench_kernel"), kernel],
                   check=True)

    runners = [("visor emu", run_visor)]
    if not a.no_bt:
        runners.append(("visor bt", lambda k, r, t: run_visor(k, r, t, "bt")))
    if not a.no_qemu:
        runners.append(("QEMU TCG", run_qemu))
    if not a.no_bochs:
        runners.append(("Bochs", run_bochs))
    results = {}
    insns = None
    for name, fn in runners:
        walls, works, sums = [], [], set()
        for _ in range(a.runs):
            r = fn(kernel, a.rounds, a.timeout)
            walls.append(r[0])
            works.append(r[1])
            sums.add(r[2])
            if name == "visor emu":
                insns = r[3]
                print(f"visor: {r[3]} guest instructions in {r[4]:.3f} s (stats JSON): "
                      f"{r[3] / r[4] / 1e6:.1f} M instructions/s", flush=True)
        if None in works:
            sys.exit(f"{name}: the start or checksum marker was not seen")
        results[name] = (statistics.median(walls), statistics.median(works), sums)
        print(f"{name}: wall {results[name][0]:.3f} s, work {results[name][1]:.3f} s, "
              f"checksum {', '.join(sorted(sums))}", flush=True)

    all_sums = set().union(*(r[2] for r in results.values()))
    print(f"\nguest/bench, {a.rounds} rounds, {insns} instructions, median of {a.runs} run(s)")
    print(f"{'':12} {'wall s':>9} {'work s':>9} {'M instr/s':>10}")
    for name, (wall, work, _) in results.items():
        print(f"{name:12} {wall:9.3f} {work:9.3f} {insns / work / 1e6:10.1f}")
    visor_work = results["visor emu"][1]
    for name, (_, work, _) in results.items():
        if name != "visor emu":
            print(f"speed visor/{name}: {work / visor_work:.3f} (work time {name} / visor)")
    if "visor bt" in results:
        bt_work = results["visor bt"][1]
        for name, (_, work, _) in results.items():
            if name != "visor bt":
                print(f"speed bt/{name}: {work / bt_work:.3f} (work time {name} / bt)")
    json.dump({"rounds": a.rounds, "instructions": insns,
               "results": {k: {"wall_s": v[0], "work_s": v[1], "checksums": sorted(v[2])}
                           for k, v in results.items()}},
              open(os.path.join(OUT, "results.json"), "w"), indent=2)
    if len(all_sums) != 1:
        sys.exit(f"checksums differ: {sorted(all_sums)}")
    print(f"checksums agree: {all_sums.pop()}")


if __name__ == "__main__":
    sys.exit(main())
