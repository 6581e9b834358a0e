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

from beam_pipelines import grouping, io_utils
from beam_pipelines.predict import knn, model_handler, outputs, transforms
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
    ``[V, C]`` -> ``(image_id, Vote)`` (:func:`rescoring.voting.vote`; with ``class_votes``,
    the classifier's top-5 mean probabilities too, :func:`rescoring.voting.top_mean_probabilities`;
    with ``rerank_top`` K > 1, the K candidates, :func:`rescoring.candidates.top_candidates`)."""

    def __init__(self, class_votes: bool = False, rerank_top: int = 1):
        super().__init__()
        self._class_votes = class_votes
        self._rerank_top = rerank_top

    def expand(self, results):
        return results | "Vote" >> beam.Map(transforms.vote_keyed, self._class_votes,
                                            self._rerank_top)


class CropVote(beam.PTransform):
    """``DecodedImage`` -> ``(image_id, Vote)``: the classifier recognizer (docs/METHOD.md,
    "Stage 1 at test time").

    The image's V views (``crop_spec``), the model on batches of ``batch_images`` images'
    views (``RunInference`` with :class:`.model_handler.CropViewsModelHandler`), then
    :class:`VoteOverViews` (``class_votes``: the votes carry the classifier factor of the
    ``knn+classifier`` recognizer; ``rerank_top``: the K candidates to verify).
    """

    def __init__(self, model_path: str, image_size: int, batch_images: int, crop_spec,
                 class_votes: bool = False, rerank_top: int = 1):
        super().__init__()
        self._model_path = model_path
        self._image_size = image_size
        self._batch_images = batch_images
        self._crop_spec = crop_spec
        self._class_votes = class_votes
        self._rerank_top = rerank_top

    def expand(self, images):
        handler = KeyedModelHandler(model_handler.CropViewsModelHandler(
            self._model_path, self._image_size, self._batch_images))
        return (
            images
            | "MakeViews" >> beam.Map(
                transforms.make_views_keyed, self._image_size, self._crop_spec)
            | "RunInference" >> RunInference(handler)
            | "VoteOverViews" >> VoteOverViews(self._class_votes, self._rerank_top)
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

    GLDv2's test set is ~98 % non-landmarks, and a few classes attract thousands of them: a
    class predicted by more than ``max_tests_per_group`` test images is split into sub-keys
    (:class:`beam_pipelines.grouping.SpreadHotKeys`), each with a copy of the class's
    references, so several workers verify it; each group streams its test images.
    """

    def __init__(self, verification_params,
                 max_tests_per_group: int = transforms.HOT_CLASS_TESTS):
        super().__init__()
        self._params = verification_params
        self._max_tests_per_group = max_tests_per_group

    def expand(self, inputs):
        queries = (
            {"votes": inputs["votes"], "features": inputs["features"]}
            | "JoinVoteFeatures" >> beam.CoGroupByKey()  # one test id per key: small groups
            | "KeyByPredictedClass" >> beam.FlatMap(transforms.join_vote_and_features)
        )
        spread = (
            {"large": queries, "small": inputs["references"]}
            | "SpreadHotClasses" >> grouping.SpreadHotKeys(
                self._max_tests_per_group, transforms.test_query_id)
        )
        return (
            {transforms.TAG_TESTS: spread["large"],
             transforms.TAG_REFERENCES: spread["small"]}
            | "JoinClassReferences" >> grouping.TaggedJoin()
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


class PickBestCandidate(beam.PTransform):
    """``FinalRow`` -> ``FinalRow``: with ``--rerank_top K > 1``, each test image's candidate
    rows become one, its answer (:class:`.transforms.BestCandidateFn`: the highest final score,
    equal scores to the earlier candidate; a ``CombinePerKey`` by test id). Rows that are not
    candidates' (unreadable images) pass unchanged."""

    def expand(self, rows):
        candidates = rows | "CandidateRows" >> beam.Filter(transforms.is_candidate_row)
        others = rows | "OtherRows" >> beam.Filter(transforms.is_not_candidate_row)
        best = (
            candidates
            | "KeyById" >> beam.Map(transforms.key_by_image_id)
            | "BestPerImage" >> beam.CombinePerKey(transforms.BestCandidateFn())
            | "Answers" >> beam.Values()
        )
        return (best, others) | "AllRows" >> beam.Flatten()


# ---- the retrieval recognizers (--recognizer knn, knn+classifier) --------------------------------


class Embed(beam.PTransform):
    """``DecodedImage`` -> ``(image_id, embedding float32 [D])``: the test image's views
    (``crop_spec``, the crop code of :class:`CropVote`), ``embedding.keras`` on batches of
    ``batch_images`` images' views (``RunInference`` with
    :class:`.model_handler.EmbeddingViewsModelHandler`), then one unit embedding per image by
    :func:`rescoring.retrieval.combine_view_embeddings` (each view's embedding normalised, the
    mean of the V unit vectors normalised again)."""

    def __init__(self, embedding_path: str, image_size: int, batch_images: int, crop_spec):
        super().__init__()
        self._embedding_path = embedding_path
        self._image_size = image_size
        self._batch_images = batch_images
        self._crop_spec = crop_spec

    def expand(self, images):
        handler = KeyedModelHandler(model_handler.EmbeddingViewsModelHandler(
            self._embedding_path, self._image_size, self._batch_images))
        return (
            images
            | "MakeViews" >> beam.Map(
                transforms.make_views_keyed, self._image_size, self._crop_spec)
            | "RunInference" >> RunInference(handler)
            | "CombineViews" >> beam.Map(knn.combine_keyed)
        )


class EmbedReferences(beam.PTransform):
    """Reference ``DecodedImage`` -> ``ReferenceEmbedding`` (id, label, unit embedding): the
    whole image as its only view (:data:`.knn.REFERENCE_VIEWS`), ``embedding.keras`` on batches
    of ``batch_images`` images. Used by the reference-embedding job
    (:class:`.reference_cache.EmbedReferenceImages`)."""

    def __init__(self, embedding_path: str, image_size: int, batch_images: int):
        super().__init__()
        self._embedding_path = embedding_path
        self._image_size = image_size
        self._batch_images = batch_images

    def expand(self, images):
        handler = KeyedModelHandler(model_handler.EmbeddingViewsModelHandler(
            self._embedding_path, self._image_size, self._batch_images))
        return (
            images
            | "MakeViews" >> beam.Map(knn.reference_views_keyed, self._image_size)
            | "RunInference" >> RunInference(handler)
            | "CombineViews" >> beam.Map(knn.combine_keyed)
            | "ToReferenceEmbedding" >> beam.Map(knn.to_reference_embedding)
        )


class ShardIndex(beam.PTransform):
    """``ReferenceEmbedding`` -> ``(shard_key, IndexShard)``: shards of at most ``shard_size``
    rows (one element each), from ``num_buckets`` hash buckets of the reference ids
    (:func:`.knn.num_buckets`, :class:`.knn.MakeShards`)."""

    def __init__(self, shard_size: int, num_buckets: int):
        super().__init__()
        self._shard_size = shard_size
        self._num_buckets = num_buckets

    def expand(self, references):
        return (
            references
            | "KeyByBucket" >> beam.Map(knn.key_by_bucket, self._num_buckets)
            | "GroupBuckets" >> beam.GroupByKey()
            | "MakeShards" >> beam.ParDo(knn.MakeShards(self._shard_size))
        )


class Retrieve(beam.PTransform):
    """``{"queries": (test_id, embedding [D]), "index": (shard_key, IndexShard)}`` ->
    ``(test_id, Neighbours)``: each test image's ``k`` most similar references of the whole
    index (non-landmarks included), most similar first.

    The test embeddings are batched (at most ``batch_size`` per batch), each batch is replicated
    to every shard key (the keys, not the shards, are a side input), shard and batches are
    grouped by shard key and each (batch, shard) pair is searched (:class:`.knn.SearchShard`:
    :func:`rescoring.retrieval.exact_top_k`, or FAISS IVF with ``approximate``); the per-shard
    lists of a test image are merged by ``CombinePerKey`` (:class:`.knn.MergeNeighboursFn`,
    :func:`rescoring.retrieval.merge_top_k`). A worker holds one shard and one batch.
    """

    def __init__(self, k: int, batch_size: int = knn.QUERY_BATCH_SIZE,
                 approximate: bool = False):
        super().__init__()
        self._k = k
        self._batch_size = batch_size
        self._approximate = approximate

    def expand(self, inputs):
        index = inputs["index"]
        shard_keys = index | "ShardKeys" >> beam.Keys()
        batches = (
            inputs["queries"]
            | "BatchQueries" >> beam.BatchElements(
                min_batch_size=1, max_batch_size=self._batch_size)
            | "ToQueryBatch" >> beam.Map(knn.to_query_batch)
            | "ToEveryShard" >> beam.FlatMap(
                knn.replicate_to_shards, beam.pvalue.AsList(shard_keys))
        )
        shards = index | "TagShards" >> beam.Map(knn.tag_shard)
        return (
            (shards, batches)
            | "ShardsAndBatches" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "SearchShard" >> beam.ParDo(knn.SearchShard(self._k, self._approximate))
            | "MergeTopK" >> beam.CombinePerKey(knn.MergeNeighboursFn(self._k))
        )


class ScoreNeighbours(beam.PTransform):
    """``{"neighbours": (test_id, Neighbours)[, "votes": (test_id, Vote)]}`` ->
    ``(test_id, KnnScores)`` (:func:`.knn.score_neighbours`).

    ``params``: the ``rescoring.retrieval.AggregationParams`` of the recognizer
    (:func:`.knn.aggregation_params`). With ``votes`` (``knn+classifier``), each neighbour's
    vote is multiplied by the classifier's mean probability of its class (1e-8 outside the
    classifier's top 5) to the power ``params.confidence_power``; every voted test image gets
    a verdict.
    """

    def __init__(self, params):
        super().__init__()
        self._params = params

    def expand(self, inputs):
        if "votes" not in inputs:
            return inputs["neighbours"] | "Score" >> beam.Map(knn.score_keyed, self._params)
        return (
            {"neighbours": inputs["neighbours"], "votes": inputs["votes"]}
            | "JoinVotes" >> beam.CoGroupByKey()
            | "Score" >> beam.FlatMap(knn.score_joined, self._params, True)
        )


class FeaturiseRetrievedReferences(beam.PTransform):
    """``{"ids": (reference_id, anything), "images": (reference_id, ImageRecord)}`` ->
    ``{"features": (reference_id, FeatureRecord), "errors": summary}``: the local features of
    the wanted reference images, extracted in this job (on demand).

    Ids move, not images: the distinct wanted ids are a side input (tens of MB at GLDv2 size:
    ~600k ids), by which the reference images are filtered where they are read
    (:class:`.knn.KeepWantedImages`), so only the wanted few percent are ever shuffled. They are
    joined with the ids (to count ids found in no image) and decoded once per distinct id
    (:class:`.knn.DecodeRetrievedImage`), then :class:`ExtractLocalFeatures` with the extractor
    spec of the reference cache and role ``reference`` (its failures count as reference
    extraction failures). The features are written nowhere: the cache is not modified.
    """

    def __init__(self, extractor_spec: str):
        super().__init__()
        self._spec = extractor_spec

    def expand(self, inputs):
        wanted = (
            inputs["ids"]
            | "WantedIds" >> beam.Keys()
            | "DistinctIds" >> beam.Distinct()
        )
        kept = inputs["images"] | "KeepWanted" >> beam.ParDo(
            knn.KeepWantedImages(), beam.pvalue.AsList(wanted))
        return (
            {"wanted": wanted | "KeyWanted" >> beam.Map(knn.id_with_none),
             "images": kept}
            | "JoinIdsImages" >> grouping.TaggedJoin()
            | "DecodeWanted" >> beam.ParDo(knn.DecodeRetrievedImage())
            | "Extract" >> ExtractLocalFeatures(self._spec, "reference")
        )


class VerifyNeighbours(beam.PTransform):
    """``{"knn": (test_id, KnnScores), "features": (test_id, FeatureRecord), "references":
    (class_index, FeatureRecord)[, "reference_images": ImageRecord]}`` -> ``{"scored":
    ScoredImage (with ``knn`` details), "errors": summary of on-demand extraction failures}``.

    Verification by neighbours: each test image is compared with its retrieved landmark
    references, not with a sample of a predicted class. The test images are put in buckets of
    about :data:`.knn.TESTS_PER_BUCKET` (:func:`.knn.bucket_test`; the bucket count comes from
    the number of test images, a global count fed back as a side input); each bucket asks for
    the references its test images retrieved (``(reference_id, bucket)``, distinct). Each
    wanted reference's record, the cached one or, with ``reference_images`` (and
    ``extractor_spec``), one featurised on demand when the cache does not hold it
    (:class:`FeaturiseRetrievedReferences`), is sent once to every bucket that wants it
    (:class:`.knn.RouteReferenceToBuckets`). A bucket holds its references and streams its
    test images (:class:`.knn.VerifyBucket`), which gives each one's final class and local
    columns (:func:`.knn.rerank_scored`). So a test image's features travel once, a popular
    reference is verified in many buckets by many workers, and no group is ever a list.
    Every readable test image (one with a feature record) gets one ``ScoredImage``.
    """

    def __init__(self, verification_params, params, recognizer: str,
                 extractor_spec: str = "", tests_per_bucket: int = knn.TESTS_PER_BUCKET):
        super().__init__()
        self._verification = verification_params
        self._params = params
        self._recognizer = recognizer
        self._spec = extractor_spec
        self._tests_per_bucket = tests_per_bucket

    def expand(self, inputs):
        joined_tests = (
            {"knn": inputs["knn"], "features": inputs["features"]}
            | "JoinTestFeatures" >> beam.CoGroupByKey()  # one test id per key: small groups
        )
        num_tests = joined_tests | "CountTests" >> beam.combiners.Count.Globally()
        tests = joined_tests | "BucketTests" >> beam.FlatMap(
            knn.bucket_test, beam.pvalue.AsSingleton(num_tests), self._tests_per_bucket
        ).with_outputs(knn.TAG_WANTED, main="tests")
        wanted = tests[knn.TAG_WANTED] | "DistinctWanted" >> beam.Distinct()
        references = inputs["references"] | "KeyReferencesById" >> beam.Map(
            knn.key_reference_by_id)
        routed = {"buckets": wanted, "cached": references}
        if "reference_images" in inputs:
            if not self._spec:
                raise ValueError("VerifyNeighbours: reference_images need an extractor_spec")
            missing = (
                {"wanted": wanted | "WantedIds" >> beam.Map(knn.reference_id_only),
                 "cached": references | "CachedIds" >> beam.Map(knn.reference_id_only)}
                | "JoinWantedCached" >> grouping.TaggedJoin()
                | "UncachedIds" >> beam.FlatMap(knn.uncached_ids)
                | "KeyUncached" >> beam.Map(knn.id_with_none)
            )
            on_demand = (
                {"ids": missing,
                 "images": inputs["reference_images"] | "KeyImagesById" >> beam.Map(
                     knn.key_image_record)}
                | "FeaturiseOnDemand" >> FeaturiseRetrievedReferences(self._spec)
            )
            routed["on_demand"] = on_demand["features"]
            errors = on_demand["errors"]
        else:
            errors = inputs["knn"].pipeline | "NoOnDemandErrors" >> beam.Create(
                [{"count": 0, "causes": []}])
        bucket_references = (
            routed
            | "JoinReferencesBuckets" >> grouping.TaggedJoin()
            | "RouteToBuckets" >> beam.ParDo(knn.RouteReferenceToBuckets())
        )
        scored = (
            [tests.tests | "TagTests" >> beam.Map(grouping.tag_values, knn.TAG_TEST),
             bucket_references]
            | "TestsAndReferences" >> beam.Flatten()
            | "GroupByBucket" >> beam.GroupByKey()
            | "VerifyBucket" >> beam.ParDo(knn.VerifyBucket(
                self._verification, self._params, self._recognizer))
        )
        return {"scored": scored, "errors": errors}


def write_outputs(rows, output_dir: str, unparseable: int, test_errors: dict,
                  recognizer: str = "classifier", reference_errors=None,
                  rerank_top: int = 1, maxima=None) -> None:
    """Writes ``submission.csv``, ``scores.csv`` (with the kNN columns for a kNN
    ``recognizer``, the candidate columns for ``rerank_top`` K > 1) and
    :data:`PIPELINE_STATS_FILENAME` (with ``reference_errors``, the summary of this job's
    reference extraction failures, when given; with ``maxima``, ``local_max_top``)."""
    from rescoring import submission

    unique_rows, duplicates = outputs.one_row_per_id(rows)
    io_utils.write_text(
        io_utils.join(output_dir, "submission.csv"),
        submission.format_submission(outputs.submission_rows(unique_rows)),
    )
    io_utils.write_text(io_utils.join(output_dir, "scores.csv"),
                        outputs.scores_csv(unique_rows, recognizer, rerank_top))
    stats = outputs.pipeline_stats(unique_rows, duplicates, int(unparseable))
    stats["test_extraction_errors"] = test_errors
    if maxima is not None:
        # The normaliser of local_max in every final score (with --rerank_top K > 1 the
        # largest over every candidate, not only over the answers in scores.csv).
        stats["local_max_top"] = float(maxima[0])
    if reference_errors is not None:
        stats["reference_extraction_errors"] = reference_errors
    io_utils.write_json(io_utils.join(output_dir, PIPELINE_STATS_FILENAME), stats)
    _LOG.info("wrote %d rows to %s", len(unique_rows), output_dir)


class WriteSubmission(beam.PTransform):
    """``{"rows": FinalRow, "unparseable": str, "extraction_errors": summary[, "maxima":
    the test-set maxima of the local scores]}`` -> the files of :func:`write_outputs` in
    ``output_dir`` (one row per id, :mod:`.outputs`); with ``maxima``, the stats hold
    ``local_max_top``, the normaliser of every final score.

    The stats file holds the row counts, the number of ``unparseable`` records and the test
    images' ``extraction_errors`` (:class:`ExtractLocalFeatures`' summary) and, when given
    (``reference_extraction_errors``), the summary of the reference images featurised in this
    job (:class:`VerifyNeighbours`' ``errors``). ``recognizer``
    and ``rerank_top`` decide the columns of ``scores.csv`` (:func:`.outputs.scores_csv`).
    """

    def __init__(self, output_dir: str, recognizer: str = "classifier", rerank_top: int = 1):
        super().__init__()
        self._output_dir = output_dir
        self._recognizer = recognizer
        self._rerank_top = rerank_top

    def expand(self, inputs):
        unparseable = inputs["unparseable"] | "CountUnparseable" >> beam.combiners.Count.Globally()
        reference_errors = None
        if "reference_extraction_errors" in inputs:
            reference_errors = beam.pvalue.AsSingleton(inputs["reference_extraction_errors"])
        maxima = None
        if "maxima" in inputs:
            maxima = beam.pvalue.AsSingleton(inputs["maxima"])
        return (
            inputs["rows"]
            | "AllRows" >> beam.combiners.ToList()
            | "Write" >> beam.Map(
                write_outputs, self._output_dir, beam.pvalue.AsSingleton(unparseable),
                beam.pvalue.AsSingleton(inputs["extraction_errors"]), self._recognizer,
                reference_errors, self._rerank_top, maxima)
        )
