"""The 9 statistics of every tracked group, reduced in the step's own pass, equal a float64
computation from the pre-step tensors: every backend, awkward shapes, several tracks per tensor,
tracks across param groups and dtypes; deterministic; NaN where nothing was stepped."""

from __future__ import annotations

import pytest
import torch
from helpers import SHAPES, axes_for, device_backends, run_and_check, run_in_child

import nm_optim


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize(
    "hyper",
    [dict(), dict(momentum=0.9, dampening=0.1, weight_decay=1e-2), dict(momentum=0.9, nesterov=True, maximize=True)],
    ids=["plain", "momentum_dampening_wd", "nesterov_maximize"],
)
def test_stats_match_float64_from_pre_step_tensors(device, backend, hyper):
    torch.manual_seed(0)
    params = [torch.randn(s, device=device, requires_grad=True) for s in SHAPES]
    tracks = [(p, axis) for p in params for axis in axes_for(p.shape)]
    opt = nm_optim.SGD(params, lr=0.05, backend=backend, track=tracks, **hyper)
    run_and_check(params, opt, tracks, steps=3, maximize=hyper.get("maximize", False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cols_groups_of_every_width_on_the_cpu(dtype):
    """A cols group of a [d0, d1, rest] tensor is `rest` consecutive elements of every row (a conv's
    kernel window, the positions of a channel after Flatten): the CPU kernel sums them 4 at a time
    and then the tail, so widths below, at and past multiples of 4 each meet another path; 49 is
    VGG-16's fc1 as find_symmetries sees it. More rows than one fold (30) and an odd count."""
    if "cpu" not in nm_optim.available_backends("cpu"):
        pytest.skip("the compiled CPU kernel is not built")
    torch.manual_seed(0)
    params = [torch.randn((37, 3, rest), dtype=dtype, requires_grad=True) for rest in (2, 3, 4, 5, 8, 9)]
    params.append(torch.randn((33, 4, 7, 7), dtype=dtype, requires_grad=True))
    tracks = [(p, axis) for p in params for axis in ("rows", "cols")]
    opt = nm_optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2, backend="cpu", track=tracks)
    run_and_check(params, opt, tracks, steps=2)


@pytest.mark.parametrize("device,backend", device_backends())
def test_g_is_the_unscaled_gradient_under_amp(device, backend):
    params = [torch.randn(s, device=device, requires_grad=True) for s in [(40, 30), (17,)]]
    tracks = [(params[0], "rows"), (params[0], "cols"), (params[1], "all")]
    opt = nm_optim.SGD(params, lr=0.05, momentum=0.9, backend=backend, track=tracks)
    run_and_check(params, opt, tracks, steps=3, grad_scale=1024.0)


@pytest.mark.parametrize("device,backend", device_backends())
def test_tracks_across_param_groups_and_dtypes(device, backend):
    torch.manual_seed(1)
    a = torch.randn(20, 30, device=device, requires_grad=True)
    b = torch.randn(50, dtype=torch.bfloat16, device=device, requires_grad=True)
    c = torch.randn(8, 4, 3, dtype=torch.float16, device=device, requires_grad=True)
    d = torch.randn(9, 9, dtype=torch.float64, device=device, requires_grad=True)
    params = [a, b, c, d]
    tracks = [(a, "cols"), (b, "rows"), (c, "rows"), (c, "cols"), (d, "all"), (a, "rows")]
    opt = nm_optim.SGD(
        [{"params": [a, b]}, {"params": [c, d], "lr": 0.01, "momentum": 0.5}], lr=0.1, backend=backend, track=tracks
    )
    run_and_check(params, opt, tracks, steps=3)


@pytest.mark.parametrize("device,backend", device_backends())
def test_stats_are_deterministic_run_to_run(device, backend):
    def run():
        torch.manual_seed(3)
        params = [torch.randn(s, device=device, requires_grad=True) for s in [(300, 500), (64, 32, 3, 3), (1000,)]]
        tracks = [(p, axis) for p in params for axis in axes_for(p.shape)]
        opt = nm_optim.SGD(params, lr=0.05, momentum=0.9, backend=backend, track=tracks)
        out = []
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(device)
            opt.step()
            out += opt.last_stats()
        return out

    for x, y in zip(run(), run()):
        assert torch.equal(x, y)


def test_duplicate_tracks_share_one_block_and_layers_tracks_everything():
    lin = torch.nn.Linear(4, 3)
    opt = nm_optim.SGD(lin.parameters(), lr=0.1, track=[(lin.weight, "rows"), (lin.weight, "rows")])
    assert opt.tracks[0] is opt.tracks[1]
    opt2 = nm_optim.SGD(lin.named_parameters(), lr=0.1, track="layers")
    assert [t.name for t in opt2.tracks] == ["weight:all", "bias:all"]
    assert [t.num_groups for t in opt2.tracks] == [1, 1]


def test_groups_not_stepped_read_nan():
    a = torch.nn.Parameter(torch.randn(5, 2))
    b = torch.nn.Parameter(torch.randn(3))
    opt = nm_optim.SGD([a, b], lr=0.1, momentum=0.9, track=[(a, "rows"), (b, "all")])
    a.grad = torch.randn(5, 2)
    opt.step()  # b has no grad: not stepped
    sa, sb = opt.last_stats()
    assert not sa.isnan().any() and sb.isnan().all()
    b.grad = torch.randn(3)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()  # skipped by found_inf (and b would create state: the step is skipped whole)
    assert all(s.isnan().all() for s in opt.last_stats())


def test_track_errors_name_the_problem():
    lin = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"axis must be one of"):
        nm_optim.SGD(lin.parameters(), track=[(lin.weight, "diagonal")])
    with pytest.raises(ValueError, match=r"'bias:cols'|track 'bias': axis 'cols' needs"):
        nm_optim.SGD(lin.named_parameters(), track=[(lin.bias, "cols")])
    with pytest.raises(ValueError, match=r"not a parameter of this optimizer"):
        nm_optim.SGD([lin.weight], track=[(lin.bias, "all")])
    with pytest.raises(ValueError, match=r"'layers'"):
        nm_optim.SGD(lin.parameters(), track="neurons")
    with pytest.raises(TypeError, match=r"\(param, axis\) pair"):
        nm_optim.SGD(lin.parameters(), track=[lin.weight])


