"""train_sft.py end to end: a tiny run, exact resume, bad input through the real CLI."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from train_sft import main, parse_args
from conftest import first_lines, free_port, interrupt_after
from core.errors import UserError


@pytest.fixture(scope="module")
def small_sft(tmp_path_factory):
    return first_lines("dataset/sft.jsonl", 48, tmp_path_factory.mktemp("sftdata"))


def args_for(tmp, data, *extra):
    return parse_args(["--data_path", data, "--save_dir", str(tmp / "out"), "--checkpoint_dir", str(tmp / "ck"),
                       "--batch_size", "4", "--device", "cpu", "--log_interval", "1", "--epochs", "1", *extra])


def weights(folder):
    name = "adapter_model.safetensors" if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")) \
        else "model.safetensors"
    return load_file(os.path.join(folder, name))


def test_tiny_full_run_saves_weights_metrics_and_resume(tmp_path, small_sft):
    out = main(args_for(tmp_path, small_sft, "--hidden_size", "32", "--num_hidden_layers", "2", "--max_steps", "3"))
    assert out.endswith("full_sft_32") and os.path.isfile(os.path.join(out, "config.json"))
    rows = [json.loads(l) for l in open(tmp_path / "out" / "full_sft_32_metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(k in rows[0] for k in ("loss", "lr", "grad_norm", "tokens_per_sec"))
    assert os.path.isfile(tmp_path / "ck" / "full_sft_32_resume.pth")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_equals_uninterrupted(tmp_path, small_sft, tiny_dir, mode):
    size = ["--hidden_size", "32", "--num_hidden_layers", "2"] if mode == "full" else \
        ["--use_lora", "1", "--from_weight", os.path.join(tiny_dir, "full_sft_32")]
    common = [*size, "--accumulation_steps", "2", "--learning_rate", "1e-2"]
    straight = main(args_for(tmp_path / "a", small_sft, *common, "--max_steps", "5"))
    main(args_for(tmp_path / "b", small_sft, *common, "--max_steps", "5", "--stop_after_steps", "2"))
    resumed = main(args_for(tmp_path / "b", small_sft, *common, "--max_steps", "5", "--from_resume", "1"))
    wa, wb = weights(straight), weights(resumed)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    start = main(args_for(tmp_path / "c", small_sft, *common, "--max_steps", "5", "--stop_after_steps", "1"))
    assert max(float((wa[k] - weights(start)[k]).abs().max()) for k in wa) > 1e-4  # training moved the weights
    steps = [json.loads(l)["step"] for l in open(resumed + "_metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]  # the metrics file continues without gaps or repeats


def test_resume_file_from_other_args_is_refused(tmp_path, small_sft):
    base = ["--hidden_size", "32", "--num_hidden_layers", "2", "--max_steps", "1"]
    main(args_for(tmp_path, small_sft, *base))
    with pytest.raises(UserError, match="other arguments .*--learning_rate"):
        main(args_for(tmp_path, small_sft, *base, "--from_resume", "1", "--learning_rate", "0.5"))


def logged(tmp, key):
    return [json.loads(l)[key] for l in open(tmp / "out" / "full_sft_32_metrics.jsonl")]


def test_max_steps_sets_the_schedule_and_stop_after_steps_keeps_it(tmp_path, small_sft):
    """lr of step k of N = peak (0.1 + 0.45 (1 + cos(pi (k - 1) / (N - 1)))): the peak at step 1,
    0.55 peak at step 13 of 25 (cos(pi / 2) = 0) and 0.1 peak, the end value, at step 25."""
    tiny = ["--hidden_size", "32", "--num_hidden_layers", "2", "--epochs", "3", "--learning_rate", "1e-3"]
    main(args_for(tmp_path / "a", small_sft, *tiny, "--max_steps", "25"))       # 36 steps in 3 epochs
    lrs = logged(tmp_path / "a", "lr")
    assert len(lrs) == 25
    assert (lrs[0], lrs[12], lrs[24]) == pytest.approx((1e-3, 0.55e-3, 0.1e-3), rel=1e-12)
    main(args_for(tmp_path / "b", small_sft, *tiny, "--max_steps", "25", "--stop_after_steps", "10"))
    assert logged(tmp_path / "b", "lr") == lrs[:10]
    ckpt = torch.load(tmp_path / "b" / "ck" / "full_sft_32_resume.pth", weights_only=True)
    assert (ckpt["step"], ckpt["schedule_steps"]) == (10, 25)
    with pytest.raises(UserError, match=r"schedule of 25 steps, these flags give 30 \(--max_steps 30, --epochs 3\); "
                                        r"resume with the --max_steps and --epochs it started with"):
        main(args_for(tmp_path / "b", small_sft, *tiny, "--max_steps", "30", "--from_resume", "1"))
    main(args_for(tmp_path / "b", small_sft, *tiny, "--max_steps", "25", "--from_resume", "1"))
    assert logged(tmp_path / "b", "lr") == lrs


def test_an_older_resume_file_keeps_its_schedule_over_every_epoch(tmp_path, small_sft, capsys):
    """A file written before schedule_steps: the schedule spans the 12 steps of the epoch, as
    it did, and --max_steps only stops the run."""
    tiny = ["--hidden_size", "32", "--num_hidden_layers", "2", "--learning_rate", "1e-3"]
    main(args_for(tmp_path, small_sft, *tiny, "--stop_after_steps", "2"))
    path = tmp_path / "ck" / "full_sft_32_resume.pth"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["schedule_steps"]
    torch.save(ckpt, path)
    main(args_for(tmp_path, small_sft, *tiny, "--from_resume", "1", "--max_steps", "4"))
    assert "records no schedule length" in capsys.readouterr().out
    lrs = logged(tmp_path, "lr")
    assert len(lrs) == 4 and lrs[3] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 3 / 11))), rel=1e-12)


def test_resume_without_file_starts_fresh(tmp_path, small_sft, capsys):
    main(args_for(tmp_path, small_sft, "--hidden_size", "32", "--num_hidden_layers", "2", "--max_steps", "1",
                  "--from_resume", "1"))
    assert "no resume file" in capsys.readouterr().out


def test_bad_flags_are_refused_before_training(tmp_path, small_sft):
    with pytest.raises(UserError, match="--batch_size 100 x 1 process"):
        main(args_for(tmp_path, small_sft, "--hidden_size", "32", "--num_hidden_layers", "2", "--batch_size", "100"))
    with pytest.raises(UserError, match="--learning_rate must be positive"):
        main(args_for(tmp_path, small_sft, "--learning_rate", "0"))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    code, _, err = cli("train_sft.py", "--data_path", str(bad), "--hidden_size", "32", "--num_hidden_layers", "2",
                       "--save_dir", str(tmp_path / "o"), "--device", "cpu")
    assert code == 2
    assert err.strip().splitlines()[-1] == f"error: {bad}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"
    assert not os.path.exists(tmp_path / "o" / "full_sft_32")


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, small_sft):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "train_sft.py", "--data_path", small_sft, "--hidden_size", "32",
         "--num_hidden_layers", "2", "--batch_size", "4", "--max_steps", "3", "--device", "cpu",
         "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ck"), "--log_interval", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es)" in proc.stdout
    steps = [json.loads(l)["step"] for l in open(tmp_path / "out" / "full_sft_32_metrics.jsonl")]
    assert steps == [1, 2, 3]  # rank 0 alone logs
    assert os.path.isfile(tmp_path / "out" / "full_sft_32" / "model.safetensors")
    assert torch.load(tmp_path / "ck" / "full_sft_32_resume.pth", weights_only=True)["world_size"] == 2


@pytest.mark.slow
def test_sigterm_saves_then_exits_and_resume_continues(tmp_path, small_sft):
    args = ["--data_path", small_sft, "--hidden_size", "32", "--num_hidden_layers", "2", "--batch_size", "4",
            "--epochs", "1000", "--device", "cpu", "--log_interval", "1",
            "--save_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ck")]
    metrics = tmp_path / "out" / "full_sft_32_metrics.jsonl"
    code, out, err = interrupt_after("train_sft.py", args, metrics, 3, signal.SIGTERM)
    assert code == 0, err[-2000:]
    assert "stopped by a signal" in out
    ckpt = torch.load(tmp_path / "ck" / "full_sft_32_resume.pth", weights_only=True)
    done = ckpt["step"]
    assert done >= 3 and os.path.isfile(tmp_path / "out" / "full_sft_32" / "model.safetensors")
    main(parse_args(args + ["--from_resume", "1", "--stop_after_steps", str(done + 2)]))     # here: no signal
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(1, done + 3))
