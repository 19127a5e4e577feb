#!/usr/bin/env python
"""How often is a bf16 convolution's weight gradient non-finite on this CPU?

The case that made the trainer skip steps in the bf16 training test: a ResNet's last stage at
16 px inputs, where a 3x3 stride-2 convolution (256 -> 512 channels) sees a 1x1 input and every
tap but the centre reads padding. Each try builds a fresh convolution and input, runs forward
and backward under CPU bfloat16 autocast (or in float32) and checks the weight gradient.

    python Testing/benchmark_bf16_conv_grad.py [--tries 200] [--size 1] [--dims 3]

``--dims 3`` does the same with a 3x3x3 convolution (the 3D recipes at 32^3 give their last
stage a 2x2x2 input).
"""

from __future__ import annotations

import argparse
import sys


def non_finite_share(tries: int, size: int, channels_last: bool, bf16: bool, dims: int = 2) -> float:
    import torch

    conv_class = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    bad = 0
    for _ in range(tries):
        conv = conv_class(256, 512, 3, stride=2, padding=1, bias=False)
        x = torch.randn(6, 256, *([size] * dims))
        if channels_last:
            conv = conv.to(memory_format=layout)
            x = x.contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x)
        y.float().sum().backward()
        bad += int(not torch.isfinite(conv.weight.grad).all())
    return bad / tries


def main(argv=None) -> int:
    import torch

    from subject_fingerprint.backends import cpu_flags

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=200)
    parser.add_argument("--size", type=int, default=1, help="input height and width (and depth)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    flags = sorted(f for f in cpu_flags() if "bf16" in f or "amx" in f)
    print(f"torch {torch.__version__}; CPU bf16 flags: {' '.join(flags) or 'none'}; "
          f"{args.dims}D input {'x'.join([str(args.size)] * args.dims)}, {args.tries} tries each\n")
    print("| memory format | precision | tries with a non-finite weight gradient |")
    print("|---|---|---|")
    for channels_last in (True, False):
        for bf16 in (True, False):
            share = non_finite_share(args.tries, args.size, channels_last, bf16, args.dims)
            print(f"| {'channels-last' if channels_last else 'NCHW'} | {'bf16 autocast' if bf16 else 'float32'} "
                  f"| {100 * share:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
