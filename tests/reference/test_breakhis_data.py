"""Indexing BreaKHis trees: the grammar, the irregularities, the counts, the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from breakhis._files import SettingError
from breakhis.cli import main
from breakhis.data import (
    TYPE_CODES,
    UnreadableImageError,
    index_breakhis,
    index_image_folder,
    parse_breakhis_name,
    read_image_size,
)
from breakhis.dataset import ImageDataset, build_eval_transform, build_train_transform, load_rgb
from breakhis.experiments import DataSpec, prepare_data
from breakhis.synthetic import SyntheticPatient, make_synthetic_breakhis


def _png(path: Path, size: tuple[int, int] = (20, 12), fill: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), fill, np.uint8)).save(path)
    return path


def _official(root: Path, cls: str, folder: str, case: str, mag: int, name: str) -> Path:
    breast = root / "BreaKHis_v1/histology_slides/breast"
    return breast / cls / "SOB" / folder / case / f"{mag}X" / name


class TestParseName:
    @pytest.mark.parametrize(
        ("name", "patient", "tumor_type", "mag", "cls"),
        [
            ("SOB_B_A-14-22549AB-40-001.png", "14-22549AB", "A", 40, "benign"),
            ("SOB_B_TA-14-3411F-200-013.png", "14-3411F", "TA", 200, "benign"),
            ("SOB_M_DC-14-15687B-400-002.png", "14-15687B", "DC", 400, "malignant"),
            ("SOB_M_PC-15-190EF-100-005.png", "15-190EF", "PC", 100, "malignant"),
            ("SOB_M_LC-14-13412-100-001.png", "14-13412", "LC", 100, "malignant"),
        ],
    )
    def test_valid(self, name: str, patient: str, tumor_type: str, mag: int, cls: str) -> None:
        parsed = parse_breakhis_name(name)
        got = (parsed.patient, parsed.tumor_type, parsed.magnification, parsed.benign_malignant)
        assert got == (patient, tumor_type, mag, cls)

    def test_suffix_is_part_of_patient(self) -> None:
        a = parse_breakhis_name("SOB_B_A-14-22549AB-40-001.png")
        b = parse_breakhis_name("SOB_B_A-14-22549CD-40-001.png")
        assert a.patient != b.patient
        assert a.case == "SOB_B_A_14-22549AB"

    @pytest.mark.parametrize(
        "name",
        [
            "SOB_B_A-14-22549AB-40-001 (copy).png",  # outside the grammar
            "SOB_B_A-14-22549AB-50-001.png",  # no 50X magnification
            "SOB_B_XX-14-22549AB-40-001.png",  # unknown type
            "SOB_B_A_14-22549AB-40-001.png",  # folder-style underscore before the year
            "Thumbs.db",
        ],
    )
    def test_invalid(self, name: str) -> None:
        with pytest.raises(ValueError, match="expected a BreaKHis name"):
            parse_breakhis_name(name)

    @pytest.mark.parametrize("suffix", ["PNG", "Png"])
    def test_extension_case_is_named(self, suffix: str) -> None:
        """Names end in '.png' (as the fold tables list them): another case of the
        extension is refused with the name to rename it to."""
        with pytest.raises(ValueError, match=r"only its extension's case differs: rename it to "
                                             r"'SOB_B_A-14-22549AB-40-001\.png'"):
            parse_breakhis_name(f"SOB_B_A-14-22549AB-40-001.{suffix}")
        with pytest.raises(ValueError, match=r"got 'SOB_B_A-14-22549AB-50-001\.PNG'$"):
            parse_breakhis_name("SOB_B_A-14-22549AB-50-001.PNG")  # wrong otherwise too: no hint

    def test_class_letter_must_match_type(self) -> None:
        with pytest.raises(ValueError, match="class letter 'B' says benign"):
            parse_breakhis_name("SOB_B_DC-14-2523-40-001.png")


class TestIndexSynthetic:
    def test_counts_match_generator(self, synth_tree) -> None:
        root, meta = synth_tree
        summary = index_breakhis(root).summary()
        for key in ("images", "patients", "patient_ids", "by_class", "by_type", "by_magnification"):
            assert summary[key] == meta["expected"][key], key
        assert set(summary["by_magnification"]) == {"40", "100", "200", "400"}
        assert set(summary["by_type"]) == set(TYPE_CODES)

    def test_irregular_files_reported_not_labelled(self, synth_tree) -> None:
        root, meta = synth_tree
        index = index_breakhis(root)
        skipped = {s.path: s.reason for s in index.skipped}
        assert sorted(skipped) == meta["irregular_files"]
        reasons = Counter(r.split(":")[0] for r in skipped.values())
        assert reasons == {"not an image": 2, "name outside grammar": 1, "unreadable image": 1}
        indexed = {r.path.name for r in index.records}
        assert not any(Path(p).name in indexed for p in skipped)

    def test_irregular_names_and_sizes(self, synth_tree) -> None:
        root, _ = synth_tree
        index = index_breakhis(root)
        patients = {r.patient for r in index.records}
        assert {"14-22549AB", "14-22549CD", "14-22549G", "15-190EF", "14-3411F"} <= patients
        sizes = Counter((r.width, r.height) for r in index.records)
        assert len(sizes) == 2  # the four-pixel-shorter images are kept, with their size
        single = [r for r in index.records if r.patient == "14-22704" and r.magnification == 40]
        assert len(single) == 1

    def test_near_duplicate_slide_warned(self, synth_tree) -> None:
        root, _ = synth_tree
        index = index_breakhis(root)
        assert any("14-13412" in w and "DC" in w and "LC" in w for w in index.warnings)
        types = {r.tumor_type for r in index.records if r.patient == "14-13412"}
        assert types == {"DC", "LC"}
        assert len(index.cases) == len(index.patients) + 1

    def test_strict_fails_on_truncated_png(self, synth_tree) -> None:
        root, _ = synth_tree
        with pytest.raises(UnreadableImageError, match=r"^1 image could not be decoded "
                           r"\(strict mode\), e\.g\. .*; re-run without --strict to skip it$"):
            index_breakhis(root, strict=True)

    def test_no_verify_misses_truncation_but_reads_sizes(self, synth_tree) -> None:
        root, meta = synth_tree
        index = index_breakhis(root, verify=False)
        assert len(index.records) == meta["expected"]["images"] + 1

    def test_unverified_truncated_png_fails_naming_the_file(self, synth_tree) -> None:
        root, _ = synth_tree
        index = index_breakhis(root, verify=False)
        broken = [r for r in index.records if r.path.name.endswith("-999.png")]
        assert len(broken) == 1
        data = ImageDataset(broken, [0], build_eval_transform(16))
        with pytest.raises(UnreadableImageError, match="SOB_M_PC-14-9146-400-999.png"):
            data[0]

    def test_folders_above_the_root_do_not_count(self, synth_tree, tmp_path: Path) -> None:
        """Data kept under a folder named like a type (or class) folder: every type is
        indexed, as anywhere else; only folders inside the root are checked."""
        root, meta = synth_tree
        moved = shutil.copytree(root, tmp_path / "malignant" / "adenosis" / "tree")
        index = index_breakhis(moved)
        assert len(index.records) == meta["expected"]["images"]
        assert index.summary()["by_type"] == meta["expected"]["by_type"]
        assert not any(s.reason.startswith("folder mismatch") for s in index.skipped)

    def test_kaggle_layout(self, kaggle_tree) -> None:
        root, meta = kaggle_tree
        summary = index_breakhis(root).summary()
        assert summary["images"] == meta["expected"]["images"]
        assert "Folds.csv" in summary["metadata_files"]


class TestIndexHandmade:
    def test_folder_mismatch_is_skipped(self, tmp_path: Path) -> None:
        good = _png(_official(tmp_path, "benign", "adenosis", "SOB_B_A_14-1", 40,
                              "SOB_B_A-14-1-40-001.png"))
        _png(_official(tmp_path, "benign", "adenosis", "SOB_B_A_14-1", 100,
                       "SOB_B_A-14-1-40-002.png"))
        _png(_official(tmp_path, "benign", "fibroadenoma", "SOB_B_F_14-2", 40,
                       "SOB_B_A-14-2-40-001.png"))
        index = index_breakhis(tmp_path)
        assert [r.path for r in index.records] == [good.resolve()]
        assert all(s.reason.startswith("folder mismatch") for s in index.skipped)
        assert len(index.skipped) == 2

    def test_magnification_folder_above_the_file_counts_too(self, tmp_path: Path) -> None:
        """Only the file's own folder was compared: a 100X image in 40X/extra/ was indexed
        as 100X without a word, while the same file in 40X/ was skipped."""
        good = _png(_official(tmp_path, "benign", "adenosis", "SOB_B_A_14-1", 40,
                              "SOB_B_A-14-1-40-001.png"))
        nested = good.parent / "extra"
        _png(nested / "SOB_B_A-14-1-100-002.png")
        kept = _png(nested / "SOB_B_A-14-1-40-003.png")  # agrees with the folder above: kept
        index = index_breakhis(tmp_path)
        assert sorted(r.path for r in index.records) == sorted([good.resolve(), kept.resolve()])
        assert [s.reason for s in index.skipped] == [
            "folder mismatch: file says 100X but sits in '40X' (above it)"]

    def test_names_with_other_digits_are_outside_the_grammar(self, tmp_path: Path) -> None:
        """Python's \\d takes any Unicode digit: fullwidth "２２５４９" made patient
        14-２２５４９AB, another patient than 14-22549AB (one slide on both sides of a
        patient-level split)."""
        with pytest.raises(ValueError, match="expected a BreaKHis name like"):
            parse_breakhis_name("SOB_B_A-14-\uff12\uff12\uff15\uff14\uff19AB-40-001.png")
        flat = tmp_path / "flat"
        good = _png(flat / "SOB_B_A-14-22549AB-40-001.png")
        _png(flat / "SOB_B_A-14-\uff12\uff12\uff15\uff14\uff19AB-40-002.png")
        index = index_breakhis(flat)
        assert [r.path for r in index.records] == [good.resolve()]
        assert [s.reason.split(":")[0] for s in index.skipped] == ["name outside grammar"]

    def test_file_in_the_other_class_folder_is_skipped(self, tmp_path: Path) -> None:
        """A benign name under malignant/ (in a type folder that matches its name)."""
        good = _png(_official(tmp_path, "benign", "adenosis", "SOB_B_A_14-1", 40,
                              "SOB_B_A-14-1-40-001.png"))
        _png(_official(tmp_path, "malignant", "adenosis", "SOB_B_A_14-1", 40,
                       "SOB_B_A-14-1-40-002.png"))
        index = index_breakhis(tmp_path)
        assert [r.path for r in index.records] == [good.resolve()]
        assert [s.reason for s in index.skipped] == [
            "folder mismatch: benign file inside a 'malignant' folder"]

    def test_file_in_another_patients_folder_is_skipped(self, tmp_path: Path) -> None:
        """The patient comes from the name: a file naming another patient, year or slide
        suffix than its patient folder would have been indexed as another patient, its
        folder's images then on both sides of a "patient-disjoint" split."""
        folder = "SOB_B_A_14-10001AB"
        good = _png(_official(tmp_path, "benign", "adenosis", folder, 40,
                              "SOB_B_A-14-10001AB-40-001.png"))
        for stray in ("SOB_B_A-14-10002-40-051.png", "SOB_B_A-15-10001AB-40-052.png",
                      "SOB_B_A-14-10001-40-053.png"):
            _png(_official(tmp_path, "benign", "adenosis", folder, 40, stray))
        index = index_breakhis(tmp_path)
        assert [r.path for r in index.records] == [good.resolve()]
        assert len(index.skipped) == 3
        for skip in index.skipped:
            assert skip.reason.startswith("folder mismatch: the name says patient folder "), skip
            assert skip.reason.endswith(f"but the file sits in {folder!r}"), skip
        assert index.summary()["patients"] == 1

    def test_patient_folder_case_and_lowercase_names_agree(self, tmp_path: Path) -> None:
        """Folder names compare without case (a tree copied through a case-folding disk)."""
        good = _png(_official(tmp_path, "benign", "adenosis", "sob_b_a_14-10001ab", 40,
                              "SOB_B_A-14-10001AB-40-001.png"))
        index = index_breakhis(tmp_path)
        assert [r.path for r in index.records] == [good.resolve()]

    def test_missing_root(self, tmp_path: Path) -> None:
        """A missing root was reported as "is not a folder"; it does not exist."""
        with pytest.raises(FileNotFoundError, match=r"expected a BreaKHis folder, but "
                           rf"'{re.escape(str(tmp_path / 'nope'))}' does not exist"):
            index_breakhis(tmp_path / "nope")
        (tmp_path / "afile").write_text("")
        for index in (index_breakhis, index_image_folder):
            with pytest.raises(FileNotFoundError, match=r"'.*afile' is a file, not a folder"):
                index(tmp_path / "afile")

    def test_two_copies_of_the_tree_are_refused(self, tmp_path: Path) -> None:
        name = "SOB_B_A-14-1-40-001.png"
        _png(_official(tmp_path / "copy1", "benign", "adenosis", "SOB_B_A_14-1", 40, name))
        _png(_official(tmp_path / "copy2", "benign", "adenosis", "SOB_B_A_14-1", 40, name))
        with pytest.raises(ValueError, match=r"but 1 file repeats a name") as info:
            index_breakhis(tmp_path)
        inside = f"BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-1/40X/{name}"
        assert f"'copy1/{inside}' and 'copy2/{inside}'" in str(info.value)
        _png(_official(tmp_path / "copy3", "benign", "adenosis", "SOB_B_A_14-1", 40, name))
        with pytest.raises(ValueError, match=r"but 2 files repeat a name"):
            index_breakhis(tmp_path)
        assert len(index_breakhis(tmp_path / "copy1").records) == 1

    def test_one_image_number_under_two_paddings_is_warned(self, tmp_path: Path) -> None:
        # before: both indexed without a word (their bytes differ, so no duplicate check)
        names = ("SOB_B_A-14-1-40-001.png", "SOB_B_A-14-1-40-1.png", "SOB_B_A-14-1-40-002.png")
        for fill, name in enumerate(names):
            _png(_official(tmp_path, "benign", "adenosis", "SOB_B_A_14-1", 40, name), fill=fill)
        index = index_breakhis(tmp_path, verify=True)
        assert index.duplicate_content == []
        assert len(index.records) == 3  # kept: nothing says which copy is the image
        folder = "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-1/40X"
        warned = [w for w in index.warnings if "zero padding" in w]
        assert warned == [
            "1 image number of one slide and magnification is used by more than one file, the "
            f"names differing in zero padding only, e.g. ['{folder}/SOB_B_A-14-1-40-001.png', "
            f"'{folder}/SOB_B_A-14-1-40-1.png']: most likely copies of one image (patient "
            "splits keep them together; an image-level split may put one in training and "
            "another in test); remove the copies"]

    def test_hidden_folders_are_not_indexed(self, tmp_path: Path) -> None:
        good = _png(_official(tmp_path, "benign", "adenosis", "SOB_B_A_14-1", 40,
                              "SOB_B_A-14-1-40-001.png"))
        _png(good.parent / ".ipynb_checkpoints" / good.name)  # a copy, not a second image
        index = index_breakhis(tmp_path)
        assert [r.path for r in index.records] == [good.resolve()]
        rel = good.parent.relative_to(tmp_path).as_posix()
        assert [(s.path, s.reason) for s in index.skipped] == [
            (f"{rel}/.ipynb_checkpoints/", "hidden folder: not indexed")]


