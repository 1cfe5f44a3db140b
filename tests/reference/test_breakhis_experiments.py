"""Experiments: data specs, fold runs, resume and cv-resume checks, re-evaluation.

Runs use the synthetic tree's 40X binary task (35 images), the ``tiny`` backbone and
16-pixel inputs, so that each trains in well under a second.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breakhis import experiments as experiments_module
from breakhis import train as train_module
from breakhis._files import SettingError
from breakhis.checkpoint import load_checkpoint, save_checkpoint
from breakhis.data import index_breakhis
from breakhis.cli import main
from breakhis.evaluate import PREDICTIONS_FILE
from breakhis.experiments import (
    DataSpec,
    check_resume,
    checkpoint_records,
    evaluate_checkpoint,
    prepare_data,
    run_cv,
    run_fold,
)
from breakhis.plots import results_rows, results_table
from breakhis.synthetic import is_synthetic
from breakhis.train import TrainConfig

pytest.importorskip("bilinearpool")


def _config(**changes) -> TrainConfig:
    base = dict(head="plain", backbone="tiny", weights=None, input_size=16, epochs=1,
                batch_size=8, device="cpu")
    return TrainConfig(**{**base, **changes})


def _spec(root: Path, **changes) -> DataSpec:
    base = dict(task="MSBC", magnification=40, protocol="patient", n_splits=3)
    if changes.get("protocol") == "official":
        del base["n_splits"]  # the fold tables give the folds: refused there
    return DataSpec(str(root), **{**base, **changes})


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 20, 3), 128, np.uint8)).save(path)


def _folder_with_patients(data: Path) -> Path:
    """An image folder of two classes, 6 images each, 3 patients of 2 images per class,
    and ``patients.csv`` naming them."""
    rows = ["path,patient"]
    for cls in ("normal", "tumour"):
        for i in range(6):
            _png(data / cls / f"img{i}.png")
            rows.append(f"{cls}/img{i}.png,{cls}{i // 2}")
    (data / "patients.csv").write_text("\n".join(rows) + "\n")
    return data


@pytest.fixture
def tree_copy(synth_tree, tmp_path: Path) -> Path:
    """A private copy of the synthetic tree, for tests that delete images."""
    root, _ = synth_tree
    return Path(shutil.copytree(root, tmp_path / "data"))


class TestDataSpec:
    def test_paths_are_made_absolute(self, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        spec = DataSpec("data", image_folder=True, patients_csv="p.csv", protocol="image")
        assert spec.data_root == str(tmp_path.resolve() / "data")
        assert spec.patients_csv == str(tmp_path.resolve() / "p.csv")
        assert DataSpec.from_dict(spec.to_dict()) == spec

    @pytest.mark.parametrize("fraction", [-0.1, float("nan"), float("inf"), 1.0, 1.5])
    def test_val_fraction_outside_0_1_is_an_error(self, fraction: float) -> None:
        # a negative or NaN share was silently read as 0 (no validation)
        with pytest.raises(ValueError, match=r"val_fraction must be a number in \[0, 1\) "
                           rf".*but got {fraction}"):
            DataSpec("data", val_fraction=fraction)
        assert DataSpec("data", val_fraction=0).val_fraction == 0

    @pytest.mark.parametrize("n_splits", [1, 0, -3, 2.5, True, "5"])
    def test_n_splits_below_2_or_not_an_integer_is_an_error(self, n_splits: object) -> None:
        # was accepted, and refused by scikit-learn only once the data were indexed
        with pytest.raises(SettingError) as info:
            DataSpec("data", n_splits=n_splits)
        assert str(info.value) == ("n_splits must be an integer >= 2 (folds of protocols "
                                   f"'image' and 'patient'), but got {n_splits!r}")
        assert info.value.setting == "n_splits"
        assert DataSpec("data", n_splits=2).n_splits == 2
        # with protocol official no n_splits is taken: said so, not a range it does not use
        # (nor "use protocol 'patient' for 1 folds")
        with pytest.raises(SettingError, match=r"^n_splits must be left at its default 5 with "
                           r"protocol 'official'.*use protocol 'patient' or 'image'$"):
            DataSpec("data", protocol="official", n_splits=n_splits)

    def test_cli_val_fraction_is_checked(self, synth_tree, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
        root, _ = synth_tree
        assert main(["train", "--data-root", str(root), "--val-fraction", "-0.2",
                     "--backbone", "tiny", "--no-pretrained", "--input-size", "16",
                     "--out", str(tmp_path / "run"), "--no-progress"]) == 2
        assert "error: --val-fraction must be a number in [0, 1)" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()

    def test_folds_file_needs_official_protocol(self) -> None:
        with pytest.raises(ValueError, match="used by protocol 'official' only, but protocol "
                           "is 'patient'"):
            DataSpec("data", folds_file=("dsfold1.txt",))
        assert DataSpec("data", protocol="official", folds_file=("dsfold1.txt",)).folds_file

    @pytest.mark.parametrize("settings, setting, message", [
        (dict(image_folder=True, magnification=40), "magnification",
         "magnification must be None with image_folder=True, which takes every image of its "
         "class folders (a magnification selects BreaKHis images, for tasks MSBC and MSFC), "
         "but got 40; leave it out, or set image_folder=False for BreaKHis data"),
        (dict(image_folder=True, task="MSBC"), "task",
         "task must be left at its default 'MIBC' with image_folder=True, whose class folders "
         "are the classes, but got 'MSBC'; leave it out, or set image_folder=False for "
         "BreaKHis data"),
        (dict(patients_csv="p.csv"), "patients_csv",
         "patients_csv must be None without image_folder=True (BreaKHis file names give the "
         "patients; the CSV is read for image folders only), but got 'p.csv'; set "
         "image_folder=True, or leave it out"),
        (dict(protocol="official", n_splits=3), "n_splits",
         "n_splits must be left at its default 5 with protocol 'official', whose folds are "
         "its fold tables' (one per table), but got 3; leave it out, or use protocol "
         "'patient' or 'image' for 3 folds"),
        (dict(protocol="official", val_fraction=0, split_seed=3), "split_seed",
         "split_seed must be left at its default 0 with protocol 'official' and "
         "val_fraction 0, which draw nothing (the fold tables give the folds and no "
         "validation images are held out), but got 3; leave it out, or hold out validation "
         "images (val_fraction > 0)"),
    ])
    def test_settings_without_effect_are_refused(self, settings: dict, setting: str,
                                                 message: str) -> None:
        """They were accepted and ignored (an image folder's magnification even named
        the default run folder)."""
        with pytest.raises(SettingError) as info:
            DataSpec("data", **settings)
        assert str(info.value) == message and info.value.setting == setting

    def test_the_same_settings_where_they_act(self) -> None:
        assert DataSpec("data", task="MSBC", magnification=40).magnification == 40
        assert DataSpec("data", image_folder=True, patients_csv="p.csv").patients_csv
        assert DataSpec("data", n_splits=3, split_seed=3, val_fraction=0).n_splits == 3
        # official: the split seed draws the validation images
        assert DataSpec("data", protocol="official", split_seed=3).split_seed == 3
        assert DataSpec("data", protocol="official", val_fraction=0).n_splits == 5

    def test_specs_stored_with_them_read_as_the_defaults(self) -> None:
        """Checkpoints written before these were refused may record them: they read with
        the defaults, which had the same (no) effect."""
        stored = {**DataSpec("data", protocol="official", val_fraction=0).to_dict(),
                  "n_splits": 3, "split_seed": 7, "patients_csv": "/p.csv",
                  "patients_csv_sha256": "0" * 64}
        spec = DataSpec.from_dict(stored)
        assert (spec.n_splits, spec.split_seed, spec.patients_csv) == (5, 0, None)
        stored = {**DataSpec("data", image_folder=True).to_dict(), "magnification": 40,
                  "task": "MSFC"}
        assert (DataSpec.from_dict(stored).magnification, DataSpec.from_dict(stored).task) \
            == (None, "MIBC")
        # where they act, they are kept
        stored = DataSpec("data", task="MSBC", magnification=40, n_splits=3, split_seed=7,
                          val_fraction=0).to_dict()
        assert DataSpec.from_dict(stored) == DataSpec(**stored)


class TestPrepareData:
    def test_image_folder_patient_protocol_needs_patients(self, tmp_path: Path) -> None:
        for cls in ("normal", "tumour"):
            for i in range(3):
                _png(tmp_path / cls / f"img{i}.png")
        with pytest.raises(ValueError, match="protocol 'patient' needs the patient of every "
                           "image.*--patients-csv"):
            prepare_data(DataSpec(str(tmp_path), image_folder=True, n_splits=2))
        data = prepare_data(DataSpec(str(tmp_path), image_folder=True, protocol="image",
                                     n_splits=2))
        assert not any(s.patient_disjoint for s in data.splits)

    def test_patients_csv_leaving_images_without_patient(self, tmp_path: Path) -> None:
        rows = ["path,patient"]
        for cls in ("normal", "tumour"):
            for i in range(6):
                _png(tmp_path / "data" / cls / f"img{i}.png")
                if i < 5:  # img5: no row; img0, img1: blank cells
                    rows.append(f"{cls}/img{i}.png,{'' if i < 2 else f'{cls}{i // 2}'}")
        (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
        spec = dict(image_folder=True, patients_csv=str(tmp_path / "p.csv"), n_splits=2)
        with pytest.raises(ValueError, match=r"protocol 'patient' needs the patient of every "
                           r"image, but 6 of 12 images have none"):
            prepare_data(DataSpec(str(tmp_path / "data"), **spec))
        data = prepare_data(DataSpec(str(tmp_path / "data"), protocol="image", **spec))
        unknown = [i for i, r in enumerate(data.records) if r.patient is None]
        assert len(unknown) == 6  # one group each, never one shared "" group
        assert len(set(data.groups[unknown].tolist())) == 6

    def test_official_without_tables_says_where_it_looked(self, kaggle_tree) -> None:
        # the Kaggle tree's Folds.csv lies above BreaKHis_v1: not searched from there
        root, _ = kaggle_tree
        inner = root / "BreaKHis_v1"
        with pytest.raises(ValueError, match=r"needs the fold tables .* but none lie in '.*"
                           r"BreaKHis_v1' or up to 3 folder levels below it .* --folds-file"):
            prepare_data(_spec(inner, protocol="official"))
        data = prepare_data(_spec(inner, protocol="official",
                                  folds_file=(str(root / "Folds.csv"),)))
        assert [s.fold for s in data.splits] == [1, 2, 3, 4, 5]

    def test_official_folds_are_the_tables_numbers(self, synth_tree, tmp_path: Path) -> None:
        root, _ = synth_tree
        spec = _spec(root, protocol="official", folds_file=(str(root / "dsfold3.txt"),))
        data = prepare_data(spec)
        assert [s.fold for s in data.splits] == [3]
        with pytest.raises(ValueError, match=r"fold must be one of \[3\] \(the fold tables' "
                           r"own numbers\), but got 0"):
            run_fold(spec, _config(), 0, tmp_path / "run", data=data, progress=False)
        report = run_fold(spec, _config(), 3, tmp_path / "run", data=data, progress=False)
        assert report["fold"] == 3 and report["protocol"]["fold"] == 3
        assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["extra"]["fold"] == 3

    def test_one_class_is_an_error(self, tmp_path: Path) -> None:
        folder = tmp_path / "folder"
        for i in range(4):
            _png(folder / "tumour" / f"img{i}.png")
        _png(folder / ".ipynb_checkpoints" / "img0.png")  # hidden: not a second class
        with pytest.raises(ValueError, match=r"at least two class folders with images, but "
                           r"found only \['tumour'\]"):
            prepare_data(DataSpec(str(folder), image_folder=True, protocol="image"))
        breakhis = tmp_path / "breakhis" / "BreaKHis_v1/histology_slides/breast/benign/SOB"
        for i in range(4):
            _png(breakhis / "adenosis/SOB_B_A_14-1/40X" / f"SOB_B_A-14-1-40-00{i}.png")
        with pytest.raises(ValueError, match=r"task MIBC needs images of at least two of its "
                           r"classes \['benign', 'malignant'\], but found only \['benign'\]"):
            prepare_data(DataSpec(str(tmp_path / "breakhis"), protocol="image"))


class TestRunFold:
    def test_records_files_and_data_issues(self, synth_tree, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
        root, _ = synth_tree
        spec = _spec(root)
        with caplog.at_level(logging.WARNING, logger="breakhis.train"):
            report = run_fold(spec, _config(), 0, tmp_path, progress=False)
        issues = report["data_issues"]
        assert issues["skipped_by_reason"] == {"not an image": 2, "name outside grammar": 1,
                                               "unreadable image": 1}
        assert issues["skipped_examples"]["unreadable image"][0].endswith("-999.png")
        assert any("14-13412" in w for w in issues["warnings"])
        assert "4 files under" in caplog.text and "unreadable image: 1" in caplog.text
        assert "unreadable image: 1" in (tmp_path / "train.log").read_text()
        extra = load_checkpoint(tmp_path / "checkpoint.pt")["extra"]
        files = extra["files"]
        assert extra["data"]["data_root"] == str(root.resolve())
        data = prepare_data(spec)
        assert files["test"] == [data.relative_path(i) for i in data.splits[0].test]
        assert sorted(files["train"] + files["val"]) == sorted(
            data.relative_path(i) for i in data.splits[0].train)
        assert "files" not in json.loads((tmp_path / "config.json").read_text())["extra"]

    def test_report_records_every_training_setting(self, synth_tree, tmp_path: Path) -> None:
        root, _ = synth_tree
        config = _config(momentum=0.5, weight_decay=1e-4, dropout=0.25, rotation=30.0)
        report = run_fold(_spec(root, val_fraction=0.2), config, 0, tmp_path, progress=False)
        assert report["model"] == {**config.to_dict(), "val_fraction": 0.2}
        again = evaluate_checkpoint(tmp_path / "checkpoint.pt", out_dir=tmp_path / "ev",
                                    device="cpu", progress=False)
        assert again["model"] == report["model"]

    def test_fresh_run_removes_what_an_earlier_run_left(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A fresh fold in a used folder removed nothing: a stale report stayed beside
        the new checkpoint until (and unless) the new run finished."""
        root, _ = synth_tree
        spec = _spec(root)
        data = prepare_data(spec)
        run_fold(spec, _config(lr=0.1), 0, tmp_path, data=data, progress=False)
        (tmp_path / "figures").mkdir()
        for name in ("roc.png", "figures.json"):
            (tmp_path / "figures" / name).write_text("old")
        (tmp_path / "notes.txt").write_text("mine")
        (tmp_path / "figures" / "mine.png").write_text("mine")
        outputs = ["checkpoint.pt", "metrics.csv", "test_metrics.json", "test_metrics.md",
                   "test_predictions.csv", "figures/roc.png", "figures/figures.json"]
        assert all((tmp_path / name).is_file() for name in outputs)

        seen = {}

        def killed_at_the_first_save(*args, **kwargs):
            seen["files"] = [name for name in outputs if (tmp_path / name).exists()]
            raise KeyboardInterrupt

        monkeypatch.setattr(train_module, "save_checkpoint", killed_at_the_first_save)
        with pytest.raises(KeyboardInterrupt):
            run_fold(spec, _config(lr=0.05), 0, tmp_path, data=data, progress=False)
        assert seen["files"] == []  # removed before the first checkpoint
        assert any(line.split(" WARNING ")[-1].startswith("fresh run in")
                   and "test_metrics.json" in line and "figures/roc.png" in line
                   for line in (tmp_path / "train.log").read_text().splitlines())
        assert (tmp_path / "notes.txt").is_file() and (tmp_path / "figures" / "mine.png").is_file()

        monkeypatch.undo()
        (tmp_path / "test_metrics.json").write_text("{}")
        report = run_fold(spec, _config(lr=0.05), 0, tmp_path, data=data, progress=False)
        assert report["model"]["lr"] == 0.05
        assert "removed what an earlier run left there: test_metrics.json" in (
            tmp_path / "train.log").read_text()
        # a resumed run keeps its folder
        run_fold(spec, _config(lr=0.05, epochs=2), 0, tmp_path, data=data, resume=True,
                 progress=False)
        assert (tmp_path / "notes.txt").is_file()
        assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1

    @pytest.mark.parametrize("failure", ["weights file missing", "input size too small"])
    def test_fresh_run_that_cannot_start_keeps_the_earlier_run(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
    ) -> None:
        """A fresh fold removed an earlier run's checkpoint and reports before training
        built its model: when building failed (weights missing or not downloadable, an
        input size the backbone cannot take), nothing replaced them."""
        from bilinearpool import build_model
        from torch import nn

        root, _ = synth_tree
        spec = _spec(root)
        data = prepare_data(spec)
        run_fold(spec, _config(), 0, tmp_path, data=data, progress=False)
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()
                  if p.is_file() and p.name != "train.log"}
        assert {"checkpoint.pt", "test_metrics.json", "test_predictions.csv"} <= set(before)
        if failure == "weights file missing":
            config = _config(backbone="resnet18", weights=str(tmp_path / "missing.pth"))
            with pytest.raises(FileNotFoundError, match="missing.pth"):
                run_fold(spec, config, 0, tmp_path, data=data, progress=False)
        else:
            # a backbone whose 9x9 kernel does not fit an 8-pixel input
            monkeypatch.setattr(train_module, "_make_model", lambda config, n, weights: (
                build_model("plain", nn.Conv2d(3, 4, kernel_size=9), num_classes=n)))
            with pytest.raises(ValueError, match="cannot take input_size 8"):
                run_fold(spec, _config(input_size=8), 0, tmp_path, data=data, progress=False)
        after = {p.name: p.read_bytes() for p in tmp_path.iterdir()
                 if p.is_file() and p.name != "train.log"}
        assert after == before
        assert "removed what an earlier run left" not in (tmp_path / "train.log").read_text()

    def test_report_records_its_checkpoint_and_epochs(self, synth_tree, tmp_path: Path) -> None:
        from breakhis.train import checkpoint_identity

        root, _ = synth_tree
        report = run_fold(_spec(root), _config(epochs=2), 0, tmp_path, progress=False)
        state = load_checkpoint(tmp_path / "checkpoint.pt")
        assert report["epochs_trained"] == 2
        assert report["checkpoint"] == checkpoint_identity(state)
        assert report["checkpoint"]["epoch"] == 1
        saved = json.loads((tmp_path / "test_metrics.json").read_text())
        assert saved["checkpoint"] == checkpoint_identity(state)

    def test_unfinished_checkpoint_is_reported_as_such(self, synth_tree,
                                                       tmp_path: Path) -> None:
        """evaluate scored a checkpoint cut short as if it had trained every epoch."""
        root, _ = synth_tree
        run_fold(_spec(root), _config(), 0, tmp_path / "run", progress=False)
        ckpt = tmp_path / "run" / "checkpoint.pt"
        state = load_checkpoint(ckpt)
        state["config"]["epochs"] = 5  # as a run of 5 epochs killed after the first
        save_checkpoint(state, ckpt)
        with pytest.warns(UserWarning, match="trained 1 of its 5 epochs"):
            report = evaluate_checkpoint(ckpt, out_dir=tmp_path / "ev", device="cpu",
                                         progress=False)
        assert report["epochs_trained"] == 1 and report["model"]["epochs"] == 5
        assert json.loads((tmp_path / "ev" / "test_metrics.json").read_text())[
            "epochs_trained"] == 1
        assert results_rows([tmp_path / "ev"])[0]["epochs_trained"] == 1
        assert "random init, 1 of 5 ep, lr 0.1" in results_table([tmp_path / "ev"])
        # the Markdown said nothing of it (helper-140); a finished run's says its count
        md = (tmp_path / "ev" / "test_metrics.md").read_text()
        assert "- epochs trained: 1 of 5 (**unfinished**: a run cut short or still training)" in md
        assert "- epochs trained: 1 of 1\n" in (tmp_path / "run" / "test_metrics.md").read_text()

    def test_report_is_written_after_its_predictions(self, synth_tree, tmp_path: Path,
                                                      monkeypatch) -> None:
        """An evaluation cut short after the report (Ctrl-C, a full disk) left a
        test_metrics.json beside missing or older predictions, which --resume reused."""
        root, _ = synth_tree
        run_fold(_spec(root), _config(), 0, tmp_path / "run", progress=False)

        def cut_short(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(experiments_module, "write_predictions", cut_short)
        with pytest.raises(KeyboardInterrupt):
            evaluate_checkpoint(tmp_path / "run" / "checkpoint.pt", out_dir=tmp_path / "ev",
                                device="cpu", progress=False)
        assert not (tmp_path / "ev" / "test_metrics.json").exists()

    def test_resume_refuses_another_fold(self, synth_tree, tmp_path: Path) -> None:
        root, _ = synth_tree
        spec = _spec(root)
        data = prepare_data(spec)
        run_fold(spec, _config(), 0, tmp_path, data=data, progress=False)
        with pytest.raises(ValueError, match=r"cannot resume .*checkpoint has fold=0, this run "
                           r"1;.*files\.test=") as info:
            run_fold(spec, _config(epochs=2), 1, tmp_path, data=data, resume=True,
                     progress=False)
        assert "protocol.fold=0" in str(info.value)
        for other in (_spec(root, protocol="image"), _spec(root, split_seed=1),
                      _spec(root, task="MSFC")):
            with pytest.raises(ValueError, match="cannot resume"):
                run_fold(other, _config(epochs=2), 0, tmp_path, resume=True, progress=False)
        assert load_checkpoint(tmp_path / "checkpoint.pt")["extra"]["fold"] == 0
        # the same fold with more epochs continues
        report = run_fold(spec, _config(epochs=2), 0, tmp_path, data=data, resume=True,
                          progress=False)
        assert report["fold"] == 0 and load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


class TestRecordedImages:
    def test_evaluate_uses_the_recorded_test_images(self, tree_copy: Path,
                                                    tmp_path: Path) -> None:
        spec = _spec(tree_copy, protocol="image")
        run_fold(spec, _config(), 0, tmp_path / "run", progress=False)
        ckpt = tmp_path / "run" / "checkpoint.pt"
        files = load_checkpoint(ckpt)["extra"]["files"]
        (tree_copy / files["train"][0]).unlink()  # the data change after training
        report = evaluate_checkpoint(ckpt, out_dir=tmp_path / "ev", device="cpu",
                                     progress=False)
        with (tmp_path / "ev" / PREDICTIONS_FILE).open(newline="") as handle:
            tested = [Path(row["path"]).relative_to(tree_copy.resolve()).as_posix()
                      for row in csv.DictReader(handle)]
        assert tested == files["test"] and report["metrics"]["images"] == len(files["test"])
        assert not set(tested) & set(files["train"] + files["val"])
        assert report["protocol"]["train_images"] == len(files["train"]) + len(files["val"])
        with pytest.raises(ValueError, match="1 are not among the task's images"):
            checkpoint_records(ckpt, split="train")  # figures of the training images

    def test_data_root_at_another_level_of_the_same_tree_finds_the_images(
        self, synth_tree, tmp_path: Path
    ) -> None:
        """A run indexed at the tree's top and evaluated with --data-root .../BreaKHis_v1
        (or the folder above the top) refused every recorded image as "not among the
        task's images there now", and advised to pass --data-root."""
        root, meta = synth_tree
        top = tmp_path / "above" / "data"
        shutil.copytree(root, top)
        run = tmp_path / "run"
        run_fold(_spec(top), _config(), 0, run, progress=False)
        ckpt = run / "checkpoint.pt"
        expected, _, _ = checkpoint_records(ckpt, split="test")
        assert expected
        deeper = top / meta["images_root"]
        assert deeper != top
        for data_root in (deeper, tmp_path / "above"):
            records, _, _ = checkpoint_records(ckpt, split="test", data_root=str(data_root))
            assert [r.path for r in records] == [r.path for r in expected]
        # the contents are checked there too: another image under a test image's name is
        # refused (it was scored: the recorded names were looked up among the paths now)
        test_file = load_checkpoint(ckpt)["extra"]["files"]["test"][0]
        _other_pixels(top / test_file)
        for data_root in (deeper, tmp_path / "above"):
            with pytest.raises(ValueError, match=r"but the files of those names under .* hold other images"):
                checkpoint_records(ckpt, split="test", data_root=str(data_root))
        with pytest.raises(ValueError, match="hold other images"):
            checkpoint_records(ckpt, split="test")
        # two copies of the data below the root given: which one is meant is not guessed
        shutil.copytree(top, tmp_path / "above" / "copy")
        with pytest.raises(ValueError, match="two copies of the data set"):
            checkpoint_records(ckpt, split="test", data_root=str(tmp_path / "above"))

    def test_missing_recorded_image_is_an_error(self, tree_copy: Path, tmp_path: Path) -> None:
        spec = _spec(tree_copy)
        run_fold(spec, _config(), 1, tmp_path, progress=False)
        ckpt = tmp_path / "checkpoint.pt"
        files = load_checkpoint(ckpt)["extra"]["files"]
        records, _, _ = checkpoint_records(ckpt, split="train")
        assert sorted(r.path.relative_to(tree_copy.resolve()).as_posix() for r in records) \
            == sorted(files["train"] + files["val"])
        gone = files["test"][0]
        (tree_copy / gone).unlink()
        with pytest.raises(ValueError, match=rf"1 are not among the task's images.*{gone}"):
            evaluate_checkpoint(ckpt, out_dir=tmp_path / "ev", device="cpu", progress=False)
        with pytest.raises(ValueError, match="not drawn again"):
            checkpoint_records(ckpt, split="test")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class TestRecordedImagesDecoding:
    """A saved run's images are decoded, not the whole data folder again (evaluate and
    figures indexed and decoded every image under the root: about 5 ms per BreaKHis PNG,
    40 s for the release, against a test set of a third of it)."""

    @pytest.fixture
    def run(self, tree_copy: Path, tmp_path: Path) -> tuple[Path, Path, dict]:
        run_fold(_spec(tree_copy, protocol="image"), _config(), 0, tmp_path / "run",
                 progress=False)
        ckpt = tmp_path / "run" / "checkpoint.pt"
        return tree_copy, ckpt, load_checkpoint(ckpt)["extra"]["files"]

    @staticmethod
    def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
        from breakhis import data as data_module

        decoded: list[str] = []
        read, read_and_hash = data_module.read_image_size, data_module._size_and_digest

        def spy(path, *, verify=True):
            if verify and isinstance(path, (str, os.PathLike)):  # not a file read whole, below
                decoded.append(Path(path).as_posix())
            return read(path, verify=verify)

        def hash_spy(path):
            decoded.append(Path(path).as_posix())
            return read_and_hash(path)

        monkeypatch.setattr(data_module, "read_image_size", spy)
        monkeypatch.setattr(data_module, "_size_and_digest", hash_spy)
        return decoded

    def test_evaluate_decodes_only_the_test_images(self, run, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        root, ckpt, files = run
        decoded = self._spy(monkeypatch)
        report = evaluate_checkpoint(ckpt, out_dir=tmp_path / "ev", device="cpu",
                                     progress=False)
        assert report["metrics"]["images"] == len(files["test"])
        assert sorted(Path(p).relative_to(root.resolve()).as_posix() for p in decoded) \
            == sorted(files["test"])
        decoded.clear()
        records, _, _ = checkpoint_records(ckpt, split="train")
        assert sorted(Path(p).relative_to(root.resolve()).as_posix() for p in decoded) \
            == sorted(files["train"] + files["val"])
        assert len(records) == len(decoded)

    def test_evaluate_refuses_an_unwritable_report_folder_first(
        self, run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """evaluate loaded the model, indexed the data and predicted every test image, then
        failed on its first write with a bare 'Operation not permitted: .tmp' path."""
        _, ckpt, _ = run

        def not_now(*args, **kwargs):
            raise AssertionError("the checkpoint was loaded before the folder was tried")

        monkeypatch.setattr(experiments_module, "load_model", not_now)
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        with pytest.raises(ValueError, match=re.escape(str(blocker / "ev"))):
            evaluate_checkpoint(ckpt, out_dir=blocker / "ev", device="cpu", progress=False)

    def test_a_run_indexed_without_verify_decodes_nothing(
        self, tree_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        run_fold(_spec(tree_copy, verify=False), _config(), 0, tmp_path, progress=False)
        decoded = self._spy(monkeypatch)
        checkpoint_records(tmp_path / "checkpoint.pt", split="all")
        assert decoded == []

    def test_a_test_image_that_no_longer_decodes_is_an_error(self, run,
                                                             tmp_path: Path) -> None:
        root, ckpt, files = run
        _truncate(root / files["test"][1])
        with pytest.raises(ValueError, match=rf"expected the {len(files['test'])} test images "
                           rf"recorded .*but 1 no longer does .*{files['test'][1]}.*restore it from"):
            evaluate_checkpoint(ckpt, out_dir=tmp_path / "ev", device="cpu", progress=False)
        assert not (tmp_path / "ev").exists()
        _truncate(root / files["train"][0])
        with pytest.raises(ValueError, match=rf"but 1 no longer does .*{files['train'][0]}"):
            checkpoint_records(ckpt, split="train")

    def test_all_leaves_out_images_that_do_not_decode(self, run) -> None:
        root, ckpt, files = run
        everything, _, _ = checkpoint_records(ckpt, split="all")
        _truncate(root / files["train"][0])
        with pytest.warns(UserWarning, match=rf"1 image .*could not be decoded and is "
                          rf"left out, as training's index left it out.*{files['train'][0]}"):
            records, targets, _ = checkpoint_records(ckpt, split="all")
        assert len(records) == len(targets) == len(everything) - 1
        assert (root / files["train"][0]).resolve() not in {r.path for r in records}
        state = load_checkpoint(ckpt)
        state["extra"]["data"]["strict"] = True
        from breakhis.data import UnreadableImageError

        with pytest.raises(UnreadableImageError, match=files["train"][0]):
            checkpoint_records(state, split="all")


class TestCvResume:
    def test_a_fresh_cv_stopped_midway_can_be_resumed(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # before: the folds the fresh run had not reached still held the replaced run's
        # checkpoint, which --resume refused (other settings); --overwrite retrained all
        root, _ = synth_tree
        spec = _spec(root, n_splits=2)
        run_cv(spec, _config(lr=0.1), tmp_path, progress=False)
        real = experiments_module.run_fold

        def stop_at_fold_1(spec, config, fold, *args, **kwargs):
            if fold == 1:
                raise KeyboardInterrupt
            return real(spec, config, fold, *args, **kwargs)

        monkeypatch.setattr(experiments_module, "run_fold", stop_at_fold_1)
        with pytest.raises(KeyboardInterrupt):
            run_cv(spec, _config(lr=0.05), tmp_path, progress=False)
        assert not (tmp_path / "fold1" / "checkpoint.pt").exists()  # the lr=0.1 run is gone
        monkeypatch.undo()
        summary = run_cv(spec, _config(lr=0.05), tmp_path, resume=True, progress=False)
        assert summary["summary"]["accuracy"]["n"] == 2
        for fold in (0, 1):
            state = load_checkpoint(tmp_path / f"fold{fold}" / "checkpoint.pt")
            assert state["config"]["lr"] == 0.05

    def test_reuses_only_folds_made_with_the_same_settings(self, synth_tree,
                                                           tmp_path: Path) -> None:
        root, _ = synth_tree
        spec = _spec(root, n_splits=2)
        run_cv(spec, _config(), tmp_path, folds=[0], progress=False)
        done = tmp_path / "fold0" / "test_metrics.json"
        before = done.read_text()
        with pytest.raises(ValueError, match="cannot reuse fold 0 .*checkpoint has "
                           "head='plain', this run 'fast-bcnn'"):
            run_cv(spec, _config(head="fast-bcnn"), tmp_path, resume=True, progress=False)
        with pytest.raises(ValueError, match="cannot reuse fold 0 .*checkpoint has "
                           "data.val_fraction=0.1, this run 0.2"):
            run_cv(_spec(root, n_splits=2, val_fraction=0.2), _config(), tmp_path,
                   resume=True, progress=False)
        assert not (tmp_path / "fold1").exists()
        # a kill between the report's two files (JSON first, before): the Markdown gone or
        # older; the reused fold gets it back from the JSON (helper-140)
        md = done.with_suffix(".md")
        right = md.read_text()
        md.unlink()
        summary = run_cv(spec, _config(), tmp_path, resume=True, progress=False)
        assert done.read_text() == before  # reused, not retrained
        assert md.read_text() == right
        assert summary["summary"]["accuracy"]["n"] == 2 and summary["model"]["head"] == "plain"
        assert summary["data_issues"]["skipped"] == 4
        # more epochs: the finished folds continue from their checkpoints
        run_cv(spec, _config(epochs=2), tmp_path, resume=True, progress=False)
        for fold in (0, 1):
            assert load_checkpoint(tmp_path / f"fold{fold}" / "checkpoint.pt")["epoch"] == 1
        (tmp_path / "fold1" / "checkpoint.pt").unlink()
        with pytest.raises(ValueError, match="settings that made it cannot be checked"):
            run_cv(spec, _config(epochs=2), tmp_path, resume=True, progress=False)

    def test_report_of_another_checkpoint_is_evaluated_again(
        self, synth_tree, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A fold's test_metrics.json of an earlier run (other settings) was reused when
        the checkpoint beside it matched the settings: the summary mixed in another run."""
        root, _ = synth_tree
        spec = _spec(root, n_splits=2)
        run_cv(spec, _config(lr=0.1), tmp_path, folds=[0], progress=False)
        stale = (tmp_path / "fold0" / "test_metrics.json").read_text()
        run_cv(spec, _config(lr=0.05), tmp_path, folds=[0], progress=False)
        # as an older breakhis left it: the lr=0.05 run was cut short before its report
        (tmp_path / "fold0" / "test_metrics.json").write_text(stale)
        with caplog.at_level(logging.WARNING, logger="breakhis.experiments"):
            summary = run_cv(spec, _config(lr=0.05), tmp_path, folds=[0], resume=True,
                             progress=False)
        assert "evaluating the checkpoint again" in caplog.text
        assert summary["model"]["lr"] == 0.05
        from breakhis.train import checkpoint_identity

        fresh = json.loads((tmp_path / "fold0" / "test_metrics.json").read_text())
        state = load_checkpoint(tmp_path / "fold0" / "checkpoint.pt")
        assert fresh["model"]["lr"] == 0.05 and fresh["checkpoint"] == checkpoint_identity(state)
        # a report without a checkpoint identity (older breakhis) is evaluated again too
        del fresh["checkpoint"]
        (tmp_path / "fold0" / "test_metrics.json").write_text(json.dumps(fresh))
        run_cv(spec, _config(lr=0.05), tmp_path, folds=[0], resume=True, progress=False)
        again = json.loads((tmp_path / "fold0" / "test_metrics.json").read_text())
        assert again["checkpoint"] == checkpoint_identity(state)
        assert load_checkpoint(tmp_path / "fold0" / "checkpoint.pt")["epoch"] == 0  # not retrained
        # the report made from this checkpoint is reused as it is
        before = (tmp_path / "fold0" / "test_metrics.json").read_text()
        run_cv(spec, _config(lr=0.05), tmp_path, folds=[0], resume=True, progress=False)
        assert (tmp_path / "fold0" / "test_metrics.json").read_text() == before


    def test_fresh_cv_removes_an_earlier_summary(self, synth_tree, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        root, _ = synth_tree
        spec = _spec(root, n_splits=2)
        run_cv(spec, _config(), tmp_path, folds=[0], progress=False)
        assert (tmp_path / "cv_metrics.json").is_file()

        def killed(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(experiments_module, "run_fold", killed)
        with pytest.raises(KeyboardInterrupt):
            run_cv(spec, _config(lr=0.05), tmp_path, progress=False)
        assert not (tmp_path / "cv_metrics.json").exists()
        assert not (tmp_path / "cv_metrics.md").exists()

    def test_cv_resume_removes_stale_temporaries(self, synth_tree, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
        """A summary or fold report whose write was killed left its temporary file; a
        reused fold never reaches fit's cleanup, so run_cv removes them."""
        root, _ = synth_tree
        spec = _spec(root, n_splits=2)
        run_cv(spec, _config(), tmp_path, folds=[0], progress=False)
        done = tmp_path / "fold0" / "test_metrics.json"
        before = done.read_text()
        stale = [tmp_path / ".cv_metrics.json.ab12cd_e.tmp",
                 tmp_path / ".cv_metrics.md.zz99yy00.tmp",
                 tmp_path / "fold0" / f".{PREDICTIONS_FILE}.k3j4h5g6.tmp"]
        kept = tmp_path / ".notes.txt.ab12cd_e.tmp"
        for path in (*stale, kept):
            path.write_text("cut short")
        with caplog.at_level(logging.WARNING, logger="breakhis.experiments"):
            run_cv(spec, _config(), tmp_path, folds=[0], resume=True, progress=False)
        assert done.read_text() == before  # reused: fit's cleanup never ran
        assert not any(path.exists() for path in stale)
        assert kept.exists()
        assert "temporary files of writes cut short" in caplog.text
        assert "fold0/" + f".{PREDICTIONS_FILE}.k3j4h5g6.tmp" in caplog.text


class TestCvFolds:
    @pytest.mark.parametrize("folds, problem", [([0, 7], r"unknown fold \[7\]"),
                                                ([0, 7, 8], r"unknown folds \[7, 8\]"),
                                                ([1, 1], r"fold \[1\] given more than once"),
                                                ([1, 2, 1, 2], r"folds \[1, 2\] given more "
                                                 "than once")])
    def test_folds_are_checked_before_training(self, synth_tree, tmp_path: Path,
                                               folds: list[int], problem: str) -> None:
        """An unknown fold failed only after the earlier folds had trained; a repeated
        one trained twice and counted twice in mean and std."""
        root, _ = synth_tree
        with pytest.raises(ValueError, match=r"folds must be distinct folds of \[0, 1, 2\], "
                           rf"but got {re.escape(str(folds))}: {problem}"):
            run_cv(_spec(root), _config(), tmp_path, folds=folds, progress=False)
        assert not any(tmp_path.iterdir())

    def test_cli_names_the_official_folds(self, synth_tree, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
        root, _ = synth_tree
        assert main(["cv", "--data-root", str(root), "--task", "MSBC", "--magnification", "40",
                     "--protocol", "official", "--folds", "0", "--backbone", "tiny",
                     "--no-pretrained", "--input-size", "16", "--out", str(tmp_path / "cv"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert ("folds must be distinct folds of [1, 2, 3, 4, 5] (the fold tables' own "
                "numbers), but got [0]: unknown fold [0]") in err
        assert not (tmp_path / "cv").exists()

    def test_partial_official_cv_counts_the_fold_tables(self, synth_tree,
                                                        tmp_path: Path) -> None:
        """The official protocol recorded no number of folds, so a partial
        cross-validation on it showed as complete in the table."""
        root, _ = synth_tree
        summary = run_cv(_spec(root, protocol="official"), _config(), tmp_path, folds=[2, 4],
                         progress=False)
        assert summary["protocol"]["n_splits"] == 5
        assert summary["epochs_trained"] == 1
        assert [f["epochs_trained"] for f in summary["folds"]] == [1, 1]
        assert json.loads((tmp_path / "fold2" / "test_metrics.json").read_text())[
            "protocol"]["n_splits"] == 5
        lines = [line for line in results_table([tmp_path]).splitlines()
                 if line.startswith("| ")]
        assert "| 2 of 5 |" in lines[1]


class TestSyntheticDetection:
    def test_root_inside_the_tree_is_synthetic_everywhere(self, synth_tree,
                                                          tmp_path: Path) -> None:
        root, meta = synth_tree
        inside = root / meta["images_root"]
        assert not (inside / "SYNTHETIC.txt").exists()
        spec = _spec(inside)
        assert prepare_data(spec).synthetic is True
        report = run_fold(spec, _config(), 0, tmp_path / "run", progress=False)
        assert report["synthetic"] is True
        assert json.loads((tmp_path / "run" / "test_metrics.json").read_text())["synthetic"]
        assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["extra"]["synthetic"]
        again = evaluate_checkpoint(tmp_path / "run" / "checkpoint.pt",
                                    out_dir=tmp_path / "eval", device="cpu", progress=False)
        assert again["synthetic"] is True
        assert checkpoint_records(tmp_path / "run" / "checkpoint.pt")[2]["synthetic"] is True
        assert "| SYNTHETIC |" in results_table([tmp_path / "run"])

    def test_images_copied_out_of_the_tree_are_synthetic(self, synth_tree,
                                                         tmp_path: Path) -> None:
        root, meta = synth_tree
        copy = Path(shutil.copytree(root / meta["images_root"], tmp_path / "copy"))
        assert not any(p.name == "SYNTHETIC.txt" for p in copy.rglob("*"))
        assert prepare_data(_spec(copy)).synthetic is True

    def test_plain_images_are_not_synthetic(self, tmp_path: Path) -> None:
        paths = [tmp_path / "a" / "x.png", tmp_path / "b" / "y.png"]
        for path in paths:
            _png(path)
        assert is_synthetic(tmp_path, paths) is False
        assert is_synthetic(tmp_path, []) is False
        (tmp_path / "SYNTHETIC.txt").write_text("marker")
        assert is_synthetic(tmp_path, paths) is True
        # A marker higher up counts only beside the tree's BreaKHis_v1 folder, not above
        # any folder (real data under a home directory that holds a stray marker).
        assert is_synthetic(tmp_path / "a", paths) is False
        (tmp_path / "BreaKHis_v1" / "histology_slides").mkdir(parents=True)
        assert is_synthetic(tmp_path / "BreaKHis_v1" / "histology_slides", paths) is True


class TestReports:
    def test_reports_are_replaced_atomically(self, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """test_metrics.json was rewritten in place: a kill meanwhile left it cut short."""
        from breakhis.evaluate import read_predictions, write_predictions, write_report

        json_path, md_path = write_report({"title": "old"}, tmp_path, "test_metrics")
        csv_path = write_predictions(tmp_path / PREDICTIONS_FILE, ["a.png"], [0],
                                     np.array([[0.9, 0.1]]), ["benign", "malignant"])
        before = {p: (p.stat().st_ino, p.read_bytes()) for p in (json_path, md_path, csv_path)}

        def full(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(experiments_module.os, "fsync", full)
        with pytest.raises(OSError, match="No space left") as info:
            write_report({"title": "new"}, tmp_path, "test_metrics")
        assert info.value.filename == str(md_path)  # the first written, the JSON last
        with pytest.raises(OSError, match="No space left"):
            write_predictions(csv_path, ["b.png"], [1], np.array([[0.2, 0.8]]),
                              ["benign", "malignant"])
        assert {p: (p.stat().st_ino, p.read_bytes()) for p in before} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in before)
        monkeypatch.undo()
        write_report({"title": "new"}, tmp_path, "test_metrics")
        assert json.loads(json_path.read_text()) == {"title": "new"}
        assert json_path.stat().st_ino != before[json_path][0]  # a new file, renamed over it
        write_predictions(csv_path, ["b.png"], [1], np.array([[0.2, 0.8]]),
                          ["benign", "malignant"])
        assert read_predictions(csv_path).paths == ["b.png"]

    @pytest.mark.parametrize("damage, problem", [
        ("cut", "JSONDecodeError"),
        ("[1, 2]", "expected a JSON object, but it holds a list"),
        ('{"checkpoint": null}', "expected the entries"),
        ("not UTF-8", "UnicodeDecodeError"),
    ])
    def test_cv_resume_evaluates_a_damaged_fold_report_again(
        self, synth_tree, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str,
        problem: str
    ) -> None:
        """cv --resume died with a bare JSON error naming no file when a fold's
        test_metrics.json was cut short."""
        from breakhis.train import checkpoint_identity

        root, _ = synth_tree
        spec = _spec(root, n_splits=2)
        run_cv(spec, _config(), tmp_path, folds=[0], progress=False)
        done = tmp_path / "fold0" / "test_metrics.json"
        if damage == "cut":
            _truncate(done)
        elif damage == "not UTF-8":
            done.write_bytes(b"\xff\xfe{")
        else:
            done.write_text(damage)
        with caplog.at_level(logging.WARNING, logger="breakhis.experiments"):
            summary = run_cv(spec, _config(), tmp_path, folds=[0], resume=True,
                             progress=False)
        assert f"fold 0: {done} cannot be read as a report ({problem}" in caplog.text
        assert "evaluating the checkpoint again" in caplog.text
        state = load_checkpoint(tmp_path / "fold0" / "checkpoint.pt")
        assert state["epoch"] == 0  # evaluated again, not retrained
        assert json.loads(done.read_text())["checkpoint"] == checkpoint_identity(state)
        assert summary["summary"]["accuracy"]["n"] == 1

    def test_cv_resume_evaluates_a_fold_without_its_predictions_again(
        self, synth_tree, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """cv --resume reused a fold whose test_predictions.csv was gone: a report and a
        summary with no per-image predictions behind them (helper-144)."""
        root, _ = synth_tree
        spec = _spec(root, n_splits=2)
        run_cv(spec, _config(), tmp_path, folds=[0], progress=False)
        predictions = tmp_path / "fold0" / "test_predictions.csv"
        rows = predictions.read_text()
        predictions.unlink()
        with caplog.at_level(logging.WARNING, logger="breakhis.experiments"):
            run_cv(spec, _config(), tmp_path, folds=[0], resume=True, progress=False)
        assert (f"fold 0: {predictions} is missing (the per-image predictions "
                f"{tmp_path / 'fold0' / 'test_metrics.json'} was made from); evaluating the checkpoint "
                "again") in caplog.text
        assert predictions.read_text() == rows
        assert load_checkpoint(tmp_path / "fold0" / "checkpoint.pt")["epoch"] == 0  # not retrained


def _official(root: Path, table: Path, **changes) -> DataSpec:
    return _spec(root, protocol="official", folds_file=(str(table),), **changes)


def test_a_task_that_selects_nothing_says_what_the_data_hold(tree_copy: Path, tmp_path: Path) -> None:
    """`--task MSBC --magnification 400` on data without 400X images said only "selects no
    images" (helper-142): which magnifications are there, or that nothing was indexed."""
    for folder in list(tree_copy.rglob("400X")):
        shutil.rmtree(folder)
    with pytest.raises(ValueError, match=rf"^task MSBC selects no images under '{tree_copy}': it holds "
                       r"\d+ images, at 40X, 100X and 200X only, none at 400X$"):
        prepare_data(_spec(tree_copy, magnification=400))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"selects no images under .*: no image was indexed there "
                       r"\(breakhis-repro index lists what was skipped, and why\)$"):
        prepare_data(_spec(tmp_path / "nothing"))


class TestStoppedWhileEvaluating:
    """Ctrl-C or SIGTERM while a fold's test images were evaluated, after its last epoch,
    left train.log ending with that epoch's line: no line said why the run stopped
    (helper-142); fit writes it only for what stops training."""

    @pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(28, "No space left on device")],
                             ids=["ctrl-c", "error"])
    def test_the_stop_is_the_last_line_and_resume_evaluates(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
    ) -> None:
        root, _ = synth_tree
        run = tmp_path / "run"

        def stopped(*args: object, **kwargs: object) -> None:
            raise exc

        with monkeypatch.context() as m:
            m.setattr(experiments_module, "predict_probs", stopped)
            with pytest.raises(type(exc)):
                run_fold(_spec(root), _config(), 0, run, progress=False)
        last = (run / "train.log").read_text().strip().splitlines()[-1]
        if isinstance(exc, KeyboardInterrupt):
            assert last.endswith("WARNING interrupted (KeyboardInterrupt) while evaluating the test "
                                 "images, after training; checkpoint.pt holds the trained model: the "
                                 "same command with --resume evaluates it"), last
        else:
            assert last.endswith("ERROR stopped by OSError while evaluating the test images, after "
                                 "training: [Errno 28] No space left on device"), last
        assert not (run / "test_metrics.json").exists()
        report = run_fold(_spec(root), _config(), 0, run, resume=True, progress=False)
        assert report["epochs_trained"] == 1 and (run / "test_metrics.json").is_file()


def _other_pixels(path: Path) -> None:
    """Rewrite the image at ``path`` with other pixels: the same name, other content."""
    with Image.open(path) as image:
        inverted = Image.fromarray(255 - np.asarray(image.convert("RGB")))
    inverted.save(path)


class TestImageContents:
    """`train --resume` with a --data-root whose files had the checkpoint's names but
    other pixels continued training on them without a word, and `evaluate --data-root`
    scored them (helper-142): only the names were compared."""

    def test_resume_and_evaluate_refuse_other_images_under_the_same_names(
        self, tree_copy: Path, tmp_path: Path
    ) -> None:
        run = tmp_path / "run"
        run_fold(_spec(tree_copy), _config(), 0, run, progress=False)
        extra = load_checkpoint(run / "checkpoint.pt")["extra"]
        assert sorted(extra["files_sha256"]) == ["test", "train", "val"]
        assert all(len(v) == 64 for v in extra["files_sha256"].values())
        moved = Path(shutil.copytree(tree_copy, tmp_path / "moved"))
        _other_pixels(moved / extra["files"]["train"][0])
        with pytest.raises(ValueError, match=r"cannot resume .*the train images' contents differ from the "
                           r"checkpoint's \(the same file names hold other images: SHA-256 over the files "
                           r"[0-9a-f]{12}\.\.\., this run [0-9a-f]{12}\.\.\.\)"):
            run_fold(_spec(moved), _config(epochs=2), 0, run, resume=True, progress=False)
        assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 0
        # evaluating the test images: the changed training image does not matter; a changed
        # test image does
        evaluate_checkpoint(run / "checkpoint.pt", data_root=str(moved), out_dir=tmp_path / "ev",
                            device="cpu", progress=False)
        _other_pixels(moved / extra["files"]["test"][-1])
        for evaluate in (
            lambda: evaluate_checkpoint(run / "checkpoint.pt", data_root=str(moved),
                                        out_dir=tmp_path / "ev2", device="cpu", progress=False),
            lambda: checkpoint_records(run / "checkpoint.pt", data_root=str(moved)),
        ):
            with pytest.raises(ValueError, match=rf"^expected the \d+ test images recorded in checkpoint "
                               rf".*, but the files of those names under '{moved}' hold other images "
                               r"\(their SHA-256 is not the one recorded at training\): pass the data"):
                evaluate()
        assert not (tmp_path / "ev2").exists()
        with pytest.raises(ValueError, match=r"^expected the \d+ train images recorded in checkpoint .*"
                           r"hold other images"):
            checkpoint_records(run / "checkpoint.pt", data_root=str(moved), split="train")
        checkpoint_records(run / "checkpoint.pt", data_root=str(moved), split="all")  # no split recorded
        # the unchanged data resume
        report = run_fold(_spec(tree_copy), _config(epochs=2), 0, run, resume=True, progress=False)
        assert report["epochs_trained"] == 2

    def test_resume_at_another_level_of_the_tree_says_so(self, synth_tree, tmp_path: Path) -> None:
        """--resume with --data-root one folder below (or above) training's was refused with
        "the test images' contents differ (the same file names hold other images)": false,
        the files were the same, only their paths relative to the root were not."""
        root, _ = synth_tree
        top = tmp_path / "above" / "data"
        shutil.copytree(root, top)
        run = tmp_path / "run"
        run_fold(_spec(top), _config(), 0, run, progress=False)
        levels = ((top / "BreaKHis_v1", "1 folder below"), (tmp_path / "above", "1 folder above"))
        for data_root, where in levels:
            with pytest.raises(ValueError) as caught:
                run_fold(_spec(data_root), _config(epochs=2), 0, run, resume=True, progress=False)
            message = str(caught.value)
            assert (f"the data root is {where} the checkpoint's in the same tree (image paths such as "
                    in message), message
            assert f"pass the --data-root of training ('{top.resolve()}' or another folder" in message
            assert "contents differ" not in message and "entries>" not in message, message
        assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 0
        report = run_fold(_spec(top), _config(epochs=2), 0, run, resume=True, progress=False)
        assert report["epochs_trained"] == 2

    def test_resume_from_a_damaged_checkpoint_says_how_to_go_on(self, tree_copy: Path, tmp_path: Path) -> None:
        """An empty checkpoint.pt in the run folder: resume said torch's "mmap can only be
        used with files saved with ..." and to "pass the checkpoint.pt of a run folder",
        which it was."""
        run = tmp_path / "run"
        run_fold(_spec(tree_copy), _config(), 0, run, progress=False)
        cv = tmp_path / "cv"
        run_cv(_spec(tree_copy, n_splits=2), _config(), cv, folds=[0], progress=False)
        for folder, resume in (
            (run, lambda: run_fold(_spec(tree_copy), _config(epochs=2), 0, run, resume=True, progress=False)),
            (cv / "fold0", lambda: run_cv(_spec(tree_copy, n_splits=2), _config(), cv, folds=[0], resume=True,
                                          progress=False)),
        ):
            (folder / "checkpoint.pt").write_bytes(b"")
            with pytest.raises(ValueError) as caught:
                resume()
            # a cv's fold: its folder removed, cv --resume trains it again (--overwrite: every fold)
            way = ("start the run afresh with --overwrite (what that folder holds is replaced), or "
                   "train into another --out")
            if folder.name == "fold0":
                way += (f"; if {str(folder)!r} is a fold of a cv, remove that folder and rerun cv --resume "
                        "instead, which trains that fold again (cv --overwrite would train every fold afresh)")
            assert str(caught.value) == (
                f"cannot resume from {str(folder / 'checkpoint.pt')!r}: it is not a breakhis checkpoint "
                f"(the file is empty or cut short); {way}")
        shutil.rmtree(cv / "fold0")  # as the message says
        report = run_cv(_spec(tree_copy, n_splits=2), _config(), cv, folds=[0], resume=True, progress=False)
        assert report["folds"][0]["fold"] == 0 and (cv / "fold0" / "checkpoint.pt").is_file()

    def test_without_recorded_contents_or_digests_the_names_are_compared(
        self, tree_copy: Path, tmp_path: Path
    ) -> None:
        """Indexed with --no-verify (no file read whole), or a checkpoint written before
        the contents were recorded: the file lists alone are compared, as before."""
        run = tmp_path / "run"
        run_fold(_spec(tree_copy, verify=False), _config(), 0, run, progress=False)
        state = load_checkpoint(run / "checkpoint.pt")
        assert state["extra"]["files_sha256"] is None
        _other_pixels(tree_copy / state["extra"]["files"]["train"][0])
        report = run_fold(_spec(tree_copy, verify=False), _config(epochs=2), 0, run, resume=True,
                          progress=False)
        assert report["epochs_trained"] == 2
        older = tmp_path / "older"
        run_fold(_spec(tree_copy), _config(), 0, older, progress=False)
        state = load_checkpoint(older / "checkpoint.pt")
        del state["extra"]["files_sha256"]  # as written before the contents were recorded
        save_checkpoint(state, older / "checkpoint.pt")
        _other_pixels(tree_copy / state["extra"]["files"]["train"][0])
        _other_pixels(tree_copy / state["extra"]["files"]["test"][0])
        report = run_fold(_spec(tree_copy), _config(epochs=2), 0, older, resume=True, progress=False)
        assert report["epochs_trained"] == 2
        evaluate_checkpoint(older / "checkpoint.pt", out_dir=tmp_path / "ev", device="cpu", progress=False)


class TestMovedDataFiles:
    """A run with --folds-file (or --patients-csv) could not resume once its data folder
    moved: the files' absolute paths were compared, though a moved --data-root with the
    same files may resume."""

    def test_moved_folds_file_resumes_a_changed_one_does_not(
        self, tree_copy: Path, tmp_path: Path
    ) -> None:
        run = tmp_path / "run"
        run_fold(_official(tree_copy, tree_copy / "dsfold1.txt"), _config(), 1, run,
                 progress=False)
        state = load_checkpoint(run / "checkpoint.pt")
        assert len(state["extra"]["data"]["folds_file_sha256"][0]) == 64
        moved = Path(shutil.move(tree_copy, tmp_path / "moved"))
        spec = _official(moved, moved / "dsfold1.txt")
        report = run_fold(spec, _config(epochs=2), 1, run, resume=True, progress=False)
        assert report["epochs_trained"] == 2
        assert (f"data: the fold table moved: [{str(moved / 'dsfold1.txt')!r}] holds the "
                f"content of the checkpoint's [{str(tree_copy / 'dsfold1.txt')!r}] (same "
                "SHA-256)") in (run / "train.log").read_text()
        # evaluate (and figures) with --data-root find the table where the data went
        again = evaluate_checkpoint(run / "checkpoint.pt", data_root=str(moved),
                                    out_dir=tmp_path / "ev", device="cpu", progress=False)
        assert again["metrics"]["confusion_matrix"] == report["metrics"]["confusion_matrix"]
        # the same path with other content, or another file, is refused
        with (moved / "dsfold1.txt").open("a") as handle:
            handle.write("\n")
        with pytest.raises(ValueError, match=r"cannot resume .*checkpoint has "
                           r"data\.folds_file_sha256=\['[0-9a-f]{64}'\], this run "
                           r"\['[0-9a-f]{64}'\]"):
            run_fold(spec, _config(epochs=3), 1, run, resume=True, progress=False)
        assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1

    def test_older_checkpoint_resumes_by_file_name(self, tree_copy: Path,
                                                   tmp_path: Path) -> None:
        run = tmp_path / "run"
        run_fold(_official(tree_copy, tree_copy / "dsfold1.txt"), _config(), 1, run,
                 progress=False)
        state = load_checkpoint(run / "checkpoint.pt")
        del state["extra"]["data"]["folds_file_sha256"]  # as written before it was recorded
        save_checkpoint(state, run / "checkpoint.pt")
        moved = Path(shutil.move(tree_copy, tmp_path / "moved"))
        renamed = moved / "mine.txt"
        shutil.copy(moved / "dsfold1.txt", renamed)
        with pytest.raises(ValueError, match=r"checkpoint has data\.folds_file=\[.*dsfold1"
                           r"\.txt'\], this run \[.*mine\.txt'\]"):
            run_fold(_official(moved, renamed), _config(epochs=2), 1, run, resume=True,
                     progress=False)
        report = run_fold(_official(moved, moved / "dsfold1.txt"), _config(epochs=2), 1, run,
                          resume=True, progress=False)
        assert report["epochs_trained"] == 2
        assert ("records the path of its fold table, not its content (written by an older "
                "breakhis)") in (run / "train.log").read_text()
        # the resumed checkpoint records the content now
        assert load_checkpoint(run / "checkpoint.pt")["extra"]["data"]["folds_file_sha256"]

    def test_moved_patients_csv(self, tmp_path: Path) -> None:
        data = _folder_with_patients(tmp_path / "data")

        def spec(root: Path) -> DataSpec:
            return DataSpec(str(root), image_folder=True, patients_csv=str(root / "patients.csv"),
                            n_splits=2, val_fraction=0)

        run = tmp_path / "run"
        run_fold(spec(data), _config(), 0, run, progress=False)
        moved = Path(shutil.move(data, tmp_path / "moved"))
        report = run_fold(spec(moved), _config(epochs=2), 0, run, resume=True, progress=False)
        assert report["epochs_trained"] == 2
        assert "data: the patients CSV moved" in (run / "train.log").read_text()
        again = evaluate_checkpoint(run / "checkpoint.pt", data_root=str(moved),
                                    out_dir=tmp_path / "ev", device="cpu", progress=False)
        assert again["metrics"]["patients"] == report["metrics"]["patients"]
        with (moved / "patients.csv").open("a") as handle:
            handle.write("\n")
        with pytest.raises(ValueError, match=r"checkpoint has data\.patients_csv_sha256="):
            run_fold(spec(moved), _config(epochs=3), 0, run, resume=True, progress=False)
        # moved again, evaluated without data_root: the message says so and how to give it
        # (it was the index's "expected a BreaKHis folder, but ... does not exist")
        shutil.move(moved, tmp_path / "again")
        for call in (lambda: evaluate_checkpoint(run / "checkpoint.pt", device="cpu", progress=False),
                     lambda: checkpoint_records(run / "checkpoint.pt", progress=False)):
            with pytest.raises(ValueError) as info:
                call()
            assert str(info.value) == (
                f"expected the data folder {str(moved)!r} that checkpoint "
                f"{str(run / 'checkpoint.pt')!r} was trained on, but it does not exist: if the "
                "data moved, pass its new place (--data-root; data_root= in Python)")

    def test_image_folder_run_that_recorded_a_magnification_resumes(
        self, tmp_path: Path
    ) -> None:
        """An image-folder run made with --magnification or --task (ignored then, refused
        now) records them; it resumes and evaluates without them. Its protocol notes in
        an earlier version's words ('1 image(s)') do not stop a resume either."""
        data = tmp_path / "data"
        for cls in ("normal", "tumour"):
            for i in range(6):
                _png(data / cls / f"img{i}.png")
        spec = DataSpec(str(data), image_folder=True, protocol="image", n_splits=2,
                        val_fraction=0)
        run = tmp_path / "run"
        run_fold(spec, _config(), 0, run, progress=False)
        state = load_checkpoint(run / "checkpoint.pt")
        state["extra"]["data"]["magnification"] = 40  # as --magnification 40 wrote it
        state["extra"]["data"]["task"] = "MSFC"  # as --task MSFC wrote it
        state["extra"]["protocol"]["notes"] = ["2 patient(s) in train and test"]
        save_checkpoint(state, run / "checkpoint.pt")
        report = evaluate_checkpoint(run / "checkpoint.pt", out_dir=tmp_path / "ev",
                                     device="cpu", progress=False)
        assert report["fold"] == 0
        check_resume(spec, _config(epochs=2), run, fold=0)
        report = run_fold(spec, _config(epochs=2), 0, run, resume=True, progress=False)
        assert report["epochs_trained"] == 2
        data_spec = load_checkpoint(run / "checkpoint.pt")["extra"]["data"]
        assert (data_spec["magnification"], data_spec["task"]) == (None, "MIBC")

    def test_cv_resume_reuses_folds_of_a_moved_folds_file(
        self, tree_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        run_cv(_official(tree_copy, tree_copy / "dsfold2.txt"), _config(), tmp_path / "cv",
               progress=False)
        before = (tmp_path / "cv" / "fold2" / "test_metrics.json").read_text()
        moved = Path(shutil.move(tree_copy, tmp_path / "moved"))
        with caplog.at_level(logging.INFO, logger="breakhis.experiments"):
            run_cv(_official(moved, moved / "dsfold2.txt"), _config(), tmp_path / "cv",
                   resume=True, progress=False)
        assert "fold 2: reusing" in caplog.text and "fold table moved" in caplog.text
        assert (tmp_path / "cv" / "fold2" / "test_metrics.json").read_text() == before


def _fold_table(root: Path, fold: int, out_dir: Path, *, leak: bool = False,
                omit: int = 0) -> Path:
    """The synthetic tree's ``dsfold<fold>.txt`` (its 40X lines) in ``out_dir``; ``leak``
    moves one test image of a patient with several test images to train (the patient is
    then in train and test), ``omit`` drops that many training lines (left out)."""
    lines = [line for line in (root / f"dsfold{fold}.txt").read_text().splitlines()
             if line.split("|")[1] == "40"]
    if leak:
        test = [line for line in lines if line.endswith("|test")]
        slide = {line: line.split("|")[0].rsplit("-", 1)[0] for line in test}
        moved = next(line for line in test
                     if sum(s == slide[line] for s in slide.values()) > 1)
        lines = [line.replace("|test", "|train") if line == moved else line for line in lines]
    dropped = [line for line in lines if line.endswith("|train")][:omit]
    table = out_dir / f"dsfold{fold}.txt"
    table.write_text("\n".join(line for line in lines if line not in dropped) + "\n")
    return table


class TestSplitNotes:
    """An official fold table that put a patient's images in train and test, or left
    images out, was reported only inside fold<k>/test_metrics.json: nothing was logged,
    test_metrics.md, cv_metrics.md and the table said nothing, and cv_metrics.json's
    protocol was fold 1's copy (patient-disjoint, no notes, fold 1's sizes)."""

    LEAK = r"1 patient in train and test, e\.g\. \['[^']+'\]"

    def test_leaking_fold_is_warned_about_and_marked_everywhere(
        self, synth_tree, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        root, _ = synth_tree
        tables = (_fold_table(root, 1, tmp_path), _fold_table(root, 2, tmp_path, leak=True))
        spec = _spec(root, protocol="official", folds_file=tuple(map(str, tables)))
        cv = tmp_path / "cv"
        with caplog.at_level(logging.WARNING, logger="breakhis.experiments"):
            summary = run_cv(spec, _config(), cv, progress=False)
        # before training, in the console and train.log of the fold
        log = (cv / "fold2" / "train.log").read_text()
        assert re.search(rf"WARNING fold 2 \(official protocol\): {self.LEAK}\n", log)
        assert ("WARNING fold 2 (official protocol): its test metrics are NOT "
                "patient-disjoint") in log
        assert log.index("NOT patient-disjoint") < log.index("epoch 1/1")
        assert "NOT patient-disjoint" not in (cv / "fold1" / "train.log").read_text()
        assert ("cross-validation (official protocol): fold 2 is NOT patient-disjoint"
                in caplog.text)
        # the summary describes every fold, not fold 1
        protocol = summary["protocol"]
        assert protocol["patient_disjoint"] is False
        assert len(protocol["notes"]) == 1
        assert re.fullmatch(rf"fold 2: {self.LEAK}", protocol["notes"][0])
        assert protocol["train_images"] is None and protocol["test_images"] is None
        assert [f["protocol"]["patient_disjoint"] for f in summary["folds"]] == [True, False]
        assert all(f["protocol"]["train_images"] for f in summary["folds"])
        assert json.loads((cv / "cv_metrics.json").read_text())["protocol"] == protocol
        # the Markdown reports
        md = (cv / "cv_metrics.md").read_text()
        assert "- patient-disjoint: **no**" in md and f"  - {protocol['notes'][0]}\n" in md
        fold_md = (cv / "fold2" / "test_metrics.md").read_text()
        assert "- patient-disjoint: **no**" in fold_md
        assert re.search(rf"\n  - {self.LEAK}\n", fold_md)
        assert "patient-disjoint: **no**" not in (cv / "fold1" / "test_metrics.md").read_text()
        # the table marks the summary and the fold, not the clean fold; a report written
        # before patient_disjoint was recorded is unknown, not marked
        old = json.loads((cv / "fold2" / "test_metrics.json").read_text())
        del old["protocol"]["patient_disjoint"], old["protocol"]["notes"]
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "test_metrics.json").write_text(json.dumps(old))
        dirs = [cv, cv / "fold1", cv / "fold2", tmp_path / "old"]
        text = results_table(dirs, out=tmp_path / "t.md")
        lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
        assert "| official (NOT patient-disjoint) |" in lines[0]
        assert "| official |" in lines[1] and "| official |" in lines[3]
        assert "| official (NOT patient-disjoint) |" in lines[2]
        assert f"- `cv` (NOT patient-disjoint): {protocol['notes'][0]}" in text
        assert re.search(rf"- `fold2` \(NOT patient-disjoint\): {self.LEAK}", text)
        assert "`fold1`:" not in text and "`old`" not in text.split("Runs:")[0]
        with (tmp_path / "t.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [r["patient_disjoint"] for r in rows] == ["False", "True", "False", ""]
        assert rows[0]["split_notes"] == protocol["notes"][0] and rows[1]["split_notes"] == ""
        assert [r["patient_disjoint"] for r in results_rows(dirs)] == [False, True, False, None]
        # cv --resume reuses both folds and warns about fold 2 as before training
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="breakhis.experiments"):
            again = run_cv(spec, _config(), cv, resume=True, progress=False)
        assert "fold 2: reusing" in caplog.text
        assert re.search(rf"fold 2 \(official protocol\): {self.LEAK}", caplog.text)
        assert "fold 2 (official protocol): its test metrics are NOT" in caplog.text
        assert "fold 1 (official protocol): its" not in caplog.text
        assert again["protocol"] == protocol

    def test_images_left_out_by_a_fold_table_are_logged(
        self, synth_tree, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        root, _ = synth_tree
        table = _fold_table(root, 1, tmp_path, omit=3)
        run = tmp_path / "run"
        report = run_fold(_official(root, table), _config(), 1, run, progress=False)
        dropped = [line.split("|")[0] for line in (root / "dsfold1.txt").read_text().splitlines()
                   if line.endswith("|40|1|train")][:3]
        in_order = [r.path.name for r in index_breakhis(root).records if r.path.name in dropped]
        note = f"3 images not listed in fold 1; left out, e.g. {in_order}"
        assert report["protocol"]["notes"] == [note]
        assert report["protocol"]["patient_disjoint"] is True
        log = (run / "train.log").read_text()
        assert f"WARNING fold 1 (official protocol): {note}\n" in log
        assert "NOT patient-disjoint" not in log
        md = (run / "test_metrics.md").read_text()
        assert f"- split notes:\n  - {note}\n" in md and "patient-disjoint: **no**" not in md
        text = results_table([run])
        assert "| official |" in text and f"- `run`: {note}" in text
        assert "NOT patient-disjoint" not in text
        # evaluate warns as training did
        with caplog.at_level(logging.WARNING, logger="breakhis.experiments"):
            evaluate_checkpoint(run / "checkpoint.pt", out_dir=tmp_path / "ev", device="cpu",
                                progress=False)
        assert f"fold 1 (official protocol): {note}" in caplog.text
        assert f"  - {note}\n" in (tmp_path / "ev" / "test_metrics.md").read_text()

    def test_table_lines_without_an_image_are_logged(
        self, tree_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Lines naming an image the index did not find (here deleted) were dropped
        silently: the fold just had fewer test images. A 100X line is not the 40X task's.
        Runs trained before the note existed are still reused."""
        table = _fold_table(tree_copy, 1, tmp_path)
        gone = next(line for line in table.read_text().splitlines()
                    if line.endswith("|test")).split("|")[0]
        next(tree_copy.rglob(gone)).unlink()
        with table.open("a") as handle:
            handle.write("SOB_B_A-14-22549AB-100-099.png|100|1|train\n")
        cv = tmp_path / "cv"
        spec = _official(tree_copy, table)
        summary = run_cv(spec, _config(), cv, progress=False)
        note = (f"1 test image listed in fold 1 is not in the data (missing, or left out by "
                f"the index), e.g. ['{gone}']")
        assert summary["folds"][0]["protocol"]["notes"] == [note]
        assert summary["protocol"]["notes"] == [f"fold 1: {note}"]
        assert summary["folds"][0]["protocol"]["patient_disjoint"] is True
        assert f"WARNING fold 1 (official protocol): {note}\n" in (
            cv / "fold1" / "train.log").read_text()
        assert f"- split notes:\n  - {note}\n" in (cv / "fold1" / "test_metrics.md").read_text()
        assert f"- `fold1`: {note}" in results_table([cv / "fold1"])
        # a fold trained before this note existed: its checkpoint and report lack it
        from breakhis.train import checkpoint_identity

        ckpt = cv / "fold1" / "checkpoint.pt"
        state = load_checkpoint(ckpt)
        state["extra"]["protocol"]["notes"] = []
        save_checkpoint(state, ckpt)
        report = json.loads((cv / "fold1" / "test_metrics.json").read_text())
        report["protocol"]["notes"], report["checkpoint"] = [], checkpoint_identity(state)
        (cv / "fold1" / "test_metrics.json").write_text(json.dumps(report))
        with caplog.at_level(logging.INFO, logger="breakhis.experiments"):
            run_cv(spec, _config(), cv, resume=True, progress=False)
        assert "fold 1: reusing" in caplog.text


class TestSplitSeed:
    @pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
    def test_outside_scikit_learns_range_is_refused(self, seed) -> None:
        with pytest.raises(ValueError, match=r"split_seed must be an integer in "
                           rf"\[0, 2\*\*32 - 1\] .*but got {re.escape(repr(seed))}"):
            DataSpec("data", split_seed=seed)

    def test_largest_seed_draws_every_folds_validation_share(self, synth_tree,
                                                             tmp_path: Path) -> None:
        # the validation share of fold k was drawn with split_seed + k: past 2**32 - 1
        root, _ = synth_tree
        spec = _spec(root, protocol="image", split_seed=2**32 - 1)
        data = prepare_data(spec)
        plan = experiments_module._plan_fold(spec, data, 1)
        assert len(plan.val) and not set(plan.val) & set(plan.fit)


class TestCountedMessages:
    """Messages that count say 'fold table'/'file' for one, 'fold tables'/'files' for more
    (they said 'fold table(s)', 'file(s)' whatever the number)."""

    @pytest.mark.parametrize("tables, words", [
        (["dsfold1.txt"], "the fold table moved: ['/b/dsfold1.txt'] holds the content"),
        (["dsfold1.txt", "dsfold2.txt"], "the fold tables moved: ['/b/dsfold1.txt', "
         "'/b/dsfold2.txt'] hold the content"),
    ])
    def test_moved_fold_tables(self, tables: list[str], words: str) -> None:
        old = {"protocol": "official", "folds_file": [f"/a/{t}" for t in tables],
               "folds_file_sha256": "same"}
        new = {**old, "folds_file": [f"/b/{t}" for t in tables]}
        _, notes = experiments_module._resume_ignore({"extra": {"data": old}}, {"data": new})
        assert len(notes) == 1 and notes[0].startswith(f"data: {words} of the checkpoint's")

    @pytest.mark.parametrize("tables, words", [
        (["dsfold1.txt"], ("records the path of its fold table, not its content", "] is taken",
                           "because the file name is the same")),
        (["dsfold1.txt", "dsfold2.txt"], ("records the paths of its fold tables, not their "
                                          "content", "] are taken",
                                          "because the file names are the same")),
    ])
    def test_fold_tables_of_an_old_checkpoint(self, tables: list[str],
                                              words: tuple[str, ...]) -> None:
        old = {"protocol": "official", "folds_file": [f"/a/{t}" for t in tables]}
        new = {**old, "folds_file": [f"/b/{t}" for t in tables], "folds_file_sha256": "new"}
        _, notes = experiments_module._resume_ignore({"extra": {"data": old}}, {"data": new})
        assert len(notes) == 1 and all(w in notes[0] for w in words)

    @pytest.mark.parametrize("skipped, line", [(1, "data: 1 file under '/d' left out"),
                                               (2, "data: 2 files under '/d' left out")])
    def test_skipped_files(self, skipped: int, line: str) -> None:
        issues = {"skipped": skipped, "skipped_by_reason": {"not an image": skipped},
                  "skipped_examples": {"not an image": ["x.txt"]}, "warnings": []}
        assert experiments_module._issue_lines(issues, Path("/d"))[0] == line


class TestSavedRunsAsTrained:
    """evaluate and figures indexed a saved run's data again from the image headers only
    and drew its fold again: the report's data_issues lost what only decoding finds
    (unreadable images, byte-identical copies), and a run failed to evaluate when drawing
    the fold needed what the recorded file lists do not (a patient for a file that does
    not decode, the fold tables), or when a class folder held only undecodable files."""

    @staticmethod
    def _broken_copy(root: Path) -> Path:
        """A truncated copy of a 40X image under a new BreaKHis name, and a
        byte-identical copy of another: what only decoding and hashing find."""
        first, second = sorted(root.rglob("*-40-*.png"))[:2]
        broken = first.with_name(re.sub(r"-\d+\.png$", "-901.png", first.name))
        broken.write_bytes(first.read_bytes()[:300])
        shutil.copyfile(second, second.with_name(re.sub(r"-\d+\.png$", "-902.png", second.name)))
        return broken

    def test_report_keeps_the_data_issues_of_training(self, tree_copy: Path,
                                                      tmp_path: Path) -> None:
        self._broken_copy(tree_copy)
        run = tmp_path / "run"
        trained = run_fold(_spec(tree_copy), _config(), 0, run, progress=False)["data_issues"]
        assert trained["skipped_by_reason"].get("unreadable image", 0) >= 1
        assert any("byte-identical" in w for w in trained["warnings"])
        assert load_checkpoint(run / "checkpoint.pt")["extra"]["data_issues"] == trained
        report = evaluate_checkpoint(run / "checkpoint.pt", out_dir=tmp_path / "ev",
                                     device="cpu", progress=False)
        assert report["data_issues"] == trained
        saved = json.loads((tmp_path / "ev" / "test_metrics.json").read_text())
        assert saved["data_issues"] == trained
        # a run resumes when the files beside its images changed (the issues differ)
        (tree_copy / "stray.txt").write_text("not an image")
        again = run_fold(_spec(tree_copy), _config(epochs=2), 0, run, resume=True,
                         progress=False)
        assert again["epochs_trained"] == 2 and again["data_issues"] != trained

    def test_older_checkpoint_reports_the_headers_only_index_and_says_so(
        self, tree_copy: Path, tmp_path: Path
    ) -> None:
        self._broken_copy(tree_copy)
        run = tmp_path / "run"
        run_fold(_spec(tree_copy), _config(), 0, run, progress=False)
        state = load_checkpoint(run / "checkpoint.pt")
        del state["extra"]["data_issues"]
        save_checkpoint(state, run / "checkpoint.pt")
        report = evaluate_checkpoint(run / "checkpoint.pt", out_dir=tmp_path / "ev",
                                     device="cpu", progress=False)
        assert "unreadable image" not in report["data_issues"]["skipped_by_reason"]
        assert any("records no data issues" in w and "were not looked for" in w
                   for w in report["data_issues"]["warnings"])
        # and it resumes (the key is new, not a difference)
        assert run_fold(_spec(tree_copy), _config(epochs=2), 0, run, resume=True,
                        progress=False)["epochs_trained"] == 2

    def test_patient_protocol_with_a_broken_file_without_patient(self, tmp_path: Path) -> None:
        data = _folder_with_patients(tmp_path / "data")
        (data / "normal" / "broken.png").write_bytes((data / "normal" / "img0.png").read_bytes()[:60])
        spec = DataSpec(str(data), image_folder=True, patients_csv=str(data / "patients.csv"),
                        n_splits=2, val_fraction=0)
        run = tmp_path / "run"
        trained = run_fold(spec, _config(), 0, run, progress=False)
        report = evaluate_checkpoint(run / "checkpoint.pt", out_dir=tmp_path / "ev",
                                     device="cpu", progress=False)
        assert report["metrics"] == trained["metrics"]
        with pytest.warns(UserWarning, match="1 image under .* could not be decoded"):
            records, _, _ = checkpoint_records(run / "checkpoint.pt", split="all")
        assert len(records) == 12

    def test_folder_of_undecodable_files_is_no_class(self, tmp_path: Path) -> None:
        data = tmp_path / "data"
        for cls in ("normal", "tumour"):
            for i in range(4):
                _png(data / cls / f"img{i}.png")
        (data / "other").mkdir()
        (data / "other" / "bad.png").write_bytes((data / "normal" / "img0.png").read_bytes()[:60])
        spec = DataSpec(str(data), image_folder=True, protocol="image", n_splits=2,
                        val_fraction=0)
        run = tmp_path / "run"
        trained = run_fold(spec, _config(), 0, run, progress=False)
        assert trained["task"]["classes"] == ["normal", "tumour"]
        report = evaluate_checkpoint(run / "checkpoint.pt", out_dir=tmp_path / "ev",
                                     device="cpu", progress=False)
        assert report["metrics"] == trained["metrics"]
        _png(data / "other" / "good.png")  # now the folder is a class the run never had
        with pytest.raises(ValueError, match=r"checkpoint classes \['normal', 'tumour'\] "
                           r"differ from the task's \['normal', 'other', 'tumour'\]"):
            evaluate_checkpoint(run / "checkpoint.pt", out_dir=tmp_path / "ev2", device="cpu",
                                progress=False)

    def test_official_run_moved_without_its_fold_tables(self, tree_copy: Path,
                                                        tmp_path: Path) -> None:
        run = tmp_path / "run"
        trained = run_fold(_spec(tree_copy, protocol="official"), _config(), 1, run,
                           progress=False)
        moved = Path(shutil.copytree(tree_copy, tmp_path / "moved"))
        for table in moved.glob("dsfold*.txt"):
            table.unlink()
        report = evaluate_checkpoint(run / "checkpoint.pt", data_root=str(moved),
                                     out_dir=tmp_path / "ev", device="cpu", progress=False)
        assert report["metrics"] == trained["metrics"]
        assert report["protocol"] == trained["protocol"]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class TestStaleSingleRun:
    def test_report_of_a_changed_checkpoint_is_marked(
        self, synth_tree, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """After `train --resume` with more epochs, interrupted before its new report,
        `table` showed the run's old test_metrics.json as if it were the checkpoint's."""
        root, _ = synth_tree
        run = tmp_path / "run"
        run_fold(_spec(root), _config(), 0, run, progress=False)
        assert results_rows([run])[0]["stale"] is None
        assert results_rows([run])[0]["stale_folds"] == []
        assert "stale:" not in results_table([run])
        # an `evaluate --out` folder holds no checkpoint.pt: nothing to compare
        evaluate_checkpoint(run / "checkpoint.pt", out_dir=tmp_path / "ev", device="cpu",
                            progress=False)
        assert results_rows([tmp_path / "ev"])[0]["stale"] is None
        state = load_checkpoint(run / "checkpoint.pt")
        state["history"] = [*state["history"], dict(state["history"][-1])]
        state["epoch"] = 1  # a second epoch trained, its report never written
        save_checkpoint(state, run / "checkpoint.pt")
        with caplog.at_level(logging.WARNING, logger="breakhis.plots"):
            text = results_table([run, tmp_path / "ev"], out=tmp_path / "t.md")
        note = ("stale: checkpoint.pt changed since this report (trained further or "
                "replaced; training interrupted before a new report?); rerun breakhis-repro "
                f"evaluate --checkpoint {run / 'checkpoint.pt'}, or train --resume to "
                "finish it")
        assert note in caplog.text and str(run / "test_metrics.json") in caplog.text
        assert str(tmp_path / "ev" / "test_metrics.json") not in caplog.text
        assert f"| 1 (fold 0 of 3) ({note}) |" in text
        rows = results_rows([run, tmp_path / "ev"])
        assert rows[0]["stale_folds"] == [0] and rows[0]["stale"] == note
        assert rows[1]["stale_folds"] == [] and rows[1]["stale"] is None
        with (tmp_path / "t.csv").open(newline="") as handle:
            saved = list(csv.DictReader(handle))
        assert saved[0]["stale_folds"] == "0" and saved[0]["stale"] == note
        # a report that records no checkpoint (older breakhis) says nothing
        report = json.loads((run / "test_metrics.json").read_text())
        (run / "test_metrics.json").write_text(
            json.dumps({k: v for k, v in report.items() if k != "checkpoint"}))
        assert results_rows([run])[0]["stale"] is None
        # evaluated again (into its own folder, the default): current again
        evaluate_checkpoint(run / "checkpoint.pt", device="cpu", progress=False)
        assert results_rows([run])[0]["stale"] is None
        assert json.loads((run / "test_metrics.json").read_text())["checkpoint"]["epoch"] == 1


class TestEvaluateIntoAnotherRun:
    def test_another_runs_folder_is_refused(self, synth_tree, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """`evaluate --out` into another run's folder overwrote its test_metrics.json, which
        then sat beside a checkpoint.pt it was not made from."""
        root, _ = synth_tree
        spec = _spec(root, n_splits=2)
        data = prepare_data(spec)
        run_fold(spec, _config(), 0, tmp_path / "a", data=data, progress=False)
        run_fold(spec, _config(lr=0.05), 1, tmp_path / "b", data=data, progress=False)
        run_cv(spec, _config(lr=0.05), tmp_path / "cv", folds=[0], progress=False)  # not a copy
        ckpt = tmp_path / "a" / "checkpoint.pt"
        before = {name: _files(tmp_path / name) for name in ("b", "cv")}

        def not_now(*args, **kwargs):
            raise AssertionError("the checkpoint was loaded before the folder was checked")

        with monkeypatch.context() as patch:
            patch.setattr(experiments_module, "load_model", not_now)
            with pytest.raises(ValueError) as info:
                evaluate_checkpoint(ckpt, out_dir=tmp_path / "b", device="cpu",
                                    progress=False)
            assert str(info.value) == (
                f"cannot write the report of checkpoint {str(ckpt)!r} into "
                f"{str(tmp_path / 'b')!r}: expected a new folder or the checkpoint's own, "
                f"but it holds {str(tmp_path / 'b' / 'checkpoint.pt')!r}, another run's "
                f"checkpoint, whose test_metrics.json/.md and {PREDICTIONS_FILE} this "
                "would overwrite with reports it was not made from; choose another --out "
                "(a new folder)")
            with pytest.raises(ValueError) as info:
                evaluate_checkpoint(ckpt, out_dir=tmp_path / "cv", device="cpu",
                                    progress=False)
            assert str(info.value) == (
                f"cannot write the report of checkpoint {str(ckpt)!r} into "
                f"{str(tmp_path / 'cv')!r}: expected a new folder or the checkpoint's own, "
                "but it holds cv_metrics.json: a cross-validation's folder, not one run's; "
                "choose another --out (a new folder)")
            with pytest.raises(ValueError, match="another run's checkpoint"):
                evaluate_checkpoint(ckpt, out_dir=tmp_path / "cv" / "fold0", device="cpu",
                                    progress=False)
        assert {name: _files(tmp_path / name) for name in ("b", "cv")} == before
        assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"),
                     "--device", "cpu", "--no-progress"]) == 2
        # a file that is no checkpoint is said to be one, not its folder to be the wrong --out
        # (a cv folder's cv_metrics.json given as the checkpoint was told to choose another --out)
        from breakhis.checkpoint import NotACheckpointError
        from breakhis.plots import check_figures_folder

        summary = tmp_path / "cv" / "cv_metrics.json"
        with pytest.raises(NotACheckpointError, match=rf"^{re.escape(repr(str(summary)))} is not a breakhis "
                           "checkpoint"):
            evaluate_checkpoint(summary, device="cpu", progress=False)
        with pytest.raises(NotACheckpointError, match="is not a breakhis checkpoint"):
            check_figures_folder(summary, tmp_path / "cv")
        with pytest.raises(FileNotFoundError):
            evaluate_checkpoint(tmp_path / "cv" / "nothing.pt", device="cpu", progress=False)
        assert _files(tmp_path / "cv") == before["cv"]
        assert _files(tmp_path / "b") == before["b"]
        # a new folder, the checkpoint's own, and a folder holding a copy of it are fine
        trained = json.loads((tmp_path / "a" / "test_metrics.json").read_text())
        for out in (tmp_path / "new", None, tmp_path / "copy"):
            if out == tmp_path / "copy":
                out.mkdir()
                shutil.copyfile(ckpt, out / "checkpoint.pt")
            report = evaluate_checkpoint(ckpt, out_dir=out, device="cpu", progress=False)
            written = (out or ckpt.parent) / "test_metrics.json"
            assert json.loads(written.read_text())["checkpoint"] == trained["checkpoint"]
            assert report["metrics"] == trained["metrics"]


class TestEvaluateUnderTorchrun:
    def test_the_main_process_alone_evaluates(self, synth_tree, tmp_path: Path) -> None:
        """evaluate_checkpoint called from a user's script started by torchrun had every
        process load the model, predict every test image and write the same reports."""
        import os
        import subprocess
        import sys

        root, _ = synth_tree
        run_fold(_spec(root, n_splits=2), _config(), 0, tmp_path / "run", progress=False)
        script = tmp_path / "evaluate.py"
        script.write_text(
            "import json, os, sys\n"
            "from breakhis import experiments\n"
            "predicted = []\n"
            "real = experiments.predict_probs\n"
            "experiments.predict_probs = lambda *a, **k: predicted.append(1) or real(*a, **k)\n"
            "report = experiments.evaluate_checkpoint(sys.argv[1], out_dir=sys.argv[2], "
            "device='cpu', progress=False)\n"
            "print(json.dumps([int(os.environ['RANK']), report is None, len(predicted)]))\n",
            encoding="utf-8")
        out = tmp_path / "evaluated"
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(script), str(tmp_path / "run" / "checkpoint.pt"), str(out)],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = sorted(json.loads(line) for line in done.stdout.splitlines() if line.startswith("["))
        assert lines == [[0, False, 1], [1, True, 0]]
        written = json.loads((out / "test_metrics.json").read_text())
        assert written["metrics"] == json.loads(
            (tmp_path / "run" / "test_metrics.json").read_text())["metrics"]
