"""minqwen-fast: generation that runs close to the memory-bandwidth limit of a GPU.

The eager loop (`minqwen.generate`) spends most of a decode step launching small kernels from Python and waiting
for the host. This engine removes that overhead, in four moves:

- **Fused projections.** q, k and v become one matrix and gate and up another, built from a loaded `Qwen2`
  (model.py is untouched): one weight read and one kernel where there were three or two.
- **A static KV cache, written in place.** Every layer's cache is preallocated for a *bucket* of positions;
  `index_copy_` writes the new key and value at a slot held in a device tensor, and attention reads the whole
  bucket with a mask, so every step has the same shapes.
- **No host sync per token.** The next token, its position, the write slot, the tokens seen so far (for the
  repetition penalty), the finished flags and the output buffer all live on the device and are updated by the
  step itself, sampling included; Python only replays the step.
- **One CUDA graph per (batch, bucket) and sampling setting.** On a GPU each decoder layer is compiled once
  with `torch.compile` (every layer has the same code and shapes, so one compiled layer serves all of them;
  compiling the whole step instead took ten times longer for 2% more speed), and the whole decode step, every
  layer, the head and the sampler, is captured as one CUDA graph and replayed for each new token. Prompt lengths
  are bucketed (`bucket` positions at a time), so any prompt in a bucket reuses the graph.

At batch 1 on CUDA the decoder layer is not compiled but run as six hand-written kernels
(`minqwen.engine.decode_kernels`, chapter 5), which fold the norms, RoPE, the cache writes, SwiGLU and the
residual adds into the matrix-vector products; they are captured in the same graph.

The prompt is prefilled `prefill_chunk` tokens at a time (chapter 5), so a long prompt needs one chunk's
activations. On a GPU the work around each chunk's attention is compiled, and a prompt that fits in one chunk is
prefilled by one CUDA graph per padded length.

It takes the arguments of `minqwen.generate`, resolved by the same `minqwen.engine.request.prepare`, so defaults, end
tokens, padding and input checks are those of the eager loop. On a CPU the step runs eagerly (no compiler, no
graph) with the eager loop's own processors and `torch.multinomial`: its tokens equal `minqwen.generate`'s for
the same seed. On CUDA the sampler is `minqwen.engine.sampling.sample_without_sync`: the same distribution, other draws.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from minqwen.engine import decode_attention, decode_kernels
from minqwen.engine.request import (
    GenerationRequest,
    NumericalError,
    check_shared_draws,
    prepare,
)
from minqwen.engine.sampling import (
    SamplingConfig,
    process_logits,
    sample_without_sync,
    seen_tokens,
    select_next_token,
)
from minqwen.model.cache import check_crop
from minqwen.model.layers import rms_norm
from minqwen.model.qwen2 import Qwen2
from minqwen.model.rope import apply_rope, rope_cos_sin
from minqwen.parallel.collectives import TensorParallel, all_reduce, embed, gather_last_dim
from minqwen.quant.weight_only import fused_weight, is_quantized, weight_of

# Reading the finished flags back is a host sync, so it happens this often, not every token.
FINISHED_CHECK_EVERY = 16
# Decode states (a KV cache each) kept for reuse; the least recently used goes first.
MAX_STATES = 4
# The shortest padded length of a captured prefill. From four of these on, a prompt is padded to a multiple of a
# quarter of the power of two at or below it: under 25% more work, and four lengths per octave to capture.
PREFILL_GRANULE = 32


def prefill_length(prompt: int, capacity: int) -> int:
    """The padded length of the captured prefill for `prompt` tokens in a cache of `capacity`.

    A graph pads the prompt, and the padding is computed like real tokens: at a large
    batch, where prefill is bound by arithmetic, rounding a 128-token prompt up to a whole
    256-position bucket halved the 7B's prefill rate (book/data/bench/NOTES.md)."""
    granule = max(PREFILL_GRANULE, 1 << max(prompt.bit_length() - 3, 0))
    return min(-(-prompt // granule) * granule, capacity)


class LayerWeights(NamedTuple):
    """One decoder layer with its projections fused: [q; k; v] and [gate; up] stacked along the output rows.

    The projection weights are tensors, or, for a quantized model, the weight tuples of minqwen.quant."""

    input_norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    o_weight: torch.Tensor
    post_norm: torch.Tensor
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


class Shape(NamedTuple):
    heads: int  # of this rank, under tensor parallelism
    kv_heads: int
    head_dim: int
    eps: float
    split_attention: bool = False  # decode attention by minqwen.engine.decode_attention's kernel
    tp: TensorParallel | None = None  # this rank's place in a tensor-parallel model (chapter 8)


def fuse_layer(layer) -> LayerWeights:
    """The layer's weights, q/k/v and gate/up joined. A quantized model's projections stay quantized
    (minqwen.quant): their weights are tuples of tensors with a `matmul`, joined the same way."""
    attn, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        input_norm=layer.input_layernorm.weight,
        qkv_weight=fused_weight([attn.q_proj, attn.k_proj, attn.v_proj]),
        qkv_bias=torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
        o_weight=weight_of(attn.o_proj),
        post_norm=layer.post_attention_layernorm.weight,
        gate_up_weight=fused_weight([mlp.gate_proj, mlp.up_proj]),
        down_weight=weight_of(mlp.down_proj),
    )


# The layer math takes plain tensors, not modules, so a compiled layer sees the same inputs for every layer and
# compiles once. RMSNorm, RoPE and SwiGLU are those of minqwen.model.layers, operation for operation.


# A single row times a matrix is a matrix-vector product: pure weight reading. Written as multiply-and-sum, the
# compiler turns it into one reduction kernel that also absorbs the pointwise work around it (the norm's scaling,
# SwiGLU, the bias, the residual add), where a library matrix product would be a kernel of its own.
SINGLE_ROW_AS_REDUCTION = True


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; under torch.compile, a single row becomes a float32 multiply-and-sum (see above). A
    quantized weight (minqwen.quant) brings its own product."""
    if not isinstance(weight, torch.Tensor):
        y = weight.matmul(x)
        return y if bias is None else y + bias
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
    """Output projection and residual, then the SwiGLU MLP and residual. Under tensor parallelism each
    projection's product is this rank's partial sum, and the all-reduce completes it."""
    x = x + all_reduce(linear(attended, w.o_weight), s.tp)
    gate, up = linear(rms_norm(x, w.post_norm, s.eps), w.gate_up_weight).chunk(2, dim=-1)
    return x + all_reduce(linear(F.silu(gate) * up, w.down_weight), s.tp)


def prefill_qkv(x, cos, sin, w: LayerWeights, s: Shape):
    """q [batch, heads, seq, head_dim], k and v [batch, kv_heads, seq, head_dim] of a chunk of the prompt, RoPE
    applied: everything in a prefill layer before attention, which the compiler fuses around the matrix product."""
    q, k, v = (t.transpose(1, 2) for t in _project(x, w, s))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def prefill_attention(q, keys, values, mask):
    """A chunk's queries [batch, heads, seq, head_dim] over every key up to its end [batch,
    kv_heads, end, head_dim], causally. Each kv head serves its group of query heads inside the
    kernel (`enable_gqa`; the eager model's `attend` copies keys and values per query head). A
    `mask` (left padding) is applied as it is.

    A later chunk's causal triangle sits at the bottom right of its [seq, end] scores, which
    PyTorch sends to FlashAttention-2, at half the rate of the kernel it picks for a square
    triangle on an H200 (book/data/bench/NOTES.md). So it is two attentions, merged exactly: the
    chunk's own keys, a square triangle; and the earlier keys, which every query sees whole, so
    the query heads of a group become rows of one head and need no mask.
    """
    if mask is not None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    batch, heads, seq, head_dim = q.shape
    if seq == keys.shape[2]:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
    if q.device.type == "cuda" and not cudnn_attention(q.device, q.dtype):
        bottom_right = causal_lower_right(seq, keys.shape[2])
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=bottom_right, enable_gqa=True
        )
    kv_heads = keys.shape[1]
    own = attention_with_lse(q, keys[:, :, -seq:], values[:, :, -seq:], causal=True)
    rows = q.reshape(batch, kv_heads, heads // kv_heads * seq, head_dim)
    out, lse = attention_with_lse(rows, keys[:, :, :-seq], values[:, :, :-seq], causal=False)
    past = out.reshape(batch, heads, seq, head_dim), lse.reshape(batch, heads, seq)
    return merge_attention([own, past])


def attention_with_lse(q, keys, values, causal: bool):
    """Attention [batch, heads, seq, head_dim] and each query row's log-sum-exp of its scores
    [batch, heads, seq], which two attentions over disjoint keys need to merge. cuDNN's fused
    kernel on CUDA, PyTorch's on the CPU; both share a kv head among its query heads."""
    scale = q.shape[-1] ** -0.5
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, keys, values, None, True, 0.0, causal, False, scale=scale
        )[:2]
        return out, lse.view(lse.shape[:3])
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, keys, values, 0.0, causal, scale=scale
    )


