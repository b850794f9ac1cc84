"""Group policy optimisation (GPO, GRPO): advantages, the clipped loss, KL, and one training step.

Shapes: P prompts, G samples per prompt, N = P*G samples (grouped: rows g*G..g*G+G-1 answer
prompt g), T tokens, L = T-1 predicted tokens (model.logprobs.token_logprobs's layout).
"""
from __future__ import annotations

import argparse
import os

import torch

from utils.checkpoint import OLD_LOSS_AGG   # --loss_agg, the old spelling of --loss_type
from model.logprobs import chunked_grouped_logprobs, grouped_token_logprobs, masked_reduce
from core.runtime import print0

ADV_EPS = 1e-4
# --loss_type of the group scripts (utils.rl.policy_loss); PPO takes the aggregations only.
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "seed_sum")
AGGREGATION_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
IS_LEVELS = ("token", "sequence")
CISPO_EPSILON_HIGH = 5.0                                        # MiniMind's default cap of the CISPO ratio


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


def loss_normaliser(loss_mask: torch.Tensor, loss_type: str, G: int = 1, max_gen_len: int | None = None) -> torch.Tensor:
    """The count ``loss_type`` divides its summed loss by, over the rows of loss_mask (N, L).

    dapo, cispo, bnpo: response tokens in the loss;  grpo: sequences in the loss (rows with a token
    in it);  dr_grpo: those sequences x max_gen_len;  seed_sum: those sequences / G (groups).
    A 0-d float tensor; utils.rl.step_normalisers sums it over a whole optimizer step.
    """
    m = loss_mask.to(torch.float32)
    if loss_type in ("dapo", "cispo", "bnpo"):
        return m.sum()
    rows = m.amax(-1).sum() if m.numel() else m.sum()
    if loss_type == "grpo":
        return rows
    if loss_type == "dr_grpo":
        if not max_gen_len:
            raise ValueError("dr_grpo divides by sequences x max_gen_len: give max_gen_len")
        return rows * max_gen_len
    if loss_type == "seed_sum":
        return rows / G
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def summed_loss(per_token: torch.Tensor, loss_mask: torch.Tensor, loss_type: str, seq_reduce: str = "sum") -> torch.Tensor:
    """The numerator of ``loss_type``: per-token losses (N, L) summed over loss_mask (N, L) as the
    type weighs them. grpo sums each sequence's token mean; seed_sum each sequence's token sum
    (or mean, seq_reduce "mean"); every other type sums the tokens themselves."""
    if loss_type == "grpo":
        return masked_reduce(per_token, loss_mask, "mean").sum()
    if loss_type == "seed_sum":
        return masked_reduce(per_token, loss_mask, seq_reduce).sum()
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return (per_token * loss_mask.to(per_token.dtype)).sum()


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
                ref_logps: torch.Tensor | None = None, beta: float = 0.0, loss_type: str = "dapo", G: int = 1, *,
                importance_sampling_level: str = "token", normaliser: torch.Tensor | float | None = None,
                max_gen_len: int | None = None, seq_reduce: str = "sum"):
    """The policy-gradient loss of the group methods (and PPO's), one of ``loss_type``, plus
    beta * k3 KL to the reference.

    logps, old_logps, ref_logps, response_mask: (N, L); advantages: (N,), one per sample, or
    (N, L), one per token (PPO's GAE). response_mask is the loss mask: tokens off it count nowhere.

    Ratio: token level r_t = exp(logp_t - old_t); sequence level (GSPO, Zheng et al. 2025)
    s = exp(mean over the sequence's tokens of (logp_t - old_t)), one per sequence for all its tokens.
    Per token, with A the advantage and sg() stop-gradient:
        every type but cispo  l_t = max(-A r, -A clip(r, 1 - epsilon, 1 + epsilon_high))   (PPO-clip)
        cispo                 l_t = -sg(min(r, epsilon_high)) A logp_t      (MiniMax-M1; MiniMind, TRL)
    then l_t += beta k3_t, and the loss is summed_loss / normaliser:
        dapo     sum of l_t / response tokens              (DAPO: each token weighs the same)
        cispo    as dapo
        grpo     sum over sequences of their token mean / sequences    (DeepSeekMath)
        bnpo     as dapo, but over the local batch only (TRL's bnpo)
        dr_grpo  sum of l_t / (sequences x max_gen_len), a constant    (Dr. GRPO, Liu et al. 2025)
        seed_sum sum over sequences of their token sum (seq_reduce "mean": token mean) / groups:
                 the chapter's -E_x[sum_i A_i log pi(y_i|x)]
    normaliser None: this batch's own count (loss_normaliser); under gradient accumulation or
    torchrun the caller passes the whole optimizer step's count (utils.rl.step_normalisers), so
    the micro-batch losses add up to the loss of the whole step. These match TRL's
    GRPOTrainer._compute_loss per type. epsilon_high None: epsilon, or 5.0 under cispo (MiniMind's
    cap). Returns (loss, metrics) with clip_ratio (share of loss
    tokens where the clip, or cispo's cap, is active) and kl (mean k3 per loss token).
    """
    if epsilon_high is None:
        epsilon_high = CISPO_EPSILON_HIGH if loss_type == "cispo" else epsilon
    mask = response_mask.to(logps.dtype)
    log_ratio = logps - old_logps.detach()
    if importance_sampling_level == "sequence":
        log_ratio = (masked_reduce(log_ratio, mask, "mean"))[:, None]                 # (N, 1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)                                                      # (N, L) or (N, 1)
    adv = advantages.detach().to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    if loss_type == "cispo":
        capped = torch.clamp(ratio, max=epsilon_high).detach()
        per_token = -capped * adv * logps
        active = (ratio > epsilon_high).expand_as(logps)
    else:
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
        per_token = torch.maximum(unclipped, clipped).expand_as(logps)
        active = (clipped > unclipped).expand_as(logps)
    count = mask.sum().clamp(min=1)
    metrics = {}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps.detach())
        if beta:
            per_token = per_token + beta * kl
        metrics["kl"] = (kl.detach() * mask).sum() / count
    if normaliser is None:
        normaliser = loss_normaliser(mask, loss_type, G, max_gen_len)
    loss = summed_loss(per_token, mask, loss_type, seq_reduce) / torch.as_tensor(normaliser).clamp(min=1e-8)
    with torch.no_grad():
        metrics["clip_ratio"] = (active.to(mask.dtype) * mask).sum() / count
    return loss, metrics


