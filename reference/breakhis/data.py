"""Index BreaKHis trees and generic image folders into typed image records.

BreaKHis (Spanhol et al., IEEE TBME 63:1455, 2016) names every image after its slide:
``SOB_B_A-14-22549AB-40-001.png`` is a surgical open biopsy (``SOB``), benign (``B``),
adenosis (``A``), year ``14``, slide ``22549AB``, magnification ``40``X, image ``001``.
:func:`index_breakhis` walks a tree (the official archive layout or the Kaggle copy that
nests it one level deeper), parses each file name with :func:`parse_breakhis_name`,
cross-checks it against the folders it sits in, opens it to read its size (and, unless
asked not to, decodes it fully so that truncated PNGs are caught, and hashes its bytes so
that byte-identical copies under different names are found), and returns the records
together with everything it had to leave out and why.

Nothing is labelled from a guess: a file that is not an image, whose name does not follow
the grammar, or that disagrees with its folders is *skipped with a reason*; the caller
decides whether that is fatal (``strict=True``). Nothing is dropped for a guess either:
byte-identical images are kept and reported (:attr:`DataIndex.duplicate_content`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import stat
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

from ._files import count, missing_folder_problem, plural, progress_bar

__all__ = [
    "BENIGN_TYPES",
    "IMAGE_ERRORS",
    "IMAGE_EXTENSIONS",
    "MAGNIFICATIONS",
    "MALIGNANT_TYPES",
    "METADATA_FILES",
    "TYPE_CODES",
    "TYPE_FOLDERS",
    "BreakhisName",
    "DataIndex",
    "ImageRecord",
    "SkippedFile",
    "UnreadableImageError",
    "image_digests",
    "index_breakhis",
    "index_image_folder",
    "parse_breakhis_name",
    "read_image_size",
    "undecodable_images",
]

#: The eight tumour types, benign first, in the order used for fine-grained labels.
TYPE_CODES: tuple[str, ...] = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
BENIGN_TYPES: frozenset[str] = frozenset({"A", "F", "PT", "TA"})
MALIGNANT_TYPES: frozenset[str] = frozenset({"DC", "LC", "MC", "PC"})
#: Type code -> folder name in the released archive.
TYPE_FOLDERS: dict[str, str] = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
MAGNIFICATIONS: tuple[int, ...] = (40, 100, 200, 400)
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
#: What Pillow raises for a file it cannot (or will not) decode: ``OSError``,
#: ``ValueError`` and ``SyntaxError`` for broken files, ``DecompressionBombError`` for
#: images over twice ``Image.MAX_IMAGE_PIXELS`` (and its warning, for those over the
#: limit, when warnings are turned into errors).
IMAGE_ERRORS: tuple[type[Exception], ...] = (
    OSError, ValueError, SyntaxError, Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
#: Files that describe a tree rather than belong to it; listed, never reported as junk.
METADATA_FILES: frozenset[str] = frozenset({"folds.csv", "synthetic.txt", "synthetic.json"})
# re.ASCII: the names' digits and letters are ASCII (Python's \d takes any Unicode digit,
# and IGNORECASE's [A-Z] the Kelvin sign: "２２５４９" would be another patient than "22549")
_DSFOLD = re.compile(r"^dsfold\d+\.txt$", re.IGNORECASE | re.ASCII)

_NAME = re.compile(
    r"^(?P<procedure>[A-Z]+)_(?P<cls>[BM])_(?P<type>A|F|PT|TA|DC|LC|MC|PC)"
    r"-(?P<year>\d{2})-(?P<slide>\d+[A-Z]*)-(?P<mag>40|100|200|400)-(?P<seq>\d+)\.png$",
    re.ASCII,
)
_MAG_FOLDER = re.compile(r"^(\d+)X$", re.IGNORECASE | re.ASCII)
#: A patient folder of the release, ``SOB_B_A_14-22549AB`` (underscore before the year).
_PATIENT_FOLDER = re.compile(
    r"^[A-Z]+_[BM]_(?:A|F|PT|TA|DC|LC|MC|PC)_\d{2}-\d+[A-Z]*$", re.IGNORECASE | re.ASCII
)


class UnreadableImageError(RuntimeError):
    """Raised in strict mode when an image file cannot be decoded."""


@dataclass(frozen=True)
class BreakhisName:
    """The fields encoded in a BreaKHis file name.

    Args:
        procedure: biopsy procedure (``SOB`` in the release).
        benign_malignant: ``"benign"`` or ``"malignant"``.
        tumor_type: one of :data:`TYPE_CODES`.
        year: two-digit year (``"14"`` for most slides, ``"15"`` for one).
        slide: slide id *with* its letter suffix (``"22549AB"``).
        magnification: 40, 100, 200 or 400.
        seq: running image number within the slide and magnification.
    """

    procedure: str
    benign_malignant: str
    tumor_type: str
    year: str
    slide: str
    magnification: int
    seq: int

    @property
    def patient(self) -> str:
        """Patient id: year and full slide id, e.g. ``"14-22549AB"``."""
        return f"{self.year}-{self.slide}"

    @property
    def case(self) -> str:
        """The patient folder name of the release, e.g. ``"SOB_B_A_14-22549AB"``."""
        cls = "B" if self.benign_malignant == "benign" else "M"
        return f"{self.procedure}_{cls}_{self.tumor_type}_{self.patient}"


def parse_breakhis_name(name: str) -> BreakhisName:
    """Parse a BreaKHis image file name.

    Args:
        name: the base name, e.g. ``"SOB_M_DC-14-13412-100-001.png"``.

    Returns:
        The parsed fields.

    Raises:
        ValueError: when the name does not follow
            ``<procedure>_<B|M>_<type>-<yy>-<slide>-<40|100|200|400>-<seq>.png`` or its
            class letter disagrees with its tumour type.

    Examples:
        >>> n = parse_breakhis_name("SOB_B_A-14-22549AB-40-001.png")
        >>> n.patient, n.tumor_type, n.magnification
        ('14-22549AB', 'A', 40)
        >>> parse_breakhis_name("SOB_M_PC-15-190EF-400-013.png").year
        '15'
        >>> parse_breakhis_name("SOB_M_PC-15-190EF-400-013.PNG")
        Traceback (most recent call last):
            ...
        ValueError: expected a BreaKHis name like 'SOB_B_A-14-22549AB-40-001.png' (<procedure>_<B|M>_<type>-<yy>-<slide>-<mag>-<seq>.png), but got 'SOB_M_PC-15-190EF-400-013.PNG'; only its extension's case differs: rename it to 'SOB_M_PC-15-190EF-400-013.png'
    """
    match = _NAME.match(name)
    if match is None:
        stem, dot, suffix = name.rpartition(".")
        # a release name whose extension only differs in case (e.g. copied from a system
        # that upper-cases it): the fold tables name it with '.png'
        case = (f"; only its extension's case differs: rename it to {stem + '.png'!r}"
                if dot and suffix != "png" and suffix.lower() == "png" and _NAME.match(stem + ".png")
                else "")
        raise ValueError(
            "expected a BreaKHis name like 'SOB_B_A-14-22549AB-40-001.png' "
            f"(<procedure>_<B|M>_<type>-<yy>-<slide>-<mag>-<seq>.png), but got {name!r}{case}"
        )
    cls = "benign" if match["cls"] == "B" else "malignant"
    tumor_type = match["type"]
    expected = "benign" if tumor_type in BENIGN_TYPES else "malignant"
    if cls != expected:
        raise ValueError(
            f"class letter {match['cls']!r} says {cls} but tumour type {tumor_type!r} is "
            f"{expected} in {name!r}"
        )
    return BreakhisName(
        procedure=match["procedure"],
        benign_malignant=cls,
        tumor_type=tumor_type,
        year=match["year"],
        slide=match["slide"],
        magnification=int(match["mag"]),
        seq=int(match["seq"]),
    )


@dataclass(frozen=True)
class ImageRecord:
    """One image and what is known about it.

    Args:
        path: absolute path of the image file.
        label: class name: ``"benign"``/``"malignant"`` for BreaKHis, the class folder
            name for a generic image folder.
        patient: patient (group) id, or ``None`` when unknown. For BreaKHis the year and
            full slide id (``"14-22549AB"``).
        tumor_type: BreaKHis type code (one of :data:`TYPE_CODES`), else ``None``.
        magnification: 40/100/200/400 for BreaKHis, else ``None``.
        case: the patient folder the image belongs to (BreaKHis: ``SOB_M_DC_14-13412``);
            two folders can share one patient id (the DC/LC near-duplicate slide).
        width: image width in pixels (``None`` if not read).
        height: image height in pixels (``None`` if not read).
    """

    path: Path
    label: str
    patient: str | None = None
    tumor_type: str | None = None
    magnification: int | None = None
    case: str | None = None
    width: int | None = None
    height: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (path as a string)."""
        out = asdict(self)
        out["path"] = str(self.path)
        return out


