"""Shared fixtures: for the service tests a throwaway Postgres database per module, migrated to head, and a new
tenant per test (in the module's `database`); for the training tests one torch thread per module."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from prunery.service.store import db, testing


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with testing.temporary_postgres_database() as url:
        db.upgrade(url)
        yield url


@pytest.fixture
def tenant(database: db.Database) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    with database.session() as s:
        db.ensure_tenant(s, name)
    return name


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: threads only contend (with each other and with parallel test workers)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
