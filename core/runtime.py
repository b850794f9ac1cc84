"""Where and how a run executes: device, precision, seeding, torchrun/DDP.

CPU runs are plain fp32 (exact and reproducible, which the resume tests rely on). On CUDA,
``--dtype bfloat16`` (the default, as in MiniMind) runs the forward under bf16 autocast with
fp32 master weights; ``float16`` adds a GradScaler; ``float32`` turns autocast off.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from core.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def add_device_arg(group) -> None:
    """--device, whose default is this machine's first GPU, else the CPU (said so in --help, whatever
    machine writes it)."""
    group.add_argument("--device", default=default_device(),
                       help="cpu or cuda:N (default: cuda:0 when the machine has a GPU, else cpu)")


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device, or a UserError that says which devices this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is not a device; use cpu or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= n:
            have = f"CUDA devices cuda:0..cuda:{n - 1}" if n else "no CUDA device"
            raise UserError(f"--device {device}: this machine has {have}; use --device cpu"
                            + (" or one of those" if n else ""))
        return torch.device("cuda", index)
    if dev.type not in ("cpu", "mps"):
        raise UserError(f"--device {device!r} is not supported; use cpu or cuda:N")
    return dev


def autocast_context(device: torch.device, dtype: str):
    """bf16/fp16 autocast on CUDA; nothing on CPU or with float32."""
    if device.type != "cuda" or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=DTYPES[dtype])


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 on CUDA (a no-op otherwise, so the loop is one)."""
    return torch.amp.GradScaler("cuda", enabled=(device.type == "cuda" and dtype == "float16"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass
class DistInfo:
    """This process's place among the torchrun processes, and the collectives every rank calls
    at the same point (each does nothing with one process)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")     # where the collectives' tensors live (NCCL: the GPU)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all_mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value."""
        if not self.enabled or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor (a copy; the tensor itself is left as it is)."""
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's values (the same shape on every rank), concatenated in rank order, on CPU."""
        if not self.enabled:
            return values
        t = values.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return torch.cat(out).cpu()

    def all_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if launched by torchrun (NCCL on CUDA, gloo on CPU).

    Returns the rank info and the device this process uses: under torchrun with CUDA,
    ``cuda:LOCAL_RANK`` whatever ``--device`` said; otherwise ``--device``.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        dev = check_device(device)
        return DistInfo(device=dev), dev
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    dev = check_device(device)
    if dev.type == "cuda":
        dev = check_device(f"cuda:{info.local_rank}")
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    info.device = dev
    return info, dev


def to_device(batch: dict, device) -> dict:
    """A collated batch with its tensors moved to ``device`` (other values, e.g. lengths, as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def peak_memory_gb(device: torch.device) -> float:
    """The process's peak memory so far, in GiB: CUDA memory allocated by tensors on a GPU, the
    resident set size (everything: libraries, weights, activations) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource   # here: it exists on Linux and macOS only, and only this CPU figure needs it
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 30 if sys.platform == "darwin" else rss / 2 ** 20    # bytes on macOS, KiB on Linux


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
