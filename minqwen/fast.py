"""minqwen-fast: greedy generation that runs close to the memory-bandwidth limit of a GPU.

The eager loop (`minqwen.generate`) spends most of a decode step launching small kernels from Python and waiting
for the host. This path removes that overhead, in four moves:

- **Fused projections.** q, k and v become one matrix and gate and up another, built from a loaded `Qwen2`
  (model.py is untouched): one weight read and one kernel where there were three or two.
- **A static KV cache, written in place.** Every layer's cache is preallocated for a *bucket* of positions;
  `index_copy_` writes the new key and value at a slot held in a device tensor, and attention reads the whole
  bucket with a mask, so every step has the same shapes.
- **No host sync per token.** The next token, its position, the write slot, the finished flags and the output
  buffer all live on the device and are updated by the step itself; Python only replays the step.
- **One CUDA graph per (batch, bucket).** On a GPU each decoder layer is compiled once with `torch.compile`
  (every layer has the same code and shapes, so one compiled layer serves all of them; compiling the whole step
  instead took ten times longer for 2% more speed), and the whole decode step, every layer and the head, is
  captured as one CUDA graph and replayed for each new token. Prompt lengths
  are bucketed (`bucket` positions at a time), so any prompt in a bucket reuses the graph.

On a CPU the same step runs eagerly (no compiler, no graph), and its greedy tokens equal `minqwen.generate`'s.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .generate import check_inputs
from .layers import rms_norm
from .model import Qwen2
from .rope import apply_rope, rope_cos_sin

# Reading the finished flags back is a host sync, so it happens this often, not every token.
FINISHED_CHECK_EVERY = 16


class LayerWeights(NamedTuple):
    """One decoder layer with its projections fused: [q; k; v] and [gate; up] stacked along the output rows."""

    input_norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    o_weight: torch.Tensor
    post_norm: torch.Tensor
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


class Shape(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int
    eps: float


def fuse_layer(layer) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        input_norm=layer.input_layernorm.weight,
        qkv_weight=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
        qkv_bias=torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
        o_weight=attn.o_proj.weight,
        post_norm=layer.post_attention_layernorm.weight,
        gate_up_weight=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
        down_weight=mlp.down_proj.weight,
    )


# The layer math takes plain tensors, not modules, so a compiled layer sees the same inputs for every layer and
# compiles once. RMSNorm, RoPE and SwiGLU are those of minqwen.layers, operation for operation.


# A single row times a matrix is a matrix-vector product: pure weight reading. Written as multiply-and-sum, the
# compiler turns it into one reduction kernel that also absorbs the pointwise work around it (the norm's scaling,
# SwiGLU, the bias, the residual add), where a library matrix product would be a kernel of its own.
SINGLE_ROW_AS_REDUCTION = True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; under torch.compile, a single row becomes a float32 multiply-and-sum (see above)."""
    if SINGLE_ROW_AS_REDUCTION and torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
        y = (x[..., None, :].float() * weight.float()).sum(-1)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    return F.linear(x, weight, bias)


def _project(x, w: LayerWeights, s: Shape):
    """q, k, v [batch, seq, heads or kv_heads, head_dim] from the normed input, before RoPE."""
    batch, seq, _ = x.shape
    qkv = linear(rms_norm(x, w.input_norm, s.eps), w.qkv_weight, w.qkv_bias)
    q, k, v = qkv.split(
        [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1
    )
    return (
        q.view(batch, seq, s.heads, s.head_dim),
        k.view(batch, seq, s.kv_heads, s.head_dim),
        v.view(batch, seq, s.kv_heads, s.head_dim),
    )


def _finish(x, attended, w: LayerWeights, s: Shape):
    """Output projection and residual, then the SwiGLU MLP and residual."""
    x = x + linear(attended, w.o_weight)
    gate, up = linear(rms_norm(x, w.post_norm, s.eps), w.gate_up_weight).chunk(2, dim=-1)
    return x + linear(F.silu(gate) * up, w.down_weight)


def prefill_layer(x, cos, sin, mask, keys, values, w: LayerWeights, s: Shape):
    """A whole prompt through one layer; its keys and values land in slots [0, seq) of the cache."""
    batch, seq, _ = x.shape
    q, k, v = (t.transpose(1, 2) for t in _project(x, w, s))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys[:, :, :seq] = k
    values[:, :, :seq] = v
    groups = s.heads // s.kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1
    )
    return _finish(x, out.transpose(1, 2).reshape(batch, seq, -1), w, s)


