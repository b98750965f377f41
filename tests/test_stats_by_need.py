"""Statistics by need: a track reduces only the sums it is asked for, rounded up to one of
nm_optim.names.SUM_SETS (the 6 products the scale and rescale laws read, or all 9); the other
columns read NaN, the record says which sums exist, and the theory refuses a law whose sums are
missing (docs/statistics.md, "Statistics by need"; nm_optim/tracks.py).

The sums are the same computation whichever set a track reduces, so a product-only track's
columns equal an all-9 track's to the bit, and so do the laws run on them. The CPU-backend tests
need the extension built with the sums masks (nm_optim/ops/native.py passes them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nm_optim
import nm_optim.theory
from nm_optim.names import (
    ALL_SUMS_MASK,
    LAW_SUMS,
    PRODUCT_SUMS,
    PRODUCT_SUMS_MASK,
    STAT_INDEX,
    STAT_NAMES,
    track_sums,
)
from nm_optim.ops.reference import sgd_step_reference
from nm_optim.record.format import STREAM_META, _seal
from nm_optim.symmetry import Translation

ABSENT = [STAT_INDEX[n] for n in STAT_NAMES if n not in PRODUCT_SUMS]
PRESENT = [STAT_INDEX[n] for n in PRODUCT_SUMS]
OP = torch.ops.nm_optim.sgd_step_


def net(seed: int = 0) -> nn.Module:
    """Scale (a Linear before BatchNorm), rescale (ReLU between two Linear) and translation (the
    classifier before cross-entropy): every kind of law."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for k in range(steps):
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def sums_of(opt: nm_optim.SGD) -> dict[str, tuple[str, ...]]:
    return {t.name: t.sums for t in opt.tracks}


# -- asks ----------------------------------------------------------------------------------------------------
def test_a_pair_asks_for_all_nine_and_a_triple_for_the_smallest_set_holding_its_sums():
    m = nn.Linear(4, 3)
    opt = nm_optim.SGD(m.parameters(), lr=0.1, track=[(m.weight, "cols", ["pp", "gv"]), (m.bias, "all")])
    assert sums_of(opt) == {"group0.param0:cols": PRODUCT_SUMS, "group0.param1:all": STAT_NAMES}
    # Σp is no product: the only set holding it is all 9.
    opt = nm_optim.SGD(m.parameters(), lr=0.1, track=[(m.weight, "cols", ("p",))])
    assert opt.tracks[0].sums == STAT_NAMES
    assert nm_optim.SGD(m.parameters(), lr=0.1, track="layers").tracks[0].sums == STAT_NAMES


def test_every_track_of_one_param_reduces_the_union_of_its_asks_rounded_up():
    m = nn.Linear(4, 3)
    both_products = [(m.weight, "rows", ["pp"]), (m.weight, "cols", ["gg", "pv"])]
    opt = nm_optim.SGD(m.parameters(), lr=0.1, track=both_products)
    assert [t.sums for t in opt.tracks] == [PRODUCT_SUMS, PRODUCT_SUMS]
    # One ask of Σg on the rows makes the param's column track reduce all 9 as well (the kernels
    # pick one variant per tensor).
    opt = nm_optim.SGD(m.parameters(), lr=0.1, track=[*both_products, (m.weight, "rows", ["g"])])
    assert [t.sums for t in opt.tracks] == [STAT_NAMES] * 3
    # Two asks of one (param, axis) share one block of rows.
    opt = nm_optim.SGD(m.parameters(), lr=0.1, track=[(m.weight, "cols", ["pp"]), (m.weight, "cols", ["gg"])])
    assert opt.tracks[0] is opt.tracks[1] and opt.tracks[0].sums == PRODUCT_SUMS


