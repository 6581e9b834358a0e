"""Beam job 2: crop voting + local-feature rescoring -> submission (``landmarks-predict``)."""
