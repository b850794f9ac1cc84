"""MiniMind's command lines run from a MiniMind checkout's trainer/ (bench/minimind_checkout.py):
--from_weight full_sft finds <repo>/out/'s .pth with <repo>/model/'s 6,400-token tokenizer, not
the shipped demo weights; results go to ../out as MiniMind's do."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from bench.minimind_checkout import MM_VOCAB, build_checkout
from model import LMConfig, init_model
from model.flags import default_save_dir
from core.errors import UserError

H = 64


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    root = tmp_path_factory.mktemp("minimind")
    written = build_checkout(root, hidden_size=H, num_hidden_layers=2, rows=8)
    assert sorted(os.listdir(root / "model")) == ["tokenizer.json", "tokenizer_config.json"]   # as MiniMind has it
    assert sorted(os.listdir(root / "out")) == [f"full_sft_{H}.pth", f"full_sft_{H}_moe.pth", f"lora_identity_{H}.pth"]
    return root, written


def dpo(argv):
    from train_dpo import main, parse_args
    return main(parse_args(argv))


MINIMIND_DPO = ["--data_path", "../dataset/dpo.jsonl", "--from_weight", "full_sft", "--batch_size", "4",
                "--beta", "0.15", "--max_steps", "1", "--device", "cpu", "--lora_rank", "4"]


def test_minimind_dpo_line_from_trainer_uses_the_checkout(checkout, monkeypatch, capsys):
    root, written = checkout
    monkeypatch.chdir(root / "trainer")
    out = dpo(MINIMIND_DPO)                                          # no --save_dir: MiniMind's ../out
    said = capsys.readouterr().out
    assert os.path.realpath(out) == os.path.realpath(root / "out" / f"dpo_{H}")
    assert os.path.isfile(root / "checkpoints" / f"dpo_{H}_resume.pth")   # MiniMind's ../checkpoints
    assert "--checkpoint_dir ../checkpoints" in said
    assert f"weights ../out/full_sft_{H}.pth, tokenizer {root / 'model'} ({MM_VOCAB} tokens)" in said
    meta = json.load(open(os.path.join(out, "minialign.json")))
    assert (meta["base_path"], meta["lm_config"]["vocab_size"], meta["logp_reduce"]) == \
        (f"../full_sft_{H}.pth", MM_VOCAB, "sum")
    assert len(AutoTokenizer.from_pretrained(out)) == MM_VOCAB
    # strict: the checkout's file with one tensor gone stops before any step, naming the key
    broken = root / "broken"
    os.makedirs(broken / "out")
    os.symlink(root / "model", broken / "model")
    os.symlink(root / "dataset", broken / "dataset")
    os.makedirs(broken / "trainer")
    sd = torch.load(written["dense"], weights_only=True)
    del sd["model.layers.1.mlp.up_proj.weight"]
    torch.save(sd, broken / "out" / f"full_sft_{H}.pth")
    monkeypatch.chdir(broken / "trainer")
    with pytest.raises(UserError, match=r"does not load strictly.*model\.layers\.1\.mlp\.up_proj\.weight"):
        dpo(MINIMIND_DPO)
    assert sorted(os.listdir(broken / "out")) == [f"full_sft_{H}.pth"]


def test_names_resolve_in_the_checkout(checkout, monkeypatch, capsys):
    root, _ = checkout
    monkeypatch.chdir(root / "trainer")
    assert default_save_dir() == os.path.join("..", "out")
    from train_dpo import parse_args
    capsys.readouterr()
    assert parse_args(MINIMIND_DPO).save_dir == os.path.join("..", "out")
    assert "--save_dir ../out" in capsys.readouterr().out                     # said when it applies
    assert parse_args(MINIMIND_DPO + ["--save_dir", "mine"]).save_dir == "mine"
    assert "--save_dir" not in capsys.readouterr().out                        # and only then
    base, tok = init_model(LMConfig(), "full_sft", save_dir=default_save_dir())   # dense and MoE of one size: dense
    moe, _ = init_model(LMConfig(use_moe=True), "full_sft", save_dir=default_save_dir())
    lora, _ = init_model(LMConfig(), "lora_identity", save_dir=default_save_dir())
    assert len(tok) == MM_VOCAB and base.config.model_type == "qwen3" and moe.config.model_type == "qwen3_moe"
    q = "model.layers.0.self_attn.q_proj"                                       # a square layer: merged, W + B A
    sd = torch.load(root / "out" / f"lora_identity_{H}.pth", weights_only=True)
    delta = lora.get_submodule(q).weight - base.get_submodule(q).weight
    assert (delta - sd[q + ".lora.B.weight"].float() @ sd[q + ".lora.A.weight"].float()).abs().max() < 1e-6
    os.makedirs(root / "elsewhere" / "trainer", exist_ok=True)                  # a trainer/ with no checkout around
    monkeypatch.chdir(root / "elsewhere" / "trainer")
    assert default_save_dir() == "out"


def test_minimind_rlaif_rows_are_prompts_without_answers(checkout):
    from dataset.formats import load_prompts
    from rl.rewards import check_answers
    root, written = checkout
    prompts = load_prompts(written["rlaif"])                    # the trailing assistant turn ("无") is dropped
    assert len(prompts) == 8 and all([m["role"] for m in p["prompt"]] == ["user"] for p in prompts)
    alone = r"with --reward_model_path alone, as for MiniMind's RLAIF data: --reward_funcs ''"
    with pytest.raises(UserError, match=alone):
        check_answers("accuracy", prompts, written["rlaif"])
    check_answers("", prompts, written["rlaif"])


@pytest.mark.slow   # a fresh process: importing torch and transformers is most of it
def test_export_runs_by_its_path(tmp_path):
    """As MiniMind's scripts are run (python ../x/model/export.py): bad input gets its one line."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "model", "export.py"), "--from_weight", "no_such",
                           "--out", str(tmp_path / "x")], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: --from_weight no_such not found")
