"""Inference backends: each matches eager float32, auto picks one that does, exports are cached
per model ID, the CPU flags decide whether bf16 is offered."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from subject_fingerprint import backends
from subject_fingerprint.checkpoint import FingerprintModel
from subject_fingerprint.embed import Embedder
from subject_fingerprint.preprocess import Preprocessing


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FingerprintModel.create(2, depth=10, embedding_dim=16,
                                   preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECT_FINGERPRINT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _reference(model, x):
    return backends.TorchRunner(model.network, torch.device("cpu"), 2, channels_last=False)(x)


@pytest.mark.parametrize("name,cosine", [("torch", 0.99999), ("onnx", 0.99999),
                                         ("bf16", backends.MIN_COSINE),
                                         ("bf16-mixed", backends.MIN_COSINE),
                                         ("onnx-int8", 0.99)])
def test_each_backend_matches_float32(model, cache, name, cosine, one_torch_thread):
    if name.startswith("bf16") and not backends.cpu_has_bf16():
        with pytest.raises(ValueError, match="no bfloat16 units"):
            backends.make_runner(model, name, torch.device("cpu"))
        return
    x = backends.check_batch(model, 3)
    out = backends.make_runner(model, name, torch.device("cpu"))(x)
    assert out.shape == (3, 16) and out.dtype == torch.float32
    assert backends.min_cosine(_reference(model, x).numpy(), out.numpy()) >= cosine


def test_export_cached_per_model_id(model, cache, one_torch_thread):
    path = backends.export_onnx(model)
    assert path.parent.parent == cache and model.model_id in path.name
    stamp = path.stat().st_mtime_ns
    assert backends.export_onnx(model) == path and path.stat().st_mtime_ns == stamp
    other = FingerprintModel.create(2, depth=10, embedding_dim=16,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
    assert backends.export_path(other) != path  # different weights, different file
    assert not list(cache.rglob("*.tmp-*"))


def test_auto_picks_a_matching_backend(model, cache, one_torch_thread):
    choice = backends.choose(model, "auto", torch.device("cpu"))
    assert choice.name in backends.auto_candidates(torch.device("cpu"))
    assert choice.name != "onnx-int8"
    assert choice.cosines.get(choice.name, 1.0) >= backends.MIN_COSINE
    assert set(choice.timings) | set(choice.rejected) == set(backends.auto_candidates(
        torch.device("cpu")))
    embedder = Embedder(model, device="cpu", backend="auto", progress=False)
    x = backends.check_batch(model, 4)
    assert backends.min_cosine(_reference(model, x).numpy(),
                               embedder.embed_tensor(x).numpy()) >= backends.MIN_COSINE


def _no_timing(*args, **kwargs):
    raise AssertionError("the remembered choice should not be measured again")


def test_auto_remembers_its_measurement(model, cache, monkeypatch, one_torch_thread):
    backends._REMEMBERED.clear()
    first = backends.choose(model, "auto", torch.device("cpu"))
    assert not first.recalled
    stored = json.loads((cache / "backend-choices.json").read_text())
    assert [entry["name"] for entry in stored.values()] == [first.name]
    # A new process (empty memo) reads the file and does not time the candidates again.
    backends._REMEMBERED.clear()
    monkeypatch.setattr(backends, "_time", _no_timing)
    again = backends.choose(model, "auto", torch.device("cpu"))
    assert again.name == first.name and again.recalled and "remembered" in again.summary()
    assert again.timings == pytest.approx(first.timings)
    x = backends.check_batch(model, 3)
    assert backends.min_cosine(_reference(model, x).numpy(), again.runner(x).numpy()) >= backends.MIN_COSINE
    # Another input shape (another pass size) is another measurement (every candidate is timed
    # again, and fails here).
    other = backends.choose(model, "auto", torch.device("cpu"), check=backends.check_batch(model, 5))
    assert not other.recalled and all("not be measured" in why for why in other.rejected.values())


def test_a_remembered_winner_that_no_longer_matches_is_measured_again(model, cache, monkeypatch,
                                                                      one_torch_thread):
    backends._REMEMBERED.clear()
    first = backends.choose(model, "auto", torch.device("cpu"))
    backends._REMEMBERED.clear()
    real = backends.make_runner

    def broken(m, name, device):
        runner = real(m, name, device)
        return (lambda x: runner(x) * 0 + 1) if name == first.name else runner

    monkeypatch.setattr(backends, "make_runner", broken)
    again = backends.choose(model, "auto", torch.device("cpu"))
    assert not again.recalled and again.name != first.name
    assert "cosine" in again.rejected[first.name]


def test_an_unreadable_choices_file_costs_only_a_measurement(model, cache, one_torch_thread):
    backends._REMEMBERED.clear()
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "backend-choices.json").write_text("{not json")
    choice = backends.choose(model, "auto", torch.device("cpu"))
    assert not choice.recalled and choice.name in backends.auto_candidates(torch.device("cpu"))
    assert json.loads((cache / "backend-choices.json").read_text())  # rewritten whole


def test_distance_error_measures_what_retrieval_sees():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4))
    assert backends.distance_error(a, a) == 0.0
    assert backends.distance_error(a, 1.1 * a) == pytest.approx(0.1)
    assert backends.distance_error(a, a + 5.0) == pytest.approx(0.0, abs=1e-12)  # a shift keeps distances
    assert backends.distance_error(a[:1], a[:1] * 3) == 0.0


@pytest.fixture
def offset():
    """A model whose embeddings sit far from the origin (a large common offset): they keep a
    cosine of ~1 under bf16 rounding while the distances between them are lost."""
    if not backends.cpu_has_bf16():
        pytest.skip("no bf16 units: bf16 cannot run here")
    torch.manual_seed(0)
    model = FingerprintModel.create(2, depth=10, embedding_dim=16,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
    with torch.no_grad():
        model.network.fc.bias += 200.0
    return model


def test_auto_refuses_a_backend_that_moves_distances_despite_a_high_cosine(offset, cache, one_torch_thread):
    """A high cosine is not enough: the distances, all that retrieval uses, must hold too."""
    choice = backends.choose(offset, "auto", torch.device("cpu"), remember=False)
    assert choice.cosines["bf16"] >= backends.MIN_COSINE
    assert "distances off" in choice.rejected["bf16"] and choice.name != "bf16"


def test_auto_checks_a_lone_mixed_precision_candidate_and_falls_back_to_float32(
        offset, cache, one_torch_thread, monkeypatch):
    """On CUDA the one candidate, ``torch``, is float16 AMP: it is checked like any other, and a
    model whose distances it would move gets eager float32 instead. Here a bf16 runner stands
    in for AMP under the name ``torch``."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(backends, "auto_candidates", lambda device: ["torch"])
    monkeypatch.setattr(backends, "make_runner",
                        lambda model, name, device: backends.TorchRunner(model.network, device, 2,
                                                                         autocast="bf16"))
    choice = backends.choose(offset, "auto", cpu, remember=False)
    assert "distances off" in choice.rejected["torch"]
    assert choice.name == "torch" and choice.runner.autocast is None
    x = backends.check_batch(offset)
    reference = backends.TorchRunner(offset.network, cpu, 2, channels_last=False)(x)
    assert backends.distance_error(reference.numpy(), choice.runner(x).numpy()) < 1e-4


