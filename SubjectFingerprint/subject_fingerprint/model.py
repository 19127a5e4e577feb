"""The fingerprint network (a MONAI ResNet whose classification head is the embedding) and
:class:`FingerprintModel`, the network together with its preprocessing and metadata."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

from .errors import ModelMismatchError
from .preprocess import Preprocessing
from .records import modality_family

RESNET_DEPTHS = (10, 18, 34, 50, 101)


def build_network(spatial_dims: int = 2, depth: int = 50, embedding_dim: int = 128,
                  canonical_pose: bool = False, normalize: bool = False):
    """Return an untrained ResNet mapping ``(B, 1, *size)`` to ``(B, embedding_dim)``.

    MONAI's ``resnet{depth}``: standard stem (7-wide first convolution with stride 2, then max
    pooling), one input channel, the final fully connected layer sized to the embedding. With
    ``canonical_pose`` each image is first resampled into the frame of its own intensity
    moments (``canonical_pose.CanonicalPose``: invariance to rigid motion by construction).
    With ``normalize`` the embeddings are L2-normalised by the network itself, so that every
    distance computed from them (library, query, dedup, calibration) is the one trained on.
    """
    from monai.networks import nets

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims!r}")
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet depth must be one of {list(RESNET_DEPTHS)}, not {depth!r}")
    if int(embedding_dim) < 1:
        raise ValueError(f"embedding_dim must be positive, not {embedding_dim!r}")
    resnet = getattr(nets, f"resnet{depth}")(spatial_dims=spatial_dims, n_input_channels=1,
                                             conv1_t_size=7, conv1_t_stride=2,
                                             num_classes=int(embedding_dim))
    if normalize:
        from .normalized_linear import NormalizedLinear

        resnet.fc = NormalizedLinear(resnet.fc.in_features, resnet.fc.out_features)
    if canonical_pose:
        from .canonical_pose import CanonicalPoseNetwork

        return CanonicalPoseNetwork(resnet)
    return resnet


def build_resnet_from(architecture: dict):
    """An untrained ``build_network`` ResNet of the shape an architecture block describes (an
    ensemble's blocks are read by ``ensemble.build_ensemble``)."""
    return build_network(int(architecture["spatial_dims"]), int(architecture["depth"]),
                         int(architecture["embedding_dim"]),
                         bool(architecture.get("canonical_pose", False)),
                         bool(architecture.get("normalize", False)))


def describe_architecture(architecture: dict) -> str:
    """``2D ResNet-18 with 128-d output``, or the same for each member of an ensemble."""
    a = architecture or {}
    if a.get("name") == "ensemble":
        return "ensemble of " + ", ".join(describe_architecture(m) for m in a.get("members") or [])
    return f"{a.get('spatial_dims')}D ResNet-{a.get('depth')} with {a.get('embedding_dim')}-d output"


def check_image_fits(loaded, spatial_dims: int, modalities=()) -> None:
    """Raise ``ModelMismatchError`` when ``loaded`` is not something the model can embed.

    Shared by ``FingerprintModel.check_image`` and the embedding workers (which get these
    plain values rather than the network). An unknown modality ("" or "other") passes:
    the model cannot tell, and refusing would block non-DICOM files without a manifest.
    """
    source = getattr(getattr(loaded, "record", None), "source", "") or "the image"
    ndim = loaded.array.ndim
    if ndim == 3 and loaded.array.shape[0] == 1:
        ndim = 2  # a single-slice volume is a 2D image
    if ndim != spatial_dims:
        want = {2: "2D images", 3: "3D volumes"}.get(spatial_dims, f"{spatial_dims}D images")
        have = {2: "a 2D image", 3: "a 3D volume"}.get(ndim, f"a {ndim}-dimensional array")
        raise ModelMismatchError(f"this model embeds {want}; {source} is {have}")
    families = [f for f in (modalities or ()) if f]
    if families:
        family = modality_family(getattr(loaded.record, "modality", "") or "")
        if family != "other" and family not in families:
            raise ModelMismatchError(
                f"this model was trained on {' or '.join(families)} images; {source} is {family}")


def _infer_architecture(network, preprocessing) -> dict:
    """Architecture block for a network built by ``build_network`` but given without one."""
    from monai.networks.nets.resnet import ResNetBottleneck

    blocks = sum(len(getattr(network, f"layer{i}")) for i in range(1, 5))
    # Two convolutions per basic block, three per bottleneck, plus the stem and the head.
    depth = (3 if isinstance(network.layer1[0], ResNetBottleneck) else 2) * blocks + 2
    depth = depth if depth in RESNET_DEPTHS else None
    return {"name": "resnet", "depth": depth, "spatial_dims": preprocessing.spatial_dims,
            "embedding_dim": int(network.fc.out_features)}


class FingerprintModel:
    """A network together with its preprocessing and metadata.

    ``metadata`` is a JSON-able dict (see the module docstring); ``preprocessing`` is
    authoritative and is written into ``metadata["preprocessing"]`` on saving.
    """

    def __init__(self, network, preprocessing: Preprocessing, metadata: dict | None = None,
                 pair_head=None):
        self.network = network
        # Optional verification.PairHead: P(same subject) of two embeddings, next to distance.
        self.pair_head = pair_head
        self.preprocessing = preprocessing
        self.metadata = dict(metadata or {})
        for key, default in (("modalities", []), ("training", {}), ("calibration", None), ("metrics", {})):
            self.metadata.setdefault(key, copy.deepcopy(default))
        self.metadata["preprocessing"] = preprocessing.to_dict()
        if not self.metadata.get("architecture"):
            self.metadata["architecture"] = _infer_architecture(network, preprocessing)
        self._id_cache = (None, None)

    @classmethod
    def create(cls, spatial_dims: int, depth: int = 50, embedding_dim: int = 128,
               preprocessing: Preprocessing | None = None, modalities=(),
               canonical_pose: bool = False, normalize: bool = False) -> "FingerprintModel":
        """A new, untrained model (random weights) of the given shape."""
        if preprocessing is None:
            preprocessing = Preprocessing.default(spatial_dims)
        if preprocessing.spatial_dims != spatial_dims:
            raise ValueError("preprocessing.spatial_dims does not match spatial_dims")
        network = build_network(spatial_dims, depth, embedding_dim, canonical_pose, normalize)
        families = []
        for m in modalities:
            family = modality_family(m) if modality_family(m) != "other" else str(m).strip().lower()
            if family and family not in families:
                families.append(family)
        metadata = {
            "architecture": {"name": "resnet", "depth": int(depth), "spatial_dims": int(spatial_dims),
                             "embedding_dim": int(embedding_dim)},
            "modalities": families,
        }
        # Only when on: older models' architecture blocks (and so their IDs) stay as they were.
        if canonical_pose:
            metadata["architecture"]["canonical_pose"] = True
        if normalize:
            metadata["architecture"]["normalize"] = True
        return cls(network, preprocessing, metadata)

    # -- properties ------------------------------------------------------------------
    @property
    def architecture(self) -> dict:
        return self.metadata.get("architecture", {})

    @property
    def spatial_dims(self) -> int:
        return int(self.architecture.get("spatial_dims", self.preprocessing.spatial_dims))

    @property
    def embedding_dim(self) -> int:
        return int(self.architecture["embedding_dim"])

    @property
    def depth(self) -> int:
        """The ResNet depth (of an ensemble: its deepest member's)."""
        a = self.architecture
        if "depth" not in a and a.get("members"):
            return max(int(m["depth"]) for m in a["members"])
        return int(a["depth"])

    @property
    def modalities(self) -> list:
        return list(self.metadata.get("modalities") or [])

    @property
    def calibration(self):
        from .calibration import Calibration

        data = self.metadata.get("calibration")
        if isinstance(data, Calibration) or data is None:
            return data
        return Calibration.from_dict(data) if data else None

    @calibration.setter
    def calibration(self, value) -> None:
        self.metadata["calibration"] = value.to_dict() if value is not None else None

    @property
    def model_id(self) -> str:
        """First 16 hex digits of a SHA-256 over the weights (float32, sorted names) and the
        preprocessing (and the ``normalize`` flag of the architecture, which changes the
        embeddings without weights of its own): everything that decides the embeddings, so a
        library is only ever searched with embeddings made the same way.

        An ensemble's hash also covers its members' architectures (their input sizes change
        the embeddings without weights of their own).

        The calibration turns distances into probabilities without changing embeddings; it
        has its own :attr:`calibration_id`, which libraries record (``model_metadata``) and
        ``query`` compares. A checkpoint saved with ``half=True`` loads with fp16-rounded
        weights and so has its own ID, which stays the same on every later load and re-save.
        Cached until any tensor or the preprocessing changes.
        """
        import torch

        state = self.network.state_dict()
        prep = json.dumps(self.preprocessing.to_dict(), sort_keys=True, default=json_default)
        unit = bool(self.architecture.get("normalize", False))
        members = self.architecture.get("members")
        members = json.dumps(members, sort_keys=True) if members else ""
        key = (prep, unit, members) + tuple((name, t.data_ptr(), t._version)
                                            for name, t in sorted(state.items()))
        if self._id_cache[0] != key:
            digest = hashlib.sha256()
            for name in sorted(state):
                tensor = state[name].detach().to("cpu", dtype=torch.float32)
                digest.update(name.encode() + b"\n")
                digest.update(tensor.contiguous().numpy().tobytes())
            digest.update(b"preprocessing\n" + prep.encode("utf-8"))
            if unit:  # only then: the IDs of every other model stay as they were
                digest.update(b"\nnormalize")
            if members:
                digest.update(b"\nensemble " + members.encode("utf-8"))
            self._id_cache = (key, digest.hexdigest()[:16])
        return self._id_cache[1]

    @property
    def calibration_id(self) -> str:
        """16 hex digits identifying the calibration ("" without one)."""
        return calibration_id(self.metadata.get("calibration"))

    # -- checks ----------------------------------------------------------------------
    def check_image(self, loaded) -> None:
        """Raise ``ModelMismatchError`` for a wrong dimensionality or modality family."""
        check_image_fits(loaded, self.spatial_dims, self.modalities)

    def to(self, device) -> "FingerprintModel":
        self.network.to(device)
        if self.pair_head is not None:
            self.pair_head.to(device)
        return self

    def __repr__(self) -> str:
        a = self.architecture
        kind = (f"ensemble of {len(a['members'])}" if a.get("members") else f"resnet{a.get('depth')}")
        return (f"FingerprintModel({kind}, {a.get('spatial_dims')}D, "
                f"dim={a.get('embedding_dim')}, id={self.model_id})")


def json_default(value):
    """Make the usual non-JSON values in metadata storable (numpy numbers, paths, objects
    with ``to_dict`` such as ``Calibration``)."""
    import numpy as np

    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"metadata value of type {type(value).__name__} cannot be stored as JSON")


def calibration_id(calibration) -> str:
    """16 hex digits of a SHA-256 over a calibration's JSON ("" for none)."""
    if calibration is None:
        return ""
    data = calibration.to_dict() if hasattr(calibration, "to_dict") else calibration
    if not data:
        return ""
    text = json.dumps(data, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
