"""config.json <-> mlalm Config for transformers' DeepSeek-V3 format (``mlalm.hf``)."""

from __future__ import annotations

from mlalm.config import Config, from_dict
from mlalm.errors import ConfigError

# The routing algorithms config.json can name (``topk_method``) and what they compute,
# with s = scoring_func(x W_g) and b the per-expert correction bias:
#   noaux_tc  choose top-k of s + b within the topk_group best groups, a group scoring
#             the sum of its two best s + b; weights are the unbiased s of the chosen
#             experts (DeepSeek-V3).  This is exactly what mlalm.model.moe.route computes,
#             whatever the scoring function.
#   greedy    top-k of s, no bias, no groups (DeepSeek-V2-Lite): mlalm's routing when
#             b = 0 and n_group = 1.
#   group_limited_greedy  ranks groups by their single best s (DeepSeek-V2): not what
#             mlalm computes, so it is neither written nor read.
_TOPK_METHODS = ("noaux_tc", "greedy")


def config_from_hf(hf: dict, base: Config | None = None, *, mtp_depth: int | None = None) -> Config:
    """mlalm Config for a transformers DeepSeek-V3 ``config.json`` dict.

    ``mtp_depth``: model.mtp_depth (default: config.json's ``num_nextn_predict_layers``).
    """
    if hf.get("model_type", "deepseek_v3") not in ("deepseek_v3",):
        raise ConfigError(f"config.json: model_type {hf.get('model_type')!r} is not deepseek_v3")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("attention_bias", False):
        raise ConfigError("config.json: attention_bias=true is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(
            f"config.json: rope type {rope.get('rope_type', rope.get('type'))!r} "
            f"is not supported (default RoPE only)"
        )
    # absent keys mean DeepSeek-V3's routing: transformers' DeepseekV3 always routes so
    scoring = hf.get("scoring_func") or "sigmoid"
    if scoring not in ("sigmoid", "softmax"):
        raise ConfigError(f"config.json: scoring_func {scoring!r} is not supported (valid: sigmoid, softmax)")
    topk_method = hf.get("topk_method") or "noaux_tc"
    if topk_method not in _TOPK_METHODS:
        raise ConfigError(
            f"config.json: topk_method {topk_method!r} is not supported (valid: {', '.join(_TOPK_METHODS)})"
        )
    if (hf.get("moe_layer_freq") or 1) != 1:
        raise ConfigError(
            f"config.json: moe_layer_freq={hf['moe_layer_freq']} is not supported "
            f"(1: every layer after first_k_dense_replace is MoE)"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    L = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace", 0) or 0
    moe = {}
    if first_dense < L:
        grouped = topk_method == "noaux_tc"  # greedy routing ignores groups
        moe = dict(
            n_routed_experts=hf["n_routed_experts"],
            n_shared_experts=hf.get("n_shared_experts") or 0,
            top_k=hf["num_experts_per_tok"],
            expert_ffn_dim=hf["moe_intermediate_size"],
            first_k_dense_replace=first_dense,
            scoring=scoring,
            n_group=(hf.get("n_group") or 1) if grouped else 1,
            topk_group=(hf.get("topk_group") or 1) if grouped else 1,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            dispatch="dropless",
        )
    raw = {
        "model": dict(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=L,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 4096),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=float(theta),
            mtp_depth=(hf.get("num_nextn_predict_layers") or 0) if mtp_depth is None else mtp_depth,
        ),
        "attention": dict(
            kind="mla",
            n_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
        ),
        "moe": moe,
    }
    seq_len = (base or Config()).train.seq_len
    raw["train"] = dict(seq_len=min(seq_len, raw["model"]["max_seq_len"]))
    return from_dict(raw, base)


