"""The flat uint64 map both prefix indexes keep their block tables in agrees with a dict,
whatever keys collide or are deleted (key 0 included: it is kept beside the arrays)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.datalayer.u64map import U64Map

# keys sharing their low bits land in one probe run: deletion must shift the run back correctly
_KEYS = st.one_of(st.integers(0, 40), st.integers(0, 40).map(lambda v: (v << 20) | 7))
_OPS = st.lists(st.tuples(st.sampled_from(["put", "put_new", "pop"]), _KEYS, st.integers(-5, 5)), max_size=200)


@given(_OPS, st.lists(_KEYS, max_size=12))
@settings(max_examples=200)
def test_agrees_with_a_dict(ops: list[tuple[str, int, int]], chain: list[int]) -> None:
    m, d = U64Map(), dict[int, int]()
    for op, key, value in ops:
        if op == "put":
            assert m.put(key, value) == d.get(key)
            d[key] = value
        elif op == "put_new":
            assert m.put_new(key, value) == d.get(key)
            d.setdefault(key, value)
        else:
            assert m.pop(key) == d.pop(key, None)
        assert len(m) == len(d)
    assert dict(m.items()) == d
    assert all(m.get(k) == v for k, v in d.items())
    run = []
    for k in chain:
        if k not in d:
            break
        run.append(d[k])
    assert m.leading(chain) == run
