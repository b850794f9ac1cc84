"""Draw the training curves of one or more runs to a PNG, from their metrics files (no wandb needed).

    python plot_curves.py out/dpo_192_metrics.jsonl                         # -> out/dpo_192_curves.png
    python plot_curves.py out/dpo_192_metrics.jsonl out/gpo_192_metrics.jsonl --out compare.png
    python plot_curves.py out/ppo_actor_192_metrics.jsonl --metrics reward,kl,value_loss,explained_variance

Every training script writes ``{save_dir}/{save_weight}_{hidden_size}_metrics.jsonl``, one
JSON object per logged step. Each panel is one metric against the step, one line per run; a
metric a run did not log is left out of its panel, and a panel no run logged is not drawn.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import matplotlib

from core.errors import UserError, check_args, run_cli

matplotlib.use("Agg")                # files only, no display: it must come before pyplot's import
import matplotlib.pyplot as plt  # noqa: E402

# Loss, then what each method optimises (DPO's margins, the RL reward), KL, length, learning rate.
DEFAULT_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "accuracy", "reward", "kl", "value_loss",
                   "completions/mean_length", "lr")


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics file; a line cut short by a crash is skipped, anything else stops."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such metrics file; training writes {{save_dir}}/{{save_weight}}_{{hidden_size}}"
                        f"_metrics.jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines):       # the last line of a run killed mid-write
                continue
            raise UserError(f"{path}:{i}: not a JSON line; is this a metrics file?")
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f'{path}:{i}: no "step" field; is this a metrics file?')
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no logged steps yet")
    return rows


def series(rows: list[dict], metric: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[metric])) for r in rows
           if isinstance(r.get(metric), (int, float)) and math.isfinite(float(r[metric]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def run_label(path: str) -> str:
    name = os.path.basename(path)
    return name[:-len("_metrics.jsonl")] if name.endswith("_metrics.jsonl") else name


def plot(paths: list[str], out: str, metrics: list[str] | None = None) -> list[str]:
    """Write the PNG; returns the metrics drawn."""
    labels = [run_label(p) for p in paths]
    if len(set(labels)) < len(labels):   # the same run name in several folders: name the folders too
        labels = [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), l) for p, l in zip(paths, labels)]
    runs = [(label, read_metrics(p)) for label, p in zip(labels, paths)]
    wanted = metrics or list(DEFAULT_METRICS)
    drawn = [m for m in wanted if any(series(rows, m)[0] for _, rows in runs)]
    if not drawn:
        have = sorted({k for _, rows in runs for r in rows for k in r if k != "step"})
        raise UserError(f"none of {','.join(wanted)} is in the metrics; these are: {','.join(have)}")
    cols = min(3, len(drawn))
    nrows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, drawn):
        for label, rows in runs:
            steps, values = series(rows, metric)
            if steps:
                ax.plot(steps, values, label=label, linewidth=1.4, marker="o" if len(steps) < 15 else None,
                        markersize=3)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(4, len(runs)), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94 if nrows == 1 else 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    p = argparse.ArgumentParser(description="Training curves of one or more runs (their *_metrics.jsonl) to a PNG.")
    p.add_argument("metrics_files", nargs="+", help="metrics files written by the training scripts")
    p.add_argument("--out", default=None, help="PNG to write (default: next to the first file, *_curves.png)")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated metrics, one panel each (default: those of {','.join(DEFAULT_METRICS)} "
                        f"that were logged)")
    return p


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


def plot_problems(args) -> list[str]:
    """What is wrong with the flags."""
    return [f"--out {args.out}: give a .png file name"] if args.out and not args.out.lower().endswith(".png") else []


def main(args):
    check_args(args, plot_problems)
    out = args.out or os.path.join(os.path.dirname(args.metrics_files[0]),
                                   run_label(args.metrics_files[0]) + "_curves.png")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    drawn = plot(args.metrics_files, out, metrics)
    print(f"wrote {out} ({', '.join(drawn)})")
    return out


if __name__ == "__main__":
    run_cli(main, parse_args)
