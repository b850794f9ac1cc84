"""Run under torchrun by tests/test_rollout.py: each rank samples its share of the prompts."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from dataset.encoding import encode_prompt  # noqa: E402
from dataset.formats import load_prompts
from model import LMConfig, init_model  # noqa: E402
from rl.rollout import HFRolloutEngine  # noqa: E402
from core.runtime import init_distributed  # noqa: E402
from training.order import DataOrder  # noqa: E402

out_dir = sys.argv[1]
info, device = init_distributed("cpu")
torch.manual_seed(1000 + info.rank)
model, tok = init_model(LMConfig(), "full_sft")
prompts = load_prompts("dataset/heldout_rl.jsonl")[:8]
order = DataOrder(len(prompts), 2, 1, 1, 0, info, what="prompts")
indices = order.batch(0)
rollout = HFRolloutEngine(model, tok, max_gen_len=24).generate([encode_prompt(tok, prompts[i]["prompt"]) for i in indices], 3)
with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as f:
    json.dump({"indices": indices, "prompt_index": rollout.prompt_index.tolist(), "texts": rollout.texts,
               "prompts": [tok.decode(r[:rollout.prompt_len][rollout.attention_mask[j, :rollout.prompt_len].bool()].tolist())
                           for j, r in enumerate(rollout.sequences)]}, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
