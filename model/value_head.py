"""A scalar head on a causal LM's backbone: reward models (train_reward.py) and critics.

``ValueHeadModel(lm)`` returns one value per position, (B, T); a reward model reads it at the
last real token of each sequence. Saved next to the backbone's weights (LoRA adapter or full
model folder) as ``value_head.safetensors`` (``weight`` (1, H), ``bias`` (1,)).

``RewardModel.load(path)`` scores (prompt, response) pairs with either such a folder or any
transformers sequence-classification model folder.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors.torch import load_file, save_file

from dataset.data import encode_exchange, pad_with_mask
from model.config import LMConfig
from model.strict import key_mismatch
from utils.errors import UserError
from model.lora import adapter_parameters, is_adapter_dir, load_lora, use_adapter
from utils.logprobs import policy_forward, position_ids_from_mask

HEAD_FILE = "value_head.safetensors"


class ValueHeadModel(torch.nn.Module):
    """lm's transformer body, then Linear(hidden, 1): values (B, T) in fp32.

    adapter: the LoRA adapter the body runs with (e.g. PPO's "critic" or a reward model's,
    beside the policy's on the same base weights); None: whatever adapter is active.
    zero_head: start the head at 0 (every value 0) instead of small random weights.
    """

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

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.head.state_dict().items()}

    def save_head(self, folder: str) -> None:
        save_file(self.head_state(), os.path.join(folder, HEAD_FILE))

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

    def __init__(self, lm, critic_adapter: str = "critic", seed: int = 0, zero_head: bool = True):
        super().__init__(lm, seed=seed, adapter=critic_adapter, zero_head=zero_head)

    def forward(self, input_ids, attention_mask, first_needed: int = 1, temperature: float = 1.0,
                with_entropy: bool = False):
        """(logps (B, T-1) of the policy, values (B, T-1) of the states before each token, entropy
        (B, T-1) or None): entry t scores input_ids[:, t+1] (utils.logprobs.token_logprobs's layout)."""
        logps, entropy = policy_forward(self.lm, input_ids, attention_mask, temperature, first_needed, with_entropy)
        return logps, self.values(input_ids, attention_mask)[:, :-1], entropy


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row, whatever the padding side."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(-1).long().argmax(-1)


def read_config(path: str) -> dict:
    """A model folder's config.json, {} when it has none."""
    config_path = os.path.join(path, "config.json")
    return json.load(open(config_path, encoding="utf-8")) if os.path.isfile(config_path) else {}


def check_reward_folder(path: str, trust_remote_code: bool = False) -> None:
    """Stop unless ``path`` is a folder, and, when it ships its own model code (config.json
    auto_map or a .py file), unless --trust_remote_code 1 allows running that code."""
    if not os.path.isdir(path):
        raise UserError(f"--reward_model {path}: no such folder; give a folder written by train_reward.py "
                        f"or a transformers sequence-classification model")
    code = sorted(f for f in os.listdir(path) if f.endswith(".py"))
    if (code or read_config(path).get("auto_map")) and not trust_remote_code:
        raise UserError(f"--reward_model {path}: ships its own model code ({', '.join(code) or 'config.json auto_map'}) "
                        f"that loading would run; if you trust it, add --trust_remote_code 1 (RL scripts)")


def is_value_head_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, HEAD_FILE))


def shares_base(path: str, lm, lm_config, save_dir: str = "out") -> bool:
    """True when ``path`` is a train_reward.py LoRA folder trained on the very weights ``lm`` was
    loaded from (so it can run as one more adapter of ``lm``; see RewardModel.on_shared_base)."""
    from model.loading import adapter_base, same_weights
    if not (os.path.isdir(path) and is_value_head_dir(path) and is_adapter_dir(path)):
        return False
    source = getattr(lm, "weight_source", None)
    try:
        return source is not None and same_weights(adapter_base(path, lm_config, save_dir), source)
    except UserError:  # another size or an unresolvable base: it loads as a model of its own
        return False


def reward_model_for_training(lm, seed: int = 0) -> ValueHeadModel:
    """train_reward.py's model: the LM body plus a head. The LM head feeds no loss, so an untied
    one is frozen (DDP would otherwise wait for its gradient)."""
    model = ValueHeadModel(lm, seed=seed)
    embedding = lm.get_input_embeddings().weight
    for p in lm.lm_head.parameters():
        if p is not embedding:
            p.requires_grad_(False)
    return model


