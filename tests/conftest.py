"""Test-wide set-up.

TensorFlow's CPU is split into 2 logical devices here, at import time, before anything
initialises the devices: that gives a real 2-replica MirroredStrategy to test data parallelism
on a machine without GPUs. Every test sees 2 CPU devices; single-device code uses the first.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

# Shared fixtures for remote sources (HTTP server, GCS emulator) on 127.0.0.1.
from remote_servers import gcs_emulator, http_server  # noqa: E402,F401
