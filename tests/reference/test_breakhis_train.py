"""Training: sampler, checkpoints, kill-and-resume, DDP, and the whole CLI path.

Every run uses the synthetic tree and the ``tiny`` backbone, so it takes seconds on a CPU.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _disk import fill_the_disk
from torch import nn

from breakhis import train as train_module
from breakhis._files import SettingError
from breakhis.checkpoint import load_checkpoint, save_checkpoint
from breakhis.cli import main
from breakhis.data import index_breakhis
from breakhis.distributed import DistInfo
from breakhis.models import build_network
from breakhis.sampler import BalancedSampler
from breakhis.tasks import get_task
from breakhis.train import (
    CHECKPOINT_FORMAT,
    TrainConfig,
    fit,
    load_model,
    plateau_scheduler,
    rank_seed,
    sync_batchnorm,
)

pytest.importorskip("bilinearpool")

TINY = ["--backbone", "tiny", "--no-pretrained", "--input-size", "32", "--batch-size", "8",
        "--lr", "0.05", "--momentum", "0.9", "--plateau-patience", "1", "--no-progress"]


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

    def test_shuffle_shuffles_and_no_shuffle_keeps_the_order(self) -> None:
        targets = np.arange(24) % 2
        plain = [i for i, _ in BalancedSampler(targets, batch_size=8, oversample=False,
                                               shuffle=False, seed=2)]
        assert plain == list(range(24))
        shuffled = [i for i, _ in BalancedSampler(targets, batch_size=8, oversample=False,
                                                  shuffle=True, seed=2)]
        assert sorted(shuffled) == list(range(24)) and shuffled != sorted(shuffled)
        over = [i for i, _ in BalancedSampler(np.array([0] * 10 + [1] * 3), batch_size=4,
                                              shuffle=True, seed=2)]
        assert over != sorted(over) and len(over) == 20

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

    def test_rng_states_of_gpus_this_machine_lacks_are_left_out(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Resumed where fewer GPUs are visible, torch.cuda.set_rng_state_all failed on the
        first missing device (a checkpoint of a machine with 2 GPUs resumed on 1)."""
        from breakhis.checkpoint import capture_rng_state, restore_rng_state

        state = capture_rng_state()
        state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
        restored: list[tuple[int, int]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: pytest.fail("restores devices the machine lacks"))
        monkeypatch.setattr(torch.cuda, "set_rng_state",
                            lambda new, device="cuda": restored.append((int(new[0]), device)))
        restore_rng_state(state)
        assert restored == [(0, 0)]


class _Interrupt(Exception):
    pass


def _msbc40(root: Path, n: int | None = None) -> tuple[Any, list, np.ndarray]:
    """MSBC at 40X of the tree at ``root``: the task, its first ``n`` records and their targets."""
    task = get_task("MSBC", magnification=40)
    records = task.select(index_breakhis(root).records)[:n]
    return task, records, task.targets(records)