def merge_attention(parts):
    """Attention over all the parts' keys from each part's (output, log-sum-exp): part p's output
    weighs e^(lse_p) / sum_r e^(lse_r), a softmax over the parts' log-sum-exps (the merge of
    chapter 5's split attention)."""
    weights = torch.stack([lse for _, lse in parts]).softmax(dim=0)
    merged = sum(w[..., None] * out.float() for w, (out, _) in zip(weights, parts))
    return merged.to(parts[0][0].dtype)


@functools.cache
def cudnn_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether cuDNN's attention kernel runs here: 16-bit inputs on a CUDA card from the A100 on,
    with cuDNN. Called directly, its op does not refuse float32, which cuDNN's attention lacks."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    ampere_or_later = torch.cuda.get_device_capability(device) >= (8, 0)
    return torch.backends.cudnn.is_available() and ampere_or_later


def decode_layer(x, cos, sin, visible, slot, keys, values, w: LayerWeights, s: Shape):
    """One new token per row through one layer, against the whole cache bucket.

    Grouped-query attention without copying the cache per query head: the `groups` query heads that share a kv
    head become that head's rows in two batched matrix products, so each cached key and value is read once.
    (SDPA's fused kernel, given the same rows, runs one block per kv head: it was slower here, most of all on
    long prompts; see book/data/bench/NOTES.md.) Scores and softmax are in float32. With `s.split_attention` the
    same attention is one Triton kernel that spreads the cache over the whole GPU (chapter 5).
    """
    batch = x.shape[0]
    groups = s.heads // s.kv_heads
    q, k, v = _project(x, w, s)
    q = apply_rope(q.view(batch, s.kv_heads, groups, s.head_dim), cos, sin)
    k = apply_rope(k.transpose(1, 2), cos, sin)
    keys.index_copy_(2, slot, k)
    values.index_copy_(2, slot, v.transpose(1, 2))
    if s.split_attention:
        attended = decode_attention.split_attention(
            q, keys, values, visible[:, 0, 0], s.head_dim**-0.5
        )
    else:
        attended = matmul_attention(q, keys, values, visible, s.head_dim**-0.5)
    return _finish(x, attended.reshape(batch, 1, -1), w, s)


