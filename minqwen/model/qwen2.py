"""Qwen2 from scratch: embedding, N decoder layers, final norm, LM head, and a loader with an explicit name map.

No transformers code runs here. `Qwen2.from_pretrained(folder)` reads the safetensors of a Hugging Face checkpoint
and fails on any missing, unexpected, mis-shaped or non-finite tensor.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from minqwen.model.cache import DynamicKVCache
from minqwen.model.config import LoadError, ModelConfig, read_json
from minqwen.model.layers import DecoderLayer, RMSNorm
from minqwen.model.rope import rope_cos_sin, rope_inv_freq
from minqwen.weights import verify_checkpoint


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only, so left padding does not shift a prompt's positions."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)


class Qwen2(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # This process's share of a tensor-parallel model (minqwen.parallel.sharding.shard), or None: whole.
        self.tensor_parallel = None
        self._init_rope()

    def _init_rope(self, device=None):
        inv_freq, self.rope_scale = rope_inv_freq(self.config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round the RoPE frequencies along with the weights; they are recomputed in float32
        super()._apply(fn, recurse)
        self._init_rope(self.embed_tokens.weight.device)
        return self

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep: int = 0
    ):
        """Logits [batch, seq, vocab] (or the last `logits_to_keep` positions).

        `attention_mask` [batch, past + seq] marks real tokens with 1 and padding with 0; positions default to
        counting real tokens. With a `cache`, `input_ids` are the new tokens only and the cache supplies the past.
        """
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, past : past + seq]
            else:
                position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(
                    batch, -1
                )
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, self.rope_scale, x.dtype)
        mask = self.attention_mask(seq, past, attention_mask, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length = past + seq
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)

    def new_cache(self) -> DynamicKVCache:
        """An empty cache for one generation: the generate loop asks the model, which knows its layers."""
        return DynamicKVCache(self.config.num_hidden_layers)

    @staticmethod
    def attention_mask(seq: int, past: int, attention_mask, device) -> torch.Tensor | None:
        """Boolean [batch or 1, 1, seq, past + seq] mask: causal, minus padded keys. None when SDPA's causal fits."""
        if attention_mask is None and (past == 0 or seq == 1):
            return None
        query = torch.arange(past, past + seq, device=device)[:, None]
        key = torch.arange(past + seq, device=device)[None, :]
        allowed = (key <= query)[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, : past + seq].bool()
            # A padding query would see no key at all; letting it see itself keeps softmax finite.
            allowed = allowed | (key == query)
        return allowed

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        quantize: str | None = None,
        group_size: int | None = None,
        tensor_parallel=None,
    ):
        """Qwen2 with the weights of the Hugging Face checkpoint folder `path`.

        `quantize` ("int8" or "int4", with `group_size` for int4) stores the projections in fewer bits, as
        `minqwen.quantize` does, but one layer at a time as its tensors are read: the float weights are never all in
        memory at once. The arguments are checked before anything is read.

        The folder is first checked against its SHA256SUMS manifest (a folder without one loads with a warning).
        Every fault (a bad config, a corrupt or truncated file, a missing, unexpected, mis-shaped or non-finite
        tensor) is a LoadError or ConfigError that names the file. Names and shapes are checked from the files'
        headers before any tensor is read; then each tensor is read, converted, checked and placed in turn.

        `tensor_parallel` (a `minqwen.parallel.collectives.TensorParallel`) loads one rank's share of a model split
        across processes (chapter 8): each split weight is read as the slice this rank holds, never whole.
        """
        if quantize is not None and tensor_parallel is not None:
            raise ValueError(
                "quantize and tensor_parallel do not combine yet: load a float model to split it, or quantize "
                "it on one device"
            )
        if quantize is not None:
            from minqwen.quant import weight_only  # minqwen.quant imports this module

            weight_only.check_scheme(quantize, group_size)
        elif group_size is not None:
            raise ValueError("group_size goes with quantize='int4'; pass both or neither")
        path = Path(path)
        verify_checkpoint(path, trust=True)
        config = ModelConfig.from_file(path)
        if tensor_parallel is not None:
            from minqwen.parallel import sharding  # minqwen.parallel imports the config module

            sharding.check_split(config, tensor_parallel.world_size)
        with torch.device("meta"):
            model = cls(config)
        to_quantize = {}
        if quantize is not None:
            targets = weight_only.layers_to_quantize(model, quantize, group_size)
            to_quantize = {full_name: (parent, name) for full_name, parent, name in targets}
        expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight")
        shapes, origin = {}, {}
        for file in _safetensors_files(path):
            with _open_safetensors(file) as f:
                for hf_name in f.keys():
                    name = hf_to_minqwen(hf_name)
                    if config.tie_word_embeddings and name == "lm_head.weight":
                        continue  # some tied checkpoints store the head anyway; the embedding is the truth
                    shapes[name], origin[name] = tuple(f.get_slice(hf_name).get_shape()), file
        _check_state(shapes, expected, path)
        slices = {}
        if tensor_parallel is not None:
            sharding.shard(model, tensor_parallel)
            slices = {n: sharding.rank_slice(n, shapes[n], tensor_parallel) for n in shapes}
        with torch.no_grad():
            for name, tensor in _read_tensors(origin, device, dtype, slices):
                model.load_state_dict({name: tensor}, strict=False, assign=True)
                layer_name = name.rpartition(".")[0]
                if layer_name in to_quantize:
                    parent, attr = to_quantize[layer_name]
                    layer = getattr(parent, attr)
                    if not any(p.is_meta for p in layer.parameters()):  # weight and bias are in
                        setattr(parent, attr, weight_only.quantized(layer, quantize, group_size))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model._init_rope(device)
        return model.eval()


