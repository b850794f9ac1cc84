"""Direct Preference Optimization with LoRA and a frozen reference.

    python train_dpo.py                                    # the shipped demo, from the shipped SFT model
    nohup python train_dpo.py --epochs 20 --hidden_size 2048 --device "cuda:6" --batch_size 16 \\
        --learning_rate 1e-4 --accumulation_steps 8 --log_interval 10 --save_interval 100 \\
        --data_path ../dataset/dpo.jsonl --num_hidden_layers 20 --use_wandb --from_resume 1 \\
        --from_weight lora_identity > train_lora.log 2>&1 &
    torchrun --nproc_per_node 8 train_dpo.py ...           # DDP, the same flags

Loss (DESIGN section 6): h = (l_pol(y+) - l_pol(y-)) - (l_ref(y+) - l_ref(y-)),
-log sigmoid(beta h), with ipo / hinge / robust / apo_zero variants and label smoothing (cDPO);
``--loss_type simpo`` is reference-free (no reference model, no precompute) and
``--rpo_alpha A`` adds A times the chosen response's NLL per token (RPO, default 1: the answers then
move towards the chosen ones rather than only away from the rejected; ``--rpo_alpha 0`` is the seed's
plain DPO); see losses/preference.py.
Unlike the paper, l(y) is by default the mean log-prob per response token, as in the seed
(``--logp_reduce sum`` gives the paper's sum). A per-token mean is about |y| times smaller than
the sum, so beta must be about that much larger: the default beta is 5 with mean, 0.1 with sum.
A --beta under 0.5 with no --logp_reduce (MiniMind's 0.15, TRL's 0.1) is read as a beta of sums;
with an explicit --logp_reduce mean it stops with the two fixes (sigmoid, hinge, robust).

The policy is the start weights plus LoRA adapters; the reference is the same weights with the
adapters off (``--ref_model copy`` keeps a separate frozen copy instead). A pair's prompt runs
once and its chosen and rejected responses continue from it together; only response tokens
count. With ``--precompute_ref 1`` (the default when --epochs > 1) the reference log-probs of
the pairs the run will use are computed once before training, after every check (flags, data,
weights, resume file) has passed.
"""
from __future__ import annotations

import argparse

import torch

from core.errors import check_args, run_cli
from core.runtime import print0, to_device
from dataset.batches import collate_pairs
from dataset.encoding import encode_pairs
from dataset.formats import load_pairs
from losses.preference import DPO_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, dpo_loss, rpo_nll, simpo_loss
from model.logprobs import pair_logprobs
from training.args import add_common_args, common_problems
from training.checkpoint import plan_start
from training.loop import Job, data_order, supervised_job
from training.run import Run

DEFAULT_BETA = {"mean": 5.0, "sum": 0.1}
SIMPO_BETA = 2.0   # the SimPO paper's range is 2 to 2.5 on per-token mean log-probs
# The losses whose beta scales a difference of log-ratios: with per-token means (about |y| times
# smaller than sums) a beta below this keeps beta h near 0 and the loss pinned at log 2.
# ipo and apo_zero have their own ranges.
SCALED_BETA_LOSS_TYPES = ("sigmoid", "hinge", "robust")
MIN_MEAN_BETA = 0.5


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    parser = argparse.ArgumentParser(description="DPO on preference pairs, with LoRA and a frozen reference.")
    add_common_args(parser, save_weight="dpo", data_path="dataset/dpo.jsonl", epochs=2, learning_rate=3e-4,
                    real_learning_rate=1e-4, max_seq_len=1024)
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=None,
                   help="strength of the pull towards the reference (default: 5 with --logp_reduce mean, 0.1 with sum)")
    g.add_argument("--logp_reduce", choices=["mean", "sum"], default=None,
                   help="sequence log-prob: mean per response token (the seed) or sum (the paper, MiniMind's code, "
                        f"TRL) (default: mean; sum when --beta is given under {MIN_MEAN_BETA} for sigmoid, hinge or "
                        "robust, the scale such a beta is meant for)")
    g.add_argument("--loss_type", choices=DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES, default="sigmoid",
                   help="sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO), apo_zero (APO-zero), or simpo (SimPO: "
                        "no reference model; rewards/* are then beta times the policy's own per-token mean "
                        "log-probs; default beta 2) (default: %(default)s)")
    g.add_argument("--simpo_gamma", type=float, default=0.5,
                   help="SimPO's target margin gamma: loss -log s(beta (l(y+) - l(y-)) - gamma) (default: %(default)s)")
    g.add_argument("--rpo_alpha", type=float, default=1.0,
                   help="RPO: add this times the chosen response's NLL per token to the loss, logged as nll_loss "
                        "(TRL's rpo_alpha); 0 gives the seed's plain DPO (default: %(default)s)")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="share of pairs assumed mislabelled, for sigmoid (cDPO) and robust; in [0, 0.5) (default: 0)")
    g.add_argument("--ref_model", choices=["shared", "copy"], default=None,
                   help="shared: the policy with adapters off (one copy of the weights); copy: a separate frozen copy "
                        "(default: shared with LoRA, copy with --use_lora 0)")
    g.add_argument("--precompute_ref", type=int, choices=[0, 1], default=None,
                   help="1: reference log-probs computed once before training (default: 1 when --epochs > 1)")
    return parser