@pytest.mark.parametrize("sums, says", [
    (["pp", "qq"], "unknown sum 'qq'"),
    ("pp", "sums must be a non-empty sequence of names"),
    ([], "sums must be a non-empty sequence of names"),
    ([1], "unknown sum 1"),
])
def test_a_bad_ask_names_the_track_and_the_bad_name(sums, says):
    m = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=f"track 'w:cols'|track w:cols") as e:
        nm_optim.SGD([{"params": [m.weight], "param_names": ["w"]}], lr=0.1, track=[(m.weight, "cols", sums)])
    assert says in str(e.value)
    # Also when a symmetry asks for sums of the same track (its ask does not hide the bad one).
    sym = Translation(m.weight, name="fc")
    with pytest.raises(ValueError, match=says):
        nm_optim.SGD([{"params": [m.weight], "param_names": ["fc.weight"]}], lr=0.1,
                     track=[(m.weight, "cols", sums)], symmetries=[sym])


def test_symmetries_ask_for_the_sums_their_laws_read():
    model = net()
    syms = nm_optim.find_symmetries(model, batch(0)[0], loss=F.cross_entropy)
    assert {s.kind for s in syms} == {"scale", "rescale", "translation"}
    opt = nm_optim.SGD(model.parameters(), lr=0.1, symmetries=syms)
    # The classifier (translation: Σp, Σg, Σv) reduces all 9, also its weight's columns that the
    # rescale into it shares; the scale and rescale layers only the products.
    assert sums_of(opt) == {"0.weight:rows": PRODUCT_SUMS, "0.bias:rows": PRODUCT_SUMS,
                            "3.weight:rows": PRODUCT_SUMS, "3.bias:rows": PRODUCT_SUMS,
                            "5.weight:cols": STAT_NAMES, "5.bias:all": STAT_NAMES}
    # A user's track of a symmetry's param joins its asks: all 9 for every track of that param.
    opt = nm_optim.SGD(model.parameters(), lr=0.1, symmetries=syms, track=[(model[3].weight, "all")])
    assert {t.name: t.sums for t in opt.tracks if t.name.startswith("3.")} == {
        "3.weight:all": STAT_NAMES, "3.weight:rows": STAT_NAMES, "3.bias:rows": PRODUCT_SUMS}
    assert len(opt.tracks) == 7  # the user's track, then each symmetry track once


def test_tracks_keep_their_sums_through_deepcopy_and_pickling():
    import copy
    import pickle

    model = net()
    syms = nm_optim.find_symmetries(model, batch(0)[0], loss=F.cross_entropy)
    opt = nm_optim.SGD(model.named_parameters(), lr=0.1, symmetries=syms)
    for again in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert sums_of(again) == sums_of(opt)


def test_on_vgg16_every_track_but_the_classifiers_reduces_the_products():
    model = nm_optim.models.vgg16(num_classes=10, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    syms = nm_optim.find_symmetries(model, x, loss=F.cross_entropy)
    opt = nm_optim.SGD(model.parameters(), lr=0.1, symmetries=syms)
    classifier = {m.track for s in syms if s.kind == "translation" for m in s.members}
    assert classifier
    for t in opt.tracks:
        assert t.sums == (STAT_NAMES if t.name in classifier else PRODUCT_SUMS), t.name


# -- the record ----------------------------------------------------------------------------------------------
def product_and_all_nine(backend: str, momentum: float = 0.9):
    """Two runs of one model on the same batches: the weights' column tracks reduce the products
    in one, all 9 in the other."""
    runs = []
    for sums in (PRODUCT_SUMS, None):
        model = net()
        ask = (lambda p, axis: (p, axis) if sums is None else (p, axis, sums))
        opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3, backend=backend,
                           track=[ask(model[0].weight, "cols"), ask(model[0].weight, "rows"), ask(model[0].bias, "all")])
        train(model, opt, 3)
        runs.append((model, opt))
    return runs


