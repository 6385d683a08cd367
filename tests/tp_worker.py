"""One rank of a tensor-parallel check, started by torchrun from tests/test_ch8_parallel.py.

Loads `checkpoint` split across the job's processes (gloo, CPU) and generates with it: greedy and seeded sampling,
through the eager loop and the fast engine, for a batch with left padding. Rank 0 writes the new tokens as JSON;
every rank's tokens must agree, or the ranks' caches have parted.
"""

import json
import sys

import torch
import torch.distributed as dist

import minqwen
from minqwen.parallel import launch

checkpoint, out, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = json.loads(sys.argv[4])
tp, _ = launch.join(launch.launched_size(), "cpu")
model = minqwen.Qwen2.from_pretrained(checkpoint, tensor_parallel=tp)
width = max(map(len, prompts))
ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
settings = {
    "greedy": dict(do_sample=False),
    "sampled": dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, seed=7),
}
fast = minqwen.FastQwen2(model)
results = {}
for name, kw in settings.items():
    common = dict(attention_mask=mask, eos_token_id=[], **kw)
    results[f"eager-{name}"] = minqwen.generate(model, ids, new_tokens, **common).tolist()
    results[f"fast-{name}"] = fast.generate(ids, new_tokens, **common).tolist()
with torch.inference_mode():
    results["logits"] = model(ids[:1, -3:]).flatten()[:64].tolist()
results["parameters"] = sum(p.numel() for p in model.parameters())
everyone = [None] * tp.world_size
dist.all_gather_object(everyone, {k: v for k, v in results.items() if k != "logits"})
results["ranks_agree"] = all(r == everyone[0] for r in everyone)
if tp.rank == 0:
    with open(out, "w") as f:
        json.dump(results, f)
launch.leave()
