"""The mlalm model family.

Shape key used in variable names and einsum strings across the package:

    B  batch                      T  query positions         S  key positions
    D  model width (d_model)      N  query heads             K  kv heads (attention)
    H  query/key head dim         G  value head dim          R  kv_lora_rank (d_c)
    Q  q_lora_rank (d_q)          P  rope head dim (d_r)     E  routed experts
    F  feed-forward width         V  vocabulary              C  expert capacity
    k  (lower case) top-k slot of the router

Example: ``q_BTNH`` is a query of shape [batch, positions, heads, head_dim] and
``jnp.einsum('BTD,DNH->BTNH', x_BTD, wq_DNH)`` projects to it.
"""

from mlalm.model.transformer import Transformer, count_params
from mlalm.model.attention import kv_cache_bytes_per_token_per_layer
from mlalm.model.moe import balance_bias_update

__all__ = ["Transformer", "count_params", "kv_cache_bytes_per_token_per_layer",
           "balance_bias_update"]
