"""Embedder with the real readers (subject_fingerprint.io.load_image) on files on disk."""

import numpy as np
import pytest
import torch

from subject_fingerprint.checkpoint import FingerprintModel
from subject_fingerprint.embed import Embedder
from subject_fingerprint.preprocess import Preprocessing
from subject_fingerprint.records import ImageRecord


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blob(shape, seed):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    centre = rng.uniform(-0.4, 0.4, len(shape))
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return np.exp(-5 * r2) + 0.3 * grids[-1] + 0.05 * rng.random(shape)


def test_png_files_and_a_broken_one(tmp_path):
    from PIL import Image

    records = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        pixels = (_blob((48, 40), i) * 180).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        records.append(ImageRecord(str(path), f"s{i}", path.name, modality="CR"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    records.insert(1, ImageRecord(str(broken), "s9", broken.name))

    torch.manual_seed(0)
    model = FingerprintModel.create(2, depth=18, embedding_dim=8,
                                    preprocessing=Preprocessing(2, (32, 32)), modalities=["xray"])
    result = Embedder(model, device="cpu", batch_size=2).embed_records(records, progress=False)
    assert [r.image_id for r in result.records] == ["0.png", "1.png", "2.png"]
    assert result.embeddings.shape == (3, 8) and np.all(np.isfinite(result.embeddings))
    assert len(set(result.content_hashes)) == 3
    assert [f.path for f in result.failures] == [str(broken)]


def test_lps_and_ras_copies_of_a_volume_embed_the_same(tmp_path):
    sitk = pytest.importorskip("SimpleITK")

    volume = (_blob((12, 18, 16), 3) * 1000).astype(np.float32)  # z, y, x
    lps = sitk.GetImageFromArray(volume)
    lps.SetSpacing((1.0, 1.2, 2.0))
    sitk.WriteImage(lps, str(tmp_path / "lps.nii.gz"))
    # Same anatomy stored with x and y reversed and an RAS direction matrix.
    ras = sitk.GetImageFromArray(np.ascontiguousarray(volume[:, ::-1, ::-1]))
    ras.SetSpacing((1.0, 1.2, 2.0))
    ras.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    ras.SetOrigin(lps.TransformIndexToPhysicalPoint((15, 17, 0)))
    sitk.WriteImage(ras, str(tmp_path / "ras.nii.gz"))

    torch.manual_seed(0)
    model = FingerprintModel.create(3, depth=18, embedding_dim=8,
                                    preprocessing=Preprocessing(3, (16, 16, 16)))
    records = [ImageRecord(str(tmp_path / n), "s1", n, modality="MR") for n in ("lps.nii.gz", "ras.nii.gz")]
    result = Embedder(model, device="cpu", batch_size=2).embed_records(records, progress=False)
    assert not result.failures, result.failures
    np.testing.assert_allclose(result.embeddings[0], result.embeddings[1], atol=1e-5)