@dataclass(frozen=True)
class SkippedFile:
    """A file that was left out of the index.

    Args:
        path: path relative to the indexed root (POSIX separators).
        reason: why it was left out, in words.
    """

    path: str
    reason: str


@dataclass
class DataIndex:
    """The result of indexing a tree: records, skipped files, warnings.

    Args:
        root: the indexed folder.
        records: the usable images, in the order of a top-down walk of the tree with
            sorted names (a folder's files before its sub-folders: sorted by path where
            images sit only in the deepest folders, as in the release).
        skipped: files left out, with reasons.
        warnings: irregularities that did not exclude anything (e.g. one slide filed
            under two tumour types).
        metadata_files: fold tables and markers found in the tree (relative paths).
        kind: ``"breakhis"`` or ``"image-folder"``.
        duplicate_content: groups of indexed images whose files are byte-identical
            (relative paths, each group sorted, groups sorted), all kept; a warning says
            so. ``[]`` when none were found, ``None`` when they were not looked for
            (indexing with ``verify=False`` reads headers only, never whole files).
            Only identical bytes count: the same pixels saved another way (another PNG
            compression level, another format) are not found.
        digests: the SHA-256 of every indexed image's file, by relative path; ``None``
            when indexed with ``verify=False``. A run records them per split
            (:func:`breakhis.experiments.run_fold`), so that a resumed run tells images
            of the same names but other content.
    """

    root: Path
    records: list[ImageRecord]
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metadata_files: list[str] = field(default_factory=list)
    kind: str = "breakhis"
    duplicate_content: list[list[str]] | None = None
    digests: dict[str, str] | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def cases(self) -> list[str]:
        """Distinct patient folders (what BreaKHis counts as its 82 patients)."""
        return sorted({r.case for r in self.records if r.case is not None})

    @property
    def patients(self) -> list[str]:
        """Distinct patient ids (groups for patient-level splits)."""
        return sorted({r.patient for r in self.records if r.patient is not None})

    def summary(self) -> dict[str, Any]:
        """Counts as a JSON-ready dict.

        ``patients`` counts patient folders (82 on the real release); ``patient_ids``
        counts distinct slide ids, which is one fewer when a slide is filed under two
        types. ``images_without_patient`` counts images whose patient is unknown.
        ``by_magnification`` always has the keys ``"40"``, ``"100"``, ``"200"``,
        ``"400"`` for BreaKHis trees, ``by_type`` every type code.
        ``duplicate_content`` lists the groups of byte-identical images (``null`` when
        not looked for: see :attr:`duplicate_content`).
        """
        by_class = Counter(r.label for r in self.records)
        out: dict[str, Any] = {
            "kind": self.kind,
            "root": str(self.root),
            "images": len(self.records),
            "patients": len(self.cases) if self.kind == "breakhis" else len(self.patients),
            "patient_ids": len(self.patients),
            "images_without_patient": sum(r.patient is None for r in self.records),
        }
        if self.kind == "breakhis":
            by_type = Counter(r.tumor_type for r in self.records)
            by_mag = Counter(r.magnification for r in self.records)
            out["by_class"] = {c: by_class.get(c, 0) for c in ("benign", "malignant")}
            out["by_type"] = {t: by_type.get(t, 0) for t in TYPE_CODES}
            out["by_magnification"] = {str(m): by_mag.get(m, 0) for m in MAGNIFICATIONS}
            cases_by_type = Counter(
                t for t, _ in {(r.tumor_type, r.case) for r in self.records}
            )
            out["patients_by_type"] = {t: cases_by_type.get(t, 0) for t in TYPE_CODES}
        else:
            out["by_class"] = dict(sorted(by_class.items()))
        sizes = Counter(f"{r.width}x{r.height}" for r in self.records if r.width is not None)
        out["image_sizes"] = dict(sizes.most_common())
        out["skipped"] = [asdict(s) for s in self.skipped]
        out["skipped_by_reason"] = dict(Counter(_reason_kind(s.reason) for s in self.skipped))
        out["warnings"] = list(self.warnings)
        out["duplicate_content"] = (None if self.duplicate_content is None
                                    else [list(g) for g in self.duplicate_content])
        out["metadata_files"] = list(self.metadata_files)
        return out


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def read_image_size(
    path: str | os.PathLike[str] | IO[bytes], *, verify: bool = True
) -> tuple[int, int]:
    """Open an image and return ``(width, height)``.

    Args:
        path: image file, or a binary file object holding one (``io.BytesIO``).
        verify: decode all pixel data, so that truncated or corrupt files raise here
            rather than in the middle of training. Without it only the header is read.

    Raises:
        OSError: when the file cannot be opened or (with ``verify``) decoded; the other
            errors of :data:`IMAGE_ERRORS` (e.g. ``DecompressionBombError``) likewise.
    """
    with Image.open(path) as image:
        if verify:
            image.load()
        return image.size