def test_auto_in_the_embedder_measures_on_the_first_real_batch(model, cache, monkeypatch,
                                                                one_torch_thread):
    seen = []
    real_choose = backends.choose

    def spy(m, backend, device, check=None, remember=True, timing=None):
        seen.append((check, timing))
        return real_choose(m, backend, device, check=check, remember=False, timing=timing)

    import subject_fingerprint.embed as embed_module
    monkeypatch.setattr(embed_module, "choose", spy, raising=False)
    monkeypatch.setattr(backends, "choose", spy)
    embedder = Embedder(model, device="cpu", backend="auto", progress=False, batch_size=16)
    x = torch.rand(12, 1, 32, 32)
    embedder.embed_tensor(x)
    assert len(seen) == 1 and torch.equal(seen[0][0], x) and torch.equal(seen[0][1], x)
    embedder.embed_tensor(x)
    assert len(seen) == 1  # decided once

    # A pass of one image (a large input) is what is timed, but the distances are still
    # checked between CHECK_BATCH real images, not on one image's (none).
    seen.clear()
    monkeypatch.setattr(embed_module, "_CPU_VOXELS_PER_PASS", 32 * 32)
    Embedder(model, device="cpu", backend="auto", progress=False, batch_size=16).embed_tensor(x)
    check, timing = seen[0]
    assert torch.equal(check, x[:backends.CHECK_BATCH]) and torch.equal(timing, x[:1])

    # Fewer real images than that: the seeded check batch, never one image alone.
    seen.clear()
    Embedder(model, device="cpu", backend="auto", progress=False, batch_size=16).embed_tensor(x[:1])
    check, timing = seen[0]
    assert torch.equal(check, backends.check_batch(model, backends.CHECK_BATCH)) and len(timing) == 1


