#!/usr/bin/env python
"""The checks that need a GPU, in one short run on a lent GPU machine (not a test; no GPU in CI).

Each section prints a markdown table; a section that fails prints its error and the next runs.

``train``      seconds per step of every recipe in the shipped models' chains
               (``reproduce_models.RECIPES``, their own arguments) on the GPU with the trainer's
               mixed precision, against a few steps on the same machine's CPU, and each
               recipe's projected time (steps x s/step). The batches are synthetic ones of the
               recipe's shape (subjects x images, input size, modalities): the shared data do
               not all fit into the transfer to a lent machine, and a step's cost does not
               depend on which pixels it sees.
``cli``        a short real ``train`` on the NIH X-rays on the GPU (AMP, validation,
               checkpoint, calibration), then ``evaluate`` of the shipped 2D starter on the NIH
               test split on the GPU and on the CPU: the figures must agree.
``inference``  ResNet-50 at 512x512 (batch 1 and 8) and 78x120x120 in float32 and in the
               project's CUDA path (float16 autocast): ms per image, min cosine and distance
               change against float32.
``index``      ``index`` of the 1000 NIH PNGs with the starter on the GPU against decoding
               alone (issue 12's index line), and the re-index.

    python Testing/device_check.py --data ../shared/data --out runs/device
    python Testing/device_check.py --tiny --device cpu --out /tmp/dc   # the script itself, here

``Testing/device_check.sh`` prepares what a lent machine lacks (the NIH images, the wheels of
MONAI, pydicom and pytorch-metric-learning) and prints the one command to run there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchmark_machine as bench  # noqa: E402
import reproduce_models as repro  # noqa: E402

NIH = repro.NIH
SECTIONS = ("train", "cli", "inference", "index")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recipe_config(name: str, device: str):
    """Recipe ``name``'s TrainConfig as its ``train`` command would make it (no files)."""
    from fingerprint_training.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "synthetic", *repro.RECIPES[name]["args"],
                                      "--device", device, "--out", "unused", "--quiet"])
    return replace(config_from_args(args), init_from=None, write_outputs=False, calibrate=False)


def synthetic_like(cfg, n_subjects: int):
    """Subjects x images of ``cfg``'s shape; three modalities per subject for a cross-modal one."""
    from fingerprint_training.data import from_arrays, synthetic_dataset

    ds = synthetic_dataset(n_subjects=n_subjects, images_per_subject=max(3, cfg.images_per_subject),
                           size=tuple(cfg.size))
    if cfg.cross_modal:
        names = ("pre", "flair", "post")
        ds = from_arrays(ds.images, ds.subject_ids(), [names[i % 3] for i in range(len(ds))])
    return ds


def seconds_per_step(cfg, steps: int, warm: int = 3) -> float:
    """Metric-learning steps of ``cfg`` timed after ``warm`` untimed ones."""
    import torch

    from fingerprint_training.trainer import Trainer

    ds = synthetic_like(cfg, n_subjects=max(8, 2 * cfg.batch_subjects))
    trainer = Trainer(cfg, ds)
    first = cfg.pretrain_steps  # the metric phase; a pretraining step moves as many images
    for s in range(first, first + warm):
        trainer.train_step(s)
    sync(trainer.device)
    t = time.perf_counter()
    for s in range(first + warm, first + warm + steps):
        trainer.train_step(s)
    sync(trainer.device)
    out = (time.perf_counter() - t) / steps
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def section_train(args, device) -> None:
    import torch

    from fingerprint_training.trainer import _amp_for

    from subject_fingerprint.backends import cpu_cores

    chain = repro.with_prerequisites(list(repro.SHIPPED), Path("/nonexistent"))
    cores = cpu_cores()  # those this process may use (a container's share), as torch threads
    print(f"\n### Training steps on {device} and on this machine's CPU ({cores} torch threads), "
          f"synthetic batches of each recipe's shape ({bench.load()})\n")
    print("| recipe | input | batch (subjects x images) | precision GPU / CPU | s/step GPU | "
          "s/step CPU | CPU / GPU | steps | projected GPU s | projected CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def precision(dev):
        amp, dtype = _amp_for(dev, cfg.amp, cfg.cpu_bf16)
        return str(dtype).replace("torch.", "") if amp else "float32"

    total = {"gpu": 0.0, "cpu": 0.0}
    for name in chain:
        cfg = recipe_config(name, str(device))
        if args.tiny:
            cfg = replace(cfg, size=tuple(min(s, 32) for s in cfg.size), batch_subjects=4,
                          images_per_subject=2, steps=10, depth=10)
        on_gpu = seconds_per_step(cfg, args.train_steps)
        on_cpu = seconds_per_step(replace(cfg, device="cpu", threads=cores), args.cpu_steps, warm=1)
        total["gpu"] += on_gpu * cfg.steps
        total["cpu"] += on_cpu * cfg.steps
        print(f"| {name} | {'x'.join(map(str, cfg.size))} | {cfg.batch_subjects} x {cfg.images_per_subject} | "
              f"{precision(device)} / {precision(torch.device('cpu'))} | {on_gpu:.3f} | {on_cpu:.3f} | "
              f"{on_cpu / on_gpu:.1f} | {cfg.steps} | {on_gpu * cfg.steps:.0f} | {on_cpu * cfg.steps:.0f} |")
    print(f"\nthe chain's steps alone (no validation or data loading): {total['gpu']:.0f} s on the GPU, "
          f"{total['cpu']:.0f} s on this CPU")


def _run(cmd, log: Path) -> float:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {' '.join(cmd)} (log: {log}):\n"
                           + log.read_text()[-3000:])
    return time.perf_counter() - t