class TestDuplicateContent:
    """Byte-identical images under different names are kept, listed and warned about."""

    A1 = ("benign", "adenosis", "SOB_B_A_14-1", 40, "SOB_B_A-14-1-40-001.png")
    A2 = ("benign", "adenosis", "SOB_B_A_14-1", 40, "SOB_B_A-14-1-40-002.png")
    DC1 = ("malignant", "ductal_carcinoma", "SOB_M_DC_14-2", 40, "SOB_M_DC-14-2-40-001.png")
    DC2 = ("malignant", "ductal_carcinoma", "SOB_M_DC_14-2", 100, "SOB_M_DC-14-2-100-001.png")
    DC3 = ("malignant", "ductal_carcinoma", "SOB_M_DC_14-2", 200, "SOB_M_DC-14-2-200-001.png")

    @staticmethod
    def _rel(root: Path, where: tuple[str, str, str, int, str]) -> str:
        return _official(root, *where).relative_to(root).as_posix()

    @staticmethod
    def _write(root: Path, where: tuple[str, str, str, int, str], data: bytes) -> Path:
        path = _official(root, *where)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def test_copy_under_another_name_is_kept_and_reported(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One image filed under two patients (and classes): nothing is dropped, the
        group is listed and the warning names it, in the index, its JSON and the logs."""
        root = tmp_path / "tree"
        first = _png(_official(root, *self.A1), fill=10)
        self._write(root, self.DC1, first.read_bytes())  # another patient, another class
        _png(_official(root, *self.A2), fill=20)
        _png(_official(root, *self.DC2), fill=30)
        index = index_breakhis(root)
        assert len(index.records) == 4 and not index.skipped
        pair = sorted([self._rel(root, self.A1), self._rel(root, self.DC1)])
        assert index.duplicate_content == [pair]
        (warning,) = [w for w in index.warnings if "byte-identical images under" in w]
        assert warning == (
            f"1 group of byte-identical images under different names (2 files), e.g. {pair}; "
            "if one copy lands in training and another in test, the test metrics are "
            "optimistic (index --json lists every group under 'duplicate_content')")
        assert index.summary()["duplicate_content"] == [pair]
        assert main(["index", "--data-root", str(root), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["duplicate_content"] == [pair]
        assert main(["index", "--data-root", str(root)]) == 0
        assert f"warning: {warning}" in capsys.readouterr().out
        # train and cv log the index's warnings and record them in data_issues
        data = prepare_data(DataSpec(str(root), protocol="image", n_splits=2, val_fraction=0))
        assert warning in data.issues()["warnings"]

    def test_groups_are_counted_and_sorted(self, tmp_path: Path) -> None:
        first = _png(_official(tmp_path, *self.DC3), fill=1)
        for where in (self.DC1, self.A2):
            self._write(tmp_path, where, first.read_bytes())
        second = _png(_official(tmp_path, *self.DC2), fill=2)
        self._write(tmp_path, self.A1, second.read_bytes())
        index = index_breakhis(tmp_path)
        groups = [sorted(self._rel(tmp_path, w) for w in (self.A1, self.DC2)),
                  sorted(self._rel(tmp_path, w) for w in (self.A2, self.DC1, self.DC3))]
        assert index.duplicate_content == sorted(groups)
        (warning,) = [w for w in index.warnings if "byte-identical images under" in w]
        assert warning.startswith("2 groups of byte-identical images under different names "
                                  f"(5 files), e.g. {sorted(groups)[0]}; ")

    def test_same_pixels_in_other_bytes_are_not_reported(self, tmp_path: Path) -> None:
        """Only byte-identical files count: the same pixels compressed otherwise do not."""
        pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
        for where, level in ((self.A1, 1), (self.DC1, 9)):
            _official(tmp_path, *where).parent.mkdir(parents=True)
            Image.fromarray(pixels).save(_official(tmp_path, *where), compress_level=level)
        a, b = (_official(tmp_path, *w) for w in (self.A1, self.DC1))
        assert a.read_bytes() != b.read_bytes()
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        index = index_breakhis(tmp_path)
        assert len(index.records) == 2
        assert index.duplicate_content == [] and not index.warnings

    def test_without_verify_copies_are_not_looked_for(self, tmp_path: Path) -> None:
        """Headers only: no file is read whole, so copies are unknown (None), not absent."""
        first = _png(_official(tmp_path, *self.A1))
        self._write(tmp_path, self.DC1, first.read_bytes())
        index = index_breakhis(tmp_path, verify=False)
        assert len(index.records) == 2
        assert index.duplicate_content is None and not index.warnings
        assert index.summary()["duplicate_content"] is None
        assert index_image_folder(tmp_path, verify=False).duplicate_content is None
        assert index_breakhis(tmp_path).duplicate_content  # found when verifying

    def test_unreadable_copies_are_skipped_as_before_not_grouped(self, tmp_path: Path) -> None:
        """Files are hashed and decoded from one read: the skip reasons still name the
        file, as decoding it from its path does."""
        good = _png(_official(tmp_path, *self.A1))
        for where in (self.A2, self.DC1):  # two identical truncated copies
            self._write(tmp_path, where, good.read_bytes()[:40])
        self._write(tmp_path, self.DC2, b"not a PNG")
        index = index_breakhis(tmp_path)
        assert [r.path for r in index.records] == [good.resolve()]
        assert index.duplicate_content == []
        assert len(index.skipped) == 3
        for skip in index.skipped:
            path = tmp_path.resolve() / skip.path
            with pytest.raises(OSError) as info:
                read_image_size(path)
            assert skip.reason == f"unreadable image: {info.value}"
        assert any(str(tmp_path.resolve()) in s.reason for s in index.skipped)

    def test_synthetic_trees_have_none(self, synth_tree, kaggle_tree) -> None:
        for root, _ in (synth_tree, kaggle_tree):
            index = index_breakhis(root)
            assert index.duplicate_content == [], root
            assert not any("byte-identical" in w for w in index.warnings)

    def test_image_folder(self, tmp_path: Path) -> None:
        _png(tmp_path / "normal" / "001.png", fill=5)
        _png(tmp_path / "tumour" / "001.png", fill=5)  # one image in both classes
        _png(tmp_path / "tumour" / "002.png", fill=6)
        index = index_image_folder(tmp_path)
        assert len(index.records) == 3
        assert index.duplicate_content == [["normal/001.png", "tumour/001.png"]]
        assert index.warnings == [
            "1 group of byte-identical images at different paths (2 files), e.g. "
            "['normal/001.png', 'tumour/001.png']; if one copy lands in training and another "
            "in test, the test metrics are optimistic (index --json lists every group under "
            "'duplicate_content')",
            "1 group of byte-identical images carries different labels, e.g. "
            "{'normal/001.png': 'normal', 'tumour/001.png': 'tumour'}: one image labelled "
            "twice, at least once wrongly; check the data before trusting any metric"]

    def test_digests_by_path(self, tmp_path: Path) -> None:
        """Each kept image's SHA-256 (what a run records per split), None without verify."""
        for name in ("normal/a.png", "tumour/b.png"):
            _png(tmp_path / name, fill=len(name))
        (tmp_path / "tumour" / "bad.png").write_bytes(b"not a png")
        index = index_image_folder(tmp_path)
        assert index.digests == {rel: hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
                                 for rel in ("normal/a.png", "tumour/b.png")}
        assert index_image_folder(tmp_path, verify=False).digests is None
        tree = tmp_path / "breakhis"
        path = _png(_official(tree, *self.A1))
        assert index_breakhis(tree).digests == {
            path.relative_to(tree).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()}

    def test_copies_with_different_labels_get_a_warning_of_their_own(self, tmp_path: Path) -> None:
        """One image filed as two classes or two tumour types is a label conflict; copies
        with one label are not."""
        first = _png(_official(tmp_path, *self.DC1), fill=1)
        self._write(tmp_path, self.DC3, first.read_bytes())  # same patient, type: one label
        index = index_breakhis(tmp_path)
        assert index.duplicate_content and not any("labelled twice" in w for w in index.warnings)
        self._write(tmp_path, self.A1, first.read_bytes())  # the same image as benign adenosis
        second = _png(_official(tmp_path, *self.DC2), fill=2)
        self._write(tmp_path, self.A2, second.read_bytes())
        index = index_breakhis(tmp_path)
        conflicts = [w for w in index.warnings if "labelled twice" in w]
        a1, dc1 = self._rel(tmp_path, self.A1), self._rel(tmp_path, self.DC1)
        dc3 = self._rel(tmp_path, self.DC3)
        labels = {a1: "benign/A", dc1: "malignant/DC", dc3: "malignant/DC"}
        example = {p: labels[p] for p in sorted(labels)}  # the group's order
        assert conflicts == [
            f"2 groups of byte-identical images carry different labels, e.g. {example}: one "
            "image labelled twice, at least once wrongly; check the data before trusting any "
            "metric"]


class TestLinkedFolders:
    """Folders reached through a link are indexed, each real folder once."""

    def test_linked_type_folder_is_indexed(self, synth_tree, tmp_path: Path) -> None:
        root, meta = synth_tree
        tree = shutil.copytree(root, tmp_path / "tree")
        sob = tree / "BreaKHis_v1/histology_slides/breast/malignant/SOB"
        store = tmp_path / "other-disk"
        shutil.move(sob / "ductal_carcinoma", store / "ductal_carcinoma")
        (sob / "ductal_carcinoma").symlink_to(store / "ductal_carcinoma")
        index = index_breakhis(tree)
        assert index.summary()["by_type"] == meta["expected"]["by_type"]
        assert len(index.records) == meta["expected"]["images"]
        dc = [r for r in index.records if r.tumor_type == "DC"]
        assert dc and all(r.path.is_relative_to(sob / "ductal_carcinoma") for r in dc)

    def test_loops_and_links_into_the_tree_are_reported_not_walked_twice(
        self, tmp_path: Path
    ) -> None:
        name = "SOB_B_A-14-1-40-001.png"
        image = _png(_official(tmp_path, "benign", "adenosis", "SOB_B_A_14-1", 40, name))
        case = image.parent.parent
        (case / "40X" / "back").symlink_to(case)  # a loop
        breast = tmp_path / "BreaKHis_v1/histology_slides/breast"
        (breast / "aaa").symlink_to(breast / "benign")  # walked before its target
        # walked twice, the image would be refused as a second copy of the tree
        index = index_breakhis(tmp_path)
        assert [r.path for r in index.records] == [image.resolve()]
        reasons = {s.path: s.reason for s in index.skipped}
        rel = case.relative_to(tmp_path).as_posix()
        assert reasons[f"{rel}/40X/back/"].startswith("folder link loop: points back to")
        assert reasons["BreaKHis_v1/histology_slides/breast/aaa/"].startswith(
            "folder indexed already:")
        assert len(reasons) == 2

    def test_two_links_to_one_folder_are_walked_once(self, tmp_path: Path) -> None:
        store = tmp_path / "store"
        _png(store / "x.png")
        root = tmp_path / "data"
        _png(root / "normal" / "y.png")
        (root / "tumour").mkdir()
        (root / "tumour" / "a").symlink_to(store)
        (root / "tumour" / "b").symlink_to(store)
        index = index_image_folder(root)
        assert [r.path.relative_to(root.resolve()).as_posix() for r in index.records] == [
            "normal/y.png", "tumour/a/x.png"]
        assert [(s.path, s.reason.split(":")[0]) for s in index.skipped] == [
            ("tumour/b/", "folder indexed already")]

    def test_a_class_folder_without_usable_images_is_named(self, tmp_path: Path) -> None:
        """A class folder that was empty, or held only files that were skipped, was dropped
        from the classes without a word (helper-142); BreaKHis data warn of a class without
        images."""
        for fill, cls in enumerate(("cat", "dog")):
            _png(tmp_path / cls / "1.png", fill=fill)
        (tmp_path / "empty").mkdir()
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "x.png").write_bytes(b"not a png")
        index = index_image_folder(tmp_path)
        assert sorted({r.label for r in index.records}) == ["cat", "dog"]
        assert index.warnings == [
            "2 class folders ['empty', 'junk'] hold no usable image (none, or only files that were "
            "skipped): not classes of this data, which has 2: ['cat', 'dog']"]
        (tmp_path / "junk" / "x.png").unlink()
        (tmp_path / "junk").rmdir()
        assert index_image_folder(tmp_path).warnings == [
            "1 class folder ['empty'] holds no usable image (none, or only files that were "
            "skipped): not a class of this data, which has 2: ['cat', 'dog']"]

    def test_linked_class_folder_is_a_class(self, tmp_path: Path) -> None:
        for i in range(2):
            _png(tmp_path / "store" / "tumour" / f"{i}.png")
        root = tmp_path / "data"
        _png(root / "normal" / "0.png")
        (root / "tumour").symlink_to(tmp_path / "store" / "tumour")
        index = index_image_folder(root)
        assert index.summary()["by_class"] == {"normal": 1, "tumour": 2}
        assert not index.skipped


