"""Column blocks: a "cols" track whose groups are `block` consecutive columns of dim 1 (the
columns one conv channel feeds into a Linear after a Flatten), reduced by the kernels as the
[d0, d1 / block, block × rest] view of the same memory (nm_optim/tracks.py, ops/layout.py).

A blocked group's sums are the sums of its columns' sums: every backend's blocked track equals
the unblocked track folded (within float64 rounding: the order of the additions differs), the
update does not change at all, and the symmetries that ask for blocks give the laws the numbers
they had when the blocks were folded in Python."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nm_optim
import nm_optim.theory
from nm_optim.names import PRODUCT_SUMS_MASK, STAT_NAMES
from nm_optim.ops.reference import compute_dtype

OP = torch.ops.nm_optim.sgd_step_
NAN_ROWS = 64


def _step(backend: str, shape: tuple[int, ...], block: int, dtype: torch.dtype = torch.float32,
          sums: int | None = None, order: tuple[int, ...] | None = None, steps: int = 2, device: str = "cpu"):
    """`steps` SGD steps of one tensor with a rows and a cols track (column block `block`);
    the last step's rows and cols statistics and the param afterwards. `order`: a permutation
    the tensors' memory follows (the op's storage-view path)."""
    gen = torch.Generator().manual_seed(7)

    def make() -> torch.Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        if order is not None:
            t = t.permute(order).contiguous().permute(np.argsort(order).tolist())
        return t

    p, v = make(), make()
    d0, d1 = shape[0], shape[1]
    for k in range(steps):
        g = make()
        stats = torch.full((NAN_ROWS + d0 + d1, 9), float("nan"), dtype=torch.float64, device=device)
        OP([p], [g], [v], [k == 0], 0.1, None, 0.01, 0.9, 0.0, False, False, None, None, backend, stats,
           [0, d0, -1], [] if sums is None else [sums], [block] if block != 1 else [])
    return stats[:d0].cpu(), stats[d0 : d0 + d1 // block].cpu(), p.cpu()


def _fold(cols: torch.Tensor, block: int) -> torch.Tensor:
    return cols.view(-1, block, 9).sum(1)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to the rounding of float32 column partials (the CPU kernel keeps a column's
    partials in the compute type for a few rows: docs/statistics.md) or of float64 sums."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    scale = want.abs().amax(0, keepdim=True).clamp_min(1.0)
    assert torch.equal(got.isnan(), want.isnan())
    assert ((got - want).abs() / scale).nan_to_num(0.0).max().item() <= tol


SHAPES = [((6, 12), 3), ((5, 10, 3), 5), ((4, 50), 25), ((7, 98), 49), ((3, 8, 2, 2), 8)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_blocked_track_is_the_unblocked_track_folded(backend, shape, block, dtype):
    if backend == "cpu" and "cpu" not in nm_optim.available_backends():
        pytest.skip("the compiled extension is not built")
    rows1, cols1, p1 = _step(backend, shape, 1, dtype)
    rows, cols, p = _step(backend, shape, block, dtype)
    assert torch.equal(p, p1)  # the update is element-wise: the view changes nothing
    _close(rows, rows1, dtype)
    _close(cols, _fold(cols1, block), dtype)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_backend_reduces_the_blocked_groups_of_the_float64_reference(backend, shape, block, dtype):
    """On a GPU the CUDA and Triton kernels (bench/gpu_check.sh runs this file); here the
    compiled CPU kernel, and Triton in its interpreter where installed (TRITON_INTERPRET=1). The
    update is the unblocked step's, to the bit."""
    device = "cpu" if backend == "cpu" else DEVICE
    if backend not in nm_optim.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available for {device} here")
    _, want, _ = _step("reference", shape, block, torch.float64, device=device)
    rows1, cols1, p1 = _step(backend, shape, 1, dtype, device=device)
    rows, got, p = _step(backend, shape, block, dtype, device=device)
    assert torch.equal(p, p1)
    _close(rows, rows1, dtype)
    _close(got, _fold(cols1, block), dtype)
    _close(got, want, dtype)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_blocks_with_the_product_sums_leave_the_other_columns_nan(backend):
    if backend == "cpu" and "cpu" not in nm_optim.available_backends():
        pytest.skip("the compiled extension is not built")
    _, cols, _ = _step(backend, (7, 98), 49, sums=PRODUCT_SUMS_MASK)
    _, all9, _ = _step(backend, (7, 98), 49)
    products = [k for k in range(9) if PRODUCT_SUMS_MASK >> k & 1]
    assert cols[:, [k for k in range(9) if k not in products]].isnan().all()
    assert torch.equal(cols[:, products], all9[:, products])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_permuted_tensor_folds_its_view_groups_into_the_blocks(backend):
    """A transposed or channels_last tensor goes through its storage view (ops/op.py,
    _step_permuted): its logical columns are folded into the blocks afterwards."""
    if backend == "cpu" and "cpu" not in nm_optim.available_backends():
        pytest.skip("the compiled extension is not built")
    for shape, block, order in (((6, 12), 3, (1, 0)), ((3, 8, 2, 2), 4, (0, 2, 3, 1))):
        rows1, cols1, p1 = _step("reference", shape, 1, torch.float64)
        rows, cols, p = _step(backend, shape, block, torch.float64, order=order)
        assert torch.equal(p, p1)
        _close(rows, rows1, torch.float64)
        _close(cols, _fold(cols1, block), torch.float64)


