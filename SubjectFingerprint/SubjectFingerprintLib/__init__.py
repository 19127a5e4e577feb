"""Helpers of the SubjectFingerprint Slicer module (no torch import here)."""
