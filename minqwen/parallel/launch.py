"""Joining a tensor-parallel job started by `torchrun`, and the few things only rank 0 does.

`torchrun --nproc-per-node N ...` starts N copies of one program and tells each its place in the environment
(RANK, LOCAL_RANK, WORLD_SIZE, and where to meet). Each copy calls `join`, which starts `torch.distributed` on
NCCL when there are GPUs (one per process) and gloo when there are none, and returns the `TensorParallel` that
`Qwen2.from_pretrained(..., tensor_parallel=)` takes. Every rank runs the model on the same input; rank 0 alone
reads input and prints, and `broadcast` hands what it read to the others.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist

from minqwen.parallel.collectives import TensorParallel

# Launched by torchrun when these are set; a plain `python` run has none of them.
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_size() -> int | None:
    """How many processes torchrun started for this job, or None outside torchrun."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    return int(os.environ["WORLD_SIZE"])


def check_launch(tp: int, device_type: str = "cpu") -> None:
    """A ValueError unless this process is one of `tp` that torchrun started, with a GPU of its own when
    `device_type` is "cuda": checked before anything loads."""
    size = launched_size()
    if size is None:
        raise ValueError(
            f"--tp {tp} runs as {tp} processes, one per GPU (or CPU share): start it with torchrun "
            f"--nproc-per-node {tp} -m minqwen ..."
        )
    if size != tp:
        raise ValueError(
            f"--tp {tp} needs {tp} processes, but torchrun started {size}: pass --nproc-per-node {tp}"
        )
    local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if device_type == "cuda" and local >= gpus:
        raise ValueError(
            f"process {local} of this machine has no GPU of its own ({gpus} visible): start at most "
            f"{gpus} processes per machine, or run on the CPU"
        )


def join(tp: int, device_type: str | None = None) -> tuple[TensorParallel, torch.device]:
    """Start `torch.distributed` for this process, one of `tp`, and return its place and its device: on
    "cuda" (the default where there is a GPU) the GPU of its local rank, through NCCL; on "cpu", through gloo."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    check_launch(tp, device_type)
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return TensorParallel(
        dist.get_rank(), dist.get_world_size(), dist.group.WORLD.group_name
    ), device


def leave() -> None:
    """End this process's part in the job. Drop every engine first: destroying an NCCL process group while a CUDA
    graph that captured its collectives is alive waited forever on the two-H200 machine (NCCL 2.28)."""
    if dist.is_initialized():
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dist.destroy_process_group()


def broadcast(value, tp: TensorParallel | None):
    """Rank 0's `value` on every rank (any picklable object): what rank 0 read, for all to run on."""
    if tp is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
