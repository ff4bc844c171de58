"""LLaMA-13b on one 80 GB GPU: POET-X with bfloat16 base kernels, full remat, merges in place.

Command: python train.py --config configs/llama13b_1gpu.py --workdir runs/llama13b_1gpu
         (POET-XQ, int8 base kernels: add --config.poet.base_dtype=int8)
Device:  one H100; measured memory and tokens/s: docs/performance.md, "One GPU: 8B and 13B"
         (python -m benchmarks.memory --models 13b --seq_lens 2048).
"""

from configs._llama_common import one_gpu_config


def get_config():
  # 64 sequences of 2048 (131k tokens a step), in microbatches of 8
  return one_gpu_config("13b", seq_len=2048, global_batch_size=64, grad_accum_steps=8)
