"""A transformers causal LM behind minqwen's model interface, so minqwen's own loop can drive HF's model.

The book runs `minqwen.generate` on HF's model as well as on minqwen's: when both give HF `generate()`'s tokens,
the loop is proven separately from the model. `generate` needs four things of a model, and this adapter gives
them: `config` (a `ModelConfig` with the checkpoint's end tokens, pad id and sampling defaults), a forward that
takes ids, mask, positions and a cache and returns logits, `new_cache()`, and `parameters()`.
"""

from __future__ import annotations

import torch

from minqwen.model.config import SAMPLING_SETTINGS, ModelConfig


def config_of(model) -> ModelConfig:
    """A transformers model's config and generation config, read as minqwen reads a checkpoint's files."""
    generation = {
        key: getattr(model.generation_config, key, None)
        for key in (*SAMPLING_SETTINGS, "eos_token_id", "pad_token_id")
    }
    return ModelConfig.from_dict(
        model.config.to_dict(), source=type(model).__name__, generation=generation
    )


class HFAdapter:
    def __init__(self, model):
        self.model = model
        self.config = config_of(model)

    def __call__(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep: int = 0
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
        ).logits

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def parameters(self):
        return self.model.parameters()
