"""The frozen configuration of one ``landmarks-ingest`` run, filled from the command line.

Everything the job does is decided by :class:`IngestConfig`; it is written next to the outputs
as ``config.json``. Beam's own flags (``--runner``, ``--project``, ``--direct_num_workers``, ...)
are not part of it: :func:`parse_args` returns them separately for ``PipelineOptions``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

from beam_pipelines.ingest.fetch import FetchParams
from beam_pipelines.ingest.normalise import NormaliseParams

_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """One ingest run.

    Attributes:
      manifest: CSV with header ``id,url,landmark_id`` (train) or ``id,url`` (test); local or gs://.
      output_dir: run folder (must be empty unless ``overwrite``).
      distractor_dir: optional folder of non-landmark images (label -1), listed non-recursively.
      label_map: optional existing ``label_map.csv`` to reuse (e.g. the train map for a dev set);
        landmark ids missing from it are rejected as ``unknown_landmark``.
      split_name: name of the main split; default ``train`` (labelled) or ``test`` (unlabelled).
      dev_fraction: share of each class held out as split ``dev`` (0 = no dev split).
      num_shards: shards of the main split; dev gets ``ceil(num_shards * dev_fraction)``.
      max_side: longer side of stored images in pixels (never enlarged).
      jpeg_quality, max_pixels, max_bytes: see :class:`NormaliseParams`.
      timeout_seconds, max_attempts, backoff_seconds: see :class:`FetchParams`.
      overwrite: delete the contents of a non-empty ``output_dir`` first.
      tfds_metadata: also write TensorFlow Datasets metadata (``dataset_info.json``,
        ``features.json``) so ``tfds.builder_from_directory(output_dir)`` reads the shards.
    """

    manifest: str
    output_dir: str
    distractor_dir: str = ""
    label_map: str = ""
    split_name: str = ""
    dev_fraction: float = 0.0
    num_shards: int = 4
    max_side: int = 512
    jpeg_quality: int = 90
    max_pixels: int = 50_000_000
    max_bytes: int = 50 * 1024 * 1024
    timeout_seconds: float = 10.0
    max_attempts: int = 3
    backoff_seconds: float = 0.5
    overwrite: bool = False
    tfds_metadata: bool = True

    def __post_init__(self):
        if not self.manifest:
            raise ValueError("--manifest is required")
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if self.num_shards < 1:
            raise ValueError(f"--num_shards must be >= 1, got {self.num_shards}")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"--dev_fraction must be in [0, 1), got {self.dev_fraction}")
        if self.split_name and not _SPLIT_NAME.fullmatch(self.split_name):
            raise ValueError(
                f"--split_name must match {_SPLIT_NAME.pattern}, got {self.split_name!r}")
        if self.split_name == "dev" and self.dev_fraction > 0:
            raise ValueError("--split_name dev clashes with the dev split of --dev_fraction")
        self.normalise_params()  # validates the image limits
        self.fetch_params()  # validates the fetch settings

    def normalise_params(self) -> NormaliseParams:
        return NormaliseParams(max_side=self.max_side, max_pixels=self.max_pixels,
                               max_bytes=self.max_bytes, jpeg_quality=self.jpeg_quality)

    def fetch_params(self, base_dir: str = "") -> FetchParams:
        return FetchParams(timeout_seconds=self.timeout_seconds, max_attempts=self.max_attempts,
                           backoff_seconds=self.backoff_seconds, max_bytes=self.max_bytes,
                           base_dir=base_dir)

    def main_split(self, labelled: bool) -> str:
        """``split_name`` if given, else ``train`` for a labelled manifest, ``test`` otherwise."""
        return self.split_name or ("train" if labelled else "test")

    def shards_per_split(self, labelled: bool) -> dict[str, int]:
        """Split name -> number of shards."""
        shards = {self.main_split(labelled): self.num_shards}
        if self.dev_fraction > 0:
            shards["dev"] = max(1, math.ceil(self.num_shards * self.dev_fraction))
        return shards

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="landmarks-ingest",
        description="Manifest CSV (+ distractor folder) -> normalised, sharded TFRecords. "
        "Unknown flags go to Beam (e.g. --runner=DataflowRunner --project=... --region=...).",
    )
    defaults = IngestConfig(manifest="-", output_dir="-")
    parser.add_argument("--manifest", default="", help="CSV id,url[,landmark_id] (local or gs://)")
    parser.add_argument("--output_dir", default="", help="run folder for shards and reports")
    parser.add_argument("--distractor_dir", default="", help="folder of non-landmark images")
    parser.add_argument("--label_map", default="", help="reuse this label_map.csv")
    parser.add_argument("--split_name", default="", help="name of the main split")
    parser.add_argument("--dev_fraction", type=float, default=defaults.dev_fraction)
    parser.add_argument("--num_shards", type=int, default=defaults.num_shards)
    parser.add_argument("--max_side", type=int, default=defaults.max_side)
    parser.add_argument("--jpeg_quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--max_pixels", type=int, default=defaults.max_pixels)
    parser.add_argument("--max_bytes", type=int, default=defaults.max_bytes)
    parser.add_argument("--timeout_seconds", type=float, default=defaults.timeout_seconds)
    parser.add_argument("--max_attempts", type=int, default=defaults.max_attempts)
    parser.add_argument("--backoff_seconds", type=float, default=defaults.backoff_seconds)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the contents of a non-empty --output_dir first")
    parser.add_argument("--no_tfds_metadata", dest="tfds_metadata", action="store_false",
                        help="skip the TensorFlow Datasets metadata (one extra read of the shards)")
    return parser


def parse_args(argv=None) -> tuple[IngestConfig, list[str]]:
    """(config, the remaining flags for Beam). Raises ``ValueError`` for bad values."""
    known, beam_args = build_arg_parser().parse_known_args(argv)
    return IngestConfig(**vars(known)), beam_args
