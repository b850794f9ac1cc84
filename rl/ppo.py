"""PPO's set-up and step: the policy and the critic as two LoRA adapters on one copy of the base
weights (model.value_head.ActorCritic), per-token rewards with a KL penalty, GAE, whitened
advantages, clipped policy and value losses (losses/ppo.py, losses/policy.py).

Shapes as in rl/step.py: N samples, L = T-1 predicted tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.runtime import print0
from losses.policy import policy_loss, step_normalisers
from losses.ppo import (approx_kl, clipped_value_loss, explained_variance, gae, kl_per_token, masked_mean,
                        masked_whiten, token_rewards)
from model.logprobs import policy_forward
from model.lora import adapter_parameters, apply_lora, load_lora
from model.reward_model import RewardModel, shares_base
from model.value_head import ActorCritic
from rl.step import PromptSource, Score, UpdateSettings, completion_metrics, minibatches, pass_orders, print_samples
from training.loop import Updater, adamw
from training.run import Run


@dataclass(frozen=True)
class PPOSettings(UpdateSettings):
    """What PPO's step does (see make_ppo_step), built by the script from its flags."""
    clip_epsilon: float
    loss_type: str
    vf_coef: float
    kl_coef: float
    kl_estimator: str
    gamma: float
    lam: float
    cliprange_value: float
    early_stop_kl: float
    missing_eos_penalty: float
    debug_log_ratio: bool

    @classmethod
    def from_args(cls, args) -> "PPOSettings":
        return cls(**UpdateSettings.common(args, passes=args.ppo_update_iters), clip_epsilon=args.clip_epsilon,
                   loss_type=args.loss_type, vf_coef=args.vf_coef, kl_coef=args.kl_coef,
                   kl_estimator=args.kl_estimator, gamma=args.gamma, lam=args.lam,
                   cliprange_value=args.cliprange_value, early_stop_kl=args.early_stop_kl,
                   missing_eos_penalty=args.missing_eos_penalty, debug_log_ratio=args.debug_log_ratio)


def actor_critic_builder(args, shared_reward: dict):
    """Run's ``wrap`` for PPO: the critic adapter (and a reward model trained here on the same
    base weights, as a frozen adapter) beside the policy's, the value head on top.

    With such a reward model the critic starts as it (its adapter and head); otherwise from a
    fresh adapter and a zero head. The RewardModel goes into ``shared_reward["model"]``.
    """
    def wrap(lm, run):
        from_reward = bool(args.reward_model) and shares_base(args.reward_model, lm, run.lm_config, args.save_dir)
        if from_reward:
            shared_reward["model"] = RewardModel.on_shared_base(lm, run.tokenizer, args.reward_model)
            load_lora(lm, args.reward_model, adapter_name="critic")
        else:
            apply_lora(lm, rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets, adapter_name="critic")
        model = ActorCritic(lm, critic_adapter="critic", seed=args.seed)
        if from_reward:
            model.load_head(args.reward_model)
        for p in lm.parameters():
            p.requires_grad_(False)
        for p in adapter_parameters(lm, "default") + adapter_parameters(lm, "critic"):
            p.requires_grad_(True)
        if args.reward_model:
            print0(f"reward model {args.reward_model}: " + (
                "an adapter on the policy's own base weights (no second copy); the critic starts from it"
                if from_reward else "a separate model (another base); the critic starts fresh"))
        return model

    return wrap


def ppo_optimizers(model: ActorCritic, learning_rate: float, critic_learning_rate: float | None = None) -> dict:
    """{"policy": AdamW over the policy adapter, "critic": AdamW over the critic adapter and head},
    each with its own peak learning rate (the critic's: ``learning_rate`` unless given), which
    training.loop.Updater schedules."""
    critic_lr = critic_learning_rate or learning_rate
    critic = adapter_parameters(model.lm, model.adapter) + list(model.head.parameters())
    return {"policy": adamw([{"params": adapter_parameters(model.lm, "default"), "peak_lr": learning_rate}], learning_rate),
            "critic": adamw([{"params": critic, "peak_lr": critic_lr}], critic_lr)}


def print_log_ratio(step: int, log_ratio: torch.Tensor, mask: torch.Tensor) -> None:
    """--debug_log_ratio: how far the policy's log-probs (N, L) are from the old ones, on the mask."""
    lr = log_ratio[mask.bool()].float()
    if lr.numel():
        print0(f"[log_ratio] step {step}: max|log r| {lr.abs().max():.3e}, mean|log r| {lr.abs().mean():.3e}, "
               f"ratio in [{lr.exp().min():.6f}, {lr.exp().max():.6f}]")