def section_cli(args, device) -> None:
    data = args.data / NIH
    split = repro.SPLITS / f"{NIH}-seed42.json"
    out = args.out / "cli"
    out.mkdir(parents=True, exist_ok=True)
    steps = 4 if args.tiny else 60
    size = ["--size", "32", "32"] if args.tiny else []
    train_args = list(repro.RECIPES["joint128-sslft-long"]["args"])  # the shipped 2D recipe's
    train = [*repro.CLI, "train", f"NIH={data}", "--split", f"NIH={split}", "--out", str(out / "train"),
             *train_args, "--steps", str(steps), "--val-every", str(steps // 2), *size,
             "--device", str(device), "--quiet"]
    train_s = _run(train, out / "train.log")
    text = (out / "train.log").read_text()
    result = json.loads(text[text.rindex("{\n"):]) if "{\n" in text else {}  # train's printed summary
    log_rows = (out / "train" / "log.csv").read_text().splitlines()
    print(f"\n### A real `train` on the NIH training subjects on {device} ({steps} steps of the shipped "
          f"2D recipe's arguments{', tiny' if args.tiny else ''})\n")
    print(f"{train_s:.1f} s in all (start-up, loading, {steps} steps, 2 validations, calibration); "
          f"log rows {len(log_rows) - 1}; best.pt written: {(out / 'train' / 'best.pt').is_file()}; "
          f"best step {result.get('best_step')}, validation {result.get('best_val_mean_recall')}, "
          f"trainer's clock {result.get('seconds')} s")
    figures = {}
    model = repro.STARTER
    for dev in dict.fromkeys((str(device), "cpu")):  # the CPU as the reference, once
        ev = [*repro.CLI, "evaluate", f"NIH={data}", "--split", f"NIH={split}", "--model", f"starter={model}",
              "--out", str(out / f"eval-{dev.replace(':', '')}"), "--ways", "20", "--shots", "1",
              "--device", dev, "--quiet", *(["--episodes", "5"] if args.tiny else [])]
        seconds = _run(ev, out / f"eval-{dev.replace(':', '')}.log")
        row = json.loads((out / f"eval-{dev.replace(':', '')}" / "cross_domain.json").read_text())["rows"][0]
        figures[dev] = (seconds, row)
    print(f"\n### The shipped 2D starter on the NIH test split, {' and '.join(figures)}\n")
    print("| device | evaluate s | 20-way 1-shot | P@1 | mAP@R | threshold at 1 % |")
    print("|---|---|---|---|---|---|")
    for dev, (seconds, row) in figures.items():
        r = row["retrieval"]["model"]
        print(f"| {dev} | {seconds:.1f} | {row['settings'][0]['model']:.4f} | {r['precision_at_1']:.4f} | "
              f"{r['map_at_r']:.4f} | {row['calibration']['threshold']:.5f} |")


def section_inference(args, device) -> None:
    import torch

    from subject_fingerprint import backends
    from subject_fingerprint.checkpoint import FingerprintModel, load_checkpoint
    from subject_fingerprint.preprocess import Preprocessing

    shapes = [(2, (64, 64)), (3, (16, 24, 24))] if args.tiny else [(2, (512, 512)), (3, (78, 120, 120))]
    depth = 10 if args.tiny else 50
    if device.type == "cuda":
        # The float32 reference in true float32: cuDNN convolutions default to TF32.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(f"\n### ResNet-{depth} inference on {device}, ms per image of 8 embedded in calls of `batch` "
          f"({bench.load()}; TF32 off)\n")
    print("| input | batch | float32 | project's path (`torch`) | float32 / project | min cosine to float32 | "
          "median distance change |")
    print("|---|---|---|---|---|---|---|")
    for dims, size in shapes:
        torch.manual_seed(0)
        model = FingerprintModel.create(dims, depth=depth, embedding_dim=128,
                                        preprocessing=Preprocessing(spatial_dims=dims, size=size))
        fp32 = backends.TorchRunner(model.network, device, dims, input_size=size)
        project = backends.make_runner(model, "torch", device)
        x = backends.check_batch(model, 8)
        ref, out = fp32(x).numpy(), project(x).numpy()
        cosine, moved = backends.min_cosine(ref, out), backends.distance_error(ref, out)
        for batch in ((1, 8) if dims == 2 else (1,)):
            def per_image(run):
                def all_images():
                    for i in range(0, len(x), batch):
                        run(x[i:i + batch])  # returns on the CPU: the copy back synchronises
                return bench.best(all_images, args.repeat) / len(x)

            t32, tp = per_image(fp32), per_image(project)
            print(f"| {dims}D {'x'.join(map(str, size))} | {batch} | {t32 * 1e3:.1f} | {tp * 1e3:.1f} | "
                  f"{t32 / tp:.2f}x | {cosine:.5f} | {moved:.2e} |")
    # The measure that matters: the shipped 2D starter on real NIH images (a random network's
    # embeddings of noise say little about how far a trained model's distances move).
    model = load_checkpoint(repro.STARTER)
    x = nih_inputs(args.data / NIH, model, 64)
    ref = backends.TorchRunner(model.network, device, 2, input_size=model.preprocessing.size)(x).numpy()
    out = backends.make_runner(model, "torch", device)(x).numpy()
    print(f"\nshipped 2D starter, {len(x)} NIH images: min cosine of the project's path to float32 "
          f"{backends.min_cosine(ref, out):.6f}, median distance change {backends.distance_error(ref, out):.2e} "
          f"(auto accepts >= {backends.MIN_COSINE} and <= {backends.MAX_DISTANCE_ERROR})")
    from subject_fingerprint.embed import Embedder

    choice = Embedder(model, device=str(device), backend="auto", progress=False)._decide(first=x)
    print(f"\n`auto` on {device} for it, on these images: {choice.summary()}")


