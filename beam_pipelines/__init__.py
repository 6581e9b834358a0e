"""Orchestration: the Beam jobs (ingest, predict), evaluation and the demo.

Nothing else imports this package. Each job module has ``run(argv=None)`` and ``main(argv=None)``.
"""

import os

# The jobs import TensorFlow (for tf.train.Example) but run no TF graphs on the ingest path:
# keep TensorFlow's C++ start-up lines (oneDNN, CPU features, CUDA probing) out of job logs.
# A user who sets the variable keeps their own value.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
