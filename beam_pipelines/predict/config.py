"""The frozen, validated configuration of ``landmarks-predict`` and its command line.

``parse_args(argv)`` splits the command line: the job's own flags go to :class:`PredictConfig`,
Beam's flags (``--runner``, ``--direct_running_mode``, Dataflow flags, ...) are returned
untouched for Beam's ``PipelineOptions``, and any other flag is refused with a suggestion
(:func:`beam_pipelines.cli.parse_job_args`). Validation raises ``InputError`` with a one-line
message; nothing here
touches files or models (the launcher resolves the model's image size and class count and
stores them with :meth:`PredictConfig.resolved`).

Where the reference features live (decision, see ``--reference_features``): by default in a
folder *beside* the output folder, ``<parent of output_dir>/reference_features``; a folder
inside the output folder is refused.
``--overwrite`` empties the output folder, and the reference features are the one output worth
keeping across runs (featurising up to 32 references per class is the most expensive step at
scale). Runs that share a parent folder share the cache; it is reused only when its recorded
extractor spec, references per class and reference-data files all match (see
:mod:`beam_pipelines.predict.reference_cache`), otherwise it is recomputed in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
from typing import Optional, Sequence

from beam_pipelines import cli
from beam_pipelines.predict.elements import RECOGNIZERS
from tfrecords_schema import InputError

CROP_CHOICES = (22, 12, 2, 1)
"""``--crops``: 22 = the recipe's views, 12 = the earlier variant (c=0.1), 2 = whole + mirror,
1 = whole image only."""

DEFAULT_REFERENCES_PER_CLASS = 32
DEFAULT_BLEND_WEIGHT = 0.15
DEFAULT_BATCH_IMAGES = 4
DEFAULT_MAX_FAILED_FRACTION = 0.01
REFERENCE_FEATURES_DIRNAME = "reference_features"

RECOGNIZER_CHOICES = RECOGNIZERS
"""``--recognizer``: crop voting (the recipe), retrieval over every reference image's embedding
(GLR-2019 rule), or retrieval whose votes are weighted by the classifier (GLR-2020 3rd place)."""
ANN_CHOICES = ("exact", "faiss")
DEFAULT_INDEX_SHARD_SIZE = 100_000
DEFAULT_RERANK_TOP = 5
"""``--rerank_top`` of the classifier recognizer: candidates of the crop vote verified per test
image (1 = the recipe). 5 beat 3 and 1 on the benchmark of docs/METHOD.md ("Stage 2 with
several candidates"), on the hard toy data and on real photographs."""
EMBEDDING_FILENAME = "embedding.keras"


def default_knn_k(recognizer: str) -> int:
    """The k of the rule's source: 3 for ``knn`` (GLR-2019, Ozaki & Yokoo), 5 for
    ``knn+classifier`` (GLR-2020 3rd place, Ha et al.); see ``rescoring.retrieval``."""
    from rescoring import retrieval

    if recognizer == "knn":
        return retrieval.AggregationParams.glr2019().k
    return retrieval.AggregationParams.glr2020_third().k


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Everything one prediction run needs (the job's flags, not Beam's).

    Attributes:
      model: path of the trained ``model.keras`` (local or ``gs://``).
      test_data: glob of the test TFRecord shards (``image_record`` schema).
      reference_data: glob of the reference (training) shards; records with label >= 0 are
        candidates for the per-class reference sample.
      output_dir: run folder for ``submission.csv``, ``scores.csv``, ``config.json``,
        ``stats.json`` and ``_SUCCESS``.
      label_map: path of ``label_map.csv``; default ``label_map.csv`` beside the model.
      reference_features: folder of the reusable reference-feature TFRecords; default
        ``<parent of output_dir>/reference_features`` (outside the output folder so that
        ``--overwrite`` keeps it).
      local_features: extractor spec for :func:`rescoring.local_features.make_extractor`.
      references_per_class: K, the references featurised and compared per class.
      crops: number of views per test image (one of :data:`CROP_CHOICES`).
      blend_weight: w in ``final = (1 - w) * local_max_normalised + w * nn_confidence``.
      batch_images: images per forward pass (each contributes ``crops`` views, so a batch holds
        up to ``batch_images * crops`` views).
      overwrite: empty a non-empty output folder instead of refusing it.
      max_failed_fraction: the run fails (exit code 4, no ``_SUCCESS``) when more than this
        fraction of the local-feature extractions it ran failed: (test + reference extraction
        failures) / (test + reference images given to the extractor in this run).
      recognizer: one of :data:`RECOGNIZER_CHOICES` (see the pipeline module's docstring).
      embedding: ``embedding.keras`` of the kNN recognizers; default the one beside ``model``
        (empty for the classifier recognizer).
      knn_k: neighbours retrieved per test image, all of which vote (non-landmarks excepted);
        0 = :func:`default_knn_k` (resolved here; stays 0 for the classifier recognizer).
      index_shard_size: at most this many reference embeddings per shard of the index (the
        unit of memory of a retrieval worker).
      ann: ``exact`` (blocked exact search) or ``faiss`` (FAISS IVF per shard, approximate).
      retrieval_index: glob of index records (GLDv2's index archives, ingested unlabelled):
        also write ``retrieval.csv``, the 100 nearest index images of each test image
        (:mod:`beam_pipelines.predict.retrieval_task`); kNN recognizers only.
      rerank_top: K, the crop vote's candidates verified per test image, the answer being the
        best final score (``rescoring.candidates``); 1 = the recipe. 0 = :data:`DEFAULT_RERANK_TOP`
        for the classifier recognizer (resolved here; stays 0 for the kNN recognizers).
      image_size: model input side in pixels (resolved from the model by the launcher; 0 until
        then).
      num_classes: model output width (resolved from the model; 0 until then).
    """

    model: str
    test_data: str
    reference_data: str
    output_dir: str
    label_map: str = ""
    reference_features: str = ""
    local_features: str = "default"
    references_per_class: int = DEFAULT_REFERENCES_PER_CLASS
    crops: int = 22
    blend_weight: float = DEFAULT_BLEND_WEIGHT
    batch_images: int = DEFAULT_BATCH_IMAGES
    overwrite: bool = False
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION
    recognizer: str = "classifier"
    embedding: str = ""
    knn_k: int = 0
    index_shard_size: int = DEFAULT_INDEX_SHARD_SIZE
    ann: str = "exact"
    retrieval_index: str = ""
    rerank_top: int = 0
    image_size: int = 0
    num_classes: int = 0

    def __post_init__(self):
        for name in ("model", "test_data", "reference_data", "output_dir"):
            if not getattr(self, name):
                raise InputError(f"--{name} is required")
        if self.crops not in CROP_CHOICES:
            raise InputError(f"--crops must be one of {CROP_CHOICES}, got {self.crops}")
        if self.references_per_class < 1:
            raise InputError(
                f"--references_per_class must be >= 1, got {self.references_per_class}"
            )
        if not 0.0 <= self.blend_weight <= 1.0:
            raise InputError(f"--blend_weight must lie in [0, 1], got {self.blend_weight}")
        if self.batch_images < 1:
            raise InputError(f"--batch_images must be >= 1, got {self.batch_images}")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise InputError(
                f"--max_failed_fraction must lie in [0, 1], got {self.max_failed_fraction}")
        if not self.local_features:
            raise InputError("--local_features must name an extractor spec")
        if self.recognizer not in RECOGNIZER_CHOICES:
            raise InputError(
                f"--recognizer must be one of {', '.join(RECOGNIZER_CHOICES)}, got "
                f"{self.recognizer!r}")
        if self.ann not in ANN_CHOICES:
            raise InputError(f"--ann must be one of {', '.join(ANN_CHOICES)}, got {self.ann!r}")
        if self.knn_k < 0:
            raise InputError(f"--knn_k must be >= 1, got {self.knn_k}")
        if self.index_shard_size < 1:
            raise InputError(f"--index_shard_size must be >= 1, got {self.index_shard_size}")
        if self.retrieval_index and self.recognizer == "classifier":
            raise InputError("--retrieval_index needs --recognizer knn or knn+classifier (the "
                             "index is searched with their --embedding)")
        if self.rerank_top < 0:
            raise InputError(f"--rerank_top must be >= 1, got {self.rerank_top}")
        if self.recognizer == "classifier":
            if self.embedding or self.knn_k or self.ann != "exact":
                raise InputError("--embedding, --knn_k and --ann need --recognizer knn or "
                                 "knn+classifier")
            if not self.rerank_top:
                object.__setattr__(self, "rerank_top", DEFAULT_RERANK_TOP)
        else:
            if self.rerank_top:
                raise InputError("--rerank_top needs --recognizer classifier (the kNN "
                                 "recognizers re-rank by their verified neighbours)")
            if not self.knn_k:
                object.__setattr__(self, "knn_k", default_knn_k(self.recognizer))
            if not self.embedding:
                object.__setattr__(self, "embedding", _sibling(self.model, EMBEDDING_FILENAME))
        if self.image_size < 0 or self.num_classes < 0:
            raise ValueError("image_size and num_classes cannot be negative")
        # Defaults that depend on other fields are filled here so the frozen object (and
        # config.json) always shows the paths actually used.
        if not self.label_map:
            object.__setattr__(self, "label_map", _sibling(self.model, "label_map.csv"))
        if not self.reference_features:
            parent = _parent(self.output_dir)
            object.__setattr__(
                self, "reference_features", _join(parent, REFERENCE_FEATURES_DIRNAME)
            )
        for name in ("model", "label_map", "test_data", "reference_data", "embedding",
                     "retrieval_index"):
            if getattr(self, name) and _inside(getattr(self, name), self.output_dir):
                raise InputError(
                    f"--{name} lies inside --output_dir: the run folder is emptied by "
                    "--overwrite, keep inputs elsewhere"
                )
        if _inside(self.reference_features, self.output_dir):
            raise InputError(
                "--reference_features must lie outside --output_dir (an --overwrite of the "
                "output folder would delete the reusable features)"
            )

    def resolved(self, image_size: int, num_classes: int) -> "PredictConfig":
        """A copy with the model's input size and output width filled in."""
        if image_size < 1 or num_classes < 1:
            raise ValueError(f"bad model geometry: image_size={image_size}, classes={num_classes}")
        return dataclasses.replace(self, image_size=image_size, num_classes=num_classes)

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def uses_knn(self) -> bool:
        return self.recognizer != "classifier"

    @property
    def uses_classifier(self) -> bool:
        return self.recognizer != "knn"


def _strip(path: str) -> str:
    return path.rstrip("/") or path


def _parent(path: str) -> str:
    """Parent folder of ``path`` for local paths and ``scheme://bucket/...`` alike."""
    path = _strip(path)
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if "/" not in rest:
            raise InputError(f"output folder {path} has no parent; pass --reference_features")
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(path))


def _join(base: str, name: str) -> str:
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def _sibling(path: str, name: str) -> str:
    return _join(_parent(path), name)


def _inside(path: str, folder: str) -> bool:
    """True if ``path`` is ``folder`` or lies below it."""
    if "://" not in path and "://" not in folder:
        path, folder = os.path.abspath(path), os.path.abspath(folder)
    path, folder = _strip(path), _strip(folder)
    return path == folder or path.startswith(folder + "/")


BEAM_FLAGS_EPILOG = """\
Flags not listed above go to Beam's PipelineOptions (a flag that no registered
PipelineOptions class knows is refused, with the closest flag as a suggestion), for example
  local:    --runner=FnApiRunner   or   --runner=DirectRunner --direct_num_workers=2
  Dataflow: --runner=DataflowRunner --project=MY_PROJECT --region=europe-west1
            --temp_location=gs://MY_BUCKET/tmp --setup_file=./setup.py
            --machine_type=n1-highmem-8 --max_num_workers=10
All paths may be gs:// URLs.

example:
  landmarks-predict --model model/model.keras --test_data 'records/test/test-*.tfrecord' \\
      --reference_data 'records/train/train-*.tfrecord' --output_dir predict/ --runner=FnApiRunner
"""


def build_parser() -> argparse.ArgumentParser:
    """The job's own flags (Beam's are left to ``PipelineOptions``)."""
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-predict",
        description=(
            "Crop voting with the trained classifier, then local-feature rescoring against "
            "per-class reference images -> submission.csv. Beam's flags go to Beam; any other "
            "flag is refused."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=BEAM_FLAGS_EPILOG,
    )
    default = " (default: %(default)s)"
    add = parser.add_argument
    add("--model", default="", help="trained model.keras written by landmarks-train (required)")
    add("--test_data", default="", help="glob of the test TFRecord shards (required)")
    add("--reference_data", default="",
        help="glob of the reference (training) TFRecord shards; records with a label are "
             "candidates for the per-class references (required)")
    add("--output_dir", default="",
        help="run folder for submission.csv, scores.csv, config.json, stats.json (required)")
    add("--label_map", default="", help="label_map.csv (default: the one beside --model)")
    add("--reference_features", default="",
        help="folder of the reusable reference features, outside --output_dir "
             f"(default: <parent of --output_dir>/{REFERENCE_FEATURES_DIRNAME})")
    add("--local_features", default="default",
        help="local-feature extractor spec: default, orb, sift or delf:HANDLE" + default)
    add("--references_per_class", type=int, default=DEFAULT_REFERENCES_PER_CLASS,
        help="K, reference images featurised and compared per class" + default)
    add("--crops", type=int, default=22,
        help="views per test image: "
             f"{', '.join(str(choice) for choice in CROP_CHOICES)} "
             "(22 = the recipe, 1 = whole image only)" + default)
    add("--blend_weight", type=float, default=DEFAULT_BLEND_WEIGHT,
        help="w in final = (1 - w) * local_max_normalised + w * nn_confidence, in [0, 1]"
             + default)
    add("--batch_images", type=int, default=DEFAULT_BATCH_IMAGES,
        help="test images per forward pass (each brings --crops views)" + default)
    add("--overwrite", action="store_true",
        help="empty a non-empty --output_dir (default: off, a non-empty folder is refused)")
    add("--max_failed_fraction", type=float, default=DEFAULT_MAX_FAILED_FRACTION,
        help="fail the run (exit code 4, no _SUCCESS) when more than this fraction of the "
             "local-feature extractions failed (test + reference images featurised in this "
             "run), in [0, 1]" + default)
    add("--recognizer", default="classifier", choices=RECOGNIZER_CHOICES,
        help="classifier: crop voting with --model; knn: the nearest reference images by "
             "--embedding vote (GLR-2019 rule); knn+classifier: their votes weighted by the "
             "classifier's probabilities of its top 5 classes (GLR-2020 3rd place rule)"
             + default)
    add("--embedding", default="",
        help=f"{EMBEDDING_FILENAME} of the knn recognizers (default: the one beside --model)")
    add("--knn_k", type=int, default=0,
        help="neighbours retrieved per test image (all but non-landmarks vote) "
             "(default: 3 for knn, 5 for knn+classifier, as the rules' sources)")
    add("--index_shard_size", type=int, default=DEFAULT_INDEX_SHARD_SIZE,
        help="at most this many reference embeddings per shard of the kNN index: a retrieval "
             "worker holds one shard (size x D x 4 bytes)" + default)
    add("--ann", default="exact", choices=ANN_CHOICES,
        help="kNN search: exact (blocked matrix products) or faiss (approximate FAISS IVF "
             "index per shard, needs faiss-cpu)" + default)
    add("--retrieval_index", default="",
        help="glob of index records (GLDv2's index archives ingested as an unlabelled split): "
             "also write retrieval.csv, the 100 nearest index images of each test image, "
             "nearest first; needs --recognizer knn or knn+classifier (default: none)")
    add("--rerank_top", type=int, default=0,
        help="classifier recognizer: verify the crop vote's top K classes, each against its "
             "own references, and answer the one with the best final score (1 = the recipe: "
             f"only the vote's class) (default: {DEFAULT_RERANK_TOP})")
    return parser


# Fields the launcher fills in from the model (PredictConfig.resolved); every other field is a
# flag of the same name (tests/test_cli_flags.py checks both ways).
RESOLVED_FROM_MODEL = ("image_size", "num_classes")


def parse_args(argv: Optional[Sequence[str]]) -> tuple[PredictConfig, list[str]]:
    """Returns (job config, the remaining arguments for Beam's ``PipelineOptions``)."""
    known, beam_args = cli.parse_job_args(build_parser(), argv)
    flags = {field.name: getattr(known, field.name) for field in dataclasses.fields(PredictConfig)
             if field.name not in RESOLVED_FROM_MODEL}
    config = PredictConfig(**flags)
    return config, beam_args
