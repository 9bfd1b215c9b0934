"""Prometheus metrics of a worker, in prometheus-client's multiprocess mode.

Why multiprocess mode: every job runs in a fresh forked process (`worker_max_tasks_per_child=1`), which
records its own numbers (stage durations, bytes, final state) and then exits. In multiprocess mode each
process writes its values to mmap'ed files under `PROMETHEUS_MULTIPROC_DIR`, and the worker's main
process serves `/metrics` on `PRUNERY_METRICS_PORT` by merging those files at scrape time, so the numbers
of finished (and killed) job processes survive them. The alternative, sending numbers up to the parent,
would lose them whenever a job process dies.

Two chores keep that sound over thousands of jobs (`housekeeping()`, run by the reaper loop):
- files of dead processes are compacted into one `*_archive.db` per metric type (counters and histograms
  sum), so the directory and the scrape cost stay bounded; scrapes and compaction share a lock, so a
  scrape never sees a value twice or not at all;
- the "live" gauges (`prunery_jobs_running`) of dead processes are dropped (`mark_process_dead`), so a
  job process killed with SIGKILL does not count as running forever.

`PROMETHEUS_MULTIPROC_DIR` must be private to one worker (its main process wipes it at start); when it is
unset, the worker makes a fresh temporary one, `prunery-worker-metrics-{pid}-*` (the pid of the worker's main
process), and removes it when it stops. A worker killed with SIGKILL cannot: `remove_orphaned_dirs()`, run by
every starting worker and by the reaper, deletes such folders once their process and every process that wrote
files in them (its job processes) are dead. It must be set before prometheus_client is imported, which is why
this module sets it first.

Gauges of the job states (`prunery_jobs_queued`, `prunery_jobs_running` per state) are the API's, read from
the database at each scrape; a worker's `prunery_jobs_running` counts only its own running job processes.

Metrics written by the worker's main process (the reaper thread) go through `parent_write`, a lock also
taken around every fork, because prometheus-client's multiprocess values share one non-reentrant lock: a
fork while another thread held it would leave the job process deadlocked on its first metric update.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator

DIR_PREFIX = "prunery-worker-metrics-"  # + "{pid}-"; worker/app.py's _prepare_metrics_dir names them alike

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server  # noqa: E402
from prometheus_client.metrics_core import Metric  # noqa: E402
from prometheus_client.mmap_dict import MmapedDict  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead  # noqa: E402

__all__ = [
    "ARTIFACT_IN_BYTES", "ARTIFACT_OUT_BYTES", "DIR_PREFIX", "JOBS_FINISHED", "JOBS_REQUEUED", "JOBS_RUNNING",
    "JOB_DURATION", "MetricsServer", "STAGE_DURATION", "UPLOADS_SWEPT", "collector", "housekeeping", "multiproc_dir",
    "parent_write", "pid_alive", "remove_orphaned_dirs",
]

_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)

JOBS_FINISHED = Counter("prunery_jobs_finished_total", "Jobs that reached a final state, by that state",
                        ["state"])
JOB_DURATION = Histogram("prunery_job_duration_seconds",
                         "Wall time of one job attempt, from claim to its final state", buckets=_DURATION_BUCKETS)
STAGE_DURATION = Histogram("prunery_stage_duration_seconds",
                           "Wall time of a job stage (load, prune, export, store; graph, importance, "
                           "select_and_remove and reexport are the engine's parts of prune)", ["stage"],
                           buckets=_DURATION_BUCKETS)
JOBS_RUNNING = Gauge("prunery_jobs_running", "Jobs running in this worker now", multiprocess_mode="livesum")
JOBS_REQUEUED = Counter("prunery_jobs_requeued_total",
                        "Jobs sent to the queue again by the reaper: lease_expired (RUNNING, its worker stopped), "
                        "message_lost (QUEUED, and its message is in neither the queue nor a worker's hands)",
                        ["reason"])
UPLOADS_SWEPT = Counter("prunery_uploads_swept_total",
                        "Unfinished uploads (PENDING artifacts older than PRUNERY_PENDING_UPLOAD_TTL_S, left by a "
                        "crash of the API) whose row and object the reaper deleted")
ARTIFACT_IN_BYTES = Counter("prunery_artifact_in_bytes_total", "Bytes of artifacts read from the object store")
ARTIFACT_OUT_BYTES = Counter("prunery_artifact_out_bytes_total", "Bytes of artifacts written to the object store")


def multiproc_dir() -> str:
    return os.environ["PROMETHEUS_MULTIPROC_DIR"]


_fork_lock = threading.Lock()


def _release_fork_lock() -> None:
    _fork_lock.release()


os.register_at_fork(before=_fork_lock.acquire, after_in_parent=_release_fork_lock,
                    after_in_child=_release_fork_lock)


@contextlib.contextmanager
def parent_write() -> Iterator[None]:
    """Hold while a thread of the worker's main process updates a metric (see the module doc)."""
    with _fork_lock:
        yield


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _file_pid(path: str) -> int | None:
    """The pid in `counter_123.db` / `gauge_livesum_123.db`; None for our archives and foreign names."""
    stem = os.path.basename(path)[: -len(".db")]
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def remove_orphaned_dirs(root: str | None = None) -> int:
    """Delete the `prunery-worker-metrics-{pid}-*` folders in `root` (the system temp folder) left by workers
    that died without removing theirs: the pid in the name is dead and so is every pid in the names of the
    files inside (a killed worker's job processes may outlive it for a while). Returns how many went."""
    root = root or tempfile.gettempdir()
    removed = 0
    try:
        names = [n for n in os.listdir(root) if n.startswith(DIR_PREFIX)]
    except OSError:
        return 0
    own = os.path.realpath(multiproc_dir())
    for name in names:
        pid = name[len(DIR_PREFIX):].split("-", 1)[0]
        path = os.path.join(root, name)
        if not pid.isdigit() or os.path.realpath(path) == own or pid_alive(int(pid)) or not os.path.isdir(path):
            continue  # not named by us (older versions: no pid), ours, or its worker lives
        writers = {p for p in map(_file_pid, glob.glob(os.path.join(path, "*.db"))) if p is not None}
        if any(pid_alive(p) for p in writers):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += not os.path.exists(path)
    return removed


