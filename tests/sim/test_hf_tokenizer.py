"""Optional Hugging Face tokenizer: ids come from tokenizer.json, chat from its Jinja template."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
import pytest

from epp.sim import SimConfig, SimPool

tokenizers = pytest.importorskip("tokenizers")


def _make_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = "<unk> <s> </s> hello world the quick brown fox user assistant : ,".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_bytes(orjson.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                         "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}",
    }))


async def test_hf_token_ids_and_chat_template(tmp_path: Path, fast_config: SimConfig) -> None:
    _make_tokenizer(tmp_path)
    async with SimPool(fast_config.replace(tokenizer=str(tmp_path)), replicas=1) as pool, \
            aiohttp.ClientSession() as s:
        url = pool.pods[0].url
        r = await s.post(f"{url}/v1/completions", json={"model": "sim-model", "prompt": "hello world",
                                                         "max_tokens": 3})
        out = await r.json()
        assert out["usage"]["prompt_tokens"] == 3  # <s> hello world
        assert out["choices"][0]["text"]
        r = await s.post(f"{url}/v1/chat/completions", json={
            "model": "sim-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1})
        # <s> user : hello assistant :
        assert (await r.json())["usage"]["prompt_tokens"] == 6
