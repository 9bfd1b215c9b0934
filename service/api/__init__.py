"""The gRPC API (`service/api/`, imported as `prunery.service.api`): the asyncio server (`server.py`), the
servicers (`servicers.py`), authentication, admission limits, errors, metrics, the job cache, the API's
settings, and sending jobs to the workers (`sending.py`). Built on the stores of `service/store/`; never imports
torch, the engine (but its torch-free job spec, `prunery.core.spec`) or the workers.
"""
