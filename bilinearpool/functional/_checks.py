"""Input validation and layout helpers shared by the functional ops.

Every op in :mod:`bilinearpool.functional` accepts feature maps ``(B, C, H, W)`` and token
sequences ``(B, N, C)``. :func:`as_channel_matrix` turns both into the ``(B, C, N)`` layout
the math is written in, as a view whenever the strides allow it (contiguous and
channels-last maps, and token sequences, all give views).
"""

from __future__ import annotations

import contextlib
import numbers
import operator
import os
import warnings
from typing import Callable, ContextManager, TypeVar

import torch
from torch import Tensor

__all__ = [
    "AUTOCAST_CASTS",
    "RESIZE_BY_BILINEARPOOL",
    "RESIZE_BY_INTERPOLATE",
    "as_channel_matrix",
    "as_int",
    "autocast_on",
    "check_built_channels",
    "check_channels",
    "check_choice",
    "check_dtype",
    "check_flags",
    "check_floating",
    "check_input_dtype",
    "check_optional_positive_int",
    "check_positive_int",
    "check_real",
    "check_streams",
    "check_tensor",
    "compute_dtype",
    "does_nothing",
    "env_switch",
    "exporting",
    "make_layer",
    "no_autocast",
    "pair_streams",
    "plain_ops",
    "plural",
    "uninitialized",
]

#: The floating dtypes ``torch.autocast`` casts (it leaves float64 alone).
AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)

_ModuleT = TypeVar("_ModuleT", bound=torch.nn.Module)


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (never for a device type it
    does not know, such as ``"meta"``)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def check_tensor(x: object, name: str = "input") -> None:
    """Raise :class:`TypeError` unless ``x`` is a tensor (of any dtype).

    Examples:
        >>> check_tensor([1.0, 2.0])
        Traceback (most recent call last):
            ...
        TypeError: input must be a torch.Tensor, but got list
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, but got {type(x).__name__}")


def check_floating(x: Tensor, name: str = "input") -> None:
    """Raise :class:`TypeError` unless ``x`` is a floating-point tensor."""
    check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"but got dtype {x.dtype}"
        )


def check_input_dtype(
    x: Tensor, weight: Tensor, owner: str, name: str = "input", convert: str = "the layer"
) -> None:
    """TypeError unless ``x`` has ``weight``'s dtype, or autocast casts both (it leaves
    float64 alone): what ``F.linear`` and the convolutions need, whose own errors ("mat1
    and mat2 must have the same dtype") name neither tensor.

    Examples:
        >>> check_input_dtype(torch.zeros(1, dtype=torch.float64), torch.zeros(1), "SEBlock")
        ...                   # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
            ...
        TypeError: SEBlock's weights are torch.float32, so the input must be torch.float32
        (torch.autocast leaves float64 alone), but got torch.float64: convert one of them
        (e.g. the layer with .to(torch.float64))
    """
    if x.dtype == weight.dtype:
        return
    castable = x.dtype in AUTOCAST_CASTS and weight.dtype in AUTOCAST_CASTS
    if castable and autocast_on(x.device.type):
        return
    where = " outside torch.autocast" if castable else " (torch.autocast leaves float64 alone)"
    raise TypeError(
        f"{owner}'s weights are {weight.dtype}, so the {name} must be {weight.dtype}{where}, but "
        f"got {x.dtype}: convert one of them (e.g. {convert} with .to({x.dtype}))"
        + (", or run under torch.autocast" if castable else "")
    )


def _functorch_wrapped(t: Tensor) -> bool:
    # torch has no public test for "inside torch.func.grad/vmap/jvp"; this private one
    # exists since torch 2.0 (without it, the transforms meet the autograd Functions and
    # say that they need setup_context).
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def exporting() -> bool:
    """Whether the op is being recorded into a graph that is saved without its autograd
    Functions: ``torch.jit.trace``, the ONNX exporter and ``torch.export`` (which records
    a Function's forward operations only: the exported program's backward would
    differentiate them, in-place and ``out=`` steps included, and fail)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.5
    return bool(is_exporting()) if is_exporting is not None else False


def plain_ops(*tensors: Tensor | None) -> bool:
    """Whether an op must run as plain differentiable torch operations instead of its
    custom autograd Function: while ``torch.jit.trace``, the ONNX exporter or
    ``torch.export`` records it (:func:`exporting`), under ``torch.func`` transforms
    (``grad``, ``vmap``, ``jvp``, ``jacrev``) and in forward-mode AD (dual tensors), which
    need rules the Functions do not have."""
    if exporting():
        return True
    if torch.compiler.is_compiling():  # dynamo records the Functions (and cannot run the checks below)
        return False
    present = [t for t in tensors if isinstance(t, Tensor)]
    if any(_functorch_wrapped(t) for t in present):
        return True
    return any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in present)


