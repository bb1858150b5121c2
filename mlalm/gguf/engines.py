"""Which serving engines' MLA kernels accept a model's dimensions (warnings, not errors).

MLA decodes as multi-query attention over the latent cache: one key of width
R + d_r (kv_lora_rank + qk_rope_head_dim) and one value of width R per token.  Fast kernels
are compiled for DeepSeek-V2/V3's R = 512, d_r = 64 (key 576, value 512); other widths load
where a generic path exists and fail where none does.  Checked in:

* FlashMLA (deepseek-ai/FlashMLA, csrc/api/dense_decode.h): ``head_size_k`` 576 (or 512
  without rope) and ``head_size_v`` 512 only.  vLLM's FLASHMLA and SGLang's ``flashmla``
  backends call it; FlashInfer's MLA kernels (vLLM FLASHINFER_MLA, SGLang ``flashinfer``
  for MLA) are built for head_dim_ckv 512 and head_dim_kpe 64 (docs.flashinfer.ai/api/mla).
* vLLM (vllm-project/vllm, vllm/model_executor/layers/attention/mla_attention.py):
  ``MLACommonBackend.get_supported_head_sizes`` returns [320, 576] for head size R + d_r,
  and the MLA backends inherit it (only some versions' TRITON_MLA accepts any size).
* llama.cpp (ggml/src/ggml-cuda/fattn.cu, ggml_cuda_get_best_fattn_kernel): CUDA flash
  attention covers MLA key/value widths 576/512, and 320/256 when the head count is a
  multiple of 32; otherwise ``--flash-attn auto`` turns it off (src/llama-context.cpp) and
  the model runs without it (slower, and a quantised V cache needs flash attention).
  The CPU backend runs any width.
"""

from __future__ import annotations

from mlalm.config import Config


def serving_warnings(cfg: Config, fmt: str = "gguf") -> list[str]:
    """One line per engine kernel that will not run ``cfg``'s MLA dimensions (empty when
    every one will, or for non-MLA models).  ``fmt``: 'gguf' or 'hf', the export format."""
    a = cfg.attention
    if a.kind != "mla":
        return []
    R, P, N = a.kv_lora_rank, a.qk_rope_head_dim, a.n_heads
    out = []
    if (R, P) != (512, 64):
        out.append(
            f"kv_lora_rank={R}, qk_rope_head_dim={P}: FlashMLA and FlashInfer's MLA kernels "
            f"(vLLM FLASHMLA/FLASHINFER_MLA, SGLang flashmla/flashinfer) support only 512 and 64; "
            f"serve with a Triton MLA backend (SGLang --attention-backend triton)"
        )
    if R + P not in (320, 576):
        out.append(
            f"kv_lora_rank + qk_rope_head_dim = {R + P}: vLLM's MLA backends accept 576 or 320 "
            f"(MLACommonBackend.get_supported_head_sizes); vLLM may find no attention backend"
        )
    if not ((R + P, R) == (576, 512) or ((R + P, R) == (320, 256) and N % 32 == 0)):
        out.append(
            f"MLA key/value widths {R + P}/{R} (n_heads={N}): llama.cpp's CUDA flash attention "
            f"covers 576/512 (and 320/256 with n_heads a multiple of 32); it runs without it"
        )
    if fmt == "hf" and not a.q_lora_rank and cfg.model.n_layers not in (26, 27):
        out.append(
            "q_lora_rank=0: llama.cpp's convert_hf_to_gguf.py omits attention.q_lora_rank and its "
            "deepseek2 loader then refuses the model; use --format gguf for llama.cpp"
        )
    return out
