"""The frozen configuration of one ``landmarks-ingest`` run, filled from the command line.

Everything the job does is decided by :class:`IngestConfig`; it is written next to the outputs
as ``config.json``. Beam's own flags (``--runner``, ``--project``, ``--direct_num_workers``, ...)
are not part of it: :func:`parse_args` returns them separately for ``PipelineOptions`` (and
refuses a flag that is neither the job's nor Beam's).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

from beam_pipelines.ingest.fetch import FetchParams
from beam_pipelines.ingest.normalise import NormaliseParams
from beam_pipelines import cli
from tfrecords_schema import InputError

_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """One ingest run.

    Attributes:
      manifest: CSV with header ``id,url,landmark_id`` (train) or ``id,url`` (test); local or gs://.
      input_tfrecords: instead of ``manifest``, a glob of TFRecord shards in DELF's
        ``build_image_dataset.py`` layout or in this project's own (see
        :mod:`beam_pipelines.ingest.tfrecord_input`); exactly one of the two is given.
      archives: instead of ``manifest``, a glob of GLDv2 tar archives (``images_*.tar``) read
        as streams (:mod:`beam_pipelines.ingest.archives`); needs ``labels_csv``.
      labels_csv: with ``archives``: a GLDv2 label CSV, recognised by its header (``train.csv``,
        ``train_clean.csv``, ``index_image_to_landmark.csv``, or id-only ``test.csv`` /
        ``index.csv`` for an unlabelled split; :mod:`beam_pipelines.ingest.gldv2`).
      md5_dir: with ``archives``: folder of the release's ``md5.images_NNN.txt`` files for these
        archives (``md5sum/train`` for ``train/images_*.tar``); each archive is checked
        (in the same stream that lists its members) before its members are used.
      archive_parts: with ``archives``: equal byte ranges each archive is cut into for decoding,
        each read and decoded by one worker; 0 (default) = enough for every worker of the
        runner to have one (``ceil(workers / archives)``; 1 when the runner's worker count is
        not given).
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
      max_rejected_fraction: the run fails (no ``_SUCCESS``, exit code 4) when more than this
        share of the input rows is rejected, or when nothing is written.
    """

    manifest: str = ""
    output_dir: str = ""
    input_tfrecords: str = ""
    archives: str = ""
    labels_csv: str = ""
    md5_dir: str = ""
    archive_parts: int = 0
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
    max_rejected_fraction: float = 0.5

    def __post_init__(self):
        given = [name for name in ("manifest", "input_tfrecords", "archives")
                 if getattr(self, name)]
        if len(given) != 1:
            raise InputError(
                "give exactly one input: --manifest (a CSV of id,url[,landmark_id]), "
                "--input_tfrecords (a glob of TFRecord shards, e.g. DELF's GLDv2 records) or "
                "--archives (a glob of GLDv2 tar archives, with --labels_csv); got "
                + {0: "none", 2: "both ", 3: "all three: "}.get(len(given), "")
                + " and ".join(f"--{name}" for name in given))
        if self.archives and not self.labels_csv:
            raise InputError("--archives needs --labels_csv (GLDv2's train.csv, train_clean.csv, "
                             "index_image_to_landmark.csv, test.csv or index.csv)")
        if (self.labels_csv or self.md5_dir) and not self.archives:
            raise InputError(f"--{'labels_csv' if self.labels_csv else 'md5_dir'} goes with "
                             "--archives")
        if self.archive_parts < 0:
            raise InputError(f"--archive_parts must be >= 0 (0: automatic), got "
                             f"{self.archive_parts}")
        if self.archive_parts and not self.archives:
            raise InputError("--archive_parts goes with --archives")
        if not self.output_dir:
            raise InputError("--output_dir is required")
        if self.num_shards < 1:
            raise InputError(f"--num_shards must be >= 1, got {self.num_shards}")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise InputError(f"--dev_fraction must be in [0, 1), got {self.dev_fraction}")
        if self.split_name and not _SPLIT_NAME.fullmatch(self.split_name):
            raise InputError(
                f"--split_name must match {_SPLIT_NAME.pattern}, got {self.split_name!r}")
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise InputError("--max_rejected_fraction must be in [0, 1], got "
                             f"{self.max_rejected_fraction}")
        if self.split_name == "dev" and self.dev_fraction > 0:
            raise InputError("--split_name dev clashes with the dev split of --dev_fraction")
        try:
            self.normalise_params()  # validates the image limits
            self.fetch_params()  # validates the fetch settings
        except ValueError as error:  # their checks name the flags' values
            raise InputError(str(error)) from error

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

    def shards_per_split(self, labelled: bool | None) -> dict[str, int]:
        """Split name -> number of shards. ``labelled=None`` (TFRecord input, labelled or not
        record by record): both main splits, ``train`` and ``test`` (one if ``split_name``)."""
        if labelled is None:
            shards = {self.main_split(True): self.num_shards,
                      self.main_split(False): self.num_shards}
        else:
            shards = {self.main_split(labelled): self.num_shards}
        if self.dev_fraction > 0:
            shards["dev"] = max(1, math.ceil(self.num_shards * self.dev_fraction))
        return shards

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BEAM_FLAGS_EPILOG = """\
Flags not listed above go to Beam's PipelineOptions (a flag that no registered
PipelineOptions class knows is refused, with the closest flag as a suggestion), for example
  local:    --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing
  Dataflow: --runner=DataflowRunner --project=MY_PROJECT --region=europe-west1
            --temp_location=gs://MY_BUCKET/tmp --setup_file=./setup.py
            --machine_type=n1-standard-4 --max_num_workers=20
