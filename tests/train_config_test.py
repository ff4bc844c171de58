"""Settings as a user types them (train.py's absl + config_flags parsing) are checked at start-up."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from poetx_jax import train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parsed(*overrides: str):
  """The ConfigDict train.py would see for `--config configs/tiny.py` plus `overrides`."""
  argv = [os.path.join(REPO, "train.py"), f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("override, field", [
    ("--config.train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("--config.train.checkpoint_every=0", "train.checkpoint_every"),
    ("--config.train.log_every=0", "train.log_every"),
    ("--config.train.eval_every=-1", "train.eval_every"),
    ("--config.train.eval_batches=0", "train.eval_batches"),
    ("--config.optimizer.mu_dtype=int8", "optimizer.mu_dtype"),
    ("--config.poet.base_dtype=float16", "base_dtype"),
    ("--config.poet.param_dtype=int8", "param_dtype"),
    ("--config.poet.quant_group_size=3", "quant_group_size"),
])
def test_a_bad_value_stops_at_start_up_naming_the_setting(override, field):
  with pytest.raises(ValueError, match=field.split(".")[-1]):
    train_config.from_config_dict(_parsed(override), vocab_size=4096)


def test_the_new_dtype_settings_parse_from_the_command_line():
  config = train_config.from_config_dict(
      _parsed("--config.poet.base_dtype=int8", "--config.poet.quant_group_size=64", "--config.poet.quant_error_feedback=True",
              "--config.optimizer.mu_dtype=bfloat16", "--config.model.param_dtype=bfloat16"), vocab_size=4096)
  assert config.poet.base_dtype == "int8" and config.poet.quant_group_size == 64 and config.poet.quant_error_feedback
  assert config.optimizer.mu_dtype == "bfloat16" and config.model.param_dtype == "bfloat16"


def test_an_unknown_field_names_its_section_and_the_closest_fields():
  config = _parsed()
  with pytest.raises(ValueError, match=r"train has no field 'stpes'; did you mean steps"):
    train_config.check_override_names(config, ["--config.train.stpes=3"])
  with pytest.raises(ValueError, match=r"the config has no field 'trian'; did you mean train"):
    train_config.check_override_names(config, ["--config.trian.steps=3"])
  train_config.check_override_names(config, ["--config.train.steps=3", "--workdir=x", "--config=configs/tiny.py"])


def test_train_py_stops_on_an_unknown_field_with_one_line():
  import subprocess
  import sys

  out = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs", "tiny.py"),
                        "--workdir", "/nonexistent/never", "--config.optimizer.learning_rate=1"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith("FATAL unknown setting --config.optimizer.learning_rate:"), out.stderr
  assert "Traceback" not in out.stderr