class TestResume:
    def test_ctrl_c_is_logged(self, synth_tree, tmp_path: Path) -> None:
        """A run stopped by Ctrl-C left a train.log that just stopped, like a crash."""
        root, _ = synth_tree
        task, records, y = _msbc40(root, 16)
        config = TrainConfig(head="fast-bcnn", backbone="tiny", weights=None, input_size=16,
                             epochs=2, batch_size=8, device="cpu")

        def ctrl_c(epoch: int, row: dict) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            fit(config, run_dir=tmp_path / "cut", epoch_callback=ctrl_c, train_records=records,
                train_targets=y, val_records=[], val_targets=[], classes=list(task.classes),
                progress=False)
        last = (tmp_path / "cut" / "train.log").read_text().strip().splitlines()[-1]
        assert "interrupted (KeyboardInterrupt)" in last and "--resume" in last, last

    def test_an_error_that_stops_the_run_is_logged(self, synth_tree, tmp_path: Path) -> None:
        """A torchrun run whose other process died left rank 0's train.log just stopping
        (helper-140): any error that ends the run is its last line."""
        root, _ = synth_tree
        task, records, y = _msbc40(root, 16)
        config = TrainConfig(head="plain", backbone="tiny", weights=None, input_size=16,
                             epochs=2, batch_size=8, device="cpu")

        def peer_died(epoch: int, row: dict) -> None:
            raise RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed "
                               "by peer [127.0.0.1]:4321\nmore lines")

        with pytest.raises(RuntimeError, match="Connection closed"):
            fit(config, run_dir=tmp_path / "cut", epoch_callback=peer_died, train_records=records,
                train_targets=y, val_records=[], val_targets=[], classes=list(task.classes),
                progress=False)
        last = (tmp_path / "cut" / "train.log").read_text().strip().splitlines()[-1]
        assert last.endswith("ERROR stopped by RuntimeError: [../third_party/gloo/transport/tcp/"
                             "pair.cc:534] Connection closed by peer [127.0.0.1]:4321"), last

    def test_interrupted_then_resumed_equals_uninterrupted(
        self, synth_tree, tmp_path: Path
    ) -> None:
        root, _ = synth_tree
        task, records, y = _msbc40(root)
        config = TrainConfig(head="fast-bcnn", backbone="tiny", weights=None, input_size=32,
                             epochs=3, batch_size=8, lr=0.05, momentum=0.9, plateau_patience=1,
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
        # epochs count from 1 in the log, as in its per-epoch lines ("epoch 1/3")
        log = (tmp_path / "cut" / "train.log").read_text()
        assert "after epoch 1 of 3" in log and "epoch 1/3" in log and "epoch 2/3" in log
        _assert_same_weights(full.checkpoint, resumed.checkpoint)
        strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full.history]
        assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]
        # momentum buffers and scheduler counters had to come back from the checkpoint
        state = load_checkpoint(resumed.checkpoint)
        assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3

    def test_resume_refuses_other_model(self, synth_tree, tmp_path: Path) -> None:
        root, _ = synth_tree
        task, records, y = _msbc40(root, 12)
        config = TrainConfig(head="plain", backbone="tiny", weights=None, input_size=16,
                             epochs=1, batch_size=4, device="cpu")
        fit(config, train_records=records, train_targets=y, classes=list(task.classes),
            run_dir=tmp_path, progress=False)
        other = TrainConfig(**{**config.to_dict(), "head": "fast-bcnn"})
        with pytest.raises(ValueError, match="checkpoint has head='plain'"):
            fit(other, train_records=records, train_targets=y, classes=list(task.classes),
                run_dir=tmp_path, resume=True, progress=False)
        # a checkpoint of another format: the message said what it expected, not what it found
        state = load_checkpoint(tmp_path / "checkpoint.pt")
        save_checkpoint({**state, "format": "other-v0"}, tmp_path / "checkpoint.pt")
        with pytest.raises(ValueError, match=rf"^cannot resume from '[^']*checkpoint\.pt': expected format "
                           rf"'{CHECKPOINT_FORMAT}', but got 'other-v0'; train afresh with --overwrite"):
            fit(config, train_records=records, train_targets=y, classes=list(task.classes),
                run_dir=tmp_path, resume=True, progress=False)

    def test_resume_takes_a_weights_file_spelled_otherwise(self, tmp_path: Path, monkeypatch) -> None:
        """--weights wdir/w.pt recorded, resumed with ./wdir/w.pt or its absolute path: the
        same file, refused as another setting (helper-150)."""
        from breakhis.train import resume_differences

        monkeypatch.chdir(tmp_path)
        (tmp_path / "wdir").mkdir()
        (tmp_path / "wdir" / "w.pt").write_bytes(b"weights")
        (tmp_path / "wdir" / "other.pt").write_bytes(b"weights")
        state = {"classes": ["a", "b"], "epoch": 0,
                 "config": _cfg(backbone="resnet18", weights="wdir/w.pt").to_dict()}

        def differences(weights: str) -> list[str]:
            return resume_differences(state, _cfg(backbone="resnet18", weights=weights), ["a", "b"])

        for same in ("./wdir/w.pt", str(tmp_path / "wdir" / "w.pt"), "wdir//w.pt"):
            assert differences(same) == [], same
        assert differences("wdir/other.pt") == ["checkpoint has weights='wdir/w.pt', this run 'wdir/other.pt'"]
        (difference,) = differences("imagenet")
        assert "weights='wdir/w.pt'" in difference

    def test_resume_refuses_other_training_options(self, synth_tree, tmp_path: Path) -> None:
        root, _ = synth_tree
        task, records, y = _msbc40(root, 12)
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
        # the start line counts the processes in words that agree with the number
        assert "(8 classes), 2 processes, device cpu" in (tmp_path / "ddp" / "train.log").read_text()
        assert "(8 classes), 1 process, device cpu" in (tmp_path / "single" / "train.log").read_text()
        rows = [list(csv.DictReader((tmp_path / d / "metrics.csv").open()))
                for d in ("ddp", "single")]
        for r_ddp, r_single in zip(*rows):
            single_loss = float(r_single["train_loss"])
            assert float(r_ddp["train_loss"]) == pytest.approx(single_loss, abs=1e-5)
            assert float(r_ddp["val_loss"]) == pytest.approx(float(r_single["val_loss"]), abs=1e-5)


    # torchrun itself for train; cv's refusal (the same check and error path, after its
    # own process group) is the in-process test below in the default run
    @pytest.mark.parametrize("command", ["train", pytest.param("cv", marks=pytest.mark.slow)])
    def test_batch_that_does_not_split_over_the_processes_is_refused_before_indexing(
        self, command: str, tmp_path: Path
    ) -> None:
        """It was refused after indexing and splitting (minutes on BreaKHis), a run folder
        made, by every process with the sampler's words ("num_replicas=2")."""
        missing = tmp_path / "no-data"  # empty: indexing it would be a different error
        missing.mkdir()
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "breakhis.cli", command, "--data-root", str(missing), *TINY, "--batch-size", "3",
             "--device", "cpu", "--out", str(tmp_path / "run")],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert run.returncode != 0
        assert (f"breakhis-repro {command} (rank 0 of 2): error: --batch-size must be a multiple of "
                "the 2 processes torchrun started (each takes an equal share of every global batch), "
                "but got 3") in run.stderr, run.stderr[-2000:]
        assert "num_replicas" not in run.stderr and not (tmp_path / "run").exists()

    @pytest.mark.parametrize("command", ["train", "cv"])
    def test_batch_that_does_not_split_is_refused_after_the_group_before_indexing(
        self, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The test above in this process, for both commands: rank 0 of a group of 2 as
        init_distributed gives it under torchrun (no second process to wait for), its
        group cleaned up, nothing indexed, no run folder."""
        from breakhis import distributed, experiments

        calls: list[str] = []
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")

        def init(device: str) -> DistInfo:
            calls.append("init")
            return DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))

        def indexed(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("indexed before the batch size was checked")

        monkeypatch.setattr(distributed, "init_distributed", init)
        monkeypatch.setattr(distributed, "cleanup_distributed", lambda: calls.append("cleanup"))
        for name in ("prepare_data", "run_fold", "run_cv"):
            monkeypatch.setattr(experiments, name, indexed)
        missing = tmp_path / "no-data"  # empty: indexing it would be a different error
        missing.mkdir()
        code = main([command, "--data-root", str(missing), *TINY, "--batch-size", "3", "--device", "cpu",
                     "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code != 0 and calls == ["init", "cleanup"], err
        assert (f"breakhis-repro {command} (rank 0 of 2): error: --batch-size must be a multiple of "
                "the 2 processes torchrun started (each takes an equal share of every global batch), "
                "but got 3") in err, err
        assert "num_replicas" not in err and not (tmp_path / "run").exists()

    def test_torchrun_cpu_validation_scores_the_saved_batchnorm_statistics(
        self, synth_tree, tmp_path: Path
    ) -> None:
        """Under gloo each process ends an epoch with the batch-norm statistics of its own
        share of the last batch: the validation loss in metrics.csv mixed two sets, neither
        all the checkpoint's (0.693 there against 0.689 for the saved model)."""
        from breakhis.dataset import ImageDataset, build_eval_transform
        from breakhis.experiments import _checkpoint_data
        from breakhis.train import checkpoint_normalization, load_model

        root, _ = synth_tree
        out = tmp_path / "bn"
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "breakhis.cli", "train", "--data-root", str(root), "--task", "MSBC",
             "--magnification", "40", "--protocol", "image", "--fold", "0", "--backbone", "resnet18",
             "--no-pretrained", "--head", "plain", "--input-size", "32", "--batch-size", "8",
             "--lr", "0.001", "--epochs", "1", "--val-fraction", "0.3", "--device", "cpu",
             "--no-progress", "--out", str(out)],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        model, state = load_model(out / "checkpoint.pt")
        _, data, _ = _checkpoint_data(out, state, None, progress=False)
        where = {data.relative_path(i): i for i in range(len(data.records))}
        val = [where[name] for name in state["extra"]["files"]["val"]]
        assert len(val) >= 3
        mean, std = checkpoint_normalization(state)
        images = ImageDataset([data.records[i] for i in val], data.targets[val],
                              build_eval_transform(32, mean=mean, std=std))
        with torch.no_grad():
            logits = model(torch.stack([images[i][0] for i in range(len(images))]))
        loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(data.targets[val])).item()
        logged = float(next(csv.DictReader((out / "metrics.csv").open()))["val_loss"])
        assert logged == pytest.approx(loss, abs=1e-5)


def _small_task(root: Path, n: int = 12) -> tuple[list, np.ndarray, list[str]]:
    task = get_task("MSBC", magnification=40)
    records = task.select(index_breakhis(root).records)[:n]
    return records, task.targets(records), list(task.classes)


def _cfg(**changes) -> TrainConfig:
    base = dict(head="plain", backbone="tiny", weights=None, input_size=16, epochs=1,
                batch_size=4, device="cpu")
    return TrainConfig(**{**base, **changes})


