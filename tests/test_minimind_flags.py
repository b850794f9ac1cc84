"""MiniMind's command lines: every flag of its trainer/train_dpo.py, train_ppo.py and
train_grpo.py is accepted by our script of the same name with MiniMind's meaning, or refused
with one line before any model is built; and the flags added for them (--reward_model_path,
--trust_remote_code, --thinking_ratio, --rollout_engine, --debug_log_ratio, the --epsilon_high
and --beta checks)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

import train_dpo
import train_gpo
import train_grpo
import train_ppo
import training.run
from training.args import find_data_file
from conftest import first_lines, run_args
from dataset.encoding import encode_prompt, thinking_switch
from model.reward_model import RewardModel
from core.errors import UserError
from dataset.encoding import encode_prompts

# MiniMind's flags as its argparse declares them (jingyaogong/minimind, trainer/*.py), with its
# defaults, and what ours does with each: "ok" (parsed with that value, the run goes on to build
# the model), "parsed" (a path of MiniMind's layout that does not exist here: only the parse is
# checked), or the refusal's text. Flags with no value are store_true. --device: MiniMind's
# default is cuda:0 when there is one; this table runs on CPU.
DPO = [
    ("--save_dir", "../out", "parsed"), ("--save_weight", "dpo", "ok"), ("--epochs", "1", "ok"),
    ("--batch_size", "4", "ok"), ("--learning_rate", "4e-8", "ok"), ("--device", "cpu", "ok"),
    ("--dtype", "bfloat16", "ok"), ("--num_workers", "8", "ok"), ("--accumulation_steps", "1", "ok"),
    ("--grad_clip", "1.0", "ok"), ("--log_interval", "100", "ok"), ("--save_interval", "100", "ok"),
    ("--hidden_size", "768", "ok"), ("--num_hidden_layers", "8", "ok"), ("--max_seq_len", "1024", "ok"),
    ("--use_moe", "0", "ok"), ("--data_path", "../dataset/dpo.jsonl", "parsed"), ("--from_weight", "full_sft", "ok"),
    ("--from_resume", "0", "ok"), ("--beta", "0.15", "ok"), ("--use_wandb", None, "ok"),
    ("--wandb_project", "MiniMind-DPO", "ok"), ("--use_compile", "0", "ok"),
]
SGLANG = "MiniMind's SGLang engine is not supported here; drop the --sglang_* flags"
NO_ROOM = "here it counts prompt + response (MiniMind's counts the prompt alone); give --max_seq_len"
PPO = [
    ("--save_dir", "../out", "parsed"), ("--save_weight", "ppo_actor", "ok"), ("--epochs", "1", "ok"),
    ("--batch_size", "2", "ok"), ("--learning_rate", "3e-7", "ok"), ("--critic_learning_rate", "5e-7", "ok"),
    ("--device", "cpu", "ok"), ("--dtype", "bfloat16", "ok"), ("--num_workers", "8", "ok"),
    ("--accumulation_steps", "1", "ok"), ("--grad_clip", "1.0", "ok"), ("--log_interval", "1", "ok"),
    ("--save_interval", "10", "ok"), ("--hidden_size", "768", "ok"), ("--num_hidden_layers", "8", "ok"),
    ("--use_moe", "0", "ok"), ("--max_seq_len", "768", "ok"), ("--max_gen_len", "1024", NO_ROOM),
    ("--data_path", "../dataset/rlaif.jsonl", "parsed"), ("--clip_epsilon", "0.2", "ok"), ("--vf_coef", "0.5", "ok"),
    ("--kl_coef", "0.02", "ok"), ("--gamma", "1.0", "ok"), ("--lam", "0.95", "ok"), ("--cliprange_value", "0.2", "ok"),
    ("--ppo_update_iters", "2", "ok"), ("--early_stop_kl", "0.25", "ok"), ("--mini_batch_size", "2", "ok"),
    ("--from_weight", "full_sft", "ok"), ("--reward_model_path", "../../internlm2-1_8b-reward", "parsed"),
    ("--from_resume", "0", "ok"), ("--use_wandb", None, "ok"), ("--wandb_project", "MiniMind-PPO", "ok"),
    ("--use_compile", "0", "ok"), ("--debug_mode", None, "ok"), ("--debug_interval", "20", "ok"),
    ("--debug_log_ratio", None, "ok"), ("--thinking_ratio", "0.9", "ok"), ("--rollout_engine", "torch", "ok"),
    ("--sglang_base_url", "http://localhost:8998", SGLANG), ("--sglang_model_path", "../model", SGLANG),
    ("--sglang_shared_path", "./sglang_ckpt_ppo", SGLANG),
]
GRPO = [
    ("--save_dir", "../out", "parsed"), ("--save_weight", "grpo", "ok"), ("--epochs", "1", "ok"),
    ("--batch_size", "2", "ok"), ("--learning_rate", "3e-7", "ok"), ("--device", "cpu", "ok"),
    ("--dtype", "bfloat16", "ok"), ("--num_workers", "8", "ok"), ("--accumulation_steps", "1", "ok"),
    ("--grad_clip", "1.0", "ok"), ("--log_interval", "1", "ok"), ("--save_interval", "10", "ok"),
    ("--hidden_size", "768", "ok"), ("--num_hidden_layers", "8", "ok"), ("--use_moe", "0", "ok"),
    ("--max_seq_len", "768", "ok"), ("--max_gen_len", "1024", NO_ROOM),
    ("--data_path", "../dataset/rlaif.jsonl", "parsed"), ("--num_generations", "6", "ok"), ("--beta", "0.1", "ok"),
    ("--loss_type", "cispo", "ok"), ("--epsilon", "0.2", "ok"),
    ("--epsilon_high", "5.0", "MiniMind's 5.0 is CISPO's cap of the ratio: add --loss_type cispo"),
    ("--from_weight", "full_sft", "ok"), ("--reward_model_path", "../../internlm2-1_8b-reward", "parsed"),
    ("--from_resume", "0", "ok"), ("--use_wandb", None, "ok"), ("--wandb_project", "MiniMind-GRPO", "ok"),
    ("--use_compile", "0", "ok"), ("--debug_mode", None, "ok"), ("--debug_interval", "20", "ok"),
    ("--thinking_ratio", "0.9", "ok"), ("--rollout_engine", "torch", "ok"),
    ("--sglang_base_url", "http://localhost:8998", SGLANG), ("--sglang_model_path", "../model", SGLANG),
    ("--sglang_shared_path", "./sglang_ckpt_grpo", SGLANG),
]
# MiniMind's script -> (its flags, our scripts that take its command lines)
MINIMIND = {"train_dpo.py": (DPO, [train_dpo]), "train_ppo.py": (PPO, [train_ppo]),
            "train_grpo.py": (GRPO, [train_gpo, train_grpo])}
AUDIT = [(name, script, row) for name, (table, scripts) in MINIMIND.items() for script in scripts for row in table]
ALIASES = {"reward_model_path": "reward_model"}
RL = ["--num_generations", "2", "--max_gen_len", "4", "--reward_funcs", "tests.helpers.toy_rewards:char_count"]


class ModelBuilt(Exception):
    """Raised where the run would build its model: every check came before it."""


@pytest.fixture
def no_model(monkeypatch):
    """Runs stop where the model would be built, with ModelBuilt (training.run.Run is every script's)."""
    def stop(self, *a, **kw):
        raise ModelBuilt
    monkeypatch.setattr(training.run.Run, "__init__", stop)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mmdata")
    return {"pairs": first_lines("dataset/dpo.jsonl", 16, d), "prompts": first_lines("dataset/rl.jsonl", 16, d)}


def base_argv(script, data, tmp_path, tiny_dir):
    dpo = script is train_dpo
    return ["--data_path", data["pairs" if dpo else "prompts"], "--from_weight", os.path.join(tiny_dir, "full_sft_32"),
            "--batch_size", "4", "--device", "cpu", "--save_dir", str(tmp_path / "out"),
            "--checkpoint_dir", str(tmp_path / "ck"), *([] if dpo else RL)]


def outcome(script, argv) -> str:
    """"ok" when main gets as far as building the model, else the one line it refuses with."""
    try:
        script.main(script.parse_args(argv))
    except ModelBuilt:
        return "ok"
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    raise AssertionError("main returned without building a model")


@pytest.mark.parametrize("minimind, script, row", AUDIT,
                         ids=[f"{m}->{s.__name__}{r[0]}" for m, s, r in AUDIT])
def test_every_minimind_flag_is_taken_or_refused_in_one_line(minimind, script, row, data, tmp_path, tiny_dir, no_model):
    flag, value, expected = row
    given = [flag] + ([] if value is None else [value])
    args = script.parse_args(base_argv(script, data, tmp_path, tiny_dir) + given)   # never "unrecognized arguments"
    if expected in ("ok", "parsed"):
        dest = flag[2:]
        got = getattr(args, ALIASES.get(dest, dest))
        want = True if value is None else find_data_file(value) if flag == "--data_path" else type(got)(value)
        assert got == want, (flag, got)           # --data_path: MiniMind's ../dataset/x.jsonl is found here
    if expected == "parsed":
        return
    result = outcome(script, base_argv(script, data, tmp_path, tiny_dir) + given)
    assert (result == "ok") if expected == "ok" else (expected in result), (flag, result)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_sglang_is_refused_and_torch_runs(data, tmp_path, tiny_dir, no_model):
    for script in (train_ppo, train_gpo, train_grpo):
        argv = base_argv(script, data, tmp_path, tiny_dir)
        assert outcome(script, argv + ["--rollout_engine", "torch"]) == "ok"
        assert ("--rollout_engine sglang: not supported here; sampling runs on the model's own forward in this "
                "process: use --rollout_engine torch") in outcome(script, argv + ["--rollout_engine", "sglang"])


def test_epsilon_high_is_a_clip_range_except_under_cispo(data, tmp_path, tiny_dir, no_model):
    argv = base_argv(train_gpo, data, tmp_path, tiny_dir)
    said = outcome(train_gpo, argv + ["--epsilon_high", "5.0"])
    assert said == ("--epsilon_high 5.0 under --loss_type dapo is the clip range above 1 (ratios clipped to [0.8, 6], "
                    "hardly a clip); MiniMind's 5.0 is CISPO's cap of the ratio: add --loss_type cispo, or give a clip "
                    "range such as DAPO's 0.28")
    assert "under --loss_type grpo" in outcome(train_grpo, argv + ["--epsilon_high", "2", "--loss_type", "grpo"])
    assert outcome(train_gpo, argv + ["--epsilon_high", "5.0", "--loss_type", "cispo"]) == "ok"
    assert outcome(train_gpo, argv + ["--epsilon_high", "0.28"]) == "ok"


# ------------------------------------------------------------------------------ --beta of DPO
def test_small_beta_alone_means_sums_and_with_mean_stops(data, tmp_path, tiny_dir, no_model, capsys):
    argv = base_argv(train_dpo, data, tmp_path, tiny_dir)
    args = train_dpo.parse_args(argv + ["--beta", "0.15"])            # MiniMind's default, meant for sums
    assert (args.beta, args.logp_reduce) == (0.15, "sum")
    assert "--beta 0.15 with no --logp_reduce: read as a beta of summed log-probs" in capsys.readouterr().out
    assert train_dpo.parse_args(argv).logp_reduce == "mean"           # no --beta: our default, mean with beta 5
    assert train_dpo.parse_args(argv + ["--beta", "0.5"]).logp_reduce == "mean"
    said = outcome(train_dpo, argv + ["--beta", "0.15", "--logp_reduce", "mean"])
    assert said.startswith("--beta 0.15 with --logp_reduce mean: per-token mean log-probs are about |y| times smaller")
    assert "give a larger --beta" in said and "or --logp_reduce sum" in said
    for loss in ("hinge", "robust"):
        assert "--beta 0.3 with --logp_reduce mean" in outcome(train_dpo, argv + ["--beta", "0.3", "--logp_reduce",
                                                                                 "mean", "--loss_type", loss])
    for loss in ("ipo", "apo_zero"):                                # their own ranges: untouched
        assert outcome(train_dpo, argv + ["--beta", "0.1", "--loss_type", loss]) == "ok"
        assert train_dpo.parse_args(argv + ["--beta", "0.1", "--loss_type", loss]).logp_reduce == "mean"
    assert outcome(train_dpo, argv + ["--beta", "0.15", "--logp_reduce", "sum"]) == "ok"


def test_minimind_beta_trains_on_summed_logprobs(data, tmp_path, tiny_dir):
    out = train_dpo.main(run_args(train_dpo.parse_args, tmp_path, data["pairs"], os.path.join(tiny_dir, "full_sft_32"),
                                  "--beta", "0.15", "--max_steps", "1"))
    meta = json.load(open(os.path.join(out, "minialign.json")))
    assert (meta["beta"], meta["logp_reduce"]) == (0.15, "sum")


# ------------------------------------------------------------------------ reward models with code
TOY_CODE = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel


class ToyRewardConfig(PretrainedConfig):
    model_type = "toy_reward"


class ToyRewardModel(PreTrainedModel):
    config_class = ToyRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.post_init()

    def get_score(self, tokenizer, messages):
        return float(self.scale) * len(messages[-1]["content"])
'''


@pytest.fixture(scope="module")
def remote_code_rm(tmp_path_factory):
    """A reward model folder with its own code, as InternLM2's reward models ship (auto_map + a .py,
    scored by get_score(tokenizer, messages)): this one scores the response's length times 2."""
    d = tmp_path_factory.mktemp("rm") / "toy_rm"
    d.mkdir()
    (d / "toy_reward.py").write_text(TOY_CODE)
    json.dump({"model_type": "toy_reward", "architectures": ["ToyRewardModel"],
               "auto_map": {"AutoConfig": "toy_reward.ToyRewardConfig", "AutoModel": "toy_reward.ToyRewardModel"}},
              open(d / "config.json", "w"))
    save_file({"scale": torch.tensor([2.0])}, str(d / "model.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join("model", f), d / f)
    return str(d)


def test_reward_model_with_its_own_code_needs_trust_remote_code(remote_code_rm, data, tmp_path, tiny_dir, no_model):
    refusal = (f"--reward_model {remote_code_rm}: ships its own model code (toy_reward.py) that loading would run; "
               f"if you trust it, add --trust_remote_code 1")
    with pytest.raises(UserError, match="add --trust_remote_code 1"):
        RewardModel.load(remote_code_rm)
    for script in (train_ppo, train_gpo, train_grpo):
        argv = base_argv(script, data, tmp_path, tiny_dir) + ["--reward_model_path", remote_code_rm]
        assert outcome(script, argv).startswith(refusal)
    rm = RewardModel.load(remote_code_rm, trust_remote_code=True)
    scores = rm.score([[{"role": "user", "content": "hi"}]] * 2, ["abc", "hello"])
    assert scores.tolist() == [6.0, 10.0]                                 # 2 x len


def test_reward_model_path_runs_a_minimind_grpo_line(remote_code_rm, data, tmp_path, tiny_dir, capsys):
    """MiniMind's train_grpo.py line (a reward model, CISPO with its cap 5.0) on our train_gpo.py."""
    out = train_gpo.main(run_args(train_gpo.parse_args, tmp_path, data["prompts"], os.path.join(tiny_dir, "full_sft_32"),
                                  "--num_generations", "2", "--max_gen_len", "4", "--max_steps", "1",
                                  "--reward_model_path", remote_code_rm, "--trust_remote_code", "1", "--reward_funcs", "",
                                  "--loss_type", "cispo", "--epsilon_high", "5.0", "--thinking_ratio", "0.9",
                                  "--rollout_engine", "torch"))
    logged = json.loads(open(out + "_metrics.jsonl").readline())
    twice_chars = logged["rewards/reward_model"] * 8 / 2      # the mean over 4 prompts x 2 samples of 2 x len
    assert logged["rewards/reward_model"] > 0 and twice_chars == pytest.approx(round(twice_chars), abs=1e-4)
    assert "--thinking_ratio 0.9 does nothing: the chat template has no thinking switch" in capsys.readouterr().out


# --------------------------------------------------------------------------- --thinking_ratio
QWEN3_LIKE = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
              "{%- if add_generation_prompt %}<|im_start|>assistant\n"
              "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
              "{%- endif %}")
MINIMIND_LIKE = QWEN3_LIKE.replace("enable_thinking is defined and enable_thinking is false",
                                   "not (open_thinking is defined and open_thinking is true)")


def tokenizer_with(template):
    tok = AutoTokenizer.from_pretrained("model")
    tok.chat_template = template
    return tok


def test_thinking_switch_is_found_by_rendering():
    assert thinking_switch(tokenizer_with(QWEN3_LIKE)) == "enable_thinking"
    assert thinking_switch(tokenizer_with(MINIMIND_LIKE)) == "open_thinking"
    assert thinking_switch(AutoTokenizer.from_pretrained("model")) is None      # the shipped template has none


def test_thinking_ratio_renders_a_seeded_share_with_the_switch_on(capsys):
    tok = tokenizer_with(QWEN3_LIKE)
    prompts = [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(40)]
    on = [encode_prompt(tok, p["prompt"], enable_thinking=True) for p in prompts]
    off = [encode_prompt(tok, p["prompt"], enable_thinking=False) for p in prompts]
    assert encode_prompts(tok, prompts, 10 ** 6, 1.0) == on
    assert encode_prompts(tok, prompts, 10 ** 6, 0.0) == off
    half = encode_prompts(tok, prompts, 10 ** 6, 0.5, seed=3)
    chosen = [h == a for h, a in zip(half, on)]
    assert all(h in (a, b) for h, a, b in zip(half, on, off))
    assert 10 <= sum(chosen) <= 30
    assert half == encode_prompts(tok, prompts, 10 ** 6, 0.5, seed=3)              # seeded: resume sees the same
    assert half != encode_prompts(tok, prompts, 10 ** 6, 0.5, seed=4)
    assert f"--thinking_ratio 0.5: {sum(chosen)} of 40 prompts with enable_thinking=True" in capsys.readouterr().out
    plain = AutoTokenizer.from_pretrained("model")
    assert encode_prompts(plain, prompts, 10 ** 6, 0.5) == encode_prompts(plain, prompts, 10 ** 6)
    assert capsys.readouterr().out.count("does nothing") == 1


# ------------------------------------------------------------------------------ PPO, GRPO lines
def test_debug_log_ratio_prints_the_first_ratio(data, tmp_path, tiny_dir, capsys):
    train_ppo.main(run_args(train_ppo.parse_args, tmp_path, data["prompts"], os.path.join(tiny_dir, "full_sft_32"),
                            *RL, "--max_steps", "2", "--debug_log_ratio"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[log_ratio]")]
    assert [line.split(":")[0] for line in lines] == ["[log_ratio] step 1", "[log_ratio] step 2"]
    assert "max|log r| 0.000e+00" in lines[0] and "ratio in [1.000000, 1.000000]" in lines[0]


def test_grpo_with_an_external_reward_says_which_method_it_runs(data, tmp_path, tiny_dir, no_model, capsys):
    argv = base_argv(train_grpo, data, tmp_path, tiny_dir)
    assert outcome(train_grpo, argv) == "ok"
    said = capsys.readouterr().out
    assert ("train_grpo.py: the chapter's reward-free GRPO (each sample rewarded by its own log-prob, weight 1) plus "
            "the external reward; for MiniMind's train_grpo.py (the reward alone, group advantages, CISPO) run "
            "train_gpo.py --loss_type cispo, or add --self_reward_weight 0 here") in said
    assert outcome(train_grpo, argv + ["--self_reward_weight", "0"]) == "ok"
    assert "train_grpo.py with --self_reward_weight 0: the external reward alone" in capsys.readouterr().out
    args = train_grpo.parse_args(argv[:-2] + ["--reward_funcs", ""])             # reward-free: nothing to say
    assert outcome(train_grpo, argv[:-2] + ["--reward_funcs", ""]) == "ok" and args.reward_model is None
    assert "train_grpo.py:" not in capsys.readouterr().out


def test_thinking_ratio_run_resumes_exactly(data, tmp_path, tiny_dir, capsys):
    """A model whose template has the switch: the share is said, and 2 steps + resume to 3 see the
    same prompts (so the same rewards) as 3 steps straight."""
    model = tmp_path / "thinking_32"
    shutil.copytree(os.path.join(tiny_dir, "full_sft_32"), model)
    tokenizer_with(QWEN3_LIKE).save_pretrained(model)

    def run(where, *extra):
        return train_grpo.main(run_args(train_grpo.parse_args, tmp_path / where, data["prompts"], str(model),
                                        "--num_generations", "2", "--max_gen_len", "4", "--thinking_ratio", "0.5",
                                        "--max_steps", "3", *extra))
    straight = run("a")
    assert "with enable_thinking=True" in capsys.readouterr().out
    run("b", "--stop_after_steps", "2")
    resumed = run("b", "--from_resume", "1")
    rewards = [[r["reward"] for r in map(json.loads, open(out + "_metrics.jsonl"))] for out in (straight, resumed)]
    assert len(rewards[0]) == 3 and rewards[0] == pytest.approx(rewards[1], abs=1e-6)
