"""wandb for real, offline: the run's local files hold DESIGN section 11's metrics, --from_resume 1
continues the same run id, with no login and no network --use_wandb logs offline and says so, and
wandb's own WANDB_DIR says where its files go."""
import os

import pytest
import wandb

from conftest import first_lines
from helpers.wandb_records import offline_runs

DPO_METRICS = ("loss", "lr", "grad_norm", "tokens_per_sec", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies", "logps/chosen", "logps/rejected")
RL_METRICS = ("loss", "lr", "grad_norm", "tokens_per_sec", "reward", "reward_std", "kl", "entropy", "clip_ratio",
              "completions/mean_length", "completions/clipped_ratio", "value_loss", "approx_kl")


@pytest.fixture(autouse=True)
def fresh_wandb():
    """wandb keeps its settings (the mode among them) in the process once set: each test here starts
    and ends without any, as the separate processes of real runs do."""
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def train(cli, tiny_dir, tmp_path):
    """train(script, data, steps, *flags): the script's CLI with --use_wandb, in this process."""
    def run(script, data, steps, *extra):
        code, out, err = cli(script, "--data_path", data, "--from_weight", os.path.join(tiny_dir, "full_sft_32"),
                             "--batch_size", "4", "--device", "cpu", "--log_interval", "1", "--stop_after_steps",
                             str(steps), "--use_wandb", "--save_dir", str(tmp_path / "out"), "--checkpoint_dir",
                             str(tmp_path / "ck"), *extra)
        assert code == 0, err[-3000:]
        return out, err
    return run


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """wandb offline, quiet, and no WANDB_DIR of the caller's."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def test_offline_run_holds_the_metrics_and_resume_continues_the_same_run(tmp_path, train, offline):
    data = first_lines("dataset/dpo.jsonl", 32, tmp_path)
    train("train_dpo.py", data, 2)
    (first_id, history), = offline_runs(tmp_path / "out").values()
    assert [row["_step"] for row in history] == [1, 2]
    for key in DPO_METRICS:
        assert all(key in row for row in history), key
    train("train_dpo.py", data, 4, "--from_resume", "1")
    runs = offline_runs(tmp_path / "out")
    assert len(runs) == 2 and {run_id for run_id, _ in runs.values()} == {first_id}    # one run, two sessions
    assert [row["_step"] for row in list(runs.values())[-1][1]] == [3, 4]


def test_wandb_dir_is_where_wandb_writes(tmp_path, train, offline, monkeypatch):
    """WANDB_DIR, wandb's own setting, wins over the default {save_dir}/wandb."""
    data = first_lines("dataset/dpo.jsonl", 16, tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    train("train_dpo.py", data, 1)
    (_, history), = offline_runs(tmp_path / "elsewhere").values()
    assert [row["_step"] for row in history] == [1]
    assert not (tmp_path / "out" / "wandb").exists()


def test_not_logged_in_falls_back_to_offline_and_logs_the_rl_metrics(tmp_path, train, monkeypatch):
    data = first_lines("dataset/rl.jsonl", 16, tmp_path)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                        # no ~/.netrc: never logged in
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, _ = train("train_ppo.py", data, 2, "--num_generations", "2", "--max_gen_len", "6",
                   "--reward_funcs", "tests.helpers.toy_rewards:char_count")
    assert "wandb: not logged in, logging offline" in out
    (_, history), = offline_runs(tmp_path / "out").values()
    assert [row["_step"] for row in history] == [1, 2]
    for key in RL_METRICS:
        assert all(key in row for row in history), key


def test_unreachable_wandb_never_stops_training(tmp_path, train, monkeypatch):
    """Online mode with a key but no reachable server: a warning, then training as usual."""
    data = first_lines("dataset/dpo.jsonl", 16, tmp_path)
    for name, value in (("WANDB_MODE", "online"), ("WANDB_API_KEY", "x" * 40), ("WANDB_BASE_URL", "http://127.0.0.1:9"),
                        ("WANDB_INIT_TIMEOUT", "1"), ("HOME", str(tmp_path))):
        monkeypatch.setenv(name, value)
    _, err = train("train_dpo.py", data, 2)
    assert "wandb disabled" in err
    assert os.path.isfile(tmp_path / "out" / "dpo_32" / "adapter_model.safetensors")
