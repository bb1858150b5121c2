"""GGUF export for llama.cpp (and the engines built on it: llama-cpp-python, Ollama, ...).

``write_gguf(model, cfg, tokenizer, path, dtype="f32")`` writes an MLA model as llama.cpp's
``deepseek2`` architecture (DeepSeek-V2/V3), the layout llama.cpp's own converter produces
for DeepSeek checkpoints, with the tokenizer inside the file; ``serving_warnings(cfg)``
lists what common serving kernels will not run at this model's dimensions.

Sources the layout and keys were checked against (ggml-org/llama.cpp, as vendored by
llama-cpp-python 0.3.36): ``conversion/deepseek.py`` (DeepseekV2Model: keys, the split of
``kv_b_proj`` into ``attn_k_b``/``attn_v_b``, expert stacking), ``conversion/base.py``
(TextModel.set_gguf_parameters, which tensors stay float32), ``src/models/deepseek2.cpp``
(the loader's required keys and tensor shapes, and the graph), ``src/llama-graph.cpp``
(build_moe_ffn: routing) and ``src/llama-vocab.cpp`` (tokenizers).  What each piece
computes, and the one routing detail that differs, are in :mod:`mlalm.gguf.writer`.

Needs the ``gguf`` package (``pip install -e ".[gguf]"``); without it every entry point
raises a one-line ConfigError saying so.
"""

from mlalm.gguf.engines import serving_warnings
from mlalm.gguf.writer import GGUF_DTYPES, check_exportable, require_gguf, write_gguf

__all__ = ["GGUF_DTYPES", "check_exportable", "require_gguf", "serving_warnings", "write_gguf"]
