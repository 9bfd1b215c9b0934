"""The workers (`worker/`, imported as `prunery.worker`): the Celery app and its task (`app.py`), the broker as
the workers see it (`broker.py`), one attempt at a job (`pipeline.py`) with its lease and limits (`lease.py`) and
its failures (`failures.py`), the reaper of dead jobs and lost messages (`reaper.py`), settings and metrics.
Imports the engine (`prunery.core`) and the stores (`prunery.service.store`), never the API.

Importing `prunery.worker.app` pulls in neither torch nor prometheus-client; the pipeline imports the engine
(torch) only in worker processes.
"""
