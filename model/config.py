"""Model configuration: MiniMind's knobs in, a transformers Qwen3 model out.

MiniMind's current architecture *is* Qwen3 (GQA, q/k RMSNorm, SwiGLU, RoPE, tied
embeddings), with the same parameter names, so we build transformers'
``Qwen3ForCausalLM`` (``Qwen3MoeForCausalLM`` with ``use_moe``) instead of writing a
transformer by hand, and MiniMind's ``.pth`` state dicts load into it as they are.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

# LMConfig field -> the flag that sets it (model.flags.add_model_args)
MOE_FLAGS = {"num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
             "norm_topk_prob": "norm_topk_prob", "router_aux_loss_coef": "aux_loss_coef"}


@dataclass
class LMConfig:
    """MiniMind's model hyper-parameters (the ones its scripts expose as flags and more).

    ``intermediate_size`` defaults to ceil(hidden_size * pi / 64) * 64, as MiniMind does.
    ``vocab_size`` is overwritten by the tokenizer's size when a model is built for a
    tokenizer (see ``init_model``).

    ``hidden_size``, ``num_hidden_layers`` and ``use_moe`` may be None, meaning "not given":
    ``init_model`` then takes them from the checkpoint, or MiniMind's defaults (512, 8, no
    MoE) for a random init, and fills them in.
    """

    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    use_moe: bool | None = None
    vocab_size: int = 6400
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    intermediate_size: int | None = None
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    # MoE (only with use_moe): MiniMind's routing
    num_experts: int = 4
    num_experts_per_tok: int = 1
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 5e-4
    # special tokens (the shipped tokenizer's ids; init_model takes the tokenizer's)
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_size is None:
            return
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    def filled(self) -> "LMConfig":
        """A copy with MiniMind's defaults where a size was not given."""
        d = self.to_dict()
        d["hidden_size"] = 512 if self.hidden_size is None else self.hidden_size
        d["num_hidden_layers"] = 8 if self.num_hidden_layers is None else self.num_hidden_layers
        d["use_moe"] = bool(self.use_moe)
        if self.hidden_size is None:
            d["intermediate_size"] = None
        return LMConfig(**d)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf(self) -> Qwen3Config | Qwen3MoeConfig:
        """The transformers config this LMConfig describes."""
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_dropout=self.dropout,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.use_moe:
            return Qwen3MoeConfig(
                **common,
                moe_intermediate_size=self.intermediate_size,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                norm_topk_prob=self.norm_topk_prob,
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
        return Qwen3Config(**common, intermediate_size=self.intermediate_size, head_dim=self.head_dim)

    @classmethod
    def from_hf(cls, hf_config) -> "LMConfig":
        """The LMConfig of a transformers Qwen3 / Qwen3-MoE config (e.g. a checkpoint's config.json)."""
        use_moe = getattr(hf_config, "model_type", "") == "qwen3_moe"
        rope = getattr(hf_config, "rope_parameters", None) or {}
        kw = dict(
            hidden_size=hf_config.hidden_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            use_moe=use_moe,
            vocab_size=hf_config.vocab_size,
            num_attention_heads=hf_config.num_attention_heads,
            num_key_value_heads=hf_config.num_key_value_heads,
            intermediate_size=hf_config.moe_intermediate_size if use_moe else hf_config.intermediate_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            rope_theta=rope.get("rope_theta", 1e6),
            rms_norm_eps=hf_config.rms_norm_eps,
            tie_word_embeddings=hf_config.tie_word_embeddings,
        )
        if use_moe:
            kw.update(num_experts=hf_config.num_experts, num_experts_per_tok=hf_config.num_experts_per_tok,
                      norm_topk_prob=hf_config.norm_topk_prob, router_aux_loss_coef=hf_config.router_aux_loss_coef)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(getattr(hf_config, name, None), int):
                kw[name] = getattr(hf_config, name)
        return cls(**kw)

    @classmethod
    def from_args(cls, args) -> "LMConfig":
        """The sizes a script's --hidden_size / --num_hidden_layers / --use_moe ask for (None: not
        given), and its MoE routing flags (MiniMind's routing where a script has none)."""
        moe = {k: getattr(args, flag) for k, flag in MOE_FLAGS.items() if getattr(args, flag, None) is not None}
        if "norm_topk_prob" in moe:
            moe["norm_topk_prob"] = bool(moe["norm_topk_prob"])
        return cls(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                   use_moe=None if args.use_moe is None else bool(args.use_moe), **moe)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def build_model(lm_config: LMConfig):
    """A randomly initialised transformers causal LM for ``lm_config`` (fp32, CPU)."""
    lm_config = lm_config.filled()
    hf_config = lm_config.to_hf()
    cls = Qwen3MoeForCausalLM if lm_config.use_moe else Qwen3ForCausalLM
    return cls(hf_config)


def weight_name(name: str, hidden_size: int, use_moe: bool | None) -> str:
    """MiniMind's file stem for weights: ``{name}_{hidden_size}[_moe]``."""
    return f"{name}_{hidden_size}{'_moe' if use_moe else ''}"
