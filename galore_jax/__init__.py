"""galore-jax: GaLore (Gradient Low-Rank Projection, Zhao et al., ICML 2024) in JAX."""

from galore_jax.galore import (
    GaLoreState,
    decay_updated_weights,
    galore,
    galore_adamw,
    scale_by_adam_hf,
    state_bytes,
)

__all__ = [
    "GaLoreState",
    "decay_updated_weights",
    "galore",
    "galore_adamw",
    "scale_by_adam_hf",
    "state_bytes",
]
__version__ = "0.1.0"
