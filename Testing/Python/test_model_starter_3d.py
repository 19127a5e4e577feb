"""The bundled 3D starter model loads, is what its model card says, and embeds a volume."""

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "Resources" / "Models" / "starter-3d-brain-mri.pt"


@pytest.mark.skipif(not MODEL.is_file(), reason="3D starter model not in the checkout")
def test_3d_starter_matches_its_model_card(one_torch_thread):
    import torch
    from subject_fingerprint.checkpoint import load_checkpoint

    model = load_checkpoint(MODEL)
    card = (REPO / "Resources" / "Models" / "MODEL_CARD-3d-brain-mri.md").read_text()
    assert model.spatial_dims == 3 and model.depth == 10 and model.embedding_dim == 128
    assert model.architecture["canonical_pose"] is True
    assert tuple(model.preprocessing.size) == (32, 32, 32) and model.modalities == ["mr"]
    assert f"model_id `{model.model_id}`" in card
    assert model.calibration is not None and f"{model.calibration.threshold:.4f}" in card
    assert model.metadata["training"]["sources"][0]["split"].endswith("lgg-mri-80-seed42.json")
    x = torch.from_numpy(np.random.default_rng(0).random((2, 1, 32, 32, 32), dtype=np.float32))
    with torch.no_grad():
        e = model.network.eval()(x)
    assert e.shape == (2, 128) and torch.isfinite(e).all()
