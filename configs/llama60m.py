"""LLaMA-60m (POET-BS b=256 recipe; 512x256 tokens per step).

Command: python train.py --config configs/llama60m.py --workdir runs/llama60m
Device:  one H100 (bf16): rematerialized dots, 35 GiB of the 59 JAX takes, 0.23 s a step
         on random tokens (benchmarks/results/raw/run65_fit_split_outer_sums.txt); train.py on the
         embedded corpus 0.235-0.237 s (raw/run66_train_60m.txt).
Data:    the embedded corpus; for C4 as in the papers add
         --config.data.tfds_name=c4/en:3.1.0 --config.data.tfds_dir=DIR.
Published (POET paper, C4, its full budget): val ppl AdamW 26.68, POET-BS b=256 25.29;
         not reproduced here (no C4 on these machines).
"""

from configs._llama_common import llama_config


def get_config():
  c = llama_config("60m", lr=1e-2, block_size=256)
  c.model.remat = "dots"  # 512 sequences in one pass; faster than 2 microbatches without remat (0.33 s)
  return c
