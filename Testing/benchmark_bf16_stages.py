#!/usr/bin/env python
"""Where in the network does bfloat16 move a model's distances? (the reason for ``bf16-mixed``)

Embeds the ChestX-ray14 test split (committed split) with eager float32, then with one part of
the ResNet at a time in bfloat16 (autocast) and the rest in float32, then with bfloat16 from the
stem up to each stage; prints the median relative change of the distances between the images
(`auto`'s distance rule, ``backends.MAX_DISTANCE_ERROR``) for each. Not a test.

    python Testing/benchmark_bf16_stages.py [--model CKPT]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cxr14-subset-64px"


def run_parts(resnet, x, in_bf16):
    """MONAI ResNet forward, part by part, with the parts named in ``in_bf16`` under bf16
    autocast (the same order as ``ResNet.forward``)."""
    import torch

    h = x
    with torch.inference_mode():
        for name, module in resnet.named_children():
            if name == "fc":
                h = torch.flatten(h, 1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name in in_bf16):
                h = module(h if name in in_bf16 else h.float())
    return h.float()


def main(argv=None) -> int:
    import numpy as np
    import torch

    from fingerprint_training.data import preload
    from fingerprint_training.splits import load_split, records_in
    from subject_fingerprint import backends
    from subject_fingerprint.checkpoint import default_model_path, load_checkpoint
    from subject_fingerprint.io import discover

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the bundled starter model)")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.model or default_model_path())
    resnet = getattr(model.network, "resnet", model.network).float().eval()
    if getattr(model.network, "pose", None) is not None:
        print("a canonical-pose model: measured without its pose layer", file=sys.stderr)
    found = discover([str(DATA / "images")], manifest=str(DATA / "manifest.csv"))
    split = load_split(ROOT / "Resources" / "Splits" / "cxr14-subset-64px-seed42.json")
    data = preload(records_in(found.records, split, "test"), model.preprocessing, progress=False)
    x = torch.as_tensor(np.asarray(data.images))
    parts = [name for name, _ in resnet.named_children()]
    reference = run_parts(resnet, x, set()).numpy()
    if not np.allclose(reference, resnet(x).detach().numpy(), rtol=1e-4, atol=1e-5):
        print("this network does not run as its parts in sequence", file=sys.stderr)
        return 1

    def change(in_bf16):
        out = run_parts(resnet, x, in_bf16).numpy()
        return 100 * backends.distance_error(reference, out)

    print(f"Model {model.model_id}, NIH test split ({len(x)} images): median change of the "
          "pairwise distances against float32, %\n")
    print("| in bfloat16 | distance change % |")
    print("|---|---|")
    print(f"| everything | {change(set(parts)):.2f} |")
    for name in parts:
        if any(p.numel() for p in dict(resnet.named_children())[name].parameters()):
            print(f"| only {name} | {change({name}):.2f} |")
    stem = {n for n in parts if not n.startswith("layer") and n not in ("avgpool", "fc")}
    stages = [n for n in parts if n.startswith("layer")]
    for k in range(1, len(stages) + 1):
        label = " + ".join(["stem", *stages[:k]])
        print(f"| {label} (the rest float32) | {change(stem | set(stages[:k])):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
