"""``landmarks-predict``: crop voting, then local-feature rescoring -> ``submission.csv``.

Usage::

    landmarks-predict --model runs/train/model.keras \\
        --test_data 'runs/ingest/test-*.tfrecord' --reference_data 'runs/ingest/train-*.tfrecord' \\
        --output_dir runs/predict [--local_features default|delf:HANDLE|sift|orb] \\
        [--references_per_class 32] [--crops 22] [--overwrite] [Beam options, e.g. --runner] \
        [--recognizer classifier|knn|knn+classifier] [--embedding runs/train/embedding.keras] \
        [--knn_k K] [--index_shard_size 100000] [--ann exact|faiss]

Steps (the launcher checks everything it can before a pipeline starts):

1. Launcher: reads the label map, loads the model once (input size S, output width C must match
   the label map), loads the extractor and tries it on a photograph (:func:`probe_extractor`:
   a spec that does not load, raises, or returns no usable features fails here), prepares the
   output folder.
2. Reference features (Beam job A, only when the cache cannot be reused, see
   :mod:`beam_pipelines.predict.reference_cache`). No labelled reference, or no reference with
   features, stops the run here (exit code 4).
3. Prediction (Beam job B, :func:`build_prediction`; the steps are :mod:`.steps`)::

     ReadTestImages --images--+--> CropVote ------------- (id, Vote) -----------+
       |  |                   +--> ExtractLocalFeatures -- (id, FeatureRecord) --+
       |  |                                  | errors                            |
       |  |     ReadReferenceFeatures -------|------ (class, FeatureRecord) -----+
       |  |                                  |                                   v
       |  |                                  |                                 Verify
       |  |                                  |                                   | ScoredImage
       |  +--unreadable--> ScoredImage (no prediction) ---------> Flatten <------+
       |                                     |                      |
       |                                     |                    Blend
       |                                     |                      | FinalRow
       |                                     |              PickBestCandidate (--rerank_top > 1)
       |                                     v                      | FinalRow
       +--unparseable--------------> WriteSubmission <--------------+
                        submission.csv, scores.csv, the counts for stats.json

   With ``--rerank_top K`` > 1 (docs/METHOD.md, "Stage 2 with several candidates") each vote
   carries the crop vote's K candidates, ``Verify`` keys a copy of the test image by each
   candidate's class (:func:`.transforms.candidate_queries`), ``Blend`` normalises by the
   largest local score of every candidate and ``PickBestCandidate`` keeps each test image's
   best final score (a ``CombinePerKey`` by test id).

4. Launcher: ``stats.json`` (counts + seconds), then the completeness checks
   (:func:`completeness_problem`), then ``_SUCCESS`` only if they pass.

Retrieval recognizer (``--recognizer knn`` or ``knn+classifier``; docs/METHOD.md, "Retrieval
recognizer"). The launcher also loads ``--embedding`` (default ``embedding.keras`` beside the
model) and checks it (:func:`check_embedding_model`); between steps 2 and 3 a job A' embeds
*every* reference image into the cache (``embeddings/``, reused when the model's bytes and the
reference files match, :func:`ensure_reference_embeddings`; no landmark embedding stops the run,
exit code 4). Job B then replaces ``CropVote`` and ``Verify``::

     ReadTestImages --images--+--> Embed ----- (id, embedding) ---+
       |                      |                                   v
       |  ReadReferenceEmbeddings -> ShardIndex -- (key, shard) -> Retrieve
       |                      |                                   | (id, Neighbours)
       |                      +--> CropVote (knn+classifier) --> ScoreNeighbours
       |                      |         (id, Vote + shares)       | (id, KnnScores)
       |                      +--> ExtractLocalFeatures --------> VerifyNeighbours <-- reference
       |                                                          | ScoredImage       features
       |  ReadReferenceImages -- (id, ImageRecord) --------------^ (uncached neighbours only)
       +--unreadable--> ... Flatten -> Blend -> WriteSubmission (as above)

With ``--retrieval_index GLOB`` (records of GLDv2's index archives, ingested unlabelled), the
same test embeddings also retrieve their 100 nearest index images: ``retrieval.csv``
(:mod:`beam_pipelines.predict.retrieval_task`: the index embedded by ``EmbedReferences``,
searched by ``ShardIndex`` + ``Retrieve``; ``stats.json`` ``retrieval_task``).

Test images are embedded from the same views as crop voting (``--crops``), combined by
``rescoring.retrieval.combine_view_embeddings`` (views normalised, averaged, normalised again).
Each test image retrieves its ``--knn_k`` most similar references of the whole index
(non-landmarks included); the non-landmark ones give the penalty subtracted from the landmark
ones' similarities, and only landmark ones vote (GLR-2019 rule for ``knn``; GLR-2020 3rd-place
rule, votes ``s ** 9`` times the classifier's mean probability of the class, 1e-8 outside its
top 5, to the power 10, for ``knn+classifier``; :func:`.knn.aggregation_params`). Every
landmark neighbour is verified against the test image: with its cached local features when it
is in the per-class sample of ``--references_per_class``, else with features extracted in job B (``VerifyNeighbours``: the
uncached retrieved ids are joined by id with the records of ``--reference_data``, each decoded
and featurised once by the cache's extractor, written nowhere; ``stats.json``
``retrieval.knn_references_featurised_on_demand``, their failures counted as reference
extraction failures); the inliers re-rank the classes
(``rescoring.retrieval.rerank_with_inliers``), and the blend is the classifier's, with
``confidence`` (:func:`.knn.blend_confidence`) in place of ``nn_confidence``.

Exit codes of ``main`` (``run(argv)`` returns the summary or raises):

* 0: done, ``_SUCCESS`` written.
* 1: an internal error, i.e. a bug (its traceback is logged, then one
  ``landmarks-predict: internal error: ...`` line).
* 2: bad input (:class:`PredictError`, one line): flags, files, label map, model, an extractor
  spec that does not work, a bucket that cannot be listed, a record file Beam's reader cannot
  frame (named).
* 4: the job ran but did not do its work (:class:`IncompleteRunError`, one line; ``stats.json``
  says what happened, no ``_SUCCESS``): more than ``--max_failed_fraction`` of the local-feature
  extractions failed, no test record was read, no test image was readable, no readable test
  image gave local features, or no reference image was labelled or gave features.
* 5: an input or output cannot be reached (its storage service does not answer; checked
  before any pipeline is built, one line naming it and the cause).

What counts in the failed fraction: extraction failures (the extractor raised or returned
unusable output) over extraction attempts, test and reference images together, counting only
the extractions this run made (a reused reference cache adds nothing: it was complete, so it
had no failures; the kNN recognizers' on-demand reference extractions in job B count as
reference extractions). Undecodable or unparseable records are not extraction failures: they are
counted separately in ``stats.json`` (``undecodable_test_images``, ``unreadable``, ...) and an
unreadable test image still gets its (empty) row.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_pipelines import cli, io_utils
from beam_pipelines.predict import config as config_lib
from beam_pipelines.predict import model_handler, reference_cache, steps, transforms
from rescoring import scores
from tfrecords_schema import InputError, SchemaError
from tfrecords_schema.label_map import LabelMap
from trainer.cli import CommandFailure

_LOG = logging.getLogger(__name__)

DEFAULT_LOCAL_RUNNER = "FnApiRunner"
EXIT_INCOMPLETE = 4
PROBE_IMAGE_SIDE = 256


class PredictError(InputError):
    """A problem with the inputs found before any pipeline starts (one-line message)."""


class IncompleteRunError(CommandFailure):
    """The job ran but did not do its work (exit code 4, see the module docstring); one line.

    ``stats`` holds what was written to ``stats.json`` (empty when nothing was).
    """

    exit_code = EXIT_INCOMPLETE

    def __init__(self, message: str, stats: Optional[dict] = None):
        super().__init__(message)
        self.stats = stats or {}


# ---- crop specs -----------------------------------------------------------------------------


def crop_spec_for(num_views: int):
    """``--crops`` -> ``rescoring.crops.CropSpec``: 22 = recipe, 12 = c 0.1, 2 = whole+mirror,
    1 = whole."""
    from rescoring import crops

    return crops.CropSpec.for_num_views(num_views)


# ---- launcher checks ------------------------------------------------------------------------


def load_label_map(path: str) -> LabelMap:
    if not io_utils.exists(path):
        raise PredictError(f"label map not found: {path} (pass --label_map)")
    try:
        return LabelMap.from_csv_text(io_utils.read_text(path), source=path)
    except SchemaError as error:
        raise PredictError(f"bad label map: {error}") from error


def check_model(path: str, label_map: LabelMap) -> model_handler.ModelGeometry:
    """Loads the model once in the launcher: input size, and output width == label-map size."""
    try:
        model = model_handler.load_keras_model(path)
        geometry = model_handler.model_geometry(model)
    except FileNotFoundError as error:
        raise PredictError(str(error)) from error
    except ValueError as error:
        raise PredictError(f"incompatible model {path}: {error}") from error
    del model
    if geometry.num_classes != label_map.num_classes:
        raise PredictError(
            f"model {path} predicts {geometry.num_classes} classes but label map has "
            f"{label_map.num_classes} landmark ids; pass the label map the model was trained with"
        )
    return geometry


def check_embedding_model(path: str, image_size: int) -> tuple[int, str]:
    """Loads ``--embedding`` once in the launcher: input S = the classifier's, output ``[B, D]``
    of unit rows (checked on :func:`probe_image`, so a classifier passed by mistake is refused).

    Returns:
      ``(D, SHA-256 of the file)``; the digest keys the reference-embedding cache.
    """
    import numpy as np

    from trainer.preprocessing import ImageContract

    flag = f"--embedding {path}"
    try:
        model = model_handler.load_keras_model(path)
        width = model_handler.embedding_width(model, image_size)
    except FileNotFoundError as error:
        raise PredictError(f"{flag}: {error} (train with landmarks-train, which writes "
                           "embedding.keras beside model.keras, or pass --embedding)") from error
    except ValueError as error:
        raise PredictError(f"incompatible {flag}: {error}") from error
    from PIL import Image

    probe = np.asarray(Image.fromarray(probe_image()).resize((image_size, image_size)), np.uint8)
    output = np.asarray(model.predict_on_batch(ImageContract(image_size).scale(probe[None])))
    del model
    norm = float(np.linalg.norm(output[0]))
    if not np.all(np.isfinite(output)) or abs(norm - 1.0) > 1e-3:
        raise PredictError(
            f"{flag} does not output L2-normalised embeddings (norm {norm:.4g} on a test "
            "photograph); pass the embedding.keras written by landmarks-train")
    return width, reference_cache.file_digest(path)


def check_ann(config) -> None:
    """``--ann faiss`` needs FAISS in the launcher (and the workers)."""
    if config.ann != "faiss":
        return
    from rescoring import ann

    try:
        ann.import_faiss()
    except ImportError as error:
        raise PredictError(f"--ann faiss: {error}") from error


def access_paths(config: config_lib.PredictConfig, beam_args: Sequence[str]) -> dict:
    """Flag -> path of every input and output of the job, Beam's temporary and staging
    folders included, for :func:`io_utils.check_access` (before any pipeline is built)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    cloud = PipelineOptions(list(beam_args)).view_as(GoogleCloudOptions)
    paths = {"--model": config.model, "--test_data": config.test_data,
             "--reference_data": config.reference_data, "--output_dir": config.output_dir,
             "--reference_features": config.reference_features,
             "--temp_location": cloud.temp_location,
             "--staging_location": cloud.staging_location}
    return {flag: path for flag, path in paths.items() if path}


