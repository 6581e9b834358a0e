"""Choosing the ``tf.distribute`` strategy and feeding it data.

- :func:`make_strategy`: MultiWorkerMirroredStrategy when ``TF_CONFIG`` is set, MirroredStrategy
  over named devices or all local GPUs, else the default (one-device) strategy.
- :func:`ensure_logical_cpus`: splits the CPU into N logical devices so that
  ``--devices /cpu:0,/cpu:1`` gives a real 2-replica MirroredStrategy without GPUs. Must run
  before TensorFlow initialises its devices (first op, first ``list_logical_devices``).
- :func:`distribute_dataset`: ``strategy.distribute_datasets_from_function``; each input
  pipeline reads its own share of the files and batches ``global_batch / replicas`` images.

Batch sizes in this project are global: the loss divides by the global batch, so one step on
N replicas equals one step on one device with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Callable

import tensorflow as tf

from tfrecords_schema import InputError
from trainer.config import DistributionConfig

_LOG = logging.getLogger(__name__)
_CPU_NAME = re.compile(
    r"^/(?:job:[^/]+/(?:replica:\d+/)?(?:task:\d+/)?)?(?:device:)?cpu:(\d+)$", re.IGNORECASE
)


@dataclasses.dataclass(frozen=True)
class StrategyInfo:
    """What :func:`make_strategy` chose, for the log and ``summary.json``."""

    kind: str
    num_replicas: int
    devices: tuple[str, ...]
    task: str = ""  # "worker-1" etc. under MultiWorkerMirroredStrategy, else ""
    is_chief: bool = True

    def describe_batch(self, global_batch: int) -> str:
        """E.g. ``"global batch 8 = 4 per replica x 2 replicas (mirrored)"``."""
        return (
            f"global batch {global_batch} = {global_batch // self.num_replicas} per replica x "
            f"{self.num_replicas} replica(s) ({self.kind})"
        )


def ensure_logical_cpus(count: int) -> None:
    """Splits the first physical CPU into ``count`` logical devices (no-op if already >= count).

    Raises:
      InputError: TensorFlow's devices are already initialised with fewer CPU devices.
    """
    if count <= 1:
        return
    physical = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(physical[0])
    if current is not None and len(current) >= count:
        return
    try:
        tf.config.set_logical_device_configuration(
            physical[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as error:  # devices already initialised in this process
        available = len(tf.config.list_logical_devices("CPU"))
        if available >= count:
            return
        raise InputError(
            f"--devices needs {count} CPU devices but this process has {available} "
            "(they are fixed once TensorFlow has started)"
        ) from error


def _requested_cpu_count(devices: tuple[str, ...]) -> int:
    indices = [int(match.group(1)) for match in map(_CPU_NAME.match, devices) if match]
    return max(indices) + 1 if indices else 0


def make_strategy(config: DistributionConfig) -> tuple[tf.distribute.Strategy, StrategyInfo]:
    """Returns the strategy for ``config`` and a description of it.

    ``auto``: TF_CONFIG set -> MultiWorkerMirroredStrategy; ``devices`` given -> MirroredStrategy
    over them; local GPUs -> MirroredStrategy over all of them; else the default strategy.

    Raises:
      InputError: a named device does not exist, or TF_CONFIG is malformed.
    """
    kind = config.strategy
    if kind == "auto":
        if os.environ.get("TF_CONFIG"):
            kind = "multi_worker"
        elif config.devices or tf.config.list_physical_devices("GPU"):
            kind = "mirrored"
        else:
            kind = "default"
    if kind == "multi_worker":
        _check_tf_config(os.environ.get("TF_CONFIG", ""))
        configure_coordination(config.coordination_timeout)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        devices = tuple(strategy.extended.worker_devices)
    elif kind == "mirrored":
        ensure_logical_cpus(_requested_cpu_count(config.devices))
        if config.devices:
            _check_devices_exist(config.devices)
            strategy = tf.distribute.MirroredStrategy(list(config.devices))
        else:
            strategy = tf.distribute.MirroredStrategy()
        devices = tuple(strategy.extended.worker_devices)
    else:
        strategy = tf.distribute.get_strategy()
        devices = (tf.config.list_logical_devices()[0].name,)
    task, is_chief = "", True
    if kind == "multi_worker":
        resolver = strategy.cluster_resolver
        task = f"{resolver.task_type}-{resolver.task_id}"
        cluster = resolver.cluster_spec().as_dict()
        is_chief = _is_chief(resolver.task_type, resolver.task_id, cluster)
    info = StrategyInfo(
        kind=kind,
        num_replicas=strategy.num_replicas_in_sync,
        devices=devices,
        task=task,
        is_chief=is_chief,
    )
    _LOG.info("strategy %s: %d replica(s) on %s", kind, info.num_replicas, ", ".join(devices))
    return strategy, info


def configure_coordination(timeout_seconds: int) -> None:
    """Sets the coordination service of the coming MultiWorkerMirroredStrategy on purpose.

    The strategy configures the service itself only when nothing has (same service type,
    leader and jobs as here), with TensorFlow's defaults: a 10 s heartbeat timeout, which a
    worker starved of CPU for a few seconds (the chief computing the dev GAP on a busy host)
    exceeds, killing the run with "Task ... heartbeat timeout". Here the heartbeat, cluster
    registration and shutdown-barrier timeouts are all ``timeout_seconds``
    (``--coordination_timeout``).
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    if context.context().coordination_service is not None:
        return
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    cluster = resolver.cluster_spec()
    jobs = [coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster.num_tasks(job))
            for job in ("chief", "worker") if job in cluster.jobs]
    milliseconds = int(timeout_seconds * 1000)
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=jobs,
        heartbeat_timeout_in_ms=milliseconds,
        cluster_register_timeout_in_ms=milliseconds,
        shutdown_barrier_timeout_in_ms=milliseconds,
    )
    _LOG.info("coordination service: heartbeat, registration and shutdown timeouts %d s",
              timeout_seconds)


