"""A tiny random-weight Llama and its tokenizer, made offline (no hub exists here or in CI).

It lets tests and the demo run the real vLLM engine path on any machine. The tokenizer is a
byte-level BPE trained on this interpreter's own stdlib sources; the chat template is ChatML.

    python -m worker_node.tiny_model OUT_DIR [--size tiny|small] [--seed 0] [--peaked]

Random weights give a nearly flat next-token distribution, where any token is as plausible as
another. `--peaked` scales the output layer so the distribution is sharp, like a trained
model's: what tests of sampled-output verification need (a made-up token must look unlikely).

`ensure_tiny_model` builds once into a cache folder (in a subprocess, so the caller never imports
torch) and reuses it afterwards.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECIPE_VERSION = 1  # bump when the output changes, so caches are rebuilt

SIZES: dict[str, dict[str, int]] = {
    # ~5.3M parameters with vocab 4096
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    # a second, different architecture so "wrong model" is detectable in trust tests
    "small": {
        "hidden_size": 320,
        "intermediate_size": 864,
        "num_hidden_layers": 3,
        "num_attention_heads": 5,
        "num_key_value_heads": 5,
    },
}
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
PEAKED_LOGIT_SCALE = 24.0  # output-layer scale of a peaked model: top-8 mass ~0.9 per step
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _local_corpus(max_files: int = 400) -> Iterator[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py")))[:max_files]:
        with open(path, encoding="utf-8", errors="ignore") as fh:
            yield fh.read()


def build(
    out: Path, size: str = "tiny", seed: int = 0, vocab_size: int = 4096, peaked: bool = False
) -> None:
    """Write a loadable model folder to `out` (imports torch/transformers: call in a subprocess)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(seed)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_local_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )
    model = LlamaForCausalLM(cfg)
    if peaked:
        with torch.no_grad():
            model.lm_head.weight.mul_(PEAKED_LOGIT_SCALE)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 writes tokenizer_class "TokenizersBackend"; the generic name loads everywhere
    tc_path = out / "tokenizer_config.json"
    tc: dict[str, Any] = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.setdefault("chat_template", CHAT_TEMPLATE)
    tc_path.write_text(json.dumps(tc, indent=2))


def default_cache_dir() -> Path:
    base = os.environ.get("AGORA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agora"
    )
    return Path(base) / "models"


def ensure_tiny_model(
    size: str = "tiny", cache_dir: Path | None = None, seed: int = 0, peaked: bool = False
) -> Path:
    """The cached model folder for `size`, built on first use."""
    name = f"{size}-s{seed}-r{RECIPE_VERSION}" + ("-peaked" if peaked else "")
    folder = (cache_dir or default_cache_dir()) / name
    if (folder / ".complete").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    cmd = [sys.executable, "-m", "worker_node.tiny_model", str(tmp), "--size", size]
    cmd += ["--seed", str(seed)] + (["--peaked"] if peaked else [])
    subprocess.run(cmd, check=True, capture_output=True)
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first; use theirs
        if not (folder / ".complete").exists():
            raise
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="Make a tiny random-weight Llama offline.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peaked", action="store_true", help="a sharp, trained-like distribution")
    args = parser.parse_args()
    build(args.out, args.size, args.seed, peaked=args.peaked)


if __name__ == "__main__":
    main()
