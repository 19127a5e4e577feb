"""EmbeddingLibrary: add, duplicates, remove, info, model and format refusal, plain-h5py layout."""

from __future__ import annotations

import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from subject_fingerprint.errors import LibraryError, ModelMismatchError
from subject_fingerprint.library import EmbeddingLibrary
from subject_fingerprint.records import ImageRecord

DIM = 8


def fake_model(model_id="model-a", dim=DIM):
    return SimpleNamespace(model_id=model_id, metadata={"architecture": {"depth": 18}},
                           embedding_dim=dim)


def make_batch(start, n, subjects=5, dataset="ds", seed=0):
    rng = np.random.default_rng(seed + start)
    records = [ImageRecord(source=f"/data/{dataset}/{i}.png", subject_id=f"s{i % subjects}",
                           image_id=f"img{i}", modality="CR", view="PA", dataset=dataset)
               for i in range(start, start + n)]
    hashes = [f"{dataset}-{i:060d}" for i in range(start, start + n)]
    return records, hashes, rng.standard_normal((n, DIM)).astype(np.float32)


def test_create_add_reopen(tmp_path):
    path = tmp_path / "lib.h5"
    records, hashes, emb = make_batch(0, 12)
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        assert len(lib) == 0
        result = lib.add(records, hashes, emb)
        assert result.added == 12 and result.duplicates == []
        assert len(lib) == 12
    with EmbeddingLibrary.open(path, "r", model=fake_model()) as lib:
        assert len(lib) == 12
        np.testing.assert_array_equal(lib.embeddings, emb)
        assert list(lib.column("image_id")) == [r.image_id for r in records]
        assert list(lib.column("subject_id", [3, 1, 3])) == ["s3", "s1", "s3"]
        assert list(lib.column("content_hash")) == hashes
        assert lib.model_id == "model-a"
        assert lib.model_metadata == {"architecture": {"depth": 18}}
        added = lib.column("added")
        assert added.dtype == np.float64 and (added > 1.6e9).all()
    # A second session appends after the first.
    r2, h2, e2 = make_batch(12, 5)
    with EmbeddingLibrary.open(path, "a") as lib:
        assert lib.add(r2, h2, e2).added == 5
    with EmbeddingLibrary.open(path) as lib:
        assert len(lib) == 17
        np.testing.assert_array_equal(lib.embeddings[12:], e2)


def test_duplicates_in_library_and_batch(tmp_path):
    path = tmp_path / "lib.h5"
    records, hashes, emb = make_batch(0, 6)
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(records, hashes, emb)
    new_records, new_hashes, new_emb = make_batch(100, 4)
    new_hashes[1] = hashes[2]          # already stored
    new_hashes[3] = new_hashes[0]      # repeated within the batch
    with EmbeddingLibrary.open(path, "a") as lib:
        result = lib.add(new_records, new_hashes, new_emb)
        assert result.added == 2
        dups = {d.record.image_id: d for d in result.duplicates}
        assert set(dups) == {"img101", "img103"}
        assert dups["img101"].existing_image_id == "img2"
        assert dups["img103"].existing_image_id == "img100"
        assert len(lib) == 8
        # Asked to keep duplicates, everything goes in.
        result = lib.add(new_records, new_hashes, new_emb, skip_duplicates=False)
        assert result.added == 4 and not result.duplicates
        assert len(lib) == 12


def test_only_duplicates_leaves_file_untouched(tmp_path):
    path = tmp_path / "lib.h5"
    records, hashes, emb = make_batch(0, 3)
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(records, hashes, emb)
    before = path.stat().st_mtime_ns, path.stat().st_ino
    with EmbeddingLibrary.open(path, "a") as lib:
        assert lib.add(records, hashes, emb).added == 0
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before


def test_remove_by_subject_and_image(tmp_path):
    path = tmp_path / "lib.h5"
    records, hashes, emb = make_batch(0, 20, subjects=4)
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(records, hashes, emb)
    with EmbeddingLibrary.open(path, "a") as lib:
        assert lib.remove(subject_ids=["s1"], image_ids=["img2", "img1", "nope"]) == 6
        assert lib.remove(subject_ids=["absent"]) == 0
    kept = [i for i in range(20) if i % 4 != 1 and i != 2]
    with EmbeddingLibrary.open(path) as lib:
        assert list(lib.column("image_id")) == [f"img{i}" for i in kept]
        np.testing.assert_array_equal(lib.embeddings, emb[kept])
        assert list(lib.column("content_hash")) == [hashes[i] for i in kept]


