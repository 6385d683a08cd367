"""What machine are we on, and which Qwen2.5 size fits it?

`hardware()` reports the CPU, memory, GPU and library versions. `memory_estimate()` models the bytes a size needs
(weights + KV cache at a context length + activations), and `recommend_size()` picks the largest that fits.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

import psutil
import torch

from .sizes import SIZES, parameter_count, qwen25_config

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
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


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> HardwareReport:
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


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def kv_cache_bytes_per_token(size: str, dtype: str = "bfloat16") -> int:
    """Keys and values of every layer for one token: 2 x layers x kv_heads x head_dim x bytes."""
    c = qwen25_config(size)
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * _dtype_bytes(dtype)


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
    nbytes = _dtype_bytes(dtype)
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
