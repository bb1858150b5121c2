"""GPU acceptance: the checks and measurements that need an accelerator, as one command
(``scripts/gpu_check.py``; docs/benchmarks.md, "GPU acceptance").

Stages, in the order they run, with their time budgets on one H100/H200 (seconds; 7 min
in all, so that the whole check fits a 10-minute slot with room for start-up):

  kernels           Pallas kernels compiled for the device vs float64 references
  attention         flash attention fwd / fwd+bwd vs XLA and cuDNN at MLA shapes
  decode            latent MLA decode kernel: GB/s vs HBM bandwidth and vs XLA
  train_dense       configs/bench_gpu_dense.yaml, attention.impl=xla and pallas: MFU
  train_moe         configs/bench_gpu.yaml, the same
  bf16_convergence  bf16 vs float32 loss curves of a small model on the same data

Each stage module has ``PARTS`` (one process each), ``spec(dry, stage)`` (what to
measure: the GPU sizes, or tiny ones for the CPU dry run) and ``run(part, spec, out)``,
which fills ``out`` (``common.Figures``) and raises when the stage's check fails.
``runner`` runs the parts with their budgets and writes the report; ``report`` derives
the goals and the Markdown.  Nothing here imports Grain or tensorboardX, and the runner
process imports no JAX (the device stays free for the stage processes).
"""

# name -> (module, time budget in seconds on the GPU)
STAGES = {
    "kernels": ("mlalm.bench.gpu.kernels", 45),
    "attention": ("mlalm.bench.gpu.attention", 80),
    "decode": ("mlalm.bench.gpu.decode", 35),
    "train_dense": ("mlalm.bench.gpu.train", 95),
    "train_moe": ("mlalm.bench.gpu.train", 105),
    "bf16_convergence": ("mlalm.bench.gpu.convergence", 60),
}
