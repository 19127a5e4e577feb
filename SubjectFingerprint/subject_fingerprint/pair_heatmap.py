"""What drove a match: Grad-CAM of a pair's similarity, for each image of the pair.

The fingerprint network has no classes; the quantity explained is the similarity of the two
images, ``-||f(x) - f(y)||``, with the other image's embedding held fixed. MONAI's
``GradCAM`` then weights the last convolutional stage's activations by the gradient of that
similarity, so warm regions are those whose features pull the two embeddings together. For a
model with test-time views (``Preprocessing.test_shift``) it explains the unshifted view, the
one whose pixels the thumbnails show.
"""

from __future__ import annotations

import base64
import io
from typing import Optional, Tuple

import numpy as np

# The third residual stage: at 64 px inputs the last one is 2 x 2 and often all negative.
TARGET_LAYER = "network.layer3"


def _similarity_module(network, target):
    import torch

    class Similarity(torch.nn.Module):
        """One 'logit': the negative distance of the embedding to a fixed target."""

        def __init__(self):
            super().__init__()
            self.network = network

        def forward(self, x):
            return -torch.linalg.vector_norm(self.network(x) - target, dim=1, keepdim=True)

    return Similarity()


def _input(model, source: str):
    import torch

    from .io import read_image

    loaded = read_image(source)
    model.check_image(loaded)
    return torch.from_numpy(model.preprocessing.apply(loaded)[None]).float()


def pair_heatmaps(model, source_a: str, source_b: str) -> Tuple[np.ndarray, np.ndarray,
                                                                np.ndarray, np.ndarray]:
    """(heat_a, heat_b, input_a, input_b): 2D maps in [0, 1] at the network's input size
    (the middle slice for 3D models), with the preprocessed inputs they belong to."""
    import torch
    from monai.visualize import GradCAM

    network = model.network
    was_training = network.training
    network.eval()
    try:
        xa, xb = _input(model, source_a), _input(model, source_b)
        with torch.no_grad():
            ea, eb = network(xa), network(xb)
        maps = []
        for x, other in ((xa, eb), (xb, ea)):
            cam = GradCAM(nn_module=_similarity_module(network, other.detach()),
                          target_layers=TARGET_LAYER)
            maps.append(cam(x.clone().requires_grad_(True), class_idx=0).detach().numpy()[0, 0])
    finally:
        network.train(was_training)
    inputs = [xa.numpy()[0, 0], xb.numpy()[0, 0]]
    if maps[0].ndim == 3:  # 3D: the middle slice of the first axis
        maps = [m[m.shape[0] // 2] for m in maps]
        inputs = [v[v.shape[0] // 2] for v in inputs]
    return maps[0], maps[1], inputs[0], inputs[1]


def overlay_uri(image: np.ndarray, heat: np.ndarray, size: int = 160) -> str:
    """A PNG data URI: the grey input with the heatmap blended over it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image

    grey = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    h = np.asarray(heat, dtype=np.float64)
    h = (h - h.min()) / (h.max() - h.min()) if h.max() > h.min() else np.zeros_like(h)
    colour = colormaps["jet"](h)[..., :3]
    blend = 0.55 * grey[..., None] + 0.45 * colour
    picture = Image.fromarray((blend * 255).astype(np.uint8))
    picture = picture.resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmaps_for_pairs(model, datasets, image_pairs, limit: int = 60) -> dict:
    """``{(dataset, row, other dataset, other row): data URI}`` for up to ``limit`` image
    pairs; a pair whose files cannot be read again is left out (the report says so)."""
    out: dict = {}
    done = 0
    for ip in image_pairs:
        if done >= limit:
            break
        key_a, key_b = (ip.a, ip.i, ip.b, ip.j), (ip.b, ip.j, ip.a, ip.i)
        if key_a in out:
            continue
        try:
            ha, hb, xa, xb = pair_heatmaps(model, str(datasets[ip.a].sources[ip.i]),
                                           str(datasets[ip.b].sources[ip.j]))
        except Exception:  # noqa: BLE001 - a missing heatmap must not stop the report
            continue
        out[key_a], out[key_b] = overlay_uri(xa, ha), overlay_uri(xb, hb)
        done += 1
    return out


def heatmap_available(model) -> Optional[str]:
    """None when the model's network has the layer Grad-CAM explains, else why not."""
    names = {name for name, _ in model.network.named_modules()}
    return None if TARGET_LAYER.split(".", 1)[1] in names else f"no layer {TARGET_LAYER}"
