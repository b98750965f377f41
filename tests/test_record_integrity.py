"""Nothing recorded is lost at a normal exit, and nothing damaged or malformed loads silently
(nm_optim/recorder.py, "Where the collected chunks go"; nm_optim/record/format.py, "checksums").

A streamed run that ends normally (the interpreter exits, ``recorder.close()``, a ``with`` block,
nm_optim.app.distributed.end_process) has every recorded step on disk: the scripts below run in
real subprocesses and the folder is read back with load_record."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import nm_optim
from nm_optim.record import RecordError
from nm_optim.record.format import STREAM_INDEX, STREAM_META

SCRIPT = """
import sys, torch, nm_optim
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(4, 3))
opt = nm_optim.SGD([w], lr=0.1, momentum=0.9, track=[(w, "rows"), (w, "all")])
folder = sys.argv[1]
def train(n=300):
    for _ in range(n):
        w.grad = torch.randn_like(w)
        opt.step()
"""

ENDINGS = {
    # the script just ends: the interpreter's shutdown writes the partial chunk
    "exit": "opt.recorder.stream_to(folder)\ntrain()\n",
    # ... also with the writer in the training thread
    "exit-in-line": "opt.recorder.stream_to(folder, background=False)\ntrain()\n",
    # sys.exit from a function holding the optimizer
    "sys-exit": "opt.recorder.stream_to(folder)\ntrain()\nsys.exit(0)\n",
    "with": "with opt.recorder as r:\n    r.stream_to(folder)\n    train()\nassert len(r) == 300\n",
    "close": "opt.recorder.stream_to(folder)\ntrain()\nopt.recorder.close()\nimport os\nos._exit(0)\n",
    # the optimizer collected mid-run: its recorder's last records are written by the next
    # load_record (or the next step of any recorder, or the exit), not inside the collector
    "del": "opt.recorder.stream_to(folder)\ntrain()\ndel opt\nimport gc, os\ngc.collect()\n"
           "assert len(nm_optim.load_record(folder)) == 300\nos._exit(0)\n",
    "del-exit": "opt.recorder.stream_to(folder)\ntrain()\ndel opt\nimport gc\ngc.collect()\n",
    "end_process": "opt.recorder.stream_to(folder)\ntrain()\n"
                   "from nm_optim.app.distributed import end_process\nend_process(0)\n",
    # an exception ends the run: what was recorded before it is on disk too
    "exception": "opt.recorder.stream_to(folder)\ntrain()\nraise SystemExit('stopped')\n",
}


def run_script(body: str, folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT + textwrap.dedent(body), str(folder)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_recorded_step_is_on_disk_after_a_normal_exit(tmp_path, ending):
    folder = tmp_path / "rec"
    done = run_script(ENDINGS[ending], folder)
    assert done.returncode == (1 if ending == "exception" else 0), done.stderr
    record = nm_optim.load_record(folder)
    # 300 steps in chunks of 256: the last 44 are the partial chunk
    assert list(record.steps) == list(range(300))
    assert all(np.isfinite(s).all() for s in record.stats)


def test_close_writes_the_partial_chunk_and_recording_goes_on(tmp_path):
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = nm_optim.SGD([w], lr=0.1, momentum=0.9, track=[(w, "all")])
    opt.recorder.chunk = 8
    folder = opt.recorder.stream_to(tmp_path / "rec")
    for _ in range(11):
        w.grad = torch.randn_like(w)
        opt.step()
    opt.recorder.close()
    assert list(nm_optim.load_record(folder).steps) == list(range(11))
    opt.recorder.close()  # twice: nothing more to write
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    opt.recorder.close()
    assert list(nm_optim.load_record(folder).steps) == list(range(14))


# -- checksums: a damaged file is one RecordError naming it, never a silent wrong load ----------------------


def train(opt, w, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        w.grad = torch.randn(w.shape, generator=gen)
        opt.step()


def recorded(chunk=None):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = nm_optim.SGD([w], lr=0.1, momentum=0.9, track=[(w, "rows"), (w, "all")])
    if chunk:
        opt.recorder.chunk = chunk
    return opt, w


@pytest.fixture
def stream(tmp_path):
    """A closed stream of 4 chunks of 8 records and a partial one of 3 (35 records)."""
    opt, w = recorded(chunk=8)
    path = opt.recorder.stream_to(tmp_path / "rec")
    train(opt, w, 35)
    opt.recorder.close()
    return path


def same(a, b):
    assert np.array_equal(a.steps, b.steps) and np.array_equal(a.first, b.first)
    assert np.array_equal(a.skipped, b.skipped)
    assert all(np.array_equal(x, y) for x, y in zip(a.stats, b.stats))
    assert all(np.array_equal(a.hyper[k], b.hyper[k], equal_nan=True) for k in a.hyper)


def refused(path, match, **kw):
    with pytest.raises(RecordError, match=match) as e:
        nm_optim.load_record(path, **kw)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def silent_flips(file, record, data, offsets, whole) -> list[int]:
    """Flip one bit at each offset of `file` (holding `data`) and load `record`: the offsets whose
    flip loaded a record other than `whole` without an error. Every error must be one line
    naming the record."""
    silent = []
    for offset in offsets:
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        file.write_bytes(bytes(damaged))
        try:
            loaded = nm_optim.load_record(record)
        except RecordError as e:
            assert str(record) in str(e) and "\n" not in str(e)
            continue
        try:
            same(loaded, whole)
            assert loaded.meta == whole.meta and loaded.tracks == whole.tracks
        except AssertionError:
            silent.append(offset)
    return silent


def flip(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_streams_stats_names_the_first_bad_chunk_and_the_prefix_stays_readable(stream):
    whole = nm_optim.load_record(stream)
    row = (stream / "stats-0.bin").stat().st_size // 35  # bytes per record
    for record in (17, 20, 23):  # all in chunk 2 (records 16..23)
        for byte in (0, row // 2, row - 1):
            flip(stream / "stats-0.bin", record * row + byte)
            message = refused(stream, r"stats-0\.bin fails its checksum in chunk 2 \(records 16 to 23")
            assert "records=16" in message  # how to read the intact prefix
            flip(stream / "stats-0.bin", record * row + byte)  # undone
    flip(stream / "stats-0.bin", 20 * row + 3)
    prefix = nm_optim.load_record(stream, records=16)
    assert len(prefix) == 16
    assert np.array_equal(prefix.steps, whole.steps[:16]) and np.array_equal(prefix.first, whole.first[:16])
    assert all(np.array_equal(x, y[:16]) for x, y in zip(prefix.stats, whole.stats))
    refused(stream, "chunk 2", records=17)  # the damaged chunk is not part of an intact prefix
    # verify=False: the stats bytes are not read (a quick look at a large stream); the index is
    assert len(nm_optim.load_record(stream, verify=False)) == 35
    refused(stream, "records must be", records=36)


def test_a_flipped_byte_in_a_streams_index_or_meta_is_refused(stream):
    lines = (stream / STREAM_INDEX).read_bytes().splitlines(keepends=True)
    start = sum(len(x) for x in lines[:3])
    # a digit of a step or a hyper-parameter changes, the line stays valid JSON
    for i in range(len(lines[3])):
        if chr(lines[3][i]) in "123456789":
            data = bytearray((stream / STREAM_INDEX).read_bytes())
            data[start + i] = ord("1") if data[start + i] != ord("1") else ord("2")
            (stream / STREAM_INDEX).write_bytes(bytes(data))
            try:
                refused(stream, r"(line 4 of index\.jsonl|index\.jsonl)")
            finally:
                (stream / STREAM_INDEX).write_bytes(b"".join(lines))
    nm_optim.load_record(stream)
    meta = (stream / STREAM_META).read_bytes()
    at = meta.index(b'"record_every": 1') + len(b'"record_every": ')
    (stream / STREAM_META).write_bytes(meta[:at] + b"2" + meta[at + 1:])
    refused(stream, r"meta\.json.*checksum")


def test_a_stream_whose_meta_claims_float32_over_float64_data_is_refused(stream):
    from nm_optim.record.format import _seal

    meta = json.loads((stream / STREAM_META).read_text())
    del meta["crc32"]
    meta["stream"]["dtype"] = "float32"
    (stream / STREAM_META).write_text(_seal(json.dumps(meta, indent=1)))
    refused(stream, r"stats-0\.bin.*chunk 0")


def test_every_single_byte_flip_of_a_saved_npz_is_refused_or_harmless(tmp_path):
    opt, w = recorded()
    train(opt, w, 20)
    path = opt.recorder.save(tmp_path / "run.npz")
    whole = nm_optim.load_record(path)
    data = path.read_bytes()
    # every byte of the zip's headers (where a flip gave raw zipfile errors) and of each member's
    # .npy header (numpy parses it before zipfile checks the member's CRC: raw SyntaxError /
    # tokenize.TokenError), a sample of the rest
    headers = [i for i in range(len(data) - 3) if data[i:i + 4] in (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06")]
    near = {o for h in headers for o in range(h, min(h + 46, len(data)))}
    npy = [i for i in range(len(data) - 5) if data[i:i + 6] == b"\x93NUMPY"]
    near |= {o for h in npy for o in range(h, min(h + 10 + int.from_bytes(data[h + 8:h + 10], "little"), len(data)))}
    silent = silent_flips(path, path, data, sorted(near | set(range(0, len(data), max(len(data) // 150, 1)))), whole)
    assert not silent, f"flips at {silent} loaded a different record without an error"


# -- malformed fields: every field checked for type, shape, range and consistency ---------------------------


@pytest.fixture
def npz(tmp_path):
    opt, w = recorded()
    train(opt, w, 12)
    return opt.recorder.save(tmp_path / "run.npz")


def rewrite(path, edit):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    np.savez(path, **arrays)


def edit_meta(**changes):
    def edit(arrays):
        meta = json.loads(str(arrays["meta"]))
        for k, v in changes.items():
            if v is KeyError:
                del meta[k]
            else:
                meta[k] = v
        arrays["meta"] = np.array(json.dumps(meta))
    return edit


def setter(key, value):
    def edit(arrays):
        arrays[key] = value(arrays[key]) if callable(value) else value
    return edit


def with_groups(tracks, n):
    """The tracks with the first one's num_groups set to n."""
    return [dict(tracks[0], num_groups=n), *tracks[1:]]


