"""The CPU kernels' product-only variants (statistics by need, csrc/cpu): a tensor whose tracks
ask only for the 6 products runs kernels that leave Σp, Σg, Σv out, and everything they do
compute is the all-9 kernels' computation in the same order. So, for every storage type, shape
(vector bodies, scalar tails, chunks, folds), track axis and step variant, on both statistics
kernels (AVX-512 where the CPU has it; AVX2 in a child process with NM_OPTIM_NO_AVX512=1) and on
the unfused variant (ATEN_CPU_CAPABILITY=default, which reduces all 9 and writes NaN outside the
mask): the kept sums, the params, the buffers and the grads are bitwise those of the same step with
all 9 sums, and the other columns are NaN."""

from __future__ import annotations

import pytest
import torch
from helpers import run_in_child

import nm_optim
from nm_optim.names import PRODUCT_SUMS, STAT_INDEX, STAT_NAMES

pytestmark = pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"),
                                reason="needs the compiled CPU kernel")

ABSENT = [STAT_INDEX[n] for n in STAT_NAMES if n not in PRODUCT_SUMS]
PRESENT = [STAT_INDEX[n] for n in PRODUCT_SUMS]
# rows + cols over tails and several chunks; a conv-like tensor (columns of 9); a 1-D tensor
SHAPES = [(37, 53), (70, 300), (12, 8, 3, 3), (301,)]
STEPS = [dict(lr=1e-2, momentum=0.9, weight_decay=1e-3), dict(lr=1e-2, momentum=0.9, nesterov=True),
         dict(lr=1e-2), dict(lr=1e-2, momentum=0.9, dampening=0.1, maximize=True)]


def _run(dtype: torch.dtype, shape: tuple[int, ...], hyper: dict, sums, grad_scale: float | None = None):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    axes = ["rows", "all"] + (["cols"] if len(shape) > 1 else [])
    track = [(p, a) if sums is None else (p, a, sums) for a in axes]
    fused = grad_scale is not None  # as torch.amp.GradScaler hands a fused optimizer its scale
    opt = nm_optim.SGD([p], backend="cpu", track=track, fused=fused or None, **hyper)
    opt.recorder.enabled = False
    out = []
    for k in range(3):  # the first step creates the buffers; the later ones read them
        g = torch.randn(shape, generator=gen).to(dtype) * (k + 1)
        p.grad = g * grad_scale if fused else g
        if fused:
            opt.grad_scale = torch.tensor(grad_scale)
        opt.step()
        out.append(torch.cat([s.reshape(-1, 9) for s in opt.last_stats()]))
    buf = opt.state[p].get("momentum_buffer")
    return out, p.detach().clone(), None if buf is None else buf.clone(), p.grad.clone()


def check(dtype: torch.dtype, shape: tuple[int, ...], hyper: dict, grad_scale: float | None = None) -> None:
    few, p6, v6, g6 = _run(dtype, shape, hyper, PRODUCT_SUMS, grad_scale)
    nine, p9, v9, g9 = _run(dtype, shape, hyper, None, grad_scale)
    for a, b in zip(few, nine):
        assert a[:, ABSENT].isnan().all() and b.isfinite().all(), (dtype, shape, hyper)
        assert torch.equal(a[:, PRESENT], b[:, PRESENT]), (dtype, shape, hyper)
    assert torch.equal(p6, p9) and torch.equal(g6, g9), (dtype, shape, hyper)
    assert (v6 is None and v9 is None) or torch.equal(v6, v9), (dtype, shape, hyper)


def check_all(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16)) -> None:
    for dtype in dtypes:
        for shape in SHAPES:
            for hyper in STEPS:
                check(dtype, shape, hyper)
    check(torch.float32, (70, 300), dict(lr=1e-2, momentum=0.9), grad_scale=3000.5)


def test_product_only_kernels_keep_the_all_nine_bits():
    check_all()


def test_the_avx2_kernels_too():
    run_in_child("import torch, nm_optim, test_stats_by_need_cpu as t\n"
                 "assert 'AVX-512' not in nm_optim.build_info()['cpu_simd']\n"
                 "t.check_all()\nprint('ok')\n", NM_OPTIM_NO_AVX512="1")


def test_the_unfused_variant_writes_nan_outside_the_mask():
    run_in_child("import torch, test_stats_by_need_cpu as t\n"
                 "t.check_all((torch.float32, torch.bfloat16))\nprint('ok')\n", ATEN_CPU_CAPABILITY="default")
