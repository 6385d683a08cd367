"""Layer probes: record what an HF module saw and returned, replay it on minqwen, and diff layer by layer.

Two tools, for two questions:

- `record` + `replay` answer "does minqwen's version of *this* module compute what HF's did on *these* inputs?".
  `record` runs a model once and, through forward hooks, saves the inputs (positional and keyword tensors, the
  (cos, sin) tuple included) and the output of each named submodule to a safetensors file. `replay` feeds those
  same inputs to the matching minqwen module and diffs the outputs. Since each module gets HF's own inputs,
  an error upstream cannot leak into the comparison.
- `compare_layers` answers "where does a whole forward start to disagree?". It runs HF and minqwen on the same
  tokens and diffs the embedding, every decoder layer's output, the final norm and the logits.

HF and minqwen call their modules differently, so the replay adapts each kind explicitly. HF's decoder layer takes
`(hidden_states, attention_mask=, position_ids=, past_key_values=, use_cache=, position_embeddings=(cos, sin))`,
minqwen's takes `(x, cos, sin, mask, cache)`; HF's attention mask is None (causal), boolean (True = may attend)
or additive (0 = may attend), minqwen's is None or boolean.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minqwen.model.layers import MLP, Attention, DecoderLayer, RMSNorm
from minqwen.model.qwen2 import positions_from_mask

FORMAT = "minqwen.tools.probe/1"


class ProbeError(ValueError):
    """A probe was asked for something it cannot do: an unknown module, a missing file, mismatched shapes."""


@dataclass(frozen=True)
class Recording:
    """One module's call: what went in (positional and keyword) and what came out, as real tensors again."""

    module: str
    kind: str
    args: tuple
    kwargs: dict
    output: object


@dataclass(frozen=True)
class DiffRow:
    """How far one of minqwen's outputs is from HF's: max |Δ|, max |Δ| / max |HF|, mean |Δ| (in float64)."""

    hf: str
    minqwen: str
    shape: tuple
    max_abs: float
    max_rel: float
    mean_abs: float


def diff_row(
    hf_name: str, minqwen_name: str, ours: torch.Tensor, reference: torch.Tensor
) -> DiffRow:
    if ours.shape != reference.shape:
        raise ProbeError(
            f"{minqwen_name} returned shape {tuple(ours.shape)} but HF's {hf_name} returned {tuple(reference.shape)}"
        )
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    delta = (ours - reference).abs()
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return DiffRow(
        hf_name,
        minqwen_name,
        tuple(reference.shape),
        delta.max().item(),
        (delta.max() / scale).item(),
        delta.mean().item(),
    )


def format_table(rows: Sequence[DiffRow]) -> str:
    """The rows as a fixed-width text table, numbers in 3-digit scientific notation."""
    header = ("HF module", "minqwen module", "shape", "max abs", "max rel", "mean abs")
    lines = [
        (
            r.hf,
            r.minqwen,
            "x".join(map(str, r.shape)),
            f"{r.max_abs:.2e}",
            f"{r.max_rel:.2e}",
            f"{r.mean_abs:.2e}",
        )
        for r in rows
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
        for line in [header, *lines]
    )


def first_divergence(rows: Sequence[DiffRow], max_rel: float) -> DiffRow | None:
    """The first row whose relative error exceeds `max_rel`: where a disagreement starts."""
    return next((row for row in rows if row.max_rel > max_rel), None)


def hf_module_to_minqwen(name: str) -> str:
    """An HF module name in minqwen's tree: `model.` goes, as it does for parameter names (model.hf_to_minqwen)."""
    if name in ("", "lm_head") or name.startswith("lm_head."):
        return name
    if name == "model":
        return ""
    if name.startswith("model."):
        return name.removeprefix("model.")
    raise ProbeError(
        f"HF module {name!r} has no counterpart in minqwen: Qwen2 modules are named model.* or lm_head"
    )


def _submodule(root: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_modules()]
        close = difflib.get_close_matches(name, names, n=3)
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else f"; it has {', '.join(names[:6])}, ..."
        )
        raise ProbeError(f"{what} has no module named {name!r}{hint}") from None


# --- recording ---------------------------------------------------------------------------------------------------