#: Values of an on/off environment variable (compared stripped, in lower case).
_SWITCH_OFF = frozenset({"0", "false", "no", "off"})
_SWITCH_ON = frozenset({"", "1", "true", "yes", "on"})
_SWITCH_WARNED: set[tuple[str, str]] = set()


def env_switch(name: str) -> bool:
    """Whether the environment variable ``name``, a switch that is on unless set off, is
    on: ``0``, ``false``, ``no`` and ``off`` (any case, spaces around ignored) turn it off;
    unset, empty, ``1``, ``true``, ``yes`` and ``on`` leave it on. Any other value leaves it
    on with a :class:`RuntimeWarning` (once per value) that names the variable and the
    values it takes (only ``0`` turned a switch off, and ``false`` left it on without a
    word).

    Examples:
        >>> os.environ["BILINEARPOOL_EXAMPLE"] = " Off"
        >>> env_switch("BILINEARPOOL_EXAMPLE"), env_switch("BILINEARPOOL_UNSET_EXAMPLE")
        (False, True)
        >>> del os.environ["BILINEARPOOL_EXAMPLE"]
    """
    raw = os.environ.get(name)
    if raw is None:
        return True
    value = raw.strip().lower()
    if value in _SWITCH_OFF:
        return False
    if value not in _SWITCH_ON and (name, raw) not in _SWITCH_WARNED:
        _SWITCH_WARNED.add((name, raw))  # once per value: the switches are read per call
        warnings.warn(
            f"{name}={raw!r} is not a value it takes (0, false, no or off to turn it off; 1, true, "
            "yes or on to keep it on): left on",
            RuntimeWarning,
            stacklevel=3,
        )
    return True


def make_layer(factory: object, name: str, example: str) -> torch.nn.Module:
    """``factory()``, checked: a layer factory (a module class such as ``example``, or any
    callable without arguments) that returns an ``nn.Module``.

    Raises:
        TypeError: a module instance, a plain function such as ``torch.tanh`` (called
            without its input), or anything that does not build a module.
    """
    expected = f"{name} must be a factory that returns a module (e.g. {example})"
    if isinstance(factory, torch.nn.Module) or not callable(factory):
        raise TypeError(f"{expected}, but got {factory!r}")
    build: Callable[[], object] = factory
    try:
        layer = build()
    except TypeError as err:
        raise TypeError(f"{expected}, but calling {factory!r} without arguments failed: {err}") from err
    if not isinstance(layer, torch.nn.Module):
        raise TypeError(f"{expected}, but {factory!r}() returned {type(layer).__name__}")
    return layer