class _CompactingCollector:
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        with self.lock:
            return list(MultiProcessCollector.merge(glob.glob(os.path.join(self.path, "*.db")), accumulate=True))

    def compact(self) -> int:
        """Fold the counter and histogram files of dead processes into `{type}_archive.db`; drop their live
        gauges. Returns how many files were folded."""
        dead: dict[str, list[str]] = {}
        for path in glob.glob(os.path.join(self.path, "*.db")):
            pid = _file_pid(path)
            if pid is None or pid == os.getpid() or pid_alive(pid):
                continue
            typ = os.path.basename(path).split("_", 1)[0]
            if typ == "gauge":
                mark_process_dead(pid, self.path)
            elif typ in ("counter", "histogram"):
                dead.setdefault(typ, []).append(path)
        folded = 0
        with self.lock:
            for typ, files in dead.items():
                archive = os.path.join(self.path, f"{typ}_archive.db")
                totals: dict[str, float] = {}
                for path in ([archive] if os.path.exists(archive) else []) + files:
                    for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):
                        totals[key] = totals.get(key, 0.0) + value
                fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{typ}_archive.", suffix=".tmp")
                os.close(fd)
                os.unlink(tmp)  # MmapedDict creates and sizes it
                out = MmapedDict(tmp)
                try:
                    for key, value in totals.items():
                        out.write_value(key, value, 0.0)
                finally:
                    out.close()
                os.replace(tmp, archive)  # not *.db while incomplete, so scrapes never read it half-written
                for path in files:
                    os.unlink(path)
                folded += len(files)
        return folded


_collector: _CompactingCollector | None = None


def collector() -> _CompactingCollector:
    """The worker main process's view of the metric files (one per process: scrapes and compaction share
    its lock)."""
    global _collector
    if _collector is None or _collector.path != multiproc_dir():
        _collector = _CompactingCollector(multiproc_dir())
    return _collector


def housekeeping() -> int:
    """Compact the files of dead job processes (run periodically by the reaper, server or not)."""
    return collector().compact()


class MetricsServer:
    """The worker main process's `/metrics`: the merged multiprocess files."""

    def __init__(self, port: int, addr: str = "0.0.0.0") -> None:
        self.collector = collector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)  # type: ignore[arg-type]
        self.port = port
        self.server, self.thread = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