@pytest.mark.skipif("cpu" not in nm_optim.available_backends("cpu"), reason="no compiled CPU kernel")
def test_the_avx2_statistics_kernels_where_avx512_is_off():
    """Tracked float32 / float64 tensors run AVX-512 kernels where the CPU has them (build_info
    says which); CPUs without them run the AVX2 kernels, kept covered here by switching the AVX-512
    ones off (NM_OPTIM_NO_AVX512=1, read once: a child process). Statistics within 1e-6 of float64 and the
    update bitwise the one without tracks, float32 and float64."""
    code = (
        "import torch, nm_optim, helpers, test_bitwise as tb\n"
        "assert 'AVX-512' not in nm_optim.build_info()['cpu_simd']\n"
        "for dt in (torch.float32, torch.float64):\n"
        "    torch.manual_seed(0)\n"
        "    params = [torch.randn(s, dtype=dt, requires_grad=True) for s in helpers.SHAPES if len(s) > 1]\n"
        "    tracks = [(p, a) for p in params for a in ('rows', 'cols', 'all')]\n"
        "    opt = nm_optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, backend='cpu', track=tracks)\n"
        "    helpers.run_and_check(params, opt, tracks, 3)\n"
        "    tb.tracked_vs_plain([(37, 5), (130, 9), (5, 3, 3, 3), (2049,)], dt, dict(lr=0.1, momentum=0.9), 2,\n"
        "                        'cpu', 1, 2)\n"
        "print('ok')\n"
    )
    run_in_child(code, NM_OPTIM_NO_AVX512="1")