def _encode(value, key: str, tensors: dict, layer: int = 0) -> dict:
    """A JSON description of `value`; its tensors go into `tensors` under keys derived from `key`.

    `layer` is the decoder layer the value belongs to, which is what a KV cache is asked about.
    """
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, (tuple, list)):
        return {"sequence": [_encode(v, f"{key}.{i}", tensors, layer) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        return {"mapping": {k: _encode(v, f"{key}.{k}", tensors, layer) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if hasattr(value, "get_seq_length"):
        # A KV cache: what matters for replay is whether it already held positions when the module ran.
        return {
            "object": type(value).__name__,
            "cached_positions": int(value.get_seq_length(layer)),
        }
    return {"object": type(value).__name__}


def _decode(spec: dict, tensors: dict):
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "sequence" in spec:
        return tuple(_decode(s, tensors) for s in spec["sequence"])
    if "mapping" in spec:
        return {k: _decode(s, tensors) for k, s in spec["mapping"].items()}
    if "value" in spec:
        return spec["value"]
    return spec  # an object recorded by type name only


def _layer_index(module: nn.Module) -> int:
    """The decoder layer an attention or decoder-layer module belongs to (HF keeps it on the attention)."""
    attention = getattr(module, "self_attn", module)
    return getattr(attention, "layer_idx", 0)


def record(
    root: nn.Module, modules: str | Sequence[str], path: str | Path, *args, **kwargs
) -> Path:
    """Run `root(*args, **kwargs)` once and save each named submodule's inputs and output to `path`.

    `modules` are names from `root.named_modules()` ("model.layers.0", "model.layers.3.mlp", ...; "" is `root`
    itself). Each must run exactly once during the forward. Returns the path of the safetensors file written.
    """
    names = [modules] if isinstance(modules, str) else list(modules)
    if not names:
        raise ProbeError("record needs at least one module name, e.g. 'model.layers.0'")
    targets = {name: _submodule(root, name, type(root).__name__) for name in names}
    tensors: dict[str, torch.Tensor] = {}
    calls: dict[str, dict] = {
        name: {"kind": type(module).__name__, "calls": 0} for name, module in targets.items()
    }

    def before(name):
        def hook(module, hook_args, hook_kwargs):
            calls[name]["calls"] += 1
            layer = _layer_index(module)
            calls[name]["args"] = _encode(hook_args, f"{name}/args", tensors, layer)
            calls[name]["kwargs"] = _encode(hook_kwargs, f"{name}/kwargs", tensors, layer)

        return hook

    def after(name):
        def hook(module, hook_args, hook_kwargs, output):
            calls[name]["output"] = _encode(output, f"{name}/output", tensors)

        return hook

    handles = []
    try:
        for name, module in targets.items():
            handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(module.register_forward_hook(after(name), with_kwargs=True))
        with torch.no_grad():
            root(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name, call in calls.items():
        if call["calls"] != 1:
            raise ProbeError(
                f"{name or type(root).__name__} ran {call['calls']} times in one forward; record needs exactly one call"
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"probe": json.dumps({"format": FORMAT, "modules": calls})})
    return path


def load_recording(path: str | Path) -> dict[str, Recording]:
    """Every module recorded in `path`, by HF module name."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(
            f"{path} does not exist; write it first with minqwen.tools.probe.record(model, names, path, ...)"
        )
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (
        Exception
    ) as error:  # safetensors raises its own error types for a damaged or foreign file
        raise ProbeError(f"{path} is not a readable safetensors file: {error}") from None
    meta = json.loads(metadata.get("probe", "{}"))
    if meta.get("format") != FORMAT:
        raise ProbeError(
            f"{path} is a safetensors file but not a probe recording; write one with minqwen.tools.probe.record"
        )
    return {
        name: Recording(
            name,
            call["kind"],
            _decode(call["args"], tensors),
            _decode(call["kwargs"], tensors),
            _decode(call["output"], tensors),
        )
        for name, call in meta["modules"].items()
    }


# --- replay: one adapter per kind of module --------------------------------------------------------------------


def _argument(rec: Recording, name: str, position: int = 0) -> torch.Tensor:
    """An input HF may have passed by position or by keyword (the decoder layer gets hidden_states positionally)."""
    if name in rec.kwargs:
        return rec.kwargs[name]
    if len(rec.args) > position:
        return rec.args[position]
    raise ProbeError(f"the recording of {rec.module} holds no {name!r} input")


def _boolean_mask(mask) -> torch.Tensor | None:
    """HF's attention mask as minqwen's: None stays None (causal), booleans stay, additive 0 becomes True."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask == 0


def _queries_that_see_a_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    """[batch, seq]: False for padding queries, whose mask row allows no key at all.

    What such a row computes is irrelevant (its token is padding) and HF's own kernels disagree on it (eager
    averages over every key, SDPA may return zeros), so the replay leaves those rows out of the diff.
    """
    return None if mask is None else mask.any(-1).any(1)


def _no_past(rec: Recording) -> None:
    cache = rec.kwargs.get("past_key_values")
    if isinstance(cache, dict) and cache.get("cached_positions", 0) > 0:
        raise ProbeError(
            f"{rec.module} was recorded with {cache['cached_positions']} cached positions; replay covers a forward "
            f"without past keys: record a prefill (or pass use_cache=False)"
        )


def _check_width(tensor: torch.Tensor, width: int, what: str, target: str) -> None:
    if tensor.shape[-1] != width:
        raise ProbeError(
            f"recorded {what} has last dimension {tensor.shape[-1]}, but minqwen's {target} expects {width}"
        )


def _replay_decoder_layer(target: DecoderLayer, rec: Recording, name: str):
    _no_past(rec)
    x = _argument(rec, "hidden_states")
    cos, sin = rec.kwargs["position_embeddings"]
    _check_width(x, target.input_layernorm.weight.shape[0], "hidden_states", name)
    _check_width(cos, target.self_attn.head_dim, "cos", name)
    mask = _boolean_mask(rec.kwargs.get("attention_mask"))
    return target(x, cos, sin, mask), rec.output, _queries_that_see_a_key(mask)


def _replay_attention(target: Attention, rec: Recording, name: str):
    _no_past(rec)
    x = _argument(rec, "hidden_states")
    cos, sin = rec.kwargs["position_embeddings"]
    _check_width(x, target.q_proj.in_features, "hidden_states", name)
    _check_width(cos, target.head_dim, "cos", name)
    mask = _boolean_mask(rec.kwargs.get("attention_mask"))
    # HF's attention returns (output, attention weights or None); the output is what the layer uses
    return target(x, cos, sin, mask), rec.output[0], _queries_that_see_a_key(mask)


def _replay_single_input(width: Callable[[nn.Module], int]):
    def replay(target: nn.Module, rec: Recording, name: str):
        x = _argument(rec, "x")
        _check_width(x, width(target), "input", name)
        return target(x), rec.output, None

    return replay


def _replay_embedding(target: nn.Embedding, rec: Recording, name: str):
    ids = _argument(rec, "input")
    if ids.numel() and int(ids.max()) >= target.num_embeddings:
        raise ProbeError(
            f"recorded token id {int(ids.max())} is outside minqwen's {name} ({target.num_embeddings} rows)"
        )
    return target(ids), rec.output, None


# HF class name -> (minqwen class, adapter)
_ADAPTERS = {
    "Qwen2DecoderLayer": (DecoderLayer, _replay_decoder_layer),
    "Qwen2Attention": (Attention, _replay_attention),
    "Qwen2MLP": (MLP, _replay_single_input(lambda m: m.gate_proj.in_features)),
    "Qwen2RMSNorm": (RMSNorm, _replay_single_input(lambda m: m.weight.shape[0])),
    "Linear": (nn.Linear, _replay_single_input(lambda m: m.in_features)),
    "Embedding": (nn.Embedding, _replay_embedding),
}


def _to(value, device, dtype):
    """Move recorded tensors next to the target; floating ones take its dtype, ids and masks keep theirs."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    if isinstance(value, dict) and "object" not in value:
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


def replay(path: str | Path, ours: nn.Module, names: dict[str, str] | None = None) -> list[DiffRow]:
    """Feed each recorded module's inputs to the matching minqwen module; one diff row per module.

    `ours` is usually a `minqwen.Qwen2`; HF names map to minqwen names by dropping `model.` unless `names`
    ({hf_name: minqwen_name}) says otherwise, e.g. {"": ""} to replay a recording of a bare HF layer on a bare
    minqwen layer.
    """
    recordings = load_recording(path)
    plan = []
    for hf_name, rec in recordings.items():
        if rec.kind not in _ADAPTERS:
            raise ProbeError(f"{hf_name} is a {rec.kind}; replay supports {', '.join(_ADAPTERS)}")
        our_name = (names or {}).get(hf_name, None)
        our_name = hf_module_to_minqwen(hf_name) if our_name is None else our_name
        target = _submodule(ours, our_name, f"minqwen's {type(ours).__name__}")
        expected, adapter = _ADAPTERS[rec.kind]
        if not isinstance(target, expected):
            raise ProbeError(
                f"HF's {hf_name} is a {rec.kind} but minqwen's {our_name!r} is a {type(target).__name__}, not a {expected.__name__}"
            )
        plan.append((hf_name, our_name, target, adapter, rec))
    rows = []
    for hf_name, our_name, target, adapter, rec in plan:
        parameter = next(target.parameters())
        rec = Recording(
            rec.module,
            rec.kind,
            *(
                _to(v, parameter.device, parameter.dtype)
                for v in (rec.args, rec.kwargs, rec.output)
            ),
        )
        with torch.no_grad():
            ours_out, reference, keep = adapter(target, rec, our_name or type(target).__name__)
        if keep is not None and ours_out.shape == reference.shape:
            ours_out, reference = (
                ours_out[keep.to(ours_out.device)],
                reference[keep.to(reference.device)],
            )
        rows.append(diff_row(hf_name, our_name, ours_out, reference))
    return rows


# --- whole forward, layer by layer -------------------------------------------------------------------------------


def capture_outputs(
    root: nn.Module, modules: Sequence[str], *args, **kwargs
) -> dict[str, torch.Tensor]:
    """Run `root(*args, **kwargs)` and return the output of each named submodule (the first element of a tuple)."""
    targets = {name: _submodule(root, name, type(root).__name__) for name in modules}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, hook_args, output):
            outputs[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in targets.items()]
    try:
        with torch.no_grad():
            root(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def compare_layers(
    hf_model: nn.Module,
    ours: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> list[DiffRow]:
    """Run HF's Qwen2ForCausalLM and minqwen's Qwen2 on the same tokens; diff embedding, each layer, norm, logits.

    With an `attention_mask`, positions count real tokens only (as in generation) and only real tokens are compared:
    what a padding position computes is irrelevant.
    """
    hf_layers = _submodule(hf_model, "model.layers", "the HF model (a Qwen2ForCausalLM)")
    layers = len(_submodule(ours, "layers", "minqwen's model (a Qwen2)"))
    if len(hf_layers) != layers:
        raise ProbeError(
            f"HF's model has {len(hf_layers)} decoder layers and minqwen's {layers}: they are different models"
        )
    if input_ids.dim() != 2:
        raise ProbeError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ProbeError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    pairs = [("model.embed_tokens", "embed_tokens")]
    pairs += [(f"model.layers.{i}", f"layers.{i}") for i in range(layers)]
    pairs += [("model.norm", "norm"), ("lm_head", "lm_head")]
    # Both models get the same positions: HF would otherwise count left padding as positions, shifting RoPE.
    positions = None if attention_mask is None else positions_from_mask(attention_mask)
    hf_out = capture_outputs(
        hf_model,
        [h for h, _ in pairs],
        input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=False,
    )
    our_out = capture_outputs(
        ours,
        [o for _, o in pairs],
        input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
    )
    real = None if attention_mask is None else attention_mask.bool().cpu()
    rows = []
    for hf_name, our_name in pairs:
        reference, mine = hf_out[hf_name].cpu(), our_out[our_name].cpu()
        if real is not None and reference.shape[:2] == real.shape and mine.shape[:2] == real.shape:
            reference, mine = reference[real], mine[real]
        rows.append(diff_row(hf_name, our_name, mine, reference))
    return rows


def rows_as_dicts(rows: Sequence[DiffRow]) -> list[dict]:
    """Rows as plain dicts, for a DataFrame or JSON."""
    return [asdict(row) for row in rows]
