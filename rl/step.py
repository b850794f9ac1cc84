"""What the RL steps (the group step of GPO and GRPO, PPO's step) share: the prompts a step
samples and scores, its settings, the mini-batches of its updates, what its samples look like,
and the reference's log-probs of them.

Shapes: P prompts, G samples per prompt, N = P*G samples (grouped: rows g*G..g*G+G-1 answer
prompt g), T tokens, L = T-1 predicted tokens (model.logprobs.token_logprobs's layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from core.runtime import print0
from model.logprobs import chunked_grouped_logprobs
from rl.rewards import repeated_ngram_share
from rl.rollout import Rollout, RolloutEngine
from training.order import DataOrder, TrainState

# score(rows, rollout) -> (rewards (N,), {name: (N,)}): what each sample earned, on CPU
Score = Callable[[list[dict], Rollout], tuple[torch.Tensor, dict]]


@dataclass
class PromptSource:
    """An RL run's prompts: the prompt file's rows, their token ids (tokenized once), their
    seeded order over the run, and the engine that samples from the policy."""
    rows: list[dict]
    ids: list[list[int]]
    order: DataOrder
    engine: RolloutEngine

    def sample(self, state: TrainState, score: Score, G: int) -> tuple[list[dict], Rollout, torch.Tensor, dict]:
        """(rows, rollout, rewards (N,), {name: (N,)}) for this step's prompt batch, which it consumes."""
        batch = self.order.batch(state.micro)
        rows, ids = [self.rows[i] for i in batch], [self.ids[i] for i in batch]
        state.micro += 1
        rollout = self.engine.generate(ids, G)
        rewards, parts = score(rows, rollout)
        return rows, rollout, rewards, parts


@dataclass(frozen=True)
class UpdateSettings:
    """What every RL step does with its samples: G = ``num_generations`` per prompt, sampled at
    ``temperature`` (also the training log-probs'), up to ``max_gen_len`` tokens; ``passes`` over
    them in mini-batches of ``mini_batch_size`` samples (0: all), one optimizer update each, every
    mini-batch cut into ``pieces`` forwards; samples printed every ``debug_interval`` steps (0: never)."""
    num_generations: int
    temperature: float
    max_gen_len: int
    passes: int
    mini_batch_size: int
    pieces: int
    debug_interval: int

    @staticmethod
    def common(args, passes: int) -> dict:
        """These fields from the RL scripts' flags (--accumulation_steps is the number of pieces)."""
        return dict(num_generations=args.num_generations, temperature=args.temperature, max_gen_len=args.max_gen_len,
                    passes=passes, mini_batch_size=args.mini_batch_size, pieces=args.accumulation_steps,
                    debug_interval=args.debug_interval if args.debug_mode else 0)

    def debug_at(self, step: int) -> bool:
        """Whether step ``step`` (1-based) prints its samples."""
        return bool(self.debug_interval) and step % self.debug_interval == 0


def shuffled_rows(n: int, group: int = 1) -> torch.Tensor:
    """A random order of n rows that keeps each run of ``group`` consecutive rows together."""
    return (torch.randperm(n // group)[:, None] * group + torch.arange(group)).reshape(-1)


def pass_orders(n: int, passes: int, shuffle: bool, group: int = 1) -> Iterator[torch.Tensor]:
    """The order of the n samples in each pass: a new shuffle per pass (``group`` consecutive rows
    kept together), each drawn when its pass begins, or the rows as they are."""
    for _ in range(passes):
        yield shuffled_rows(n, group) if shuffle else torch.arange(n)


def minibatches(orders: Iterable[torch.Tensor], mini_batch: int, pieces: int) -> Iterator[list[torch.Tensor]]:
    """The updates of a step: for each pass's order of the samples, its mini-batches of
    ``mini_batch`` samples in turn, each as ``pieces`` index tensors of mini_batch / pieces
    samples (one forward and backward each, one optimizer update for them all)."""
    micro = mini_batch // pieces
    for order in orders:
        for start in range(0, len(order), mini_batch):
            yield [order[start + k * micro:start + (k + 1) * micro] for k in range(pieces)]


def completion_metrics(rollout: Rollout, parts: dict) -> dict[str, float]:
    """What the samples look like: length, share cut by --max_gen_len, repetition, each reward's mean."""
    metrics = {"completions/mean_length": float(rollout.response_lengths.float().mean()),
               "completions/clipped_ratio": float((~rollout.ended).float().mean()),
               "completions/repetition": sum(repeated_ngram_share(t) for t in rollout.texts) / len(rollout.texts)}
    metrics.update({f"rewards/{name}": float(values.mean()) for name, values in parts.items()})
    return metrics


def print_samples(step: int, row: dict, texts: list[str], rewards: torch.Tensor, advantages: torch.Tensor) -> None:
    """--debug_mode: one prompt, its samples, their rewards and advantages."""
    print0(f"--- step {step}: {row['prompt'][-1]['content']!r}")
    for t, r, a in zip(texts, rewards.tolist(), advantages.tolist()):
        print0(f"    reward {r:+.3f} advantage {a:+.3f}  {t!r}")


def reference_logprobs(run, sequences: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
                       first_needed: int, group: int = 1, chunk: int = 64) -> torch.Tensor:
    """(N, L) log-probs of the sampled tokens under the frozen reference, about ``chunk`` rows at a
    time; ``group`` consecutive rows share a prompt, which then runs once."""
    with run.reference_model() as ref, run.autocast():
        return chunked_grouped_logprobs(ref, sequences, attention_mask, first_needed, group, temperature, chunk)