def decode_layer(x, cos, sin, visible, slot, keys, values, w: LayerWeights, s: Shape):
    """One new token per row through one layer, against the whole cache bucket.

    Grouped-query attention without copying the cache per query head: the `groups` query heads that share a kv
    head become that head's rows in two batched matrix products, so each cached key and value is read once.
    (SDPA's fused kernel, given the same rows, runs one block per kv head: it was slower here, most of all on
    long prompts; see book/data/bench/NOTES.md.) Scores and softmax are in float32.
    """
    batch = x.shape[0]
    groups = s.heads // s.kv_heads
    q, k, v = _project(x, w, s)
    q = apply_rope(q.view(batch, s.kv_heads, groups, s.head_dim), cos, sin)
    k = apply_rope(k.transpose(1, 2), cos, sin)
    keys.index_copy_(2, slot, k)
    values.index_copy_(2, slot, v.transpose(1, 2))
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * s.head_dim**-0.5
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(q.dtype)
    return _finish(x, torch.matmul(probs, values).reshape(batch, 1, -1), w, s)


def step_inputs(token, position, slot, key_is_real, embedding, inv_freq, rope_scale: float):
    """The new tokens' embeddings, their RoPE angles and which cache slots each row may attend to."""
    x = F.embedding(token[:, None], embedding)
    cos, sin = rope_cos_sin(inv_freq, position[:, None], rope_scale, x.dtype)
    slots = torch.arange(key_is_real.shape[1], device=token.device)
    visible = key_is_real & (slots <= slot)
    return x, cos, sin, visible[:, None, None, :]


def greedy_token(x, norm_weight, lm_head_weight, eps: float):
    """argmax of the last position's logits, in float32 like the eager loop."""
    logits = linear(rms_norm(x[:, -1], norm_weight, eps), lm_head_weight)
    return logits.float().argmax(dim=-1)


def finish_step(
    x,
    norm_weight,
    lm_head_weight,
    eps: float,
    token,
    position,
    slot,
    finished,
    is_eos,
    pad,
    generated,
    step,
):
    """Choose the next token and move every counter on by one, all on the device."""
    advance(
        greedy_token(x, norm_weight, lm_head_weight, eps),
        token,
        position,
        slot,
        finished,
        is_eos,
        pad,
        generated,
        step,
    )


def advance(new, token, position, slot, finished, is_eos, pad, generated, step) -> None:
    """Record `new` (pad for rows already finished) as the next input and output, and move to the next slot."""
    new = torch.where(finished, pad, new)
    finished |= is_eos[new]
    generated.index_copy_(1, step, new[:, None])
    token.copy_(new)
    position += 1
    slot += 1
    step += 1


class _DecodeState:
    """Everything a decode step reads and writes, preallocated for one (batch, bucket) so a graph can replay it."""

    def __init__(self, fast: FastQwen2, batch: int, capacity: int):
        c, device = fast.config, fast.device
        cache_shape = (batch, c.num_key_value_heads, capacity, c.head_dim)
        self.keys = [
            torch.zeros(cache_shape, dtype=fast.dtype, device=device)
            for _ in range(c.num_hidden_layers)
        ]
        self.values = [
            torch.zeros(cache_shape, dtype=fast.dtype, device=device)
            for _ in range(c.num_hidden_layers)
        ]
        self.token = torch.zeros(
            batch, dtype=torch.long, device=device
        )  # the token this step feeds in
        self.position = torch.zeros(batch, dtype=torch.long, device=device)  # its RoPE position
        self.slot = torch.zeros(
            1, dtype=torch.long, device=device
        )  # the cache slot its key and value go to
        self.key_is_real = torch.ones(
            batch, capacity, dtype=torch.bool, device=device
        )  # False on left padding
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.is_eos = torch.zeros(c.vocab_size, dtype=torch.bool, device=device)
        self.pad = torch.zeros(1, dtype=torch.long, device=device)
        self.generated = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.step = torch.zeros(
            1, dtype=torch.long, device=device
        )  # column of `generated` written next
        self.graph: torch.cuda.CUDAGraph | None = None

    def counters(self) -> tuple[torch.Tensor, ...]:
        """The arguments of `advance` after the new token, in order."""
        return (
            self.token,
            self.position,
            self.slot,
            self.finished,
            self.is_eos,
            self.pad,
            self.generated,
            self.step,
        )


