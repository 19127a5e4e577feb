"""The ``bf16-mixed`` backend's network: bfloat16 where rounding is harmless, float32 where it
is not.

A trained fingerprint network's distances are most sensitive to rounding in its last ResNet
stage and head: there the features of different subjects differ by a few per cent of their
size, and bfloat16's 8-bit mantissa moves the starter model's distances by 12.9 %. The stem
and the first stages, most of the arithmetic, tolerate it (0.4 % with the last stage in float32;
``Testing/benchmark_bf16_stages.py``). Imported by :mod:`.backends` only when that backend is
built.

Each part also gets its own memory layout: channels-last for the stem and first stages (NCHW
convolutions there measured up to 8x slower), and for the last stage NCHW when its input is a
few pixels across: oneDNN's channels-last kernels took 47 ms against 15 ms for the starter's
last stage at 4 x 4 pixels (batch 64), and lost at every size up to 8 x 8 (2D) and 5 x 8 x 8
(3D), while at 32 x 32 channels-last won by 1.1-1.6x (2026-12-03, the AMX machine).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from monai.networks.nets import ResNet
from torch import nn
from torch.fx.experimental.optimization import fuse


def _split_resnet(network):
    """``(pre, resnet)``: the MONAI ResNet inside ``network`` and what runs before it (the
    canonical-pose layer, or None); raises ValueError for another network."""
    if isinstance(network, ResNet):
        return None, network
    inner, pose = getattr(network, "resnet", None), getattr(network, "pose", None)
    if isinstance(inner, ResNet) and pose is not None:
        return pose, inner
    raise ValueError(f"{type(network).__name__} is not a MONAI ResNet")


# The last stage runs NCHW when its input has at most this many pixels/voxels per channel.
SMALL_STAGE_INPUT = 512


def _front(resnet) -> list:
    """The stem and every stage but the last, in the order ``ResNet.forward`` runs them."""
    stem = [resnet.conv1, resnet.bn1, resnet.act] + ([] if resnet.no_max_pool else [resnet.maxpool])
    return [*stem, resnet.layer1, resnet.layer2, resnet.layer3]


def _small_last_stage(resnet, size) -> bool:
    """Whether the input of ``resnet``'s last stage, for inputs of ``size`` (None: unknown),
    has at most SMALL_STAGE_INPUT pixels (voxels) per channel; from a forward pass on the meta
    device (shapes only, no arithmetic)."""
    if size is None:
        return False
    front = copy.deepcopy(nn.Sequential(*_front(resnet))).to("meta")
    with torch.no_grad():
        h = front(torch.empty((1, int(resnet.conv1.in_channels), *size), device="meta"))
    return int(np.prod(h.shape[2:])) <= SMALL_STAGE_INPUT


def bf16_mixed_network(network, size=None):
    """An inference copy of ``network`` (a MONAI ResNet, optionally behind the canonical-pose
    layer) whose stem and first stages run in bfloat16 with BatchNorm folded, and whose last
    stage, pooling and head run in float32 (:class:`StagedPrecision`), each part in the memory
    layout that suits inputs of ``size`` (the model's input size; module doc). Checked at build
    time to compute what ``network`` computes (in float32), so a ResNet whose forward differs
    from the stage sequence is refused rather than run wrongly. An ensemble gets this copy of
    each member."""
    members = _ensemble_members(network)
    if members is not None:
        return _rebuilt(network, [bf16_mixed_network(m, s) for m, s in members])
    try:
        _, resnet = _split_resnet(network)
        return _staged(network, _small_last_stage(resnet, size)).to_low_precision()
    except ValueError as exc:
        raise ValueError(f"bf16-mixed: {exc}; use --backend bf16 or torch") from None


def float32_staged_network(network, size):
    """For the float32 ``torch`` backend on the CPU: ``network`` laid out per part as
    :func:`bf16_mixed_network` does, all in float32, when its last stage is small enough to
    run faster NCHW (the starter's whole network: about 1.5x); None when the plain
    channels-last network is as good, or ``network`` is not a ResNet run as its stages. An
    ensemble gets it for each member that gains from it."""
    members = _ensemble_members(network)
    if members is not None:
        staged = [float32_staged_network(m, s) for m, s in members]
        if all(x is None for x in staged):
            return None
        return _rebuilt(network, [x if x is not None else copy.deepcopy(m).eval()
                                  for x, (m, _) in zip(staged, members)])
    try:
        _, resnet = _split_resnet(network)
        # Decided before anything is built: for a large last stage nothing is.
        return _staged(network, nchw_last_stage=True) if _small_last_stage(resnet, size) else None
    except ValueError:
        return None


def _ensemble_members(network):
    """``[(member, input size)]`` of an ensemble network, None for any other network."""
    from .ensemble import EnsembleNetwork

    if isinstance(network, EnsembleNetwork):
        return list(zip(network.members, network.sizes))
    return None


def _rebuilt(ensemble, members):
    """An ensemble network like ``ensemble`` whose members are ``members``."""
    from .ensemble import EnsembleNetwork

    return EnsembleNetwork(members, ensemble.sizes).eval()


def _staged(network, nchw_last_stage: bool) -> "StagedPrecision":
    """The float32 :class:`StagedPrecision` of a copy of ``network``, checked to compute what
    ``network`` computes."""
    net = copy.deepcopy(network).float().eval()
    pre, resnet = _split_resnet(net)
    staged = StagedPrecision(resnet, pre, nchw_last_stage)  # fuse() copies: net stays as it was
    shape = (1, int(resnet.conv1.in_channels)) + (32,) * (resnet.conv1.weight.dim() - 2)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = net(x), staged(x)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-3, atol=1e-4):
        raise ValueError("this network does not run as its stages in sequence")
    return staged


class StagedPrecision(nn.Module):
    """``pre`` (float32), then ``low`` = stem + all stages but the last (in ``low_dtype``:
    float32 until :meth:`to_low_precision`, then bfloat16), then ``high`` = last stage +
    pooling + flatten + head (float32). Autocast is switched off inside, so the precision of
    each part is the one stated here whatever context the caller runs it in; so is the memory
    layout: channels-last for ``low``, and for ``high`` too unless ``nchw_last_stage``."""

    def __init__(self, resnet, pre=None, nchw_last_stage: bool = False):
        super().__init__()
        self.pre = pre
        self.low_dtype = torch.float32
        self.low = fuse(nn.Sequential(*_front(resnet)))
        self.high = fuse(nn.Sequential(resnet.layer4, resnet.avgpool, nn.Flatten(1),
                                       resnet.fc if resnet.fc is not None else nn.Identity()))
        dims = resnet.conv1.weight.dim() - 2
        self.low_format = torch.channels_last if dims == 2 else torch.channels_last_3d
        self.high_format = torch.contiguous_format if nchw_last_stage else self.low_format
        self.low = self.low.to(memory_format=self.low_format)
        self.high = self.high.to(memory_format=self.high_format)

    def to_low_precision(self):
        self.low_dtype = torch.bfloat16
        self.low = self.low.to(self.low_dtype)
        return self

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            if self.pre is not None:
                x = self.pre(x.float())
            h = self.low(x.to(self.low_dtype).contiguous(memory_format=self.low_format))
            return self.high(h.float().contiguous(memory_format=self.high_format))
