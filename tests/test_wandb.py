"""wandb for real, offline: the run's local files hold DESIGN section 11's metrics, --from_resume 1
continues the same run id, and with no login and no network --use_wandb logs offline and says so."""
import os
import subprocess
import sys

from conftest import first_lines
from helpers.wandb_records import offline_runs

DPO_METRICS = ("loss", "lr", "grad_norm", "tokens_per_sec", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies", "logps/chosen", "logps/rejected")
RL_METRICS = ("loss", "lr", "grad_norm", "tokens_per_sec", "reward", "reward_std", "kl", "entropy", "clip_ratio",
              "completions/mean_length", "completions/clipped_ratio", "value_loss", "approx_kl")


def train(script, tmp_path, data, tiny_dir, steps, *extra, env=None):
    cmd = [sys.executable, script, "--data_path", data, "--from_weight", os.path.join(tiny_dir, "full_sft_32"),
           "--batch_size", "4", "--device", "cpu", "--log_interval", "1", "--stop_after_steps", str(steps), "--use_wandb",
           "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ck"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_offline_run_holds_the_metrics_and_resume_continues_the_same_run(tmp_path, tiny_dir):
    data = first_lines("dataset/dpo.jsonl", 32, tmp_path)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    train("train_dpo.py", tmp_path, data, tiny_dir, 2, env=env)
    (first_id, history), = offline_runs(tmp_path / "out").values()
    assert [row["_step"] for row in history] == [1, 2]
    for key in DPO_METRICS:
        assert all(key in row for row in history), key
    train("train_dpo.py", tmp_path, data, tiny_dir, 4, "--from_resume", "1", env=env)
    runs = offline_runs(tmp_path / "out")
    assert len(runs) == 2 and {run_id for run_id, _ in runs.values()} == {first_id}    # one run, two sessions
    assert [row["_step"] for row in list(runs.values())[-1][1]] == [3, 4]


def test_not_logged_in_falls_back_to_offline_and_logs_the_rl_metrics(tmp_path, tiny_dir):
    data = first_lines("dataset/rl.jsonl", 16, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")             # no ~/.netrc: never logged in
    proc = train("train_ppo.py", tmp_path, data, tiny_dir, 2, "--num_generations", "2", "--max_gen_len", "6",
                 "--reward_funcs", "tests.helpers.toy_rewards:char_count", env=env)
    assert "wandb: not logged in, logging offline" in proc.stdout
    (_, history), = offline_runs(tmp_path / "out").values()
    for key in RL_METRICS:
        assert all(key in row for row in history), key


def test_unreachable_wandb_never_stops_training(tmp_path, tiny_dir):
    """Online mode with a key but no reachable server: a warning, then training as usual."""
    data = first_lines("dataset/dpo.jsonl", 16, tmp_path)
    env = {**os.environ, "WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
           "WANDB_INIT_TIMEOUT": "5", "HOME": str(tmp_path)}
    proc = train("train_dpo.py", tmp_path, data, tiny_dir, 2, env=env)
    assert "wandb disabled" in proc.stderr
    assert os.path.isfile(tmp_path / "out" / "dpo_32" / "adapter_model.safetensors")
