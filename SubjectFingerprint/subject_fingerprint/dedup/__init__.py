"""Dataset deduplication: subjects shared across and within datasets, and duplicate images.

``engine`` compares embeddings block by block, ``datasets`` turns the command's DATASET
arguments into embeddings, ``report`` writes the CSVs, summary, histogram and HTML page, and
``cli`` is the ``dedup`` subcommand.
"""