def parse_args(argv=None):
    args = arg_parser().parse_args(argv)
    reference_free = args.loss_type in REFERENCE_FREE_LOSS_TYPES
    if args.logp_reduce is None:
        args.logp_reduce = "sum" if summed_beta(args) else "mean"
    if args.beta is None:
        args.beta = SIMPO_BETA if reference_free else DEFAULT_BETA[args.logp_reduce]
    if args.ref_model is None and not reference_free:
        args.ref_model = "shared" if args.use_lora else "copy"
    if args.precompute_ref is None:
        args.precompute_ref = 0 if reference_free else int(args.epochs > 1)
    return args


def summed_beta(args) -> bool:
    """A --beta small enough to be meant for summed log-probs (MiniMind's 0.15, TRL's 0.1), given
    with no --logp_reduce: it is read as such and said so."""
    if args.beta is None or args.beta >= MIN_MEAN_BETA or args.loss_type not in SCALED_BETA_LOSS_TYPES:
        return False
    print0(f"--beta {args.beta:g} with no --logp_reduce: read as a beta of summed log-probs (MiniMind's and TRL's "
           f"DPO), so --logp_reduce sum; with --logp_reduce mean give a beta about |y| times larger (default 5)")
    return True


def dpo_problems(args) -> list[str]:
    """What is wrong with DPO's own flags."""
    problems = []
    if args.loss_type in SCALED_BETA_LOSS_TYPES and args.logp_reduce == "mean" and 0 < args.beta < MIN_MEAN_BETA:
        problems.append(f"--beta {args.beta:g} with --logp_reduce mean: per-token mean log-probs are about |y| times "
                        f"smaller than the sums such a beta is meant for, so beta times the log-ratio difference stays "
                        f"near 0 and the loss at log 2; give a larger --beta (about |y| times yours; 5 is the default "
                        f"with mean) or --logp_reduce sum")
    if args.beta <= 0:
        problems.append(f"--beta must be positive (got {args.beta})")
    if not 0 <= args.label_smoothing < 0.5:
        problems.append(f"--label_smoothing must be in [0, 0.5) (got {args.label_smoothing})")
    if args.label_smoothing and args.loss_type not in ("sigmoid", "robust"):
        problems.append(f"--label_smoothing applies to --loss_type sigmoid or robust, not {args.loss_type}")
    if args.rpo_alpha < 0:
        problems.append(f"--rpo_alpha must be >= 0 (got {args.rpo_alpha})")
    if args.loss_type in REFERENCE_FREE_LOSS_TYPES:
        if args.logp_reduce != "mean":
            problems.append(f"--loss_type {args.loss_type} is length-normalised: it needs --logp_reduce mean")
        if args.ref_model or args.precompute_ref:
            problems.append(f"--loss_type {args.loss_type} uses no reference model: drop --ref_model and --precompute_ref")
    if args.ref_model == "shared" and not args.use_lora:
        problems.append("--ref_model shared needs LoRA adapters to switch off; with --use_lora 0 use --ref_model copy")
    return problems


class OveroptimisationWatch:
    """Warns once when the chosen responses' log-prob per token has fallen below where it started
    while the reward margin has grown: the policy then pushes the rejected answers down faster
    than it pulls the chosen ones up, and what it generates drifts away from both.

    ``update`` takes one micro-batch's mean chosen log-prob per token and mean margin; the start
    is the mean of the first ``window`` micro-batches, "now" the mean of the last ``window``.
    """

    def __init__(self, window: int = 8):
        self.window, self.start, self.recent, self.warned = window, [], [], False

    def update(self, chosen_token_logp: float, margin: float) -> bool:
        """True at the one call that warns."""
        point = (float(chosen_token_logp), float(margin))
        if len(self.start) < self.window:
            self.start.append(point)
            return False
        self.recent = (self.recent + [point])[-self.window:]
        if self.warned or len(self.recent) < self.window:
            return False
        (logp0, margin0), (logp, margin_now) = (
            [sum(v) / len(v) for v in zip(*pts)] for pts in (self.start, self.recent))
        if logp < logp0 and margin_now > margin0:
            self.warned = True
            print0(f"warning: the chosen answers' log-prob per token fell from {logp0:.3f} to {logp:.3f} while the "
                   f"reward margin grew from {margin0:.2f} to {margin_now:.2f}: the policy is pushing the rejected "
                   f"answers down rather than the chosen ones up (over-optimisation; try a larger --rpo_alpha, "
                   f"a larger --beta or fewer steps)")
            return True
        return False


