"""LLaMA-130m (POET-BS b=256 recipe).

Command: python train.py --config configs/llama130m.py --workdir runs/llama130m
Device:  one H100 (bf16); add --config.data.tfds_name=c4/en:3.1.0 --config.data.tfds_dir=DIR
         for C4 as in the papers, otherwise the embedded corpus is used.
Published (POET paper, C4, its full budget): val ppl AdamW 20.82, POET-BS b=256 19.88;
         not reproduced here (no C4 on these machines).
"""

from configs._llama_common import llama_config


def get_config():
  return llama_config("130m", lr=5e-3, block_size=256)
