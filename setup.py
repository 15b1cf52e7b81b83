"""Build hook: compile protos/*.proto into epp/_gen/ with grpcio-tools when a wheel is built.

Everything else about the package is in pyproject.toml. The generated modules are not
committed: a wheel carries them (built here), and a source checkout generates them on first
use (epp/flowcontrol/keda_proto.py), so they never go stale against the .proto.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"


class BuildWithProtos(build_py):
    """``build_py`` that also writes ``epp/_gen/<name>_pb2.py`` and ``_pb2_grpc.py`` into the
    build directory, for every .proto in protos/."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # a source checkout generates on first use
        import grpc_tools
        from grpc_tools import protoc  # build requirement (pyproject [build-system])

        well_known = Path(grpc_tools.__file__).parent / "_proto"
        out = Path(self.build_lib) / "epp" / "_gen"
        out.mkdir(parents=True, exist_ok=True)
        (out / "__init__.py").write_text('"""Generated from protos/ by grpcio-tools at build time."""\n')
        for proto in sorted(PROTOS.glob("*.proto")):
            with tempfile.TemporaryDirectory(prefix="epp-protos-") as inc:
                # placed at epp/_gen/ so the generated grpc module imports epp._gen.<name>_pb2
                target = Path(inc) / "epp" / "_gen" / proto.name
                target.parent.mkdir(parents=True)
                shutil.copyfile(proto, target)
                code = protoc.main(["grpc_tools.protoc", f"-I{inc}", f"-I{well_known}",
                                    f"--python_out={self.build_lib}", f"--grpc_python_out={self.build_lib}",
                                    str(target)])
            if code != 0:
                raise SystemExit(f"protoc failed on {proto} (exit {code})")


setup(cmdclass={"build_py": BuildWithProtos})
