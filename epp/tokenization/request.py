"""OpenAI request body → the token ids the engine will compute for it.

Completions: ``prompt`` as a string (encoded with special tokens unless the body says
``add_special_tokens: false``), a list of token ids (used as is), or a one-element list of
either. Chat completions: ``messages`` rendered by the backend's chat template. Other APIs
(responses, embeddings, ...) return None: the precise scorer then scores every endpoint 0 and
the other scorers decide.

Tokenizers are chosen per target model (``tokenizers`` map) with a default; LoRA adapters
use their base model's tokenizer through the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from epp.tokenization.backends import TokenizerBackend, load_backend
from epp.tokenization.cache import PrefixTokenCache


@dataclass(slots=True)
class RequestTokenizer:
    default: PrefixTokenCache
    per_model: dict[str, PrefixTokenCache] = field(default_factory=dict)

    @classmethod
    def build(cls, default: str | None = None, per_model: Mapping[str, str] | None = None,
              max_segments: int = 8192, segment_chars: int = 512) -> RequestTokenizer:
        """Backends are loaded once per distinct spec ("builtin" or a directory)."""
        loaded: dict[str, PrefixTokenCache] = {}

        def cache_for(spec: str | None) -> PrefixTokenCache:
            key = spec or "builtin"
            c = loaded.get(key)
            if c is None:
                backend: TokenizerBackend = load_backend(key)
                c = loaded[key] = PrefixTokenCache(backend, max_segments, segment_chars)
            return c

        return cls(cache_for(default), {m: cache_for(s) for m, s in (per_model or {}).items()})

    def for_model(self, model: str) -> PrefixTokenCache:
        return self.per_model.get(model, self.default)

    def tokenize(self, api: str, body: Mapping[str, Any], model: str) -> list[int] | None:
        cache = self.for_model(model)
        if api == "completions":
            return self._prompt(cache, body.get("prompt"), body)
        if api == "chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return None
            try:
                text, special = cache.backend.render_chat(messages, dict(body))
            except Exception:  # a template error must not fail the request: score 0
                return None
            return cache.encode(text, special)
        return None

    def _prompt(self, cache: PrefixTokenCache, prompt: Any, body: Mapping[str, Any]) -> list[int] | None:
        if isinstance(prompt, str):
            return cache.encode(prompt, bool(body.get("add_special_tokens", True)))
        if isinstance(prompt, list) and prompt:
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return list(prompt)
            if len(prompt) == 1:
                return self._prompt(cache, prompt[0], body)
        return None
