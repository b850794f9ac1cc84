"""Bad input, one case per row of the README's table: one line that says what, where and what to
do, exit status 2, and nothing written (no weights, no resume file) before the error."""
import json
import os
import shutil

import pytest

import train_dpo
import train_gpo
import train_grpo
import train_ppo
import train_reward
from conftest import first_lines
from core.errors import run_cli

SCRIPTS = {"dpo": train_dpo, "reward": train_reward, "gpo": train_gpo, "grpo": train_grpo, "ppo": train_ppo}
RL = ["--num_generations", "2", "--max_gen_len", "4", "--reward_funcs", "tests.helpers.toy_rewards:char_count"]
PAIR = {"chosen": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
        "rejected": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "3"}]}


def lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


# (case, script, data file content or None for the good file, extra flags, what the line says)
CASES = [
    ("empty data file", "dpo", "", [], "the file is empty; it needs one JSON object per line"),
    ("invalid JSON, with its line", "dpo", lines(PAIR, PAIR, '{"chosen": [}'), [], ".jsonl:3: invalid JSON"),
    ("missing field", "reward", lines(PAIR, {"chosen": PAIR["chosen"]}), [], '.jsonl:2: missing field "rejected"'),
    ("missing prompt", "gpo", lines({"question": "1+1?"}), [], '.jsonl:1: missing field "conversations" or "prompt"'),
    ("wrong role order", "dpo", lines({"chosen": PAIR["chosen"][::-1], "rejected": PAIR["rejected"][::-1]}), [],
     '.jsonl:1: "chosen" has assistant where user should be (wrong role order'),
    ("non-UTF-8 bytes", "grpo", b'{"prompt": "caf\xe9"}\n', [], ".jsonl:1: not UTF-8 text (byte 15); save the file as UTF-8"),
    ("no example fits --max_seq_len", "dpo", None, ["--max_seq_len", "4"], "fits --max_seq_len 4; raise it"),
    ("--batch_size larger than the data", "reward", None, ["--batch_size", "1000"],
     "--batch_size 1000 x 1 process(es) is more than the 32"),
    ("--num_generations 1 for group advantages", "grpo", None, ["--num_generations", "1"],
     "--num_generations must be at least 2 for group advantages"),
    ("--mini_batch_size that does not divide a step", "ppo", None, ["--mini_batch_size", "3"],
     "--mini_batch_size must divide the 8 samples"),
    ("unknown --from_weight", "ppo", None, ["--from_weight", "no_such_model"], "--from_weight no_such_model not found; tried"),
    ("--hidden_size that does not match the weights", "dpo", None, ["--hidden_size", "64"], "hidden_size"),
    ("truncated weights file", "dpo", None, ["--from_weight", "TRUNCATED"], "may be cut short or damaged: copy or export it again"),
    ("unknown device", "gpo", None, ["--device", "cuda:3"], "--device cuda:3: this machine has"),
    ("not a device", "reward", None, ["--device", "gpu0"], "--device 'gpu0' is not a device; use cpu or cuda:N"),
    ("a reward function that cannot be imported", "grpo", None, ["--reward_funcs", "no_such_module:score"], "no_such_module"),
    ("a reward function that raises", "gpo", None, ["--reward_funcs", "tests.helpers.toy_rewards:raises"],
     "reward function tests.helpers.toy_rewards:raises failed: ZeroDivisionError"),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("good")
    cut = d / "TRUNCATED"
    shutil.copytree(os.path.join(tiny_dir, "full_sft_32"), cut)
    blob = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    return {"pairs": first_lines("dataset/dpo.jsonl", 32, d), "prompts": first_lines("dataset/rl.jsonl", 32, d),
            "truncated": str(cut)}


@pytest.mark.parametrize("case, name, content, extra, says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2_before_training(case, name, content, extra, says, tmp_path, good, tiny_dir,
                                                          capsys):
    data = good["pairs" if name in ("dpo", "reward") else "prompts"]
    if content is not None:
        data = str(tmp_path / os.path.basename(data))
        with open(data, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
    extra = [good["truncated"] if e == "TRUNCATED" else e for e in extra]
    argv = ["--data_path", data, "--from_weight", os.path.join(tiny_dir, "full_sft_32"), "--batch_size", "4",
            "--device", "cpu", "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ck"),
            *(RL if name in ("gpo", "grpo", "ppo") else []), *extra]
    module = SCRIPTS[name]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(module.main, module.parse_args, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    saved = [f for d in ("out", "ck") if (tmp_path / d).exists() for f in os.listdir(tmp_path / d)]
    assert not [f for f in saved if not f.endswith("_metrics.jsonl")], saved