def span_layer(x, cos, sin, visible, slots, keys, values, w: LayerWeights, s: Shape):
    """`decode_layer` for a few new tokens per row at once (speculative decoding's verifying pass): their keys
    and values go to cache `slots` [n], and token i sees the slots `visible` [batch, 1, n, capacity] allows it.
    The query heads of a group and the n tokens become rows of their kv head, as in decode."""
    batch, n, _ = x.shape
    groups = s.heads // s.kv_heads
    q, k, v = (t.transpose(1, 2) for t in _project(x, w, s))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys.index_copy_(2, slots, k)
    values.index_copy_(2, slots, v)
    rows = q.reshape(batch, s.kv_heads, groups * n, s.head_dim)
    row_visible = visible.expand(batch, groups, n, -1).reshape(batch, 1, groups * n, -1)
    attended = matmul_attention(rows, keys, values, row_visible, s.head_dim**-0.5)
    attended = attended.reshape(batch, s.heads, n, s.head_dim).transpose(1, 2)
    return _finish(x, attended.reshape(batch, n, -1), w, s)


def span_inputs(tokens, start, key_is_real, embedding, inv_freq, rope_scale: float, tp=None):
    """Embeddings, RoPE angles, cache slots and visibility of tokens [batch, n] placed from slot `start` [1] on
    (no left padding: a token's position is its slot)."""
    n = tokens.shape[1]
    slots = start + torch.arange(n, device=tokens.device)
    x = embed(tokens, embedding, tp)
    cos, sin = rope_cos_sin(inv_freq, slots[None].expand(tokens.shape[0], -1), rope_scale, x.dtype)
    cache_slots = torch.arange(key_is_real.shape[1], device=tokens.device)
    visible = key_is_real[:, None, :] & (cache_slots[None, None, :] <= slots[None, :, None])
    return x, cos, sin, visible[:, None], slots


def matmul_attention(q, keys, values, visible, scale: float):
    """q [batch, kv_heads, groups, head_dim] over the cache at the `visible` [batch, 1, 1, capacity] positions, as
    two batched matrix products with the softmax between them in float32.

    The mask arrives broadcastable, made by `step_inputs`: built inside the compiled layer instead, it led the
    compiler to a softmax twice as slow at a 16k-token context (book/data/profile/).
    """
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, values)


def step_inputs(
    token, position, slot, key_is_real, embedding, inv_freq, rope_scale: float, tp=None
):
    """The new tokens' embeddings, their RoPE angles and which cache slots each row may attend to."""
    x = embed(token[:, None], embedding, tp)
    cos, sin = rope_cos_sin(inv_freq, position[:, None], rope_scale, x.dtype)
    slots = torch.arange(key_is_real.shape[1], device=token.device)
    visible = key_is_real & (slots <= slot)
    return x, cos, sin, visible[:, None, None, :]


def span_logits(x, norm_weight, lm_head_weight, s: Shape):
    """float32 logits of every position of the one row of x [1, n, hidden]."""
    return gather_last_dim(linear(rms_norm(x[0], norm_weight, s.eps), lm_head_weight), s.tp).float()


def head_logits(x, norm_weight, lm_head_weight, s: Shape):
    """float32 logits of the last position, like the eager loop's; under tensor parallelism each rank's
    slice of the vocabulary, gathered."""
    return gather_last_dim(
        linear(rms_norm(x[:, -1], norm_weight, s.eps), lm_head_weight), s.tp
    ).float()


def advance(
    new,
    logits,
    token,
    position,
    slot,
    finished,
    is_eos,
    pad,
    seen,
    generated,
    step,
    first_nonfinite,
) -> None:
    """Record `new` (pad for rows already finished) as the next input and output, and move to the next slot.

    The arguments after `logits` are a decode state's tensors, in the order of `_DecodeState.counters()`.
    """
    finite = torch.isfinite(logits).all()
    first_nonfinite.copy_(torch.where((first_nonfinite < 0) & ~finite, step, first_nonfinite))
    new = torch.where(finished, pad, new)
    finished |= is_eos[new]
    generated.index_copy_(1, step, new[:, None])
    seen.scatter_(1, new[:, None], True)
    token.copy_(new)
    position += 1
    slot += 1
    step += 1


