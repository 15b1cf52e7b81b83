"""``ConfigError`` and the helpers that word its messages.

Every message names where the problem is the way an operator reads the YAML: a dotted path
with list indexes (``schedulingProfiles[0].plugins[1].pluginRef``), then the value in quotes
when it helps (``"foo"``), then what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError


class ConfigError(ValueError):
    """The picker configuration is invalid; the message names the location and the problem."""


def quote(value: object) -> str:
    """Quote a config value for a message, as the examples in the docs do: "name"."""
    return '"' + str(value).replace('"', '\\"') + '"'


def location(where: str, loc: Iterable[int | str]) -> str:
    """``where`` extended by a pydantic error location: ``plugins`` + (2, "type") →
    ``plugins[2].type``."""
    for item in loc:
        if isinstance(item, int):
            where += f"[{item}]"
        else:
            where = f"{where}.{item}" if where else item
    return where


def _message(err: Any) -> str:
    """One pydantic error in the loader's words (the structural ones read as they always
    did: "expected a mapping, got list", "missing required key "name"")."""
    kind = err["type"]
    value = err.get("input")
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return f"expected a mapping, got {type(value).__name__}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {type(value).__name__}"
    if kind == "string_type":
        return f"expected a non-empty string, got {type(value).__name__}"
    return str(err.get("msg", "invalid value")).removeprefix("Value error, ")


def format_validation(where: str, exc: ValidationError) -> str:
    """A plugin's ``Params`` errors as ``<where>.<field>: <pydantic's message>``, joined by
    "; " (e.g. ``plugins[0].parameters.maxNumOfEndpoints: Input should be greater than 0``)."""
    return "; ".join(
        f"{location(where, err.get('loc', ()))}: "
        + str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        for err in exc.errors(include_url=False)
    )


def format_document_errors(exc: ValidationError) -> str:
    """The document's structural errors as ``<location>: <problem>``, joined by "; "; a
    problem with the document as a whole is reported at ``config``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        ctx = err.get("ctx") or {}
        if err["type"] == "missing" and loc:
            parts.append(f"{location('', loc[:-1]) or 'config'}: missing required key {quote(loc[-1])}")
        elif err["type"] == "unknown_key" and not loc:
            parts.append(f"{ctx['name']}: unknown top-level key; allowed: {ctx['allowed']}")
        else:
            parts.append(f"{location('', loc) or 'config'}: {_message(err)}")
    return "; ".join(parts)