class TestImageFolder:
    def test_classes_and_patients_from_csv(self, tmp_path: Path) -> None:
        for cls, n in (("normal", 2), ("tumour", 3)):
            for i in range(n):
                _png(tmp_path / cls / f"img{i}.png")
        (tmp_path / "tumour" / "notes.txt").write_text("x")
        csv_path = tmp_path / "patients.csv"
        csv_path.write_text("path,patient\nnormal/img0.png,p1\nnormal/img1.png,p1\n"
                            "tumour/img0.png,p2\nimg1.png,p3\ntumour/img2.png, \n")
        index = index_image_folder(tmp_path, patients_csv=csv_path)
        summary = index.summary()
        assert summary["by_class"] == {"normal": 2, "tumour": 3}
        base = tmp_path.resolve()
        by_path = {r.path.relative_to(base).as_posix(): r.patient for r in index.records}
        assert by_path["normal/img1.png"] == "p1"
        assert by_path["tumour/img1.png"] == "p3"  # matched by bare file name
        assert by_path["tumour/img2.png"] is None  # blank cell: unknown, not a group ""
        assert summary["images_without_patient"] == 1
        assert any("1 of 5 images has no patient" in w and "tumour/img2.png" in w
                   and "its patient is unknown: protocol 'patient' refuses it, and a test set "
                       "that holds it gets no patient recognition rate (n/a)" in w
                   for w in index.warnings)
        csv_path.write_text("path,patient\nnormal/img0.png, \nnormal/img1.png,\n")
        (plural,) = [w for w in index_image_folder(tmp_path, patients_csv=csv_path).warnings
                     if "no patient" in w]
        assert plural.startswith(f"5 of 5 images have no patient in {str(csv_path)!r}")
        assert "their patient is unknown: protocol 'patient' refuses them, and a test set that holds " \
               "any of them gets no patient recognition rate (n/a)" in plural
        assert [s.path for s in index.skipped] == ["tumour/notes.txt"]

    def test_label_is_the_top_class_folder_not_a_sub_folder(self, tmp_path: Path) -> None:
        for name in ("normal/x.png", "tumour/slide1/y.png", "tumour/slide1/deep/z.png"):
            _png(tmp_path / name)
        index = index_image_folder(tmp_path)
        labels = {r.path.name: r.label for r in index.records}
        assert labels == {"x.png": "normal", "y.png": "tumour", "z.png": "tumour"}
        assert index.summary()["by_class"] == {"normal": 1, "tumour": 2}

    def test_missing_row_and_no_csv_leave_the_patient_unknown(self, tmp_path: Path) -> None:
        for fill, name in enumerate(("a/x.png", "a/y.png", "b/z.png")):
            _png(tmp_path / name, fill=fill)  # different images: no byte-identical warning
        (tmp_path / "p.csv").write_text("path,patient\na/x.png,p1\n")
        by_path = {r.path.name: r.patient
                   for r in index_image_folder(tmp_path, patients_csv=tmp_path / "p.csv").records}
        assert by_path == {"x.png": "p1", "y.png": None, "z.png": None}
        without = index_image_folder(tmp_path)
        assert all(r.patient is None for r in without.records) and not without.warnings

    def test_hidden_folders_are_not_classes(self, tmp_path: Path) -> None:
        for cls in ("normal", "tumour"):
            _png(tmp_path / cls / "img0.png")
        _png(tmp_path / ".ipynb_checkpoints" / "img0-checkpoint.png")
        _png(tmp_path / "tumour" / ".ipynb_checkpoints" / "img0-checkpoint.png")
        index = index_image_folder(tmp_path)
        assert index.summary()["by_class"] == {"normal": 1, "tumour": 1}
        assert [s.path for s in index.skipped] == [".ipynb_checkpoints/",
                                                   "tumour/.ipynb_checkpoints/"]

    def test_one_path_with_two_patients_is_refused(self, tmp_path: Path) -> None:
        for name in ("a/x.png", "b/y.png"):
            _png(tmp_path / name)
        csv_path = tmp_path / "p.csv"
        csv_path.write_text("path,patient\na/x.png,p1\nb/y.png,p2\na/x.png,p1\na/x.png,p9\n")
        with pytest.raises(ValueError, match=r"'a/x.png' is given patient 'p1' on line 2 and "
                           r"'p9' on line 5") as info:
            index_image_folder(tmp_path, patients_csv=csv_path)
        assert str(csv_path) in str(info.value)

    def test_a_csv_not_in_utf8_or_a_folder_is_named(self, tmp_path: Path) -> None:
        """Excel's plain 'CSV' (cp1252) gave only "'utf-8' codec can't decode byte 0xe9 in
        position 13", naming neither the file nor the fix; a folder 'did not exist'."""
        _png(tmp_path / "data" / "a" / "x.png")
        csv_path = tmp_path / "p.csv"
        csv_path.write_bytes("path,patient\na/x.png,José\n".encode("cp1252"))
        with pytest.raises(ValueError, match=rf"patient CSV '{re.escape(str(csv_path))}' is not "
                           r"UTF-8 text \(line 2: byte 0xe9\): save it as 'CSV UTF-8'"):
            index_image_folder(tmp_path / "data", patients_csv=csv_path)
        with pytest.raises(ValueError, match=rf"expected a patient CSV file, but "
                           rf"'{re.escape(str(tmp_path / 'data'))}' is a folder"):
            index_image_folder(tmp_path / "data", patients_csv=tmp_path / "data")
        csv_path.write_bytes("path,patient\na/x.png,José\n".encode("utf-8"))
        (record,) = index_image_folder(tmp_path / "data", patients_csv=csv_path).records
        assert record.patient == "José"

    def test_csv_paths_are_normalised_as_in_fold_tables(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``./benign/x.png`` matched no image: every image was left without a patient."""
        for fill, name in enumerate(("benign/x.png", "benign/y.png", "malignant/z.png",
                                     "malignant/w.png")):
            _png(tmp_path / "data" / name, fill=fill)
        csv_path = tmp_path / "p.csv"
        csv_path.write_text("path,patient\n./benign/x.png,p1\nbenign//y.png,p2\n"
                            ".\\malignant\\z.png,p3\n./w.png,p4\nbenign/x.png,p1\n")
        index = index_image_folder(tmp_path / "data", patients_csv=csv_path)
        assert {r.path.name: r.patient for r in index.records} == {
            "x.png": "p1", "y.png": "p2", "z.png": "p3", "w.png": "p4"}
        assert not index.warnings
        assert main(["index", "--data-root", str(tmp_path / "data"), "--image-folder",
                     "--patients-csv", str(csv_path), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["patients"], out["images_without_patient"]) == (4, 0)
        # rows that name one image in two spellings are one path given two patients
        csv_path.write_text("path,patient\nbenign/x.png,p1\n./benign//x.png,p9\n")
        with pytest.raises(ValueError, match=r"'benign/x.png' is given patient 'p1' on line 2 "
                           r"and 'p9' on line 3"):
            index_image_folder(tmp_path / "data", patients_csv=csv_path)

    def test_bare_name_shared_by_images_is_refused(self, tmp_path: Path) -> None:
        """File names restarted per class: one bare-name row would merge patients."""
        for name in ("benign/001.png", "malignant/001.png", "malignant/002.png"):
            _png(tmp_path / name)
        csv_path = tmp_path / "p.csv"
        csv_path.write_text("path,patient\n001.png,P1\n002.png,P2\n")
        with pytest.raises(ValueError, match=r"line 2 of .* bare file name '001.png', but 2 "
                           r"images .* have that name and no row of their own, e.g. "
                           r"\['benign/001.png', 'malignant/001.png'\]"):
            index_image_folder(tmp_path, patients_csv=csv_path)
        csv_path.write_text("path,patient\nbenign/001.png,P1\nmalignant/001.png,P3\n"
                            "002.png,P2\n")
        by_path = {r.path.relative_to(tmp_path.resolve()).as_posix(): r.patient
                   for r in index_image_folder(tmp_path, patients_csv=csv_path).records}
        assert by_path == {"benign/001.png": "P1", "malignant/001.png": "P3",
                           "malignant/002.png": "P2"}

    def test_path_row_wins_over_bare_name_row(self, tmp_path: Path) -> None:
        for name in ("a/x.png", "b/y.png"):
            _png(tmp_path / name)
        csv_path = tmp_path / "p.csv"
        for rows in ("a/x.png,p1\nx.png,p2\n", "x.png,p2\na/x.png,p1\n"):
            csv_path.write_text("path,patient\n" + rows + "b/y.png,p3\n")
            index = index_image_folder(tmp_path, patients_csv=csv_path)
            assert {r.path.name: r.patient for r in index.records} == {"x.png": "p1",
                                                                       "y.png": "p3"}
            assert any(w.startswith("1 image has a path row and a bare-name row with "
                                    "different patients") and "a/x.png" in w
                       for w in index.warnings)

    def test_csv_with_byte_order_mark_and_short_row(self, tmp_path: Path) -> None:
        for name in ("a/x.png", "b/y.png"):
            _png(tmp_path / name)
        csv_path = tmp_path / "p.csv"
        csv_path.write_text("\ufeffpath,patient\na/x.png,p1\nb/y.png,p2\n", encoding="utf-8")
        index = index_image_folder(tmp_path, patients_csv=csv_path)
        assert [r.patient for r in index.records] == ["p1", "p2"]
        csv_path.write_text("path,patient\na/x.png,p1\nb/y.png\n")
        with pytest.raises(ValueError, match=r"expected a path and a patient .* on line 3 of"):
            index_image_folder(tmp_path, patients_csv=csv_path)

    def test_bad_csv(self, tmp_path: Path) -> None:
        _png(tmp_path / "a" / "x.png")
        (tmp_path / "p.csv").write_text("file,who\n")
        with pytest.raises(ValueError, match="expected columns 'path' and 'patient'"):
            index_image_folder(tmp_path, patients_csv=tmp_path / "p.csv")


class TestSynthetic:
    def test_marked_synthetic(self, synth_tree) -> None:
        root, meta = synth_tree
        assert "SYNTHETIC" in (root / "SYNTHETIC.txt").read_text()
        assert json.loads((root / "synthetic.json").read_text())["synthetic"] is True
        some_png = next((root / meta["images_root"]).rglob("*-001.png"))
        with Image.open(some_png) as image:
            assert "SYNTHETIC" in image.text["Comment"]

    def test_classes_differ_in_colour(self, synth_tree) -> None:
        root, _ = synth_tree
        index = index_breakhis(root)
        means = {}
        for label in ("benign", "malignant"):
            paths = [r.path for r in index.records if r.label == label][:10]
            colours = [np.asarray(Image.open(p)).mean(axis=(0, 1)) for p in paths]
            means[label] = np.mean(colours, axis=0)
        assert means["benign"][0] - means["malignant"][0] > 20  # benign is redder

    def test_refuses_non_empty_folder(self, tmp_path: Path) -> None:
        (tmp_path / "x").write_text("x")
        with pytest.raises(ValueError, match="not empty"):
            make_synthetic_breakhis(tmp_path, size=(16, 16))

    def test_custom_patients(self, tmp_path: Path) -> None:
        meta = make_synthetic_breakhis(
            tmp_path / "t", size=(16, 12), irregular=False, folds=False, images_per_magnification=1,
            patients=[SyntheticPatient("F", "14", "1"),
                      SyntheticPatient("MC", "14", "2", counts=(1, 0, 0, 2))])
        assert meta["expected"]["images"] == 4 + 3
        assert index_breakhis(tmp_path / "t").summary()["by_magnification"] == {
            "40": 2, "100": 1, "200": 1, "400": 3}

    @pytest.mark.parametrize(("patients", "folds", "message"), [
        ([], False, "must hold at least one patient, but got none"),
        ([SyntheticPatient("A", "2014", "1")], False, r"two-digit year .* 'SOB_B_A-2014-1-40"),
        ([SyntheticPatient("A", "14", "1ab")], False, "which the indexer refuses"),
        ([SyntheticPatient("A", "14", "1"), SyntheticPatient("A", "14", "1")], False,
         "twice"),
        ([SyntheticPatient("A", "14", "1", counts=(0, 0, 0, 0))], False, "write no image"),
        ([SyntheticPatient("A", "14", "1", counts=(1, 1))], False, "counts must be 4"),
        ([SyntheticPatient("A", "14", "1", counts=(1, 1, 1, -2))], False, "each >= 0 or -1"),
        # the DC/LC copies of one slide are one patient id: nothing to train on
        ([SyntheticPatient("DC", "14", "1"), SyntheticPatient("LC", "14", "1")], True,
         "at least two patient ids"),
    ])
    def test_refuses_patients_the_index_would_not_count(
        self, tmp_path: Path, patients, folds: bool, message: str
    ) -> None:
        # before, these wrote a tree whose synthetic.json 'expected' counts disagreed with
        # what index_breakhis found (or crashed with an IndexError on an empty list)
        with pytest.raises(SettingError, match=message):
            make_synthetic_breakhis(tmp_path / "t", size=(16, 12), images_per_magnification=1,
                                    patients=patients, folds=folds)
        assert not (tmp_path / "t").exists()

    def test_numpy_counts_and_a_folder_twice_under_two_spellings(self, tmp_path: Path) -> None:
        meta = make_synthetic_breakhis(
            tmp_path / "t", size=(16, 12), irregular=False, folds=False, images_per_magnification=1,
            patients=[SyntheticPatient("A", "14", "1", counts=tuple(np.array([1, 0, 2, -1])))])
        assert meta["expected"]["images"] == 4
        with pytest.raises(SettingError, match="twice"):
            make_synthetic_breakhis(tmp_path / "u", size=(16, 12), folds=False, patients=[
                SyntheticPatient("A", "14", "1"), SyntheticPatient("A", 14, "1")])  # type: ignore[arg-type]

    def test_expected_counts_match_the_index(self, tmp_path: Path) -> None:
        # the DC/LC pair of one slide (two folders, one patient id) and a patient with a
        # magnification left empty: the counts are what the indexer finds
        meta = make_synthetic_breakhis(
            tmp_path / "t", size=(16, 12), irregular=True, folds=True,
            images_per_magnification=1,
            patients=[SyntheticPatient("DC", "14", "7"), SyntheticPatient("LC", "14", "7"),
                      SyntheticPatient("A", "15", "3CD", counts=(2, 0, -1, 1))])
        summary = index_breakhis(tmp_path / "t").summary()
        assert meta["expected"]["images"] == summary["images"] == 4 + 4 + 4
        assert meta["expected"]["patients"] == summary["patients"] == 3
        assert meta["expected"]["patient_ids"] == summary["patient_ids"] == 2
        assert meta["expected"]["by_magnification"] == summary["by_magnification"]


class TestLoadRgb:
    def test_16_bit_grey_png_is_rescaled_not_clipped(self, tmp_path: Path) -> None:
        levels = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], np.uint16)
        Image.fromarray(levels).save(tmp_path / "g16.png")
        with Image.open(tmp_path / "g16.png") as image:
            assert image.mode.startswith("I")
        rgb = np.asarray(load_rgb(tmp_path / "g16.png"))
        assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
        expected = np.rint(levels / 257).astype(np.uint8)
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], expected)

    def test_32_bit_and_float_images(self, tmp_path: Path) -> None:
        ints = np.array([[0, 257, 65535]], np.int32)
        Image.fromarray(ints).save(tmp_path / "i32.tif")
        np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "i32.tif"))[0, :, 0],
                                      [0, 1, 255])
        floats = np.array([[0.0, 0.5, 1.0]], np.float32)
        Image.fromarray(floats).save(tmp_path / "f.tif")
        np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "f.tif"))[0, :, 0],
                                      [0, 128, 255])

    def test_signed_16_bit_tiff_is_scaled_by_its_own_full_scale(self, tmp_path: Path) -> None:
        """Pillow opens a signed 16-bit TIFF (SampleFormat 2) as 32-bit ``I``: one negative
        level sent the whole image to the 32-bit divisor, all black; without one it was
        divided by 257, so images of one data set were scaled differently."""
        import struct

        def write(path: Path, levels: np.ndarray) -> None:  # Pillow writes int16 as int32
            data = levels.astype("<i2").tobytes()
            h, w = levels.shape
            tags = [(256, 3, w), (257, 3, h), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, 8),
                    (277, 3, 1), (278, 3, h), (279, 4, len(data)), (339, 3, 2)]  # 339: signed
            ifd = b"".join(struct.pack("<HHI", tag, kind, 1)
                           + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
                           for tag, kind, value in tags)
            path.write_bytes(b"II*\x00" + struct.pack("<I", 8 + len(data)) + data
                             + struct.pack("<H", len(tags)) + ifd + struct.pack("<I", 0))

        write(tmp_path / "neg.tif", np.array([[-1, 0, 16384, 32767]]))
        write(tmp_path / "pos.tif", np.array([[0, 8000, 16384, 32767]]))
        with Image.open(tmp_path / "neg.tif") as image:
            assert image.mode == "I" and np.asarray(image).tolist() == [[-1, 0, 16384, 32767]]
        assert np.asarray(load_rgb(tmp_path / "neg.tif"))[0, :, 0].tolist() == [0, 0, 128, 255]
        assert np.asarray(load_rgb(tmp_path / "pos.tif"))[0, :, 0].tolist() == [0, 62, 128, 255]
        assert np.asarray(load_rgb(tmp_path / "pos.tif")).shape == (1, 4, 3)

    def test_8_bit_images_are_unchanged(self, tmp_path: Path) -> None:
        pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "rgb.png")
        Image.fromarray(pixels).convert("L").save(tmp_path / "grey.png")
        np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "rgb.png")), pixels)
        grey = np.asarray(Image.fromarray(pixels).convert("L"))
        np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "grey.png"))[..., 1], grey)

    def test_the_first_frame_of_a_multi_page_tiff_is_read(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(1)
        first, second = (rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(2))
        Image.fromarray(first).save(tmp_path / "pages.tif", save_all=True, append_images=[Image.fromarray(second)])
        with Image.open(tmp_path / "pages.tif") as image:
            assert image.n_frames == 2
        np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "pages.tif")), first)

    def test_exif_orientation_is_applied(self, tmp_path: Path) -> None:
        # a camera JPEG stored landscape with "rotate 90 CW to display" (orientation 6)
        pixels = np.zeros((4, 8, 3), np.uint8)
        pixels[:, :4] = 255  # left half white, as stored
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(pixels).save(tmp_path / "cam.jpg", exif=exif, quality=100)
        rgb = np.asarray(load_rgb(tmp_path / "cam.jpg"))
        assert rgb.shape == (8, 4, 3)  # upright, as a viewer shows it
        assert rgb[1, 2].min() > 200 and rgb[6, 2].max() < 50  # stored left -> shown top

    def test_transparent_pixels_are_white(self, tmp_path: Path) -> None:
        rgba = np.zeros((2, 2, 4), np.uint8)  # black under full transparency
        rgba[0, 0] = (200, 100, 50, 255)
        Image.fromarray(rgba).save(tmp_path / "a.png")
        Image.fromarray(rgba[..., [0, 3]]).save(tmp_path / "la.png")  # LA
        rgb = np.asarray(load_rgb(tmp_path / "a.png"))
        assert rgb[0, 0].tolist() == [200, 100, 50]
        assert rgb[1, 1].tolist() == [255, 255, 255]
        assert np.asarray(load_rgb(tmp_path / "la.png"))[1, 1].tolist() == [255, 255, 255]
        palette = Image.fromarray(rgba[..., :3]).convert("P")
        index = palette.getpixel((1, 1))
        palette.save(tmp_path / "p.png", transparency=index)
        assert np.asarray(load_rgb(tmp_path / "p.png"))[1, 1].tolist() == [255, 255, 255]
        # a bi-level image with a transparent colour (black here) as its grey version
        bits = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
        bits.save(tmp_path / "1.png", transparency=0)
        with Image.open(tmp_path / "1.png") as image:
            assert image.mode == "1" and image.info["transparency"] == 0
        assert np.asarray(load_rgb(tmp_path / "1.png")).tolist() == [[[255] * 3, [255] * 3]]

    def test_transparent_level_of_a_16_bit_grey_png_is_white(self, tmp_path: Path) -> None:
        """A 16-bit grey PNG with a tRNS level kept its (often black) level there."""
        levels = np.array([[0, 1000], [2570, 65535]], dtype=np.uint16)
        Image.fromarray(levels).save(tmp_path / "g16.png", transparency=0)
        with Image.open(tmp_path / "g16.png") as image:
            assert image.mode.startswith("I") and image.info["transparency"] == 0
        rgb = np.asarray(load_rgb(tmp_path / "g16.png"))
        assert rgb[..., 0].tolist() == [[255, 4], [10, 255]]  # rescaled, then on white
        assert (rgb == rgb[..., :1]).all()


class TestTransforms:
    def test_training_augmentation_is_the_papers(self) -> None:
        steps = build_train_transform(16, shift=0.1, rotation=90.0).transforms
        kinds = [type(s) for s in steps]
        assert T.RandomHorizontalFlip in kinds and T.RandomVerticalFlip in kinds
        (affine,) = [s for s in steps if isinstance(s, T.RandomAffine)]
        assert tuple(affine.translate) == pytest.approx((0.1, 0.1))
        assert list(affine.degrees) == pytest.approx([-90.0, 90.0])
        # resampled bilinearly, as Keras' ImageDataGenerator (it was nearest: no new values)
        assert affine.interpolation == T.InterpolationMode.BILINEAR
        ramp = Image.fromarray(np.repeat(np.arange(0, 256, 16, dtype=np.uint8)[None], 16, 0))
        rotated = np.asarray(T.functional.affine(ramp, angle=37.0, translate=[0, 0], scale=1.0,
                                                 shear=[0.0], interpolation=affine.interpolation))
        assert set(np.unique(rotated)) - set(range(0, 256, 16)) - {0}  # values between the steps
        other = [s for s in build_train_transform(16, shift=0.2, rotation=30.0).transforms
                 if isinstance(s, T.RandomAffine)]
        assert tuple(other[0].translate) == pytest.approx((0.2, 0.2))
        assert list(other[0].degrees) == pytest.approx([-30.0, 30.0])
        plain = build_train_transform(16, augment=False).transforms
        assert not {T.RandomHorizontalFlip, T.RandomVerticalFlip, T.RandomAffine} & {
            type(s) for s in plain}

    def test_eval_transform_normalises_with_imagenet_statistics(self) -> None:
        white = Image.new("RGB", (20, 12), (255, 255, 255))
        x = build_eval_transform(16)(white)
        assert tuple(x.shape) == (3, 16, 16)
        expected = [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
        for c in range(3):
            torch.testing.assert_close(x[c], torch.full((16, 16), expected[c]))
        black = build_eval_transform(16)(Image.new("RGB", (8, 8)))
        assert black[0, 0, 0].item() == pytest.approx(-0.485 / 0.229)

    def test_both_flips_happen(self) -> None:
        """Over seeds, the training transform flips the image each way."""
        pixels = np.zeros((16, 16, 3), np.uint8)
        pixels[:4, :4] = 255  # a white top-left corner
        image = Image.fromarray(pixels)
        flip_h = build_train_transform(16, shift=0.0, rotation=0.0)
        seen = set()
        for seed in range(40):
            torch.manual_seed(seed)
            x = flip_h(image)[0] > 0
            seen.add((bool(x[:4, :4].all()), bool(x[:4, -4:].all()), bool(x[-4:, :4].all()),
                      bool(x[-4:, -4:].all())))
        # the corner lands in all four corners: horizontal and vertical flips, both
        assert seen == {(True, False, False, False), (False, True, False, False),
                        (False, False, True, False), (False, False, False, True)}


class TestSeededAugmentation:
    def test_reseeds_only_the_cpu_generator_and_keeps_the_augmentations(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A seeded item must not reseed CUDA generators (torch.manual_seed does, and
        fork_rng(devices=[]) does not restore them: on a GPU every loaded sample reset
        the dropout masks' stream); the augmentations stay those of that seed."""
        pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "a.png")
        data = ImageDataset([tmp_path / "a.png"], [0], build_train_transform(16))
        keys = [(0, 5), (0, 123456), (0, 2**31 - 2)]
        expected = []
        for _, seed in keys:  # what the seed gave before: torch.manual_seed, forked
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                expected.append(data.transform(load_rgb(tmp_path / "a.png")))
        assert not torch.equal(expected[0], expected[1])

        def refuse(seed: int) -> None:
            raise AssertionError("a data-set item reseeded the CUDA generators")

        monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
        monkeypatch.setattr(torch.cuda, "manual_seed", refuse)
        before = torch.get_rng_state()
        for key, x in zip(keys, expected):
            torch.testing.assert_close(data[key][0], x, rtol=0, atol=0)
        assert torch.equal(torch.get_rng_state(), before)


