"""SubjectFingerprint: recognise the same subject across medical images.

The engine is plain Python (no Slicer, no Qt): readers in :mod:`subject_fingerprint.io`,
fingerprint models in :mod:`subject_fingerprint.model` and :mod:`subject_fingerprint.checkpoint`,
the HDF5 embedding library in :mod:`subject_fingerprint.library`, ranked lookup in
:mod:`subject_fingerprint.search` and the high-level index/query calls in
:mod:`subject_fingerprint.lookup`.
"""

__version__ = "0.1.0"
