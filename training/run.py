"""The model of one training process and what surrounds it: the torchrun process group, the
weights it loads with their tokenizer, the LoRA adapters, the frozen reference, the DDP wrapper,
and where it saves its weights.

A Run knows no algorithm. A script may wrap the adapted LM in a module of its own (``wrap``: a
reward model's value head, PPO's policy and critic); what that module saves besides the LM's
adapter, it says itself through ``saves(name)`` (model.value_head.WeightsToSave).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from core.runtime import autocast_context, init_distributed, print0, seed_everything
from model.config import LMConfig, weight_name
from model.export import export
from model.loading import demo_weights, disable_dropout, init_model
from model.lora import adapters_disabled, apply_lora, save_lora, trainable_parameters
from model.minimind import RouterLogits, moe_aux_loss
from model.value_head import WeightsToSave
from training.checkpoint import resume_path

REFERENCES = (None, "shared", "copy")


class Run:
    """The model and everything around it for one training process."""

    def __init__(self, args, algorithm: str, reference: str | None = None, wrap=None):
        """reference: None (no reference model), "shared" (the policy's weights with the LoRA
        adapters off: one copy in memory; needs --use_lora 1) or "copy" (a separate frozen copy of
        the start weights). wrap(lm, run): builds the trained module from the LM once its
        adapters are in (model.value_head.reward_model_for_training, rl.ppo.actor_critic_builder);
        heads train and are saved with the weights. The flags are checked before (training.args)."""
        if reference not in REFERENCES or (reference == "shared" and not args.use_lora):
            raise ValueError(f"reference {reference!r} with use_lora {args.use_lora}: shared needs LoRA adapters")
        self.args, self.algorithm, self.reference, self.dtype = args, algorithm, reference, args.dtype
        self.dist, self.device = init_distributed(args.device)
        seed_everything(args.seed)
        self.lm_config = LMConfig.from_args(args)
        model, self.tokenizer = init_model(self.lm_config, args.from_weight, device=self.device,
                                           save_dir=args.save_dir, tokenizer_path=args.tokenizer_path,
                                           eos_token=args.eos_token, base_weight=args.base_weight)
        source = model.weight_source
        self.demo_weights = demo_weights(source, self.tokenizer)     # why they are the demo's; None: a real model's
        choose_learning_rate(args, self.demo_weights)
        if args.disable_dropout and disable_dropout(model):
            print0("dropout of the model set to 0 for the run (--disable_dropout 0 keeps it)")
        # The reference is the start weights, frozen: a copy taken before any adapter goes in.
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False) if reference == "copy" else None
        if args.use_lora:
            apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets)
        else:
            model.requires_grad_(True)
        if wrap is not None:
            model = wrap(model, self)
        model.train()
        self.base_model = model
        self.routers = self._trained_routers()
        # Every forward that feeds a loss goes through self.model, so DDP syncs the gradients.
        self.model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.dist.enabled else model
        if args.use_compile:
            self.model = torch.compile(self.model)
        self.stem = weight_name(args.save_weight, self.lm_config.hidden_size, self.lm_config.use_moe)
        self.weights_dir = self.weights_dir_for(args.save_weight)
        self.metrics_path = os.path.join(args.save_dir, self.stem + "_metrics.jsonl")
        self.resume_file = resume_path(args.checkpoint_dir, args.save_weight, self.lm_config.hidden_size,
                                       self.lm_config.use_moe)
        self._replicas_reported = False
        trainable, total = trainable_parameters(self.base_model)
        print0(f"{algorithm}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
               f"({'LoRA r=%d' % args.lora_rank if args.use_lora else 'all'}), device {self.device}, "
               f"{self.dist.world_size} process(es)")
        print0(f"weights {source.path or 'random init'}, tokenizer {self.tokenizer.name_or_path} "
               f"({len(self.tokenizer)} tokens)")

    @property
    def lm(self):
        """The causal LM itself, under a value head or PPO's ActorCritic if there is one."""
        return getattr(self.base_model, "lm", self.base_model)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.base_model.parameters() if p.requires_grad]

    def autocast(self):
        return autocast_context(self.device, self.dtype)

    def grad_sync(self, last: bool):
        """Context for a backward: under DDP, gradients are all-reduced only on the ``last``
        micro-batch of an optimizer step, not on every backward."""
        if self.dist.enabled and not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference, in eval mode, under no_grad: the separate copy, or the policy's
        own module with every adapter off. It feeds no gradient, so it bypasses the DDP wrapper."""
        if self.reference is None:
            raise RuntimeError(f"{self.algorithm} was set up without a reference model")
        if self.ref_model is not None:
            with torch.no_grad():
                yield self.ref_model
            return
        was_training = self.base_model.training
        self.base_model.eval()
        try:
            with torch.no_grad(), adapters_disabled(self.base_model):
                yield self.lm
        finally:
            self.base_model.train(was_training)

    # -------------------------------------------------------------- MoE
    def _trained_routers(self) -> RouterLogits | None:
        """An MoE model's routers when they train: MiniMind's load-balancing loss then joins every
        backward (moe_aux_loss)."""
        config = getattr(self.lm, "config", None)
        if getattr(config, "model_type", "") != "qwen3_moe" or config.router_aux_loss_coef <= 0:
            return None
        routers = RouterLogits(self.base_model)
        if routers.trains():
            return routers
        routers.remove()
        return None

    def moe_aux_loss(self) -> torch.Tensor | None:
        """MiniMind's load-balancing loss of the router logits of the forwards since the last
        call, or None when no router trains."""
        if self.routers is None:
            return None
        config = self.lm.config
        return moe_aux_loss(self.routers.pop(), config.num_experts_per_tok, config.router_aux_loss_coef)

    # -------------------------------------------------------------- saving
    def weights_dir_for(self, name: str) -> str:
        """{save_dir}/{name}_{hidden_size}[_moe]: where weights saved under that name go."""
        return os.path.join(self.args.save_dir, weight_name(name, self.lm_config.hidden_size, self.lm_config.use_moe))

    def save_weights(self, extra_meta: dict | None = None, stem: str | None = None) -> None:
        """LoRA-only adapter (PEFT format), or with --use_lora 0 a full Hugging Face model folder,
        plus whatever the trained module's ``saves`` adds (a value head; PPO's critic under a name
        of its own). stem: save under another name (the best evaluation's): the first of those
        saves alone."""
        os.makedirs(self.args.save_dir, exist_ok=True)
        module = self.base_model
        name = self.args.save_weight if stem is None else stem
        saves = module.saves(name) if hasattr(module, "saves") else [WeightsToSave(name)]
        for entry in saves[:1] if stem is not None else saves:
            folder = self.weights_dir_for(entry.name)
            meta = {"algorithm": self.algorithm, **(extra_meta or {}), **entry.meta}
            if self.args.use_lora:
                save_lora(self.lm, folder, base=self.args.from_weight, lm_config=self.lm_config,
                          adapter_name=entry.adapter, extra=meta, extra_tensors=entry.tensors or None,
                          tokenizer=self.tokenizer)
            else:
                export(self.lm, self.tokenizer, folder, meta={"base": self.args.from_weight, **meta},
                       extra_tensors=entry.tensors or None)

    def check_replicas_agree(self, step: int) -> None:
        """Under DDP, stop if the ranks' trainable weights differ: every rank applies the same
        all-reduced gradients, so they are identical unless a loss forward bypassed the wrapper."""
        if not self.dist.enabled:
            return
        sums = torch.stack([p.detach().double().sum() for p in self.trainable_parameters()])
        gathered = self.dist.all_gather(sums).view(self.dist.world_size, -1)
        if any(not torch.equal(g, gathered[0]) for g in gathered[1:]):
            raise RuntimeError(f"the {self.dist.world_size} processes hold different weights at step {step}: "
                               f"gradients were not synchronised")
        if not self._replicas_reported:
            print0(f"step {step}: weights identical on all {self.dist.world_size} processes")
            self._replicas_reported = True

    def close(self, clean: bool = True) -> None:
        """Leave the process group. The DDP wrapper goes first: freeing it after its process
        group is destroyed can hang the process at exit. After an error (clean=False) there is
        no barrier, since the other ranks may never reach it; torchrun stops them."""
        if self.dist.enabled and torch.distributed.is_initialized():
            self.model = self.base_model
            gc.collect()
            if clean:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def choose_learning_rate(args, why: str | None) -> None:
    """--learning_rate when it was not given (None): the script's demo value on the demo's weights
    (``why`` they are: model.loading.demo_weights), tuned so the 2M-parameter demo learns in
    minutes; its real-model value on any other weights (``why`` None), measured on
    SmolLM2-135M-Instruct (recipes/smollm2), where the demo value makes the policy drift. Prints
    which and why."""
    if args.learning_rate is not None:
        return
    demo, real = args.demo_learning_rate, args.real_learning_rate
    args.learning_rate = demo if why else real
    said = f"the demo's value, for {why}" if why else "the real-model value, for weights that are not the demo's"
    print0(f"--learning_rate {args.learning_rate:g}: {said} (the demo's is {demo:g}, a real model's {real:g}; "
           f"pass --learning_rate to choose)")