def check_inputs(config: config_lib.PredictConfig) -> None:
    if not io_utils.match(config.test_data):
        raise PredictError(f"no test files match --test_data {config.test_data}")
    if not io_utils.match(config.reference_data):
        raise PredictError(f"no reference files match --reference_data {config.reference_data}")
    if config.retrieval_index and not io_utils.match(config.retrieval_index):
        raise PredictError(f"no index files match --retrieval_index {config.retrieval_index}")


def probe_image():
    """The photograph every extractor is tried on before any Beam work: scikit-image's bundled
    astronaut (no download), resized to 256 x 256 px. It is full of corners and texture: a
    working extractor finds features in it."""
    import numpy as np
    import skimage.data
    from PIL import Image

    image = Image.fromarray(skimage.data.astronaut()).resize(
        (PROBE_IMAGE_SIDE, PROBE_IMAGE_SIDE), Image.BILINEAR)
    return np.asarray(image, np.uint8)


def probe_extractor(spec: str):
    """Makes the extractor of ``--local_features``, loads it and tries it on :func:`probe_image`.

    Returns:
      ``(extractor, number of features found in the probe image)``.

    Raises:
      ResourceUnreachable: a module URL whose host does not answer (exit code 5).
      PredictError: one line naming the spec and the cause: unknown spec; ``does not load``
        (module missing, no ``default`` signature, ...); ``fails on a test photograph`` (the
        call raised, e.g. a signature with other inputs); ``returns no usable output`` (not
        ``(locations [N, 2], descriptors [N, D])`` of finite numbers, or no features at all).
    """
    from rescoring import local_features

    flag = f"--local_features {spec}"
    try:
        extractor = local_features.make_extractor(spec)
    except ValueError as error:
        raise PredictError(f"bad {flag}: {error}") from error
    if spec.startswith(local_features.DELF_PREFIX):  # a TF-Hub URL or a gs:// folder
        cli.check_reachable({"--local_features": spec[len(local_features.DELF_PREFIX):]})
    try:
        extractor.load()
    except Exception as error:  # noqa: BLE001 - hub.load raises OSError, KeyError, TF errors...
        raise PredictError(f"{flag} does not load: {transforms.error_summary(error)}") from error
    try:
        output = extractor.extract(probe_image())
    except Exception as error:  # noqa: BLE001 - whatever the module raises
        raise PredictError(
            f"{flag} fails on a test photograph: {transforms.error_summary(error)}") from error
    try:
        locations, descriptors = transforms.check_features(output)
    except ValueError as error:
        raise PredictError(f"{flag} returns no usable output: {error}") from error
    if len(locations) == 0:
        raise PredictError(
            f"{flag} returns no usable output: no local features in a "
            f"{PROBE_IMAGE_SIDE} px photograph (scikit-image's astronaut)")
    _LOG.info("extractor %s: %d features of %d dims in the probe photograph",
              extractor.spec, len(locations), descriptors.shape[1])
    return extractor, len(locations)


