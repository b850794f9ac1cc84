"""The set-up every RL script shares: the policy with its reference, the prompts tokenized once
and their order, the resume file checked, the sampler, and the forwards a step is cut into.
"""
from __future__ import annotations

from core.runtime import print0
from dataset.encoding import encode_prompts
from rl.rollout import HFRolloutEngine
from rl.step import PromptSource
from training.checkpoint import Start, plan_start
from training.order import DataOrder
from training.run import Run


def start_rl_run(args, algorithm: str, prompts: list[dict], wrap=None,
                 group: int = 1) -> tuple[Run, PromptSource, Start]:
    """(run, prompts, start) of an RL run: the policy with LoRA and its reference (``wrap``: see
    training.run.Run), --accumulation_steps chosen if not given (forwards of whole groups of
    ``group`` rows where possible), the prompt rows tokenized once with their seeded order and
    the sampler, and the resume file read and checked before the sampler is set up."""
    run = Run(args, algorithm, reference="shared" if args.use_lora else "copy", wrap=wrap)
    choose_micro_batches(args, run.demo_weights, group)
    prompt_ids = encode_prompts(run.tokenizer, prompts, args.max_seq_len - args.max_gen_len, args.thinking_ratio,
                                args.seed)
    order = DataOrder(len(prompts), args.batch_size, args.epochs, 1, args.seed, run.dist, what="prompts")
    start = plan_start(run, order)       # a bad resume file stops the run before the sampler is set up
    engine = HFRolloutEngine(run.lm, run.tokenizer, args.max_gen_len,
                             args.temperature, args.top_p, args.top_k, autocast=run.autocast,
                             merge=bool(args.merge_for_sampling))
    return run, PromptSource(prompts, prompt_ids, order, engine), start


def choose_micro_batches(args, demo_weights: str | None, group: int = 1) -> None:
    """--accumulation_steps when it was not given (None): 1 on the demo's weights (``demo_weights``
    says why they are; see model.loading.demo_weights); on any other weights the fewest
    micro-batches that keep a forward to at most ``args.real_micro_batch`` sequences, whole groups
    of ``group`` rows where that is possible (the group step runs each group's prompt once),
    printed when it cuts. The scripts' default steps hold 64-128 samples: in one forward with its
    graph, on a 135M-parameter model, GPO's took 14.5 GiB and PPO's (two forwards, policy and
    critic) more than 23 GiB. The update is the same, each micro-batch's loss being normalised over
    the whole mini-batch (losses.policy.step_normalisers), except bnpo's token mean, which is per
    micro-batch."""
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
