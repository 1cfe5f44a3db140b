"""Compact bilinear pooling (Tensor Sketch, Random Maclaurin) as a module with seeded projections."""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

import torch
from torch import Tensor, nn

from .functional._checks import (
    as_int,
    check_built_channels,
    check_choice,
    check_dtype,
    check_positive_int,
    check_streams,
)
from .functional.sketch import _ALGORITHMS, random_maclaurin, tensor_sketch

__all__ = ["CompactBilinearPool"]

_METHODS = ("tensor_sketch", "random_maclaurin")

#: Where the frames that a warning must not point at live: torch's and this library's files.
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep for path in (torch.__file__, __file__)
)


def _outside_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the caller of this function that points
    at the first frame outside torch and this library (e.g. the user's ``load_state_dict``
    line, below torch's recursive loader); Python 3.11 has no ``skip_file_prefixes``."""
    frame: FrameType | None = sys._getframe(1)  # the caller's frame: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


class CompactBilinearPool(nn.Module):
    """Compact bilinear pooling: a ``d``-dimensional random feature of bilinear pooling.

    From Gao, Beijbom, Zhang & Darrell, "Compact Bilinear Pooling" (CVPR 2016). The
    inner product of two pooled outputs is an unbiased estimate of the inner product of
    the full bilinear matrices, in :math:`d` (e.g. 8192) instead of :math:`C_1 C_2`
    dimensions; see :mod:`bilinearpool.functional.sketch` for both methods.

    The random projections (hashes and signs, or Rademacher matrices) are buffers drawn
    from ``seed`` with a local generator on the CPU, so the same seed gives the same
    layer on every device, and they are saved in the ``state_dict`` with the seed and
    ``out_features`` (a checkpoint of a layer with another ``out_features`` is refused:
    RuntimeError from ``load_state_dict``; loading takes the checkpoint's seed; a checkpoint
    saved before the seed was recorded loads its buffers, with a warning when they are not
    the draw of the layer's own seed, which then no longer describes them). Both methods export
    to ONNX (Tensor Sketch through its Gram formula, which needs no FFT).

    Args:
        in_channels: channels :math:`C_1` of the first stream.
        in_channels_b: channels :math:`C_2` of the second stream; ``None`` means
            :math:`C_2 = C_1`, and ``forward(x)`` pools ``x`` with itself.
        out_features: output dimension :math:`d`.
        method: ``"tensor_sketch"`` or ``"random_maclaurin"``.
        algorithm: how Tensor Sketch is computed (same result up to rounding):
            ``"fft"``, per-location FFTs, :math:`O(N d \\log d)`; ``"gram"``, one batched
            matmul :math:`X Y^\\top` and a scatter of its :math:`C_1 C_2` entries,
            :math:`O(C_1 C_2 N)` at matmul speed, much faster at small channel counts
            (e.g. ~9x at C=512, 28x28, d=8192 on a CPU); ``"auto"`` picks by a cost model
            (:func:`~bilinearpool.functional.sketch.tensor_sketch`). Only for
            ``method="tensor_sketch"``.
        seed: seed of the projections.
        device: device of the projection buffers.
        dtype: floating dtype of the sign / Rademacher buffers.

    Shape:
        - x: :math:`(B, C_1, H, W)` or tokens :math:`(B, N, C_1)`.
        - y: :math:`(B, C_2, H, W)` or :math:`(B, N, C_2)`, same locations (optional).
        - Output: :math:`(B, d)`; float32 for float16/bfloat16 input.

    Examples:
        >>> pool = CompactBilinearPool(in_channels=32, out_features=512, seed=0)
        >>> pool(torch.randn(2, 32, 7, 7)).shape
        torch.Size([2, 512])
        >>> two = CompactBilinearPool(in_channels=32, in_channels_b=16, out_features=256,
        ...                           method="random_maclaurin")
        >>> two(torch.randn(2, 32, 7, 7), torch.randn(2, 16, 7, 7)).shape
        torch.Size([2, 256])
    """

    def __init__(
        self,
        *,
        in_channels: int,
        in_channels_b: int | None = None,
        out_features: int = 8192,
        method: str = "tensor_sketch",
        algorithm: str = "auto",
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        if in_channels_b is not None:
            in_channels_b = check_positive_int("in_channels_b", in_channels_b)
        out_features = check_positive_int("out_features", out_features)
        check_choice("method", method, _METHODS)
        check_choice("algorithm", algorithm, _ALGORITHMS)
        if method != "tensor_sketch" and algorithm != "auto":
            raise ValueError(
                f"algorithm={algorithm!r} applies to method='tensor_sketch' only, but method={method!r}"
            )
        number = as_int(seed)  # ints, NumPy integers and 0-d integer tensors, as the sizes take them
        if number is None:
            raise TypeError(f"seed must be an int, but got {type(seed).__name__}")
        seed = number
        if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be in [-2**63, 2**64), but got {seed}")
        dtype = check_dtype(dtype)
        self.in_channels = in_channels
        self.in_channels_b = in_channels_b
        self.out_features = out_features
        self.method = method
        self.algorithm = algorithm
        self.seed = seed
        c_b = in_channels if in_channels_b is None else in_channels_b
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        if method == "tensor_sketch":
            self.register_buffer("index_a", torch.empty(in_channels, dtype=torch.long, device=device))
            self.register_buffer("sign_a", torch.empty(in_channels, **factory))
            self.register_buffer("index_b", torch.empty(c_b, dtype=torch.long, device=device))
            self.register_buffer("sign_b", torch.empty(c_b, **factory))
        else:
            self.register_buffer("weight_a", torch.empty(out_features, in_channels, **factory))
            self.register_buffer("weight_b", torch.empty(out_features, c_b, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the projections again from ``seed`` (the same draw every time)."""
        for name, value in self._draw(self.seed).items():
            getattr(self, name).copy_(value)

    def _draw(self, seed: int) -> dict[str, Tensor]:
        """The projections ``seed`` draws, by buffer name (on the CPU)."""
        g = torch.Generator(device="cpu").manual_seed(seed)

        def signs(*shape: int) -> Tensor:
            return torch.randint(0, 2, shape, generator=g).mul_(2).sub_(1)

        out = {}
        if self.method == "tensor_sketch":
            for name in ("a", "b"):
                shape = getattr(self, f"index_{name}").shape
                out[f"index_{name}"] = torch.randint(0, self.out_features, shape, generator=g)
                out[f"sign_{name}"] = signs(*shape)
        else:
            out["weight_a"] = signs(*self.weight_a.shape)
            out["weight_b"] = signs(*self.weight_b.shape)
        return out

    def get_extra_state(self) -> Tensor:
        """What the buffers alone do not say: ``(out_features, seed)`` (a tensor, which
        ``torch.jit.trace`` and the ONNX exporter accept in a ``state_dict``)."""
        # The generator's seed is 64 bits without sign (a negative seed is taken modulo
        # 2**64): kept in an int64 as its two's complement.
        seed = self.seed % 2**64
        return torch.tensor([self.out_features, seed - 2**64 if seed >= 2**63 else seed], dtype=torch.long)

    def set_extra_state(self, state: Tensor) -> None:
        # Checked in _load_from_state_dict; the loaded buffers are this seed's draw. A seed
        # the generator takes as this layer's own keeps the form it was given in (-3 stays
        # -3); another is read as torch.Generator.initial_seed() reports it, in [0, 2**64).
        stored = int(state[1]) % 2**64
        if stored != self.seed % 2**64:
            self.seed = stored

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        problems = []
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None and (not isinstance(extra, Tensor) or extra.shape != (2,)):
            problems.append(f"{prefix}_extra_state must be a tensor (out_features, seed), but got {extra!r}")
        elif extra is not None and int(extra[0]) != self.out_features:
            problems.append(
                f"{prefix}_extra_state: the checkpoint's layer has out_features={int(extra[0])}, "
                f"but this layer has out_features={self.out_features}"
            )
        # Hash buffers have shape (C,) whatever out_features is, so a checkpoint of a layer
        # with more bins (and no extra state: saved before it was recorded) would load
        # without a size mismatch and fail only in forward.
        for name in ("index_a", "index_b"):
            index = state_dict.get(prefix + name)
            if isinstance(index, Tensor) and index.numel() and int(index.max()) >= self.out_features:
                problems.append(
                    f"{prefix}{name} holds bins up to {int(index.max())}, but this layer has "
                    f"out_features={self.out_features}: the checkpoint comes from a layer with "
                    "more output features"
                )
        if problems:  # load nothing into this layer: it stays as it was
            error_msgs.extend(problems)
            return
        seed, errors = self.seed, len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # The seed goes with the buffers: kept when they were not all loaded (missing with
        # strict=False, or refused for their size).
        if len(error_msgs) > errors or any(prefix + name not in state_dict for name in self._buffers):
            self.seed = seed
        elif extra is None and not self._buffers_are_draw_of(self.seed):
            warnings.warn(
                f"CompactBilinearPool {prefix.rstrip('.') or '(the module loaded)'}: the checkpoint "
                "records no seed (saved before the seed was recorded) and its projections are not "
                f"seed {self.seed}'s draw; they are loaded, but seed={self.seed} (repr, "
                "reset_parameters) no longer describes them",
                UserWarning,
                stacklevel=_outside_stacklevel(),
            )
        if extra is None and prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")  # checkpoints saved before it existed

    def _buffers_are_draw_of(self, seed: int) -> bool:
        if any(getattr(self, name).is_meta for name in self._buffers):
            return True  # nothing to compare (a meta layer loads nothing)
        return all(
            torch.equal(getattr(self, name).detach().cpu().to(value.dtype), value)
            for name, value in self._draw(seed).items()
        )

    def output_dim(self, in_channels: int, in_channels_b: int | None = None) -> int:
        """Length of the pooled vector: ``out_features``, whatever the channels.

        Raises:
            ValueError: when the channels are not those the layer was built for (as
                ``forward`` would raise on such input), so that a classifier around a
                backbone with other channels is refused when it is built.
        """
        check_built_channels(
            "CompactBilinearPool", self.in_channels, self.in_channels_b, in_channels, in_channels_b
        )
        return self.out_features

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        check_streams(x, y, self.in_channels, self.in_channels_b)
        if self.method == "tensor_sketch":
            return tensor_sketch(
                x, y, index_a=self.index_a, sign_a=self.sign_a, index_b=self.index_b,
                sign_b=self.sign_b, out_features=self.out_features, algorithm=self.algorithm,
            )
        return random_maclaurin(x, y, weight_a=self.weight_a, weight_b=self.weight_b)

    def extra_repr(self) -> str:
        b = "" if self.in_channels_b is None else f", in_channels_b={self.in_channels_b}"
        algorithm = f", algorithm='{self.algorithm}'" if self.method == "tensor_sketch" else ""
        return (
            f"in_channels={self.in_channels}{b}, out_features={self.out_features}, "
            f"method='{self.method}'{algorithm}, seed={self.seed}"
        )
