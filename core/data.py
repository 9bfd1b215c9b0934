"""Datasets for data-driven pruning: untrusted ``.safetensors`` / ``.npz`` uploads holding ``inputs`` (+ ``targets``).

A dataset file holds exactly one tensor named ``inputs`` (one row per example along dim 0) and optionally one
named ``targets`` (same number of rows). The format is detected from the file's first bytes, never its name:

* ``.npz``: a zip (``PK\\x03\\x04``) of ``inputs.npy`` / ``targets.npy``. Every ``.npy`` header is parsed and
  vetted before any data is read; object arrays (which would need unpickling) are refused and numpy is only
  ever called with ``allow_pickle=False``.
* ``.safetensors``: an 8-byte little-endian header length followed by a JSON header starting with ``{``;
  read with ``safetensors.safe_open`` (names, dtypes and shapes are checked before any tensor is read).

:func:`load_dataset` refuses anything else with a :class:`DatasetError` whose message is one actionable line.
"""

import math
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, NamedTuple

import numpy as np
import torch

__all__ = [
    "Dataset", "DatasetError", "check_against_program", "dynamic_input_dims", "load_dataset", "save_dataset",
]

PathLike = str | os.PathLike[str]

INPUTS = "inputs"
TARGETS = "targets"
_ALLOWED_NAMES = (INPUTS, TARGETS)
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_INT_NAMES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_TARGET_INT_NAMES = ("int32", "int64")
_NAME_TO_TORCH = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
    "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64,
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


class DatasetError(ValueError):
    """The dataset was refused; the message is one line saying what is wrong and what was expected."""


class _Info(NamedTuple):
    """What a file's header says about one tensor, before its data is read."""

    shape: tuple[int, ...]
    dtype: str  # a torch-style dtype name ("float32", "int64", "bool", "complex64", "object", ...)


# ---------------------------------------------------------------------------------------------------- helpers


