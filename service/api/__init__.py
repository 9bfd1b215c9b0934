"""The gRPC API (`service/api/`, imported as `prunery.service.api`): the asyncio server (`server.py`); the
servicers (`artifact_service.py`, `job_service.py`) and what they share (`servicers.py`); the request vocabulary
(`names.py`: names, labels, filters, page tokens); messages from rows (`protos.py`); authentication
(`auth.py`), admission limits (`limits.py`), errors (`errors.py`), metrics (`metrics.py`), the job cache
(`jobcache.py`), the API's settings (`settings.py`) and sending jobs to the workers (`sending.py`). Built on the
stores of `service/store/`; never imports torch, the engine (but its torch-free job spec, `prunery.core.spec`) or
the workers.
"""
