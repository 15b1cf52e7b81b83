"""Tokenizer backends: encode text, render chat messages the way the engine does.

* ``BuiltinBackend`` — the simulator's deterministic tokenizer (``epp.sim.tokenizer``), the
  default, so pools of simulated pods work with no model files. Chat is rendered with the
  simulator's fixed layout and encoded with BOS, as the simulator does.
* ``HFBackend`` — a local Hugging Face tokenizer directory (the model's own files: no download).
  Mirrors vLLM's OpenAI server: completion prompts are encoded with special tokens
  (``add_special_tokens`` defaults to true); chat messages are rendered with the model's Jinja
  chat template (``tokenizer_config.json`` ``chat_template``, or ``chat_template.jinja``) with
  ``add_generation_prompt`` and the tokenizer's special tokens, then encoded *without* adding
  special tokens again. Needs the optional ``tokenizers`` and ``jinja2`` packages
  (``pip install 'epp[hf]'``).

Limits (docs/precise-prefix.md): text-only content (image/audio parts are skipped, so prompts
with media never match exactly); templates that call Python-only helpers beyond
``raise_exception`` / ``strftime_now`` fail to render and the request scores 0.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from epp.tokenization.builtin import BuiltinTokenizer, message_text, render_simple_chat


class TokenizerBackend(Protocol):
    name: str

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def special_prefix(self) -> list[int] | None:
        """Ids ``add_special_tokens`` puts in front (e.g. BOS); None when special tokens are not
        a pure prefix (then text cannot be tokenized piecewise with them)."""
        ...

    def render_chat(self, messages: list[Any], body: dict[str, Any]) -> tuple[str, bool]:
        """(prompt text, whether to add special tokens when encoding it)."""
        ...


class BuiltinBackend:
    name = "builtin"
    #: pure Python: encoding on a worker thread would only contend for the GIL
    releases_gil = False

    def __init__(self) -> None:
        self._tok = BuiltinTokenizer()

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self._tok.encode_prompt(text)
        return ids if add_special_tokens else ids[1:]

    def special_prefix(self) -> list[int] | None:
        return self._tok.encode_prompt("")

    def render_chat(self, messages: list[Any], body: dict[str, Any]) -> tuple[str, bool]:
        return render_simple_chat(messages), True


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):
        content = tok.get("content")
        return content if isinstance(content, str) else None
    return tok if isinstance(tok, str) else None


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _vllm_message(m: Any) -> dict[str, Any]:
    """A message as vLLM hands it to a "string"-content template: list content → text parts
    joined with newlines; other fields (name, tool_calls, tool_call_id, ...) kept."""
    if not isinstance(m, dict):
        return {"role": "user", "content": str(m)}
    out = dict(m)
    content = m.get("content")
    if isinstance(content, list):
        parts: list[str] = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
        out["content"] = "\n".join(parts)
    elif content is None and "content" in m:
        out["content"] = None
    elif content is not None and not isinstance(content, str):
        out["content"] = message_text(content)
    return out


class HFBackend:
    #: ``tokenizers`` encodes in Rust with the GIL released: worth a worker thread
    releases_gil = True

    def __init__(self, directory: str) -> None:
        try:
            from tokenizers import Tokenizer  # optional dependency
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValueError(f"tokenizer {directory!r} needs the optional 'tokenizers' package "
                             "(pip install 'epp[hf]')") from exc
        d = Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer directory {directory!r} has no tokenizer.json")
        self.name = str(d)
        self._tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self._specials: dict[str, str] = {}
        template: Any = None
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = orjson.loads(cfg_path.read_bytes())
            for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
                t = _token_text(cfg.get(k))
                if t is not None:
                    self._specials[k] = t
            template = cfg.get("chat_template")
            if isinstance(template, list):  # named templates: vLLM uses "default"
                template = next((t.get("template") for t in template
                                 if isinstance(t, dict) and t.get("name") == "default"), None)
        jinja_file = d / "chat_template.jinja"
        if jinja_file.is_file():  # newer transformers save it beside the config (takes precedence)
            template = jinja_file.read_text()
        self._template: Any = None
        if isinstance(template, str):
            try:
                from jinja2.ext import loopcontrols
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError as exc:  # pragma: no cover
                raise ValueError(f"tokenizer {directory!r} has a chat template; rendering it needs the "
                                 "optional 'jinja2' package (pip install 'epp[hf]')") from exc
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "sort_keys": False}
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(template)
        self._prefix = self._compute_prefix()

    def _compute_prefix(self) -> list[int] | None:
        probe = "hello world"
        plain = self.encode(probe, False)
        full = self.encode(probe, True)
        n = len(full) - len(plain)
        if n >= 0 and full[n:] == plain:
            return full[:n]
        return None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def special_prefix(self) -> list[int] | None:
        return self._prefix

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(self, messages: list[Any], body: dict[str, Any]) -> tuple[str, bool]:
        if self._template is None:
            raise ValueError("the tokenizer has no chat template")
        kwargs: dict[str, Any] = dict(self._specials)
        extra = body.get("chat_template_kwargs")
        if isinstance(extra, dict):
            kwargs.update(extra)
        add_gen = body.get("add_generation_prompt", True)
        if body.get("continue_final_message"):
            add_gen = False
        tools = body.get("tools")
        text = self._template.render(
            messages=[_vllm_message(m) for m in messages],
            add_generation_prompt=bool(add_gen),
            tools=tools if isinstance(tools, list) and tools else None,
            documents=body.get("documents"),
            **kwargs,
        )
        return text, bool(body.get("add_special_tokens", False))


def load_backend(spec: str | None) -> TokenizerBackend:
    """``None`` / ``"builtin"`` → the built-in tokenizer; anything else is a local directory."""
    if spec is None or spec == "builtin":
        return BuiltinBackend()
    return HFBackend(spec)
