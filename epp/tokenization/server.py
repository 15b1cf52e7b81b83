"""Tokenization by the model server itself (``tokenizer: model-server``).

vLLM's OpenAI server answers ``POST /tokenize`` on its serving port with the ids it would
compute for a completion prompt (``{"model", "prompt", "add_special_tokens"}``) or a chat
(``{"model", "messages", "add_generation_prompt", "chat_template_kwargs", "tools", ...}``,
the model's own chat template applied by vLLM): ``{"tokens": [...], "count", ...}``. So a
picker with no access to the model's files still tokenizes exactly as the engine does.

Costs an HTTP round trip per distinct request (awaited in the scorer's ``prepare_request``
hook, never on the scheduling path); answers are cached by request content (LRU). Endpoints
are tried round robin, at most two per request, each bounded by ``timeout``; a request that
could not be tokenized scores 0 (``epp_precise_prefix_tokenizations_total{outcome="failed"}``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from xxhash import xxh64_intdigest

SERVER_SPEC = "model-server"
_CHAT_FIELDS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools", "documents",
                "chat_template", "add_special_tokens")


@dataclass(slots=True)
class ServerTokenizer:
    #: base URLs (``http://ip:port``) of the pool's endpoints, read at each request
    urls: Callable[[], Sequence[str]]
    timeout: float = 1.0
    cache_size: int = 4096
    _session: aiohttp.ClientSession | None = None
    _rr: int = 0
    _cache: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)

    @staticmethod
    def payload(api: str, body: Mapping[str, Any], model: str) -> dict[str, Any] | None:
        if api == "completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                return None
            return {"model": model, "prompt": prompt, "add_special_tokens": bool(body.get("add_special_tokens", True))}
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        out: dict[str, Any] = {"model": model, "messages": messages}
        for f in _CHAT_FIELDS:
            if f in body:
                out[f] = body[f]
        return out

    async def tokenize(self, api: str, body: Mapping[str, Any], model: str) -> list[int] | None:
        prompt = body.get("prompt") if api == "completions" else None
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        payload = self.payload(api, body, model)
        if payload is None:
            return None
        try:
            raw = orjson.dumps(payload)
        except TypeError:
            return None
        key = xxh64_intdigest(raw)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        urls = list(self.urls())
        if not urls:
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        for attempt in range(min(2, len(urls))):
            url = urls[(self._rr + attempt) % len(urls)]
            ids = await self._post(url, raw)
            if ids is not None:
                self._rr += 1
                self._cache[key] = ids
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                return ids
        self._rr += 1
        return None

    async def _post(self, url: str, raw: bytes) -> list[int] | None:
        assert self._session is not None
        try:
            async with self._session.post(url + "/tokenize", data=raw,
                                          headers={"content-type": "application/json"}) as r:
                if r.status != 200:
                    return None
                doc = orjson.loads(await r.read())
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
            return None
        tokens = doc.get("tokens") if isinstance(doc, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return None
        return tokens

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
