"""Embedder: batching, failure handling, dimensionality checks, fp16 checkpoints."""

import numpy as np
import pytest
import torch

from subject_fingerprint.checkpoint import FingerprintModel, load_checkpoint, save_checkpoint
from subject_fingerprint.embed import Embedder
from subject_fingerprint.errors import ImageReadError, ModelMismatchError
from subject_fingerprint.preprocess import Preprocessing
from subject_fingerprint.records import ImageRecord, LoadedImage


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model2d():
    torch.manual_seed(0)
    return FingerprintModel.create(2, depth=18, embedding_dim=16,
                                   preprocessing=Preprocessing(2, (32, 32)))


def _images(n, shape=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        rec = ImageRecord(f"/img/{i}.png", f"s{i % 3}", f"{i}.png")
        out[rec.source] = LoadedImage(rng.random(shape).astype(np.float32), (1.0,) * len(shape), rec)
    return out


def _loader(images, broken=()):
    def load(record):
        if record.source in broken:
            raise ImageReadError(record.source, "cannot decode")
        return images[record.source]
    return load


def test_batches_equal_one_by_one(model2d):
    images = _images(7)
    records = [im.record for im in images.values()]
    embedder = Embedder(model2d, device="cpu", batch_size=3, loader=_loader(images))
    batches = list(embedder.iter_batches(records))
    assert [len(b) for b in batches] == [3, 3, 1]
    together = np.concatenate([b.embeddings for b in batches])
    assert together.dtype == np.float32 and together.shape == (7, 16)
    singles = np.concatenate([embedder.embed_loaded([images[r.source]]) for r in records])
    np.testing.assert_allclose(together, singles, atol=1e-4)
    assert [h for b in batches for h in b.content_hashes] == [images[r.source].content_hash for r in records]


def test_failures_collected_and_run_goes_on(model2d):
    images = _images(6)
    records = [im.record for im in images.values()]
    # One unreadable file and one 3D volume among 2D images.
    vol_rec = ImageRecord("/img/head.nii.gz", "s9", "head.nii.gz", modality="MR")
    images[vol_rec.source] = LoadedImage(np.zeros((8, 16, 16), np.float32), (1, 1, 1), vol_rec)
    records.insert(2, vol_rec)
    embedder = Embedder(model2d, device="cpu", batch_size=4,
                        loader=_loader(images, broken={"/img/4.png"}))
    result = embedder.embed_records(records, progress=False)
    assert [r.source for r in result.records] == [r.source for r in records
                                                  if r.source not in ("/img/4.png", vol_rec.source)]
    assert result.embeddings.shape == (5, 16)
    reasons = {f.path: f.reason for f in result.failures}
    assert reasons["/img/4.png"] == "cannot decode"
    assert reasons[vol_rec.source] == "this model embeds 2D images; /img/head.nii.gz is a 3D volume"


def test_all_failed_and_empty_inputs(model2d):
    embedder = Embedder(model2d, device="cpu", batch_size=2, loader=_loader({}, broken={"x"}))
    result = embedder.embed_records([ImageRecord("x", "s", "x")], progress=False)
    assert result.embeddings.shape == (0, 16) and len(result.failures) == 1
    assert embedder.embed_records([], progress=False).embeddings.shape == (0, 16)
    assert embedder.embed_loaded([]).shape == (0, 16)


def test_embed_loaded_raises_on_mismatch(model2d):
    embedder = Embedder(model2d, device="cpu")
    rec = ImageRecord("v.nii", "s", "v")
    with pytest.raises(ModelMismatchError):
        embedder.embed_loaded([LoadedImage(np.zeros((4, 8, 8), np.float32), (1, 1, 1), rec)])


def test_workers_give_the_same_result(model2d):
    images = _images(4)
    records = [im.record for im in images.values()]
    plain = Embedder(model2d, device="cpu", batch_size=2, loader=_loader(images))
    workers = Embedder(model2d, device="cpu", batch_size=2, num_workers=2, loader=_loader(images))
    np.testing.assert_allclose(plain.embed_records(records, progress=False).embeddings,
                               workers.embed_records(records, progress=False).embeddings, atol=1e-5)


def test_fp16_checkpoint_embeds_about_the_same(model2d, tmp_path):
    images = list(_images(3).values())
    reference = Embedder(model2d, device="cpu").embed_loaded(images)
    half = load_checkpoint(save_checkpoint(model2d, tmp_path / "half.pt", half=True))
    again = Embedder(half, device="cpu").embed_loaded(images)
    scale = np.abs(reference).max()
    assert np.abs(again - reference).max() < 0.02 * scale + 1e-3


def test_3d_model_embeds_volumes():
    model = FingerprintModel.create(3, depth=18, embedding_dim=8,
                                    preprocessing=Preprocessing(3, (16, 16, 16)))
    images = list(_images(2, shape=(12, 20, 20)).values())
    out = Embedder(model, device="cpu", batch_size=2).embed_loaded(images)
    assert out.shape == (2, 8) and np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1])


