"""Nothing recorded is lost at a normal exit, and nothing damaged or malformed loads silently
(nm_optim/recorder.py, "Where the collected chunks go"; nm_optim/record/format.py, "Checksums").

A streamed run that ends normally (the interpreter exits, ``recorder.close()``, a ``with`` block,
nm_optim.app.distributed.end_process) has every recorded step on disk: the scripts below run in
real subprocesses and the folder is read back with load_record."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import nm_optim

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
    "del": "opt.recorder.stream_to(folder)\ntrain()\ndel opt\nimport gc, os\ngc.collect()\nos._exit(0)\n",
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
    import torch

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