def make_verification_params(extractor):
    from rescoring import verification

    return verification.VerificationParams(
        max_descriptor_distance=float(extractor.max_descriptor_distance)
    )


def pipeline_options(beam_args: Sequence[str]) -> PipelineOptions:
    """Beam's options; the runner defaults to the local ``FnApiRunner`` (no download)."""
    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_LOCAL_RUNNER
    return options


def run_reading(pipeline, inputs: dict):
    """Runs ``pipeline`` to its end; returns its result.

    A TFRecord file that Beam's reader cannot frame (truncated, or not a TFRecord file) is the
    user's data, not a bug: ``PredictError`` (exit code 2) naming the flag and the first such
    file of ``inputs`` (flag -> glob).
    """
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except Exception as error:  # noqa: BLE001 - runners wrap the reader's ValueError variously
        if "Not a valid TFRecord" not in str(error):
            raise
        raise PredictError(_unreadable_records_message(inputs)) from error
    return result


def _unreadable_records_message(inputs: dict) -> str:
    from beam_pipelines.query import records

    for flag, pattern in inputs.items():
        for path in io_utils.match(pattern):
            try:
                for _ in records.iter_records(path):
                    pass
            except records.RecordFileError as error:
                return f"{flag} {pattern}: {error}"
    flags = " or ".join(f"{flag} {pattern}" for flag, pattern in inputs.items())
    return (f"a file matched by {flags} is not a TFRecord file or is damaged (Beam's reader: "
            "'Not a valid TFRecord'); re-run the job that wrote it")


