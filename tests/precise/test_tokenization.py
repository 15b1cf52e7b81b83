"""Request tokenization equals the engine's (simulator built-in and a local HF tokenizer), and
the prefix cache never changes the ids."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from epp.sim.tokenizer import HFTokenizer
from epp.tokenization import BuiltinBackend, HFBackend, PrefixTokenCache, RequestTokenizer
from epp.tokenization.builtin import BuiltinTokenizer

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda omicron sigma tau upsilon phi chi psi omega "
         "the of and to in is was for on that with as by it at from this be or are 12 345 6789 3.14 "
         "don't isn't (x) [y] {z} ; : , . ! ? - --").split()


def random_text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        w = rng.choice(WORDS)
        sep = rng.choice([" ", " ", " ", "  ", "\n", "\n\n", "\t", ""])
        out.append(w + sep)
    return "".join(out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE tokenizer with BOS and a ChatML template, trained here (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(1)
    tok.train_from_iterator([random_text(rng, 200) for _ in range(50)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML}))
    return d


def test_builtin_matches_the_simulator() -> None:
    rt = RequestTokenizer.build("builtin")
    sim = BuiltinTokenizer()
    rng = random.Random(0)
    for _ in range(30):
        text = random_text(rng, rng.randrange(1, 400))
        assert rt.tokenize("completions", {"prompt": text}, "m") == sim.encode_prompt(text)
        msgs = [{"role": "system", "content": text[:50]}, {"role": "user", "content": text}]
        assert rt.tokenize("chat/completions", {"messages": msgs}, "m") == sim.encode_chat(msgs)
    assert rt.tokenize("completions", {"prompt": [1, 2, 3]}, "m") == [1, 2, 3]
    assert rt.tokenize("embeddings", {"input": "x"}, "m") is None


def test_hf_matches_the_simulators_hf_tokenizer(hf_dir: Path) -> None:
    pytest.importorskip("jinja2")
    rt = RequestTokenizer.build(str(hf_dir))
    sim = HFTokenizer(str(hf_dir))
    rng = random.Random(2)
    for _ in range(30):
        text = random_text(rng, rng.randrange(1, 400))
        assert rt.tokenize("completions", {"prompt": text}, "m") == sim.encode_prompt(text)
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        assert rt.tokenize("chat/completions", {"messages": msgs}, "m") == sim.encode_chat(msgs)


@pytest.mark.parametrize("kind", ["builtin", "hf"])
def test_prefix_cache_is_exact_and_reuses_prefixes(kind: str, hf_dir: Path) -> None:
    backend = BuiltinBackend() if kind == "builtin" else HFBackend(str(hf_dir))
    cache = PrefixTokenCache(backend, segment_chars=64)
    assert cache.segmenting
    rng = random.Random(3)
    shared = random_text(rng, 300)
    for _ in range(20):
        text = shared + random_text(rng, rng.randrange(0, 100))
        for special in (True, False):
            assert cache.encode(text, special) == backend.encode(text, special)
    assert cache.stats.hits > 5 * cache.stats.misses


def test_per_model_tokenizers(hf_dir: Path) -> None:
    rt = RequestTokenizer.build("builtin", {"real-model": str(hf_dir)})
    assert rt.for_model("real-model").backend.name == str(hf_dir)
    assert rt.for_model("other").backend.name == "builtin"