class TestPlateauSchedule:
    """``plateau_patience`` counts as Keras' ReduceLROnPlateau: the rate drops at the
    N-th epoch without an (absolute, 1e-4) improvement, not at the (N+1)-th."""

    def test_constant_val_loss_drops_the_rate_after_patience_epochs(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        records, y, classes = _small_task(synth_tree[0])
        monkeypatch.setattr(train_module, "_evaluate_loss",
                            lambda model, loader, device: (4.0, 2.0, 4.0))
        result = fit(_cfg(epochs=5, lr=0.1, plateau_patience=3),
                     train_records=records[::2], train_targets=y[::2],
                     val_records=records[1::2], val_targets=y[1::2], classes=classes,
                     run_dir=tmp_path, progress=False)
        assert [row["val_loss"] for row in result.history] == [1.0] * 5
        # epoch 0 sets the best; epochs 1, 2 and 3 do not improve: the rate drops after 3
        assert [row["lr"] for row in result.history] == pytest.approx(
            [0.1, 0.1, 0.1, 0.1, 0.01])

    def test_improvement_threshold_is_absolute(self) -> None:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = plateau_scheduler(optimizer, _cfg(plateau_patience=2))
        # decreases of 4e-5 are improvements relative to 0.1 (threshold 1e-5) but not
        # by the absolute 1e-4
        lrs = []
        for loss in (0.1, 0.09996, 0.09992):
            scheduler.step(loss)
            lrs.append(optimizer.param_groups[0]["lr"])
        assert lrs == pytest.approx([0.1, 0.1, 0.01])
        assert (scheduler.patience, scheduler.threshold_mode, scheduler.threshold) == (
            1, "abs", 1e-4)

    def test_patience_must_be_at_least_one(self) -> None:
        with pytest.raises(ValueError, match="plateau_patience must be >= 1 .*, but got 0"):
            _cfg(plateau_patience=0)
        # what older checkpoints could record (0: drop at the first epoch without
        # improvement) still loads, as the same schedule
        assert TrainConfig.from_dict({**_cfg().to_dict(), "plateau_patience": 0}
                                     ).plateau_patience == 1
        # and a checkpoint recording it can be resumed with 1 (the only value allowed now)
        state = {"config": {**_cfg().to_dict(), "plateau_patience": 0}, "epoch": 0}
        assert not [d for d in train_module.resume_differences(state, _cfg(plateau_patience=1), [])
                    if "plateau_patience" in d]

    def test_resume_by_another_number_of_processes_says_so(self, synth_tree, tmp_path: Path) -> None:
        """A run trained by 2 processes and resumed by 1 went on without a word, and the
        checkpoint then said world_size=1 only."""
        records, y, classes = _small_task(synth_tree[0])
        kwargs = dict(train_records=records, train_targets=y, classes=classes,
                      run_dir=tmp_path, progress=False)
        fit(_cfg(), **kwargs)
        ckpt = tmp_path / "checkpoint.pt"
        state = load_checkpoint(ckpt)
        state["world_size"] = 2  # as torchrun --nproc_per_node 2 wrote it
        save_checkpoint(state, ckpt)
        fit(_cfg(epochs=2), resume=True, **kwargs)
        assert ("epochs 1-1 were trained by 2 processes, the rest by 1 process: dropout masks (and, "
                "without SyncBatchNorm, batch-norm statistics) depend on the number of processes"
                ) in (tmp_path / "train.log").read_text()
        fit(_cfg(epochs=3), resume=True, **kwargs)  # by the count of the last epochs: no word
        assert (tmp_path / "train.log").read_text().count("were trained by") == 1

    def test_old_checkpoint_resumes_with_its_own_schedule(self, synth_tree,
                                                          tmp_path: Path) -> None:
        records, y, classes = _small_task(synth_tree[0])
        kwargs = dict(train_records=records, train_targets=y, classes=classes,
                      run_dir=tmp_path, progress=False)
        fit(_cfg(plateau_patience=3), **kwargs)
        fit(_cfg(plateau_patience=3, epochs=2), resume=True, **kwargs)
        log = tmp_path / "train.log"
        assert "older breakhis" not in log.read_text()
        ckpt = tmp_path / "checkpoint.pt"
        state = load_checkpoint(ckpt)
        assert (state["scheduler"]["patience"], state["scheduler"]["threshold_mode"]) == (
            2, "abs")
        state["scheduler"].update(patience=3, threshold_mode="rel")  # as written before
        save_checkpoint(state, ckpt)
        fit(_cfg(plateau_patience=3, epochs=3), resume=True, **kwargs)
        scheduler = load_checkpoint(ckpt)["scheduler"]
        assert (scheduler["patience"], scheduler["threshold_mode"]) == (3, "rel")
        assert ("its plateau schedule is kept, so that the run ends as it would have "
                "uninterrupted: the learning rate drops after 4 epochs without a relative "
                "improvement of 0.0001 (a new run: after 3 epochs, absolute 0.0001)"
                ) in log.read_text()


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


class TestSyncBatchnorm:
    CUDA_DDP = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cuda", 0))
    CPU_DDP = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))

    def test_ddp_on_cuda_converts_and_the_checkpoint_loads_plain(self) -> None:
        config = _cfg(backbone="resnet18", head="fast-bcnn")
        model = build_network(config.head, config.backbone, num_classes=2, weights=None)
        keys = list(model.state_dict())
        synced = sync_batchnorm(model, self.CUDA_DDP)
        kinds = {type(m) for m in synced.modules()}
        assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
        assert list(synced.state_dict()) == keys
        plain, _ = load_model({"format": CHECKPOINT_FORMAT, "config": config.to_dict(),
                               "classes": ["benign", "malignant"],
                               "model": synced.state_dict()})
        assert nn.SyncBatchNorm not in {type(m) for m in plain.modules()}
        for key, value in synced.state_dict().items():
            torch.testing.assert_close(plain.state_dict()[key], value, rtol=0, atol=0)

    @pytest.mark.parametrize("info", [
        DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0)),
        DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
    ])
    def test_one_process_is_left_alone(self, info: DistInfo,
                                       caplog: pytest.LogCaptureFixture) -> None:
        model = _bn_net()
        with caplog.at_level(logging.WARNING, logger="breakhis.train"):
            assert sync_batchnorm(model, info) is model
        assert type(model[1]) is nn.BatchNorm2d and not caplog.records

    def test_ddp_on_cpu_warns_on_the_main_process_only(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="breakhis.train"):
            model = _bn_net()
            assert sync_batchnorm(model, self.CPU_DDP) is model
            assert type(model[1]) is nn.BatchNorm2d
            other = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
            sync_batchnorm(_bn_net(), other)
            sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3)), self.CPU_DDP)  # no batch norm
        assert len(caplog.records) == 1
        assert "no SyncBatchNorm there, so each of the 2 processes normalises with the " \
               "statistics of its own half" in caplog.text