NPZ_DEFECTS = {
    "format_version-string": (edit_meta(format_version="1"), "format_version"),
    "format_version-null": (edit_meta(format_version=None), "format_version"),
    "format_version-bool": (edit_meta(format_version=True), "format_version"),
    "stat_names-changed": (edit_meta(stat_names=["a"] * 9), "stat_names"),
    "num_groups-0": (lambda a: edit_meta(tracks=with_groups(json.loads(str(a["meta"]))["tracks"], 0))(a),
                     "num_groups"),
    "num_groups-negative": (lambda a: edit_meta(tracks=with_groups(json.loads(str(a["meta"]))["tracks"], -1))(a),
                            "num_groups"),
    "tracks-strings": (edit_meta(tracks=["w:rows", "w:all"]), "tracks"),
    "hyper_names-numbers": (edit_meta(hyper_names=[1, 2]), "hyper_names"),
    "steps-strings": (setter("steps", lambda s: s.astype(str)), "'steps'"),
    "steps-floats": (setter("steps", lambda s: s.astype(np.float64)), "'steps'"),
    "steps-reversed": (setter("steps", lambda s: s[::-1].copy()), "'steps'"),
    "steps-negative": (setter("steps", lambda s: s - 5), "'steps'"),
    "stats-int32": (setter("stats_0", lambda s: s.astype(np.int32)), "'stats_0'"),
    "stats-float16": (setter("stats_0", lambda s: s.astype(np.float16)), "'stats_0'"),
    "stats-complex": (setter("stats_0", lambda s: s.astype(np.complex128)), "'stats_0'"),
    "stats-strings": (setter("stats_1", lambda s: s.astype(str)), "'stats_1'"),
    "first-floats": (setter("first", lambda s: s.astype(np.float64)), "'first'"),
    "skipped-ints": (setter("skipped", lambda s: s.astype(np.int64)), "'skipped'"),
    "hyper-strings": (setter("hyper_lr", lambda s: s.astype(str)), "'hyper_lr'"),
}


