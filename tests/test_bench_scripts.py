"""The scripts in benchmarks/ as a user meets them: every option explained, shapes parsed."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture
def scripts_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_option(script: str, scripts_path: None,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # bench_head, bench_wide_linear and profile_head listed options with no word of help.
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    lines = text.split("options:", 1)[1].splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^  -", line)]
    assert starts, text
    # Help follows on the option's line, or on the next, indented further (long options).
    bare = [lines[i].strip() for i in starts
            if not re.match(r"^  \S.*?\s{2,}\S", lines[i])
            and not (i + 1 < len(lines) and re.match(r"^ {4,}\S", lines[i + 1]))]
    assert bare == [], f"{script}: options without help: {bare}"


def test_tensor_sketch_shapes_take_either_separator(scripts_path: None) -> None:
    # "2x64x7x7x8192", the separator of bilinearpool-bench --shapes, was refused.
    bench = importlib.import_module("bench_tensor_sketch")
    assert bench._parse_shape("32,512,14,14,8192") == (32, 512, 14, 14, 8192)
    assert bench._parse_shape("32x512x14x14x8192") == (32, 512, 14, 14, 8192)
    for bad in ("2x64x7x7", "2,64,7,7,0", "a,b,c,d,e"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"five positive ints B,C,H,W,d "
                           rf"\(or BxCxHxWxd\).*but got '{bad}'"):
            bench._parse_shape(bad)


def test_scripts_are_found() -> None:
    assert {"bench_head", "bench_tensor_sketch", "profile_head"} <= set(SCRIPTS), SCRIPTS


def test_sqrtm_saved_bytes_count_shared_memory_once(scripts_path: None) -> None:
    """The pack hook added every saved tensor's size: eig-autograd, which saves 8 tensors
    in 4 blocks of memory, showed twice its saved bytes."""
    import torch

    bench = importlib.import_module("bench_matrix_sqrt")
    a = torch.randn(2, 8, 8, dtype=torch.float64)
    saved, finite = bench._saved_and_finite(lambda m: m * m, a, torch.ones_like(a))  # saves m twice
    assert saved == a.numel() * 8 / 2**20 and finite


def test_layer_profile_steps_do_not_accumulate_gradients(scripts_path: None) -> None:
    import torch

    profile = importlib.import_module("profile_layer")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    step = profile._step(lambda t: (t * t).sum(), [x])
    step()
    once = x.grad.clone()
    step()
    torch.testing.assert_close(x.grad, once)


def test_profiles_record_their_command(scripts_path: None, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """profile_head/profile_layer wrote their tables without the command that made them."""
    results = importlib.import_module("_results")
    assert results.report(["a table"], tmp_path / "p.md", command="python benchmarks/x.py --y") == 0
    assert (tmp_path / "p.md").read_text() == "Command: `python benchmarks/x.py --y`\n\na table\n"
    for script in ("profile_head", "profile_layer"):
        source = (BENCHMARKS / f"{script}.py").read_text()
        assert f'command=f"python benchmarks/{script}.py "' in source
    assert "fast-bcnn / plain throughput ratio: {med['plain model'] / total" in (
        BENCHMARKS / "profile_head.py").read_text()


def test_new_buffer_benchmark_runs_and_records_its_command(scripts_path: None, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    bench = importlib.import_module("bench_new_buffer")
    assert bench.main(["--mib", "8", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("Command: `python benchmarks/bench_new_buffer.py --mib 8 --repeats 1 --warmup 0 --out ")
    assert [line.split("|")[2].strip() for line in md.splitlines() if line.startswith("| 8 |")] == [
        "fresh", "fresh-hinted", "refill"]



def test_gram_paths_benchmark_runs_both_paths_and_restores_the_switch(scripts_path: None, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from bilinearpool.functional import bilinear as FB

    bench = importlib.import_module("bench_gram_paths")
    before = FB._GROUPS_UP_TO
    calls: list[str] = []
    for name in ("_gram_groups_forward", "_panels"):
        real = getattr(FB, name)
        monkeypatch.setattr(FB, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    assert bench.main(["--shapes", "3x6x2x2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    assert FB._GROUPS_UP_TO == before
    assert "_gram_groups_forward" in calls and "_panels" in calls
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("Command: `python benchmarks/bench_gram_paths.py --shapes 3x6x2x2 ")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in md.splitlines() if line.startswith("| 3x6x2x2 |")]
    assert [r[1] for r in rows] == ["naive", "groups", "panels", "groups-so", "panels-so"]
    assert rows[2][4] == rows[4][4] == "1.0"  # each panels case against itself
    assert rows[1][-1] == rows[2][-1] == "groups"  # C = 6 takes groups
    assert rows[1][5] and rows[3][5] and not rows[2][5]  # round ranges for the groups only
    calls.clear()  # --triu: the packed output on both paths, the same gradients (checked inside)
    assert bench.main(["--shapes", "3x6x2x2", "--repeats", "1", "--warmup", "0", "--triu", "--out",
                       str(tmp_path / "triu")]) == 0
    assert "_gram_groups_forward" in calls and "_panels" in calls and FB._GROUPS_UP_TO == before
    assert "packed output (triu=True)" in (tmp_path / "triu" / "results.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "3x6x2"])
    assert "expected a shape BxCxHxW of four positive integers, got '3x6x2'" in capsys.readouterr().err
