"""Notebook conveniences: the model under study, tables, diffs, plots and `show_source`.

Nothing here is part of minqwen; it only makes the chapters short. Settings come from the environment:

- ``MINQWEN_MODEL``: any `minqwen.fetch` source (default ``embedded``);
- ``MINQWEN_DEVICE``: ``cpu`` (default) or ``cuda``, falling back to the CPU when no GPU is present;
- ``MINQWEN_DTYPE``: ``float32`` or ``bfloat16``; by default float32 on the CPU, where every check is exact, and
  bfloat16 on a GPU, the precision a GPU runs a model in, with tolerances to match.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import textwrap
import warnings
from pathlib import Path

# A page shows results, not progress: no progress bars (tqdm reads TQDM_DISABLE), and no warnings from the
# libraries on stderr. tqdm.auto, imported by transformers and huggingface_hub, warns when ipywidgets is absent,
# so it is imported once, quietly, before anything else can.
os.environ.setdefault("TQDM_DISABLE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

import matplotlib
import pandas as pd
import torch
from IPython.display import Markdown, display
from transformers.utils import logging as transformers_logging

import minqwen

BOOK = Path(__file__).resolve().parent
GOLDEN = BOOK / "data" / "golden"
BENCH = BOOK / "data" / "bench"

MODEL_SOURCE = os.environ.get("MINQWEN_MODEL", "embedded")
DEVICE = os.environ.get("MINQWEN_DEVICE", "cpu")
if DEVICE != "cpu" and not DEVICE.startswith("cuda"):
    raise ValueError(f"MINQWEN_DEVICE={DEVICE!r}: use cpu, cuda or cuda:<index>")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    DEVICE = "cpu"
_dtype = os.environ.get("MINQWEN_DTYPE") or ("bfloat16" if DEVICE.startswith("cuda") else "float32")
if _dtype not in ("float32", "bfloat16"):
    raise ValueError(f"MINQWEN_DTYPE={_dtype!r}: use float32 or bfloat16")
DTYPE = getattr(torch, _dtype)
# Without a GPU, Triton kernels (chapter 5) run in Triton's interpreter; it is chosen when a kernel is defined,
# so before any page imports minqwen's kernels.
if not DEVICE.startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Pages that build tiny checkpoints on purpose load them without a manifest; the warning would only repeat that.
warnings.filterwarnings("ignore", category=minqwen.weights.UnverifiedCheckpointWarning)
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

# Comparisons against HF must not silently drop to TF32 on a GPU.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
matplotlib.rcParams.update({"figure.dpi": 80, "savefig.dpi": 80, "figure.figsize": (7, 3.5)})
pd.set_option("display.precision", 3)
pd.set_option("display.width", 120)


def tolerance(kind: str = "forward") -> float:
    """Relative tolerance for a check, chosen by the working precision (GUIDE: notebooks, tolerances).

    In bfloat16 one operation rounds to 2^-8 (4e-3), so element-wise checks allow 1e-2. A whole forward pass
    compounds that over every layer: two bfloat16 computations of random:1.5B's 28 layers (a padded batch and a row
    alone) differed by up to 2.4e-2 on an H100 (book/data/gpu-runs.md), so whole-forward checks allow 5e-2, the
    budget chapter 3.6 sets for bfloat16 against float32.
    """
    limits = {
        torch.float32: {"elementwise": 1e-6, "forward": 1e-5},
        torch.bfloat16: {"elementwise": 1e-2, "forward": 5e-2},
    }
    return limits[DTYPE][kind]


@functools.cache
def model_path() -> Path:
    return minqwen.fetch(MODEL_SOURCE)


@functools.cache
def hf_model():
    """The HF reference model, loaded once per kernel; spread over every GPU when one cannot hold it."""
    from transformers import AutoModelForCausalLM

    path = model_path()
    if DEVICE.startswith("cuda") and not fits_one_device(
        path, torch.cuda.get_device_properties(0).total_memory
    ):
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE, device_map="auto").eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE).to(DEVICE).eval()


def fits_one_device(path: Path, device_bytes: int) -> bool:
    """Chapter 0's size advice for the checkpoint at `path` in DTYPE: weights, a 4k KV cache and activations.

    A checkpoint shaped like a released Qwen2.5 size uses that size's estimate; any other (a tiny test model) is
    judged by its weights alone, scaled from the stored dtype to DTYPE.
    """
    from minqwen.model.sizes import DTYPE_BYTES, released_size
    from minqwen.tools.hardware import HEADROOM, memory_estimate

    config = json.loads((path / "config.json").read_text())
    dtype = str(DTYPE).removeprefix("torch.")
    size = released_size(config)
    if size is not None:
        need = memory_estimate(size, dtype)["total"]
    else:
        stored = DTYPE_BYTES[config.get("torch_dtype") or config.get("dtype") or "float32"]
        need = (
            sum(f.stat().st_size for f in path.glob("*.safetensors")) * DTYPE_BYTES[dtype] // stored
        )
    return need <= HEADROOM * device_bytes


@functools.cache
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def show_source(obj) -> None:
    """Display the source of a minqwen function or class: the book shows the package, never a copy of it."""
    source = textwrap.dedent(inspect.getsource(obj))
    module = inspect.getmodule(obj).__name__
    display(Markdown(f"`{module}.{obj.__qualname__}`\n\n```python\n{source}```"))


def show_figure(fig) -> None:
    """Display `fig` as a PNG and close it: the same output under any backend (under Agg, plt.show() shows nothing)."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    display(Image(buffer.getvalue()))


