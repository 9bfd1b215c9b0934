"""The service database: SQLAlchemy 2 typed ORM models, engine and session helpers, migrations, API tokens.

One schema for Postgres (production, tests) and SQLite (the embedded default). The schema is changed only
through Alembic revisions in `migrations/` (shipped as the `prunery.migrations` package, so `upgrade(url)`
works from an installed wheel too); a test checks that these models and the migrated schema agree.

Job rows change state only through `prunery.service.store.jobs`. Time columns are timezone-aware UTC in Python
(stored as `timestamptz` on Postgres and as naive UTC text on SQLite).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import uuid
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from .config import DEFAULT_QUEUE

SQLITE_BUSY_TIMEOUT_S = 30.0

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone: store naive UTC, read back as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use timezone-aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobState(StrEnum):
    """Stored by name; the names match the `prunery.v1.JobState` enum."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


class ArtifactState(StrEnum):
    """PENDING while its bytes are being stored; only READY artifacts are visible to clients."""

    PENDING = "PENDING"
    READY = "READY"


class ArtifactKind(StrEnum):
    """Names match the `prunery.v1.ArtifactKind` enum."""

    MODEL = "MODEL"
    DATASET = "DATASET"
    REPORT = "REPORT"


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        uuid.UUID: Uuid(),
        dict[str, Any]: JSON(),
        dict[str, str]: JSON(),
        list[str]: JSON(),
    }


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    create_time: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token of a tenant. Only the token's sha256 is stored; the token itself is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    create_time: Mapped[datetime] = mapped_column(default=utcnow)
    revoke_time: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "request_id"),  # NULL request ids never collide
        CheckConstraint(_in("state", JobState), name="state"),
        Index(None, "tenant_id", "create_time", "id"),  # listing, newest first
        Index(None, "state", "lease_expires_at"),  # finding expired leases
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    labels: Mapped[dict[str, str]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    progress: Mapped[float] = mapped_column(Double(), default=0.0)
    stage: Mapped[str] = mapped_column(String(32), default="")
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error_code: Mapped[int | None] = mapped_column(Integer, default=None)  # google.rpc.Code
    error_reason: Mapped[str | None] = mapped_column(String(128), default=None)  # google.rpc.ErrorInfo.reason
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    result_artifact_ids: Mapped[list[str]] = mapped_column(default=list)  # the pruned model, then the report
    report: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    create_time: Mapped[datetime] = mapped_column(default=utcnow)
    start_time: Mapped[datetime | None] = mapped_column(default=None)
    end_time: Mapped[datetime | None] = mapped_column(default=None)
    update_time: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    event_sequence: Mapped[int] = mapped_column(Integer, default=0)  # sequence of the job's last event
    # the Celery queue (worker pool, e.g. a GPU class) the job is sent to; the reaper resends it there
    queue: Mapped[str] = mapped_column(String(64), default=DEFAULT_QUEUE, server_default=DEFAULT_QUEUE)
    # when the job's message was last sent to that queue (at creation, on a requeue, on a resend, on a deferred
    # claim): the reaper looks for a lost message only once this is older than PRUNERY_RESEND_QUEUED_S
    last_sent_at: Mapped[datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    """One row per state transition or progress update; `sequence` counts 1, 2, ... per job."""

    __tablename__ = "job_events"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Double(), default=0.0)
    stage: Mapped[str] = mapped_column(String(32), default="")
    message: Mapped[str] = mapped_column(Text, default="")


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (
        CheckConstraint(_in("kind", ArtifactKind), name="kind"),
        CheckConstraint(_in("state", ArtifactState), name="state"),
        Index(None, "tenant_id", "create_time", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    display_name: Mapped[str] = mapped_column(String(512), default="")
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=ArtifactState.PENDING.value)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    labels: Mapped[dict[str, str]] = mapped_column(default=dict)
    storage_key: Mapped[str] = mapped_column(String(1024))
    producer_job_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), default=None, index=True)
    create_time: Mapped[datetime] = mapped_column(default=utcnow)


# ---------------------------------------------------------------------------------------------------------
# Engines and sessions
# ---------------------------------------------------------------------------------------------------------

