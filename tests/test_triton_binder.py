"""The types Triton gives the kernels' arguments at a launch on an H100 (sm_90), without a GPU.

A launch of a Triton kernel first runs the kernel's *binder* (triton/runtime/jit.py:
create_function_from_signature), which types each runtime argument from the kernel's annotations
or, where there is none, from the Python value: a Python float becomes fp32. The hyper-parameters
must be float64, as torch's fused CUDA SGD (FusedSgdKernel.cu) and csrc/cuda take them: an fp32
lr, weight decay, momentum or 1 - dampening changes the update's bits. Triton's interpreter
(TRITON_INTERPRET=1, how CI runs the kernels) passes Python floats unrounded, and
tools/compile_triton_kernels.py compiles with types it is given, so neither can see a wrong
binding; this file can.

The launches are those of nm_optim/ops/triton/launch.py, recorded (not run) during real steps
of nm_optim.SGD with every runtime argument in play (tensor lr, GradScaler's scale and inf flag,
momentum, weight decay, nesterov, maximize, statistics with two reduction levels) and of the op
with product-only statistics beside all-9 ones (the PRODUCTS variants), for each dtype; each
launch is then bound by Triton's binder for an sm_90 target.
"""

import pytest
import torch

import nm_optim
from nm_optim.ops import plan as P
from nm_optim.ops.triton import kernels as K

pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend types the launches for sm_90")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in nm_optim.available_backends(DEVICE),
    reason=f"backend 'triton' not available for {DEVICE} here (needs triton; on CPU, TRITON_INTERPRET=1)",
)

# The hyper-parameters: float64 on every launch, whatever the dtype of the tensors.
FLOAT64_SCALARS = ("lr", "wd", "mom", "one_minus_damp", "gmul")
# Pointer arguments a variant reads only under a switch (else the launch passes any tensor).
READ_ONLY_WITH = {"lr_ptr": "HAS_LR_PTR", "scale_ptr": "HAS_SCALE", "inf_ptr": "HAS_INF"}
KERNELS = ("step_kernel", "stats_kernel", "reduce_kernel")


def sm90_binder(kernel):
    """Triton's launch binder of `kernel` for an H100, built as JITFunction.create_binder builds
    it but for a named target instead of the current device's. Under the interpreter the module
    holds an InterpretedFunction: the JITFunction that triton.jit makes of the same function
    without it (on a GPU machine, the module's own)."""
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    return jit, create_function_from_signature(jit.signature, jit.params, backend)


