"""Datasets for data-driven pruning: untrusted ``.safetensors`` / ``.npz`` uploads of named inputs (+ ``targets``).

A dataset file holds one or more *input tensors* (one row per example along dim 0) and optionally one tensor
named ``targets`` (same number of rows). Input tensors are named in one of three ways, all checked against the
program only when the dataset is bound to it (:func:`fit_to_program`):

* after the program's inputs (``input_ids``, ``attention_mask``, ``pixel_values``, a keyword-only ``mask``, ...);
* ``inputs``: the single input of a one-input program (the original format);
* ``inputs.0``, ``inputs.1``, ...: the program's positional inputs by index.

The loader itself accepts any set of names: at most 64 input tensors, names of 1 to 200 printable characters,
each at most once, ``targets`` reserved for the targets. Input tensors are float (float16, bfloat16, float32,
float64), integer (int8..int64, uint8..uint64; uint16/32/64 are widened to int64) or bool (masks; stored bytes
must be 0 or 1); every tensor has at least one dim and the same number of rows (at least 1); floats hold no
NaN/inf. Targets are int32/int64 class ids (>= 0, widened to int64) or floats.

The format is detected from the file's first bytes, never its name:

* ``.npz``: a zip (``PK\\x03\\x04``) of ``<name>.npy`` members. Every ``.npy`` header is parsed and vetted
  before any data is read; object arrays (which would need unpickling) are refused and numpy is only ever
  called with ``allow_pickle=False``.
* ``.safetensors``: an 8-byte little-endian header length followed by a JSON header starting with ``{``;
  read with ``safetensors.safe_open`` (names, dtypes and shapes are checked before any tensor is read).

:func:`load_dataset` refuses anything else with a :class:`DatasetError` whose message is one actionable line
naming the tensor at fault.

Binding to a program: :func:`fit_to_program` vets a dataset against an exported program's user inputs (names,
per-example shapes with ``*`` for dynamic dims and their ranges, dtype kinds, token ids against the embedding
they index) and returns a dataset whose :meth:`Dataset.batches` and :meth:`Dataset.rows` yield what to call the
program with: a bare tensor for a program of exactly one positional tensor input, else a :class:`CallInputs`
(``module(*x.args, **x.kwargs)``).
"""

import math
import os
import re
import stat
import struct
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import numpy as np
import torch
import torch.utils._pytree as pytree

from .errors import EngineError, one_line

__all__ = [
    "CallInputs", "Dataset", "DatasetError", "check_against_program", "dynamic_input_dims", "fit_to_program",
    "load_dataset", "save_dataset",
]

PathLike = str | os.PathLike[str]

