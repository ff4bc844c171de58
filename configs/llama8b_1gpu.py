"""LLaMA-8b on one 80 GB GPU: POET-X with bfloat16 base kernels, full remat, merges in place.

Command: python train.py --config configs/llama8b_1gpu.py --workdir runs/llama8b_1gpu
         (POET-XQ, int8 base kernels: add --config.poet.base_dtype=int8)
Device:  one H100; measured memory and tokens/s: docs/performance.md, "One GPU: 8B and 13B"
         (python -m benchmarks.memory --models 8b --seq_lens 1024).
"""

from configs._llama_common import one_gpu_config


def get_config():
  # 128 sequences of 1024 (131k tokens a step, as the paper's 512 x 256), in microbatches of 8
  return one_gpu_config("8b", seq_len=1024, global_batch_size=128, grad_accum_steps=16)
