"""The API's request vocabulary: resource names (`artifacts/{uuid}`, `jobs/{uuid}`, matched whole), labels, list
filters and page tokens, and the bounds every request is held to (each refusal quotes at most a short prefix of
the input: `errors.quote`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_
from sqlalchemy.engine import Connection

from prunery.v1 import prunery_pb2 as pb

from ..store.db import (
    Artifact,
    Job,
)
from . import errors
from .errors import ApiError, Reason, Violation, quote

__all__ = ["ARTIFACT_NAME_RE", "JOB_NAME_RE", "JOB_RESULT_RE", "SHA256_RE", "artifact_name", "job_name",
           "label_violations", "page", "parse_artifact_name", "parse_filter", "parse_job_name", "parse_name"]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_DISPLAY_NAME = 512
MAX_IGNORE = 1000
MAX_REQUEST_ID = 128
UPLOAD_KINDS = (pb.MODEL, pb.DATASET)

MAX_FILTER = 4096
MAX_QUEUE_NAME = 128

# whole-string patterns: always used with fullmatch (`$` would accept a trailing newline)
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
ARTIFACT_NAME_RE = re.compile(rf"artifacts/({_UUID})")
JOB_NAME_RE = re.compile(rf"jobs/({_UUID})")
JOB_RESULT_RE = re.compile(rf"jobs/({_UUID})/(model|report)")
LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")





def artifact_name(artifact_id: uuid.UUID | str) -> str:
    return f"artifacts/{artifact_id}"


def job_name(job_id: uuid.UUID | str) -> str:
    return f"jobs/{job_id}"


def parse_name(pattern: re.Pattern[str], name: str, field: str, example: str) -> uuid.UUID:
    m = pattern.fullmatch(name or "")
    if m is None:
        raise errors.invalid([(field, f"must be a resource name like {example!r}, got {quote(name)}")],
                             reason=Reason.INVALID_NAME)
    return uuid.UUID(m.group(1))


def parse_artifact_name(name: str, field: str = "name") -> uuid.UUID:
    return parse_name(ARTIFACT_NAME_RE, name, field, "artifacts/{uuid}")


def parse_job_name(name: str, field: str = "name") -> uuid.UUID:
    return parse_name(JOB_NAME_RE, name, field, "jobs/{uuid}")


def label_violations(labels: Mapping[str, str], field: str) -> list[Violation]:
    if len(labels) > MAX_LABELS:
        return [(field, f"at most {MAX_LABELS} labels; got {len(labels)}")]
    out: list[Violation] = []
    for key, value in labels.items():
        if not LABEL_KEY_RE.fullmatch(key):
            out.append((f"{field}[{quote(key, 64)}]", "label keys are 1-63 of A-Z a-z 0-9 _ . - starting "
                                                      "alphanumeric"))
        elif len(value) > MAX_LABEL_VALUE:
            out.append((f"{field}[{quote(key, 64)}]", f"label values are at most {MAX_LABEL_VALUE} characters; "
                                                      f"got {len(value)}"))
    return out


_TERM_RE = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s"]+)\s*')
_AND_RE = re.compile(r"AND\b")


def parse_filter(text: str, allowed: Mapping[str, Iterable[str]]) -> list[tuple[str, str]]:
    """`key=value` terms joined by ` AND `. Keys are those of `allowed` (with their permitted values; an
    empty collection allows any value) or `labels.<key>`. Values may be double-quoted."""
    terms: list[tuple[str, str]] = []
    text = text or ""
    pos = 0
    if not text.strip():
        return terms

    def bad(why: str) -> ApiError:
        keys = ", ".join([*allowed, "labels.<key>"])
        return errors.invalid([("filter", f"{why} (use key=value terms joined by ' AND '; keys: {keys})")],
                              message=f"invalid filter {quote(text)}: {why}", reason=Reason.INVALID_FILTER)

    if len(text) > MAX_FILTER:
        raise bad(f"at most {MAX_FILTER} characters; got {len(text)}")

    while True:
        m = _TERM_RE.match(text, pos)
        if m is None:
            raise bad(f"expected key=value at character {pos}")
        key, value = m.group(1), m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if key.startswith("labels."):
            if not LABEL_KEY_RE.fullmatch(key[len("labels."):]):
                raise bad(f"invalid label key in {quote(key, 80)}")
        elif key in allowed:
            permitted = list(allowed[key])
            if permitted and value not in permitted:
                raise bad(f"unknown {key} {quote(value, 80)}; use one of {', '.join(permitted)}")
        else:
            raise bad(f"unknown key {quote(key, 80)}")
        terms.append((key, value))
        pos = m.end()
        if pos == len(text):
            return terms
        a = _AND_RE.match(text, pos)
        if a is None:
            raise bad(f"expected AND at character {pos}")
        pos = a.end()


def _page_size(requested: int) -> int:
    if requested < 0:
        raise errors.invalid([("page_size", "must not be negative")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _filter_digest(text: str) -> str:
    return hashlib.sha256(text.strip().encode()).hexdigest()[:12]


def _encode_page_token(create_time: datetime, row_id: uuid.UUID, filter_text: str) -> str:
    raw = json.dumps({"t": create_time.isoformat(), "i": str(row_id), "f": _filter_digest(filter_text)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page_token(token: str, filter_text: str) -> tuple[datetime, uuid.UUID] | None:
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        create_time, row_id = datetime.fromisoformat(raw["t"]), uuid.UUID(raw["i"])
        digest = raw["f"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise errors.invalid([("page_token", "not a page token returned by this list call")],
                             reason=Reason.INVALID_PAGE_TOKEN) from None
    if digest != _filter_digest(filter_text):
        raise errors.invalid([("page_token", "the filter changed since this page token was issued")],
                             reason=Reason.INVALID_PAGE_TOKEN)
    return create_time, row_id


def page(conn: Connection, model: type[Artifact] | type[Job], stmt: Any, page_size: int, token: str,
          filter_text: str) -> tuple[list[Any], str]:
    """Keyset pagination, newest first: (rows, next_page_token)."""
    size = _page_size(page_size)
    after = _decode_page_token(token, filter_text)
    if after is not None:
        t, i = after
        stmt = stmt.where(or_(model.create_time < t, and_(model.create_time == t, model.id < i)))
    rows = list(conn.execute(stmt.order_by(model.create_time.desc(), model.id.desc()).limit(size + 1)))
    if len(rows) <= size:
        return rows, ""
    rows = rows[:size]
    return rows, _encode_page_token(rows[-1].create_time, rows[-1].id, filter_text)