INPUTS = "inputs"
TARGETS = "targets"
MAX_INPUTS = 64  # input tensors per dataset (targets not counted)
MAX_NAME_CHARS = 200
_INDEXED = re.compile(r"inputs\.(0|[1-9][0-9]*)")  # inputs.N: the program's positional input N
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_INT_NAMES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_INPUT_NAMES = _FLOAT_NAMES + _INT_NAMES + ("bool",)
_TARGET_INT_NAMES = ("int32", "int64")
_NAME_TO_TORCH = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
    "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64, "bool": torch.bool,
}
_SAFETENSORS_DTYPES = {
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16",
    "I32": "int32", "I64": "int64", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "BOOL": "bool", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members / an empty zip
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_NPY_MAX_HEADER = 10_000  # numpy's default
_CHUNK_ELEMENTS = 1 << 22  # value checks scan this many elements at a time (bounded temporaries)
_MAX_LISTED = 10


class DatasetError(EngineError):
    """The dataset was refused; the message is one line saying what is wrong and what was expected."""


class _Info(NamedTuple):
    """What a file's header says about one tensor, before its data is read."""

    shape: tuple[int, ...]
    dtype: str  # a torch-style dtype name ("float32", "int64", "bool", "complex64", "object", ...)


# ---------------------------------------------------------------------------------------------------- helpers


def _one_line(text: object, limit: int = 120) -> str:
    """A tensor name or value from an untrusted file, as a short printable line (`errors.one_line`)."""
    return one_line(text, limit)


def _list_names(names: list[str], *, sort: bool = True) -> str:
    """A short, printable, comma-separated list of (untrusted) tensor names."""
    shown = [_one_line(n, 60) for n in (sorted(names) if sort else names)[:_MAX_LISTED]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _shape_str(shape: tuple[int | str, ...]) -> str:
    """``(3, 28, 28)``; a 1-tuple is written ``(7,)``."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def _numpy_dtype_name(dtype: np.dtype) -> str:
    """A torch-style name for a numpy dtype (``object`` for object arrays)."""
    return "object" if dtype.hasobject else dtype.name


def _dtype_kind(dtype: torch.dtype) -> str:
    """``"float"``, ``"integer"`` or the dtype's own name (bool, complex)."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex or dtype == torch.bool:
        return _dtype_name(dtype)
    return "integer"


def _count_where(t: torch.Tensor, predicate) -> int:
    """How many elements of ``t`` satisfy ``predicate``, scanning in chunks (no full-size temporaries)."""
    flat = t.reshape(-1)
    return sum(int(predicate(flat[i : i + _CHUNK_ELEMENTS]).sum()) for i in range(0, flat.numel(), _CHUNK_ELEMENTS))


def _check_input_names(names: Sequence[object]) -> None:
    """At most :data:`MAX_INPUTS` input names, each a string of 1..200 printable characters, none ``targets``."""
    if len(names) > MAX_INPUTS:
        raise DatasetError(f"dataset holds {len(names)} input tensors, over the limit of {MAX_INPUTS}")
    for name in names:
        if not isinstance(name, str):
            raise DatasetError(f"input tensor names must be strings; got {type(name).__name__} {_one_line(name, 40)}")
        if not name:
            raise DatasetError("an input tensor has an empty name: name it after the program's input, or 'inputs'")
        if len(name) > MAX_NAME_CHARS:
            raise DatasetError(
                f"input tensor name '{_one_line(name, 40)}' is {len(name)} characters, over the limit of "
                f"{MAX_NAME_CHARS}"
            )
        if not name.isprintable():
            raise DatasetError(f"input tensor name '{_one_line(name)}' holds unprintable characters")
        if name == TARGETS:
            raise DatasetError("'targets' is reserved for the targets: pass them separately, not as an input")


# ------------------------------------------------------------------------------------------------ CallInputs


@dataclass(frozen=True, eq=False)
class CallInputs:
    """What to call a program of several (or keyword) inputs with: ``module(*x.args, **x.kwargs)``.

    A pytree node (``torch.utils._pytree.tree_map_only(torch.Tensor, fn, x)`` maps its tensors and returns a
    new ``CallInputs``); ``kwargs`` are in the order of the program's ``in_spec``.
    """

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]

    def __len__(self) -> int:
        """The number of rows (dim 0 of the first tensor)."""
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return first.shape[0]

    def call(self, module: Any) -> Any:
        """``module(*self.args, **self.kwargs)``."""
        return module(*self.args, **self.kwargs)


pytree.register_dataclass(CallInputs)

Batch = torch.Tensor | dict[str, torch.Tensor] | CallInputs  # what batches() and rows() yield as inputs


# ---------------------------------------------------------------------------------------------------- Dataset


@dataclass(frozen=True)
class _Binding:
    """How a fitted dataset's features (keyed by program input name) become a program call."""

    positional: tuple[str, ...]  # feature names of the positional inputs, in order
    keyword: tuple[str, ...]  # feature names of the keyword inputs, in in_spec order
    fixed_batch: int | None  # the static dim 0 of some program input, if any

    @property
    def bare(self) -> bool:
        """The program takes exactly one positional tensor: call it with the bare tensor."""
        return len(self.positional) == 1 and not self.keyword


class Dataset:
    """Rows of one or more named input tensors (dim 0 = example) and optional ``targets`` with as many rows.

    ``Dataset(tensor, targets)`` holds a single input named ``inputs``; ``Dataset({"input_ids": ids,
    "attention_mask": mask}, targets)`` holds several. ``features`` maps names to tensors; ``inputs`` is the
    tensor of a single-input dataset (refused, with a pointer to ``features``, when there are several).

    Unfitted, :meth:`batches` and :meth:`rows` yield the bare tensor of a single-input dataset and a dict
    name -> tensor otherwise. A dataset returned by :func:`fit_to_program` is keyed by the program's input
    names and yields what to call the program with: the bare tensor for a program of exactly one positional
    tensor input, else a :class:`CallInputs`; its ``fixed_batch`` is the batch size the program was exported
    with when some input has a static dim 0 (then every batch must have that size: use ``drop_last=True``).
    """

    __slots__ = ("_binding", "_features", "targets")

    def __init__(
        self, inputs: torch.Tensor | Mapping[str, torch.Tensor], targets: torch.Tensor | None = None
    ) -> None:
        if isinstance(inputs, Mapping):
            features = dict(inputs)
            _check_input_names(list(features))
        else:
            features = {INPUTS: inputs}
        _check_rows(features, targets)
        self._features: dict[str, torch.Tensor] = features
        self.targets: torch.Tensor | None = targets
        self._binding: _Binding | None = None

    @classmethod
    def _make(
        cls, features: dict[str, torch.Tensor], targets: torch.Tensor | None, binding: _Binding | None
    ) -> "Dataset":
        """A dataset of already vetted ``features`` (names unchecked: they may be program input names)."""
        out = cls.__new__(cls)
        out._features, out.targets, out._binding = features, targets, binding
        return out

    # ----------------------------------------------------------------------------------------- accessors

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """Name -> input tensor (a new dict; the tensors are the dataset's own)."""
        return dict(self._features)

    @property
    def inputs(self) -> torch.Tensor:
        """The input tensor of a single-input dataset."""
        if len(self._features) != 1:
            raise DatasetError(
                f"the dataset has {len(self._features)} input tensors ({_list_names(list(self._features))}): "
                "read .features, or fit_to_program() it and use .rows() / .batches()"
            )
        return next(iter(self._features.values()))

    @property
    def fixed_batch(self) -> int | None:
        """The batch size every batch must have (a program input with a static dim 0), else None."""
        return None if self._binding is None else self._binding.fixed_batch

    @property
    def fitted(self) -> bool:
        """Whether this dataset came from :func:`fit_to_program`."""
        return self._binding is not None

    def __len__(self) -> int:
        return next(iter(self._features.values())).shape[0]

    def __repr__(self) -> str:
        parts = [f"{name} {_dtype_name(t.dtype)} {_shape_str(tuple(t.shape))}" for name, t in self._features.items()]
        if self.targets is not None:
            parts.append(f"targets {_dtype_name(self.targets.dtype)} {_shape_str(tuple(self.targets.shape))}")
        fitted = "; fitted" if self._binding is not None else ""
        return f"Dataset({len(self)} rows: {', '.join(parts)}{fitted})"

    # ------------------------------------------------------------------------------------------ batches

    def _pack(self, features: dict[str, torch.Tensor]) -> Batch:
        """``features`` (a slice of this dataset's) in the shape batches are yielded in."""
        binding = self._binding
        if binding is None:
            return next(iter(features.values())) if len(features) == 1 else features
        if binding.bare:
            return features[binding.positional[0]]
        return CallInputs(tuple(features[n] for n in binding.positional), {n: features[n] for n in binding.keyword})

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """One epoch of ``(inputs, targets)`` batches covering every row once (``drop_last``: all but a short tail).

        ``inputs`` is a tensor, a dict or a :class:`CallInputs` (see the class docstring). Unshuffled batches
        are views; shuffled ones are ``index_select`` of one batch at a time, in the order of a permutation
        drawn from ``seed`` (pass a different seed per epoch for a different order).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"batch_size must be a positive integer; got {batch_size!r}")
        order = _permutation(len(self), seed) if shuffle else None
        return self._iter_batches(batch_size, order, drop_last)

    def _iter_batches(
        self, batch_size: int, order: torch.Tensor | None, drop_last: bool
    ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """The generator behind :meth:`batches` (arguments already checked)."""
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if order is None:
                features = {name: t[start:end] for name, t in self._features.items()}
                targets = None if self.targets is None else self.targets[start:end]
            else:
                features, targets = self._take(order[start:end])
            yield self._pack(features), targets

    def _take(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The rows at ``index`` (a CPU int64 tensor), gathered on each tensor's device."""
        features = {name: t.index_select(0, index.to(t.device)) for name, t in self._features.items()}
        targets = None if self.targets is None else self.targets.index_select(0, index.to(self.targets.device))
        return features, targets

    def rows(self, index: torch.Tensor | Sequence[int]) -> Batch:
        """The inputs of the rows at ``index`` (1-D integer indices in ``[0, len)``), shaped like :meth:`batches`."""
        if isinstance(index, torch.Tensor):
            if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
                raise DatasetError(f"row indices must be integers; got a {_dtype_name(index.dtype)} tensor")
            idx = index.detach().to("cpu", torch.int64)
        else:
            try:
                idx = torch.tensor(list(index), dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise DatasetError("row indices must be a 1-D integer tensor or a sequence of ints") from None
        if idx.dim() != 1:
            raise DatasetError(f"row indices must be 1-D; got shape {_shape_str(tuple(idx.shape))}")
        if idx.numel() == 0:
            raise DatasetError("row indices are empty: ask for at least one row")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= len(self):
            raise DatasetError(f"row index {lo if lo < 0 else hi} is out of range for a dataset of {len(self)} rows")
        return self._pack(self._take(idx)[0])

    # ---------------------------------------------------------------------------------- split / to

    def split(self, held_out: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Deterministically split into ``(kept, held_out)``: a ``held_out`` fraction in (0, 1) of random rows.

        Both sides keep the original row order and are disjoint; their union is the whole dataset. A fitted
        dataset's halves are fitted the same way.
        """
        if isinstance(held_out, bool) or not isinstance(held_out, int | float) or not 0.0 < held_out < 1.0:
            raise DatasetError(f"held_out must be a fraction strictly between 0 and 1; got {held_out!r}")
        n = len(self)
        n_held = round(n * held_out)
        if not 0 < n_held < n:
            raise DatasetError(
                f"cannot hold out {held_out:g} of {n} rows: that leaves {n - n_held} kept and {n_held} held out, "
                "and each side needs at least 1 row"
            )
        order = _permutation(n, seed)
        held_idx, kept_idx = order[:n_held].sort().values, order[n_held:].sort().values
        return Dataset._make(*self._take(kept_idx), self._binding), Dataset._make(*self._take(held_idx), self._binding)

    def to(self, device: torch.device | str) -> "Dataset":
        """The same rows on ``device``."""
        features = {name: t.to(device) for name, t in self._features.items()}
        return Dataset._make(features, None if self.targets is None else self.targets.to(device), self._binding)


def _permutation(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` determined by ``seed`` alone (CPU generator)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _check_rows(features: Mapping[str, object], targets: object) -> None:
    """At least one input; each a tensor with at least one dim and one row; all (and targets) the same rows."""
    if not features:
        raise DatasetError("the dataset has no input tensors: expected at least one")
    rows: dict[str, int] = {}
    for name, t in features.items():
        if not isinstance(t, torch.Tensor):
            raise DatasetError(f"{_one_line(name)} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() == 0:
            raise DatasetError(f"{_one_line(name)} is a scalar: expected a tensor with one row per example along dim 0")
        if t.shape[0] == 0:
            shape = _shape_str(tuple(t.shape))
            raise DatasetError(f"{_one_line(name)} has 0 rows (shape {shape}): expected at least 1")
        rows[name] = t.shape[0]
    ref = _check_same_rows(rows)
    if targets is None:
        return
    n = rows[ref]
    if not isinstance(targets, torch.Tensor):
        raise DatasetError(f"targets must be a torch.Tensor or None; got {type(targets).__name__}")
    if targets.dim() == 0:
        raise DatasetError(f"targets is a scalar: expected one target per row of {_one_line(ref)} ({n} rows)")
    if targets.shape[0] != n:
        raise DatasetError(
            f"{_one_line(ref)} has {n} rows but targets has {targets.shape[0]}: they must have the same length"
        )


def _check_same_rows(rows: dict[str, int]) -> str:
    """Every input has the same number of rows; returns the name of the reference input.

    The reference is the first input (in the given order) among those with the most common row count, so
    the tensor named in a refusal is the odd one out (with two tensors, the second).
    """
    common = Counter(rows.values()).most_common(1)[0][0]
    ref = next(n for n, r in rows.items() if r == common)
    for name, r in rows.items():
        if r != common:
            raise DatasetError(
                f"{_one_line(name)} has {r} rows but {_one_line(ref)} has {common}: every input tensor "
                "must have one row per example"
            )
    return ref


# ---------------------------------------------------------------------------------------------------- loading


def load_dataset(path: PathLike, *, max_bytes: int | None = None, max_rows: int | None = None) -> Dataset:
    """Load and validate an untrusted dataset file (``.safetensors`` or ``.npz``, detected by content).

    ``max_bytes`` caps the file's size (checked before reading it) and the bytes its tensors decode to;
    ``max_rows`` caps the number of rows. Raises :class:`DatasetError` on anything unexpected. The result is
    not bound to a program: see :func:`fit_to_program`.
    """
    with _open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        _check_file_size(size, max_bytes)
        fmt = _detect_format(fh.read(9), size)
        fh.seek(0)
        if fmt == "npz":
            with _open_zip(fh) as zf:
                infos = _npz_infos(zf)
                _check_header(infos, max_bytes, max_rows)
                raw = _npz_read(zf, infos)
        else:
            raw = _safetensors_load(path, max_bytes, max_rows)
    tensors = {name: _to_allowed_dtype(name, t) for name, t in raw.items()}
    for name in sorted(tensors):
        _check_values(name, tensors[name])
    return Dataset({name: t for name, t in tensors.items() if name != TARGETS}, tensors.get(TARGETS))


def _open_regular(path: PathLike) -> IO[bytes]:
    """Open ``path`` for binary reading; refuse anything that is missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {_one_line(os.fspath(path))}") from None
    except OSError as exc:
        raise DatasetError(f"cannot open dataset file {_one_line(os.fspath(path))}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DatasetError(f"dataset path {_one_line(os.fspath(path))} is not a regular file")
    return os.fdopen(fd, "rb")


def _check_file_size(size: int, max_bytes: int | None) -> None:
    """Refuse empty files and files over ``max_bytes``."""
    if size == 0:
        raise DatasetError("dataset file is empty: expected a .safetensors or .npz file")
    if max_bytes is not None and size > max_bytes:
        raise DatasetError(f"dataset file is {size} bytes, over the limit of {max_bytes} bytes")


def _detect_format(head: bytes, size: int) -> Literal["npz", "safetensors"]:
    """``"npz"`` or ``"safetensors"`` from the file's first 9 bytes (and its size); anything else is refused."""
    if head[:4] in _ZIP_MAGICS:
        return "npz"
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > size - 8:
            raise DatasetError(
                f"safetensors header claims {header_len} bytes but only {size - 8} follow: the file is truncated"
            )
        if header_len > _SAFETENSORS_MAX_HEADER:
            raise DatasetError(f"safetensors header is {header_len} bytes, over the limit of {_SAFETENSORS_MAX_HEADER}")
        return "safetensors"
    raise DatasetError(
        f"unrecognized dataset format (first bytes {head[:8].hex(' ')}): expected a .safetensors file "
        "(8-byte header length, then '{') or an .npz file (a zip starting with 'PK')"
    )


def _check_count(n_tensors: int) -> None:
    """At most :data:`MAX_INPUTS` input tensors plus ``targets`` (checked before any header is parsed)."""
    if n_tensors > MAX_INPUTS + 1:
        raise DatasetError(
            f"dataset holds {n_tensors} tensors, over the limit of {MAX_INPUTS} input tensors plus targets"
        )


def _check_header(infos: Mapping[str, _Info], max_bytes: int | None, max_rows: int | None) -> None:
    """Every check that needs only names, dtypes and shapes (run before any tensor data is read)."""
    input_names = _check_names(list(infos))
    for name in input_names:
        _check_inputs_info(name, infos[name])
    ref = _check_same_rows({name: infos[name].shape[0] for name in input_names})
    rows = infos[ref].shape[0]
    if max_rows is not None and rows > max_rows:
        raise DatasetError(f"{_one_line(ref)} has {rows} rows, over the limit of {max_rows} rows")
    targets = infos.get(TARGETS)
    if targets is not None:
        _check_targets_info(targets, ref, rows)
    if max_bytes is not None:
        total = sum(_nbytes(info) for info in infos.values())
        if total > max_bytes:
            raise DatasetError(f"dataset tensors decode to {total} bytes, over the limit of {max_bytes} bytes")


def _check_names(names: list[str]) -> list[str]:
    """At least one input tensor, valid names; returns the input names in file order."""
    inputs = [n for n in names if n != TARGETS]
    if not inputs:
        raise DatasetError(
            f"no input tensor (found: {_list_names(names) or 'nothing'}): expected 'inputs', 'inputs.0', "
            "'inputs.1', ... or tensors named after the program's inputs"
        )
    _check_input_names(inputs)
    return inputs


def _check_inputs_info(name: str, info: _Info) -> None:
    """An input tensor: an allowed dtype, at least 1 dim and 1 row."""
    shown = _one_line(name)
    if info.dtype not in _INPUT_NAMES:
        raise DatasetError(
            f"{shown} must be a float ({', '.join(_FLOAT_NAMES)}), integer (token ids) or bool (mask) tensor; "
            f"got {_one_line(info.dtype, 40)}"
        )
    if not info.shape:
        raise DatasetError(f"{shown} is a scalar: expected a tensor with one row per example along dim 0")
    if info.shape[0] == 0:
        raise DatasetError(f"{shown} has 0 rows (shape {_shape_str(info.shape)}): expected at least 1")


def _check_targets_info(info: _Info, ref: str, rows: int) -> None:
    """``targets``: int32/int64 class ids or floats, one per row of the input tensors."""
    if info.dtype not in _TARGET_INT_NAMES + _FLOAT_NAMES:
        raise DatasetError(
            f"targets must be integer class ids (int64) or float tensors; got {_one_line(info.dtype, 40)} "
            f"(allowed: {', '.join(_TARGET_INT_NAMES + _FLOAT_NAMES)})"
        )
    if not info.shape:
        raise DatasetError(f"targets is a scalar: expected one target per row of {_one_line(ref)} ({rows} rows)")
    if info.shape[0] != rows:
        raise DatasetError(
            f"{_one_line(ref)} has {rows} rows but targets has {info.shape[0]}: they must have the same length"
        )


def _nbytes(info: _Info) -> int:
    """Bytes of data the tensor described by ``info`` (an allowed dtype) takes."""
    return math.prod(info.shape) * _NAME_TO_TORCH[info.dtype].itemsize


def _to_allowed_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    """int32 targets -> int64; uint16/uint32/uint64 inputs -> int64 (uint64 only if every id fits)."""
    if name == TARGETS and t.dtype == torch.int32:
        return t.to(torch.int64)
    if t.dtype in (torch.uint16, torch.uint32):
        return t.to(torch.int64)
    if t.dtype == torch.uint64:
        signed = t.view(torch.int64)
        too_big = _count_where(signed, lambda c: c < 0)
        if too_big:
            raise DatasetError(
                f"{_one_line(name)} has {too_big} uint64 values above 2**63 - 1: token ids must fit in int64"
            )
        return signed
    return t


def _check_values(name: str, t: torch.Tensor) -> None:
    """No NaN/inf in float tensors; bool bytes are 0 or 1; integer targets are non-negative class ids."""
    if t.dtype.is_floating_point:
        nan = _count_where(t, torch.isnan)
        inf = _count_where(t, torch.isinf)
        if nan or inf:
            raise DatasetError(f"{_one_line(name)} contains NaN or inf at {nan + inf} positions ({nan} NaN, {inf} inf)")
    elif t.dtype == torch.bool:
        odd = _count_where(t.view(torch.uint8), lambda c: c > 1)
        if odd:
            raise DatasetError(f"{_one_line(name)} has {odd} bool values stored as bytes other than 0 or 1")
    elif name == TARGETS:
        negative = _count_where(t, lambda c: c < 0)
        if negative:
            raise DatasetError(f"targets has {negative} negative class ids: class ids must be >= 0")


# ------------------------------------------------------------------------------------------------------- npz


def _open_zip(fh: IO[bytes]) -> zipfile.ZipFile:
    """The npz's zip directory; a damaged zip is refused."""
    try:
        return zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        reason = _one_line(exc)
        raise DatasetError(f"corrupt or truncated npz file ({reason}): expected a complete numpy.savez file") from None


def _npz_infos(zf: zipfile.ZipFile) -> dict[str, _Info]:
    """Name -> header of every member, from the ``.npy`` headers only (no data read, nothing unpickled)."""
    members = zf.infolist()
    _check_count(len(members))
    names: dict[str, zipfile.ZipInfo] = {}
    for member in members:
        if not member.filename.endswith(".npy"):
            raise DatasetError(
                f"npz entry {_one_line(member.filename)!r} is not a .npy array: "
                "expected only <name>.npy arrays (inputs.npy, targets.npy, ...)"
            )
        name = member.filename.removesuffix(".npy")
        if name in names:
            raise DatasetError(f"npz holds {_one_line(name)!r} more than once: expected each name once")
        names[name] = member
    _check_names(list(names))  # before parsing any header
    return {name: _npy_header(zf, member) for name, member in names.items()}


def _npy_header(zf: zipfile.ZipFile, member: zipfile.ZipInfo) -> _Info:
    """Parse and vet one member's ``.npy`` header: no object dtype, and as much data as the header declares."""
    name = _one_line(member.filename.removesuffix(".npy"))
    try:
        with zf.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_NPY_MAX_HEADER)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_NPY_MAX_HEADER)
            else:
                raise DatasetError(f"npz entry {name!r} uses .npy format {version}: expected version 1.0 or 2.0")
            header_len = f.tell()
    except DatasetError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise DatasetError(f"npz entry {name!r} is corrupt: {_one_line(exc)}") from None
    if dtype.hasobject:
        raise DatasetError(
            f"npz entry {name!r} holds Python objects (dtype object), which would need unpickling: "
            "refused; save a plain numeric array"
        )
    data_len = math.prod(shape) * dtype.itemsize
    if member.file_size - header_len < data_len:
        raise DatasetError(
            f"npz entry {name!r} is truncated: its header declares {data_len} bytes of data "
            f"but it holds {member.file_size - header_len}"
        )
    return _Info(tuple(int(d) for d in shape), _numpy_dtype_name(dtype))


def _npz_read(zf: zipfile.ZipFile, infos: Mapping[str, _Info]) -> dict[str, torch.Tensor]:
    """Read the (already vetted) arrays with ``allow_pickle=False`` and convert them to tensors."""
    out: dict[str, torch.Tensor] = {}
    for name in infos:
        try:
            with zf.open(name + ".npy") as f:
                array = np.lib.format.read_array(f, allow_pickle=False, max_header_size=_NPY_MAX_HEADER)
        except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, RuntimeError) as exc:
            raise DatasetError(f"npz entry {_one_line(name)!r} is corrupt: {_one_line(exc)}") from None
        if array.dtype.byteorder not in "=|":
            array = array.astype(array.dtype.newbyteorder("="))
        out[name] = torch.from_numpy(np.ascontiguousarray(array))
    return out


# ----------------------------------------------------------------------------------------------- safetensors


def _safetensors_load(path: PathLike, max_bytes: int | None, max_rows: int | None) -> dict[str, torch.Tensor]:
    """Open with ``safe_open``, vet names/dtypes/shapes from the header, then read the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            names = list(f.keys())
            _check_count(len(names))
            _check_names(names)
            infos = {}
            for name in names:
                sl = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
                infos[name] = _Info(tuple(int(d) for d in sl.get_shape()), dtype)
            _check_header(infos, max_bytes, max_rows)
            return {name: f.get_tensor(name) for name in infos}
    except DatasetError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        reason = _one_line(exc)
        raise DatasetError(f"corrupt safetensors file ({reason}): expected a complete safetensors file") from None


# ---------------------------------------------------------------------------------------------------- program


def dynamic_input_dims(program: torch.export.ExportedProgram) -> set[int]:
    """Dims (other than the batch dim 0) of the program's first user input whose size is symbolic."""
    first = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return set()
    return {i for i, d in enumerate(val.shape) if i > 0 and not isinstance(d, int)}


def check_against_program(
    dataset: Dataset, example_inputs: tuple, dynamic_dims: AbstractSet[int] = frozenset()
) -> None:
    """Refuse a single-input dataset whose rows do not fit the program's first example input (minus its batch dim).

    ``dynamic_dims`` lists dims of that example input, numbered as in the example input (so the first dim
    after the batch dim is 1), whose size may differ; see :func:`dynamic_input_dims`. The dtype kinds
    (float / integer) must agree too. For programs of several inputs use :func:`fit_to_program`.
    """
    if not example_inputs or not isinstance(example_inputs[0], torch.Tensor) or example_inputs[0].dim() == 0:
        raise ValueError("the program's first example input must be a tensor with a batch dim")
    example = example_inputs[0]
    bad = sorted(d for d in dynamic_dims if not 0 < d < example.dim())
    if bad:
        raise ValueError(f"dynamic_dims {bad} are not dims 1..{example.dim() - 1} of the example input")
    _check_row_shape(tuple(dataset.inputs.shape[1:]), tuple(example.shape[1:]), dynamic_dims)
    data_kind, model_kind = _dtype_kind(dataset.inputs.dtype), _dtype_kind(example.dtype)
    if data_kind != model_kind:
        raise DatasetError(
            f"dataset inputs are {_dtype_name(dataset.inputs.dtype)} ({data_kind}) but the model takes "
            f"{_dtype_name(example.dtype)} ({model_kind}) inputs"
        )


def _check_row_shape(row: tuple[int, ...], expected: tuple[int, ...], dynamic_dims: AbstractSet[int]) -> None:
    """``row`` matches ``expected`` except at dynamic dims (numbered from 1, as in the batched input)."""
    fits = len(row) == len(expected) and all(
        r == e or i + 1 in dynamic_dims for i, (r, e) in enumerate(zip(row, expected, strict=True))
    )
    if not fits:
        shown = tuple("*" if i + 1 in dynamic_dims else e for i, e in enumerate(expected))
        note = " (* = any size)" if dynamic_dims else ""
        raise DatasetError(
            f"dataset rows are {_shape_str(row)} but the model takes {_shape_str(shown)} per example{note}"
        )


class _ProgramInput(NamedTuple):
    """One user input of an exported program."""

    name: str  # the forward() argument name (the key a dataset tensor may use)
    position: int | None  # its index among the positional inputs; None for a keyword input
    node: torch.fx.Node  # its placeholder
    val: torch.Tensor  # the placeholder's fake tensor (dtype, shape with SymInt dynamic dims)


def _spec_children(spec: Any) -> list:
    """A pytree TreeSpec's children, across torch versions."""
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


def _program_inputs(ep: torch.export.ExportedProgram) -> list[_ProgramInput]:
    """The program's user inputs, positional ones first then keyword ones in ``in_spec`` order.

    Refuses inputs a dataset cannot feed: containers of tensors, and non-tensor inputs (ints, None, ...).
    """
    from torch.export.graph_signature import InputKind, TensorArgument

    signature = ep.module_call_graph[0].signature if ep.module_call_graph else None
    if signature is None:
        raise DatasetError("the program has no call signature: cannot tell which inputs it takes")
    top = _spec_children(signature.in_spec)
    if signature.in_spec.type is not tuple or len(top) != 2 or top[1].type is not dict:
        raise DatasetError(f"the program's input spec is not (args, kwargs): {_one_line(signature.in_spec, 80)}")
    args_spec, kwargs_spec = top
    n_pos = args_spec.num_children
    arg_names = list(getattr(signature, "forward_arg_names", None) or [])[:n_pos]
    user = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if len(arg_names) < n_pos or len(set(arg_names)) < n_pos:
        arg_names = [f"{INPUTS}.{i}" for i in range(n_pos)]  # unnamed (*args): only inputs.N can feed them
    names = arg_names + [str(k) for k in kwargs_spec.context]
    if not names:
        raise DatasetError("the program takes no inputs: there is nothing for a dataset to feed")
    leaves = _spec_children(args_spec) + _spec_children(kwargs_spec)
    for name, leaf in zip(names, leaves, strict=True):
        if not leaf.is_leaf():
            raise DatasetError(
                f"the program's input {_one_line(name)} is a {leaf.type.__name__} of values: datasets feed only "
                "inputs that are single tensors"
            )
    if len(user) != len(names):
        raise DatasetError(f"the program lists {len(user)} user inputs but its input spec has {len(names)}")
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out = []
    for i, (name, spec) in enumerate(zip(names, user, strict=True)):
        node = placeholders.get(spec.arg.name) if isinstance(spec.arg, TensorArgument) else None
        val = None if node is None else node.meta.get("val")
        if node is None or not isinstance(val, torch.Tensor):
            value = getattr(spec.arg, "value", None)
            what = f"the {type(value).__name__} {_one_line(value, 40)}" if value is not None else "None"
            raise DatasetError(
                f"the program's input {_one_line(name)} is {what}, not a tensor: datasets feed only tensor inputs"
            )
        if val.dim() == 0:
            raise DatasetError(
                f"the program's input {_one_line(name)} is a scalar tensor: datasets feed tensors with a batch dim 0"
            )
        out.append(_ProgramInput(name, i if i < n_pos else None, node, val))
    return out


def _describe_inputs(inputs: list[_ProgramInput]) -> str:
    """``input_ids, attention_mask`` / ``x and keyword mask``: what the program takes, for messages."""
    positional = [_one_line(p.name, 60) for p in inputs if p.position is not None]
    keyword = [_one_line(p.name, 60) for p in inputs if p.position is None]
    text = ", ".join(positional)
    if keyword:
        text += (" and " if text else "") + "keyword " + ", ".join(keyword)
    return text


def _naming_hint(inputs: list[_ProgramInput]) -> str:
    """How a dataset may name the program's inputs."""
    n_pos = sum(p.position is not None for p in inputs)
    if n_pos == 0:
        return "name the tensors after them"
    by_position = "'inputs.0'" if n_pos == 1 else f"'inputs.0'..'inputs.{n_pos - 1}'"
    single = " or 'inputs'" if len(inputs) == 1 else ""
    return f"name the tensors after them, or {by_position}{single} by position"


def _assign(names: list[str], inputs: list[_ProgramInput]) -> dict[str, str]:
    """Program input name -> the dataset tensor that feeds it; refuses unknown, doubled and missing names."""
    by_name = {p.name: p for p in inputs}
    positional = [p for p in inputs if p.position is not None]
    fed: dict[str, str] = {}
    for tensor in sorted(names, key=lambda n: (n not in by_name, n)):  # exact names first
        shown = _one_line(tensor)
        if tensor in by_name:
            target = by_name[tensor]
        elif tensor == INPUTS:
            if len(inputs) != 1:
                raise DatasetError(
                    f"inputs feeds a program of one input, but this program takes {len(inputs)}: "
                    f"{_describe_inputs(inputs)}; {_naming_hint(inputs)}"
                )
            target = inputs[0]
        elif (match := _INDEXED.fullmatch(tensor)) is not None:
            index = int(match[1])
            if index >= len(positional):
                raise DatasetError(
                    f"{shown} names positional input {index}, but the program takes {len(positional)} positional "
                    f"input{'' if len(positional) == 1 else 's'}: {_describe_inputs(inputs) or 'none'}"
                )
            target = positional[index]
        else:
            raise DatasetError(
                f"unknown tensor {shown}: the program takes {_describe_inputs(inputs)}; {_naming_hint(inputs)} "
                "(targets go in 'targets')"
            )
        if target.name in fed:
            raise DatasetError(
                f"{_one_line(fed[target.name])} and {shown} both feed the program's input "
                f"{_one_line(target.name)}: keep one"
            )
        fed[target.name] = tensor
    missing = [p.name for p in inputs if p.name not in fed]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(
            f"no tensor for the program's input {_one_line(missing[0])}{more}: the program takes "
            f"{_describe_inputs(inputs)}; {_naming_hint(inputs)}"
        )
    return fed


def _who(tensor: str, pin: _ProgramInput) -> str:
    """The dataset tensor, and the program input it feeds when the names differ."""
    if tensor == pin.name:
        return _one_line(tensor)
    return f"dataset tensor {_one_line(tensor)!r} (for the program's input {_one_line(pin.name)!r})"


def _dim_range(ep: torch.export.ExportedProgram, size: Any) -> tuple[int, int | None] | None:
    """``(min, max or None)`` of a dynamic dim whose size is a plain symbol with a range constraint."""
    expr = getattr(getattr(size, "node", None), "expr", None)
    vr = ep.range_constraints.get(expr) if expr is not None else None
    if vr is None:
        return None
    lower = int(vr.lower) if getattr(vr.lower, "is_Integer", False) else 0
    upper = int(vr.upper) if getattr(vr.upper, "is_Integer", False) else None
    return lower, upper


def _embedding_rows(ep: torch.export.ExportedProgram, pin: _ProgramInput) -> tuple[int, str] | None:
    """``(num_embeddings, weight name)`` of the smallest embedding the input indexes directly, if any."""
    found: list[tuple[int, str]] = []
    params = ep.graph_signature.inputs_to_parameters
    for user in pin.node.users:
        if user.op != "call_function" or user.target is not torch.ops.aten.embedding.default:
            continue
        if len(user.args) < 2 or user.args[1] is not pin.node or not isinstance(user.args[0], torch.fx.Node):
            continue
        weight = user.args[0].meta.get("val")
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1 and isinstance(weight.shape[0], int):
            found.append((weight.shape[0], params.get(user.args[0].name, user.args[0].name)))
    return min(found) if found else None


def _describe_dtype(dtype: torch.dtype, embedding: tuple[int, str] | None) -> str:
    """``int64 token ids`` / ``float32 values`` / ``bool masks``: what a program input takes, for messages."""
    kind = _dtype_kind(dtype)
    if kind == "integer":
        return f"{_dtype_name(dtype)} token ids" if embedding else f"{_dtype_name(dtype)} integers"
    if kind == "float":
        return f"{_dtype_name(dtype)} values"
    return f"{_dtype_name(dtype)} masks" if dtype == torch.bool else f"{_dtype_name(dtype)} values"


def _fit_dtype(who: str, t: torch.Tensor, want: torch.dtype, embedding: tuple[int, str] | None) -> torch.Tensor:
    """``t`` converted to the program's dtype ``want`` when the kinds allow it (see :func:`fit_to_program`)."""
    have = t.dtype
    if have == want:
        return t
    kinds = (_dtype_kind(have), _dtype_kind(want))
    if kinds == ("float", "float"):
        out = t.to(want)
        overflow = _count_where(out, torch.isinf)
        if overflow:
            raise DatasetError(
                f"{who} has {overflow} values too large for {_dtype_name(want)}, the dtype the program takes"
            )
        return out
    if kinds == ("integer", "integer"):
        info, source = torch.iinfo(want), torch.iinfo(have)
        low, high = info.min > source.min, info.max < source.max  # only these bounds fit in ``have`` to compare

        def out_of_range(c: torch.Tensor) -> torch.Tensor:
            bad = torch.zeros_like(c, dtype=torch.bool)
            if low:
                bad |= c < info.min
            if high:
                bad |= c > info.max
            return bad

        outside = _count_where(t, out_of_range) if low or high else 0
        if outside:
            raise DatasetError(
                f"{who} has {outside} values outside {_dtype_name(want)}'s range [{info.min}, {info.max}], "
                "the dtype the program takes"
            )
        return t.to(want)
    if kinds == ("bool", "integer"):
        return t.to(want)
    if kinds == ("integer", "bool"):
        other = _count_where(t, lambda c: (c != 0) & (c != 1))
        if other:
            raise DatasetError(f"{who} has {other} values other than 0 and 1 but the program takes a bool mask")
        return t.to(want)
    raise DatasetError(f"{who} is {_dtype_name(have)} but the program takes {_describe_dtype(want, embedding)}")


def _fit_shape(who: str, t: torch.Tensor, pin: _ProgramInput, ep: torch.export.ExportedProgram) -> None:
    """``t``'s rows match the input's shape minus dim 0: static dims equal, dynamic dims within their range."""
    expected = tuple(pin.val.shape[1:])
    row = tuple(t.shape[1:])
    dynamic = {i for i, d in enumerate(expected) if not isinstance(d, int)}
    fits = len(row) == len(expected) and all(  # never compare a SymInt: that would specialize the program
        i in dynamic or r == e for i, (r, e) in enumerate(zip(row, expected, strict=True))
    )
    if not fits:
        shown = tuple("*" if i in dynamic else e for i, e in enumerate(expected))
        note = " (* = any size)" if dynamic else ""
        raise DatasetError(
            f"{who} rows are {_shape_str(row)} but the program takes {_shape_str(shown)} per example{note}"
        )
    for i in sorted(dynamic):
        bounds = _dim_range(ep, expected[i])
        if bounds is None:
            continue
        lower, upper = bounds
        if row[i] < lower or (upper is not None and row[i] > upper):
            allowed = f"{lower}..{upper}" if upper is not None else f"at least {lower}"
            raise DatasetError(
                f"{who} rows have size {row[i]} at dim {i + 1} but the program takes sizes {allowed} there"
            )


def _fit_ids(who: str, t: torch.Tensor, embedding: tuple[int, str]) -> None:
    """Integer ids that index an embedding lie in ``[0, num_embeddings)``."""
    rows, weight = embedding
    outside = _count_where(t, lambda c: (c < 0) | (c >= rows))
    if outside:
        raise DatasetError(
            f"{who} has {outside} ids outside [0, {rows}) (min {int(t.min())}, max {int(t.max())}): "
            f"the program's embedding {_one_line(weight, 60)} has {rows} rows"
        )


def _check_shared_dims(fitted: list[tuple[str, torch.Tensor, _ProgramInput]]) -> None:
    """Dynamic dims that share a symbol in the program (e.g. the sequence length of ids and mask) agree."""
    seen: dict[Any, tuple[str, int, int]] = {}
    for who, t, pin in fitted:
        for i, size in enumerate(pin.val.shape):
            expr = getattr(getattr(size, "node", None), "expr", None)
            if i == 0 or expr is None or not getattr(expr, "is_Symbol", False):
                continue
            if expr in seen and seen[expr][1] != t.shape[i]:
                other, other_size, other_dim = seen[expr]
                raise DatasetError(
                    f"{who} has size {t.shape[i]} at dim {i} but {other} has {other_size} at dim {other_dim}: "
                    "the program takes the same size for both"
                )
            seen.setdefault(expr, (who, t.shape[i], i))


def _fixed_batch(fitted: list[tuple[str, torch.Tensor, _ProgramInput]], rows: int) -> int | None:
    """The static dim 0 the program's inputs share, if any; refuses disagreeing ones and too few rows."""
    fixed = [(who, pin.val.shape[0]) for who, _, pin in fitted if isinstance(pin.val.shape[0], int)]
    if not fixed:
        return None
    who, size = fixed[0]
    for other, other_size in fixed[1:]:
        if other_size != size:
            raise DatasetError(
                f"{other} has a fixed batch of {other_size} in the program but {who} of {size}: "
                "rows of one dataset cannot feed both"
            )
    if rows < size:
        raise DatasetError(
            f"the program takes batches of exactly {size} rows ({who} has a static dim 0) but the dataset has {rows}"
        )
    return size


def fit_to_program(dataset: Dataset, ep: torch.export.ExportedProgram) -> Dataset:
    """Vet ``dataset`` against ``ep``'s user inputs; return a dataset that yields what to call ``ep`` with.

    Tensors map to the program's inputs by exact name (positional or keyword), ``inputs`` to the single
    input of a one-input program, ``inputs.N`` to positional input N. Refused (:class:`DatasetError`): an
    input with no tensor, a tensor that matches no input (or two tensors for one input), rows whose shape
    differs from the input's shape minus its batch dim (static dims must be equal; dynamic dims may differ,
    within the range the program was exported for, and dims that share a size in the program must agree),
    a dtype kind the input does not take, and integer ids outside ``[0, num_embeddings)`` for an input that
    indexes an ``aten.embedding`` directly. Programs with non-tensor inputs (ints, None) or containers of
    tensors are refused.

    Dtypes: the fitted tensors have the program's dtypes. Float -> float of another width and integer ->
    integer of another width are converted (refused if a value does not fit); bool -> integer becomes 0/1
    and integer -> bool is allowed when every value is 0 or 1; float <-> integer and float <-> bool are
    refused.

    The result's :meth:`Dataset.batches` / :meth:`Dataset.rows` yield a bare tensor when the program takes
    exactly one positional tensor input, else a :class:`CallInputs`; ``targets`` are unchanged. Its
    ``fixed_batch`` is the program's static dim 0 when some input has one (every batch must then have that
    many rows: use ``drop_last=True``), else None.
    """
    if not isinstance(dataset, Dataset):
        raise DatasetError(f"expected a Dataset; got {type(dataset).__name__}")
    inputs = _program_inputs(ep)
    fed = _assign(list(dataset._features), inputs)
    fitted: list[tuple[str, torch.Tensor, _ProgramInput]] = []
    for pin in inputs:
        tensor = fed[pin.name]
        who = _who(tensor, pin)
        t = dataset._features[tensor]
        _fit_shape(who, t, pin, ep)
        embedding = _embedding_rows(ep, pin) if not pin.val.dtype.is_floating_point else None
        t = _fit_dtype(who, t, pin.val.dtype, embedding)
        if embedding is not None and _dtype_kind(t.dtype) == "integer":
            _fit_ids(who, t, embedding)
        fitted.append((who, t, pin))
    _check_shared_dims(fitted)
    binding = _Binding(
        positional=tuple(pin.name for _, _, pin in fitted if pin.position is not None),
        keyword=tuple(pin.name for _, _, pin in fitted if pin.position is None),
        fixed_batch=_fixed_batch(fitted, len(dataset)),
    )
    return Dataset._make({pin.name: t for _, t, pin in fitted}, dataset.targets, binding)


# ---------------------------------------------------------------------------------------------------- saving


def save_dataset(
    path: PathLike,
    inputs: torch.Tensor | np.ndarray | Mapping[str, torch.Tensor | np.ndarray],
    targets: torch.Tensor | np.ndarray | None = None,
    *,
    format: Literal["safetensors", "npz"] = "safetensors",
) -> Path:
    """Write ``inputs`` (one tensor, saved as ``inputs``, or a dict name -> tensor) and ``targets`` to ``path``.

    Written atomically (temp file in the same dir, then rename). Names are checked as :func:`load_dataset`
    checks them; values are not (the loader vets them).
    """
    if format not in ("safetensors", "npz"):
        raise ValueError(f"format must be 'safetensors' or 'npz'; got {format!r}")
    if isinstance(inputs, Mapping):
        if not inputs:
            raise DatasetError("inputs is an empty dict: expected at least one input tensor")
        _check_input_names(list(inputs))
        tensors = {name: _as_cpu_tensor(t) for name, t in inputs.items()}
    else:
        tensors = {INPUTS: _as_cpu_tensor(inputs)}
    if targets is not None:
        tensors[TARGETS] = _as_cpu_tensor(targets)
    data = _encode_safetensors(tensors) if format == "safetensors" else _encode_npz(tensors)
    return _write_atomic(Path(path), data)


def _as_cpu_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A contiguous CPU tensor."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.detach().cpu().contiguous()


def _encode_safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """The tensors as safetensors bytes."""
    from safetensors.torch import save

    return save(tensors)


def _encode_npz(tensors: dict[str, torch.Tensor]) -> bytes:
    """The tensors as (uncompressed) npz bytes, without pickles."""
    import io

    if any(t.dtype == torch.bfloat16 for t in tensors.values()):
        raise ValueError("npz cannot store bfloat16 tensors: use format='safetensors'")
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **{name: t.numpy() for name, t in tensors.items()})
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temp file next to ``path``, fsync it, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