def test_exception_in_session_discards_changes(tmp_path):
    path = tmp_path / "lib.h5"
    records, hashes, emb = make_batch(0, 4)
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(records, hashes, emb)
    r2, h2, e2 = make_batch(10, 4)
    with pytest.raises(RuntimeError):
        with EmbeddingLibrary.open(path, "a") as lib:
            lib.add(r2, h2, e2)
            raise RuntimeError("boom")
    with EmbeddingLibrary.open(path) as lib:
        assert len(lib) == 4
    assert not list(tmp_path.glob("lib.h5.tmp-*"))


def test_commit_and_rollback(tmp_path):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(*make_batch(0, 3))
        lib.commit()
        with EmbeddingLibrary.open(path) as reader:
            assert len(reader) == 3
        lib.add(*make_batch(10, 3))
        lib.rollback()
        assert len(lib) == 3
        lib.add(*make_batch(20, 2))
    with EmbeddingLibrary.open(path) as lib:
        assert list(lib.column("image_id")) == ["img0", "img1", "img2", "img20", "img21"]


def test_reader_keeps_its_snapshot_while_a_writer_commits(tmp_path):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(*make_batch(0, 5))
    with EmbeddingLibrary.open(path) as reader:
        with EmbeddingLibrary.open(path, "a") as writer:
            writer.remove(subject_ids=["s0"])
            writer.add(*make_batch(50, 5))
        assert len(reader) == 5
        assert list(reader.column("image_id", [0, 4])) == ["img0", "img4"]


def test_model_mismatch(tmp_path):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=fake_model("model-a")):
        pass
    for mode in ("r", "a"):
        with pytest.raises(ModelMismatchError) as err:
            EmbeddingLibrary.open(path, mode, model=fake_model("model-b"))
        message = str(err.value)
        assert "model-a" in message and "model-b" in message and str(path) in message
    with EmbeddingLibrary.open(path, "a") as lib:
        with pytest.raises(ModelMismatchError):
            lib.add(*make_batch(0, 2)[:2], np.zeros((2, DIM + 1)))


def test_creates_missing_parent_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(*make_batch(0, 2))
    with EmbeddingLibrary.open(path) as lib:
        assert len(lib) == 2


def test_create_needs_a_model(tmp_path):
    with pytest.raises(LibraryError):
        EmbeddingLibrary.open(tmp_path / "new.h5", "a")
    with pytest.raises(LibraryError):
        EmbeddingLibrary.open(tmp_path / "missing.h5", "r")
    with EmbeddingLibrary.open(tmp_path / "new.h5", "a", model_id="m", embedding_dim=4,
                               model_metadata={"x": 1}) as lib:
        assert lib.embedding_dim == 4 and lib.model_id == "m"


