"""Registers, spills, shared memory and theoretical occupancy of every GPU kernel of nm_optim, on
a machine without a GPU: the first table to read before (and instead of) a GPU run.

    python tools/kernel_resources.py [--arch 90] [--quick] [--cuda-only | --triton-only]

- CUDA (csrc/cuda/sgd_step_cuda.cu): compiled with nvcc for sm_XX with ``-Xptxas -v``; ptxas
  reports, per kernel instantiation, registers, stack frame, spill stores / loads and static
  shared memory. The block size is the kernel's launch size (KERNEL_THREADS below, the
  ``__launch_bounds__`` of each kernel).
- Triton (nm_optim/ops/triton/kernels.py): every variant compiled for sm_XX with Triton's own
  compiler (no GPU needed), whose ptxas run (Triton's flags) prints the same -v report
  (TRITON_DUMP_PTXAS_LOG, a fresh cache); the shared memory is Triton's (its metadata), the block
  size num_warps * 32.

Occupancy is the occupancy calculator's, for sm_90 (H100 / H200) and sm_80 (A100): 65536
registers per SM allocated per warp in units of 256, at most 64 warps (sm_80: 64) and 32 blocks
per SM, 228 KB (sm_80: 164 KB) of shared memory per SM with 1 KB reserved per block.
``--quick``: sm_90, CUDA float32 / bfloat16 with every switch on, Triton float32 / bfloat16 with
every switch on (what a test can afford); without it every instantiation and variant.
Needs nvcc for the CUDA half (skipped with a note when absent) and Triton's NVIDIA backend for
the Triton half; TRITON_INTERPRET must be unset (the interpreter compiles nothing).

Register use and spills change with the Triton version (its passes and its ptxas): each
``--triton-python PY`` adds the Triton table of the Triton installed beside that interpreter (a
subprocess of it), so one run reports every version side by side (docs/kernel_resources.md:
the Triton of the GPU machine and the Triton of the project's environment).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CU = ROOT / "csrc" / "cuda" / "sgd_step_cuda.cu"

# Per-SM limits by compute capability x 10.
SM = {
    90: dict(regs=65536, smem=228 * 1024, smem_block=227 * 1024, warps=64, blocks=32, reserved=1024),
    80: dict(regs=65536, smem=164 * 1024, smem_block=163 * 1024, warps=64, blocks=32, reserved=1024),
}
REG_UNIT = 256  # registers are allocated per warp in units of 256
# Letters for the Triton variants' true switches (HAS_X: x).
FLAG_LETTERS = {"NESTEROV": "n", "WITH_STATS": "S", "COLS": "c", "PRODUCTS": "6", "ALIGNED": "A"}

# Threads per block of each CUDA kernel (its launch size, = its __launch_bounds__); matched on the
# kernel's name.
KERNEL_THREADS = {
    "sgd_step_kernel": 256,
    "sgd_stats_tile_kernel": 256,
    "sgd_stats_reduce_kernel": 256,
}


@dataclass
class Usage:
    name: str
    threads: int
    regs: int
    stack: int = 0
    spill_st: int = 0
    spill_ld: int = 0
    smem: int = 0

    def occupancy(self, arch: int) -> tuple[int, int, str]:
        """(blocks per SM, warps per SM, the limiting resource)."""
        lim = SM[arch]
        warps = -(-self.threads // 32)
        per_warp = -(-max(self.regs, 1) * 32 // REG_UNIT) * REG_UNIT
        limits = {
            "warps": lim["warps"] // warps,
            "blocks": lim["blocks"],
            "regs": (lim["regs"] // per_warp) // warps,
            "smem": lim["smem"] // (self.smem + lim["reserved"]) if self.smem <= lim["smem_block"] else 0,
        }
        blocks = min(limits.values())
        order = ["warps", "blocks", "regs", "smem"]  # on a tie, the hardware's limits first
        why = min(limits, key=lambda k: (limits[k], order.index(k)))
        return blocks, blocks * warps, why

    def row(self, arch: int) -> str:
        blocks, warps, why = self.occupancy(arch)
        spills = f"{self.stack}/{self.spill_st}/{self.spill_ld}"
        return (f"| {self.name} | {self.threads} | {self.regs} | {spills} | {self.smem} | {blocks} | "
                f"{warps} ({100 * warps // SM[arch]['warps']}%) | {why} |")


HEADER = ("| kernel | threads | regs | stack/spill st/spill ld (B) | smem (B) | blocks/SM | warps/SM | "
          "limit |\n|---|---|---|---|---|---|---|---|")


def parse_ptxas(text: str) -> dict[str, Usage]:
    """ptxas -v output -> {mangled name: Usage} (threads unset)."""
    out: dict[str, Usage] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line) or re.search(r"Function properties for (\S+):?$", line)
        if m:
            current = m.group(1).rstrip(":")
            out.setdefault(current, Usage(current, 0, 0))
            continue
        if current is None:
            continue
        u = out[current]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            u.stack, u.spill_st, u.spill_ld = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            u.regs = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            u.smem = int(s.group(1)) if s else 0
    return out


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    pretty = r.stdout.splitlines()
    return {n: _short(p) for n, p in zip(names, pretty)} if len(pretty) == len(names) else {n: n for n in names}


def _short(name: str) -> str:
    name = re.sub(r"^void ", "", name).replace("nm_optim::(anonymous namespace)::", "")
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("double", "f64")
    name = name.replace("float", "f32")
    return re.sub(r"\(.*\)$", "", name)


def cuda_table(arch: int, quick: bool) -> tuple[list[Usage], str]:
    nvcc = shutil.which("nvcc") or os.environ.get("CUDACXX")
    if not nvcc:
        return [], "CUDA: nvcc not found, skipped"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v",
               "-DNM_OPTIM_WITH_CUDA", "-I", str(ROOT / "csrc"), str(CU), "-o", os.path.join(tmp, "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return [], f"CUDA: nvcc failed:\n{r.stderr[-3000:]}"
    usages = parse_ptxas(r.stderr + r.stdout)
    names = demangle(list(usages))
    rows = []
    for mangled, u in usages.items():
        u.name = names[mangled]
        base = u.name.split("<")[0]
        u.threads = KERNEL_THREADS.get(base, 0)
        if quick and "<" in u.name and not re.search(r"<(f32|bf16), true, true, true", u.name):
            continue
        rows.append(u)
    rows.sort(key=lambda u: u.name)
    return rows, f"CUDA: nvcc {nvcc}, sm_{arch}, {len(rows)} kernels"


def triton_table(arch: int, quick: bool) -> tuple[list[Usage], str]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return [], "Triton: TRITON_INTERPRET is set (the interpreter compiles nothing), skipped"
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        return [], f"Triton: not available ({e}), skipped"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the launches (and the tests) compile
    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT))
    import compile_triton_kernels as C

    # Triton's own ptxas run (its flags: -lineinfo, --regAllocOptLevel=2, ...) prints its -v log
    # with TRITON_DUMP_PTXAS_LOG; a fresh cache makes every variant run it.
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="nm_optim_kernel_resources_")
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for name, fn, consts in C.variants(quick):
        sig = {a: ("constexpr" if a in consts else C.ARG_TYPES[a]) for a in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        warps = C.num_warps(name, consts) if hasattr(C, "num_warps") else C.T.NUM_WARPS[name]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options={"num_warps": warps})
        parsed = list(parse_ptxas(log.getvalue()).values())
        u = parsed[0] if parsed else Usage("?", 0, 0)
        u.smem = max(u.smem, int(getattr(kernel.metadata, "shared", 0) or 0))
        u.threads = 32 * warps
        dt = str(consts.get("DT", "")).replace("fp", "f").replace("bf16", "bf16")
        flags = "".join(k[4].lower() if k.startswith("HAS_") else FLAG_LETTERS.get(k, k[0])
                        for k, v in consts.items() if v is True and k.isupper())
        u.name = f"{name} {dt} {flags}".strip()
        rows.append(u)
    legend = ("l=lr tensor, s=grad scale, i=found_inf, w=weight decay, m=momentum, n=nesterov, "
              "S=with statistics, c=column partials, 6=the 6 products only, A=16-byte vector accesses")
    return rows, f"Triton {triton.__version__}, sm_{arch}, {len(rows)} variants (flags: {legend})"


def triton_elsewhere(python: str, arch: int, quick: bool) -> tuple[str, int]:
    """The Triton table printed by this script under another interpreter (another Triton), and
    its count of kernels that spill or failed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [python, str(Path(__file__).resolve()), "--triton-only", "--arch", str(arch), *(["--quick"] if quick else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    text = r.stdout.rstrip()
    m = re.search(r"\n(\d+) kernels spill or failed$", text)
    if m is None:
        return f"\nTriton under {python}: failed (rc {r.returncode}):\n{r.stderr[-2000:]}", 1
    return text[: m.start()], int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SM))
    ap.add_argument("--quick", action="store_true", help="the float32 / bfloat16 variants with every switch on")
    ap.add_argument("--triton-python", action="append", default=[], metavar="PY",
                    help="also the Triton table of the Triton beside this interpreter (repeatable)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cuda-only", action="store_true")
    g.add_argument("--triton-only", action="store_true")
    args = ap.parse_args(argv)
    bad = 0
    for which, fn in (("cuda", cuda_table), ("triton", triton_table)):
        if (which == "cuda" and args.triton_only) or (which == "triton" and args.cuda_only):
            continue
        rows, note = fn(args.arch, args.quick)
        print(f"\n{note}\n")
        if rows:
            print(HEADER)
            for u in rows:
                print(u.row(args.arch))
                bad += u.spill_st + u.spill_ld > 0
        elif "failed" in note:
            bad += 1
    if not args.cuda_only:
        for python in args.triton_python:
            text, n = triton_elsewhere(python, args.arch, args.quick)
            print(text)
            bad += n
    print(f"\n{bad} kernels spill or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
