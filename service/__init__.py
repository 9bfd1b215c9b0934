"""The service (`service/`, imported as `prunery.service`): the gRPC API (`api/`) and the stores it shares with
the workers (`store/`). Never imports torch."""
