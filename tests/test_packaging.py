"""What ships: the sdist holds what `pip install <sdist>` needs to build nm_optim._C (CMakeLists.txt,
csrc/, setup.py) and the package, nothing of the repository's tests, benchmarks or docs and no
compiled file of a developer's in-place build (MANIFEST.in); a wheel builds from it and runs the
compiled kernel; the package is typed (PEP 561's py.typed, the public API annotated).

The sdist and wheel are built through setuptools' PEP 517 hooks (what `python -m build` and pip
call), in this environment, offline."""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import nm_optim

ROOT = Path(__file__).resolve().parents[1]
# Besides the package and MANIFEST.in's files, setuptools writes these into every sdist.
SETUPTOOLS_OWN = ("PKG-INFO", "setup.cfg")
COMPILED = (".so", ".pyd", ".dylib", ".dll", ".o", ".pyc")


def source_copy(dest: Path) -> Path:
    """The working tree without version control, environments and caches, but with whatever a
    developer built in place (nm_optim/_C*.so), which the sdist must leave out."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", ".whl", "out"))
    return dest


def pep517(hook: str, source: Path, out: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Path:
    """Run setuptools' PEP 517 hook (build_sdist / build_wheel) in `source`; the file it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"import sys\nfrom setuptools import build_meta\nprint(build_meta.{hook}(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True,
                       timeout=timeout, env=env, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out / r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[Path, Path]:
    """(the sdist built from a copy of the tree, that copy)."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = source_copy(tmp / "src")
    return pep517("build_sdist", src, tmp / "dist"), src


def sdist_files(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        top = f"nm_optim-{nm_optim.__version__}/"
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert all(n.startswith(top) for n in names), sorted(names)[:5]
    return {n[len(top):] for n in names}


def test_the_sdist_holds_the_build_inputs_and_the_package_and_nothing_else(sdist):
    path, src = sdist
    files = sdist_files(path)
    build_inputs = {"pyproject.toml", "setup.py", "CMakeLists.txt", "README.md", "MANIFEST.in"}
    sources = {p.relative_to(src).as_posix() for p in (src / "csrc").rglob("*") if p.is_file()}
    package = {p.relative_to(src).as_posix() for p in (src / "nm_optim").rglob("*.py")} | {"nm_optim/py.typed"}
    assert sources and (src / "nm_optim" / "py.typed").is_file()
    missing = (build_inputs | sources | package) - files
    assert not missing, f"the sdist lacks {sorted(missing)}"
    extra = {f for f in files - build_inputs - sources - package - set(SETUPTOOLS_OWN)
             if not f.startswith("nm_optim.egg-info/")}
    assert not extra, f"the sdist holds files that are not build inputs: {sorted(extra)}"
    assert not [f for f in files if f.endswith(COMPILED)], "a compiled file in the sdist"


@pytest.mark.slow
def test_a_wheel_builds_from_the_sdist_and_runs_the_compiled_kernel(sdist, tmp_path):
    """The sdist alone (unpacked in an empty folder) builds a wheel with nm_optim._C (CPU only,
    without LTO: quicker), and that wheel, unpacked on its own, steps a param with the compiled
    kernel exactly as the reference does."""
    # setuptools' hook runs in this environment (no build isolation): pyproject.toml's build
    # requirements must be here (the test extra has none of them)
    missing = [m for m in ("pybind11", "cmake", "ninja") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the wheel build needs {', '.join(missing)} in this environment (pip install {' '.join(missing)})")
    path, _ = sdist
    with tarfile.open(path) as tar:
        # (the "data" filter, where this Python has it: an sdist holds plain files only)
        tar.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (source,) = (tmp_path / "unpacked").iterdir()
    # The build runs CMake and Ninja; those of this environment (pip's cmake and ninja packages,
    # as build isolation would install) come first on PATH.
    env = {**os.environ, "NM_OPTIM_CUDA": "0", "NM_OPTIM_LTO": "0",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    wheel = pep517("build_wheel", source, tmp_path / "wheel", env=env, timeout=1800)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "installed")
    assert "nm_optim/py.typed" in names
    assert [n for n in names if n.startswith("nm_optim/_C.") and n.endswith((".so", ".pyd"))], sorted(names)
    assert not [n for n in names if n.startswith("tests/")]
    code = (
        "import sys\n"
        # an editable install of the tree (setuptools' __editable__ finder) must not answer
        "sys.meta_path[:] = [f for f in sys.meta_path "
        "if not getattr(f, '__module__', type(f).__module__).startswith('__editable__')]\n"
        "import torch, nm_optim\n"
        f"assert nm_optim.__file__.startswith({str(tmp_path / 'installed')!r}), nm_optim.__file__\n"
        "assert nm_optim.build_info()['extension'], nm_optim.build_info()\n"
        "ps = [torch.nn.Parameter(torch.linspace(-1, 1, 37)) for _ in range(2)]\n"
        "for p in ps: p.grad = torch.linspace(2, -1, 37)\n"
        "for p, backend in zip(ps, ('cpu', 'reference')):\n"
        "    nm_optim.SGD([p], lr=0.1, momentum=0.9, backend=backend).step()\n"
        "assert torch.equal(ps[0], ps[1])\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")}, check=False)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# -- typing -----------------------------------------------------------------------------------------


def test_the_package_is_marked_typed():
    assert (Path(nm_optim.__file__).parent / "py.typed").is_file()


def _public_callables():
    """Every function of nm_optim.__all__ (and of its submodules' __all__), and every public
    method of its classes, as (name, function)."""
    seen = []

    def add(owner: str, obj) -> None:
        if inspect.isclass(obj):
            if getattr(obj, "_is_protocol", False):  # a Protocol's members are its annotations
                return
            for name, member in vars(obj).items():
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member) and (not name.startswith("_") or name == "__init__"):
                    seen.append((f"{owner}.{name}", member))
        elif inspect.isfunction(obj):
            seen.append((owner, obj))

    for name in nm_optim.__all__:
        obj = getattr(nm_optim, name)
        if inspect.ismodule(obj):
            for sub in getattr(obj, "__all__", ()):
                add(f"{name}.{sub}", getattr(obj, sub))
        else:
            add(name, obj)
    return seen


def test_the_public_api_is_annotated():
    """What a type checker reads through py.typed: every parameter and return of the public API
    annotated (unannotated, `reveal_type(opt.step())` would be Any)."""
    unannotated = []
    for name, fn in _public_callables():
        sig = inspect.signature(fn)
        params = [p.name for p in sig.parameters.values()
                  if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")]
        returns = sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__"
        if params or returns:
            unannotated.append(f"{name}({', '.join(params)}){' -> ?' if returns else ''}")
    assert len(_public_callables()) > 50
    assert not unannotated, f"not annotated: {unannotated}"
