"""What the build reports, and that a missing extension degrades to the reference backend with an
error that says how to build, instead of failing at import."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nm_optim
from nm_optim.ops import extension, registry

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_reports_the_build():
    info = nm_optim.build_info()
    assert info["version"] == nm_optim.__version__
    assert isinstance(info["cuda_compiled"], bool) and isinstance(info["openmp"], bool)
    assert isinstance(info["cuda_archs"], list)
    if info["cuda_compiled"]:
        assert info["cuda_archs"], "a CUDA build names its architectures"


def test_available_backends_per_device():
    cpu = nm_optim.available_backends("cpu")
    assert cpu[0] == "reference"
    assert ("cpu" in cpu) == nm_optim.build_info()["extension"]
    cuda = nm_optim.available_backends("cuda")
    assert "cpu" not in cuda and ("cuda" in cuda) == (
        torch.cuda.is_available() and nm_optim.build_info()["cuda_compiled"]
    )


def test_without_the_extension_reference_still_works_and_native_says_how_to_build(monkeypatch):
    monkeypatch.setattr(extension, "_C", None)
    monkeypatch.setattr(extension, "_C_IMPORT_ERROR", ImportError("no module named nm_optim._C"))
    registry.require_backend.cache_clear()
    registry.default_backend.cache_clear()
    try:
        # Triton (under TRITON_INTERPRET=1 on CPU tensors) needs no compiled module either.
        assert [b for b in nm_optim.available_backends("cpu") if b != "triton"] == ["reference"]
        assert nm_optim.build_info()["extension"] is False
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        nm_optim.SGD([p], lr=0.5).step()  # auto -> reference
        assert torch.equal(p.detach(), torch.full((3,), 0.5))
        with pytest.raises(ImportError, match=r"pip install"):
            nm_optim.SGD([p], lr=0.5, backend="cpu").step()
    finally:
        registry.require_backend.cache_clear()
        registry.default_backend.cache_clear()


def test_auto_picks_the_compiled_kernel_when_there_is_one():
    expected = "cpu" if "cpu" in nm_optim.available_backends("cpu") else "reference"
    assert registry.default_backend(torch.device("cpu")) == expected


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
                    reason="bench/kernel_cycles.cpp reads the x86 time-stamp counter and is built with g++")
def test_the_kernel_cycles_benchmark_builds_and_runs(tmp_path):
    """bench/kernel_cycles.cpp (the cycles-per-element numbers of docs/architecture.md) includes the
    kernel's source: built here (at -O0: 30 s against 80 s at -O1 and 4 minutes at -O3, the
    benchmark's own flag) so that it cannot fall behind the kernel, and run on a tiny tensor."""
    exe = tmp_path / "kernel_cycles"
    subprocess.run(["g++", "-std=c++17", "-O0", "-ffp-contract=off", "-fopenmp", "-Wno-psabi", f"-I{ROOT / 'csrc'}",
                    "-o", str(exe), str(ROOT / "bench" / "kernel_cycles.cpp")], check=True, capture_output=True)
    for rest in ("1", "4"):  # columns of 4 elements: the fold of grouped columns
        out = subprocess.run([str(exe), "8", "100", "1", "3", rest], check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        assert re.fullmatch(r"plain [\d.]+  rows [\d.]+  rows\+cols [\d.]+  rows\(6\) [\d.]+  rows\+cols\(6\) [\d.]+  "
                            r"cycles per element and thread "
                            r"\(1 threads, .+\)\n", out), out


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None
                    or shutil.which("objdump") is None,
                    reason="bench/loop_counts.py disassembles the x86-64 two-variant build (g++, objdump)")
def test_the_statistics_loops_move_the_bytes_the_design_says():
    """bench/loop_counts.py counts the kernel's compiled hot loops (docs/architecture.md, "The CPU
    statistics: what bounds them"). Per element of fp32 with momentum: the plain step and the row
    statistics store only p and v (8 bytes; the 9 row sums stay in registers, the row loop loads
    p, g, v once: 12 bytes); rows + cols add one read-modify-write of the 9 column partials per
    two rows (9 x 4 / 2 = 18 bytes stored), and nothing spills. A track that needs only the 6
    products (the scale and rescale laws' sums) runs one pass and moves a third less: 6 partials
    per two rows (12 bytes stored), p, g, v read once."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import loop_counts
    finally:
        sys.path.remove(str(ROOT / "bench"))
    loops = loop_counts.count()
    plain, rows, cols, products, check = (loops[name] for name in loop_counts.LOOPS)
    assert plain["store_bytes"] == 8
    assert (rows["load_bytes"], rows["store_bytes"]) == (12, 8)
    assert cols["store_bytes"] == 8 + 18
    # p and g are read by both passes, v by the second; the partials once per two rows. The
    # second pass reads g twice from L1 (folded into two operations: the register allocator's
    # choice under the pass's 32-register budget, 4 bytes per element that are not memory traffic)
    assert cols["load_bytes"] == (8 + 8 + 4) + 18 + 4
    # per 16-element vector: the 9 terms (6 products as fmas, 3 adds) and the update's 4
    # (weight decay, buf * momentum, + (1 - dampening) * d, the step); the maximize sign is an
    # integer xor in a copy of the loop of its own, not a multiply
    assert (rows["fma"] * 16, rows["add"] * 16) == (6 + 4, 3)
    # statistics by need: the product-only kernel in one pass, without spills
    assert products["store_bytes"] == 8 + 12
    assert products["load_bytes"] == 12 + 12
    assert products["instructions"] < cols["instructions"]
    # the float32 range check before each chunk (csrc/cpu/product_range.h) reads p, g, v once more
    # (from L1) and does four integer operations per vector and input: no float work, no stores
    assert (check["load_bytes"], check["store_bytes"], check["fma"], check["add"]) == (12, 0, 0, 0)
    assert check["vector_other"] * 8 == 3 * 4  # per vector of 8 elements: 4 per input (the load folded in)