def normalize_url(url: str) -> str:
    """A plain path means SQLite; `postgresql://` means the psycopg 3 driver (the one we install)."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `postgresql+psycopg://...` or `sqlite:///path` (or a plain path).

    SQLite is made safe for several processes (API and workers on one file): WAL journal, a busy timeout,
    foreign keys on, and every transaction opened with BEGIN IMMEDIATE, so writers queue on the database
    lock up front instead of failing when a read transaction tries to upgrade to a write.
    """
    u = make_url(normalize_url(url))
    if u.get_backend_name() == "sqlite":
        memory = u.database in (None, "", ":memory:")
        if not memory and u.database:
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        if memory:
            kwargs.setdefault("poolclass", StaticPool)
        engine = create_engine(u, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                               **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
            cursor = dbapi_connection.cursor()
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        kwargs.setdefault("pool_pre_ping", True)
        engine = create_engine(u, **kwargs)
    _dispose_in_forked_children(engine)
    return engine


def _dispose_in_forked_children(engine: Engine) -> None:
    """A forked child (a Celery worker process) must not reuse its parent's pooled connections."""
    ref = weakref.ref(engine)

    def _after_fork() -> None:
        e = ref()
        if e is not None:
            e.dispose(close=False)

    os.register_at_fork(after_in_child=_after_fork)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit when the block ends normally, roll back on an exception."""
    with factory.begin() as session:
        yield session


class Database:
    """An engine and its session factory: `with db.session() as s: ...` is one committed transaction."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        self.sessions = session_factory(self.engine)

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.sessions)

    def dispose(self) -> None:
        self.engine.dispose()


# ---------------------------------------------------------------------------------------------------------
# Migrations
# ---------------------------------------------------------------------------------------------------------

def migrations_dir() -> Path:
    return Path(str(resources.files("prunery.migrations")))


def alembic_config(url: str | None = None) -> Any:
    """An Alembic Config for our migrations, without alembic.ini (works from an installed package)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        cfg.attributes["url"] = normalize_url(url)
    return cfg


def _run_alembic(url: str, fn_name: str, revision: str) -> None:
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = connection
            getattr(command, fn_name)(cfg, revision)
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (an empty database gets the whole schema)."""
    _run_alembic(url, "upgrade", revision)


def downgrade(url: str, revision: str = "base") -> None:
    _run_alembic(url, "downgrade", revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------------
# Tenants and API tokens
# ---------------------------------------------------------------------------------------------------------

TENANT_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # the whole id (fullmatch: `$` would allow a newline)
TOKEN_PREFIX = "prn_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_tenant_id(tenant_id: str) -> None:
    """ValueError unless `tenant_id` is 1-64 of a-z 0-9 . _ - starting alphanumeric."""
    if not TENANT_ID_RE.fullmatch(tenant_id):
        raise ValueError(f"invalid tenant id {tenant_id[:80]!r}: use 1-64 of a-z 0-9 . _ - (starting alphanumeric)")


def ensure_tenant(session: Session, tenant_id: str) -> Tenant:
    check_tenant_id(tenant_id)
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        try:
            with session.begin_nested():  # a concurrent creator may win the insert: then use its row
                tenant = Tenant(id=tenant_id, create_time=utcnow())
                session.add(tenant)
        except IntegrityError:
            tenant = session.get(Tenant, tenant_id, populate_existing=True)
            if tenant is None:
                raise
    return tenant


def create_token(session: Session, tenant_id: str, description: str = "") -> tuple[ApiToken, str]:
    """Create a bearer token for `tenant_id` (creating the tenant if needed); return the row and the token.

    The token is returned once and never stored: the row keeps its sha256 only.
    """
    ensure_tenant(session, tenant_id)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(id=uuid.uuid4(), tenant_id=tenant_id, token_sha256=hash_token(token),
                   description=description[:200], create_time=utcnow())
    session.add(row)
    session.flush()
    return row, token


def authenticate(session: Session, token: str) -> str | None:
    """The tenant id of a valid, unrevoked token, else None."""
    if not token:
        return None
    return session.scalar(select(ApiToken.tenant_id).where(ApiToken.token_sha256 == hash_token(token),
                                                           ApiToken.revoke_time.is_(None)))


def revoke_token(session: Session, token_or_id: str) -> bool:
    """Revoke a token given the token itself or its id; False when no such unrevoked token exists."""
    cond = ApiToken.token_sha256 == hash_token(token_or_id)
    try:
        cond = cond | (ApiToken.id == uuid.UUID(token_or_id))
    except ValueError:
        pass
    row = session.scalars(select(ApiToken).where(cond, ApiToken.revoke_time.is_(None))).first()
    if row is None:
        return False
    row.revoke_time = utcnow()
    session.flush()
    return True
