"""Peak memory of PPO against DPO on the same model and batch.

    python bench/peak_memory.py                      # the shipped demo model, CPU or the first GPU
    python bench/peak_memory.py --device cuda:0 --steps 30 --batch_size 32

Each run is a separate process of the real script (``--max_steps`` steps, written to a
temporary folder); its peak memory is the ``peak_mem_gb`` the training loop logs: CUDA memory
allocated by tensors on a GPU, the process's peak resident set size on CPU (which includes
Python, torch and the libraries, the same for every script). DPO runs --batch_size preference
pairs per step (2 x batch_size sequences in one forward); PPO runs --batch_size prompts with one
response each, then with its default --num_generations. The target: PPO at most 1.5x DPO.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core.runtime import add_device_arg  # noqa: E402  (the project's root is on the path from here)


def peak(script: str, args: list[str], steps: int, device: str) -> dict:
    """Run ``script`` for ``steps`` steps; its last metrics line (peak_mem_gb, tokens_per_sec, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, script), *args, "--max_steps", str(steps), "--device", device,
               "--log_interval", str(steps), "--save_interval", str(10 ** 6),
               "--save_dir", os.path.join(tmp, "out"), "--checkpoint_dir", os.path.join(tmp, "ck")]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        metrics = [f for f in os.listdir(os.path.join(tmp, "out")) if f.endswith("_metrics.jsonl")]
        with open(os.path.join(tmp, "out", metrics[0]), encoding="utf-8") as f:
            return json.loads(f.read().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    b = ["--batch_size", str(args.batch_size)]
    runs = {
        "dpo": peak("train_dpo.py", b, args.steps, args.device),
        "ppo (1 response per prompt)": peak("train_ppo.py", b + ["--num_generations", "1"], args.steps, args.device),
        "ppo (default: 4 per prompt)": peak("train_ppo.py", b, args.steps, args.device),
    }
    base = runs["dpo"]["peak_mem_gb"]
    kind = "CUDA allocated" if args.device.startswith("cuda") else "process RSS"
    print(f"peak memory ({kind}), demo model, --batch_size {args.batch_size}, {args.steps} steps, {args.device}")
    print("| run | peak GiB | x DPO |\n|---|---|---|")
    for name, m in runs.items():
        print(f"| {name} | {m['peak_mem_gb']:.3f} | {m['peak_mem_gb'] / base:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": args.device, "batch_size": args.batch_size, "steps": args.steps,
                       "peak_mem_gb": {k: m["peak_mem_gb"] for k, m in runs.items()}}, f, indent=2)
    ratio = runs["ppo (1 response per prompt)"]["peak_mem_gb"] / base
    print(f"PPO / DPO at the same batch: {ratio:.2f} (target <= 1.5): {'ok' if ratio <= 1.5 else 'OVER'}")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