@pytest.mark.parametrize("bad,message", [([5], "stats_blocks\\[0\\].*is 5"), ([0], "is 0"),
                                         ([3, 3], "one block per param")])
def test_the_op_refuses_a_block_that_does_not_split_the_columns(bad, message):
    p, g = torch.zeros(4, 12), torch.zeros(4, 12)
    stats = torch.zeros(20, 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        OP([p], [g], [], [], 0.1, None, 0.0, 0.0, 0.0, False, False, None, None, "reference", stats,
           [-1, 0, -1], [], bad)


# -- tracks --------------------------------------------------------------------------------------

def _fc(cols: int = 98) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(cols, 5)


def test_a_track_asks_for_a_block_and_the_record_says_so(tmp_path):
    fc = _fc()
    opt = nm_optim.SGD(fc.parameters(), lr=0.1, track=[(fc.weight, "cols", None, 49), (fc.weight, "rows")])
    cols = opt.tracks[0]
    assert (cols.num_groups, cols.block, opt.tracks[1].block) == (2, 49, 1)
    fc(torch.randn(3, 98)).sum().backward()
    opt.step()
    stats = opt.last_stats()[0]
    assert stats.shape == (2, 9)
    record = nm_optim.load_record(opt.recorder.save(tmp_path / "r.npz"))
    assert [t["block"] for t in record.tracks] == [49, 1]
    assert record.stats[0].shape == (1, 2, 9)
    folder = opt.recorder.stream_to(tmp_path / "stream")
    opt.step()
    opt.recorder.close()
    streamed = nm_optim.load_record(folder)
    assert [t["block"] for t in streamed.tracks] == [49, 1]
    assert streamed.stats[0].shape == (2, 2, 9)
    np.testing.assert_array_equal(streamed.stats[0][0], record.stats[0][0])


def test_a_param_has_one_cols_track_with_the_gcd_of_the_blocks_asked():
    fc = _fc()
    opt = nm_optim.SGD(fc.parameters(), lr=0.1, track=[(fc.weight, "cols", None, 49), (fc.weight, "cols", None, 14)])
    assert [t.block for t in opt.tracks] == [7, 7] and opt.tracks[0].num_groups == 14
    opt = nm_optim.SGD(fc.parameters(), lr=0.1, track=[(fc.weight, "cols", None, 49), (fc.weight, "cols")])
    assert [t.block for t in opt.tracks] == [1, 1] and opt.tracks[0].num_groups == 98


@pytest.mark.parametrize("track,message", [
    (lambda fc: (fc.weight, "cols", None, 5), "do not split into blocks of 5"),
    (lambda fc: (fc.weight, "cols", None, 0), "block must be a positive int"),
    (lambda fc: (fc.weight, "cols", None, True), "block must be a positive int"),
    (lambda fc: (fc.weight, "rows", None, 2), "axis 'cols' only"),
])
def test_a_bad_block_is_named_with_its_track(track, message):
    fc = _fc()
    with pytest.raises(ValueError, match=message) as err:
        nm_optim.SGD(fc.named_parameters(), lr=0.1, track=[track(fc)])
    assert "track weight:" in str(err.value)


# -- symmetries ------------------------------------------------------------------------------------

def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 12), nn.ReLU(),
                         nn.Linear(12, 10))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 4, step=None) -> None:
    """`steps` steps on fixed batches; `step`: what steps (default opt.step, e.g. a compiled one)."""
    for k in range(steps):
        gen = torch.Generator().manual_seed(k)
        x, y = torch.randn(6, 3, 4, 4, generator=gen), torch.randint(0, 10, (6,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        (step or opt.step)()


def test_symmetries_after_a_flatten_track_one_group_per_channel_and_keep_their_laws():
    """find_symmetries' rescale across Flatten: the Linear's cols track asks for the block of
    16 columns per channel; the laws read the same numbers as from a track of one group per
    column (folded in Python), to float64 rounding. (The classifier's columns stay one group each:
    its translation law needs them.)"""
    x = torch.randn(2, 3, 4, 4)
    model = _convnet()
    syms = nm_optim.find_symmetries(model, x, loss=F.cross_entropy)
    blocked = nm_optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, symmetries=syms)
    cols = [t for t in blocked.tracks if t.axis == "cols"]
    assert [(t.name, t.block, t.num_groups) for t in cols] == [("3.weight:cols", 16, 8), ("5.weight:cols", 1, 12)]
    _train(model, blocked)

    model2 = _convnet()
    syms2 = nm_optim.find_symmetries(model2, x, loss=F.cross_entropy)
    per_column = nm_optim.SGD(model2.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, symmetries=syms2,
                              track=[(model2[3].weight, "cols")])
    assert [t.num_groups for t in per_column.tracks if t.axis == "cols"] == [128, 12]
    _train(model2, per_column)

    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    ra, rb = blocked.recorder.snapshot(), per_column.recorder.snapshot()
    for sa, sb in zip(syms, syms2):
        ga, gb = sa.group_stats(ra), sb.group_stats(rb)
        for role in ga:
            cols = [STAT_NAMES.index(n) for n in nm_optim.names.LAW_SUMS[sa.kind]]
            np.testing.assert_allclose(ga[role][..., cols], gb[role][..., cols], rtol=1e-5, atol=1e-9)
        pa, pb = nm_optim.theory.predict(ra, sa), nm_optim.theory.predict(rb, sb)
        np.testing.assert_allclose(pa.exact, pb.exact, rtol=1e-5, atol=1e-9)


def test_find_symmetries_on_the_real_vgg16_tracks_fc1_as_512_groups_of_49():
    """README's claim behind the 224 x 224 number: the rescale across VGG-16's Flatten asks for
    fc1's columns in 49s, and the track reduces 512 groups (the classifier keeps one per column)."""
    from nm_optim.models import example_input, get_model

    torch.manual_seed(0)
    model = get_model("vgg16", num_classes=1000, image_size=224)
    syms = nm_optim.find_symmetries(model, example_input(model))
    opt = nm_optim.SGD(model.named_parameters(), lr=0.01, momentum=0.9, symmetries=syms)
    cols = {t.name: (t.block, t.num_groups) for t in opt.tracks if t.axis == "cols"}
    assert cols["classifier.0.weight:cols"] == (49, 512)
    assert all(b == 1 for name, (b, _) in cols.items() if name != "classifier.0.weight:cols")


def test_a_record_without_blocks_reads_as_one_group_per_column(tmp_path):
    """Records written before column blocks have no "block": one group per column, and the
    members fold them as before."""
    model = _convnet()
    syms = nm_optim.find_symmetries(model, torch.randn(2, 3, 4, 4), loss=F.cross_entropy)
    opt = nm_optim.SGD(model.parameters(), lr=0.05, symmetries=syms, track=[(model[3].weight, "cols")])
    _train(model, opt, 2)
    record = opt.recorder.snapshot()
    for t in record.tracks:
        assert t.pop("block") == 1
    old = nm_optim.load_record(record.save(tmp_path / "old.npz"))
    assert "block" not in old.tracks[-1]
    assert [nm_optim.theory.predict(old, s).exact.shape[1] for s in syms if s.kind == "rescale"][0] == 8


def test_a_damaged_block_is_named(tmp_path):
    fc = _fc()
    opt = nm_optim.SGD(fc.parameters(), lr=0.1, track=[(fc.weight, "cols", None, 49)])
    fc(torch.randn(3, 98)).sum().backward()
    opt.step()
    record = opt.recorder.snapshot()
    record.tracks[0]["block"] = 14
    with pytest.raises(ValueError, match="'num_groups' 2, but its shape \\[5, 98\\], axis 'cols' and block 14 make 7"):
        nm_optim.load_record(record.save(tmp_path / "bad.npz"))


def test_a_checkpoint_of_one_group_per_column_is_not_resumed_into_blocks(tmp_path):
    """A run recorded with one group per column, resumed by an optimizer whose track has a
    column block, would mix two layouts in one record: refused, naming the way to keep it."""
    fc = _fc()
    old = nm_optim.SGD(fc.parameters(), lr=0.1, track=[(fc.weight, "cols")])
    fc(torch.randn(3, 98)).sum().backward()
    old.step()
    new = nm_optim.SGD(fc.parameters(), lr=0.1, track=[(fc.weight, "cols", None, 49)])
    with pytest.raises(ValueError, match="track=\\[\\(param, 'cols'\\)\\]"):
        new.recorder.load_state_dict(old.recorder.state_dict())
    folder = old.recorder.stream_to(tmp_path / "s")
    state = old.recorder.state_dict()
    old.recorder.close()
    with pytest.raises(ValueError, match="holds 98 groups, this optimizer's 2"):
        new.recorder.load_state_dict(state)
    assert folder.exists()


def test_compute_dtype_is_what_the_tolerances_assume():
    assert compute_dtype(torch.bfloat16) == torch.float32


def test_a_compiled_step_passes_the_blocks_and_keeps_eagers_bits():
    """Under torch.compile the blocks are constants of the graph's op node, as the sums masks
    are; the compiled step's params and statistics are the eager step's."""
    from tests.test_compile import RECORDER, Recording, assert_nothing_fell_back, fresh_dynamo

    fresh_dynamo()
    rec = Recording()
    runs = []
    for compiled in (True, False):
        model = _convnet()
        syms = nm_optim.find_symmetries(model, torch.randn(2, 3, 4, 4), loss=F.cross_entropy)
        opt = nm_optim.SGD(model.parameters(), lr=0.05, momentum=0.9, symmetries=syms)
        _train(model, opt, 3, torch.compile(opt.step, backend=rec) if compiled else None)
        runs.append((model, opt))
        if compiled:
            assert_nothing_fell_back((RECORDER,))
            blocks = {tuple(n.args[-1]) for n in rec.op_nodes()}
            assert blocks == {(1, 1, 16, 1, 1, 1)}, blocks
    (mc, oc), (me, oe) = runs
    for a, b in zip(mc.parameters(), me.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(oc.recorder.snapshot().stats, oe.recorder.snapshot().stats):
        np.testing.assert_array_equal(a, b)