def test_the_record_says_which_sums_its_tracks_hold(tmp_path):
    (_, products), (_, nine) = product_and_all_nine("reference")
    loaded = nm_optim.load_record(products.recorder.save(tmp_path / "r.npz"))
    assert [t["sums"] for t in loaded.tracks] == [list(PRODUCT_SUMS)] * 3
    assert [track_sums(t) for t in nine.recorder.snapshot().tracks] == [STAT_NAMES] * 3
    folder = products.recorder.stream_to(tmp_path / "stream")
    products.recorder.close()
    assert [t["sums"] for t in nm_optim.load_record(folder).tracks] == [list(PRODUCT_SUMS)] * 3


def test_a_track_of_products_holds_nan_in_the_other_columns_and_the_all_nine_bits_in_its_own():
    """The reference backend: the present columns are the same computation as an all-9 track's."""
    (_, products), (_, nine) = product_and_all_nine("reference")
    got, want = products.recorder.snapshot(), nine.recorder.snapshot()
    for a, b in zip(got.stats, want.stats):
        assert np.isnan(a[..., ABSENT]).all()
        assert np.array_equal(a[..., PRESENT], b[..., PRESENT])
        assert np.isfinite(b).all()
    for a, b in zip(products.last_stats(), nine.last_stats()):
        assert torch.equal(a[:, PRESENT], b[:, PRESENT]) and a[:, ABSENT].isnan().all()


def test_an_old_record_without_sums_reads_as_all_nine(tmp_path):
    """A record written before tracks said which sums they hold (no "sums" in its meta)."""
    model = net()
    syms = nm_optim.find_symmetries(model, batch(0)[0], loss=F.cross_entropy)
    opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, symmetries=syms,
                       track=[(p, "all") for p in model.parameters()])  # all 9 everywhere, as before
    train(model, opt, 4)
    record = opt.recorder.snapshot()
    record.tracks = [{k: v for k, v in t.items() if k != "sums"} for t in record.tracks]
    old = nm_optim.load_record(record.save(tmp_path / "old.npz"))
    assert all("sums" not in t for t in old.tracks) and {track_sums(t) for t in old.tracks} == {STAT_NAMES}
    for sym in nm_optim.symmetry.symmetries_from_record(old):
        p = nm_optim.theory.predict(old, sym)
        assert np.isfinite(p.exact[1:]).all()


def write_old_stream(folder) -> None:
    """Rewrites a stream's meta.json as one written before tracks said their sums (sealed again)."""
    path = folder / STREAM_META
    meta = json.loads(path.read_text())
    meta.pop("crc32")
    for t in meta["tracks"]:
        del t["sums"]
    path.write_text(_seal(json.dumps(meta, indent=1)))


def rows_run(sums: tuple[str, ...] | None) -> tuple[nn.Module, nm_optim.SGD]:
    """net() with "rows" tracks on two weights asking for `sums` (None: all 9)."""
    model = net()
    ask = (lambda p: (p, "rows") if sums is None else (p, "rows", sums))
    return model, nm_optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9, backend="reference",
                               track=[ask(model[0].weight), ask(model[3].weight)])


def test_an_old_stream_loads_and_continues_only_with_every_sum_it_holds(tmp_path):
    model, opt = rows_run(None)
    folder = opt.recorder.stream_to(tmp_path / "s")
    train(model, opt, 3)
    state = opt.recorder.state_dict()
    opt.recorder.close()
    write_old_stream(folder)
    old = nm_optim.load_record(folder)
    assert [track_sums(t) for t in old.tracks] == [STAT_NAMES] * 2 and np.isfinite(old.stats[0]).all()
    _, fewer = rows_run(PRODUCT_SUMS)
    with pytest.raises(ValueError, match=r"track '0.weight:rows' holds the sums \['p', 'g', 'v'.*not \['p', 'g', 'v'\]"):
        fewer.recorder.load_state_dict(state)
    model, again = rows_run(None)
    again.recorder.load_state_dict(state)
    train(model, again, 2)
    again.recorder.close()
    assert len(nm_optim.load_record(folder).steps) == 5