# ---- job A: reference features --------------------------------------------------------------


def ensure_reference_features(config, beam_args, extractor_spec: str) -> dict:
    """Reuses the reference-feature folder if it matches, else recomputes it; says which."""
    directory = config.reference_features
    wanted = reference_cache.cache_metadata(
        extractor_spec, config.references_per_class, config.num_classes, config.reference_data
    )
    reuse, reason = reference_cache.reuse_decision(directory, wanted)
    if reuse:
        _LOG.info("reference features: reusing %s (%s)", directory, reason)
        recorded = json.loads(
            io_utils.read_text(io_utils.join(directory, reference_cache.METADATA_FILENAME))
        )
        # A reused folder was complete: no extraction failures, and none were run now.
        return {"dir": directory, "reused": True, "reason": reason, "seconds": 0.0,
                "num_images": recorded.get("num_features_records"),
                "with_features": recorded.get("with_features"), "extraction_failures": 0,
                "undecodable": 0, "complete": True}
    _LOG.info("reference features: computing into %s (%s)", directory, reason)
    start = time.monotonic()
    reference_cache.clear_for_recompute(directory)
    reference_cache.mark_in_progress(directory, wanted)
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    _ = pipeline | "FeaturiseReferences" >> reference_cache.FeaturiseReferences(
        config.reference_data, directory, extractor_spec, config.references_per_class,
        config.num_classes,
    )
    result = run_reading(pipeline, {"--reference_data": config.reference_data})
    num_written = _distribution_count(result, "reference_features_per_image")
    errors = _read_json_or(io_utils.join(directory, reference_cache.ERRORS_FILENAME),
                           {"count": 0, "causes": []})
    failures = _counter_value(result, "reference_extraction_failed")
    if failures is None:
        failures = errors["count"]
    featureless = _counter_value(result, "reference_without_features")
    with_features = (None if num_written is None or featureless is None
                     else num_written - featureless)
    complete = reference_cache.finish(directory, wanted, num_written, failures, with_features)
    seconds = time.monotonic() - start
    _LOG.info("reference features: %s images featurised in %.1f s, %d extraction failures",
              num_written, seconds, failures)
    if not complete:
        _LOG.warning("reference features in %s are not marked complete (%d extraction "
                     "failures, %s with features): the next run recomputes them",
                     directory, failures, with_features)
    return {"dir": directory, "reused": False, "reason": reason, "seconds": round(seconds, 3),
            "num_images": num_written, "with_features": with_features,
            "extraction_failures": int(failures),
            "undecodable": _counter_value(result, "reference_undecodable"),
            "unparseable": _counter_value(result, "reference_unparseable"),
            "label_out_of_range": _counter_value(result, "reference_label_out_of_range"),
            "errors": errors, "complete": complete}


def ensure_reference_embeddings(config, beam_args, embedding_sha256: str) -> dict:
    """Reuses the cache's reference embeddings (``embeddings/``) if they match, else recomputes
    them (job A', :class:`.reference_cache.EmbedReferenceImages`); says which."""
    directory = reference_cache.embeddings_dir(config.reference_features)
    wanted = reference_cache.embedding_cache_metadata(
        embedding_sha256, config.image_size, config.num_classes, config.reference_data)
    reuse, reason = reference_cache.reuse_decision(
        directory, wanted, shards_pattern=reference_cache.embeddings_pattern(directory),
        matched=reference_cache.EMBEDDINGS_REUSE_REASON, what="reference embeddings")
    if reuse:
        _LOG.info("reference embeddings: reusing %s (%s)", directory, reason)
        recorded = json.loads(
            io_utils.read_text(io_utils.join(directory, reference_cache.METADATA_FILENAME)))
        return {"dir": directory, "reused": True, "reason": reason, "seconds": 0.0,
                "counts": recorded.get("counts"), "complete": True}
    _LOG.info("reference embeddings: computing into %s (%s)", directory, reason)
    start = time.monotonic()
    reference_cache.clear_for_recompute(directory, keep=())
    reference_cache.mark_in_progress(directory, wanted)
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    _ = pipeline | "EmbedReferenceImages" >> reference_cache.EmbedReferenceImages(
        config.reference_data, directory, config.embedding, embedding_sha256, config.image_size,
        config.batch_images, config.num_classes)
    result = run_reading(pipeline, {"--reference_data": config.reference_data})
    counts = _read_json_or(io_utils.join(directory, reference_cache.COUNTS_FILENAME), None)
    complete = reference_cache.finish_embeddings(directory, wanted, counts, config.embedding)
    seconds = time.monotonic() - start
    _LOG.info("reference embeddings: %s in %.1f s", counts, seconds)
    if not complete:
        _LOG.warning("reference embeddings in %s are not marked complete (%s): the next run "
                     "recomputes them", directory, counts)
    return {"dir": directory, "reused": False, "reason": reason, "seconds": round(seconds, 3),
            "counts": counts,
            "undecodable": _counter_value(result, "reference_undecodable"),
            "unparseable": _counter_value(result, "reference_unparseable"),
            "label_out_of_range": _counter_value(result, "reference_label_out_of_range"),
            "complete": complete}