class FastQwen2:
    """Greedy generation for a loaded `Qwen2`, with fused weights, a bucketed static cache and CUDA graphs.

    `bucket` is the granularity of the cache: prompt + new tokens is rounded up to a multiple of it, and each
    (batch, bucket) pair is compiled and captured once. `use_graphs` defaults to True on CUDA and must be False
    elsewhere. The fused weights are new tensors; the norms, o_proj, down_proj, embedding and head are shared with
    `model`, so dropping the model afterwards frees its separate q/k/v/gate/up weights.
    """

    def __init__(self, model: Qwen2, *, bucket: int = 256, use_graphs: bool | None = None):
        if not isinstance(model, Qwen2):
            raise ValueError(
                f"FastQwen2 wraps a minqwen Qwen2, got {type(model).__name__}; load one with Qwen2.from_pretrained"
            )
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
            raise ValueError(
                f"bucket must be a positive int (cache positions per bucket), got {bucket!r}"
            )
        self.config = c = model.config
        self.embedding = model.embed_tokens.weight
        self.device, self.dtype = self.embedding.device, self.embedding.dtype
        if use_graphs is None:
            use_graphs = self.device.type == "cuda"
        if use_graphs and self.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need the model on a CUDA device, it is on {self.device}; pass use_graphs=False"
            )
        self.use_graphs, self.bucket = use_graphs, bucket
        with torch.no_grad():
            self.layers = [fuse_layer(layer) for layer in model.layers]
        self.shape = Shape(c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps)
        self.norm_weight, self.lm_head_weight = model.norm.weight, model.lm_head.weight
        self.inv_freq, self.rope_scale = model.inv_freq, model.rope_scale
        self.max_positions = c.max_position_embeddings
        if use_graphs:
            # Coordinate-descent tuning searches each generated kernel's block sizes: it lifted 7B decoding by 12%
            # for about ten seconds more compilation (book/data/bench/NOTES.md).
            options = {"coordinate_descent_tuning": True}
            self._step_inputs = torch.compile(step_inputs, fullgraph=True, options=options)
            self._decode_layer = torch.compile(decode_layer, fullgraph=True, options=options)
            self._finish_step = torch.compile(finish_step, fullgraph=True, options=options)
        else:
            self._step_inputs, self._decode_layer, self._finish_step = (
                step_inputs,
                decode_layer,
                finish_step,
            )
        self._state: _DecodeState | None = None

    def capacity_for(self, total: int) -> int:
        """Cache positions for `total` = prompt + new tokens: the next multiple of `bucket`, within the model's limit."""
        return min(-(-total // self.bucket) * self.bucket, self.max_positions)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> torch.LongTensor:
        """Greedy tokens, [batch, prompt + new]: the same contract as `minqwen.generate(model, ..., do_sample=False)`.

        `eos_token_id=None` reads the model's end tokens and `[]` never stops early; finished rows are padded with
        the first end token. Whether every row has finished is read back every `FINISHED_CHECK_EVERY` steps only.
        """
        attention_mask = check_inputs(self, input_ids, attention_mask, max_new_tokens)
        eos_ids = self._stop_ids(eos_token_id)
        if max_new_tokens == 0:
            return input_ids
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        batch, prompt = input_ids.shape
        state = self._state_for(batch, self.capacity_for(prompt + max_new_tokens))
        self._prefill(state, input_ids, attention_mask, eos_ids)
        steps = 1
        while steps < max_new_tokens:
            self._run_step(state)
            steps += 1
            if eos_ids and steps % FINISHED_CHECK_EVERY == 0 and bool(state.finished.all()):
                break
        new_tokens = state.generated[:, :steps]
        if eos_ids:
            # The eager loop stops right after the step at which the last row finished; so does this result.
            finished_at = _all_finished_at(new_tokens, eos_ids)
            if finished_at is not None:
                new_tokens = new_tokens[:, : finished_at + 1]
        return torch.cat([input_ids, new_tokens], dim=1)

    def _stop_ids(self, eos_token_id: int | list[int] | None) -> list[int]:
        """The end tokens, resolved as `minqwen.generate` resolves them for a Qwen2: None means the config's."""
        if eos_token_id is None:
            return list(self.config.eos_token_ids)
        if isinstance(eos_token_id, int):
            return [eos_token_id]
        return [int(i) for i in eos_token_id]

    def _state_for(self, batch: int, capacity: int) -> _DecodeState:
        state = self._state
        if state is not None and state.generated.shape == (batch, capacity):
            return state
        self._state = None  # free the previous bucket's cache and graph before allocating the next
        state = _DecodeState(self, batch, capacity)
        if self.use_graphs:
            state.graph = self._capture(state)
        self._state = state
        return state

    def _capture(self, state: _DecodeState) -> torch.cuda.CUDAGraph:
        # Warm-up runs compile the functions and let their kernels pick configurations outside the capture; they
        # write garbage into the cache, which the next prefill overwrites.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(state)
                state.step.zero_()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(state)
        return graph

    def _run_step(self, state: _DecodeState) -> None:
        if state.graph is not None:
            state.graph.replay()
        else:
            self._step(state)

    def _step(self, state: _DecodeState) -> None:
        x, cos, sin, visible = self._step_inputs(
            state.token,
            state.position,
            state.slot,
            state.key_is_real,
            self.embedding,
            self.inv_freq,
            self.rope_scale,
        )
        for w, keys, values in zip(self.layers, state.keys, state.values):
            x = self._decode_layer(x, cos, sin, visible, state.slot, keys, values, w, self.shape)
        self._finish_step(
            x, self.norm_weight, self.lm_head_weight, self.shape.eps, *state.counters()
        )

    def _prefill(self, state: _DecodeState, input_ids, attention_mask, eos_ids: list[int]) -> None:
        batch, prompt = input_ids.shape
        padded = not bool(attention_mask.all())
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        x = F.embedding(input_ids, self.embedding)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_scale, x.dtype)
        mask = Qwen2.attention_mask(prompt, 0, attention_mask if padded else None, x.device)
        for w, keys, values in zip(self.layers, state.keys, state.values):
            x = prefill_layer(x, cos, sin, mask, keys, values, w, self.shape)
        state.key_is_real.fill_(True)
        state.key_is_real[:, :prompt] = attention_mask.bool()
        # Point at the prompt's last token; `advance` then moves on to the first new token, as after any step.
        state.position.copy_(positions[:, -1])
        state.slot.fill_(prompt - 1)
        state.step.zero_()
        state.finished.zero_()
        state.is_eos.zero_()
        if eos_ids:
            state.is_eos[eos_ids] = True
            state.pad.fill_(eos_ids[0])
        advance(
            greedy_token(x, self.norm_weight, self.lm_head_weight, self.shape.eps),
            *state.counters(),
        )


def _all_finished_at(new_tokens: torch.Tensor, eos_ids: list[int]) -> int | None:
    """The step at which the last row emitted its first end token, or None if some row never did."""
    hits = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))
    if not bool(hits.any(dim=1).all()):
        return None
    return int(hits.float().argmax(dim=1).max())


