"""FlashMLA's MLA decoding kernel for Hopper GPUs, written with CUTLASS's CuTe DSL.

``get_mla_metadata`` plans the split of the decode work over the SMs, once per decoding
step; ``flash_mla_with_kvcache`` computes multi-head latent attention over a paged KV
cache. Both take the arguments of FlashMLA's functions of the same names. Importing the
package is light: CUTLASS is loaded on the first call with CUDA tensors.
"""

__version__ = "0.1.0"
"""The package version (``pyproject.toml`` reads it from here)."""

from .interface import flash_mla_with_kvcache, get_mla_metadata  # noqa: E402
from .merge import merge_attention_states  # noqa: E402
from . import ops  # noqa: E402,F401  last: registers the torch.compile custom ops on top of the interface

__all__ = ["flash_mla_with_kvcache", "get_mla_metadata", "merge_attention_states", "__version__"]