def _is_metadata(name: str) -> bool:
    return name.lower() in METADATA_FILES or _DSFOLD.match(name) is not None


def _walk_files(
    root: Path, skipped: list[SkippedFile], *, hidden_reason: str = "hidden folder: not indexed"
) -> list[Path]:
    """Every file below ``root``, in walk order; hidden folders are not entered.

    The order is that of a top-down walk with sorted names: a folder's files, then each
    sub-folder in turn. Hidden folders (``.ipynb_checkpoints``, ``.git``, ``.Trash``)
    hold copies or tool state, never data: indexing them would make new classes or
    duplicate images. Each one is listed in ``skipped`` (as ``<folder>/``) instead.

    Links to folders are followed (data kept on another disk and linked into the tree),
    each real folder once: a link to a folder of the tree itself, to a folder already
    reached through another link, or to one of its own parent folders (a loop) is listed
    in ``skipped`` with the reason and not walked, so no image is indexed twice. A folder
    that cannot be listed is listed there too.
    """
    real = os.path.realpath
    real_root = real(root)

    def in_tree(target: str) -> bool:
        # A folder of the tree proper (reached without crossing a link, not hidden): a
        # link to it is always a second way to the same images, wherever it sits in the
        # walk order. A real path under the real root crosses no link below it.
        try:
            if os.path.commonpath([real_root, target]) != real_root:
                return False
        except ValueError:  # another drive
            return False
        return not any(part.startswith(".")
                       for part in Path(os.path.relpath(target, real_root)).parts)

    # real folders reached through links, each walked once
    visited: set[str] = set()
    files: list[Path] = []

    def rel(path: Path) -> str:
        return f"{path.relative_to(root).as_posix()}/"

    def walk(folder: Path, chain: tuple[str, ...], via_link: bool) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            skipped.append(SkippedFile(rel(folder), f"unreadable folder: {exc}"))
            return
        folders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links; a broken link is a file
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(folder / entry.name)
            elif entry.name.startswith("."):
                skipped.append(SkippedFile(rel(folder / entry.name), hidden_reason))
            else:
                folders.append(entry)
        for entry in folders:
            path = folder / entry.name
            if not entry.is_symlink() and not via_link:
                walk(path, (*chain, real(path)), False)
                continue
            target = real(path)
            if target in chain:
                where = Path(target).name or target
                skipped.append(SkippedFile(rel(path), f"folder link loop: points back to "
                                                      f"its parent folder {where!r}; not followed"))
            elif in_tree(target) or target in visited:
                skipped.append(SkippedFile(rel(path), f"folder indexed already: {target!r} "
                                                      "is reached another way; not walked twice"))
            else:
                visited.add(target)
                walk(path, (*chain, target), True)

    walk(root, (real(root),), False)
    return files