def test_an_in_memory_checkpoint_resumes_only_with_the_sums_it_recorded():
    """A recorder state holds its records, not which sums they hold: the records tell (a
    column NaN in every record); tracks that would reduce more are refused, naming the track."""
    model, fewer = rows_run(PRODUCT_SUMS)
    train(model, fewer, 3)
    state = fewer.recorder.state_dict()
    _, nine = rows_run(None)
    with pytest.raises(ValueError, match=r"track '0.weight:rows' holds no \['p', 'g', 'v'\] in any of its records"):
        nine.recorder.load_state_dict(state)
    model, again = rows_run(PRODUCT_SUMS)
    again.recorder.load_state_dict(state)
    train(model, again, 2)
    assert len(again.recorder.snapshot().steps) == 5
    model, more = rows_run(None)
    train(model, more, 2)
    fewer.recorder.load_state_dict(more.recorder.state_dict())  # more sums than it reduces: kept


def test_a_record_whose_sums_are_no_set_is_damaged(tmp_path):
    (_, products), _ = product_and_all_nine("reference")
    record = products.recorder.snapshot()
    record.tracks[0] = dict(record.tracks[0], sums=["pp", "gg"])
    with pytest.raises(nm_optim.record.RecordError, match=r"'sums' \['pp', 'gg'\], not one of the sets"):
        nm_optim.load_record(record.save(tmp_path / "bad.npz"))


