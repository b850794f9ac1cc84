"""What a run under nohup for days must survive, for every alignment script: kill -9 at any point,
a kill in the middle of a save, SIGTERM/SIGINT, a resume file from other arguments, non-finite
steps, a full disk, a changed world size and two machines.

The faults are real: tests/helpers/crash.py runs the real CLI in a process of its own (forked
from a server that has the imports done: tests/helpers/forked.py) and sends that process SIGKILL,
SIGTERM or SIGINT at a chosen step (or in the middle of a save), chosen at random here; the
seed is in every assertion message so a failure can be replayed.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train_dpo
import train_gpo
import train_grpo
import train_ppo
import train_reward
from conftest import first_lines, free_port
from helpers import crash, forked
from training.checkpoint import kept_resume_files, load_resume
from core.errors import RunHalted, UserError

pytestmark = pytest.mark.slow

RL = ["--num_generations", "2", "--max_gen_len", "6", "--reward_funcs", "tests.helpers.toy_rewards:char_count"]
# script module, data ("pairs" or "prompts"), weights folders compared, its own flags
SCRIPTS = {
    "dpo": (train_dpo, "pairs", ["dpo_32"], ["--learning_rate", "1e-2"]),
    "reward": (train_reward, "pairs", ["reward_32"], ["--learning_rate", "1e-2"]),
    "gpo": (train_gpo, "prompts", ["gpo_32"], [*RL, "--learning_rate", "1e-2", "--ppo_epochs", "2",
                                               "--mini_batch_size", "4"]),
    "grpo": (train_grpo, "prompts", ["grpo_32"], [*RL, "--learning_rate", "1e-2"]),
    "ppo": (train_ppo, "prompts", ["ppo_actor_32", "ppo_critic_32"], [*RL, "--learning_rate", "1e-2",
                                                                       "--mini_batch_size", "4"]),
}
N = 8   # one epoch of the 32-example files at --batch_size 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("reldata")
    return {"pairs": first_lines("dataset/dpo.jsonl", 32, d), "prompts": first_lines("dataset/rl.jsonl", 32, d)}


def cli_args(name, tmp, data, tiny_dir, *extra):
    module, kind, _, own = SCRIPTS[name]
    return ["--data_path", data[kind], "--from_weight", os.path.join(tiny_dir, "full_sft_32"), "--batch_size", "4",
            "--epochs", "1", "--device", "cpu", "--log_interval", "1", "--save_interval", "2",
            "--save_dir", str(tmp / "out"), "--checkpoint_dir", str(tmp / "ck"), *own, *extra]


def run_here(name, tmp, data, tiny_dir, *extra):
    module = SCRIPTS[name][0]
    return module.main(module.parse_args(cli_args(name, tmp, data, tiny_dir, *extra)))


def run_with_fault(fault, name, tmp, data, tiny_dir, *extra):
    """The script's CLI in a process of its own, with ``fault`` (helpers/crash.py) injected."""
    script = SCRIPTS[name][0].__name__ + ".py"
    return forked.run(crash.run_fault, fault, script, cli_args(name, tmp, data, tiny_dir, *extra),
                      out_dir=tmp / "processes")


