"""train_reward.py end to end, the reward-model folder it writes, and eval_align's rm_pair_acc."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ADAPTER_FILES, assert_trained_lora, first_lines, free_port, run_args
from dataset.formats import load_pairs
from eval_align import rm_pair_accuracy
from model.reward_model import RewardModel
from model.logprobs import last_token_index
from model.value_head import HEAD_FILE, ValueHeadModel
from train_reward import main, parse_args
from core.errors import UserError


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    return first_lines("dataset/dpo.jsonl", 48, tmp_path_factory.mktemp("rmdata"))


def args_for(tmp, data, tiny_dir, *extra):
    return run_args(parse_args, tmp, data, os.path.join(tiny_dir, "full_sft_32"), *extra)


def saved(folder):
    return {**load_file(os.path.join(folder, "adapter_model.safetensors")), **load_file(os.path.join(folder, HEAD_FILE))}


def pair_by_pair_accuracy(rm, pairs) -> float:
    """The share of pairs whose chosen answer the reward model scores above the rejected one, each
    pair scored on its own (a batch of one: no padding, no neighbours)."""
    wins = [float(rm.score([p["prompt"]], [p["chosen"]])) > float(rm.score([p["prompt"]], [p["rejected"]]))
            for p in pairs]
    return sum(wins) / len(wins)


def test_tiny_run_saves_adapter_and_head_and_scores(tmp_path, small_pairs, tiny_dir):
    out = main(args_for(tmp_path, small_pairs, tiny_dir, "--max_steps", "3", "--learning_rate", "1e-2"))
    assert sorted(os.listdir(out)) == sorted(ADAPTER_FILES + [HEAD_FILE])
    assert_trained_lora(load_file(os.path.join(out, "adapter_model.safetensors")))
    assert load_file(os.path.join(out, HEAD_FILE))["weight"].shape == (1, 32)
    rows = [json.loads(l) for l in open(out + "_metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(k in rows[0] for k in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"))
    rm = RewardModel.load(out)
    pairs = load_pairs(small_pairs)[:6]
    scores = rm.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    acc, n = rm_pair_accuracy(rm, pairs, 256)
    expected = pair_by_pair_accuracy(rm, pairs)
    assert n == 6 and acc == pytest.approx(expected) and expected != 0.5    # a flipped comparison: 1 - expected


def test_resume_equals_uninterrupted(tmp_path, small_pairs, tiny_dir):
    common = ["--learning_rate", "1e-2", "--accumulation_steps", "2", "--center_rewards", "0.01"]
    straight = main(args_for(tmp_path / "a", small_pairs, tiny_dir, *common, "--max_steps", "5"))
    main(args_for(tmp_path / "b", small_pairs, tiny_dir, *common, "--max_steps", "5", "--stop_after_steps", "2"))
    resumed = main(args_for(tmp_path / "b", small_pairs, tiny_dir, *common, "--max_steps", "5", "--from_resume", "1"))
    a, b = saved(straight), saved(resumed)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    early = saved(main(args_for(tmp_path / "c", small_pairs, tiny_dir, *common, "--max_steps", "5",
                                "--stop_after_steps", "2")))
    assert max(float((a[k] - early[k]).abs().max()) for k in a) > 1e-4


def test_margin_column_and_full_parameters(tmp_path, small_pairs, tiny_dir):
    with pytest.raises(UserError, match='--margin 1 needs a "margin" field on every pair; 48 pair'):
        main(args_for(tmp_path, small_pairs, tiny_dir, "--margin", "1"))
    with_margin = tmp_path / "m.jsonl"
    with_margin.write_text("".join(json.dumps({**json.loads(l), "margin": 0.5}) + "\n"
                                   for l in open(small_pairs, encoding="utf-8")), encoding="utf-8")
    main(args_for(tmp_path / "m", str(with_margin), tiny_dir, "--margin", "1", "--max_steps", "1"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**json.loads(open(small_pairs).readline()), "margin": "big"}) + "\n")
    with pytest.raises(UserError, match=f'{bad}:1: "margin" must be a number'):
        main(args_for(tmp_path, str(bad), tiny_dir, "--margin", "1"))
    full = main(args_for(tmp_path / "f", small_pairs, tiny_dir, "--use_lora", "0", "--max_steps", "1"))
    assert os.path.isfile(os.path.join(full, "model.safetensors")) and os.path.isfile(os.path.join(full, HEAD_FILE))
    assert RewardModel.load(full).score([[{"role": "user", "content": "hi"}]], ["hello"]).shape == (1,)


def test_value_head_reads_the_last_real_token(tiny_model):
    model, _ = tiny_model
    vh = ValueHeadModel(model)
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    am = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    assert last_token_index(am).tolist() == [2, 4]
    with torch.no_grad():
        v = vh(ids, am)
    assert v.shape == (2, 5)
    assert v[0, 2].item() == pytest.approx(v[1, 4].item(), abs=1e-5)   # same tokens, either padding side


def test_sequence_classification_folder_is_a_reward_model(tmp_path, tiny_model, tiny_dir):
    from transformers import Qwen3Config, Qwen3ForSequenceClassification
    model, tok = tiny_model
    config = Qwen3Config(**{**model.config.to_dict(), "num_labels": 1, "architectures": None})
    torch.manual_seed(0)
    clf = Qwen3ForSequenceClassification(config)
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    rm = RewardModel.load(str(tmp_path / "clf"))
    s = rm.score([[{"role": "user", "content": "hi"}]] * 2, ["hello", "hello there"])
    assert s.shape == (2,) and s[0] != s[1]
    with pytest.raises(UserError, match="neither a train_reward.py folder"):
        RewardModel.load(os.path.join(tiny_dir, "full_sft_32"))   # a causal LM, no head
    with pytest.raises(UserError, match="no such folder"):
        RewardModel.load(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_then_resume_with_one(tmp_path, small_pairs, tiny_dir, capsys):
    args = ["--data_path", small_pairs, "--from_weight", os.path.join(tiny_dir, "full_sft_32"), "--max_steps", "2",
            "--device", "cpu", "--learning_rate", "1e-2", "--log_interval", "1"]
    out = lambda name: ["--save_dir", str(tmp_path / name), "--checkpoint_dir", str(tmp_path / (name + "_ck"))]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "train_reward.py", *args, "--batch_size", "2", *out("two")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights identical on all 2 processes" in proc.stdout
    assert os.path.isfile(tmp_path / "two" / "reward_32" / HEAD_FILE)
    main(parse_args([*args, "--batch_size", "4", *out("one")]))         # one process, the same global batch
    two, one = saved(str(tmp_path / "two" / "reward_32")), saved(str(tmp_path / "one" / "reward_32"))
    # The head's bias cancels in r+ - r-: its gradient is rounding noise, which Adam scales up to
    # about the lr, so it is left out. Unsynced gradients would differ by ~1e-2 (the lr) everywhere.
    assert max(float((two[k] - one[k]).abs().max()) for k in one if k != "bias") < 1e-3
    losses = lambda name: [json.loads(l)["loss"] for l in open(tmp_path / name / "reward_32_metrics.jsonl")]
    assert losses("two") == pytest.approx(losses("one"), abs=1e-5)
    capsys.readouterr()
    main(parse_args([*args, "--batch_size", "2", *out("two"), "--from_resume", "1", "--max_steps", "6"]))
    assert "world size 2 -> 1: step 2 -> 4" in capsys.readouterr().out


def test_eval_align_reports_rm_pair_acc(tmp_path, small_pairs, tiny_dir, cli):
    out = main(args_for(tmp_path, small_pairs, tiny_dir, "--max_steps", "1"))
    code, said, err = cli("eval_align.py", "--from_weight", os.path.join(tiny_dir, "full_sft_32"), "--reward_model", out,
                          "--json", "--device", "cpu", "--max_new_tokens", "4", "--pairs", small_pairs)
    assert code == 0, err[-2000:]
    rm_acc = json.loads(said.strip().splitlines()[-1])["rm_pair_acc"]
    assert rm_acc == round(pair_by_pair_accuracy(RewardModel.load(out), load_pairs(small_pairs)), 4)
    code, _, err = cli("train_reward.py", "--center_rewards", "-1", "--device", "cpu", "--save_dir", str(tmp_path / "o"))
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --center_rewards must be")


def test_evaluation_a_reward_model_cannot_take_stops_before_any_model(tmp_path, small_pairs, tiny_dir):
    prompts = first_lines("dataset/heldout_rl.jsonl", 4, tmp_path)
    with pytest.raises(UserError, match="a reward model scores preference pairs, not prompts"):
        main(args_for(tmp_path, small_pairs, tiny_dir, "--eval_data", prompts))
    with pytest.raises(UserError, match="--eval_reward_model compares a language model's answers; a reward model"):
        main(args_for(tmp_path, small_pairs, tiny_dir, "--eval_data", small_pairs, "--eval_reward_model", str(tmp_path)))
    assert not (tmp_path / "out").exists()
