"""Offline tokenization: images (+ captions) -> uint16 VQ code shards (+ T5 features) with a manifest.

Entry point: `argen tokenize CONFIG [key=value ...]` (argen.tokenize_offline.cli); the job itself is
argen.tokenize_offline.job.TokenizeJob; the format is argen.data_pipeline.shard_format.
"""
