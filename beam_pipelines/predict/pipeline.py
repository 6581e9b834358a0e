"""``landmarks-predict``: crop voting, then local-feature rescoring -> ``submission.csv``.

Usage::

    landmarks-predict --model runs/train/model.keras \\
        --test_data 'runs/ingest/test-*.tfrecord' --reference_data 'runs/ingest/train-*.tfrecord' \\
        --output_dir runs/predict [--local_features default|delf:HANDLE|sift|orb] \\
        [--references_per_class 32] [--crops 22] [--overwrite] [Beam options, e.g. --runner] \
        [--recognizer classifier|knn|knn+classifier] [--embedding runs/train/embedding.keras] \
        [--knn_k K] [--index_shard_size 100000] [--ann exact|faiss]

Steps (the launcher checks everything it can before a pipeline starts):

1. Launcher checks (:mod:`beam_pipelines.predict.input_checks`): reads the label map, loads
   the model once (input size S, output width C must match the label map), loads the extractor
   and tries it on a photograph (:func:`.input_checks.probe_extractor`: a spec that does not
   load, raises, or returns no usable features fails here); then the launcher prepares the
   output folder.
2. Reference features (Beam job A, only when the cache cannot be reused, see
   :mod:`beam_pipelines.predict.reference_cache`). No labelled reference, or no reference with
   features, stops the run here (exit code 4, :func:`.completeness.reference_problem`).
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
   (:mod:`beam_pipelines.predict.completeness`), then ``_SUCCESS`` only if they pass.

Retrieval recognizer (``--recognizer knn`` or ``knn+classifier``; docs/METHOD.md, "Retrieval
recognizer"). The launcher also loads ``--embedding`` (default ``embedding.keras`` beside the
model) and checks it (:func:`.input_checks.check_embedding_model`); between steps 2 and 3 a
job A' embeds *every* reference image into the cache (``embeddings/``, reused when the model's
bytes and the reference files match, :func:`ensure_reference_embeddings`; no landmark embedding
stops the run, exit code 4). Job B then replaces ``CropVote`` and ``Verify``::

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
from beam_pipelines.predict import completeness
from beam_pipelines.predict import config as config_lib
from beam_pipelines.predict import (input_checks, knn, reference_cache, retrieval_task, steps,
                                    transforms)
from beam_pipelines.predict.input_checks import PredictError
from rescoring import scores
from trainer.cli import CommandFailure

_LOG = logging.getLogger(__name__)

DEFAULT_LOCAL_RUNNER = "FnApiRunner"
EXIT_INCOMPLETE = 4


class IncompleteRunError(CommandFailure):
    """The job ran but did not do its work (exit code 4, see the module docstring); one line.

    ``stats`` holds what was written to ``stats.json`` (empty when nothing was).
    """

    exit_code = EXIT_INCOMPLETE

    def __init__(self, message: str, stats: Optional[dict] = None):
        super().__init__(message)
        self.stats = stats or {}


# ---- running a Beam job ----------------------------------------------------------------------


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
    num_written = completeness.distribution_count(result, "reference_features_per_image")
    errors = _read_json_or(io_utils.join(directory, reference_cache.ERRORS_FILENAME),
                           {"count": 0, "causes": []})
    failures = completeness.counter_value(result, "reference_extraction_failed")
    if failures is None:
        failures = errors["count"]
    featureless = completeness.counter_value(result, "reference_without_features")
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
            "extraction_failures": int(failures), **_unused_reference_records(result),
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
            "counts": counts, **_unused_reference_records(result), "complete": complete}


def _unused_reference_records(result) -> dict:
    """Job A's or A''s counts of the reference records it could not use (``undecodable``,
    ``unparseable``, ``label_out_of_range``; None where the runner has no metrics)."""
    return {name: completeness.counter_value(result, f"reference_{name}")
            for name in ("undecodable", "unparseable", "label_out_of_range")}


def _read_json_or(path: str, default):
    if not io_utils.exists(path):
        return default
    return json.loads(io_utils.read_text(path))


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
    checked = input_checks.check_all(config, beam_args)
    config = checked.config
    start_output(config, beam_args, checked)
    references, reference_errors = reference_features_or_stop(
        config, beam_args, checked.extractor_spec, start)
    embeddings, index = reference_index_or_stop(config, beam_args, checked.knn, references,
                                                start)
    seconds = {"references": references["seconds"]}
    if embeddings is not None:
        seconds["reference_embeddings"] = embeddings["seconds"]
    predict_start = time.monotonic()
    result = run_prediction(config, beam_args, checked, index)
    seconds["prediction"] = round(time.monotonic() - predict_start, 3)
    stats = prediction_stats(result, config, references, reference_errors, embeddings,
                             seconds, start)
    finish(config, stats)
    return summary(config, stats)


def start_output(config, beam_args: Sequence[str], checked: input_checks.CheckedInputs) -> None:
    """Prepares the output folder (:func:`io_utils.prepare_output_dir`) and writes
    ``config.json``: the resolved config, Beam's flags and what the checks found."""
    io_utils.prepare_output_dir(config.output_dir, config.overwrite)
    io_utils.write_json(
        io_utils.join(config.output_dir, "config.json"),
        {"job": "landmarks-predict", "config": config.to_json_dict(), "beam_args": list(beam_args),
         "extractor_spec": checked.extractor_spec, "probe_features": checked.probe_features,
         "crop_spec": repr(checked.crop_spec),
         "verification": repr(checked.verification_params),
         **({"knn": checked.knn} if checked.knn else {})},
    )
    _LOG.info("predict: S=%d px, C=%d classes, %d views/image, extractor %s",
              config.image_size, config.num_classes, config.crops, checked.extractor_spec)


