"""README.md and docs/*.md say what the code does: every code block runs, every link resolves, and
the numbers the README shows are the measurements it names.

Code blocks. A fenced block is code when it is tagged ```python or ```bash; ```text and untagged
blocks are diagrams, layouts and formulas (docs/architecture.md's update rule, say) and are not run.
Any other tag fails `test_every_fenced_block_is_python_bash_or_text`, so no block escapes by its
tag. Comment lines right above a block's fence steer it:

    <!-- not run: REASON -->   the block is reported as skipped with REASON (pytest -rs lists them):
                               trainings, installs, the GPU, data the repository does not hold
    <!-- setup: NAME -->       run SETUPS[NAME] first, in the same namespace: the names a snippet
                               takes as given (a model, a batch, a loader), made small and visible here
    <!-- slow -->              run only with `-m slow`

Python blocks run in this process (no interpreter start per block) in a fresh namespace, with a
temporary directory as the working directory, so that files they write ("run.npz", "theory.png",
"runs/tb") land there. Bash blocks run in the repository root with the environment's bin first on
PATH, as a user runs them after `pip install -e .`; the cheap ones only (help texts, the GPU check's
budget line).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

RUN_LANGUAGES = {"python", "bash"}
TEXT_LANGUAGES = {"text", ""}

# The names snippets take as given. Each is small enough to run in a second or two.
_MLP = """
import torch, torch.nn as nn, torch.nn.functional as F, nm_optim

class MLP(nn.Module):  # fc1 -> ReLU -> fc2: rescale at the hidden units, translation at the logits
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

torch.manual_seed(0)
model = MLP()
x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
loss = F.cross_entropy(model(x), y)
warmup = 10  # steps of linear warmup
"""
SETUPS = {
    "mlp": _MLP,
    "mlp with optimizer": _MLP + "opt = nm_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, track='layers')\n",
    # examples/theory_quickstart.py's model and data, a short loader: the README's "API in a dozen lines"
    "digits": """
import torch, torch.nn.functional as F, nm_optim
from nm_optim.app.data import load_digits
from nm_optim.models import get_model