def test_refuses_foreign_and_newer_files(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(LibraryError, match="not an embedding library"):
        EmbeddingLibrary.open(foreign)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(LibraryError):
        EmbeddingLibrary.open(text)
    newer = tmp_path / "newer.h5"
    with EmbeddingLibrary.open(newer, "a", model=fake_model()):
        pass
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(LibraryError, match="newer"):
        EmbeddingLibrary.open(newer)


def test_bad_input_refused(tmp_path):
    path = tmp_path / "lib.h5"
    records, hashes, emb = make_batch(0, 3)
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        with pytest.raises(LibraryError):
            lib.add(records, hashes, emb[:2])
        emb[1, 0] = np.nan
        with pytest.raises(LibraryError):
            lib.add(records, hashes, emb)
    with EmbeddingLibrary.open(path) as lib:
        with pytest.raises(LibraryError, match="read-only"):
            lib.add(*make_batch(0, 1))


def test_info(tmp_path):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(*make_batch(0, 10, subjects=3, dataset="a"))
        lib.add(*make_batch(0, 4, subjects=4, dataset="b"))
    with EmbeddingLibrary.open(path) as lib:
        info = lib.info()
    assert info["entries"] == 14
    assert info["subjects"] == 3 + 4  # same subject IDs in two datasets are two subjects
    assert info["datasets"] == {"a": 10, "b": 4}
    assert info["model_id"] == "model-a" and info["embedding_dim"] == DIM
    assert info["format_version"] == 1 and info["file_size_bytes"] == path.stat().st_size
    assert info["first_added"].endswith("+00:00") and info["first_added"] <= info["last_added"]
    json.dumps(info)


def test_plain_h5py_layout(tmp_path):
    path = tmp_path / "lib.h5"
    records, hashes, emb = make_batch(0, 5)
    records[0] = ImageRecord(source="/données/é.png", subject_id="patient-é", image_id="img0",
                             dataset="ds")
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(records, hashes, emb)
    with h5py.File(path, "r") as f:
        assert f["embeddings"].dtype == np.float32 and f["embeddings"].shape == (5, DIM)
        assert f["embeddings"].chunks is not None and f["embeddings"].maxshape == (None, DIM)
        for name in ("subject_id", "image_id", "dataset", "modality", "view", "source",
                     "content_hash"):
            info = h5py.check_string_dtype(f[name].dtype)
            assert info is not None and info.encoding == "utf-8", name
        assert list(f["subject_id"].asstr()[:2]) == ["patient-é", "s1"]
        assert f["source"].asstr()[0] == "/données/é.png"
        assert list(f["content_hash"].asstr()[:]) == hashes
        assert f["added"].dtype == np.float64
        assert int(f.attrs["format_version"]) == 1
        assert int(f.attrs["embedding_dim"]) == DIM
        assert f.attrs["model_id"] == "model-a"
        assert json.loads(f.attrs["model_metadata"]) == {"architecture": {"depth": 18}}


def test_long_content_hash_widens_column(tmp_path):
    path = tmp_path / "lib.h5"
    records, hashes, emb = make_batch(0, 3)
    hashes[2] = "x" * 100
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(records[:2], hashes[:2], emb[:2])
        lib.add(records[2:], hashes[2:], emb[2:])
        assert lib.add(records[2:], hashes[2:], emb[2:]).added == 0
    with EmbeddingLibrary.open(path) as lib:
        assert list(lib.column("content_hash")) == hashes


def test_duplicates_across_adds_in_one_session(tmp_path):
    path = tmp_path / "lib.h5"
    records, hashes, emb = make_batch(0, 4)
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        assert lib.add(records[:2], hashes[:2], emb[:2]).added == 2
        result = lib.add(records, hashes, emb)  # first two now stored, in the same session
        assert result.added == 2
        assert [d.existing_image_id for d in result.duplicates] == ["img0", "img1"]
        assert lib.add(records[3:], hashes[3:], emb[3:]).added == 0
        # Entries without a hash are never duplicates.
        assert lib.add(records[:2], ["", ""], emb[:2]).added == 2
        assert lib.add(records[:2], None, emb[:2]).added == 2
        assert len(lib) == 8


def test_undecodable_names_are_stored_escaped(tmp_path):
    path = tmp_path / "lib.h5"
    bad = "/data/caf\udce9.png"  # a non-UTF-8 file name as os.fsdecode gives it
    records = [ImageRecord(source=bad, subject_id="s\udcff", image_id="i0")]
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        assert lib.add(records, ["h"], np.zeros((1, DIM))).added == 1
    with EmbeddingLibrary.open(path) as lib:
        assert lib.column("source")[0] == "/data/caf\\udce9.png"
        assert lib.column("subject_id")[0] == "s\\udcff"


def test_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(*make_batch(0, 3))
    with EmbeddingLibrary.open(path, "a") as lib:
        lib.add(*make_batch(10, 2))
        monkeypatch.setattr(EmbeddingLibrary, "_widen_hashes",
                            staticmethod(lambda f, w: (_ for _ in ()).throw(OSError("disk full"))))
        records, hashes, emb = make_batch(20, 2)
        with pytest.raises(OSError):
            lib.add(records, ["x" * 200, "y"], emb)
        assert len(lib) == 3  # the session's uncommitted rows were dropped with the bad write
        monkeypatch.undo()
        lib.add(*make_batch(30, 1))
    with EmbeddingLibrary.open(path) as lib:
        assert list(lib.column("image_id")) == ["img0", "img1", "img2", "img30"]


def test_truncated_file_refused(tmp_path):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        lib.add(*make_batch(0, 50))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LibraryError):
        with EmbeddingLibrary.open(path) as lib:
            lib.embeddings


def test_maybe_commit_spaces_commits_by_their_cost(tmp_path):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=fake_model()) as lib:
        assert not lib.maybe_commit()  # nothing to commit
        lib.add(*make_batch(0, 2))
        assert lib.has_uncommitted_changes
        # An overhead budget this small would allow a commit only after hours.
        assert not lib.maybe_commit(max_overhead=1e-7)
        assert lib.maybe_commit(max_overhead=1e9)
        assert not lib.has_uncommitted_changes and lib.last_commit_seconds > 0
        with EmbeddingLibrary.open(path) as reader:
            assert len(reader) == 2
