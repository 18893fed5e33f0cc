#!/usr/bin/env python3
"""VMM exit overhead: the same guest (N x `out 0x80, al`) under visor's VMM loop
and under a bare KVM_RUN loop on an identically built VM, in the same script.

Usage: bench/exit_overhead.py [--n N] [--runs R]
Prints the median ns per port-I/O exit of each and the ratio visor/raw.
"""
import argparse, json, os, statistics, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "-q", "--bin", "visor", "--example",
                    "pio_bench"], cwd=ROOT, check=True)
    tool = os.path.join(ROOT, "target/release/examples/pio_bench")
    visor = os.path.join(ROOT, "target/release/visor")
    elf = os.path.join(OUT, "pio.elf")
    stats = os.path.join(OUT, "pio.json")
    subprocess.run([tool, "elf", elf, str(a.n)], check=True)
    v, r = [], []
    for _ in range(a.runs):
        p = subprocess.run([visor, "run", elf, "--stats-json", stats], stdin=subprocess.DEVNULL)
        if p.returncode != 1:  # the guest writes 0 to isa-debug-exit: status 1
            sys.exit(f"visor run failed with status {p.returncode}")
        j = json.load(open(stats))
        v.append(j["wall_time_ns"] / j["exits"]["io_out"])
        out = subprocess.run([tool, "raw", str(a.n)], check=True, capture_output=True,
                             text=True).stdout
        kv = dict(x.split("=") for x in out.split()[1:])
        r.append(int(kv["total_ns"]) / int(kv["exits"]))
    mv, mr = statistics.median(v), statistics.median(r)
    print(f"port-I/O exit round trip, {a.n} exits x {a.runs} runs")
    print(f"visor VMM loop   median {mv:10.0f} ns/exit")
    print(f"raw KVM_RUN loop median {mr:10.0f} ns/exit")
    print(f"ratio visor/raw: {mv / mr:.3f}")


if __name__ == "__main__":
    sys.exit(main())
