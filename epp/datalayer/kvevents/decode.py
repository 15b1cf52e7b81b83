"""Decoding vLLM KV-cache event messages (``vllm/distributed/kv_events.py``).

A message is three ZMQ frames ``[topic, seq (8-byte big-endian), payload]``; the payload is a
msgpack ``[ts, events, data_parallel_rank]`` batch. vLLM has two encodings of an event and
both are in the field:

* a positional array, tag first (msgspec ``array_like`` tagged structs):
  ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name, extra_keys, group_idx, kv_cache_spec_kind, ...]`` (trailing defaults omitted);
* a map keyed by field name with the tag under ``"type"`` (vLLM 0.32 and later).

Hashes are a msgpack uint64 by default and raw digest bytes with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``; both are normalised to the uint64 vLLM would
publish (the digest's last 8 bytes, big-endian), so the rest of the picker sees one form.

Unknown event types are skipped (newer engines may add some); malformed ones raise
``EventDecodeError`` for the batch, which the subscriber counts and drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

#: the replay server's end-of-stream sequence frame (-1 as 8 bytes)
END_SEQ = b"\xff" * 8


class EventDecodeError(ValueError):
    """A payload that is not a vLLM KV-event batch."""


@dataclass(slots=True, frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    medium: str | None = None
    group_idx: int = 0
    #: per block: the extra hash inputs other than the LoRA name (cache_salt, ...), joined by
    #: "|"; None when the block has none. Empty tuple when the event had no extra_keys.
    extras: tuple[str | None, ...] = ()


@dataclass(slots=True, frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = None
    group_idx: int = 0


@dataclass(slots=True, frozen=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True, frozen=True)
class EventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None = None


def hash_value(value: Any) -> int:
    """An engine block hash as the uint64 vLLM publishes by default."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value & 0xFFFFFFFFFFFFFFFF
    if isinstance(value, bytes | bytearray | memoryview):
        b = bytes(value)
        if not b:
            raise EventDecodeError("empty block hash")
        return int.from_bytes(b[-8:], "big")
    raise EventDecodeError(f"block hash of type {type(value).__name__}")


def _hashes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise EventDecodeError("block_hashes is not a list")
    return tuple(hash_value(v) for v in value)


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


def _extras(value: Any, lora_name: str | None) -> tuple[str | None, ...]:
    if not isinstance(value, list | tuple):
        return ()
    out: list[str | None] = []
    for item in value:
        if not isinstance(item, list | tuple):
            out.append(None if item is None else str(item))
            continue
        parts = [str(x) for x in item if x is not None and x != lora_name]
        out.append("|".join(parts) if parts else None)
    return tuple(out) if any(x is not None for x in out) else ()


def _as_map(raw: Any) -> tuple[str, dict[str, Any]]:
    """(tag, fields) of one event in either encoding."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        if isinstance(tag, bytes):
            tag = tag.decode()
        if not isinstance(tag, str):
            raise EventDecodeError("event map without a 'type'")
        return tag, raw
    if isinstance(raw, list | tuple) and raw:
        tag = raw[0]
        if isinstance(tag, bytes):
            tag = tag.decode()
        if not isinstance(tag, str):
            raise EventDecodeError("positional event without a tag")
        names = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS if tag == "BlockRemoved" else ()
        return tag, dict(zip(names, raw[1:], strict=False))
    raise EventDecodeError(f"event of type {type(raw).__name__}")


def decode_event(raw: Any) -> KVEvent | None:
    """One event; None for an event type this picker does not use."""
    tag, f = _as_map(raw)
    if tag == "BlockStored":
        tokens = f.get("token_ids") or ()
        if not isinstance(tokens, list | tuple):
            raise EventDecodeError("token_ids is not a list")
        parent = f.get("parent_block_hash")
        bs = f.get("block_size")
        hashes = _hashes(f.get("block_hashes"))
        if not isinstance(bs, int) or bs <= 0:
            if tokens:
                raise EventDecodeError("BlockStored without a block_size")
            bs = 0
        lora_name = _opt_str(f.get("lora_name"))
        return BlockStored(
            block_hashes=hashes,
            parent_block_hash=None if parent is None else hash_value(parent),
            token_ids=tuple(tokens),
            block_size=bs,
            lora_name=lora_name,
            medium=_opt_str(f.get("medium")),
            group_idx=int(f.get("group_idx") or 0),
            extras=_extras(f.get("extra_keys"), lora_name),
        )
    if tag == "BlockRemoved":
        return BlockRemoved(_hashes(f.get("block_hashes")), _opt_str(f.get("medium")),
                            int(f.get("group_idx") or 0))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return None


def decode_payload(payload: bytes) -> EventBatch:
    """A msgpack ``[ts, events, dp_rank]`` batch (a map form ``{ts, events, ...}`` is accepted too)."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EventDecodeError(f"not msgpack: {exc}") from None
    if isinstance(obj, dict):
        ts, events, rank = obj.get("ts", 0.0), obj.get("events"), obj.get("data_parallel_rank")
    elif isinstance(obj, list | tuple) and len(obj) >= 2:
        ts, events = obj[0], obj[1]
        rank = obj[2] if len(obj) > 2 else None
    else:
        raise EventDecodeError("batch is not [ts, events, dp_rank]")
    if not isinstance(events, list | tuple):
        raise EventDecodeError("batch events is not a list")
    out: list[KVEvent] = []
    for raw in events:
        ev = decode_event(raw)
        if ev is not None:
            out.append(ev)
    return EventBatch(float(ts or 0.0), tuple(out), rank if isinstance(rank, int) else None)


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise EventDecodeError(f"sequence frame of {len(frame)} bytes")
    return int.from_bytes(frame, "big", signed=False)


def topic_model(topic: str) -> str | None:
    """The model of an llm-d style topic ``kv@<pod>@<model>`` (None if the topic has no model)."""
    parts = topic.split("@")
    if len(parts) >= 3 and parts[-1]:
        return parts[-1]
    return None
