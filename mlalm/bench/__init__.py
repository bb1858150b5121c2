"""Benchmark workloads behind ``scripts/bench.py``, one module each.

  peak         the device's peak FLOP/s (``peak.measure``)
  train_step   mlalm's training step (``init_state`` + ``make_train_step``, as train.py
               runs it), the MoE model and its dense twin (``train_step.measure``)
  reference    transformers' DeepseekV3ForCausalLM on the same batch, and the sweep over
               its implementations (torch and transformers are imported only there)
  decode       absorbed (latent cache) against naive (expanded cache) MLA decoding
  step_profile where the training step's time goes: its pieces, one layer's parts,
               whole-step variants and a per-op trace
  report       the summary figures (MFU, ratios, fastest rounds) and the table
  gpu/         the GPU acceptance stages behind ``scripts/gpu_check.py`` (kernels against
               float64, attention and decode speed, MFU, bf16 against float32)

Each workload is a function of a JSON-able spec that returns a JSON-able dict
(``worker.WORKERS``); ``worker.run_worker`` runs one in a fresh process, so that its
peak memory is its own.  Importing this package imports neither JAX nor torch.
"""
