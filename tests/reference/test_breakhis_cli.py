"""What ``breakhis-repro`` tells a user: settings named as its options, cheap checks before
the data are indexed (and before torch is imported), the split sizes in the training log,
plurals, and inputs that do not exist.

Runs use the synthetic tree of real PNG files and the ``tiny`` backbone (seconds).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from breakhis import experiments
from breakhis._files import LOCK_NAME, FolderLock, SettingError
from breakhis.checkpoint import load_checkpoint, save_checkpoint
from breakhis.cli import _option_name, build_parser, main
from breakhis.experiments import DataSpec, check_resume, run_cv, run_fold
from breakhis.models import build_network
from breakhis.plots import results_table
from breakhis.tasks import get_task
from breakhis.train import TrainConfig

pytest.importorskip("bilinearpool")

TINY = ["--backbone", "tiny", "--no-pretrained", "--input-size", "16", "--batch-size", "8",
        "--lr", "0.05", "--no-progress"]
#: MSBC at 40X, 3 patient folds: fold 0's validation images are all benign (the tree's
#: seed fixes it), fold 1's hold both classes.
MSBC = ["--task", "MSBC", "--magnification", "40", "--n-splits", "3"]


@pytest.fixture
def indexed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records every indexing of the data (``prepare_data``), which then fails."""
    calls: list[int] = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the data were indexed")

    monkeypatch.setattr(experiments, "prepare_data", refuse)
    return calls


