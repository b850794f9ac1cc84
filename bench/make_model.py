"""A larger Hugging Face-format model for bench/run.py, of this project's own making: MiniMind's
architecture (transformers Qwen3) at a chosen size, randomly initialised, with the project's
tokenizer. A step's speed and memory at given lengths do not depend on what the weights have
learned, but what GPO/GRPO samples does: random weights never end an answer, so every sample
runs to --max_gen_len. --sft_steps N also saves a copy trained N steps of SFT on the demo data
(train_sft.py, batch 32), which ends its answers as a fine-tuned model does.

    python bench/make_model.py                            # bench/models/qwen3_h640_l8 (42.0M parameters)
    python bench/make_model.py --sft_steps 160            # and bench/models/qwen3_h640_l8_sft (about 8 minutes on 2 cores)
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
    p.add_argument("--sft_steps", type=int, default=0,
                   help="also save a copy trained this many SFT steps on dataset/sft.jsonl, as OUT_sft (default: 0)")
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
    if a.sft_steps > 0:
        import shutil
        import tempfile
        import train_sft
        with tempfile.TemporaryDirectory() as tmp:
            args = train_sft.parse_args(["--from_weight", out, "--max_steps", str(a.sft_steps), "--learning_rate", "1e-3",
                                         "--save_dir", tmp, "--save_weight", "sft", "--checkpoint_dir", tmp,
                                         "--seed", str(a.seed), "--log_interval", "20"])
            trained = train_sft.main(args)
            shutil.rmtree(out + "_sft", ignore_errors=True)
            shutil.copytree(trained, out + "_sft")
        print(f"{out}_sft: the same model after {a.sft_steps} SFT steps")


if __name__ == "__main__":
    main()
