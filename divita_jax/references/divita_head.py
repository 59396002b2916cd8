"""The official DIViTA head re-implemented in PyTorch (tests, benchmarks).

Parity references, not used by the library: importing divita_jax never
imports this module or torch. The module structure is the reference's, so
that `TorchHead(...).state_dict()` has the official checkpoints' keys.
"""

import torch

from divita_jax.models.divita import parse_cam


class Fn(torch.nn.Module):
  """A parameter-free step (MoveDim, mean, ...) inside nn.Sequential."""

  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return self.fn(x)


class TorchAttention(torch.nn.Module):
  def __init__(self, h, heads):
    super().__init__()
    self.heads = heads
    self.W_q, self.W_k, self.W_v, self.W_o = (
      torch.nn.Linear(h, h, bias=False) for _ in range(4)
    )

  def forward(self, x):
    b, s, h = x.shape
    # Head-major split of the projected features.
    split = lambda t: t.view(b, s, self.heads, -1).movedim(1, 2)
    q, k, v = split(self.W_q(x)), split(self.W_k(x)), split(self.W_v(x))
    w = torch.softmax(q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5, -1)
    return self.W_o((w @ v).movedim(1, 2).reshape(b, s, h))


class TorchBlock(torch.nn.Module):
  def __init__(self, h, heads, ff_mult, dropout):
    super().__init__()
    self.attention = TorchAttention(h, heads)
    self.norm1, self.norm2 = torch.nn.LayerNorm(h), torch.nn.LayerNorm(h)
    self.dropout = torch.nn.Dropout(dropout)
    self.ff = torch.nn.Sequential(
      torch.nn.Linear(h, ff_mult * h),
      torch.nn.ReLU(),
      torch.nn.Linear(ff_mult * h, h),
    )

  def forward(self, x):
    x = self.dropout(self.norm1(self.attention(x) + x))
    return self.dropout(self.norm2(self.ff(x) + x))


def torch_cam(f, cam):
  """(CAM on [B, F, S] as in the reference, its output width)."""
  kind, kw = parse_cam(cam)
  move = Fn(lambda x: x.movedim(1, 2))
  if kind == "tsfm":
    h = kw["hidden"]
    block = TorchBlock(h, kw["heads"], kw["ff_mult"], kw["dropout"])
    mean = Fn(lambda x: x.mean(1))
    return torch.nn.Sequential(move, torch.nn.Linear(f, h), block, mean), h
  if kind == "gru":
    h = kw["hidden"]
    gru = torch.nn.GRU(f, h, kw["layers"], batch_first=True)
    steps = [Fn(lambda x: x[0]), torch.nn.ReLU(), Fn(lambda x: x.mean(1))]
    return torch.nn.Sequential(move, gru, *steps), h
  if kind == "conv":
    steps, c = [], f
    for i, (k, n) in enumerate(kw["layers"]):
      steps += [torch.nn.Conv1d(c, n, k, 1, 1), torch.nn.ReLU()]
      if i < len(kw["layers"]) - 1:
        steps.append(torch.nn.AvgPool1d(2, 2))
      c = n
    return torch.nn.Sequential(*steps, Fn(lambda x: x.mean(2))), c
  return torch.nn.Sequential(Fn(lambda x: x.mean(2)), torch.nn.ReLU()), f


class TorchHead(torch.nn.Module):
  """One DIViTA branch: BatchNorm over features, the CAM, the classifier."""

  def __init__(self, f, cam, classes=10):
    super().__init__()
    self.bn = torch.nn.BatchNorm1d(f)
    self.cam, h = torch_cam(f, cam)
    self.cls = torch.nn.Linear(h, classes)

  def forward(self, x):  # [B, S, F], as our inputs.
    return self.cls(self.cam(self.bn(x.transpose(1, 2))))
