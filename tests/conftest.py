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
import fcntl  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402


def pytest_make_parametrize_id(config, val, argname):
    """Name a bytes parameter by its length, not its content.

    pytest-xdist requires every worker to collect the same test ids, and serialised protos
    are not stable between processes: a ``tf.train.Features`` map serialises its keys in an
    order that differs from one process to the next. One such id stopped a CI run at
    collection ("Different tests were collected between gw1 and gw0").
    """
    del config
    if isinstance(val, bytes):
        return f"{argname}:{len(val)}B"
    return None


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One whole ``landmarks-demo`` run (defaults, with the recognizer comparison: about two
    minutes here), shared by the tests that need a trained model, its records, reference cache
    and predict outputs (test_demo.py, test_query.py, test_guides.py, ...). ``run_dir``,
    ``exit_code``, ``stdout``.

    Under pytest-xdist every worker process has its own session: the first to get here runs
    the demo under a file lock in the folder the workers share, the others wait and reuse it.
    """
    from beam_pipelines import demo

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_demo"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        result = shared / "result.json"
        if not result.exists():
            run_dir = shared / "demo"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exit_code = demo.main(["--run_dir", str(run_dir)])
            result.write_text(json.dumps({"run_dir": str(run_dir), "exit_code": exit_code,
                                          "stdout": printed.getvalue()}))
        return types.SimpleNamespace(**json.loads(result.read_text()))
