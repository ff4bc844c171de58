"""LLaMA-8b on one 80 GB GPU: POET-X with bfloat16 base kernels, full remat, merges in place.

Command: python train.py --config configs/llama8b_1gpu.py --workdir runs/llama8b_1gpu
         (POET-XQ, int8 base kernels: add --config.poet.base_dtype=int8)
Device:  one H100; measured memory and tokens/s: docs/performance.md, "One GPU: 8B and 13B"
         (python -m benchmarks.memory --models 8b --seq_lens 1024).
"""

from configs._llama_common import llama_config


def get_config():
  c = llama_config("8b", lr=1e-3, poet_lr=5e-4, block_size=256, merge_interval=200)
  c.data.seq_len = 1024  # the POET-X paper's single-GPU set-up
  c.model.param_dtype = "bfloat16"  # embeddings, norms and head (and their Adam moments)
  c.poet.base_dtype = "bfloat16"  # frozen base kernels; merges still run in float32, one layer at a time
  c.poet.param_dtype = "float32"  # the orthogonal generators and their moments
  c.model.remat = "full"  # recomputes each layer's h in the backward: the fast variant keeps no more than mem
  c.train.global_batch_size = 128  # 131k tokens a step, as the paper's 512 x 256
  c.train.grad_accum_steps = 16  # microbatches of 8 sequences of 1024
  return c
