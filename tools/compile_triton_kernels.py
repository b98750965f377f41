"""Compile the Triton backend's kernels ahead of time for the GPUs nm_optim targets, on a machine
without a GPU (Triton ships ptxas): type errors, unsupported casts and constexpr mistakes show up
here, not first on a borrowed GPU. Run by tests/test_triton.py in a subprocess (the kernels must be
defined outside the interpreter, so TRITON_INTERPRET must be unset).

    python tools/compile_triton_kernels.py [--arch 90 --arch 80] [--quick]

Prints each variant's registers and spills (ptxas), the first thing to read before a GPU run;
tools/kernel_resources.py adds spill bytes, shared memory and occupancy, and the CUDA kernels.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_triton_kernels.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import nm_optim.ops.triton.kernels as T  # noqa: E402

# Argument types as the launches pass them (kernels.ARG_TYPES, checked against Triton's launch
# binder by tests/test_triton_binder.py).
ARG_TYPES = T.ARG_TYPES
DTYPES = [(tl.float32, tl.int32, tl.float32, 4), (tl.float16, tl.int16, tl.float32, 8),
          (tl.bfloat16, tl.int16, tl.float32, 8), (tl.float64, tl.int64, tl.float64, 2)]
# Structural variants: everything on (momentum, weight decay, tensor lr, AMP), and the plainest.
FLAG_SETS = [
    dict(HAS_LR_PTR=True, HAS_SCALE=True, HAS_INF=True, HAS_WD=True, HAS_MOM=True, NESTEROV=True),
    dict(HAS_LR_PTR=False, HAS_SCALE=False, HAS_INF=False, HAS_WD=False, HAS_MOM=False, NESTEROV=False),
]


def variants(quick: bool):
    """(kernel name, kernel, constexprs) of every variant the launches use (launch.py): the step
    kernel without statistics and with (all 9 sums, or the 6 products: PRODUCTS), the statistics
    kernel with and without column partials, for all 9 sums and for the 6 products, each with
    16-byte vector accesses (ALIGNED) and without, for each dtype and switch set; the reduction.
    quick: float32 and bfloat16, every switch on, ALIGNED."""
    for dt, bits, ct, vec in DTYPES[::2] if quick else DTYPES:
        for flags in FLAG_SETS[:1] if quick else FLAG_SETS:
            consts = dict(BITS=bits, DT=dt, CT=ct, VEC=vec, **flags)
            for aligned in (True,) if quick else (True, False):
                for with_stats, products in ((False, False), (True, False), (True, True)):
                    yield "step", T.step_kernel, dict(consts, BLOCK=T.flat_block(with_stats, dt == tl.float64),
                                                      WITH_STATS=with_stats, PRODUCTS=products, ALIGNED=aligned)
                for cols in (True, False):
                    sub = T.sub_rows(cols, aligned, dt == tl.float64)
                    for products in (False, True):
                        yield "stats", T.stats_kernel, dict(consts, TILE_R=T.TILE_ROWS, SUB_R=sub,
                                                            BLOCK_C=T.BLOCK_COLS, COLS=cols, PRODUCTS=products,
                                                            ALIGNED=aligned)
    for has_inf in (True,) if quick else (True, False):
        yield "reduce", T.reduce_kernel, dict(TASKS=T.REDUCE_TASKS, CHUNK=T.REDUCE_CHUNK, HAS_INF=has_inf)


def num_warps(name: str, consts: dict) -> int:
    """The launch's num_warps for this variant (launch.py passes the same)."""
    return T.NUM_WARPS[name]


def resource_usage(cubin: bytes) -> str:
    """ptxas's registers / stack (spills) of a cubin, from the cuobjdump that Triton ships."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "registers: cuobjdump not found"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = [line.strip() for line in out.splitlines() if "REG:" in line]
    return " ".join(usage[0].split()[:2]) if usage else "registers: ?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="compute capability x 10 (default: 90 and 80)")
    ap.add_argument("--quick", action="store_true", help="float32 and bfloat16, every switch on, sm_90 only")
    ap.add_argument("--match", help="only the variants whose description (as printed) matches this regex")
    args = ap.parse_args(argv)
    failures = 0
    for arch in args.arch or ([90] if args.quick else [90, 80]):
        target = GPUTarget("cuda", arch, 32)
        for name, fn, consts in variants(args.quick):
            sig = {a: ("constexpr" if a in consts else ARG_TYPES[a]) for a in fn.arg_names}
            src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            options = {"num_warps": num_warps(name, consts)}
            what = f"sm_{arch} {name} {consts.get('DT', '')} " + " ".join(
                k for k, v in consts.items() if v is True)
            if args.match and not re.search(args.match, what):
                continue
            t0 = time.perf_counter()
            try:
                kernel = triton.compile(src, target=target, options=options)
            except Exception as e:  # report every failing variant, not just the first
                failures += 1
                print(f"FAIL {what}: {type(e).__name__}: {e}", flush=True)
                continue
            usage = resource_usage(kernel.asm["cubin"])
            print(f"ok   {what} ({time.perf_counter() - t0:.1f} s, {options['num_warps']} warps, {usage})", flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
