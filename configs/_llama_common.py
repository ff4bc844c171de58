"""Shared recipe of the LLaMA configs: the POET paper's set-up (SPEC §9)."""

from configs import base


def llama_config(size: str, *, lr: float, poet_lr: float = 1e-3, block_size: int = 256, merge_interval: int = 400):
  """Sequence 256, 512 sequences a batch, weight decay 0.01, bf16 on GPU (POET paper)."""
  c = base.get_config()
  c.model.size = size
  c.model.dtype = "bfloat16"  # GPU computation; params and merges stay float32 unless param_dtype says otherwise
  c.model.scan_layers = True  # one nn.scan over the blocks: compile time does not grow with depth
  c.data.seq_len = 256
  # Tokenizing in worker processes: in the training process one thread makes a 512 x 256
  # batch of the embedded corpus in 0.116 s on the H100's host, too slow for llama60m
  # with AdamW (0.168-0.265 s a step, against a steady 0.168 s with 4 workers:
  # benchmarks/results/raw/run63_train_60m.txt, run64_adamw_workers.txt).
  c.data.num_workers = 4
  c.optimizer.lr = lr
  c.optimizer.poet_lr = poet_lr
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 1000
  c.optimizer.min_lr_ratio = 0.1
  c.optimizer.clip_norm = 1.0
  c.poet.block_size = block_size
  c.poet.merge_interval = merge_interval
  c.train.global_batch_size = 512
  c.train.steps = 10000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  return c
