"""Generated code for ``protos/externalscaler.proto``.

The generated modules are not committed. A wheel (and so the container image) carries them:
``setup.py`` compiles ``protos/`` with grpcio-tools at build time into ``epp/_gen/``. A source
checkout generates them on first import instead (``protoc`` in-process, ``make test``
installs the ``codegen`` extra) and reuses the result while it is newer than the .proto, so
they never go stale when the .proto changes.
Files are written to a temporary directory and moved into place atomically, so several
processes starting at once (tests start pickers in parallel) cannot read half a file.

If ``epp/_gen`` is not writable, the code is generated under a per-user cache directory
instead. Without grpcio-tools and without generated code, ``load()`` raises
``KedaProtoUnavailable`` with the fix (``pip install 'epp[codegen]'``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import epp

PROTO_NAME = "externalscaler.proto"
_PKG_DIR = Path(epp.__file__).resolve().parent
_GEN_DIR = _PKG_DIR / "_gen"


class KedaProtoUnavailable(RuntimeError):
    """The KEDA external scaler code could not be generated or imported."""


def proto_path() -> Path | None:
    """The .proto source: ``protos/`` of the checkout (``epp/..``), if present."""
    p = _PKG_DIR.parent / "protos" / PROTO_NAME
    return p if p.is_file() else None


def _fresh(outputs: list[Path], proto: Path | None) -> bool:
    if not all(o.is_file() for o in outputs):
        return False
    if proto is None:
        return True
    src = proto.stat().st_mtime
    return all(o.stat().st_mtime >= src for o in outputs)


def _protoc(proto: Path, include_root: Path, rel: str, out_dir: Path) -> None:
    """Compile ``proto`` placed at ``include_root/rel`` and move the outputs into ``out_dir``."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise KedaProtoUnavailable(
            "the KEDA external scaler needs generated gRPC code: install grpcio-tools "
            "(pip install 'epp[codegen]') or run without the scaler (omit --keda-scaler-port)"
        ) from None
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="epp-protoc-") as tmp:
        tmp_p = Path(tmp)
        target = include_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(proto, target)
        code = protoc.main([
            "grpc_tools.protoc", f"-I{include_root}", f"-I{well_known}",
            f"--python_out={tmp_p}", f"--grpc_python_out={tmp_p}", str(target),
        ])
        if code != 0:
            raise KedaProtoUnavailable(f"protoc failed on {proto} (exit {code})")
        out_dir.mkdir(parents=True, exist_ok=True)
        gen_sub = tmp_p / Path(rel).parent
        for name in ("externalscaler_pb2.py", "externalscaler_pb2_grpc.py"):
            staged = out_dir / f".{name}.{os.getpid()}"
            shutil.copyfile(gen_sub / name, staged)
            os.replace(staged, out_dir / name)


def load() -> tuple[ModuleType, ModuleType]:
    """``(externalscaler_pb2, externalscaler_pb2_grpc)``, generating them if needed."""
    proto = proto_path()
    outputs = [_GEN_DIR / "externalscaler_pb2.py", _GEN_DIR / "externalscaler_pb2_grpc.py"]
    if not _fresh(outputs, proto):
        if proto is None:
            raise KedaProtoUnavailable(f"neither generated code in {_GEN_DIR} nor protos/{PROTO_NAME} was found")
        try:
            init = _GEN_DIR / "__init__.py"
            _GEN_DIR.mkdir(exist_ok=True)
            if not init.exists():
                init.write_text('"""Generated code (see epp/flowcontrol/keda_proto.py); git-ignored."""\n')
            with tempfile.TemporaryDirectory(prefix="epp-protos-") as inc:
                # placed at epp/_gen/ so the generated grpc module imports ``epp._gen.externalscaler_pb2``
                _protoc(proto, Path(inc), f"epp/_gen/{PROTO_NAME}", _GEN_DIR)
        except PermissionError:
            return _load_from_cache(proto)
    importlib.invalidate_caches()
    pb2 = importlib.import_module("epp._gen.externalscaler_pb2")
    grpc_mod = importlib.import_module("epp._gen.externalscaler_pb2_grpc")
    return pb2, grpc_mod


def _load_from_cache(proto: Path) -> tuple[ModuleType, ModuleType]:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "epp-gen"
    outputs = [base / "externalscaler_pb2.py", base / "externalscaler_pb2_grpc.py"]
    if not _fresh(outputs, proto):
        with tempfile.TemporaryDirectory(prefix="epp-protos-") as inc:
            _protoc(proto, Path(inc), PROTO_NAME, base)
    if str(base) not in sys.path:
        sys.path.append(str(base))
    importlib.invalidate_caches()
    return importlib.import_module("externalscaler_pb2"), importlib.import_module("externalscaler_pb2_grpc")
