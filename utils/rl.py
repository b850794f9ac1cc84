"""Group policy optimisation (GPO, GRPO): advantages, the clipped loss, KL, and one training step.

Shapes: P prompts, G samples per prompt, N = P*G samples (grouped: rows g*G..g*G+G-1 answer
prompt g), T tokens, L = T-1 predicted tokens (utils.logprobs.token_logprobs's layout).
"""
from __future__ import annotations

import torch

from utils.logprobs import chunked_grouped_logprobs, grouped_token_logprobs, masked_reduce

ADV_EPS = 1e-4
LOSS_AGGREGATIONS = ("token_mean", "seq_mean")   # the user's choice in train_gpo.py


def group_advantages(rewards: torch.Tensor, G: int, baseline: str = "mean", scale: str = "group",
                     level: str = "sample", eps: float = ADV_EPS) -> torch.Tensor:
    """Advantages (N,) of rewards (N,), G samples per prompt.

    level "sample" (GRPO / RLOO): A_i = r_i - b_i, with b_i the group mean (baseline "mean") or
      the mean of the group's other G-1 rewards (baseline "loo"), then divided by the group's
      reward std (scale "group"), the whole batch's (scale "batch"), or not at all ("none").
    level "group" (the seed's literal A_g): each group's mean reward m_g, z-scored across the
      groups of the batch, (m_g - mean(m)) / (std(m) + eps), shared by all its responses.
    Stds are the unbiased ones (torch.std). A group whose rewards are all equal has advantage 0.
    """
    if rewards.dim() != 1 or rewards.numel() % G:
        raise ValueError(f"rewards must be (N,) with N a multiple of G={G}, got {tuple(rewards.shape)}")
    if G < 2:
        raise ValueError("group advantages need at least 2 samples per prompt")
    r = rewards.float().view(-1, G)                                          # (P, G)
    if level == "group":
        means = r.mean(1)                                                    # (P,)
        spread = means.std() if means.numel() > 1 else torch.zeros(())
        centred = means - means.mean()
        adv = centred / (spread + eps) if scale != "none" else centred
        return adv.repeat_interleave(G)
    if level != "sample":
        raise ValueError(f"level must be 'sample' or 'group', got {level!r}")
    if baseline == "mean":
        adv = r - r.mean(1, keepdim=True)
    elif baseline == "loo":
        adv = (r - r.mean(1, keepdim=True)) * G / (G - 1)                   # r_i - mean of the others
    else:
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return adv.reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0, 0 where equal."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, G: int = 1) -> torch.Tensor:
    """One number from per-token values (N, L) over mask (N, L).

    token_mean: mean over every response token of the batch (long answers weigh more);
    seq_mean: mean over each response's tokens, then over responses;
    seq_sum_group_sum: sum over each response's tokens and over the G responses of a group,
      mean over groups (the seed's -E_x[sum_i A_i log pi(y_i|x)] with log pi the sum).
    """
    mask = mask.to(values.dtype)
    if how == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    if how == "seq_mean":
        return masked_reduce(values, mask, "mean").mean()
    if how == "seq_sum_group_sum":
        return masked_reduce(values, mask, "sum").sum() / (values.shape[0] / G)
    if how == "seq_mean_group_sum":
        return masked_reduce(values, mask, "mean").sum() / (values.shape[0] / G)
    raise ValueError(f"unknown aggregation {how!r}")


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
                        ref_logps: torch.Tensor | None = None, beta: float = 0.0, loss_agg: str = "token_mean",
                        G: int = 1):
    """PPO-clip loss with one advantage per sample, plus beta * k3 KL to the reference.

    logps, old_logps, ref_logps, response_mask: (N, L); advantages: (N,), one per sample, or
    (N, L), one per token (PPO's GAE).
    Per token, ratio = exp(logp - old_logp) and
        loss_t = max(-A ratio, -A clip(ratio, 1 - epsilon, 1 + epsilon_high)) + beta k3_t
    so the update stops where the ratio has left [1 - epsilon, 1 + epsilon_high] in the
    direction the advantage pushes it. Returns (loss, metrics) with clip_ratio (share of response
    tokens where the clip is active) and kl (mean k3 per response token).
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = response_mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps.detach())
    adv = advantages.detach().to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = torch.maximum(unclipped, clipped)
    metrics = {}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps.detach())
        if beta:
            per_token = per_token + beta * kl
        metrics["kl"] = ((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    loss = aggregate(per_token, mask, loss_agg, G)
    with torch.no_grad():
        metrics["clip_ratio"] = ((clipped > unclipped).to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)
    return loss, metrics


# ----------------------------------------------------------------------------- one training step
def add_group_args(parser, *, beta: float, ppo_epochs: int = 1) -> None:
    """The policy-update flags GPO and GRPO share."""
    g = parser.add_argument_group("policy update")
    g.add_argument("--epsilon", type=float, default=0.2, help="PPO clip range below 1 (default: %(default)s)")
    g.add_argument("--epsilon_high", type=float, default=None,
                   help="clip range above 1 (default: --epsilon; larger values, e.g. 0.28, are DAPO's clip-higher)")
    g.add_argument("--beta", type=float, default=beta, help="weight of the k3 KL to the reference; 0: no reference "
                   "forward (default: %(default)s)")
    g.add_argument("--ppo_epochs", type=int, default=ppo_epochs,
                   help="passes over each rollout batch; old log-probs are the sampling-time ones (default: %(default)s)")
    g.add_argument("--mini_batch_size", type=int, default=0,
                   help="samples per optimizer update within a rollout batch; 0: all of them (default: 0)")
    add_debug_args(g)


def add_debug_args(group) -> None:
    group.add_argument("--debug_mode", action="store_true",
                       help="print prompts, samples and rewards every --debug_interval steps")
    group.add_argument("--debug_interval", type=int, default=20,
                       help="steps between --debug_mode prints (default: %(default)s)")


def group_arg_problems(args) -> list[str]:
    problems = []
    if args.num_generations < 2:
        problems.append(f"--num_generations must be at least 2 for group advantages (got {args.num_generations})")
    if not 0 < args.epsilon < 1 or (args.epsilon_high is not None and args.epsilon_high <= 0):
        problems.append("--epsilon must be in (0, 1) and --epsilon_high positive")
    if args.beta < 0:
        problems.append(f"--beta must be 0 or positive (got {args.beta})")
    if args.ppo_epochs < 1:
        problems.append(f"--ppo_epochs must be at least 1 (got {args.ppo_epochs})")
    return problems


def update_arg_problems(args) -> list[str]:
    """What is wrong with --mini_batch_size, --accumulation_steps and --debug_interval."""
    problems = []
    n = args.batch_size * args.num_generations
    if args.mini_batch_size < 0 or args.mini_batch_size > n or (args.mini_batch_size and n % args.mini_batch_size):
        problems.append(f"--mini_batch_size must divide the {n} samples of a step (--batch_size x --num_generations), "
                        f"or be 0 (got {args.mini_batch_size})")
    mb = args.mini_batch_size or n
    if mb % args.accumulation_steps:
        problems.append(f"--accumulation_steps {args.accumulation_steps} must divide the {mb} samples of a mini-batch")
    if args.debug_interval < 1:
        problems.append("--debug_interval must be at least 1")
    return problems


def check_rl_args(args, algorithm_problems=group_arg_problems) -> None:
    """Every problem with the shared, sampling, update and the algorithm's own flags
    (``algorithm_problems(args) -> [messages]``), raised once, before any model is built."""
    from utils.args import rollout_arg_problems
    from utils.errors import UserError
    from utils.train import validate_common_args
    validate_common_args(args)
    problems = rollout_arg_problems(args) + algorithm_problems(args) + update_arg_problems(args)
    if args.max_seq_len - args.max_gen_len < 1:
        problems.append(f"--max_seq_len {args.max_seq_len} leaves no room for a prompt beside --max_gen_len {args.max_gen_len}")
    if problems:
        raise UserError("; ".join(problems))


def start_rl_run(args, algorithm: str, prompts: list[dict], wrap=None):
    """(run, order, prompt_ids, engine) of an RL run: the policy with LoRA and its reference
    (``wrap``: see utils.train.Run), the prompts tokenized once, their seeded order, the sampler."""
    from utils.rollout import HFRolloutEngine
    from utils.train import DataOrder, Run
    run = Run(args, algorithm, reference="shared" if args.use_lora else "copy", wrap=wrap)
    prompt_ids = encode_prompts(run.tokenizer, prompts, args.max_seq_len - args.max_gen_len)
    order = DataOrder(len(prompts), args.batch_size, args.epochs, 1, args.seed, run.dist, what="prompts")
    engine = HFRolloutEngine(run.lm, run.tokenizer, args.max_gen_len,
                             args.temperature, args.top_p, args.top_k, autocast=run.autocast,
                             merge=bool(args.merge_for_sampling))
    return run, order, prompt_ids, engine


def start_group_run(args, algorithm: str, prompts: list[dict]):
    """start_rl_run for GPO / GRPO, plus AdamW over the policy's adapters."""
    run, order, prompt_ids, engine = start_rl_run(args, algorithm, prompts)
    optimizer = torch.optim.AdamW(run.trainable_parameters(), lr=args.learning_rate, weight_decay=0.0)
    return run, order, prompt_ids, engine, optimizer


