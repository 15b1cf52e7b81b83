"""OpenAI request body → the token ids the engine will compute for it.

Completions: ``prompt`` as a string (encoded with special tokens unless the body says
``add_special_tokens: false``), a list of token ids (used as is), or a one-element list of
either. Chat completions: ``messages`` rendered by the backend's chat template. Other APIs
(responses, embeddings, ...) return None: the precise scorer then scores every endpoint 0 and
the other scorers decide.

Tokenizers are chosen per target model (``tokenizers`` map) with a default; LoRA adapters
use their base model's tokenizer through the default. A model with no tokenizer is not
tokenized (scores 0): the picker never guesses with a tokenizer that is not the model's.

Keeping the request path non-blocking (``tokenize_async``, awaited by the scorer's
``prepare_request`` hook before scheduling):

* chat renders are cached (exact conversation + template arguments, LRU): a repeated
  conversation costs a hash, not a Jinja render;
* the text is encoded through the prefix cache (``cache.py``): only segments not seen before
  are encoded, and when those are large (``offload_chars``) they are encoded on a small
  worker thread pool (Hugging Face ``tokenizers`` releases the GIL while encoding), with a
  bounded queue: when ``max_queue`` encodings are already waiting the request is not
  tokenized (outcome ``overloaded``, scores 0) rather than queueing behind them;
* ``model-server`` tokenizers ask the model server itself (``server.py``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from xxhash import xxh64_intdigest

from epp.tokenization.backends import TokenizerBackend, load_backend
from epp.tokenization.cache import EncodePlan, PrefixTokenCache
from epp.tokenization.server import SERVER_SPEC, ServerTokenizer

_RENDER_FIELDS = ("chat_template_kwargs", "add_generation_prompt", "continue_final_message", "tools", "documents",
                  "add_special_tokens", "chat_template")

Tokenizer = PrefixTokenCache | ServerTokenizer


def _encode_all(backend: TokenizerBackend, missing: list[tuple[str, bool]]) -> list[list[int]]:
    return [backend.encode(text, special) for text, special in missing]


@dataclass(slots=True)
class RequestTokenizer:
    default: Tokenizer | None
    per_model: dict[str, Tokenizer] = field(default_factory=dict)
    render_cache_size: int = 4096
    workers: int = 2
    max_queue: int = 64
    #: encode uncached text of at least this many characters on the worker pool
    offload_chars: int = 512
    _renders: OrderedDict[tuple[int, int], tuple[str, bool]] = field(default_factory=OrderedDict)
    _pool: ThreadPoolExecutor | None = None
    _queued: int = 0

    @classmethod
    def build(cls, default: str | None = None, per_model: Mapping[str, str] | None = None,
              max_segments: int = 8192, segment_chars: int = 512,
              server: Callable[[], ServerTokenizer] | None = None) -> RequestTokenizer:
        """Backends are loaded once per distinct spec ("builtin", "model-server" or a directory)."""
        loaded: dict[str, Tokenizer] = {}

        def load(spec: str) -> Tokenizer:
            t = loaded.get(spec)
            if t is None:
                if spec == SERVER_SPEC:
                    if server is None:
                        raise ValueError(f"tokenizer {SERVER_SPEC!r} is not available here")
                    t = server()
                else:
                    t = PrefixTokenCache(load_backend(spec), max_segments, segment_chars)
                loaded[spec] = t
            return t

        return cls(None if default is None else load(default), {m: load(s) for m, s in (per_model or {}).items()})

    def for_model(self, model: str) -> Tokenizer | None:
        return self.per_model.get(model, self.default)

    def tokenizers(self) -> list[Tokenizer]:
        out = [] if self.default is None else [self.default]
        return out + [t for t in self.per_model.values() if all(t is not o for o in out)]

    async def close(self) -> None:
        for t in self.tokenizers():
            if isinstance(t, ServerTokenizer):
                await t.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------ synchronous
    def tokenize(self, api: str, body: Mapping[str, Any], model: str) -> list[int] | None:
        """Tokenize on the calling thread (no worker pool, no model server)."""
        tok = self.for_model(model)
        if not isinstance(tok, PrefixTokenCache):
            return None
        try:
            text = self._text(tok, api, body)
        except Exception:  # a template error must not fail the request: score 0
            return None
        if text is None:
            return None
        if isinstance(text, list):
            return text
        return tok.encode(*text)

    # ------------------------------------------------------------------ asynchronous
    async def tokenize_async(self, api: str, body: Mapping[str, Any], model: str) -> tuple[list[int] | None, str]:
        """(ids or None, outcome): cached | inline | encoded | server | failed | overloaded | skipped."""
        tok = self.for_model(model)
        if tok is None:
            return None, "skipped"
        if isinstance(tok, ServerTokenizer):
            if api not in ("completions", "chat/completions"):
                return None, "skipped"
            ids = await tok.tokenize(api, body, model)
            return ids, "server" if ids is not None else "failed"
        try:
            text = self._text(tok, api, body)
        except Exception:  # a template error must not fail the request: score 0
            return None, "failed"
        if text is None:
            return None, "skipped"
        if isinstance(text, list):
            return text, "cached"
        plan: EncodePlan = tok.plan(*text)
        if not plan.missing:
            return tok.finish(plan, []), "cached"
        backend = tok.backend
        if plan.chars < self.offload_chars or not getattr(backend, "releases_gil", False):
            return tok.finish(plan, _encode_all(backend, plan.missing)), "inline"
        if self._queued >= self.max_queue:
            return None, "overloaded"
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="epp-tokenize")
        self._queued += 1
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(self._pool, _encode_all, backend, plan.missing)
        except Exception:
            return None, "failed"
        finally:
            self._queued -= 1
        return tok.finish(plan, encoded), "encoded"

    # ------------------------------------------------------------------ text
    def _text(self, tok: PrefixTokenCache, api: str, body: Mapping[str, Any]) -> tuple[str, bool] | list[int] | None:
        """(text, add_special_tokens) to encode, ids given directly, or None (not tokenizable)."""
        if api == "completions":
            return _prompt(body.get("prompt"), body)
        if api == "chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return None
            return self._render(tok, messages, body)
        return None

    def _render(self, tok: PrefixTokenCache, messages: list[Any], body: Mapping[str, Any]) -> tuple[str, bool]:
        try:
            key = (id(tok), xxh64_intdigest(orjson.dumps([messages, *(body.get(f) for f in _RENDER_FIELDS)])))
        except TypeError:  # not JSON-serialisable (e.g. an integer beyond 64 bits): no caching
            return tok.backend.render_chat(messages, dict(body))
        renders = self._renders
        hit = renders.get(key)
        if hit is not None:
            renders.move_to_end(key)
            return hit
        out = tok.backend.render_chat(messages, dict(body))
        renders[key] = out
        if len(renders) > self.render_cache_size:
            renders.popitem(last=False)
        return out


def _prompt(prompt: Any, body: Mapping[str, Any]) -> tuple[str, bool] | list[int] | None:
    if isinstance(prompt, str):
        return prompt, bool(body.get("add_special_tokens", True))
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if len(prompt) == 1:
            return _prompt(prompt[0], body)
    return None