@torch.inference_mode()
def greedy_agreement(
    model: Qwen2, fast: FastQwen2, input_ids, max_new_tokens: int, *, attention_mask=None
) -> list[dict]:
    """Compare the fast path's greedy tokens with the eager loop's, row by row.

    For each row: `same`, the number of leading new tokens that agree; and where they part, how far apart the two
    choices were in the eager model's own logits (`gap`, its chosen token's logit minus the fast path's token's),
    also in units of the logits' rounding step (`gap_ulps`, the spacing of the working dtype at that magnitude).
    A gap of a few rounding steps means the two paths only rounded differently.
    """
    from .generate import generate

    eager = generate(
        model, input_ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=[]
    )
    ours = fast.generate(input_ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=[])
    prompt = input_ids.shape[1]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows = []
    for row in range(input_ids.shape[0]):
        differs = (eager[row, prompt:] != ours[row, prompt:]).nonzero()
        same = int(differs[0]) if len(differs) else max_new_tokens
        result = {
            "row": row,
            "same": same,
            "eager": eager[row, prompt:].tolist(),
            "fast": ours[row, prompt:].tolist(),
        }
        if same < max_new_tokens:
            real = mask[row].bool()
            prefix = torch.cat([input_ids[row][real], eager[row, prompt : prompt + same]])[None]
            logits = model(prefix, logits_to_keep=1)[0, -1]
            top, theirs = logits[eager[row, prompt + same]], logits[ours[row, prompt + same]]
            spacing = torch.finfo(logits.dtype).eps * 2.0 ** torch.floor(
                torch.log2(top.abs().float())
            )
            result.update(gap=float(top - theirs), gap_ulps=float((top - theirs).float() / spacing))
        rows.append(result)
    return rows