def test_embed_tensor_and_device_notice(model2d):
    embedder = Embedder(model2d, device="cuda")
    if not torch.cuda.is_available():
        assert embedder.device.type == "cpu" and "CUDA is not available" in embedder.device_notice
    out = embedder.embed_tensor(torch.zeros(2, 1, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16) and out.dtype == torch.float32


def test_channels_last_gives_the_same_embeddings(model2d):
    images = list(_images(2).values())
    plain = Embedder(model2d, device="cpu").embed_loaded(images)
    fast = Embedder(model2d, device="cpu", channels_last=True).embed_loaded(images)
    model2d.network.to(memory_format=torch.contiguous_format)  # leave the shared model as it was
    np.testing.assert_allclose(plain, fast, atol=1e-4)


def test_progress_bar_counts_images(model2d, capsys):
    images = _images(3)
    embedder = Embedder(model2d, device="cpu", batch_size=2, loader=_loader(images, broken={"/img/1.png"}))
    result = embedder.embed_records([im.record for im in images.values()])  # progress on by default
    assert len(result) == 2 and len(result.failures) == 1
    err = capsys.readouterr().err
    assert "3/3" in err and "img/s" in err


def test_test_shift_averages_the_shifted_views_and_is_part_of_the_model_id(model2d, tmp_path):
    from subject_fingerprint.embed import shifted

    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert shifted(x, (1, 0))[0, 0, 0].tolist() == [0, 1, 2, 3]          # edge row repeated
    assert shifted(x, (1, 0))[0, 0, 1].tolist() == [0, 1, 2, 3]
    assert shifted(x, (0, -1))[0, 0, :, -1].tolist() == [3, 7, 11, 15]

    views = Preprocessing(2, (32, 32), test_shift=0.0625)
    assert views.view_shifts() == [(0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)]
    assert Preprocessing(3, (8, 8, 8), test_shift=0.25).view_shifts()[1:] == [
        (2, 0, 0), (-2, 0, 0), (0, 2, 0), (0, -2, 0), (0, 0, 2), (0, 0, -2)]
    assert "test_shift" not in Preprocessing(2, (32, 32)).to_dict()     # old IDs unchanged
    assert Preprocessing.from_dict(views.to_dict()) == views
    with pytest.raises(ValueError, match="test_shift"):
        Preprocessing(2, (32, 32), test_shift=0.5)

    tta = FingerprintModel(model2d.network, views, dict(model2d.metadata))
    assert tta.model_id != model2d.model_id
    batch = torch.rand(3, 1, 32, 32)
    plain = Embedder(model2d, device="cpu", backend="torch", progress=False)
    want = torch.stack([plain.embed_tensor(shifted(batch, v)) for v in views.view_shifts()]).mean(0)
    got = Embedder(tta, device="cpu", backend="torch", progress=False).embed_tensor(batch)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, plain.embed_tensor(batch))
    save_checkpoint(tta, tmp_path / "tta.pt")
    again = load_checkpoint(tmp_path / "tta.pt")
    assert again.preprocessing.test_shift == 0.0625 and again.model_id == tta.model_id