class _DecodeState:
    """Everything a decode step reads and writes, preallocated for one (batch, capacity) so a graph can replay it."""

    def __init__(self, fast: FastQwen2, batch: int, capacity: int):
        c, device = fast.config, fast.device

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        cache_shape = (batch, fast.shape.kv_heads, capacity, c.head_dim)
        self.keys = [zeros(*cache_shape, dtype=fast.dtype) for _ in range(c.num_hidden_layers)]
        self.values = [zeros(*cache_shape, dtype=fast.dtype) for _ in range(c.num_hidden_layers)]
        self.token = zeros(batch)  # the token this step feeds in
        self.position = zeros(batch)  # its RoPE position
        self.slot = zeros(1)  # the cache slot its key and value go to
        self.key_is_real = zeros(batch, capacity, dtype=torch.bool)  # False on left padding
        self.finished = zeros(batch, dtype=torch.bool)
        self.is_eos = zeros(c.vocab_size, dtype=torch.bool)
        self.pad = zeros(1)
        self.seen = zeros(batch, c.vocab_size, dtype=torch.bool)  # for the repetition penalty
        self.generated = zeros(batch, capacity)
        self.step = zeros(1)  # column of `generated` written next
        self.first_nonfinite = zeros(1) - 1  # the first step whose logits held NaN or infinity
        self.graphs: dict[SamplingConfig, torch.cuda.CUDAGraph] = {}
        # Captured prefills, by (padded prompt length, left padding).
        self.prefills: dict[tuple[int, bool], _PrefillGraph] = {}
        # Captured spans of a few tokens (speculative decoding), by width.
        self.spans: dict[int, _SpanGraph] = {}

    def counters(self) -> tuple[torch.Tensor, ...]:
        """The arguments of `advance` after the logits, in order."""
        return (
            self.token,
            self.position,
            self.slot,
            self.finished,
            self.is_eos,
            self.pad,
            self.seen,
            self.generated,
            self.step,
            self.first_nonfinite,
        )


def capture(run, reset=lambda: None) -> tuple[torch.cuda.CUDAGraph, object]:
    """`run()` captured as a CUDA graph, and what it returned during the capture (the tensors each replay
    rewrites). Two warm-up runs on a side stream first compile the functions and let their kernels pick
    configurations outside the capture; `reset()` runs before each warm-up and before the capture, outside
    the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            reset()
            run()
    torch.cuda.current_stream().wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run()
    return graph, output


class _PrefillGraph:
    """The prefill of one prompt length, every layer and the head, captured as one CUDA graph.

    A prompt is copied into static buffers `length` tokens wide, right-padded: causal attention hides the padding
    from every real token, its keys and values land in cache slots the decode steps overwrite before they can
    see them, and the logits are read at the last real token. Launching ten kernels a layer from Python costs more
    than a small model's whole prefill on the GPU; one replay costs one launch (book/data/profile/).
    """

    def __init__(self, fast: FastQwen2, state: _DecodeState, length: int, left_padded: bool):
        batch, device = state.token.shape[0], fast.device
        self.ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.attention_mask = torch.ones_like(self.ids) if left_padded else None
        self.last = torch.zeros(1, dtype=torch.long, device=device)

        def forward():
            x = fast._prefill_span(state, self.ids, self.positions, self.attention_mask, 0)
            last = x.index_select(1, self.last)
            return head_logits(last, fast.norm_weight, fast.lm_head_weight, fast.shape)

        self.graph, self.logits = capture(forward)

    def run(self, input_ids, positions, attention_mask) -> torch.Tensor:
        """float32 logits [batch, vocab] at the prompt's last token; the cache holds the prompt."""
        prompt = input_ids.shape[1]
        self.ids.zero_()
        self.ids[:, :prompt] = input_ids
        self.positions.zero_()
        self.positions[:, :prompt] = positions
        if self.attention_mask is not None:
            self.attention_mask.fill_(1)
            self.attention_mask[:, :prompt] = attention_mask
        self.last.fill_(prompt - 1)
        self.graph.replay()
        return self.logits


