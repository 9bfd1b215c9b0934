"""Generated gRPC contract of Prunery (`protos/prunery/v1/prunery.proto`).

Do not edit: regenerate with `python protos/generate.py`.
"""
