"""A PyTorch 3-D ShuffleNet-V2 built from torchvision's 2-D modules.

Parity and cost references, not used by the library: importing divita_jax
never imports this module or torch. No package ships Efficient-3DCNNs'
3-D ShuffleNet, so its topology (stem stride (1, 2, 2), pool and stage
strides 2 in T) is torchvision's net with every 2-D layer inflated.
"""

import torch


def shuffle_any_rank(x, groups):
  """torchvision's `channel_shuffle` for [N, C, ...] of any rank."""
  b, c = x.shape[:2]
  x = x.view(b, groups, c // groups, *x.shape[2:]).transpose(1, 2)
  return x.reshape(b, c, *x.shape[3:])


def inflate_layers(module):
  """torch 2-D layers -> 3-D ones with the same kernel, stride, groups."""
  tnn = torch.nn
  for name, child in module.named_children():
    if isinstance(child, tnn.Conv2d):
      k, s, p = child.kernel_size[0], child.stride[0], child.padding[0]
      new = tnn.Conv3d(
        child.in_channels, child.out_channels, k, s, p,
        groups=child.groups, bias=False,
      )  # fmt: skip
    elif isinstance(child, tnn.BatchNorm2d):
      new = tnn.BatchNorm3d(child.num_features)
    elif isinstance(child, tnn.MaxPool2d):
      new = tnn.MaxPool3d(3, 2, 1)
    else:
      inflate_layers(child)
      continue
    setattr(module, name, new)


class ShuffleNet3D(torch.nn.Module):
  """Pooled features of an inflated torchvision ShuffleNet-V2; its
  state_dict keys are torchvision's (no classifier)."""

  def __init__(self, net):
    super().__init__()
    self.conv1, self.maxpool = net.conv1, net.maxpool
    self.stage2, self.stage3, self.stage4 = net.stage2, net.stage3, net.stage4
    self.conv5 = net.conv5

  def forward(self, x):  # [N, 3, T, H, W] -> [N, C]
    for layer in (self.conv1, self.maxpool, self.stage2, self.stage3):
      x = layer(x)
    x = self.conv5(self.stage4(x))
    return x.mean(dim=(2, 3, 4))


def shufflenet3d(tv, arch: str = "shufflenet_v2_x1_0") -> ShuffleNet3D:
  """torchvision's `arch` inflated to 3-D, eval mode.

  Sets torchvision's `channel_shuffle` to `shuffle_any_rank` for good: the
  3-D blocks need it when they run, and it equals the original on the 2-D
  nets' 4-D tensors.
  """
  tv.models.shufflenetv2.channel_shuffle = shuffle_any_rank
  net = getattr(tv.models, arch)()
  inflate_layers(net)
  net.conv1[0].stride = (1, 2, 2)
  return ShuffleNet3D(net).eval()
