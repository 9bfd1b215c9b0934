"""Job reads from memory, kept fresh by Postgres notifications; WatchJob wake-ups.

Clients poll `GetJob`; each poll used to cost two database round trips (pool ping, select) and most of the
API's CPU. Migration 0002 makes Postgres send `NOTIFY prunery_jobs '<job id>'` whenever a job row changes
(any writer: worker, reaper, API). `JobCache` listens on its own connection in a thread, keeps the last
`pb.Job` read for each job, and drops it when its notification arrives, so a cached answer is at most one
notification delivery (about a millisecond on a healthy link) behind the database.

Correctness rules:
* Nothing is cached unless the listener is connected and listening (`live`). When the connection drops, the
  cache is cleared and bypassed until a new LISTEN is in place (then cleared again: notifications sent in
  between were lost).
* A read that raced with a notification is not stored: `get` notes a generation counter before reading the
  database and stores the result only if no notification (or `invalidate`) arrived in between.
* Writes made by this process (CancelJob, DeleteJob) call `invalidate` after they commit, and WatchJob calls
  `saw` with the sequence it has streamed, so within one API process a read never goes back behind what the
  same process has already answered.

SQLite (the embedded stack) has no notifications: there `JobCache` is not used and WatchJob polls.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
from sqlalchemy.engine import make_url

from prunery.v1 import prunery_pb2 as pb

log = logging.getLogger(__name__)

CHANNEL = "prunery_jobs"  # migrations/versions/0002_job_change_notifications.py


def psycopg_conninfo(database_url: str) -> str:
    """A libpq URI for a `postgresql+psycopg://` SQLAlchemy URL."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class JobCache:
    """`get(job_id, tenant, load)`: the cached `pb.Job` or `load()`'s. Start with `start()`, stop with `stop()`.

    Entries are `(tenant, event_sequence, message)`; messages are shared between calls and must not be mutated.
    """

    def __init__(self, database_url: str, *, max_entries: int = 100_000, ping_s: float = 10.0,
                 reconnect_s: float = 1.0) -> None:
        self.conninfo = psycopg_conninfo(database_url)
        self.max_entries, self.ping_s, self.reconnect_s = max_entries, ping_s, reconnect_s
        self._entries: dict[uuid.UUID, tuple[str, int, pb.Job]] = {}
        self._generation = 0
        self._live = False
        self._lock = threading.Lock()
        self._waiters: dict[uuid.UUID, set[Callable[[], None]]] = {}
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None  # monotonic time the listening connection was lost
        self.hits = self.misses = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, wait_s: float = 5.0) -> None:
        """Start listening; wait up to `wait_s` for the first LISTEN (the cache is bypassed until then)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._listen_forever, name="prunery-job-notifications", daemon=True)
        self._thread.start()
        self._connected.wait(wait_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self._go_dark()

    @property
    def live(self) -> bool:
        return self._live

    # ------------------------------------------------------------------ reads

    def get(self, job_id: uuid.UUID, tenant: str, load: Callable[[], tuple[str, int, pb.Job] | None]
            ) -> pb.Job | None:
        """The job as `tenant` may see it (None: no such job, or another tenant's). `load()` reads the database
        and returns `(tenant, event_sequence, message)` or None."""
        found, job = self.lookup(job_id, tenant)
        if found:
            return job
        return self.load(job_id, tenant, load)

    def lookup(self, job_id: uuid.UUID, tenant: str) -> tuple[bool, pb.Job | None]:
        """From memory only (never blocks on the database): (True, the job as `tenant` may see it) on a hit,
        (False, None) on a miss (then `load`)."""
        with self._lock:
            entry = self._entries.get(job_id) if self._live else None
        if entry is None:
            return False, None
        self.hits += 1
        return True, (entry[2] if entry[0] == tenant else None)

    def load(self, job_id: uuid.UUID, tenant: str, load: Callable[[], tuple[str, int, pb.Job] | None]
             ) -> pb.Job | None:
        """A miss: `load()` from the database, kept unless a change was notified meanwhile."""
        with self._lock:
            generation = self._generation
        self.misses += 1
        entry = load()
        if entry is None:
            return None
        with self._lock:
            if self._live and generation == self._generation:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[job_id] = entry
        return entry[2] if entry[0] == tenant else None

    def invalidate(self, job_id: uuid.UUID) -> None:
        with self._lock:
            self._generation += 1
            self._entries.pop(job_id, None)

    def saw(self, job_id: uuid.UUID, sequence: int) -> None:
        """WatchJob has streamed the job's event `sequence`: an older cached copy must not be served again."""
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is None or entry[1] < sequence:
                self._generation += 1
                self._entries.pop(job_id, None)

    # ------------------------------------------------------------------ WatchJob wake-ups

    @contextlib.contextmanager
    def on_change(self, job_id: uuid.UUID, wake: Callable[[], None]) -> Iterator[None]:
        """Call `wake()` (from the listener thread: it must be quick and thread-safe) whenever the job changes,
        and when notifications stop (so that waiters poll), while in the block."""
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(wake)
        try:
            yield
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(wake)
                    if not waiters:
                        del self._waiters[job_id]

    @contextlib.contextmanager
    def subscribe(self, job_id: uuid.UUID) -> Iterator[threading.Event]:
        """A threading.Event set whenever the job changes (see `on_change`)."""
        event = threading.Event()
        with self.on_change(job_id, event.set):
            yield event

    # ------------------------------------------------------------------ the listener thread

    def _changed(self, payload: str) -> None:
        try:
            job_id = uuid.UUID(payload)
        except ValueError:
            log.warning("ignoring a %s notification with payload %r", CHANNEL, payload)
            return
        with self._lock:
            self._generation += 1
            self._entries.pop(job_id, None)
            waiters = list(self._waiters.get(job_id, ()))
        for wake in waiters:
            wake()

    def _go_dark(self) -> None:
        with self._lock:
            self._live = False
            self._generation += 1
            self._entries.clear()
            waiters = [w for wakes in self._waiters.values() for w in wakes]
        for wake in waiters:
            wake()

    def _listen_forever(self) -> None:
        last_log = 0.0
        while not self._stop.is_set():
            try:
                self._listen_once()
            except Exception as e:
                now = time.monotonic()
                if not self._stop.is_set() and now - last_log > 30.0:  # once, then every 30 s while it lasts
                    last_log = now
                    first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                    log.warning("job notifications interrupted (%s: %s); serving GetJob from the database until "
                                "they are back", type(e).__name__, first_line)
                self._failing_since = self._failing_since or now
            self._go_dark()
            self._stop.wait(self.reconnect_s)

    def _listen_once(self) -> None:
        # keepalives: a silently dead link must end the wait instead of leaving a stale cache live
        with psycopg.connect(self.conninfo, autocommit=True, keepalives=1, keepalives_idle=10,
                             keepalives_interval=5, keepalives_count=3, application_name="prunery-api-listener"
                             ) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            with self._lock:
                self._generation += 1
                self._entries.clear()
                self._live = True
            self._connected.set()
            if self._failing_since is not None:
                log.info("job notifications are back after %.1fs", time.monotonic() - self._failing_since)
                self._failing_since = None
            last_ping = time.monotonic()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=0.5):  # returns after 0.5 s, so stop() is quick
                    self._changed(note.payload)
                if time.monotonic() - last_ping > self.ping_s:
                    conn.execute("SELECT 1")
                    last_ping = time.monotonic()


