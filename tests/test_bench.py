"""bilinearpool.bench and the ``bilinearpool-bench`` command line.

Exact measurements (saved bytes, parameter counts) are checked against closed forms; the
command line is run end to end with tiny settings and its files are parsed. No timing
thresholds: timings on a shared machine are not testable (benchmark protocol).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bilinearpool import FastBilinearPool, SEBlock, bench, build_backbone
import bilinearpool
from bilinearpool import cli
from bilinearpool.cli import main, parameter_table

FLOAT32 = 4


@pytest.fixture
def keep_threads():
    """The CLI's --threads sets torch's global thread count: restore it afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class TestSavedTensorCounter:
    def test_mul_saves_both_inputs(self):
        x = torch.randn(10, 7, requires_grad=True)
        y = torch.randn(10, 7, requires_grad=True)
        with bench.SavedTensorCounter() as saved:
            z = x * y
        assert (saved.nbytes, saved.count, saved.storages) == (2 * 70 * FLOAT32, 2, 2)
        z.sum().backward()  # the graph still works: the hooks hand the tensors back
        torch.testing.assert_close(x.grad, y)

    def test_one_storage_counts_once(self):
        x = torch.randn(6, 4, requires_grad=True)
        with bench.SavedTensorCounter() as saved:
            x * x
        assert (saved.nbytes, saved.count, saved.storages) == (24 * FLOAT32, 2, 1)

    def test_views_count_their_whole_storage_once(self):
        base = torch.randn(6, 4)
        a, b = base[:3].requires_grad_(), base[3:].requires_grad_()  # views of one storage
        with bench.SavedTensorCounter() as saved:
            a * b
        assert (saved.nbytes, saved.storages) == (24 * FLOAT32, 1)

    def test_nothing_saved_without_grad(self):
        x = torch.randn(5, requires_grad=True)
        with torch.no_grad(), bench.SavedTensorCounter() as saved:
            x * x
        assert (saved.nbytes, saved.count) == (0, 0)

    def test_hooks_are_removed_on_exit(self):
        x = torch.randn(5, requires_grad=True)
        with bench.SavedTensorCounter() as saved:
            pass
        x * x
        assert saved.count == 0

    def test_excluded_weight_is_not_counted_but_its_autocast_copy_is(self):
        """Under autocast the classifier keeps a bfloat16 copy of its weight: memory only the
        graph holds, so it is counted; the excluded float32 weight itself (and its views) is not."""
        x = torch.randn(2, 256, requires_grad=True)
        w = torch.zeros(8, 256, requires_grad=True)
        with bench.SavedTensorCounter(exclude=[w]) as saved, torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(x, w)
        assert saved.nbytes == x.numel() * 2 + w.numel() * 2  # the bfloat16 copies of x and of w
        with bench.SavedTensorCounter(exclude=[w]) as saved:
            torch.nn.functional.linear(x, w)  # float32: w itself is saved, not counted
        assert saved.nbytes == x.numel() * FLOAT32
        with bench.SavedTensorCounter(exclude=[w]) as saved:
            x @ w.t()  # a view (transpose) shares w's storage: not counted
        assert saved.nbytes == x.numel() * FLOAT32
        v = torch.randn(8, 256, requires_grad=True)
        with bench.SavedTensorCounter(exclude=[w]) as saved:
            (v + w) * w  # v + w derives from v too: counted; w not
        assert saved.nbytes == v.numel() * FLOAT32

    def test_excluded_storages_are_not_counted_as_storages(self):
        """The excluded weight is seen (so not counted) but is not one of the storages saved."""
        x = torch.randn(2, 256, requires_grad=True)
        w = torch.zeros(8, 256, requires_grad=True)
        with bench.SavedTensorCounter(exclude=[w]) as saved:
            torch.nn.functional.linear(x, w)  # saves x and w
        assert (saved.nbytes, saved.count, saved.storages) == (x.numel() * FLOAT32, 2, 1)
        with bench.SavedTensorCounter(exclude=[w]) as saved:
            pass
        assert (saved.nbytes, saved.count, saved.storages) == (0, 0, 0)

    def test_fused_pool_saves_only_its_input(self):
        x = torch.relu(torch.randn(2, 16, 5, 5)).requires_grad_()
        with bench.SavedTensorCounter() as saved:
            out = FastBilinearPool()(x)
        assert saved.nbytes == x.numel() * FLOAT32
        out.sum().backward()

    def test_naive_chain_saves_several_full_matrices(self):
        b, c = 2, 16
        x = torch.relu(torch.randn(b, c, 5, 5)).requires_grad_()
        with bench.SavedTensorCounter() as saved:
            bench.naive_bilinear_chain(x)
        assert saved.nbytes >= 3 * b * c * c * FLOAT32


class TestParameterCounts:
    def test_count_parameters(self):
        shared = nn.Linear(5, 2)
        model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(2, 3))
        assert bench.count_parameters(model) == 12 + 9
        model[3].weight.requires_grad_(False)
        assert bench.count_parameters(model, trainable_only=True) == 12 + 3

    @pytest.mark.parametrize(("channels", "reduction"), [(64, 8), (100, 16), (6, 8), (2048, 8)])
    def test_se_formula_equals_the_block(self, channels, reduction):
        block = SEBlock(channels, reduction=reduction)
        assert bench.se_parameter_count([channels], reduction=reduction) == bench.count_parameters(
            block
        )

    def test_analytic_errors(self):
        with pytest.raises(ValueError, match="head must be one of"):
            bench.analytic_parameter_count("gap", backbone_params=1, channels=2, num_classes=3)
        with pytest.raises(TypeError, match=r"head must be one of .*, but got 1 \(int\)"):
            bench.analytic_parameter_count(1, backbone_params=1, channels=2, num_classes=3)
        with pytest.raises(ValueError, match="triu=True applies to the 'fast-bcnn' head only"):
            bench.analytic_parameter_count(
                "bcnn", backbone_params=1, channels=2, num_classes=3, triu=True
            )
        with pytest.raises(ValueError, match="^channels must be a positive int, but got 0$"):
            bench.analytic_parameter_count("plain", backbone_params=1, channels=0, num_classes=3)
        with pytest.raises(ValueError, match="^backbone_params must be a non-negative int, but got -1$"):
            bench.analytic_parameter_count("plain", backbone_params=-1, channels=2, num_classes=3)

    @staticmethod
    def expected(head: str, backbone: int, c: int, k: int, se_channels: list[int]) -> int:
        """The closed forms, written out independently of bench.analytic_parameter_count."""
        se = sum(2 * ch * (ch // 8) + ch // 8 + ch for ch in se_channels)
        return {
            "plain": backbone + c * k + k,
            "se": backbone + se + c * k + k,
            "bcnn": 2 * backbone + c * c * k + k,
            "fast-bcnn": backbone + c * c * k + k,
            "fast-bcnn-triu": backbone + c * (c + 1) // 2 * k + k,
        }[head]

    def test_models_table_resnet18(self):
        heads = ["plain", "se", "bcnn", "fast-bcnn", "fast-bcnn-triu"]
        rows = parameter_table(["resnet18"], heads, num_classes=8)
        backbone = bench.count_parameters(build_backbone("resnet18"))
        assert backbone == 11_689_512 - (512 * 1000 + 1000)  # torchvision resnet18 without fc
        se_channels = [64, 64, 128, 128, 256, 256, 512, 512]  # SE after bn2 of each BasicBlock
        assert [r["head"] for r in rows] == heads
        for row in rows:
            assert row["channels"] == 512
            assert row["params"] == self.expected(row["head"], backbone, 512, 8, se_channels), row[
                "head"
            ]
            assert row["params"] == row["params_analytic"] and row["params_ok"] is True

    def test_models_table_resnet50(self):
        rows = parameter_table(["resnet50"], ["plain", "se", "bcnn", "fast-bcnn"], num_classes=8)
        backbone = 25_557_032 - (2048 * 1000 + 1000)  # torchvision resnet50 without fc
        se_channels = (
            [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
        )  # SE after bn3 of each Bottleneck
        for row in rows:
            assert row["channels"] == 2048
            assert row["params"] == self.expected(row["head"], backbone, 2048, 8, se_channels), row[
                "head"
            ]
            assert row["params_ok"] is True
        fast = next(r for r in rows if r["head"] == "fast-bcnn")
        assert fast["params"] == 57_062_472

    def test_pair_that_cannot_be_built_is_named(self):
        with pytest.raises(ValueError, match=r"^se: not applicable to mobilenet_v2: .*no supported block"):
            parameter_table(["mobilenet_v2"], ["plain", "se"])


class TestTiming:
    def test_round_robin_interleaves_in_balanced_orders(self):
        calls: list[str] = []
        fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
        times = bench.round_robin(fns, warmup=1, repeats=6)
        rounds = ["".join(calls[i : i + 3]) for i in range(0, len(calls), 3)]
        # One call of each per round; the timed rounds run the whole design once.
        assert all(sorted(r) == list("abc") for r in rounds)
        assert rounds[1:] == ["".join("abc"[k] for k in order) for order in bench.balanced_orders(3)]
        assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}
        assert all(t >= 0 for v in times.values() for t in v)

    def test_rounds_beyond_whole_designs_are_seeded_random_orders(self):
        # The first rows of a Williams design keep the same adjacent differences: with 11
        # candidates and 5 rounds, candidate 2 never ran right after candidate 0.
        def run(repeats: int) -> list[list[int]]:
            calls: list[int] = []
            fns = {k: (lambda k=k: calls.append(k)) for k in range(11)}
            bench.round_robin(fns, warmup=0, repeats=repeats)
            return [calls[i : i + 11] for i in range(0, len(calls), 11)]

        rows = run(5)
        assert all(sorted(r) == list(range(11)) for r in rows)
        assert rows != bench.balanced_orders(11)[:5] and rows == run(5)  # seeded
        design = bench.balanced_orders(11)
        rows = run(len(design) + 3)
        assert rows[: len(design)] == design and rows[len(design):] == run(3)
        # what the change mends: the design's first rows never put 2 right after 0
        first = {(r[j], r[j + 1]) for r in bench.balanced_orders(11)[:5] for j in range(10)}
        assert (0, 2) not in first

    @pytest.mark.parametrize("n", range(1, 10))
    def test_balanced_orders_each_follows_each_equally_often(self, n):
        from collections import Counter

        rows = bench.balanced_orders(n)
        assert len(rows) == (2 * n if n % 2 else n)
        assert all(sorted(r) == list(range(n)) for r in rows)
        pairs = Counter((r[j], r[j + 1]) for r in rows for j in range(n - 1))
        assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1
        places = Counter((v, j) for r in rows for j, v in enumerate(r))
        assert len(set(places.values())) == 1  # every candidate in every place equally often

    def test_balanced_orders_error(self):
        with pytest.raises(ValueError, match="n must be a positive int, but got 0"):
            bench.balanced_orders(0)

    def test_round_robin_errors(self):
        with pytest.raises(ValueError, match="repeats must be a positive int, but got 0"):
            bench.round_robin({"a": lambda: None}, warmup=0, repeats=0)
        with pytest.raises(ValueError, match="warmup must be a non-negative int"):
            bench.round_robin({"a": lambda: None}, warmup=-1, repeats=1)

    def test_median_and_throughput(self):
        assert bench.median([5.0, 1.0, 2.0, 100.0]) == 3.5
        assert bench.images_per_second(4, 2.0) == 2.0
        with pytest.raises(ValueError, match="empty"):
            bench.median([])
        with pytest.raises(ValueError, match="seconds must be positive"):
            bench.images_per_second(4, 0.0)

    def test_training_step_updates_nothing_with_lr_zero(self):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).train()
        before = [p.detach().clone() for p in model.parameters()]
        step = bench.make_training_step(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        assert step() > 0
        assert all(p.grad is not None for p in model.parameters())
        for p, q in zip(model.parameters(), before):
            torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)

    def test_inference_step_records_no_graph(self):
        out = bench.make_inference_step(nn.Linear(4, 2), torch.randn(3, 4))()
        assert not out.requires_grad

    def test_peak_baseline_is_read_without_the_previous_gradients(self, monkeypatch):
        """A step frees the last call's gradients before making new ones: read with them still
        allocated, the baseline is too high and the peak too low by their size."""
        p = torch.zeros(250, requires_grad=True)  # its gradient: 1000 bytes
        state = {"activations": 0, "peak": 0}

        def allocated(*_: object) -> int:
            return state["activations"] + (p.grad.numel() * FLOAT32 if p.grad is not None else 0)

        def step() -> None:  # as make_training_step: zero_grad(set_to_none=True), forward, backward
            p.grad = None
            state["activations"] = 400
            state["peak"] = max(state["peak"], allocated())
            p.grad = torch.ones(250)
            state["peak"] = max(state["peak"], allocated())
            state["activations"] = 0

        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=allocated()))
        monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
        step()  # the warm-up call leaves its gradient allocated
        assert cli._peak_bytes(step, torch.device("cuda"), [p]) == 400 + 1000
        assert cli._peak_bytes(step, torch.device("cpu"), [p]) is None


