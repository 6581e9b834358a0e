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


import contextlib  # noqa: E402
import io  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One whole ``landmarks-demo`` run (defaults, with the recognizer comparison: about two
    minutes here), shared by the tests that need a trained model, its records, reference cache
    and predict outputs (test_demo.py, test_query.py). ``run_dir``, ``exit_code``, ``stdout``.
    """
    from beam_pipelines import demo

    run_dir = tmp_path_factory.mktemp("shared") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exit_code = demo.main(["--run_dir", str(run_dir)])
    return types.SimpleNamespace(run_dir=str(run_dir), exit_code=exit_code,
                                 stdout=printed.getvalue())
