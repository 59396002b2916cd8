"""Helpers of the parity tests against transformers models."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file


def rel_err(got, want) -> float:
  """max |got - want| / max |want|."""
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def run(module, variables, x):
  """module.apply, jitted, on x as a JAX array."""
  return jax.jit(module.apply)(variables, jnp.asarray(x))


def edit_hf_folder(src, dst, edit_weights=None, edit_config=None) -> str:
  """A copy of the HF folder src at dst, its model.safetensors through
  edit_weights (dict -> dict) and its config.json through edit_config
  (edits the dict in place)."""
  shutil.copytree(src, dst)
  if edit_weights:
    path = os.path.join(dst, "model.safetensors")
    save_file(edit_weights(load_file(path)), path)
  if edit_config:
    path = os.path.join(dst, "config.json")
    with open(path) as f:
      config = json.load(f)
    edit_config(config)
    with open(path, "w") as f:
      json.dump(config, f)
  return str(dst)