class TestRegistries:
    def test_environment(self):
        env = bench.environment("cpu")
        for key in ("torch", "device", "device_type", "threads", "date", "python", "cpu_count"):
            assert env[key] is not None, key
        assert env["torch"] == torch.__version__

    def test_environment_records_switches_and_code_version(self, monkeypatch, tmp_path):
        monkeypatch.setenv("BILINEARPOOL_TRITON", "0")
        monkeypatch.delenv("BILINEARPOOL_HUGEPAGES", raising=False)
        env = bench.environment("cpu")
        assert env["BILINEARPOOL_TRITON"] == "0" and env["BILINEARPOOL_HUGEPAGES"] is None
        assert env["numpy"] and env["bilinearpool"]
        assert "transparent_hugepages" in env and "git_commit" in env and "git_dirty" in env
        root = Path(bench.__file__).resolve().parents[1]
        if (root / ".git").exists():
            assert re.fullmatch(r"[0-9a-f]{40}", env["git_commit"]) and isinstance(env["git_dirty"], bool)
        assert bench._git_state(tmp_path) == {"git_commit": None, "git_dirty": None}  # not a checkout
        thp = tmp_path / "enabled"
        thp.write_text("always [madvise] never\n")
        assert bench._transparent_hugepages(thp) == "madvise"
        assert bench._transparent_hugepages(tmp_path / "missing") is None
        line = cli._describe_environment(
            {**env, "git_commit": "0123456789abcdef" * 2 + "01234567", "git_dirty": True, "transparent_hugepages": "never"}
        )
        for text in ("numpy ", f"bilinearpool {env['bilinearpool']} (git 0123456789ab, dirty)",
                     "BILINEARPOOL_TRITON=0 BILINEARPOOL_HUGEPAGES=unset", "transparent huge pages never"):  # fmt: skip
            assert text in line, text

    @pytest.mark.parametrize("installed", [None, "0.0.1"])
    def test_environment_names_the_version_of_the_code_that_ran(self, monkeypatch, installed):
        # gpu_check.sh runs the checkout from PYTHONPATH: no distribution metadata there
        # (the GPU results of 2026-11-27 read "bilinearpool None"), or an older install's
        def version(name):
            if name != "bilinearpool" or installed is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed

        monkeypatch.setattr(importlib.metadata, "version", version)
        env = bench.environment("cpu")
        assert env["bilinearpool"] == bilinearpool.__version__ != installed
        assert "bilinearpool (not installed)" in cli._describe_environment({**env, "bilinearpool": None})
        assert "; 1 thread of 2 CPUs;" in cli._describe_environment({**env, "threads": 1, "cpu_count": 2})
        assert "; 2 threads of 1 CPU;" in cli._describe_environment({**env, "threads": 2, "cpu_count": 1})

    def test_progress_bar_ends_at_its_total_when_cases_fail(self, monkeypatch, tmp_path, capsys):
        """Calls that never ran (a case failing at its shape, training steps failing at
        batch 1) were planned in the total and never counted: the bar closed at 21/22 and
        4/6, which a log file shows as a stalled run (helper-149)."""
        bars = []

        class Bar:
            def __init__(self, total, desc):
                self.total, self.n = total, 0
                bars.append(self)

            def update(self, n=1):
                self.n += n

            def set_postfix_str(self, *args, **kwargs):
                pass

            def refresh(self):
                pass

            def close(self):
                pass

        monkeypatch.setattr(cli, "_progress", lambda total, desc, enabled: Bar(total, desc))
        assert main(["layers", "--threads", "1", "--shapes", "1x1x1x1", "--repeats", "1", "--warmup", "0",
                     "--out", str(tmp_path / "l")]) == 0
        assert main(["models", "--threads", "1", "--backbones", "resnet18", "--heads", "plain", "fast-bcnn",
                     "--resolutions", "32", "--batch-size", "1", "--repeats", "1", "--warmup", "0",
                     "--out", str(tmp_path / "m")]) == 0
        rows = json.loads((tmp_path / "l" / "layers.json").read_text())["rows"]
        assert any(r.get("error") for r in rows)  # a case that cannot run at 1x1x1x1
        assert "failed" in (tmp_path / "m" / "models.md").read_text()  # its training steps
        assert [(b.n, b.total) for b in bars] == [(bars[0].total, bars[0].total), (bars[1].total, bars[1].total)]

    def test_mps_work_is_waited_for_before_the_clock_stops(self, monkeypatch):
        """--device mps was accepted, but time_call synchronised CUDA only: the times of an
        asynchronous device were launch times (helper-149)."""
        calls = []
        monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("sync"))
        assert bench.time_call(lambda: calls.append("work"), "mps") >= 0.0
        assert calls == ["sync", "work", "sync"]

    def test_environment_records_thread_and_allocator_variables(self, monkeypatch):
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
        monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
        monkeypatch.setenv("NOT_A_RUNTIME_SWITCH", "x")
        # what changes which kernels run, or how CUDA times (helper-149: unrecorded)
        for name, value in (("ATEN_CPU_CAPABILITY", "default"), ("ONEDNN_MAX_CPU_ISA", "SSE41"),
                            ("CUDA_LAUNCH_BLOCKING", "1"), ("NVIDIA_TF32_OVERRIDE", "0"),
                            ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")):
            monkeypatch.setenv(name, value)
        env = bench.environment("cpu")
        assert {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "CUDA_LAUNCH_BLOCKING": "1",
                "NVIDIA_TF32_OVERRIDE": "0", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}.items() \
            <= env["runtime_env"].items()
        assert env["THP_MEM_ALLOC_ENABLE"] == "1"
        assert env["runtime_env"]["OMP_NUM_THREADS"] == "1" and env["runtime_env"]["MALLOC_ARENA_MAX"] == "2"
        assert all(k.startswith(bench.RUNTIME_ENV_PREFIXES) or k in bench.RUNTIME_ENV_NAMES
                   for k in env["runtime_env"])  # fmt: skip
        line = cli._describe_environment(env)
        assert "THP_MEM_ALLOC_ENABLE=1" in line and "OMP_NUM_THREADS=1" in line and "MALLOC_ARENA_MAX=2" in line
        assert "GLIBC_TUNABLES=glibc.malloc.trim_threshold=1" in line
        assert "NOT_A_RUNTIME_SWITCH" not in line
        assert "no OMP_*/" in cli._describe_environment({**env, "runtime_env": {}})
        assert "/GLIBC_TUNABLES/" in cli._describe_environment({**env, "runtime_env": {}})
        # A result recorded before GLIBC_TUNABLES was watched does not claim it was unset.
        old = {k: v for k, v in env.items() if k != "runtime_env_watched"}
        line = cli._describe_environment({**old, "runtime_env": {}})
        assert "no OMP_*/" in line and "MALLOC_*/LD_PRELOAD set" in line and "GLIBC" not in line
        assert "OMP_" not in cli._describe_environment({k: v for k, v in env.items() if k != "runtime_env"})

    @pytest.mark.parametrize(
        ("untracked", "dirty"),
        [("bilinearpool/new_op.py", True), ("benchmarks/bench_new.py", True),
         ("benchmarks/results/run1/", False), ("notes.txt", False)],
    )  # fmt: skip
    def test_untracked_code_makes_the_checkout_dirty(self, monkeypatch, tmp_path, untracked, dirty):
        """An untracked module of the package runs in the benchmark: it makes the code differ
        from the commit; results written under benchmarks/results/ do not."""

        def fake_git(cmd, **kwargs):
            args = cmd[cmd.index("-C") + 2 :]
            out = {"rev-parse": str(tmp_path) if "--show-toplevel" in args else "ab" * 20}.get(args[0])
            if args[0] == "status":  # git lists untracked files only when asked to
                out = "" if "--untracked-files=no" in args else f"?? {untracked}\n"
            return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

        monkeypatch.setattr(bench.subprocess, "run", fake_git)
        assert bench._git_state(tmp_path) == {"git_commit": "ab" * 20, "git_dirty": dirty}

    def test_a_checkout_git_refuses_to_read_is_not_called_no_checkout(self, monkeypatch, tmp_path):
        """A checkout owned by another user (a Docker volume, CI) was recorded as "not a git
        checkout": git's refusal (dubious ownership) was taken for no repository (helper-149)."""
        (tmp_path / ".git").mkdir()
        refusal = f"fatal: detected dubious ownership in repository at '{tmp_path}'\nTo add an exception ..."

        def refusing_git(cmd, **kwargs):
            raise subprocess.CalledProcessError(128, cmd, output="", stderr=refusal)

        monkeypatch.setattr(bench.subprocess, "run", refusing_git)
        state = bench._git_state(tmp_path)
        assert state == {"git_commit": None, "git_dirty": None,
                         "git_problem": f"detected dubious ownership in repository at '{tmp_path}'"}
        env = {**bench.environment("cpu"), **state}
        assert f"(git: detected dubious ownership in repository at '{tmp_path}')" in cli._describe_environment(env)
        # git's "fatal:" line, not a warning before it; a git that hangs (its stderr in bytes) is no crash
        refusal = f"warning: ignoring something\nfatal: detected dubious ownership in repository at '{tmp_path}'"
        assert bench._git_state(tmp_path)["git_problem"].startswith("detected dubious ownership")

        def hanging_git(cmd, **kwargs):
            raise subprocess.TimeoutExpired(cmd, 10, output=b"", stderr=b"warning: slow\n")

        monkeypatch.setattr(bench.subprocess, "run", hanging_git)
        assert bench._git_state(tmp_path) == {"git_commit": None, "git_dirty": None}

    def test_rewritten_committed_results_are_not_changed_code(self):
        # make bench rewrites the committed layer results before it runs the models.
        assert not bench._dirty(" M benchmarks/results/cpu-2core/layers.md\n M benchmarks/results/cpu-2core/layers.json")
        assert bench._dirty(" M benchmarks/results/cpu-2core/layers.md\n M bilinearpool/bench.py")
        assert bench._dirty("R  bilinearpool/a.py -> bilinearpool/b.py")
        # _git_state strips git's output: the first line's leading space goes
        assert not bench._dirty("M benchmarks/results/cpu-2core/layers.md\n M benchmarks/results/cpu-2core/x.json")
        assert bench._dirty("M bilinearpool/bench.py")

    @pytest.mark.parametrize("name", list(bench.LAYER_CASES))
    def test_every_layer_case_runs(self, name):
        case = bench.LAYER_CASES[name]
        fn = case.build(8, torch.device("cpu"))
        maps = [torch.relu(torch.randn(2, 8, 4, 4)).requires_grad_() for _ in range(case.streams)]
        out = fn(*maps)
        out.sum().backward()
        assert torch.isfinite(out).all() and all(torch.isfinite(m.grad).all() for m in maps)

    @pytest.mark.parametrize("name", list(bench.LAYER_CASES))
    def test_layer_output_dim_matches_one_output(self, name):
        case = bench.LAYER_CASES[name]
        fn = case.build(6, torch.device("cpu"))
        out = fn(*[torch.rand(2, 6, 3, 3) for _ in range(case.streams)])
        assert bench.layer_output_dim(fn, 6, streams=case.streams, out=out) == out[0].numel()

    def test_layer_output_dim(self):
        c = 12
        assert bench.layer_output_dim(FastBilinearPool(), c) == c * c
        assert bench.layer_output_dim(FastBilinearPool(triu=True), c) == c * (c + 1) // 2
        for name, expected in (
            ("fast-bcnn", c * c),
            ("fast-bcnn-triu", c * (c + 1) // 2),
            ("bcnn-2stream", c * c),
            ("isqrt-cov", c * (c + 1) // 2),
            ("isqrt-cov-r256", 256 * 257 // 2),
            ("compact-ts", 8192),
            ("lowrank-r512", 512),
        ):
            case = bench.LAYER_CASES[name]
            fn = case.build(c, torch.device("cpu"))
            assert bench.layer_output_dim(fn, c, streams=case.streams) == expected, name
        # no output_dim: the size of one output
        assert bench.layer_output_dim(bench.naive_bilinear_chain, c, out=torch.zeros(2, c * c)) == c * c
        with pytest.raises(ValueError, match="no output_dim"):
            bench.layer_output_dim(bench.naive_bilinear_chain, c)
        with pytest.raises(RuntimeError, match="output_dim"):
            bench.layer_output_dim(FastBilinearPool(), c, out=torch.zeros(2, c))

    def test_classifier_parameter_count(self):
        assert bench.CLASSIFIER_CLASSES == 8
        for dim in (1, 36, 512, 8192):
            expected = bench.count_parameters(nn.Linear(dim, 8))
            assert bench.classifier_parameter_count(dim) == expected == 8 * dim + 8
        assert bench.classifier_parameter_count(10, 3) == 33
        with pytest.raises(ValueError, match="dim must be a positive int"):
            bench.classifier_parameter_count(0)

    def test_register_layer_case_rejects_duplicates(self):
        with pytest.raises(ValueError, match="already registered"):
            bench.register_layer_case(bench.LAYER_CASES["naive"])
        with pytest.raises(ValueError, match="role must be"):
            bench.LayerCase("x", "x", lambda c, d: torch.relu, role="mine")

    def test_model_heads_cover_the_paper(self):
        assert {"plain", "se", "bcnn", "fast-bcnn"} <= set(bench.MODEL_HEADS)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, interval", [(io.StringIO, 30.0), (_Terminal, 0.1)])
def test_progress_bar_in_a_file_refreshes_seldom(stream, interval, monkeypatch):
    """Redirected (`make demo > log`), the bar wrote hundreds of frames into the log."""
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys, "stderr", stream())
    bar = cli._progress(10, "layers", enabled=True)
    try:
        assert bar.mininterval == interval and bar.maxinterval == max(interval, 10.0)
    finally:
        bar.close()


def test_a_layers_run_in_a_file_writes_few_frames(tmp_path, monkeypatch, keep_threads):
    """Setting the bar's postfix refreshed it on every call, past its 30 s interval: a
    demo's log got 83 frames in 4 minutes (helper-137)."""
    pytest.importorskip("tqdm")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["layers", "--shapes", "2x8x3x3", "--cases", "naive", "fast-bcnn", "--repeats", "3",
            "--warmup", "1", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    frames = err.getvalue().count("\r")
    assert frames <= 3, err.getvalue()  # the first frame, the last, and at most one between


class TestCommandLine:
    @pytest.mark.parametrize("umask", [0o022, 0o077])
    def test_results_get_the_permissions_of_any_new_file(self, umask, tmp_path, capsys, keep_threads):
        """The files were staged with tempfile.mkstemp (mode 0600) and renamed into place:
        results meant for colleagues were readable by their owner only."""
        old = os.umask(umask)
        try:
            argv = ["layers", "--shapes", "2x8x4x4", "--cases", "naive", "--repeats", "1", "--warmup", "0",
                    "--threads", "1", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
            assert main(argv) == 0
        finally:
            os.umask(old)
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        assert {"layers.csv", "layers.json", "layers.md"} <= set(modes) <= {
            "layers.csv", "layers.json", "layers.md", "layers.png"}, modes  # (the plot: with matplotlib)
        assert set(modes.values()) == {0o666 & ~umask}

    def test_layers_end_to_end(self, tmp_path, capsys, keep_threads, monkeypatch):
        gap = bench.LayerCase(
            "test-gap", "global average pooling", lambda c, d: lambda x: x.mean((2, 3))
        )
        monkeypatch.setitem(
            bench.LAYER_CASES, gap.name, gap
        )  # a registered case runs with the others

        class Scaled(nn.Module):  # a frozen parameter is no weight to learn (helper-143: counted)
            def __init__(self, c: int) -> None:
                super().__init__()
                self.w = nn.Parameter(torch.ones(c))
                self.frozen = nn.Parameter(torch.ones(1000), requires_grad=False)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x.mean((2, 3)) * self.w

        scaled = bench.LayerCase("test-frozen", "scaled average pooling", lambda c, d: Scaled(c).to(d))
        monkeypatch.setitem(bench.LAYER_CASES, scaled.name, scaled)
        argv = ["layers", "--shapes", "2x8x4x4", "3x6x2x3", "--repeats", "1", "--warmup", "0",
                "--threads", "1", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        stdout = capsys.readouterr().out
        assert "| shape | case | fwd_bwd_ms |" in stdout and "Results written to" in stdout
        rows = read_csv(tmp_path / "layers.csv")
        cases = list(bench.LAYER_CASES)
        assert len(rows) == 2 * len(cases)
        assert {r["case"] for r in rows} == set(cases)
        by = {(r["shape"], r["case"]): r for r in rows}
        assert float(by["2x8x4x4", "naive"]["vs_naive"]) == 1.0
        assert by["2x8x4x4", "naive"]["vs_naive_range"] == "1.00-1.00"
        assert float(by["2x8x4x4", "fast-bcnn"]["saved_vs_input"]) == 1.0
        assert float(by["2x8x4x4", "fast-bcnn"]["input_MiB"]) == 2 * 8 * 4 * 4 * FLOAT32 / 2**20
        assert "memory met (1.000x)" in by["2x8x4x4", "fast-bcnn"]["goals"]
        # save_output: the output is saved too (input + output + one norm per sample), and
        # with a linear classifier on top the graph keeps no more than fast-bcnn's
        saved_so = (2 * 8 * 4 * 4 + 2 * 64 + 2) * FLOAT32 / 2**20
        assert float(by["2x8x4x4", "fast-bcnn-so"]["saved_MiB"]) == pytest.approx(saved_so, rel=1e-3)
        assert "memory NOT met" in by["2x8x4x4", "fast-bcnn-so"]["goals"]
        with_linear = {name: float(by["2x8x4x4", name]["saved_with_linear_MiB"]) for name in ("fast-bcnn", "fast-bcnn-so")}
        assert with_linear["fast-bcnn"] == pytest.approx((2 * 8 * 4 * 4 + 2 * 64) * FLOAT32 / 2**20, rel=1e-3)
        assert with_linear["fast-bcnn-so"] == pytest.approx(with_linear["fast-bcnn"] + 2 * FLOAT32 / 2**20, rel=1e-3)
        # what a user needs to choose: D, the layer's parameters, an 8-class classifier's
        for shape, c in (("2x8x4x4", 8), ("3x6x2x3", 6)):
            expected = {
                "naive": (c * c, 0),
                "matmul-floor": (c * c, 0),
                "fast-bcnn": (c * c, 0),
                "fast-bcnn-triu": (c * (c + 1) // 2, 0),
                "fast-bcnn-so": (c * c, 0),
                "bcnn-2stream": (c * c, 0),
                "bcnn-2stream-so": (c * c, 0),
                "isqrt-cov": (c * (c + 1) // 2, 0),
                "isqrt-cov-r256": (256 * 257 // 2, c * 256 + 2 * 256),  # 1x1 conv + BN
                "compact-ts": (8192, 0),  # random projections are buffers
                "lowrank-r512": (512, 2 * 512 * c),  # U and V
                "test-gap": (c, 0),  # no output_dim: from the output's shape
                "test-frozen": (c, c),  # trainable only: w, not the frozen 1000
            }
            for name, (dim, layer_params) in expected.items():
                row = by[shape, name]
                assert int(row["D"]) == dim, (shape, name)
                assert int(row["layer_params"]) == layer_params, (shape, name)
                assert int(row["classifier_params"]) == 8 * dim + 8, (shape, name)
        data = json.loads((tmp_path / "layers.json").read_text())
        assert (
            data["environment"]["threads"] == 1
            and data["environment"]["torch"] == torch.__version__
        )
        assert data["command"].startswith("bilinearpool-bench layers --shapes 2x8x4x4")
        assert len(data["raw"]) == len(rows) and all(len(r["times_s"]) == 1 for r in data["raw"])
        assert any("saved bytes <= 1.1x" in g for g in data["goals"])
        assert all(
            {"D", "layer_params", "classifier_params"} <= set(r) for r in data["rows"]
        )
        summary = data["summary"]
        assert summary["columns"][:5] == ["shape", "case", "D", "layer_params", "classifier_params"]
        assert {"vs_naive", "saved_vs_input"} <= set(summary["columns"])
        ours = [(r["shape"], r["case"]) for r in rows if r["case"] not in ("naive", "matmul-floor")]
        assert [(r["shape"], r["case"]) for r in summary["rows"]] == ours
        assert summary["rows"][0]["classifier_params"] == 8 * summary["rows"][0]["D"] + 8
        md = (tmp_path / "layers.md").read_text()
        assert (
            "| shape | case |" in md
            and "Goals:" in md
            and re.search(r"Command: `([A-Z_]+=\S+ )*bilinearpool-bench layers", md)  # the variables set first
            and "### Which pooling to choose" in md
            and "| shape | case | D | layer_params | classifier_params |" in md
            and "| 2x8x4x4 | fast-bcnn | 64 | 0 | 520 |" in md
            and "| 2x8x4x4 | lowrank-r512 | 512 | 8,192 | 4,104 |" in md
        )

    def test_models_end_to_end_and_report(self, tmp_path, capsys, keep_threads, monkeypatch):
        cleared = []  # the peak is read with every gradient of the model cleared first

        def spy(step, device, params=()):
            cleared.append(len(list(params)))

        monkeypatch.setattr(cli, "_peak_bytes", spy)
        argv = ["models", "--backbones", "resnet18", "--resolutions", "64", "--batch-size", "1",
                "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        assert len(cleared) == 4 and min(cleared) > 0
        rows = read_csv(tmp_path / "models.csv")
        assert [r["head"] for r in rows] == ["plain", "se", "bcnn", "fast-bcnn"]
        assert all(
            r["params_ok"] == "True" and r["resolution"] == "64" and r["batch"] == "1" for r in rows
        )
        assert float(rows[0]["infer_vs_plain"]) == 1.0 and float(rows[0]["train_vs_plain"]) == 1.0
        assert rows[0]["infer_range"] == rows[0]["train_range"] == "1.00-1.00"
        assert all(float(r["infer_img_s"]) > 0 and float(r["train_img_s"]) > 0 for r in rows)
        data = json.loads((tmp_path / "models.json").read_text())
        assert (
            data["goals"][0] == "Parameter counts equal the analytic counts: met for all 4 models"
        )
        assert data["settings"]["num_classes"] == 8
        report = tmp_path / "report.md"
        assert (
            main(["report", str(tmp_path), "--out", str(report), "--note", "A shared machine."])
            == 0
        )
        text = report.read_text()
        assert text.startswith("# bilinearpool benchmark results") and "A shared machine." in text
        assert data["command"] in text and "| backbone | head |" in text

    def test_works_without_tqdm_and_matplotlib(self, tmp_path, monkeypatch, keep_threads):
        for name in ("tqdm", "tqdm.auto", "matplotlib", "matplotlib.pyplot"):
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
        argv = ["layers", "--shapes", "2x4x3x3", "--cases", "fast-bcnn", "--repeats", "1", "--warmup", "0",
                "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "layers.csv",
            "layers.json",
            "layers.md",
        ]
        assert [r["case"] for r in read_csv(tmp_path / "layers.csv")] == [
            "naive",
            "matmul-floor",
            "fast-bcnn",
        ]

    def test_help_explains(self, capsys):
        with pytest.raises(SystemExit) as exc:
            main(["--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert all(word in out for word in ("layers", "models", "demo", "report", "ratios"))
        with pytest.raises(SystemExit):
            main(["models", "--help"])
        out = capsys.readouterr().out
        assert "--backbones" in out and "--batch-size-at" in out and "--channels-last" in out

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["layers", "--shapes", "8x2048x7"], "a shape is BxCxHxW"),
            (["layers", "--repeats", "0"], "--repeats must be at least 1, but got 0"),
            (["models", "--batch-size-at", "448"], "expected RESOLUTION=BATCH"),
            (["models", "--resolutions", "8"], "--resolutions must be at least 32 pixels"),
            # Path("") is the current folder: an empty value would write the results there
            (["layers", "--out", ""], "argument --out: expected a path, but got ''"),
            (["demo", "--out", " "], "argument --out: expected a path, but got ' '"),
            (["report", ""], "argument folder: expected a path, but got ''"),
            (["report", "x", "--title", ""], "argument --title: expected some text, but got ''"),
            (["report", "x", "--note", "ok", "--note", " "], "argument --note: expected some text, but got ' '"),
            # demo is always quick: the option would do nothing
            (["demo", "--quick"], "unrecognized arguments: --quick"),
            # too large for torch.set_num_threads (a ValueError traceback) or for torch
            (["layers", "--threads", "4294967296"], "error: --threads must be at most 1024, but got 4294967296"),
            (["models", "--num-classes", str(2**63)], f"error: --num-classes must be at most {2**31 - 1}, but got"),
            # taken by torch and ignored
            (["layers", "--device", "cpu:5"], "error: --device expected cpu (one CPU device, index 0), but got 'cpu:5'"),
            # options that change nothing: ignored without a word before
            (["layers", "--quick", "--repeats", "1", "--warmup", "0"],
             "error: --quick picks --warmup, --repeats, and all of them are given: it would change nothing"),
            (["models", "--quick", "--repeats", "1", "--warmup", "0", "--resolutions", "64", "--batch-size", "3"],
             "error: --quick picks --warmup, --repeats, --resolutions, --batch-size, and all of them are given"),
            (["models", "--quick", "--repeats", "1", "--warmup", "0", "--resolutions", "64", "--batch-size-at", "64=1"],
             "error: --quick picks --warmup, --repeats, --resolutions, --batch-size, and all of them are given"),
            (["models", "--resolutions", "64", "--batch-size", "4", "--batch-size-at", "64=2"],
             "error: --batch-size 4 would be used at no resolution: --batch-size-at sets the batch size of each"),
        ],
    )
    def test_bad_arguments(self, argv, message, capsys):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["models", "--heads", "gap", "--params-only", "--backbones", "resnet18"],
             r"error: unknown head \['gap'\]; known: \['plain'"),
            (["models", "--heads", "gap", "nope", "--params-only", "--backbones", "resnet18"],
             r"error: unknown heads \['gap', 'nope'\]; known: \['plain'"),
            (["layers", "--cases", "nope"], r"error: unknown layer case \['nope'\]; known: \['naive'"),
            (["layers", "--cases", "nope", "nah"], r"error: unknown layer cases \['nope', 'nah'\]; known: \['naive'"),
            (["report", "/nonexistent-folder"],
             "report: error: expected a folder of layers.json / models.json, but /nonexistent-folder does not exist"),
            (["layers", "--device", "foo"], "error: --device expected cpu, cuda, cuda:N or mps, but got 'foo'"),
            (["models", "--backbones", "resnet18", "nope_net", "--params-only"],
             r"error: --backbones expected names that bilinearpool.build_backbone accepts .*but got unknown \['nope_net'\]"),
        ],
    )  # fmt: skip
    def test_unknown_names(self, argv, message, capsys):
        """CLI input that cannot run: an argparse-style error line (exit code 2), no traceback."""
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err

    @pytest.mark.parametrize(
        ("device", "available"),
        [("mps", lambda: torch.backends.mps.is_available()), ("cuda", lambda: torch.cuda.is_available())],
    )
    def test_unavailable_device(self, device, available, capsys):
        if available():
            pytest.skip(f"{device} is available here")
        with pytest.raises(SystemExit) as exc:
            main(["layers", "--device", device, "--shapes", "2x4x3x3"])
        assert exc.value.code == 2
        assert f"error: --device {device} was asked for, but" in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("count", "message"),
        [(1, "only 1 CUDA device is visible (cuda:0)"), (2, "only 2 CUDA devices are visible (cuda:0 ... cuda:1)")],
    )
    def test_missing_cuda_index_counts_the_devices(self, count, message, monkeypatch):
        """An index past the visible CUDA devices: the message counts them in words that agree."""
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        assert cli._device_problem("cuda:5") == f"--device cuda:5 was asked for, but {message}"

    def test_in_process_note_agrees_with_its_count(self):
        """One foreign case is 'the layer case ... was ... it', two are 'the model heads ... were ... them'."""
        (one,) = cli._in_process_note("layer case", ["naive", "test-mine"], None)
        assert one.startswith("IN-PROCESS: the layer case `test-mine` of this run was registered")
        assert "does not know it (--cases refuses it, or the default runs without it)" in one
        assert one.endswith("naming the module that registers it.")
        (two,) = cli._in_process_note("model head", ["plain", "test-a", "test-b"], None)
        assert two.startswith("IN-PROCESS: the model heads `test-a`, `test-b` of this run were registered")
        assert "does not know them (--heads refuses them, or the default runs without them)" in two
        assert two.endswith("naming the module that registers them.")

    def test_output_paths_are_checked_before_the_run(self, tmp_path, capsys, monkeypatch):
        """--out naming a file (layers/models) or a folder (report) is refused up front."""
        measured = []
        monkeypatch.setattr("bilinearpool.cli.run_layers", lambda *a, **k: measured.append(1))
        afile = tmp_path / "afile"
        afile.write_text("")
        for argv, message in (
            (["layers", "--out", str(afile)], f"error: --out expected a folder, but {afile} is an existing file"),
            (["layers", "--out", str(afile / "sub")], f"error: --out expected a folder, but {afile} (above"),
            (["report", str(tmp_path), "--out", str(tmp_path)],
             f"error: --out expected a Markdown file, but {tmp_path} is a folder"),
            # before: written over the raw results it was made from
            (["report", str(tmp_path), "--out", str(tmp_path / "layers.json")],
             f"error: --out expected a Markdown file beside the results, but {tmp_path / 'layers.json'} "
             f"is one of the result files of {tmp_path}"),
            (["report", str(tmp_path), "--out", str(tmp_path / "models.md")], "is one of the result files"),
        ):  # fmt: skip
            (tmp_path / "layers.json").write_text("{}")
            with pytest.raises(SystemExit) as exc:
                main(argv)
            assert exc.value.code == 2
            assert message in capsys.readouterr().err
        assert not measured

    def test_out_folder_that_cannot_be_created_or_written_is_refused_up_front(self, tmp_path, capsys, monkeypatch):
        """A folder that cannot be made or written is found before measuring, not after it."""
        measured = []
        monkeypatch.setattr(cli, "run_layers", lambda *a, **k: measured.append(1))
        cases = []
        if Path("/proc").is_dir():  # mkdir fails there, even as root
            cases.append((["--out", "/proc/nope"],
                          "error: --out expected a folder that can be created, but creating /proc/nope failed with"))  # fmt: skip
        (tmp_path / "taken" / "layers.png").mkdir(parents=True)
        cases.append((["--out", str(tmp_path / "taken")],
                      f"error: --out expected to write the file {tmp_path / 'taken' / 'layers.png'}, but a folder"))  # fmt: skip
        for argv, message in cases:
            with pytest.raises(SystemExit) as exc:
                main(["layers", "--shapes", "2x4x3x3", "--quick", "--threads", "1", *argv])
            assert exc.value.code == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err
        # a folder that exists but cannot be written (no permission; read-only file system)
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", kwargs.get("dir"))

        monkeypatch.setattr(cli.tempfile, "mkstemp", refuse)
        with pytest.raises(SystemExit) as exc:
            main(["layers", "--shapes", "2x4x3x3", "--quick", "--out", str(tmp_path / "new")])
        assert exc.value.code == 2
        assert (f"error: --out expected a folder that can be written, but writing a file into "
                f"{tmp_path / 'new'} failed with PermissionError") in capsys.readouterr().err  # fmt: skip
        assert not measured
        monkeypatch.undo()
        probe_left = [p for p in tmp_path.rglob("*.probe")]
        assert not probe_left

    def test_backbones_whose_package_is_missing_are_refused_up_front(self, monkeypatch, capsys):
        """Defaults included: a backbone from timm, with timm not installed, is refused before
        anything is measured, naming the extra to install and how to leave it out."""
        monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
        measured = []
        monkeypatch.setattr(cli, "run_models", lambda *a, **k: measured.append("models"))
        monkeypatch.setattr(cli, "run_layers", lambda *a, **k: measured.append("layers"))
        install = ("inception_resnet_v2 comes from timm (timm not installed: pip install 'bilinearpool[timm]' "
                   "(from a clone: pip install '.[timm]'))")
        for argv, expected in (
            (["models", "--params-only", "--heads", "plain"],
             ["error: models builds the backbones resnet50 inception_v3 inception_resnet_v2 when "
              "--backbones is not given, but " + install,
              "or leave out inception_resnet_v2: --backbones resnet50 inception_v3"]),
            (["models", "--params-only", "--backbones", "inception_resnet_v2"],
             ["error: --backbones expected names that bilinearpool.build_backbone accepts", install]),
            (["models", "--params-only", "--backbones", "resnet18", "inception_resnet_v2"],
             [install, "or leave out inception_resnet_v2: --backbones resnet18"]),
            (["demo", "--out", "/nonexistent-never-created"],
             ["error: demo builds the backbones", install,
              "`bilinearpool-bench models --quick --backbones resnet50 inception_v3`"]),
        ):  # fmt: skip
            with pytest.raises(SystemExit) as exc:
                main(argv)
            assert exc.value.code == 2, argv
            err = capsys.readouterr().err
            assert all(text in err for text in expected), err
            assert "Traceback" not in err
        assert not measured

    def test_unknown_backbones_get_the_name_checks_suggestion(self, monkeypatch, capsys):
        """An unknown --backbones name is refused with bilinearpool.check_backbone_name's own
        text: its close names, and (timm missing) that a missing package may provide it."""
        monkeypatch.setattr(cli, "run_models", lambda *a, **k: pytest.fail("measured"))
        installed = importlib.util.find_spec("timm") is not None
        for timm_missing in (not installed, True):
            if timm_missing:
                monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
            with pytest.raises(SystemExit) as exc:
                main(["models", "--params-only", "--backbones", "resnet18", "resnet5O"])
            assert exc.value.code == 2
            err = capsys.readouterr().err
            assert "but got unknown ['resnet5O']: unknown backbone 'resnet5O' (did you mean 'resnet50'" in err, err
            assert ("a timm model name (timm not installed: pip install 'bilinearpool[timm]'" in err) == timm_missing
            assert "install what is missing" not in err and "Traceback" not in err

    def test_import_registers_cases_and_heads_for_the_command(self, tmp_path, monkeypatch, capsys, keep_threads):
        """--import MODULE: cases (and heads) a module of the user's registers can be run and
        rerun from the recorded command, in a fresh process."""
        module = "bench_import_test_cases"
        (tmp_path / f"{module}.py").write_text(
            "from bilinearpool import bench\n"
            "bench.register_layer_case(bench.LayerCase(\n"
            "    'my-pool', 'global average pooling', lambda c, d: lambda x: x.mean((2, 3))))\n"
            "bench.MODEL_HEADS['my-head'] = bench.ModelHead('my-head', 'fast-bcnn', 'a head of mine')\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(bench, "LAYER_CASES", dict(bench.LAYER_CASES))  # what the module adds goes
        monkeypatch.setattr(bench, "MODEL_HEADS", dict(bench.MODEL_HEADS))
        monkeypatch.setattr(cli, "_IMPORTED", {"layer case": {}, "model head": {}})
        out = tmp_path / "out"
        try:
            argv = ["layers", "--import", module, "--cases", "fast-bcnn", "my-pool", "--shapes", "2x8x3x3",
                    "--quick", "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
            assert main(argv) == 0
            assert [r["case"] for r in read_csv(out / "layers.csv")] == ["naive", "matmul-floor", "fast-bcnn", "my-pool"]
            data = json.loads((out / "layers.json").read_text())
            assert data["command"] == "bilinearpool-bench " + " ".join(argv)
            assert not any(n.startswith("IN-PROCESS") for n in data["notes"])
            argv = ["models", "--import", module, "--heads", "my-head", "--backbones", "resnet18", "--params-only",
                    "--no-progress", "--out", str(out)]  # fmt: skip
            assert main(argv) == 0
            assert [r["head"] for r in read_csv(out / "models.csv")] == ["plain", "my-head"]
            assert read_csv(out / "models.csv")[1]["params_ok"] == "True"
            notes = json.loads((out / "models.json").read_text())["notes"]
            assert not any(n.startswith("IN-PROCESS") for n in notes)
        finally:
            sys.modules.pop(module, None)
        # the recorded command reruns as it stands: a fresh process, the module in the current folder
        script = Path(sys.executable).with_name("bilinearpool-bench")
        runner = [str(script)] if script.exists() else [sys.executable, "-m", "bilinearpool.bench"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([*runner, *shlex.split(data["command"])[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "my-pool" in [r["case"] for r in read_csv(out / "layers.csv")]
        # a module that cannot be imported: an error line naming it and what its import raised
        capsys.readouterr()
        (tmp_path / "bench_import_broken.py").write_text("raise ValueError('not today')\n")
        for name, raised in (("bench_import_nowhere", "ModuleNotFoundError: No module named 'bench_import_nowhere'"),
                             ("bench_import_broken", "ValueError: not today")):  # fmt: skip
            with pytest.raises(SystemExit) as exc:
                main(["layers", "--import", name, "--cases", "my-pool", "--shapes", "2x4x3x3", "--quick"])
            assert exc.value.code == 2
            err = capsys.readouterr().err
            assert f"error: --import expected a module that can be imported, but importing {name!r} raised {raised}" in err
            assert "Traceback" not in err
        sys.modules.pop("bench_import_broken", None)
        with pytest.raises(SystemExit):
            main(["layers", "--cases", "not-registered-pool", "--shapes", "2x4x3x3", "--quick"])  # refused
        assert "that a module of yours registers need --import MODULE" in capsys.readouterr().err

    def test_python_m_bench(self):
        proc = subprocess.run(
            [sys.executable, "-m", "bilinearpool.bench", "--help"],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "bilinearpool-bench" in proc.stdout



class Stop(BaseException):
    """What stops a run by hand (as Ctrl-C would), at its shape of 6 channels."""


def _stop_at_six_channels(c: int, device: torch.device):
    def fn(x):
        if c == 6:
            raise Stop("stopped by hand")
        return x.mean((2, 3))
    return fn


#: A registered case that stops the run at its 6-channel shape, after the others.
_STOPPING_CASE = bench.LayerCase("test-stop", "stops", _stop_at_six_channels)

class TestRobustRuns:
    """A case that cannot run is recorded and the run goes on; a run that stops keeps its rows."""

    COMMON = ["--repeats", "1", "--warmup", "0", "--threads", "1", "--no-progress"]

    def test_models_skip_a_head_the_backbone_cannot_take(self, tmp_path, capsys, keep_threads):
        argv = ["models", "--backbones", "mobilenet_v3_small", "--heads", "plain", "se", "--resolutions", "32",
                "--batch-size", "2", "--no-train", "--out", str(tmp_path), *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        assert "skipping se: not applicable to mobilenet_v3_small" in capsys.readouterr().err
        rows = {r["head"]: r for r in read_csv(tmp_path / "models.csv")}
        assert float(rows["plain"]["infer_img_s"]) > 0 and not rows["plain"]["note"]
        assert rows["se"]["note"].startswith(
            "se: not applicable to mobilenet_v3_small: ValueError: insert_se_blocks found no supported block"
        )
        assert rows["se"]["params"] == rows["se"]["infer_img_s"] == ""
        data = json.loads((tmp_path / "models.json").read_text())
        assert data["goals"][0].endswith("met for all 1 models")
        # before: the settings described the training step that --no-train leaves out
        assert data["settings"]["training_step"] == "not timed (--no-train)"
        assert "se: not applicable to mobilenet_v3_small" in (tmp_path / "models.md").read_text()

    def test_models_record_a_failing_step_and_go_on(self, tmp_path, keep_threads):
        # batch 1 with a 1x1 final map: BatchNorm cannot train; inference still runs
        argv = ["models", "--backbones", "resnet18", "--heads", "plain", "fast-bcnn", "--resolutions", "32",
                "--batch-size", "1", "--out", str(tmp_path), *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        rows = read_csv(tmp_path / "models.csv")
        assert [r["head"] for r in rows] == ["plain", "fast-bcnn"]
        for row in rows:
            assert float(row["infer_img_s"]) > 0 and row["train_img_s"] == ""
            assert row["note"].startswith(
                "training step failed: ValueError: Expected more than 1 value per channel"
            )

    def test_models_at_a_resolution_the_backbone_cannot_take(self, tmp_path, keep_threads):
        argv = ["models", "--backbones", "inception_v3", "--heads", "plain", "--resolutions", "32",
                "--batch-size", "1", "--no-train", "--out", str(tmp_path), *self.COMMON]  # fmt: skip
        assert main(argv) == 1  # its one row measured nothing
        (row,) = read_csv(tmp_path / "models.csv")
        assert row["infer_img_s"] == "" and row["note"].startswith(
            "inference failed: ValueError: backbone 'inception_v3:Mixed_7c' takes images of at least 75 x 75 "
            "pixels, but got shape (1, 3, 32, 32)"
        )

    def test_layers_record_a_failing_case_and_go_on(self, tmp_path, keep_threads):
        argv = ["layers", "--shapes", "1x8x1x1", "2x8x2x2", "--cases", "fast-bcnn", "isqrt-cov-r256",
                "--out", str(tmp_path), *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        by = {(r["shape"], r["case"]): r for r in read_csv(tmp_path / "layers.csv")}
        assert len(by) == 8
        failed = by["1x8x1x1", "isqrt-cov-r256"]
        assert failed["error"].startswith("failed: ValueError: Expected more than 1 value per channel")
        assert failed["fwd_bwd_ms"] == failed["saved_MiB"] == ""
        assert float(by["1x8x1x1", "fast-bcnn"]["saved_vs_input"]) == 1.0
        assert float(by["2x8x2x2", "isqrt-cov-r256"]["fwd_bwd_ms"]) > 0
        assert not by["2x8x2x2", "isqrt-cov-r256"]["error"]
        data = json.loads((tmp_path / "layers.json").read_text())
        assert any("1x8x1x1 isqrt-cov-r256" in g for g in data["goals"])

    def test_a_run_that_stops_keeps_what_it_measured(self, tmp_path, monkeypatch, capsys, keep_threads):
        monkeypatch.setitem(bench.LAYER_CASES, "test-stop", _STOPPING_CASE)  # at the second shape
        argv = ["layers", "--shapes", "2x8x2x2", "2x6x2x2", "--cases", "fast-bcnn", "test-stop",
                "--out", str(tmp_path), *self.COMMON]  # fmt: skip
        with pytest.raises(Stop):
            main(argv)
        assert "stopped at 2x6x2x2 test-stop by Stop: stopped by hand" in capsys.readouterr().err
        rows = read_csv(tmp_path / "layers.csv")
        assert [(r["shape"], r["case"]) for r in rows] == [
            ("2x8x2x2", c) for c in ("naive", "matmul-floor", "fast-bcnn", "test-stop")
        ]
        data = json.loads((tmp_path / "layers.json").read_text())
        assert data["notes"][0].startswith("INCOMPLETE: the run stopped at 2x6x2x2 test-stop")
        assert "INCOMPLETE" in (tmp_path / "layers.md").read_text()

    def test_writes_while_the_run_goes_are_marked_incomplete(self, tmp_path, monkeypatch, keep_threads):
        written = []

        def record(result, out, *, plot=True):
            written.append((plot, list(result.meta["notes"])))
            return []

        monkeypatch.setattr(cli, "write_result", record)
        argv = ["layers", "--shapes", "2x8x2x2", "2x6x2x2", "--cases", "fast-bcnn", "--out", str(tmp_path),
                *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        assert [plot for plot, _ in written] == [False, True]
        assert written[0][1][0] == "INCOMPLETE: written after 1 of 2 shapes, the run goes on"
        assert not [n for n in written[1][1] if n.startswith("INCOMPLETE")]

    def test_a_two_stream_case_has_both_maps_as_input(self, tmp_path, monkeypatch, keep_threads):
        case = bench.LayerCase("test-two", "product of two maps", lambda c, d: lambda x, y: (x * y).mean((2, 3)),
                               streams=2)  # fmt: skip
        monkeypatch.setitem(bench.LAYER_CASES, case.name, case)
        argv = ["layers", "--shapes", "2x8x2x2", "--cases", case.name, "--out", str(tmp_path), *self.COMMON]
        assert main(argv) == 0
        data = json.loads((tmp_path / "layers.json").read_text())
        rec = next(r for r in data["raw"] if r["case"] == case.name)
        one_map = 2 * 8 * 2 * 2 * FLOAT32
        assert (rec["input_bytes"], rec["saved_bytes"]) == (2 * one_map, 2 * one_map)  # x * y saves both
        row = next(r for r in data["rows"] if r["case"] == case.name)
        assert row["saved_vs_input"] == 1.0 and row["input_MiB"] * 2**20 == 2 * one_map

    def test_saved_with_linear_under_amp_counts_the_weight_copy(self, tmp_path, keep_threads):
        argv = ["layers", "--amp", "--shapes", "2x16x5x5", "--cases", "fast-bcnn", "--out", str(tmp_path),
                *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        row = next(r for r in read_csv(tmp_path / "layers.csv") if r["case"] == "fast-bcnn")
        # the float32 input, the bfloat16 pooled output the classifier keeps (2 x 256) and the
        # classifier's bfloat16 weight copy (8 x 256), which only the graph holds
        expected = (2 * 16 * 25 * FLOAT32 + 2 * 256 * 2 + 8 * 256 * 2) / 2**20
        assert float(row["saved_with_linear_MiB"]) == pytest.approx(expected, rel=1e-6)

    def test_duplicates_give_one_row(self, tmp_path, keep_threads):
        argv = ["layers", "--shapes", "2x4x3x3", "2x4x3x3", "--cases", "fast-bcnn", "naive", "fast-bcnn",
                "--out", str(tmp_path), *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        assert [r["case"] for r in read_csv(tmp_path / "layers.csv")] == ["naive", "matmul-floor", "fast-bcnn"]  # the references first
        argv = ["models", "--backbones", "resnet18", "resnet18", "--heads", "se", "plain", "se",
                "--resolutions", "64", "64", "--no-train", "--out", str(tmp_path), *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        assert [(r["backbone"], r["head"], r["resolution"]) for r in read_csv(tmp_path / "models.csv")] == [
            ("resnet18", "plain", "64"), ("resnet18", "se", "64")
        ]

    def test_a_write_that_fails_while_stopping_is_reported_once(self, tmp_path, monkeypatch, capsys, keep_threads):
        """Writing the partial files fails (a full disk, say) and writing them again on the way
        out fails too: one line on stderr, and the first error raised with nothing chained."""
        calls = []

        def full_disk(result, out, *, plot=True):
            calls.append(plot)
            raise OSError(28, f"No space left on device (write {len(calls)})")

        monkeypatch.setattr(cli, "write_result", full_disk)
        argv = ["layers", "--shapes", "2x8x2x2", "2x6x2x2", "--cases", "fast-bcnn", "--out", str(tmp_path),
                *self.COMMON]  # fmt: skip
        assert main(argv) == 1
        assert calls == [False, False]
        err = capsys.readouterr().err
        assert err.count("stopped at") == 1 and len(err.strip().splitlines()) == 1  # (no "error:" again)
        assert ("stopped at 2x8x2x2 writing the results so far by OSError: [Errno 28] No space left on device "
                "(write 1); writing the 3 rows measured before failed too, with OSError") in err  # fmt: skip

    def test_a_stopped_or_unplotted_run_leaves_no_older_plot(self, tmp_path, monkeypatch, capsys, keep_threads):
        """An older run's layers.png must not stand beside new (INCOMPLETE) results."""

        monkeypatch.setitem(bench.LAYER_CASES, "test-stop", _STOPPING_CASE)
        (tmp_path / "layers.png").write_bytes(b"an older run's plot")
        argv = ["layers", "--shapes", "2x8x2x2", "2x6x2x2", "--cases", "test-stop", "--out", str(tmp_path),
                *self.COMMON]  # fmt: skip
        with pytest.raises(Stop):
            main(argv)
        assert "INCOMPLETE" in (tmp_path / "layers.md").read_text()
        assert not (tmp_path / "layers.png").exists()
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
        assert "Raw files (CSV, JSON with raw timings): " in (tmp_path / "r.md").read_text()
        # a finished run without matplotlib: no new plot, so no old one either
        (tmp_path / "layers.png").write_bytes(b"an older run's plot")
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        argv = ["layers", "--shapes", "2x8x2x2", "--cases", "fast-bcnn", "--out", str(tmp_path), *self.COMMON]
        assert main(argv) == 0
        assert not (tmp_path / "layers.png").exists()

    def test_a_stopped_demo_leaves_no_older_models_results(self, tmp_path, monkeypatch, capsys, keep_threads):
        """A demo stopped in its layers part left its own layers.* beside an earlier run's
        models.*, which report combined without a word (helper-143): the earlier models.*
        go when the demo writes its first result."""

        monkeypatch.setitem(bench.LAYER_CASES, "test-stop", _STOPPING_CASE)
        monkeypatch.setattr(cli, "LAYER_SHAPES", ((2, 8, 2, 2), (2, 6, 2, 2)))
        monkeypatch.setattr(cli, "run_models", lambda *a, **k: pytest.fail("the models part ran"))
        earlier = [tmp_path / f"models.{ext}" for ext in ("json", "csv", "md", "png")]
        for path in earlier:
            path.write_text("an earlier run's")
        with pytest.raises(Stop):
            main(["demo", "--threads", "1", "--out", str(tmp_path), "--no-progress"])
        assert "holds the results of an earlier run (models.json)" in capsys.readouterr().err
        assert not [p for p in earlier if p.exists()]
        assert "INCOMPLETE" in (tmp_path / "layers.md").read_text()
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
        assert "## Models" not in (tmp_path / "r.md").read_text()

    def test_demo_runs_both_parts_in_process(self, tmp_path, monkeypatch, capsys, keep_threads):
        """demo sets the options of layers and models it lacks: one added to models
        (--node) and not to demo's list stopped demo after its layers part with an
        AttributeError. Here both parts run through, on a small shape and backbone."""
        monkeypatch.setattr(cli, "LAYER_SHAPES", ((2, 8, 3, 3),))
        monkeypatch.setattr(cli, "PAPER_BACKBONES", ("resnet18",))
        monkeypatch.setattr(cli, "GOAL_RESOLUTION", 64)
        assert main(["demo", "--threads", "1", "--out", str(tmp_path), "--no-progress"]) == 0
        for name in ("layers", "models"):
            assert json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        models = json.loads((tmp_path / "models.json").read_text())
        assert {(r["backbone"], r["head"], r["resolution"]) for r in models["rows"]} == {
            ("resnet18", h, 64) for h in ("plain", "se", "bcnn", "fast-bcnn")
        }
        assert "models part: models --quick" in models["command"]

    def test_options_that_do_count_are_taken(self, tmp_path, monkeypatch):
        """The refusals above leave the runs where the option changes something."""
        ran = []

        def ran_one(name, key):
            def run(*args, **kwargs):
                ran.append(name)
                return cli.BenchResult(name, name, [key], [{key: 1.0}], {})

            return run

        monkeypatch.setattr("bilinearpool.cli.run_layers", ran_one("layers", "fwd_bwd_ms"))
        monkeypatch.setattr("bilinearpool.cli.run_models", ran_one("models", "params"))
        monkeypatch.setattr("bilinearpool.cli._finish", lambda *a, **k: [])
        main(["layers", "--quick", "--repeats", "1", "--device", "cpu:0"])  # --quick picks --warmup
        main(["models", "--quick", "--repeats", "1", "--warmup", "0", "--resolutions", "64"])  # the batch
        main(["models", "--resolutions", "64", "96", "--batch-size", "4", "--batch-size-at", "64=2"])  # 96 px
        assert ran == ["layers", "models", "models"]

    def test_out_as_a_broken_link_is_named(self, tmp_path, capsys):
        (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
        for out in (tmp_path / "gone", tmp_path / "gone" / "sub"):
            with pytest.raises(SystemExit):
                main(["layers", "--out", str(out)])
            above = "" if out.name == "gone" else f", a folder above {out},"
            assert (f"error: --out expected a folder that can be created, but {tmp_path / 'gone'}{above} is a "
                    f"symbolic link to {tmp_path / 'nowhere'}, which does not exist") in capsys.readouterr().err

    def test_a_run_stopped_before_any_row_says_that_nothing_is_written(self, tmp_path, monkeypatch, capsys,
                                                                      keep_threads):
        """A folder holding an earlier run: Ctrl-C before the first row left its files with
        only 'interrupted', after a warning that this run replaces them as it goes."""

        def build(c, device):
            def fn(x):
                raise KeyboardInterrupt
            return fn

        monkeypatch.setitem(bench.LAYER_CASES, "test-stop", bench.LayerCase("test-stop", "stops", build))
        argv = ["layers", "--shapes", "2x8x2x2", "--out", str(tmp_path), *self.COMMON, "--cases"]
        assert main([*argv, "fast-bcnn"]) == 0  # the earlier run
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        capsys.readouterr()
        assert main([*argv, "test-stop"]) == 130
        err = capsys.readouterr().err.splitlines()
        assert f"{tmp_path} holds the results of an earlier run (layers.json)" in err[0]
        assert err[1:] == [
            "bilinearpool-bench: stopped at 2x8x2x2 test-stop by KeyboardInterrupt, before any row was measured: "
            "no layers results of this run are written (layers.* files already in the output folder are an "
            "earlier run's)"
        ]
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    def test_no_plot_when_no_row_was_measured(self, tmp_path, keep_threads):
        """Every row failed: the plot had axes, a legend and goal lines, and no bar."""
        argv = ["layers", "--shapes", "1099511627776x1099511627776x1x1", "--cases", "fast-bcnn",
                "--out", str(tmp_path), *self.COMMON]  # fmt: skip
        assert main(argv) == 1  # nothing measured
        assert (tmp_path / "layers.json").is_file() and not (tmp_path / "layers.png").exists()

    def test_reference_cases_come_first_and_notes_fit_the_cases(self, tmp_path, keep_threads):
        argv = ["layers", "--shapes", "2x4x2x2", "--cases", "matmul-floor", "naive", "--out", str(tmp_path),
                *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        data = json.loads((tmp_path / "layers.json").read_text())
        assert [r["case"] for r in data["rows"]] == ["naive", "matmul-floor"]
        assert not [n for n in data["notes"] if "bcnn-2stream" in n]

    def test_inputs_that_cannot_be_built_are_that_shape_s_rows(self, tmp_path, capsys, keep_threads):
        # numel overflows: torch refuses before allocating anything. The run stopped there
        # (a traceback); now every case of the shape has a row saying so, and it goes on.
        huge = "1099511627776x1099511627776x1x1"
        argv = ["layers", "--shapes", huge, "2x8x3x3", "--cases", "fast-bcnn", "--out", str(tmp_path), *self.COMMON]
        assert main(argv) == 0
        data = json.loads((tmp_path / "layers.json").read_text())
        assert not [n for n in data["notes"] if n.startswith("INCOMPLETE")]
        rows = {(r["shape"], r["case"]): r for r in data["rows"]}
        assert rows[(huge, "fast-bcnn")]["error"].startswith("inputs failed: RuntimeError: ")
        assert rows[("2x8x3x3", "fast-bcnn")]["fwd_bwd_ms"] is not None

    def test_a_module_imported_before_main_counts_as_imported(self, tmp_path, monkeypatch, keep_threads):
        """Its cases were noted IN-PROCESS although --import named it: only registrations
        made by main's own import were recorded."""
        import importlib

        module = "bench_import_early_cases"
        (tmp_path / f"{module}.py").write_text(
            "from bilinearpool import bench\n"
            "bench.register_layer_case(bench.LayerCase(\n"
            "    'early-pool', 'global average pooling', lambda c, d: lambda x: x.mean((2, 3))))\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(bench, "LAYER_CASES", dict(bench.LAYER_CASES))
        monkeypatch.setattr(cli, "_IMPORTED", {"layer case": {}, "model head": {}})
        try:
            importlib.import_module(module)  # by the caller, before main
            argv = ["layers", "--import", module, "--cases", "early-pool", "--shapes", "2x8x2x2",
                    "--out", str(tmp_path / "out"), *self.COMMON]  # fmt: skip
            assert main(argv) == 0
        finally:
            sys.modules.pop(module, None)
        notes = json.loads((tmp_path / "out" / "layers.json").read_text())["notes"]
        assert not [n for n in notes if n.startswith("IN-PROCESS")]

    def test_cases_registered_in_process_are_named_in_the_results(self, tmp_path, monkeypatch, keep_threads):
        """A run made through main() in-process, with a case registered without --import: the
        command is recorded as given, and a note names the case its rerun would not know."""
        gap = bench.LayerCase("test-inproc", "gap", lambda c, d: lambda x: x.mean((2, 3)))
        monkeypatch.setitem(bench.LAYER_CASES, gap.name, gap)
        argv = ["layers", "--shapes", "2x8x2x2", "--cases", "fast-bcnn", "test-inproc", "--out", str(tmp_path),
                *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        data = json.loads((tmp_path / "layers.json").read_text())
        assert data["command"] == "bilinearpool-bench " + " ".join(argv)
        (note,) = [n for n in data["notes"] if n.startswith("IN-PROCESS:")]
        assert "`test-inproc`" in note and "`fast-bcnn`" not in note and "--import MODULE" in note
        assert note in (tmp_path / "layers.md").read_text()
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
        assert note in (tmp_path / "r.md").read_text()  # the report keeps it
        assert main([*argv[:5], *argv[6:]]) == 0  # library cases only: no note
        assert not [n for n in json.loads((tmp_path / "layers.json").read_text())["notes"] if "IN-PROCESS" in n]
        head = bench.ModelHead("test-head", "fast-bcnn", "a head added in-process")
        monkeypatch.setitem(bench.MODEL_HEADS, head.name, head)  # the same for model heads
        assert main(["models", "--backbones", "resnet18", "--heads", "test-head", "--params-only",
                     "--out", str(tmp_path), "--no-progress"]) == 0  # fmt: skip
        (note,) = [n for n in json.loads((tmp_path / "models.json").read_text())["notes"] if "IN-PROCESS" in n]
        assert "the model head `test-head` of this run was" in note and "`plain`" not in note

    def test_quick_batch_is_two_on_every_device(self):
        args = argparse.Namespace(batch_size_at=None, batch_size=None, quick=True)
        for device in ("cpu", "cuda"):
            assert cli._batch_size(args, torch.device(device), 224) == 2
        args.quick = False
        assert cli._batch_size(args, torch.device("cuda"), 224) == 32
        assert cli._batch_size(args, torch.device("cpu"), 448) == 1

    def test_plot_title_names_the_classes(self):
        plt = pytest.importorskip("matplotlib.pyplot")
        rows = [{"backbone": "b", "head": "plain", "resolution": 64, "params": 10, "infer_img_s": 1.0}]
        fig = cli._plot_models(plt, rows, 5)
        assert fig.axes[1].get_title() == "Parameters (5 classes)"
        plt.close(fig)
        # --params-only: the parameters alone (the throughput panel was drawn empty)
        fig = cli._plot_models(plt, [{**rows[0], "resolution": None, "infer_img_s": None}], 5)
        assert [ax.get_title() for ax in fig.axes] == ["Parameters (5 classes)"]
        plt.close(fig)


def layer_record(shape: str, case: str, times: list[float], *, saved: int = 100, error: str | None = None) -> dict:
    """A raw record of the layer benchmark, as run_layers writes it (saved bytes vs 100 input)."""
    measured = error is None
    return {
        "shape": shape, "case": case, "times_s": times if measured else [],
        "saved_bytes": saved if measured else None, "input_bytes": 100 if measured else None,
        "saved_with_linear_bytes": saved + 8 if measured else None, "peak_bytes": None,
        "D": 64 if measured else None, "layer_params": 0 if measured else None, "error": error,
    }  # fmt: skip


LAYER_CASE_INFO = {
    "naive": {"description": "naive", "role": "baseline", "goal": False, "streams": 1},
    "matmul-floor": {"description": "floor", "role": "floor", "goal": False, "streams": 1},
    "fast-bcnn": {"description": "fused", "role": "ours", "goal": True, "streams": 1},
}
LAYER_SETTINGS = {"device": "cpu", "saved_bytes": "rule"}


def model_record(backbone: str, head: str, inference_s: list[float], *, note: str | None = None) -> dict:
    return {
        "backbone": backbone, "head": head, "resolution": 224, "batch": 2, "channels": 8,
        "params": 10 if head == "plain" else 20, "params_analytic": 10 if head == "plain" else 20,
        "inference_s": inference_s, "training_step_s": [], "peak_train_bytes": None, "note": note,
    }  # fmt: skip


def cli_version() -> str:
    from bilinearpool import __version__

    return __version__


class TestAuditedRuns:
    """Found by a user audit of the command: inputs that cannot be made stopped the whole
    run with a traceback, a case asked for that does not run at a shape's channel count
    was left out without a word, a huge --seed was a traceback, Ctrl-C a traceback."""

    COMMON = ["--repeats", "1", "--warmup", "0", "--threads", "1", "--no-progress"]

    @pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows: nothing is held")
    def test_a_folder_another_run_writes_into_is_refused(self, tmp_path, capsys, keep_threads):
        """Two runs into one --out replaced each other's files as they went; the second is
        refused while the first runs (its flock on the folder, as another process holds it)
        and runs once the first has ended."""
        import fcntl

        argv = ["layers", "--shapes", "2x4x3x3", "--cases", "naive", *self.COMMON, "--out", str(tmp_path)]
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert (f"layers: error: --out {tmp_path} is in use by another bilinearpool-bench run, which "
                    "writes its results there as it goes: wait for it to finish, or pass another --out") in err
            assert list(tmp_path.iterdir()) == []
        finally:
            os.close(fd)
        assert main(argv) == 0
        assert (tmp_path / "layers.json").is_file() and not list(tmp_path.glob(".*"))

    def test_inputs_that_cannot_be_made_are_rows_and_the_run_goes_on(self, tmp_path, monkeypatch):
        real = torch.randn

        def randn(*size, **kwargs):
            if size and size[0] == 7:  # the batch of 7: as if it did not fit in memory
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
            return real(*size, **kwargs)

        monkeypatch.setattr(cli.torch, "randn", randn)
        assert main(["layers", "--shapes", "7x4x3x3", "2x4x3x3", "--cases", "fast-bcnn",
                     "--out", str(tmp_path / "l"), *self.COMMON]) == 0
        rows = {(r["shape"], r["case"]): r for r in json.loads((tmp_path / "l" / "layers.json").read_text())["rows"]}
        for case in ("naive", "matmul-floor", "fast-bcnn"):
            assert rows[("7x4x3x3", case)]["error"].startswith("inputs failed: RuntimeError: DefaultCPUAllocator")
            assert rows[("2x4x3x3", case)]["fwd_bwd_ms"] is not None  # the next shape ran
        assert main(["models", "--backbones", "resnet18", "--heads", "plain", "--resolutions", "32", "64",
                     "--batch-size-at", "64=7", "--batch-size", "2", "--no-train",
                     "--out", str(tmp_path / "m"), *self.COMMON]) == 0  # fmt: skip
        rows = json.loads((tmp_path / "m" / "models.json").read_text())["rows"]
        (big,) = [r for r in rows if r["resolution"] == 64]
        (small,) = [r for r in rows if r["resolution"] == 32]
        assert "inputs failed: RuntimeError: DefaultCPUAllocator" in big["note"]
        assert small["infer_img_s"] is not None and big["infer_img_s"] is None
        assert main(["report", str(tmp_path / "l"), "--out", str(tmp_path / "r.md")]) == 0

    def test_a_case_that_does_not_run_at_a_shape_says_so(self, tmp_path):
        limit = bench.LAYER_CASES["isqrt-cov"].max_channels
        shape = f"1x{limit + 1}x1x1"
        assert main(["layers", "--shapes", "2x4x3x3", shape, "--cases", "isqrt-cov",
                     "--out", str(tmp_path), *self.COMMON]) == 0
        rows = {(r["shape"], r["case"]): r for r in json.loads((tmp_path / "layers.json").read_text())["rows"]}
        assert rows[(shape, "isqrt-cov")]["error"] == f"skipped: runs at C <= {limit} only (C = {limit + 1} here)"
        summary = json.loads((tmp_path / "layers.json").read_text())["summary"]  # not blank there
        (skipped,) = [r for r in summary["rows"] if r["shape"] == shape]
        assert skipped["error"].startswith("skipped: ")
        assert rows[("2x4x3x3", "isqrt-cov")]["fwd_bwd_ms"] is not None
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0  # in the plan
        assert "INCOMPLETE" not in (tmp_path / "r.md").read_text()

    def test_skipped_rows_also_at_a_shape_whose_inputs_failed_and_goals_count_where_cases_run(
        self, tmp_path, monkeypatch
    ):
        limited = bench.LayerCase("capped-goal", "a goal case that runs up to 4 channels",
                                  lambda c, d: bench.LAYER_CASES["fast-bcnn"].build(c, d),
                                  goal=True, max_channels=4)
        monkeypatch.setitem(bench.LAYER_CASES, limited.name, limited)
        real = torch.randn

        def randn(*size, **kwargs):
            if size and size[0] == 7:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
            return real(*size, **kwargs)

        monkeypatch.setattr(cli.torch, "randn", randn)
        assert main(["layers", "--shapes", "2x4x3x3", "2x8x3x3", "7x8x3x3", "--cases", "capped-goal",
                     "--out", str(tmp_path), *self.COMMON]) == 0  # fmt: skip
        data = json.loads((tmp_path / "layers.json").read_text())
        rows = {(r["shape"], r["case"]): r for r in data["rows"]}
        assert rows[("7x8x3x3", "capped-goal")]["error"].startswith("skipped: runs at C <= 4 only")
        assert rows[("2x8x3x3", "capped-goal")]["error"].startswith("skipped: runs at C <= 4 only")
        (line,) = [g for g in data["goals"] if g.startswith("`capped-goal` saved bytes")]
        assert "met at the 1 shape (" in line and "not measured" not in line, line

    @pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
    def test_seed_out_of_range_is_refused_up_front(self, seed, tmp_path, capsys):
        with pytest.raises(SystemExit) as exc:
            main(["layers", "--shapes", "2x4x3x3", "--seed", str(seed), "--out", str(tmp_path / "s")])
        assert exc.value.code == 2
        assert f"--seed must be in [-2**63, 2**64), but got {seed}" in capsys.readouterr().err
        assert not (tmp_path / "s").exists()

    def test_a_run_cut_short_says_so_at_the_top_and_report_warns(self, tmp_path, monkeypatch, capsys):
        """The INCOMPLETE mark was only in the notes at the end, and report said nothing."""
        real, calls = cli._round_robin_robust, []

        def stop_at_the_second_shape(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(cli, "_round_robin_robust", stop_at_the_second_shape)
        assert main(["layers", "--shapes", "2x4x3x3", "2x4x4x4", "--cases", "fast-bcnn",
                     "--out", str(tmp_path), *self.COMMON]) == 130
        said = capsys.readouterr().err.strip().splitlines()  # one line: what stopped, what is kept
        assert said == ["bilinearpool-bench: stopped at 2x4x4x4 timing by KeyboardInterrupt; what was "
                        "measured before is written (marked INCOMPLETE)"]
        lines = (tmp_path / "layers.md").read_text().splitlines()
        assert lines[2].startswith("**INCOMPLETE: the run stopped at 2x4x4x4 timing with KeyboardInterrupt")
        capsys.readouterr()
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
        err = capsys.readouterr().err
        assert ("report: warning: layers.json is marked INCOMPLETE: the run stopped at 2x4x4x4 "
                "timing with KeyboardInterrupt\n") in err

    def test_a_run_into_earlier_results_warns(self, tmp_path, capsys):
        argv = ["layers", "--shapes", "2x4x3x3", "--cases", "fast-bcnn", "--out", str(tmp_path), *self.COMMON]
        assert main(argv) == 0
        assert "earlier run" not in capsys.readouterr().err
        assert main(argv) == 0
        assert (f"bilinearpool-bench layers: warning: {tmp_path} holds the results of an earlier run "
                "(layers.json); this run replaces them as it goes") in capsys.readouterr().err

    def test_small_things(self, capsys):
        with pytest.raises(SystemExit) as exc:
            main(["--version"])
        assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"bilinearpool-bench {cli_version()}"
        with pytest.raises(SystemExit):  # a superscript two is a digit int() refuses
            main(["layers", "--shapes", "2x64x7x\u00b2"])
        assert "a shape is BxCxHxW with positive ints" in capsys.readouterr().err
        with pytest.raises(SystemExit):  # it was ignored without a word
            main(["models", "--backbones", "resnet18", "--resolutions", "64", "--batch-size-at", "96=1"])
        assert "--batch-size-at 96=1 names a resolution this run does not measure (resolutions: 64)" in capsys.readouterr().err
        with pytest.raises(SystemExit):  # only the last counted, without a word
            main(["models", "--backbones", "resnet18", "--resolutions", "64", "--batch-size-at", "64=1",
                  "--batch-size-at", "64=3", "--batch-size-at", "64=1"])
        assert ("--batch-size-at expected one batch size per resolution, but got 64=1/3/1"
                in capsys.readouterr().err)

    def test_an_import_that_exits_is_an_error_line(self, tmp_path, monkeypatch, capsys):
        """A module that called sys.exit(3) on import ended the command at once, silently."""
        (tmp_path / "bench_exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(SystemExit) as exc:
            main(["layers", "--import", "bench_exits_on_import", "--shapes", "2x4x3x3", "--quick"])
        assert exc.value.code == 2
        assert ("--import expected a module that can be imported, but importing "
                "'bench_exits_on_import' raised SystemExit: 3") in capsys.readouterr().err

    def test_params_only_builds_no_weights(self, tmp_path, monkeypatch):
        """--params-only built every model with its weights: a classifier of a million
        classes on resnet18's 512 x 512 features (2.6e11 parameters, 1 TiB) could not be
        counted. On the meta device it is, exactly; a model that cannot be built there is
        built as before."""
        assert main(["models", "--params-only", "--backbones", "resnet18", "--heads", "plain", "fast-bcnn",
                     "--num-classes", "1000000", "--out", str(tmp_path), "--no-progress"]) == 0  # fmt: skip
        data = json.loads((tmp_path / "models.json").read_text())
        rows = {r["head"]: r for r in data["rows"]}
        assert rows["fast-bcnn"]["params"] == rows["fast-bcnn"]["params_analytic"]
        assert rows["fast-bcnn"]["params"] > 512 * 512 * 1_000_000
        assert data["settings"]["weights"] == "none: built on the meta device (shapes only)"
        real, devices = bench.ModelHead.build, []

        def not_on_meta(self, backbone, **kwargs):
            if torch.empty(0).is_meta:
                raise NotImplementedError("reads a value at build time")
            model = real(self, backbone, **kwargs)
            devices.append(next(model.parameters()).device.type)
            return model

        monkeypatch.setattr(bench.ModelHead, "build", not_on_meta)
        rows = cli.parameter_table(["resnet18"], ["plain", "fast-bcnn"])
        assert devices == ["cpu", "cpu"] and all(r["params_ok"] is True for r in rows)

    def test_params_only_says_nothing_of_timing(self, tmp_path):
        """--params-only listed warm-up and timed rounds, a statistic and a training step, and
        a note on interleaved timings, though nothing was timed."""
        assert main(["models", "--params-only", "--backbones", "resnet18", "--heads", "plain", "fast-bcnn",
                     "--out", str(tmp_path), "--no-progress"]) == 0  # fmt: skip
        data = json.loads((tmp_path / "models.json").read_text())
        assert set(data["settings"]) == {"device", "num_classes", "se_reduction", "weights"}
        text = (tmp_path / "models.md").read_text()
        assert "timed_rounds" not in text and "interleaved" not in text
        assert "params_vs_plain: the row's parameters / the plain backbone's" in text

    @pytest.mark.parametrize(
        ("given", "shown"),
        [
            (["--repeats", "9"], "--repeats 9 does"),
            (["--warmup", "0"], "--warmup 0 does"),
            (["--batch-size", "7"], "--batch-size 7 does"),
            (["--batch-size-at", "224=1", "--batch-size-at", "448=1"], "--batch-size-at 224=1 448=1 does"),
            (["--threads", "1"], "--threads 1 does"),
            (["--amp"], "--amp does"),
            (["--channels-last"], "--channels-last does"),
            (["--no-train"], "--no-train does"),
            (["--quick"], "--quick does"),
            (["--resolutions", "64", "96"], "--resolutions 64 96 does"),
            (["--seed", "5"], "--seed 5 does"),  # was taken without a word (helper-143)
        ],
    )  # fmt: skip
    def test_params_only_refuses_each_timing_option(self, given, shown, capsys, monkeypatch):
        """--params-only times nothing: a timing option given with it was dropped without a
        word (the table was the same as without it)."""
        monkeypatch.setattr(cli, "run_models", lambda *a, **k: pytest.fail("measured"))
        with pytest.raises(SystemExit) as exc:
            main(["models", "--params-only", "--backbones", "resnet18", *given])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert (f"models: error: {shown} nothing with --params-only, which counts parameters without "
                "weights and times nothing: leave it out, or drop --params-only to time the models") in err, err  # fmt: skip
        assert "Traceback" not in err

    def test_params_only_names_every_ignored_option_in_one_line(self, capsys, monkeypatch):
        monkeypatch.setattr(cli, "run_models", lambda *a, **k: pytest.fail("measured"))
        with pytest.raises(SystemExit) as exc:
            main(["models", "--params-only", "--backbones", "resnet18", "--repeats", "9", "--warmup", "4",
                  "--batch-size", "7", "--amp", "--channels-last", "--no-train", "--seed", "5",
                  "--resolutions", "64", "--quick"])  # fmt: skip
        assert exc.value.code == 2
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert line == (
            "bilinearpool-bench models: error: --repeats 9 --warmup 4 --batch-size 7 --amp --channels-last "
            "--no-train --quick --resolutions 64 --seed 5 do nothing with --params-only, which counts "
            "parameters without weights and times nothing: leave them out, or drop --params-only to time "
            "the models"
        )

    def test_params_only_refuses_a_device_other_than_the_cpu(self, capsys, monkeypatch):
        """The models of --params-only are built and counted on the CPU, never moved: --device
        cuda was recorded in the settings, and the GPU in the environment, of a run that did not
        use it."""
        monkeypatch.setattr(cli, "run_models", lambda *a, **k: pytest.fail("measured"))
        with pytest.raises(SystemExit) as exc:  # said before the device check: also without a GPU
            main(["models", "--params-only", "--backbones", "resnet18", "--device", "cuda:0"])
        assert exc.value.code == 2
        assert ("error: --device cuda:0 does nothing with --params-only, which counts parameters without "
                "weights and times nothing: leave it out") in capsys.readouterr().err  # fmt: skip

    def test_params_only_takes_the_options_it_uses(self, tmp_path):
        """What --params-only reads: names, classes, the SE ratio, --device cpu, --seed (its
        default cannot be told from a value given), the output folder."""
        argv = ["models", "--params-only", "--backbones", "resnet18", "--heads", "se", "--num-classes", "3",
                "--se-reduction", "4", "--device", "cpu", "--seed", "0", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        settings = json.loads((tmp_path / "models.json").read_text())["settings"]
        assert settings["se_reduction"] == 4 and settings["num_classes"] == 3
        assert read_csv(tmp_path / "models.csv")[1]["params_ok"] == "True"

    @pytest.mark.parametrize(
        ("heads", "shown"),
        [(["plain"], "(heads: plain)"), (["fast-bcnn", "bcnn"], "(heads: plain fast-bcnn bcnn)")],
    )
    def test_se_reduction_without_an_se_head_is_refused(self, heads, shown, capsys, monkeypatch):
        """--se-reduction is the ratio of the SE head's blocks: without that head it changed
        nothing but the Settings line, which printed it as if it had been used."""
        monkeypatch.setattr(cli, "run_models", lambda *a, **k: pytest.fail("measured"))
        with pytest.raises(SystemExit) as exc:
            main(["models", "--backbones", "resnet18", "--resolutions", "64", "--se-reduction", "4", "--heads", *heads])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert (f"models: error: --se-reduction 4 does nothing without an SE head {shown}: add se to "
                "--heads, or leave --se-reduction out") in err, err  # fmt: skip

    def test_se_reduction_defaults_to_8_where_it_is_used(self, tmp_path):
        """Left out, it is None on the command line and 8 in the run: the Settings line and the
        counts are those of the runs before (se_reduction=8), with or without an SE head."""
        assert cli.build_parser().parse_args(["models"]).se_reduction is None
        for heads in (["se"], ["fast-bcnn"]):
            argv = ["models", "--params-only", "--backbones", "resnet18", "--heads", *heads,
                    "--no-progress", "--out", str(tmp_path)]  # fmt: skip
            assert main(argv) == 0
            assert json.loads((tmp_path / "models.json").read_text())["settings"]["se_reduction"] == 8
            assert "se_reduction=8" in (tmp_path / "models.md").read_text()
            counts = {r["head"]: int(r["params"]) for r in read_csv(tmp_path / "models.csv")}
            assert counts == {r["head"]: r["params"] for r in parameter_table(["resnet18"], heads, se_reduction=8)}

    def test_files_are_written_before_the_table_and_a_closed_stdout_is_quiet(self, tmp_path, monkeypatch, capsys):
        """`bilinearpool-bench layers --out DIR | true` was a BrokenPipeError traceback, and
        the final files were never written (the table was printed first)."""

        class Gone:
            def write(self, text):
                raise BrokenPipeError(32, "Broken pipe")

            def flush(self):
                pass

            def fileno(self):
                raise OSError("no file descriptor")

        monkeypatch.setattr(sys, "stdout", Gone())
        argv = ["layers", "--shapes", "2x4x3x3", "2x4x4x4", "--cases", "naive", "--out", str(tmp_path), *self.COMMON]
        assert main(argv) == 141
        assert capsys.readouterr().err == ""
        data = json.loads((tmp_path / "layers.json").read_text())
        assert not [n for n in data["notes"] if n.startswith("INCOMPLETE")]
        assert {r["shape"] for r in read_csv(tmp_path / "layers.csv")} == {"2x4x3x3", "2x4x4x4"}
        assert main(["report", str(tmp_path)]) == 141

    def test_a_file_that_cannot_be_replaced_is_one_line_and_no_mix(self, tmp_path, monkeypatch, capsys):
        """A results file that could not be written over (immutable, another user's) was a
        traceback, and left the new run's CSV beside the old run's JSON and Markdown."""
        argv = ["layers", "--shapes", "2x4x3x3", "--cases", "naive", "--out", str(tmp_path), *self.COMMON]
        assert main(argv) == 0
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        real = os.replace

        def refuse(name):
            def replace(src, dst):
                if Path(dst).name == name:
                    raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
                return real(src, dst)
            return replace

        argv[2] = "2x4x5x5"
        monkeypatch.setattr(os, "replace", refuse("layers.json"))
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"bilinearpool-bench layers: error: writing {tmp_path / 'layers.json'} failed "
                                  "with PermissionError: ")
        assert err[-1].endswith(f"the files in {tmp_path} are left as they were")
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries left either
        monkeypatch.setattr(os, "replace", refuse("layers.md"))
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith("; in place: this run's layers.json, layers.csv; left as they were: layers.md, "
                                "layers.png")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
        assert (tmp_path / "layers.md").read_bytes() == before["layers.md"]
        assert json.loads((tmp_path / "layers.json").read_text())["rows"][0]["shape"] == "2x4x5x5"

    def test_stopped_while_plotting_the_rows_are_written_and_no_older_plot(self, tmp_path, monkeypatch, capsys):
        """Ctrl-C while the plot was drawn left the older run's plot beside the new files."""
        argv = ["layers", "--shapes", "2x4x3x3", "--cases", "naive", "--out", str(tmp_path), *self.COMMON]
        assert main(argv) == 0
        assert (tmp_path / "layers.png").exists()

        def interrupted(result, path):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "_plot", interrupted)
        argv[2] = "2x4x5x5"
        capsys.readouterr()
        assert main(argv) == 130
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (f"bilinearpool-bench: stopped by KeyboardInterrupt while writing; the finished results "
                           f"are written into {tmp_path}, without the plot")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.csv", "layers.json", "layers.md"]
        data = json.loads((tmp_path / "layers.json").read_text())
        assert data["rows"][0]["shape"] == "2x4x5x5" and not [n for n in data["notes"] if "INCOMPLETE" in n]

    def test_ctrl_c_in_the_checks_before_a_run_is_one_line(self, tmp_path, monkeypatch, capsys):
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "_check_inputs", interrupted)
        for argv in (["layers", "--out", str(tmp_path), *self.COMMON], ["report", str(tmp_path)]):
            assert main(argv) == 130
            assert capsys.readouterr().err.strip() == f"bilinearpool-bench {argv[0]}: interrupted"

    def test_sigterm_stops_as_ctrl_c_does(self, tmp_path):
        """SIGTERM (kill, timeout, a batch scheduler) ended the run without a word, its files
        still saying "the run goes on"."""
        shapes = ["2x8x4x4"] + [f"4x96x24x{24 + i}" for i in range(6)]
        cmd = [sys.executable, "-m", "bilinearpool.bench", "layers", "--shapes", *shapes, "--cases", "naive",
               "--repeats", "400", "--warmup", "0", "--threads", "1", "--no-progress", "--out", str(tmp_path)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (tmp_path / "layers.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the first shape's rows are written: the run is in its second
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err
        assert re.fullmatch(r"bilinearpool-bench: stopped at 4x96x24x\d+ .* by SIGTERM; what was "
                            r"measured before is written \(marked INCOMPLETE\)\n", err), err
        data = json.loads((tmp_path / "layers.json").read_text())
        assert re.match(r"INCOMPLETE: the run stopped at .* with SIGTERM", data["notes"][0])

    def test_ctrl_c_is_one_line_and_status_130(self, tmp_path, monkeypatch, capsys):
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "run_layers", interrupted)
        assert main(["layers", "--shapes", "2x4x3x3", "--out", str(tmp_path), *self.COMMON]) == 130
        assert capsys.readouterr().err.strip() == "bilinearpool-bench layers: interrupted"



class TestNodeOption:
    """``models --node BACKBONE=NODE``: a backbone without a default feature node (a vision
    transformer) skipped every row with the Python API's advice (``node=``,
    ``sample_shape=``) and exit status 0, with no way on the command line to follow it."""

    def test_a_vision_transformer_is_counted_at_its_node(self, tmp_path):
        argv = ["models", "--params-only", "--backbones", "vit_b_16", "--heads", "bcnn", "fast-bcnn",
                "--node", "vit_b_16=encoder", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        data = json.loads((tmp_path / "models.json").read_text())
        rows = {r["head"]: r for r in data["rows"]}
        assert set(rows) == {"plain", "bcnn", "fast-bcnn"}
        assert all(r["channels"] == 768 and r["params_ok"] is True for r in rows.values())
        assert rows["fast-bcnn"]["params"] - rows["plain"]["params"] == (768 * 768 - 768) * 8
        assert data["settings"]["nodes"] == {"vit_b_16": "encoder"}

    def test_without_it_the_note_names_the_option(self, tmp_path, capsys):
        argv = ["models", "--params-only", "--backbones", "vit_b_16", "--heads", "se", "fast-bcnn",
                "--no-progress", "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 1  # it was 0, with nothing measured
        rows = {r["head"]: r for r in json.loads((tmp_path / "models.json").read_text())["rows"]}
        hint = "(on this command line: --node vit_b_16=NODE; the run passes sample_shape itself)"
        err = capsys.readouterr().err
        # se is tried first (before the run), plain in it: both notes name the option
        assert rows["plain"]["note"].endswith(hint) and rows["se"]["note"].endswith(hint)
        assert err.count(hint) == 2
        assert "the baseline `plain` could not be built" in rows["fast-bcnn"]["note"]
        assert err.rstrip().endswith("bilinearpool-bench models: error: the models run measured nothing: every "
                                     "row was skipped or failed, with the reason in its note column")
        # a backbone beside it that is measured: status 0
        assert main([*argv, "--backbones", "vit_b_16", "resnet18"]) == 0

    def test_a_layers_run_that_measured_nothing_is_an_error(self, monkeypatch, capsys, keep_threads):
        def no_timings(*args, **kwargs):
            result = real(*args, **kwargs)
            for row in result.rows:
                row["fwd_bwd_ms"] = None
            return result

        real = cli.run_layers
        monkeypatch.setattr(cli, "run_layers", no_timings)
        argv = ["layers", "--shapes", "2x4x3x3", "--quick", "--no-progress", "--threads", "1"]
        assert main(argv) == 1
        assert ("error: the layers run measured nothing: every row was skipped or failed, with the reason in "
                "its error column") in capsys.readouterr().err  # the layers table has no note column
        monkeypatch.setattr(cli, "run_layers", real)
        assert main(argv) == 0

    def test_a_timed_models_run_whose_every_timing_failed_is_an_error(self, tmp_path, capsys, keep_threads):
        """The models were built (parameters counted) but no input could be made: nothing timed."""
        argv = ["models", "--backbones", "resnet18", "--heads", "plain", "--resolutions", "32", "--batch-size",
                "2147483647", "--repeats", "1", "--warmup", "0", "--no-train", "--threads", "1", "--no-progress",
                "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 1
        assert "error: the models run measured nothing" in capsys.readouterr().err
        (row,) = json.loads((tmp_path / "models.json").read_text())["rows"]
        assert row["params"] and row["infer_img_s"] is None and "inputs failed" in row["note"]

    def test_hints_after_a_cut(self):
        cut = {"node": "fc", "sample_shape": (3, 64, 64)}
        assert cli._node_hint("resnet18", ValueError("... pass node= to cut a classification model"), cut) == (
            " (on this command line: --node resnet18=NODE names the node)")
        assert cli._node_hint("resnet18", ValueError("unrelated"), cut) == ""
        assert cli._node_hint("resnet18", ValueError("unrelated"), {}) == ""
        with pytest.raises(ValueError, match=r"^nodes vit_b_16=encoder names a backbone this run does not build"):
            parameter_table(["resnet18"], ["plain"], nodes={"vit_b_16": "encoder"})

    def test_timed_rows_use_the_cut(self, tmp_path):
        """The cut applies to the timed models too, its channels read at the run's first
        resolution when it does not measure 224px."""
        argv = ["models", "--backbones", "resnet18", "--heads", "fast-bcnn", "--node", "resnet18=layer3",
                "--resolutions", "64", "--repeats", "1", "--warmup", "0", "--no-train", "--no-progress",
                "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        data = json.loads((tmp_path / "models.json").read_text())
        rows = {r["head"]: r for r in data["rows"]}
        assert all(r["channels"] == 256 and r["params_ok"] is True for r in rows.values())
        assert all(r["infer_img_s"] and not r["note"] for r in rows.values())
        assert rows["fast-bcnn"]["params"] - rows["plain"]["params"] == (256 * 256 - 256) * 8
        assert data["settings"]["nodes"] == {"resnet18": "layer3"}
        assert cli._cuts([("resnet18", "layer3")], cli._cut_resolution([64, 224])) == {
            "resnet18": {"node": "layer3", "sample_shape": (3, 224, 224)}
        }

    def test_parameter_table_takes_nodes(self):
        rows = parameter_table(["resnet18"], ["plain", "fast-bcnn"], nodes={"resnet18": "layer2"})
        assert [r["channels"] for r in rows] == [128, 128] and all(r["params_ok"] is True for r in rows)

    def test_a_head_with_its_own_node_is_not_cut_twice(self):
        head = bench.ModelHead("own-cut", "fast-bcnn", "cut at layer2", options={"node": "layer2"})
        with pytest.raises(ValueError, match="head 'own-cut' cuts its backbone at node='layer2' itself, "
                           "so a run's node='layer3' cannot apply to it"):  # fmt: skip
            head.build("resnet18", num_classes=8, node="layer3", sample_shape=(3, 64, 64))

    @pytest.mark.parametrize(
        ("given", "shown"),
        [
            (["--node", "vit_b_16"], "argument --node: expected BACKBONE=NODE, e.g. vit_b_16=encoder, but got "
             "'vit_b_16'"),
            (["--node", "resnet50=layer3"], "--node resnet50=layer3 names a backbone this run does not build "
             "(backbones: resnet18)"),
            (["--node", "resnet18=layer3", "--node", "resnet18=layer2"], "--node expected one node per backbone, "
             "but got resnet18=layer3/layer2"),
            (["--backbones", "timm:resnet18", "--node", "timm:resnet18=layer3"], "--node timm:resnet18=layer3: a "
             "graph node cuts torchvision models and modules; a timm model gives its last feature map itself"),
        ],
    )  # fmt: skip
    def test_what_would_be_ignored_is_refused(self, given, shown, capsys, monkeypatch):
        monkeypatch.setattr(cli, "run_models", lambda *a, **k: pytest.fail("measured"))
        with pytest.raises(SystemExit) as exc:
            main(["models", "--backbones", "resnet18", "--resolutions", "64", *given])
        assert exc.value.code == 2 and shown in capsys.readouterr().err


class TestResults:
    """What the tables and goal lines say, computed from raw records (no timing thresholds:
    the timings here are made up), and the report that rebuilds them."""

    RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    COMMITTED = RESULTS / "cpu-2core-2threads"  # a version 1 run (no format field, no commit)

    def test_goal_ratios_have_three_decimals_and_name_noise(self):
        naive = [1.0, 1.0, 1.0]
        raw = [
            layer_record("2x8x4x4", "naive", naive),
            layer_record("2x8x4x4", "matmul-floor", [0.1, 0.1, 0.1]),
            layer_record("2x8x4x4", "fast-bcnn", [0.45, 0.72, 0.4964]),  # median meets, a round does not
            layer_record("3x8x4x4", "naive", naive),
            layer_record("3x8x4x4", "matmul-floor", [0.1, 0.1, 0.1]),
            layer_record("3x8x4x4", "fast-bcnn", [0.5024, 0.51, 0.501]),  # every round misses
        ]
        plan = [[sh, list(LAYER_CASE_INFO)] for sh in ("2x8x4x4", "3x8x4x4")]
        result = cli._layers_result(raw, LAYER_CASE_INFO, LAYER_SETTINGS, {}, "cmd", plan)
        goals = {r["shape"]: r["goals"] for r in result.rows if r["case"] == "fast-bcnn"}
        assert goals == {
            "2x8x4x4": "time met (0.496x; rounds 0.45-0.72, within noise), memory met (1.000x)",
            "3x8x4x4": "time NOT met (0.502x), memory met (1.000x)",
        }
        (time_line,) = [g for g in result.meta["goals"] if "fwd+bwd time" in g]
        assert time_line == (
            "`fast-bcnn` fwd+bwd time <= 0.5x the naive chain's: NOT met at 1 of 2 shapes "
            "(3x8x4x4: 0.502x); met at 2x8x4x4: 0.496x [rounds 0.45-0.72, within noise]"
        )

    def test_goals_met_exactly_at_their_limits(self):
        """time <= 0.5x and saved <= 1.1x: a ratio equal to the limit meets the goal."""
        assert cli._layer_goal(0.5, [0.5], 1.0) == "time met (0.500x), memory met (1.000x)"
        assert cli._layer_goal(0.2, [0.2], 1.1) == "time met (0.200x), memory met (1.100x)"
        # a round exactly at the limit meets it, the other does not: within noise
        assert cli._layer_goal(0.55, [0.5, 0.6], 1.0) == (
            "time NOT met (0.550x; rounds 0.50-0.60, within noise), memory met (1.000x)"
        )
        raw = [
            layer_record("2x8x4x4", "naive", [1.0]),
            layer_record("2x8x4x4", "matmul-floor", [0.1]),
            layer_record("2x8x4x4", "fast-bcnn", [0.5], saved=110),  # 0.5x the time, 1.1x the input
        ]
        plan = [["2x8x4x4", list(LAYER_CASE_INFO)]]
        result = cli._layers_result(raw, LAYER_CASE_INFO, LAYER_SETTINGS, {}, "cmd", plan)
        row = next(r for r in result.rows if r["case"] == "fast-bcnn")
        assert (row["vs_naive"], row["saved_vs_input"]) == (0.5, 1.1)
        assert row["goals"] == "time met (0.500x), memory met (1.100x)"
        assert result.meta["goals"][:2] == [
            "`fast-bcnn` fwd+bwd time <= 0.5x the naive chain's: met at the 1 shape (2x8x4x4: 0.500x)",
            "`fast-bcnn` saved bytes <= 1.1x the input map's: met at the 1 shape (2x8x4x4: 1.100x)",
        ]

    def test_layer_goals_count_the_planned_shapes(self):
        raw = [
            layer_record("2x8x4x4", "naive", [1.0]),
            layer_record("2x8x4x4", "matmul-floor", [0.1]),
            layer_record("2x8x4x4", "fast-bcnn", [0.2]),
            layer_record("1x8x1x1", "naive", [1.0]),
            layer_record("1x8x1x1", "matmul-floor", [0.1]),
            layer_record("1x8x1x1", "fast-bcnn", [], error="failed: RuntimeError: boom"),
        ]
        plan = [[sh, list(LAYER_CASE_INFO)] for sh in ("2x8x4x4", "1x8x1x1", "4x8x4x4")]  # the last never ran
        goals = cli._layers_result(raw, LAYER_CASE_INFO, LAYER_SETTINGS, {}, "cmd", plan).meta["goals"]
        assert goals[0] == (
            "`fast-bcnn` fwd+bwd time <= 0.5x the naive chain's: met at 1 of 3 shapes (2x8x4x4: 0.200x); "
            "2 not measured: 1x8x1x1: failed: RuntimeError: boom; 4x8x4x4: the run stopped before measuring it"
        )
        assert goals[1].startswith("`fast-bcnn` saved bytes <= 1.1x the input map's: met at 1 of 3 shapes")

    def test_a_goal_case_failing_at_one_shape_is_not_met_at_all(self, tmp_path, monkeypatch, keep_threads):
        def build(c, device):
            def fn(x):
                if c == 6:
                    raise RuntimeError("boom")
                return x.mean((2, 3))
            return fn

        case = bench.LayerCase("test-goal", "fails at C=6", build, goal=True)
        monkeypatch.setitem(bench.LAYER_CASES, case.name, case)
        argv = ["layers", "--shapes", "2x8x2x2", "2x6x2x2", "--cases", "test-goal", "--repeats", "1",
                "--warmup", "0", "--threads", "1", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        goals = json.loads((tmp_path / "layers.json").read_text())["goals"]
        time_line = next(g for g in goals if g.startswith("`test-goal` fwd+bwd time"))
        assert "of 2 shapes" in time_line and "all 1" not in time_line
        assert time_line.endswith("; 1 not measured: 2x6x2x2: failed: RuntimeError: boom")

    def test_model_goal_names_noise_and_the_backbones_not_measured(self):
        raw = [
            model_record("resnet50", "plain", [1.0, 1.0, 1.0]),
            model_record("resnet50", "fast-bcnn", [1 / 0.9, 1 / 0.8, 1 / 0.88]),
            model_record("inception_v3", "plain", [1.0]),
            model_record("inception_v3", "fast-bcnn", [], note="inference failed: RuntimeError: boom"),
        ]
        plan = {"backbones": ["resnet50", "inception_v3", "inception_resnet_v2"],
                "heads": ["plain", "fast-bcnn"], "resolutions": [224], "timed": True}  # fmt: skip
        result = cli._models_result(raw, {"plain": "", "fast-bcnn": ""}, {"device": "cpu"}, {}, "cmd", plan)
        line = next(g for g in result.meta["goals"] if g.startswith("Fast BCNN"))
        assert line == (
            "Fast BCNN inference throughput / plain at 224px, goal >= 0.85x: resnet50 0.880x "
            "(met; rounds 0.80-0.90, within noise); not measured on inception_v3 (inference failed: "
            "RuntimeError: boom), inception_resnet_v2 (the run stopped before it)"
        )

    def test_model_throughput_goal_met_exactly_at_its_limit(self):
        raw = [model_record("resnet50", "plain", [0.85]), model_record("resnet50", "fast-bcnn", [1.0])]
        plan = {"backbones": ["resnet50"], "heads": ["plain", "fast-bcnn"], "resolutions": [224], "timed": True}
        result = cli._models_result(raw, {"plain": "", "fast-bcnn": ""}, {"device": "cpu"}, {}, "cmd", plan)
        assert next(r for r in result.rows if r["head"] == "fast-bcnn")["infer_vs_plain"] == 0.85
        assert result.meta["goals"][1] == (
            "Fast BCNN inference throughput / plain at 224px, goal >= 0.85x: resnet50 0.850x (met)"
        )

    def test_a_parameter_count_off_the_analytic_count_is_not_met(self):
        raw = [model_record("resnet50", "plain", [1.0]), model_record("resnet50", "fast-bcnn", [1.0])]
        raw[1].update(params=11, params_analytic=12)
        plan = {"backbones": ["resnet50"], "heads": ["plain", "fast-bcnn"], "resolutions": [224], "timed": True}
        result = cli._models_result(raw, {"plain": "", "fast-bcnn": ""}, {"device": "cpu"}, {}, "cmd", plan)
        assert [r["params_ok"] for r in result.rows] == [True, False]
        assert result.meta["goals"][0] == (
            "Parameter counts equal the analytic counts: NOT met for resnet50/fast-bcnn: 11 vs 12"
        )

    def test_a_timed_run_without_the_goal_resolution_says_so(self):
        raw = [model_record("resnet50", "plain", [1.0]), model_record("resnet50", "fast-bcnn", [1.0])]
        for rec in raw:
            rec["resolution"] = 64
        plan = {"backbones": ["resnet50"], "heads": ["plain", "fast-bcnn"], "resolutions": [64], "timed": True}
        result = cli._models_result(raw, {"plain": "", "fast-bcnn": ""}, {"device": "cpu"}, {}, "cmd", plan)
        assert result.meta["goals"] == [
            "Parameter counts equal the analytic counts: met for all 2 models",
            "Throughput goals are stated at 224px, which was not measured in this run",
        ]

    def test_saved_bytes_leave_out_the_layers_own_weights(self, tmp_path, keep_threads):
        """The model holds a layer's parameters and buffers anyway: lowrank-r512's projections
        and compact-ts's random hashes are not counted as kept for backward."""
        argv = ["layers", "--shapes", "2x16x3x3", "--cases", "lowrank-r512", "compact-ts", "--repeats", "1",
                "--warmup", "0", "--threads", "1", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        by = {r["case"]: r for r in read_csv(tmp_path / "layers.csv")}
        x = torch.relu(torch.randn(2, 16, 3, 3)).requires_grad_()
        lowrank = bench.LAYER_CASES["lowrank-r512"].build(16, torch.device("cpu"))
        with bench.SavedTensorCounter() as everything:
            lowrank(x)
        weights = sum(p.numel() * FLOAT32 for p in lowrank.parameters())  # U and V, both saved
        assert float(by["lowrank-r512"]["saved_MiB"]) * 2**20 == everything.nbytes - weights
        assert float(by["compact-ts"]["saved_vs_input"]) == 1.0  # its input only, not its hashes
        md = (tmp_path / "layers.md").read_text()
        assert "the layer's own parameters and buffers not counted" in md

    def test_report_rebuilds_the_committed_results(self, tmp_path):
        """Older files (no format field, no commit): rows recomputed from their timings agree
        with the stored ones, and the report prints the verdicts of the current code."""
        out = tmp_path / "r.md"
        assert main(["report", str(self.COMMITTED), "--out", str(out)]) == 0
        text = out.read_text()
        assert "from a version 1 results file" in text
        assert "do not record the git commit" in text
        assert re.search(r"\| 8x2048x7x7 \| fast-bcnn \|.*\| time (NOT )?met \(\d\.\d{3}x", text)
        assert re.search(r"plain at 224px, goal >= 0\.85x: resnet50 \d\.\d{3}x \((NOT )?met", text)

    def test_report_of_a_folder_of_run_folders_names_them(self, tmp_path, capsys):
        """The committed GPU folders hold one subfolder per run kind: report names them
        (it said to run a benchmark first); a subcommand's bad input shows its own usage."""
        for sub in ("fp32", "amp-cl"):
            (tmp_path / sub).mkdir()
            (tmp_path / sub / "layers.json").write_text("{}")
        (tmp_path / "notes").mkdir()
        with pytest.raises(SystemExit) as exc:
            main(["report", str(tmp_path)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "usage: bilinearpool-bench report" in err
        assert f"its subfolders amp-cl, fp32 hold results: report one of them, e.g. `bilinearpool-bench report {tmp_path / 'amp-cl'}`" in err
        with pytest.raises(SystemExit):
            main(["report", str(tmp_path / "fp32" / "layers.json")])
        assert "is a file" in capsys.readouterr().err

    def test_quick_runs_say_their_verdicts_are_no_measurement(self, tmp_path, capsys, keep_threads):
        """`make demo` printed NOT met verdicts from 2 timed rounds that contradicted the
        committed full runs; a run of so few rounds now says what its verdicts are."""
        main(["layers", "--shapes", "2x8x3x3", "--cases", "naive", "fast-bcnn", "--quick", "--threads", "1",
              "--no-progress", "--out", str(tmp_path)])  # fmt: skip
        text = (tmp_path / "layers.md").read_text()
        assert "Only 2 timed rounds, as `--quick` and `demo` run" in text
        assert text.index("Only 2 timed rounds") < text.index("`fast-bcnn` fwd+bwd time")
        main(["layers", "--shapes", "2x8x3x3", "--cases", "naive", "fast-bcnn", "--repeats", "3", "--threads", "1",
              "--no-progress", "--out", str(tmp_path / "full")])  # fmt: skip
        assert "timed round" not in (tmp_path / "full" / "layers.md").read_text().split("Goals:")[1]

    def test_report_rebuilds_the_current_results(self, tmp_path):
        """The committed cpu-2core run (version 2, with its commit): rebuilt without warnings
        about missing commits, and the same goal lines as the committed Markdown."""
        out = tmp_path / "r.md"
        assert main(["report", str(self.RESULTS / "cpu-2core"), "--out", str(out)]) == 0
        text = out.read_text()
        assert "from a version 1 results file" not in text and "do not record the git commit" not in text
        committed = (self.RESULTS / "cpu-2core.md").read_text()
        goals = [line for line in text.splitlines() if line.startswith("- `fast-bcnn")]
        assert goals and all(line in committed for line in goals)

    def copy_committed(self) -> dict[str, dict]:
        return {n: json.loads((self.COMMITTED / f"{n}.json").read_text()) for n in ("layers", "models")}

    def write(self, folder: Path, data: dict[str, dict]) -> None:
        for name, d in data.items():
            (folder / f"{name}.json").write_text(json.dumps(d))

    def test_report_refuses_rows_the_raw_timings_do_not_give(self, tmp_path, capsys):
        data = self.copy_committed()
        for rec in data["layers"]["raw"]:
            if rec["case"] == "fast-bcnn":
                rec["times_s"] = [1e-6] * len(rec["times_s"])
        self.write(tmp_path, data)
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 1
        err = capsys.readouterr().err
        assert re.search(r"layers\.json: row 8x2048x7x7 fast-bcnn: fwd_bwd_ms is stored as [\d.]+, "
                         r"but the raw data give 0\.001", err)  # fmt: skip
        assert not (tmp_path / "r.md").exists()

    @pytest.mark.parametrize(("value", "why"), [
        (3, ": it was written by a newer bilinearpool-bench, which can rebuild it"),
        ("2", "; the file is damaged or was edited by hand: rerun the benchmark"),
        (0, "; the file is damaged or was edited by hand: rerun the benchmark"),
    ])
    def test_report_refuses_a_format_it_does_not_read(self, tmp_path, capsys, value, why):
        """A file of a newer format (or a format that is no version) was read as this
        code's own without a word (helper-143)."""
        data = self.copy_committed()
        data["models"]["format"] = value
        self.write(tmp_path, data)
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 1
        assert (f"report: error: {tmp_path / 'models.json'}: expected a results file of format 1 to 2 (what "
                f"this bilinearpool-bench reads), but its format is {value!r}{why}") in capsys.readouterr().err
        assert not (tmp_path / "r.md").exists()
        with pytest.raises(ValueError, match="expected a results file of format 1 to 2"):
            cli.rebuild_result(data["models"])

    def test_report_refuses_a_deleted_or_invented_cell_and_edited_rounds(self, tmp_path, capsys):
        """Only cells present on both sides were compared: a deleted vs_naive, an invented
        column or settings.timed_rounds raised from 1 to 5 (which drops the report's
        "not a measurement" caveat) passed; a command that is not a str was a traceback."""
        edits = {
            r"row 8x2048x7x7 fast-bcnn lacks \['vs_naive'\], which the raw data give":
                lambda d: self.fast(d).pop("vs_naive"),
            r"row 8x2048x7x7 fast-bcnn has \['speedup'\], which no benchmark writes":
                lambda d: self.fast(d).__setitem__("speedup", 9.0),
            r"its settings say 70 timed rounds, but its raw records hold up to 7 timings each":
                lambda d: d["settings"].__setitem__("timed_rounds", 70),
            r"cannot rebuild its results \(TypeError: its command is int, not a str\)":
                lambda d: d.__setitem__("command", 5),
            r"cannot rebuild its results \(AttributeError: ": lambda d: d.__setitem__("environment", []),
        }
        for message, edit in edits.items():
            data = self.copy_committed()
            edit(data["layers"])
            self.write(tmp_path, data)
            assert main(["report", str(tmp_path)]) == 1
            err = capsys.readouterr().err
            assert len(err.splitlines()) == 1 and re.search(message, err), err

    def test_report_reads_a_run_in_which_every_case_failed(self, tmp_path, capsys):
        """A run whose every row records why it failed (no timings at all) was refused as
        edited: 'settings say 1 timed rounds, but its raw records hold up to 0' (helper-149)."""
        out = tmp_path / "failed"
        assert main(["layers", "--threads", "1", "--shapes", "100000x100000x100x100", "--cases", "fast-bcnn",
                     "--repeats", "1", "--warmup", "0", "--no-progress", "--out", str(out)]) == 1
        rows = json.loads((out / "layers.json").read_text())["rows"]
        assert rows and all(r["error"] for r in rows)
        capsys.readouterr()
        assert main(["report", str(out), "--out", str(tmp_path / "r.md")]) == 0, capsys.readouterr().err
        assert "100000x100000x100x100" in (tmp_path / "r.md").read_text()

    @staticmethod
    def fast(data: dict) -> dict:
        return next(r for r in data["rows"] if r["case"] == "fast-bcnn" and r["shape"] == "8x2048x7x7")

    def test_report_refuses_a_stored_verdict_the_raw_data_do_not_give(self, tmp_path, capsys):
        data = self.copy_committed()
        row = next(r for r in data["models"]["rows"] if r["head"] == "fast-bcnn" and r["resolution"] == 224)
        row["infer_vs_plain"] = 0.5
        self.write(tmp_path, data)
        assert main(["report", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert re.search(
            r"row resnet50 fast-bcnn 224: infer_vs_plain is stored as 0\.5, but the raw data give 0\.\d+", err
        )

    def test_report_warns_when_the_parts_ran_on_other_code(self, tmp_path, capsys):
        data = self.copy_committed()
        data["layers"]["environment"].update(git_commit="a" * 40, threads=2)
        data["models"]["environment"].update(git_commit="b" * 40, threads=1)
        self.write(tmp_path, data)
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
        expected = f"come from different commits or environments: git_commit {'a' * 40} vs {'b' * 40}; threads 2 vs 1"
        assert expected in capsys.readouterr().err
        assert expected in (tmp_path / "r.md").read_text()

    def test_report_of_a_new_run_is_rebuilt_and_checked(self, tmp_path, capsys, keep_threads):
        argv = ["layers", "--shapes", "2x8x2x2", "--cases", "fast-bcnn", "--repeats", "2", "--warmup", "0",
                "--threads", "1", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        path = tmp_path / "layers.json"
        data = json.loads(path.read_text())
        assert data["format"] == cli.RESULT_FORMAT and data["plan"] == [["2x8x2x2", ["naive", "matmul-floor", "fast-bcnn"]]]
        data["markdown"] = "stale text"
        path.write_text(json.dumps(data))
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
        text = (tmp_path / "r.md").read_text()
        assert "stale text" not in text and "| 2x8x2x2 | fast-bcnn |" in text and "version 1" not in text
        row = next(r for r in data["rows"] if r["case"] == "fast-bcnn")
        row["saved_MiB"] *= 2  # an exact count that its raw record contradicts
        path.write_text(json.dumps(data))
        capsys.readouterr()
        assert main(["report", str(tmp_path)]) == 1
        assert "row 2x8x2x2 fast-bcnn: saved_MiB is stored as" in capsys.readouterr().err


    @pytest.mark.parametrize("value", [float("nan"), "0.1", -1.0, None])
    def test_report_names_raw_times_that_are_not_times(self, value, tmp_path, capsys):
        """A NaN among the raw timings was reported as a stored row that disagrees with its
        raw data ('vs_naive is stored as 0.5, the raw data give nan')."""
        data = json.loads((self.RESULTS / "cpu-2core" / "layers.json").read_text())
        record = next(r for r in data["raw"] if r["case"] == "fast-bcnn")
        record["times_s"][1] = value
        (tmp_path / "layers.json").write_text(json.dumps(data))
        assert main(["report", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert (f"layers.json: the raw record of {record['shape']} fast-bcnn holds {value!r} among its "
                "times_s, where a time in seconds belongs; the file was edited or damaged") in err, err

    def test_report_of_a_damaged_file_or_a_bad_out_is_an_error_line(self, tmp_path, capsys):
        afile = tmp_path / "afile"
        afile.write_text("")
        for text, message in (
            ("{not json", "layers.json: expected the JSON that `bilinearpool-bench layers --out` writes, but "
                          "it cannot be read as JSON (JSONDecodeError: Expecting property name"),
            ("[1, 2]", "layers.json: expected the JSON object that `bilinearpool-bench layers --out` writes, "
                       "but it holds a JSON list"),
            (json.dumps({"benchmark": "layers", "rows": [1]}), "layers.json: cannot rebuild its results"),
            # a models file renamed: its rows were read as layer rows ("cannot rebuild", or worse)
            (json.dumps({"benchmark": "models", "rows": []}), "layers.json: expected the results of "
             "`bilinearpool-bench layers`, but it holds those of `bilinearpool-bench models`; was it "
             "renamed or swapped with another file?"),
            (json.dumps({"rows": []}), "layers.json: expected the results of `bilinearpool-bench layers`, "
             "but it holds no benchmark field"),
        ):  # fmt: skip
            (tmp_path / "layers.json").write_text(text)
            assert main(["report", str(tmp_path)]) == 1
            err = capsys.readouterr().err
            assert "bilinearpool-bench report: error: " in err and message in err and "Traceback" not in err
        with pytest.raises(SystemExit) as exc:
            main(["report", str(self.RESULTS / "cpu-2core"), "--out", str(afile / "x.md")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"error: --out expected a Markdown file, but {afile} (above {afile / 'x.md'}) is a file" in err
        assert "Traceback" not in err

    def test_layer_plot_gives_every_case_its_own_colour(self):
        """11 library cases and a user's: all distinct, and a case's colour does not depend
        on which other cases a run has."""
        plt = pytest.importorskip("matplotlib.pyplot")

        def colours(cases):
            rows = [{"shape": "2x8x4x4", "case": c, "vs_naive": 0.5, "saved_vs_input": 1.0} for c in cases]
            fig = cli._plot_layers(plt, rows)
            ax = fig.axes[0]
            found = {bars.get_label(): bars.patches[0].get_facecolor() for bars in ax.containers}
            # the memory panel's goal line is named too (it had no legend)
            assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["memory goal 1.1x"]
            plt.close(fig)
            return found

        every = [*bench._LIBRARY_LAYER_CASES, "my-pool"]
        assert len(bench._LIBRARY_LAYER_CASES) == 11
        full = colours(every)
        assert set(full) == set(every) and len(set(full.values())) == len(every)
        few = colours(["naive", "lowrank-r512", "my-pool"])
        assert all(few[c] == full[c] for c in few)
        styles = cli._case_styles([f"user-{i}" for i in range(30)])  # past the palette: hatches
        assert len({(s["color"], s["hatch"]) for s in styles.values()}) == 30


class TestProfileScripts:
    """benchmarks/profile_layer.py and profile_head.py (run by gpu_check.sh) on CPU, tiny settings."""

    ROOT = Path(__file__).resolve().parents[1]

    def _run(self, script: str, *args: str) -> None:
        proc = subprocess.run(
            [sys.executable, str(self.ROOT / "benchmarks" / script), "--device", "cpu", *args],
            check=False, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_profile_layer_lists_every_case_and_the_host_profile(self, tmp_path):
        out = tmp_path / "layer.md"
        self._run("profile_layer.py", "--shapes", "2x16x3x3", "--calls", "2", "--cprofile", "2x16x3x3", "--out", str(out))
        text = out.read_text()
        for case in ("naive", "matmul-floor", "fast-bcnn", "fast-bcnn-triu", "bcnn-2stream"):
            assert f"| 2x16x3x3 | {case} |" in text
        assert "cProfile by own time" in text and "ncalls" in text

    def test_profile_head_times_the_parts(self, tmp_path):
        out = tmp_path / "head.md"
        self._run(
            "profile_head.py", "--backbone", "resnet18", "--batch-size", "1", "--resolution", "32",
            "--repeats", "1", "--warmup", "0", "--out", str(out),
        )
        text = out.read_text()
        for part in (
            "plain model", "fast-bcnn model", "backbone", "pooling", "classifier", "classifier as F.linear",
            "head (pooling + classifier), as the model runs it",
        ):
            assert f"| {part} |" in text
        assert "embedding (1, 262144)" in text  # resnet18: 512 channels

    def test_bench_head_checks_and_times_fused_against_composition(self, tmp_path):
        self._run("bench_head.py", "--shapes", "2x16x9", "3x8x100", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path))
        text = (tmp_path / "results.md").read_text()
        for row in ("| 2x16x9 | False |", "| 2x16x9 | True |", "| 3x8x100 | False |", "| 3x8x100 | True |"):
            assert row in text

    def test_bench_head_times_a_training_step(self, tmp_path):
        self._run("bench_head.py", "--train", "--shapes", "2x16x9", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path))
        text = (tmp_path / "results.md").read_text()
        assert "training step" in text and "| 2x16x9 | False |" in text and "| 2x16x9 | True |" in text

    def test_bench_head_reports_a_broken_candidate_and_times_the_rest(self, tmp_path, monkeypatch, capsys):
        """A candidate kernel that fails (compile error) or computes wrong values is named in
        its table cell and left out; the library's step and the other rows are still timed."""
        monkeypatch.syspath_prepend(str(self.ROOT / "benchmarks"))
        import bench_head

        def broken(name, x, w, bias):
            if name == "gram-linear":
                def call():
                    raise RuntimeError("simulated compile error")
                return call
            return lambda: torch.zeros(x.shape[0], w.shape[0])

        monkeypatch.setattr(bench_head, "candidate", broken)
        args = ["--device", "cpu", "--candidates", "--shapes", "2x8x9", "--repeats", "1", "--warmup", "0"]
        assert bench_head.main([*args, "--out", str(tmp_path)]) == 0
        full = (tmp_path / "results.csv").read_text().splitlines()[1].split(",")
        assert full[5].startswith("wrong (max diff")
        assert full[7] == "failed (RuntimeError)" and full[3] and full[4]
        assert "simulated compile error" in capsys.readouterr().err

    def test_bench_wide_linear_checks_and_times_the_candidates(self, tmp_path):
        self._run("bench_wide_linear.py", "--shapes", "2x40000x3", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path))
        text = (tmp_path / "results.md").read_text()
        assert "| 2x40000x3 | f.linear |" in text and "| 2x40000x3 | library |" in text


class TestReportRefusesTampering:
    RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-2core"

    def layers(self) -> dict:
        return json.loads((self.RESULTS / "layers.json").read_text())

    def test_plan_must_cover_what_was_measured(self):
        data = self.layers()
        data["plan"] = [[shape, [c for c in names if c != "fast-bcnn"]] for shape, names in data["plan"]]
        with pytest.raises(cli.ResultMismatchError, match="measured but not in the file's plan: .*fast-bcnn"):
            cli.rebuild_result(data)

    def test_known_cases_keep_their_goals(self):
        data = self.layers()
        data["cases"]["fast-bcnn"]["goal"] = False
        text = cli.rebuild_result(data).markdown()
        assert "`fast-bcnn` fwd+bwd time <= 0.5x" in text

    def test_a_missing_format_field_does_not_make_counts_unchecked(self):
        data = self.layers()
        del data["format"]
        row = next(r for r in data["rows"] if r["case"] == "fast-bcnn")
        row["saved_MiB"] = row["saved_MiB"] / 2
        with pytest.raises(cli.ResultMismatchError, match="saved_MiB"):
            cli.rebuild_result(data)

    def test_no_models_is_not_all_met(self):
        lines = cli._model_goal_summary([], [], {"backbones": [], "heads": [], "resolutions": [], "timed": False})
        assert lines == ["Parameter counts equal the analytic counts: not measured (no model was built)"]

    @pytest.mark.parametrize("placed", [["layers.json", "layers.csv"], []])
    def test_a_failed_write_of_a_stopped_run_says_what_is_on_disk(self, tmp_path, capsys, placed):
        # before: "the output folder does not hold them" after naming the files it does hold
        def checkpoint(result):
            raise cli.ResultWriteError(tmp_path / "layers.md", [tmp_path / p for p in placed], [],
                                       IsADirectoryError(21, "Is a directory"))

        cli._write_stopped(checkpoint, lambda note: None, KeyboardInterrupt(), "8x64x7x7", 3, "layers")
        err = capsys.readouterr().err
        if placed:
            assert err.rstrip().endswith(
                "the output folder holds them (marked INCOMPLETE) in layers.json, layers.csv only")
        else:
            assert err.rstrip().endswith("the output folder does not hold them (its files are missing, "
                                         "or were written earlier)")

    def test_a_damaged_cell_is_an_error_not_a_traceback(self, tmp_path, capsys):
        data = self.layers()
        row = next(r for r in data["rows"] if r["case"] == "fast-bcnn")
        row["vs_naive_range"] = "x-y"
        (tmp_path / "layers.json").write_text(json.dumps(data))
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 1
        assert "cannot rebuild its results (ValueError" in capsys.readouterr().err

    def fast_row(self, data: dict, shape: str = "8x2048x7x7") -> dict:
        return next(r for r in data["rows"] if r["case"] == "fast-bcnn" and r["shape"] == shape)

    def test_a_range_is_checked_to_its_printed_decimals(self, tmp_path, capsys):
        assert cli._same_value("vs_naive_range", "0.10-0.20", "0.104-0.196")
        assert not cli._same_value("vs_naive_range", "0.10-0.20", "0.40-0.90")
        assert not cli._same_value("vs_naive_range", "0.10-0.20", "0.10-0.21")
        # ratios below 1e-4: written positional now; files with an exponent still read
        # (before: ValueError could not convert '4.09e' to float)
        tiny = cli._ratio_range([2e-4, 3e-4], [3.0, 3.0])
        assert tiny == "0.0000667-0.0001" and cli._same_value("vs_naive_range", tiny, tiny)
        assert cli._same_value("vs_naive_range", "6.67e-05-0.0001", tiny)
        data = self.layers()
        row = self.fast_row(data)
        assert re.fullmatch(r"0\.\d\d-0\.\d\d", row["vs_naive_range"])  # as the committed run gave
        assert row["vs_naive_range"] != "0.39-0.62"
        row["vs_naive_range"] = "0.39-0.62"
        stored = r"row 8x2048x7x7 fast-bcnn: vs_naive_range is stored as '0\.39-0\.62'"
        with pytest.raises(cli.ResultMismatchError, match=stored):
            cli.rebuild_result(data)
        (tmp_path / "layers.json").write_text(json.dumps(data))
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 1
        assert "vs_naive_range is stored as '0.39-0.62'" in capsys.readouterr().err

    def test_a_ratio_off_by_a_fraction_of_a_percent_is_refused(self):
        data = self.layers()
        self.fast_row(data)["vs_naive"] *= 1.004
        with pytest.raises(cli.ResultMismatchError, match="row 8x2048x7x7 fast-bcnn: vs_naive is stored as"):
            cli.rebuild_result(data)

    def test_a_stored_verdict_is_checked_word_by_word(self):
        data = self.layers()
        row = self.fast_row(data, "32x256x14x14")  # NOT met in every committed run
        assert row["goals"].startswith("time NOT met")
        row["goals"] = row["goals"].replace("time NOT met", "time met")
        stored = "row 32x256x14x14 fast-bcnn: goals is stored as 'time met"
        with pytest.raises(cli.ResultMismatchError, match=stored):
            cli.rebuild_result(data)

    @pytest.mark.parametrize("key", ["goals", "vs_naive"])
    def test_a_stored_value_set_to_null_is_refused(self, key):
        data = self.layers()
        self.fast_row(data)[key] = None
        with pytest.raises(cli.ResultMismatchError, match=f"row 8x2048x7x7 fast-bcnn: {key} is stored as None"):
            cli.rebuild_result(data)

    def test_a_dropped_or_added_row_is_refused(self):
        data = self.layers()
        n = len(data["rows"])
        data["rows"].pop()
        with pytest.raises(cli.ResultMismatchError, match=f"{n - 1} rows are stored, but the raw data give {n}"):
            cli.rebuild_result(data)
        data = self.layers()
        data["rows"].append(dict(data["rows"][-1]))
        with pytest.raises(cli.ResultMismatchError, match=f"{n + 1} rows are stored, but the raw data give {n}"):
            cli.rebuild_result(data)

    def test_an_incomplete_mark_is_kept_at_the_top(self):
        data = self.layers()
        mark = "INCOMPLETE: the run stopped at 32x256x14x14 timing with KeyboardInterrupt"
        data["notes"].insert(0, f"{mark}; the 31 rows of its table came before")
        result = cli.rebuild_result(data)
        assert result.meta["notes"][0].startswith(mark)
        assert result.markdown().splitlines()[2].startswith(f"**{mark}")


class TestMethodology:
    """What the results say about how they were measured (autocast, matmul precision, ...)."""

    RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    COMMON = ["--repeats", "1", "--warmup", "0", "--threads", "1", "--no-progress"]

    def test_amp_run_says_the_poolings_compute_in_float32_and_records_out_dtype(self, tmp_path, keep_threads):
        argv = ["layers", "--amp", "--shapes", "2x8x3x3", "--cases", "fast-bcnn", "--out", str(tmp_path), *self.COMMON]
        assert main(argv) == 0
        data = json.loads((tmp_path / "layers.json").read_text())
        note = next(n for n in data["notes"] if n.startswith("Under autocast (bfloat16)"))
        assert "float32 by design" in note and "not the same arithmetic" in note
        assert note in (tmp_path / "layers.md").read_text()
        assert "out_dtype" in data["columns"]
        by = {r["case"]: r for r in data["rows"]}
        assert by["fast-bcnn"]["out_dtype"] == "float32"
        assert by["matmul-floor"]["out_dtype"] == "bfloat16"
        assert {r["case"]: r["out_dtype"] for r in data["raw"]} == {c: r["out_dtype"] for c, r in by.items()}
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
        assert note in (tmp_path / "r.md").read_text()

    def test_float32_run_has_no_amp_note_nor_dtype_column(self, tmp_path, keep_threads):
        argv = ["layers", "--shapes", "2x8x3x3", "--cases", "fast-bcnn", "--out", str(tmp_path), *self.COMMON]
        assert main(argv) == 0
        data = json.loads((tmp_path / "layers.json").read_text())
        assert not any("Under autocast" in n for n in data["notes"]) and "out_dtype" not in data["columns"]
        assert {r["out_dtype"] for r in data["raw"]} == {"float32"}

    def test_amp_note_in_models_and_in_older_amp_results(self, tmp_path):
        assert cli._amp_notes({"amp": "off"}, "models") == []
        assert "float32 by design" in cli._amp_notes({"amp": "float16"}, "models")[0]
        # A committed autocast run from before out_dtype was recorded rebuilds, with the note.
        out = tmp_path / "r.md"
        assert main(["report", str(self.RESULTS / "gpu-h100" / "amp-cl"), "--out", str(out)]) == 0
        text = out.read_text()
        assert "Under autocast (float16)" in text and "| out_dtype |" not in text

    def test_environment_records_matmul_precision(self, monkeypatch):
        env = bench.environment("cpu")
        assert env["float32_matmul_precision"] == torch.get_float32_matmul_precision()
        assert f"float32 matmul precision {env['float32_matmul_precision']}" in cli._describe_environment(env)
        old = {k: v for k, v in env.items() if k != "float32_matmul_precision"}
        assert "matmul precision" not in cli._describe_environment(old)  # older files lack it
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        env = bench.environment("cpu")
        assert env["cuda_matmul_allow_tf32"] == torch.backends.cuda.matmul.allow_tf32
        assert env["cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32
        assert "cudnn_allow_tf32=" in cli._describe_environment(env)

    def test_variants_of_the_goal_case_are_labelled_and_not_judged(self):
        """fast-bcnn-triu (half the output) and fast-bcnn-so (keeps its output) do not do the
        goal's work: their goals cells read 'variant: ...' and the goal lines judge fast-bcnn only."""
        assert bench.LAYER_CASES["fast-bcnn-triu"].variant_of == "fast-bcnn"
        assert bench.LAYER_CASES["fast-bcnn-so"].variant_of == "fast-bcnn"
        assert bench.LAYER_CASES["fast-bcnn"].variant_of is None
        info = cli._case_info([bench.LAYER_CASES[n] for n in ("naive", "matmul-floor", "fast-bcnn", "fast-bcnn-so")])
        raw = [
            layer_record("2x8x4x4", "naive", [1.0]),
            layer_record("2x8x4x4", "matmul-floor", [0.1]),
            layer_record("2x8x4x4", "fast-bcnn", [0.2]),
            layer_record("2x8x4x4", "fast-bcnn-so", [0.1], saved=300),
        ]
        result = cli._layers_result(raw, info, LAYER_SETTINGS, {}, "cmd", [["2x8x4x4", list(info)]])
        goals = {r["case"]: r["goals"] for r in result.rows}
        assert goals["fast-bcnn"] == "time met (0.200x), memory met (1.000x)"
        assert goals["fast-bcnn-so"] == "variant: time met (0.100x), memory NOT met (3.000x)"
        lines = result.meta["goals"]
        assert [g.split(" ")[0] for g in lines] == ["`fast-bcnn`", "`fast-bcnn`", "`fast-bcnn-so`"]
        assert lines[2] == (
            "`fast-bcnn-so` is a variant of `fast-bcnn` (the goals are judged on `fast-bcnn`); for information, "
            "fwd+bwd time / the naive chain's: 2x8x4x4: 0.100x; saved bytes / the input map's: 2x8x4x4: 3.000x"
        )
        assert not any("fast-bcnn-so` saved bytes <=" in g for g in lines)
        # without fast-bcnn in the run, the variant's line says so
        alone = {n: info[n] for n in ("naive", "matmul-floor", "fast-bcnn-so")}
        result = cli._layers_result([raw[0], raw[1], raw[3]], alone, LAYER_SETTINGS, {}, "cmd",
                                    [["2x8x4x4", list(alone)]])
        assert "judged on `fast-bcnn`, which this run did not include" in result.meta["goals"][-1]
        with pytest.raises(ValueError, match="variant_of='fast-bcnn' labels a variant of a goal case"):
            bench.LayerCase("x", "x", lambda c, d: None, variant_of="fast-bcnn")

    def test_committed_variant_rows_rebuild_with_the_label(self, tmp_path):
        """Stored rows without the label still agree (same verdict words); the rebuilt table labels them."""
        out = tmp_path / "r.md"
        assert main(["report", str(self.RESULTS / "cpu-2core"), "--out", str(out)]) == 0
        text = out.read_text()
        assert re.search(r"\| 8x2048x7x7 \| fast-bcnn-triu \|.*\| variant: time met", text)
        assert re.search(r"\| 8x2048x7x7 \| fast-bcnn \|.*\| time met", text)
        assert "`fast-bcnn-triu` fwd+bwd time <=" not in text


class TestAuditFollowUps:
    """Confirmed by an audit: head options the parameter check ignored, a report warning on
    the settings a --params-only run does not record, a false IN-PROCESS note for heads of a
    module imported before main(), and a caveat that miscounted --quick's rounds."""

    COMMON = ["--repeats", "1", "--warmup", "0", "--threads", "1", "--no-progress"]
    HEADS = (
        "from bilinearpool import FastBilinearPool, bench\n"
        "bench.MODEL_HEADS['bcnn-shared'] = bench.ModelHead('bcnn-shared', 'bcnn', 'shared', options={'shared': True})\n"
        "bench.MODEL_HEADS['fast-r64'] = bench.ModelHead('fast-r64', 'fast-bcnn', 'reduced', options={'reduce_dim': 64})\n"
        "bench.MODEL_HEADS['own-pool'] = bench.ModelHead('own-pool', 'fast-bcnn', 'own pool',\n"
        "                                                options={'pool': FastBilinearPool(triu=True)})\n"
    )

    @pytest.fixture
    def heads_module(self, tmp_path, monkeypatch):
        """A module of the user's that registers heads with options, found on sys.path."""
        name = "bench_audit_option_heads"
        (tmp_path / f"{name}.py").write_text(self.HEADS)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(bench, "MODEL_HEADS", dict(bench.MODEL_HEADS))
        monkeypatch.setattr(cli, "_IMPORTED", {"layer case": {}, "model head": {}})
        yield name
        sys.modules.pop(name, None)

    def test_analytic_count_takes_shared_and_reduce_dim(self):
        p, c, k, r = 1000, 16, 3, 4
        reduction = c * r + 2 * r  # 1x1 conv without bias, BN scale and shift
        count = bench.analytic_parameter_count
        assert count("bcnn", backbone_params=p, channels=c, num_classes=k, shared=True) == p + c * c * k + k
        assert count("fast-bcnn", backbone_params=p, channels=c, num_classes=k, reduce_dim=r) == (
            p + reduction + r * r * k + k)
        assert count("fast-bcnn", backbone_params=p, channels=c, num_classes=k, reduce_dim=r, triu=True) == (
            p + reduction + r * (r + 1) // 2 * k + k)
        assert count("plain", backbone_params=p, channels=c, num_classes=k, reduce_dim=r) == p + reduction + r * k + k
        # a reduction per stream, also when the streams share the backbone
        assert count("bcnn", backbone_params=p, channels=c, num_classes=k, reduce_dim=r) == (
            2 * p + 2 * reduction + r * r * k + k)
        assert count("bcnn", backbone_params=p, channels=c, num_classes=k, reduce_dim=r, shared=True) == (
            p + 2 * reduction + r * r * k + k)
        with pytest.raises(ValueError, match="shared=True applies to the 'bcnn' head only"):
            count("fast-bcnn", backbone_params=p, channels=c, num_classes=k, shared=True)
        with pytest.raises(ValueError, match="reduce_dim must be a positive int"):
            count("plain", backbone_params=p, channels=c, num_classes=k, reduce_dim=0)

    @pytest.mark.parametrize(
        "options",
        [{"shared": True}, {"reduce_dim": 5}, {"shared": True, "reduce_dim": 5, "dropout": 0.5},
         {"triu": True, "reduce_dim": 5}, {"se_reduction": 4}],
    )  # fmt: skip
    def test_head_options_are_in_the_analytic_count(self, options):
        """Against the exact count of models built on a small ResNet-like backbone."""
        import torchvision

        head = "bcnn" if "shared" in options else "fast-bcnn"
        model_head = bench.ModelHead("h", head, "h", options=options)
        body = torchvision.models.resnet18()
        model = model_head.build(body, num_classes=3)
        plain = bench.MODEL_HEADS["plain"].build(torchvision.models.resnet18(), num_classes=3)
        analytic = model_head.analytic_parameters(
            model, backbone_params=bench.count_parameters(plain.backbone),
            channels=plain.backbone.out_channels, num_classes=3)  # fmt: skip
        assert analytic == bench.count_parameters(model), options

    def test_options_without_a_closed_form_are_named(self):
        head = bench.ModelHead("x", "bcnn", "x", options={"backbone_b": "resnet18", "pool": nn.Identity(),
                                                          "node": None, "dropout": 0.1})  # fmt: skip
        assert head.unchecked_options() == ["backbone_b", "pool"]
        assert head.analytic_parameters(nn.Identity(), backbone_params=1, channels=2, num_classes=3) is None

    def test_models_checks_heads_with_options_and_says_which_it_cannot(self, tmp_path, heads_module):
        out = tmp_path / "out"
        argv = ["models", "--params-only", "--backbones", "resnet18", "--import", heads_module,
                "--heads", "plain", "bcnn-shared", "fast-r64", "own-pool", "--no-progress", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        rows = {r["head"]: r for r in read_csv(out / "models.csv")}
        assert {h: rows[h]["params_ok"] for h in rows} == {
            "plain": "True", "bcnn-shared": "True", "fast-r64": "True", "own-pool": "n/a"}
        assert rows["bcnn-shared"]["params"] == rows["bcnn-shared"]["params_analytic"] == "13273672"
        assert rows["own-pool"]["params_analytic"] == ""
        data = json.loads((out / "models.json").read_text())
        assert data["goals"][0] == (
            "Parameter counts equal the analytic counts: met for all 3 models with a closed form; "
            "not checkable for 1 (options without a closed form: resnet18/own-pool: pool)")
        assert any(n.startswith("params_ok n/a: the head has options") for n in data["notes"])
        md = (out / "models.md").read_text()
        assert "| resnet18 | own-pool | 512 |" in md and "| n/a |" in md
        assert main(["report", str(out), "--out", str(tmp_path / "r.md")]) == 0  # rebuilds from the raw records
        assert data["goals"][0] in (tmp_path / "r.md").read_text()

    def test_goal_line_of_unchecked_and_failing_heads(self):
        raw = [{"backbone": "b", "head": "plain", "resolution": None, "channels": 8, "params": 10,
                "params_analytic": 10},
               {"backbone": "b", "head": "mine", "resolution": None, "channels": 8, "params": 20,
                "params_analytic": None, "params_unchecked": ["pool", "node"]}]  # fmt: skip
        plan = {"backbones": ["b"], "heads": ["plain", "mine"], "resolutions": [], "timed": False}
        result = cli._models_result(raw, {"plain": "", "mine": ""}, {"device": "cpu"}, {}, "cmd", plan)
        assert [r["params_ok"] for r in result.rows] == [True, "n/a"]
        assert result.meta["goals"][0].endswith("met for all 1 models with a closed form; not checkable for 1 "
                                                "(options without a closed form: b/mine: pool, node)")
        raw[0]["params_analytic"] = 11
        result = cli._models_result(raw, {"plain": "", "mine": ""}, {"device": "cpu"}, {}, "cmd", plan)
        assert result.meta["goals"][0] == ("Parameter counts equal the analytic counts: NOT met for b/plain: 10 vs 11; "
                                           "not checkable for 1 (options without a closed form: b/mine: pool, node)")
        result = cli._models_result(raw[1:], {"mine": ""}, {"device": "cpu"}, {}, "cmd", plan)
        assert result.meta["goals"][0] == ("Parameter counts equal the analytic counts: not checkable for 1 "
                                           "(options without a closed form: b/mine: pool, node)")

    def test_report_of_layers_and_params_only_models_does_not_warn(self, tmp_path, capsys, keep_threads):
        """A params-only run records no timing settings and times on no threads: not compared."""
        assert main(["layers", "--shapes", "2x8x2x2", "--cases", "fast-bcnn", "--out", str(tmp_path),
                     *self.COMMON]) == 0  # fmt: skip
        torch.set_num_threads(2)  # the threads of the params-only run differ from the layers'
        assert main(["models", "--params-only", "--backbones", "resnet18", "--heads", "plain",
                     "--no-progress", "--out", str(tmp_path)]) == 0  # fmt: skip
        capsys.readouterr()
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
        assert "warning" not in capsys.readouterr().err
        assert "Warning" not in (tmp_path / "r.md").read_text()
        # what changes the code still warns
        path = tmp_path / "models.json"
        data = json.loads(path.read_text())
        data["environment"]["torch"] = "0.0.1"
        path.write_text(json.dumps(data))
        assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
        err = capsys.readouterr().err
        assert re.search(r"come from different commits or environments: torch \S+ vs 0\.0\.1\n", err), err

    def test_timed_parts_still_compare_their_timing_settings(self):
        layers = {"benchmark": "layers", "environment": {"git_commit": "a", "threads": 1},
                  "settings": {"amp": "off", "channels_last": False}}
        models = {"benchmark": "models", "plan": {"timed": True}, "environment": {"git_commit": "a", "threads": 2},
                  "settings": {"amp": "bfloat16", "channels_last": False}}  # fmt: skip
        (warning,) = cli._part_differences([layers, models])
        assert warning.endswith("threads 1 vs 2; amp off vs bfloat16")
        untimed = {**models, "plan": {"timed": False}, "settings": {"device": "cpu"}}
        assert cli._part_differences([layers, untimed]) == []
        # nor the machine's cores, which counting parameters does not use
        counted = {**untimed, "environment": {**untimed["environment"], "cpu_count": 16}}
        assert cli._part_differences([{**layers, "environment": {**layers["environment"], "cpu_count": 2}},
                                      counted]) == []
        older = {k: v for k, v in untimed.items() if k != "plan"}  # no plan: its columns tell
        assert cli._part_differences([layers, {**older, "columns": ["params", "params_ok"]}]) == []

    def test_heads_of_a_module_imported_before_main_count_as_imported(self, tmp_path, heads_module):
        import importlib

        importlib.import_module(heads_module)  # by the caller, before main
        assert bench.MODEL_HEADS["fast-r64"].module == heads_module
        assert main(["models", "--params-only", "--backbones", "resnet18", "--heads", "plain", "fast-r64",
                     "--import", heads_module, "--no-progress", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
        notes = json.loads((tmp_path / "out" / "models.json").read_text())["notes"]
        assert not [n for n in notes if n.startswith("IN-PROCESS")]
        # a head made here, in this test module, is still named: no --import registers it
        assert bench.ModelHead("here", "plain", "here").module == __name__
        assert cli._in_process_note("model head", ["plain", "fast-r64"], [heads_module]) == []
        (note,) = cli._in_process_note("model head", ["plain", "fast-r64"], ["another_module"])
        assert "`fast-r64`" in note

    def test_few_rounds_caveat_counts_the_quick_rounds(self, tmp_path, keep_threads):
        """It said 'Only 1 timed round, as `--quick` and `demo` run', which run 2."""
        args = argparse.Namespace(device="cpu", threads=None, quick=True, amp=False, warmup=None,
                                  repeats=None, channels_last=False, no_progress=True, seed=0)  # fmt: skip
        assert cli._settings(args, "layers").repeats == cli.QUICK_ROUNDS == 2
        argv = ["layers", "--shapes", "2x8x3x3", "--cases", "naive", "fast-bcnn", "--out", str(tmp_path),
                *self.COMMON]  # fmt: skip
        assert main(argv) == 0
        text = (tmp_path / "layers.md").read_text()
        assert "Only 1 timed round, fewer than the 2 of `--quick` and `demo`: the" in text
        assert "as `--quick` and `demo` run" not in text