def config_to_hf(
    cfg: Config,
    *,
    routing_bias: bool = True,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """transformers ``config.json`` dict for ``cfg``; ConfigError if the format cannot say it.

    Args:
        routing_bias: whether the MoE layers' correction biases may be non-zero (then
            they are written and ``topk_method`` is noaux_tc).  :func:`save_pretrained`
            passes False when every bias is exactly 0, which lets a softmax-routed model
            be declared with DeepSeek-V2's plain ``greedy`` routing, which every engine
            reads the same way.
        bos_token_id, eos_token_id, pad_token_id: written as given (None: none).

    Which reader uses which key (checked against these sources):
      * DeepSeek-V3's own ``config.json`` (huggingface.co/deepseek-ai/DeepSeek-V3) carries
        every key below, including scoring_func=sigmoid, topk_method=noaux_tc,
        moe_layer_freq=1, n_group/topk_group and the token ids.
      * transformers (``models/deepseek_v3/modeling_deepseek_v3.py``,
        DeepseekV3TopkRouter): always sigmoid + e_score_correction_bias with top-2 group
        scores; ignores scoring_func and topk_method; q_lora_rank None -> q_proj.  Reads
        bos/eos/pad_token_id from config.json and generation_config.json.
      * vLLM (vllm-project/vllm, vllm/model_executor/models/deepseek_v2.py): DeepseekV2MoE
        reads scoring_func (default softmax when absent!), creates the
        e_score_correction_bias parameter only when topk_method == "noaux_tc" (a bias
        tensor in the file without it fails the load), n_group, topk_group,
        norm_topk_prob (renormalize), routed_scaling_factor, n_shared_experts,
        moe_intermediate_size; DeepseekV2DecoderLayer: first_k_dense_replace,
        moe_layer_freq, n_routed_experts, q_lora_rank (``is not None`` -> q LoRA, so a
        model without q LoRA must say null, not 0), kv_lora_rank, qk_*/v_head_dim,
        max_position_embeddings, rms_norm_eps, rope_parameters.
      * SGLang (sgl-project/sglang, python/sglang/srt/models/deepseek_v2.py, MoEGate):
        the bias exists only when topk_method == "noaux_tc", and then
        python/sglang/srt/layers/moe/topk.py (biased_grouped_topk) scores with sigmoid
        whatever scoring_func says; without the bias it scores with softmax.
      * llama.cpp's converter (ggml-org/llama.cpp, conversion/deepseek.py
        DeepseekV2Model.set_gguf_parameters, formerly in convert_hf_to_gguf.py;
        conversion/base.py TextModel.set_gguf_parameters): scoring_func -> expert gating
        func (when absent the deepseek2 loader falls back to SOFTMAX), n_group,
        topk_group, num_experts_per_tok, n_routed_experts, n_shared_experts,
        moe_intermediate_size, first_k_dense_replace, routed_scaling_factor,
        norm_topk_prob (written only when true), kv_lora_rank, qk_*/v_head_dim,
        rms_norm_eps, rope theta, tie_word_embeddings; q_lora_rank is written only when
        not null, and the deepseek2 loader (src/llama-model.cpp) then requires
        ``deepseek2.attention.q_lora_rank`` unless the model has 26 or 27 layers: a
        model without q LoRA (q_lora_rank null) of any other depth is refused by
        llama.cpp; no value of the key fixes that without breaking transformers and vLLM.
        The correction bias is used whenever the tensor is present.
    """
    m, a, e = cfg.model, cfg.attention, cfg.moe
    if a.kind != "mla":
        hint = " (export as Llama: scripts/export.py --format llama)" if e.n_routed_experts == 0 else ""
        raise ConfigError(
            f"attention.kind={a.kind}: the DeepSeek-V3 format only expresses MLA attention{hint}"
        )
    if not a.kv_latent_norm:
        raise ConfigError(
            "attention.kv_latent_norm=false: DeepSeek-V3 checkpoints always normalise the latent "
            "(kv_a_layernorm, which no weight turns into the identity); keep this model as a "
            "params export (scripts/export.py --format params)"
        )
    dense_only = e.n_routed_experts == 0
    if not dense_only and e.n_shared_experts == 0:
        raise ConfigError("moe.n_shared_experts=0: the DeepSeek-V3 format needs at least one shared expert")
    for name, value in (
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
        ("pad_token_id", pad_token_id),
    ):
        if value is None:
            continue
        assert m.vocab_size is not None, f"{name}: model.vocab_size must be set to check token ids"
        if not 0 <= value < m.vocab_size:
            raise ConfigError(f"{name}={value} is outside the vocabulary [0, {m.vocab_size})")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "moe_intermediate_size": e.expert_ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_heads,
        # a dense-only model declares one placeholder expert that no layer uses
        # (first_k_dense_replace = every layer, the MTP layers included: engines build
        # layer i as MoE when i >= first_k_dense_replace)
        "n_shared_experts": e.n_shared_experts if not dense_only else 1,
        "n_routed_experts": e.n_routed_experts if not dense_only else 1,
        "num_experts_per_tok": e.top_k if not dense_only else 1,
        "first_k_dense_replace": m.n_layers + m.mtp_depth if dense_only else e.first_k_dense_replace,
        "moe_layer_freq": 1,
        "scoring_func": e.scoring,
        "topk_method": _topk_method(cfg, routing_bias),
        "n_group": e.n_group,
        "topk_group": e.topk_group,
        "norm_topk_prob": e.norm_topk_prob,
        "routed_scaling_factor": e.routed_scaling_factor,
        "kv_lora_rank": a.kv_lora_rank,
        "q_lora_rank": a.q_lora_rank or None,  # null: W_q h directly (q_proj), see above
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "v_head_dim": a.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_interleave": True,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        # the MTP modules, read by vLLM and SGLang for speculative decoding (transformers
        # ignores the key and the layers past num_hidden_layers)
        "num_nextn_predict_layers": m.mtp_depth,
        "torch_dtype": m.param_dtype,  # older readers; transformers >= 4.56 reads dtype
        "dtype": m.param_dtype,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


def _topk_method(cfg: Config, routing_bias: bool) -> str:
    """noaux_tc, except a softmax router whose bias is 0: DeepSeek-V2's greedy.

    sigmoid + bias is DeepSeek-V3's noaux_tc.  For softmax, noaux_tc is still the exact
    description (vLLM and llama.cpp apply the bias to softmax scores), but SGLang applies
    sigmoid whenever it sees noaux_tc; with a zero bias (and mlalm allows no groups with
    softmax) the routing is plain top-k of softmax, which every engine reads the same.
    """
    e = cfg.moe
    if e.scoring == "softmax" and not routing_bias and e.n_group == 1:
        return "greedy"
    return "noaux_tc"