@pytest.fixture(scope="module")
def run(synth_tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run of fold 0 (MSBC at 40X), trained by the command line."""
    root, _ = synth_tree
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data-root", str(root), *MSBC, "--fold", "0", "--epochs", "1",
                 *TINY, "--out", str(out)]) == 0
    return out


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().err


class TestSettingNames:
    """``breakhis-repro train --task MSBC`` said ``magnification must be one of ...``: the
    settings' names, not the options the user types."""

    def test_setting_error(self) -> None:
        err = SettingError("input_size", "must be >= 8, but got 4")
        assert isinstance(err, ValueError) and err.setting == "input_size"
        assert str(err) == "input_size must be >= 8, but got 4"
        assert err.named("--input-size") == "--input-size must be >= 8, but got 4"
        again = pickle.loads(pickle.dumps(err))
        assert (str(again), again.setting) == (str(err), "input_size")

    @pytest.mark.parametrize("argv, message", [
        (["train", "--task", "MSBC"],
         "--magnification must be one of (40, 100, 200, 400) for task MSBC, which is "
         "magnification-specific, but none was given"),
        (["cv", "--task", "MSFC"],
         "--magnification must be one of (40, 100, 200, 400) for task MSFC, which is "
         "magnification-specific, but none was given"),
        (["train", "--task", "MIFC", "--magnification", "40"],
         "--magnification must not be given for task MIFC, which uses all magnifications"),
        (["train", *TINY, "--input-size", "4"], "--input-size must be >= 8, but got 4"),
        (["train", "--backbone", "inception_v3", "--no-pretrained", "--input-size", "32"],
         "--input-size must be >= 75 for backbone 'inception_v3', but got 32"),
        (["cv", *TINY, "--plateau-patience", "0"], "--plateau-patience must be >= 1"),
        (["train", *TINY, "--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["train", *TINY, "--se-reduction", "0"], "--se-reduction must be >= 1"),
        (["train", *TINY, "--split-seed", "-1"],
         "--split-seed must be an integer in [0, 2**32 - 1]"),
        (["cv", *TINY, "--val-fraction", "1"], "--val-fraction must be a number in [0, 1)"),
        (["train", *TINY, "--n-splits", "1"], "--n-splits must be an integer >= 2 (folds of "
         "protocols 'image' and 'patient'), but got 1"),
        (["cv", *TINY, "--protocol", "image", "--n-splits", "-3"],
         "--n-splits must be an integer >= 2"),
        # found after indexing before (minutes on the real data)
        (["train", "--backbone", "resnet18", "--weights", "no/such.pth", "--input-size", "32"],
         "--weights must be weights backbone 'resnet18' can be built with, but got 'no/such.pth': "
         "weights file 'no/such.pth' does not exist"),
        # --se alone is named so (it said --se-reduction, which was not given)
        (["train", *TINY, "--se"], "--se does not apply to backbone 'tiny', which has no blocks SE "
         "goes into (ResNet, Inception-v3, Inception-ResNet): drop --se"),
        (["train", *TINY, "--se-reduction", "4"], "--se-reduction must be None for backbone "
         "'tiny', whose convolutions are no blocks SE goes into"),
        (["cv", "--backbone", "vgg11", "--no-pretrained", "--se-reduction", "4", "--input-size", "32"],
         "--se-reduction must be None for backbone 'vgg11' (no SE blocks), but got 4: "
         "insert_se_blocks found no supported block"),
        (["cv", "--backbone", "resnet18", "--weights", "IMAGENET1K_V9", "--input-size", "32"],
         "--weights must be weights backbone 'resnet18' can be built with, but got "
         "'IMAGENET1K_V9': unknown weights 'IMAGENET1K_V9' for 'resnet18'"),
    ])
    def test_train_and_cv_name_their_options_before_indexing(
        self, argv: list[str], message: str, tmp_path: Path, indexed: list[int],
        capsys: pytest.CaptureFixture[str]
    ) -> None:
        command = argv[0]
        assert main([*argv, "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
        err = _err(capsys)
        assert f"breakhis-repro {command}: error: {message}" in err, err
        assert not indexed and not (tmp_path / "r").exists()

    def test_a_weights_file_that_is_none_is_refused_before_indexing(
        self, tmp_path: Path, indexed: list[int], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--weights`` naming an empty file, a zip archive cut short or a text file gave an
        EOFError traceback, torch's "PytorchStreamReader failed reading zip archive", or
        "holds pickled objects" for text, after indexing (minutes on the real data): now one
        line naming the file and what is wrong, status 2, before indexing."""
        import io

        import torch

        saved = io.BytesIO()
        torch.save({"w": torch.arange(1000.0)}, saved)
        for content, problem in [
            (b"", "it is empty (0 bytes)"),
            (saved.getvalue()[:2000], "it is a zip archive, damaged or cut short"),
            (b"Not Found\n", "it is not a file torch.save wrote: neither a zip archive"),
        ]:
            weights = tmp_path / "w.pt"
            weights.write_bytes(content)
            argv = ["train", "--backbone", "resnet18", "--weights", str(weights), "--input-size", "32"]
            assert main([*argv, "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
            err = _err(capsys)
            assert err.startswith(
                f"breakhis-repro train: error: --weights must be weights backbone 'resnet18' can be built "
                f"with, but got {str(weights)!r}: weights file {str(weights)!r} is not a state_dict file: "
                f"{problem}"
            ), err
            assert err.count("\n") == 1 and "Traceback" not in err, err
        assert not indexed and not (tmp_path / "r").exists()

    @pytest.mark.parametrize("argv, message", [
        (["--size", "4x4"], "--size must be at least 8x8 pixels, but got 4x4"),
        (["--images-per-magnification", "0"], "--images-per-magnification must be >= 1"),
        (["--seed", "-1"], "--seed must be an integer >= 0 (NumPy's random generator), but got -1"),
        (["--size", "100000x100000"], "--size must be at most 4096x4096 pixels (the release has "
                                      "700x460), but got 100000x100000"),
    ])
    def test_synth_names_its_options(self, argv: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing is made: a negative seed left a folder with the marker in it, which
        refused the next try as not empty (a size too big ended in a MemoryError)."""
        assert main(["synth", "--out", str(tmp_path / "a" / "s"), *argv]) == 2
        assert f"synth: error: {message}" in _err(capsys)
        assert list(tmp_path.iterdir()) == []

    def test_every_setting_of_train_and_cv_is_named_as_an_option(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A setting maps to an option the command has; the settings without one keep
        their names."""
        parser = build_parser()
        for command in ("train", "cv"):
            with pytest.raises(SystemExit):
                build_parser().parse_args([command, "--help"])
            help_text = capsys.readouterr().out
            names = [f.name for cls in (TrainConfig, DataSpec) for f in fields(cls)]
            unnamed = set()
            for name in names:
                option = _option_name(parser, command, name)
                if option == name:
                    unnamed.add(name)
                else:
                    assert option == "--" + name.replace("_", "-") and option in help_text
            # flags that switch a setting off (--no-augment), and settings without options
            assert unnamed == {"oversample", "augment", "shift", "deterministic", "verify"}

    def test_commands_that_read_checkpoints_name_their_own_options(self) -> None:
        """evaluate, predict and figures name the options they have; a setting they read
        from the checkpoint, which no option of theirs sets, keeps its name (figures said
        ``--seed``, but the mapping said ``seed``)."""
        parser = build_parser()
        for command, setting, name in [
            ("figures", "seed", "--seed"), ("figures", "out_dir", "--out"),
            ("figures", "max_embedding_dim", "--max-embedding-dim"),
            ("figures", "input_size", "input_size"),
            ("predict", "batch_size", "--batch-size"), ("predict", "out_csv", "--out"),
            ("predict", "inputs", "inputs"), ("predict", "magnification", "magnification"),
            ("evaluate", "task", "task"), ("evaluate", "seed", "seed"),
            ("table", "run_dirs", "run_dirs"),
        ]:
            assert _option_name(parser, command, setting) == name, (command, setting)

    def test_predict_names_its_options(self, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
        checkpoint = tmp_path / "c.pt"
        checkpoint.write_bytes(b"")  # the batch size is checked before it is read
        assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path),
                     "--batch-size", "0", "--out", str(tmp_path / "p.csv")]) == 2
        assert ("predict: error: --batch-size must be an integer >= 1, but got 0\n"
                in _err(capsys))
        (tmp_path / "afile").write_text("")
        assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path),
                     "--out", str(tmp_path / "afile" / "p.csv")]) == 2
        assert (f"predict: error: --out expects the path of a CSV file in a folder, but "
                f"{str(tmp_path / 'afile')!r} is a file") in _err(capsys)

    def test_the_library_keeps_its_own_names(self) -> None:
        with pytest.raises(SettingError, match="^input_size must be >= 8, but got 4$"):
            TrainConfig(backbone="tiny", weights=None, input_size=4)
        with pytest.raises(SettingError, match="^magnification must be one of") as info:
            get_task("MSBC")
        assert info.value.setting == "magnification"


class TestBeforeIndexing:
    """``train --backbone resnet5O`` indexed and read every image, and printed data
    warnings, before it said the backbone is unknown; a --resume with other settings,
    too."""

    def test_unknown_backbone(self, tmp_path: Path, indexed: list[int],
                              capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["train", "--data-root", str(tmp_path), "--backbone", "resnet5O",
                     "--no-pretrained"]) == 2
        err = _err(capsys)
        assert ("train: error: --backbone must be 'tiny' or a name "
                "bilinearpool.build_backbone resolves") in err
        assert "but got 'resnet5O': unknown backbone 'resnet5O' (did you mean 'resnet50'" in err
        assert "data:" not in err
        assert not indexed

    def test_backbone_names_are_checked_as_bilinearpool_resolves_them(self) -> None:
        for name in ("tiny", "resnet18", "inception_v3", "inception_resnet_v2",
                     "timm:resnet18.a1_in1k", "resnet18.a1_in1k"):
            assert TrainConfig(backbone=name, weights=None).backbone == name
        for name in ("resnet5O", "timm:resnet5O", "timm:"):
            with pytest.raises(SettingError, match=rf"^backbone must be .*but got '{name}'"):
                TrainConfig(backbone=name, weights=None)

    def test_pretrained_weights_for_tiny(self, tmp_path: Path, indexed: list[int],
                                         capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SettingError, match="^weights must be None for backbone 'tiny'"):
            TrainConfig(backbone="tiny")
        for weights in ("imagenet", "weights.pt"):  # build_network refused "imagenet" only
            with pytest.raises(SettingError, match="^weights must be None for backbone 'tiny'"):
                build_network("plain", "tiny", num_classes=2, weights=weights)
        # the command line says --backbone tiny needs --no-pretrained, not that --weights
        # (never given: its default) must be None; --weights given is named as given
        assert main(["train", "--data-root", str(tmp_path), "--backbone", "tiny"]) == 2
        err = _err(capsys)
        assert err == ("breakhis-repro train: error: --backbone tiny has no pretrained weights "
                       "(it starts from random weights), but without --no-pretrained a run starts "
                       "from pretrained ones ('imagenet', the --weights default); pass "
                       "--no-pretrained\n")
        assert main(["cv", "--data-root", str(tmp_path), "--backbone", "tiny",
                     "--weights", "w.pt"]) == 2
        assert _err(capsys) == ("breakhis-repro cv: error: --weights 'w.pt' loads the weights to "
                                "start from, but --backbone tiny has no pretrained weights (it "
                                "starts from random weights); drop --weights and pass "
                                "--no-pretrained\n")
        # with --no-pretrained too: not told to drop --no-pretrained (which led to the above)
        assert main(["cv", "--data-root", str(tmp_path), "--backbone", "tiny", "--no-pretrained",
                     "--weights", "w.pt"]) == 2
        assert _err(capsys) == ("breakhis-repro cv: error: --weights 'w.pt' loads the weights to "
                                "start from, but --backbone tiny has no pretrained weights (it "
                                "starts from random weights); drop --weights\n")
        assert not indexed

    def test_a_name_close_to_tiny_suggests_it(self, tmp_path: Path, indexed: list[int],
                                              capsys: pytest.CaptureFixture[str]) -> None:
        """``--backbone tinny`` suggested bilinearpool's close names only ('tinynet_e',
        ...), not this package's own ``tiny``; now it comes first, before theirs."""
        assert main(["train", "--data-root", str(tmp_path), "--backbone", "tinny",
                     "--no-pretrained"]) == 2
        err = _err(capsys)
        assert ("train: error: --backbone must be 'tiny' or a name bilinearpool.build_backbone "
                "resolves, but got 'tinny' (did you mean 'tiny'?): unknown backbone 'tinny' (did "
                "you mean 'tinynet_") in err
        assert not indexed
        for name in ("TINY", "ti-ny"):  # as bilinearpool compares names
            with pytest.raises(SettingError, match=rf"but got '{name}' \(did you mean 'tiny'\?\)"):
                TrainConfig(backbone=name, weights=None)
        with pytest.raises(SettingError) as info:  # not for names far from it
            TrainConfig(backbone="resnet5O", weights=None)
        assert "'tiny'?" not in str(info.value)

    @pytest.mark.parametrize("command", ["train", "cv"])
    def test_a_folds_file_that_is_not_there(self, command: str, synth_tree, tmp_path: Path,
                                            indexed: list[int],
                                            capsys: pytest.CaptureFixture[str]) -> None:
        """``--protocol official --folds-file nope.txt`` indexed the data (minutes on the
        real data: every image decoded and hashed) before it said ``No such file or
        directory: 'nope.txt'``, without naming the option; a folder said ``Is a
        directory``."""
        root, _ = synth_tree
        base = [command, "--data-root", str(root), *TINY, "--protocol", "official",
                "--out", str(tmp_path / "r"), "--folds-file"]
        expected = "--folds-file must name fold tables (Folds.csv or dsfold1..5.txt), but "
        missing = str(tmp_path / "nope.txt")
        for tables, problem in (([missing], f"{missing!r} does not exist"),
                                ([str(root / "dsfold1.txt"), missing], f"{missing!r} does not exist"),
                                ([str(tmp_path)], f"{str(tmp_path)!r} is a folder, not a file")):
            assert main([*base, *tables]) == 2
            assert _err(capsys) == f"breakhis-repro {command}: error: {expected}{problem}\n"
        if command == "train":  # with --resume too
            assert main([*base, missing, "--resume"]) == 2
            assert _err(capsys) == f"breakhis-repro train: error: {expected}{missing!r} does not exist\n"
        assert not indexed and not (tmp_path / "r").exists()

    def test_a_patients_csv_that_is_not_there_is_named(self, tmp_path: Path, indexed: list[int],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
        """A folder said ``expected a patient CSV file, but ... is a folder``, and a missing
        file ``patient CSV ... does not exist``: neither named ``--patients-csv``."""
        expected = "--patients-csv must name a CSV file (columns path, patient), but "
        for command in ("index", "train", "cv"):
            for csv, problem in ((tmp_path / "p.csv", f"{str(tmp_path / 'p.csv')!r} does not exist"),
                                 (tmp_path, f"{str(tmp_path)!r} is a folder, not a file")):
                assert main([command, "--data-root", str(tmp_path), "--image-folder",
                             "--patients-csv", str(csv)]) == 2
                assert _err(capsys) == f"breakhis-repro {command}: error: {expected}{problem}\n"
        assert not indexed

    def test_prepare_data_checks_the_fold_tables_before_indexing(
        self, synth_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The library, too (and ``evaluate`` of a checkpoint that records no file lists,
        which draws its fold again)."""
        root, _ = synth_tree
        monkeypatch.setattr(experiments, "_index_task", lambda *a, **k: pytest.fail("indexed"))
        spec = DataSpec(str(root), protocol="official", folds_file=(str(tmp_path / "no.txt"),))
        with pytest.raises(SettingError, match=r"^folds_file must name fold tables \(Folds\.csv or "
                           r"dsfold1\.\.5\.txt\), but '.*no\.txt' does not exist$"):
            experiments.prepare_data(spec)
        # one that is there but not in the format, or not text, is read before indexing too
        # (it was read by make_splits, after every image was decoded and hashed)
        bad = tmp_path / "dsfold1.txt"
        bad.write_text("SOB_B_A-14-22549AB-40-001.png|40|1|train\nnot a line of the table\n")
        with pytest.raises(ValueError, match=r"on line 2 of '.*dsfold1\.txt', but got 'not a line of the table'"):
            experiments.prepare_data(replace(spec, folds_file=(str(bad),)))
        bad.write_bytes(b"PK\x03\x04\xff\xfe binary")
        with pytest.raises(ValueError, match=r"^expected a fold table as UTF-8 text .*, but '.*dsfold1\.txt' is "
                           r"not UTF-8 \(invalid start byte at byte 4\): save it as UTF-8 text$"):
            experiments.prepare_data(replace(spec, folds_file=(str(bad),)))

    def test_resume_with_other_settings(self, run: Path, synth_tree, indexed: list[int],
                                        capsys: pytest.CaptureFixture[str]) -> None:
        root, _ = synth_tree
        before = run.joinpath("checkpoint.pt").read_bytes()
        base = ["train", "--data-root", str(root), *MSBC, "--epochs", "2", *TINY, "--resume"]
        for changed, difference in ((["--lr", "0.01"], "checkpoint has lr=0.05, this run 0.01"),
                                    (["--split-seed", "3"],
                                     "checkpoint has data.split_seed=0, this run 3"),
                                    (["--fold", "1"], "checkpoint has fold=0, this run 1")):
            assert main([*base, *changed, "--out", str(run)]) == 2
            err = _err(capsys)
            assert (f"train: error: cannot resume from {str(run / 'checkpoint.pt')!r}: it was "
                    "made with other settings (") in err and difference in err
        # the classes of another task
        assert main([*base, "--task", "MSFC", "--out", str(run)]) == 2
        err = _err(capsys)
        assert "checkpoint has classes=<2 entries>, this run <8 entries>" in err
        assert "checkpoint has task.name='MSBC', this run 'MSFC'" in err
        assert not indexed and run.joinpath("checkpoint.pt").read_bytes() == before

    def test_library_resume_with_other_settings(self, run: Path, synth_tree, tmp_path: Path,
                                                indexed: list[int]) -> None:
        root, _ = synth_tree
        spec = DataSpec(str(root), task="MSBC", magnification=40, n_splits=3)
        state = load_checkpoint(run / "checkpoint.pt")
        config = TrainConfig.from_dict(state["config"])
        other = TrainConfig.from_dict({**state["config"], "lr": 0.01})
        check_resume(spec, TrainConfig.from_dict({**state["config"], "epochs": 3}), run,
                     fold=0)  # more epochs: may continue
        check_resume(spec, other, tmp_path, fold=0)  # no checkpoint: nothing to compare
        with pytest.raises(ValueError, match="cannot resume from .*lr=0.05, this run 0.01"):
            run_fold(spec, other, 0, run, resume=True, progress=False)
        cv = tmp_path / "cv"
        shutil.copytree(run, cv / "fold0")
        with pytest.raises(ValueError, match=r"cannot reuse fold 0 in .*fold0'.*lr=0.05, "
                           "this run 0.01"):
            run_cv(spec, other, cv, resume=True, progress=False)
        (cv / "fold0" / "checkpoint.pt").unlink()
        with pytest.raises(ValueError, match="settings that made it cannot be checked"):
            run_cv(spec, config, cv, folds=[0], resume=True, progress=False)
        assert not indexed


def _classes_of(paths: list[str]) -> list[str]:
    return ["benign" if "/benign/" in p else "malignant" for p in paths]


class TestSplitLog:
    """The README's demo run showed a validation accuracy of 0.0000 in every epoch, and its
    log said neither how many validation images there were nor of which classes (all of
    one)."""

    def test_sizes_per_class_and_the_class_validation_lacks(self, run: Path) -> None:
        files = load_checkpoint(run / "checkpoint.pt")["extra"]["files"]
        parts = []
        for name, key in (("training", "train"), ("validation", "val"), ("test", "test")):
            classes = _classes_of(files[key])
            parts.append(f"{name} {len(classes)} images (benign {classes.count('benign')}, "
                         f"malignant {classes.count('malignant')})")
        assert set(_classes_of(files["val"])) == {"benign"}  # as the tree's seed draws it
        sizes = f"INFO fold 0 (patient protocol): {'; '.join(parts)}"
        lacking = (f"WARNING fold 0: no validation image (of {len(files['val'])}) is of "
                   "class ['malignant'], which the training images include: the "
                   "validation loss and accuracy, which drive the learning-rate schedule, say "
                   "nothing of it")
        log = (run / "train.log").read_text()
        assert log.count(sizes) == 1 and log.count(lacking) == 1
        assert log.index(sizes) < log.index(lacking) < log.index("epoch 1/1")

    def test_a_fold_with_every_class_everywhere_warns_nothing(
        self, synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        root, _ = synth_tree
        assert main(["train", "--data-root", str(root), *MSBC, "--fold", "1", "--epochs", "1",
                     *TINY, "--out", str(tmp_path)]) == 0
        err = _err(capsys)  # the console shows what train.log holds
        assert "fold 1 (patient protocol): training " in err and "no validation" not in err
        assert "no test image" not in err and "no training image" not in err

    def test_lines(self) -> None:
        classes = ("benign", "malignant", "other")
        data = SimpleNamespace(task=SimpleNamespace(classes=classes),
                               targets=np.array([0, 1, 0, 1, 1, 2, 0]))
        plan = SimpleNamespace(fit=np.array([0, 1, 2]), val=np.array([], dtype=np.int64),
                               split=SimpleNamespace(test=np.array([4, 5]),
                                                     protocol="image"),
                               extra={"protocol": {"protocol": "image", "patient_disjoint": False,
                                                   "notes": []}})
        lines = experiments._split_lines(data, plan, 2)
        assert lines == [
            (logging.INFO, "fold 2 (image protocol): training 3 images (benign 2, malignant "
             "1, other 0); validation none (the training loss drives the learning-rate "
             "schedule); test 2 images (benign 0, malignant 1, other 1)"),
            (logging.WARNING, "fold 2: no test image (of 2) is of class ['benign'], which "
             "the training images include: the test metrics say nothing of it"),
            (logging.WARNING, "fold 2: no training image is of class ['other'], which the "
             "test images include: the model is never trained on it"),
        ]
        plan.val = np.array([3])
        assert "validation 1 image (benign 0, malignant 1, other 0)" in \
            experiments._split_lines(data, plan, 2)[0][1]
        plan.val = np.array([5])
        assert experiments._split_lines(data, plan, 2)[1][1].startswith(
            "fold 2: no validation image (of 1) is of classes ['benign', 'malignant'], which "
            "the training images include: the validation loss and accuracy, which drive the "
            "learning-rate schedule, say nothing of them (a larger val_fraction, "
            "--val-fraction, holds out more images; 0 uses the training loss)")
        plan.split.protocol = "patient"  # whole patients are held out there
        assert "holds out more patients;" in experiments._split_lines(data, plan, 2)[1][1]


class TestPlurals:
    def test_cv_of_one_fold(self, synth_tree, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
        """cv printed "accuracy: ... over 1 folds"."""
        root, _ = synth_tree
        assert main(["cv", "--data-root", str(root), *MSBC, "--folds", "1", "--epochs", "1",
                     *TINY, "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "% over 1 fold\n" in out and "folds" not in out.split("protocol:")[0]

    def test_predict_of_one_image(self, run: Path, synth_tree, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
        root, meta = synth_tree
        image = next((root / meta["images_root"]).rglob("*-40-001.png"))
        assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), str(image),
                     "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
        assert " for 1 image to " in capsys.readouterr().out


class TestCvConsole:
    def test_data_lines_once_on_the_console_and_in_every_folds_log(
            self, synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Every fold printed the data's issues again (5 folds: five times the same lines);
        each fold's train.log still has them."""
        root, _ = synth_tree
        assert main(["cv", "--data-root", str(root), *MSBC, "--folds", "0", "1", "--epochs", "1",
                     *TINY, "--out", str(tmp_path)]) == 0
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("data: ") and "left out" in x]
        assert err.count(line) == 1 and err.index(line) < err.index("fold 1 (2/2)")
        log = (tmp_path / "fold0" / "train.log").read_text()
        assert err.count("data warning: ") == log.count("data warning: ")
        for fold in (0, 1):
            assert line in (tmp_path / f"fold{fold}" / "train.log").read_text()


class TestMissingInputs:
    def test_predict_says_in_words_what_it_found(self, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """It printed ``found none in ['no_such_dir/']; ['no_such_dir: does not exist']``."""
        checkpoint = tmp_path / "c.pt"
        checkpoint.write_bytes(b"")  # the inputs are collected before it is read
        missing = [f"{tmp_path}/a/", *(str(tmp_path / name) for name in "bcde")]
        assert main(["predict", "--checkpoint", str(checkpoint), missing[0]]) == 2
        assert (f"predict: error: expected image files or folders with images, but found "
                f"none in {missing[0]!r} ({tmp_path / 'a'}: does not exist)\n") in _err(capsys)
        assert main(["predict", "--checkpoint", str(checkpoint), *missing]) == 2
        err = _err(capsys)
        assert (f"none in {missing[0]!r}, {missing[1]!r}, {missing[2]!r} and 2 more "
                f"({tmp_path / 'a'}: does not exist; {missing[1]}: does not exist; "
                f"{missing[2]}: does not exist and 2 more)") in err and "[" not in err

    def test_table_says_a_folder_does_not_exist(self, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        """``table runs/nothere`` said the folder "has no metrics"."""
        missing, afile = tmp_path / "nothere", tmp_path / "afile"
        afile.write_text("")
        for path, problem in ((missing, "does not exist"), (afile, "is a file, not a folder")):
            assert main(["table", str(path)]) == 2
            err = _err(capsys)
            assert (f"table: error: expected a run folder (of `breakhis-repro cv`, `train` or "
                    f"`evaluate`), but {str(path)!r} {problem}") in err
            assert "has no metrics" not in err
            with pytest.raises(FileNotFoundError, match=problem):
                results_table([path])

    @pytest.mark.parametrize("command", ["index", "train", "cv", "index-image-folder", "evaluate", "figures"])
    def test_a_data_root_that_does_not_exist(self, command: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
        """The error named no option (``expected a BreaKHis folder, but ...``); it names
        ``--data-root`` now, before anything is written."""
        (tmp_path / "checkpoint.pt").write_bytes(b"")
        args = {"train": [*TINY, "--out", str(tmp_path / "run")], "cv": [*TINY, "--out", str(tmp_path / "run")],
                "index-image-folder": ["--image-folder"],
                "evaluate": ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "run")],
                "figures": ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "run")],
                }.get(command, [])  # fmt: skip
        name = command.split("-")[0]
        moved = "the folder of the run's data (where it moved since training)"
        what = {"index-image-folder": "an image folder (root/<class>/<image>)", "evaluate": moved,
                "figures": moved}.get(command, "a BreaKHis folder")  # fmt: skip
        assert main([name, "--data-root", str(tmp_path / "none"), *args]) == 2
        assert (f"{name}: error: --data-root must name {what}, but "
                f"{str(tmp_path / 'none')!r} does not exist") in _err(capsys)
        assert not (tmp_path / "run").exists()

    def test_a_data_root_this_user_cannot_read(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
        """index said "no images found ... pass --image-folder" after a skipped-folder line;
        the folder's permissions are the problem. Root reads any folder: run as root, the
        permission check (os.access) is told what a user without root's override gets."""
        import breakhis._files as files

        root = tmp_path / "BreaKHis_v1"
        root.mkdir()
        root.chmod(0)
        if os.geteuid() == 0:
            real = os.access
            monkeypatch.setattr(files.os, "access", lambda p, mode: Path(p) != root and real(p, mode))
        try:
            assert main(["index", "--data-root", str(root)]) == 2
        finally:
            root.chmod(0o755)
        assert (f"index: error: --data-root must name a BreaKHis folder, but {str(root)!r} is a folder this user "
                "cannot read (permission denied)") in _err(capsys)

    def test_quick_refusals_import_no_torch(self, tmp_path: Path) -> None:
        """``evaluate --checkpoint missing.pt`` took seconds (torch and the models were
        imported) to say that the file does not exist."""
        missing = str(tmp_path / "missing.pt")
        commands = [["evaluate", "--checkpoint", missing],
                    ["predict", "--checkpoint", missing, str(tmp_path)],
                    ["table", str(tmp_path / "nothere")],
                    ["train", "--data-root", str(tmp_path), "--task", "MSBC"]]
        code = ("import json, sys\n"
                "from breakhis.cli import main\n"
                "out = []\n"
                f"for argv in {commands!r}:\n"
                "    out.append([main(argv), 'torch' in sys.modules])\n"
                "print(json.dumps(out))\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [[2, False]] * len(commands)
        errors = done.stderr.splitlines()
        assert errors[0] == f"breakhis-repro evaluate: error: checkpoint {missing!r} does not exist"
        assert errors[1] == f"breakhis-repro predict: error: checkpoint {missing!r} does not exist"
        assert "does not exist" in errors[2] and "--magnification" in errors[3]


@pytest.mark.parametrize("command, resumable", [("train", True), ("cv", True), ("index", False)])
def test_ctrl_c_is_one_line_and_status_130(command, resumable, monkeypatch, capsys, tmp_path):
    """Ctrl-C printed a KeyboardInterrupt traceback from wherever torch was; now one line
    (saying how to continue, for the commands that can) and the shell's status 130."""
    from breakhis import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, command, interrupted)
    argv = {"train": ["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")],
            "cv": ["cv", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")],
            "index": ["index", "--data-root", str(tmp_path)]}[command]
    if resumable:  # an epoch saved: train's checkpoint, or a fold's
        saved = tmp_path / "r" / ("checkpoint.pt" if command == "train" else "fold1/checkpoint.pt")
        saved.parent.mkdir(parents=True)
        saved.write_bytes(b"")
    assert main(argv) == 130
    err = _err(capsys).strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"breakhis-repro {command}: interrupted"), err
    assert ("--resume" in err[0]) == resumable
    if resumable:
        # stopped before any epoch was saved (while indexing): --resume had nothing to
        # continue, though the line said it would (helper-142)
        saved.unlink()
        assert main(argv) == 130
        assert _err(capsys).strip() == (f"breakhis-repro {command}: interrupted (before any epoch "
                                        "was saved: the same command starts afresh)")
        # --overwrite: the line says what the folder holds now (helper-150: it said the
        # replaced run was still there after --overwrite had removed it)
        line = f"breakhis-repro {command}: interrupted"

        def overwritten(replaced: bool, saves: bool) -> str:
            def stopped(args):
                if replaced:  # the earlier run's files removed, as the run does
                    saved.unlink(missing_ok=True)
                if saves:  # an epoch of this run saved
                    saved.write_bytes(b"")
                raise KeyboardInterrupt

            monkeypatch.setitem(cli._COMMANDS, command, stopped)
            saved.write_bytes(b"")  # the earlier run's
            os.utime(saved, (time.time() - 60,) * 2)
            assert main([*argv, "--overwrite"]) == 130
            return _err(capsys).strip()

        # stopped before the earlier run was removed: it is still there
        assert overwritten(False, False) == (
            f"{line} (before this run saved an epoch: the folder still holds the run it was "
            "to replace; repeat --overwrite to replace it)")
        # after removing it, before an epoch: nothing to continue
        assert overwritten(True, False) == (
            f"{line} (before any epoch was saved: the same command starts afresh)")
        # after an epoch of this run: --resume (with its settings) continues it
        assert overwritten(True, True) == (
            f"{line} (the same command with --resume instead of --overwrite continues from "
            "this run's last finished epoch)")
        if command == "cv":  # another fold of the old run left, or a copy beside: this run's tells
            (saved.parent.parent / "fold0.bak").mkdir()
            (saved.parent.parent / "fold0.bak" / "checkpoint.pt").write_bytes(b"")
            other = saved.parent.parent / "fold0" / "checkpoint.pt"
            other.parent.mkdir()
            other.write_bytes(b"")
            os.utime(other, (time.time() - 60,) * 2)
            assert overwritten(True, True) == (
                f"{line} (the same command with --resume instead of --overwrite continues from "
                "this run's last finished epoch)")
            other.unlink()
            assert overwritten(True, False) == (  # a fold0.bak is no fold of cv's
                f"{line} (before any epoch was saved: the same command starts afresh)")


@pytest.mark.parametrize("command", ["train", "cv"])
def test_a_process_left_when_another_stopped_says_so(command, monkeypatch, capsys, tmp_path):
    """Under torchrun, the processes left when one died (killed, out of memory) printed
    gloo's message with its C++ source path and 'Check the logs of the remote worker
    before reporting an issue'; now one line saying what happened and how to go on."""
    from breakhis import cli

    gloo = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
            "[127.0.0.1]:17802: Connection reset by peer. This is typically caused by a remote worker "
            "hanging or bugs in the application. Check the logs of the remote worker before reporting.")

    def dropped(args):
        raise RuntimeError(gloo)

    monkeypatch.setitem(cli._COMMANDS, command, dropped)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main([command, "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert _err(capsys).strip() == (
        f"breakhis-repro {command} (rank 0 of 2): error: another process of this torchrun run stopped "
        "(Read error [127.0.0.1]:17802: Connection reset by peer): its own message says why (before any "
        "epoch was saved: the same command starts afresh)")
    saved = tmp_path / "r" / ("checkpoint.pt" if command == "train" else "fold0/checkpoint.pt")
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")
    assert main([command, "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert _err(capsys).strip().endswith(
        "its own message says why (the same command with --resume continues from the last finished epoch)")
    # a weights download refused under torchrun is no peer lost (helper-152): said as it comes
    refused = ("could not obtain pretrained ImageNet weights for 'resnet50' (<urlopen error [Errno 111] "
               "Connection refused>)")

    def download_refused(args):
        raise RuntimeError(refused)

    monkeypatch.setitem(cli._COMMANDS, command, download_refused)
    assert main([command, "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert refused in err and "another process" not in err and "offline?" in err
    monkeypatch.setitem(cli._COMMANDS, command, dropped)
    # the same words outside torchrun are said as they come
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main([command, "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "pair.cc:545" in _err(capsys)


class TestSigterm:
    """SIGTERM (kill, a batch scheduler's time limit, torchrun stopping its workers) ended
    a run at once: no line on the console or in train.log, only status 143. It now ends
    a command as Ctrl-C does, said so."""

    @pytest.mark.parametrize("command, resumable", [("train", True), ("index", False)])
    def test_one_line_and_status_143(self, command: str, resumable: bool, monkeypatch,
                                     capsys, tmp_path: Path) -> None:
        import signal

        from breakhis import cli

        seen = []

        def terminated(args):
            seen.append(signal.getsignal(signal.SIGTERM))
            # by default SIGTERM would end pytest itself: fail the test instead
            assert seen[0] is not signal.SIG_DFL, "no SIGTERM handler during the command"
            signal.raise_signal(signal.SIGTERM)  # as kill does
            raise AssertionError("SIGTERM did not interrupt the command")

        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        monkeypatch.setitem(cli._COMMANDS, command, terminated)
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "checkpoint.pt").write_bytes(b"")  # an epoch saved
        argv = {"train": ["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")],
                "index": ["index", "--data-root", str(tmp_path)]}[command]
        assert main(argv) == 143
        err = _err(capsys).strip().splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"breakhis-repro {command}: terminated (SIGTERM)"), err
        assert ("--resume continues from the last finished epoch" in err[0]) == resumable
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def test_a_handler_of_the_caller_is_kept(self, monkeypatch, tmp_path: Path) -> None:
        import signal

        from breakhis import cli

        caught = []
        monkeypatch.setitem(cli._COMMANDS, "index",
                            lambda args: signal.raise_signal(signal.SIGTERM) or 0)
        previous = signal.signal(signal.SIGTERM, lambda *a: caught.append(a[0]))
        try:
            assert main(["index", "--data-root", str(tmp_path)]) == 0
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert caught == [signal.SIGTERM]

    def test_a_training_run_killed_says_so_and_resumes(self, synth_tree, tmp_path: Path) -> None:
        """A real `breakhis-repro train` (with a data-loading process) sent SIGTERM after its
        first epoch: status 143, one line, train.log's last line, the checkpoint intact and
        no temporary file left; --resume continues it."""
        import signal
        import time

        root, _ = synth_tree
        out = tmp_path / "run"
        argv = [sys.executable, "-m", "breakhis.cli", "train", "--data-root", str(root), *MSBC,
                "--fold", "0", *TINY, "--num-workers", "1", "--out", str(out)]
        proc = subprocess.Popen([*argv, "--epochs", "500"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not (out / "checkpoint.pt").is_file():
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "no epoch finished in 120 s"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 143, err[-2000:]
        assert err.strip().splitlines()[-1] == (
            "breakhis-repro train: terminated (SIGTERM) (the same command with --resume "
            "continues from the last finished epoch)")
        last = (out / "train.log").read_text().strip().splitlines()[-1]
        assert "terminated (SIGTERM); checkpoint.pt keeps the last finished epoch" in last, last
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        epoch = load_checkpoint(out / "checkpoint.pt")["epoch"]
        assert epoch < 499
        # the resume in this process (the run to stop had to be another one): no second start-up
        assert main([*argv[3:], "--epochs", str(epoch + 2), "--resume"]) == 0
        assert load_checkpoint(out / "checkpoint.pt")["epoch"] == epoch + 1


def test_a_warning_of_breakhis_is_one_line_of_the_command(run: Path, tmp_path: Path, capsys) -> None:
    """evaluate's warning on a checkpoint cut short came in Python's format (file:line:
    UserWarning, then a line of source), where the commands print `warning:` lines; and it
    advised --resume also for a run whose training diverged."""
    copy = shutil.copytree(run, tmp_path / "run")
    state = load_checkpoint(copy / "checkpoint.pt")
    state["config"]["epochs"] = 5  # as a run of 5 epochs ended after the first
    save_checkpoint(state, copy / "checkpoint.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["evaluate", "--checkpoint", str(copy / "checkpoint.pt"), "--out", str(tmp_path / "ev"),
                     "--no-progress"]) == 0
    lines = [line for line in _err(capsys).splitlines() if "warning" in line.lower()]
    assert len(lines) == 1 and "UserWarning" not in lines[0], lines
    assert lines[0].startswith("breakhis-repro evaluate: warning: checkpoint ")
    assert lines[0].endswith("resume the run with --resume to finish it, or, if its training diverged, "
                             "train again afresh with a lower --lr)")


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_a_warning_of_breakhis_is_said_by_the_main_process_only(rank, shown, capsys, monkeypatch) -> None:
    """Under torchrun every process meets the same data and printed the same warning."""
    import breakhis.splits
    from breakhis.cli import _warning_line

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    _warning_line("train")(UserWarning("the split is small"), UserWarning, breakhis.splits.__file__, 1)
    err = capsys.readouterr().err
    assert err == ("breakhis-repro train (rank 0 of 2): warning: the split is small\n" if shown else "")


def test_table_refuses_a_run_folder_given_twice(run: Path, capsys, monkeypatch) -> None:
    """`table r1 r1 ./r1` listed one run three times under one name, without a word."""
    monkeypatch.chdir(run.parent)
    assert main(["table", "run", "run"]) == 2
    assert "error: expected each run folder once, but 'run' is given twice" in _err(capsys)
    assert main(["table", "run", "./run"]) == 2
    assert "but './run' is given twice (also as 'run')" in _err(capsys)
    assert main(["table", "run"]) == 0


def test_table_out_does_not_replace_a_run_s_own_files(run: Path, capsys) -> None:
    """`table cv --out cv/cv_metrics.md` wrote over the cross-validation's own summary."""
    before = (run / "metrics.csv").read_bytes()
    assert main(["table", str(run), "--out", str(run / "metrics.md")]) == 2  # its CSV: metrics.csv
    assert (f"--out would write {str(run / 'metrics.csv')!r}, a file of the run in {str(run)!r} "
            "(beside its checkpoint.pt)") in _err(capsys)
    assert (run / "metrics.csv").read_bytes() == before and not (run / "metrics.md").exists()
    for _ in range(2):  # a file of its own in the run folder, written again: fine
        assert main(["table", str(run), "--out", str(run / "table.md")]) == 0
    (run / "table.md").unlink()
    (run / "table.csv").unlink()


@pytest.mark.parametrize("stop", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_synth_cut_short_leaves_nothing(stop: BaseException, tmp_path: Path, monkeypatch,
                                        capsys) -> None:
    """An error or Ctrl-C while writing left a partial tree (indexed as a smaller data set,
    a half-written PNG among it, no synthetic.json) and a folder that refused the retry."""
    from breakhis import synthetic

    written = []
    real = synthetic._write_png

    def write_png(path, pixels):
        if len(written) == 20:
            raise stop
        written.append(path)
        real(path, pixels)

    monkeypatch.setattr(synthetic, "_write_png", write_png)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "data", tmp_path / "empty"):
        written.clear()
        code = main(["synth", "--out", str(out), "--size", "8x8"])
        assert code == (130 if isinstance(stop, KeyboardInterrupt) else 2), _err(capsys)
        assert len(written) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # "new" made and removed
    assert list((tmp_path / "empty").iterdir()) == []
    monkeypatch.setattr(synthetic, "_write_png", real)
    assert main(["synth", "--out", str(tmp_path / "empty"), "--size", "8x8"]) == 0  # the retry
    assert (tmp_path / "empty" / "synthetic.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no staging folder left


def test_index_lists_the_files_left_out_with_why(synth_tree, capsys) -> None:
    """The help promised every file left out with why: the text showed --examples names per
    reason without their reasons and without saying how many more there were; --examples 0
    printed 'e.g.' and nothing, -1 dropped the last one."""
    root, meta = synth_tree
    assert main(["index", "--data-root", str(root), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "    not an image: 2\n      BreaKHis_v1/histology_slides/breast/.DS_Store (extension '(none)')\n" \
           "      ... and 1 more (--examples N shows more, --json lists all)\n" in out
    assert "SOB_M_PC-14-9146-400-999.png (image file is truncated)\n" in out
    assert main(["index", "--data-root", str(root), "--examples", "0"]) == 0
    out = capsys.readouterr().out
    assert "    not an image: 2\n    name outside grammar: 1\n    unreadable image: 1\n" in out
    with pytest.raises(SystemExit):
        main(["index", "--data-root", str(root), "--examples", "-1"])
    assert "argument --examples: expected an integer >= 0, but got '-1'" in capsys.readouterr().err


def test_index_of_unreadable_images_does_not_blame_their_names(tmp_path: Path, capsys) -> None:
    """A tree whose only, rightly named file is not a PNG: the hint said to use BreaKHis
    file names or --image-folder."""
    (tmp_path / "40X").mkdir()
    (tmp_path / "40X" / "SOB_B_A-14-22549AB-40-001.png").write_text("not a png")
    assert main(["index", "--data-root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "image sizes" not in out
    assert err == (f"breakhis-repro index: no readable images under {str(tmp_path)!r}: 1 file with an "
                   "image name could not be read as an image (the skipped files of reason 'unreadable "
                   "image')\n")


def test_table_out_that_cannot_be_written_names_it(run: Path, tmp_path: Path, monkeypatch,
                                                   capsys) -> None:
    """The error named the hidden temporary file ('/sys/.x.md.04r5kw95.tmp'), and one
    without a file there printed as "[Errno 2] No such file or directory: ..."."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".t.md.abcd1234.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["table", str(run), "--out", str(tmp_path / "t.md")]) == 2
    assert _err(capsys) == f"breakhis-repro table: error: Permission denied: {str(tmp_path / 't.md')!r}\n"
    monkeypatch.undo()
    if Path("/proc").is_dir():  # no file can be made there, even as root
        assert main(["table", str(run), "--out", "/proc/breakhis-table.md"]) == 2
        err = _err(capsys)
        assert err.startswith("breakhis-repro table: error: ") and "[Errno" not in err, err
        assert "'/proc/breakhis-table.md'" in err


def test_synth_into_the_current_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """`--out .` (an empty working folder) is written in place, with the umask's modes (a
    staged tree failed on '.', replaced an absolute working folder and came out 0700)."""
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        assert main(["synth", "--out", ".", "--size", "8x8", "--no-irregular"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "synthetic.json").is_file() and Path.cwd() == tmp_path
    assert oct((tmp_path / "BreaKHis_v1").stat().st_mode & 0o777) == "0o755"


def test_synth_out_as_a_link(tmp_path: Path, capsys) -> None:
    """A link to an empty folder takes the tree (as before the tree was staged); a broken
    link is named as one (was "File exists")."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "disk")
    assert main(["synth", "--out", str(tmp_path / "data"), "--size", "8x8"]) == 0
    assert (tmp_path / "disk" / "synthetic.json").is_file() and (tmp_path / "data").is_symlink()
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert main(["synth", "--out", str(tmp_path / "gone"), "--size", "8x8"]) == 2
    assert (f"synth: error: expected an output folder, but {str(tmp_path / 'gone')!r} is a symbolic "
            f"link to {str(tmp_path / 'nowhere')!r}, which does not exist") in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "disk", "gone"]


def test_a_path_option_with_a_tilde_is_under_home(run: Path, tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    """`--out=~/x` (no shell expansion after '=') made a folder named '~' in the working
    directory; --data-root was expanded, --out and the run folders were not."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out=~/data", "--size", "8x8", "--no-irregular"]) == 0
    assert f"data to {home / 'data'}:" in capsys.readouterr().out
    shutil.copytree(run, home / "run")
    assert main(["table", "~/run", "--out=~/table.md"]) == 0
    assert (home / "table.md").is_file() and (home / "table.csv").is_file()
    assert not (tmp_path / "~").exists()


def test_table_out_does_not_replace_a_config_or_an_evaluation(run: Path, tmp_path: Path, capsys) -> None:
    """`table run --out run/config.json` made the run's config Markdown, and an `evaluate
    --out` folder (no checkpoint there) lost its test_metrics.json to `table ev --out
    ev/test_metrics.json`."""
    config = (run / "config.json").read_bytes()
    assert main(["table", str(run), "--out", str(run / "config.json")]) == 2
    assert f"--out would write {str(run / 'config.json')!r}, a file of the run" in _err(capsys)
    assert (run / "config.json").read_bytes() == config and not (run / "config.csv").exists()
    evaluation = tmp_path / "ev"  # what evaluate --out writes
    evaluation.mkdir()
    for name in ("test_metrics.json", "test_metrics.md", "test_predictions.csv"):
        shutil.copy(run / name, evaluation / name)
    metrics = (evaluation / "test_metrics.json").read_bytes()
    assert main(["table", str(evaluation), "--out", str(evaluation / "test_metrics.json")]) == 2
    assert "(beside its test_metrics.json): pass another path" in _err(capsys)
    assert (evaluation / "test_metrics.json").read_bytes() == metrics
    assert main(["table", str(evaluation), "--out", str(evaluation / "table.md")]) == 0
    other = tmp_path / "proj"  # a config.json of something else: no run there
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert main(["table", str(run), "--out", str(other / "metrics.md")]) == 0


def test_table_out_does_not_replace_other_files(run: Path, tmp_path: Path, capsys) -> None:
    """`table run --out data/dsfold1.txt` replaced the official fold table with the
    Markdown (helper-142), and an --out beside a patient list replaced the list with the
    CSV; files that are not a table written before stay, a table is rewritten."""
    fold_table = tmp_path / "dsfold1.txt"
    fold_table.write_text("SOB_B_A-14-22549AB-40-001.png|40|1|train\n")
    patients = tmp_path / "patients.csv"
    patients.write_text("patient,label\n14-22549AB,B\n")
    for out, kept, starts in ((fold_table, fold_table, "# Results"), (tmp_path / "patients.md", patients, "run,")):
        before = kept.read_bytes()
        assert main(["table", str(run), "--out", str(out)]) == 2
        err = _err(capsys)
        assert f"--out {str(out)!r} would replace {str(kept)!r}, an existing file that is not a table" in err
        assert f"(it does not begin with '{starts}" in err and "pass another path, or remove the file" in err
        assert kept.read_bytes() == before and not out.with_suffix(".csv" if out == fold_table else ".md").exists()
    table = tmp_path / "results.md"
    assert main(["table", str(run), "--out", str(table)]) == 0
    first = table.read_text(), table.with_suffix(".csv").read_text()
    table.write_text("")  # empty: nothing to lose
    assert main(["table", str(run), "--out", str(table)]) == 0  # a table of before is rewritten
    assert (table.read_text(), table.with_suffix(".csv").read_text()) == first


class TestRunFolderLock:
    """Two runs writing into one --out at once mixed their files (helper-133: config.json
    of one run, checkpoint.pt, metrics and test reports of the other, train.log of both)."""

    @pytest.mark.parametrize("flag", [[], ["--resume"], ["--overwrite"]], ids=["fresh", "resume", "overwrite"])
    @pytest.mark.parametrize("command", ["train", "cv"])
    def test_a_folder_in_use_is_refused_before_indexing(
        self, synth_tree, tmp_path: Path, indexed: list[int], capsys, command: str, flag: list[str]
    ) -> None:
        out = tmp_path / "busy"
        other = FolderLock(out)  # the lock of a run in progress (its own open file)
        assert other.acquire()
        try:
            fold = ["--fold", "0"] if command == "train" else []
            assert main([command, "--data-root", str(synth_tree[0]), *MSBC, *fold, *TINY, *flag,
                         "--out", str(out)]) == 2
        finally:
            other.release()
        assert (f"{str(out)!r} is in use by another breakhis-repro train or cv run (it holds "
                ".breakhis-run.lock): wait for that run to end, or pass another --out") in _err(capsys)
        assert not indexed
        assert not out.exists()  # the other lock made it and left it empty

    def test_train_into_a_fold_of_a_cv_in_progress_is_refused(
        self, synth_tree, tmp_path: Path, indexed: list[int], capsys
    ) -> None:
        cv = tmp_path / "cv"
        other = FolderLock(cv)  # a cv run in progress holds its folder
        assert other.acquire()
        try:
            assert main(["train", "--data-root", str(synth_tree[0]), *MSBC, "--fold", "0", *TINY,
                         "--overwrite", "--out", str(cv / "fold0")]) == 2
        finally:
            other.release()
        assert f"lies in {str(cv.resolve())!r}, which another breakhis-repro run is using" in _err(capsys)
        assert not indexed and not (cv / "fold0").exists()

    def test_cv_holds_each_fold_it_trains_and_leaves_a_busy_fold_alone(
        self, synth_tree, run: Path, tmp_path: Path, capsys
    ) -> None:
        """A train --out cv/fold<k> in progress: cv --overwrite removed its checkpoint and
        lock file under it, and cv --resume trained into the same folder beside it."""
        root, _ = synth_tree
        cv = tmp_path / "cv"
        shutil.copytree(run, cv / "fold2")
        busy = FolderLock(cv / "fold2")  # a train into fold2, running
        assert busy.acquire()
        try:
            assert main(["cv", "--data-root", str(root), *MSBC, "--folds", "1", "--epochs", "1",
                         *TINY, "--out", str(cv), "--overwrite"]) == 0
            err = _err(capsys)
            assert f"left {cv / 'fold2'} as it is: another run is using it" in err
            assert (cv / "fold2" / "checkpoint.pt").is_file() and (cv / "fold2" / LOCK_NAME).is_file()
            assert FolderLock.busy(cv / "fold2")  # its lock is still the one held
            assert main(["cv", "--data-root", str(root), *MSBC, "--folds", "2", "--epochs", "1",
                         *TINY, "--out", str(cv), "--overwrite"]) == 2
            assert f"{str(cv / 'fold2')!r} is in use by another breakhis-repro train or cv run" in _err(capsys)
            assert (cv / "fold2" / "checkpoint.pt").read_bytes() == (run / "checkpoint.pt").read_bytes()
        finally:
            busy.release()

    def test_evaluate_into_a_folder_in_use_is_refused(
        self, run: Path, tmp_path: Path, indexed: list[int], capsys
    ) -> None:
        # before: an evaluation finishing after the run replaced its final report with an
        # older epoch's (helper-140)
        copy = tmp_path / "live"
        shutil.copytree(run, copy)
        before = (copy / "test_metrics.json").read_bytes()
        other = FolderLock(copy)  # a train --resume of that run, in progress
        assert other.acquire()
        try:
            assert main(["evaluate", "--checkpoint", str(copy / "checkpoint.pt")]) == 2
        finally:
            other.release()
        assert (f"the report folder {str(copy)!r} is in use by a train or cv run in progress"
                in _err(capsys))
        assert not indexed and (copy / "test_metrics.json").read_bytes() == before

    def test_the_lock_ends_with_the_run(self, run: Path, tmp_path: Path, indexed: list[int]) -> None:
        assert (run / LOCK_NAME).is_file()  # left in place, and no longer held:
        lock = FolderLock(run)
        assert lock.acquire()
        lock.release()
        assert (run / LOCK_NAME).is_file()
        # a run that stops before writing anything leaves no folder behind it
        out = tmp_path / "new" / "run"
        with pytest.raises(AssertionError, match="the data were indexed"):
            main(["train", "--data-root", str(run), *MSBC, "--fold", "0", *TINY, "--out", str(out)])
        assert indexed and not (tmp_path / "new").exists()


class TestOverwrite:
    """A fresh run replaces the run in its folder: a forgotten --resume lost a run of many
    epochs. Such a folder is now refused (before indexing) unless --resume or --overwrite."""

    def test_the_cli_names_the_checkpoint_as_train_does(self) -> None:
        from breakhis import cli
        from breakhis.train import CHECKPOINT_NAME

        assert cli._CHECKPOINT == CHECKPOINT_NAME

    def test_train_into_a_run_is_refused(self, run: Path, indexed: list[int], capsys) -> None:
        before = (run / "checkpoint.pt").stat().st_mtime_ns
        assert main(["train", "--data-root", str(run), *MSBC, "--fold", "0", *TINY,
                     "--out", str(run)]) == 2
        err = _err(capsys)
        assert f"{str(run)!r} holds a run (checkpoint.pt): pass --resume to continue it, " \
               "--overwrite to replace it with a fresh run, or another --out" in err
        assert not indexed and (run / "checkpoint.pt").stat().st_mtime_ns == before
        # both flags: one continues the run, the other replaces it
        assert main(["train", "--data-root", str(run), *MSBC, "--fold", "0", *TINY,
                     "--resume", "--overwrite", "--out", str(run)]) == 2
        assert "--resume continues the run in the folder and --overwrite replaces it" in _err(capsys)

    def test_cv_into_a_run_is_refused(self, run: Path, tmp_path: Path, indexed: list[int],
                                      capsys) -> None:
        cv = tmp_path / "cv"
        (cv / "fold2").mkdir(parents=True)
        shutil.copy(run / "checkpoint.pt", cv / "fold2" / "checkpoint.pt")
        assert main(["cv", "--data-root", str(run), *MSBC, *TINY, "--out", str(cv)]) == 2
        assert "holds a run (fold2/checkpoint.pt): pass --resume" in _err(capsys)
        assert not indexed

    def test_the_other_kind_of_run_is_refused_whatever_the_options(
            self, run: Path, tmp_path: Path, indexed: list[int], capsys) -> None:
        """train accepted a cross-validation's folder and cv a single run's: both kinds in
        one folder, of which `table` showed the cross-validation only."""
        cv = tmp_path / "cv"
        (cv / "fold0").mkdir(parents=True)
        shutil.copy(run / "checkpoint.pt", cv / "fold0" / "checkpoint.pt")
        for options in ([], ["--resume"], ["--overwrite"]):
            assert main(["train", "--data-root", str(run), *MSBC, "--fold", "0", *TINY, *options,
                         "--out", str(cv)]) == 2
            assert (f"{str(cv)!r} holds a cross-validation (fold0/checkpoint.pt), which train would "
                    "write its run beside") in _err(capsys)
            assert main(["cv", "--data-root", str(run), *MSBC, *TINY, *options, "--out", str(run)]) == 2
            assert f"{str(run)!r} holds a single run (checkpoint.pt), which cv would write" in _err(capsys)
        assert not indexed and not (cv / "checkpoint.pt").exists()

    def test_overwrite_starts_afresh(self, synth_tree, run: Path, tmp_path: Path) -> None:
        root, _ = synth_tree
        copy = shutil.copytree(run, tmp_path / "run")
        before = load_checkpoint(copy / "checkpoint.pt")["epoch"]
        assert main(["train", "--data-root", str(root), *MSBC, "--fold", "0", "--epochs", "1",
                     *TINY, "--seed", "1", "--out", str(copy), "--overwrite"]) == 0
        state = load_checkpoint(copy / "checkpoint.pt")
        assert state["epoch"] == before and state["config"]["seed"] == 1  # a new run


    def test_overwrite_with_fewer_folds_clears_the_others(
            self, synth_tree, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """cv --overwrite of fold 1 left fold 0 and fold 2 of the run it replaced: their
        checkpoints beside the new summary, which a later cv --resume of every fold took up
        as folds of the new run. What breakhis wrote there goes now; the user's files stay."""
        root, _ = synth_tree
        cv = tmp_path / "cv"
        for fold in (0, 2):
            shutil.copytree(run, cv / f"fold{fold}")
        (cv / "fold2" / "my_notes.txt").write_text("mine")
        (cv / "fold10").mkdir()  # not a fold of this protocol's run: still an earlier one's
        shutil.copy(run / "checkpoint.pt", cv / "fold10" / "checkpoint.pt")
        for name in ("folder", "fold01"):  # no fold's folder (breakhis writes fold1): kept
            (cv / name).mkdir()
            shutil.copy(run / "checkpoint.pt", cv / name / "checkpoint.pt")
        # a fold's folder that is a link elsewhere (another disk): was skipped, and a later
        # cv --resume took its checkpoint up; what breakhis wrote there goes, the link stays
        shutil.copytree(run, tmp_path / "elsewhere")
        (cv / "fold3").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        assert main(["cv", "--data-root", str(root), *MSBC, "--folds", "1", "--epochs", "1",
                     *TINY, "--out", str(cv), "--overwrite"]) == 0
        assert not (cv / "fold0").exists() and not (cv / "fold10").exists()
        assert sorted(p.name for p in (cv / "fold2").iterdir()) == ["my_notes.txt"]
        assert (cv / "folder" / "checkpoint.pt").is_file()
        assert (cv / "fold01" / "checkpoint.pt").is_file()
        assert (cv / "fold3").is_symlink() and not any((tmp_path / "elsewhere").iterdir())
        assert (cv / "fold1" / "checkpoint.pt").is_file()
        summary = json.loads((cv / "cv_metrics.json").read_text())
        assert [f["fold"] for f in summary["folds"]] == [1]
        text = _err(capsys)
        assert "removed what an earlier run left in the folders of other folds: " \
               "fold0/checkpoint.pt" in text and "fold10/checkpoint.pt" in text
        assert "fold2/train.log" in text and "fold3/checkpoint.pt" in text
        assert "my_notes" not in text and "fold01" not in text


class TestFlagsWithoutEffect:
    """Flags that did nothing beside others: ``--no-pretrained --weights w.pt`` trained
    from random weights, ``--no-augment --rotation 30`` stored a rotation it never drew
    (and refused a --resume over it), ``--protocol official --n-splits 3`` trained the
    fold tables' folds, ``--patients-csv`` without ``--image-folder`` and
    ``--image-folder --magnification 40`` (or ``--task MIFC``) were ignored (``index --json --patients-csv
    missing.csv`` exited 0). Each pair is now an error naming both flags and the way out,
    before the data are indexed (and before torch is imported)."""

    REFUSED = [
        (["--no-pretrained", "--weights", "w.pt"],
         "--weights 'w.pt' loads the weights to start from, but --no-pretrained starts from "
         "random weights; drop --no-pretrained to start from 'w.pt', or drop --weights for "
         "random weights"),
        (["--no-augment", "--rotation", "30"],
         "--rotation 30 sets the rotations of the augmentation, but --no-augment turns "
         "augmentation off (no flips, shifts or rotations); drop --no-augment to rotate by "
         "up to 30 degrees, or drop --rotation"),
        (["--protocol", "official", "--n-splits", "3"],
         "--n-splits 3 sets the number of folds of protocols 'image' and 'patient', but "
         "protocol 'official' takes its folds from the fold tables (one per table); drop "
         "--n-splits, or pass --protocol patient (or image) for 3 folds"),
        (["--protocol", "official", "--n-splits", "1"],  # not "for 1 folds"
         "--n-splits 1 sets the number of folds of protocols 'image' and 'patient', but "
         "protocol 'official' takes its folds from the fold tables (one per table); drop "
         "--n-splits, or pass --protocol patient (or image)"),
        (["--protocol", "official", "--val-fraction", "0", "--split-seed", "3"],
         "--split-seed 3 draws the folds of protocols 'image' and 'patient' and the "
         "validation images, but protocol 'official' takes its folds from the fold tables "
         "and --val-fraction 0 holds out no validation images; drop --split-seed, or pass a "
         "--val-fraction above 0"),
        (["--patients-csv", "p.csv"],
         "--patients-csv 'p.csv' gives the patients of an image folder (--image-folder), "
         "but without --image-folder --data-root is read as BreaKHis, whose file names give "
         "the patients; add --image-folder or drop --patients-csv"),
        (["--image-folder", "--magnification", "40"],
         "--magnification 40 selects the BreaKHis images of one magnification (tasks MSBC "
         "and MSFC), but --image-folder takes every image of its class folders; drop "
         "--magnification, or drop --image-folder to read --data-root as BreaKHis"),
        (["--image-folder", "--task", "MIFC"],
         "--task MIFC selects BreaKHis classes, but --image-folder takes its class folders as "
         "the classes; drop --task, or drop --image-folder to read --data-root as BreaKHis"),
        (["--backbone", "tiny"],  # said --weights must be None, but got 'imagenet' (its default)
         "--backbone tiny has no pretrained weights (it starts from random weights), but without "
         "--no-pretrained a run starts from pretrained ones ('imagenet', the --weights default); "
         "pass --no-pretrained"),
        (["--backbone", "tiny", "--weights", "w.pt"],
         "--weights 'w.pt' loads the weights to start from, but --backbone tiny has no pretrained "
         "weights (it starts from random weights); drop --weights and pass --no-pretrained"),
    ]

    @pytest.mark.parametrize("command", ["train", "cv"])
    @pytest.mark.parametrize("argv, message", REFUSED)
    def test_train_and_cv_refuse_them_before_indexing(
        self, command: str, argv: list[str], message: str, tmp_path: Path,
        indexed: list[int], capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main([command, "--data-root", str(tmp_path), *argv,
                     "--out", str(tmp_path / "r")]) == 2
        assert _err(capsys) == f"breakhis-repro {command}: error: {message}\n"
        assert not indexed and not (tmp_path / "r").exists()

    def test_index_refuses_a_patients_csv_without_image_folder(
        self, synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        root, _ = synth_tree
        missing = str(tmp_path / "nonexistent.csv")
        assert main(["index", "--data-root", str(root), "--json",
                     "--patients-csv", missing]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (
            f"breakhis-repro index: error: --patients-csv {missing!r} gives the patients of "
            "an image folder (--image-folder), but without --image-folder --data-root is read "
            "as BreaKHis, whose file names give the patients; add --image-folder or drop "
            "--patients-csv\n")
        # with --image-folder the CSV is read, and a missing one is an error naming it
        assert main(["index", "--data-root", str(root), "--image-folder", "--json",
                     "--patients-csv", missing]) == 2
        assert missing in _err(capsys)

    def test_refusals_import_no_torch(self, tmp_path: Path) -> None:
        commands = [["train", "--data-root", str(tmp_path), *argv] for argv, _ in self.REFUSED]
        code = ("import json, sys\n"
                "from breakhis.cli import main\n"
                f"codes = [main(argv) for argv in {commands!r}]\n"
                "print(json.dumps([codes, 'torch' in sys.modules]))\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [[2] * len(commands), False]
        assert done.stderr.splitlines() == [f"breakhis-repro train: error: {message}"
                                            for _, message in self.REFUSED]

    def test_either_flag_alone_keeps_its_meaning_and_defaults(self) -> None:
        """Options whose default is now None (given or not) resolve to the defaults of
        before: --task MIBC, --weights imagenet, --rotation 90, --n-splits 5, --split-seed 0."""
        from breakhis.cli import _config, _spec

        def parsed(*flags: str) -> tuple[TrainConfig, DataSpec]:
            args = build_parser().parse_args(["train", "--data-root", "x", *flags])
            return _config(args), _spec(args)

        config, spec = parsed()
        assert (config.weights, config.augment, config.rotation) == ("imagenet", True, 90.0)
        assert (spec.n_splits, spec.split_seed) == (5, 0)
        assert config == TrainConfig() and spec == DataSpec("x")
        assert parsed("--no-pretrained")[0].weights is None
        assert parsed("--weights", "w.pt")[0].weights == "w.pt"
        config = parsed("--no-augment")[0]
        assert (config.augment, config.rotation) == (False, 90.0)
        assert parsed("--rotation", "30")[0].rotation == 30.0
        assert parsed("--n-splits", "3", "--split-seed", "3")[1].n_splits == 3
        official = parsed("--protocol", "official", "--split-seed", "3")[1]  # draws validation
        assert (official.n_splits, official.split_seed) == (5, 3)
        official = parsed("--protocol", "official", "--val-fraction", "0")[1]
        assert (official.n_splits, official.split_seed) == (5, 0)
        spec = parsed("--image-folder", "--patients-csv", "p.csv")[1]
        assert spec.image_folder and spec.patients_csv == str(Path("p.csv").resolve())
        assert parsed("--task", "MSBC", "--magnification", "40")[1].magnification == 40
        assert spec.task == "MIBC" and parsed("--task", "MIFC")[1].task == "MIFC"

    def test_runs_that_recorded_such_a_setting_still_resume(
        self, synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A run made before with such a pair recorded the setting that had no effect:
        it resumes (and evaluates) with the pair's valid half, the setting now left out."""
        root, _ = synth_tree
        out = tmp_path / "run"
        base = ["train", "--data-root", str(root), "--task", "MSBC", "--magnification", "40",
                "--protocol", "official", "--val-fraction", "0", "--fold", "1",
                "--no-augment", *TINY, "--out", str(out)]
        assert main([*base, "--epochs", "1"]) == 0
        ckpt = out / "checkpoint.pt"
        state = load_checkpoint(ckpt)
        # as --rotation 30 --n-splits 3 --split-seed 7 --patients-csv p.csv wrote them
        state["config"]["rotation"] = 30.0
        state["extra"]["data"].update(n_splits=3, split_seed=7,
                                      patients_csv=str(tmp_path / "p.csv"),
                                      patients_csv_sha256="0" * 64)
        state["extra"]["protocol"]["split_seed"] = 7
        save_checkpoint(state, ckpt)
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev"),
                     "--device", "cpu", "--no-progress"]) == 0, _err(capsys)
        assert main([*base, "--epochs", "2", "--resume"]) == 0, _err(capsys)
        state = load_checkpoint(ckpt)
        assert state["epoch"] == 1 and state["config"]["rotation"] == 90.0
        assert state["extra"]["data"]["n_splits"] == 5
        assert state["extra"]["data"]["patients_csv"] is None
        # a setting that acts is still compared
        assert main([*base, "--epochs", "3", "--resume", "--seed", "1"]) == 2
        assert "checkpoint has seed=0, this run 1" in _err(capsys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestUnderTorchrun:
    """Started by torchrun with several processes, the commands other than train and cv
    did the whole work in every process and printed it each time (evaluate joined a
    process group it never used; synth failed in all processes but one, the folder being
    taken). Each process now refuses before any work, with status 2. The tests give one
    process torchrun's environment: enough, as the refusal comes before any process group."""

    REFUSED = ("{command} runs in one process; run it without torchrun (got WORLD_SIZE=2; "
               "only train and cv run under torchrun)")

    @pytest.mark.parametrize("rank", [0, 1])
    @pytest.mark.parametrize("command", ["index", "synth", "evaluate", "predict", "figures",
                                         "table"])
    def test_single_process_commands_refuse_several_processes(
        self, command: str, rank: int, run: Path, synth_tree, tmp_path: Path
    ) -> None:
        root, _ = synth_tree
        out, ckpt = tmp_path / "out", str(run / "checkpoint.pt")
        # arguments each command runs with in one process
        argv = {
            "index": ["--data-root", str(root), "--no-verify"],
            "synth": ["--out", str(out), "--size", "8x8", "--images-per-magnification", "1"],
            "evaluate": ["--checkpoint", ckpt, "--out", str(out), "--device", "cpu"],
            "predict": ["--checkpoint", ckpt, str(root), "--out", str(out / "p.csv"),
                        "--device", "cpu", "--no-progress"],
            "figures": ["--checkpoint", ckpt, "--out", str(out), "--device", "cpu",
                        "--gradcam-images", "0", "--no-progress"],
            "table": [str(run), "--out", str(out / "t.md")],
        }[command]
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        # a process that joins a process group waits for the other, which never comes
        done = subprocess.run([sys.executable, "-m", "breakhis.cli", command, *argv], env=env,
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (2, ""), done.stderr[-2000:]
        # every process says it, so each names its rank
        assert done.stderr == f"breakhis-repro {command} (rank {rank} of 2): error: " \
            f"{self.REFUSED.format(command=command)}\n"
        assert not out.exists()

    @pytest.mark.parametrize("command", ["train", "cv"])
    def test_train_and_cv_are_not_refused(self, command: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        # refused for an option pair, before any process group: past the torchrun check
        assert main([command, "--data-root", str(tmp_path), "--no-pretrained",
                     "--weights", "w.pt"]) == 2
        err = _err(capsys)
        assert "--no-pretrained" in err and "runs in one process" not in err
        assert err.startswith(f"breakhis-repro {command} (rank 1 of 2): error: ")

    def test_one_process_under_torchrun_runs(self, run: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1
        assert main(["table", str(run)]) == 0
        assert "| run |" in capsys.readouterr().out

    def test_help_says_which_commands_run_under_torchrun(self) -> None:
        text = " ".join(build_parser().format_help().split())
        assert ("train and cv run data-parallel under torchrun" in text
                and "refuse to start under torchrun with more than one process" in text)


def test_version(capsys):
    from breakhis import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"breakhis-repro {__version__}"


def test_runs_without_docstrings() -> None:
    """Under python -OO (docstrings stripped) every command failed: __doc__ was None."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-OO", "-m", "breakhis.cli", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "breakhis-repro: index, train, cross-validate" in done.stdout


@pytest.mark.parametrize("backbone", ["regnet_x_400mf", "resnet18", "inception_v3"])
def test_se_check_passes_backbones_that_take_se_or_cannot_be_built_on_meta(backbone: str) -> None:
    """torchvision's RegNets copy tensor data in __init__, which the meta device refuses:
    the check said "Cannot copy out of meta tensor" as if SE were the problem; it leaves
    them to the real build (which finds whether SE goes in)."""
    from breakhis.models import check_se_applies

    check_se_applies(backbone, 8)


class TestFolderLock:
    def test_a_forked_child_does_not_keep_the_lock(self, tmp_path: Path) -> None:
        """Data-loader workers are forked: each inherited the lock's file, so after a
        kill -9 of the run the lock lived on in its workers for seconds."""
        lock = FolderLock(tmp_path / "run")
        assert lock.acquire()
        fd = lock._fd
        try:
            pid = os.fork()
            if pid == 0:  # the child: its copy of the lock's file is closed
                try:
                    os.fstat(fd)
                except OSError:
                    os._exit(0)
                os._exit(1)
            assert os.waitpid(pid, 0)[1] == 0
            assert FolderLock.busy(tmp_path / "run")  # the parent still holds it
        finally:
            lock.release()
        assert not (tmp_path / "run").exists()

    def test_a_lock_file_removed_by_its_holder_is_not_taken(self, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        """B opened the lock file, then A let go and removed it with its empty folder: B
        locked the removed file, and C made and took a new one: two holders."""
        import fcntl

        folder = tmp_path / "run"
        a, b, c = FolderLock(folder), FolderLock(folder), FolderLock(folder)
        assert a.acquire()
        real = fcntl.flock

        def flock_after_a_lets_go(fd: int, op: int) -> None:
            monkeypatch.setattr(fcntl, "flock", real)
            a.release()  # A's run stopped before writing anything: its folder goes
            real(fd, op)

        monkeypatch.setattr(fcntl, "flock", flock_after_a_lets_go)
        assert b.acquire() and (folder / LOCK_NAME).is_file()  # took a lock file that exists
        assert not c.acquire()
        b.release()
