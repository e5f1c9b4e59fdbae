"""The generated gRPC stubs, found and imported once.

Generated code is never committed (it must match the protoc and protobuf runtime installed), so
the stubs come from a directory written by `clients/python/generate_stubs.sh` or by the CMake
build (build/tests/server_stubs). Where they are looked for, first match wins:

1. `$NIBBLE_CLIENT_STUBS`;
2. `nibble_client/_generated/` beside this file (generate_stubs.sh's default output).

The directory holds `nibble/v1/*_pb2*.py` (imported as the top-level package `nibble.v1`, which is
how protoc writes their imports) and `grpc/health/v1/health_pb2.py`. The latter is loaded by file
path under a private name: a `grpc/` folder on sys.path must not stand in for the grpc package.
"""
import importlib.util
import os
import sys

__all__ = ["STUBS_DIR", "inference_pb2", "inference_pb2_grpc", "models_pb2", "models_pb2_grpc",
           "health_pb2"]


def _find_stubs_dir():
    candidates = []
    if os.environ.get("NIBBLE_CLIENT_STUBS"):
        candidates.append(os.environ["NIBBLE_CLIENT_STUBS"])
    candidates.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_generated"))
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "nibble", "v1", "inference_pb2_grpc.py")):
            return os.path.abspath(directory)
    raise ImportError(
        "nibble_client: no generated gRPC stubs; run clients/python/generate_stubs.sh, or set "
        "NIBBLE_CLIENT_STUBS to a directory holding nibble/v1/inference_pb2_grpc.py (looked in: "
        + ", ".join(candidates) + ")")


def _load_by_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


STUBS_DIR = _find_stubs_dir()
if STUBS_DIR not in sys.path:
    sys.path.insert(0, STUBS_DIR)

import grpc  # noqa: E402,F401  (imported first, so that no grpc/ folder can shadow it)
from nibble.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc  # noqa: E402

_health_path = os.path.join(STUBS_DIR, "grpc", "health", "v1", "health_pb2.py")
if not os.path.isfile(_health_path):
    raise ImportError(f"nibble_client: {_health_path} is missing; rerun generate_stubs.sh")
health_pb2 = _load_by_path("nibble_client._health_pb2", _health_path)