class _SpanGraph:
    """A span of `width` tokens at a slot held in a device tensor, every layer and the head, captured as one CUDA
    graph: speculative decoding's verifying pass, or a draft's step. A shorter span is padded to the width; the
    padding's keys and values land past the span, where nothing sees them before they are overwritten."""

    def __init__(self, fast: FastQwen2, state: _DecodeState, width: int):
        self.tokens = torch.zeros(1, width, dtype=torch.long, device=fast.device)
        self.start = torch.zeros(1, dtype=torch.long, device=fast.device)
        capacity = state.keys[0].shape[2]
        # Warm-up and capture write where no prompt is yet: the last slots of the cache.
        self.graph, self.logits = capture(
            lambda: fast._span_forward(state, self.tokens, self.start),
            reset=lambda: self.start.fill_(capacity - width),
        )

    def run(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        self.tokens.zero_()
        self.tokens[:, : tokens.shape[1]] = tokens
        self.start.fill_(start)
        self.graph.replay()
        return self.logits[: tokens.shape[1]]


class CachedSpans:
    """One prompt's KV cache in a fast engine, fed a few tokens at a time, with the interface speculative decoding
    drives (`length`, `extend`, `rollback`; see `minqwen.engine.speculative.CachedModel`). The prompt is
    prefilled in chunks; later spans run as one CUDA graph per width in `widths` (the smallest that fits), kept
    with the engine. Batch 1, no padding."""

    def __init__(self, fast: FastQwen2, capacity: int, widths: tuple[int, ...]):
        self.fast, self.widths = fast, sorted(widths)
        self.state = fast._span_state(capacity)
        self.state.key_is_real.fill_(True)
        if fast.use_graphs:
            for width in self.widths:
                if width not in self.state.spans:
                    self.state.spans[width] = _SpanGraph(fast, self.state, width)
        self.length = 0

    @torch.inference_mode()
    def extend(self, ids: list[int], *, last_only: bool = False) -> torch.Tensor:
        """float32 logits [len(ids), vocab], row i predicting the token after ids[i] (the last row alone with
        `last_only`, which the prompt needs)."""
        fast, n = self.fast, len(ids)
        capacity = self.state.keys[0].shape[2]
        if self.length + n > capacity or (self.length and n > self.widths[-1]):
            raise ValueError(
                f"a span of {n} tokens after {self.length} does not fit this cache ({capacity} positions, spans "
                f"of up to {self.widths[-1]})"
            )
        tokens = torch.tensor([ids], dtype=torch.long, device=fast.device)
        if self.length == 0:
            if not last_only:
                raise ValueError("the prompt's prefill gives the logits of its last token only")
            positions = torch.arange(n, device=fast.device)[None]
            logits = fast._prefill_chunks(self.state, tokens, positions, None, False)
        elif fast.use_graphs and (width := self._graph_width(n, capacity)):
            logits = self.state.spans[width].run(tokens, self.length)
        else:
            start = torch.tensor([self.length], device=fast.device)
            logits = fast._span_forward(self.state, tokens, start)
        self.length += n
        return logits[-1:] if last_only else logits

    def _graph_width(self, n: int, capacity: int) -> int | None:
        """The narrowest captured span that holds n tokens and, padding included, fits the cache (at its very
        end none may: that span runs without a graph)."""
        fits = (w for w in self.widths if n <= w and self.length + w <= capacity)
        return next(fits, None)

    def rollback(self, length: int) -> None:
        """Forget every position from `length` on: the next span overwrites them."""
        check_crop(length, self.length)
        self.length = length


class FastQwen2:
    """Generation for a loaded `Qwen2`, with fused weights, a bucketed static cache and CUDA graphs.

    `generate` and `generate_tokens` take the arguments of `minqwen.generate` and `minqwen.generate_tokens`, with
    the same defaults. `bucket` is the granularity of the cache: prompt + new tokens is rounded up to a multiple
    of it. Each (batch, bucket) gets a decode state (its cache) and, per sampling setting, one captured graph;
    the `MAX_STATES` most recently used states are kept. `use_graphs` defaults to True on CUDA and must be False
    elsewhere. `split_attention` runs decode attention as the split kernel of `minqwen.engine.decode_attention`
    instead of two matrix products and a softmax; by default it does so where the kernel runs (CUDA with Triton,
    power-of-two heads), because on an H200 it was faster at every context chapter 5 measured. `fused_kernels`
    runs a single row's decode layer as the six kernels of `minqwen.engine.decode_kernels`, split attention
    among them; by default it does so where they run (CUDA with Triton, power-of-two heads, a model neither
    quantized nor split over GPUs) unless split attention is turned off. The prompt is
    prefilled `prefill_chunk` tokens at a time, so a long prompt needs the activations of one chunk, not of all
    of it; on CUDA the work around each chunk's attention is compiled, and a prompt of one chunk runs as a CUDA
    graph per padded length, kept with the decode state (each graph holds about one chunk's activations: a few
    hundred MB at 7B). The fused weights
    are new tensors; the norms, o_proj, down_proj, embedding and head are shared with `model`, so dropping the
    model afterwards frees its separate q/k/v/gate/up weights. A model quantized by `minqwen.quantize` runs
    with its quantized weights (chapter 6).
    """

    def __init__(
        self,
        model: Qwen2,
        *,
        bucket: int = 256,
        use_graphs: bool | None = None,
        split_attention: bool | None = None,
        fused_kernels: bool | None = None,
        prefill_chunk: int = 2048,
    ):
        if not isinstance(model, Qwen2):
            raise ValueError(
                f"FastQwen2 wraps a minqwen Qwen2, got {type(model).__name__}; load one with "
                f"Qwen2.from_pretrained"
            )
        for name, value, unit in (
            ("bucket", bucket, "cache positions per bucket"),
            ("prefill_chunk", prefill_chunk, "prompt tokens per prefill pass"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int ({unit}), got {value!r}")
        self.config = c = model.config
        self.embedding = model.embed_tokens.weight
        self.device, self.dtype = self.embedding.device, self.embedding.dtype
        if use_graphs is None:
            use_graphs = self.device.type == "cuda"
        if use_graphs and self.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need the model on a CUDA device, it is on {self.device}; pass "
                f"use_graphs=False"
            )
        if fused_kernels and split_attention is False:
            raise ValueError(
                "fused_kernels runs attention as the split kernel, and split_attention=False asks for matrix "
                "products: pass fused_kernels=False with it, or leave split_attention at its default"
            )
        split_turned_off = split_attention is False
        if split_attention is None:
            split_attention = decode_attention.preferred(self.device, c.head_dim)
        if split_attention and not decode_attention.available(self.device):
            missing = "" if decode_attention.triton else ", and Triton is not installed"
            raise ValueError(
                f"split_attention needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); the model "
                f"is on {self.device}{missing}: leave split_attention at its default"
            )
        if split_attention and (reason := decode_attention.unsupported(c.head_dim)):
            raise ValueError(f"split_attention: {reason}; leave split_attention at its default")
        cannot_fuse = decode_kernels.unsupported(
            c, is_quantized(model), model.tensor_parallel is not None
        )
        if fused_kernels is None:
            fused_kernels = self.device.type == "cuda" and decode_kernels.available(self.device)
            fused_kernels = fused_kernels and cannot_fuse is None and not split_turned_off
        if fused_kernels and not decode_kernels.available(self.device):
            raise ValueError(
                f"fused_kernels needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); the model is "
                f"on {self.device}: leave fused_kernels at its default"
            )
        if fused_kernels and cannot_fuse:
            raise ValueError(f"fused_kernels: {cannot_fuse}; leave fused_kernels at its default")
        self.use_graphs, self.bucket, self.prefill_chunk = use_graphs, bucket, prefill_chunk
        # A single row's decode layer as decode_kernels' six kernels; other batches keep the compiled layer.
        self.fused_kernels = bool(fused_kernels)
        self._single_row_layer = functools.partial(
            decode_kernels.decode_layer, blocks=decode_kernels.blocks_for(c)
        )
        with torch.no_grad():
            self.layers = [fuse_layer(layer) for layer in model.layers]
        attention = model.layers[0].self_attn
        self.shape = Shape(
            attention.heads,
            attention.kv_heads,
            c.head_dim,
            c.rms_norm_eps,
            bool(split_attention),
            model.tensor_parallel,
        )
        self.norm_weight, self.lm_head_weight = model.norm.weight, weight_of(model.lm_head)
        self.inv_freq, self.rope_scale = model.inv_freq, model.rope_scale
        self.max_positions = c.max_position_embeddings
        self._step_inputs, self._decode_layer = step_inputs, decode_layer
        self._head, self._advance = head_logits, advance
        self._prefill_qkv, self._prefill_finish = prefill_qkv, _finish
        self._span_inputs, self._span_layer, self._span_head = span_inputs, span_layer, span_logits
        if use_graphs:
            # Coordinate-descent tuning searches each generated kernel's block sizes: it lifted 7B decoding by 12%
            # for about ten seconds more compilation (book/data/bench/NOTES.md).
            options = {"coordinate_descent_tuning": True}
            self._step_inputs, self._decode_layer, self._head, self._advance = (
                torch.compile(f, fullgraph=True, options=options)
                for f in (step_inputs, decode_layer, head_logits, advance)
            )
            self._span_inputs, self._span_layer, self._span_head = (
                torch.compile(f, fullgraph=True, options=options)
                for f in (span_inputs, span_layer, span_logits)
            )
            # Prefill shapes change with the prompt: the compiler makes the length symbolic once it has seen two.
            # Not fullgraph: a quantized product may run outside the compiled code (minqwen.quant.int8).
            self._prefill_qkv, self._prefill_finish = (
                torch.compile(f) for f in (prefill_qkv, _finish)
            )
        self._states: OrderedDict[tuple[int, int], _DecodeState] = OrderedDict()
        self._spans_states: OrderedDict[int, _DecodeState] = OrderedDict()

    def capacity_for(self, total: int) -> int:
        """Cache positions for `total` = prompt + new tokens: the next multiple of `bucket`, within the limit."""
        return min(-(-total // self.bucket) * self.bucket, self.max_positions)

    @torch.inference_mode()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, **settings
    ) -> torch.LongTensor:
        """The prompt followed by the new tokens, [batch, prompt + new]: what `minqwen.generate` returns.

        Whether every row has finished is read back every `FINISHED_CHECK_EVERY` steps only.
        """
        request = prepare(self.config, input_ids, max_new_tokens, **settings)
        if max_new_tokens == 0:
            return input_ids
        state = self._start(request)
        steps = 1
        while steps < max_new_tokens:
            self._replay(state, request.sampling)
            steps += 1
            if steps % FINISHED_CHECK_EVERY == 0:
                self._check_finite(state)
                if request.eos_ids and bool(state.finished.all()):
                    break
        self._check_finite(state)
        new_tokens = state.generated[:, :steps]
        if request.eos_ids:
            # The eager loop stops right after the step at which the last row finished; so does this result.
            finished_at = _all_finished_at(new_tokens, request.eos_ids)
            if finished_at is not None:
                new_tokens = new_tokens[:, : finished_at + 1]
        return torch.cat([request.input_ids.to(self.device), new_tokens], dim=1)

    def generate_tokens(
        self, input_ids: torch.Tensor, max_new_tokens: int, **settings
    ) -> Iterator[torch.LongTensor]:
        """Yield the next token of every row, [batch], one step at a time, as `minqwen.generate_tokens` does.

        Each token is read back as it is made (that is what streaming needs); `generate` avoids those syncs.
        """
        request = prepare(self.config, input_ids, max_new_tokens, **settings)
        return self._tokens(request)

    @torch.inference_mode()
    def _tokens(self, request: GenerationRequest) -> Iterator[torch.LongTensor]:
        for step in range(request.max_new_tokens):
            if step == 0:
                state = self._start(request)
            else:
                self._replay(state, request.sampling)
            self._check_finite(state)
            yield state.generated[:, step].clone()
            if request.eos_ids and bool(state.finished.all()):
                return

    def _start(self, request: GenerationRequest) -> _DecodeState:
        """The state for this request's shape, its graph captured, the prompt prefilled and the first token made."""
        check_shared_draws(self.shape.tp, request)
        batch, prompt = request.input_ids.shape
        state = self._state_for(batch, self.capacity_for(prompt + request.max_new_tokens))
        if self.use_graphs and request.sampling not in state.graphs:
            state.graphs[request.sampling] = self._capture(state, request.sampling)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        self._prefill(state, request)
        return state

    def _state_for(self, batch: int, capacity: int) -> _DecodeState:
        return _most_recent(
            self._states, (batch, capacity), lambda: _DecodeState(self, batch, capacity)
        )

    def _span_state(self, capacity: int) -> _DecodeState:
        """The cache `CachedSpans` drives, kept apart from generate's, with its captured spans."""
        return _most_recent(self._spans_states, capacity, lambda: _DecodeState(self, 1, capacity))

    def _span_forward(self, state: _DecodeState, tokens, start) -> torch.Tensor:
        """float32 logits [n, vocab] of tokens [1, n] placed at slot `start` [1] on, their keys and values cached."""
        x, cos, sin, visible, slots = self._span_inputs(
            tokens,
            start,
            state.key_is_real,
            self.embedding,
            self.inv_freq,
            self.rope_scale,
            self.shape.tp,
        )
        for w, keys, values in zip(self.layers, state.keys, state.values):
            x = self._span_layer(x, cos, sin, visible, slots, keys, values, w, self.shape)
        return self._span_head(x, self.norm_weight, self.lm_head_weight, self.shape)

    def _capture(self, state: _DecodeState, sampling: SamplingConfig) -> torch.cuda.CUDAGraph:
        # The warm-up runs write garbage into the state, which the next prefill resets. Each starts at slot 0: a
        # state reused after a long generation would otherwise point past the end of its cache.
        def start_at_slot_0():
            state.slot.zero_()
            state.step.zero_()

        graph, _ = capture(lambda: self._step(state, sampling), reset=start_at_slot_0)
        return graph

    def _replay(self, state: _DecodeState, sampling: SamplingConfig) -> None:
        if self.use_graphs:
            state.graphs[sampling].replay()
        else:
            self._step(state, sampling)

    def _step(self, state: _DecodeState, sampling: SamplingConfig) -> None:
        x, cos, sin, visible = self._step_inputs(
            state.token,
            state.position,
            state.slot,
            state.key_is_real,
            self.embedding,
            self.inv_freq,
            self.rope_scale,
            self.shape.tp,
        )
        layer = self._decode_layer
        if self.fused_kernels and state.token.shape[0] == 1:
            layer = self._single_row_layer
        for w, keys, values in zip(self.layers, state.keys, state.values):
            x = layer(x, cos, sin, visible, state.slot, keys, values, w, self.shape)
        logits = self._head(x, self.norm_weight, self.lm_head_weight, self.shape)
        self._advance(self._choose(logits, state, sampling), logits, *state.counters())

    def _choose(self, logits, state: _DecodeState, sampling: SamplingConfig) -> torch.Tensor:
        if self.use_graphs:
            return sample_without_sync(logits, state.seen, sampling)
        # Without graphs, the eager loop's own processors and draw: the same tokens for the same seed. Its draw
        # would fail on NaN probabilities, so broken logits are named here, as the eager loop names them.
        if not bool(torch.isfinite(logits).all()):
            state.first_nonfinite.copy_(state.step)
            self._check_finite(state)
        return select_next_token(process_logits(logits, None, sampling, seen=state.seen), sampling)

    def _prefill(self, state: _DecodeState, request: GenerationRequest) -> None:
        input_ids = request.input_ids.to(self.device)
        attention_mask = request.attention_mask.to(self.device)
        prompt = input_ids.shape[1]
        positions = request.positions().to(self.device)
        if self.use_graphs and prompt <= self.prefill_chunk:
            logits = self._prefill_graph(state, prompt, request.padded).run(
                input_ids, positions, attention_mask
            )
        else:
            logits = self._prefill_chunks(
                state, input_ids, positions, attention_mask, request.padded
            )
        state.key_is_real.fill_(True)
        state.key_is_real[:, :prompt] = attention_mask.bool()
        ignore_before = attention_mask.argmax(dim=1) if request.padded else None
        state.seen.copy_(seen_tokens(input_ids, self.config.vocab_size, ignore_before))
        # Point at the prompt's last token; `advance` then moves on to the first new token, as after any step.
        state.position.copy_(positions[:, -1])
        state.slot.fill_(prompt - 1)
        state.step.zero_()
        state.first_nonfinite.fill_(-1)
        state.finished.zero_()
        state.is_eos.zero_()
        if request.eos_ids:
            state.is_eos[list(request.eos_ids)] = True
        state.pad.fill_(request.pad_id if request.pad_id is not None else 0)
        advance(self._choose(logits, state, request.sampling), logits, *state.counters())

    def _prefill_graph(self, state: _DecodeState, prompt: int, left_padded: bool) -> _PrefillGraph:
        """The captured prefill for this prompt length, padded by `prefill_length`, captured on first use."""
        length = prefill_length(prompt, state.keys[0].shape[2])
        key = (length, left_padded)
        if key not in state.prefills:
            state.prefills[key] = _PrefillGraph(self, state, length, left_padded)
        return state.prefills[key]

    def _prefill_chunks(self, state, input_ids, positions, attention_mask, left_padded: bool):
        """The prompt through every layer `prefill_chunk` tokens at a time, so a long prompt's
        activations are those of one chunk; float32 logits [batch, vocab] at its last token."""
        prompt = input_ids.shape[1]
        for start in range(0, prompt, self.prefill_chunk):
            end = min(start + self.prefill_chunk, prompt)
            mask = attention_mask[:, :end] if left_padded else None
            x = self._prefill_span(
                state, input_ids[:, start:end], positions[:, start:end], mask, start
            )
        return head_logits(x, self.norm_weight, self.lm_head_weight, self.shape)

    def _prefill_span(self, state, ids, positions, attention_mask, start: int):
        """Prompt tokens [start, start + seq) through every layer, their keys and values into the
        cache; `attention_mask` [batch, start + seq] marks left padding, or is None for none (then
        attention is causal, with no mask built)."""
        x = embed(ids, self.embedding, self.shape.tp)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_scale, x.dtype)
        mask = None
        if attention_mask is not None:
            mask = Qwen2.attention_mask(ids.shape[1], start, attention_mask, x.device)
        for w, keys, values in zip(self.layers, state.keys, state.values):
            x = self._prefill_layer(x, cos, sin, mask, start, keys, values, w)
        return x

    def _prefill_layer(self, x, cos, sin, mask, start: int, keys, values, w: LayerWeights):
        """One chunk of the prompt through one layer: its keys and values land in cache slots
        [start, start + seq), and its queries attend to every slot before theirs."""
        batch, seq, _ = x.shape
        end = start + seq
        q, k, v = self._prefill_qkv(x, cos, sin, w, self.shape)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        attended = prefill_attention(q, keys[:, :, :end], values[:, :, :end], mask)
        return self._prefill_finish(
            x, attended.transpose(1, 2).reshape(batch, seq, -1), w, self.shape
        )

    @staticmethod
    def _check_finite(state: _DecodeState) -> None:
        step = int(state.first_nonfinite)
        if step >= 0:
            raise NumericalError(
                f"the model's logits hold NaN or infinity at new token {step}: its weights or activations "
                f"are broken (a corrupt checkpoint, or float16 overflow); check the weights with "
                f"`python -m minqwen fetch` and run in float32 or bfloat16"
            )


def _most_recent(states: OrderedDict, key, make) -> _DecodeState:
    """`states[key]`, made on first use, marked as the most recently used; past `MAX_STATES` the least recently
    used goes, its cache and graphs with it."""
    if key in states:
        states.move_to_end(key)
        return states[key]
    while len(states) >= MAX_STATES:
        states.popitem(last=False)
    states[key] = make()
    return states[key]


def _all_finished_at(new_tokens: torch.Tensor, eos_ids) -> int | None:
    """The step at which the last row emitted its first end token, or None if some row never did."""
    hits = torch.isin(new_tokens, torch.tensor(list(eos_ids), device=new_tokens.device))
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
    A gap of a few rounding steps means the two paths only rounded differently. Both run greedy with no
    repetition penalty, so the tokens are the logits' own choices.
    """
    from minqwen.engine.generate import generate

    plain = dict(do_sample=False, repetition_penalty=1.0, eos_token_id=[])
    eager = generate(model, input_ids, max_new_tokens, attention_mask=attention_mask, **plain)
    ours = fast.generate(input_ids, max_new_tokens, attention_mask=attention_mask, **plain)
    prompt = input_ids.shape[1]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows = []
    for row in range(input_ids.shape[0]):
        differs = (eager[row, prompt:] != ours[row, prompt:].to(eager.device)).nonzero()
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
