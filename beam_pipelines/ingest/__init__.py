"""Beam job 1: image manifests -> normalised, sharded TFRecords (``landmarks-ingest``)."""
