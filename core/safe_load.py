"""Safe intake for untrusted ``.pt2`` archives written by ``torch.export.save``.

``torch.export.load`` (torch 2.13) runs code taken from the archive in these places:

* ``torch.load(weights_only=False)`` on weights / tensor constants whose config says ``use_pickle``;
* ``torch._C._pickle_load_obj`` / plain ``pickle.loads`` on ``custom_obj_*`` / ``opaque_obj_*`` constants;
* sample inputs and legacy ``data/{weights,constants}/<model>.pt``: weights-only first, then
  ``weights_only=False`` if that fails;
* ``data/aotinductor/``: compiled shared libraries are loaded;
* the graph JSON: every ``expr_str`` goes through ``sympy.sympify`` (``eval``), tree-spec contexts
  may name a module to import (``__enum__``), and ``guards_code``, ``forward_arg_names`` and names
  go into Python source that ``ep.module()`` ``exec``s.
* sample-input dict keys, even in a weights-only pickle, are pasted into that guard source too.

:func:`vet_archive` rules all of these out without deserializing anything with torch;
:func:`load_program` vets and only then calls ``torch.export.load`` on the same open file.
"""

import ast
import io
import json
import logging
import os
import pickletools
import re
import stat
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any, NoReturn

import torch

from .errors import EngineError, exception_line, one_line

__all__ = ["ArchiveLoadError", "UnsafeArchiveError", "load_program", "vet_archive"]

DEFAULT_MAX_UNCOMPRESSED_BYTES = 8 * 2**30
_CHUNK = 1 << 20
_MAX_DEFLATE_RATIO = 100
_MAX_MEMBERS = 100_000
_MAX_META_BYTES = 64
_MAX_EXPR_CHARS = 20_000


_one_line, _exc_line = one_line, exception_line


