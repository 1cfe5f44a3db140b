"""What ``pip install`` gives a user: the sdist, and the wheel built from it.

Both are built with setuptools' PEP 517 hooks, the backend pip calls (here in the
development environment, without pip's isolated build environment): the sdist from a copy
of the source tree, the wheel from the unpacked sdist (as pip does with a package from an
index). The wheel is unpacked into a folder of its own and imported from there in a fresh
interpreter, away from the repository, and its console scripts are loaded through its
own metadata, so that a module, data file or entry point left out of the distribution
fails here rather than on a user's machine.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import bilinearpool

ROOT = Path(__file__).resolve().parents[1]
# what the sdist must carry besides the packages (MANIFEST.in): `make test` runs from it
_SOURCE_FILES = (
    "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile", "conftest.py", ".ci/run",
)
_SOURCE_DIRS = ("bilinearpool", "reference", "tests", "docs", "benchmarks")
_JUNK = shutil.ignore_patterns("__pycache__", "*.py[cod]", "_build", "generated", "*.egg-info")


def _modules() -> set[str]:
    """The files the wheel must hold: every module of both packages and their py.typed."""
    wanted = {"bilinearpool/py.typed", "breakhis/py.typed"}
    for package, source in (
        ("bilinearpool", ROOT / "bilinearpool"),
        ("breakhis", ROOT / "reference" / "breakhis"),
    ):
        wanted |= {f"{package}/{p.relative_to(source).as_posix()}" for p in source.rglob("*.py")}
    return wanted


def _build(backend_call: str, source: Path, out: Path) -> Path:
    """Run one PEP 517 hook of setuptools (``build_sdist`` / ``build_wheel``) in ``source``."""
    out.mkdir()
    code = f"from setuptools import build_meta; build_meta.{backend_call}({str(out)!r})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.iterdir()
    return built


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel built from the unpacked sdist)."""
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "tree"
    for name in _SOURCE_DIRS:
        shutil.copytree(ROOT / name, tree / name, ignore=_JUNK)
    for name in _SOURCE_FILES:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    sdist = _build("build_sdist", tree, tmp / "sdist")
    with tarfile.open(sdist) as archive:
        # the "data" filter where this Python has it (3.9.17+, 3.10.12+, 3.11.4+)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(tmp / "unpacked", **safe)
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = _build("build_wheel", unpacked, tmp / "wheel")
    return sdist, wheel


def test_sdist_carries_the_packages_tests_docs_and_benchmarks(dists: tuple[Path, Path]) -> None:
    sdist, _ = dists
    assert sdist.name == f"bilinearpool-{bilinearpool.__version__}.tar.gz"
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    expected = set(_SOURCE_FILES)
    for name in _SOURCE_DIRS:
        expected |= {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / name).rglob("*")
            if p.is_file()
            and not {"__pycache__", "_build", "generated"} & set(p.parts)
            and p.suffix != ".pyc"
        }
    assert expected - names == set(), "missing from the sdist"


def test_wheel_holds_every_module_and_nothing_else(dists: tuple[Path, Path]) -> None:
    _, wheel = dists
    assert wheel.name == f"bilinearpool-{bilinearpool.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = f"bilinearpool-{bilinearpool.__version__}.dist-info"
        metadata = email.message_from_string(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    files = {n for n in names if not n.startswith(f"{info}/")}
    assert files == _modules(), (sorted(_modules() - files), sorted(files - _modules()))
    assert f"{info}/licenses/LICENSE" in names
    assert metadata["Name"] == "bilinearpool" and metadata["Version"] == bilinearpool.__version__
    requires = metadata.get_all("Requires-Dist")
    assert "torch>=2.4" in requires and "numpy>=1.23" in requires
    # the extras the README's install lines name
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"vision", "timm", "bench", "reference", "docs", "dev", "all"} <= extras
    assert "bilinearpool-bench = bilinearpool.cli:main" in entry_points
    assert "breakhis-repro = breakhis.cli:main" in entry_points


_IMPORT_ALL = """
import importlib, pkgutil, sys
for name in ("bilinearpool", "breakhis"):
    package = importlib.import_module(name)
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        importlib.import_module(info.name)
for name, module in sorted(sys.modules.items()):
    if name.split(".")[0] in ("bilinearpool", "breakhis"):
        print(name, module.__file__)
"""


def test_installed_wheel_imports_and_runs_its_commands(
    dists: tuple[Path, Path], tmp_path: Path
) -> None:
    _, wheel = dists
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # from outside the repository, the unpacked wheel first on the path (before the
    # editable install of the development environment)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    modules = {
        n.replace("/", ".").removesuffix(".py").removesuffix(".__init__")
        for n in _modules()
        if n.endswith(".py")
    }
    assert modules <= set(imported)
    outside = {n: f for n, f in imported.items() if not Path(f).is_relative_to(site)}
    assert outside == {}, "imported from outside the installed wheel"
    assert (site / "bilinearpool" / "py.typed").is_file() and (site / "breakhis" / "py.typed").is_file()
    # each console script as the installed metadata declares it (what pip's launcher runs)
    for script in ("bilinearpool-bench", "breakhis-repro"):
        launch = (
            "import sys\nfrom importlib.metadata import distribution\n"
            "dist = distribution('bilinearpool')\n"
            "(ep,) = [e for e in dist.entry_points\n"
            f"         if e.group == 'console_scripts' and e.name == {script!r}]\n"
            "print(dist.locate_file(''), file=sys.stderr)\n"
            "sys.exit(ep.load()(['--help']))"
        )
        done = subprocess.run([sys.executable, "-c", launch], **run)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.startswith(f"usage: {script}")
        assert Path(done.stderr.strip()) == site  # the wheel's metadata, not the editable install's
    done = subprocess.run([sys.executable, "-m", "bilinearpool.bench", "--help"], **run)
    assert done.returncode == 0 and "usage:" in done.stdout
