"""A random LoRA adapter for the tiny Llama (worker_node.tiny_model), made offline.

    python -m worker_node.tiny_lora BASE_MODEL_DIR OUT_DIR [--rank 8] [--seed 1]

Rank-R `q_proj`/`v_proj` weights with large enough B that the adapter's output differs from
the base model's: what tests and `agora bench adapters` load, fetch and route. Needs numpy and
safetensors (both come with the engine, the `worker` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_lora(base: Path, out: Path, rank: int = 8, seed: int = 1) -> Path:
    import numpy as np  # the engine's dependencies: imported only to build one
    from safetensors.numpy import save_file

    cfg = json.loads((base / "config.json").read_text())
    hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    kv_out = hidden * int(cfg["num_key_value_heads"]) // int(cfg["num_attention_heads"])
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(layers):
        for module, width in (("q_proj", hidden), ("v_proj", kv_out)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                rng.standard_normal((rank, hidden)) * 0.05
            ).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((width, rank)) * 0.5).astype(
                np.float32
            )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.name, "fan_in_fan_out": False,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Make a random LoRA adapter for a tiny Llama.")
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(build_lora(args.base, args.out, args.rank, args.seed))


if __name__ == "__main__":
    main()
