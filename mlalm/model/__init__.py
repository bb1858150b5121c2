"""The mlalm model family.

Shape key used in variable names and einsum strings across the package:

    B  batch                      T  query positions         S  key positions
    D  model width (d_model)      N  query heads             K  kv heads (attention)
    H  query/key head dim         G  value head dim          R  kv_lora_rank (d_c)
    Q  q_lora_rank (d_q)          P  rope head dim (d_r)     E  routed experts
    F  feed-forward width         V  vocabulary              C  expert capacity
    J  R + P: MLA's W_kva output, the latent c then the shared rope key k_pe
    U  d_n + d_v: MLA's W_kvb output per head, k_nope then v
    k  (lower case) top-k slot of the router

In MLA the query/key head dim H is d_n + d_r and the value head dim G is d_v; in
MHA/GQA/MQA G = H.

Example: ``q_BTNH`` is a query of shape [batch, positions, heads, head_dim] and
``jnp.einsum('BTD,DNH->BTNH', x_BTD, wq_DNH)`` projects to it.

The suffix is for readers: what the optimizer does with a parameter comes from the roles
it carries as metadata (``mlalm.model.layers.param``: label, fan-in, fan-out and batch
axes), so renaming a parameter never changes how it is trained.
"""

from mlalm.model.attention import kv_cache_bytes_per_token_per_layer
from mlalm.model.moe import balance_bias_update
from mlalm.model.transformer import Transformer, count_params

__all__ = ["Transformer", "count_params", "kv_cache_bytes_per_token_per_layer", "balance_bias_update"]