# -- the op --------------------------------------------------------------------------------------------------
def op_call(stats_sums, *, fake: bool = False):
    p = torch.randn(3, 4)
    args = ([p], [torch.randn(3, 4)], [], [], 0.1, None, 0.0, 0.0, 0.0, False, False, None, None, "reference",
            torch.full((3, 9), float("nan"), dtype=torch.float64), [0, -1, -1], stats_sums)
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            args = tuple([mode.from_tensor(t) for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                         else mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            OP(*args)
    else:
        OP(*args)
    return args[-3]


@pytest.mark.parametrize("fake", [False, True], ids=["op", "fake"])
def test_the_op_checks_one_mask_per_param_each_a_sum_set(fake):
    with pytest.raises(RuntimeError, match=r"stats_sums needs one mask per param, got 2 for 1"):
        op_call([ALL_SUMS_MASK, ALL_SUMS_MASK], fake=fake)
    with pytest.raises(RuntimeError, match=r"stats_sums\[0\] \(param 0\) is 7, not one of"):
        op_call([7], fake=fake)
    op_call([PRODUCT_SUMS_MASK], fake=fake)
    op_call([], fake=fake)


def test_the_reference_op_writes_nan_outside_each_params_mask():
    stats = op_call([PRODUCT_SUMS_MASK])
    assert stats[:, ABSENT].isnan().all() and stats[:, PRESENT].isfinite().all()


def test_sgd_passes_one_mask_per_param_of_each_call():
    seen = []

    def spy(*args):
        seen.append(args[-2])  # stats_sums (stats_blocks is last)
        return real(*args)

    model = net()
    real = nm_optim.sgd.sgd_step_
    opt = nm_optim.SGD(model.parameters(), lr=0.1, backend="reference",
                       track=[(model[0].weight, "rows", PRODUCT_SUMS), (model[5].bias, "all")])
    nm_optim.sgd.sgd_step_ = spy
    try:
        train(model, opt, 1)
    finally:
        nm_optim.sgd.sgd_step_ = real
    # One bucket: the 8 params in order; the untracked ones get all 9 (not read).
    assert seen == [[PRODUCT_SUMS_MASK] + [ALL_SUMS_MASK] * 7]
    # No mask when no param is tracked, nor when every tracked param reduces all 9 (the op reads
    # an empty list so).
    for track in (None, "layers"):
        again = nm_optim.SGD(model.parameters(), lr=0.1, backend="reference", track=track)
        nm_optim.sgd.sgd_step_ = spy
        try:
            train(model, again, 1)
        finally:
            nm_optim.sgd.sgd_step_ = real
        assert seen[-1] == []


def test_a_compiled_step_with_a_product_only_track_holds_the_op_and_eagers_bits():
    from tests.test_compile import RECORDER, Recording, assert_nothing_fell_back, fresh_dynamo

    fresh_dynamo()
    rec = Recording()
    runs = []
    for compiled in (True, False):
        model = net()
        opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend="reference",
                           track=[(model[0].weight, "cols", PRODUCT_SUMS), (model[3].weight, "rows")])
        step = torch.compile(opt.step, backend=rec) if compiled else opt.step
        for k in range(3):
            x, y = batch(k)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            step()
        runs.append((model, opt))
        if compiled:
            assert_nothing_fell_back((RECORDER,))
            assert rec.op_nodes(), "the op is a node of the compiled graphs"
            masks = {tuple(n.args[-2]) for n in rec.op_nodes()}  # stats_sums (stats_blocks is last)
            assert masks == {(PRODUCT_SUMS_MASK, *[ALL_SUMS_MASK] * 7)}, masks  # constants of the graph
    (mc, oc), (me, oe) = runs
    for a, b in zip(oc.recorder.snapshot().stats, oe.recorder.snapshot().stats):
        assert np.array_equal(a, b, equal_nan=True)
    assert all(torch.equal(a, b) for a, b in zip(mc.parameters(), me.parameters()))


# -- the theory ----------------------------------------------------------------------------------------------
def test_a_law_whose_sums_are_missing_is_refused_naming_the_symmetry_the_track_and_the_sums():
    model = net()
    fc = model[5]
    opt = nm_optim.SGD(model.named_parameters(), lr=0.1, backend="reference",
                       track=[(fc.weight, "cols", PRODUCT_SUMS), (fc.bias, "all", PRODUCT_SUMS)])
    train(model, opt, 2)
    record = opt.recorder.snapshot()
    sym = Translation(fc.weight, fc.bias, name="5")
    says = (r"translation '5': track '5.weight:cols' recorded only the sums \['pp', 'gg', 'vv', 'pg', "
            r"'pv', 'gv'\], and the translation law needs \['p', 'g', 'v', 'pp', 'gg'\]: missing \['p', 'g', 'v'\]")
    with pytest.raises(ValueError, match=says):
        sym.group_stats(record)
    with pytest.raises(ValueError, match=says):
        nm_optim.theory.predict(record, sym)


def predictions(record, syms):
    return {s.name: nm_optim.theory.predict(record, s) for s in syms}


def test_the_laws_on_product_only_records_are_the_all_nine_records_laws_bitwise():
    """The same run recorded twice: symmetries alone (scale and rescale tracks reduce the
    products) and with every member's track asked for all 9. Every array of every prediction
    (measured, exact, paper, gradient flow, breaking, errors) is the same to the bit."""
    records, syms_of = [], []
    for all_nine in (False, True):
        model = net()
        syms = nm_optim.find_symmetries(model, batch(0)[0], loss=F.cross_entropy)
        extra = [(m.param, m.axis) for s in syms for m in s.members] if all_nine else None
        opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3, backend="reference",
                           symmetries=syms, track=extra)
        train(model, opt, 6)
        records.append(opt.recorder.snapshot())
        syms_of.append(syms)
    few, nine = records
    assert {track_sums(t) for t in few.tracks} == {PRODUCT_SUMS, STAT_NAMES}
    assert {track_sums(t) for t in nine.tracks} == {STAT_NAMES}
    kinds = {s.name: s.kind for s in syms_of[0]}
    a, b = predictions(few, syms_of[0]), predictions(nine, syms_of[1])
    for name, pa in a.items():
        pb = b[name]
        for field in ("measured", "exact", "paper", "gradient_flow", "breaking", "breaking_bound", "floor",
                      "exact_breaking", "start", "scale"):
            x, y = getattr(pa, field), getattr(pb, field)
            assert np.array_equal(x, y, equal_nan=True), (name, field)
        if kinds[name] != "translation":
            assert np.isfinite(pa.exact[1:]).all(), f"{name}: product-only steps read as valid"
    # The table of errors the report prints (relative, late, breaking ratio per symmetry).
    rows = [nm_optim.theory.compare(r, syms).rows() for r, syms in zip(records, syms_of)]
    assert json.dumps(rows[0], default=repr) == json.dumps(rows[1], default=repr)


def test_finite_sums_needs_only_the_laws_columns():
    s = np.zeros((2, 1, 9))
    s[..., ABSENT] = np.nan
    assert nm_optim.theory.finite_sums(s, "scale").all() and nm_optim.theory.finite_sums(s, "rescale").all()
    assert not nm_optim.theory.finite_sums(s, "translation").any() and not nm_optim.theory.finite_sums(s).any()
    for kind in LAW_SUMS:
        t = np.zeros((1, 1, 9))
        t[..., STAT_INDEX[LAW_SUMS[kind][0]]] = np.inf
        assert not nm_optim.theory.finite_sums(t, kind).any()


# -- the CPU backend (the compiled kernels reduce only the asked sums) ------------------------------------------
def test_cpu_a_track_of_products_holds_nan_elsewhere_and_the_references_sums():
    """Within the kernels' tolerance: 1e-6 of each sum's summed magnitudes (docs/statistics.md),
    bounded here by Cauchy-Schwarz (Σ|pg| <= sqrt(Σp² Σg²))."""
    (_, cpu), _ = product_and_all_nine("cpu")
    (_, ref), _ = product_and_all_nine("reference")
    for a, b in zip(cpu.recorder.snapshot().stats, ref.recorder.snapshot().stats):
        assert np.isnan(a[..., ABSENT]).all()
        sq = {n: np.abs(b[..., STAT_INDEX[n]]) for n in ("pp", "gg", "vv")}
        bound = {"pp": sq["pp"], "gg": sq["gg"], "vv": sq["vv"], "pg": np.sqrt(sq["pp"] * sq["gg"]),
                 "pv": np.sqrt(sq["pp"] * sq["vv"]), "gv": np.sqrt(sq["gg"] * sq["vv"])}
        for n in PRODUCT_SUMS:
            err = np.abs(a[..., STAT_INDEX[n]] - b[..., STAT_INDEX[n]])
            assert (err <= 1e-6 * bound[n] + 1e-300).all(), n


def test_cpu_a_track_of_products_has_the_all_nine_tracks_bits():
    (_, products), (_, nine) = product_and_all_nine("cpu")
    for a, b in zip(products.recorder.snapshot().stats, nine.recorder.snapshot().stats):
        assert np.isnan(a[..., ABSENT]).all() and np.isfinite(b).all()
        assert np.array_equal(a[..., PRESENT], b[..., PRESENT])


def test_cpu_a_channels_last_weight_keeps_its_mask():
    """A permuted layout goes through the storage views (ops/op.py, _step_permuted)."""
    def run(sums):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        ask = (conv.weight, "cols") if sums is None else (conv.weight, "cols", sums)
        opt = nm_optim.SGD(conv.parameters(), lr=0.1, momentum=0.9, backend="cpu", track=[ask])
        for k in range(2):
            opt.zero_grad()
            conv(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(k))).square().sum().backward()
            opt.step()
        return opt.last_stats()[0]

    few, nine = run(PRODUCT_SUMS), run(None)
    assert few[:, ABSENT].isnan().all() and nine.isfinite().all()
    assert torch.equal(few[:, PRESENT], nine[:, PRESENT])


def test_sgd_step_reference_reads_the_masks_by_keyword():
    p, g = torch.randn(2, 3), torch.randn(2, 3)
    stats = torch.full((2, 9), float("nan"), dtype=torch.float64)
    sgd_step_reference([p], [g], [], [], lr=0.1, stats=stats, stats_offsets=[0, -1, -1],
                       stats_sums=[PRODUCT_SUMS_MASK])
    assert stats[:, ABSENT].isnan().all() and stats[:, PRESENT].isfinite().all()
