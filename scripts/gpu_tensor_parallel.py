"""Tensor parallelism on the two-GPU machine: the numbers chapter 8 plots.

Launched by torchrun, one process per GPU (`torchrun --nproc-per-node 2 scripts/gpu_tensor_parallel.py ...`):

- `--check`: greedy output of a tensor-parallel 0.5B (random weights, the real config; the same weights as the
  single-GPU model, split) against one GPU, through the eager model and the fast engine, in float32 and bf16;
- `--collectives`: what one all-reduce of a hidden vector costs, from a Python loop and replayed in a CUDA graph,
  through NCCL and through PyTorch's symmetric-memory one-shot all-reduce;
- `--sizes`: decode speed of the fast engine, bf16, random weights made directly on each GPU (each rank makes only
  its share, so 72B never exists whole), at every `--batches`, with peak memory on each GPU; the sizes in
  `--single` also on one GPU alone (rank 1 waits), side by side in the same run; `--no-reduce` sizes again with
  the all-reduces left out (wrong output, honest time), so the difference is what communication costs a step.

Run with plain `python` (no torchrun), `--hf SIZE ...` measures the baseline instead: transformers with
`device_map="auto"`, its layers spread over both GPUs in one process, eager `generate`, random weights made on
the GPUs.

Every record is one JSON line, appended to `--out` as soon as it is measured (a timed-out run keeps what it
finished), stamped with the device, versions and date. Timing is `minqwen.tools.bench.measure`: medians of
`--repeats` calls, the prompt's cost taken out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

import minqwen
import minqwen.engine.fast as fast_engine
from minqwen.engine.fast import FastQwen2
from minqwen.model.sizes import as_config, qwen25_config, weight_bytes_per_step
from minqwen.parallel import launch
from minqwen.parallel.sharding import shard
from minqwen.tools.bench import (
    _minqwen_fast,
    copy_bandwidth,
    fill_as_initialized,
    load_hf,
    measure,
    minqwen_from_hf,
    random_qwen2,
)

PROMPT, NEW_TOKENS = 128, 128
GREEDY = dict(do_sample=False, eos_token_id=[], repetition_penalty=1.0)


def stamp() -> dict:
    import transformers

    return {
        "device": torch.cuda.get_device_name(),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "date": datetime.date.today().isoformat(),
    }


class Output:
    def __init__(self, path: Path, write: bool):
        self.path, self.write = path, write

    def __call__(self, record: dict) -> None:
        record = stamp() | record
        if self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


def agreement(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Per row, how many leading new tokens two outputs share."""
    same = (a == b).long().cumprod(dim=1)
    return same.sum(dim=1).tolist()


