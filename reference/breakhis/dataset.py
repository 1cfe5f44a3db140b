"""Torch data sets and the paper's transforms (torchvision).

The paper resizes every image to 224x224 (197 and 448 in its resolution study) and
augments with horizontal and vertical flips, 10% width/height shifts and rotations.
It does not give the rotation range or how uncovered corners are filled: the default
range of +-90 degrees and the black (zero) fill of ``RandomAffine`` are our choices,
not the paper's. Inputs are normalised with the mean and standard deviation the
backbone's pretrained weights expect (:func:`breakhis.models.input_normalization`;
ImageNet statistics by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from struct import error as struct_error

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from .data import IMAGE_ERRORS, ImageRecord, UnreadableImageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_SIZES",
    "ImageDataset",
    "MIN_SIZE",
    "build_eval_transform",
    "build_train_transform",
    "load_rgb",
    "to_rgb",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Input sizes of the paper's resolution study; 224 is the default.
INPUT_SIZES: tuple[int, ...] = (197, 224, 448)


#: Smallest image side the transforms take (checked up front by ``TrainConfig`` too).
MIN_SIZE = 8


def _check_size(input_size: int) -> None:
    if not isinstance(input_size, int) or input_size < MIN_SIZE:
        raise ValueError(f"input_size must be an integer >= {MIN_SIZE}, but got {input_size!r}")


def _check_normalization(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise ValueError("expected mean and std of three values each (RGB), std > 0, but got "
                         f"mean={tuple(mean)}, std={tuple(std)}")


def build_train_transform(
    input_size: int = 224,
    *,
    shift: float = 0.1,
    rotation: float = 90.0,
    augment: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Resize to ``input_size`` squared, then flips, shifts and rotations, then normalise.

    Flips and the 10% shift follow the paper. The paper names rotations without a
    range or fill, so the default ``rotation=90`` (uniform in ``[-90, 90]`` degrees) is
    our choice, and shifted or rotated images get black (zero) corners from
    ``RandomAffine``; both are deviations to keep in mind when comparing numbers. Rotated
    images are resampled bilinearly, as Keras' ``ImageDataGenerator`` does; shifts are
    whole pixels (``RandomAffine`` rounds them), where Keras shifts by fractions.

    Args:
        input_size: output side in pixels (the paper: 224; also 197, 448).
        shift: largest width/height shift as a fraction of the side (paper: 0.1).
        rotation: largest rotation in degrees, either way (the paper gives no value;
            default 90, ours).
        augment: ``False`` gives the evaluation transform.
        mean: per-channel mean subtracted from inputs in ``[0, 1]`` (the backbone's,
            :func:`breakhis.models.input_normalization`; default ImageNet's).
        std: per-channel standard deviation they are divided by.
    """
    _check_size(input_size)
    _check_normalization(mean, std)
    if not 0.0 <= shift < 1.0:
        raise ValueError(f"shift must be in [0, 1), but got {shift}")
    steps: list[object] = [T.Resize((input_size, input_size))]
    if augment:
        steps += [
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            # bilinear, as the paper's Keras ImageDataGenerator (interpolation order 1);
            # torchvision's default, nearest, left rotated edges jagged
            T.RandomAffine(degrees=rotation, translate=(shift, shift),
                           interpolation=T.InterpolationMode.BILINEAR),
        ]
    steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    return T.Compose(steps)


