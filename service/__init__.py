"""Prunery service: gRPC API and its stores (database, object store). Never imports torch."""
