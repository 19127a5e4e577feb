#!/usr/bin/env python
"""Inference throughput of the fingerprint ResNets (network only, no decoding).

Prints a Markdown table of images/s for the 2D (256x256) and 3D (96^3) ResNet-50 at
batch sizes 1 and 8. Usage::

    python Testing/benchmark_inference.py [--device cpu] [--iterations 3] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time


def measure(network, shape, batch, iterations, device, autocast):
    import torch

    x = torch.randn((batch, 1) + shape, device=device)
    with torch.inference_mode(), autocast():
        network(x)  # warm-up (allocations, cuDNN autotuning)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iterations):
            network(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return batch * iterations / seconds


def main(argv=None) -> int:
    import contextlib

    import torch

    from subject_fingerprint.device import resolve_device
    from subject_fingerprint.model import build_network

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, notice = resolve_device(args.device)
    if notice:
        print(notice)

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    batches = [int(b) for b in args.batches.split(",")]
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, iterations {args.iterations}\n")
    print("| model | input | batch | images/s | ms/image |")
    print("|---|---|---|---|---|")
    for dims, shape in ((2, (256, 256)), (3, (96, 96, 96))):
        torch.manual_seed(0)
        network = build_network(dims, args.depth, 128).to(device).eval()
        for batch in batches:
            rate = measure(network, shape, batch, args.iterations, device, autocast)
            size = "x".join(str(s) for s in shape)
            print(f"| {dims}D ResNet-{args.depth} | {size} | {batch} | {rate:.1f} | {1000 / rate:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