def check_dtype(dtype: object) -> torch.dtype | None:
    """A layer's ``dtype=`` argument: ``None`` or a floating-point ``torch.dtype``.

    Raises:
        TypeError: anything else (parameters of integer dtype cannot require gradients).
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point dtype, but got {dtype!r}")
    return dtype


def uninitialized(cls: type[_ModuleT], *args: object, device: object = None, **kwargs: object) -> _ModuleT:
    """``cls(*args, device=device, **kwargs)`` without drawing its initial values (built on
    the meta device, then given memory), for a layer whose ``reset_parameters`` draws them:
    then a layer built after ``torch.manual_seed(s)`` equals one reset after it."""
    target = torch.empty(0, device=device).device  # None: the default device
    return torch.nn.utils.skip_init(cls, *args, device=target, **kwargs)


def as_channel_matrix(x: Tensor, name: str = "input") -> Tensor:
    """Return ``x`` as a ``(B, C, N)`` matrix of N locations per channel.

    Args:
        x: a feature map ``(B, C, H, W)`` or a token sequence ``(B, N, C)``.
        name: how error messages call the argument.

    Shape:
        - Input: ``(B, C, H, W)`` or ``(B, N, C)``.
        - Output: ``(B, C, H*W)`` or ``(B, C, N)`` (a view where possible).
    """
    check_floating(x, name)
    if x.dim() == 4:
        b, c, h, w = x.shape
        out = x.flatten(2)
    elif x.dim() == 3:
        b, n, c = x.shape
        out = x.transpose(1, 2)
    else:
        raise ValueError(
            f"{name} must be a feature map (B, C, H, W) or a token sequence (B, N, C), "
            f"but got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    # (sizes are traced values in torch.jit.trace, where comparing one warns that the
    # trace may not generalise: the size checks here and in the ops are skipped there)
    if not torch.jit.is_tracing() and (out.shape[1] == 0 or out.shape[2] == 0):
        raise ValueError(
            f"{name} must have at least one channel and one location, but got shape {tuple(x.shape)}"
        )
    return out


def compute_dtype(*xs: Tensor | None) -> torch.dtype:
    """The dtype second-order statistics of the streams ``xs`` are accumulated in.

    Products of two features square their magnitude (features of 1e3 give 1e6, beyond
    float16's range), so float16 and bfloat16 inputs are computed in float32.
    float64 stays float64: when either stream is float64 (the other is promoted, as
    torch's type promotion would; ``None`` stands for an absent second stream).
    """
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def no_autocast(device_type: str) -> ContextManager[object]:
    """Disable autocast on ``device_type`` (second-order statistics overflow in float16)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


#: How the spatial-size error tells the user to resize: the bilinear pools can do it.
RESIZE_BY_BILINEARPOOL = "BilinearPool(resize='bilinear') does this for you"
RESIZE_BY_INTERPOLATE = "e.g. with torch.nn.functional.interpolate"


def pair_streams(
    x_a: Tensor,
    x_b: Tensor | None,
    *,
    names: tuple[str, str] = ("x_a", "x_b"),
    resize: str = RESIZE_BY_BILINEARPOOL,
) -> tuple[Tensor, Tensor | None]:
    """Flatten both streams to ``(B, C, N)`` and check that they can be paired.

    ``names`` are the two inputs' argument names in the caller's API, and ``resize`` how
    maps of different spatial sizes can be made to match (said in the error).
    """
    na, nb = names
    a = as_channel_matrix(x_a, na if x_b is not None else "input")
    if x_b is None:
        return a, None
    b = as_channel_matrix(x_b, nb)
    if x_a.dim() != x_b.dim():
        raise ValueError(
            f"{na} and {nb} must have the same layout, but got shapes "
            f"{tuple(x_a.shape)} and {tuple(x_b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{na} and {nb} must be on the same device, but got {a.device} and {b.device}")
    if torch.jit.is_tracing():  # sizes are traced values (see as_channel_matrix)
        return a, b
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{na} and {nb} must have the same batch size, but got {a.shape[0]} "
            f"(shape {tuple(x_a.shape)}) and {b.shape[0]} (shape {tuple(x_b.shape)})"
        )
    if a.shape[2] != b.shape[2]:
        if x_a.dim() == 4:
            where, hint = "spatial size (H, W)", f"resize one of them first ({resize})"
        else:
            where, hint = "number of tokens N", "token sequences are paired token by token and cannot be resized"
        raise ValueError(
            f"{na} and {nb} must have the same {where}, but got shapes {tuple(x_a.shape)} and {tuple(x_b.shape)}; {hint}"
        )
    return a, b


def as_int(value: object) -> int | None:
    """``value`` as a Python int when it is an integer of any kind (``int``, NumPy
    integers, 0-d integer tensors: whatever has ``__index__``), else ``None``: bools (of
    Python, NumPy or torch), floats and tensors of other shapes are not integers here."""
    # NumPy's bool too (its type is named bool_ before NumPy 2, bool since)
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return None
    if isinstance(value, Tensor) and (value.dtype == torch.bool or value.dim() != 0):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_positive_int(name: str, value: object, *, least: int = 1, kind: str | None = None) -> int:
    """``value`` as a Python int: :class:`TypeError` unless it is an integer,
    :class:`ValueError` unless it is >= ``least``.

    Integers of any kind are taken (``int``, NumPy integers, 0-d integer tensors: whatever
    has ``__index__``), as ``nn.Linear`` takes them; bools are refused, and so are floats,
    even whole ones, and strings. The message says "a positive int" for ``least=1``, "a
    non-negative int" for ``least=0`` (or ``kind`` where given).

    Examples:
        >>> import numpy as np
        >>> check_positive_int("channels", np.int64(64))
        64
        >>> check_positive_int("channels", 0)
        Traceback (most recent call last):
            ...
        ValueError: channels must be a positive int, but got 0
        >>> check_positive_int("channels", "64")
        Traceback (most recent call last):
            ...
        TypeError: channels must be a positive int, but got '64' (str)
    """
    number = as_int(value)
    kind = kind or {0: "a non-negative int", 1: "a positive int"}.get(least, f"an int >= {least}")
    if number is None:
        raise TypeError(f"{name} must be {kind}, but got {value!r} ({type(value).__name__})")
    if number < least:
        raise ValueError(f"{name} must be {kind}, but got {value!r}")
    return number


def check_optional_positive_int(name: str, value: object) -> int | None:
    """``None``, or ``value`` as a positive Python int (:func:`check_positive_int`: a
    TypeError or a ValueError); the message says "a positive int or None"."""
    if value is None:
        return None
    return check_positive_int(name, value, kind="a positive int or None")


def check_real(name: str, value: object, kind: str, within: Callable[[float], bool]) -> float:
    """``value``, checked: :class:`TypeError` unless it is a real number (Python's or
    NumPy's; bools refused), :class:`ValueError` unless ``within(value)`` (NaN fails any
    comparison). ``kind`` says what is expected, e.g. "a number in (0, 1)".

    Examples:
        >>> check_real("dropout", 0.5, "a number in [0, 1)", lambda v: 0 <= v < 1)
        0.5
        >>> check_real("dropout", "0.5", "a number in [0, 1)", lambda v: 0 <= v < 1)
        Traceback (most recent call last):
            ...
        TypeError: dropout must be a number in [0, 1), but got '0.5' (str)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, but got {value!r} ({type(value).__name__})")
    if not within(value):
        raise ValueError(f"{name} must be {kind}, but got {value!r}")
    return value  # type: ignore[return-value]


def check_choice(name: str, value: object, choices: tuple[str, ...], *, optional: bool = False) -> None:
    """:class:`TypeError` unless ``value`` is a string (or ``None`` where ``optional``),
    :class:`ValueError` unless it is one of ``choices``; the message lists them.

    Examples:
        >>> check_choice("reduction", "mean", ("mean", "sum"))
        >>> check_choice("reduction", 1, ("mean", "sum"))
        Traceback (most recent call last):
            ...
        TypeError: reduction must be one of ('mean', 'sum'), but got 1 (int)
    """
    if optional and value is None:
        return
    kind = f"None or one of {choices}" if optional else f"one of {choices}"
    if not isinstance(value, str):
        raise TypeError(f"{name} must be {kind}, but got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be {kind}, but got {value!r}")


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``noun`` for ``n`` of them: as it is when ``n`` is 1, else ``plural_form`` (by
    default ``noun`` with an ``s``), for messages that count.

    Examples:
        >>> plural(1, "head"), plural(2, "layer case"), plural(0, "is", "are")
        ('head', 'layer cases', 'are')
    """
    if n == 1:
        return noun
    return plural_form if plural_form is not None else f"{noun}s"


def does_nothing(
    names: list[str], applies_to: str, but: str, *, fix: str | None = None, drop: str | None = None
) -> ValueError:
    """The ValueError for settings given where they would do nothing: ``<names> apply to
    <applies_to>, but <but>; drop <drop> (they would do nothing), or <fix>``, in the
    number of ``names``; ``drop`` defaults to the names.

    Examples:
        >>> str(does_nothing(["eps"], "signed_sqrt=True only", "signed_sqrt=False", fix="set signed_sqrt=True"))
        'eps applies to signed_sqrt=True only, but signed_sqrt=False; drop eps (it would do nothing), or set signed_sqrt=True'
    """
    n, joined = len(names), " and ".join(names)
    return ValueError(
        f"{joined} {plural(n, 'applies', 'apply')} to {applies_to}, but {but}; drop {drop or joined} "
        f"({plural(n, 'it', 'they')} would do nothing)" + (f", or {fix}" if fix else "")
    )


def check_flags(**flags: object) -> None:
    """Raise :class:`TypeError` naming the first of ``flags`` that is not a Python bool (a
    string such as ``"no"`` would otherwise count as true); a bool of NumPy or a 0-d bool
    tensor is told to become one.

    Examples:
        >>> check_flags(triu=torch.tensor(True))
        Traceback (most recent call last):
            ...
        TypeError: triu must be True or False, but got tensor(True) (torch.Tensor): pass a Python bool, bool(triu)
    """
    for name, value in flags.items():
        if isinstance(value, bool):
            continue
        kind = type(value)
        kind_name = kind.__qualname__
        if kind.__module__ != "builtins":
            kind_name = f"{kind.__module__}.{kind_name}"
        message = f"{name} must be True or False, but got {value!r} ({kind_name})"
        # a bool of NumPy, or a 0-d array or tensor of one (``np.array(True)``, ``torch.tensor(True)``)
        one = getattr(value, "ndim", None) == 0 and str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
        if one or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")):
            message += f": pass a Python bool, bool({name})"
        raise TypeError(message)


def check_channels(name: str, t: Tensor | None, expected: int) -> None:
    """Raise :class:`ValueError` naming ``name`` when the map or tokens ``t`` lack ``expected`` channels."""
    if isinstance(t, Tensor) and t.dim() in (3, 4) and not torch.jit.is_tracing():
        got = t.shape[1] if t.dim() == 4 else t.shape[2]
        if got != expected:
            raise ValueError(f"{name} must have {expected} channels, but got shape {tuple(t.shape)}")


def check_built_channels(
    layer: str, built: int, built_b: int | None, in_channels: int, in_channels_b: int | None
) -> None:
    """ValueError unless streams of ``in_channels`` (and ``in_channels_b``) channels fit a
    ``layer`` built for ``built`` (and ``built_b``; ``None``: the second stream, if any, has
    ``built`` too) channels."""
    desc = f"in_channels={built}" + ("" if built_b is None else f", in_channels_b={built_b}")
    if in_channels_b is None and built_b is not None:
        raise ValueError(
            f"this {layer} was built for two streams ({desc}), but got one of {in_channels} channels"
        )
    expected_b = built if built_b is None else built_b
    if in_channels != built or (in_channels_b is not None and in_channels_b != expected_b):
        got = f"{in_channels}" + ("" if in_channels_b is None else f" and {in_channels_b}")
        raise ValueError(f"this {layer} was built for {desc}, but got streams of {got} channels")


def check_streams(x: Tensor, y: Tensor | None, in_channels: int, in_channels_b: int | None) -> None:
    """Check the inputs of a one- or two-stream pooling module against its configuration.

    A module built with ``in_channels_b`` needs both streams; each stream must have the
    channels the module was built for (``y`` defaults to ``in_channels`` for one-stream modules).
    """
    if y is None and in_channels_b is not None:
        raise ValueError(f"this layer has two streams (in_channels_b={in_channels_b}): call it as layer(x, y)")
    check_channels("x (in_channels)", x, in_channels)
    check_channels("y (in_channels_b)", y, in_channels if in_channels_b is None else in_channels_b)