def build_eval_transform(
    input_size: int = 224,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Resize to ``input_size`` squared and normalise with ``mean`` and ``std``.

    The default is ImageNet's statistics; pass the backbone's
    (:func:`breakhis.models.input_normalization`, stored in checkpoints).

    Examples:
        >>> white = Image.new("RGB", (8, 8), (255, 255, 255))
        >>> build_eval_transform(16, mean=(0.5,) * 3, std=(0.5,) * 3)(white)[:, 0, 0].tolist()
        [1.0, 1.0, 1.0]
    """
    return build_train_transform(input_size, augment=False, mean=mean, std=std)


#: Full scale of Pillow's high-bit-depth integer modes, as divisors to 8 bits.
_TO_8BIT: dict[str, float] = {"I;16": 257.0, "I;16L": 257.0, "I;16B": 257.0, "I;16N": 257.0}
#: Pillow's raw modes of signed 16-bit grey levels (a TIFF's SampleFormat 2), which it
#: opens as 32-bit ``I``: their full scale is 32767.
_SIGNED_16BIT = frozenset({"I;16S", "I;16BS", "I;16NS"})


def to_rgb(image: Image.Image, *, stored_mode: str | None = None) -> Image.Image:
    """Convert a Pillow image to 8-bit RGB, rescaling high-bit-depth grey levels.

    ``Image.convert("RGB")`` clips 16-bit grey levels to 255 instead of rescaling
    them, which turns almost every 16-bit image white. Here 16-bit modes (``I;16*``)
    are divided by 257 (65535 -> 255); 32-bit integers (``I``) stored as signed 16-bit
    levels (``stored_mode``, see below) by 32767 / 255, negative levels black; other
    32-bit integers by 257 when they fit in 16 bits (how Pillow opens 16-bit files) and
    by ``(2**32 - 1) / 255`` otherwise;
    floats (``F``) in ``[0, 1]`` are multiplied by 255, other floats clipped to
    ``[0, 255]``. Images with transparency (``RGBA``, ``LA``, ``PA``, palette, grey,
    bi-level and RGB images with a transparent colour, 16-bit grey images with a transparent
    level: rescaled first, then shown white where the level is) are composited on
    white, as a viewer shows them and as the background of a slide is, rather than
    keeping whatever colour lies under transparent pixels (often black). Everything
    else goes through ``convert("RGB")``.

    Args:
        image: the image.
        stored_mode: the file's own format of the levels, Pillow's raw mode (what
            :func:`load_rgb` reads from the file before decoding), when known: it tells
            signed 16-bit levels (``I;16S``) from others that Pillow opens as ``I``.

    Examples:
        >>> grey16 = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
        >>> np.asarray(to_rgb(grey16))[0, :, 0].tolist()
        [0, 1, 255]
        >>> grey16.info["transparency"] = 0
        >>> np.asarray(to_rgb(grey16))[0, :, 0].tolist()
        [255, 1, 255]
    """
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode in ("1", "P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode not in _TO_8BIT and image.mode not in ("I", "F"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _TO_8BIT:
        scaled = values / _TO_8BIT[image.mode]
    elif image.mode == "I" and stored_mode in _SIGNED_16BIT:
        scaled = values / (32767 / 255)
    elif image.mode == "I":
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        scaled = values / (257.0 if low >= 0 and high <= 65535 else (2**32 - 1) / 255)
    else:
        finite = values[np.isfinite(values)]
        unit = finite.size > 0 and finite.min() >= 0 and finite.max() <= 1
        scaled = np.nan_to_num(values) * (255.0 if unit else 1.0)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    transparent = image.info.get("transparency") if image.mode != "F" else None
    if isinstance(transparent, int) and not isinstance(transparent, bool):
        # one grey level marked transparent (a PNG tRNS entry): fully transparent
        # pixels composited on white are white
        grey[values == transparent] = 255
    return Image.fromarray(grey).convert("RGB")


#: The EXIF tag of an image's orientation (1: as stored).
_EXIF_ORIENTATION = 0x0112


def _stored_mode(image: Image.Image) -> str | None:
    """The raw mode of an opened, not yet decoded, image's first tile (how its file stores
    the pixels, e.g. ``I;16S``), or ``None`` when Pillow does not say."""
    tile = getattr(image, "tile", None)
    if not tile:
        return None
    args = tile[0][3] if len(tile[0]) > 3 else None
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else None


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB (decoded now, so the file is closed).

    High-bit-depth grey images are rescaled to 8 bits and transparent pixels shown on
    white (see :func:`to_rgb`). An EXIF orientation tag (JPEGs and TIFFs from cameras
    and phones) is applied, so the model sees the image the way a viewer shows it. Of a
    file with several frames (a multi-page TIFF, an animated GIF or PNG) the first is
    read, which for a pyramidal TIFF is usually the full-resolution page.

    Raises:
        UnreadableImageError: naming the file, when it cannot be opened or decoded
            (a truncated PNG indexed with ``verify=False`` / ``--no-verify``), or is
            larger than Pillow's decompression-bomb limit.
    """
    try:
        with Image.open(path) as image:
            stored, upright = _stored_mode(image), image  # the tile goes once decoded
            try:
                # Only an image tagged with a turn is transposed: exif_transpose copies
                # every image it is given (40% of a BreaKHis PNG's decoding time).
                if image.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None):
                    upright = ImageOps.exif_transpose(image) or image
            except (ValueError, TypeError, KeyError, SyntaxError, struct_error):
                upright = image  # a broken EXIF block: the pixels as stored
            return to_rgb(upright, stored_mode=stored)
    except IMAGE_ERRORS as exc:
        raise UnreadableImageError(
            f"expected a decodable image, but {str(path)!r} could not be read ({exc}); "
            "index without --no-verify (verify=True) to leave such files out, or remove it"
        ) from exc


class ImageDataset(Dataset):
    """Images of ``records`` with integer ``targets``, transformed on load.

    An item key is either an index or an ``(index, seed)`` pair (as yielded by
    :class:`~breakhis.sampler.BalancedSampler`); with a seed, the random transform runs
    under that seed (set on torch's CPU generator, restored afterwards; CUDA generators
    are left alone), so augmentation does not depend on the loading process.

    Args:
        records: the images.
        targets: integer class per record (``-1`` when unknown, e.g. for prediction).
        transform: a callable from PIL image to tensor.

    Shape:
        item: ``(image (3, S, S), target (), index ())``.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord] | Sequence[Path],
        targets: Sequence[int] | np.ndarray | None,
        transform: T.Compose,
    ) -> None:
        self.paths = [r.path if isinstance(r, ImageRecord) else Path(r) for r in records]
        if targets is None:
            targets = np.full(len(self.paths), -1)
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.targets) != len(self.paths):
            raise ValueError(f"got {len(self.paths)} records but {len(self.targets)} targets")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = load_rgb(self.paths[index])
        if seed is None:
            x = self.transform(image)
        else:
            # the CPU generator only: torch.manual_seed would also reseed the CUDA
            # generators, which fork_rng(devices=[]) does not restore, so that loading a
            # sample in the training process would reset the dropout masks' stream
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(seed)
                x = self.transform(image)
        return x, torch.tensor(self.targets[index]), torch.tensor(index)
