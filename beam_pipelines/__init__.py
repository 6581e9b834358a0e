"""Orchestration: the Beam jobs (ingest, predict), evaluation and the demo. Nothing else imports this package."""
