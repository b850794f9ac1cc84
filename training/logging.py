"""Run logging: a tqdm bar and a text line on rank 0, a metrics file, and wandb that never
stops a run.

The metrics file (``{save_dir}/{save_weight}_{hidden_size}[_moe]_metrics.jsonl``) gets one JSON
object per logged step whether or not wandb is on, so curves can be drawn without it.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from tqdm import tqdm

from core.files import atomic_file


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) and abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


class WandbLogger:
    """wandb, or nothing: any wandb failure warns once and training goes on.

    With no API key and no login, it runs offline (and says so) instead of asking.
    ``run_id`` resumes the same run after ``--from_resume 1``. Its files go where wandb's own
    WANDB_DIR says, and only when that is unset to ``{out_dir}/wandb`` (the run's --save_dir).
    """

    def __init__(self, project: str, name: str, config: dict, run_id: str | None = None, out_dir: str = "."):
        self.run = None
        try:
            # Imported here, when --use_wandb asks for it: a missing or broken wandb then only
            # disables this logger (caught below) instead of stopping every script at import.
            import wandb
            wandb_dir = os.environ.get("WANDB_DIR") or out_dir
            if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY") and not _wandb_logged_in():
                os.environ["WANDB_MODE"] = "offline"
                print(f"wandb: not logged in, logging offline (sync later with "
                      f"`wandb sync {os.path.join(wandb_dir, 'wandb', 'offline-run-*')}`)", flush=True)
            self.run = wandb.init(project=project, name=name, config=config, id=run_id,
                                  resume="allow" if run_id else None, dir=wandb_dir)
        except Exception as e:  # no network, bad key, wandb broken: warn, keep training
            print(f"warning: wandb disabled ({e.__class__.__name__}: {e}); metrics still go to the metrics file",
                  file=sys.stderr, flush=True)
            self.run = None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:
            print(f"warning: wandb log failed ({e}); disabling wandb", file=sys.stderr, flush=True)
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:
                pass
            self.run = None


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep only the rows up to ``last_step``: a fresh run starts an empty file, and a run resumed
    from an older checkpoint than its last logged step does not log those steps twice."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    if len(keep) != len(lines):
        with atomic_file(path, encoding="utf-8") as f:
            f.writelines(keep)


def _wandb_logged_in() -> bool:
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8", errors="ignore").read()


class RunLogger:
    """Everything a training loop reports, on rank 0 only (other ranks get a silent logger)."""

    def __init__(self, *, enabled: bool, total_steps: int, start_step: int, log_interval: int,
                 metrics_path: str | None, use_wandb: bool = False, wandb_project: str = "MiniAlign",
                 run_name: str = "run", config: dict | None = None, wandb_id: str | None = None,
                 desc: str = "train"):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.metrics_path = metrics_path
        # The bar only on a terminal: under nohup the log gets the text lines alone.
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                        disable=not (enabled and sys.stdout.isatty()), file=sys.stdout, mininterval=1.0)
        self.wandb = WandbLogger(wandb_project, run_name, config or {}, wandb_id,
                                 os.path.dirname(metrics_path) if metrics_path else ".") \
            if (enabled and use_wandb) else None
        self.t0 = time.time()
        if enabled and metrics_path:
            os.makedirs(os.path.dirname(metrics_path) or ".", exist_ok=True)
            _truncate_metrics(metrics_path, start_step)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.run_id if self.wandb is not None else None

    def step(self, step: int, metrics: dict, force: bool = False) -> None:
        """Advance the bar to ``step``; every log_interval steps (or with force) write the metrics."""
        if not self.enabled:
            return
        self.bar.n = step
        self.bar.refresh()
        if not (force or step % self.log_interval == 0):
            return
        metrics = {k: (float(v) if hasattr(v, "item") or isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self.bar.set_postfix({k: _fmt(metrics[k]) for k in ("loss", "lr") if k in metrics})
        line = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        tqdm.write(f"step {step}/{self.bar.total} {line} elapsed={time.time() - self.t0:.0f}s", file=sys.stdout)
        if self.metrics_path:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def info(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg, file=sys.stdout)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
