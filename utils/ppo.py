"""PPO (train_ppo.py): per-token rewards with a KL penalty, GAE, whitening, the clipped value
loss, and one training step.

Shapes as in utils/rl.py: N samples, T tokens, L = T-1 predicted tokens. Entry t of an (N, L)
tensor is about token t+1 of the sequence: its log-prob, its reward, and the critic's value of
the state before it (the prefix up to token t). ``mask`` (N, L) marks the response tokens.
"""
from __future__ import annotations

import torch

from model.value_head import last_token_index
from utils.rl import k3_kl

KL_ESTIMATORS = ("k1", "k3")


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi: k1 = logp - ref (unbiased,
    can be negative), or k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        return k3_kl(logps, ref_logps)
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(N, L) rewards: -kl_coef * kl on every response token, plus each sample's score (N,) on
    its last response token. Zero outside the mask; a sample with no response token gets nothing."""
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    has = mask.any(-1)
    last = last_token_index(mask)
    rewards[has, last[has]] += scores[has].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, each (N, L), zero outside the mask.

    Right to left over the response tokens, with V_{t+1} = 0 after the last one:
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t.
    lam = 1 gives the discounted return minus V_t; lam = 0 the one-step TD error.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards.to(values.dtype) * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]          # 0 outside the response: the episode ends there
    return advantages, (advantages + values) * m


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries only (unbiased variance), 0 elsewhere.

    shift_mean=False keeps the mean (only rescales). all_sum: sums a tensor over processes
    (utils.train.Run.all_sum) so the statistics are those of the whole distributed batch.
    """
    all_sum = all_sum or (lambda t: t)
    m = mask.to(x.dtype)
    count, total = all_sum(torch.stack([m.sum(), (x * m).sum()])).unbind()
    mean = total / count.clamp(min=1)
    var = all_sum(((x - mean) ** 2 * m).sum()) / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float, normaliser=None) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean over response tokens of max((V - R)^2, (V_clip - R)^2), with
    V_clip = V_old + clamp(V - V_old, -clip, clip); clip <= 0: the plain squared error.
    normaliser: what the token sum is divided by (default: this batch's response tokens; the
    step's, from utils.rl.step_normalisers, under accumulation or torchrun).
    Returns (loss, share of tokens where the clipped term is the larger)."""
    m = mask.to(values.dtype)
    normaliser = m.sum().clamp(min=1) if normaliser is None else normaliser
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * (unclipped * m).sum() / normaliser, torch.zeros((), device=values.device)
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * (torch.maximum(unclipped, clipped) * m).sum() / normaliser
    return loss, masked_mean((clipped > unclipped).to(values.dtype), mask).detach()


def approx_kl(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of (r - 1) - log r, r = pi / pi_old: an estimate of
    KL(pi_old || pi) from tokens sampled from pi_old, never negative, 0 when nothing moved."""
    log_ratio = (logps - old_logps).detach()
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over response tokens: 1 for a perfect critic, 0 for one that
    predicts the mean, negative for worse (0 when the returns do not vary)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else 0.0


def print_log_ratio(step: int, log_ratio: torch.Tensor, mask: torch.Tensor) -> None:
    """--debug_log_ratio: how far the policy's log-probs (N, L) are from the old ones, on the mask."""
    from core.runtime import print0
    lr = log_ratio[mask.bool()].float()
    if lr.numel():
        print0(f"[log_ratio] step {step}: max|log r| {lr.abs().max():.3e}, mean|log r| {lr.abs().mean():.3e}, "
               f"ratio in [{lr.exp().min():.6f}, {lr.exp().max():.6f}]")


# ----------------------------------------------------------------------------- set-up and one step
def add_ppo_args(parser) -> None:
    """PPO's own flags (MiniMind's names where it has them)."""
    from utils.rl import AGGREGATION_TYPES, add_debug_args, add_loss_type_arg
    g = parser.add_argument_group("PPO")
    g.add_argument("--clip_epsilon", type=float, default=0.2, help="policy ratio clip range (default: %(default)s)")
    add_loss_type_arg(g, AGGREGATION_TYPES, "dapo",
                      "how the policy loss's per-token terms add up, the aggregations of train_gpo.py: dapo (token "
                      "sum / tokens of the whole optimizer step), grpo (per-response token mean, then mean), bnpo "
                      "(token mean of each micro-batch), dr_grpo (token sum / (responses x --max_gen_len)); cispo "
                      "and seed_sum are for the group scripts only")
    g.add_argument("--vf_coef", type=float, default=0.5, help="weight of the value loss (default: %(default)s)")
    g.add_argument("--kl_coef", type=float, default=0.02,
                   help="per-token KL penalty to the reference, in the reward (default: %(default)s; 0: no reference forward)")
    g.add_argument("--kl_estimator", choices=KL_ESTIMATORS, default="k1",
                   help="k1: logp - ref; k3: exp(ref - logp) - (ref - logp) - 1, never negative (default: %(default)s)")
    g.add_argument("--gamma", type=float, default=1.0, help="discount over response tokens (default: %(default)s)")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda (default: %(default)s)")
    g.add_argument("--cliprange_value", type=float, default=0.2,
                   help="clip of the new values around the rollout's; 0: no value clipping (default: %(default)s)")
    g.add_argument("--ppo_update_iters", type=int, default=2,
                   help="passes over each rollout batch (default: %(default)s)")
    g.add_argument("--mini_batch_size", type=int, default=0,
                   help="samples per optimizer update within a rollout batch; 0: all of them (default: 0)")
    g.add_argument("--early_stop_kl", type=float, default=0.0,
                   help="stop a rollout batch's updates once approx_kl passes this; 0: never (default: 0)")
    g.add_argument("--critic_learning_rate", type=float, default=None,
                   help="peak learning rate of the critic (default: --learning_rate)")
    g.add_argument("--missing_eos_penalty", type=float, default=0.0,
                   help="subtracted from the score of a response that never ends (default: 0, off)")
    g.add_argument("--debug_log_ratio", action="store_true",
                   help="print the log-ratio of the first mini-batch of each step's first pass (MiniMind's check "
                        "that the ratio starts at 1; here it is exactly 1 by construction)")
    add_debug_args(g)


def ppo_arg_problems(args) -> list[str]:
    problems = []
    if not 0 < args.clip_epsilon < 1:
        problems.append(f"--clip_epsilon must be in (0, 1) (got {args.clip_epsilon})")
    if args.vf_coef <= 0:
        problems.append(f"--vf_coef must be positive (got {args.vf_coef})")
    for name in ("kl_coef", "cliprange_value", "early_stop_kl", "missing_eos_penalty"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be 0 or positive (got {getattr(args, name)})")
    if not 0 <= args.gamma <= 1 or not 0 <= args.lam <= 1:
        problems.append(f"--gamma and --lam must be in [0, 1] (got {args.gamma}, {args.lam})")
    if args.ppo_update_iters < 1:
        problems.append(f"--ppo_update_iters must be at least 1 (got {args.ppo_update_iters})")
    if args.critic_learning_rate is not None and args.critic_learning_rate <= 0:
        problems.append(f"--critic_learning_rate must be positive (got {args.critic_learning_rate})")
    if not args.use_lora:
        problems.append("--use_lora 0: PPO keeps policy, critic and reference on one copy of the base weights as "
                        "LoRA adapters; train with --use_lora 1")
    return problems


def actor_critic_builder(args, shared_reward: dict):
    """Run's ``wrap`` for PPO: the critic adapter (and a reward model trained here on the same
    base weights, as a frozen adapter) beside the policy's, the value head on top.

    With such a reward model the critic starts as it (its adapter and head); otherwise from a
    fresh adapter and a zero head. The RewardModel goes into ``shared_reward["model"]``.
    """
    from model.lora import adapter_parameters, apply_lora, load_lora
    from model.reward_model import RewardModel, shares_base
    from model.value_head import ActorCritic
    from core.runtime import print0

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


def ppo_optimizers(run) -> dict:
    """{"policy": AdamW over the policy adapter, "critic": AdamW over the critic adapter and head},
    each with its own peak learning rate (utils.train.run_steps schedules both)."""
    from model.lora import adapter_parameters
    args, model = run.args, run.base_model
    critic_lr = args.critic_learning_rate or args.learning_rate

    def adamw(params, lr):
        return torch.optim.AdamW([{"params": params, "peak_lr": lr}], lr=lr, weight_decay=0.0)
    return {"policy": adamw(adapter_parameters(model.lm, "default"), args.learning_rate),
            "critic": adamw(adapter_parameters(model.lm, model.adapter) + list(model.head.parameters()), critic_lr)}


def make_ppo_step(run, order, prompts: list[dict], prompt_ids: list[list[int]], engine, optimizers: dict, score):
    """one_step(state, lr) for utils.train.run_steps: sample, score (``score(rows, rollout) ->
    (scores (N,), {name: (N,)})``), per-token rewards with the KL penalty, GAE from the critic's
    values, whitened advantages, then --ppo_update_iters passes over mini-batches, each one
    update of both the policy and the critic, until approx_kl passes --early_stop_kl."""
    from model.logprobs import policy_forward
    from utils.rl import completion_metrics, policy_loss, print_samples, sample_and_score, step_normalisers
    from utils.train import step_optimizers
    args, G = run.args, run.args.num_generations
    opts = list(optimizers.values())

    def one_step(state, lr):
        rows, rollout, scores, parts = sample_and_score(state, order, prompts, prompt_ids, engine, score, G)
        if args.missing_eos_penalty:
            scores = scores - args.missing_eos_penalty * (~rollout.ended).float()
        N, dev = scores.numel(), run.device
        seqs, am, first = rollout.sequences, rollout.attention_mask, rollout.prompt_len
        mask = rollout.response_mask[:, 1:].to(dev)                             # (N, L)
        mb = args.mini_batch_size or N
        micro = mb // args.accumulation_steps
        shuffle = args.ppo_update_iters > 1 or mb < N
        perms = [torch.randperm(N) if shuffle else torch.arange(N) for _ in range(args.ppo_update_iters)]
        # Old log-probs and values from the forward the update makes, on the first pass's very
        # micro-batches: the first update's ratio is exactly 1 (and no other forward is needed);
        # the reference's from that forward too, so the KL of an unchanged policy is exactly 0.
        old_logps, old_values, ref_logps = (torch.zeros(mask.shape, device=dev) for _ in range(3))
        for start in range(0, N, micro):
            idx = perms[0][start:start + micro].to(dev)
            with torch.no_grad(), run.autocast():      # no graph: these are constants of the loss
                logps, values, _ = run.base_model(seqs[idx], am[idx], first, args.temperature)
            old_logps[idx], old_values[idx] = logps.detach().float(), values.detach().float()
            if args.kl_coef > 0:
                with run.reference_model() as ref, run.autocast():
                    ref_logps[idx] = policy_forward(ref, seqs[idx], am[idx], args.temperature, first)[0].float()
        old_values = old_values * mask
        kl = kl_per_token(old_logps, ref_logps, args.kl_estimator) if args.kl_coef > 0 else torch.zeros_like(old_logps)
        kl = kl.float() * mask
        rewards = token_rewards(scores.to(dev), kl, mask, args.kl_coef)
        advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask, all_sum=run.all_sum)

        sums, batches, updates = {}, 0, 0
        for perm in perms:
            for start in range(0, N, mb):
                parts_idx = [perm[start + k * micro:start + (k + 1) * micro].to(dev)
                             for k in range(args.accumulation_steps)]
                masks = [mask[idx] for idx in parts_idx]
                pg_norms = step_normalisers(masks, args.loss_type, G, args.max_gen_len, run.all_sum, run.dist.world_size)
                vf_norms = step_normalisers(masks, "dapo", G, args.max_gen_len, run.all_sum, run.dist.world_size)
                part = {}
                for k, idx in enumerate(parts_idx):
                    m_idx = masks[k]
                    with run.grad_sync(k):
                        with run.autocast():
                            logps, values, ent = run.model(seqs[idx], am[idx], first, args.temperature, with_entropy=True)
                        pg_loss, m = policy_loss(logps, old_logps[idx], advantages[idx], m_idx, args.clip_epsilon,
                                                 loss_type=args.loss_type, G=G, normaliser=pg_norms[k],
                                                 max_gen_len=args.max_gen_len)
                        vf_loss, vclip = clipped_value_loss(values.float(), old_values[idx], returns[idx], m_idx,
                                                            args.cliprange_value, vf_norms[k])
                        run.backward(pg_loss + args.vf_coef * vf_loss)
                    if args.debug_log_ratio and batches == 0 and k == 0:
                        print_log_ratio(state.step + 1, logps.detach() - old_logps[idx], m_idx)
                    m.update(value_clip_ratio=vclip, approx_kl=approx_kl(logps, old_logps[idx], m_idx),
                             entropy=masked_mean(ent, m_idx))
                    for key, v in m.items():
                        part[key] = part.get(key, 0.0) + float(v) * len(idx) / mb
                    for key, v in (("loss", pg_loss), ("value_loss", vf_loss)):    # the step's losses: summed
                        part[key] = part.get(key, 0.0) + float(v.detach())
                batches += 1
                for key, v in part.items():
                    sums[key] = sums.get(key, 0.0) + v
                if args.early_stop_kl and run.all_mean([part["approx_kl"]])[0] > args.early_stop_kl:
                    for opt in opts:
                        opt.zero_grad(set_to_none=True)
                    break
                norms = step_optimizers(run, opts, args.grad_clip)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + norms[0]
                sums["critic_grad_norm"] = sums.get("critic_grad_norm", 0.0) + norms[1]
                updates += 1
            else:
                continue
            break                                       # early stop: no more passes over this batch
        metrics = {k: v / (updates if k.endswith("grad_norm") else batches) for k, v in sums.items()}
        metrics.update({
            "reward": float(scores.mean()), "reward_std": float(scores.std()) if N > 1 else 0.0,
            "kl": float(masked_mean(kl, mask)),
            "rlhf_reward": float((scores.to(dev) - args.kl_coef * kl.sum(-1)).mean()),
            "explained_variance": explained_variance(old_values, returns, mask),
            "values": float(masked_mean(old_values, mask)), "returns": float(masked_mean(returns, mask)),
            "ppo_updates": float(updates), **completion_metrics(rollout, parts)})
        metrics.setdefault("grad_norm", 0.0)
        metrics.setdefault("critic_grad_norm", 0.0)
        if args.debug_mode and (state.step + 1) % args.debug_interval == 0:
            seq_adv = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            print_samples(state.step + 1, rows[0], rollout.texts[:G], scores[:G], seq_adv[:G])
        return metrics, int(am.sum())

    return one_step
