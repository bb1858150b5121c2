"""Pallas kernels for mlalm, each with a readable plain-jnp ``*_reference`` beside it.

- :func:`flash_attention` — training/prefill attention (forward + custom-VJP backward),
  causal or not, qk head dim H ≠ value head dim G (MLA), K kv heads shared by N query
  heads (MHA/GQA/MQA), any lengths.
- :func:`mla_decode` — one-query-per-sequence decode over MLA's latent cache with
  absorbed weights, split-K (flash-decoding) over the cache.

On CPU both run the Pallas interpreter (``interpret=None`` decides from the backend);
the ``*_reference`` functions are the fallback and what the tests compare against.
"""

from mlalm.kernels.flash_attention import BlockSizes, attention_reference, flash_attention
from mlalm.kernels.mla_decode import mla_decode, mla_decode_reference

__all__ = ["BlockSizes", "attention_reference", "flash_attention", "mla_decode", "mla_decode_reference"]
