"""The statistics keep their documented accuracy (1e-6 of the summed magnitudes, against float64)
for every finite input whose products are finite in float64, not only for the magnitudes
training usually sees.

float32 (and bfloat16, whose range is float32's) products overflow past |x| ~ 1.8e19 and lose
precision below |x| ~ 1e-19 (their squares leave float32's normal range): |p| ~ 1e20 gave
Σp² = inf, |g| ~ 1e-25 gave Σg² = 0. Both CPU statistics kernels (AVX-512 where the CPU has it,
AVX2 elsewhere) must get these right: each chunk's magnitudes are checked before its products are
formed, and a chunk outside the safe range is reduced in float64 (csrc/cpu/sgd_step_cpu.cpp).
"""

from __future__ import annotations

import pytest
import torch
from helpers import axes_for, expected_stats, run_in_child

import nm_optim

pytestmark = pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"), reason="no compiled CPU kernel")

TOL = 1e-6

# Shapes whose rows have a vector body and a scalar tail, several row pairs and column folds
# (more than 30 rows), a conv with column groups of 9, and a flat tensor.
SHAPES = [(67, 45), (41, 5, 3, 3), (1037,), (3, 17)]

# (p magnitude, g magnitude, what): each outside float32 products' range in some way.
MAGNITUDES = [
    (1e20, 1.0, "p^2 overflows"),
    (1.0, 1e20, "g^2, v^2, gv overflow"),
    (1.0, 1e-25, "g^2, v^2 underflow to 0"),
    (1e-20, 1e-20, "every product subnormal"),
    (1e-40, 1.0, "subnormal params"),
    (5e37, 1e-30, "near float32's largest"),
    (1.0, 1.0, "ordinary"),
]


def _check(params, grads, opt, tracks, pre_v, *, grad_scale=1.0, maximize=False):
    pre_p = [p.detach().double().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if grad_scale != 1.0:
        opt.grad_scale = torch.tensor(grad_scale)
        opt.found_inf = torch.tensor(0.0)
    opt.step()
    want_g = [g.double() / grad_scale * (-1 if maximize else 1) for g in grads]
    index = {id(p): i for i, p in enumerate(params)}
    for (p, axis), got in zip(tracks, opt.last_stats()):
        i = index[id(p)]
        want, scale = expected_stats(pre_p[i], want_g[i], pre_v[i], axis)
        assert torch.isfinite(want).all(), "the reference must be finite for these inputs"
        assert torch.isfinite(got).all(), f"{tuple(p.shape)}:{axis}: non-finite statistics {got}"
        err = ((got - want).abs() / scale.clamp_min(1e-300)).max().item()
        assert err <= TOL, f"{tuple(p.shape)}:{axis}: relative error {err:.3e} of the summed magnitudes"


def _run(dtype, p_mag, g_mag, *, hyper, grad_scale=1.0, steps=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=gen, dtype=torch.float64) * p_mag).to(dtype).requires_grad_() for s in SHAPES]
    tracks = [(p, a) for p in params for a in axes_for(p.shape)]
    opt = nm_optim.SGD(params, backend="cpu", track=tracks, **hyper)
    for _ in range(steps):
        pre_v = [opt.state[p]["momentum_buffer"].double().clone() if p in opt.state
                 else torch.zeros(p.shape, dtype=torch.float64) for p in params]
        grads = [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * g_mag * grad_scale).to(dtype)
                 for p in params]
        _check(params, grads, opt, tracks, pre_v, grad_scale=grad_scale, maximize=hyper.get("maximize", False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p_mag,g_mag,what", MAGNITUDES, ids=[m[2] for m in MAGNITUDES])
def test_statistics_hold_their_accuracy_over_float32s_whole_range(dtype, p_mag, g_mag, what):
    # lr small enough that the stepped params stay finite; momentum: v comes from the grads.
    _run(dtype, p_mag, g_mag, hyper=dict(lr=1e-3, momentum=0.9, weight_decay=1e-2))


@pytest.mark.parametrize("p_mag,g_mag,what", MAGNITUDES[:4], ids=[m[2] for m in MAGNITUDES[:4]])
def test_the_range_check_sees_the_unscaled_gradient(p_mag, g_mag, what):
    """Under a GradScaler the stored grad is scale × g: the range that matters is g's, after the
    division (a scale that is not a power of two, and maximize)."""
    _run(torch.float32, p_mag, g_mag, hyper=dict(lr=1e-3, momentum=0.9, maximize=True, fused=True),
         grad_scale=3000.5)


def test_a_chunk_of_tiny_cross_terms_beside_ordinary_squares():
    """p large where g is tiny and the other way round: every square is a normal float32 but every
    product p·g is far below float32's range, and Σ|p·g| is all the scale Σpg has."""
    n = 4096
    p = torch.zeros(2, n)
    g = torch.zeros(2, n)
    p[:, 0::2], g[:, 0::2] = 2.0**-40, 2.0**-100
    p[:, 1::2], g[:, 1::2] = 2.0**-100, 2.0**-40
    params = [p.requires_grad_()]
    tracks = [(params[0], a) for a in ("rows", "cols", "all")]
    opt = nm_optim.SGD(params, lr=1e-3, backend="cpu", track=tracks)
    _check(params, [g], opt, tracks, [torch.zeros(2, n, dtype=torch.float64)])


def test_the_update_is_unchanged_where_a_chunk_takes_the_float64_statistics():
    """The range check only chooses how the statistics are summed: the step is bitwise the one
    without tracks (and torch's) on chunks of every kind, mixed in one tensor."""
    torch.manual_seed(0)
    base = torch.randn(64, 300, dtype=torch.float64)
    base[::3] *= 1e25
    base[1::5] *= 1e-30
    grad = torch.randn(64, 300, dtype=torch.float64)
    grad[:, ::7] *= 1e22
    results = []
    for track in (None, [("rows", "cols")]):
        p = base.float().requires_grad_()
        ref = torch.optim.SGD([p], lr=1e-3, momentum=0.9, weight_decay=1e-2) if track is None else None
        opt = ref or nm_optim.SGD([p], lr=1e-3, momentum=0.9, weight_decay=1e-2, backend="cpu",
                                  track=[(p, "rows"), (p, "cols")])
        for step in range(3):
            p.grad = (grad * (step + 1)).float()
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0].view(torch.int32), results[1].view(torch.int32))


def test_the_avx2_kernels_too():
    """CPUs without AVX-512 run the AVX2 statistics kernels (NM_OPTIM_NO_AVX512=1 selects them in
    a child process): the same cases."""
    code = (
        "import torch, nm_optim, test_stats_range as t\n"
        "assert 'AVX-512' not in nm_optim.build_info()['cpu_simd']\n"
        "for dt in (torch.float32, torch.bfloat16):\n"
        "    for p_mag, g_mag, _ in t.MAGNITUDES:\n"
        "        t._run(dt, p_mag, g_mag, hyper=dict(lr=1e-3, momentum=0.9, weight_decay=1e-2))\n"
        "for p_mag, g_mag, _ in t.MAGNITUDES[:4]:\n"
        "    t._run(torch.float32, p_mag, g_mag, hyper=dict(lr=1e-3, momentum=0.9, maximize=True, fused=True),\n"
        "           grad_scale=3000.5)\n"
        "t.test_a_chunk_of_tiny_cross_terms_beside_ordinary_squares()\n"
        "print('ok')\n"
    )
    run_in_child(code, NM_OPTIM_NO_AVX512="1")


def test_float64_needs_no_check():
    _run(torch.float64, 1e150, 1e-150, hyper=dict(lr=1e-3, momentum=0.9, weight_decay=1e-2))

