"""The stores the API and the workers share (`service/store/`, imported as `prunery.service.store`): the database
models (`db.py`), the job state machine, the one module that changes a job's state (`jobs.py`), the object store
(`objectstore.py`), the job queue's settings (`queue.py`), tokens (`tokens.py`) and the settings both sides read
(`config.py`). Imports neither the API (`service/api/`) nor torch: workers import this package, never the API.
"""