@pytest.mark.parametrize("defect", list(NPZ_DEFECTS))
def test_a_malformed_field_of_a_npz_is_one_record_error_naming_it(npz, defect):
    edit, field = NPZ_DEFECTS[defect]
    nm_optim.load_record(npz)
    rewrite(npz, edit)
    refused(npz, field)


def reseal_meta(stream, **layout):
    from nm_optim.record.format import _seal

    meta = json.loads((stream / STREAM_META).read_text())
    del meta["crc32"]
    for k, v in layout.items():
        meta[k] = v
    (stream / STREAM_META).write_text(_seal(json.dumps(meta, indent=1)))


def reseal_line(stream, line, edit):
    """Edit line `line` of index.jsonl and give it a valid checksum: a consistent but malformed
    stream, so that the field checks themselves are tested."""
    from nm_optim.record.format import _seal

    lines = (stream / STREAM_INDEX).read_text().splitlines(keepends=True)
    entry = json.loads(lines[line])
    del entry["crc32"]
    edit(entry)
    lines[line] = _seal(json.dumps(entry, separators=(",", ":"))) + "\n"
    (stream / STREAM_INDEX).write_text("".join(lines))


def put(key, value):
    def edit(entry):
        entry[key] = value(entry[key]) if callable(value) else value
    return edit


