"""A larger Hugging Face-format model for bench/run.py, of this project's own making: MiniMind's
architecture (transformers Qwen3) at a chosen size, randomly initialised, with the project's
tokenizer. Speed and memory do not depend on what the weights have learned.

    python bench/make_model.py                            # bench/models/qwen3_h640_l8 (about 45M parameters)
    python bench/make_model.py --hidden_size 768 --num_hidden_layers 12 --out bench/models/big
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden_size", type=int, default=640)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default: bench/models/qwen3_h{hidden}_l{layers}")
    a = p.parse_args(argv)
    import torch
    from model import LMConfig, init_model
    torch.manual_seed(a.seed)
    model, tok = init_model(LMConfig(hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers), "none")
    out = a.out or os.path.join(ROOT, "bench", "models", f"qwen3_h{a.hidden_size}_l{a.num_hidden_layers}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {n / 1e6:.1f}M parameters (hidden {a.hidden_size}, {a.num_hidden_layers} layers)")


if __name__ == "__main__":
    main()
