"""The model: Qwen2.5's config, rotary positions, layers, the model itself and its KV caches.

It knows nothing of how it is driven: `minqwen.engine` drives it, one forward pass at a time.
"""

from minqwen import submodules_on_demand

__getattr__ = submodules_on_demand(__name__)