def _is_chief(task_type: str | None, task_id: int | None, cluster: dict) -> bool:
    """The chief writes the model dir: task "chief", else worker 0 when there is no chief."""
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def _check_tf_config(text: str) -> None:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"TF_CONFIG is not valid JSON: {error}") from error
    if "cluster" not in parsed or "task" not in parsed:
        raise InputError("TF_CONFIG needs 'cluster' and 'task' entries")


def _check_devices_exist(devices: tuple[str, ...]) -> None:
    known = {device.name.lower() for device in tf.config.list_logical_devices()}
    short = {name.split("device:")[-1] for name in known}
    for device in devices:
        name = device.lower().lstrip("/")
        name = name.split("device:")[-1]
        if name not in short:
            raise InputError(
                f"device {device!r} not found; this machine has "
                f"{', '.join(sorted(d.name for d in tf.config.list_logical_devices()))}"
            )


def worker_temp_dir(model_dir: str, info: StrategyInfo) -> str:
    """Where a non-chief worker writes: ``<model_dir>/workertemp_<task id>``.

    The layout of Keras' multi-worker guide: every worker runs the same code and saves the same
    files, but only the chief's land in the model dir; another worker's go to its own temporary
    folder, which it deletes once the run has succeeded (it holds that worker's backup until
    then, so a restarted worker resumes from it).
    """
    task_id = info.task.rsplit("-", 1)[-1]
    return "/".join([model_dir.rstrip("/"), f"workertemp_{task_id}"])


def broadcast_from_chief(
    strategy: tf.distribute.Strategy, info: StrategyInfo, value: float
) -> float:
    """The chief's ``value`` on every worker; ``value`` itself without several workers.

    A collective under MultiWorkerMirroredStrategy: every worker must call it at the same
    point (the value the others pass is ignored). The chief's local replicas each contribute
    ``value / local replicas`` and every other replica 0, and one all-reduce SUM in float64
    delivers the same number to every worker (exactly ``value`` with one replica per worker).
    """
    if info.kind != "multi_worker":
        return value
    local_replicas = len(strategy.extended.worker_devices)
    share = value / local_replicas if info.is_chief else 0.0
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda _context: tf.constant(share, tf.float64)
    )
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))


def check_global_batch(global_batch: int, info: StrategyInfo, what: str) -> None:
    """Raises ``InputError`` unless ``global_batch`` splits evenly over the replicas."""
    if global_batch % info.num_replicas:
        raise InputError(
            f"{what} {global_batch} is not divisible by the {info.num_replicas} replicas"
        )


def distribute_dataset(
    strategy: tf.distribute.Strategy,
    global_batch: int,
    make_per_replica_dataset: Callable[[int, tf.distribute.InputContext], tf.data.Dataset],
) -> tf.distribute.DistributedDataset:
    """``distribute_datasets_from_function`` with the per-replica batch worked out.

    Args:
      strategy: the training strategy.
      global_batch: images per step over all replicas.
      make_per_replica_dataset: ``(per_replica_batch, input_context) -> dataset`` of batches
        of ``per_replica_batch``; it shards by file using ``input_context``.
    """

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica_batch = input_context.get_per_replica_batch_size(global_batch)
        return make_per_replica_dataset(per_replica_batch, input_context)

    return strategy.distribute_datasets_from_function(dataset_fn)