class _Recorder(nn.Module):
    """A small network with batch norm and dropout that keeps its dropout masks."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(32, 2)
        self.masks = masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.features(x))
        if self.training:
            self.masks.append(h.detach() != 0)
        return self.fc(h)


class TestPerProcessRandomness:
    def test_rank_seed(self) -> None:
        seeds = {rank_seed(s, e, r) for s in (0, 1) for e in range(3) for r in range(4)}
        assert len(seeds) == 24 and all(0 <= x < 2**63 for x in seeds)
        assert rank_seed(7, 2, 1) == rank_seed(7, 2, 1)

    def test_ddp_processes_draw_their_own_dropout_masks(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each DDP rank's training loop run alone (DDP wrapping and collectives are
        no-ops without a process group): the masks must differ between ranks, and
        repeat for the same rank; the main process warns about batch norm on CPU."""
        records, y, classes = _small_task(synth_tree[0], n=16)
        masks: list[torch.Tensor] = []
        monkeypatch.setattr(train_module, "_make_model", lambda *a, **k: _Recorder(masks))
        monkeypatch.setattr(train_module, "DistributedDataParallel",
                            lambda module, device_ids=None: module)

        def run(rank: int, folder: str) -> list[torch.Tensor]:
            masks.clear()
            info = DistInfo(rank=rank, world_size=2, local_rank=rank,
                            device=torch.device("cpu"))
            fit(_cfg(epochs=2, batch_size=8, dropout=0.5), train_records=records,
                train_targets=y, classes=classes, run_dir=tmp_path / folder,
                dist_info=info, progress=False)
            return list(masks)

        rank0, rank1, again = run(0, "r0"), run(1, "r1"), run(1, "r1b")
        assert len(rank0) == len(rank1) > 2 and rank0[0].shape == (4, 32)
        assert not torch.equal(rank0[0], rank1[0])
        assert all(torch.equal(a, b) for a, b in zip(rank1, again))
        log = (tmp_path / "r0" / "train.log").read_text()
        assert log.count("batch norm under DDP on cpu") == 1


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
        # A 200X checkpoint refuses the tree's other magnifications unless told otherwise.
        assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), str(images),
                     "--out", str(out_csv), "--no-progress"]) == 2
        assert "--any-magnification" in capsys.readouterr().err and not out_csv.exists()
        assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), str(images),
                     "--out", str(out_csv), "--no-progress", "--any-magnification"]) == 0
        rows = list(csv.DictReader(out_csv.open()))
        assert len(rows) == meta["expected"]["images"] + 1  # the misnamed PNG is an image too
        captured = capsys.readouterr()
        assert "truncated" in captured.err and "40X" in captured.out + captured.err
        for row in rows:
            p = float(row["prob_benign"]) + float(row["prob_malignant"])
            assert p == pytest.approx(1.0, abs=1e-5)
            assert row["predicted_label"] in ("benign", "malignant")

    def test_cv_writes_mean_and_std(self, synth_tree, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
        root, _ = synth_tree
        out = tmp_path / "cv"
        argv = ["cv", "--data-root", str(root), "--task", "MSBC", "--magnification", "40",
                "--protocol", "patient", "--n-splits", "3", "--epochs", "1", *TINY,
                "--out", str(out)]
        assert main(argv) == 0
        # each fold is announced, then its metrics, in the console program's own words
        err = capsys.readouterr().err
        for fold in range(3):
            start = err.index(f"fold {fold} ({fold + 1}/3) in {out / f'fold{fold}'}")
            assert err.index(f"fold {fold} ({fold + 1}/3): accuracy ", start) > start
        assert "epoch 1/1" in err and "reusing" not in err
        assert main([*argv, "--resume"]) == 0
        err = capsys.readouterr().err
        assert f"fold 1: reusing {out / 'fold1' / 'test_metrics.json'}" in err
        assert "fold 2 (3/3): accuracy " in err and "epoch 1/1" not in err
        report = json.loads((out / "cv_metrics.json").read_text())
        accs = [f["metrics"]["accuracy"] for f in report["folds"]]
        assert len(accs) == 3
        assert report["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert report["summary"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
        assert all(f["protocol"]["patient_disjoint"] for f in report["folds"])
        assert "patient-level" in (out / "cv_metrics.md").read_text()

    def test_console_logging_is_the_breakhis_logger_only(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The CLI configured the root logger at INFO: third-party loggers (huggingface_hub
        retrying offline) printed at INFO, and twice."""
        from breakhis import cli

        root_logger, ours = logging.getLogger(), logging.getLogger("breakhis")
        before = (root_logger.level, list(root_logger.handlers), ours.level, ours.propagate,
                  list(ours.handlers))
        cli._log_to_console(True)
        cli._log_to_console(True)  # once only
        try:
            assert (root_logger.level, root_logger.handlers) == before[:2]
            assert len(ours.handlers) == len(before[4]) + 1
            logging.getLogger("breakhis.train").info("epoch 1/3 from breakhis")
            logging.getLogger("huggingface_hub.utils").info("retrying in 8s")
        finally:
            cli._stop_logging_to_console()
        err = capsys.readouterr().err
        assert err.count("epoch 1/3 from breakhis") == 1 and "retrying" not in err
        assert (ours.level, ours.propagate, ours.handlers) == tuple(before[2:])

    def test_offline_imagenet_is_a_clear_error(self, synth_tree, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
        root, _ = synth_tree
        code = main(["train", "--data-root", str(root), "--backbone", "tiny", "--epochs", "1",
                     "--out", str(tmp_path / "r"), "--no-progress"])
        assert code == 2
        assert "--no-pretrained" in capsys.readouterr().err


def test_training_flags_reach_the_config() -> None:
    from breakhis.cli import _config, build_parser

    def config(*flags: str):
        return _config(build_parser().parse_args(["train", "--data-root", "x", *flags]))

    plain = config()
    assert plain.se_reduction is None and plain.augment and plain.oversample
    cfg = config("--se", "--no-augment", "--no-oversample", "--dropout", "0.25",
                 "--weight-decay", "0.001", "--momentum", "0.9", "--no-pretrained")
    assert cfg.se_reduction == 8 and not cfg.augment and cfg.rotation == 90 and not cfg.oversample
    assert cfg.dropout == 0.25 and cfg.weight_decay == 0.001 and cfg.momentum == 0.9 and cfg.weights is None
    assert config("--se-reduction", "4").se_reduction == 4
    assert config("--rotation", "30").rotation == 30
    assert config("--weights", "w.pt").weights == "w.pt"


def test_defaults_are_the_papers_recipe() -> None:
    """BREAKHIS.md: SGD at 0.1, batch 16, rate divided by 10 after 10 epochs without
    improvement, 10% shifts; rotation 90, 50 epochs and momentum 0 are ours."""
    from breakhis.cli import _config, build_parser

    cfg = TrainConfig()
    assert (cfg.batch_size, cfg.lr, cfg.plateau_factor, cfg.plateau_patience) == (16, 0.1, 0.1, 10)
    assert (cfg.shift, cfg.rotation, cfg.augment, cfg.oversample) == (0.1, 90.0, True, True)
    assert (cfg.input_size, cfg.epochs, cfg.momentum, cfg.weight_decay) == (224, 50, 0.0, 0.0)
    assert (cfg.head, cfg.backbone, cfg.weights) == ("fast-bcnn", "inception_v3", "imagenet")
    for command in ("train", "cv"):
        parsed = _config(build_parser().parse_args([command, "--data-root", "x"]))
        assert parsed == cfg, command


class TestAugmentationSettings:
    """``TrainConfig(augment=False, rotation=30)`` stored a rotation that no image got, and a
    resume with another rotation was refused over a value without effect."""

    @pytest.mark.parametrize("setting, value, message", [
        ("rotation", 30.0,
         "rotation must be left at its default 90.0 with augment=False, which draws no "
         "rotations (nor flips or shifts), but got 30.0; set augment=True to rotate, or leave "
         "rotation out"),
        ("shift", 0.2,
         "shift must be left at its default 0.1 with augment=False, which draws no shifts "
         "(nor flips or rotations), but got 0.2; set augment=True to shift, or leave shift "
         "out"),
    ])
    def test_refused_without_augmentation(self, setting: str, value: float,
                                          message: str) -> None:
        with pytest.raises(SettingError) as info:
            _cfg(augment=False, **{setting: value})
        assert str(info.value) == message and info.value.setting == setting
        assert getattr(_cfg(**{setting: value}), setting) == value  # augmenting: used
        assert not _cfg(augment=False).augment

    def test_stored_configs_read_as_the_defaults(self) -> None:
        """A config stored with augment=False and another rotation or shift (before they
        were refused) reads with the defaults, which had the same (no) effect, so that its
        checkpoint evaluates and resumes."""
        stored = {**_cfg(augment=False).to_dict(), "rotation": 30.0, "shift": 0.2}
        config = TrainConfig.from_dict(stored)
        assert (config.augment, config.rotation, config.shift) == (False, 90.0, 0.1)
        state = {"config": stored, "classes": ["a", "b"], "epoch": 0}
        assert train_module.resume_differences(state, _cfg(augment=False, epochs=2),
                                               ["a", "b"]) == []
        # augmenting, they act: compared as before
        stored = {**_cfg().to_dict(), "rotation": 30.0}
        assert TrainConfig.from_dict(stored).rotation == 30.0
        assert train_module.resume_differences({**state, "config": stored}, _cfg(epochs=2),
                                               ["a", "b"]) == [
            "checkpoint has rotation=30.0, this run 90.0"]


def test_se_config_builds_se_blocks() -> None:
    from bilinearpool import SEBlock

    from breakhis.cli import _config, build_parser

    cfg = _config(build_parser().parse_args(
        ["train", "--data-root", "x", "--backbone", "resnet18", "--no-pretrained", "--se", "--head", "plain"]))
    model = train_module._make_model(cfg, 2, weights=None)
    assert sum(isinstance(m, SEBlock) for m in model.modules()) == 8


class TestInputNormalization:
    """inception_resnet_v2 (timm) got ImageNet's mean and std, but its pretrained
    weights expect inputs in [-1, 1] (mean = std = 0.5), as the paper's Keras
    preprocessing gives."""

    @pytest.mark.parametrize("head", ["plain", "bcnn"])
    def test_inception_resnet_v2_gets_timms_values(self, head: str) -> None:
        # read from the built model (one stream, or two), not from the name: a
        # features_only inception_resnet_v2 without weights builds in well under a second
        pytest.importorskip("timm")
        from PIL import Image

        from breakhis.dataset import build_eval_transform
        from breakhis.models import input_normalization

        mean, std = input_normalization(
            build_network(head, "inception_resnet_v2", num_classes=2, weights=None))
        assert mean == std == (0.5, 0.5, 0.5)
        white = Image.new("RGB", (12, 12), (255, 255, 255))
        x = build_eval_transform(16, mean=mean, std=std)(white)
        torch.testing.assert_close(x, torch.ones(3, 16, 16))
        assert input_normalization(build_network(
            "plain", "timm:inception_resnet_v2.tf_in1k", num_classes=2, weights=None,
        )) == (mean, std)

    @pytest.mark.parametrize("backbone", ["tiny", "inception_v3", "resnet50"])
    def test_torchvision_and_tiny_get_imagenet_values(self, backbone: str) -> None:
        # torchvision's inception_v3 converts ImageNet-normalised inputs itself
        # (transform_input): converting them here too would do it twice
        from breakhis.dataset import IMAGENET_MEAN, IMAGENET_STD
        from breakhis.models import input_normalization

        model = build_network("plain", backbone, num_classes=2, weights=None)
        assert input_normalization(model) == (IMAGENET_MEAN, IMAGENET_STD)

    def test_training_uses_the_built_models_values(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from breakhis.dataset import IMAGENET_MEAN, IMAGENET_STD

        records, y, classes = _small_task(synth_tree[0], n=8)
        half = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

        def with_cfg(config, n, weights):
            model = build_network("plain", "tiny", num_classes=n)
            model.backbone.body.pretrained_cfg = half  # as a timm backbone carries it
            return model

        monkeypatch.setattr(train_module, "_make_model", with_cfg)
        kwargs = dict(train_records=records, train_targets=y, classes=classes,
                      run_dir=tmp_path, progress=False)
        result = fit(_cfg(), **kwargs)
        assert result.normalization == ((0.5,) * 3, (0.5,) * 3)
        assert load_checkpoint(tmp_path / "checkpoint.pt")["normalization"] == {
            "mean": [0.5] * 3, "std": [0.5] * 3}
        # a resumed run keeps the values it started with, whatever the model says now
        monkeypatch.undo()
        resumed = fit(_cfg(epochs=2), resume=True, **kwargs)
        assert resumed.normalization == ((0.5,) * 3, (0.5,) * 3)
        assert (IMAGENET_MEAN, IMAGENET_STD) != resumed.normalization
        assert "older breakhis" not in (tmp_path / "train.log").read_text()

    def test_stored_values_round_trip_through_the_checkpoint(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from breakhis.dataset import IMAGENET_MEAN, IMAGENET_STD
        from breakhis.experiments import (
            DataSpec,
            checkpoint_records,
            evaluate_checkpoint,
            run_fold,
        )
        from breakhis.plots import make_figures
        from breakhis.predict import predict_to_csv
        from breakhis.train import checkpoint_normalization, predict_probs

        pytest.importorskip("captum")
        root, _ = synth_tree
        half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        # tiny gets ImageNet's values; other values show that the stored ones are used
        monkeypatch.setattr(train_module, "input_normalization", lambda *a, **k: half)
        used = []
        real_train_transform = train_module.build_train_transform

        def spy(*args, **kwargs):
            used.append((tuple(kwargs["mean"]), tuple(kwargs["std"])))
            return real_train_transform(*args, **kwargs)

        monkeypatch.setattr(train_module, "build_train_transform", spy)
        spec = DataSpec(str(root), task="MSBC", magnification=40, n_splits=3)
        config = TrainConfig(head="plain", backbone="tiny", weights=None, input_size=16,
                             epochs=1, batch_size=8, device="cpu")
        report = run_fold(spec, config, 0, tmp_path / "run", progress=False)
        assert used == [half]
        ckpt = tmp_path / "run" / "checkpoint.pt"
        state = load_checkpoint(ckpt)
        assert state["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
        assert json.loads((tmp_path / "run" / "config.json").read_text())[
            "normalization"] == state["normalization"]
        assert checkpoint_normalization(state) == half
        assert report["normalization"] == state["normalization"]

        monkeypatch.undo()  # evaluation, prediction and figures read the checkpoint
        model, _ = load_model(ckpt)
        records, _, source = checkpoint_records(ckpt)
        expected = predict_probs(model, records, input_size=16, mean=half[0], std=half[1])
        imagenet = predict_probs(model, records, input_size=16)
        assert not np.allclose(expected, imagenet)
        again = evaluate_checkpoint(ckpt, out_dir=tmp_path / "ev", device="cpu", progress=False)
        assert again["normalization"] == state["normalization"]
        assert again["metrics"]["confusion_matrix"] == report["metrics"]["confusion_matrix"]
        out = tmp_path / "p.csv"
        predict_to_csv(ckpt, [r.path for r in records], out, progress=False)
        rows = list(csv.DictReader(out.open()))
        np.testing.assert_allclose([float(r["prob_malignant"]) for r in rows],
                                   expected[:, 1], rtol=0, atol=1e-6)
        figures = make_figures(ckpt, records, tmp_path / "fig", source=source,
                               gradcam_images=0)
        assert figures["normalization"] == state["normalization"]

        # a checkpoint written before the values were stored was trained with ImageNet's
        del state["normalization"]
        assert checkpoint_normalization(state) == (IMAGENET_MEAN, IMAGENET_STD)


class TestInputSize:
    @pytest.mark.parametrize("backbone", ["inception_v3", "inception_resnet_v2",
                                          "timm:inception_resnet_v2.tf_in1k"])
    def test_below_a_known_minimum_is_refused_at_once(self, backbone: str) -> None:
        """--backbone inception_v3 --input-size 32 failed at the first batch with torch's
        kernel-size error."""
        with pytest.raises(ValueError, match=rf"input_size must be >= 75 for backbone "
                           rf"'{backbone}', but got 32"):
            TrainConfig(backbone=backbone, input_size=32)
        assert TrainConfig(backbone=backbone, input_size=75).input_size == 75

    def test_below_the_transforms_minimum_is_refused_by_the_config(self) -> None:
        """Sizes 1-7 passed the config and failed only in the transforms, after a fresh
        run had removed an earlier run's outputs."""
        with pytest.raises(ValueError, match=r"input_size must be >= 8, but got 7"):
            TrainConfig(backbone="tiny", weights=None, input_size=7)
        assert TrainConfig(backbone="tiny", weights=None, input_size=8).input_size == 8

    def test_cli_says_so_before_indexing(self, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
        # an empty data folder: indexing it would say that it holds no image
        assert main(["train", "--data-root", str(tmp_path), "--backbone",
                     "inception_v3", "--input-size", "32", "--no-pretrained"]) == 2
        # named as the command line names it
        assert ("error: --input-size must be >= 75 for backbone 'inception_v3', but got 32"
                in capsys.readouterr().err)

    def test_other_backbones_are_tried_once_before_training(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from bilinearpool import build_model

        root, _ = synth_tree
        task = get_task("MSBC", magnification=40)
        records = task.select(index_breakhis(root).records)[:8]
        # a backbone whose 9x9 kernel does not fit an 8-pixel input
        monkeypatch.setattr(train_module, "_make_model", lambda config, n, weights: build_model(
            "plain", nn.Conv2d(3, 4, kernel_size=9), num_classes=n))
        config = TrainConfig(head="plain", backbone="tiny", weights=None, input_size=8,
                             epochs=1, batch_size=4, device="cpu")
        with pytest.raises(ValueError, match=r"backbone 'tiny' cannot take input_size 8: a "
                           r"forward pass at 8x8 fails \(.*\); use a larger --input-size"):
            fit(config, train_records=records, train_targets=task.targets(records),
                classes=list(task.classes), run_dir=tmp_path, progress=False)
        assert not (tmp_path / "checkpoint.pt").exists()

    def test_batch_norm_on_one_value_per_channel_is_refused_before_training(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A batch of one image whose map shrinks to 1x1 before a batch-norm layer: the trial
        pass (eval mode) went through, and training failed at its first batch with torch's
        "Expected more than 1 value per channel when training"."""
        from bilinearpool import build_model

        records, y, classes = _small_task(synth_tree[0], n=8)
        net = nn.Sequential(nn.Conv2d(3, 4, kernel_size=8, stride=8), nn.BatchNorm2d(4), nn.ReLU())
        monkeypatch.setattr(train_module, "_make_model", lambda config, n, weights: build_model(
            "plain", net, num_classes=n))
        kwargs = dict(train_records=records, train_targets=y, classes=classes, progress=False)
        with pytest.raises(ValueError, match=r"backbone 'tiny' at input_size 8 gives batch-norm layer "
                           r"'backbone.body.1' one value per channel per image \(a 1x1 map\), .* each batch "
                           r"normalises 1 image there; use a "
                           r"larger --batch-size \(per process\) or a larger --input-size"):
            fit(_cfg(input_size=8, batch_size=1), run_dir=tmp_path / "a", **kwargs)
        assert not (tmp_path / "a" / "checkpoint.pt").exists()
        # two images per batch, or a 2x2 map, train
        fit(_cfg(input_size=8, batch_size=2), run_dir=tmp_path / "b", **kwargs)
        fit(_cfg(input_size=16, batch_size=1), run_dir=tmp_path / "c", **kwargs)
        assert (tmp_path / "b" / "checkpoint.pt").exists() and (tmp_path / "c" / "checkpoint.pt").exists()

    def test_every_process_stops_when_the_main_one_refuses(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Only the main process tried the model: under torchrun the others ended with
        gloo's "Connection closed by peer" when it refused. The refusal is shared now."""
        records, y, classes = _small_task(synth_tree[0], n=8)
        shared: list[list[float]] = []

        def main_refused(values: list[float], device: torch.device) -> list[float]:
            shared.append(values)
            return [1.0]  # the sum over processes: rank 0's refusal

        monkeypatch.setattr(train_module, "all_reduce_sum", main_refused)
        other = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"stopped before training: the main process \(rank 0\) "
                           r"refused these settings in its trial forward pass"):
            fit(_cfg(batch_size=8), train_records=records, train_targets=y, classes=classes,
                run_dir=tmp_path, dist_info=other, progress=False)
        assert shared == [[0.0]]  # this process itself found nothing
        assert not (tmp_path / "checkpoint.pt").exists()

    def test_norm_batch_is_the_process_share_unless_synced(self) -> None:
        config = _cfg(batch_size=8)
        cpu = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
        cuda = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cuda", 0))
        one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        assert [train_module._norm_batch(config, i) for i in (cpu, cuda, one)] == [2, 8, 8]

    def test_trial_forward_runs_on_the_main_process_on_every_start(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The trial forward pass ran on every DDP process; it runs on the main one, on
        resumes too (resumed with more processes, a batch-norm layer may see one image)."""
        records, y, classes = _small_task(synth_tree[0], n=8)
        calls: list[int] = []
        real_check = train_module._check_forward
        monkeypatch.setattr(train_module, "_check_forward",
                            lambda model, config, norm_batch: calls.append(1) or real_check(model, config, norm_batch))
        monkeypatch.setattr(train_module, "DistributedDataParallel",
                            lambda module, device_ids=None: module)
        kwargs = dict(train_records=records, train_targets=y, classes=classes, progress=False)
        fit(_cfg(), run_dir=tmp_path / "a", **kwargs)
        assert len(calls) == 1
        fit(_cfg(epochs=2), run_dir=tmp_path / "a", resume=True, **kwargs)
        assert len(calls) == 2
        other = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
        fit(_cfg(batch_size=8), run_dir=tmp_path / "b", dist_info=other, **kwargs)
        assert len(calls) == 2


def _run_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and p.name != "train.log"}


class TestSettingsChecked:
    """Options outside their range passed the config: a fresh run removed the earlier
    run's outputs, then failed at the first epoch (a negative seed, worker count or
    rotation, a NaN rotation), or after it (a seed whose seed + epoch overflowed torch's
    generator)."""

    @pytest.mark.parametrize("changes, message", [
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63 - 1\] .*but got -1"),
        ({"seed": 2**64 - 1}, r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
        ({"seed": 1.5}, r"seed must be an integer in \[0, 2\*\*63 - 1\] .*but got 1.5"),
        ({"num_workers": -1}, r"num_workers must be >= 0 .*but got -1"),
        ({"rotation": -5.0}, r"rotation must be a finite number >= 0 .*but got -5.0"),
        ({"rotation": float("nan")}, r"rotation must be a finite number >= 0 .*but got nan"),
        ({"rotation": float("inf")}, r"rotation must be a finite number >= 0 .*but got inf"),
        ({"shift": 1.0}, r"shift must be a number in \[0, 1\) .*but got 1.0"),
        ({"shift": float("nan")}, r"shift must be a number in \[0, 1\) .*but got nan"),
        ({"momentum": -0.1}, r"momentum must be a number in \[0, 1\) .*but got -0.1"),
        ({"momentum": float("nan")}, r"momentum must be a number in \[0, 1\)"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\) .*but got 1.0"),
        ({"weight_decay": -1e-4}, r"weight_decay must be a finite number >= 0"),
        ({"weight_decay": float("inf")}, r"weight_decay must be a finite number >= 0"),
        ({"se_reduction": 0}, r"se_reduction must be >= 1 .*but got 0"),
        ({"epochs": 2.5}, r"epochs must be an integer >= 1, but got 2.5"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, but got 0"),
        ({"lr": float("inf")}, r"lr must be a positive number, but got inf"),
        ({"plateau_factor": float("nan")}, r"plateau_factor must be in \(0, 1\), but got nan"),
        ({"plateau_patience": True}, r"plateau_patience must be an integer, but got True"),
    ])
    def test_out_of_range_settings_are_refused(self, changes: dict, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            _cfg(**changes)

    def test_range_ends_are_accepted_and_train(self, synth_tree, tmp_path: Path) -> None:
        assert train_module.SEED_MAX == 2**63 - 1
        config = _cfg(seed=train_module.SEED_MAX, epochs=2, num_workers=0, rotation=0.0,
                      shift=0.0, momentum=0.0, weight_decay=0.0, se_reduction=None)
        records, y, classes = _small_task(synth_tree[0], n=8)
        fit(config, train_records=records, train_targets=y, classes=classes,
            run_dir=tmp_path, progress=False)
        assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1

    def test_sampler_refuses_a_negative_seed(self) -> None:
        with pytest.raises(ValueError, match="seed must be an integer >= 0, but got -1"):
            BalancedSampler([0, 1], batch_size=2, seed=-1)

    @pytest.mark.parametrize("option", [["--seed", "-1"], ["--num-workers", "-1"],
                                        ["--rotation", "-5"], ["--rotation", "nan"],
                                        ["--seed", "18446744073709551615"]])
    def test_cli_refuses_them_and_keeps_the_earlier_run(
        self, synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list
    ) -> None:
        root, _ = synth_tree
        args = ["train", "--data-root", str(root), "--task", "MSBC", "--magnification", "40",
                "--epochs", "2", *TINY, "--input-size", "16", "--out", str(tmp_path)]
        assert main(args) == 0
        before = _run_files(tmp_path)
        assert {"checkpoint.pt", "test_metrics.json"} <= set(before)
        capsys.readouterr()
        assert main([*args, *option]) == 2
        err = capsys.readouterr().err
        assert f"error: {option[0]} must be" in err and "Traceback" not in err
        assert _run_files(tmp_path) == before


class TestCheckpointFiles:
    def test_fresh_and_resumed_runs_remove_stale_temporaries(self, synth_tree,
                                                            tmp_path: Path) -> None:
        """A run killed during torch.save left .checkpoint.pt.XXXXXXXX.tmp in its folder
        for good."""
        records, y, classes = _small_task(synth_tree[0], n=8)
        kwargs = dict(train_records=records, train_targets=y, classes=classes,
                      run_dir=tmp_path, progress=False)
        tmp_path.mkdir(exist_ok=True)
        stale = [".checkpoint.pt.k2x_9qzt.tmp", ".metrics.csv.ab12cd34.tmp"]
        kept = [".checkpoint.pt.tmp", ".checkpoint.pt.short.tmp", "notes.tmp",
                "checkpoint.pt.k2x_9qzt.tmp", ".other.pt.k2x_9qzt.tmp"]
        for name in stale + kept:
            (tmp_path / name).write_bytes(b"half a checkpoint")
        fit(_cfg(), **kwargs)
        names = {p.name for p in tmp_path.iterdir()}
        assert not names & set(stale) and set(kept) <= names
        log = (tmp_path / "train.log").read_text()
        assert ("the temporary files of writes cut short (a run killed while saving; the "
                "files they were to replace are intact): .checkpoint.pt.k2x_9qzt.tmp, "
                ".metrics.csv.ab12cd34.tmp") in log
        (tmp_path / stale[0]).write_bytes(b"half a checkpoint")
        fit(_cfg(epochs=2), resume=True, **kwargs)
        assert not (tmp_path / stale[0]).exists()
        assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1

    @pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
    def test_files_get_the_umasks_permissions(self, synth_tree, tmp_path: Path,
                                              umask: int, mode: int) -> None:
        """checkpoint.pt was always 0600 (mkstemp's mode survived the rename), so others
        could not read a shared run."""
        from breakhis.evaluate import write_report

        old = os.umask(umask)
        try:
            save_checkpoint({"epoch": 0}, tmp_path / "c.pt")
            records, y, classes = _small_task(synth_tree[0], n=8)
            fit(_cfg(), train_records=records, train_targets=y, classes=classes,
                run_dir=tmp_path / "run", progress=False)
            write_report({"title": "t"}, tmp_path / "run", "test_metrics")
        finally:
            os.umask(old)
        paths = [tmp_path / "c.pt", *(tmp_path / "run" / n for n in (
            "checkpoint.pt", "metrics.csv", "config.json", "test_metrics.json",
            "test_metrics.md"))]
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in paths} == {
            p.name: oct(mode) for p in paths}

    def test_a_failed_write_keeps_the_old_file_and_names_the_path(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "c.pt"
        save_checkpoint({"epoch": 1}, path)

        def full(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError, match="No space left on device") as info:
            save_checkpoint({"epoch": 2}, path)
        assert info.value.filename == str(path)
        monkeypatch.undo()
        assert load_checkpoint(path)["epoch"] == 1
        assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]

    @pytest.mark.parametrize("room", [0, 100, 4096])
    def test_a_full_disk_during_torch_save_names_the_path(
        self, room: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A disk that filled up part-way through torch.save gave RuntimeError('[enforce
        fail at inline_container.cc:672] . unexpected pos 64 vs 0'), with neither the
        reason nor the path; the OSError(ENOSPC) was only in its __context__."""
        from breakhis.cli import _os_error_text

        path = tmp_path / "c.pt"
        save_checkpoint({"epoch": 1}, path)
        fill_the_disk(monkeypatch, room)
        with pytest.raises(OSError) as info:
            save_checkpoint({"epoch": 2, "w": torch.ones(4096)}, path)
        monkeypatch.undo()
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
        assert _os_error_text(info.value) == f"No space left on device: {str(path)!r}"
        assert load_checkpoint(path)["epoch"] == 1
        assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


class _Counter:
    """``F`` of breakhis.train that counts the training batches' correct predictions."""

    def __init__(self) -> None:
        self.correct = self.count = 0

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        self.correct += int((logits.argmax(1) == y).sum())
        self.count += len(y)
        return torch.nn.functional.cross_entropy(logits, y, **kwargs)


def test_train_accuracy_is_the_share_of_correct_training_predictions(
    synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records, y, classes = _small_task(synth_tree[0], n=12)
    counter = _Counter()
    monkeypatch.setattr(train_module, "F", counter)
    result = fit(_cfg(epochs=1), train_records=records, train_targets=y, classes=classes,
                 run_dir=tmp_path, progress=False)
    (row,) = result.history
    # every over-sampled item of the epoch, each counted once
    assert counter.count == len(BalancedSampler(y, batch_size=4)) > 0
    assert 0 < counter.correct < counter.count  # a rate that the count matters to
    assert row["train_accuracy"] == pytest.approx(counter.correct / counter.count)


class _Poison:
    """``F`` of breakhis.train with a cross-entropy that turns NaN once ``on`` is set."""

    def __init__(self) -> None:
        self.on = False

    def cross_entropy(self, *args, **kwargs) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        return loss * float("nan") if self.on else loss


class TestDivergence:
    """A NaN loss was never noticed: every epoch trained on NaN weights and saved them,
    and evaluation then failed in scikit-learn ("Input contains NaN")."""

    def _fit(self, synth_tree, run_dir: Path, config: TrainConfig, **kwargs):
        records, y, classes = _small_task(synth_tree[0], n=12)
        return fit(config, train_records=records[::2], train_targets=y[::2],
                   val_records=records[1::2], val_targets=y[1::2], classes=classes,
                   run_dir=run_dir, progress=False, **kwargs)

    def test_nan_training_loss_stops_and_keeps_the_last_good_checkpoint(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        poison = _Poison()
        monkeypatch.setattr(train_module, "F", poison)

        def after(epoch: int, row: dict) -> None:
            poison.on = True  # from the second epoch

        with pytest.raises(train_module.TrainingDivergedError,
                           match=r"training diverged: the training loss of epoch 2/3 is nan, "
                           r"with --lr 0.1; .*checkpoint.pt' keeps epoch 1, the last "
                           r"whose losses and weights were finite .* lower --lr than 0.1"):
            self._fit(synth_tree, tmp_path, _cfg(epochs=3), epoch_callback=after)
        state = load_checkpoint(tmp_path / "checkpoint.pt")
        assert state["epoch"] == 0 and len(state["history"]) == 1
        assert all(torch.isfinite(t).all() for t in state["model"].values()
                   if t.is_floating_point())
        assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) == 1
        assert "ERROR training diverged: the training loss of epoch 2/3" in (
            tmp_path / "train.log").read_text()

    def test_resume_writes_the_metrics_row_a_stop_after_the_checkpoint_left_out(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Stopped between saving the last epoch's checkpoint and writing metrics.csv, the
        file kept one row less for good: --resume had no epoch left to train (helper-150)."""
        write = train_module._write_metrics_csv
        calls = []

        def stopped_at_the_second(history, path):
            calls.append(len(history))
            if len(calls) == 2:
                raise KeyboardInterrupt
            write(history, path)

        monkeypatch.setattr(train_module, "_write_metrics_csv", stopped_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            self._fit(synth_tree, tmp_path, _cfg(epochs=2))
        assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
        assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) == 1
        monkeypatch.setattr(train_module, "_write_metrics_csv", write)
        self._fit(synth_tree, tmp_path, _cfg(epochs=2), resume=True)
        rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
        assert [int(r["epoch"]) for r in rows] == [0, 1]

    def test_nan_validation_loss_stops_too(self, synth_tree, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        losses = iter([(1.0, 1.0, 2.0), (float("nan"), 1.0, 2.0)])
        monkeypatch.setattr(train_module, "_evaluate_loss", lambda *a: next(losses))
        with pytest.raises(train_module.TrainingDivergedError,
                           match="the validation loss of epoch 2/2 is nan"):
            self._fit(synth_tree, tmp_path, _cfg(epochs=2))
        assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 0

    def test_weights_that_blew_up_in_the_last_step_are_not_saved(
        self, synth_tree, tmp_path: Path
    ) -> None:
        """The losses of an epoch are those before each step: a last step that makes the
        weights NaN shows in no loss of that epoch (and no validation loss without
        validation images)."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        records, y, classes = _small_task(synth_tree[0], n=8)
        per_epoch = len(BalancedSampler(y, batch_size=4)) // 4
        steps = []

        def blow_up(optimizer, args, kwargs) -> None:
            steps.append(1)
            if len(steps) == 2 * per_epoch:  # the last step of the second epoch
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("inf"))

        handle = register_optimizer_step_post_hook(blow_up)
        try:
            with pytest.raises(train_module.TrainingDivergedError,
                               match="the weights are no longer finite after epoch 2/3"):
                fit(_cfg(epochs=3), train_records=records, train_targets=y, classes=classes,
                    run_dir=tmp_path, progress=False)
        finally:
            handle.remove()
        assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 0

    @pytest.mark.parametrize("other", ["nan loss", "nan weights"])
    def test_ddp_processes_stop_together(self, synth_tree, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, other: str) -> None:
        """The decision is taken on the values summed over processes: a process whose own
        loss and weights are finite stops when another's are not (simulated: the sum
        adds the other process's values)."""
        monkeypatch.setattr(train_module, "DistributedDataParallel",
                            lambda module, device_ids=None: module)

        def with_other_rank(values, device):
            theirs = list(values)
            if len(values) == 4:  # training: loss, correct, count, weights not finite
                theirs[0 if other == "nan loss" else 3] = (
                    float("nan") if other == "nan loss" else 1.0)
            return [a + b for a, b in zip(values, theirs)]

        monkeypatch.setattr(train_module, "all_reduce_sum", with_other_rank)
        info = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
        records, y, classes = _small_task(synth_tree[0], n=8)
        with pytest.raises(train_module.TrainingDivergedError, match="epoch 1/1"):
            fit(_cfg(batch_size=8), train_records=records, train_targets=y, classes=classes,
                run_dir=tmp_path, dist_info=info, progress=False)

    def test_cli_says_so_in_one_line(self, synth_tree, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
        root, _ = synth_tree
        assert main(["train", "--data-root", str(root), "--task", "MSBC", "--magnification",
                     "40", "--epochs", "3", *TINY, "--head", "plain", "--lr", "1e20",
                     "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "error: training diverged: the training loss of epoch 1/3 is nan" in err
        assert "Input contains NaN" not in err and "Traceback" not in err
        assert not (tmp_path / "test_metrics.json").exists()


class TestOutFolder:
    """--out under a file, or one that cannot be created or written, ended in a raw
    traceback (OSError), after the data were indexed."""

    def test_out_under_a_file_is_refused_before_indexing(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from breakhis import experiments

        indexed = []
        monkeypatch.setattr(experiments, "prepare_data", lambda *a, **k: indexed.append(1))
        (tmp_path / "somefile").write_text("mine")
        for command in ("train", "cv"):
            assert main([command, "--data-root", str(tmp_path), *TINY,
                         "--out", str(tmp_path / "somefile" / "x")]) == 2
            err = capsys.readouterr().err
            assert (f"{command}: error: --out expects a run folder, but "
                    f"{str(tmp_path / 'somefile')!r}, a folder above") in err
            assert "Traceback" not in err
        assert not indexed and (tmp_path / "somefile").read_text() == "mine"

    def test_out_that_cannot_be_created_or_written(
        self, synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from breakhis import _files as files_module
        from breakhis import experiments

        root, _ = synth_tree
        trained = []
        monkeypatch.setattr(experiments, "fit", lambda *a, **k: trained.append(1))
        args = ["--data-root", str(root), "--task", "MSBC", "--magnification", "40", *TINY]
        if Path("/proc").is_dir():  # mkdir fails there, even as root
            for command in ("train", "cv"):
                assert main([command, *args, "--out", "/proc/breakhis-run"]) == 2
                assert ("error: expected a run folder that can be created, but creating "
                        "'/proc/breakhis-run' failed") in capsys.readouterr().err

        def refuse(*a, **k):
            raise PermissionError(13, "Permission denied", k.get("dir"))

        monkeypatch.setattr(files_module.tempfile, "mkstemp", refuse)
        assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
        assert (f"error: expected a run folder that can be written, but writing a file into "
                f"{str(tmp_path / 'run')!r} failed: Permission denied"
                ) in capsys.readouterr().err
        assert not trained

    def test_an_os_error_while_writing_is_an_error_line(
        self, synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch
    ) -> None:
        root, _ = synth_tree

        def full(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        assert main(["train", "--data-root", str(root), "--task", "MSBC", "--magnification",
                     "40", "--epochs", "1", *TINY, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == (
            f"breakhis-repro train: error: No space left on device: "
            f"{str(tmp_path / 'config.json')!r}")