def embedding_problem(embeddings: dict, config) -> Optional[str]:
    """Why the reference embeddings leave nothing to retrieve (None if they do not)."""
    counts = embeddings.get("counts") or {}
    if not counts.get("landmark"):
        return (f"no reference embeddings: no record of --reference_data "
                f"{config.reference_data} with a label in [0, {config.num_classes}) was "
                f"embedded ({counts.get('rows', 0)} embedded in all)")
    if len(counts.get("dims", [])) != 1:
        return f"the reference embeddings have several lengths {counts.get('dims')}"
    return None


def reference_problem(references: dict, config) -> Optional[str]:
    """Why the reference features leave nothing to rescore against (None if they do not)."""
    if references.get("num_images") == 0:
        out_of_range = references.get("label_out_of_range")
        extra = f"; {out_of_range} had a label beyond the label map" if out_of_range else ""
        return (f"no reference images: no record of --reference_data {config.reference_data} "
                f"has a label in [0, {config.num_classes}){extra}")
    if references.get("with_features") == 0:
        cause = _dominant_cause(references.get("errors"))
        return (f"no reference image gave local features ({references['num_images']} "
                f"featurised with {config.local_features}, "
                f"{references.get('extraction_failures', 0)} failed"
                + (f"; most frequent cause: {cause}" if cause else "") + ")")
    return None


def _read_json_or(path: str, default):
    if not io_utils.exists(path):
        return default
    return json.loads(io_utils.read_text(path))


def _counter_value(result, name: str) -> Optional[int]:
    """Sum of a Beam counter (committed, else attempted), 0 if it was never incremented, or
    None if the runner has no metrics."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        query = result.metrics().query(
            MetricsFilter().with_namespace(transforms.NAMESPACE).with_name(name)
        )
    except (NotImplementedError, AttributeError, ValueError):
        return None
    total = 0
    for item in query["counters"]:
        value = item.committed if item.committed is not None else item.attempted
        total += int(value or 0)
    return total


def _distribution_count(result, name: str) -> Optional[int]:
    """Number of updates of a Beam distribution metric, or None if the runner has no metrics."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        query = result.metrics().query(
            MetricsFilter().with_namespace(transforms.NAMESPACE).with_name(name)
        )
    except (NotImplementedError, AttributeError, ValueError):
        return None
    counts = [item.committed.count for item in query["distributions"] if item.committed]
    return int(sum(counts)) if counts else 0


# ---- job B: prediction ----------------------------------------------------------------------


def build_prediction(pipeline, config, crop_spec, verification_params, landmark_ids,
                     extractor_spec: str, index: Optional[dict] = None) -> None:
    """Adds job B's steps (:mod:`.steps`) to ``pipeline``, as in the module docstring's diagram.

    The recognizer is chosen by ``config.recognizer``: ``classifier`` runs ``CropVote``
    (``DecodedImage`` -> ``(image_id, Vote)``) then ``Verify`` against the predicted class's
    references; ``knn`` and ``knn+classifier`` run ``Embed``, ``Retrieve`` over the shards of
    the reference index (``ShardIndex``), ``ScoreNeighbours`` (with ``CropVote``'s class shares
    for ``knn+classifier``) and ``VerifyNeighbours``. ``index``: ``{"embeddings_dir",
    "embedding_sha256", "num_rows"}`` of the reference embeddings (kNN recognizers only).
    """
    test = pipeline | "ReadTestImages" >> steps.ReadTestImages(config.test_data)
    features = test["images"] | "ExtractLocalFeatures" >> steps.ExtractLocalFeatures(
        extractor_spec, "test")
    references = pipeline | "ReadReferenceFeatures" >> reference_cache.ReadReferenceFeatures(
        config.reference_features, extractor_spec)
    reference_errors = None
    if config.recognizer == "classifier":
        votes = test["images"] | "CropVote" >> steps.CropVote(
            config.model, config.image_size, config.batch_images, crop_spec,
            rerank_top=config.rerank_top)
        scored = (
            {"votes": votes, "features": features["features"], "references": references}
            | "Verify" >> steps.Verify(verification_params)
        )
    else:
        verified = _knn_scored(pipeline, test, features, references, config, crop_spec,
                               verification_params, index, extractor_spec)
        scored, reference_errors = verified["scored"], verified["errors"]
        if config.retrieval_index:
            from beam_pipelines.predict import retrieval_task

            _ = {"queries": verified["embeddings"], "unreadable": test["unreadable"]} | (
                "RetrieveIndex" >> retrieval_task.RetrieveIndex(
                    config.retrieval_index, config.embedding, config.image_size,
                    config.batch_images, config.index_shard_size, config.ann == "faiss",
                    config.output_dir))
    unreadable = test["unreadable"] | "UnreadableRows" >> beam.Map(
        transforms.unreadable_to_scored)
    every = (scored, unreadable) | "AllTestImages" >> beam.Flatten()
    rows = every | "Blend" >> steps.Blend(config.blend_weight, landmark_ids)
    # The normaliser Blend divides by, for stats.json (the same combine of the same rows).
    maxima = (every | "NormaliserLocalScores" >> beam.Map(transforms.local_scores)
              | "Normaliser" >> beam.CombineGlobally(scores.maxima_of))
    if config.recognizer == "classifier" and config.rerank_top > 1:
        rows = rows | "PickBestCandidate" >> steps.PickBestCandidate()
    outputs = {"rows": rows, "unparseable": test["unparseable"],
               "extraction_errors": features["errors"], "maxima": maxima}
    if reference_errors is not None:
        outputs["reference_extraction_errors"] = reference_errors
    _ = outputs | "WriteSubmission" >> steps.WriteSubmission(
        config.output_dir, config.recognizer, config.rerank_top)


