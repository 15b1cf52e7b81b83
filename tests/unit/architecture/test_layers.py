"""The layer contract holds, and it is a contract that can fail.

``make lint`` runs import-linter on the tree; these tests show that a layer reaching upward
or production code importing the simulator breaks it, and that a picker process never loads
the simulator at all (the contract sees static imports; this also sees runtime ones).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree, capture_output=True, text=True, timeout=120, check=False,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package and its contract, to break on purpose."""
    dst = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "epp", dst / "epp", ignore=shutil.ignore_patterns("__pycache__", "_gen"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_the_tree_keeps_the_contract(tree: Path) -> None:
    out = _lint(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" in out.stdout and "0 broken" in out.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("epp/flowcontrol/_upward.py", "from epp.requestcontrol import director\n", "layers below it BROKEN"),
    ("epp/scheduling/_upward.py", "import epp.flowcontrol.controller\n", "layers below it BROKEN"),
    ("epp/tokenization/_sim.py", "from epp.sim import tokenizer\n",
     "imports the simulator (a picker pod never loads it) BROKEN"),
    ("epp/framework/_impl.py", "from epp.datalayer import datastore\n", "imports no implementation BROKEN"),
])
def test_reaching_upward_breaks_the_contract(tree: Path, module: str, line: str, contract: str) -> None:
    path = tree / module
    path.write_text(line)
    try:
        out = _lint(tree)
    finally:
        path.unlink()
    assert out.returncode != 0
    assert contract in " ".join(out.stdout.split()), out.stdout


@pytest.mark.parametrize("entry", ["epp.runner.cli", "epp.cli", "epp.runner.server"])
def test_a_picker_process_loads_no_simulator_module(entry: str) -> None:
    code = (
        f"import sys, {entry}; "
        "bad = sorted(m for m in sys.modules if m == 'epp.sim' or m.startswith('epp.sim.') "
        "or m.startswith('benchmarks')); print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
