"""LLaMA-13b (5120/13824/40 heads/40 layers), POET-X, bf16 base kernels, full remat.

Command: python train.py --config configs/llama13b.py --workdir runs/llama13b
Device:  several H100/H200 with --config.mesh.fsdp=N (one GPU: configs/llama8b_1gpu.py, llama13b_1gpu.py).
         The POET-X paper fits 8B (seq 1024, batch 1) in 27.9 GB and 13B (seq 2048) in 47.2 GB on one H100 with its mem variant (here: remat
         instead, which also drops h).
"""

from configs._llama_common import llama_config


def get_config():
  c = llama_config("13b", lr=1e-3, poet_lr=5e-4, block_size=256, merge_interval=200)
  c.model.param_dtype = "bfloat16"  # frozen base kernels in bf16; merges still run in float32
  c.model.remat = "full"  # recomputes each layer's h in the backward, so the fast variant (the default) keeps
  # nothing more than mem would, and mem would compute h once more (raw/run118_mem_variant.txt)
  c.train.grad_accum_steps = 16
  return c
