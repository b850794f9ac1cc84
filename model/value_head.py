"""A scalar head on a causal LM's backbone: reward models (train_reward.py) and critics (PPO).

``ValueHeadModel(lm)`` returns one value per position, (B, T); a reward model reads it at the
last real token of each sequence. Saved next to the backbone's weights (LoRA adapter or full
model folder) as ``value_head.safetensors`` (``weight`` (1, H), ``bias`` (1,)).
``model.reward_model.RewardModel`` scores (prompt, response) pairs with such a folder.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from core.errors import UserError
from model.logprobs import policy_forward, position_ids_from_mask
from model.lora import use_adapter
from model.strict import key_mismatch

HEAD_FILE = "value_head.safetensors"


@dataclass
class WeightsToSave:
    """One folder a trained module saves: under ``name`` (``{name}_{hidden_size}``), the LM's
    ``adapter``, with ``meta`` added to its minialign.json and ``tensors`` ({file: {key: tensor}})
    written beside the weights. training.run.Run saves what a module's ``saves(name)`` lists."""
    name: str
    adapter: str = "default"
    meta: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)


class ValueHeadModel(torch.nn.Module):
    """lm's transformer body, then Linear(hidden, 1): values (B, T) in fp32.

    adapter: the LoRA adapter the body runs with (e.g. PPO's "critic" or a reward model's,
    beside the policy's on the same base weights); None: whatever adapter is active.
    zero_head: start the head at 0 (every value 0) instead of small random weights.
    """
    is_reward_model = True      # its values score responses (evaluation scores pairs with them)

    def __init__(self, lm, seed: int = 0, adapter: str | None = None, zero_head: bool = False):
        super().__init__()
        self.lm, self.adapter = lm, adapter
        hidden = lm.config.hidden_size
        self.head = torch.nn.Linear(hidden, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.zeros(1, hidden) if zero_head
                                   else torch.randn(1, hidden, generator=g) / (hidden + 1) ** 0.5)
            self.head.bias.zero_()
        self.head.to(next(lm.parameters()).device)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.values(input_ids, attention_mask, position_ids)

    def values(self, input_ids, attention_mask=None, position_ids=None):
        if position_ids is None and attention_mask is not None:  # left padding scores as sampled
            position_ids = position_ids_from_mask(attention_mask)
        with use_adapter(self.lm, self.adapter) if self.adapter else contextlib.nullcontext():
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,   # the decoder, any family
                                        position_ids=position_ids).last_hidden_state   # (B, T, H)
        return self.head(hidden).squeeze(-1).float()                              # (B, T)

    def saves(self, name: str) -> list[WeightsToSave]:
        """The LM's adapter (or whole weights) under ``name``, with the head beside it."""
        return [WeightsToSave(name, tensors={HEAD_FILE: self.head_state()})]

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.head.state_dict().items()}

    def load_head(self, folder: str) -> None:
        path = os.path.join(folder, HEAD_FILE)
        try:
            state = load_file(path)
        except Exception as e:
            raise UserError(f"cannot read {path}: {e.__class__.__name__}: {e}; re-save the reward model")
        problem = key_mismatch(state, self.head.state_dict())
        if not problem and state["weight"].shape != self.head.weight.shape:
            problem = f"head of width {state['weight'].shape[-1]}, the model's is {self.head.weight.shape[-1]}"
        if problem:
            raise UserError(f"{path} does not fit this model ({problem})")
        self.head.load_state_dict({k: v.to(self.head.weight.device) for k, v in state.items()})


class ActorCritic(ValueHeadModel):
    """PPO's policy and critic on one copy of the base weights.

    The LM runs with its "default" LoRA adapter as the policy and with the ``critic`` adapter
    plus the value head as the critic; with every adapter off it is the reference. One forward
    returns both, so one DDP wrapper synchronises the gradients of both.
    """
    is_reward_model = False     # a policy: evaluation scores it as a language model

    def __init__(self, lm, critic_adapter: str = "critic", seed: int = 0, zero_head: bool = True):
        super().__init__(lm, seed=seed, adapter=critic_adapter, zero_head=zero_head)

    def forward(self, input_ids, attention_mask, first_needed: int = 1, temperature: float = 1.0,
                with_entropy: bool = False):
        """(logps (B, T-1) of the policy, values (B, T-1) of the states before each token, entropy
        (B, T-1) or None): entry t scores input_ids[:, t+1] (model.logprobs.token_logprobs's layout)."""
        logps, entropy = policy_forward(self.lm, input_ids, attention_mask, temperature, first_needed, with_entropy)
        return logps, self.values(input_ids, attention_mask)[:, :-1], entropy

    def saves(self, name: str) -> list[WeightsToSave]:
        """The policy's adapter under ``name``; the critic's adapter with the head under the
        critic's name: ppo_actor -> ppo_critic, any other name -> <name>_critic."""
        critic = name.replace("actor", "critic") if "actor" in name else name + "_critic"
        return [WeightsToSave(name),
                WeightsToSave(critic, self.adapter, {"kind": "critic"}, {HEAD_FILE: self.head_state()})]


def is_value_head_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, HEAD_FILE))


def reward_model_for_training(lm, seed: int = 0) -> ValueHeadModel:
    """train_reward.py's model: the LM body plus a head. The LM head feeds no loss, so an untied
    one is frozen (DDP would otherwise wait for its gradient)."""
    model = ValueHeadModel(lm, seed=seed)
    embedding = lm.get_input_embeddings().weight
    for p in lm.lm_head.parameters():
        if p is not embedding:
            p.requires_grad_(False)
    return model