def _check_folders(path: Path, root: Path, name: BreakhisName) -> str | None:
    """Return a reason when the folders around ``path`` contradict its name: its
    magnification, class, tumour type or patient folder.

    Only folders inside the indexed ``root`` count: the folders above it are the
    user's (data kept under ``/data/adenosis/BreaKHis`` holds every tumour type).
    """
    names = [p.name for p in path.relative_to(root).parents if p.name]
    folders = [n.lower() for n in names]
    # Every magnification folder it sits in, not only its own (40X/extra/ holds 40X images)
    for folder in names:
        mag_folder = _MAG_FOLDER.match(folder)
        if mag_folder is not None and int(mag_folder.group(1)) != name.magnification:
            where = repr(folder) if folder == path.parent.name else f"{folder!r} (above it)"
            return f"folder mismatch: file says {name.magnification}X but sits in {where}"
    parents = set(folders)
    other_class = "malignant" if name.benign_malignant == "benign" else "benign"
    if other_class in parents and name.benign_malignant not in parents:
        return f"folder mismatch: {name.benign_malignant} file inside a {other_class!r} folder"
    for code, folder in TYPE_FOLDERS.items():
        if folder in parents and code != name.tumor_type:
            return f"folder mismatch: type {name.tumor_type} file inside {folder!r}"
    # The patient comes from the name: a file of another patient (or year, or slide
    # suffix) inside a patient folder would put that folder's images on both sides of a
    # patient-level split.
    for folder in names:
        if _PATIENT_FOLDER.match(folder) and folder.lower() != name.case.lower():
            return (f"folder mismatch: the name says patient folder {name.case!r} but the "
                    f"file sits in {folder!r}")
    return None


def _size_and_digest(path: Path) -> tuple[tuple[int, int], str]:
    """Decode an image fully and hash its bytes, reading the file once.

    Raises:
        OSError: as :func:`read_image_size` with ``verify=True`` raises for ``path``
            (the other errors of :data:`IMAGE_ERRORS` likewise), with the same messages.
    """
    with open(os.fspath(path), "rb") as handle:
        data = handle.read()
    # SHA-256 rather than a faster non-cryptographic hash: no two different files share
    # a digest by accident, and with hardware support it costs no more than SHA-1
    digest = hashlib.sha256(data, usedforsecurity=False).hexdigest()
    try:
        size = read_image_size(io.BytesIO(data), verify=True)
    except UnidentifiedImageError:
        # Pillow names a file object by its repr; name the file, as opening its path does
        raise UnidentifiedImageError(f"cannot identify image file {os.fspath(path)!r}") from None
    return size, digest