def make_ppo_step(run: Run, source: PromptSource, updater: Updater, score: Score, s: PPOSettings):
    """one_step(state) for training.loop.run_steps: sample, score, per-token rewards with the KL
    penalty, GAE from the critic's values, whitened advantages, then ``s.passes`` passes over
    mini-batches, each one update of both the policy and the critic, until approx_kl passes
    ``s.early_stop_kl``."""
    G = s.num_generations

    def one_step(state):
        rows, rollout, scores, parts = source.sample(state, score, G)
        if s.missing_eos_penalty:
            scores = scores - s.missing_eos_penalty * (~rollout.ended).float()
        N, dev = scores.numel(), run.device
        seqs, am, first = rollout.sequences, rollout.attention_mask, rollout.prompt_len
        mask = rollout.response_mask[:, 1:].to(dev)                             # (N, L)
        mb = s.mini_batch_size or N
        orders = list(pass_orders(N, s.passes, s.passes > 1 or mb < N))       # drawn now: the first pass is needed
        # Old log-probs and values from the forward the update makes, on the first pass's very
        # pieces: the first update's ratio is exactly 1 (and no other forward is needed); the
        # reference's from that forward too, so the KL of an unchanged policy is exactly 0.
        old_logps, old_values, ref_logps = (torch.zeros(mask.shape, device=dev) for _ in range(3))
        for pieces in minibatches(orders[:1], mb, s.pieces):
            for idx in pieces:
                idx = idx.to(dev)
                with torch.no_grad(), run.autocast():      # no graph: these are constants of the loss
                    logps, values, _ = run.base_model(seqs[idx], am[idx], first, s.temperature)
                old_logps[idx], old_values[idx] = logps.detach().float(), values.detach().float()
                if s.kl_coef > 0:
                    with run.reference_model() as ref, run.autocast():
                        ref_logps[idx] = policy_forward(ref, seqs[idx], am[idx], s.temperature, first)[0].float()
        old_values = old_values * mask
        kl = kl_per_token(old_logps, ref_logps, s.kl_estimator) if s.kl_coef > 0 else torch.zeros_like(old_logps)
        kl = kl.float() * mask
        rewards = token_rewards(scores.to(dev), kl, mask, s.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
        advantages = masked_whiten(advantages, mask, all_sum=run.dist.all_sum)

        sums, batches, updates = {}, 0, 0
        for pieces in minibatches(orders, mb, s.pieces):
            pieces = [idx.to(dev) for idx in pieces]
            masks = [mask[idx] for idx in pieces]
            pg_norms = step_normalisers(masks, s.loss_type, G, s.max_gen_len, run.dist.all_sum, run.dist.world_size)
            vf_norms = step_normalisers(masks, "dapo", G, s.max_gen_len, run.dist.all_sum, run.dist.world_size)
            part = {}
            for k, idx in enumerate(pieces):
                m_idx = masks[k]
                with run.grad_sync(last=k == len(pieces) - 1):
                    with run.autocast():
                        logps, values, ent = run.model(seqs[idx], am[idx], first, s.temperature, with_entropy=True)
                    pg_loss, m = policy_loss(logps, old_logps[idx], advantages[idx], m_idx, s.clip_epsilon,
                                             loss_type=s.loss_type, G=G, normaliser=pg_norms[k],
                                             max_gen_len=s.max_gen_len)
                    vf_loss, vm = clipped_value_loss(values.float(), old_values[idx], returns[idx], m_idx,
                                                     s.cliprange_value, vf_norms[k])
                    updater.backward(pg_loss + s.vf_coef * vf_loss)
                if s.debug_log_ratio and batches == 0 and k == 0:
                    print_log_ratio(state.step + 1, logps.detach() - old_logps[idx], m_idx)
                m.update(vm, approx_kl=approx_kl(logps, old_logps[idx], m_idx), entropy=masked_mean(ent, m_idx))
                for key, v in m.items():
                    part[key] = part.get(key, 0.0) + float(v) * len(idx) / mb
                for key, v in (("loss", pg_loss), ("value_loss", vf_loss)):    # the step's losses: summed
                    part[key] = part.get(key, 0.0) + float(v.detach())
            batches += 1
            for key, v in part.items():
                sums[key] = sums.get(key, 0.0) + v
            if s.early_stop_kl and run.dist.all_mean([part["approx_kl"]])[0] > s.early_stop_kl:
                updater.zero_grad()                 # early stop: no more updates from this batch
                break
            norms = updater.step()
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + norms[0]
            sums["critic_grad_norm"] = sums.get("critic_grad_norm", 0.0) + norms[1]
            updates += 1
        metrics = {k: v / (updates if k.endswith("grad_norm") else batches) for k, v in sums.items()}
        metrics.update({
            "reward": float(scores.mean()), "reward_std": float(scores.std()) if N > 1 else 0.0,
            "kl": float(masked_mean(kl, mask)),
            "rlhf_reward": float((scores.to(dev) - s.kl_coef * kl.sum(-1)).mean()),
            "explained_variance": explained_variance(old_values, returns, mask),
            "values": float(masked_mean(old_values, mask)), "returns": float(masked_mean(returns, mask)),
            "ppo_updates": float(updates), **completion_metrics(rollout, parts)})
        metrics.setdefault("grad_norm", 0.0)
        metrics.setdefault("critic_grad_norm", 0.0)
        if s.debug_at(state.step + 1):
            seq_adv = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            print_samples(state.step + 1, rows[0], rollout.texts[:G], scores[:G], seq_adv[:G])
        return metrics, int(am.sum())

    return one_step
