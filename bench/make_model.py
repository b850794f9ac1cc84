"""A larger Hugging Face-format model for bench/run.py, of this project's own making: MiniMind's
architecture (transformers Qwen3) at a chosen size, randomly initialised, with the project's
tokenizer. A step's speed and memory at given lengths do not depend on what the weights have
learned, but what GPO/GRPO samples does: random weights never end an answer, so every sample
runs to --max_gen_len. --sft_steps N also saves a copy trained N steps of SFT on the demo data
(train_sft.py, batch 32), which ends its answers as a fine-tuned model does.

    python bench/make_model.py                            # bench/models/qwen3_h640_l8 (42.0M parameters)
    python bench/make_model.py --sft_steps 160            # and bench/models/qwen3_h640_l8_sft (about 8 minutes on 2 cores)
    python bench/make_model.py --hidden_size 768 --num_hidden_layers 12 --out bench/models/big
    python bench/make_model.py --hidden_size 1024 --num_hidden_layers 24 --num_attention_heads 16 \
        --num_key_value_heads 8 --intermediate_size 3072 --vocab_size 151936   # bench/gpu_check.py's 0.46B shape
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_sft  # noqa: E402  (the project's root is on the path from here)
from model import LMConfig, build_model, load_tokenizer  # noqa: E402


def save_random_model(out: str, hidden_size: int, num_hidden_layers: int, *, num_attention_heads: int = 8,
                      num_key_value_heads: int = 4, intermediate_size: int | None = None,
                      vocab_size: int | None = None, seed: int = 0) -> int:
    """A randomly initialised Qwen3 of this shape with the project's tokenizer, saved to ``out``
    (a Hugging Face folder). vocab_size: the tokenizer's own size when None; a larger one (a real
    model's vocabulary) leaves the rows past the tokenizer unused by the data but not by the
    output head. Returns the number of parameters."""
    tok = load_tokenizer(None)
    torch.manual_seed(seed)
    model = build_model(LMConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                                 num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                                 intermediate_size=intermediate_size, vocab_size=vocab_size or len(tok),
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id))
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden_size", type=int, default=640)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--num_attention_heads", type=int, default=8)
    p.add_argument("--num_key_value_heads", type=int, default=4)
    p.add_argument("--intermediate_size", type=int, default=None, help="default: ceil(hidden * pi / 64) * 64, MiniMind's")
    p.add_argument("--vocab_size", type=int, default=None, help="default: the project tokenizer's size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: bench/models/qwen3_h{hidden}_l{layers}")
    p.add_argument("--sft_steps", type=int, default=0,
                   help="also save a copy trained this many SFT steps on dataset/sft.jsonl, as OUT_sft (default: 0)")
    a = p.parse_args(argv)
    out = a.out or os.path.join(ROOT, "bench", "models", f"qwen3_h{a.hidden_size}_l{a.num_hidden_layers}")
    n = save_random_model(out, a.hidden_size, a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
                          num_key_value_heads=a.num_key_value_heads, intermediate_size=a.intermediate_size,
                          vocab_size=a.vocab_size, seed=a.seed)
    print(f"{out}: {n / 1e6:.1f}M parameters (hidden {a.hidden_size}, {a.num_hidden_layers} layers)")
    if a.sft_steps > 0:
        with tempfile.TemporaryDirectory() as tmp:
            args = train_sft.parse_args(["--from_weight", out, "--stop_after_steps", str(a.sft_steps),
                                         "--learning_rate", "1e-3",
                                         "--save_dir", tmp, "--save_weight", "sft", "--checkpoint_dir", tmp,
                                         "--seed", str(a.seed), "--log_interval", "20"])
            trained = train_sft.main(args)
            shutil.rmtree(out + "_sft", ignore_errors=True)
            shutil.copytree(trained, out + "_sft")
        print(f"{out}_sft: the same model after {a.sft_steps} SFT steps")


if __name__ == "__main__":
    main()
