#!/usr/bin/env python3
"""Boot-to-marker time of visor versus QEMU microvm on the same Linux kernel and
busybox initramfs (whose /init prints a marker and reboots).

Usage: bench/linux_boot.py [--runs N] [--kernel bzimage|vmlinux] [--timeout S]

Prints, for each runner, the median of N boots and the ratio visor/QEMU. visor
runs on engine kvm, and (runner `visor-emu`) on its software CPU with the
bzImage; QEMU runs `-M microvm` with TCG always and with KVM when it boots (each
line says which). The software CPU is compared with QEMU's TCG. Needs Debian's linux-image-amd64, busybox-static and
qemu-system-x86 (installed when missing).
"""
import argparse, glob, os, select, shutil, statistics, struct, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
MARKER = b"VISOR-LINUX-BOOT-OK"
CMDLINE = "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def ensure_packages():
    need = []
    if not glob.glob("/boot/vmlinuz-*"):
        need.append("linux-image-amd64")
    if not shutil.which("busybox"):
        need.append("busybox-static")
    if not shutil.which("qemu-system-x86_64"):
        need.append("qemu-system-x86")
    if need:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        sh(*sudo, "apt-get", "update", "-qq")
        sh(*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *need,
           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def extract_vmlinux(bzimage, dest):
    """The bzImage's XZ payload, decompressed: the uncompressed vmlinux ELF."""
    b = open(bzimage, "rb").read()
    setup = ((b[0x1f1] or 4) + 1) * 512
    off, length = struct.unpack_from("<II", b, 0x248)
    payload = b[setup + off:setup + off + length]
    with open(dest, "wb") as f:
        sh("xz", "-dc", "--single-stream", input=payload, stdout=f)


def boot(cmd, timeout):
    """Seconds from start until the marker appears, or None."""
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    fd = p.stdout.fileno()
    buf = b""
    found = None
    while (left := timeout - (time.monotonic() - start)) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        if MARKER in buf:
            found = time.monotonic() - start
            break
    p.kill()
    p.wait()
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--kernel", choices=["bzimage", "vmlinux"], default="vmlinux")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--mem", default="256M")
    ap.add_argument("--runners", default="visor,visor-emu,visor-bt,qemu-tcg,qemu-kvm",
                    help="comma-separated subset of visor, visor-emu, visor-bt, qemu-tcg, qemu-kvm")
    a = ap.parse_args()
    ensure_packages()
    os.makedirs(OUT, exist_ok=True)
    sh("cargo", "build", "--release", "-q", "--bin", "visor", "--example", "mkinitramfs", cwd=ROOT)
    initrd = os.path.join(OUT, "initramfs.cpio")
    bz = subprocess.run([os.path.join(ROOT, "target/release/examples/mkinitramfs"), initrd],
                        check=True, capture_output=True, text=True).stdout.strip()
    kernel = bz
    if a.kernel == "vmlinux":
        kernel = os.path.join(OUT, "vmlinux")
        extract_vmlinux(bz, kernel)
    visor = os.path.join(ROOT, "target/release/visor")
    # The Linux parameters visor's kvm engine adds on this host (PVM needs some,
    # see README), as `visor engines` lists them; the same command line for
    # every runner.
    global CMDLINE
    prefix = "linux parameters for kvm here: "
    for line in subprocess.run([visor, "engines"], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        if line.startswith(prefix):
            CMDLINE += " " + line[len(prefix):]
    mem_mb = a.mem.rstrip("M")
    # QEMU boots the bzImage: microvm's PVH entry for a bare vmlinux hangs in
    # TSC calibration. The kernel inside is the same.
    qemu = ["qemu-system-x86_64", "-M", "microvm,pit=on,rtc=on", "-m", mem_mb, "-display", "none",
            "-nodefaults", "-no-reboot", "-serial", "stdio", "-kernel", bz,
            "-initrd", initrd, "-append", CMDLINE]
    wanted = a.runners.split(",")
    runners = [r for key, r in [
        ("visor", ("visor (engine kvm)", [visor, "run", kernel, "--mem", a.mem, "--initrd",
                                          initrd, "--cmdline", CMDLINE])),
        ("visor-emu", ("visor (engine emu)", [visor, "run", bz, "--engine", "emu", "--mem",
                                              a.mem, "--initrd", initrd, "--cmdline", CMDLINE])),
        ("visor-bt", ("visor (engine bt)", [visor, "run", bz, "--engine", "bt", "--mem",
                                            a.mem, "--initrd", initrd, "--cmdline", CMDLINE])),
        ("qemu-tcg", ("qemu microvm (tcg)", qemu + ["-accel", "tcg"])),
        ("qemu-kvm", ("qemu microvm (kvm)",
                      qemu + ["-accel", "kvm", "-cpu", "host,-arch-capabilities"])),
    ] if key in wanted]
    print(f"kernel: visor boots {kernel} ({a.kernel}), QEMU boots {bz}; initramfs {os.path.getsize(initrd)} bytes, "
          f"{a.runs} runs each, mem {a.mem}")
    medians = {}
    for name, cmd in runners:
        times = [t for t in (boot(cmd, a.timeout) for _ in range(a.runs)) if t is not None]
        missed = a.runs - len(times)
        note = f", {missed} of {a.runs} runs did not reach the marker within {a.timeout:.0f} s" if missed else ""
        if times:
            medians[name] = statistics.median(times)
            print(f"{name:<22} median {medians[name]:8.3f} s  "
                  f"(min {min(times):.3f}, max {max(times):.3f}{note})")
        else:
            print(f"{name:<22} no run reached the marker within {a.timeout:.0f} s")
    v = medians.get("visor (engine kvm)")
    for peer in ("qemu microvm (kvm)", "qemu microvm (tcg)"):
        if v is not None and peer in medians:
            print(f"ratio visor/{peer}: {v / medians[peer]:.2f}")
    t = medians.get("qemu microvm (tcg)")
    b = medians.get("visor (engine bt)")
    if b and t:
        print(f"ratio visor (engine bt)/qemu microvm (tcg): {b / t:.2f} (time; above 1: QEMU faster)")
    e = medians.get("visor (engine emu)")
    if e is not None and t is not None:
        print(f"ratio visor (engine emu)/qemu microvm (tcg): {e / t:.2f} (time; above 1: QEMU faster)")


if __name__ == "__main__":
    sys.exit(main())