def _one_line(text: object, limit: int = 120) -> str:
    """``text`` as one printable line of at most ``limit`` characters (names come from untrusted files)."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _list_names(names: list[str]) -> str:
    """A short, printable, comma-separated list of (untrusted) tensor names."""
    shown = [_one_line(n, 60) for n in sorted(names)[:_MAX_LISTED]]
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


# ---------------------------------------------------------------------------------------------------- Dataset


@dataclass(eq=False)
class Dataset:
    """Rows of ``inputs`` (dim 0 = example) and optional ``targets`` with the same number of rows."""

    inputs: torch.Tensor
    targets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _check_rows(self.inputs, self.targets)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One epoch of ``(inputs, targets)`` batches covering every row once (``drop_last``: all but a short tail).

        Unshuffled batches are views; shuffled ones are ``index_select`` of one batch at a time, in the order
        of a permutation drawn from ``seed`` (pass a different seed per epoch for a different order).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"batch_size must be a positive integer; got {batch_size!r}")
        order = _permutation(len(self), seed) if shuffle else None
        return self._iter_batches(batch_size, order, drop_last)

    def _iter_batches(
        self, batch_size: int, order: torch.Tensor | None, drop_last: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The generator behind :meth:`batches` (arguments already checked)."""
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if order is None:
                yield self.inputs[start:end], None if self.targets is None else self.targets[start:end]
            else:
                yield self._take(order[start:end])

    def _take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows at ``index`` (a CPU int64 tensor), gathered on the data's device."""
        idx = index.to(self.inputs.device)
        targets = None if self.targets is None else self.targets.index_select(0, idx.to(self.targets.device))
        return self.inputs.index_select(0, idx), targets

    def split(self, held_out: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Deterministically split into ``(kept, held_out)``: a ``held_out`` fraction in (0, 1) of random rows.

        Both sides keep the original row order and are disjoint; their union is the whole dataset.
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
        return Dataset(*self._take(kept_idx)), Dataset(*self._take(held_idx))

    def to(self, device: torch.device | str) -> "Dataset":
        """The same rows on ``device``."""
        return Dataset(self.inputs.to(device), None if self.targets is None else self.targets.to(device))


def _permutation(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` determined by ``seed`` alone (CPU generator)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _check_rows(inputs: object, targets: object) -> None:
    """``inputs`` has at least one dim and one row; ``targets`` (if any) has the same number of rows."""
    if not isinstance(inputs, torch.Tensor):
        raise DatasetError(f"inputs must be a torch.Tensor; got {type(inputs).__name__}")
    if inputs.dim() == 0:
        raise DatasetError("inputs is a scalar: expected a tensor with one row per example along dim 0")
    if inputs.shape[0] == 0:
        raise DatasetError(f"inputs has 0 rows (shape {_shape_str(tuple(inputs.shape))}): expected at least 1")
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor):
        raise DatasetError(f"targets must be a torch.Tensor or None; got {type(targets).__name__}")
    if targets.dim() == 0:
        raise DatasetError(f"targets is a scalar: expected one target per row of inputs ({inputs.shape[0]} rows)")
    if targets.shape[0] != inputs.shape[0]:
        raise DatasetError(
            f"inputs has {inputs.shape[0]} rows but targets has {targets.shape[0]}: they must have the same length"
        )


# ---------------------------------------------------------------------------------------------------- loading


def load_dataset(path: PathLike, *, max_bytes: int | None = None, max_rows: int | None = None) -> Dataset:
    """Load and validate an untrusted dataset file (``.safetensors`` or ``.npz``, detected by content).

    ``max_bytes`` caps the file's size (checked before reading it) and the bytes its tensors decode to;
    ``max_rows`` caps the number of rows. Raises :class:`DatasetError` on anything unexpected.
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
    for name, t in tensors.items():
        _check_values(name, t)
    return Dataset(tensors[INPUTS], tensors.get(TARGETS))


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


def _check_header(infos: Mapping[str, _Info], max_bytes: int | None, max_rows: int | None) -> None:
    """Every check that needs only names, dtypes and shapes (run before any tensor data is read)."""
    _check_names(list(infos))
    inputs, targets = infos[INPUTS], infos.get(TARGETS)
    _check_inputs_info(inputs, max_rows)
    if targets is not None:
        _check_targets_info(targets, inputs)
    if max_bytes is not None:
        total = sum(_nbytes(info) for info in infos.values())
        if total > max_bytes:
            raise DatasetError(f"dataset tensors decode to {total} bytes, over the limit of {max_bytes} bytes")


def _check_names(names: list[str]) -> None:
    """Exactly ``inputs`` and optionally ``targets``."""
    extra = [n for n in names if n not in _ALLOWED_NAMES]
    if extra:
        raise DatasetError(
            f"unexpected tensor names: {_list_names(extra)} (a dataset holds only 'inputs' and optionally 'targets')"
        )
    if INPUTS not in names:
        raise DatasetError(f"no tensor named 'inputs' (found: {_list_names(names) or 'nothing'})")


def _check_inputs_info(info: _Info, max_rows: int | None) -> None:
    """``inputs``: an allowed dtype, at least 1 dim and 1 row, at most ``max_rows`` rows."""
    if info.dtype not in _FLOAT_NAMES + _INT_NAMES:
        raise DatasetError(
            f"inputs must be a float ({', '.join(_FLOAT_NAMES)}) or integer (token ids) tensor; got {info.dtype}"
        )
    if not info.shape:
        raise DatasetError("inputs is a scalar: expected a tensor with one row per example along dim 0")
    if info.shape[0] == 0:
        raise DatasetError(f"inputs has 0 rows (shape {_shape_str(info.shape)}): expected at least 1")
    if max_rows is not None and info.shape[0] > max_rows:
        raise DatasetError(f"inputs has {info.shape[0]} rows, over the limit of {max_rows} rows")


def _check_targets_info(info: _Info, inputs: _Info) -> None:
    """``targets``: int32/int64 class ids or floats, one per row of ``inputs``."""
    if info.dtype not in _TARGET_INT_NAMES + _FLOAT_NAMES:
        raise DatasetError(
            f"targets must be integer class ids (int64) or float tensors; got {info.dtype} "
            f"(allowed: {', '.join(_TARGET_INT_NAMES + _FLOAT_NAMES)})"
        )
    if not info.shape:
        raise DatasetError(f"targets is a scalar: expected one target per row of inputs ({inputs.shape[0]} rows)")
    if info.shape[0] != inputs.shape[0]:
        raise DatasetError(
            f"inputs has {inputs.shape[0]} rows but targets has {info.shape[0]}: they must have the same length"
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
            raise DatasetError(f"{name} has {too_big} uint64 values above 2**63 - 1: token ids must fit in int64")
        return signed
    return t


def _check_values(name: str, t: torch.Tensor) -> None:
    """No NaN/inf in float tensors; integer targets are non-negative class ids."""
    if t.dtype.is_floating_point:
        nan = _count_where(t, torch.isnan)
        inf = _count_where(t, torch.isinf)
        if nan or inf:
            raise DatasetError(f"{name} contains NaN or inf at {nan + inf} positions ({nan} NaN, {inf} inf)")
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
    infos: dict[str, _Info] = {}
    for member in zf.infolist():
        if not member.filename.endswith(".npy"):
            raise DatasetError(
                f"npz entry {_one_line(member.filename)!r} is not a .npy array: "
                "expected only inputs.npy and optionally targets.npy"
            )
        name = member.filename.removesuffix(".npy")
        if name in infos:
            raise DatasetError(f"npz holds {_one_line(name)!r} more than once: expected each name once")
        infos[name] = _npy_header(zf, member) if name in _ALLOWED_NAMES else _Info((), "unread")
    return infos


def _npy_header(zf: zipfile.ZipFile, member: zipfile.ZipInfo) -> _Info:
    """Parse and vet one member's ``.npy`` header: no object dtype, and as much data as the header declares."""
    name = member.filename.removesuffix(".npy")
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
            raise DatasetError(f"npz entry {name!r} is corrupt: {_one_line(exc)}") from None
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
            infos = {}
            for name in f.keys():
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
    """Refuse a dataset whose rows do not fit the program's first example input (minus its batch dim).

    ``dynamic_dims`` lists dims of that example input, numbered as in the example input (so the first dim
    after the batch dim is 1), whose size may differ; see :func:`dynamic_input_dims`. The dtype kinds
    (float / integer) must agree too.
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


# ---------------------------------------------------------------------------------------------------- saving


def save_dataset(
    path: PathLike,
    inputs: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray | None = None,
    *,
    format: Literal["safetensors", "npz"] = "safetensors",
) -> Path:
    """Write ``inputs`` (and ``targets``) to ``path`` atomically (temp file in the same dir, then rename)."""
    if format not in ("safetensors", "npz"):
        raise ValueError(f"format must be 'safetensors' or 'npz'; got {format!r}")
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