class RewardModel:
    """Scores chat-rendered (prompt, response) pairs with a reward model; frozen, no grad."""

    def __init__(self, model, tokenizer, kind: str, device, batch_size: int = 32, max_len: int = 1024,
                 shared: bool = False):
        """shared: the model's body is also the policy's (see on_shared_base); it is put in eval
        mode only while scoring and its other weights keep their requires_grad."""
        self.model = model if shared else model.eval().requires_grad_(False)
        self.tokenizer, self.kind, self.shared = tokenizer, kind, shared
        self.device, self.batch_size, self.max_len = device, batch_size, max_len

    @classmethod
    def on_shared_base(cls, lm, tokenizer, path: str, adapter: str = "reward", **kw) -> "RewardModel":
        """The train_reward.py adapter folder ``path`` as one more, frozen adapter of ``lm``, the
        base weights it was trained on (see shares_base): no second copy of the base in memory."""
        load_lora(lm, path, adapter_name=adapter)
        model = ValueHeadModel(lm, adapter=adapter)
        model.load_head(path)
        for p in adapter_parameters(lm, adapter) + list(model.head.parameters()):
            p.requires_grad_(False)
        return cls(model, tokenizer, "value_head", next(lm.parameters()).device, shared=True, **kw)

    @classmethod
    def load(cls, path: str, device="cpu", save_dir: str = "out", trust_remote_code: bool = False,
             **kw) -> "RewardModel":
        """A folder written by train_reward.py (adapter or full model, plus value_head.safetensors),
        or a transformers sequence-classification model folder. A folder that ships its own model
        code (check_reward_folder) runs it only with ``trust_remote_code``; such a model without a
        sequence-classification class but with ``get_score(tokenizer, messages)`` (InternLM2's
        reward models, MiniMind's default) is scored through that."""
        from model.loading import init_model  # here: model.loading imports this package's config
        check_reward_folder(path, trust_remote_code)
        if is_value_head_dir(path):
            lm, tokenizer = init_model(LMConfig(), path, device=device, save_dir=save_dir)
            model = ValueHeadModel(lm)
            model.load_head(path)
            return cls(model, tokenizer, "value_head", torch.device(device), **kw)
        config = read_config(path)
        archs = config.get("architectures") or []
        classifier = any(a.endswith("ForSequenceClassification") for a in archs)
        by_score = not classifier and trust_remote_code and "AutoModel" in (config.get("auto_map") or {})
        if not (classifier or by_score):
            raise UserError(f"--reward_model {path}: neither a train_reward.py folder ({HEAD_FILE} missing) nor a "
                            f"sequence-classification model (config.json architectures: {archs or 'none'})")
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        auto = AutoModel if by_score else AutoModelForSequenceClassification
        try:
            model = auto.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                         trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise UserError(f"--reward_model {path}: cannot load it ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})")
        if by_score:
            if not callable(getattr(model, "get_score", None)):
                raise UserError(f"--reward_model {path}: its code ({type(model).__name__}) has no get_score(tokenizer, "
                                f"messages) and it is not a sequence-classification model")
            return cls(model.to(device), tokenizer, "get_score", torch.device(device), **kw)
        if model.config.num_labels != 1:
            raise UserError(f"--reward_model {path}: has {model.config.num_labels} labels; a reward model has one")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model.to(device), tokenizer, "sequence_classification", torch.device(device), **kw)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        """(N,) rewards of the responses to the prompts (chat messages)."""
        if self.kind == "get_score":
            return torch.tensor([float(self.model.get_score(self.tokenizer, m + [{"role": "assistant", "content": t}]))
                                 for m, t in zip(prompts, responses)])
        seqs = [encode_exchange(self.tokenizer, m, t)[-self.max_len:]
                for m, t in zip(prompts, responses)]
        return self.score_batched(seqs)

    @torch.no_grad()
    def score_batched(self, seqs: list[list[int]]) -> torch.Tensor:
        """(N,) rewards of token sequences (chat-rendered prompt + response + end token)."""
        return torch.cat([self.score_ids(seqs[i:i + self.batch_size]) for i in range(0, len(seqs), self.batch_size)])

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> torch.Tensor:
        input_ids, attention_mask = (t.to(self.device) for t in pad_with_mask(seqs, self.tokenizer.pad_token_id))
        if self.kind == "value_head":
            was_training = self.model.training
            self.model.eval()
            try:
                values = self.model(input_ids=input_ids, attention_mask=attention_mask)  # (B, T)
            finally:
                self.model.train(was_training)
            return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1).float().cpu()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float().cpu()
