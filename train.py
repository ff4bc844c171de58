"""Train (or evaluate) a LLaMA with POET-X, AdamW or Muon.

  python train.py --config configs/tiny.py --workdir runs/tiny
  python train.py --config configs/llama1b.py --workdir runs/llama1b --config.optimizer.lr=2e-3
  python train.py --config configs/tiny.py --workdir runs/tiny --config.mode=eval

Re-running a command resumes from the newest checkpoint in --workdir.
"""

import importlib.util
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from poetx_jax import data, train_config, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override fields with --config.a.b=v.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard.")
flags.mark_flags_as_required(["config", "workdir"])


LOG_FILE = "train.log"


def _setup_logging(workdir: str) -> str:
  """The run's progress on stdout; everything (library warnings, ignored exceptions, asyncio's
  "exception was never retrieved") in `workdir/train.log` only, so an error is not buried."""
  console = logging.StreamHandler(sys.stdout)
  console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  path = os.path.join(workdir, LOG_FILE)
  to_file = logging.FileHandler(path)
  to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
  logger = logging.getLogger("poetx_jax")
  logger.addHandler(console)
  logger.addHandler(to_file)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  root = logging.getLogger()
  for handler in list(root.handlers):  # absl's stderr handler: other libraries' records go to the file
    root.removeHandler(handler)
  root.addHandler(to_file)
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and grain log every file operation at INFO
  noise = logging.getLogger("poetx_jax.noise")
  noise.propagate = False
  noise.addHandler(to_file)

  def unraisable(info):  # e.g. TensorStore's "Exception ignored" during a failed restore
    noise.warning("exception ignored in %r: %s: %s", info.object, getattr(info.exc_type, "__name__", info.exc_type),
                  info.exc_value)

  sys.unraisablehook = unraisable
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  os.makedirs(workdir, exist_ok=True)
  log_path = _setup_logging(workdir)
  try:
    trainer.maybe_initialize_distributed()
    raw = _CONFIG.value
    tokenizer = data.load_tokenizer(train_config.data_config(raw))
    config = train_config.from_config_dict(raw, vocab_size=train_config.padded_vocab(tokenizer.vocab_size))
    train_config.check_vocab(config, tokenizer.vocab_size)
    if config.mode == "eval":
      result = trainer.evaluate_checkpoint(config, workdir)
    else:  # config.json is written once the run has restored or initialized with these settings
      result = trainer.train(config, workdir, settings=raw.to_dict())
  except Exception as err:  # pylint: disable=broad-except
    logging.getLogger("poetx_jax.noise").exception("the run stopped")  # the traceback: file only
    sys.stdout.flush()
    sys.exit(f"FATAL {type(err).__name__}: {err}\n(the whole log: {log_path})")
  print(f"validation loss {result['val_loss']:.4f}  perplexity {result['val_ppl']:.2f}  ({workdir})")


def _check_override_names(argv) -> None:
  """One clear error for an override that names no field (before absl's parsing turns it into a
  bare AttributeError); the config file is read here and again by the flag."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv[:-1]:
    path = argv[argv.index("--config") + 1]
  if path is None or not os.path.exists(path):
    return  # absl reports a missing --config itself
  spec = importlib.util.spec_from_file_location("_run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    train_config.check_override_names(module.get_config(), argv[1:])
  except ValueError as err:
    sys.exit(f"FATAL {err}")


if __name__ == "__main__":
  _check_override_names(sys.argv)
  app.run(main)
