"""The group step of GPO and GRPO: G samples per prompt, group advantages, PPO-clip updates.

Shapes as in rl/step.py: N samples, L = T-1 predicted tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from losses.policy import (group_advantages, group_loss_mask, overlong_penalty, policy_loss, step_normalisers,
                           zero_std_groups)
from model.logprobs import grouped_token_logprobs, masked_reduce
from rl.args import epsilon_high_of
from rl.step import (PromptSource, Score, UpdateSettings, completion_metrics, minibatches, pass_orders, print_samples,
                     reference_logprobs)
from training.loop import Updater
from training.run import Run


@dataclass(frozen=True)
class GroupSettings(UpdateSettings):
    """What the group step does (see make_group_step), built by the script from its flags."""
    epsilon: float
    epsilon_high: float
    beta: float
    loss_type: str
    importance_sampling_level: str
    mask_truncated: bool
    drop_zero_std: bool
    overlong_penalty: int
    baseline: str = "mean"      # group_advantages's baseline, scale and level
    scale: str = "group"
    level: str = "sample"
    seq_reduce: str = "sum"     # seed_sum's reduction of each response's token losses

    @classmethod
    def from_args(cls, args, **advantages) -> "GroupSettings":
        """The settings of add_group_args's flags; ``advantages``: baseline, scale, level, seq_reduce."""
        return cls(**UpdateSettings.common(args, passes=args.ppo_epochs), epsilon=args.epsilon,
                   epsilon_high=epsilon_high_of(args), beta=args.beta, loss_type=args.loss_type,
                   importance_sampling_level=args.importance_sampling_level,
                   mask_truncated=bool(args.mask_truncated), drop_zero_std=bool(args.drop_zero_std),
                   overlong_penalty=args.overlong_penalty, **advantages)


def make_group_step(run: Run, source: PromptSource, updater: Updater, score: Score, s: GroupSettings):
    """one_step(state) for training.loop.run_steps: sample G responses for this step's prompts,
    score them, add the overlong penalty, turn rewards into group advantages (over every rank's
    samples), then ``s.passes`` passes of ``s.loss_type`` updates over mini-batches, each one
    optimizer step whose loss normaliser is counted over all its pieces and ranks before the first
    backward (step_normalisers). ``s.mask_truncated`` and ``s.drop_zero_std`` take samples out of
    the loss mask."""
    G = s.num_generations

    def one_step(state):
        rows, rollout, rewards, parts = source.sample(state, score, G)
        N = rewards.numel()
        if s.overlong_penalty:
            penalty = overlong_penalty(rollout.response_lengths.cpu(), s.max_gen_len, s.overlong_penalty)
            rewards, parts = rewards + penalty, {**parts, "overlong_penalty": penalty}
        everyone = run.dist.all_gather(rewards)                                 # (world*N,)
        advantages = group_advantages(everyone, G, s.baseline, s.scale, s.level)
        mine = slice(run.dist.rank * N, (run.dist.rank + 1) * N)
        advantages = advantages[mine].to(run.device)
        zero_std = zero_std_groups(everyone, G)
        seqs, am, first = rollout.sequences, rollout.attention_mask, rollout.prompt_len
        resp_mask = rollout.response_mask[:, 1:]                                # (N, L)
        loss_mask = group_loss_mask(resp_mask, rollout.ended, zero_std[mine], s.mask_truncated, s.drop_zero_std)
        ref_logps = reference_logprobs(run, seqs, am, s.temperature, first, G) if s.beta > 0 else None
        mb = s.mini_batch_size or N
        # One pass over the whole batch before any update is on-policy: the old log-probs are the
        # new ones, detached (ratio 1), and the sampling-time forward is not needed.
        once = s.passes == 1 and mb == N
        old_logps = None if once else rollout.logps
        # Pieces of whole groups run each prompt once (model.logprobs.grouped_token_logprobs).
        g = G if (mb // s.pieces) % G == 0 else 1
        sums, updates = {}, s.passes * (N // mb)
        for pieces in minibatches(pass_orders(N, s.passes, s.passes > 1 or mb < N, g), mb, s.pieces):
            pieces = [idx.to(run.device) for idx in pieces]
            norms = step_normalisers([loss_mask[idx] for idx in pieces], s.loss_type, G, s.max_gen_len,
                                     run.dist.all_sum, run.dist.world_size)
            for k, (idx, norm) in enumerate(zip(pieces, norms)):
                with run.grad_sync(last=k == len(pieces) - 1):
                    with run.autocast():
                        logps, ent = grouped_token_logprobs(run.model, seqs[idx], am[idx], first, g, s.temperature,
                                                            with_entropy=True)
                    loss, m = policy_loss(
                        logps, logps.detach() if once else old_logps[idx], advantages[idx], loss_mask[idx],
                        s.epsilon, s.epsilon_high, None if ref_logps is None else ref_logps[idx], s.beta,
                        s.loss_type, G, importance_sampling_level=s.importance_sampling_level,
                        normaliser=norm, max_gen_len=s.max_gen_len, seq_reduce=s.seq_reduce)
                    updater.backward(loss)
                m["entropy"] = masked_reduce(ent, resp_mask[idx], "sum").sum() / resp_mask[idx].sum().clamp(min=1)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / updates   # the step's loss, summed
                for key, v in m.items():
                    sums[key] = sums.get(key, 0.0) + float(v) * len(idx) / (N * s.passes)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + updater.step()[0] / updates
        grouped = rewards.view(-1, G)
        metrics = {**sums, "reward": float(rewards.mean()), "reward_std": float(grouped.std(1).mean()),
                   "frac_reward_zero_std": float(zero_std.float().mean()),
                   **completion_metrics(rollout, parts)}
        if s.drop_zero_std:
            metrics["groups_used"] = float((~zero_std).sum()) / G                # of every rank's groups
        if s.debug_at(state.step + 1):
            print_samples(state.step + 1, rows[0], rollout.texts[:G], rewards[:G], advantages[:G])
        return metrics, int(am.sum())

    return one_step
