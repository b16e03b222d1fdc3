"""Generated protobuf modules, made from proto/*.proto at build time.

`make build` runs protoc (grpcio-tools); when the generated modules are
missing (a fresh checkout run in place) they are generated here once.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_NAMES = ("inventory", "pstree", "core", "mm", "pagemap", "files", "stats")


def _generate() -> None:
    protos = [os.path.join(_HERE, "proto", f"{n}.proto") for n in _NAMES]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc",
                    f"-I{os.path.join(_HERE, 'proto')}", f"--python_out={_HERE}", *protos],
                   check=True)


def _load(name: str):
    return importlib.import_module(f"migrate.images.{name}_pb2")


def _missing() -> bool:
    for n in _NAMES:
        gen = os.path.join(_HERE, f"{n}_pb2.py")
        src = os.path.join(_HERE, "proto", f"{n}.proto")
        if not os.path.exists(gen) or os.path.getmtime(gen) < os.path.getmtime(src):
            return True
    return False


if _missing():
    _generate()

inventory_pb2 = _load("inventory")
pstree_pb2 = _load("pstree")
core_pb2 = _load("core")
mm_pb2 = _load("mm")
pagemap_pb2 = _load("pagemap")
files_pb2 = _load("files")
stats_pb2 = _load("stats")