def _knn_scored(pipeline, test, features, references, config, crop_spec, verification_params,
                index: dict, extractor_spec: str):
    """The kNN recognizers' part of job B: test images -> ``{"scored": ScoredImage (with
    ``knn``), "errors": summary of the on-demand reference extraction failures}``."""
    from beam_pipelines.predict import knn

    params = knn.aggregation_params(config.recognizer, config.knn_k)
    embeddings = test["images"] | "Embed" >> steps.Embed(
        config.embedding, config.image_size, config.batch_images, crop_spec)
    shards = (
        pipeline
        | "ReadReferenceEmbeddings" >> reference_cache.ReadReferenceEmbeddings(
            index["embeddings_dir"], index["embedding_sha256"])
        | "ShardIndex" >> steps.ShardIndex(
            config.index_shard_size, knn.num_buckets(index["num_rows"], config.index_shard_size))
    )
    neighbours = (
        {"queries": embeddings, "index": shards}
        | "Retrieve" >> steps.Retrieve(config.knn_k, approximate=config.ann == "faiss")
    )
    inputs = {"neighbours": neighbours}
    if config.recognizer == "knn+classifier":
        inputs["votes"] = test["images"] | "CropVote" >> steps.CropVote(
            config.model, config.image_size, config.batch_images, crop_spec, class_votes=True)
    knn_scores = inputs | "ScoreNeighbours" >> steps.ScoreNeighbours(params)
    reference_images = (
        pipeline
        | "ReadReferenceImages" >> beam.io.ReadFromTFRecord(config.reference_data)
        | "ParseReferenceImages" >> beam.ParDo(reference_cache.ParseRecord())
    )
    verified = (
        {"knn": knn_scores, "features": features["features"], "references": references,
         "reference_images": reference_images}
        | "VerifyNeighbours" >> steps.VerifyNeighbours(
            verification_params, params, config.recognizer, extractor_spec)
    )
    return {**verified, "embeddings": embeddings}  # the test embeddings: --retrieval_index


# ---- did the run do its work? ----------------------------------------------------------------

_NO_ERRORS = {"count": 0, "causes": []}


def _dominant_cause(*summaries) -> Optional[tuple[str, int]]:
    """``(example, images)`` of the most frequent cause over :class:`transforms.ErrorSummaryFn`
    summaries (causes grouped by :func:`transforms.cause_key`; ties: alphabetical), or None
    when none holds a cause."""
    merged: dict[str, tuple[int, str]] = {}  # cause_key -> (images, example)
    for summary in summaries:
        for cause, times in (summary or _NO_ERRORS).get("causes", []):
            key = transforms.cause_key(cause)
            previous_times, previous_example = merged.get(key, (0, cause))
            merged[key] = (previous_times + int(times), min(previous_example, cause))
    if not merged:
        return None
    times, example = min(merged.values(), key=lambda item: (-item[0], item[1]))
    return example, times


