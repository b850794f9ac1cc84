"""A reward model that scores chat-rendered (prompt, response) pairs: a folder written by
train_reward.py (a LoRA adapter or a full model, plus its value head), or any transformers
sequence-classification model folder, for --reward_model and evaluation.
"""
from __future__ import annotations

import json
import os

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from core.errors import UserError
from dataset.batches import pad_with_mask
from dataset.encoding import encode_exchange
from model.config import LMConfig
from model.loading import adapter_base, init_model, same_weights
from model.logprobs import last_token_values
from model.lora import adapter_parameters, is_adapter_dir, load_lora
from model.value_head import HEAD_FILE, ValueHeadModel, is_value_head_dir


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


def shares_base(path: str, lm, lm_config, save_dir: str = "out") -> bool:
    """True when ``path`` is a train_reward.py LoRA folder trained on the very weights ``lm`` was
    loaded from (so it can run as one more adapter of ``lm``; see RewardModel.on_shared_base)."""
    if not (os.path.isdir(path) and is_value_head_dir(path) and is_adapter_dir(path)):
        return False
    source = getattr(lm, "weight_source", None)
    try:
        return source is not None and same_weights(adapter_base(path, lm_config, save_dir), source)
    except UserError:  # another size or an unresolvable base: it loads as a model of its own
        return False


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
            return last_token_values(values, attention_mask).float().cpu()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float().cpu()
