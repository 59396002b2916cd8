"""Parameter groups of fine-tuning: what trains, at which learning rate.

Names are "<top>/<param path>" over params {'head': ..., branch: ...}.
`layer_ids` numbers each backbone's layers (0 = stem, 1..L = blocks, L + 1 =
after them); `param_groups` turns `config.finetune` (freeze regexes,
freeze_layers, backbone_lr_scale, layer_decay) into the frozen names and a
learning-rate multiplier per trainable name; `make_optimizer` is the
PyTorch-parity AdamW over the trainable params with those multipliers.
"""

import math
import re

import jax
import optax
from flax import traverse_util

from divita_jax.trainers import optim

# A block of a backbone: its indices form the block's key, in order
# (ViT/ViViT encoderblock_3, Swin stage_1/block_0, ResNet/R(2+1)D
# layer2_1, ShuffleNet stage3_2).
_BLOCK = re.compile(
  r"^(?:encoderblock_|stage_|block_|layer|stage)(\d+)(?:_(\d+))?$"
)
# Parameters outside blocks that come before them (the rest come after).
_STEM = re.compile(r"^(conv1|bn1|stem)|embed|patch|cls")


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def layer_ids(params) -> tuple[dict, int]:
  """(tree of each parameter's layer, L) for one backbone's params: 0 =
  stem (patch embedding, position embedding, first conv), 1..L = blocks in
  order, L + 1 = what follows them (final norm, last conv)."""

  def block(path) -> tuple:
    found = [_BLOCK.match(str(getattr(k, "key", k))) for k in path]
    return tuple(int(g) for m in found if m for g in m.groups() if g)

  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  keys = {block(p) for p in paths} - {()}

  def order(k):  # A stage's own layers (Swin's patch merging) follow the
    # stage's blocks: (0,) after (0, 0), (0, 1).
    inner = any(o[: len(k)] == k and o != k for o in keys)
    return k + (math.inf,) if inner else k

  keys = sorted(keys, key=order)
  rank = {k: i + 1 for i, k in enumerate(keys)}
  num = len(keys)

  def layer(path, _):
    key = block(path)
    if key:
      return rank[key]
    return 0 if _STEM.search(_name(path)) else num + 1

  return jax.tree_util.tree_map_with_path(layer, params), num


def param_groups(config, params: dict) -> tuple[set, dict]:
  """(frozen parameter names "<branch>/<path>", learning-rate multiplier
  per trainable name) for params {'head': ..., branch: ...}."""
  f = config.finetune
  patterns = [re.compile(p) for p in f.freeze]
  used = [False] * len(patterns)
  frozen, scale = set(), {}
  for top, tree in params.items():
    ids, num = layer_ids(tree) if top != "head" else (None, 0)
    flat = traverse_util.flatten_dict(tree, sep="/")
    layers = {} if ids is None else traverse_util.flatten_dict(ids, sep="/")
    for path in flat:
      name = f"{top}/{path}"
      hits = [bool(p.search(name)) for p in patterns]
      used = [u or h for u, h in zip(used, hits)]
      layer = layers.get(path)
      if any(hits) or (layer is not None and layer < f.freeze_layers):
        frozen.add(name)
      elif layer is None:
        scale[name] = 1.0
      else:
        decay = f.layer_decay ** (num + 1 - layer)
        scale[name] = f.backbone_lr_scale * decay
  unused = [p.pattern for p, u in zip(patterns, used) if not u]
  if unused:
    raise ValueError(
      f"config.finetune.freeze pattern(s) {unused} match no parameter; "
      "names look like 'video/Transformer/encoderblock_0/...'."
    )
  return frozen, scale


def trainable(params: dict, frozen: set) -> dict:
  """The nested params without the frozen ones."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict(
    {k: v for k, v in flat.items() if k not in frozen}, sep="/"
  )


def merge(params: dict, part: dict) -> dict:
  """`params` with the leaves of `part` (a subset of its names) replaced."""
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update(traverse_util.flatten_dict(part, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def scale_by_tree(scales: dict) -> optax.GradientTransformation:
  """Multiplies each update by its constant (learning-rate groups)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config, scales: dict) -> optax.GradientTransformation:
  """PyTorch-parity AdamW(+AMSGrad) (optim.py) over the trainable params,
  per-parameter learning rates `scales` x the injected learning rate."""
  tc = config.train
  nested = traverse_util.unflatten_dict(scales, sep="/")

  @optax.inject_hyperparams
  def adamw(learning_rate):
    return optax.chain(
      optim.scale_by_adam_torch(tc.b1, tc.b2, tc.eps, tc.amsgrad),
      optax.add_decayed_weights(tc.weight_decay),
      optax.scale_by_learning_rate(learning_rate),
      scale_by_tree(nested),
    )

  return adamw(learning_rate=tc.learning_rate)