def failure_stats(result, stats: dict, references: dict, reference_errors: dict,
                  max_failed_fraction: float) -> dict:
    """The failure counters of ``stats.json`` from job B's result and job A's summary.

    ``failed_fraction`` = (test + reference extraction failures) / (test + reference images
    given to the extractor), counting job A only when it ran in this run; the references that
    job B featurised on demand (kNN recognizers) count as reference extractions.
    """
    test_errors = stats.pop("test_extraction_errors", None) or dict(_NO_ERRORS)
    on_demand_errors = stats.pop("reference_extraction_errors", None) or dict(_NO_ERRORS)
    on_demand_failed = _counter_value(result, "reference_extraction_failed")
    if on_demand_failed is None:
        on_demand_failed = on_demand_errors["count"]
    on_demand_attempts = _distribution_count(result, "reference_features_per_image")
    if on_demand_attempts is None:
        on_demand_attempts = _counter_value(result, "knn_references_featurised_on_demand")
    on_demand_attempts = max(int(on_demand_attempts or 0), int(on_demand_failed))
    test_failed = _counter_value(result, "test_extraction_failed")
    if test_failed is None:  # a runner without metrics: the tagged output's count is exact too
        test_failed = test_errors["count"]
    test_attempts = _distribution_count(result, "test_features_per_image")
    if test_attempts is None:
        test_attempts = stats["features_per_image"]["images"]
    reference_failed = int(references.get("extraction_failures") or 0) + int(on_demand_failed)
    reference_attempts = (0 if references.get("reused") else int(references.get("num_images") or 0)
                          ) + on_demand_attempts
    attempts = test_attempts + reference_attempts
    failed = test_failed + reference_failed
    return {
        "test_extraction_failures": int(test_failed),
        "reference_extraction_failures": reference_failed,
        "undecodable_test_images": _counter_value(result, "test_undecodable"),
        "undecodable_reference_images": references.get("undecodable"),
        "extraction_attempts": {"test": int(test_attempts), "reference": reference_attempts},
        "failed_fraction": round(failed / attempts, 6) if attempts else 0.0,
        "max_failed_fraction": max_failed_fraction,
        "extraction_errors": {"test": test_errors,
                              "reference": merge_error_summaries(reference_errors,
                                                                 on_demand_errors)},
    }


def merge_error_summaries(*summaries) -> dict:
    """:class:`transforms.ErrorSummaryFn` summaries -> one (counts added, causes merged by
    :func:`transforms.cause_key`)."""
    combine = transforms.ErrorSummaryFn()
    accumulators = []
    for summary in summaries:
        summary = summary or _NO_ERRORS
        groups: dict = {}
        for example, times in summary.get("causes", []):
            combine._add(groups, transforms.cause_key(example), int(times), example)
        accumulators.append((int(summary.get("count", 0)), groups))
    return combine.extract_output(combine.merge_accumulators(accumulators))


def retrieval_stats(result) -> dict:
    """The kNN recognizers' counters of job B (None where the runner has no metrics)."""
    from beam_pipelines.predict import knn

    names = ("index_rows", "index_shards", "index_duplicate_ids", "retrieval_pairs",
             "retrieval_queries", "knn_pairs_verified", "knn_pairs_unverified",
             "knn_references_featurised_on_demand", "knn_references_missing",
             "knn_references_undecodable")
    stats = {name: _counter_value(result, name) for name in names}
    stats["knn_pairs_unverified_reasons"] = {
        reason: _counter_value(result, f"knn_pairs_unverified_{reason}")
        for reason in knn.UNVERIFIED_REASONS}
    return stats


def completeness_problem(stats: dict, config) -> Optional[str]:
    """One line saying why a finished job B did not do its work, or None (see the module
    docstring, exit code 4)."""
    if stats["test_images"] == 0:
        return (f"no test images: the files of --test_data {config.test_data} hold no record "
                f"with an image id ({stats['unparseable_test_records']} unparseable records)")
    if stats["predicted"] == 0:
        return (f"none of the {stats['test_images']} test images is readable "
                f"({stats.get('undecodable_test_images')} undecodable, the others of another "
                "schema or malformed; see stats.json)")
    attempts = stats["extraction_attempts"]
    failed = stats["test_extraction_failures"] + stats["reference_extraction_failures"]
    if stats["failed_fraction"] > config.max_failed_fraction:
        errors = stats["extraction_errors"]
        dominant = _dominant_cause(errors.get("test"), errors.get("reference"))
        cause = (f"; most frequent cause ({dominant[1]} images): {dominant[0]}"
                 if dominant else "")
        return (f"local-feature extraction ({config.local_features}) failed on {failed} of "
                f"{attempts['test'] + attempts['reference']} images "
                f"({stats['failed_fraction']:.1%} > --max_failed_fraction "
                f"{config.max_failed_fraction:g}): test {stats['test_extraction_failures']} of "
                f"{attempts['test']}, reference {stats['reference_extraction_failures']} of "
                f"{attempts['reference']}{cause}")
    features = stats["features_per_image"]
    if (features["images"] and features.get("zero") == features["images"]
            and stats["test_extraction_failures"] < features["images"]):
        return (f"no readable test image gave local features ({features['images']} images, "
                f"--local_features {config.local_features}): nothing was rescored")
    return None


def _write_stats(output_dir: str, stats: dict) -> None:
    io_utils.write_json(io_utils.join(output_dir, "stats.json"), stats)