@torch.no_grad()
def precompute_reference(run: Run, items: list, batch_size: int, reduce: str,
                         used: set[int] | None = None) -> torch.Tensor:
    """(N, 2) reference log-probs (chosen, rejected) of every pair, or of the pairs in ``used``
    (the rows of the others may stay 0), on CPU.

    Each rank scores its share of the pairs (sorted by length, so batches carry little padding)
    and the shares are gathered, so every rank ends with the whole table. The batches are cut
    from the whole sorted share and only those holding a used pair run, so each pair gets the
    value (the same padding) it gets when every pair is scored.
    """
    rank, world = run.dist.rank, run.dist.world_size
    mine = sorted(range(rank, len(items), world), key=lambda i: len(items[i][0]) + max(len(items[i][1]), len(items[i][2])))
    table = torch.zeros(len(items), 2, dtype=torch.float64)
    pad = run.tokenizer.pad_token_id
    with run.reference_model() as ref:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            if used is not None and used.isdisjoint(idx):
                continue
            batch = to_device(collate_pairs([items[i] for i in idx], pad), run.device)
            with run.autocast():
                chosen, rejected = pair_logprobs(ref, batch, reduce)
            table[idx] = torch.stack([chosen, rejected], -1).double().cpu()
    # rows a rank did not score are 0 there, so the sum over ranks puts the table together
    return run.dist.all_sum(table.to(run.device)).cpu().float()


def build(args) -> Job:
    """Everything up to the first step: checks, data, model, reference (see training.loop.Job)."""
    check_args(args, common_problems, dpo_problems)   # bad flags and bad data stop the run before any model is built
    pairs = load_pairs(args.data_path)
    run = Run(args, "dpo", reference=args.ref_model)
    items, _ = encode_pairs(pairs, run.tokenizer, args.max_seq_len, args.data_path)
    order = data_order(run, len(items), "pairs")
    start = plan_start(run, order)            # a bad resume file stops the run here, not after the precompute
    ref_table = None
    if args.precompute_ref:                   # only the pairs this launch reads, up to the step it stops at
        used = order.used(start.state.micro, start.stop_step * order.micro_per_step)
        ref_table = precompute_reference(run, items, 2 * args.batch_size, args.logp_reduce, used)
        print0(f"reference log-probs computed once, for the {len(used)} of {len(items)} pairs the run uses")
    pad = run.tokenizer.pad_token_id
    watch = OveroptimisationWatch()

    def micro_step(indices):
        batch = to_device(collate_pairs([items[i] for i in indices], pad), run.device)
        with run.autocast():
            if ref_table is not None:
                ref_chosen, ref_rejected = ref_table[indices].to(run.device).unbind(-1)
            elif run.reference is not None:
                with run.reference_model() as ref:
                    ref_chosen, ref_rejected = pair_logprobs(ref, batch, args.logp_reduce)
            chosen, rejected, chosen_mean = pair_logprobs(run.model, batch, args.logp_reduce, chosen_token_mean=True)
        if run.reference is None:              # reference-free (simpo): no reference forward at all
            loss, metrics = simpo_loss(chosen, rejected, args.beta, args.simpo_gamma)
        else:
            loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta, args.loss_type,
                                     args.label_smoothing)
        if args.rpo_alpha:
            nll = rpo_nll(chosen_mean)
            loss = loss + args.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        watch.update(chosen_mean.detach().mean(), metrics["rewards/margins"])
        return loss, metrics, int(batch["attention_mask"].sum())

    return supervised_job(run, order, micro_step, "dpo", {"beta": args.beta, "loss_type": args.loss_type,
                                                          "logp_reduce": args.logp_reduce, "rpo_alpha": args.rpo_alpha,
                                                          "simpo_gamma": args.simpo_gamma}, start)


def main(args):
    return build(args)()


if __name__ == "__main__":
    run_cli(main, parse_args)
