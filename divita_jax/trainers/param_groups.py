"""Parameter groups and the one optimizer of both training modes.

Names are "<top>/<param path>" over params {'head': ..., branch: ...}.
`layer_ids` numbers each backbone's layers (0 = stem, 1..L = blocks, L + 1 =
after them); `param_groups` turns `config.finetune` (freeze regexes,
freeze_layers, backbone_lr_scale, layer_decay, lr_mults, wd_mults) into the
frozen names and learning-rate / weight-decay multipliers per trainable
name. Frozen parameters are left out of the trained tree (`trainable`):
they get no gradient and no optimizer state at all, which an optax mask
would still compute and store. `make_optimizer` is the PyTorch-parity
AdamW (optim.py), optionally after global-norm gradient clipping.
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


def parse_mults(pairs, field: str) -> list:
  """("regex=factor", ...) -> [(compiled regex, factor)]."""
  out = []
  for pair in pairs:
    pattern, sep, factor = str(pair).rpartition("=")
    try:
      out.append((re.compile(pattern), float(factor)))
    except (re.error, ValueError) as e:
      raise ValueError(
        f"config.finetune.{field} entry {pair!r}: expected 'regex=factor' "
        f"({e})."
      ) from None
    if not sep:
      raise ValueError(
        f"config.finetune.{field} entry {pair!r}: expected 'regex=factor'."
      )
  return out


def _times(mults: list, name: str) -> float:
  out = 1.0
  for pattern, factor in mults:
    if pattern.search(name):
      out *= factor
  return out


def param_groups(config, params: dict) -> tuple[set, dict, dict]:
  """(frozen parameter names "<branch>/<path>", learning-rate multiplier
  and weight-decay multiplier per trainable name) for params
  {'head': ..., branch: ...}."""
  f = config.finetune
  patterns = [re.compile(p) for p in f.freeze]
  lr_mults = parse_mults(f.lr_mults, "lr_mults")
  wd_mults = parse_mults(f.wd_mults, "wd_mults")
  used = [False] * len(patterns)
  frozen, scale, decay = set(), {}, {}
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
        continue
      if layer is None:
        scale[name] = 1.0
      else:
        depth = f.layer_decay ** (num + 1 - layer)
        scale[name] = f.backbone_lr_scale * depth
      scale[name] *= _times(lr_mults, name)
      decay[name] = _times(wd_mults, name)
  unused = [p.pattern for p, u in zip(patterns, used) if not u]
  if unused:
    raise ValueError(
      f"config.finetune.freeze pattern(s) {unused} match no parameter; "
      "names look like 'video/Transformer/encoderblock_0/...'."
    )
  return frozen, scale, decay


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


def decayed_weights(weight_decay: float, mults: dict):
  """optax.add_decayed_weights with a per-parameter multiplier."""

  def update(updates, state, params):
    return (
      jax.tree.map(
        lambda u, p, m: u + (weight_decay * m) * p, updates, params, mults
      ),
      state,
    )

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config, scales=None, decay=None):
  """PyTorch-parity AdamW(+AMSGrad) with an injectable learning rate, for
  both modes: `scales` / `decay` ({name: multiplier} from param_groups)
  give per-parameter learning rates and weight decays; None = 1 for all
  (the frozen head: the reference's optimizer exactly)."""
  tc = config.train
  nest = lambda d: traverse_util.unflatten_dict(d, sep="/")
  uniform = decay is None or all(m == 1.0 for m in decay.values())

  @optax.inject_hyperparams
  def adamw(learning_rate):
    parts = []
    if tc.grad_clip_norm > 0:
      parts.append(optax.clip_by_global_norm(tc.grad_clip_norm))
    parts.append(optim.scale_by_adam_torch(tc.b1, tc.b2, tc.eps, tc.amsgrad))
    if uniform:
      parts.append(optax.add_decayed_weights(tc.weight_decay))
    else:
      parts.append(decayed_weights(tc.weight_decay, nest(decay)))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if scales is not None:
      parts.append(scale_by_tree(nest(scales)))
    return optax.chain(*parts)

  return adamw(learning_rate=tc.learning_rate)