STREAM_DEFECTS = {
    "hyper-string": (lambda e: e["hyper"]["lr"].__setitem__(0, ["fast"]), "'hyper' 'lr'"),
    "hyper-missing": (lambda e: e["hyper"].pop("momentum"), "'hyper'"),
    "first-negative": (put("first", [[-1, 0]]), "'first'"),
    "first-track-out-of-range": (put("first", [[0, 7]]), "'first'"),
    "skipped-out-of-range": (put("skipped", [8]), "'skipped'"),
    "steps-strings": (put("steps", lambda s: [str(x) for x in s]), "'steps'"),
    "steps-repeat-the-previous-chunk": (put("steps", lambda s: [x - 8 for x in s]), "'steps'"),
    "records-bool": (put("records", True), "'records'"),
    "stats_crc32-missing": (lambda e: e.pop("stats_crc32"), "stats_crc32"),
}


@pytest.mark.parametrize("defect", list(STREAM_DEFECTS))
def test_a_malformed_index_line_is_one_record_error_naming_it(stream, defect):
    edit, field = STREAM_DEFECTS[defect]
    reseal_line(stream, 1, edit)
    refused(stream, f"line 2 of index.jsonl.*{field}")


@pytest.mark.parametrize("field, value", [("format_version", "1"), ("format_version", None),
                                          ("tracks", 0),
                                          ("stat_names", ["x"])], ids=["version-string", "version-null",
                                                                       "num_groups-0", "stat_names"])
def test_a_malformed_field_of_a_streams_meta_is_one_record_error_naming_it(stream, field, value):
    if field == "tracks":  # the first track's num_groups 0
        value = with_groups(json.loads((stream / STREAM_META).read_text())["tracks"], value)
    reseal_meta(stream, **{field: value})
    refused(stream, "num_groups" if field == "tracks" else field)


