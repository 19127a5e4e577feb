"""Checkpoint files of fingerprint models (:class:`~subject_fingerprint.model.FingerprintModel`).

A checkpoint is one ``torch.save`` file holding only plain data (strings, numbers, tensors)::

    {"format": "subject-fingerprint-checkpoint", "format_version": 1,
     "metadata_json": "<JSON text>", "weights_sha256": "<hex>", "state_dict": {name: tensor}}

It is read with ``torch.load(weights_only=True)``, so a file cannot run code, and the
weights hash catches a file altered after saving. The metadata JSON has the keys
``architecture``, ``preprocessing``, ``modalities``, ``training``, ``calibration`` and
``metrics``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path

from .errors import CheckpointError
# FingerprintModel lives in .model; imported here for save/load and for older imports.
from .model import FingerprintModel, build_network, calibration_id, check_image_fits  # noqa: F401
from .model import build_resnet_from, describe_architecture
from .model import json_default as _json_default
from .preprocess import Preprocessing

FORMAT = "subject-fingerprint-checkpoint"
FORMAT_VERSION = 1
ENV_MODEL = "SUBJECT_FINGERPRINT_MODEL"
STARTER_MODEL_NAME = "starter-2d-cxr.pt"


def _tensor_bytes(tensor) -> bytes:
    """Raw bytes of any tensor dtype (float16 included) via a uint8 view."""
    import torch

    t = tensor.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def _weights_hash(state_dict) -> str:
    """SHA-256 over the stored tensors exactly as stored (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def metadata_json(metadata: dict) -> str:
    """The metadata as the JSON text a checkpoint stores (sorted keys)."""
    return json.dumps(metadata, sort_keys=True, default=_json_default)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(model: FingerprintModel, path, half: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically (a temporary file beside it, then rename).

    ``half=True`` stores floating-point tensors as float16 (half the size); they are cast
    back to float32 on loading.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(model.metadata)
    metadata["preprocessing"] = model.preprocessing.to_dict()
    head = getattr(model, "pair_head", None)
    metadata.pop("pair_head", None)
    if head is not None:
        metadata["pair_head"] = head.config()
    text = metadata_json(metadata)  # fails here, before any file is touched

    def tensors(module):
        out = {}
        for name, tensor in module.state_dict().items():
            tensor = tensor.detach().to("cpu").clone()
            out[name] = tensor.half() if half and tensor.is_floating_point() else tensor
        return out

    state = tensors(model.network)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata_json": text,
        "metadata_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "weights_sha256": _weights_hash(state),
        "state_dict": state,
    }
    if head is not None:
        payload["pair_head_state"] = tensors(head)
        payload["pair_head_sha256"] = _weights_hash(payload["pair_head_state"])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        # mkstemp makes the file private (0600); a model is meant to be shared. (Reading
        # the umask would mean setting it, which is not thread-safe.)
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_checkpoint(path, device="cpu") -> FingerprintModel:
    """Read a checkpoint written by ``save_checkpoint``; ``CheckpointError`` on any problem."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of foreign files; the error says enough.
            warnings.simplefilter("ignore")
            payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler names the blocked callable as a GLOBAL; other
        # failures (text, random bytes) are simply not checkpoints.
        if "GLOBAL" in str(exc):
            raise CheckpointError(path, "the file contains objects that would run code when loaded; "
                                        "refusing to load it") from None
        raise CheckpointError(path, "not a model checkpoint (unreadable as a PyTorch file)") from None
    except Exception as exc:  # zip errors, truncated files, random bytes...
        raise CheckpointError(path, f"not a model checkpoint (unreadable: {type(exc).__name__})") from None

    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(path, "not a SubjectFingerprint checkpoint (no format marker; "
                                    "a bare state_dict or another tool's file?)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(path, f"damaged checkpoint: invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(path, f"checkpoint format version {version} is newer than this "
                                    f"software understands ({FORMAT_VERSION}); please upgrade")
    text = payload.get("metadata_json")
    recorded = payload.get("metadata_sha256")
    # Older files of format 1 may lack the metadata hash; when present it must match.
    if recorded is not None and (not isinstance(text, str)
                                 or hashlib.sha256(text.encode("utf-8")).hexdigest() != recorded):
        raise CheckpointError(path, "metadata does not match its recorded hash: the file was altered")
    try:
        metadata = json.loads(text)
        arch = metadata["architecture"]
        preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
        # Checked here, so that a missing field reads as damaged metadata, not as weights that
        # do not fit.
        for key in ("spatial_dims", "embedding_dim") + (() if "members" in arch else ("depth",)):
            int(arch[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"damaged metadata ({type(exc).__name__}: {exc})") from None
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(path, "the checkpoint holds no weights")
    if _weights_hash(state) != payload.get("weights_sha256"):
        raise CheckpointError(path, "weights do not match their recorded hash: the file was altered")
    try:
        network = _network_from(arch)
        network.load_state_dict(_float32(state), strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"weights do not fit the {describe_architecture(arch)} "
                                    f"its metadata describes: {first}") from None
    head = _load_pair_head(path, payload, metadata)
    from .device import resolve_device

    model = FingerprintModel(network, preprocessing, metadata, pair_head=head)
    model.to(resolve_device(device)[0])
    network.eval()
    return model


def _network_from(architecture: dict):
    """An untrained network of the shape a checkpoint's architecture block describes: an
    ensemble of several (``ensemble.py``) or one ResNet."""
    from .ensemble import build_ensemble, is_ensemble

    return build_ensemble(architecture) if is_ensemble(architecture) else build_resnet_from(architecture)


def _float32(state: dict) -> dict:
    """Floating-point tensors of a stored state as float32 (files may hold float16)."""
    return {k: (t.float() if t.is_floating_point() else t) for k, t in state.items()}


def _load_pair_head(path, payload, metadata):
    """The verification head the metadata announces (None without one), hash-checked."""
    import torch

    config = metadata.get("pair_head")
    if not config:
        return None
    state = payload.get("pair_head_state")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(path, "the metadata names a pair-verification head but the file holds "
                                    "no weights for it")
    if _weights_hash(state) != payload.get("pair_head_sha256"):
        raise CheckpointError(path, "pair-head weights do not match their recorded hash: the file was altered")
    from .verification import PairHead

    try:
        head = PairHead.from_config(config)
        head.load_state_dict(_float32(state))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"damaged pair-verification head ({type(exc).__name__}: "
                                    f"{str(exc)[:200]})") from None
    return head.eval()


def default_model_path() -> Path:
    """The bundled starter model, or the file named by ``$SUBJECT_FINGERPRINT_MODEL``."""
    env = os.environ.get(ENV_MODEL)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise CheckpointError(path, f"the model named by {ENV_MODEL} does not exist")
        return path
    package = Path(__file__).resolve().parent
    # The repository keeps it in Resources/Models at the top; an installed Slicer module keeps
    # it in the module's own Resources/Models, beside this package.
    candidates = [package.parents[1] / "Resources" / "Models" / STARTER_MODEL_NAME,
                  package.parent / "Resources" / "Models" / STARTER_MODEL_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise CheckpointError(candidates[0], "the bundled starter model is not there; "
                                         "pass a checkpoint with --model")