def step_normalisers(loss_masks: list[torch.Tensor], loss_type: str, G: int = 1, max_gen_len: int | None = None,
                     all_sum=None, world_size: int = 1) -> list[torch.Tensor]:
    """The normaliser of each micro-batch of one optimizer step, from their loss masks (n_k, L),
    computed before any backward.

    Every type but bnpo: the step's count (loss_normaliser) over all its micro-batches and, through
    ``all_sum`` (utils.train.Run.all_sum), all ranks, divided by the number of ranks because DDP
    averages the ranks' gradients. The micro-batch losses then add up, over micro-batches and
    ranks, to the loss of the whole step: its gradient does not depend on how the step is cut.
    bnpo is local by definition: each micro-batch's own token count times the number of
    micro-batches (the mean of the micro-batches' token means, as TRL's bnpo under accumulation).
    """
    counts = [loss_normaliser(m, loss_type, G, max_gen_len) for m in loss_masks]
    if loss_type == "bnpo":
        return [c.clamp(min=1) * len(loss_masks) for c in counts]
    total = torch.stack(counts).sum()
    if all_sum is not None:
        total = all_sum(total)
    return [total.clamp(min=1e-8) / world_size] * len(loss_masks)


def overlong_penalty(lengths: torch.Tensor, max_gen_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of response lengths (N,) in tokens:
    0 up to max_gen_len - cache, then falling linearly, (max_gen_len - cache - |y|) / cache, to -1
    at max_gen_len (no response is longer: sampling stops there). Added to the reward."""
    if cache < 1 or cache > max_gen_len:
        raise ValueError(f"the overlong cache must be in [1, max_gen_len={max_gen_len}], got {cache}")
    return ((max_gen_len - cache - lengths.float()) / cache).clamp(max=0.0)


def group_loss_mask(response_mask: torch.Tensor, ended: torch.Tensor, zero_std: torch.Tensor,
                    mask_truncated: bool, drop_zero_std: bool) -> torch.Tensor:
    """The loss mask (N, L): response_mask (N, L) without the rows of responses that never ended
    (ended (N,) False; with mask_truncated) and of groups with no reward signal (zero_std (N,)
    True; with drop_zero_std). Those rows count nowhere: not in the loss, not in its normaliser."""
    keep = torch.ones(response_mask.shape[0], dtype=torch.bool, device=response_mask.device)
    if mask_truncated:
        keep &= ended.to(keep.device)
    if drop_zero_std:
        keep &= ~zero_std.to(keep.device)
    return response_mask * keep[:, None].to(response_mask.dtype)


def zero_std_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """(N,) bool: the samples of groups whose G rewards (N,) are all equal (no signal: advantage 0)."""
    return (rewards.float().view(-1, G).std(1) < 1e-8).repeat_interleave(G)


# ----------------------------------------------------------------------------- one training step
def add_group_args(parser, *, beta: float, loss_type: str = "dapo", ppo_epochs: int = 1) -> None:
    """The policy-update flags GPO and GRPO share."""
    g = parser.add_argument_group("policy update")
    g.add_argument("--epsilon", type=float, default=0.2, help="PPO clip range below 1 (default: %(default)s)")
    g.add_argument("--epsilon_high", type=float, default=None,
                   help="clip range above 1; larger values, e.g. 0.28, are DAPO's clip-higher; under cispo the cap "
                        f"of the ratio (default: --epsilon, {CISPO_EPSILON_HIGH} under cispo)")
    g.add_argument("--beta", type=float, default=beta, help="weight of the k3 KL to the reference; 0: no reference "
                   "forward (default: %(default)s)")
    add_loss_type_arg(g, LOSS_TYPES, loss_type,
                      "dapo: token sum / tokens of the whole optimizer step (DAPO; what token_mean means); "
                      "grpo: each response's token mean, then mean over responses (DeepSeekMath); bnpo: token mean "
                      "of each micro-batch; dr_grpo: token sum / (responses x --max_gen_len) (Dr. GRPO); cispo: the "
                      "ratio capped at --epsilon_high and detached weights the log-prob, aggregated as dapo "
                      "(MiniMax-M1, MiniMind); seed_sum: the chapter's -sum_i A_i log pi(y_i|x) per group, mean over "
                      "groups")
    g.add_argument("--importance_sampling_level", choices=IS_LEVELS, default="token",
                   help="token: one ratio per token; sequence: GSPO's exp(mean over the response of log r), clipped "
                        "per response (default: %(default)s)")
    g.add_argument("--mask_truncated", type=int, choices=[0, 1], default=0,
                   help="1: responses that reach --max_gen_len without an end token count nowhere in the loss "
                        "(still logged) (default: 0)")
    g.add_argument("--overlong_penalty", type=int, default=0,
                   help="L > 0: DAPO's soft overlong penalty, added to the reward, falling from 0 to -1 over the "
                        "last L tokens before --max_gen_len (default: 0, off)")
    g.add_argument("--drop_zero_std", type=int, choices=[0, 1], default=0,
                   help="1: groups whose rewards are all equal count nowhere in the loss or its token count "
                        "(logged as groups_used) (default: 0)")
    g.add_argument("--ppo_epochs", type=int, default=ppo_epochs,
                   help="passes over each rollout batch; old log-probs are the sampling-time ones (default: %(default)s)")
    g.add_argument("--mini_batch_size", type=int, default=0,
                   help="samples per optimizer update within a rollout batch; 0: all of them (default: 0)")
    add_debug_args(g)


def add_loss_type_arg(group, choices, default: str, what: str) -> None:
    """--loss_type, and --loss_agg token_mean|seq_mean, its old spelling of dapo|grpo (it sets --loss_type)."""
    group.add_argument("--loss_type", choices=choices, default=default, help=f"{what} (default: %(default)s)")

    def old_spelling(value: str) -> str:
        if value not in OLD_LOSS_AGG:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from token_mean, seq_mean)")
        return OLD_LOSS_AGG[value]
    group.add_argument("--loss_agg", dest="loss_type", type=old_spelling, metavar="{token_mean,seq_mean}",
                       help="the old spelling of --loss_type: token_mean is dapo, seq_mean is grpo")


def epsilon_high_of(args) -> float:
    """--epsilon_high as given, else 5.0 under cispo (MiniMind's cap) and --epsilon otherwise."""
    if args.epsilon_high is not None:
        return args.epsilon_high
    return CISPO_EPSILON_HIGH if args.loss_type == "cispo" else args.epsilon


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
    if args.loss_type != "cispo" and args.epsilon_high is not None and args.epsilon_high >= 2:
        problems.append(f"--epsilon_high {args.epsilon_high} under --loss_type {args.loss_type} is the clip range above "
                        f"1 (ratios clipped to [{1 - args.epsilon:g}, {1 + args.epsilon_high:g}], hardly a clip); "
                        f"MiniMind's 5.0 is CISPO's cap of the ratio: add --loss_type cispo, or give a clip range "
                        f"such as DAPO's 0.28")
    if args.beta < 0:
        problems.append(f"--beta must be 0 or positive (got {args.beta})")
    if args.ppo_epochs < 1:
        problems.append(f"--ppo_epochs must be at least 1 (got {args.ppo_epochs})")
    if not 0 <= args.overlong_penalty <= args.max_gen_len:
        problems.append(f"--overlong_penalty must be 0 (off) or a length in tokens up to --max_gen_len "
                        f"{args.max_gen_len} (got {args.overlong_penalty})")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(args, "adv_level", "sample") == "group" and args.batch_size * world < 2:
        problems.append(f"--adv_level group z-scores each prompt's mean reward across the prompts of a step, and a "
                        f"step holds {args.batch_size * world}; raise --batch_size (or use --adv_level sample)")
    return problems


def update_arg_problems(args) -> list[str]:
    """What is wrong with --mini_batch_size, --accumulation_steps and --debug_interval."""
    problems = []
    n = args.batch_size * args.num_generations
    if args.mini_batch_size < 0 or args.mini_batch_size > n or (args.mini_batch_size and n % args.mini_batch_size):
        problems.append(f"--mini_batch_size must divide the {n} samples of a step (--batch_size x --num_generations), "
                        f"or be 0 (got {args.mini_batch_size})")
    mb = args.mini_batch_size or n
    if args.accumulation_steps is not None and mb % args.accumulation_steps:
        problems.append(f"--accumulation_steps {args.accumulation_steps} must divide the {mb} samples of a mini-batch")
    if args.debug_interval < 1:
        problems.append("--debug_interval must be at least 1")
    return problems


def check_rl_args(args, algorithm_problems=group_arg_problems) -> None:
    """Every problem with the shared, sampling, update and the algorithm's own flags
    (``algorithm_problems(args) -> [messages]``), raised once, before any model is built."""
    from utils.args import rollout_arg_problems
    from core.errors import UserError
    from utils.train import validate_common_args
    validate_common_args(args)
    problems = rollout_arg_problems(args) + algorithm_problems(args) + update_arg_problems(args)
    if args.max_seq_len - args.max_gen_len < 1:
        problems.append(f"--max_seq_len {args.max_seq_len} leaves no room for a prompt beside --max_gen_len "
                        f"{args.max_gen_len}: here it counts prompt + response (MiniMind's counts the prompt alone); "
                        f"give --max_seq_len {args.max_seq_len + args.max_gen_len} for MiniMind's meaning")
    if problems:
        raise UserError("; ".join(problems))


def choose_micro_batches(args, demo_weights: str | None, group: int = 1) -> None:
    """--accumulation_steps when it was not given (None): 1 on the demo's weights (``demo_weights``
    says why they are; see model.loading.demo_weights); on any other weights the fewest
    micro-batches that keep a forward to at most ``args.real_micro_batch`` sequences, whole groups
    of ``group`` rows where that is possible (the group step runs each group's prompt once),
    printed when it cuts. The scripts' default steps hold 64-128 samples: in one forward with its
    graph, on a 135M-parameter model, GPO's took 14.5 GiB and PPO's (two forwards, policy and
    critic) more than 23 GiB. The update is the same, each micro-batch's loss being normalised over
    the whole mini-batch (step_normalisers), except bnpo's token mean, which is per micro-batch."""
    if args.accumulation_steps is not None:
        return
    if demo_weights:
        args.accumulation_steps = 1
        return
    cap = args.real_micro_batch
    mb = args.mini_batch_size or args.batch_size * args.num_generations
    fits = [d for d in range(1, mb + 1) if mb % d == 0 and mb // d <= cap]
    args.accumulation_steps = next((d for d in fits if (mb // d) % group == 0), fits[0])
    if args.accumulation_steps > 1:
        bnpo = "; --loss_type bnpo takes its token mean in each of them" if args.loss_type == "bnpo" else ""
        print0(f"--accumulation_steps {args.accumulation_steps}: forwards of {mb // args.accumulation_steps} of the "
               f"{mb} samples of a mini-batch, for weights that are not the demo's (at most {cap} a forward there; "
               f"the demo's 1; pass --accumulation_steps to choose){bnpo}")


def start_rl_run(args, algorithm: str, prompts: list[dict], wrap=None, group: int = 1):
    """(run, order, prompt_ids, engine) of an RL run: the policy with LoRA and its reference
    (``wrap``: see utils.train.Run), --accumulation_steps chosen if not given (micro-batches of
    whole groups of ``group`` rows where possible), the prompts tokenized once, their seeded
    order, the sampler."""
    from utils.rollout import HFRolloutEngine
    from utils.train import DataOrder, Run
    run = Run(args, algorithm, reference="shared" if args.use_lora else "copy", wrap=wrap)
    choose_micro_batches(args, run.demo_weights, group)
    prompt_ids = encode_prompts(run.tokenizer, prompts, args.max_seq_len - args.max_gen_len, args.thinking_ratio,
                                args.seed)
    order = DataOrder(len(prompts), args.batch_size, args.epochs, 1, args.seed, run.dist, what="prompts")
    run.check_resume(order)       # a bad resume file stops the run before the sampler and rewards are set up
    engine = HFRolloutEngine(run.lm, run.tokenizer, args.max_gen_len,
                             args.temperature, args.top_p, args.top_k, autocast=run.autocast,
                             merge=bool(args.merge_for_sampling))
    return run, order, prompt_ids, engine


def start_group_run(args, algorithm: str, prompts: list[dict]):
    """start_rl_run for GPO / GRPO, plus AdamW over the policy's adapters."""
    run, order, prompt_ids, engine = start_rl_run(args, algorithm, prompts, group=args.num_generations)
    optimizer = torch.optim.AdamW(run.trainable_parameters(), lr=args.learning_rate, weight_decay=0.0)
    return run, order, prompt_ids, engine, optimizer


def encode_prompts(tokenizer, prompts: list[dict], max_prompt_len: int, thinking_ratio: float | None = None,
                   seed: int = 0) -> list[list[int]]:
    """Token ids of each prompt, cut from the left to ``max_prompt_len``.

    thinking_ratio p (--thinking_ratio): a share p of the prompts, drawn once from ``seed`` (so
    a resumed run sees the same ones), is rendered with the template's thinking switch on and the
    rest with it off, as MiniMind's RLAIF data does; a template without a switch says so once."""
    from dataset.encoding import encode_prompt, thinking_switch
    from core.runtime import print0
    switches = [{} for _ in prompts]
    if thinking_ratio is not None:
        name = thinking_switch(tokenizer)
        if name is None:
            print0(f"--thinking_ratio {thinking_ratio} does nothing: the chat template has no thinking switch "
                   f"(enable_thinking / open_thinking)")
        else:
            on = (torch.rand(len(prompts), generator=torch.Generator().manual_seed(seed)) < thinking_ratio).tolist()
            switches = [{name: value} for value in on]
            print0(f"--thinking_ratio {thinking_ratio}: {sum(on)} of {len(prompts)} prompts with {name}=True")
    return [encode_prompt(tokenizer, p["prompt"], **kw)[-max_prompt_len:] for p, kw in zip(prompts, switches)]


def prompt_fields(rows: list[dict], G: int) -> dict[str, list]:
    """The prompt file's other columns, one value per sample (each row's repeated G times)."""
    keys = sorted({k for r in rows for k in r if k != "prompt"})
    return {k: [r.get(k) for r in rows for _ in range(G)] for k in keys}


def reward_samples(rewards, rows: list[dict], texts: list[str], G: int):
    """``rewards`` (utils.rewards.RewardFunctions) of the G sampled texts of each prompt row:
    (rewards (N,), {name: (N,)})."""
    return rewards([r["prompt"] for r in rows for _ in range(G)], texts, prompt_fields(rows, G))


def make_group_step(run, order, prompts: list[dict], prompt_ids: list[list[int]], engine, optimizer, score,
                    *, baseline: str = "mean", scale: str = "group", level: str = "sample", seq_reduce: str = "sum"):
    """one_step(state, lr) for utils.train.run_steps: sample G responses for this step's prompts,
    score them (``score(rows, rollout) -> (rewards (N,), {name: (N,)})``), add --overlong_penalty,
    turn rewards into group advantages (over every rank's samples), then --ppo_epochs passes of
    --loss_type updates over mini-batches, each one optimizer step whose loss normaliser is
    counted over all its micro-batches and ranks before the first backward (step_normalisers).
    --mask_truncated and --drop_zero_std take samples out of the loss mask."""
    from utils.train import clip_and_step
    args, G = run.args, run.args.num_generations
    epsilon_high = epsilon_high_of(args)

    def one_step(state, lr):
        rows, rollout, rewards, parts = sample_and_score(state, order, prompts, prompt_ids, engine, score, G)
        N = rewards.numel()
        if args.overlong_penalty:
            penalty = overlong_penalty(rollout.response_lengths.cpu(), args.max_gen_len, args.overlong_penalty)
            rewards, parts = rewards + penalty, {**parts, "overlong_penalty": penalty}
        everyone = _gather(run, rewards)                                        # (world*N,)
        advantages = group_advantages(everyone, G, baseline, scale, level)
        mine = slice(run.dist.rank * N, (run.dist.rank + 1) * N)
        advantages = advantages[mine].to(run.device)
        zero_std = zero_std_groups(everyone, G)
        seqs, am, first = rollout.sequences, rollout.attention_mask, rollout.prompt_len
        resp_mask = rollout.response_mask[:, 1:]                                # (N, L)
        loss_mask = group_loss_mask(resp_mask, rollout.ended, zero_std[mine], bool(args.mask_truncated),
                                    bool(args.drop_zero_std))
        ref_logps = reference_logprobs(run, seqs, am, args.temperature, first, G) if args.beta > 0 else None
        mb = args.mini_batch_size or N
        micro = mb // args.accumulation_steps
        # One pass over the whole batch before any update is on-policy: the old log-probs are the
        # new ones, detached (ratio 1), and the sampling-time forward is not needed.
        once = args.ppo_epochs == 1 and mb == N
        old_logps = None if once else rollout.logps
        # Micro-batches of whole groups run each prompt once (model.logprobs.grouped_token_logprobs).
        g = G if micro % G == 0 else 1
        sums, updates = {}, args.ppo_epochs * (N // mb)
        for _ in range(args.ppo_epochs):
            order_ = shuffled_rows(N, g) if (args.ppo_epochs > 1 or mb < N) else torch.arange(N)
            for start in range(0, N, mb):
                parts_idx = [order_[start + k * micro:start + (k + 1) * micro].to(run.device)
                             for k in range(args.accumulation_steps)]
                norms = step_normalisers([loss_mask[idx] for idx in parts_idx], args.loss_type, G, args.max_gen_len,
                                         run.all_sum, run.dist.world_size)
                for k, (idx, norm) in enumerate(zip(parts_idx, norms)):
                    with run.grad_sync(k):
                        with run.autocast():
                            logps, ent = grouped_token_logprobs(run.model, seqs[idx], am[idx], first, g,
                                                                args.temperature, with_entropy=True)
                        loss, m = policy_loss(
                            logps, logps.detach() if once else old_logps[idx], advantages[idx], loss_mask[idx],
                            args.epsilon, epsilon_high, None if ref_logps is None else ref_logps[idx], args.beta,
                            args.loss_type, G, importance_sampling_level=args.importance_sampling_level,
                            normaliser=norm, max_gen_len=args.max_gen_len, seq_reduce=seq_reduce)
                        run.backward(loss)
                    m["entropy"] = masked_reduce(ent, resp_mask[idx], "sum").sum() / resp_mask[idx].sum().clamp(min=1)
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / updates   # the step's loss, summed
                    for key, v in m.items():
                        sums[key] = sums.get(key, 0.0) + float(v) * len(idx) / (N * args.ppo_epochs)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + clip_and_step(run, optimizer, args.grad_clip) / updates
        grouped = rewards.view(-1, G)
        metrics = {**sums, "reward": float(rewards.mean()), "reward_std": float(grouped.std(1).mean()),
                   "frac_reward_zero_std": float(zero_std.float().mean()),
                   **completion_metrics(rollout, parts)}
        if args.drop_zero_std:
            metrics["groups_used"] = float((~zero_std).sum()) / G                # of every rank's groups
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
    from core.runtime import print0
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