def encode_prompts(tokenizer, prompts: list[dict], max_prompt_len: int) -> list[list[int]]:
    """Token ids of each prompt, cut from the left to ``max_prompt_len``."""
    from dataset.data import encode_prompt
    return [encode_prompt(tokenizer, p["prompt"])[-max_prompt_len:] for p in prompts]


def prompt_fields(rows: list[dict], G: int) -> dict[str, list]:
    """The prompt file's other columns, one value per sample (each row's repeated G times)."""
    keys = sorted({k for r in rows for k in r if k != "prompt"})
    return {k: [r.get(k) for r in rows for _ in range(G)] for k in keys}


def reward_samples(rewards, rows: list[dict], texts: list[str], G: int):
    """``rewards`` (utils.rewards.RewardFunctions) of the G sampled texts of each prompt row:
    (rewards (N,), {name: (N,)})."""
    return rewards([r["prompt"] for r in rows for _ in range(G)], texts, prompt_fields(rows, G))


def make_group_step(run, order, prompts: list[dict], prompt_ids: list[list[int]], engine, optimizer, score,
                    *, loss_agg: str, baseline: str = "mean", scale: str = "group", level: str = "sample"):
    """one_step(state, lr) for utils.train.run_steps: sample G responses for this step's prompts,
    score them (``score(rows, rollout) -> (rewards (N,), {name: (N,)})``), turn rewards into group
    advantages (over every rank's samples), then --ppo_epochs passes of clipped updates over
    mini-batches, each one optimizer step."""
    from utils.train import clip_and_step
    args, G = run.args, run.args.num_generations

    def one_step(state, lr):
        rows, rollout, rewards, parts = sample_and_score(state, order, prompts, prompt_ids, engine, score, G)
        N = rewards.numel()
        everyone = _gather(run, rewards)                                        # (world*N,)
        advantages = group_advantages(everyone, G, baseline, scale, level)
        advantages = advantages[run.dist.rank * N:(run.dist.rank + 1) * N].to(run.device)
        seqs, am, first = rollout.sequences, rollout.attention_mask, rollout.prompt_len
        resp_mask = rollout.response_mask[:, 1:]                                # (N, L)
        ref_logps = reference_logprobs(run, seqs, am, args.temperature, first, G) if args.beta > 0 else None
        mb = args.mini_batch_size or N
        micro = mb // args.accumulation_steps
        # One pass over the whole batch before any update is on-policy: the old log-probs are the
        # new ones, detached (ratio 1), and the sampling-time forward is not needed.
        once = args.ppo_epochs == 1 and mb == N
        old_logps = None if once else rollout.logps
        # Micro-batches of whole groups run each prompt once (utils.logprobs.grouped_token_logprobs).
        g = G if micro % G == 0 else 1
        sums = {}
        for _ in range(args.ppo_epochs):
            order_ = shuffled_rows(N, g) if (args.ppo_epochs > 1 or mb < N) else torch.arange(N)
            for start in range(0, N, mb):
                chunk = order_[start:start + mb]
                for k in range(args.accumulation_steps):
                    idx = chunk[k * micro:(k + 1) * micro].to(run.device)
                    with run.grad_sync(k):
                        with run.autocast():
                            logps, ent = grouped_token_logprobs(run.model, seqs[idx], am[idx], first, g,
                                                                args.temperature, with_entropy=True)
                        loss, m = clipped_policy_loss(
                            logps, logps.detach() if once else old_logps[idx], advantages[idx], resp_mask[idx],
                            args.epsilon, args.epsilon_high, None if ref_logps is None else ref_logps[idx], args.beta,
                            loss_agg, G)
                        run.backward(loss * (len(idx) / mb))
                    m["loss"], m["entropy"] = loss.detach(), masked_reduce(ent, resp_mask[idx], "sum").sum() / \
                        resp_mask[idx].sum().clamp(min=1)
                    for key, v in m.items():
                        sums[key] = sums.get(key, 0.0) + float(v) * len(idx) / (N * args.ppo_epochs)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + clip_and_step(run, optimizer, args.grad_clip) \
                    / (args.ppo_epochs * (N // mb))
        grouped = rewards.view(-1, G)
        metrics = {**sums, "reward": float(rewards.mean()), "reward_std": float(grouped.std(1).mean()),
                   "frac_reward_zero_std": float((grouped.std(1) < 1e-8).float().mean()),
                   **completion_metrics(rollout, parts)}
        if args.debug_mode and (state.step + 1) % args.debug_interval == 0:
            print_samples(state.step + 1, rows[0], rollout.texts[:G], rewards[:G], advantages[:G])
        return metrics, int(am.sum())

    return one_step


def shuffled_rows(n: int, group: int = 1) -> torch.Tensor:
    """A random order of n rows that keeps each run of ``group`` consecutive rows together."""
    return (torch.randperm(n // group)[:, None] * group + torch.arange(group)).reshape(-1)


def sample_and_score(state, order, prompts: list[dict], prompt_ids: list[list[int]], engine, score, G: int):
    """(rows, rollout, rewards (N,), {name: (N,)}) for this step's prompt batch, which it consumes."""
    batch = order.batch(state.micro)
    rows, ids = [prompts[i] for i in batch], [prompt_ids[i] for i in batch]
    state.micro += 1
    rollout = engine.generate(ids, G)
    rewards, parts = score(rows, rollout)                                       # (N,) on CPU
    return rows, rollout, rewards, parts


def completion_metrics(rollout, parts: dict) -> dict[str, float]:
    """What the samples look like: length, share cut by --max_gen_len, repetition, each reward's mean."""
    from utils.rewards import repeated_ngram_share
    metrics = {"completions/mean_length": float(rollout.response_lengths.float().mean()),
               "completions/clipped_ratio": float((~rollout.ended).float().mean()),
               "completions/repetition": sum(repeated_ngram_share(t) for t in rollout.texts) / len(rollout.texts)}
    metrics.update({f"rewards/{name}": float(values.mean()) for name, values in parts.items()})
    return metrics


def print_samples(step: int, row: dict, texts: list[str], rewards: torch.Tensor, advantages: torch.Tensor) -> None:
    """--debug_mode: one prompt, its samples, their rewards and advantages."""
    from utils.runtime import print0
    print0(f"--- step {step}: {row['prompt'][-1]['content']!r}")
    for t, r, a in zip(texts, rewards.tolist(), advantages.tolist()):
        print0(f"    reward {r:+.3f} advantage {a:+.3f}  {t!r}")


def reference_logprobs(run, sequences: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
                       first_needed: int, group: int = 1, chunk: int = 64) -> torch.Tensor:
    """(N, L) log-probs of the sampled tokens under the frozen reference, about ``chunk`` rows at a
    time; ``group`` consecutive rows share a prompt, which then runs once."""
    with run.reference_model() as ref, run.autocast():
        return chunked_grouped_logprobs(ref, sequences, attention_mask, first_needed, group, temperature, chunk)


def _gather(run, values: torch.Tensor) -> torch.Tensor:
    """Every rank's values, concatenated in rank order (equal sizes on every rank)."""
    if not run.dist.enabled:
        return values
    t = values.to(run.device)
    out = [torch.empty_like(t) for _ in range(run.dist.world_size)]
    torch.distributed.all_gather(out, t)
    return torch.cat(out).cpu()
