#!/usr/bin/env python
"""Does int8 (ONNX Runtime, int8 weights) keep the starter model's retrieval figures?

Embeds the ChestX-ray14 test split (committed split) and the Kermany paediatric set (all
subjects with 2+ images) with eager float32 and with every other backend, and prints the
retrieval figures side by side with their difference in points, and how much each backend moves
the distances between the images (`auto`'s distance rule; not a test). The issue's rule:
int8 is acceptable for a model only where every figure moves by at most 0.5 points.

    python Testing/benchmark_int8_retrieval.py [--backends bf16,bf16-mixed,onnx,onnx-int8] [--model CKPT]
    python Testing/benchmark_int8_retrieval.py --static-int8 64   # and a static int8 candidate

``--static-int8 N`` adds ``int8-static``: ONNX Runtime static quantisation (QDQ, int8 weights
per channel, uint8 activations with min-max ranges from N training-split images of both
sources, never test images) with the network's last residual block, pooling and head left in
float32 (the part bf16 cannot take either). Not an engine backend: it answers whether one
would be worth building (the engine's ``onnx-int8`` quantises dynamically, which needs no
calibration images).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DISTANCE_ROWS = 500


def records(name: str, part: str = None):
    """The images of shared data set ``name``; only its committed split's ``part`` if given."""
    from fingerprint_training.splits import load_split, records_in
    from subject_fingerprint.io import discover

    found = discover([str(DATA / name / "images")], manifest=str(DATA / name / "manifest.csv")).records
    if part is None:
        return found
    return records_in(found, load_split(ROOT / "Resources" / "Splits" / f"{name}-seed42.json"), part)


def subsets(model):
    from fingerprint_training.data import preload

    yield "NIH test split", preload(records("cxr14-subset-64px", "test"), model.preprocessing,
                                    progress=False)
    found = records("kermany-peds-128px")
    counts = {}
    for r in found:
        counts[r.subject_id] = counts.get(r.subject_id, 0) + 1
    chosen = [r for r in found if counts[r.subject_id] >= 2]
    yield "Kermany (2+ images)", preload(chosen, model.preprocessing, progress=False)


def static_int8_runner(model, n_images: int, folder: Path):
    """An ONNX Runtime session of ``model`` quantised statically (see the module docstring)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from fingerprint_training.data import preload
    from subject_fingerprint import backends

    images = []
    for name in ("cxr14-subset-64px", "kermany-peds-128px"):
        train = records(name, "train")[:n_images // 2]
        images.append(preload(train, model.preprocessing, progress=False).images.numpy())
    images = np.concatenate(images).astype(np.float32)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": images[i:i + 8]} for i in range(0, len(images), 8)])

        def get_next(self):
            return next(self.batches, None)

    fp32 = backends.export_onnx(model, "fp32")
    pre, out = folder / "pre.onnx", folder / "int8-static.onnx"
    quant_pre_process(str(fp32), str(pre))
    nodes = [n.name for n in onnx.load(str(pre)).graph.node]
    blocks = [n.split("/")[2] for n in nodes if n.count("/") > 2 and n.startswith("/layer")]
    last_block = f"/{blocks[-1].split('.')[0]}/{blocks[-1]}/"  # e.g. /layer4/layer4.1/
    first_float = next(i for i, n in enumerate(nodes) if n.startswith(last_block))
    quantize_static(str(pre), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=nodes[first_float:])
    print(f"(int8-static: {len(images)} calibration images; float32 from {last_block} on, "
          f"{len(nodes) - first_float} of {len(nodes)} nodes)", file=sys.stderr)
    return backends.OnnxRunner(out, name="int8-static")


def main(argv=None) -> int:
    import torch

    from fingerprint_training import metrics as M
    from subject_fingerprint import backends
    from subject_fingerprint.checkpoint import default_model_path, load_checkpoint
    from subject_fingerprint.embed import mean_over_views

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="bf16,bf16-mixed,onnx,onnx-int8")
    parser.add_argument("--model", help="checkpoint (default: the bundled starter model)")
    parser.add_argument("--static-int8", type=int, default=0, metavar="N",
                        help="also a statically quantised candidate, calibrated on N training images")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.model or default_model_path())
    views = model.preprocessing.view_shifts()
    cpu = torch.device("cpu")
    names = ["torch"] + args.backends.split(",")
    runners = {}
    for name in names:
        try:
            runners[name] = backends.make_runner(model, name, cpu)
        except ValueError as exc:
            print(f"({name}: {exc})", file=sys.stderr)
    runners["torch"] = backends.TorchRunner(model.network, cpu, 2, channels_last=False)
    if args.static_int8:
        scratch = tempfile.TemporaryDirectory(prefix="int8-static-")  # kept until the end
        runners["int8-static"] = static_int8_runner(model, args.static_int8, Path(scratch.name))
    print(f"Model {model.model_id}; retrieval figures in % (difference to float32 in points)\n")
    for title, ds in subsets(model):
        labels = np.array(ds.subject_ids())
        figures, embedded, seconds = {}, {}, {}
        for name, runner in runners.items():
            # As the Embedder does: the mean over the model's test-time views, if it has any.
            runner(torch.as_tensor(ds.images[:8]))  # warm-up (graph optimisation, allocations)
            start = time.perf_counter()
            emb = np.concatenate([
                mean_over_views(runner, torch.as_tensor(ds.images[i:i + 64]), views).numpy()
                for i in range(0, len(ds.images), 64)])
            seconds[name] = time.perf_counter() - start
            embedded[name] = emb
            figures[name] = M.retrieval_metrics(emb.astype(np.float64), labels)
        keys = [k for k, v in figures["torch"].items() if isinstance(v, float)]
        print(f"### {title}: {len(labels)} images\n")
        print("| figure | " + " | ".join(runners) + " |")
        print("|---|" + "---|" * len(runners))
        worst = {n: 0.0 for n in runners}
        for k in keys:
            ref = 100 * figures["torch"][k]
            cells = [f"{ref:.2f}"]
            for n in list(runners)[1:]:
                v = 100 * figures[n][k]
                worst[n] = max(worst[n], abs(v - ref))
                cells.append(f"{v:.2f} ({v - ref:+.2f})")
            print(f"| {k} | " + " | ".join(cells) + " |")
        # What auto's distance rule measures, here on real images (all pairs of the first 500).
        cells = [f"{100 * backends.distance_error(embedded['torch'][:DISTANCE_ROWS], embedded[n][:DISTANCE_ROWS]):.2f}"
                 for n in runners]
        print(f"| pairwise distance change vs float32, median % (first {DISTANCE_ROWS} images) | "
              + " | ".join(cells) + " |")
        print("| smallest cosine to float32 | "
              + " | ".join(f"{backends.min_cosine(embedded['torch'], embedded[n]):.5f}" for n in runners) + " |")
        print("| ms per image (batches of 64, default threads, this run's load) | "
              + " | ".join(f"{1000 * seconds[n] / len(labels):.2f}" for n in runners) + " |")
        print("\nlargest change in points: " + ", ".join(
            f"{n} {worst[n]:.2f}" for n in list(runners)[1:]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