def hf_to_minqwen(name: str) -> str:
    """HF's `model.` prefix goes; the layer names inside stay as they are, so the map reads off at a glance."""
    if name == "lm_head.weight":
        return name
    if name.startswith("model."):
        return name.removeprefix("model.")
    raise LoadError(
        f"unexpected tensor {name!r}: Qwen2 checkpoints name everything model.* or lm_head.weight"
    )


def minqwen_to_hf(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, LoadError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(n, str) for n in weight_map.values()
        ):
            raise LoadError(
                f"{index} has no weight_map of tensor names to file names; restore the file or fetch the "
                f"checkpoint again"
            )
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise LoadError(
                f"{index} names {', '.join(missing)}, which {path} lacks; copy the missing shards or fetch "
                f"the checkpoint again"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadError(
            f"{path} holds no *.safetensors file; fetch the checkpoint with minqwen.fetch"
        )
    return files


@contextlib.contextmanager
def _open_safetensors(file: Path):
    """safe_open, whose errors (a truncated file, a corrupt header) become a LoadError naming the file."""
    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise LoadError(
            f"{file} is not a readable safetensors file ({error}); it is truncated or corrupt. Delete the "
            f"checkpoint folder and fetch it again"
        ) from None
    with handle as f:
        yield f


def _read_tensors(origin: dict[str, Path], device, dtype, slices: dict):
    """(name, tensor) for every name of `origin` (name -> file), one at a time, converted and checked; a name
    in `slices` is read as that index of the stored tensor only."""
    for file in dict.fromkeys(origin.values()):
        with _open_safetensors(file) as f:
            for name in (n for n, where in origin.items() if where == file):
                index = slices.get(name)
                if index is None:
                    tensor = f.get_tensor(minqwen_to_hf(name))
                else:
                    # A slice comes back as a view into the mapped file: the copy keeps this rank's part alone.
                    tensor = f.get_slice(minqwen_to_hf(name))[index].clone()
                tensor = tensor.to(device=device, dtype=dtype)
                _check_finite(name, tensor, file)
                yield name, tensor


def _check_finite(name: str, tensor: torch.Tensor, file: Path) -> None:
    """Reject a NaN or infinite weight, which would turn every logit it touches into NaN."""
    # One float32 sum finds any NaN or inf at the cost of a read; the exact test runs only if it overflowed.
    if torch.sum(tensor, dtype=torch.float32).isfinite() or tensor.isfinite().all():
        return
    bad = int((~tensor.isfinite()).sum())
    fix = (
        "float16 stops at 65504: load in bfloat16 or float32, or fetch the checkpoint again"
        if tensor.dtype == torch.float16
        else "the checkpoint is corrupt. Fetch it again, or fix the tensor where it was made"
    )
    raise LoadError(
        f"tensor {minqwen_to_hf(name)} in {file} holds {bad:,} NaN or infinite value(s) as "
        f"{str(tensor.dtype).removeprefix('torch.')}; {fix}"
    )


def _check_state(shapes: dict, expected: dict, path: Path) -> None:
    """The files' tensor names and shapes against the config's, before any tensor is read."""
    missing = sorted(set(expected) - set(shapes), key=_natural)
    unexpected = sorted(set(shapes) - set(expected), key=_natural)
    wrong = [
        f"{n}: file {shapes[n]} vs config {expected[n]}"
        for n in sorted(set(shapes) & set(expected), key=_natural)
        if shapes[n] != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:5])}")
    if problems:
        raise LoadError(f"{path} does not match its config.json: " + " | ".join(problems))


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