@pytest.mark.parametrize("damage", ["deleted", "emptied", "torn"])
def test_a_stream_whose_index_lost_chunks_is_refused(stream, damage):
    index = stream / STREAM_INDEX
    data = index.read_bytes()
    if damage == "deleted":
        index.unlink()
        refused(stream, "index.jsonl is missing")
        return
    index.write_bytes(b"" if damage == "emptied" else data[: len(data) // 3])
    refused(stream, r"index\.jsonl lists \d+ records, but stats-0\.bin holds 35")


def test_a_crash_mid_chunk_and_a_resume_cut_still_load(tmp_path):
    """What a crash or a resume legitimately leaves past the index's records is not damage."""
    opt, w = recorded(chunk=8)
    path = opt.recorder.stream_to(tmp_path / "rec")
    train(opt, w, 16)
    state = opt.recorder.state_dict()  # 16 records
    train(opt, w, 20)
    opt.recorder.close()  # 36 records
    # a crash while writing a chunk: its stats are there, its index line is not
    opt.recorder.stream.drain()
    row = (path / "stats-0.bin").stat().st_size // 36
    with open(path / "stats-0.bin", "ab") as f:
        f.write(b"\0" * row * 8)
    assert len(nm_optim.load_record(path)) == 36
    again, w2 = recorded(chunk=8)
    again.recorder.load_state_dict(state)  # cuts the stream back to 16 records, stats stay
    assert len(nm_optim.load_record(path)) == 16
    train(again, w2, 3)
    again.recorder.close()
    assert list(nm_optim.load_record(path).steps) == list(range(19))


@pytest.mark.parametrize("name", [STREAM_META, STREAM_INDEX, "stats-0.bin"])
def test_every_single_byte_flip_of_a_stream_is_refused_or_harmless(stream, name):
    """A flip anywhere in the stream's files (sampled: about 150 offsets per file) raises one
    RecordError naming the folder, or (bytes no reader uses) loads the same record."""
    whole = nm_optim.load_record(stream)
    whole.stats = [np.array(s) for s in whole.stats]  # a copy: the memory maps would see the flips
    file = stream / name
    data = file.read_bytes()
    offsets = sorted({*range(0, len(data), max(len(data) // 150, 1)), len(data) - 1})
    silent = silent_flips(file, stream, data, offsets, whole)
    file.write_bytes(data)
    assert not silent, f"flips at {silent} of {name} loaded a different record without an error"


def test_a_param_without_elements_records_and_loads(tmp_path):
    """num_groups 0 is right for the rows of a [0, 3] param: the count follows from shape and axis."""
    w = torch.nn.Parameter(torch.randn(0, 3))
    v = torch.nn.Parameter(torch.randn(2))
    opt = nm_optim.SGD([w, v], lr=0.1, track=[(w, "rows"), (v, "all")])
    w.grad, v.grad = torch.zeros_like(w), torch.randn(2)
    opt.step()
    record = nm_optim.load_record(opt.recorder.save(tmp_path / "run.npz"))
    assert record.stats[0].shape == (1, 0, 9) and len(record) == 1


def test_a_stream_written_before_checksums_loads_unverified(stream):
    """The decision for old records (nm_optim/record/format.py, "Format versions"): a stream
    without checksums in its layout loads, its fields checked; format_version stays 1."""
    whole = nm_optim.load_record(stream)
    meta = json.loads((stream / STREAM_META).read_text())
    for key in ("crc32",):
        del meta[key]
    for key in ("checksums", "chunk"):
        del meta["stream"][key]
    (stream / STREAM_META).write_text(json.dumps(meta, indent=1))
    lines = []
    for line in (stream / STREAM_INDEX).read_text().splitlines():
        entry = json.loads(line)
        del entry["crc32"], entry["stats_crc32"]
        lines.append(json.dumps(entry, separators=(",", ":")) + "\n")
    (stream / STREAM_INDEX).write_text("".join(lines))
    same(nm_optim.load_record(stream), whole)
    reseal_line_plain = lines[1].replace('"records":8', '"records":"8"')
    (stream / STREAM_INDEX).write_text(lines[0] + reseal_line_plain + "".join(lines[2:]))
    refused(stream, "line 2 of index.jsonl.*'records'")
