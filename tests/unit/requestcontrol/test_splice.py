"""The model splice used when a rewritten body cannot be re-encoded (nested past 254 levels)."""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.requestcontrol.splice import replace_model

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=150, deadline=None)
@given(
    doc=st.dictionaries(st.text(max_size=8), _values, max_size=5),
    model=st.text(max_size=20),
    target=st.text(max_size=20),
    style=st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]),
    ascii_only=st.booleans(),
    position=st.integers(0, 5),
)
def test_only_the_model_value_changes_whatever_the_formatting(
        doc: dict[str, object], model: str, target: str, style: tuple[str, str], ascii_only: bool,
        position: int) -> None:
    items = [(k, v) for k, v in doc.items() if k != "model"]
    items.insert(min(position, len(items)), ("model", model))
    raw = json.dumps(dict(items), separators=style, ensure_ascii=ascii_only).encode()
    out = replace_model(raw, target)
    assert out is not None
    assert orjson.loads(out) == {**dict(items), "model": target}
    # every other byte is the client's: the text before the value is untouched
    assert out.startswith(raw[: raw.index(b'"model"')])


def test_nested_model_keys_and_strings_that_look_like_json_are_left_alone() -> None:
    raw = b'{"a":{"model":"inner"},"s":"\\"model\\":\\"x\\" ] } [","model" : "m" ,"b":[{"model":1}]}'
    out = replace_model(raw, "t")
    assert out == raw.replace(b'"model" : "m"', b'"model" : "t"')


def test_escaped_key_spelling_and_duplicates_are_all_replaced() -> None:
    raw = b'{"mod\\u0065l":"a","x":1,"model":"b"}'
    out = replace_model(raw, "t")
    assert out == b'{"mod\\u0065l":"t","x":1,"model":"t"}'


def test_deep_body_splices_without_recursion() -> None:
    deep = b"[" * 1000 + b"]" * 1000
    raw = b'{"x":' + deep + b',"model":"m","y":{"z":' + deep + b"}}"
    out = replace_model(raw, "target")
    assert out == raw.replace(b'"model":"m"', b'"model":"target"')
    assert orjson.loads(out)["model"] == "target"


def test_not_an_object_or_no_model_is_none() -> None:
    assert replace_model(b"[1,2]", "t") is None
    assert replace_model(b'{"prompt":"x"}', "t") is None
    assert replace_model(b"{}", "t") is None
