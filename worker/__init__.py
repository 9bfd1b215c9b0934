"""Prunery worker: a Celery app running pruning jobs (`prunery.worker.app`), the job pipeline
(`prunery.worker.pipeline`), the reaper of dead jobs (`prunery.worker.reaper`) and the worker's metrics
(`prunery.worker.metrics`).

Importing `prunery.worker.app` (for `enqueue`) pulls in neither torch nor prometheus-client, so the API
can send jobs without them; the pipeline imports the engine (torch) only in worker processes.
"""
