"""Every setting of a run, with its default. Other configs start from this one.

Usage: python train.py --config configs/base.py --workdir runs/base
Override any field on the command line: --config.optimizer.lr=3e-3
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # "train" (resumes from workdir if it holds checkpoints) or "eval" (newest checkpoint only)
  c.seed = 0  # model init, data order and POET-X permutations all derive from it

  c.model = ml_collections.ConfigDict()
  c.model.size = "60m"  # a row of SPEC §9 (60m 130m 350m 1b 3b 8b 13b); set to None to give every dimension below
  c.model.vocab_size = 0  # 0: the tokenizer's vocabulary rounded up to a multiple of 128
  c.model.dtype = "float32"  # computation dtype ("bfloat16" on GPUs)
  c.model.param_dtype = "float32"  # storage dtype of the trainable parameters (and of POET-X base kernels unless poet.base_dtype)
  c.model.remat = "none"  # "none", "full" or "dots": rematerialize each block in the backward
  c.model.attention = None  # jax.nn.dot_product_attention implementation: None (XLA picks), "xla", "cudnn"
  c.model.init_std = 0.02  # std of the normal initializers (POET-X then normalizes each output neuron)
  c.model.scan_layers = False  # one nn.scan over the blocks (params stacked under `blocks`): compile time flat in depth

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "poetx"  # "poetx" (wrap + POETAdamW), "adamw" or "muon": same model, data and loop
  c.optimizer.lr = 1e-3  # peak base learning rate (embeddings, norms, head; every parameter for adamw)
  c.optimizer.poet_lr = 1e-3  # peak rate of the orthogonal parameters before poet.poet_lr_scale (0.5)
  c.optimizer.weight_decay = 0.01  # decoupled decay of matrices that are not POET-X layers
  c.optimizer.warmup_steps = 100  # linear warmup from 0
  c.optimizer.min_lr_ratio = 0.1  # cosine floor as a fraction of the peak
  c.optimizer.clip_norm = 1.0  # global-norm clip over all gradients (None: off); ramped after merges for poetx
  c.optimizer.b1 = 0.9  # Adam beta1
  c.optimizer.b2 = 0.999  # Adam beta2
  c.optimizer.eps = 1e-6  # Adam epsilon, added to sqrt(v_hat)
  # storage dtype of Adam's first moment, of every group (POET-X's generators too): None (each parameter's dtype), "bfloat16" or "float32"
  c.optimizer.mu_dtype = ml_collections.config_dict.placeholder(str)
  c.optimizer.galore_rank = 128  # galore: rank of each hidden matrix's gradient projection
  c.optimizer.galore_update_proj_gap = 200  # galore: steps between recomputed projections (an SVD each)

  c.poet = ml_collections.ConfigDict()
  c.poet.block_size = 256  # B: side of each orthogonal block; must divide every wrapped width
  c.poet.merge_interval = 200  # optimizer steps between merges
  c.poet.neumann_terms = 3  # k of the Cayley-Neumann map; None: the exact Cayley map
  c.poet.variant = "fast"  # "fast" (keep h) or "mem" (recompute h in the backward)
  c.poet.keep_cayley_state = False  # keep the Cayley intermediates (pays off without scan_layers only)
  c.poet.targets = r".*"  # regex of wrapped layer paths
  c.poet.exclude = r"(^|/)(lm_head|head)(/|$)"  # regex of layer paths never wrapped
  c.poet.implementation = None  # "xla", "pallas", or None (measured: Pallas on a GPU for power-of-two b >= 16, else XLA)
  c.poet.pallas_interpret = False  # run Pallas kernels in the interpreter (debugging on CPU)
  # mesh axes that split the batch; Pallas kernels run per device on them (None: all), e.g. "('data',)"
  c.poet.batch_axes = ml_collections.config_dict.placeholder(tuple)
  c.poet.skip_indivisible = False  # train layers that block_size does not divide densely (logged) instead of failing
  c.poet.init_scale = 1.0  # scale of the unit-norm-per-output-neuron base kernels; None keeps the plain init
  c.poet.param_dtype = "float32"  # dtype of the orthogonal parameters and their Adam moments
  # frozen base kernels: None (model.param_dtype), "bfloat16", "float32" or "int8" (POET-XQ: uint8 codes per group)
  c.poet.base_dtype = ml_collections.config_dict.placeholder(str)
  c.poet.quant_group_size = 256  # int8: input features of one output column sharing a scale and offset
  c.poet.quant_error_feedback = False  # int8: keep each merge's rounding residual (4 bits a weight) for the next merge
  c.poet.poet_lr_scale = 0.5  # orthogonal parameters train at poet_lr x this
  c.poet.clip_ramp_steps = 10  # after a merge the clip ramps from 0.1x to 1x over this many steps
  c.poet.clip_ramp_until = None  # ramp only while step < this (None: the whole run)

  c.data = ml_collections.ConfigDict()
  c.data.tfds_name = None  # e.g. "c4/en:3.1.0" (array_record) with tfds_dir; None with no files: the embedded corpus
  c.data.tfds_dir = None  # the tfds data_dir holding tfds_name
  c.data.files = ""  # comma-separated globs of local .txt/.jsonl(.gz)/.json.gz files (converted once to tfds)
  c.data.text_key = "text"  # JSON field holding the text
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.tokenizer = None  # a sentencepiece model path; None: train (once) and reuse one for the corpus
  c.data.vocab_size = 32000  # vocabulary of a tokenizer trained here
  c.data.seq_len = 256  # tokens per training sequence (documents packed, EOS-separated)
  c.data.cache_dir = "~/.cache/poetx_jax"  # where the corpus, converted files and tokenizers are built once
  c.data.shuffle_seed = 0  # data order
  c.data.num_workers = 0  # grain worker processes (0: in the training process)
  c.data.prefetch_batches = 2  # training batches made ahead by a thread while the device trains (0: on demand)
  c.data.add_eos = True  # append EOS to every document before packing

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer updates
  c.train.global_batch_size = 32  # sequences per update, over all devices and microbatches
  c.train.grad_accum_steps = 1  # microbatches per update
  c.train.cayley_once = False  # POET-X: every layer's Cayley–Neumann map once a step, not in each microbatch (same gradients; ignored by other optimizers)
  c.train.log_every = 10  # a log line, tensorboard scalars and a metrics.jsonl record every N steps
  c.train.eval_every = 200  # validation loss and perplexity every N steps (and at the end); 0: only at the end
  c.train.eval_batches = 20  # validation batches per evaluation
  c.train.eval_batch_size = 0  # rows per validation batch (0: global_batch_size)
  c.train.checkpoint_every = 200  # save every N steps (and at the end)
  c.train.keep_checkpoints = 3  # keep the newest K checkpoints
  c.train.spectrum_every = 0  # log the largest singular value of spectrum_layers every N steps (0: off)
  c.train.spectrum_layers = "blocks_0/attention/q_proj,blocks_0/mlp/down_proj"  # comma-separated layer paths
  c.train.profile_steps = ""  # "START:STOP": a profiler trace (device kernels, host, Python) of these steps in workdir/profile
  c.train.thread_switch_interval_s = 1e-4  # Python's thread switch interval while training (0: Python's own, 5 ms): the loop waits less for the data thread

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis (-1: the remaining devices)
  c.mesh.fsdp = 1  # fully-sharded axis: parameters, base kernels and optimizer state are split over it
  return c