# ---- entry points ---------------------------------------------------------------------------


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the whole job; returns a summary (paths, counts, reference-cache decision, seconds).

    Raises:
      PredictError (an InputError): bad inputs, found before any pipeline starts (exit code 2).
      IncompleteRunError: the job ran but did not do its work (exit code 4); ``stats.json`` is
        written, ``_SUCCESS`` is not.
    """
    start = time.monotonic()
    config, beam_args = config_lib.parse_args(argv)
    io_utils.check_access(access_paths(config, beam_args))
    check_inputs(config)
    label_map = load_label_map(config.label_map)
    geometry = check_model(config.model, label_map)
    config = config.resolved(geometry.image_size, geometry.num_classes)
    knn_config = {}
    if config.uses_knn:
        from beam_pipelines.predict import knn

        check_ann(config)
        embedding_dim, embedding_sha256 = check_embedding_model(config.embedding,
                                                                config.image_size)
        knn_config = {"embedding_dim": embedding_dim, "embedding_sha256": embedding_sha256,
                      "aggregation": repr(knn.aggregation_params(config.recognizer,
                                                                 config.knn_k))}
    extractor, probe_features = probe_extractor(config.local_features)
    extractor_spec = extractor.spec
    crop_spec = crop_spec_for(config.crops)
    verification_params = make_verification_params(extractor)
    del extractor  # the workers load their own; the launcher's copy (a whole module) can go
    io_utils.prepare_output_dir(config.output_dir, config.overwrite)
    io_utils.write_json(
        io_utils.join(config.output_dir, "config.json"),
        {"job": "landmarks-predict", "config": config.to_json_dict(), "beam_args": list(beam_args),
         "extractor_spec": extractor_spec, "probe_features": probe_features,
         "crop_spec": repr(crop_spec),
         "verification": repr(verification_params),
         **({"knn": knn_config} if knn_config else {})},
    )
    _LOG.info("predict: S=%d px, C=%d classes, %d views/image, extractor %s",
              config.image_size, config.num_classes, config.crops, extractor_spec)

    references = ensure_reference_features(config, beam_args, extractor_spec)
    reference_errors = references.pop("errors", None) or dict(_NO_ERRORS)
    problem = reference_problem(references, config)
    if problem is not None:
        stats = {"reference_features": references,
                 "extraction_errors": {"reference": reference_errors},
                 "complete": False, "problem": problem,
                 "seconds": {"references": references["seconds"],
                             "total": round(time.monotonic() - start, 3)}}
        _write_stats(config.output_dir, stats)
        raise IncompleteRunError(problem, stats)
    index, embeddings, seconds = None, None, {"references": references["seconds"]}
    if config.uses_knn:
        embeddings = ensure_reference_embeddings(config, beam_args,
                                                 knn_config["embedding_sha256"])
        seconds["reference_embeddings"] = embeddings["seconds"]
        problem = embedding_problem(embeddings, config)
        if problem is not None:
            stats = {"reference_features": references, "reference_embeddings": embeddings,
                     "complete": False, "problem": problem,
                     "seconds": dict(seconds, total=round(time.monotonic() - start, 3))}
            _write_stats(config.output_dir, stats)
            raise IncompleteRunError(problem, stats)
        index = {"embeddings_dir": embeddings["dir"],
                 "embedding_sha256": knn_config["embedding_sha256"],
                 "num_rows": embeddings["counts"]["rows"]}

    predict_start = time.monotonic()
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    build_prediction(pipeline, config, crop_spec, verification_params,
                     label_map.landmark_ids, extractor_spec, index)
    result = run_reading(pipeline, {"--test_data": config.test_data,
                                    "--reference_data": config.reference_data})
    predict_seconds = time.monotonic() - predict_start

    stats_part_path = io_utils.join(config.output_dir, steps.PIPELINE_STATS_FILENAME)
    stats = json.loads(io_utils.read_text(stats_part_path))
    FileSystems.delete([stats_part_path])
    stats.update(failure_stats(result, stats, references, reference_errors,
                               config.max_failed_fraction))
    stats.update(
        reference_features=references,
        seconds=dict(seconds, prediction=round(predict_seconds, 3),
                     total=round(time.monotonic() - start, 3)),
    )
    if config.uses_knn:
        stats.update(reference_embeddings=embeddings, retrieval=retrieval_stats(result))
    problem = completeness_problem(stats, config)
    if config.retrieval_index:
        from beam_pipelines.predict import retrieval_task

        stats["retrieval_task"] = retrieval_task.read_stats(config.output_dir)
        problem = problem or retrieval_task.problem(stats["retrieval_task"],
                                                    config.retrieval_index)
    stats.update(complete=problem is None, problem=problem)
    _write_stats(config.output_dir, stats)
    if problem is not None:
        _LOG.error("predict: %s; no _SUCCESS written to %s", problem, config.output_dir)
        raise IncompleteRunError(problem, stats)
    io_utils.write_success_marker(config.output_dir)
    _LOG.info("predict: %d test images, %d predicted, %d unreadable -> %s",
              stats["test_images"], stats["predicted"], stats["unreadable"], config.output_dir)
    return {
        "output_dir": config.output_dir,
        "submission": io_utils.join(config.output_dir, "submission.csv"),
        "scores": io_utils.join(config.output_dir, "scores.csv"),
        **({"retrieval_csv": io_utils.join(config.output_dir, "retrieval.csv")}
           if config.retrieval_index else {}),
        **stats,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: prints the summary; returns the exit code (see the module docstring).

    Input errors (``InputError``: flags, unknown flags, files, label map, model) are one line
    and exit code 2, ``CommandFailure``s one line and their own code; anything else is a bug:
    traceback logged, exit code 1 (:func:`beam_pipelines.cli.run_command`).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli.run_command("landmarks-predict", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    """Runs the job and prints its summary; the exit code of a run that got to its end."""
    summary = run(argv)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
