"""Training: sampler, checkpoints, kill-and-resume, DDP, and the whole CLI path.

Every run uses the synthetic tree and the ``tiny`` backbone, so it takes seconds on a CPU.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from breakhis.checkpoint import load_checkpoint, save_checkpoint
from breakhis.cli import main
from breakhis.data import index_breakhis
from breakhis.sampler import BalancedSampler
from breakhis.tasks import get_task
from breakhis.train import TrainConfig, fit

pytest.importorskip("bilinearpool")

TINY = ["--backbone", "tiny", "--no-pretrained", "--input-size", "32", "--batch-size", "8",
        "--lr", "0.05", "--momentum", "0.9", "--plateau-patience", "0", "--no-progress"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_weights(a: Path, b: Path, *, atol: float = 0.0) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0.0, atol=atol, msg=key)


class TestBalancedSampler:
    def test_balances_classes(self) -> None:
        targets = np.array([0] * 10 + [1] * 3 + [2] * 1)
        sampler = BalancedSampler(targets, batch_size=4, seed=0)
        counts = np.bincount(targets[[i for i, _ in sampler]], minlength=3)
        assert counts.min() >= 10 and len(sampler) == 32 == counts.sum()

    def test_epochs_repeat_and_differ(self) -> None:
        sampler = BalancedSampler(np.arange(20) % 2, batch_size=4, seed=5)
        sampler.set_epoch(3)
        first = list(sampler)
        sampler.set_epoch(4)
        assert list(sampler) != first
        sampler.set_epoch(3)
        assert list(sampler) == first

    def test_ddp_shards_interleave_to_single_process_batches(self) -> None:
        targets = np.arange(37) % 3
        single = list(BalancedSampler(targets, batch_size=8, seed=1))
        shards = [list(BalancedSampler(targets, batch_size=8, seed=1, num_replicas=2, rank=r))
                  for r in range(2)]
        interleaved = [item for pair in zip(*shards) for item in pair]
        assert interleaved == single and len(single) % 8 == 0

    def test_exceptions(self) -> None:
        with pytest.raises(ValueError, match="multiple of num_replicas=2"):
            BalancedSampler([0, 1], batch_size=3, num_replicas=2)
        with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
            BalancedSampler([0, 1], batch_size=2, num_replicas=2, rank=2)


class TestCheckpoint:
    def test_atomic_write_keeps_old_on_failure(self, tmp_path: Path) -> None:
        path = tmp_path / "c.pt"
        save_checkpoint({"epoch": 1, "w": torch.ones(2)}, path)
        with pytest.raises(Exception):
            save_checkpoint({"epoch": 2, "bad": lambda: None}, path)
        assert load_checkpoint(path)["epoch"] == 1
        assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]

    def test_missing(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_checkpoint(tmp_path / "none.pt")


class _Interrupt(Exception):
    pass


class TestResume:
    def test_interrupted_then_resumed_equals_uninterrupted(
        self, synth_tree, tmp_path: Path
    ) -> None:
        root, _ = synth_tree
        task = get_task("MSBC", magnification=40)
        records = task.select(index_breakhis(root).records)
        y = task.targets(records)
        config = TrainConfig(head="fast-bcnn", backbone="tiny", weights=None, input_size=32,
                             epochs=3, batch_size=8, lr=0.05, momentum=0.9, plateau_patience=0,
                             device="cpu")
        kwargs = dict(train_records=records[::2], train_targets=y[::2],
                      val_records=records[1::2], val_targets=y[1::2],
                      classes=list(task.classes), progress=False)
        full = fit(config, run_dir=tmp_path / "full", **kwargs)

        def stop_after_first(epoch: int, row: dict) -> None:
            if epoch == 0:
                raise _Interrupt

        with pytest.raises(_Interrupt):
            fit(config, run_dir=tmp_path / "cut", epoch_callback=stop_after_first, **kwargs)
        assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 0
        resumed = fit(config, run_dir=tmp_path / "cut", resume=True, **kwargs)
        assert resumed.resumed_from_epoch == 0
        _assert_same_weights(full.checkpoint, resumed.checkpoint)
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full.history]
        assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]
        # momentum buffers and scheduler counters had to come back from the checkpoint
        state = load_checkpoint(resumed.checkpoint)
        assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3

    def test_resume_refuses_other_model(self, synth_tree, tmp_path: Path) -> None:
        root, _ = synth_tree
        task = get_task("MSBC", magnification=40)
        records = task.select(index_breakhis(root).records)[:12]
        y = task.targets(records)
        config = TrainConfig(head="plain", backbone="tiny", weights=None, input_size=16,
                             epochs=1, batch_size=4, device="cpu")
        fit(config, train_records=records, train_targets=y, classes=list(task.classes),
            run_dir=tmp_path, progress=False)
        other = TrainConfig(**{**config.to_dict(), "head": "fast-bcnn"})
        with pytest.raises(ValueError, match="checkpoint has head='plain'"):
            fit(other, train_records=records, train_targets=y, classes=list(task.classes),
                run_dir=tmp_path, resume=True, progress=False)

    def test_resume_refuses_other_training_options(self, synth_tree, tmp_path: Path) -> None:
        root, _ = synth_tree
        task = get_task("MSBC", magnification=40)
        records = task.select(index_breakhis(root).records)[:12]
        y = task.targets(records)
        config = TrainConfig(head="plain", backbone="tiny", weights=None, input_size=16,
                             epochs=2, batch_size=4, lr=0.1, device="cpu")
        kwargs = dict(train_records=records, train_targets=y, classes=list(task.classes),
                      run_dir=tmp_path, progress=False)
        fit(config, **kwargs)
        changed = TrainConfig(**{**config.to_dict(), "epochs": 3, "lr": 0.01,
                                 "oversample": False})
        with pytest.raises(ValueError, match="checkpoint has lr=0.1, this run 0.01; "
                           "checkpoint has oversample=True, this run False"):
            fit(changed, resume=True, **kwargs)
        fewer = TrainConfig(**{**config.to_dict(), "epochs": 1})
        with pytest.raises(ValueError, match="already trained 2 epochs, this run asks for "
                           "epochs=1"):
            fit(fewer, resume=True, **kwargs)
        state = load_checkpoint(tmp_path / "checkpoint.pt")
        assert state["epoch"] == 1 and state["config"]["lr"] == 0.1
        assert state["config"]["oversample"] is True
        # more epochs (the reason to resume) and another device are fine
        longer = TrainConfig(**{**config.to_dict(), "epochs": 3, "num_workers": 0})
        assert len(fit(longer, resume=True, **kwargs).history) == 3
        assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["epochs"] == 3

    def test_killed_process_resumes_to_same_weights(self, synth_tree, tmp_path: Path) -> None:
        root, _ = synth_tree
        args = ["train", "--data-root", str(root), "--task", "MIBC", "--protocol", "patient",
                "--fold", "1", "--epochs", "4", *TINY]
        killed = tmp_path / "killed"
        proc = subprocess.Popen([sys.executable, "-m", "breakhis.cli", *args, "--out", str(killed)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ckpt = killed / "checkpoint.pt"
        deadline = time.monotonic() + 90
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        assert load_checkpoint(ckpt)["epoch"] < 3
        assert not (killed / "test_metrics.json").exists()

        assert main([*args, "--out", str(killed), "--resume"]) == 0
        assert main([*args, "--out", str(tmp_path / "straight")]) == 0
        _assert_same_weights(ckpt, tmp_path / "straight" / "checkpoint.pt")
        a = json.loads((killed / "test_metrics.json").read_text())["metrics"]
        b = json.loads((tmp_path / "straight" / "test_metrics.json").read_text())["metrics"]
        assert a["confusion_matrix"] == b["confusion_matrix"]
        assert "resumed from" in (killed / "train.log").read_text()


class TestDistributed:
    def test_torchrun_two_cpu_processes_match_single_process(
        self, synth_tree, tmp_path: Path
    ) -> None:
        root, _ = synth_tree
        args = ["train", "--data-root", str(root), "--task", "MSFC", "--magnification", "100",
                "--protocol", "image", "--fold", "0", "--epochs", "2", *TINY, "--device", "cpu"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "breakhis.cli", *args, "--out", str(tmp_path / "ddp")],
            env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["world_size"] == 2
        assert main([*args, "--out", str(tmp_path / "single")]) == 0
        _assert_same_weights(tmp_path / "ddp" / "checkpoint.pt",
                             tmp_path / "single" / "checkpoint.pt", atol=1e-5)
        rows = [list(csv.DictReader((tmp_path / d / "metrics.csv").open()))
                for d in ("ddp", "single")]
        for r_ddp, r_single in zip(*rows):
            single_loss = float(r_single["train_loss"])
            assert float(r_ddp["train_loss"]) == pytest.approx(single_loss, abs=1e-5)
            assert float(r_ddp["val_loss"]) == pytest.approx(float(r_single["val_loss"]), abs=1e-5)


class TestCommands:
    def test_train_evaluate_predict(self, synth_tree, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
        root, meta = synth_tree
        run = tmp_path / "run"
        assert main(["train", "--data-root", str(root), "--task", "MSBC", "--magnification", "200",
                     "--protocol", "official", "--fold", "2", "--epochs", "2", *TINY,
                     "--out", str(run)]) == 0
        assert "run folder" in capsys.readouterr().out
        for name in ("checkpoint.pt", "train.log", "metrics.csv", "config.json",
                     "test_metrics.json", "test_metrics.md"):
            assert (run / name).is_file(), name
        trained = json.loads((run / "test_metrics.json").read_text())
        assert trained["protocol"]["protocol"] == "official" and trained["synthetic"] is True
        assert trained["task"]["magnification"] == 200
        assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 2

        assert main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--out",
                     str(tmp_path / "ev"), "--no-progress", "--device", "cpu"]) == 0
        again = json.loads((tmp_path / "ev" / "test_metrics.json").read_text())
        assert again["metrics"]["confusion_matrix"] == trained["metrics"]["confusion_matrix"]
        assert again["metrics"]["roc_auc"] == pytest.approx(trained["metrics"]["roc_auc"])

        images = root / meta["images_root"]
        out_csv = tmp_path / "pred.csv"
        assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), str(images),
                     "--out", str(out_csv), "--no-progress"]) == 0
        rows = list(csv.DictReader(out_csv.open()))
        assert len(rows) == meta["expected"]["images"] + 1  # the misnamed PNG is an image too
        assert "truncated" in capsys.readouterr().err
        for row in rows:
            p = float(row["prob_benign"]) + float(row["prob_malignant"])
            assert p == pytest.approx(1.0, abs=1e-5)
            assert row["predicted_label"] in ("benign", "malignant")

    def test_cv_writes_mean_and_std(self, synth_tree, tmp_path: Path) -> None:
        root, _ = synth_tree
        out = tmp_path / "cv"
        assert main(["cv", "--data-root", str(root), "--task", "MSBC", "--magnification", "40",
                     "--protocol", "patient", "--n-splits", "3", "--epochs", "1", *TINY,
                     "--out", str(out)]) == 0
        report = json.loads((out / "cv_metrics.json").read_text())
        accs = [f["metrics"]["accuracy"] for f in report["folds"]]
        assert len(accs) == 3
        assert report["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert report["summary"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
        assert all(f["protocol"]["patient_disjoint"] for f in report["folds"])
        assert "patient-level" in (out / "cv_metrics.md").read_text()

    def test_offline_imagenet_is_a_clear_error(self, synth_tree, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
        root, _ = synth_tree
        code = main(["train", "--data-root", str(root), "--backbone", "tiny", "--epochs", "1",
                     "--out", str(tmp_path / "r"), "--no-progress"])
        assert code == 2
        assert "--no-pretrained" in capsys.readouterr().err
