"""Two real gloo processes: each scores its half of test_loss_types.batch() as an optimizer step
of ``accumulation`` micro-batches (normalisers through a real all_reduce, losses.policy.step_normalisers),
the gradients averaged over the ranks as DDP averages them; rank 0 saves them per loss type."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from losses.policy import LOSS_TYPES, policy_loss, step_normalisers  # noqa: E402


def all_sum(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def worker(rank: int, world: int, init_file: str, out: str, accumulation: int):
    from test_loss_types import batch
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grads = {}
    for loss_type in [t for t in LOSS_TYPES if t != "bnpo"]:
        for level in ("token", "sequence"):
            logps, old, ref, adv, mask = batch()
            leaf = logps.clone().requires_grad_(True)
            mine = list(torch.arange(8).chunk(world)[rank].chunk(accumulation))
            norms = step_normalisers([mask[p] for p in mine], loss_type, 2, 7, all_sum=all_sum, world_size=world)
            total = torch.zeros_like(leaf)
            for p, norm in zip(mine, norms):
                loss, _ = policy_loss(leaf[p], old[p], adv[p], mask[p], 0.2, 0.28 if loss_type != "cispo" else 5.0,
                                      ref[p], 0.04, loss_type, 2, importance_sampling_level=level, normaliser=norm,
                                      max_gen_len=7)
                total += torch.autograd.grad(loss, leaf)[0]
            dist.all_reduce(total)
            grads[f"{loss_type}/{level}"] = total / world          # DDP: the mean of the ranks' gradients
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()