class UnsafeArchiveError(EngineError):
    """The archive was refused; ``member`` names the offending zip member (None: the whole file)."""

    def __init__(self, member: str | None, reason: str, path: str | None = None) -> None:
        self.member = member
        self.reason = reason
        self.path = path
        where = member if member is not None else (path or "archive")
        super().__init__(f"refused {_one_line(where)}: {_one_line(reason)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.member, self.reason, self.path))


class ArchiveLoadError(EngineError):
    """The archive passed vetting but torch could not load it."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"could not load {_one_line(path)}: {_one_line(reason)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


_Fail = Callable[[str | None, str], NoReturn]

# ----------------------------------------------------------------------------- zip structure

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_DESCRIPTOR_GAPS = frozenset({12, 16, 20, 24})  # data descriptor, with/without signature, zip64 or not


def _check_name(name: str, fail: _Fail) -> None:
    if not name or name.startswith("/") or "\\" in name or re.match(r"[A-Za-z]:", name):
        fail(name, "absolute or non-portable member name")
    if any(not ch.isprintable() for ch in name):
        fail(name, "control characters in member name")
    if any(part in ("", ".", "..") for part in name.split("/")):
        fail(name, "path traversal or empty component in member name")


def _open_zip(fh: IO[bytes], member: str | None, fail: _Fail) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error) as exc:
        fail(member, f"corrupt or truncated zip ({_exc_line(exc)})")


def _check_layout(
    zf: zipfile.ZipFile, fh: IO[bytes], budget: int, methods: frozenset[int], fail: _Fail
) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """Validate the directory and byte layout; return (root folder, relative name -> ZipInfo)."""
    infos = zf.infolist()
    if not infos:
        fail(None, "empty zip archive")
    if len(infos) > _MAX_MEMBERS:
        fail(None, f"too many members ({len(infos)})")
    if zf.comment:
        fail(None, "zip comment or trailing data after the archive")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        _check_name(name, fail)
        if name in seen:
            fail(name, "duplicate member name")
        seen.add(name)
        if info.flag_bits & 0x1:
            fail(name, "encrypted member")
        if info.compress_type not in methods:
            fail(name, f"unsupported compression method {info.compress_type}")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            fail(name, "stored member with mismatching sizes")
        ratio_cap = _MAX_DEFLATE_RATIO * max(info.compress_size, 1)
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(_CHUNK, ratio_cap):
            fail(name, f"compression ratio above {_MAX_DEFLATE_RATIO}:1 (zip bomb)")
        total += info.file_size
    if total > budget:
        fail(None, f"uncompressed size {total} bytes is over the limit of {budget} bytes")

    # Members must tile the file from offset 0 to the central directory: no gaps, no overlap,
    # nothing hidden that another zip reader (torch uses miniz) might see differently.
    ordered = sorted(infos, key=lambda i: i.header_offset)
    if ordered[0].header_offset != 0:
        fail(ordered[0].filename, "unexpected bytes before the first member")
    for idx, info in enumerate(ordered):
        fh.seek(info.header_offset)
        raw = fh.read(_LOCAL_HEADER.size)
        if len(raw) != _LOCAL_HEADER.size:
            fail(info.filename, "truncated local header")
        sig, _v, flags, method, _t, _d, _c, _cs, _us, nlen, elen = _LOCAL_HEADER.unpack(raw)
        if sig != b"PK\x03\x04" or method != info.compress_type:
            fail(info.filename, "local header does not match the central directory")
        data_end = info.header_offset + _LOCAL_HEADER.size + nlen + elen + info.compress_size
        nxt = ordered[idx + 1].header_offset if idx + 1 < len(ordered) else zf.start_dir
        gap = nxt - data_end
        if gap < 0:
            fail(info.filename, "overlapping members")
        if gap not in (_DESCRIPTOR_GAPS if flags & 0x8 else {0}):
            fail(info.filename, "unexpected bytes after member")

    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or any("/" not in info.filename for info in infos):
        fail(None, "not a .pt2 archive: members are not all inside one root folder")
    root = roots.pop()
    return root, {info.filename[len(root) + 1 :]: info for info in infos}


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, keep: bool, fail: _Fail) -> bytes:
    """Stream a member (zipfile checks its CRC at the end); return its bytes if ``keep``."""
    chunks: list[bytes] = []
    size = 0
    try:
        with zf.open(info) as stream:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > info.file_size:
                    fail(info.filename, "member is larger than declared")
                if keep:
                    chunks.append(chunk)
    except UnsafeArchiveError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, struct.error) as exc:
        fail(info.filename, f"corrupt member ({_exc_line(exc)})")
    if size != info.file_size:
        fail(info.filename, "member is shorter than declared (truncated)")
    return b"".join(chunks)


# ----------------------------------------------------------------------------- member allowlist

_M = r"[A-Za-z0-9_-]+"
_ALLOWED = [
    (re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"), "meta"),
    (re.compile(rf"models/({_M})\.json"), "program"),
    (re.compile(r"data/weights/weight_\d+"), "payload"),
    (re.compile(rf"data/weights/({_M})_weights_config\.json"), "weights_config"),
    (re.compile(r"data/constants/tensor_\d+"), "payload"),
    (re.compile(rf"data/constants/({_M})_constants_config\.json"), "constants_config"),
    (re.compile(rf"data/sample_inputs/({_M})\.pt"), "sample_inputs"),
    (re.compile(r"extra/.+"), "extra"),
]
_REFUSED = [
    (
        re.compile(r"data/aotinductor/.*"),
        "AOTInductor compiled artifact (torch would load native code from it)",
    ),
    (
        re.compile(r"data/constants/(custom_obj|opaque_obj)_.*"),
        "custom object constant (torchbind/opaque); torch unpickles it with no restriction",
    ),
    (
        re.compile(r"data/(weights|constants)/[^/]+\.pt"),
        "legacy pickled state file; torch falls back to weights_only=False on it",
    ),
]
_META_VALUES = {
    "archive_format": re.compile(rb"pt2"),
    "archive_version": re.compile(rb"0"),
    "byteorder": re.compile(rb"little|big"),
    ".data/version": re.compile(rb"\d{1,4}\n?"),
    ".data/serialization_id": re.compile(rb"[0-9A-Za-z]{0,64}"),
}


def _classify(rel: str) -> tuple[str, str] | None:
    for pattern, kind in _ALLOWED:
        match = pattern.fullmatch(rel)
        if match:
            return kind, (match.group(1) if match.groups() else "")
    return None


# ----------------------------------------------------------------------------- payload configs

_FQN_RE = re.compile(r"[A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _vet_payload_config(
    blob: bytes, cfg_name: str, folder: str, kind: str, rels: dict[str, Any], root: str, fail: _Fail
) -> None:
    try:
        doc = json.loads(blob)
    except (ValueError, RecursionError) as exc:
        fail(cfg_name, f"{kind} config is not valid JSON ({_exc_line(exc)})")
    entries = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        fail(cfg_name, f"{kind} config has no 'config' mapping")
    file_re = re.compile(r"weight_\d+" if kind == "weights" else r"tensor_\d+")
    for fqn, meta in entries.items():
        if not _FQN_RE.fullmatch(fqn):
            fail(cfg_name, f"{kind} entry name {fqn!r} is not a plain dotted name")
        path_name = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(path_name, str):
            fail(cfg_name, f"{kind} entry {fqn!r} has no path_name")
        target = f"{root}/{folder}{path_name}"
        if kind == "constants" and path_name.startswith(("custom_obj_", "opaque_obj_")):
            fail(target, "custom object constant (torchbind/opaque); only plain tensors are accepted")
        if not file_re.fullmatch(path_name):
            fail(cfg_name, f"{kind} entry {fqn!r} points to {path_name!r}, not a plain tensor file")
        if meta.get("use_pickle") is not False:
            fail(target, f"{kind} config asks for pickle (use_pickle)")
        if not isinstance(meta.get("tensor_meta"), dict):
            fail(cfg_name, f"{kind} entry {fqn!r} has no tensor_meta")
        if f"{folder}{path_name}" not in rels:
            fail(cfg_name, f"{kind} entry {fqn!r} points to missing member {path_name}")


# ----------------------------------------------------------------------------- program JSON

_SYMPY_NAMES = frozenset(
    """Symbol Dummy Integer Float Rational Add Mul Pow Mod Max Min Abs floor ceiling sqrt Eq Ne Lt Le
    Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan GreaterThan And Or Not Xor ITE
    Piecewise ExprCondPair true false oo zoo nan Infinity NegativeInfinity NaN Zero One NegativeOne Half
    BooleanTrue BooleanFalse int_oo IntInfinity NegativeIntInfinity FloorDiv ModularIndexing Where
    PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv
    IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat
    Identity""".split()
)
_SYMBOL_RE = re.compile(r"[a-z]{1,4}\d+")
_FLOAT_TEXT_RE = re.compile(r"-?\d+(\.\d*)?([eE][-+]?\d+)?")
_KEYWORD_RE = re.compile(r"[a-z][a-z_]*")
_OPS = (ast.Expression, ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)
_ARITH = (ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp)


def _sym_expr_ok(text: str) -> bool:
    """True if ``text`` is arithmetic over sympy constructors and symbols (safe for sympify)."""
    if len(text) > _MAX_EXPR_CHARS:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    text_args: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                if node.func.id in ("Symbol", "Dummy") and _IDENT_RE.fullmatch(first.value):
                    text_args.add(id(first))
                elif node.func.id == "Float" and _FLOAT_TEXT_RE.fullmatch(first.value):
                    text_args.add(id(first))
    for node in ast.walk(tree):
        if isinstance(node, _OPS + _ARITH):
            continue
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                return False
        elif isinstance(node, ast.keyword):
            ok_value = isinstance(node.value, ast.Constant) and type(node.value.value) in (bool, int)
            if node.arg is None or not _KEYWORD_RE.fullmatch(node.arg) or not ok_value:
                return False
        elif isinstance(node, ast.Name):
            if node.id not in _SYMPY_NAMES and not _SYMBOL_RE.fullmatch(node.id):
                return False
        elif isinstance(node, ast.Constant):
            value = node.value
            if not (value is None or type(value) in (bool, int, float) or id(node) in text_args):
                return False
        else:
            return False
    return True


_GUARD_CALLS = frozenset({"max", "min", "abs", "int", "float", "bool", "round"})
_GUARD_MATH = frozenset({"floor", "ceil", "trunc", "sqrt", "isnan", "isinf", "isfinite", "inf", "nan", "pi"})
_GUARD_TORCH = frozenset(
    {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum"}
)
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_SAFE_TEXT_RE = re.compile(r"[A-Za-z0-9_.:\- ]{0,200}")
_GUARD_STR_RE = re.compile(r"[A-Za-z0-9_]{0,200}")


def _guard_ok(text: str) -> bool:
    """True if a ``guards_code`` entry is a plain shape check over ``L[...]`` inputs."""
    if len(text) > _MAX_EXPR_CHARS or any(ch in text for ch in '"\\') or not text.isprintable():
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False

    def source(node: ast.AST) -> bool:  # L['x'], L['x'][0], L['x'].attr, L['x'].size()
        if isinstance(node, ast.Name):
            return node.id == "L"
        if isinstance(node, ast.Subscript):
            return source(node.value) and ok(node.slice)
        if isinstance(node, ast.Attribute):
            return not node.attr.startswith("_") and source(node.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            no_args = not node.args and not node.keywords
            return no_args and node.func.attr in _GUARD_METHODS and source(node.func.value)
        return False

    def namespaced(node: ast.AST) -> bool:  # math.floor, torch.sym_max
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            return False
        allowed = {"math": _GUARD_MATH, "torch": _GUARD_TORCH}.get(node.value.id, frozenset())
        return node.attr in allowed

    def ok(node: ast.AST) -> bool:
        if isinstance(node, ast.Expression):
            return ok(node.body)
        if isinstance(node, ast.Constant):
            value = node.value
            return (
                value is None
                or type(value) in (bool, int, float)
                or (isinstance(value, str) and bool(_GUARD_STR_RE.fullmatch(value)))
            )
        if isinstance(node, ast.Name):
            return node.id == "inf"
        if isinstance(node, ast.BinOp):
            return ok(node.left) and ok(node.right)
        if isinstance(node, ast.UnaryOp):
            return ok(node.operand)
        if isinstance(node, ast.BoolOp):
            return all(ok(v) for v in node.values)
        if isinstance(node, ast.Compare):
            return ok(node.left) and all(ok(c) for c in node.comparators)
        if isinstance(node, ast.Tuple):
            return all(ok(e) for e in node.elts)
        if isinstance(node, ast.Call) and not node.keywords:
            plain = isinstance(node.func, ast.Name) and node.func.id in _GUARD_CALLS
            if plain or namespaced(node.func):
                return all(ok(a) for a in node.args)
        if namespaced(node):
            return True
        return source(node)

    return ok(tree)


_TARGET_RE = re.compile(r"torch\.ops\.(aten|prims|higher_order)(\.[A-Za-z_][A-Za-z0-9_]*){1,2}")
_PLAIN_TARGETS = frozenset(
    [
        f"_operator.{n}"
        for n in "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge".split()
    ]
    + [f"_operator.{n}" for n in "and_ or_ xor not_ invert lshift rshift matmul".split()]
    + [f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")]
    + [f"torch.{n}" for n in sorted(_GUARD_TORCH)]
    + [
        "torch._C._set_grad_enabled",
        "torch.autograd.grad_mode.set_grad_enabled",
        "torch.amp.autocast_mode._enter_autocast",
        "torch.amp.autocast_mode._exit_autocast",
        "torch.fx.experimental.symbolic_shapes.cast_symbool_to_symint_guardless",
    ]
)
_NAME_KEYS = frozenset(
    {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "user_input_name", "fqn"}
)
_SAFE_FACTORIES = frozenset({"list", "dict", "int", "float", "str", "set", "tuple"})


def _vet_treespec(text: str, member: str, fail: _Fail) -> None:
    try:
        stack: list[Any] = [json.loads(text)]
    except (ValueError, RecursionError) as exc:
        fail(member, f"tree spec is not valid JSON ({_exc_line(exc)})")
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "__enum__" in value:
                fail(member, "tree spec names an enum class (torch would import its module)")
            if "default_factory_module" in value and (
                value.get("default_factory_module") != "builtins"
                or value.get("default_factory_name") not in _SAFE_FACTORIES
            ):
                fail(member, "tree spec names a defaultdict factory (torch would import its module)")
            for key, item in value.items():
                if key == "context" and isinstance(item, str):
                    try:
                        item = json.loads(item)
                    except (ValueError, RecursionError):
                        pass
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and not _SAFE_TEXT_RE.fullmatch(value):
            fail(member, f"tree spec text {value!r} is not a plain name")


def _vet_program_json(blob: bytes, member: str, fail: _Fail) -> None:
    try:
        doc = json.loads(blob)
    except (ValueError, RecursionError) as exc:
        fail(member, f"not valid JSON ({_exc_line(exc)})")
    gm = doc.get("graph_module") if isinstance(doc, dict) else None
    if not isinstance(gm, dict) or not isinstance(gm.get("graph"), dict):
        fail(member, "not a serialized ExportedProgram")
    guards = doc.get("guards_code") or []
    if not isinstance(guards, list):
        fail(member, "guards_code is not a list")
    for guard in guards:
        if not isinstance(guard, str) or not _guard_ok(guard):
            fail(member, f"guard {guard!r} is not a plain shape check (torch exec()s guards_code)")
    for inp in gm["graph"].get("inputs") or []:
        text = inp.get("as_string") if isinstance(inp, dict) else None
        if text is not None and not (isinstance(text, str) and _SAFE_TEXT_RE.fullmatch(text)):
            fail(member, f"graph input string {text!r} would be pasted into generated guard code")

    stack: list[Any] = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
            continue
        if not isinstance(value, dict):
            continue
        for key, item in value.items():
            if key == "expr_str":
                if not isinstance(item, str) or not _sym_expr_ok(item):
                    fail(
                        member, f"symbolic expression {item!r} is not plain arithmetic (torch sympify()s it)"
                    )
            elif key in ("target", "as_operator") and isinstance(item, str):
                if not (_TARGET_RE.fullmatch(item) or item in _PLAIN_TARGETS):
                    fail(member, f"operator {item!r} is not an ATen, higher-order or symbolic op")
            elif key in ("in_spec", "out_spec") and isinstance(item, str):
                _vet_treespec(item, member, fail)
            elif key in _NAME_KEYS or key == "class_fqn":
                if not (isinstance(item, str) and _FQN_RE.fullmatch(item)):
                    fail(member, f"{key} {item!r} is not a plain dotted name")
            elif key == "forward_arg_names" and item is not None:
                names_ok = isinstance(item, list) and all(isinstance(n, str) for n in item)
                if not names_ok or not all(_IDENT_RE.fullmatch(n) for n in item):
                    fail(member, f"forward_arg_names {item!r} are not identifiers")
            stack.append(item)


# ----------------------------------------------------------------------------- sample inputs

_NESTED_ALLOWED = re.compile(
    r"data\.pkl|data/\d+|byteorder|version|\.data/version|\.format_version|\.storage_alignment"
    r"|\.data/serialization_id"
)
_SAFE_GLOBALS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),
        ("torch", "Size"),
        ("torch", "device"),
    }
)
_TORCH_SAFE_NAMES = frozenset(
    name
    for name, value in vars(torch).items()
    if isinstance(value, torch.dtype) or (isinstance(value, type) and name.endswith("Storage"))
)
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_FORBIDDEN_OPS = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4"})


def _scan_pickle(data: bytes, fail: _Fail) -> None:
    """Statically check every global a pickle imports (nothing is executed)."""
    memo: dict[int, str | None] = {}
    recent: list[str | None] = []  # values pushed by the last stack-changing opcodes
    arg: Any  # an opcode's argument, of the type its opcode says (int for BINPUT, str for PUT and GLOBAL, ...)
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _FORBIDDEN_OPS:
                fail("data.pkl", f"pickle opcode {name} is not allowed")
            if name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, _, attr = str(arg).partition(" ")
                elif len(recent) == 2 and recent[0] is not None and recent[1] is not None:
                    module, attr = recent[0], recent[1]
                else:
                    fail("data.pkl", "pickle imports a global it builds at run time")
                safe = (module, attr) in _SAFE_GLOBALS or (module == "torch" and attr in _TORCH_SAFE_NAMES)
                if not safe:
                    fail(
                        "data.pkl", f"pickle imports {_one_line(module)}.{_one_line(attr)}; not weights-only"
                    )
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
            elif name in ("FRAME", "PROTO"):
                pass
            else:
                if name in _STRING_OPS:
                    pushed: str | None = str(arg)
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed = memo.get(int(arg))
                else:
                    pushed = None
                recent = [*recent, pushed][-2:]
    except UnsafeArchiveError:
        raise
    except (ValueError, TypeError, KeyError, EOFError, struct.error) as exc:
        fail("data.pkl", f"malformed pickle ({_exc_line(exc)})")


def _check_sample_structure(obj: object, fail: _Fail) -> None:
    if not (isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], tuple) and type(obj[1]) is dict):
        fail(None, "sample inputs are not an (args, kwargs) pair")
    stack: list[tuple[object, int]] = [(obj, 0)]
    count = 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > 100_000 or depth > 64:
            fail(None, "sample inputs are nested too deeply or too large")
        kind = type(value)  # exact types, not subclasses: mypy does not narrow `value` by `kind`, hence the ignores
        if kind in (tuple, list):
            stack.extend((v, depth + 1) for v in value)  # type: ignore[attr-defined]
        elif kind in (dict, OrderedDict):
            for key, item in value.items():  # type: ignore[attr-defined]
                if not ((type(key) is str and _IDENT_RE.fullmatch(key)) or type(key) is int):
                    fail(None, f"sample-input key {key!r} is not an identifier (torch pastes keys into code)")
                stack.append((item, depth + 1))
        elif kind is str:
            if not _SAFE_TEXT_RE.fullmatch(value):  # type: ignore[call-overload]
                fail(None, f"sample-input string {value!r} is not plain text")
        elif not (value is None or kind in (bool, int, float, torch.Tensor, torch.nn.Parameter)):
            fail(None, f"sample inputs contain a {kind.__name__}")


def _vet_sample_inputs(blob: bytes, member: str, path: str) -> None:
    def fail(entry: str | None, reason: str) -> NoReturn:
        raise UnsafeArchiveError(member, reason if entry is None else f"{reason} (entry {entry})", path)

    if not blob:
        return  # torch.export.save writes an empty member when there are no example inputs
    if blob[:4] != b"PK\x03\x04":
        fail(None, "sample inputs are not a torch.save zip archive")
    buffer = io.BytesIO(blob)
    with _open_zip(buffer, None, fail) as zf:
        _root, rels = _check_layout(zf, buffer, len(blob), frozenset({zipfile.ZIP_STORED}), fail)
        for rel in rels:
            if rel == "constants.pkl" or rel.startswith("code/"):
                fail(rel, "TorchScript archive in sample inputs")
            if not _NESTED_ALLOWED.fullmatch(rel):
                fail(rel, "unexpected entry in torch.save archive")
        if "data.pkl" not in rels:
            fail(None, "torch.save archive without data.pkl")
        pickle_bytes = b""
        for rel, info in rels.items():
            data = _read_member(zf, info, rel == "data.pkl", fail)
            if rel == "data.pkl":
                pickle_bytes = data
    _scan_pickle(pickle_bytes, fail)
    try:
        obj = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception as exc:
        fail(None, f"sample inputs do not load weights-only ({_exc_line(exc)})")
    _check_sample_structure(obj, fail)


# ----------------------------------------------------------------------------- entry points


def _vet_open_file(fh: IO[bytes], path: str, max_uncompressed_bytes: int) -> None:
    def fail(member: str | None, reason: str) -> NoReturn:
        raise UnsafeArchiveError(member, reason, path)

    size = os.fstat(fh.fileno()).st_size
    if size == 0:
        fail(None, "empty file")
    head = fh.read(4)
    fh.seek(0)
    if head == b"PK\x05\x06":
        fail(None, "empty zip archive; not a .pt2")
    if head != b"PK\x03\x04":
        fail(None, "not a zip archive")
    with _open_zip(fh, None, fail) as zf:
        methods = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
        root, rels = _check_layout(zf, fh, max_uncompressed_bytes, methods, fail)
        if "archive_format" not in rels or not any(_classify(r) == ("program", "model") for r in rels):
            fail(None, "not a .pt2 archive (no archive_format or models/model.json)")
        kinds: dict[str, tuple[str, str]] = {}
        for rel in rels:
            full = f"{root}/{rel}"
            for pattern, reason in _REFUSED:
                if pattern.fullmatch(rel):
                    fail(full, reason)
            classified = _classify(rel)
            if classified is None:
                fail(full, "not a member torch.export.save writes")
            kinds[rel] = classified
        for rel in _META_VALUES:
            if rel not in rels:
                fail(None, f"not a .pt2 archive (missing {root}/{rel})")
        for model in sorted(m for k, m in kinds.values() if k == "program"):
            for needed in (
                f"data/weights/{model}_weights_config.json",
                f"data/constants/{model}_constants_config.json",
                f"data/sample_inputs/{model}.pt",
            ):
                if needed not in rels:
                    fail(None, f"incomplete .pt2 (missing {root}/{needed})")

        kept: dict[str, bytes] = {}
        for rel, info in sorted(rels.items(), key=lambda item: item[1].header_offset):
            kind = kinds[rel][0]
            if kind == "meta" and info.file_size > _MAX_META_BYTES:
                fail(info.filename, "metadata member is too large")
            data = _read_member(zf, info, kind != "payload", fail)
            if kind != "payload":
                kept[rel] = data

    for rel, expected in _META_VALUES.items():
        if not expected.fullmatch(kept[rel]):
            fail(f"{root}/{rel}", f"unexpected value {kept[rel][:_MAX_META_BYTES]!r}")
    for rel, (kind, _model) in kinds.items():
        full = f"{root}/{rel}"
        if kind == "extra":
            try:
                kept[rel].decode("utf-8")
            except UnicodeDecodeError:
                fail(full, "extra file is not UTF-8 text")
        elif kind == "weights_config":
            _vet_payload_config(kept[rel], full, "data/weights/", "weights", rels, root, fail)
        elif kind == "constants_config":
            _vet_payload_config(kept[rel], full, "data/constants/", "constants", rels, root, fail)
        elif kind == "program":
            _vet_program_json(kept[rel], full, fail)
    for rel, (kind, _model) in kinds.items():
        if kind == "sample_inputs":
            _vet_sample_inputs(kept[rel], f"{root}/{rel}", path)


def _open_regular(path: str) -> IO[bytes]:
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise UnsafeArchiveError(None, f"cannot open file ({exc.strerror})", path) from None
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
        fh.close()
        raise UnsafeArchiveError(None, "not a regular file", path)
    return fh


def vet_archive(
    path: str | os.PathLike[str], max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES
) -> None:
    """Raise :class:`UnsafeArchiveError` unless ``path`` is a ``.pt2`` that torch can load without running
    archive-supplied code. Nothing in the file is deserialized except sample inputs (weights-only)."""
    spath = os.fspath(path)
    with _open_regular(spath) as fh:
        _vet_open_file(fh, spath, max_uncompressed_bytes)


class _CaptureErrors(logging.Handler):
    """Keeps the exception torch.export.load logs before it retries the legacy format."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def load_program(
    path: str | os.PathLike[str], max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES
) -> torch.export.ExportedProgram:
    """Vet ``path`` and load it with ``torch.export.load`` from the same open file.

    Raises :class:`UnsafeArchiveError` (refused) or :class:`ArchiveLoadError` (torch failed)."""
    spath = os.fspath(path)
    with _open_regular(spath) as fh:
        _vet_open_file(fh, spath, max_uncompressed_bytes)
        fh.seek(0)
        capture = _CaptureErrors()
        export_log = logging.getLogger("torch.export")
        export_log.addHandler(capture)
        try:
            program = torch.export.load(fh)
        except Exception as exc:
            cause = capture.errors[0] if capture.errors else exc
            raise ArchiveLoadError(spath, _exc_line(cause)) from exc
        finally:
            export_log.removeHandler(capture)
    if not isinstance(program, torch.export.ExportedProgram):
        raise ArchiveLoadError(spath, f"torch returned {type(program).__name__}, not an ExportedProgram")
    return program
