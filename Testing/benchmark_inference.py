#!/usr/bin/env python
"""Inference throughput of the fingerprint ResNets at the default input sizes.

Network: images/s of the 2D (256x256) and 3D (96x96x96) ResNet-50 (sizes from
``Preprocessing.default``) at batch sizes 1 and 8, in PyTorch's default memory format
and, with ``--channels-last``, also in channels-last. Preprocessing: ms per image for a
typical full-size input (a 2500x2048 radiograph, a 155x240x240 MR volume) to the default
network input. Prints Markdown tables. Usage::

    python Testing/benchmark_inference.py [--device cpu] [--iterations 5] [--threads N]
                                          [--depth 50] [--batches 1,8] [--channels-last]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time


def measure(network, shape, batch, iterations, device, autocast, memory_format=None):
    """(best, median) images per second of ``network`` on random input ``(batch, 1, *shape)``.

    Each forward pass is timed on its own: on a shared machine the best pass is the
    closest to what the hardware can do, the median to what a user saw at that moment.
    """
    import statistics

    import torch

    x = torch.randn((batch, 1) + tuple(shape), device=device)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    times = []
    with torch.inference_mode(), autocast():
        network(x)  # warm-up (allocations, cuDNN autotuning)
        for _ in range(iterations):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            network(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return batch / min(times), batch / statistics.median(times)


def preprocessing_ms(dims, repeats=3):
    """Milliseconds to preprocess one typical full-size image to the default input."""
    import numpy as np

    from subject_fingerprint.preprocess import Preprocessing
    from subject_fingerprint.records import ImageRecord, LoadedImage

    rng = np.random.default_rng(0)
    if dims == 2:
        array, spacing, what = rng.gamma(2.0, 500.0, (2500, 2048)), (0.139, 0.139), "2500x2048 radiograph"
    else:
        array, spacing, what = rng.gamma(2.0, 100.0, (155, 240, 240)), (1.0, 1.0, 1.0), "155x240x240 MR volume"
    loaded = LoadedImage(array.astype(np.float32), spacing, ImageRecord("bench", "s", "i"), content_hash="-")
    pre = Preprocessing.default(dims)
    pre.apply(loaded)
    start = time.perf_counter()
    for _ in range(repeats):
        pre.apply(loaded)
    return what, pre, 1000 * (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    import torch

    from subject_fingerprint.device import resolve_device
    from subject_fingerprint.model import build_network
    from subject_fingerprint.preprocess import Preprocessing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--iterations", type=int, default=5, help="timed forward passes per row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dims", default="2,3", help="which networks: 2, 3 or 2,3")
    parser.add_argument("--channels-last", action="store_true",
                        help="also time channels-last memory format")
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
    dims_list = [int(d) for d in args.dims.split(",")]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average at start {load}, {args.iterations} timed passes per row, "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    formats = [("default", None)]
    print("| network | input | batch | memory format | images/s (best pass) | ms/image (best) "
          "| images/s (median pass) |")
    print("|---|---|---|---|---|---|---|")
    for dims in dims_list:
        shape = Preprocessing.default(dims).size
        torch.manual_seed(0)
        network = build_network(dims, args.depth, 128).to(device).eval()
        formats = [("default", None)]
        if args.channels_last:
            formats.append(("channels-last", torch.channels_last if dims == 2 else torch.channels_last_3d))
        for batch in batches:
            for name, memory_format in formats:
                net = network.to(memory_format=memory_format) if memory_format is not None else \
                    network.to(memory_format=torch.contiguous_format)
                best, median = measure(net, shape, batch, args.iterations, device, autocast,
                                       memory_format)
                size = "x".join(str(s) for s in shape)
                print(f"| {dims}D ResNet-{args.depth} | {size} | {batch} | {name} | {best:.2f} | "
                      f"{1000 / best:.0f} | {median:.2f} |", flush=True)
        del network

    print("\n| preprocessing (one image, main thread) | to | ms/image |")
    print("|---|---|---|")
    for dims in dims_list:
        what, pre, ms = preprocessing_ms(dims)
        print(f"| {what} | {'x'.join(str(s) for s in pre.size)} | {ms:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