def _check_regular(path: Path) -> None:
    """Raise an ``OSError`` unless ``path`` (followed through links) is a regular file: a
    FIFO, socket or device is not read."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        raise OSError(f"not a regular file ({kind}): not read")


def _read_sizes(
    paths: Sequence[Path], *, verify: bool, workers: int, progress: bool, digest: bool = False
) -> list[tuple[tuple[int, int], str | None] | Exception]:
    """``((width, height), digest)`` of every image, or the error that reading it raised.

    With ``digest`` each file is read whole once, hashed and decoded from memory (so
    ``verify`` is implied); the digest is ``None`` otherwise.
    """
    def read(path: Path) -> tuple[tuple[int, int], str | None] | Exception:
        try:
            _check_regular(path)  # a FIFO named .png blocked its read (and Ctrl-C) for good
            if digest:
                return _size_and_digest(path)
            return read_image_size(path, verify=verify), None
        except IMAGE_ERRORS as exc:
            return exc

    results: Iterable[tuple[tuple[int, int], str | None] | Exception]
    # PNG decoding and hashing release the GIL, so threads overlap them.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(read, paths)
        if progress:
            results = progress_bar(results, total=len(paths), desc="reading images", unit="img")
        return list(results)


def undecodable_images(
    paths: Sequence[str | os.PathLike[str]], *, workers: int = 4, progress: bool = False,
) -> dict[str, Exception]:
    """Decode every image of ``paths`` and return those that fail, with their errors.

    What ``verify=True`` does while indexing, for a chosen list of files (e.g. the test
    images recorded in a checkpoint, without decoding the rest of the data again).

    Args:
        paths: image files.
        workers: threads used to decode.
        progress: show a progress bar.

    Returns:
        ``{str(path): error}`` for each file that cannot be opened or decoded (an
        error of :data:`IMAGE_ERRORS`), in the order of ``paths``; empty when all decode.
    """
    results = image_digests(paths, workers=workers, progress=progress)
    return {p: r for p, r in results.items() if isinstance(r, Exception)}


def image_digests(
    paths: Sequence[str | os.PathLike[str]], *, workers: int = 4, progress: bool = False,
) -> dict[str, str | Exception]:
    """Decode every image of ``paths`` and hash its file, reading it once: what
    ``verify=True`` does while indexing, for a chosen list of files.

    Returns:
        ``{str(path): SHA-256 of the file}``, or the error (of :data:`IMAGE_ERRORS`) for a
        file that cannot be opened or decoded, in the order of ``paths``.
    """
    files = [Path(p) for p in paths]
    results = _read_sizes(files, verify=True, workers=workers, progress=progress, digest=True)
    return {str(p): r if isinstance(r, Exception) else r[1] for p, r in zip(files, results)}  # type: ignore[misc]


def index_breakhis(
    root: str | os.PathLike[str],
    *,
    verify: bool = True,
    strict: bool = False,
    workers: int = 4,
    progress: bool = False,
) -> DataIndex:
    """Index a BreaKHis tree (official archive or Kaggle layout).

    Every file below ``root`` is looked at, except in hidden folders (``.name``, listed
    as skipped); links to folders are followed, each real folder once (a link into the
    tree, a second link to one folder, or a loop is listed as skipped). Images whose names
    follow the BreaKHis grammar and agree with their folders become :class:`ImageRecord` s;
    everything else is listed in :attr:`DataIndex.skipped` with a reason. Fold tables
    (``Folds.csv``, ``dsfoldN.txt``) and synthetic-data markers are listed in
    :attr:`DataIndex.metadata_files`.

    With ``verify`` every image file is read whole once, in the threads that decode it,
    and hashed: images whose bytes are identical under different names (one copy could
    land in training and another in test) are kept, listed in
    :attr:`DataIndex.duplicate_content` and named in a warning.

    Args:
        root: folder to index: ``BreaKHis_v1`` or any folder above or below it.
        verify: decode every image so that truncated files are caught, and find
            byte-identical images (slower). Without it only headers are read, so
            neither is caught: ``duplicate_content`` is ``None`` (not looked for).
        strict: raise :class:`UnreadableImageError` instead of skipping unreadable images.
        workers: threads used to open images.
        progress: show a progress bar.

    Returns:
        The index, with records in walk order (see :class:`DataIndex`).

    Raises:
        FileNotFoundError: when ``root`` is not a folder (saying whether it does not
            exist or is a file).
        ValueError: when two files share a BreaKHis name (two copies of the tree), so
            that one image cannot end up in both train and test.
        UnreadableImageError: in strict mode, when an image cannot be decoded.
    """
    root = Path(root).expanduser().resolve()
    problem = missing_folder_problem(root)
    if problem:
        raise FileNotFoundError(f"expected a BreaKHis folder, but {problem}")
    skipped: list[SkippedFile] = []
    metadata: list[str] = []
    candidates: list[tuple[Path, BreakhisName]] = []
    for path in _walk_files(root, skipped):
        rel = path.relative_to(root).as_posix()
        if _is_metadata(path.name):
            metadata.append(rel)
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(SkippedFile(rel, f"not an image: extension {path.suffix or '(none)'!r}"))
            continue
        try:
            name = parse_breakhis_name(path.name)
        except ValueError as exc:
            skipped.append(SkippedFile(rel, f"name outside grammar: {exc}"))
            continue
        problem = _check_folders(path, root, name)
        if problem is not None:
            skipped.append(SkippedFile(rel, problem))
            continue
        candidates.append((path, name))
    _refuse_duplicate_names(root, [path for path, _ in candidates])

    results = _read_sizes([p for p, _ in candidates], verify=verify, workers=workers,
                          progress=progress, digest=verify)
    records: list[ImageRecord] = []
    unreadable: list[str] = []
    by_digest: dict[str, list[str]] = defaultdict(list)
    for (path, name), result in zip(candidates, results):
        rel = path.relative_to(root).as_posix()
        if isinstance(result, Exception):
            unreadable.append(rel)
            skipped.append(SkippedFile(rel, f"unreadable image: {result}"))
            continue
        size, digest = result
        if digest is not None:
            by_digest[digest].append(rel)
        records.append(
            ImageRecord(
                path=path,
                label=name.benign_malignant,
                patient=name.patient,
                tumor_type=name.tumor_type,
                magnification=name.magnification,
                case=name.case,
                width=size[0],
                height=size[1],
            )
        )
    if strict and unreadable:
        raise UnreadableImageError(
            f"{count(len(unreadable), 'image')} could not be decoded (strict mode), e.g. "
            f"{unreadable[:3]}; re-run without --strict to skip "
            f"{plural(len(unreadable), 'it', 'them')}"
        )
    duplicates = _duplicate_groups(by_digest) if verify else None
    return DataIndex(
        root=root,
        records=records,
        skipped=sorted(skipped, key=lambda s: s.path),
        warnings=[*_shared_patient_warnings(records),
                  *_renumbered_copy_warnings(
                      [c for c, r in zip(candidates, results) if not isinstance(r, Exception)], root),
                  *_duplicate_content_warnings(duplicates, "under different names", records, root)],
        metadata_files=metadata,
        kind="breakhis",
        duplicate_content=duplicates,
        digests=_by_path(by_digest) if verify else None,
    )


def _refuse_duplicate_names(root: Path, paths: Sequence[Path]) -> None:
    """Raise when two files share a BreaKHis name (e.g. two copies of the tree).

    A BreaKHis name identifies one image of one slide, so two files with the same name
    are copies; indexed both, one copy could land in train and the other in test.
    """
    seen: dict[str, Path] = {}
    pairs: list[tuple[Path, Path]] = []
    for path in paths:
        first = seen.setdefault(path.name, path)
        if first is not path:
            pairs.append((first, path))
    if pairs:
        a, b = (p.relative_to(root).as_posix() for p in pairs[0])
        raise ValueError(
            f"expected every BreaKHis file name once under {str(root)!r}, but "
            f"{count(len(pairs), 'file')} {plural(len(pairs), 'repeats', 'repeat')} a name "
            f"found elsewhere, e.g. {a!r} and {b!r} "
            "(two copies of the data set?); point --data-root at one copy or remove the other"
        )


def _renumbered_copy_warnings(candidates: Sequence[tuple[Path, BreakhisName]], root: Path) -> list[str]:
    """Warn about files of one slide, magnification and image number under names that
    differ only in the number's zero padding (``...-40-001.png`` and ``...-40-1.png``):
    one image twice, most likely, which an image-level split can put in train and test."""
    groups: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    for path, name in candidates:
        groups[(name.case, name.magnification, name.seq)].append(path.relative_to(root).as_posix())
    repeated = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    if not repeated:
        return []
    return [
        f"{count(len(repeated), 'image number')} of one slide and magnification "
        f"{plural(len(repeated), 'is', 'are')} used by more than one file, the names differing "
        f"in zero padding only, e.g. {repeated[0]}: most likely copies of one image (patient "
        "splits keep them together; an image-level split may put one in training and another "
        "in test); remove the copies"
    ]


def _duplicate_groups(by_digest: dict[str, list[str]]) -> list[list[str]]:
    """The groups of two or more paths with one digest, each sorted, groups sorted."""
    return sorted(sorted(paths) for paths in by_digest.values() if len(paths) > 1)


def _duplicate_content_warnings(
    groups: Sequence[Sequence[str]] | None, where: str, records: Sequence[ImageRecord], root: Path
) -> list[str]:
    """Warn about byte-identical images (kept: nothing here says which copy is wrong), and
    apart about groups whose copies carry different labels (class, or tumour type): one
    image with two labels, at least one of them wrong."""
    if not groups:
        return []
    files = sum(len(g) for g in groups)
    out = [
        f"{count(len(groups), 'group')} of byte-identical images {where} "
        f"({count(files, 'file')}), e.g. {list(groups[0])}; if one copy lands in training "
        "and another in test, the test metrics are optimistic (index --json lists every "
        "group under 'duplicate_content')"
    ]
    labels = {r.path.relative_to(root).as_posix(): (r.label, r.tumor_type) for r in records}
    conflicting = [g for g in groups if len({labels[p] for p in g}) > 1]
    if conflicting:
        example = {p: "/".join(x for x in labels[p] if x) for p in conflicting[0]}
        out.append(
            f"{count(len(conflicting), 'group')} of byte-identical images "
            f"{plural(len(conflicting), 'carries', 'carry')} different labels, e.g. {example}: "
            "one image labelled twice, at least once wrongly; check the data before trusting "
            "any metric"
        )
    return out


def _shared_patient_warnings(records: Sequence[ImageRecord]) -> list[str]:
    """Warn about patient ids filed under more than one tumour type."""
    types: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.patient is not None and r.tumor_type is not None:
            types[r.patient].add(r.tumor_type)
    return [
        f"patient {p} appears under types {sorted(ts, key=TYPE_CODES.index)}: near-duplicate "
        "folders; patient-level splits keep them in one group"
        for p, ts in sorted(types.items())
        if len(ts) > 1
    ]


def index_image_folder(
    root: str | os.PathLike[str],
    *,
    patients_csv: str | os.PathLike[str] | None = None,
    verify: bool = True,
    strict: bool = False,
    workers: int = 4,
    progress: bool = False,
) -> DataIndex:
    """Index a generic ``root/<class>/<image>`` folder (in-house data).

    Args:
        root: folder with one sub-folder per class; images may sit in nested folders.
            Hidden folders (``.ipynb_checkpoints``) are neither classes nor searched;
            links to folders are followed, each real folder once.
        patients_csv: optional CSV (UTF-8, a byte-order mark is fine) with columns
            ``path`` (relative to ``root``, or a bare file name; ``./a/x.png``,
            ``a//x.png`` and ``a\\x.png`` are ``a/x.png``, as in fold tables) and
            ``patient``. A row with the image's path wins over a bare-name row (a warning
            names images where the two disagree); a bare name gives its patient to the one image of that name
            without a path row, and is refused when several such images share it. An image
            without a patient (no CSV, no row, or a blank cell) gets ``patient=None``:
            unknown, never a made-up group. Protocol ``patient`` refuses such images, and
            a test set that holds any gets no patient recognition rate (``None``, n/a;
            see :mod:`breakhis.splits`).
        verify: decode every image so that truncated files are caught, and find
            byte-identical images at different paths (each file is read whole once and
            hashed; see :attr:`DataIndex.duplicate_content`). Without it only headers
            are read, so neither is caught: ``duplicate_content`` is ``None``.
        strict: raise instead of skipping unreadable images.
        workers: threads used to open images.
        progress: show a progress bar.

    Raises:
        FileNotFoundError: when ``root`` or ``patients_csv`` does not exist.
        ValueError: when no class folders are found, or the CSV lacks the columns, has a
            short row, gives one path (or name) two different patients, or gives a
            patient to a bare file name that several images under ``root`` share.
        UnreadableImageError: in strict mode, when an image cannot be decoded.
    """
    root = Path(root).expanduser().resolve()
    problem = missing_folder_problem(root)
    if problem:
        raise FileNotFoundError(f"expected an image folder, but {problem}")
    rows: dict[str, _PatientRow] = {}
    if patients_csv is not None:
        rows = _read_patient_csv(Path(patients_csv))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"expected one sub-folder per class in {str(root)!r}, but found none")
    skipped: list[SkippedFile] = []
    metadata: list[str] = []
    candidates: list[tuple[Path, str]] = []
    for path in _walk_files(root, skipped):
        rel = path.relative_to(root).as_posix()
        if path.parent == root:
            if _is_metadata(path.name) or path.suffix.lower() == ".csv":
                metadata.append(rel)
            else:
                skipped.append(SkippedFile(rel, "outside class folders: file at the root"))
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(SkippedFile(rel, f"not an image: extension {path.suffix or '(none)'!r}"))
            continue
        candidates.append((path, rel.split("/", 1)[0]))
    patient_of: dict[str, str | None] = {}
    conflicts: list[str] = []
    if patients_csv is not None:
        patient_of, conflicts = _patients_of(root, [p for p, _ in candidates], rows,
                                             Path(patients_csv))
    results = _read_sizes([p for p, _ in candidates], verify=verify, workers=workers,
                          progress=progress, digest=verify)
    records: list[ImageRecord] = []
    unreadable: list[str] = []
    missing: list[str] = []
    by_digest: dict[str, list[str]] = defaultdict(list)
    for (path, label), result in zip(candidates, results):
        rel = path.relative_to(root).as_posix()
        if isinstance(result, Exception):
            unreadable.append(rel)
            skipped.append(SkippedFile(rel, f"unreadable image: {result}"))
            continue
        size, digest = result
        if digest is not None:
            by_digest[digest].append(rel)
        patient = patient_of.get(rel)
        if patient is None and patients_csv is not None:
            missing.append(rel)
        records.append(
            ImageRecord(
                path=path, label=label, patient=patient, case=patient,
                width=size[0], height=size[1],
            )
        )
    if strict and unreadable:
        raise UnreadableImageError(
            f"{count(len(unreadable), 'image')} could not be decoded (strict mode), e.g. "
            f"{unreadable[:3]}"
        )
    warnings = []
    if conflicts:
        warnings.append(
            f"{count(len(conflicts), 'image')} {plural(len(conflicts), 'has', 'have')} a path "
            f"row and a bare-name row with different patients in {str(patients_csv)!r}; the "
            f"path row was used, e.g. {conflicts[:3]}"
        )
    if missing:
        them = plural(len(missing), "it", "them")
        warnings.append(
            f"{len(missing)} of {count(len(records), 'image')} "
            f"{plural(len(missing), 'has', 'have')} no patient in {str(patients_csv)!r} (no "
            f"row, or a blank cell), e.g. {missing[:3]}; {plural(len(missing), 'its', 'their')} "
            f"patient is unknown: protocol 'patient' refuses {them}, and a test set that holds "
            f"{plural(len(missing), 'it', 'any of them')} gets no patient recognition rate (n/a)"
        )
    duplicates = _duplicate_groups(by_digest) if verify else None
    warnings += _duplicate_content_warnings(duplicates, "at different paths", records, root)
    labels = {r.label for r in records}
    empty = [d.name for d in class_dirs if d.name not in labels]
    if empty:  # not a class of this data: no model output for it, so say so
        warnings.append(
            f"{count(len(empty), 'class folder')} {empty} "
            f"{plural(len(empty), 'holds', 'hold')} no usable image (none, or only files that "
            f"were skipped): not {plural(len(empty), 'a class', 'classes')} of this data, "
            f"which has {len(labels)}: {sorted(labels)}")
    return DataIndex(
        root=root, records=records, skipped=sorted(skipped, key=lambda s: s.path),
        warnings=warnings, metadata_files=metadata, kind="image-folder",
        duplicate_content=duplicates, digests=_by_path(by_digest) if verify else None,
    )


def _by_path(by_digest: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{relative path: digest}`` from ``{digest: [relative paths]}``.

    Examples:
        >>> _by_path({"ab": ["x.png", "y.png"], "cd": ["z.png"]})
        {'x.png': 'ab', 'y.png': 'ab', 'z.png': 'cd'}
    """
    return {rel: digest for digest, rels in by_digest.items() for rel in rels}