def test_bf16_offered_only_with_the_cpu_flag(monkeypatch):
    monkeypatch.setattr(backends, "cpu_flags", lambda: {"avx2", "fma"})
    assert not {"bf16", "bf16-mixed"} & set(backends.auto_candidates(torch.device("cpu")))
    monkeypatch.setattr(backends, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert {"bf16", "bf16-mixed"} <= set(backends.auto_candidates(torch.device("cpu")))


def test_bf16_backends_are_cpu_only(model, monkeypatch):
    """On CUDA they would stage a GPU network on a CPU probe and fail mid-run; they are refused
    up front with a message instead (the torch backend is float16 autocast there)."""
    monkeypatch.setattr(backends, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    cuda = torch.device("cuda")
    for name in ("bf16", "bf16-mixed"):
        assert "CPU backend" in backends.unavailable(name, cuda)
        with pytest.raises(ValueError, match="float16 autocast"):
            backends.make_runner(model, name, cuda)
        assert backends.unavailable(name, torch.device("cpu")) == ""


def test_unknown_backend_is_refused(model):
    with pytest.raises(ValueError, match="unknown backend"):
        backends.choose(model, "tensorrt", torch.device("cpu"))


def test_batch_of_eight_matches_batch_of_one(model, one_torch_thread):
    embedder = Embedder(model, device="cpu", progress=False)
    x = backends.check_batch(model, 8)
    together = embedder.embed_tensor(x).numpy()
    alone = np.concatenate([embedder.embed_tensor(x[i:i + 1]).numpy() for i in range(8)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_large_cpu_batches_run_in_smaller_passes(model, monkeypatch, one_torch_thread):
    import subject_fingerprint.embed as embed_module

    embedder = Embedder(model, device="cpu", progress=False)
    x = backends.check_batch(model, 5)
    whole = embedder.embed_tensor(x).numpy()
    calls = []
    runner = embedder.runner
    embedder._choice.runner = lambda t: (calls.append(len(t)), runner(t))[1]
    monkeypatch.setattr(embed_module, "_CPU_VOXELS_PER_PASS", 2 * 32 * 32)
    np.testing.assert_allclose(embedder.embed_tensor(x).numpy(), whole, rtol=1e-4, atol=1e-5)
    assert calls == [2, 2, 1] and embedder.embedded_count == 10


def test_default_batch_is_one_cpu_pass_and_auto_checks_on_it(model, cache, monkeypatch,
                                                               one_torch_thread):
    from subject_fingerprint.embed import default_batch_size

    assert default_batch_size(model) == 256                       # 32x32 px: capped at 256
    big = FingerprintModel.create(2, depth=10, embedding_dim=16,
                                  preprocessing=Preprocessing(spatial_dims=2, size=(512, 512)))
    assert default_batch_size(big) == 16                          # one image per pass, 16 stored together
    seen = []
    real = backends.choose
    monkeypatch.setattr(backends, "choose", lambda m, b, d, check=None, timing=None: (
        seen.append((check.shape, timing.shape)), real(m, b, d, check, timing=timing))[1])
    embedder = Embedder(model, device="cpu", progress=False, batch_size=40, backend="auto")
    embedder.embed_tensor(backends.check_batch(model, 3))
    assert seen == [((40, 1, 32, 32),) * 2]  # the real pass size, not 3 images


def test_queries_embed_as_the_library_was_embedded(model, cache, tmp_path, one_torch_thread):
    """An index made with one backend records it; a query then uses it by default, so a stored
    image comes back at distance 0 (ONNX stands in for bf16, which not every CPU has); merged
    libraries keep the record."""
    from PIL import Image

    from subject_fingerprint import lookup
    from subject_fingerprint.library import EmbeddingLibrary, merge_libraries

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for s in range(3):
        (folder / f"S{s}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(
                folder / f"S{s}" / f"{i}.png")
    lib = tmp_path / "lib.h5"
    assert lookup.index([str(folder)], lib, model=model, device="cpu", backend="onnx",
                        progress=False).backend == "onnx"
    with EmbeddingLibrary.open(lib) as opened:
        assert opened.backends == ["onnx"] and opened.info()["embedding_backends"] == ["onnx"]
        assert lookup.library_backend(opened, "cpu") == "onnx"
    image = str(folder / "S1" / "0.png")
    [answer] = lookup.query([image], lib, model=model, k=2, device="cpu")
    assert answer.subjects[0].distance == 0.0
    merged = tmp_path / "merged.h5"
    other = tmp_path / "other.h5"
    lookup.index([str(folder / "S0")], other, model=model, device="cpu", backend="torch",
                 progress=False, skip_duplicates=False)
    merge_libraries([lib, other], merged, skip_duplicates=False)
    with EmbeddingLibrary.open(merged) as opened:
        assert opened.backends == ["onnx", "torch"]
        assert lookup.library_backend(opened, "cpu") == "torch"  # mixed: float32


def test_bf16_mixed_keeps_the_last_stage_and_head_in_float32(model, one_torch_thread):
    from subject_fingerprint.staged_precision import StagedPrecision, bf16_mixed_network

    net = bf16_mixed_network(model.network)
    assert isinstance(net, StagedPrecision)
    assert {p.dtype for p in net.low.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in net.high.parameters()} == {torch.float32}
    assert {p.dtype for p in model.network.parameters()} == {torch.float32}  # the original untouched
    x = backends.check_batch(model, 4)
    ref = _reference(model, x).numpy()
    with torch.inference_mode():
        out = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast changes nothing
            assert torch.equal(net(x), out)
    assert out.dtype == torch.float32
    assert backends.min_cosine(ref, out.numpy()) >= backends.MIN_COSINE
    if backends.cpu_has_bf16():
        runner = backends.make_runner(model, "bf16-mixed", torch.device("cpu"))
        assert runner.name == "bf16-mixed" and torch.allclose(runner(x), out, atol=1e-6)


def test_bf16_mixed_runs_the_canonical_pose_layer_first_in_float32(one_torch_thread):
    from subject_fingerprint.staged_precision import bf16_mixed_network

    torch.manual_seed(0)
    model3d = FingerprintModel.create(3, depth=10, embedding_dim=8, canonical_pose=True,
                                      preprocessing=Preprocessing(spatial_dims=3, size=(16, 16, 16)))
    net = bf16_mixed_network(model3d.network)
    assert net.pre is not None and {p.dtype for p in net.low.parameters()} == {torch.bfloat16}
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.inference_mode():
        ref = model3d.network.eval()(x).numpy()
        assert backends.min_cosine(ref, net(x).numpy()) >= backends.MIN_COSINE


def test_bf16_mixed_refuses_a_network_it_cannot_split(one_torch_thread):
    from subject_fingerprint.staged_precision import bf16_mixed_network

    with pytest.raises(ValueError, match="not a MONAI ResNet"):
        bf16_mixed_network(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten()))
    torch.manual_seed(0)
    odd = FingerprintModel.create(2, depth=10, embedding_dim=16,
                                  preprocessing=Preprocessing(spatial_dims=2, size=(32, 32))).network
    plain = odd.eval().forward
    odd.forward = lambda x: 2 * plain(x)  # a ResNet whose forward is not just its stages
    with pytest.raises(ValueError, match="stages in sequence"):
        bf16_mixed_network(odd)


def test_bf16_mixed_lays_out_a_small_last_stage_nchw(model, one_torch_thread):
    from subject_fingerprint.staged_precision import bf16_mixed_network

    small = bf16_mixed_network(model.network, (32, 32))        # last stage input 2 x 2
    large = bf16_mixed_network(model.network, (1024, 1024))    # 64 x 64
    assert small.high_format == torch.contiguous_format
    assert large.high_format == torch.channels_last == large.low_format
    x = backends.check_batch(model, 2)
    with torch.inference_mode():
        assert torch.allclose(small(x), large(x), atol=1e-5)  # the layout changes no number


def test_torch_backend_runs_a_small_last_stage_nchw_with_the_same_numbers(model, one_torch_thread):
    from subject_fingerprint.staged_precision import StagedPrecision

    cpu = torch.device("cpu")
    runner = backends.make_runner(model, "torch", cpu)           # 32 x 32 input: 2 x 2 last stage
    assert isinstance(runner.network, StagedPrecision) and runner.network.low_dtype == torch.float32
    plain = backends.TorchRunner(model.network, cpu, 2)          # no input size: channels-last
    assert not isinstance(plain.network, StagedPrecision)
    x = backends.check_batch(model, 4)
    assert torch.allclose(runner(x), _reference(model, x), atol=1e-5)
    big = FingerprintModel.create(2, depth=10, embedding_dim=16,
                                  preprocessing=Preprocessing(spatial_dims=2, size=(1024, 1024)))
    assert not isinstance(backends.make_runner(big, "torch", cpu).network, StagedPrecision)


def test_a_timing_batch_that_is_the_check_batch_costs_no_extra_pass(model, cache, monkeypatch,
                                                                     one_torch_thread):
    """Timed on a pass, checked on the check batch: when the pass is the whole check batch (a
    view of it), each candidate runs warm-up + 2 timed calls (the warm-up alone when it is far
    behind), not one more for the check."""
    calls = {}
    real_make = backends.make_runner

    def counting(m, name, device):
        runner = real_make(m, name, device)

        def run(x):
            calls.setdefault(name, []).append(len(x))
            return runner(x)
        return run

    monkeypatch.setattr(backends, "make_runner", counting)
    x = backends.check_batch(model, 8)
    backends.choose(model, "auto", torch.device("cpu"), check=x, timing=x[:8], remember=False)
    assert calls and all(len(n) in (1, 3) for n in calls.values()), calls
    calls.clear()
    backends.choose(model, "auto", torch.device("cpu"), check=x, timing=x[:2], remember=False)
    # A smaller pass is timed, and the check batch run once more per candidate.
    assert calls and all(n.count(8) == 1 and set(n) == {2, 8} for n in calls.values()), calls
