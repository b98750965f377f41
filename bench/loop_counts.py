"""Instructions per element of the CPU kernel's hot loops, counted in the compiled code.

Compiles bench/loop_counts.cpp (the kernel's own loops, as the extension compiles them), finds
each loop in the disassembly and counts its instructions by kind: the counts are exact and do not
depend on this machine's noise (perf's hardware counters are not available in this VM; valgrind
does not run AVX-512). With a model of the core (default: AMD Zen 4, this development machine:
per cycle one 512-bit fma / multiply, one 512-bit add, 64 bytes loaded and 32 bytes stored; two
256-bit operations count as one 512-bit one) it gives the fewest cycles per element each resource
allows. docs/architecture.md, "The CPU statistics: what bounds them", quotes the output.

    python bench/loop_counts.py            # needs g++ and objdump (x86-64)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXXFLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-fopenmp", "-Wno-psabi"]  # as CMakeLists.txt

# name -> (functions whose hot loops make one iteration, rows per iteration: one vector of
# elements of each)
LOOPS = {
    "plain step (AVX2)": (["loop_plain"], 1),
    '"rows" / "all" (AVX-512 row segment)': (["loop_rows"], 1),
    '"rows" + "cols" (two rows, two passes)': (["loop_cols_pass1", "loop_cols_pass2"], 2),
    '"rows" + "cols", 6 products (one pass)': (["loop_products"], 2),
    "float32 range check (per row)": (["loop_range"], 1),
}
ZEN4 = dict(fma=1.0, add=1.0, load_bytes=64.0, store_bytes=32.0)  # per cycle, 512-bit units


def disassemble(workdir: str) -> dict[str, list[tuple[int, str, str]]]:
    obj = os.path.join(workdir, "loop_counts.o")
    subprocess.run(["g++", *CXXFLAGS, "-I", os.path.join(ROOT, "csrc"), "-c",
                    os.path.join(ROOT, "bench", "loop_counts.cpp"), "-o", obj], check=True)
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", obj], check=True,
                          capture_output=True, text=True).stdout
    funcs: dict[str, list[tuple[int, str, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(\w+)\(", line)
        if m and "[clone" in line:  # e.g. the cold part GCC splits off (the float64 path of out-of-range chunks)
            cur = None
            continue
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if m and cur is not None:
            op, arg = m.group(2), m.group(3)
            if op.startswith("{"):  # an encoding prefix ({evex}, {vex}): the mnemonic follows
                op, _, arg = arg.partition(" ")
                arg = arg.strip()
            funcs[cur].append((int(m.group(1), 16), op, arg))
    return funcs


def hot_loop(ins: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The innermost loop (a backward conditional branch with no other inside) with the most
    packed (ymm / zmm) instructions."""
    loops = []
    for addr, op, arg in ins:
        m = re.match(r"([0-9a-f]+)", arg)
        if op.startswith("j") and op != "jmp" and m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    bodies = [[x for x in ins if a <= x[0] <= b] for a, b in innermost]
    return max(bodies, key=lambda body: sum(("ymm" in x[2]) or ("zmm" in x[2]) for x in body))


def classify(body: list[tuple[int, str, str]]) -> dict[str, float]:
    """Counts in 512-bit units (a ymm operation counts one half)."""
    c = dict(instructions=len(body), fma=0.0, add=0.0, loads=0.0, stores=0.0, load_bytes=0, store_bytes=0,
             prefetches=0, vector_other=0)
    for _, op, arg in body:
        width = 64 if "zmm" in arg else 32 if "ymm" in arg else 16 if "xmm" in arg else 0
        unit = width / 64
        memory = "(" in arg
        if op.startswith("prefetch"):
            c["prefetches"] += 1
        elif op.startswith(("vfmadd", "vfnmadd", "vfmsub", "vfnmsub", "vmul")):
            c["fma"] += unit
        elif op.startswith(("vadd", "vsub")):
            c["add"] += unit
        elif op.startswith("vmov") and arg.startswith("%") and memory:
            c["stores"] += unit
            c["store_bytes"] += width
            continue
        elif op.startswith("v"):
            c["vector_other"] += 1
        if memory and op.startswith("v"):  # a load, or a load folded into the operation
            c["loads"] += unit
            c["load_bytes"] += width
    return c


def count() -> dict[str, dict[str, float]]:
    """Per element, for each of LOOPS: its counts (classify) and `bound`, the cycles per element
    each of fma, add, loads, stores allows under ZEN4."""
    with tempfile.TemporaryDirectory() as tmp:
        funcs = disassemble(tmp)
    out = {}
    for name, (fns, rows) in LOOPS.items():
        total: dict[str, float] = {}
        widest = 0
        for fn in fns:
            body = hot_loop(funcs[fn])
            widest = max(widest, *(64 if "zmm" in x[2] else 32 if "ymm" in x[2] else 16 for x in body))
            for k, val in classify(body).items():
                total[k] = total.get(k, 0) + val
        n = rows * widest // 4  # float32 elements
        per: dict = {k: val / n for k, val in total.items()}
        per["elements_per_iteration"] = n
        per["bound"] = dict(fma=per["fma"] / ZEN4["fma"], add=per["add"] / ZEN4["add"],
                            loads=per["load_bytes"] / ZEN4["load_bytes"], stores=per["store_bytes"] / ZEN4["store_bytes"])
        out[name] = per
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    print(f"{'loop':<42}{'instr':>7}{'fma/mul':>9}{'add':>6}{'loads':>7}{'stores':>8}{'B ld':>6}{'B st':>6}"
          f"   cycles/element allowed by: fma, add, loads, stores (Zen 4 model)")
    for name, per in count().items():
        print(f"{name:<42}{per['instructions']:>7.2f}{per['fma']:>9.3f}{per['add']:>6.3f}{per['loads']:>7.3f}"
              f"{per['stores']:>8.3f}{per['load_bytes']:>6.1f}{per['store_bytes']:>6.1f}   "
              + ", ".join(f"{b:.2f}" for b in per["bound"].values())
              + f"   ({per['elements_per_iteration']:g} elements per iteration)")
    print("per element; fma/mul, add, loads, stores in 512-bit operations (a 256-bit one counts 1/2); "
          "loads include those folded into arithmetic; B: bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
