"""Shared pieces: schedule, precision, data order, logging, wandb that never crashes, resume checks."""
import json
import math
import sys
import types

import pytest
import torch

from model import LMConfig, apply_lora, build_model
from training.checkpoint import capture_rng, check_resume_args, restore_rng, upgraded_resume_args
from core.errors import UserError
from training.logging import RunLogger, WandbLogger
from core.runtime import DistInfo, autocast_context, check_device, grad_scaler
from training.loop import cosine_lr
from training.order import DataOrder, rescaled_position


def test_cosine_schedule_matches_minimind():
    assert cosine_lr(0, 100, 1.0) == pytest.approx(1.0)
    assert cosine_lr(50, 100, 1.0) == pytest.approx(0.55)
    assert cosine_lr(100, 100, 1.0) == pytest.approx(0.1)
    values = [cosine_lr(s, 100, 2e-4) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cpu_is_plain_fp32():
    cpu = check_device("cpu")
    with autocast_context(cpu, "bfloat16"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
    assert not grad_scaler(cpu, "float16").is_enabled()


def test_data_order_is_seeded_and_splits_ranks():
    a = DataOrder(103, 4, 2, 1, seed=5, dist_info=DistInfo())
    b = DataOrder(103, 4, 2, 1, seed=5, dist_info=DistInfo())
    assert [a.batch(m) for m in range(a.total_micro)] == [b.batch(m) for m in range(b.total_micro)]
    assert a.batches_per_epoch == 25 and a.total_micro == 50
    epoch0 = sum((a.batch(m) for m in range(25)), [])
    assert len(set(epoch0)) == 100  # no repeats inside an epoch
    assert a.batch(0) != a.batch(25)  # a new shuffle each epoch
    r0 = DataOrder(103, 4, 1, 1, seed=5, dist_info=DistInfo(0, 0, 2))
    r1 = DataOrder(103, 4, 1, 1, seed=5, dist_info=DistInfo(1, 1, 2))
    s0 = set(sum((r0.batch(m) for m in range(r0.total_micro)), []))
    s1 = set(sum((r1.batch(m) for m in range(r1.total_micro)), []))
    assert r0.total_micro == r1.total_micro == 12 and not s0 & s1
    with pytest.raises(UserError, match="--batch_size 64 x 2 process"):
        DataOrder(100, 64, 1, 1, seed=0, dist_info=DistInfo(0, 0, 2))


def test_used_is_what_the_micro_batches_read_on_every_rank():
    ranks = [DataOrder(103, 4, 3, 1, seed=5, dist_info=DistInfo(r, r, 2)) for r in (0, 1)]
    read = lambda start, stop: {i for o in ranks for m in range(start, stop) for i in o.batch(m)}
    assert ranks[0].used(3, 5) == ranks[1].used(3, 5) == read(3, 5) and len(read(3, 5)) == 16   # 2 x 2 ranks x 4
    assert ranks[0].used(10, 14) == read(10, 14)                     # across the end of epoch 1 (12 per epoch)
    assert ranks[0].used(0, 0) == set() and len(ranks[0].used(0, 36)) == 103   # with this seed, 3 epochs reach all


def test_rng_round_trip():
    state = capture_rng()
    x = (torch.rand(3), __import__("random").random())
    restore_rng(state)
    assert torch.equal(torch.rand(3), x[0]) and __import__("random").random() == x[1]


def test_resume_args_difference_is_named():
    check_resume_args({"beta": 1.0, "device": "cuda:0"}, {"beta": 1.0, "device": "cpu"}, "f")  # device may change
    with pytest.raises(UserError, match=r"--beta 1.0 -> 2.0"):
        check_resume_args({"beta": 1.0}, {"beta": 2.0}, "f")


def test_resume_files_written_with_loss_agg_still_resume():
    """--loss_agg token_mean | seq_mean is --loss_type dapo | grpo; a file from before --loss_type
    (GRPO's, PPO's) and before the newer flags resumes with their do-what-it-did values."""
    now = {"beta": 1.0, "loss_type": "dapo", "importance_sampling_level": "token", "mask_truncated": 0,
           "overlong_penalty": 0, "drop_zero_std": 0}
    old_gpo = {"beta": 1.0, "loss_agg": "token_mean"}
    check_resume_args(upgraded_resume_args(old_gpo, now), now, "f")
    with pytest.raises(UserError, match=r"--loss_type 'grpo' -> 'dapo'"):
        check_resume_args(upgraded_resume_args({"beta": 1.0, "loss_agg": "seq_mean"}, now), now, "f")
    check_resume_args(upgraded_resume_args({"beta": 1.0}, {**now, "loss_type": "seed_sum"}),
                      {**now, "loss_type": "seed_sum"}, "f")
    with pytest.raises(UserError, match=r"--drop_zero_std 0 -> 1"):
        check_resume_args(upgraded_resume_args(old_gpo, {**now, "drop_zero_std": 1}), {**now, "drop_zero_std": 1}, "f")


def test_resume_on_another_world_size_keeps_the_examples_seen():
    """RL: one prompt batch per step whatever --accumulation_steps: step 100 on 2 processes is
    step 50 on 4, not 12. Supervised, 4 micro-batches per step: micro 400 on 2 (step 100) is 200 on 4, step 50."""
    assert rescaled_position(100, 2, 4, 1) == (50, 50)
    assert rescaled_position(400, 2, 4, 4) == (50, 200)
    assert rescaled_position(6, 2, 4, 2) == (1, 2)            # 3 micro-batches: a whole step, the rest redone
    assert rescaled_position(3, 2, 1, 1) == (6, 6)


def test_logger_writes_metrics_every_interval(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = RunLogger(enabled=True, total_steps=5, start_step=0, log_interval=2, metrics_path=path)
    for step in range(1, 6):
        log.step(step, {"loss": torch.tensor(1.0 / step), "lr": 0.1}, force=step == 5)
    log.close()
    rows = [json.loads(l) for l in open(path)]
    assert [r["step"] for r in rows] == [2, 4, 5] and rows[0]["loss"] == pytest.approx(0.5)
    silent = RunLogger(enabled=False, total_steps=5, start_step=0, log_interval=1, metrics_path=str(tmp_path / "x"))
    silent.step(1, {"loss": 1.0})
    assert not (tmp_path / "x").exists()  # only rank 0 writes


def test_wandb_failure_never_stops_training(monkeypatch, capsys):
    fake = types.ModuleType("wandb")

    def broken_init(**kwargs):
        raise ConnectionError("no network")
    fake.init = broken_init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    w = WandbLogger("p", "n", {})
    w.log({"loss": 1.0}, step=1)
    w.finish()
    assert w.run_id is None and "wandb disabled" in capsys.readouterr().err


def test_wandb_offline_when_not_logged_in(monkeypatch, tmp_path, capsys):
    calls = {}
    fake = types.ModuleType("wandb")

    class Run:
        id = "abc123"

        def log(self, metrics, step):
            calls.setdefault("log", []).append((step, metrics))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    w = WandbLogger("proj", "run", {"a": 1}, run_id="abc123")
    assert __import__("os").environ["WANDB_MODE"] == "offline" and "offline" in capsys.readouterr().out
    assert calls["init"]["id"] == "abc123" and calls["init"]["resume"] == "allow"
    w.log({"loss": 0.5}, step=3)
    w.finish()
    assert calls["log"] == [(3, {"loss": 0.5})] and calls["finished"]


def test_lora_on_moe_adapts_attention_only():
    model = build_model(LMConfig(hidden_size=32, num_hidden_layers=2, use_moe=True, vocab_size=50))
    apply_lora(model, rank=2)
    trainable = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with torch.no_grad():
        out = model(torch.randint(0, 50, (1, 5))).logits
    assert out.shape == (1, 5, 50) and math.isfinite(float(out.sum()))


def test_metrics_file_never_repeats_steps(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    log = RunLogger(enabled=True, total_steps=10, start_step=5, log_interval=1, metrics_path=str(path))
    log.step(6, {"loss": 0.5})
    log.close()
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    RunLogger(enabled=True, total_steps=10, start_step=0, log_interval=1, metrics_path=str(path)).close()
    assert path.read_text() == ""  # a fresh run starts a fresh file
