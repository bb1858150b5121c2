"""transformers' DeepSeek-V3 checkpoint format, in and out.

Modules: ``config`` (config.json <-> Config), ``mapping`` (the one table of tensors that
drives both directions), ``io`` (safetensors reading, ``from_pretrained``,
``save_pretrained``).  Llama and Mistral directories are ``mlalm.llama``'s;
``from_pretrained`` hands them to it.

``model, cfg = from_pretrained(dir)`` reads a ``config.json`` + safetensors directory
(single file or sharded with an index) written by transformers or by DeepSeek;
``save_pretrained(model, cfg, dir, eos_token_id=...)`` writes one that
``transformers.DeepseekV3ForCausalLM.from_pretrained(dir)`` loads and that serving engines
(vLLM, SGLang, llama.cpp's GGUF converter) read with the same routing (see
:func:`config_to_hf` for which engine reads which key).

Layout notes:
  * Routed experts are written one tensor per expert (``experts.{e}.gate_proj.weight``),
    DeepSeek's own layout, which transformers and inference engines load; on reading,
    transformers' fused ``experts.gate_up_proj`` / ``experts.down_proj`` is accepted too.
  * mlalm applies RoPE in the 'half' layout (feature i pairs with i + d_r/2).  DeepSeek
    stores rope features interleaved (pairs (2i, 2i+1)) and declares
    ``rope_interleave: true``; the rope rows of W_q and W_kva are permuted on the way in
    and out, which leaves every attention score unchanged.
  * Multi-token prediction (``model.mtp_depth`` = D): as in DeepSeek-V3's checkpoints,
    depth k is decoder layer ``num_hidden_layers + k - 1`` with ``enorm``, ``hnorm``,
    ``eh_proj``, the block's usual keys, and copies of the embedding (``embed_tokens``),
    final norm (``shared_head.norm``) and head (``shared_head.head``);
    ``num_nextn_predict_layers: D`` in config.json.  vLLM and SGLang speculate with it;
    transformers ignores it (see :func:`_mtp_copies`).
  * Before any parameter is allocated, :func:`from_pretrained` compares every tensor
    shape config.json implies with the safetensors headers (which hold the shapes; no
    tensor data is read), so a config that does not describe its tensors fails in
    milliseconds instead of after allocating the model it describes.
"""

from mlalm.hf.config import config_from_hf, config_to_hf
from mlalm.hf.io import (
    Tensors,
    check_shapes,
    file_mode,
    from_pretrained,
    load_config,
    read_config,
    save_pretrained,
    write_checkpoint_dir,
)

__all__ = [
    "Tensors",
    "check_shapes",
    "file_mode",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "load_config",
    "read_config",
    "save_pretrained",
    "write_checkpoint_dir",
]