def weights(tmp, name):
    out = {}
    for folder in SCRIPTS[name][2]:
        d = tmp / "out" / folder
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update({f"{folder}/{f}/{k}": v for k, v in load_file(str(d / f)).items()})
    return out


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def rows(tmp, name):
    path = tmp / "out" / f"{SCRIPTS[name][2][0]}_metrics.jsonl"
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def resume_step(tmp, name):
    return load_resume(str(tmp / "ck" / f"{SCRIPTS[name][2][0]}_resume.pth"))["step"]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_sigterm_kill_mid_save_and_kill_mid_step_resume_exactly(name, tmp_path, data, tiny_dir):
    """SIGTERM at step a, then a kill -9 in the middle of the next resume-file write, then a
    kill -9 in the middle of step k, each followed by --from_resume 1: the end equals a run that
    was never interrupted, and the metrics file has every step once, with the same values."""
    seed = random.randrange(10 ** 6)
    r = random.Random(seed)
    a, why = r.randint(1, 3), f"(random seed {seed})"
    straight = tmp_path / "straight"
    run_here(name, straight, data, tiny_dir)
    cut = tmp_path / "cut"

    sig = r.choice(["term", "int"])
    proc = run_with_fault(f"{sig}-step:{a}", name, cut, data, tiny_dir)
    assert proc.returncode == 0 and "stopped by a signal" in proc.stdout, f"{why} {proc.stderr[-2000:]}"
    assert resume_step(cut, name) == a, why

    proc = run_with_fault("kill-save:1", name, cut, data, tiny_dir, "--from_resume", "1")
    assert proc.returncode == -signal.SIGKILL, f"{why} {proc.stderr[-2000:]}"
    s1 = a + 2 - a % 2                                    # the first save after a, cut half-way
    assert resume_step(cut, name) == a, why               # the previous resume file still loads
    assert os.path.getsize(cut / "ck" / f"{SCRIPTS[name][2][0]}_resume.pth.tmp") > 0   # the cut write
    assert all(torch.isfinite(v).all() for v in weights(cut, name).values())           # weights of s1 load

    k = r.randint(s1, N)
    proc = run_with_fault(f"kill-step:{k}", name, cut, data, tiny_dir, "--from_resume", "1")
    assert proc.returncode == -signal.SIGKILL, f"{why} {proc.stderr[-2000:]}"
    saves = [s for s in range(a + 1, k) if s % 2 == 0]
    assert resume_step(cut, name) == (saves[-1] if saves else a), why

    run_here(name, cut, data, tiny_dir, "--from_resume", "1")
    assert max_diff(weights(straight, name), weights(cut, name)) <= 1e-6, why
    got, want = rows(cut, name), rows(straight, name)
    assert [row["step"] for row in got] == list(range(1, N + 1)), why
    key = "loss" if name in ("dpo", "reward") else "reward"
    assert [row[key] for row in got] == pytest.approx([row[key] for row in want], abs=1e-6), why


def test_kill_9_from_outside_at_a_random_moment(tmp_path, data, tiny_dir):
    """A real kill -9 from another process, at whatever instruction the run is in."""
    seed = random.randrange(10 ** 6)
    target = random.Random(seed).randint(2, 6)
    cut = tmp_path / "cut"
    endless = cli_args("dpo", cut, data, tiny_dir, "--epochs", "1000", "--save_interval", "1")
    proc = forked.Child(forked.script, ("train_dpo.py", endless), tmp_path / "processes")
    metrics = cut / "out" / "dpo_32_metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            (not metrics.exists() or metrics.read_text().count("\n") < target):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    done = proc.wait(timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    n = resume_step(cut, "dpo") + 3
    train_dpo.main(train_dpo.parse_args(endless + ["--from_resume", "1", "--stop_after_steps", str(n)]))
    straight = tmp_path / "straight"
    train_dpo.main(train_dpo.parse_args(cli_args("dpo", straight, data, tiny_dir, "--epochs", "1000",
                                                 "--stop_after_steps", str(n))))
    assert max_diff(weights(straight, "dpo"), weights(cut, "dpo")) <= 1e-6, f"(seed {seed})"
    assert [row["step"] for row in rows(cut, "dpo")] == list(range(1, n + 1))


