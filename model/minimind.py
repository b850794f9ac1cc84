"""MiniMind's own file layouts: MoE experts stored apart, its router loss.

MiniMind's ``MOEFeedForward`` keeps a router ``mlp.gate.weight`` and each expert as a SwiGLU
``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``; transformers' Qwen3-MoE keeps the same
router and fuses the experts into ``mlp.experts.gate_up_proj`` (E, 2I, H: gate rows, then up
rows) and ``mlp.experts.down_proj`` (E, H, I). ``fuse_experts`` / ``split_experts`` convert
between the two, every key accounted for.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from core.errors import UserError

_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(sd: dict[str, torch.Tensor], path: str = "the weights") -> dict[str, torch.Tensor]:
    """``sd`` with MiniMind's per-expert keys stacked into transformers' fused layout (other
    keys, fused ones included, as they are). Every layer must hold experts 0..E-1, each with
    its three projections."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for k, v in sd.items():
        m = _EXPERT.match(k)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
        else:
            out[k] = v
    for prefix, experts in groups.items():
        n = len(experts)
        if sorted(experts) != list(range(n)) or any(len(p) != 3 for p in experts.values()):
            have = {e: sorted(p) for e, p in sorted(experts.items())}
            raise UserError(f"{path}: the experts of {prefix} are incomplete (found {have}); each of experts "
                            f"0..{n - 1} needs gate_proj, up_proj and down_proj weights: the file is cut short "
                            f"or not a MiniMind MoE checkpoint")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], 0) for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in range(n)])
    return out


def split_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``fuse_experts``: transformers' fused expert tensors as MiniMind's per-expert keys."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = k[:-len(".gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{prefix}.{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith(".mlp.experts.down_proj"):
            prefix = k[:-len(".down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def moe_aux_loss(router_logits: list[torch.Tensor], top_k: int, coef: float) -> torch.Tensor:
    """MiniMind's load-balancing loss, summed over MoE layers.

    For one layer with router logits (T, E): p = softmax(logits) per token, load_e = (number of
    top-k slots of the T tokens that chose e) / T, loss = E * sum_e(load_e * mean_t p_e) * coef.
    (MiniMind: ``(one_hot(topk_idx).mean(0) * scores.mean(0)).sum() * E * coef``.)
    """
    total = None
    for logits in router_logits:
        logits = logits.reshape(-1, logits.shape[-1]).float()
        scores = F.softmax(logits, dim=-1)
        n_experts = scores.shape[-1]
        idx = torch.topk(scores, top_k, dim=-1).indices
        load = F.one_hot(idx, n_experts).float().sum(1).mean(0)
        layer = (load * scores.mean(0)).sum() * n_experts * coef
        total = layer if total is None else total + layer
    return total if total is not None else torch.zeros(())


class RouterLogits:
    """Collects the router logits of every MoE layer of ``model`` during forwards that build a
    graph (training forwards), for ``moe_aux_loss``. ``pop()`` returns and forgets them."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.routers = [m for name, m in model.named_modules()
                        if name.endswith("mlp.gate") and hasattr(m, "top_k") and hasattr(m, "weight")]
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and logits.requires_grad:
            self.logits.append(logits)

    def trains(self) -> bool:
        """Whether any router weight is trained (directly, or through a LoRA adapter on it)."""
        return any(p.requires_grad for r in self.routers for p in r.parameters())

    def pop(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def minimind_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights as MiniMind's trainer saves them: fp16, MiniMind's key names (each MoE
    expert apart), ``lm_head.weight`` included even when tied (MiniMind's state_dict has both)."""
    model_type = getattr(model.config, "model_type", "")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise UserError(f"--format minimind writes MiniMind's architecture (Qwen3, dense or MoE); this model is "
                        f"{model_type!r}: use the default --format hf")
    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    return split_experts(sd)


# ----------------------------------------------------------------------------- LoRA files
_LORA = re.compile(r"(.+)\.lora\.(A|B)\.weight$")


def is_minimind_lora(sd: dict[str, torch.Tensor]) -> bool:
    """Whether ``sd`` is a MiniMind LoRA file (model/model_lora.py's save_lora): only
    ``<module>.lora.A.weight`` / ``<module>.lora.B.weight`` keys."""
    return bool(sd) and all(_LORA.match(k) for k in sd)


def merge_minimind_lora(model, sd: dict[str, torch.Tensor], path: str) -> list[str]:
    """Merge MiniMind's LoRA ``sd`` into ``model`` in place, as MiniMind applies it: W + B A
    (no alpha scale) on each named linear layer. A ``module.`` prefix (DDP) is dropped. Every
    key must find its layer, with matching shapes. Returns the merged layers' names."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, ab = _LORA.match(k[len("module."):] if k.startswith("module.") else k).groups()
        pairs.setdefault(name, {})[ab] = v
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [n for n in pairs if n not in layers]
    if unknown:
        square = [n for n, m in layers.items() if m.in_features == m.out_features]
        what = "none of its" if len(unknown) == len(pairs) else f"{len(unknown)} of its {len(pairs)}"
        raise UserError(f"MiniMind LoRA file {path}: {what} layers are in the model (e.g. {unknown[:3]}); it looked "
                        f"for linear layers such as {square[:4] or list(layers)[:4]}: give the base it was trained "
                        f"on as --base_weight")
    for name, ab in pairs.items():
        layer = layers[name]
        if set(ab) != {"A", "B"}:
            raise UserError(f"MiniMind LoRA file {path}: {name} has only lora.{''.join(ab)}; the file is cut short")
        A, B = ab["A"].float(), ab["B"].float()
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features or B.shape[1] != A.shape[0]:
            raise UserError(f"MiniMind LoRA file {path}: {name} has A {tuple(A.shape)}, B {tuple(B.shape)} but the "
                            f"layer is {layer.out_features}x{layer.in_features}: give its base as --base_weight")
        with torch.no_grad():
            layer.weight += (B @ A).to(layer.weight.dtype)
    return list(pairs)