@dataclass(frozen=True)
class _PatientRow:
    patient: str | None
    line: int


def _read_patient_csv(path: Path) -> dict[str, _PatientRow]:
    """``path`` (or bare name) -> patient (``None`` for a blank cell) and its line.

    Raises:
        ValueError: on missing columns, a short row, or a key given two patients.
    """
    if path.is_dir():
        raise ValueError(f"expected a patient CSV file, but {str(path)!r} is a folder")
    if not path.is_file():
        raise FileNotFoundError(f"patient CSV {str(path)!r} does not exist")
    try:
        return _parse_patient_csv(path)
    except UnicodeDecodeError as err:
        data = path.read_bytes()  # the error's position is within the chunk decoded
        try:
            data.decode("utf-8-sig")
            where = ""
        except UnicodeDecodeError as whole:
            line = data.count(b"\n", 0, whole.start) + 1
            where = f" (line {line}: byte 0x{data[whole.start]:02x})"
        raise ValueError(
            f"patient CSV {str(path)!r} is not UTF-8 text{where}: save it as 'CSV UTF-8' "
            "(spreadsheet programs' plain 'CSV' may use another encoding)"
        ) from err


def _parse_patient_csv(path: Path) -> dict[str, _PatientRow]:
    """:func:`_read_patient_csv` of a file that exists."""
    rows: dict[str, _PatientRow] = {}
    # utf-8-sig: spreadsheet programs start UTF-8 CSVs with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        if "path" not in columns or "patient" not in columns:
            raise ValueError(
                f"expected columns 'path' and 'patient' in {str(path)!r}, but got "
                f"{reader.fieldnames}"
            )
        for row in reader:
            line = reader.line_num
            raw_path, raw_patient = row.get(columns["path"]), row.get(columns["patient"])
            if raw_path is None or raw_patient is None:
                raise ValueError(
                    f"expected a path and a patient (columns {reader.fieldnames}) on line "
                    f"{line} of {str(path)!r}, but got {list(v for v in row.values() if v)}"
                )
            patient = raw_patient.strip() or None
            if not raw_path.strip():
                if patient is None:
                    continue  # an empty row, as spreadsheet exports leave
                raise ValueError(f"expected a path on line {line} of {str(path)!r}, but the "
                                 f"cell is empty (patient {patient!r})")
            # ./a/x.png and a//x.png are a/x.png, as in fold tables; rows that name one
            # image so are duplicates, checked below like rows written alike
            key = _listed_path(raw_path)
            first = rows.setdefault(key, _PatientRow(patient, line))
            if first.patient != patient:
                raise ValueError(
                    f"expected one patient per image in {str(path)!r}, but {key!r} is given "
                    f"patient {_shown(first.patient)} on line {first.line} and "
                    f"{_shown(patient)} on line {line}"
                )
    return rows


