"""A tiny LLaMA that trains on the embedded corpus on a CPU in about a minute.

Command: python train.py --config configs/tiny.py --workdir runs/tiny
Device:  any CPU (2 cores here, about a minute). The loss starts near ln 4096 = 8.3;
         after 300 steps with merges every 50 the printed validation loss is about
         5.9 (perplexity about 370; 368.5 here at the current commit).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.size = None
  c.model.hidden = 128  # width
  c.model.ffn = 256  # SwiGLU width
  c.model.heads = 4
  c.model.layers = 2
  c.data.vocab_size = 4096  # a small tokenizer trained on the corpus (seconds)
  c.data.seq_len = 64
  c.poet.block_size = 32  # divides 128 and 256
  c.poet.merge_interval = 50
  c.optimizer.lr = 3e-3
  c.optimizer.poet_lr = 8e-3  # poet_lr x B ≈ 0.256
  c.optimizer.warmup_steps = 20
  c.train.steps = 300
  c.train.global_batch_size = 16
  c.train.log_every = 25
  c.train.eval_every = 150
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  return c
