"""Tasks and the three split protocols; patient-disjointness is checked, not assumed."""

from __future__ import annotations

import ast
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.model_selection import StratifiedKFold

from breakhis import splits as splits_module
from breakhis.data import ImageRecord, index_breakhis, index_image_folder
from breakhis.splits import (
    check_patient_disjoint,
    find_fold_tables,
    image_kfold,
    make_splits,
    official_folds,
    patient_kfold,
    read_fold_table,
    validation_split,
)
from breakhis.tasks import get_task


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(path)
    return path


def _sides(index, split) -> tuple[list[str], list[str]]:
    rel = [r.path.relative_to(index.root).as_posix() for r in index.records]
    return [rel[i] for i in split.train], [rel[i] for i in split.test]


class TestTasks:
    def test_four_experiments(self, synth_tree) -> None:
        root, meta = synth_tree
        records = index_breakhis(root).records
        mibc, mifc = get_task("MIBC"), get_task("MIFC")
        msbc = get_task("MSBC", magnification=100)
        assert len(mibc.select(records)) == meta["expected"]["images"]
        assert len(msbc.select(records)) == meta["expected"]["by_magnification"]["100"]
        y = mibc.targets(records)
        assert np.bincount(y).tolist() == [meta["expected"]["by_class"]["benign"],
                                           meta["expected"]["by_class"]["malignant"]]
        by_type = list(meta["expected"]["by_type"].values())
        assert np.bincount(mifc.targets(records)).tolist() == by_type

    def test_fine_grained_class_order_is_benign_then_malignant(self, synth_tree) -> None:
        """The order of BREAKHIS.md's table (benign A F PT TA, then malignant DC LC MC PC):
        target i of a fine-grained task, and prob column i of its predictions."""
        order = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
        assert get_task("MIFC").classes == order
        assert get_task("MSFC", magnification=200).classes == order
        records = index_breakhis(synth_tree[0]).records
        targets = get_task("MIFC").targets(records)
        for record, target in zip(records, targets.tolist()):
            assert order[target] == record.tumor_type
            assert (target < 4) == (record.label == "benign")

    @pytest.mark.parametrize(("name", "mag", "match"), [
        ("MSBC", None, "magnification-specific"),
        ("MIFC", 40, "uses all magnifications"),
        ("XYZ", None, "task must be one of"),
        ("MSFC", 50, "magnification must be one of"),
    ])
    def test_exceptions(self, name: str, mag: int | None, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            get_task(name, magnification=mag)

    def test_fine_grained_needs_types(self) -> None:
        with pytest.raises(ValueError, match="needs BreaKHis tumour types"):
            get_task("MIFC").targets([ImageRecord(Path("x.png"), label="a")])


def _groups(records: list[ImageRecord]) -> np.ndarray:
    return np.asarray([r.patient for r in records])


class TestProtocols:
    def test_image_kfold_partitions_and_stratifies(self) -> None:
        y = np.array([0] * 30 + [1] * 70)
        splits = image_kfold(y, n_splits=5, seed=0)
        tests = np.concatenate([s.test for s in splits])
        assert sorted(tests.tolist()) == list(range(100))
        for s in splits:
            assert np.bincount(y[s.test]).tolist() == [6, 14]
            assert not set(s.train) & set(s.test)
            assert s.protocol == "image" and not s.patient_disjoint

    def test_image_kfold_is_shuffled_by_the_seed(self) -> None:
        y = np.array([0] * 30 + [1] * 70)
        tests = {seed: [s.test.tolist() for s in image_kfold(y, n_splits=5, seed=seed)]
                 for seed in (0, 1)}
        assert tests[0] == [s.test.tolist() for s in image_kfold(y, n_splits=5, seed=0)]
        assert tests[0] != tests[1]
        for test in tests[0]:  # drawn at random, not cut into runs of consecutive images
            assert np.any(np.diff(test) > 1), test

    def test_image_kfold_indices_are_sorted(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Sorted whatever order the splitter yields (scikit-learn's happens to be sorted:
        a splitter yielding them reversed stands in for one that is not)."""

        class Reversed(StratifiedKFold):
            def split(self, X: Any, y: Any = None,
                      groups: Any = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
                for tr, te in super().split(X, y, groups):
                    yield tr[::-1], te[::-1]

        y = np.tile([0, 1, 1, 2], 10)
        expected = [(sorted(s.train.tolist()), sorted(s.test.tolist()))
                    for s in image_kfold(y, n_splits=4, seed=5)]
        monkeypatch.setattr(splits_module, "StratifiedKFold", Reversed)
        got = [(s.train.tolist(), s.test.tolist()) for s in image_kfold(y, n_splits=4, seed=5)]
        assert got == expected
        assert all(len(tr) + len(te) == len(y) for tr, te in got)

    def test_patient_kfold_is_shuffled_by_the_seed(self) -> None:
        groups = np.repeat([f"p{i:02d}" for i in range(20)], 3)
        targets = np.repeat(np.arange(20) % 2, 3)

        def test_patients(seed: int) -> list[list[str]]:
            return [sorted(set(groups[s.test].tolist()))
                    for s in patient_kfold(targets, groups, n_splits=4, seed=seed)]

        assert test_patients(3) == test_patients(3)
        assert test_patients(3) != test_patients(4)
        assert test_patients(0) != test_patients(4)

    def test_patient_kfold_is_disjoint_and_keeps_near_duplicates_together(self, synth_tree) -> None:
        root, _ = synth_tree
        records = index_breakhis(root).records
        task = get_task("MIFC")
        splits = make_splits(records, task.targets(records), "patient", n_splits=5, seed=3)
        groups = _groups(records)
        covered = np.concatenate([s.test for s in splits])
        assert sorted(covered.tolist()) == list(range(len(records)))
        for s in splits:
            assert s.patient_disjoint
            assert not set(groups[s.train]) & set(groups[s.test])
            dup = [i for i, r in enumerate(records) if r.patient == "14-13412"]
            # DC and LC copies of slide 13412 are on the same side of every split
            assert set(dup) <= set(s.test.tolist()) or set(dup) <= set(s.train.tolist())

    @settings(max_examples=25, deadline=None)
    @given(st.lists(st.integers(0, 11), min_size=20, max_size=80), st.integers(0, 1000))
    def test_patient_kfold_property(self, patient_ids: list[int], seed: int) -> None:
        groups = np.asarray([f"p{g}" for g in patient_ids])
        targets = np.asarray([g % 2 for g in patient_ids])
        if len(set(patient_ids)) < 3:
            with pytest.raises(ValueError, match="needs at least 3 patients"):
                patient_kfold(targets, groups, n_splits=3, seed=seed)
            return
        for s in patient_kfold(targets, groups, n_splits=3, seed=seed):
            assert not set(groups[s.train]) & set(groups[s.test])
            assert len(s.train) + len(s.test) == len(groups)

    def test_too_few_images_per_class_for_the_folds(self) -> None:
        """scikit-learn's "n_splits=5 cannot be greater than the number of members in each
        class" named neither the classes nor what to do."""
        y = np.array([0, 0, 0, 1, 1])
        with pytest.raises(ValueError, match=r"^image-level 5-fold needs a class with at "
                           r"least 5 images, but class 0 has 3 images and class 1 has 2; "
                           r"pass --n-splits 3 or fewer$"):
            image_kfold(y, n_splits=5)
        with pytest.raises(ValueError, match=r"but class 'benign' has 3 images and class "
                           r"'malignant' has 2; "):  # as make_splits names them
            image_kfold(y, n_splits=5, classes=("benign", "malignant"))
        with pytest.raises(ValueError, match=r"class 0 has 1 image and class 1 has 1; "
                           r"k-fold needs a class with at least 2 images$"):
            image_kfold(np.array([0, 1]), n_splits=2)
        groups = np.array([f"p{i}" for i in range(9)])
        with pytest.raises(ValueError, match=r"^patient-level 5-fold needs a class with at "
                           r"least 5 images, but class 0 has 3 images, class 1 has 3 and "
                           r"class 2 has 3; pass --n-splits 3 or fewer$"):
            patient_kfold(np.arange(9) % 3, groups, n_splits=5)
        assert len(image_kfold(np.append(y, 1), n_splits=3)) == 3

    def test_a_class_smaller_than_the_folds_still_warns_only(self) -> None:
        """In the package's words: scikit-learn's own warning reached the console with its
        site-packages path and source line (helper-144)."""
        y = np.array([0] * 10 + [1] * 2)
        for level, split in (("image-level", lambda: image_kfold(y, n_splits=5, classes=["B", "M"])),
                             ("patient-level", lambda: patient_kfold(y, np.arange(12).astype(str), n_splits=5,
                                                                     classes=["B", "M"]))):
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                splits = split()
            assert [str(w.message) for w in seen] == [
                f"{level} 5-fold: class 'M' has 2 images, fewer than the 5 folds: at least 3 test folds have "
                "none of it"]
            assert seen[0].filename == __file__  # said where the caller is, not in the library
            assert len(splits) == 5
            assert sorted(np.concatenate([s.test for s in splits]).tolist()) == list(range(12))

    def test_too_few_patients_says_what_to_do(self) -> None:
        targets = np.tile([0, 1], 5)
        with pytest.raises(ValueError, match=r"needs at least 5 patients, but the task has 2; "
                           r"pass --n-splits 2, or --protocol image \(image-level folds"):
            patient_kfold(targets, np.repeat(["a", "b"], 5), n_splits=5)
        with pytest.raises(ValueError, match=r"the task has 4; pass --n-splits 4 or fewer$"):
            patient_kfold(targets[:4], np.array(["a", "b", "c", "d"]), n_splits=5)

    def test_check_patient_disjoint_raises(self) -> None:
        groups = np.array(["a", "a", "b", "c"])
        with pytest.raises(ValueError, match=r"but 1 patient is in both, e.g. \['a'\]"):
            check_patient_disjoint(np.array([0, 2]), np.array([1, 3]), groups)
        with pytest.raises(ValueError, match=r"but 2 patients are in both, e.g. \['a', 'b'\]"):
            check_patient_disjoint(np.array([0, 2]), np.array([1, 3]),
                                   np.array(["a", "a", "b", "b"]))
        check_patient_disjoint(np.array([0, 1]), np.array([2, 3]), groups)

    def test_official_dsfold(self, synth_tree) -> None:
        root, meta = synth_tree
        index = index_breakhis(root)
        records = index.records
        tables = find_fold_tables(index)
        assert [t.name for t in tables] == meta["fold_files"]
        splits = official_folds(records, tables)
        assert len(splits) == 5
        table = read_fold_table(tables[0])[1]
        for i in splits[0].test:
            assert table[records[i].path.name] == "test"
        assert all(s.patient_disjoint for s in splits)
        assert all(len(s.train) + len(s.test) == len(records) for s in splits)

    @pytest.mark.parametrize("seed", [0, 1])
    def test_synthetic_fold_tables_are_stratified(self, seed: int, tmp_path: Path) -> None:
        """`synth` drew 30% of all patients at random: fold 1 of the default tree held
        58 benign and no malignant test image."""
        from breakhis.synthetic import make_synthetic_breakhis

        root = tmp_path / "tree"
        make_synthetic_breakhis(root, size=(8, 8), irregular=False, seed=seed)
        index = index_breakhis(root, verify=False)
        patients_of = {c: {r.patient for r in index.records if r.label == c}
                       for c in ("benign", "malignant")}
        assert [len(p) for p in patients_of.values()] == [9, 8]
        splits = official_folds(index.records, find_fold_tables(index))
        assert len(splits) == 5
        for split in splits:
            test = {index.records[i].patient for i in split.test}
            # about 30% of each class's patients: round(0.3 * 9), round(0.3 * 8)
            assert [len(test & p) for p in patients_of.values()] == [3, 2], split.fold
        again = tmp_path / "again"
        make_synthetic_breakhis(again, size=(8, 8), irregular=False, seed=seed)
        assert [(again / f"dsfold{k}.txt").read_text() for k in range(1, 6)] == [
            (root / f"dsfold{k}.txt").read_text() for k in range(1, 6)]

    def test_official_kaggle_csv(self, kaggle_tree) -> None:
        root, _ = kaggle_tree
        index = index_breakhis(root)
        records = index.records
        tables = find_fold_tables(index)
        assert [t.name for t in tables] == ["Folds.csv"]
        splits = make_splits(records, get_task("MIBC").targets(records), "official",
                             fold_tables=tables)
        assert len(splits) == 5 and all(s.protocol == "official" for s in splits)

    def test_fold_tables_come_from_the_index(self, synth_tree, tmp_path: Path) -> None:
        """find_fold_tables walked the tree again on its own: a notebook's hidden copy of
        a Folds.csv won over the dsfold tables, and tables in a linked folder were missed."""
        root, meta = synth_tree
        data = Path(shutil.copytree(root, tmp_path / "data"))
        (data / ".ipynb_checkpoints").mkdir()
        (data / ".ipynb_checkpoints" / "Folds.csv").write_text("fold,mag,grp,filename\n")
        tables = find_fold_tables(index_breakhis(data))
        assert [t.relative_to(data).as_posix() for t in tables] == meta["fold_files"]

        elsewhere = tmp_path / "tables"
        elsewhere.mkdir()
        for name in meta["fold_files"]:
            (data / name).rename(elsewhere / name)
        (data / "folds").symlink_to(elsewhere, target_is_directory=True)
        tables = find_fold_tables(index_breakhis(data))
        assert [t.relative_to(data).as_posix() for t in tables] == [
            f"folds/{name}" for name in meta["fold_files"]]
        assert find_fold_tables(index_breakhis(data), max_depth=0) == []

    def test_unlisted_images_of_class_subfolders_are_named_from_their_class_folder(self, tmp_path: Path) -> None:
        """Images in subfolders of a class were named by their last folder only: two
        images showed as the same 'slide1/x.png' (helper-151)."""
        for name in ("benign/slide1/x.png", "malignant/slide1/x.png", "benign/y.png", "malignant/z.png",
                     "benign/benign/x.png", "benign/x.png"):
            _png(tmp_path / "data" / name)
        index = index_image_folder(tmp_path / "data")
        table = tmp_path / "Folds.csv"
        table.write_text("fold,mag,grp,filename\n1,,train,benign/y.png\n1,,test,malignant/z.png\n")
        (split,) = official_folds(index.records, [table])
        (note,) = [n for n in split.notes if "not listed" in n]
        shown = ast.literal_eval(note.split("e.g. ", 1)[1])
        assert note.startswith("4 images not listed in fold 1; left out, e.g. ") and len(set(shown)) == 3
        assert set(shown) <= {"benign/slide1/x.png", "malignant/slide1/x.png", "benign/benign/x.png", "benign/x.png"}

    def test_official_reports_unlisted_and_shared(self, tmp_path: Path) -> None:
        records = [ImageRecord(Path(f"/x/{n}.png"), "benign", patient=p)
                   for n, p in (("a", "p1"), ("b", "p1"), ("c", "p2"), ("d", "p3"))]
        table = tmp_path / "dsfold1.txt"
        table.write_text("a.png|40|1|train\nb.png|40|1|test\nc.png|40|1|test\n")
        (split,) = official_folds(records, [table])
        assert not split.patient_disjoint
        # the note names the images left out (an image folder's as <class folder>/<file>)
        assert "1 image not listed in fold 1; left out, e.g. ['x/d.png']" in split.notes
        table.write_text("a.png|40|1|validation\n")
        with pytest.raises(ValueError, match="expected grp 'train' or 'test'"):
            official_folds(records, [table])

    def test_official_notes_lines_without_an_image(self, synth_tree, tmp_path: Path) -> None:
        """Lines naming an image the index did not find (deleted, renamed, unreadable)
        were dropped silently: the fold just had fewer images. A magnification-specific
        task counts the lines of its magnification only (by name, else the mag column)."""
        root, meta = synth_tree
        data = Path(shutil.copytree(root, tmp_path / "data"))
        table = data / "dsfold1.txt"
        lines = table.read_text().splitlines()

        def listed(mag: int, grp: str) -> list[str]:
            return [line.split("|")[0] for line in lines if line.endswith(f"|{mag}|1|{grp}")]

        paths = {r.path.name: r.path for r in index_breakhis(data).records}
        (train40, *_), (test40, renamed, *_) = listed(40, "train"), listed(40, "test")
        train100 = listed(100, "train")[0]
        for name in (train40, test40, train100):
            paths[name].unlink()
        paths[renamed].rename(paths[renamed].with_name(renamed.replace("-40-", "-40-9")))
        broken = next(Path(p).name for p in meta["irregular_files"] if p.endswith("-999.png"))
        table.write_text("\n".join([*lines, f"{broken}|400|1|test", "scan 7.png|100X|1|train",
                                    ""]))
        index = index_breakhis(data)  # the truncated PNG is left out as unreadable
        order = [line.split("|")[0] for line in table.read_text().splitlines()]

        def notes(task: str, magnification: int | None = None) -> tuple[str, ...]:
            records = get_task(task, magnification=magnification).select(index.records)
            (split,) = official_folds(records, [table])
            return split.notes

        def absent(counts: str, names: set[str]) -> str:
            return (f"{counts} listed in fold 1 are not in the data (missing, or left out by "
                    f"the index), e.g. {sorted(names, key=order.index)[:3]}")

        # the renamed one, both ways
        unlisted = f"1 image not listed in fold 1; left out, e.g. {[renamed.replace('-40-', '-40-9')]}"
        assert notes("MSBC", 40) == (
            unlisted, absent("1 training image and 2 test images", {train40, test40, renamed}))
        assert notes("MIFC") == (unlisted, absent(
            "3 training images and 3 test images",
            {train40, test40, renamed, train100, broken, "scan 7.png"}))
        assert notes("MSFC", 200) == ()
        assert notes("MSBC", 100) == (absent("2 training images", {train100, "scan 7.png"}),)
        # a magnification-independent task on data of one magnification: told by the
        # task (make_splits passes it), the other magnifications' lines are noted too
        only40 = [r for r in index.records if r.magnification == 40]
        (inferred,) = official_folds(only40, [table])
        assert inferred.notes == notes("MSBC", 40)
        (told,) = official_folds(only40, [table], magnification=None)
        other = sum(line.split("|")[1] != "40" for line in table.read_text().splitlines())
        counted = re.match(r"(\d+) training images and (\d+) test images listed", told.notes[-1])
        assert counted and int(counted[1]) + int(counted[2]) == other + 3  # and the 3 at 40X
        (made,) = make_splits(only40, np.zeros(len(only40), dtype=np.int64), "official",
                              fold_tables=[table], magnification=None)
        assert made.notes == told.notes

    def test_official_fold_is_the_tables_own_number(self, tmp_path: Path) -> None:
        records = [ImageRecord(Path(f"/x/{n}.png"), "benign", patient=n) for n in "abcd"]
        table = tmp_path / "dsfold3.txt"
        table.write_text("a.png|40|3|train\nb.png|40|3|train\nc.png|40|3|test\n"
                         "d.png|40|3|test\n")
        (split,) = official_folds(records, [table])
        assert split.fold == 3 and split.to_dict()["fold"] == 3
        copy = tmp_path / "Folds.csv"
        copy.write_text("fold,mag,grp,filename\n3,40,train,a.png\n3,40,test,c.png\n")
        with pytest.raises(ValueError, match="fold 3 is defined by both"):
            official_folds(records, [table, copy])

    def test_official_unknown_patient_is_not_disjoint(self, tmp_path: Path) -> None:
        records = [ImageRecord(Path(f"/x/{n}.png"), "benign", patient=p)
                   for n, p in (("a", "p1"), ("b", None), ("c", "p2"))]
        table = tmp_path / "dsfold1.txt"
        table.write_text("a.png|40|1|train\nb.png|40|1|train\nc.png|40|1|test\n")
        (split,) = official_folds(records, [table])
        assert not split.patient_disjoint
        assert any("1 image without a patient" in n for n in split.notes)

    def test_patient_protocol_refuses_unknown_patients(self) -> None:
        records = [ImageRecord(Path(f"/x/{i}.png"), "benign" if i % 2 else "malignant",
                               patient=None if i < 2 else f"p{i}") for i in range(8)]
        targets = np.asarray([i % 2 for i in range(8)])
        with pytest.raises(ValueError, match=r"protocol 'patient' needs the patient of every "
                           r"image, but 2 of 8 images have none, e.g. \['/x/0.png'"):
            make_splits(records, targets, "patient", n_splits=2)
        with pytest.raises(ValueError, match=r"but 1 of 7 images has none, e.g. \['/x/1.png'"):
            make_splits(records[1:], targets[1:], "patient", n_splits=2)
        assert len(make_splits(records, targets, "image", n_splits=2)) == 2

    def test_table_paths_tell_apart_class_folders_that_reuse_names(self, tmp_path: Path) -> None:
        for cls in ("benign", "malignant"):
            for i in (1, 2, 3):
                _png(tmp_path / "data" / cls / f"{i:03d}.png")
        index = index_image_folder(tmp_path / "data")
        table = tmp_path / "Folds.csv"
        rows = [("benign/001.png", "test"), ("benign/002.png", "train"),
                ("benign/003.png", "train"), ("malignant/001.png", "train"),
                ("malignant\\002.png", "test"), ("malignant/003.png", "train")]
        table.write_text("fold,mag,grp,filename\n" + "".join(f"1,,{g},{p}\n" for p, g in rows))
        (split,) = official_folds(index.records, [table])
        assert _sides(index, split) == (
            ["benign/002.png", "benign/003.png", "malignant/001.png", "malignant/003.png"],
            ["benign/001.png", "malignant/002.png"])
        table.write_text("fold,mag,grp,filename\n" + "".join(
            f"1,,{'train' if c == 'benign' else 'test'},{c}/{i:03d}.png\n"
            for c in ("benign", "malignant") for i in (1, 2, 3)))
        (split,) = official_folds(index.records, [table])
        train, test = _sides(index, split)
        assert all(p.startswith("benign/") for p in train) and len(train) == 3
        assert all(p.startswith("malignant/") for p in test) and len(test) == 3

    def test_ambiguous_bare_name_is_refused(self, tmp_path: Path) -> None:
        for cls in ("benign", "malignant"):
            _png(tmp_path / "data" / cls / "001.png")
            _png(tmp_path / "data" / cls / f"{cls}-2.png")
        index = index_image_folder(tmp_path / "data")
        table = tmp_path / "dsfold1.txt"
        table.write_text("benign-2.png|40|1|train\n001.png|40|1|test\nmalignant-2.png|40|1|test\n")
        with pytest.raises(ValueError, match=r"expected line 2 of .*dsfold1.txt' to name one "
                           r"image, but '001.png' matches 2"):
            official_folds(index.records, [table])

    def test_image_on_both_sides_of_a_fold_is_refused(self, tmp_path: Path) -> None:
        records = [ImageRecord(Path(f"/x/c/{n}.png"), "benign", patient=n) for n in "abc"]
        table = tmp_path / "dsfold1.txt"
        table.write_text("a.png|40|1|train\nb.png|40|1|test\na.png|40|1|test\n")
        for read in (read_fold_table, lambda t: official_folds(records, [t])):
            with pytest.raises(ValueError, match=r"'a.png' is listed as train on line 1 and "
                               r"as test on line 3"):
                read(table)
        csv_table = tmp_path / "Folds.csv"  # two spellings of one image
        csv_table.write_text("fold,mag,grp,filename\n1,40,train,a.png\n1,40,test,b.png\n"
                             "1,40,test,c/a.png\n")
        with pytest.raises(ValueError, match=r"'/x/c/a.png' is listed as train on line 2 and "
                           r"as test on line 4"):
            official_folds(records, [csv_table])

    def test_fold_without_training_images_is_refused(self, tmp_path: Path) -> None:
        records = [ImageRecord(Path(f"/x/{n}.png"), "benign", patient=n) for n in "abc"]
        table = tmp_path / "dsfold2.txt"
        table.write_text("a.png|40|2|test\nb.png|40|2|test\nz.png|40|2|train\n")
        with pytest.raises(ValueError, match="official fold 2 of .* has no training images"):
            official_folds(records, [table])

    def test_breakhis_names_match_a_copy_nested_differently(self, synth_tree,
                                                            tmp_path: Path) -> None:
        root, _ = synth_tree
        records = index_breakhis(root).records
        table = tmp_path / "Folds.csv"
        names = [r.path.name for r in records]
        table.write_text("fold,mag,grp,filename\n" + "".join(
            f"1,,{'test' if i % 3 == 0 else 'train'},elsewhere/BreaKHis/{n}\n"
            for i, n in enumerate(names)))
        (split,) = official_folds(records, [table])
        assert split.test.tolist() == list(range(0, len(records), 3))
        assert len(split.train) + len(split.test) == len(records)

    def test_fold_tables_with_byte_order_mark_and_bad_lines(self, tmp_path: Path) -> None:
        table = tmp_path / "Folds.csv"
        table.write_text("\ufefffold,mag,grp,filename\n1,40,train,a/x.png\n1,40,test,y.png\n",
                         encoding="utf-8")
        assert read_fold_table(table) == {1: {"a/x.png": "train", "y.png": "test"}}
        table.write_text("fold,mag,grp,filename\n1,40,train,a/x.png\n1,40,test\n")
        with pytest.raises(ValueError, match=r"expected a header 'fold,mag,grp,filename' and "
                           r"one image per row in .*Folds.csv', but line 3 has"):
            read_fold_table(table)
        table.write_text("fold,mag,grp,filename\n1,40,train,a/x.png\n,40,test,y.png\n")
        with pytest.raises(ValueError, match=r"expected an integer fold number on line 3 of "
                           r".*Folds.csv' \(a header 'fold,mag,grp,filename'"):
            read_fold_table(table)
        dsfold = tmp_path / "dsfold1.txt"
        dsfold.write_text("\ufeffx.png|40|1|train\ny.png|40|one|test\n", encoding="utf-8")
        with pytest.raises(ValueError, match=r"expected an integer fold number on line 2 of "
                           r".*dsfold1.txt' \('filename\|mag\|fold\|grp'.*, but got 'one'"):
            read_fold_table(dsfold)
        dsfold.write_text("\ufeffx.png|40|1|train\n", encoding="utf-8")
        assert read_fold_table(dsfold) == {1: {"x.png": "train"}}

    def test_dsfold_tables_are_ordered_by_fold_number(self, tmp_path: Path) -> None:
        for cls in ("benign", "malignant"):
            _png(tmp_path / cls / "x.png")
        for k in (10, 2, 1):
            (tmp_path / f"dsfold{k}.txt").write_text(f"benign/x.png|40|{k}|train\n")
        tables = find_fold_tables(index_image_folder(tmp_path))
        assert [t.name for t in tables] == ["dsfold1.txt", "dsfold2.txt", "dsfold10.txt"]

    def test_dsfold_line_with_an_extra_field_is_refused(self, tmp_path: Path) -> None:
        dsfold = tmp_path / "dsfold1.txt"
        dsfold.write_text("x.png|40|1|train\ny.png|40|1|test|extra\n")
        with pytest.raises(ValueError, match=r"expected 'filename\|mag\|fold\|grp'.* on line 2 "
                           r"of .*dsfold1.txt', but got 'y.png\|40\|1\|test\|extra'"):
            read_fold_table(dsfold)

    def test_image_folder_name_is_not_matched_through_another_folder(
        self, tmp_path: Path
    ) -> None:
        """Only BreaKHis names are unique; an image-folder table line naming other/x.png
        does not match cls/x.png, even when no other x.png exists."""
        for name in ("benign/x.png", "benign/y.png", "malignant/z.png"):
            _png(tmp_path / "data" / name)
        index = index_image_folder(tmp_path / "data")
        table = tmp_path / "Folds.csv"
        table.write_text("fold,mag,grp,filename\n1,,train,benign/y.png\n1,,test,malignant/z.png\n"
                         "1,,test,other/x.png\n")
        (split,) = official_folds(index.records, [table])
        assert _sides(index, split) == (["benign/y.png"], ["malignant/z.png"])
        assert split.notes[:2] == ("1 image not listed in fold 1; left out, e.g. ['benign/x.png']",
                                   "1 test image listed in fold 1 is not in the data (missing, "
                                   "or left out by the index), e.g. ['other/x.png']")

    def test_unknown_patients_are_not_one_shared_patient(self, tmp_path: Path) -> None:
        records = [ImageRecord(Path(f"/x/{n}.png"), "benign", patient=p)
                   for n, p in (("a", None), ("b", None), ("c", "p1"), ("d", "p2"))]
        table = tmp_path / "dsfold1.txt"
        table.write_text("a.png|40|1|train\nc.png|40|1|train\nb.png|40|1|test\nd.png|40|1|test\n")
        (split,) = official_folds(records, [table])
        assert split.train.tolist() == [0, 2] and split.test.tolist() == [1, 3]
        assert not split.patient_disjoint
        assert split.notes == ("2 images without a patient; patient-disjointness cannot be "
                               "checked",)

    def test_official_without_tables(self) -> None:
        with pytest.raises(ValueError, match="needs Folds.csv or dsfoldN.txt"):
            official_folds([], [])

    def test_unknown_protocol(self) -> None:
        with pytest.raises(ValueError, match="protocol must be one of"):
            make_splits([], np.zeros(0), "random")


class TestValidationSplit:
    def test_by_patient(self) -> None:
        groups = np.repeat([f"p{i}" for i in range(20)], 3)
        targets = np.repeat(np.arange(20) % 2, 3)
        train = np.arange(60)
        fit, val = validation_split(train, targets, groups, fraction=0.2, by_patient=True, seed=0)
        assert not set(groups[fit]) & set(groups[val])
        assert sorted(np.concatenate([fit, val]).tolist()) == train.tolist()
        assert 6 <= len(val) <= 18

    def test_by_patient_with_tiny_classes(self) -> None:
        # eight classes of two or three images each cannot be stratified into 10 folds
        groups = np.asarray([f"p{i}" for i in range(20)])
        targets = np.arange(20) % 8
        fit, val = validation_split(np.arange(20), targets, groups, fraction=0.1,
                                    by_patient=True, seed=1)
        assert len(val) == 2 and not set(groups[fit]) & set(groups[val])

    @pytest.mark.parametrize("fraction", [0.15, 0.3])
    def test_image_level_keeps_a_fitting_image_of_every_class(self, fraction: float) -> None:
        """A class of one image cannot be stratified; the unstratified draw then held out
        that image in some seeds, and the model was never fitted on the class."""
        targets = np.array([0] * 8 + [1] + [2] * 3)
        groups = np.asarray([f"p{i}" for i in range(12)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn: "The least populated class ..."
            unfixed = [next(splits_module.ShuffleSplit(1, test_size=fraction, random_state=seed)
                            .split(np.zeros(12)))[1] for seed in range(100)]
            assert any(8 in val for val in unfixed)  # the draw does hold it out sometimes
            for seed in range(100):
                fit, val = validation_split(np.arange(12), targets, groups, fraction=fraction,
                                            by_patient=False, seed=seed)
                assert set(targets[fit].tolist()) == {0, 1, 2}, seed
                assert len(val) == len(unfixed[seed]) and sorted([*fit, *val]) == list(range(12))

    def test_fraction_checked(self) -> None:
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            validation_split(np.arange(4), np.zeros(4), np.arange(4), fraction=1.5,
                             by_patient=False)

    @pytest.mark.parametrize("n, fraction", [(8, 0.9), (1, 0.1)])
    def test_fraction_that_leaves_no_image_to_fit_is_refused_in_our_words(self, n: int, fraction: float) -> None:
        """scikit-learn's "the resulting train set will be empty" came through, naming its
        parameters (test_size, train_size) rather than the user's --val-fraction."""
        match = (rf"^expected a validation fraction that leaves images to fit on, but {fraction} of the "
                 rf"{n} training images? holds out {n}: none is left; use a smaller fraction "
                 r"\(--val-fraction; 0 holds out none\)$")
        with pytest.raises(ValueError, match=match):
            validation_split(np.arange(n), np.zeros(n, dtype=int), np.arange(n), fraction=fraction,
                             by_patient=False)
        fit, val = validation_split(np.arange(8), np.zeros(8, dtype=int), np.arange(8), fraction=0.8,
                                    by_patient=False)
        assert (len(fit), len(val)) == (1, 7)

    @pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3, 0.4, 0.45, 0.6])
    def test_held_out_share_is_the_fraction(self, fraction: float) -> None:
        rng = np.random.default_rng(0)
        groups = np.repeat([f"p{i}" for i in range(100)], 10)
        targets = np.repeat(rng.integers(0, 2, 100), 10)
        fit, val = validation_split(np.arange(1000), targets, groups, fraction=fraction,
                                    by_patient=True, seed=0)
        assert abs(len(val) / 1000 - fraction) <= 0.02
        assert not set(groups[fit]) & set(groups[val])
        for c in (0, 1):  # stratified: each class loses about the fraction
            assert abs(np.mean(targets[val] == c) - np.mean(targets == c)) <= 0.05

    def test_same_seed_same_split(self) -> None:
        groups = np.repeat([f"p{i}" for i in range(30)], 4)
        targets = np.repeat(np.arange(30) % 3, 4)
        runs = [validation_split(np.arange(120), targets, groups, fraction=0.2,
                                 by_patient=True, seed=s) for s in (5, 5, 6)]
        assert all((a == b).all() for a, b in zip(runs[0], runs[1]))
        assert not np.array_equal(runs[0][1], runs[2][1])

    def test_every_class_stays_in_the_fit_set(self, synth_tree) -> None:
        """Small classes (two or three patients) are never held out whole."""
        root, _ = synth_tree
        records = index_breakhis(root).records
        for task in (get_task("MSFC", magnification=40), get_task("MIFC")):
            chosen = task.select(records)
            targets = task.targets(chosen)
            groups = _groups(chosen)
            for split in make_splits(chosen, targets, "patient", n_splits=5, seed=0):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    fit, val = validation_split(split.train, targets, groups, fraction=0.1,
                                                by_patient=True, seed=split.fold)
                assert set(targets[fit]) == set(targets[split.train]), (task.name, split.fold)
                assert len(val) and not set(groups[fit]) & set(groups[val])

    @pytest.mark.parametrize("seed", range(4))
    def test_one_patient_class_stays_in_the_fit_set_at_a_large_fraction(self, seed: int) -> None:
        groups = np.asarray([f"p{i}" for i in range(5) for _ in range(2)] + ["solo"] * 2)
        targets = np.asarray([0] * 10 + [1] * 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fit, val = validation_split(np.arange(12), targets, groups, fraction=0.6,
                                        by_patient=True, seed=seed)
        assert "solo" not in set(groups[val].tolist())
        assert targets[fit].tolist().count(1) == 2
        assert len(val) and not set(groups[fit]) & set(groups[val])

    def test_warns_when_a_class_cannot_stay(self) -> None:
        groups = np.asarray(["a", "a", "b", "b", "b"])
        targets = np.asarray([0, 0, 1, 1, 1])
        with pytest.warns(UserWarning, match=r"holds out every training patient of class "
                          r"\[0\]: .* not fitted on that class"):
            fit, val = validation_split(np.arange(5), targets, groups, fraction=0.2,
                                        by_patient=True, seed=0)
        assert val.tolist() == [0, 1] and fit.tolist() == [2, 3, 4]
        with pytest.warns(UserWarning, match=r"every training patient of class \['benign'\]: "):
            validation_split(np.arange(5), targets, groups, fraction=0.2, by_patient=True, seed=0,
                             classes=["benign", "malignant"])
        with pytest.raises(ValueError, match="needs at least 2 patients"):
            validation_split(np.arange(2), targets, groups, fraction=0.5, by_patient=True)


def test_as_many_patients_as_folds_gives_one_patient_per_fold() -> None:
    """scikit-learn's StratifiedGroupKFold put two of 4 patients into one fold here and
    left a fold without test images (3 of 2,820 small random data sets did so); with as
    many patients as folds each fold tests one patient."""
    sizes, classes = [26, 13, 11, 16], [0, 0, 2, 2]
    groups = np.repeat([f"p{i}" for i in range(4)], sizes)
    targets = np.repeat(classes, sizes)
    splits = patient_kfold(targets, groups, n_splits=4, seed=0)
    tested = [sorted(set(groups[s.test])) for s in splits]
    assert sorted(t for one in tested for t in one) == ["p0", "p1", "p2", "p3"]
    assert all(len(one) == 1 for one in tested)
    for s in splits:
        assert sorted(np.concatenate([s.train, s.test]).tolist()) == list(range(len(groups)))
