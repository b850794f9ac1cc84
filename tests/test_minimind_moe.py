"""MiniMind's MoE files: per-expert checkpoints load strictly, MiniMind's routing, its router loss."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bench.minimind_checkout import minimind_lora_pth, random_minimind_model, save_minimind_pth
from model import LMConfig, init_model
from model.minimind import fuse_experts, moe_aux_loss, split_experts
from core.errors import UserError

H, LAYERS, VOCAB = 32, 2, 1116


def minimind_moe_pth(path, seed=0, num_experts=4):
    """A MiniMind MoE state dict as MiniMind's trainer saves it (each expert apart, fp16), weights
    drawn wide enough (std 0.3) for tokens to route to different experts; what was saved, in fp32."""
    model = random_minimind_model(H, LAYERS, VOCAB, use_moe=True, num_experts=num_experts, seed=seed, std=0.3)
    return save_minimind_pth(model, path)


def reference_moe(sd, layer, x, top_k, renorm):
    """MiniMind's MOEFeedForward, written out: softmax router, top-k, (renormalise), weighted
    sum of the chosen SwiGLU experts."""
    p = f"model.layers.{layer}.mlp."
    flat = x.reshape(-1, x.shape[-1])
    scores = F.softmax(flat @ sd[p + "gate.weight"].T, dim=-1)
    w, idx = torch.topk(scores, top_k, dim=-1)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    y = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(top_k):
            e = int(idx[t, j])
            g, u, d = (sd[f"{p}experts.{e}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
            y[t] += w[t, j] * (d @ (F.silu(g @ flat[t]) * (u @ flat[t])))
    return y.reshape(x.shape)


@pytest.mark.parametrize("flags", [{}, {"num_experts_per_tok": 2, "norm_topk_prob": False}])
def test_minimind_moe_pth_loads_strictly_and_routes_as_minimind(tmp_path, flags):
    sd = minimind_moe_pth(tmp_path / "full_sft_32_moe.pth")
    model, _ = init_model(LMConfig(**flags), "full_sft", save_dir=str(tmp_path), tokenizer_path="model")
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob) == \
        (4, flags.get("num_experts_per_tok", 1), flags.get("norm_topk_prob", True))   # MiniMind's routing by default
    assert cfg.router_aux_loss_coef == 5e-4
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
        for i, layer in enumerate(model.model.layers):   # swap in the written-out MoE, layer by layer
            layer.mlp.forward = lambda x, i=i: reference_moe(sd, i, x, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        expected = model(ids).logits
    assert (logits - expected).abs().max() < 1e-5


def test_fuse_split_round_trip_and_incomplete_experts(tmp_path):
    sd = minimind_moe_pth(tmp_path / "m.pth")
    fused = fuse_experts(sd)
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 2 * 128, H)
    assert fused["model.layers.0.mlp.experts.down_proj"].shape == (4, H, 128)
    back = split_experts(fused)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    del sd["model.layers.1.mlp.experts.2.up_proj.weight"]
    with pytest.raises(UserError, match=r"experts of model\.layers\.1\.mlp\.experts are incomplete"):
        fuse_experts(sd, "m.pth")


def test_moe_aux_loss_by_hand():
    # One layer, 3 tokens, 2 experts, top-1: p = [.75,.25], [.75,.25], [.25,.75].
    # load = [2/3, 1/3]; mean p = [7/12, 5/12]; E * sum = 2 * (14/36 + 5/36) = 19/18.
    logits = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0], [0.0, math.log(3)]])
    assert torch.isclose(moe_aux_loss([logits], 1, 0.1), torch.tensor(19 / 18 * 0.1))
    # Summed over layers.
    assert torch.isclose(moe_aux_loss([logits, logits], 1, 0.1), torch.tensor(2 * 19 / 18 * 0.1))
    # top-2 of 2 experts: every token fills both slots, load = [1, 1], loss = E * sum(mean p) = 2.
    assert torch.isclose(moe_aux_loss([logits], 2, 1.0), torch.tensor(2.0))
    # Balanced routing gives MiniMind's minimum, coef * 1 (uniform p, uniform load).
    assert torch.isclose(moe_aux_loss([torch.zeros(4, 4).fill_diagonal_(5.0)], 1, 1.0),
                         torch.tensor(1.0), atol=1e-6)


def test_aux_loss_logged_when_router_trains(tmp_path):
    from conftest import first_lines
    from train_sft import main, parse_args
    minimind_moe_pth(tmp_path / "full_sft_32_moe.pth")
    data = first_lines("dataset/sft.jsonl", 8, tmp_path)

    def rows(*extra):
        out = tmp_path / f"out{len(extra)}"
        main(parse_args(["--data_path", data, "--save_dir", str(out), "--checkpoint_dir", str(tmp_path / "ck"),
                         "--from_weight", str(tmp_path / "full_sft_32_moe.pth"), "--save_weight", "moe",
                         "--tokenizer_path", "model", "--batch_size", "4", "--device", "cpu",
                         "--log_interval", "1", "--max_steps", "2", *extra]))
        return [json.loads(l) for l in open(out / "moe_32_moe_metrics.jsonl")]

    full = rows("--use_lora", "0", "--aux_loss_coef", "0.01")
    assert all(r["aux_loss"] > 0 for r in full)   # E * sum(load * p) >= 1 times the coefficient
    assert all(r["aux_loss"] >= 0.01 - 1e-6 for r in full)
    lora = rows("--use_lora", "1")
    assert all("aux_loss" not in r for r in lora)   # a frozen router has nothing to balance


def minimind_keys(layers, num_experts=None):
    """The state-dict keys MiniMind's MiniMindForCausalLM has (model/model_minimind.py)."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys |= {p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        if num_experts is None:
            keys |= {p + f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
        else:
            keys.add(p + "mlp.gate.weight")
            keys |= {p + f"mlp.experts.{e}.{n}.weight" for e in range(num_experts)
                     for n in ("gate_proj", "up_proj", "down_proj")}
    return keys


@pytest.mark.parametrize("moe", [True, False])
def test_export_minimind_pth_round_trip(tmp_path, tiny_dir, moe):
    from model.export import main, parse_args
    if moe:
        minimind_moe_pth(tmp_path / "full_sft_32_moe.pth")
        src, save_dir, stem = str(tmp_path / "full_sft_32_moe.pth"), str(tmp_path), "dpo_32_moe"
    else:
        src, save_dir, stem = "full_sft", tiny_dir, "dpo_32"
    out = tmp_path / "mm" / "out"
    path = main(parse_args(["--from_weight", src, "--save_dir", save_dir, "--tokenizer_path", "model",
                            "--format", "minimind", "--out", str(out), "--name", "dpo"]))
    assert path == str(out / f"{stem}.pth")
    sd = torch.load(path, weights_only=True)
    assert set(sd) == minimind_keys(LAYERS, 4 if moe else None)      # what MiniMind's strict load_state_dict wants
    assert all(v.dtype == torch.float16 for v in sd.values())
    before, _ = init_model(LMConfig(), src, save_dir=save_dir, tokenizer_path="model")
    after, _ = init_model(LMConfig(), path, tokenizer_path="model")   # our strict loader reads it back
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (before.eval()(ids).logits - after.eval()(ids).logits).abs().max()
    assert diff < (1e-6 if moe else 0.05)   # the MoE source is fp16 already; the dense one rounds to fp16
    with pytest.raises(UserError, match="already exists"):
        main(parse_args(["--from_weight", src, "--save_dir", save_dir, "--tokenizer_path", "model",
                         "--format", "minimind", "--out", str(out), "--name", "dpo"]))


def test_minimind_lora_file_merges_into_base_weight(tmp_path, tiny_dir):
    base, _ = init_model(LMConfig(), "full_sft", save_dir=tiny_dir, tokenizer_path="model")
    name = "model.layers.1.self_attn.o_proj"                     # rank 16 on a square layer, as MiniMind's
    A, B = minimind_lora_pth(base, tmp_path / "lora_identity_32.pth", names=[name], seed=3, std=0.1,
                             prefix="module.")[name]               # saved under DDP: module. prefix
    merged, _ = init_model(LMConfig(), str(tmp_path / "lora_identity_32.pth"), save_dir=tiny_dir,
                           tokenizer_path="model", base_weight="full_sft")
    x = torch.randn(3, H)
    W = base.get_submodule(name).weight
    direct = x @ W.T + (x @ A.T) @ B.T                                # W x + B(A x)
    assert (merged.get_submodule(name)(x) - direct).abs().max() < 1e-5
    torch.save({"model.layers.9.mlp.wrong.lora.A.weight": A, "model.layers.9.mlp.wrong.lora.B.weight": B},
               tmp_path / "bad.pth")
    with pytest.raises(UserError, match="none of its layers are in the model.*o_proj"):
        init_model(LMConfig(), str(tmp_path / "bad.pth"), save_dir=tiny_dir, tokenizer_path="model")
