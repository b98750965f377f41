"""What the build reports, and that a missing extension degrades to the reference backend with an
error that says how to build, instead of failing at import."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
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
    kernel's source: built here (at -O1, quicker; the benchmark itself says -O3) so that it cannot
    fall behind the kernel, and run on a tiny tensor."""
    exe = tmp_path / "kernel_cycles"
    subprocess.run(["g++", "-std=c++17", "-O1", "-ffp-contract=off", "-fopenmp", "-Wno-psabi", f"-I{ROOT / 'csrc'}",
                    "-o", str(exe), str(ROOT / "bench" / "kernel_cycles.cpp")], check=True, capture_output=True)
    out = subprocess.run([str(exe), "8", "100", "1", "3"], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert re.fullmatch(r"plain [\d.]+  rows [\d.]+  rows\+cols [\d.]+  cycles per element and thread \(1 threads, .+\)\n",
                        out), out
