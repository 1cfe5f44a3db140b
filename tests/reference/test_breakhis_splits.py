"""Tasks and the three split protocols; patient-disjointness is checked, not assumed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from breakhis.data import ImageRecord, index_breakhis
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

    def test_check_patient_disjoint_raises(self) -> None:
        groups = np.array(["a", "a", "b", "c"])
        with pytest.raises(ValueError, match=r"1 patient\(s\) are in both, e.g. \['a'\]"):
            check_patient_disjoint(np.array([0, 2]), np.array([1, 3]), groups)
        check_patient_disjoint(np.array([0, 1]), np.array([2, 3]), groups)

    def test_official_dsfold(self, synth_tree) -> None:
        root, meta = synth_tree
        records = index_breakhis(root).records
        tables = find_fold_tables(root)
        assert [t.name for t in tables] == meta["fold_files"]
        splits = official_folds(records, tables)
        assert len(splits) == 5
        table = read_fold_table(tables[0])[1]
        for i in splits[0].test:
            assert table[records[i].path.name] == "test"
        assert all(s.patient_disjoint for s in splits)
        assert all(len(s.train) + len(s.test) == len(records) for s in splits)

    def test_official_kaggle_csv(self, kaggle_tree) -> None:
        root, _ = kaggle_tree
        records = index_breakhis(root).records
        tables = find_fold_tables(root)
        assert [t.name for t in tables] == ["Folds.csv"]
        splits = make_splits(records, get_task("MIBC").targets(records), "official",
                             fold_tables=tables)
        assert len(splits) == 5 and all(s.protocol == "official" for s in splits)

    def test_official_reports_unlisted_and_shared(self, tmp_path: Path) -> None:
        records = [ImageRecord(Path(f"/x/{n}.png"), "benign", patient=p)
                   for n, p in (("a", "p1"), ("b", "p1"), ("c", "p2"), ("d", "p3"))]
        table = tmp_path / "dsfold1.txt"
        table.write_text("a.png|40|1|train\nb.png|40|1|test\nc.png|40|1|test\n")
        (split,) = official_folds(records, [table])
        assert not split.patient_disjoint
        assert any("not listed" in n for n in split.notes)
        table.write_text("a.png|40|1|validation\n")
        with pytest.raises(ValueError, match="expected grp 'train' or 'test'"):
            official_folds(records, [table])

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
        assert any("1 image(s) without a patient" in n for n in split.notes)

    def test_patient_protocol_refuses_unknown_patients(self) -> None:
        records = [ImageRecord(Path(f"/x/{i}.png"), "benign" if i % 2 else "malignant",
                               patient=None if i < 2 else f"p{i}") for i in range(8)]
        targets = np.asarray([i % 2 for i in range(8)])
        with pytest.raises(ValueError, match=r"protocol 'patient' needs the patient of every "
                           r"image, but 2 of 8 image\(s\) have none, e.g. \['/x/0.png'"):
            make_splits(records, targets, "patient", n_splits=2)
        assert len(make_splits(records, targets, "image", n_splits=2)) == 2

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

    def test_fraction_checked(self) -> None:
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            validation_split(np.arange(4), np.zeros(4), np.arange(4), fraction=1.5,
                             by_patient=False)
