"""FingerprintTraining's own Logic and panel; the process runner, dependency installer and
background-run widget mixin are shared with SubjectFingerprint (``SubjectFingerprintLib``)."""