Paths (--manifest, --output_dir, ...) may be gs:// URLs.

examples:
  landmarks-ingest --manifest toy/train.csv --distractor_dir toy/distractors \\
      --output_dir records/train --dev_fraction 0.2 --num_shards 2 --runner=FnApiRunner
  landmarks-ingest --archives 'gldv2/train/images_*.tar' --labels_csv gldv2/train_clean.csv \\
      --md5_dir gldv2/md5sum/train --output_dir records/train --dev_fraction 0.02
"""


def build_arg_parser() -> argparse.ArgumentParser:
    """The job's own flags; defaults come from :class:`IngestConfig`."""
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-ingest",
        description="Manifest CSV (+ distractor folder) -> normalised, sharded TFRecords. "
        "Beam's flags go to Beam (e.g. --runner=DataflowRunner --project=... --region=...); "
        "any other flag is refused.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=BEAM_FLAGS_EPILOG,
    )
    defaults = IngestConfig(manifest="-", output_dir="-")
    default = " (default: %(default)s)"
    add = parser.add_argument
    add("--manifest", default="",
        help="CSV with header id,url,landmark_id (train) or id,url (test); local or gs:// "
             "(default: none; exactly one of --manifest, --input_tfrecords and --archives is "
             "required)")
    add("--input_tfrecords", default="",
        help="instead of --manifest: glob of TFRecord shards to convert, in the layout of "
             "DELF's build_image_dataset.py (image/encoded, image/id, image/class/label = "
             "landmark id; no label = test split) or in this project's layout; quote it "
             "(default: none)")
    add("--archives", default="",
        help="instead of --manifest: glob of GLDv2 tar archives (e.g. 'train/images_*.tar'), "
             "each read as a stream, never extracted; needs --labels_csv; quote it "
             "(default: none)")
    add("--labels_csv", default="",
        help="with --archives: GLDv2 label CSV, recognised by its header: train.csv "
             "(id,url,landmark_id), train_clean.csv (landmark_id,images), "
             "index_image_to_landmark.csv (id,landmark_id), or id-only test.csv / index.csv "
             "(unlabelled split); local or gs:// (default: none)")
    add("--md5_dir", default="",
        help="with --archives: folder of the release's md5.images_NNN.txt files for these "
             "archives (e.g. md5sum/train); an archive whose MD5 does not match is not used and "
             "its labelled rows are rejected checksum_mismatch (default: no check)")
    add("--archive_parts", type=int, default=defaults.archive_parts,
        help="with --archives: equal byte ranges each archive is cut into for decoding, each "
             "read and decoded by one worker, for runs with fewer archives than workers; 0 = "
             "ceil(workers / archives) from --direct_num_workers, --max_num_workers or "
             "--num_workers, else 1 (default: 0)")
    add("--output_dir", default="",
        help="run folder for shards, label_map.csv, rejected.csv, stats.json (required)")
    add("--distractor_dir", default="",
        help="folder of non-landmark images, stored with label -1, listed non-recursively "
             "(default: none)")
    add("--label_map", default="",
        help="reuse this label_map.csv (e.g. the train map for a dev set); unknown landmark ids "
             "are rejected (default: build one from the manifest)")
    add("--split_name", default="",
        help="name of the main split (default: train for a labelled manifest, test otherwise)")
    add("--dev_fraction", type=float, default=defaults.dev_fraction,
        help="share of each class held out as split dev, in [0, 1); 0 = no dev split" + default)
    add("--num_shards", type=int, default=defaults.num_shards,
        help="shards of the main split; dev gets ceil(num_shards * dev_fraction)" + default)
    add("--max_side", type=int, default=defaults.max_side,
        help="longer side of stored images, pixels (never enlarged)" + default)
    add("--jpeg_quality", type=int, default=defaults.jpeg_quality,
        help="JPEG quality of stored images, 1-95" + default)
    add("--max_pixels", type=int, default=defaults.max_pixels,
        help="reject decoded images with more pixels (decompression bombs)" + default)
    add("--max_bytes", type=int, default=defaults.max_bytes,
        help="reject downloads or files larger than this, bytes" + default)
    add("--timeout_seconds", type=float, default=defaults.timeout_seconds,
        help="timeout of one download attempt, seconds" + default)
    add("--max_attempts", type=int, default=defaults.max_attempts,
        help="download attempts per URL, including the first" + default)
    add("--backoff_seconds", type=float, default=defaults.backoff_seconds,
        help="wait before the first retry, seconds; doubles with each retry" + default)
    add("--overwrite", action="store_true",
        help="delete the contents of a non-empty --output_dir first (default: off, a non-empty "
             "folder is refused)")
    add("--max_rejected_fraction", type=float, default=defaults.max_rejected_fraction,
        help="fail (exit code 4, no _SUCCESS) when more than this share of the input rows is "
             "rejected, in [0, 1]; a run that writes nothing always fails" + default)
    add("--no_tfds_metadata", dest="tfds_metadata", action="store_false",
        help="skip the TensorFlow Datasets metadata, which costs one extra read of the shards "
             "(default: off, metadata written)")
    return parser


def parse_args(argv=None) -> tuple[IngestConfig, list[str]]:
    """(config, Beam's flags unchanged). Raises ``InputError`` for bad or unknown flags or values.

    A flag that is neither the job's nor a registered ``PipelineOptions`` flag is refused
    (:func:`beam_pipelines.cli.parse_job_args`).
    """
    known, beam_args = cli.parse_job_args(build_arg_parser(), argv)
    return IngestConfig(**vars(known)), beam_args