def test_kill_between_the_renames_of_a_weights_folder(tmp_path, data, tiny_dir):
    """Killed after the old weights folder moved to .old and before the new one is in place:
    the .old folder still loads by name, and the next run keeps it until its own is whole."""
    cut, straight = tmp_path / "cut", tmp_path / "straight"
    proc = run_with_fault("kill-weights:2", "dpo", cut, data, tiny_dir, "--save_interval", "1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (cut / "out" / "dpo_32").exists() and (cut / "out" / "dpo_32.old").is_dir()
    assert resume_step(cut, "dpo") == 1
    from model import LMConfig, init_model
    init_model(LMConfig(), "dpo", save_dir=str(cut / "out"))      # the name still resolves, to dpo_32.old
    run_here("dpo", cut, data, tiny_dir, "--save_interval", "1", "--from_resume", "1")
    assert not (cut / "out" / "dpo_32.old").exists()
    run_here("dpo", straight, data, tiny_dir)
    assert max_diff(weights(straight, "dpo"), weights(cut, "dpo")) <= 1e-6


def test_a_full_disk_keeps_the_last_good_save_and_says_so(tmp_path, data, tiny_dir):
    cut = tmp_path / "cut"
    proc = run_with_fault("enospc-save:2", "grpo", cut, data, tiny_dir)
    assert proc.returncode == 3, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not save step 4: No space left on device") and \
        "the weights of step 4 are saved, the resume file still holds step 2" in last, last
    assert resume_step(cut, "grpo") == 2
    assert not os.path.exists(cut / "ck" / "grpo_32_resume.pth.tmp")          # no half-written file left
    run_here("grpo", cut, data, tiny_dir, "--from_resume", "1")
    straight = tmp_path / "straight"
    run_here("grpo", straight, data, tiny_dir)
    assert max_diff(weights(straight, "grpo"), weights(cut, "grpo")) <= 1e-6


def test_keep_checkpoints_keeps_the_newest_and_resume_falls_back_to_them(tmp_path, data, tiny_dir, capsys):
    cut = tmp_path / "cut"
    run_here("dpo", cut, data, tiny_dir, "--save_interval", "1", "--keep_checkpoints", "3", "--stop_after_steps", "5")
    resume = cut / "ck" / "dpo_32_resume.pth"
    kept = kept_resume_files(str(resume))
    assert [s for s, _ in kept] == [5, 4, 3]
    assert os.path.samefile(kept[0][1], resume)                                # a link, not a copy
    resume.write_bytes(resume.read_bytes()[:1000])                            # the latest is damaged
    capsys.readouterr()
    run_here("dpo", cut, data, tiny_dir, "--save_interval", "1", "--keep_checkpoints", "3", "--from_resume", "1")
    out = capsys.readouterr().out
    assert "cannot read resume file" in out and "resuming from the kept copy" in out and "at step 4/8" in out
    assert [s for s, _ in kept_resume_files(str(resume))] == [8, 7, 6]
    straight = tmp_path / "straight"
    run_here("dpo", straight, data, tiny_dir)
    assert max_diff(weights(straight, "dpo"), weights(cut, "dpo")) <= 1e-6
    run_here("dpo", cut, data, tiny_dir, "--max_steps", "1")                  # keep 1: the copies go
    assert kept_resume_files(str(resume)) == []


OTHER = {"dpo": "reward", "reward": "dpo", "gpo": "grpo", "grpo": "ppo", "ppo": "gpo"}
SAVE_WEIGHT = {"dpo": "dpo", "reward": "reward", "gpo": "gpo", "grpo": "grpo", "ppo": "ppo_actor"}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_resume_file_from_other_arguments_says_what_differs(name, tmp_path, data, tiny_dir):
    mine = first_lines(data[SCRIPTS[name][1]], 32, tmp_path)
    run_here(name, tmp_path, data, tiny_dir, "--max_steps", "1", "--data_path", mine)
    resume = lambda *extra: run_here(name, tmp_path, data, tiny_dir, "--data_path", mine, "--from_resume", "1", *extra)
    os.makedirs(tmp_path / "other")
    other_file = first_lines(mine, 28, tmp_path / "other")
    with pytest.raises(UserError, match=r"other arguments \(--data_path .*; use the same ones"):
        resume("--data_path", other_file)
    with pytest.raises(UserError, match=r"other arguments \(--lora_rank 8 -> 4\)"):
        resume("--lora_rank", "4")
    with open(other_file, encoding="utf-8") as f:
        shorter = f.read()
    with open(mine, "w", encoding="utf-8") as f:                    # the same file, edited in place
        f.write(shorter)
    with pytest.raises(UserError, match=r"was written for 32 examples in .*, which now has 28"):
        resume()
    with pytest.raises(UserError, match=r"for this model size \(--hidden_size 48\), but .*_32_resume.pth is there"):
        resume("--from_weight", "none", "--hidden_size", "48", "--num_hidden_layers", "2")
    other = OTHER[name]
    with pytest.raises(UserError, match=rf"was written by {name}, not {other}"):
        run_here(other, tmp_path, data, tiny_dir, "--from_resume", "1", "--save_weight", SAVE_WEIGHT[name])


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, data, tiny_dir, monkeypatch, capsys):
    """A loss that turns nan at chosen steps (a bad batch, an overflow): its update is skipped."""
    from training.logging import RunLogger
    from training.loop import Updater
    backward, log_step = Updater.backward, RunLogger.step
    done, nan_steps = [], set()
    monkeypatch.setattr(RunLogger, "step", lambda self, n, m, **kw: (done.append(n), log_step(self, n, m, **kw))[1])
    monkeypatch.setattr(Updater, "backward",
                        lambda self, loss: backward(self, loss * float("nan") if len(done) + 1 in nan_steps else loss))

    run_here("dpo", tmp_path / "two", data, tiny_dir, "--stop_after_steps", "2")
    done.clear()
    nan_steps.add(3)            # a bad batch at step 3: skipped (weights as after step 2), counted, the run goes on
    run_here("dpo", tmp_path / "one_bad", data, tiny_dir, "--stop_after_steps", "3")
    assert max_diff(weights(tmp_path / "two", "dpo"), weights(tmp_path / "one_bad", "dpo")) == 0
    assert "step 3: non-finite loss or gradients, update skipped (1 in a row, 1 in all" in capsys.readouterr().out
    assert [row["skipped_steps"] for row in rows(tmp_path / "one_bad", "dpo")] == [0, 0, 1]
    opt = load_resume(str(tmp_path / "one_bad" / "ck" / "dpo_32_resume.pth"))["optimizers"][""]
    assert all(int(s["step"]) == 2 for s in opt["state"].values())          # Adam did not count it either

    done.clear()
    nan_steps.update(range(3, N + 1))   # every step from 3 on: after --max_bad_steps 3 in a row, save and stop
    with pytest.raises(RunHalted, match=r"stopped at step 5: 3 steps in a row had a non-finite loss"):
        run_here("dpo", tmp_path / "diverged", data, tiny_dir, "--max_bad_steps", "3")
    ckpt = load_resume(str(tmp_path / "diverged" / "ck" / "dpo_32_resume.pth"))
    assert (ckpt["step"], ckpt["bad_steps"], ckpt["bad_in_row"]) == (5, 3, 3)
    assert max_diff(weights(tmp_path / "two", "dpo"), weights(tmp_path / "diverged", "dpo")) == 0