def _listed_path(name: str) -> str:
    """A path as a patients CSV or a fold table lists it, in POSIX form: Windows
    separators, ``./`` and repeated separators normalised; ``..`` is kept, and an
    absolute path stays absolute (neither matches a path relative to the root).

    Examples:
        >>> _listed_path(" ./benign//x.png "), _listed_path("benign\\\\x.png")
        ('benign/x.png', 'benign/x.png')
    """
    return PurePosixPath(name.strip().replace("\\", "/")).as_posix()


def _shown(patient: str | None) -> str:
    return "(blank)" if patient is None else repr(patient)


def _patients_of(
    root: Path, images: Sequence[Path], rows: dict[str, _PatientRow], csv_path: Path
) -> tuple[dict[str, str | None], list[str]]:
    """Patient of every image (by path relative to ``root``) from the CSV's rows.

    A row keyed by the image's relative path always wins. A row keyed by a bare file
    name gives its patient to the one image of that name that has no path row: in-house
    folders often restart their file names in every class folder, and one bare-name row
    would otherwise put images of different patients in one group.

    Returns:
        ``(patient by relative path, relative paths whose path row overrode a bare-name
        row with another patient)``.

    Raises:
        ValueError: when a bare-name row would name more than one image.
    """
    rel_paths = [p.relative_to(root).as_posix() for p in images]
    unlisted: dict[str, list[str]] = defaultdict(list)  # bare name -> images without a path row
    for rel, path in zip(rel_paths, images):
        if rel not in rows:
            unlisted[path.name].append(rel)
    patient_of: dict[str, str | None] = {}
    for key, row in rows.items():
        named = unlisted.get(key, []) if "/" not in key else []
        if len(named) > 1:
            raise ValueError(
                f"line {row.line} of {str(csv_path)!r} gives patient {_shown(row.patient)} to "
                f"the bare file name {key!r}, but {len(named)} images under {str(root)!r} "
                f"have that name and no row of their own, e.g. {named[:3]}; expected the path "
                f"relative to the root (e.g. {named[0]!r}) for a name that repeats"
            )
        patient_of.update(dict.fromkeys(named, row.patient))
    conflicts = []
    for rel, path in zip(rel_paths, images):
        exact, bare = rows.get(rel), rows.get(path.name)
        if exact is not None:
            patient_of[rel] = exact.patient
            if bare is not None and bare.patient != exact.patient and not unlisted.get(path.name):
                conflicts.append(rel)
    return patient_of, conflicts