torch.manual_seed(0)
train = load_digits().train
model = get_model("small_vgg_bn", num_classes=10, in_channels=1, image_size=8)
example_inputs = train.batch(torch.arange(2))[0]
gen = torch.Generator().manual_seed(0)
loader = [train.batch(torch.randint(0, len(train), (32,), generator=gen)) for _ in range(20)]
""",
}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    markers: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def marker(self, key: str) -> str | None:
        for m in self.markers:
            if m == key or m.startswith(key + ":"):
                return m[len(key) + 1:].strip() if m != key else ""
        return None


_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file with the marker comments right above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{path.relative_to(ROOT)}:{i + 1}: a fenced block is never closed"
        markers, k = [], i - 1
        while k >= 0 and lines[k].strip() and _MARKER.match(lines[k].strip()):
            markers.insert(0, _MARKER.match(lines[k].strip()).group(1))
            k -= 1
        found.append(Block(path, i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n", tuple(markers)))
        i = end + 1
    return found


ALL_BLOCKS = [b for p in DOCS for b in blocks(p)]
CODE_BLOCKS = [b for b in ALL_BLOCKS if b.language in RUN_LANGUAGES]


def _param(b: Block):
    marks = [pytest.mark.slow] if b.marker("slow") is not None else []
    return pytest.param(b, id=b.id, marks=marks)


# -- the code blocks -------------------------------------------------------------------------------


def test_every_fenced_block_is_python_bash_or_text():
    odd = [f"{b.id} ```{b.language}" for b in ALL_BLOCKS if b.language not in RUN_LANGUAGES | TEXT_LANGUAGES]
    assert not odd, f"tag these blocks python or bash (run) or text (not code): {odd}"


def test_the_docs_have_code_blocks_and_the_readme_runs_its_api():
    """The collection itself works: a parser that found nothing would make every test below pass."""
    readme = [b for b in CODE_BLOCKS if b.path.name == "README.md"]
    assert any(b.language == "python" and "nm_optim.SGD" in b.code for b in readme)
    assert len(CODE_BLOCKS) >= 10


def test_markers_are_known_and_give_reasons():
    for b in ALL_BLOCKS:
        for m in b.markers:
            key = m.split(":", 1)[0].strip()
            assert key in {"not run", "setup", "slow", "demo table", "benchmark", "benchmark tiny"}, f"{b.id}: unknown marker <!-- {m} -->"
        reason = b.marker("not run")
        assert reason is None or reason, f"{b.id}: <!-- not run: --> needs its reason"
        setup = b.marker("setup")
        assert setup is None or setup in SETUPS, f"{b.id}: no setup {setup!r} in SETUPS"


@pytest.mark.parametrize("block", [_param(b) for b in CODE_BLOCKS if b.language == "python"])
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    if (reason := block.marker("not run")) is not None:
        pytest.skip(f"{block.id} not run: {reason}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    if (setup := block.marker("setup")) is not None:
        exec(compile(SETUPS[setup], f"<setup {setup}>", "exec"), namespace)
    exec(compile(block.code, block.id, "exec"), namespace)


@pytest.mark.parametrize("block", [_param(b) for b in CODE_BLOCKS if b.language == "bash"])
def test_bash_block_runs(block: Block):
    if (reason := block.marker("not run")) is not None:
        pytest.skip(f"{block.id} not run: {reason}")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{block.id} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


# -- links -----------------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_to_a_file_in_the_repository(path: Path):
    text = path.read_text(encoding="utf-8")
    targets = [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    broken = []
    for t in targets:
        target = (path.parent / t.split("#", 1)[0]).resolve()
        if not target.is_relative_to(ROOT) or not target.exists():
            broken.append(t)
    assert not broken, f"{path.relative_to(ROOT)}: links to nothing in the repository: {broken}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t).name for t in _LINK.findall(readme) if t.startswith("docs/") and t.endswith(".md")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


# -- the README's shape and numbers ----------------------------------------------------------------


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/"


def test_readme_runs_what_ci_runs():
    """CI (.ci/run) runs `make test`; the README's two commands are `make demo` and `make test`."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M)
    first = next(b for b in CODE_BLOCKS if b.path.name == "README.md")
    assert first.code.split() == ["make", "demo", "make", "test"]


