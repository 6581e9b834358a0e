"""``landmarks-predict``: crop voting, then local-feature rescoring -> ``submission.csv``.

Usage::

    landmarks-predict --model runs/train/model.keras \\
        --test_data 'runs/ingest/test-*.tfrecord' --reference_data 'runs/ingest/train-*.tfrecord' \\
        --output_dir runs/predict [--local_features default|delf:HANDLE|sift|orb] \\
        [--references_per_class 32] [--crops 22] [--overwrite] [Beam options, e.g. --runner]

Steps (the launcher checks everything it can before a pipeline starts):

1. Launcher: reads the label map, loads the model once (input size S, output width C must match
   the label map), makes the extractor once (a bad spec fails here), prepares the output folder.
2. Reference features (Beam job A, only when the cache cannot be reused, see
   :mod:`beam_pipelines.predict.reference_cache`).
3. Prediction (Beam job B)::

     test records -> parse/decode --unreadable--------------------------------------+
         |-> views -> RunInference(keyed, batched) -> vote --+                       |
         |-> local features ---------------------------------+ CoGroupByKey(id)     |
                                                             -> key by predicted class
     reference features (by class) ----------------------------- CoGroupByKey(class)
                                 -> inlier counts -> max/mean/best-half  -> Flatten <-+
                                 -> global max (side input) -> normalise, blend
                                 -> one list -> submission.csv, scores.csv

4. Launcher: ``stats.json`` (counts + seconds), then ``_SUCCESS``.

``run(argv)`` returns a summary dict; ``main(argv)`` prints it and returns 0, or prints a one-line
error to stderr and returns 2.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_pipelines import io_utils
from beam_pipelines.predict import config as config_lib
from beam_pipelines.predict import model_handler, outputs, reference_cache, transforms
from tfrecords_schema import InputError, SchemaError
from tfrecords_schema.label_map import LabelMap

_LOG = logging.getLogger(__name__)

PIPELINE_STATS_FILENAME = ".pipeline_stats.json"
DEFAULT_LOCAL_RUNNER = "FnApiRunner"


class PredictError(InputError):
    """A problem with the inputs found before any pipeline starts (one-line message)."""


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


def check_inputs(config: config_lib.PredictConfig) -> None:
    if not io_utils.match(config.test_data):
        raise PredictError(f"no test files match --test_data {config.test_data}")
    if not io_utils.match(config.reference_data):
        raise PredictError(f"no reference files match --reference_data {config.reference_data}")


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
        return {"dir": directory, "reused": True, "reason": reason, "seconds": 0.0,
                "num_images": recorded.get("num_features_records")}
    _LOG.info("reference features: computing into %s (%s)", directory, reason)
    start = time.monotonic()
    reference_cache.clear_for_recompute(directory)
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    _ = pipeline | "FeaturiseReferences" >> reference_cache.FeaturiseReferences(
        config.reference_data, directory, extractor_spec, config.references_per_class,
        config.num_classes,
    )
    result = pipeline.run()
    result.wait_until_finish()
    num_written = _distribution_count(result, "reference_features_per_image")
    reference_cache.finish(directory, wanted, num_written)
    seconds = time.monotonic() - start
    _LOG.info("reference features: %s images featurised in %.1f s", num_written, seconds)
    return {"dir": directory, "reused": False, "reason": reason, "seconds": round(seconds, 3),
            "num_images": num_written}


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


def _parse_reference(serialized: bytes, extractor_spec: str):
    from tfrecords_schema.local_features import parse_features

    record = parse_features(serialized)
    if record.extractor != extractor_spec:
        raise SchemaError(
            f"reference feature {record.image_id!r} was made by {record.extractor!r}, "
            f"this run uses {extractor_spec!r}"
        )
    return record.label, record


def _write_outputs(rows, output_dir: str, unparseable: int) -> None:
    from rescoring import submission

    unique_rows, duplicates = outputs.one_row_per_id(rows)
    io_utils.write_text(
        io_utils.join(output_dir, "submission.csv"),
        submission.format_submission(outputs.submission_rows(unique_rows)),
    )
    io_utils.write_text(io_utils.join(output_dir, "scores.csv"), outputs.scores_csv(unique_rows))
    stats = outputs.pipeline_stats(unique_rows, duplicates, int(unparseable))
    io_utils.write_json(io_utils.join(output_dir, PIPELINE_STATS_FILENAME), stats)
    _LOG.info("wrote %d rows to %s", len(unique_rows), output_dir)


def build_prediction(pipeline, config, crop_spec, verification_params, landmark_ids,
                     extractor_spec: str) -> None:
    """Adds job B's steps to ``pipeline`` (see the module docstring's diagram)."""
    decoded = (
        pipeline
        | "ReadTest" >> beam.io.ReadFromTFRecord(config.test_data)
        | "ParseDecodeTest" >> beam.ParDo(transforms.ParseAndDecode("test")).with_outputs(
            transforms.TAG_UNREADABLE, transforms.TAG_UNPARSEABLE, main="images"
        )
    )
    images = decoded.images
    handler = KeyedModelHandler(
        model_handler.CropViewsModelHandler(config.model, config.image_size, config.batch_images)
    )
    votes = (
        images
        | "MakeViews" >> beam.Map(transforms.make_views_keyed, config.image_size, crop_spec)
        | "CropVotingInference" >> RunInference(handler)
        | "Vote" >> beam.Map(transforms.vote_keyed)
    )
    test_features = images | "TestFeatures" >> beam.ParDo(
        transforms.ExtractFeatures(extractor_spec, "test")
    )
    queries = (
        {"votes": votes, "features": test_features}
        | "JoinVoteFeatures" >> beam.CoGroupByKey()
        | "KeyByPredictedClass" >> beam.FlatMap(transforms.join_vote_and_features)
    )
    references = (
        pipeline
        | "ReadReferenceFeatures" >> beam.io.ReadFromTFRecord(
            reference_cache.features_pattern(config.reference_features)
        )
        | "ParseReferenceFeatures" >> beam.Map(_parse_reference, extractor_spec)
    )
    scored = (
        {"tests": queries, "references": references}
        | "JoinClassReferences" >> beam.CoGroupByKey()
        | "Verify" >> beam.ParDo(transforms.ScoreAgainstReferences(verification_params))
    )
    unreadable = decoded[transforms.TAG_UNREADABLE] | "UnreadableRows" >> beam.Map(
        transforms.unreadable_to_scored
    )
    all_scored = (scored, unreadable) | "AllTestImages" >> beam.Flatten()
    maxima = all_scored | "TestSetMaxima" >> beam.CombineGlobally(transforms.MaxScoresFn())
    final = all_scored | "NormaliseBlend" >> beam.Map(
        transforms.blend_row, beam.pvalue.AsSingleton(maxima), config.blend_weight, landmark_ids
    )
    unparseable = decoded[transforms.TAG_UNPARSEABLE] | "CountUnparseable" >> beam.combiners.Count.Globally()
    _ = (
        final
        | "AllRows" >> beam.combiners.ToList()
        | "WriteOutputs" >> beam.Map(
            _write_outputs, config.output_dir, beam.pvalue.AsSingleton(unparseable)
        )
    )


# ---- entry points ---------------------------------------------------------------------------


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the whole job; returns a summary (paths, counts, reference-cache decision, seconds).

    Raises:
      PredictError (a ValueError): bad inputs, found before any pipeline starts.
    """
    from rescoring import local_features

    start = time.monotonic()
    config, beam_args = config_lib.parse_args(argv)
    check_inputs(config)
    label_map = load_label_map(config.label_map)
    geometry = check_model(config.model, label_map)
    config = config.resolved(geometry.image_size, geometry.num_classes)
    try:
        extractor = local_features.make_extractor(config.local_features)
    except ValueError as error:
        raise PredictError(f"bad --local_features {config.local_features!r}: {error}") from error
    extractor_spec = extractor.spec
    crop_spec = crop_spec_for(config.crops)
    verification_params = make_verification_params(extractor)
    io_utils.prepare_output_dir(config.output_dir, config.overwrite)
    io_utils.write_json(
        io_utils.join(config.output_dir, "config.json"),
        {"job": "landmarks-predict", "config": config.to_json_dict(), "beam_args": list(beam_args),
         "extractor_spec": extractor_spec, "crop_spec": repr(crop_spec),
         "verification": repr(verification_params)},
    )
    _LOG.info("predict: S=%d px, C=%d classes, %d views/image, extractor %s",
              config.image_size, config.num_classes, config.crops, extractor_spec)

    references = ensure_reference_features(config, beam_args, extractor_spec)

    predict_start = time.monotonic()
    with beam.Pipeline(options=pipeline_options(beam_args)) as pipeline:
        build_prediction(pipeline, config, crop_spec, verification_params,
                         label_map.landmark_ids, extractor_spec)
    predict_seconds = time.monotonic() - predict_start

    stats_part_path = io_utils.join(config.output_dir, PIPELINE_STATS_FILENAME)
    stats = json.loads(io_utils.read_text(stats_part_path))
    FileSystems.delete([stats_part_path])
    stats.update(
        reference_features=references,
        seconds={"references": references["seconds"], "prediction": round(predict_seconds, 3),
                 "total": round(time.monotonic() - start, 3)},
    )
    io_utils.write_json(io_utils.join(config.output_dir, "stats.json"), stats)
    io_utils.write_success_marker(config.output_dir)
    _LOG.info("predict: %d test images, %d predicted, %d unreadable -> %s",
              stats["test_images"], stats["predicted"], stats["unreadable"], config.output_dir)
    return {
        "output_dir": config.output_dir,
        "submission": io_utils.join(config.output_dir, "submission.csv"),
        "scores": io_utils.join(config.output_dir, "scores.csv"),
        **stats,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(argv)
    except (ValueError, FileNotFoundError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"landmarks-predict: error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
