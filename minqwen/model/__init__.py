"""The model: Qwen2.5's config, rotary positions, layers, the model itself and its KV caches.

It knows nothing of how it is driven: `minqwen.engine` drives it, one forward pass at a time.
"""