def reference_features_or_stop(config, beam_args: Sequence[str], extractor_spec: str,
                               start: float) -> tuple[dict, dict]:
    """Job A (:func:`ensure_reference_features`) -> ``(its stats.json part, its extraction
    error summary)``; when no reference can be rescored against, writes ``stats.json`` and
    raises :class:`IncompleteRunError` (:func:`.completeness.reference_problem`)."""
    references = ensure_reference_features(config, beam_args, extractor_spec)
    reference_errors = references.pop("errors", None) or dict(completeness.NO_ERRORS)
    problem = completeness.reference_problem(references, config)
    if problem is not None:
        _stop(config.output_dir, problem, {
            "reference_features": references,
            "extraction_errors": {"reference": reference_errors},
            "seconds": {"references": references["seconds"], "total": _since(start)}})
    return references, reference_errors


def reference_index_or_stop(config, beam_args: Sequence[str], knn_checked: dict,
                            references: dict, start: float
                            ) -> tuple[Optional[dict], Optional[dict]]:
    """kNN recognizers: job A' (:func:`ensure_reference_embeddings`) -> ``(its stats.json
    part, the index of job B: {"embeddings_dir", "embedding_sha256", "num_rows"})``; ``(None,
    None)`` for the classifier. With no landmark embedding it writes ``stats.json`` and raises
    :class:`IncompleteRunError` (:func:`.completeness.embedding_problem`)."""
    if not config.uses_knn:
        return None, None
    sha256 = knn_checked["embedding_sha256"]
    embeddings = ensure_reference_embeddings(config, beam_args, sha256)
    problem = completeness.embedding_problem(embeddings, config)
    if problem is not None:
        _stop(config.output_dir, problem, {
            "reference_features": references, "reference_embeddings": embeddings,
            "seconds": {"references": references["seconds"],
                        "reference_embeddings": embeddings["seconds"],
                        "total": _since(start)}})
    return embeddings, {"embeddings_dir": embeddings["dir"], "embedding_sha256": sha256,
                        "num_rows": embeddings["counts"]["rows"]}


def run_prediction(config, beam_args: Sequence[str], checked: input_checks.CheckedInputs,
            index: Optional[dict]):
    """Job B: builds it (:func:`build_prediction`) and runs it to its end; its result."""
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    build_prediction(pipeline, config, checked.crop_spec, checked.verification_params,
                     checked.label_map.landmark_ids, checked.extractor_spec, index)
    return run_reading(pipeline, {"--test_data": config.test_data,
                                  "--reference_data": config.reference_data})


def prediction_stats(result, config, references: dict, reference_errors: dict,
                     embeddings: Optional[dict], seconds: dict, start: float) -> dict:
    """``stats.json`` of a finished job B: the counts ``WriteSubmission`` wrote (its part file,
    then deleted), the failure counters, the caches' parts, ``seconds`` with the total, the kNN
    and retrieval-task counters, then ``complete`` and ``problem`` (None when the run did its
    work, :mod:`.completeness`)."""
    stats_part_path = io_utils.join(config.output_dir, steps.PIPELINE_STATS_FILENAME)
    stats = json.loads(io_utils.read_text(stats_part_path))
    FileSystems.delete([stats_part_path])
    stats.update(completeness.failure_stats(result, stats, references, reference_errors,
                                            config.max_failed_fraction))
    stats.update(reference_features=references, seconds=dict(seconds, total=_since(start)))
    if config.uses_knn:
        stats.update(reference_embeddings=embeddings,
                     retrieval=completeness.retrieval_stats(result))
    problem = completeness.completeness_problem(stats, config)
    if config.retrieval_index:
        stats["retrieval_task"] = retrieval_task.read_stats(config.output_dir)
        problem = problem or retrieval_task.problem(stats["retrieval_task"],
                                                    config.retrieval_index)
    stats.update(complete=problem is None, problem=problem)
    return stats


def finish(config, stats: dict) -> None:
    """Writes ``stats.json``; then ``_SUCCESS`` if the run did its work, else raises
    :class:`IncompleteRunError` with ``stats["problem"]``."""
    _write_stats(config.output_dir, stats)
    if stats["problem"] is not None:
        _LOG.error("predict: %s; no _SUCCESS written to %s", stats["problem"],
                   config.output_dir)
        raise IncompleteRunError(stats["problem"], stats)
    io_utils.write_success_marker(config.output_dir)
    _LOG.info("predict: %d test images, %d predicted, %d unreadable -> %s",
              stats["test_images"], stats["predicted"], stats["unreadable"], config.output_dir)


def summary(config, stats: dict) -> dict:
    """What :func:`run` returns: the output paths and ``stats``."""
    return {
        "output_dir": config.output_dir,
        "submission": io_utils.join(config.output_dir, "submission.csv"),
        "scores": io_utils.join(config.output_dir, "scores.csv"),
        **({"retrieval_csv": io_utils.join(config.output_dir, "retrieval.csv")}
           if config.retrieval_index else {}),
        **stats,
    }


def _stop(output_dir: str, problem: str, stats: dict):
    """A run stopped before job B: ``stats.json`` (``stats`` + ``complete``, ``problem``),
    then :class:`IncompleteRunError`."""
    stats = dict(stats, complete=False, problem=problem)
    _write_stats(output_dir, stats)
    raise IncompleteRunError(problem, stats)


def _write_stats(output_dir: str, stats: dict) -> None:
    io_utils.write_json(io_utils.join(output_dir, "stats.json"), stats)


def _since(start: float) -> float:
    return round(time.monotonic() - start, 3)


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
