"""Prunery (`prunery/`): the command line (`cli.py`), the Python client (`client.py`), the job spec on the wire
(`spec_proto.py`), the embedded stack (`stack.py`), the demo's model (`demo_model.py`) and the code generated from
the gRPC contract (`v1/`, from `protos/`). The engine (`core/`), the service (`service/`), the workers
(`worker/`) and the migrations (`migrations/`) are subpackages kept in top-level folders: `prunery.core` is
`core/`, and so on (pyproject's package-dir).
"""