def _tables_after(path: Path, marker: str) -> list[list[list[str]]]:
    """The markdown tables that follow a <!-- marker --> line: rows of cells, the header first."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tables = []
    for i, line in enumerate(lines):
        if line.strip() != f"<!-- {marker} -->":
            continue
        rows, j = [], i + 1
        while j < len(lines) and lines[j].startswith("|"):
            if not re.match(r"^\|[-|\s]+\|$", lines[j]):
                rows.append([c.strip() for c in re.split(r"(?<!\\)\|", lines[j].strip())[1:-1]])
            j += 1
        tables.append(rows)
    return tables


_DEMO_COLUMNS = {
    "groups": "num_groups", "steps": "steps",
    "exact": "exact_max_rel_err", "exact, last 10%": "exact_late_max_rel_err",
    "exact, breaking kept": "exact_with_breaking_max_rel_err", "paper": "paper_max_rel_err",
    "paper, last 10%": "paper_late_max_rel_err", "no forcing": "gradient_flow_max_rel_err",
}


def _fmt(key: str, value: float) -> str:
    return str(value) if key in ("num_groups", "steps") else f"{value:.1e}"


def test_demo_tables_are_docs_demo_summary_json():
    """Each table marked as the demo's shows docs/demo_summary.json's numbers: a row named by an
    experiment (`name`) is that experiment, the README's rows are the digits runs in the order the
    demo runs them, and the collapse row bounds all collapse runs."""
    summary = json.loads((ROOT / "docs" / "demo_summary.json").read_text(encoding="utf-8"))
    by_name = {e["name"]: e for e in summary["experiments"]}
    checked = 0
    for path in DOCS:
        for header, *rows in _tables_after(path, "demo table: docs/demo_summary.json"):
            columns = {i: _DEMO_COLUMNS[h] for i, h in enumerate(header) if h in _DEMO_COLUMNS}
            assert "exact_max_rel_err" in columns.values(), f"{path.name}: {header}"
            ordered = iter(summary["experiments"])
            for row in rows:
                label = row[0]
                if "collapse" in label:
                    runs = summary["collapse"]
                    for i, key in columns.items():
                        if row[i].startswith("≤"):
                            assert row[i] == "≤" + _fmt(key, max(r[key] for r in runs)), f"{path.name}: {label}"
                        elif key == "num_groups":
                            assert {r[key] for r in runs} == {int(row[i])}
                        else:
                            assert row[i] == "", f"{path.name}: {label}: {header[i]} {row[i]!r} is no bound"
                    checked += 1
                    continue
                named = re.match(r"`([\w.]+)`", label)
                exp = by_name[named.group(1)] if named else next(ordered)
                for i, key in columns.items():
                    assert row[i] == _fmt(key, exp[key]), (
                        f"{path.name}: {label} ({exp['name']}): {header[i]} shows {row[i]}, "
                        f"docs/demo_summary.json has {_fmt(key, exp[key])}")
                checked += 1
    assert checked >= 12


_BENCH_SHAPES = {"VGG-16": "vgg16", "1000 tensors × 4096": "many", "1000 tensors × 8": "tiny"}
_BENCH_PROVIDERS = {"torch foreach": "torch foreach", "torch fused": "torch fused",
                    "**nm_optim cpu**": "nm_optim cpu", 'nm_optim, `track="layers"`': "nm_optim cpu track=layers"}


def test_readme_benchmark_is_bench_results_cpu_bench_step_json():
    """The README's benchmark cells are bench/results/cpu_bench_step.json's: the median step to 3
    significant digits and its ratio to torch fused (the paired median where recorded)."""
    results = json.loads((ROOT / "bench" / "results" / "cpu_bench_step.json").read_text(encoding="utf-8"))
    sets = {r["shape_set"]: {row["provider"]: row for row in r["rows"]} for r in results["results"]}
    (header, *rows), = _tables_after(ROOT / "README.md", "benchmark: bench/results/cpu_bench_step.json")
    cells = 0
    for row in rows:
        shape = next(v for k, v in _BENCH_SHAPES.items() if row[0].startswith(k))
        for h, cell in zip(header[1:], row[1:]):
            if not cell:
                continue
            m = re.fullmatch(r"\**([\d.]+) ms(?: \(([\d.]+)×\))?(?:, (\d+) GB/s)?\**", cell)
            assert m, f"{row[0]} / {h}: {cell!r}"
            measured = sets[shape][_BENCH_PROVIDERS[h]]
            assert m.group(1) == f"{measured['ms']:.3g}", f"{row[0]} / {h}: {cell} vs {measured['ms']:.3g} ms"
            if m.group(2):
                ratio = measured.get("paired_ratio", measured["ratio_to_torch_fused"])
                assert m.group(2) == f"{ratio:.2f}", f"{row[0]} / {h}: {cell} vs {ratio:.2f}×"
            if m.group(3):
                assert int(m.group(3)) == round(measured["gbps"]), f"{row[0]} / {h}: {cell}"
            cells += 1
    assert cells >= 9
    # the paragraph above the table says when, on what and over how many rounds each set was measured
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    marker = readme.rindex("<!--", 0, readme.index("benchmark: bench/results/cpu_bench_step.json"))
    above = " ".join(readme[:marker].strip().split("\n\n")[-1].split())
    for shape in _BENCH_SHAPES.values():
        measured = next(r for r in results["results"] if r["shape_set"] == shape)["measured"]
        cpu = re.sub(r"\(R\)| Processor", "", measured["cpu_model"]).strip()
        rounds = {row["samples"] for row in sets[shape].values()}
        assert measured["date"].split()[0] in above and cpu in above, f"{shape}: {measured['date']} on {cpu}"
        assert len(rounds) == 1 and re.search(rf"\b{rounds.pop()}\b[^.;]*rounds", above), f"{shape}: rounds"


_TINY_PROVIDERS = {"torch foreach": "torch foreach", "torch fused": "torch fused", "**nm_optim cpu**": "nm_optim cpu",
                   '**nm_optim cpu, `track="layers"`**': "nm_optim cpu track=layers"}


def test_performance_host_cost_table_is_bench_results_cpu_bench_step_json():
    """docs/performance.md's 1000 x 8 table: each provider's median step and its paired ratio to
    torch fused with the 10th-90th percentiles, as bench/bench_step.py --shapes tiny recorded them."""
    results = json.loads((ROOT / "bench" / "results" / "cpu_bench_step.json").read_text(encoding="utf-8"))
    tiny = next(r for r in results["results"] if r["shape_set"] == "tiny")
    rows = {row["provider"]: row for row in tiny["rows"]}
    (header, *table), = _tables_after(ROOT / "docs" / "performance.md", "benchmark tiny: bench/results/cpu_bench_step.json")
    assert {r[0] for r in table} == set(_TINY_PROVIDERS)
    for label, step, ratio in table:
        measured = rows[_TINY_PROVIDERS[label]]
        assert step.strip("*") == f"{measured['ms']:.3g} ms", f"{label}: {step}"
        want = f"{measured['paired_ratio']:.2f}×"
        if measured["provider"] != "torch fused":
            want += f" ({measured['paired_p10']:.2f}–{measured['paired_p90']:.2f})"
        assert ratio.strip("*") == want, f"{label}: {ratio} vs {want}"
    date = tiny["measured"]["date"].split()[0]
    for page in ("README.md", "docs/performance.md"):
        assert f"measured {date}" in (ROOT / page).read_text(encoding="utf-8"), f"{page}: the date of the tiny run"


_BY_NEED_SETS = {"224 × 224": "vgg16 224x224 + find_symmetries", "(vgg16)`, 32 × 32": "vgg16 32x32 + find_symmetries",
                 "vgg16_bn": "vgg16_bn + find_symmetries"}


def test_statistics_by_need_ratios_are_bench_results_cpu_bench_stats_json():
    """docs/performance.md's statistics-by-need table and README's sentence on the real VGG-16: the
    paired ratios bench/bench_step.py --stats recorded for find_symmetries' tracks by need and
    with all 9 sums."""
    results = json.loads((ROOT / "bench" / "results" / "cpu_bench_stats.json").read_text(encoding="utf-8"))

    def ratios(prefix: str) -> tuple[str, str]:
        (res,) = [r for r in results["results"] if r["shape_set"].startswith(prefix)]
        rows = {row["provider"]: row["paired_ratio"] for row in res["rows"]}
        return f"{rows['nm_optim cpu + symmetries']:.2f}×", f"{rows['nm_optim cpu + symmetries, all 9 sums']:.2f}×"

    (header, *table), = _tables_after(ROOT / "docs" / "performance.md",
                                      "statistics by need: bench/results/cpu_bench_stats.json")
    assert len(table) == len(_BY_NEED_SETS)
    for row in table:
        (prefix,) = [v for k, v in _BY_NEED_SETS.items() if k in row[0]]
        assert (row[1].strip("*"), row[2]) == ratios(prefix), row
    need, nine = ratios(_BY_NEED_SETS["224 × 224"])
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"costs {need} torch's fused step instead of {nine} with all 9 sums" in readme