class TestIndexCommand:
    def test_json(self, synth_tree, capsys: pytest.CaptureFixture[str]) -> None:
        root, meta = synth_tree
        assert main(["index", "--data-root", str(root), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["images"] == meta["expected"]["images"]
        assert out["patients"] == meta["expected"]["patients"]
        assert out["by_class"] == meta["expected"]["by_class"]
        assert {"path", "reason"} == set(out["skipped"][0])
        assert len(out["skipped"]) == len(meta["irregular_files"])

    def test_text_and_strict(self, synth_tree, capsys: pytest.CaptureFixture[str]) -> None:
        root, _ = synth_tree
        assert main(["index", "--data-root", str(root)]) == 0
        text = capsys.readouterr().out
        assert "unreadable image: 1" in text and "Thumbs.db" in text
        assert main(["index", "--data-root", str(root), "--strict"]) == 2
        assert "could not be decoded" in capsys.readouterr().err

    def test_synth_command(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        out = tmp_path / "demo"
        assert main(["synth", "--out", str(out), "--size", "16x12", "--images-per-magnification",
                     "1", "--layout", "kaggle"]) == 0
        assert "SYNTHETIC" in capsys.readouterr().out
        assert (out / "Folds.csv").is_file()

    def test_help_for_every_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        for command in ("index", "train", "cv", "evaluate", "predict", "synth"):
            with pytest.raises(SystemExit) as exc:
                main([command, "--help"])
            assert exc.value.code == 0
            assert "usage: breakhis-repro" in capsys.readouterr().out

    def test_synth_help_explains_every_option(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            main(["synth", "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for expected in ("per patient and magnification (40X, 100X, 200X, 400X)",
                         "(default: 3)", "96x64 makes a small tree", "(default: 700x460)",
                         "with Folds.csv (default: official)", "same seed writes the same tree "
                         "(default: 0)"):
            assert expected in text, expected


class TestCommandsGiveHints:
    def test_index_of_a_folder_without_breakhis_images_fails_with_a_hint(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "cats").mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / "cats" / "a.png")
        for extra in ([], ["--json"]):
            assert main(["index", "--data-root", str(tmp_path), *extra]) == 1
            assert "no images found" in capsys.readouterr().err
        assert main(["index", "--data-root", str(tmp_path), "--image-folder"]) == 0

    def test_predict_out_must_be_a_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["predict", "--checkpoint", str(tmp_path / "c.pt"), str(tmp_path), "--out", str(tmp_path)]) == 2
        assert "--out expects the path of a CSV file" in capsys.readouterr().err


class TestDeviceOption:
    def test_auto_resolves_like_the_training_commands(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from breakhis.cli import _device, build_parser

        for command in (["predict", "--checkpoint", "c.pt", "x.png"], ["figures", "--checkpoint", "c.pt"]):
            assert build_parser().parse_args(command).device == "auto"
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        assert _device("auto") == "cpu" and _device("cpu") == "cpu"
        with pytest.raises(ValueError, match="no GPU is available"):
            _device("cuda")
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
        assert _device("auto") == "cuda"


@pytest.mark.parametrize("terminal, interval", [(False, 30.0), (True, 0.1)])
def test_progress_bars_in_a_log_refresh_seldom(terminal, interval, monkeypatch) -> None:
    """Redirected to a log (a batch scheduler's output), every epoch's bar wrote hundreds
    of frames into it."""
    import io
    import sys

    from breakhis._files import progress_bar

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    monkeypatch.setattr(sys, "stderr", Stream())
    bar = progress_bar(range(3), desc="epoch 1/1", file=sys.stderr)
    assert bar.mininterval == interval and list(bar) == [0, 1, 2]
    assert bar.maxinterval == max(interval, 10.0)  # the monitor thread's refresh, 10 s by default


def test_a_fifo_named_as_an_image_is_not_read(tmp_path: Path) -> None:
    """Its read blocked for good (until a writer came), and Ctrl-C could not end index."""
    import threading

    _png(tmp_path / "40X" / "SOB_B_A-14-22549AB-40-001.png")
    fifo = tmp_path / "40X" / "SOB_B_A-14-22549AB-40-002.png"
    os.mkfifo(fifo)
    read = threading.Event()

    def unblock() -> None:  # a reader stuck on the FIFO gets its end: the test fails, not hangs
        if not read.wait(30):
            with contextlib.suppress(OSError):  # ENXIO: no reader
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    try:
        index = index_breakhis(tmp_path)
    finally:
        read.set()
    assert len(index.records) == 1
    (skipped,) = index.skipped
    assert skipped.path == "40X/SOB_B_A-14-22549AB-40-002.png"
    assert skipped.reason == "unreadable image: not a regular file (a FIFO): not read"