def test_a_learning_rate_that_blows_up_stops_with_finite_weights(tmp_path, data, tiny_dir, cli):
    code, _, err = cli("train_ppo.py", *cli_args("ppo", tmp_path, data, tiny_dir, "--learning_rate", "1e30",
                                                 "--max_bad_steps", "2"))
    assert code == 3, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: stopped at step ")
    assert all(torch.isfinite(v).all() for v in weights(tmp_path, "ppo").values())


def test_world_size_two_to_one_to_two_and_two_machines(tmp_path, data, tiny_dir, capsys):
    """1 process for 2 steps, then two torchrun launches (one per "machine", --nnodes 2 on
    loopback) resume it together, then 1 process again finishes it."""
    base = cli_args("dpo", tmp_path, data, tiny_dir, "--batch_size", "2", "--save_interval", "100")
    train_dpo.main(train_dpo.parse_args(base + ["--stop_after_steps", "2"]))
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "train_dpo.py", *base, "--from_resume", "1", "--stop_after_steps", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    out = outs[0][0]
    assert "2 process(es)" in out and "weights identical on all 2 processes" in out
    assert "world size 1 -> 2: step 2 -> 1" in out
    assert resume_step(tmp_path, "dpo") == 3
    train_dpo.main(train_dpo.parse_args(base + ["--from_resume", "1"]))
    assert "world size 2 -> 1: step 3 -> 6" in capsys.readouterr().out
    assert resume_step(tmp_path, "dpo") == 16
    assert [row["step"] for row in rows(tmp_path, "dpo")] == [1, 2, 3, *range(7, 17)]
