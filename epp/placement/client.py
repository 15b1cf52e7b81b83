"""HTTP calls to the model servers: vLLM's runtime LoRA API and ``/v1/models``.

Shapes and statuses are vLLM 0.32's (``tests/data/vllm_runtime_lora.json``): a load answers
200 with plain text; 400 whose message says "already been loaded" means the adapter is there
(another replica, or an earlier attempt that timed out on our side, loaded it); 404 means no
adapter at that path. Unload: 200, or 404 when the name is not loaded (already gone: fine).
The server needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; without it the routes are absent
and every call is a 404 *without* vLLM's JSON error body, which is reported as such.

Every call has its own total timeout; nothing here runs on the request path (the manager
calls it from background tasks).
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import orjson

SUCCESS = "success"
ALREADY_LOADED = "already_loaded"
NOT_FOUND = "not_found"
FAILED = "failed"
TIMEOUT = "timeout"


@dataclass(slots=True, frozen=True)
class CallResult:
    outcome: str  # SUCCESS | ALREADY_LOADED | NOT_FOUND | FAILED | TIMEOUT
    message: str = ""

    @property
    def present(self) -> bool:
        """After a load: the adapter is on the pod."""
        return self.outcome in (SUCCESS, ALREADY_LOADED)


@dataclass(slots=True, frozen=True)
class ModelsReport:
    adapters: frozenset[str]
    bases: frozenset[str]


def _error_message(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
        return str(doc["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:300].decode(errors="replace")


def _is_vllm_error(body: bytes) -> bool:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict)


@dataclass(slots=True)
class PodClient:
    session: aiohttp.ClientSession

    async def load(self, base_url: str, name: str, path: str, budget: float) -> CallResult:
        return await self._admin(f"{base_url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
                                 budget, loading=True)

    async def unload(self, base_url: str, name: str, budget: float) -> CallResult:
        return await self._admin(f"{base_url}/v1/unload_lora_adapter", {"lora_name": name}, budget,
                                 loading=False)

    async def _admin(self, url: str, body: dict[str, str], budget: float, *, loading: bool) -> CallResult:
        try:
            async with self.session.post(url, data=orjson.dumps(body), headers={"content-type": "application/json"},
                                         timeout=aiohttp.ClientTimeout(total=budget)) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            return CallResult(TIMEOUT, f"no answer from {url} within {budget:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            return CallResult(FAILED, f"{url}: {type(exc).__name__}: {exc}")
        if status == 200:
            return CallResult(SUCCESS)
        message = _error_message(raw)
        if status == 404 and not _is_vllm_error(raw):
            return CallResult(FAILED, f"{url} answered 404 without vLLM's error body: is "
                                      "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True set on the model server?")
        if loading and status == 400 and "already been loaded" in message:
            return CallResult(ALREADY_LOADED, message)
        if status == 404:
            return CallResult(NOT_FOUND, message)
        return CallResult(FAILED, f"HTTP {status}: {message}")

    async def models(self, base_url: str, budget: float) -> ModelsReport | None:
        """What ``GET /v1/models`` lists (None: no usable answer). Entries with a ``parent``
        are LoRA adapters; the others are base models."""
        try:
            async with self.session.get(f"{base_url}/v1/models", timeout=aiohttp.ClientTimeout(total=budget)) as resp:
                if resp.status != 200:
                    return None
                doc = orjson.loads(await resp.read())
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
            return None
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            return None
        adapters: set[str] = set()
        bases: set[str] = set()
        for entry in data:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            (adapters if entry.get("parent") else bases).add(entry["id"])
        return ModelsReport(frozenset(adapters), frozenset(bases))
