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


def one_gpu_config(size: str, *, seq_len: int, global_batch_size: int, grad_accum_steps: int):
  """The POET-X 8B/13B recipe on one 80 GB GPU (the POET-X paper's single-H100 set-up): bf16
  embeddings, norms, head and base kernels (merges still in float32, one layer at a time),
  float32 generators and moments, full remat (the fast variant then keeps no more than mem).
  POET-XQ is one override: --config.poet.base_dtype=int8."""
  c = llama_config(size, lr=1e-3, poet_lr=5e-4, block_size=256, merge_interval=200)
  c.data.seq_len = seq_len
  c.model.param_dtype = "bfloat16"
  c.poet.base_dtype = "bfloat16"
  c.poet.param_dtype = "float32"
  c.model.remat = "full"
  c.train.global_batch_size = global_batch_size
  c.train.grad_accum_steps = grad_accum_steps
  return c
