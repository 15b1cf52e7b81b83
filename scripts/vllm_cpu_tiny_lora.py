"""Write a tiny random LoRA adapter (PEFT layout) for the tiny model of the real-vLLM tier.

    python scripts/vllm_cpu_tiny_lora.py --model $HOME/.cache/vllm-cpu/tiny-llama --out DIR [--rank 8]

Targets ``q_proj`` and ``v_proj`` of every layer, shapes from the model's ``config.json``;
``adapter_config.json`` + ``adapter_model.safetensors`` (float32). Standard library only: the
safetensors file is an 8-byte little-endian header length, a JSON header of tensor offsets,
then the raw tensors — written here directly, so no torch/peft is needed and nothing is
downloaded. Used by tests/placement/test_vllm.py (runtime load/unload through the picker).
"""

from __future__ import annotations

import argparse
import json
import random
import struct
from pathlib import Path


def tensors(config: dict[str, int], rank: int, seed: int) -> dict[str, tuple[list[int], bytes]]:
    rng = random.Random(seed)
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", hidden // heads)
    out = {"q_proj": heads * head_dim, "v_proj": kv_heads * head_dim}
    result: dict[str, tuple[list[int], bytes]] = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out_dim in out.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            pairs = ((f"{prefix}.lora_A.weight", [rank, hidden]), (f"{prefix}.lora_B.weight", [out_dim, rank]))
            for name, shape in pairs:
                n = shape[0] * shape[1]
                data = struct.pack(f"<{n}f", *(rng.gauss(0.0, 0.02) for _ in range(n)))
                result[name] = (shape, data)
    return result


def write_safetensors(path: Path, named: dict[str, tuple[list[int], bytes]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, data) in named.items():
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the header is padded to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, data in named.values():
            f.write(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the tiny model directory (its config.json)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = json.loads((Path(args.model) / "config.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors(config, args.rank, args.seed))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.rank, "lora_alpha": 2 * args.rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": str(args.model),
    }, indent=1))
    print(json.dumps({"adapter": str(out), "rank": args.rank}))


if __name__ == "__main__":
    main()
