"""Logical axis names on parameters, mapped to mesh axes by config rules."""

import flax.linen as nn


def logical(fn, *names):
  """Initializer `fn` whose parameter carries logical axis `names`."""
  return nn.with_logical_partitioning(fn, names)
