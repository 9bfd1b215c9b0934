"""The job queue's settings both sides share: the task name (`prunery.run_job`, sent by name with the job id
as its only argument), the broker kinds, and the transport options (`prunery.worker.app.broker_transport_options`
starts from `transport_options` here): the same folders for the embedded `filesystem://` broker, the same Redis
key prefix. The API's sending is `service/api/sending.py`; the worker's Celery app, `worker/app.py`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TASK_NAME", "is_filesystem", "is_redis", "transport_options"]

TASK_NAME = "prunery.run_job"

def is_filesystem(url: str) -> bool:
    return url.startswith("filesystem://")


def is_redis(url: str) -> bool:
    return url.split("://", 1)[0] in ("redis", "rediss", "redis+socket", "sentinel")


def transport_options(settings: Any) -> dict[str, Any]:
    """Broker transport options both sides need (the API's `Settings` or the worker's `WorkerSettings`:
    anything with `broker_url`, `broker_dir` and `broker_keyprefix`); the worker adds its consumer options."""
    if is_filesystem(settings.broker_url):
        root = settings.broker_dir
        return {
            "data_folder_in": str(root / "queue"),
            "data_folder_out": str(root / "queue"),
            "control_folder": str(root / "control"),
            # taken messages are renamed into this folder (same file system: atomic) rather than the system
            # temp dir, where the move could degrade into copy+delete and be taken twice; the reaper prunes it
            "store_processed": True,
            "processed_folder": str(root / "processed"),
            # the consumer polls the folder; kombu's default of 1 s would add up to a second to every job
            "polling_interval": 0.1,
        }
    options: dict[str, Any] = {}
    if settings.broker_keyprefix and is_redis(settings.broker_url):
        options["global_keyprefix"] = settings.broker_keyprefix
    return options
