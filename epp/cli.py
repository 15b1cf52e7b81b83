"""The ``epp`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when chosen, so ``epp sim`` never loads the
picker and ``epp serve`` never loads the simulator.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("epp.runner.cli", "run the endpoint picker (Envoy ext_proc server)"),
    "sim": ("epp.sim.cli", "run simulated vLLM pods"),
    "demo": ("epp.local.demo", "real Envoy + picker + simulated pool on this machine"),
    "envoy-config": ("epp.envoy.cli", "print an Envoy bootstrap config for a picker and pool"),
    "bench": ("benchmarks.cli", "benchmark routers side by side on simulated pods"),
    "pd-sidecar": ("epp.pd.cli", "decode-side P/D sidecar (runs next to vLLM)"),
    "usage": ("epp.usage.cli", "per-tenant usage report (tokens, requests, queueing) over a period"),
}


#: subcommands whose code lives in the source checkout, not in the installed package
SOURCE_CHECKOUT_ONLY = {"benchmarks.cli": "benchmarks"}


def _import(module: str) -> object:
    """Import a subcommand's module. ``benchmarks`` is not installed with the package (a picker
    pod does not need it): from an editable install it is found beside ``epp/``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = SOURCE_CHECKOUT_ONLY.get(module)
        if top is None or exc.name not in (top, module):
            raise
        root = Path(__file__).resolve().parents[1]
        if not (root / top / "__init__.py").exists():
            raise
        sys.path.insert(0, str(root))
        return importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod: Any = _import(module)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == module or module.startswith(exc.name + ".")):
                continue  # subcommand not built yet
            raise
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen subcommand's module when one is named (fast start).
    if argv and argv[0] in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        module, help_text = SUBCOMMANDS[argv[0]]
        try:
            mod: Any = _import(module)
        except ModuleNotFoundError as exc:
            if module in SOURCE_CHECKOUT_ONLY:
                print(f"epp {argv[0]}: needs a source checkout of epp ({exc.name} is not installed with the "
                      "package)", file=sys.stderr)
                return 2
            raise
        p = argparse.ArgumentParser(
            prog=f"epp {argv[0]}", description=(mod.__doc__ or help_text).strip(),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        args = p.parse_args(argv[1:])
        return int(mod.run(args) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
