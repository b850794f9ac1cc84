"""Which examples each step reads, and where a run is: a seeded, resumable, rank-sliced order
of the data, and the state the loop carries from step to step (and a resume file holds).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.errors import UserError
from core.runtime import DistInfo


class DataOrder:
    """A seeded shuffle of the dataset per epoch, cut into micro-batches for this rank.

    Micro-batches are counted globally across epochs (``micro``), so a resume only needs that
    one number. Each epoch uses ``n // (batch_size * world_size)`` full micro-batches per rank
    (the rest of the shuffle is dropped, so every rank does the same number of steps).
    """

    def __init__(self, n: int, batch_size: int, epochs: int, accumulation_steps: int, seed: int,
                 dist_info: DistInfo, what: str = "examples"):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.micro_per_step = accumulation_steps   # data micro-batches per optimizer step (RL: 1 prompt batch)
        self.rank, self.world = dist_info.rank, dist_info.world_size
        self.batches_per_epoch = n // (batch_size * self.world)
        if self.batches_per_epoch == 0:
            raise UserError(f"--batch_size {batch_size} x {self.world} process(es) is more than the {n} {what} "
                            f"in the data; lower --batch_size")
        self.total_micro = epochs * self.batches_per_epoch
        self.total_steps = self.total_micro // accumulation_steps
        if self.total_steps == 0:
            raise UserError(f"--accumulation_steps {accumulation_steps} is more than the {self.total_micro} "
                            f"micro-batches of the whole run; lower it")
        self._perm_epoch, self._perm = None, None

    def _epoch_perm(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm

    def batch(self, micro: int) -> list[int]:
        """Dataset indices of global micro-batch ``micro`` on this rank."""
        epoch, b = divmod(micro, self.batches_per_epoch)
        per_rank = self._epoch_perm(epoch)[self.rank:: self.world]
        return per_rank[b * self.batch_size: (b + 1) * self.batch_size]

    def used(self, start_micro: int, stop_micro: int) -> set[int]:
        """Dataset indices that micro-batches ``start_micro`` to ``stop_micro - 1`` read on any rank.
        Micro-batch b of an epoch on rank r is perm[r::world][b*bs:(b+1)*bs], so on all ranks
        together it is perm[b*bs*world:(b+1)*bs*world]."""
        span, used = self.batch_size * self.world, set()
        for micro in range(start_micro, stop_micro):
            if len(used) == self.n:
                break
            epoch, b = divmod(micro, self.batches_per_epoch)
            used.update(self._epoch_perm(epoch)[b * span: (b + 1) * span])
        return used

    def epoch_of(self, micro: int) -> int:
        return micro // self.batches_per_epoch


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    micro: int = 0           # micro-batches done
    extra: dict = field(default_factory=dict)
    wandb_id: str | None = None
    bad_steps: int = 0       # steps skipped for a non-finite loss or gradients, in all
    bad_in_row: int = 0      # ... in a row up to now


def rescaled_position(micro: int, saved_world: int, world: int, micro_per_step: int) -> tuple[int, int]:
    """(step, micro) on ``world`` processes that have seen the examples ``micro`` micro-batches
    on ``saved_world`` processes saw (rounded down to a whole step). micro_per_step: data
    micro-batches per optimizer step, --accumulation_steps for the supervised scripts, 1 for RL
    (each step takes one prompt batch and cuts it into --accumulation_steps pieces itself)."""
    micro = micro * saved_world // world
    micro -= micro % micro_per_step
    return micro // micro_per_step, micro
