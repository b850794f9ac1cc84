"""The CUDA paths: bf16 autocast of the log-prob and loss functions against fp32, fp16 with the
GradScaler through a script's own step, and the decoding loop on CUDA against CPU.

Skipped on a machine without CUDA (CI); the device call in bench/gpu_check.py's docstring runs
them after the check.
"""
import copy
import os

import pytest
import torch

from conftest import first_lines, run_args, sample_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BF16_TOLERANCE = 2e-2        # ||bf16 - fp32|| / ||fp32|| of log-probs; bf16 operands land between 1e-3 and 1e-2


def relative_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def groups(vocab: int, P: int = 3, G: int = 2, Tp: int = 7, Lr: int = 5):
    """(sequences (P*G, Tp+Lr), attention_mask, response_mask, Tp): left-padded prompts shared by
    G consecutive rows, right-padded responses."""
    prompts = sample_ids(vocab, (P, Tp), seed=1).repeat_interleave(G, 0)
    responses = sample_ids(vocab, (P * G, Lr), seed=2)
    prompt_mask = torch.ones(P, Tp, dtype=torch.long)
    prompt_mask[0, :3] = 0
    response_mask = torch.ones(P * G, Lr, dtype=torch.long)
    response_mask[1, 3:] = 0
    attention_mask = torch.cat([prompt_mask.repeat_interleave(G, 0), response_mask], 1)
    sequences = torch.cat([prompts, responses], 1) * attention_mask
    keep = torch.cat([torch.zeros_like(prompt_mask).repeat_interleave(G, 0), response_mask], 1)
    return sequences.cuda(), attention_mask.cuda(), keep.cuda(), Tp


@pytest.mark.parametrize("packed", [True, False])
def test_bf16_autocast_logprobs_and_dpo_loss_match_fp32(tiny_model, packed):
    from model.logprobs import grouped_token_logprobs, masked_reduce
    from losses.preference import dpo_loss
    model, tok = tiny_model
    model = model.cuda()
    seqs, am, keep, Tp = groups(len(tok))
    with torch.no_grad():
        fp32 = grouped_token_logprobs(model, seqs, am, Tp, 2, packed=packed)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = grouped_token_logprobs(model, seqs, am, Tp, 2, packed=packed)[0]
    assert bf16.dtype == torch.float32                     # log-probs are taken in fp32 even under autocast
    assert relative_error(bf16 * keep[:, 1:], fp32 * keep[:, 1:]) < BF16_TOLERANCE
    seq32, seq16 = (masked_reduce(x, keep[:, 1:], "sum") for x in (fp32, bf16))
    loss32, _ = dpo_loss(seq32[0::2], seq32[1::2], seq32[0::2] - 1, seq32[1::2], 0.1)
    loss16, _ = dpo_loss(seq16[0::2], seq16[1::2], seq16[0::2] - 1, seq16[1::2], 0.1)
    assert abs(float(loss16) - float(loss32)) < BF16_TOLERANCE * float(loss32)


def test_fp16_grad_scaler_through_the_dpo_step(tiny_dir, tmp_path):
    """train_dpo on CUDA in fp16: the GradScaler is on, the losses are finite, the adapters move,
    and the resume file keeps the scaler's state."""
    import train_dpo
    data = first_lines("dataset/dpo.jsonl", 16, tmp_path)
    args = run_args(train_dpo.parse_args, tmp_path, data, os.path.join(tiny_dir, "full_sft_32"), "--device", "cuda:0",
                    "--dtype", "float16", "--max_steps", "3", "--epochs", "1")
    job = train_dpo.build(args)
    assert job.updater.scaler.is_enabled()
    before = {n: p.detach().clone() for n, p in job.run.base_model.named_parameters() if p.requires_grad}
    job()
    after = dict(job.run.base_model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    ckpt = torch.load(job.run.resume_file, map_location="cpu", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["step"] == 3
    assert job.updater.skipped < 3                      # the scaler may skip its first step, not all


def test_decoding_on_cuda_picks_the_cpu_greedy_tokens(tiny_model):
    from dataset.batches import pad_with_mask
    from rl.rollout import decode, token_sampler
    model, tok = tiny_model
    ids = [sample_ids(len(tok), (1, n), seed=n)[0].tolist() for n in (4, 9, 6)]
    prompts, mask = pad_with_mask(ids, tok.pad_token_id, side="left")
    greedy = token_sampler(1.0, top_k=1)
    cpu, _ = decode(model, prompts, mask, 2, 12, tok.eos_token_id, tok.pad_token_id, greedy)
    gpu_model = copy.deepcopy(model).cuda()
    gpu, _ = decode(gpu_model, prompts.cuda(), mask.cuda(), 2, 12, tok.eos_token_id, tok.pad_token_id, greedy)
    assert torch.equal(gpu.cpu(), cpu)

