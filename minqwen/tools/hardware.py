"""What machine are we on, and which Qwen2.5 size fits it?

`hardware_report()` reports the CPU, memory, GPU and library versions. `memory_estimate()` models the bytes a size needs
(weights + KV cache at a context length + activations), and `recommend_size()` picks the largest that fits.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

import psutil
import torch

from minqwen.model.sizes import (
    SIZES,
    dtype_bytes,
    kv_cache_bytes_per_token,
    parameter_count,
    qwen25_config,
)

HEADROOM = 0.9  # allocator fragmentation, CUDA context and library buffers take the rest


@dataclass(frozen=True)
class HardwareReport:
    cpu: str
    cpu_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpu: str | None
    gpu_memory_bytes: int | None
    gpu_compute_capability: str | None
    python: str
    torch: str
    transformers: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def accelerator_bytes(self) -> int:
        """Memory the model would live in: the GPU's if there is one, else the RAM still available."""
        return self.gpu_memory_bytes if self.gpu_memory_bytes else self.ram_available_bytes


def check_device(name: str):
    """The torch device `name` names, if this machine has it; a ValueError naming the fix otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: torch sees no CUDA GPU here; pass --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}"
            )
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: minqwen runs on cpu or cuda, not {device.type}")
    return device


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_report() -> HardwareReport:
    import transformers

    memory = psutil.virtual_memory()
    gpu = memory_bytes = capability = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, memory_bytes = props.name, props.total_memory
        capability = f"{props.major}.{props.minor}"
    return HardwareReport(
        cpu=_cpu_name(),
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        ram_total_bytes=memory.total,
        ram_available_bytes=memory.available,
        gpu=gpu,
        gpu_memory_bytes=memory_bytes,
        gpu_compute_capability=capability,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
    )


def memory_estimate(
    size: str, dtype: str = "bfloat16", context: int = 4096, batch: int = 1
) -> dict[str, int]:
    """Bytes to run `size` at `context` tokens for `batch` sequences.

    Activations are those of one prefill pass with the widest tensors alive at once: the residual stream, q/k/v,
    the MLP's gate and up projections, and float32 logits of the last position only (generation never needs
    logits for the whole prompt).
    """
    if context < 1 or batch < 1:
        raise ValueError(
            f"context and batch must be positive, got context={context}, batch={batch}"
        )
    c = qwen25_config(size)
    nbytes = dtype_bytes(dtype)
    weights = parameter_count(size) * nbytes
    kv_cache = kv_cache_bytes_per_token(size, dtype) * context * batch
    per_token = 4 * c["hidden_size"] + 2 * c["intermediate_size"]
    activations = batch * context * per_token * nbytes + batch * c["vocab_size"] * 4
    return {
        "weights": weights,
        "kv_cache": kv_cache,
        "activations": activations,
        "total": weights + kv_cache + activations,
    }


def recommend_size(
    available_bytes: int, dtype: str = "bfloat16", context: int = 4096, batch: int = 1
) -> str | None:
    """The largest Qwen2.5 size whose estimate fits in `HEADROOM` of `available_bytes`, or None if none does."""
    fitting = [
        s
        for s in SIZES
        if memory_estimate(s, dtype, context, batch)["total"] <= HEADROOM * available_bytes
    ]
    return fitting[-1] if fitting else None