def record_launches(monkeypatch, dtype):
    """Every kernel launch of two steps (the buffers' first step, then a step that reads them),
    as (kernel name, args, kwargs); nothing runs (the launches are recorded only)."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, args, kwargs))

    for name in KERNELS:
        monkeypatch.setattr(K, name, Recorder(name))
    monkeypatch.setattr(P, "REDUCE_CHUNK", 2)  # long groups: the first reduction level runs too
    torch.manual_seed(0)
    shapes = [(20000,), (33,), (40, 64), (17, 12), (3, 4, 3, 3)]
    params = [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for s in shapes]
    tracks = [(params[1], "rows"), (params[2], "cols"), (params[2], "rows"), (params[2], "all"),
              (params[3], "rows"), (params[4], "cols")]
    opt = nm_optim.SGD(params, lr=torch.tensor(0.1, device=DEVICE), momentum=0.9, dampening=0.1,
                       weight_decay=0.01, nesterov=False, maximize=True, fused=True, backend="triton",
                       track=tracks)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.grad_scale = torch.tensor(3000.0, device=DEVICE)
        opt.found_inf = torch.tensor(0.0, device=DEVICE)
        opt.step()
    plain = nm_optim.SGD([torch.randn(7, device=DEVICE).to(dtype).requires_grad_()], lr=0.1, backend="triton")
    plain.param_groups[0]["params"][0].grad = torch.ones(7, device=DEVICE, dtype=dtype)
    plain.step()  # no momentum, no weight decay, a float lr, no AMP: the plainest variant
    # Product-only statistics (names.PRODUCT_SUMS_MASK) beside all-9 ones, through the op: flat
    # tiles of a 1-D "rows" track and 2-D tiles with and without column partials in both variants.
    from nm_optim.names import ALL_SUMS_MASK, PRODUCT_SUMS_MASK

    ts = [torch.randn(s, device=DEVICE).to(dtype) for s in [(33,), (40, 64), (17, 12), (9,), (8, 8)] for _ in range(3)]
    params, grads, bufs = ts[0::3], ts[1::3], ts[2::3]
    offsets = [0, -1, 33, 34, 74, 138, 139, -1, -1, 156, -1, 165, 166, 174, -1]
    stats = torch.zeros(182, 9, dtype=torch.float64, device=DEVICE)
    torch.ops.nm_optim.sgd_step_(params, grads, bufs, [False] * 5, 0.1, None, 0.01, 0.9, 0.0, False, False, None,
                                 None, "triton", stats, offsets,
                                 [PRODUCT_SUMS_MASK, PRODUCT_SUMS_MASK, PRODUCT_SUMS_MASK, ALL_SUMS_MASK, ALL_SUMS_MASK])
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=["f32", "f16", "bf16", "f64"])
def test_every_launch_binds_the_hyper_parameters_as_float64_for_sm90(monkeypatch, dtype):
    launches = record_launches(monkeypatch, dtype)
    monkeypatch.undo()  # the real kernels again
    kernels = {name: getattr(K, name) for name in KERNELS}
    binders = {name: sm90_binder(kernels[name]) for name in KERNELS}
    seen = {name: set() for name in KERNELS}
    for name, args, kwargs in launches:
        jit, binder = binders[name]
        bound, specialization, _ = binder(*args, **kwargs)
        types = {p.name: spec[0] for p, spec in zip(jit.params, specialization)}
        for arg, ty in types.items():
            if ty == "constexpr":
                continue
            seen[name].add(arg)
            switch = READ_ONLY_WITH.get(arg)
            if switch is not None and not bound[switch]:
                assert ty.startswith("*"), f"{name}: {arg} bound as {ty}, not a pointer"
                continue
            want = "fp64" if arg in FLOAT64_SCALARS else K.ARG_TYPES[arg]
            assert ty == want, f"{name} ({dtype}): {arg} bound as {ty}, want {want} (kernels.ARG_TYPES)"
    # Every kernel launched, every runtime argument of each checked, every switch seen both ways.
    for name in KERNELS:
        jit = binders[name][0]
        assert seen[name] == {p.name for p in jit.params if not p.is_constexpr}, (name, seen[name])
    step_flags = {(kw["WITH_STATS"], kw["HAS_LR_PTR"], kw["HAS_SCALE"]) for n, _, kw in launches if n == "step_kernel"}
    assert {(False, True, True), (True, True, True), (False, False, False)} <= step_flags, step_flags
    assert {(kw["COLS"], kw["PRODUCTS"]) for n, _, kw in launches if n == "stats_kernel"} == {
        (True, False), (False, False), (True, True), (False, True)}
    assert {kw["PRODUCTS"] for n, _, kw in launches if n == "step_kernel" and kw["WITH_STATS"]} == {True, False}
    reduce_outs = {id(a[3]) for n, a, _ in launches if n == "reduce_kernel"}
    assert len(reduce_outs) >= 2, "one reduction level only"


def test_the_binder_types_an_unannotated_python_float_as_fp32():
    """The binder's default for an unannotated float (the defect the annotations prevent): the
    sm_90 binder of a kernel without them gives fp32, so the test above can fail."""
    import triton

    def bare(x, lr):
        pass

    jit = triton.runtime.jit.JITFunction(bare)
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
    _, specialization, _ = binder(torch.zeros(4), 0.1)
    assert specialization[1][0] == "fp32"
