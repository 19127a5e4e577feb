"""Helpers of the FingerprintTraining module. The process runner and dependency installer are
shared with SubjectFingerprint (``SubjectFingerprintLib``); this package is kept for module-only helpers."""
