"""A completion request body → a validated ``Sequence``, with vLLM's error messages.

The checks and their wording follow vLLM 0.32's OpenAI server (unknown model → 404, context
length → 400 with the same sentence, ...), because routers and clients key on them; the
server module only maps :class:`RequestError` to the ``{"error": {...}}`` response.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from epp.sim.config import LoraModule, SimConfig
from epp.sim.sequence import Sequence
from epp.sim.tokenizer import Tokenizer


class RequestError(Exception):
    """A request the server answers with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass(slots=True, frozen=True)
class ParsedRequest:
    """What the server needs from a valid completion body."""

    model: str  # as requested (a served name or a LoRA adapter): echoed in the response
    seq: Sequence
    stream: bool
    include_usage: bool  # streaming with ``stream_options.include_usage``


def parse_completion(body: Any, chat: bool, cfg: SimConfig, tokenizer: Tokenizer,
                     loras: Mapping[str, LoraModule], lora_ids: Mapping[str, int]) -> ParsedRequest:
    """Validate a ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions`` body.

    ``loras``/``lora_ids``: the adapters loaded right now (a model name may name one).
    Raises :class:`RequestError` with vLLM's status and message.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "Request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "The 'model' field is required.", "model")
    lora: LoraModule | None = None
    if model not in cfg.served_model_names:
        lora = loras.get(model)
        if lora is None:
            raise RequestError(404, f"The model `{model}` does not exist. "
                                    f"Valid aliases: {', '.join(cfg.served_model_names)}.", "model")
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(400, "The simulator supports n=1 only.", "n")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list.", "messages")
        ids = tokenizer.encode_chat(messages)
    else:
        ids = _prompt_ids(body.get("prompt"), tokenizer)
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = cfg.default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens!r}.", "max_tokens")
    total = len(ids) + max_tokens
    if total > cfg.max_model_len:
        raise RequestError(
            400,
            f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
            f"{total} tokens ({len(ids)} in the messages, {max_tokens} in the completion). Please reduce "
            "the length of the messages or completion.",
        )
    if -(-total // cfg.block_size) > cfg.num_gpu_blocks - 1:
        raise RequestError(400, f"Request needs {total} tokens of KV cache; the pod has "
                                f"{(cfg.num_gpu_blocks - 1) * cfg.block_size}.")
    ktp = body.get("kv_transfer_params")
    remote_decode = remote_prefill = False
    if isinstance(ktp, dict):
        remote_decode = bool(ktp.get("do_remote_decode"))
        remote_prefill = bool(ktp.get("do_remote_prefill"))
    stream = bool(body.get("stream"))
    so = body.get("stream_options")
    include_usage = stream and isinstance(so, dict) and bool(so.get("include_usage"))
    prefix = "chatcmpl-" if chat else "cmpl-"
    seq = Sequence(
        request_id=prefix + os.urandom(16).hex(),
        token_ids=ids,
        max_tokens=max_tokens,
        lora=lora,
        lora_id=lora_ids.get(lora.name) if lora else None,
        remote_prefill=remote_prefill,
        remote_decode=remote_decode,
    )
    return ParsedRequest(model, seq, stream, include_usage)


def _prompt_ids(prompt: Any, tokenizer: Tokenizer) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode_prompt(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if len(prompt) == 1:
            return _prompt_ids(prompt[0], tokenizer)
        raise RequestError(400, "The simulator supports one prompt per request.", "prompt")
    raise RequestError(400, "'prompt' must be a string or a list of token ids.", "prompt")