def nih_inputs(folder: Path, model, n: int):
    """The first ``n`` images of ``folder`` preprocessed for ``model``, as ``index`` feeds them."""
    import numpy as np
    import torch

    from subject_fingerprint.embed import _RecordDataset
    from subject_fingerprint.io import discover

    found = discover([str(folder / "images")], manifest=str(folder / "manifest.csv"))
    ds = _RecordDataset(found.records[:n], model.preprocessing, model.spatial_dims, model.modalities, None)
    return torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))


def section_index(args, device) -> None:
    data = args.data / NIH
    if args.tiny:  # a copy of the first 40 images: the section's path, not its timing
        import shutil

        small = args.out / "nih-small"
        rows = (data / "manifest.csv").read_text().splitlines()
        (small / "images").mkdir(parents=True, exist_ok=True)
        for line in rows[1:41]:
            rel = line.split(",")[1]
            (small / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(data / rel, small / rel)
        (small / "manifest.csv").write_text("\n".join(rows[:41]) + "\n")
        data = small
    bench.section_index(args.repeat, device=str(device), data=data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=repro.ROOT.parent / "shared" / "data",
                   help=f"folder holding {NIH} (the shared data, or the copy device_check.sh made)")
    p.add_argument("--out", type=Path, required=True, help="scratch and result folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--train-steps", type=int, default=20, help="timed GPU steps per recipe")
    p.add_argument("--cpu-steps", type=int, default=2, help="timed CPU steps per recipe")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks the script, measures nothing")
    args = p.parse_args(argv)
    import torch

    from subject_fingerprint.device import resolve_device

    device, notice = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    from subject_fingerprint.backends import cpu_cores

    quota = Path("/sys/fs/cgroup/cpu.max")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device {device} ({gpu}); torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}; Python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs, {cpu_cores()} usable, torch threads {torch.get_num_threads()}, cgroup "
          f"cpu.max {quota.read_text().strip() if quota.is_file() else '-'}; {bench.load()}"
          + (f"; {notice}" if notice else ""))
    if os.environ.get("SUBJECT_FINGERPRINT_CACHE") is None:
        os.environ["SUBJECT_FINGERPRINT_CACHE"] = str(args.out / "cache")
    failed = []
    for name in args.only.split(","):
        t = time.perf_counter()
        try:
            globals()[f"section_{name}"](args, device)
        except (Exception, SystemExit):  # one broken section must not hide the others' figures
            failed.append(name)
            print(f"\n### {name}: FAILED\n\n```\n{traceback.format_exc()}```")
        print(f"({name}: {time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n{bench.load()} at the end" + (f"; failed sections: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
