"""One vocabulary of reasons (`prunery.service.store.reasons.Reason`): every reason the API answers with and every
reason a FAILED job carries is named from the catalog, never written as a string where it is raised, so a client
branching on one finds it documented there."""

from __future__ import annotations

import ast
from pathlib import Path

from prunery.service.api import errors
from prunery.service.store.reasons import Reason

ROOT = Path(__file__).resolve().parents[2]
# calls whose argument at this position (or keyword) is a reason
REASON_ARGS = {"JobFailure": (1, "reason"), "ApiError": (2, "reason"), "fail": (3, "reason"), "outage": (0, "reason"),
               "invalid": (2, "reason"), "_set_error": (2, "reason")}


def _calls(folder: str) -> list[tuple[str, int, ast.expr]]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in REASON_ARGS:
                continue
            position, keyword = REASON_ARGS[name]
            args = [k.value for k in node.keywords if k.arg == keyword]
            if not args and len(node.args) > position:
                args = [node.args[position]]
            found += [(f"{path.relative_to(ROOT)}:{node.lineno}", node.lineno, a) for a in args]
    return found


def test_every_reason_raised_comes_from_the_catalog() -> None:
    calls = _calls("worker") + _calls("service")
    assert len(calls) > 30  # the scan finds the raising sites
    literal = [where for where, _, arg in calls if isinstance(arg, ast.Constant)]
    assert not literal, f"reasons written as strings (name them from Reason): {literal}"
    unknown = [where for where, _, arg in calls if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name)
               and arg.value.id == "Reason" and not hasattr(Reason, arg.attr)]
    assert not unknown, unknown


def test_the_catalog_is_one_vocabulary() -> None:
    values = {name: value for name, value in vars(Reason).items() if name.isupper()}
    assert all(name == value for name, value in values.items())  # a reason is its own name
    assert errors.Reason is Reason  # the API's errors use the shared catalog
    assert {"MODEL_REFUSED", "PRUNE_FAILED", "JOB_TIMEOUT", "TOO_MANY_ATTEMPTS", "TENANT_RATE_LIMIT"} <= set(values)