def diff_stats(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """max |Δ|, max |Δ| / max |reference| and mean |Δ| between two tensors, computed in float64."""
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    if ours.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(ours.shape)} vs {tuple(reference.shape)}")
    delta = (ours - reference).abs()
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return {
        "max_abs": delta.max().item(),
        "max_rel": (delta.max() / scale).item(),
        "mean_abs": delta.mean().item(),
    }


def diff_table(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> pd.DataFrame:
    """One row of `diff_stats` per named (ours, reference) pair, formatted for reading."""
    frame = pd.DataFrame({name: diff_stats(a, b) for name, (a, b) in pairs.items()}).T
    return frame.map(lambda x: f"{x:.2e}")


def agree_up_to_a_near_tie(
    model, prompt: torch.Tensor, tokens: list[int], reference: list[int]
) -> bool:
    """Whether two greedy continuations of `prompt` [1, T] are equal, or, in reduced precision, equal up to a step
    where their two choices were within rounding of each other under `model` (minqwen's or HF's).

    Two computations of one step that round differently (a padded batch against a row alone) may pick either side
    of such a near-tie, and only of one; after it they go separate ways. Each may be off by the tolerance, so their
    choices can cross only where the two logits are within twice it. In float32 they must agree exactly.
    """
    step = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), None)
    if step is None:
        return len(tokens) == len(reference)
    if DTYPE == torch.float32:
        return False
    context = torch.cat(
        [prompt, torch.tensor([reference[:step]], dtype=prompt.dtype, device=prompt.device)], dim=1
    )
    with torch.inference_mode():
        output = model(context)
    logits = getattr(output, "logits", output)[
        0, -1
    ].float()  # an HF model returns an output object
    gap = (logits[tokens[step]] - logits[reference[step]]).abs()
    return bool(gap <= 2 * tolerance("forward") * logits.abs().max())


def table(rows, **kwargs) -> pd.DataFrame:
    return pd.DataFrame(rows, **kwargs)


def golden_files() -> list[Path]:
    return sorted(GOLDEN.glob("*.json"))


def load_golden() -> list[dict]:
    """The golden references recorded in chapter 1 by `pipeline()` on the embedded model."""
    return [json.loads(path.read_text()) for path in golden_files()]


def weights_id(path: Path | None = None) -> str:
    """A short identity of a checkpoint's weights: the sha256 of its safetensors in the manifest."""
    path = path or model_path()
    manifest_file = path / minqwen.weights.MANIFEST
    if not manifest_file.is_file():
        return f"unverified:{path.name}"
    manifest = minqwen.weights.read_manifest(path)
    digests = "".join(d for name, d in sorted(manifest.items()) if name.endswith(".safetensors"))
    return hashlib.sha256(digests.encode()).hexdigest()[:16]


def is_book_model() -> bool:
    """Whether the model under study is the book's own, the embedded model that the prose describes and the golden
    files recorded. Checks of its particulars (its GGUF origin, what it answers) run on it alone; checks of minqwen
    against HF run on any model."""
    return {r["weights_id"] for r in load_golden()} == {weights_id()}


def golden_applies() -> bool:
    """The golden files were recorded from the book's model in float32; in another precision a greedy choice may move."""
    return is_book_model() and DTYPE == torch.float32


def stamp() -> str:
    import transformers

    device = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else "cpu"
    return f"device={device} dtype={str(DTYPE).removeprefix('torch.')} torch={torch.__version__} transformers={transformers.__version__}"


def toy_checkpoint(**overrides) -> Path:
    """A toy Qwen2 written to a temporary folder: the 0.5B's widths, two layers, a vocabulary of 8,192 and random
    weights (seed 0), for the pages that run an engine end to end on the CPU in seconds. `overrides` change the
    config (narrower still, for code that runs in Triton's interpreter)."""
    import tempfile

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    settings = dict(
        vocab_size=8192,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=2,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=1e6,
        eos_token_id=2,
        bos_token_id=1,
    )
    config = Qwen2Config(**{**settings, **overrides})
    folder = Path(tempfile.mkdtemp()) / "toy-qwen2-2-layers"
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder
