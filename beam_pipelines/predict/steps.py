"""The named steps of the prediction job (job B): one composite PTransform per box of the diagram
in :mod:`beam_pipelines.predict.pipeline`, wired by its ``build_prediction``.

Each step's docstring gives its input and output element types (:mod:`.elements`). The steps
only route elements: the element-level work is in :mod:`.transforms`, the arithmetic in
``rescoring``.
"""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_pipelines import io_utils
from beam_pipelines.predict import model_handler, outputs, transforms
from rescoring import scores

_LOG = logging.getLogger(__name__)

# Written by WriteSubmission, completed into stats.json (then deleted) by the launcher.
PIPELINE_STATS_FILENAME = ".pipeline_stats.json"


class ReadTestImages(beam.PTransform):
    """Test TFRecord files (``pattern``, a glob; applied to the pipeline) -> ``{"images":
    DecodedImage, "unreadable": Unreadable, "unparseable": str}``.

    A record whose image or schema cannot be read but whose id can is ``unreadable`` (it still
    gets its row); a record without even an id is ``unparseable`` (the reason; counted only).
    See :class:`.transforms.ParseAndDecode` (counters ``test_decoded``, ``test_unreadable``...).
    """

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, pipeline):
        decoded = (
            pipeline
            | "Read" >> beam.io.ReadFromTFRecord(self._pattern)
            | "ParseAndDecode" >> beam.ParDo(
                transforms.ParseAndDecode("test", self._pattern)).with_outputs(
                transforms.TAG_UNREADABLE, transforms.TAG_UNPARSEABLE, main="images")
        )
        return {"images": decoded.images, "unreadable": decoded[transforms.TAG_UNREADABLE],
                "unparseable": decoded[transforms.TAG_UNPARSEABLE]}


class VoteOverViews(beam.PTransform):
    """``(image_id, PredictionResult)`` whose ``inference`` is the views' class probabilities
    ``[V, C]`` -> ``(image_id, Vote)`` (:func:`rescoring.voting.vote`)."""

    def expand(self, results):
        return results | "Vote" >> beam.Map(transforms.vote_keyed)


class CropVote(beam.PTransform):
    """``DecodedImage`` -> ``(image_id, Vote)``: the classifier recognizer (docs/METHOD.md,
    "Stage 1 at test time").

    The image's V views (``crop_spec``), the model on batches of ``batch_images`` images'
    views (``RunInference`` with :class:`.model_handler.CropViewsModelHandler`), then
    :class:`VoteOverViews`.
    """

    def __init__(self, model_path: str, image_size: int, batch_images: int, crop_spec):
        super().__init__()
        self._model_path = model_path
        self._image_size = image_size
        self._batch_images = batch_images
        self._crop_spec = crop_spec

    def expand(self, images):
        handler = KeyedModelHandler(model_handler.CropViewsModelHandler(
            self._model_path, self._image_size, self._batch_images))
        return (
            images
            | "MakeViews" >> beam.Map(
                transforms.make_views_keyed, self._image_size, self._crop_spec)
            | "RunInference" >> RunInference(handler)
            | "VoteOverViews" >> VoteOverViews()
        )


class ExtractLocalFeatures(beam.PTransform):
    """``DecodedImage`` -> ``{"features": (image_id, FeatureRecord), "errors": summary}``.

    ``features``: one record per image, without features when the extractor failed on it
    (:class:`.transforms.ExtractFeatures`, counters ``<role>_extraction_failed``...).
    ``errors``: one ``{"count": n, "causes": [[example, count], ...]}`` dict of those failures
    (:class:`.transforms.ErrorSummaryFn`; count 0 when there were none). Used for the test
    images (role ``test``) and the reference images (role ``reference``, job A).
    """

    def __init__(self, extractor_spec: str, role: str):
        super().__init__()
        self._spec = extractor_spec
        self._role = role

    def expand(self, images):
        extracted = images | "Extract" >> beam.ParDo(
            transforms.ExtractFeatures(self._spec, self._role)
        ).with_outputs(transforms.TAG_EXTRACTION_FAILED, main="features")
        errors = extracted[transforms.TAG_EXTRACTION_FAILED] | (
            "SummariseFailures" >> beam.CombineGlobally(transforms.ErrorSummaryFn()))
        return {"features": extracted.features, "errors": errors}


class Verify(beam.PTransform):
    """``{"votes": (image_id, Vote), "features": (image_id, FeatureRecord), "references":
    (class_index, FeatureRecord)}`` -> ``ScoredImage``.

    Each test image's vote and features are joined by id, keyed by the predicted class, and
    compared with every reference of that class (:class:`.transforms.ScoreAgainstReferences`:
    inlier counts aggregated by :func:`rescoring.scores.aggregate`). An id without a vote gives
    nothing.
    """

    def __init__(self, verification_params):
        super().__init__()
        self._params = verification_params

    def expand(self, inputs):
        queries = (
            {"votes": inputs["votes"], "features": inputs["features"]}
            | "JoinVoteFeatures" >> beam.CoGroupByKey()
            | "KeyByPredictedClass" >> beam.FlatMap(transforms.join_vote_and_features)
        )
        return (
            {"tests": queries, "references": inputs["references"]}
            | "JoinClassReferences" >> beam.CoGroupByKey()
            | "CountInliers" >> beam.ParDo(transforms.ScoreAgainstReferences(self._params))
        )


class Blend(beam.PTransform):
    """``ScoredImage`` -> ``FinalRow``.

    The test-set maxima of the local scores (a global combine of
    :func:`rescoring.scores.maxima_of`) are fed back as a side input; each image's final score
    is :func:`rescoring.scores.final_score` with weight ``blend_weight``, its class index
    mapped to a landmark id by ``landmark_ids`` (:func:`.transforms.blend_row`).
    """

    def __init__(self, blend_weight: float, landmark_ids):
        super().__init__()
        self._blend_weight = blend_weight
        self._landmark_ids = landmark_ids

    def expand(self, scored):
        maxima = (
            scored
            | "LocalScores" >> beam.Map(transforms.local_scores)
            | "TestSetMaxima" >> beam.CombineGlobally(scores.maxima_of)
        )
        return scored | "NormaliseBlend" >> beam.Map(
            transforms.blend_row, beam.pvalue.AsSingleton(maxima), self._blend_weight,
            self._landmark_ids)


def write_outputs(rows, output_dir: str, unparseable: int, test_errors: dict) -> None:
    """Writes ``submission.csv``, ``scores.csv`` and :data:`PIPELINE_STATS_FILENAME`."""
    from rescoring import submission

    unique_rows, duplicates = outputs.one_row_per_id(rows)
    io_utils.write_text(
        io_utils.join(output_dir, "submission.csv"),
        submission.format_submission(outputs.submission_rows(unique_rows)),
    )
    io_utils.write_text(io_utils.join(output_dir, "scores.csv"), outputs.scores_csv(unique_rows))
    stats = outputs.pipeline_stats(unique_rows, duplicates, int(unparseable))
    stats["test_extraction_errors"] = test_errors
    io_utils.write_json(io_utils.join(output_dir, PIPELINE_STATS_FILENAME), stats)
    _LOG.info("wrote %d rows to %s", len(unique_rows), output_dir)


class WriteSubmission(beam.PTransform):
    """``{"rows": FinalRow, "unparseable": str, "extraction_errors": summary}`` -> the files of
    :func:`write_outputs` in ``output_dir`` (one row per id, :mod:`.outputs`).

    The stats file holds the row counts, the number of ``unparseable`` records and the test
    images' ``extraction_errors`` (:class:`ExtractLocalFeatures`' summary).
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, inputs):
        unparseable = inputs["unparseable"] | "CountUnparseable" >> beam.combiners.Count.Globally()
        return (
            inputs["rows"]
            | "AllRows" >> beam.combiners.ToList()
            | "Write" >> beam.Map(
                write_outputs, self._output_dir, beam.pvalue.AsSingleton(unparseable),
                beam.pvalue.AsSingleton(inputs["extraction_errors"]))
        )
