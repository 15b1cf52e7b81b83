"""The pool file's ``models:`` catalogue: validated with errors naming the entry, applied to
the datastore, followed on edits (model placement reads it from there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.datalayer.datastore import CatalogueModel, Datastore
from epp.discovery.pool_file import PoolFileError, parse_pool_definition
from epp.discovery.static import StaticDiscovery


def test_models_parse_into_adapters_and_base_models() -> None:
    d = parse_pool_definition(
        "endpoints: []\nmodels:\n- {name: dept-a, path: /adapters/a, base: llama}\n- {name: llama}\n", "p.yaml")
    assert d.models == {"dept-a": CatalogueModel("dept-a", "/adapters/a", "llama"), "llama": CatalogueModel("llama")}


@pytest.mark.parametrize("text, error", [
    ("models: [{name: a}, {name: a}]", r"p.yaml: models\[1\].name: duplicate model 'a'"),
    ("models: [{name: a, base: llama}]", r"p.yaml: models\[0\]: base is the base model of a LoRA adapter"),
    ("models: [{name: a, lora: /x}]", r"p.yaml: models\[0\].lora: Extra inputs are not permitted"),
    ("models: [{path: /x}]", r"p.yaml: models\[0\].name: Field required"),
])
def test_model_errors_name_the_entry(text: str, error: str) -> None:
    with pytest.raises(PoolFileError, match=error):
        parse_pool_definition("endpoints: []\n" + text + "\n", "p.yaml")


async def test_catalogue_reaches_the_datastore_and_follows_edits(tmp_path: Path) -> None:
    path = tmp_path / "pool.yaml"
    path.write_text("endpoints: []\nmodels: [{name: a, path: /adapters/a}]\n")
    disc = StaticDiscovery.from_pool_file(path, poll_interval=0)
    ds = Datastore()
    await disc.start(ds)
    try:
        assert set(ds.catalogue) == {"a"}
        path.write_text("endpoints: []\nmodels: [{name: a, path: /adapters/a}, {name: b, path: /adapters/b}]\n")
        assert disc.check_file()
        assert ds.catalogue["b"].path == "/adapters/b"
    finally:
        await disc.stop()
