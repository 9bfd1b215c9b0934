"""Bearer-token authentication and per-tenant admission, wrapped around the servicers' behaviors.

Every call carries `authorization: Bearer <token>` metadata; the interceptor resolves the token to its tenant
(through `db.authenticate`, i.e. by the token's sha256) and makes it the call's `current_tenant()`. A call
with no token, or a token that is unknown or revoked, ends with UNAUTHENTICATED before the servicer runs.
Then the tenant's limits apply (`limits.TenantLimits`): its call rate, and for streaming calls one of its
stream slots, held until the stream ends. Health checking and server reflection need no token and are never
limited.

Valid tokens are cached for `cache_s` seconds (so a revoke takes effect within that time): a cached token
is checked on the event loop; a lookup runs in the blocking pool. A database that is away makes the call
UNAVAILABLE (DATABASE_UNAVAILABLE), never UNKNOWN with the driver's text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from ..store.db import Database, authenticate
from . import errors
from .errors import ApiError, Reason
from .limits import BlockingPool, TenantLimits

__all__ = ["PUBLIC_METHOD_PREFIXES", "Authentication", "Behavior", "TokenAuthenticator", "bearer_token",
           "current_tenant"]

log = logging.getLogger(__name__)

PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_TENANT: ContextVar[str | None] = ContextVar("prunery_tenant", default=None)


def current_tenant() -> str:
    """The tenant of the call being served (set by AuthInterceptor; gRPC runs each call in its own context)."""
    tenant = _TENANT.get()
    if tenant is None:
        raise RuntimeError("no authenticated tenant: is the AuthInterceptor installed?")
    return tenant


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` entry (scheme case-insensitive), else None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class TokenAuthenticator:
    """token -> tenant id (or None), with a short positive cache. The cache is keyed by the token itself
    (the process holds every token it is sent anyway): a hit is one dict read, no hashing, on the event
    loop; only the database lookup hashes it."""

    def __init__(self, database: Database, cache_s: float = 5.0, max_entries: int = 10_000) -> None:
        self.database, self.cache_s, self.max_entries = database, cache_s, max_entries
        self._cache: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()  # for writers; a dict read is atomic

    def cached(self, token: str) -> str | None:
        """The tenant of a token validated within `cache_s`, else None (look it up)."""
        hit = self._cache.get(token)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def __call__(self, token: str) -> str | None:
        """The token's tenant, from the cache or the database (blocking)."""
        hit = self.cached(token)
        if hit is not None:
            return hit
        now = time.monotonic()
        with self.database.session() as s:
            tenant = authenticate(s, token)
        if tenant is not None and self.cache_s > 0:
            with self._lock:
                if len(self._cache) >= self.max_entries:
                    self._cache.clear()
                self._cache[token] = (tenant, now + self.cache_s)
        return tenant

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()


Behavior = Callable[..., Any]


class Authentication:
    """Wraps the behavior of every method but the public ones (`wrap`, applied once when the server registers
    its handlers, so no interceptor runs per call): authenticate, then admit the call under its tenant's
    limits (rate; a stream slot for streaming calls). `pool` runs the token lookups that miss the cache."""

    def __init__(self, authenticator: TokenAuthenticator, pool: BlockingPool, limits: TenantLimits | None = None,
                 public_prefixes: tuple[str, ...] = PUBLIC_METHOD_PREFIXES) -> None:
        self.authenticator, self.pool, self.limits = authenticator, pool, limits
        self.public_prefixes = public_prefixes

    def wrap(self, method: str, behavior: Behavior, response_streaming: bool) -> Behavior:
        """`behavior` of the full method name `method` ("/prunery.v1.JobService/GetJob"), authenticated."""
        if method.startswith(self.public_prefixes):
            return behavior
        return self._wrap(method, behavior, response_streaming)

    async def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            raise errors.unauthenticated("missing credentials: send the metadata 'authorization: Bearer <token>' "
                                         "(create a token with `prunery tokens create`)", Reason.MISSING_TOKEN)
        tenant = self.authenticator.cached(token)
        if tenant is None:
            try:
                tenant = await self.pool.run(self.authenticator, token)
            except ApiError:
                raise
            except Exception as e:
                outage = errors.classify_outage(e)
                if outage is None:
                    raise
                log.warning("token lookup failed: the database is unavailable (%s)", type(e).__name__)
                raise outage from None
        if tenant is None:
            raise errors.unauthenticated("the bearer token is unknown or revoked", Reason.INVALID_TOKEN)
        if self.limits is not None:
            self.limits.admit_call(tenant)
        return tenant

    def _wrap(self, method: str, behavior: Behavior, response_streaming: bool) -> Behavior:
        limits = self.limits
        # long calls: WatchJob, DownloadArtifact (response streams) and UploadArtifact (request stream)
        long_call = response_streaming or method.endswith("/UploadArtifact")

        if not response_streaming:
            async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    tenant = await self._tenant(context)
                except ApiError as e:
                    await errors.abort(context, e)
                _TENANT.set(tenant)
                if not long_call or limits is None:
                    return await behavior(request, context)
                try:
                    limits.acquire_stream(tenant)
                except ApiError as e:
                    await errors.abort(context, e)
                try:
                    return await behavior(request, context)
                finally:
                    limits.release_stream(tenant)
            return authenticated

        async def authenticated_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                tenant = await self._tenant(context)
            except ApiError as e:
                await errors.abort(context, e)
            _TENANT.set(tenant)
            if limits is None:
                async for response in behavior(request, context):
                    yield response
                return
            try:
                limits.acquire_stream(tenant)
            except ApiError as e:
                await errors.abort(context, e)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                limits.release_stream(tenant)
        return authenticated_stream