def check(tp, device, out: Output) -> None:
    prompts = torch.randint(0, 150_000, (4, 64), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        model = minqwen_from_hf(load_hf("0.5B", device, dtype, seed=0))
        whole = {}
        for batch in (1, 4):
            ids = prompts[:batch].to(device)
            whole[batch] = FastQwen2(model).generate(ids, 64, **GREEDY)[:, 64:]
        shard(model, tp)
        for batch in (1, 4):
            ids = prompts[:batch].to(device)
            split_fast = FastQwen2(model).generate(ids, 64, **GREEDY)[:, 64:]
            split_eager = minqwen.generate(model, ids, 64, **GREEDY)[:, 64:]
            out(
                {
                    "kind": "check",
                    "model": "0.5B",
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch_size": batch,
                    "new_tokens": 64,
                    "tp": tp.world_size,
                    "fast_tp_vs_one_gpu": agreement(split_fast, whole[batch]),
                    "eager_tp_vs_one_gpu": agreement(split_eager, whole[batch]),
                }
            )
        del model
        torch.cuda.empty_cache()


def timed_per_call(run, calls: int) -> float:
    run()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls


def collectives(tp, device, out: Output) -> None:
    from minqwen.parallel.collectives import all_reduce

    for size in ("7B", "32B", "72B"):
        hidden = qwen25_config(size)["hidden_size"]
        for batch in (1, 8, 64):
            x = torch.randn(batch, hidden, device=device, dtype=torch.bfloat16)
            record = {"kind": "collective", "hidden": hidden, "batch_size": batch, "size": size}
            record["nccl_python_us"] = timed_per_call(lambda x=x: all_reduce(x, tp), 200) * 1e6
            layers = as_config(size).num_hidden_layers * 2
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    all_reduce(x, tp)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                y = x
                for _ in range(layers):
                    y = all_reduce(y, tp) * 0.5
            record["nccl_graph_us"] = timed_per_call(graph.replay, 20) / layers * 1e6
            try:
                record["symm_mem_one_shot_us"] = one_shot_us(x, tp)
            except Exception as error:  # noqa: BLE001 - recorded: which PyTorch builds lack it is the finding
                record["symm_mem_one_shot_error"] = f"{type(error).__name__}: {error}"[:300]
            out(record)


def one_shot_us(x, tp) -> float:
    import torch.distributed._symmetric_memory as symm_mem

    buffer = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
    symm_mem.rendezvous(buffer, tp.group)
    buffer.copy_(x.flatten())
    one_shot = torch.ops.symm_mem.one_shot_all_reduce
    return timed_per_call(lambda: one_shot(buffer, "sum", tp.group), 200) * 1e6


def decode(fast, batch: int) -> dict:
    ids = torch.randint(0, 150_000, (batch, PROMPT), device=fast.device)
    torch.cuda.reset_peak_memory_stats()
    return measure(_minqwen_fast(fast), ids, NEW_TOKENS, repeats=3)


def speed(size: str, tp, device, args, out: Output) -> None:
    config = as_config(size)
    common = {"kind": "decode", "model": size, "prompt_len": PROMPT, "new_tokens": NEW_TOKENS}
    common["weights"] = "random, real config"
    common["copy_bandwidth"] = copy_bandwidth(device)
    common["weight_bytes"] = weight_bytes_per_step(config, "bfloat16")
    if size in args.single:
        if tp.rank == 0:
            model = random_qwen2(size, device, torch.bfloat16)
            fast = FastQwen2(model)
            for batch in args.batches:
                out(
                    common
                    | {"impl": "minqwen-fast", "tp": 1, "batch_size": batch}
                    | decode(fast, batch)
                )
            del model, fast
            torch.cuda.empty_cache()
        dist.barrier()
    variants = [("minqwen-fast", fast_engine.all_reduce)]
    if size in args.no_reduce:
        variants.append(("minqwen-fast-no-reduce", lambda x, tp: x))
    model = random_qwen2(size, device, torch.bfloat16, tensor_parallel=tp)
    for impl, reduce in variants:
        fast_engine.all_reduce = reduce
        fast = FastQwen2(model)
        for batch in args.batches if impl == "minqwen-fast" else args.batches[:2]:
            result = decode(fast, batch)
            peaks = [None] * tp.world_size
            dist.all_gather_object(peaks, result.pop("peak_mem_bytes"))
            out(
                common
                | {"impl": impl, "tp": tp.world_size, "batch_size": batch}
                | result
                | {"peak_mem_bytes": peaks}
            )
        del fast
        torch.cuda.empty_cache()
    fast_engine.all_reduce = variants[0][1]
    del model
    torch.cuda.empty_cache()


def hf_pipeline(size: str, out: Output, batches) -> None:
    """transformers across every visible GPU as `device_map="auto"` places it, random weights made in place."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device
    from transformers import AutoModelForCausalLM, Qwen2Config

    from minqwen.tools.bench import _hf_generate

    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(
            Qwen2Config(**qwen25_config(size)), dtype=torch.bfloat16
        )
    hf.tie_weights()
    no_split = ["Qwen2DecoderLayer"]
    memory = get_balanced_memory(hf, dtype=torch.bfloat16, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(hf, max_memory=memory, no_split_module_classes=no_split)
    torch.manual_seed(0)
    for name, param in list(hf.named_parameters()):
        place = f"cuda:{device_map[_owner(name, device_map)]}"
        value = torch.empty(param.shape, dtype=torch.bfloat16, device=place)
        fill_as_initialized(name, value)
        set_module_tensor_to_device(hf, name, place, value=value)
    hf = dispatch_model(hf.eval().requires_grad_(False), device_map=device_map)
    gpus = sorted({d for d in device_map.values() if isinstance(d, int)})
    for batch in batches:
        ids = torch.randint(0, 150_000, (batch, PROMPT), device="cuda:0")
        for g in gpus:
            torch.cuda.reset_peak_memory_stats(g)
        result = measure(_hf_generate(hf, static=False), ids, NEW_TOKENS, repeats=3)
        result["peak_mem_bytes"] = [torch.cuda.max_memory_allocated(g) for g in gpus]
        out(
            {"kind": "decode", "model": size, "impl": "hf-device-map-auto", "tp": len(gpus)}
            | {"batch_size": batch, "prompt_len": PROMPT, "new_tokens": NEW_TOKENS}
            | {
                "weights": "random, real config",
                "layers_per_gpu": [list(device_map.values()).count(g) for g in gpus],
            }
            | result
        )
    del hf
    torch.cuda.empty_cache()


def _owner(name: str, device_map: dict) -> str:
    """The entry of an accelerate device map that places parameter `name`: its longest prefix."""
    owners = [key for key in device_map if key == "" or name.startswith(key + ".")]
    return max(owners, key=len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--collectives", action="store_true")
    parser.add_argument("--sizes", nargs="*", default=[])
    parser.add_argument("--single", nargs="*", default=[])
    parser.add_argument("--no-reduce", nargs="*", default=[])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--hf", nargs="*", default=[])
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    if launch.launched_size() is None:
        out = Output(args.out, write=True)
        for size in args.hf:
            hf_pipeline(size, out, args.batches)
        return
    tp, device = launch.join(launch.launched_size())
    out = Output(args.out, write=tp.rank == 0)
    if args.check:
        check(tp, device, out)
    if args.collectives:
        collectives(tp, device, out)
    for size in args.sizes:
        speed(size, tp, device, args, out)
    launch.leave()


if __name__ == "__main__":
    main()
