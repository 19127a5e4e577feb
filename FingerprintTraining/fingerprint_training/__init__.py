"""Training and evaluation of subject fingerprint models.

Training (this part): ``splits`` (subject-disjoint seeded splits), ``data`` (preloaded
tensors), ``sampler`` (P subjects x K images batches, distributed-aware), ``mining`` (the
Few-Shot Fingerprinting paper's Algorithm 1 as a pytorch-metric-learning miner; PML's batch-hard
and all-triplets miners), ``losses`` (PML triplet margin / contrastive / multi-similarity
losses and cross-batch memory), ``augment``, ``trainer``, ``distributed`` (DDP) and ``cli``
(``split``, ``train``, ``evaluate`` subcommands). Evaluation: ``metrics``, ``evaluate``,
``baselines``, ``calibration_fit`` (fits the engine's ``calibration``), ``plots``.
"""
