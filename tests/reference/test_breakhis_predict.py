"""Prediction on new images, and files that are not checkpoints.

One tiny model (``tiny`` backbone, 16-pixel inputs, one epoch on the synthetic tree's
40X binary task) is trained once for the module.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _disk import lock_folder
from PIL import Image

from breakhis._files import SettingError
from breakhis.checkpoint import NotACheckpointError, load_checkpoint, save_checkpoint
from breakhis.cli import main
from breakhis.data import UnreadableImageError, index_breakhis, index_image_folder
from breakhis.dataset import load_rgb
from breakhis.evaluate import read_predictions
from breakhis.experiments import DataSpec, run_fold
from breakhis.predict import _other_magnifications, collect_images, predict_to_csv
from breakhis.tasks import get_task
from breakhis.train import (
    TrainConfig,
    checkpoint_normalization,
    fit,
    load_model,
    predict_probs,
)

pytest.importorskip("bilinearpool")


def _png(path: Path, side: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), 100, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(synth_tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _ = synth_tree
    run = tmp_path_factory.mktemp("predict-run")
    config = TrainConfig(head="plain", backbone="tiny", weights=None, input_size=16, epochs=1,
                         batch_size=8, device="cpu")
    spec = DataSpec(str(root), task="MSBC", magnification=40, protocol="patient", n_splits=3)
    run_fold(spec, config, 0, run, progress=False)
    return run / "checkpoint.pt"


class TestPredict:
    def test_csv_has_the_test_predictions_columns(self, checkpoint: Path, synth_tree,
                                                  tmp_path: Path) -> None:
        root, meta = synth_tree
        some = sorted((root / meta["images_root"]).rglob("*-40-00?.png"))[:3]
        plain = _png(tmp_path / "new" / "slide.png")
        result = predict_to_csv(checkpoint, [*some, plain], tmp_path / "p.csv",
                                progress=False)
        with (tmp_path / "p.csv").open(newline="") as handle:
            header = next(csv.reader(handle))
        assert header == ["path", "patient", "magnification", "true_label", "true_index",
                          "predicted_label", "prob_benign", "prob_malignant"]
        back = read_predictions(result["csv"])
        assert back.classes == ["benign", "malignant"] and len(back) == 4
        assert back.y_true.tolist() == [-1] * 4
        assert back.magnifications[:3] == [40] * 3 and back.patients[3] is None
        np.testing.assert_allclose(back.probs.sum(axis=1), 1.0, atol=1e-6)

    def test_unfinished_checkpoint_warns(self, checkpoint: Path, tmp_path: Path) -> None:
        # evaluate and figures warned; predict said nothing (helper-140)
        state = load_checkpoint(checkpoint)
        state["config"]["epochs"] = 5  # as a run of 5 epochs killed after the first
        cut = save_checkpoint(state, tmp_path / "cut" / "checkpoint.pt")
        with pytest.warns(UserWarning, match="trained 1 of its 5 epochs .* the predictions are an "
                                             "unfinished model's"):
            predict_to_csv(cut, [_png(tmp_path / "x.png")], tmp_path / "p.csv", progress=False)

    def test_fine_grained_columns_follow_the_checkpoints_class_order(
        self, synth_tree, tmp_path: Path
    ) -> None:
        """prob_<class> columns in the checkpoint's order (A F PT TA DC LC MC PC, not
        sorted), each holding that class's probability; predicted_label their argmax."""
        root, _ = synth_tree
        task = get_task("MIFC")
        records = index_breakhis(root).records
        y = task.targets(records)
        chosen = [int(i) for c in range(8) for i in np.flatnonzero(y == c)[:2]]
        run = tmp_path / "run"
        fit(TrainConfig(head="plain", backbone="tiny", weights=None, input_size=16, epochs=1,
                        batch_size=8, device="cpu"),
            train_records=[records[i] for i in chosen], train_targets=y[chosen],
            classes=list(task.classes), run_dir=run, progress=False,
            extra={"task": task.to_dict()})
        images = [records[i].path for i in chosen]
        result = predict_to_csv(run / "checkpoint.pt", images, tmp_path / "p.csv",
                                progress=False)
        classes = list(load_checkpoint(run / "checkpoint.pt")["classes"])
        assert classes == list(task.classes) != sorted(classes)
        assert result["classes"] == classes
        with (tmp_path / "p.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [k for k in rows[0] if k.startswith("prob_")] == [f"prob_{c}" for c in classes]
        model, state = load_model(run / "checkpoint.pt")
        mean, std = checkpoint_normalization(state)
        expected = predict_probs(model, images, input_size=16, mean=mean, std=std)
        got = np.array([[float(row[f"prob_{c}"]) for c in classes] for row in rows])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert [row["predicted_label"] for row in rows] == [
            classes[k] for k in expected.argmax(axis=1)]

    def test_model_whose_scores_are_not_finite_writes_nothing_and_names_the_images(
        self, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A NaN score was written to the CSV with the first class as its prediction."""
        state = torch.load(checkpoint, weights_only=False)
        weights = [k for k, v in state["model"].items() if v.is_floating_point() and k.endswith("weight")]
        state["model"][weights[-1]].fill_(float("nan"))
        broken = tmp_path / "run" / "checkpoint.pt"
        broken.parent.mkdir()
        torch.save(state, broken)
        images = [_png(tmp_path / "in" / f"{name}.png") for name in ("a", "b")]
        out = tmp_path / "p.csv"
        assert main(["predict", "--checkpoint", str(broken), str(tmp_path / "in"), "--out", str(out),
                     "--no-progress"]) != 0
        err = capsys.readouterr().err
        assert ("expected finite class probabilities, but the scores of 2 of 2 images are NaN or "
                f"infinite: {images[0]}, {images[1]}") in err
        assert "Traceback" not in err and not out.exists()

    def test_hidden_folders_are_not_searched(self, tmp_path: Path) -> None:
        _png(tmp_path / "a" / "x.png")
        _png(tmp_path / "a" / ".ipynb_checkpoints" / "x-checkpoint.png")
        images, problems = collect_images([tmp_path])
        assert images == [tmp_path / "a" / "x.png"]
        assert problems == [f"{tmp_path / 'a' / '.ipynb_checkpoints'}/: hidden folder, "
                            "not searched"]

    def test_decompression_bomb_is_skipped_and_the_rest_predicted(
        self, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        small = _png(tmp_path / "in" / "small.png", side=8)
        huge = _png(tmp_path / "in" / "huge.png", side=64)  # 4096 pixels > 2 * 1000
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        images, problems = collect_images([tmp_path / "in"])
        assert images == [small]
        assert len(problems) == 1 and str(huge) in problems[0]
        assert "decompression bomb" in problems[0]
        with pytest.raises(UnreadableImageError, match="huge.png"):
            load_rgb(huge)
        assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"),
                     "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
        assert "huge.png" in capsys.readouterr().err
        assert read_predictions(tmp_path / "p.csv").paths == [str(small)]

    def test_decompression_bomb_is_skipped_by_the_index(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _png(tmp_path / "a" / "small.png", side=8)
        _png(tmp_path / "b" / "huge.png", side=64)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        index = index_image_folder(tmp_path)
        assert [r.path.name for r in index.records] == ["small.png"]
        assert "decompression bomb" in index.skipped[0].reason


    def test_file_name_that_is_not_utf8_is_predicted(
        self, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        folder = tmp_path / "in"
        good = _png(folder / "a.png")
        latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.png")  # a Latin-1 name
        try:
            shutil.copy(good, latin1)
        except (OSError, UnicodeError):
            pytest.skip("file system does not take non-UTF-8 names")
        out = tmp_path / "p.csv"
        assert main(["predict", "--checkpoint", str(checkpoint), str(folder), "--out",
                     str(out), "--no-progress"]) == 0
        assert "1 file name is not valid UTF-8: its undecodable" in capsys.readouterr().err
        paths = read_predictions(out).paths
        assert paths == [str(good), str(folder / "caf\\xe9.png")]

    def test_out_that_would_replace_the_model_an_image_or_a_run_file_is_refused(
        self, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """predict --out wrote its CSV over the checkpoint, over the image it had just
        predicted and over a run's test_predictions.csv, without a word."""
        run = shutil.copytree(checkpoint.parent, tmp_path / "run")
        image = _png(tmp_path / "in" / "slide.png")
        before = {p: p.read_bytes() for p in (run / "checkpoint.pt", image, run / "test_predictions.csv")}
        cases = {
            run / "checkpoint.pt": "is the checkpoint --checkpoint names",
            image: "is an existing .png file, which the CSV would replace",
            run / "test_predictions.csv": f"a file of the run in {str(run)!r} (beside its checkpoint.pt)",
        }
        for out, said in cases.items():
            assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), str(image), "--out",
                         str(out), "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert said in err and len(err.strip().splitlines()) == 1, err
        assert {p: p.read_bytes() for p in before} == before
        # a new CSV in the run folder, and a CSV of its own written again: fine
        for out in (run / "new.csv", run / "new.csv", tmp_path / "p.csv", tmp_path / "p.csv"):
            assert main(["predict", "--checkpoint", str(run / "checkpoint.pt"), str(image), "--out",
                         str(out), "--no-progress"]) == 0

    def test_any_magnification_with_an_independent_checkpoint_is_refused(
        self, synth_tree, tmp_path: Path
    ) -> None:
        """--any-magnification with an MIBC/MIFC checkpoint did nothing, without a word."""
        root, _ = synth_tree
        config = TrainConfig(head="plain", backbone="tiny", weights=None, input_size=16, epochs=1,
                             batch_size=8, device="cpu")
        run_fold(DataSpec(str(root), task="MIBC", protocol="patient", n_splits=3), config, 0,
                 tmp_path / "run", progress=False)
        image = _png(tmp_path / "in" / "slide.png")
        with pytest.raises(ValueError, match=r"any_magnification \(--any-magnification\) applies to a "
                                             r"checkpoint of a magnification-specific task .* is of MIBC"):
            predict_to_csv(tmp_path / "run" / "checkpoint.pt", [image], tmp_path / "p.csv",
                           progress=False, any_magnification=True)
        assert not (tmp_path / "p.csv").exists()
        predict_to_csv(tmp_path / "run" / "checkpoint.pt", [image], tmp_path / "p.csv", progress=False)

    def test_bad_batch_size_and_folder_out_fail_before_predicting(
        self, checkpoint: Path, tmp_path: Path
    ) -> None:
        image = _png(tmp_path / "a.png")
        for size in (0, -1):
            with pytest.raises(SettingError, match="^batch_size must be an integer >= 1"):
                predict_to_csv(checkpoint, [image], tmp_path / "p.csv", batch_size=size,
                               progress=False)
        (tmp_path / "out").mkdir()
        with pytest.raises(SettingError, match="^out_csv expects .* is a folder"):
            predict_to_csv(checkpoint, [image], tmp_path / "out", progress=False)
        (tmp_path / "afile").write_text("")
        with pytest.raises(SettingError,
                           match=r"^out_csv expects .*afile', a folder above .* is a file"):
            predict_to_csv(checkpoint, [image], tmp_path / "afile" / "sub" / "p.csv",
                           progress=False)
        assert (tmp_path / "afile").read_text() == ""

    @pytest.mark.parametrize("how", ["read-only folder", "refused writes"])
    def test_out_that_cannot_be_written_fails_before_reading_images(
        self, how: str, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An --out in a folder that cannot be written failed only as the CSV was
        written: after every image was read and predicted (minutes on the real data)."""
        import breakhis.predict as predict_module

        image = _png(tmp_path / "in" / "a.png")
        locked = tmp_path / "locked"
        locked.mkdir()
        lock_folder(locked, how, monkeypatch)  # made writable again below, whatever fails

        def never(*args: object, **kwargs: object) -> None:
            pytest.fail("the images were read before the folder of out_csv was checked")

        for name in ("collect_images", "load_model", "predict_probs"):
            monkeypatch.setattr(predict_module, name, never)
        try:
            for out, message in [
                (locked / "p.csv", f"expected a folder for {str(locked / 'p.csv')!r} that can "
                                   f"be written, but writing a file into {str(locked)!r} "
                                   "failed: Permission denied"),
                (locked / "new" / "p.csv",
                 f"expected a folder for {str(locked / 'new' / 'p.csv')!r} that can be "
                 f"created, but {str(locked)!r}, where it would be created, cannot be "
                 "written"),
            ]:
                with pytest.raises(ValueError) as info:
                    predict_to_csv(checkpoint, [image], out, progress=False)
                assert str(info.value) == message
                assert main(["predict", "--checkpoint", str(checkpoint), str(image),
                             "--out", str(out), "--no-progress"]) == 2
                err = capsys.readouterr().err
                assert err == f"breakhis-repro predict: error: {message}\n"
            assert list(locked.iterdir()) == []  # nothing created, no probe left
        finally:
            locked.chmod(0o755)

    def test_numpy_integer_batch_size_is_taken(self, checkpoint: Path, tmp_path: Path) -> None:
        image = _png(tmp_path / "a.png")
        result = predict_to_csv(checkpoint, [image], tmp_path / "p.csv",
                                batch_size=np.int64(2), progress=False)
        assert result["images"] == 1
        with pytest.raises(SettingError, match="^batch_size must be an integer >= 1"):
            predict_to_csv(checkpoint, [image], tmp_path / "p.csv", batch_size=2.0,
                           progress=False)


def _slides(synth_tree, pattern: str, n: int, dest: Path) -> list[Path]:
    """Copies of ``n`` synthetic BreaKHis images matching ``pattern`` in ``dest``."""
    root, meta = synth_tree
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted((root / meta["images_root"]).rglob(pattern))[:n]
    return [Path(shutil.copy(p, dest / p.name)) for p in found]


class TestInputs:
    def test_non_images_in_folders_are_reported(self, tmp_path: Path) -> None:
        image = _png(tmp_path / "in" / "sub" / "x.png")
        _png(tmp_path / "in" / "sub" / "scan.webp")  # Pillow reads it; the index does not
        for name in ("notes.txt", "Thumbs.db"):
            (tmp_path / "in" / "sub" / name).write_text("x")
        (tmp_path / "in" / "dsfold1.txt").write_text("x.png|40|1|train\n")  # a fold table
        images, problems = collect_images([tmp_path / "in"])
        assert images == [image]
        sub = tmp_path / "in" / "sub"
        assert [p.split(": ")[0] for p in problems] == [
            str(sub / "Thumbs.db"), str(sub / "notes.txt"), str(sub / "scan.webp")]
        assert all("not an image (extension" in p for p in problems)

    def test_overlapping_inputs_are_collected_once(self, tmp_path: Path) -> None:
        a = _png(tmp_path / "in" / "a.png")
        b = _png(tmp_path / "in" / "sub" / "b.png")
        c = _png(tmp_path / "c.png")
        images, problems = collect_images([c, tmp_path / "in", b, tmp_path / "in" / ".." / "c.png"])
        assert images == [c, a, b]
        assert len(problems) == 1 and problems[0].startswith("2 images reached more than once")

    def test_linked_folder_is_searched_once(self, tmp_path: Path) -> None:
        image = _png(tmp_path / "in" / "real" / "x.png")
        (tmp_path / "in" / "linked").symlink_to(tmp_path / "in" / "real")
        (tmp_path / "in" / "real" / "loop").symlink_to(tmp_path / "in")
        elsewhere = _png(tmp_path / "other" / "y.png")
        (tmp_path / "in" / "more").symlink_to(tmp_path / "other")
        images, problems = collect_images([tmp_path / "in"])
        assert images == [tmp_path / "in" / "more" / "y.png", image]
        assert images[0].resolve() == elsewhere.resolve()
        assert problems == [
            f"{tmp_path / 'in' / 'linked'}/: folder indexed already: "
            f"{str(tmp_path / 'in' / 'real')!r} is reached another way; not walked twice",
            f"{tmp_path / 'in' / 'real' / 'loop'}/: folder link loop: points back to its "
            "parent folder 'in'; not followed"]
        # from the link itself, the loop leads out of the folder given: followed, once
        again, _ = collect_images([tmp_path / "in" / "linked"])
        assert tmp_path / "in" / "linked" / "x.png" in again
        assert sorted(p.resolve() for p in again) == sorted([elsewhere.resolve(),
                                                              image.resolve()])


class TestMagnification:
    def test_other_magnifications_are_refused_unless_allowed(
        self, checkpoint: Path, synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        inputs = [*_slides(synth_tree, "*-40-00?.png", 1, tmp_path / "in"),
                  *_slides(synth_tree, "*-100-00?.png", 2, tmp_path / "in"),
                  *_slides(synth_tree, "*-400-00?.png", 1, tmp_path / "in")]
        with pytest.raises(ValueError, match=r"expected images of the magnification of the "
                           r"MSBC at 40X checkpoint .*, but got 2 images at 100X, 1 "
                           r"image at 400X; .*--any-magnification"):
            predict_to_csv(checkpoint, inputs, tmp_path / "p.csv", progress=False)
        assert not (tmp_path / "p.csv").exists()
        result = predict_to_csv(checkpoint, inputs, tmp_path / "p.csv", progress=False,
                                any_magnification=True)
        assert result["images"] == 4 and result["problems"] == []
        assert result["warnings"] == [
            "2 images at 100X predicted by the MSBC at 40X checkpoint (any magnification "
            "allowed)",
            "1 image at 400X predicted by the MSBC at 40X checkpoint (any magnification "
            "allowed)"]
        assert read_predictions(tmp_path / "p.csv").magnifications == [40, 100, 100, 400]
        argv = ["predict", "--checkpoint", str(checkpoint), str(tmp_path / "in"), "--out",
                str(tmp_path / "q.csv"), "--no-progress"]
        assert main(argv) == 2
        assert "2 images at 100X" in capsys.readouterr().err
        assert main([*argv, "--any-magnification"]) == 0
        assert "warning: 2 images at 100X predicted by the MSBC at 40X" in capsys.readouterr().err

    def test_names_without_magnification_warn_once(self, checkpoint: Path, synth_tree,
                                                   tmp_path: Path) -> None:
        inputs = [*_slides(synth_tree, "*-40-00?.png", 1, tmp_path / "in"),
                  _png(tmp_path / "in" / "scan1.png"), _png(tmp_path / "in" / "scan2.png")]
        result = predict_to_csv(checkpoint, inputs, tmp_path / "p.csv", progress=False)
        assert result["images"] == 3
        assert result["warnings"] == [
            "2 images have no magnification in their names (not BreaKHis names) for the "
            "MSBC at 40X checkpoint: check that they are 40X images"]

    def test_one_name_without_magnification_is_counted_in_the_singular(self) -> None:
        state = {"extra": {"task": {"name": "MSBC", "magnification": 40}}}
        described = [SimpleNamespace(path="scan1.png", patient=None, magnification=None)]
        assert _other_magnifications(state, described) == (
            "MSBC at 40X", [], "1 image has no magnification in its name (not a BreaKHis "
            "name) for the MSBC at 40X checkpoint: check that it is a 40X image")

    def test_magnification_independent_checkpoint_takes_any(
        self, checkpoint: Path, synth_tree, tmp_path: Path
    ) -> None:
        state = load_checkpoint(checkpoint)
        state["extra"]["task"] = {**state["extra"]["task"], "name": "MIBC", "magnification": None}
        torch.save(state, tmp_path / "mibc.pt")
        inputs = _slides(synth_tree, "*-400-00?.png", 2, tmp_path / "in")
        result = predict_to_csv(tmp_path / "mibc.pt", inputs, tmp_path / "p.csv", progress=False)
        assert result["images"] == 2 and result["warnings"] == []


class TestNotACheckpoint:
    def test_foreign_files_are_refused_clearly(self, tmp_path: Path) -> None:
        log = tmp_path / "train.log"
        log.write_text("epoch 1 loss 0.69\n")
        (tmp_path / "empty.pt").write_bytes(b"")
        torch.save([1, 2], tmp_path / "list.pt")
        np.save(tmp_path / "array.npy", np.zeros(3))
        for name in ("train.log", "empty.pt", "list.pt", "array.npy"):
            for mmap in (False, True):  # mapped: torch's "mmap can only be used with files saved ..." came
                with pytest.raises(NotACheckpointError, match="is not a breakhis checkpoint") as info:
                    load_checkpoint(tmp_path / name, mmap=mmap)
                assert name in str(info.value) and "weights_only" not in str(info.value)
                assert "mmap" not in str(info.value)
        with pytest.raises(NotACheckpointError, match=r"\(the file is empty or cut short\)"):
            load_checkpoint(tmp_path / "empty.pt", mmap=True)
        # torch.save's legacy (not zip) format is read, mapped or not
        torch.save({"epoch": 3}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
        assert load_checkpoint(tmp_path / "legacy.pt", mmap=True) == {"epoch": 3}
        # a damaged zip: torch's long first line was cut mid-sentence, before "corrupted"
        (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + b"x" * 100)
        with pytest.raises(NotACheckpointError, match=r"checkpoint file is corrupted\.\); pass the "):
            load_checkpoint(tmp_path / "cut.pt")
        # a checkpoint cut short is said to be one, whatever torch's words ([Errno 22] here)
        save_checkpoint({"model": {"w": torch.zeros(1000)}, "epoch": 0}, tmp_path / "whole.pt")
        data = (tmp_path / "whole.pt").read_bytes()
        for keep in (40, len(data) // 2):
            (tmp_path / "cut.pt").write_bytes(data[:keep])
            with pytest.raises(NotACheckpointError, match=r"^'[^']*cut\.pt' is not a breakhis checkpoint "
                               r"\(a zip archive, damaged or cut short; torch\.load failed: "):
                load_checkpoint(tmp_path / "cut.pt")
        # another program's zip (a Keras .keras, a numpy .npz) is not called damaged (helper-151)
        import zipfile

        with zipfile.ZipFile(tmp_path / "model.keras", "w") as archive:
            archive.writestr("config.json", "{}")
        np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
        for name in ("model.keras", "arrays.npz"):
            with pytest.raises(NotACheckpointError, match=r"\(a zip archive that torch\.save did not write "
                               r"\(no <name>/data\.pkl in it\); torch\.load failed: "):
                load_checkpoint(tmp_path / name)
        torch.save({"model": {}}, tmp_path / "dict.pt")
        with pytest.raises(NotACheckpointError, match="expected format"):
            load_model(tmp_path / "dict.pt")

    @pytest.mark.parametrize("command", ["predict", "evaluate", "figures"])
    def test_cli_exits_2_with_a_clean_message(self, command: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        log = tmp_path / "train.log"
        log.write_text("epoch 1 loss 0.69\n")
        image = _png(tmp_path / "x.png")
        argv = [command, "--checkpoint", str(log), "--no-progress"]
        if command == "predict":
            argv += [str(image), "--out", str(tmp_path / "p.csv")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"breakhis-repro {command}: error: {str(log)!r} is not a breakhis checkpoint" in err
        assert "Traceback" not in err and "weights_only" not in err


def test_csv_files_are_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """Under LC_ALL=C (no UTF-8 coercion) an accented file name aborted predict after
    inference ('ascii' codec can't encode): run files are written and read as UTF-8."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from breakhis.evaluate import write_predictions, read_predictions\n"
        "out = Path(sys.argv[1])\n"
        "write_predictions(out, [Path('/data/caf\\u00e9.png')], np.array([-1]),\n"
        "                  np.array([[0.25, 0.75]]), ['benign', 'malignant'])\n"
        "print(read_predictions(out).paths == ['/data/caf\\u00e9.png'])\n"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.csv")], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
    assert "café".encode() in (tmp_path / "p.csv").read_bytes()
