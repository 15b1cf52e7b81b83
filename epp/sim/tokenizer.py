"""Turning prompts into token ids, and generating deterministic output tokens.

Token ids are what the KV cache hashes, so they decide prefix-cache hits and the block hashes
published in KV events. The built-in tokenizer is deterministic across processes and machines
(xxhash, no PYTHONHASHSEED dependence) and prefix-stable (a shared text prefix gives a shared id
prefix), which is all prefix caching needs. When the picker must compute the *same* ids as the
server (precise prefix-cache scoring with a real tokenizer), point ``--tokenizer`` at a local
Hugging Face tokenizer directory; the optional ``tokenizers`` (and ``jinja2`` for chat
templates) packages are then used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from epp.tokenization.builtin import FILLER, BuiltinTokenizer, render_simple_chat


class Tokenizer(Protocol):
    """What the server needs from a tokenizer."""

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a completion prompt (with BOS, as vLLM adds special tokens)."""
        ...

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of a chat conversation rendered with the chat template + generation prompt."""
        ...

    def output_tokens(self) -> tuple[list[int], list[bytes]]:
        """The filler output cycle: token ids and their JSON-encoded text pieces."""
        ...


@dataclass(slots=True)
class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (+ chat template from ``tokenizer_config.json``).

    Mirrors vLLM: completion prompts are encoded with special tokens (BOS); chat prompts are
    rendered with the model's template and ``add_generation_prompt=True`` and encoded without
    adding special tokens again (the template already contains them).
    """

    directory: str
    _tok: Any = None
    _template: Any = None
    _bos: str = ""
    _eos: str = ""

    def __post_init__(self) -> None:
        try:
            from tokenizers import Tokenizer as _HF  # optional dependency
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "--tokenizer needs the optional 'tokenizers' package (pip install 'epp[hf]')"
            ) from exc
        d = Path(self.directory)
        self._tok = _HF.from_file(str(d / "tokenizer.json"))
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = orjson.loads(cfg_path.read_bytes())
            self._bos = _token_text(cfg.get("bos_token"))
            self._eos = _token_text(cfg.get("eos_token"))
            template = cfg.get("chat_template")
            if isinstance(template, list):  # named templates: take "default"
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if isinstance(template, str):
                try:
                    import jinja2  # optional dependency
                except ImportError:
                    template = None
                else:
                    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
                    self._template = env.from_string(template)

    def encode_prompt(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if self._template is None:
            return self.encode_prompt(render_simple_chat(messages))
        text = self._template.render(
            messages=messages, add_generation_prompt=True, bos_token=self._bos, eos_token=self._eos
        )
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def output_tokens(self) -> tuple[list[int], list[bytes]]:
        ids = list(self._tok.encode(" " + FILLER, add_special_tokens=False).ids) or [0]
        texts = []
        prev = ""
        for i in range(len(ids)):
            cur = self._tok.decode(ids[: i + 1])
            texts.append(orjson.dumps(cur[len(prev):]))
            prev = cur
        return ids, texts


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return str(tok.get("content", ""))
    return tok if isinstance(tok, str) else ""


def load_tokenizer(directory: str | None) -> Tokenizer:
    """The built-in tokenizer, or a Hugging Face one when a directory is given."""
    if directory:
        return HFTokenizer(directory)
    return BuiltinTokenizer()
