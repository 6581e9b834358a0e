"""One photo in, an answer with its evidence out: the prediction job's steps for one image at a
time, in this process (``landmarks-query``).

:class:`QuerySession` loads once what the prediction job's workers load (the models, the label
map, the extractor named by the reference cache, the reference index) and then answers photos.
Every number comes from the functions the Beam job's steps call, in the same order:

* preprocessing: the ingestion's ``normalise_image`` (upright RGB JPEG, longer side <= 512 px by
  default), then the job's ``decode_rgb``: the pixels the job would read from the photo's record;
* classifier: ``rescoring.crops.make_views`` -> ``ImageContract.scale`` -> ``forward_views`` ->
  ``rescoring.voting``; local features: the extractor -> ``check_features``; verification
  against the class's cached references: ``transforms.score_query`` (what ``Verify`` runs);
* kNN recognizers: the same views through ``embedding.keras`` ->
  ``combine_view_embeddings`` -> ``exact_top_k`` over every reference embedding ->
  ``knn.score_neighbours`` -> inliers per landmark neighbour (cached features, else extracted
  from the reference's record) -> ``knn.rerank``;
* final score: ``transforms.blend_row``, normalised by a given ``local_max_top`` (the job's,
  for the job's scores) or by the largest inlier count among the photos' compared references
  (:meth:`QuerySession.finish`).

So, with the job's normaliser, the first candidate's row equals the job's ``scores.csv`` row
for the same image (tested), up to float32 rounding of the network, which depends on how many
views share a forward pass.

Beyond what the job computes, each answer lists the top candidates (chosen by the
classifier's vote share, then mean probability; or by the kNN's re-ranked class score), each
verified against its own references the same way and scored by the same blend, with the inlier
matches of its best references for the picture. The job's answer is listed first (rescoring
changes its confidence, never its class), the other candidates by their score: a second
candidate that outscores the answer is worth a look.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import Optional, Sequence

import numpy as np

from beam_pipelines import io_utils
from beam_pipelines.ingest import fetch, normalise
from beam_pipelines.predict import config as config_lib
from beam_pipelines.predict import knn as knn_lib
from beam_pipelines.predict import model_handler, reference_cache, transforms
from beam_pipelines.predict.elements import (
    DecodedImage,
    FinalRow,
    IndexShard,
    ScoredImage,
    TestQuery,
    Vote,
)
from beam_pipelines.query import records
from rescoring import crops, retrieval, scores, verification, voting
from tfrecords_schema import InputError, SchemaError, image_record
from tfrecords_schema.local_features import FeatureRecord, parse_features

_LOG = logging.getLogger(__name__)

INDEX_FILENAME = "query_index.json"
MAX_MATCHED_REFERENCES = 3  # references per candidate whose inlier matches are kept
MAX_ON_DEMAND_CACHED = 256  # retrieved references' features kept between photos (<= ~256 MB)


class QueryInputError(InputError):
    """A problem with the query's inputs found while loading (one line, exit code 2)."""


class PhotoError(Exception):
    """One photo cannot be answered (unreadable, not an image...): reported, others go on."""


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One reference compared with the photo: its id, landmark id, inlier count and, for the
    best ones, the matched pixel locations ``(y, x)``: ``photo_points``/``reference_points``
    float32 ``[I, 2]`` (empty when not kept)."""

    reference_id: str
    landmark_id: int
    inliers: int
    photo_points: np.ndarray
    reference_points: np.ndarray


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One landmark the photo may show.

    ``score``: the final score this landmark would get (the job's blend of its normalised max
    inlier count and ``confidence``; filled by :meth:`QuerySession.finish`); ``confidence``:
    what the blend uses, the classifier's vote share for ``classifier`` and ``knn+classifier``,
    the kNN score / k for ``knn``; ``classifier_share``: the classifier's vote share (None for
    ``knn``); ``inliers``: the max over its compared references; ``evidence``: its references,
    most inliers first.
    """

    landmark_id: int
    class_index: int
    confidence: float
    classifier_share: Optional[float]
    stage1_score: float
    inliers: int
    evidence: tuple
    score: float = 0.0


@dataclasses.dataclass(frozen=True)
class PhotoAnswer:
    """The answer for one photo: ``row`` is the job's ``scores.csv`` row (after
    :meth:`QuerySession.finish`); ``scored`` the same before normalisation; ``image`` the
    normalised RGB pixels ``[H, W, 3]`` uint8 the scores were computed on."""

    photo: str
    image_id: str
    image: np.ndarray
    scored: ScoredImage
    candidates: tuple
    num_features: int
    seconds: float
    row: Optional[FinalRow] = None


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """What a session loads and how it answers (the query's flags, resolved)."""

    model_dir: str
    references: str
    output_dir: str = ""
    recognizer: str = "classifier"
    crops: int = 22
    top: int = 5
    reference_features: str = ""
    local_features: str = "default"
    references_per_class: int = config_lib.DEFAULT_REFERENCES_PER_CLASS
    knn_k: int = 0
    blend_weight: float = config_lib.DEFAULT_BLEND_WEIGHT
    max_side: int = normalise.NormaliseParams().max_side


def photo_ids(photos: Sequence[str]) -> list[str]:
    """Ids for the photos of one command line: each file's stem (``.../a1b2.jpg`` -> ``a1b2``,
    as datasets name images by id), or ``<position>_<stem>`` for all of them when two stems
    are equal. Only letters, digits, ``.``, ``_`` and ``-`` are kept (ids name files)."""
    stems = [re.sub(r"[^A-Za-z0-9._-]", "_",
                    photo.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0])[:100] or "photo"
             for photo in photos]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{position:03d}_{stem}" for position, stem in enumerate(stems)]


def is_cache_folder(path: str) -> bool:
    """A reference cache written by ``landmarks-predict`` (``metadata.json`` inside)."""
    return io_utils.exists(io_utils.join(path, reference_cache.METADATA_FILENAME))


class QuerySession:
    """Everything loaded once; :meth:`answer` per photo, then :meth:`finish` for the scores.

    Raises (from the constructor) :class:`QueryInputError` for a missing or incompatible
    model, label map, reference cache or records, and an extractor that does not load.
    """

    def __init__(self, settings: SessionSettings, beam_args: Sequence[str] = ()):
        from beam_pipelines.predict import pipeline as predict

        start = time.monotonic()
        self.settings = settings
        model_path = io_utils.join(settings.model_dir, "model.keras")
        label_map = _load(lambda: predict.load_label_map(
            io_utils.join(settings.model_dir, "label_map.csv")))
        self.model = _load(lambda: model_handler.load_keras_model(model_path))
        geometry = _load(lambda: model_handler.model_geometry(self.model))
        if geometry.num_classes != label_map.num_classes:
            raise QueryInputError(
                f"model {model_path} predicts {geometry.num_classes} classes but its label map "
                f"has {label_map.num_classes} landmark ids")
        self.landmark_ids = label_map.landmark_ids
        self.image_size = geometry.image_size
        cache_dir, reference_data, spec, per_class = self._resolve_references(settings)
        self.config = config_lib.PredictConfig(
            model=model_path, test_data="(photos)", reference_data=reference_data,
            output_dir=settings.output_dir, reference_features=cache_dir,
            local_features=spec, references_per_class=per_class, crops=settings.crops,
            blend_weight=settings.blend_weight, recognizer=settings.recognizer,
            knn_k=settings.knn_k if settings.recognizer != "classifier" else 0,
        ).resolved(geometry.image_size, geometry.num_classes)
        extractor, _ = _load(lambda: predict.probe_extractor(spec))
        self.extractor = extractor
        self.verification = predict.make_verification_params(extractor)
        self.crop_spec = predict.crop_spec_for(settings.crops)
        self.normalise_params = normalise.NormaliseParams(max_side=settings.max_side)
        references = predict.ensure_reference_features(self.config, beam_args, extractor.spec)
        self.references = references  # the featurisation's counts (extraction failures)
        problem = predict.reference_problem(references, self.config)
        if problem is not None:
            raise QueryInputError(problem)
        indexes = records.cached_indexes(io_utils.join(cache_dir, INDEX_FILENAME), {
            "features_by_class": (reference_cache.features_pattern(cache_dir), _feature_keys),
            "reference_images_by_id": (reference_data, _image_keys)})
        self._features_by_class = indexes["features_by_class"]
        self._images_by_id = indexes["reference_images_by_id"]
        self._class_references: dict = {}
        self._on_demand: dict = {}  # reference id -> features extracted by this session
        # Per-image extractions of this session and the causes of those that failed, by kind
        # ("test": the photos, "reference": references featurised on demand), as the job counts.
        self.extraction_attempts = {"test": 0, "reference": 0}
        self.extraction_failures: dict = {"test": [], "reference": []}
        self.embedding_model = None
        self.index: Optional[IndexShard] = None
        self.knn_params = None
        if self.config.uses_knn:
            self._load_knn(beam_args)
        self.load_seconds = time.monotonic() - start
        _LOG.info("query: loaded in %.1f s (S=%d px, %d classes, %d views, extractor %s, "
                  "references %s)", self.load_seconds, self.image_size, len(self.landmark_ids),
                  self.crop_spec.num_views, self.extractor.spec, cache_dir)

    # ---- loading ------------------------------------------------------------------------

    def _resolve_references(self, settings: SessionSettings):
        """``--references`` -> (cache folder, reference-data glob, extractor spec, K)."""
        if is_cache_folder(settings.references):
            metadata = json.loads(io_utils.read_text(
                io_utils.join(settings.references, reference_cache.METADATA_FILENAME)))
            if not io_utils.has_success_marker(settings.references):
                raise QueryInputError(
                    f"--references {settings.references} is not a complete reference cache "
                    "(no _SUCCESS): rerun landmarks-predict, or pass the reference records")
            if not io_utils.match(metadata["reference_data"]):
                raise QueryInputError(
                    f"the reference records of the cache {settings.references} are gone: no "
                    f"file matches {metadata['reference_data']}")
            return (settings.references, metadata["reference_data"], metadata["extractor"],
                    int(metadata["references_per_class"]))
        if not io_utils.match(settings.references):
            raise QueryInputError(
                f"--references {settings.references}: neither a reference cache folder (with "
                "metadata.json) nor a glob of reference TFRecords")
        # predict's default: beside the output folder, so an --overwrite keeps it.
        cache_dir = settings.reference_features or config_lib._sibling(
            settings.output_dir, config_lib.REFERENCE_FEATURES_DIRNAME)
        return (cache_dir, settings.references, settings.local_features,
                settings.references_per_class)

    def _load_knn(self, beam_args) -> None:
        from beam_pipelines.predict import pipeline as predict

        _, sha256 = _load(lambda: predict.check_embedding_model(
            self.config.embedding, self.image_size))
        embeddings = predict.ensure_reference_embeddings(self.config, beam_args, sha256)
        problem = predict.embedding_problem(embeddings, self.config)
        if problem is not None:
            raise QueryInputError(problem)
        rows = {}
        for path in io_utils.match(reference_cache.embeddings_pattern(embeddings["dir"])):
            for _, payload in records.iter_records(path):
                reference = reference_cache.parse_embedding(payload, sha256)
                rows.setdefault(reference.image_id, reference)  # an id once, as MakeShards
        self.index = knn_lib.make_shard(list(rows.values()))
        self.embedding_model = model_handler.load_keras_model(self.config.embedding)
        self.knn_params = knn_lib.aggregation_params(self.config.recognizer, self.config.knn_k)

    def class_references(self, class_index: int) -> list:
        """The cached references of one class (:func:`transforms.unique_references`)."""
        if class_index not in self._class_references:
            parsed = [parse_features(payload)
                      for payload in self._features_by_class.read(int(class_index))]
            self._class_references[class_index] = transforms.unique_references(parsed)
        return self._class_references[class_index]

    def reference_record(self, reference_id: str):
        """The reference's ``ImageRecord`` (None when the id is not in the reference data)."""
        payloads = self._images_by_id.read(reference_id)
        if not payloads:
            return None
        parsed = [image_record.parse_record(payload) for payload in payloads]
        return min(parsed, key=lambda record: record.jpeg_bytes)  # as DecodeRetrievedImage

    def reference_image(self, reference_id: str) -> Optional[np.ndarray]:
        record = self.reference_record(reference_id)
        return None if record is None else transforms.decode_rgb(record.jpeg_bytes)

    def reference_features(self, reference_id: str, class_index: int) -> Optional[FeatureRecord]:
        """Cached features of a reference (its class's sample), else extracted now from its
        record (the job's on-demand path); None when it has no record."""
        for record in self.class_references(class_index):
            if record.image_id == reference_id:
                return record
        if reference_id in self._on_demand:
            return self._on_demand[reference_id]
        image = self.reference_image(reference_id)
        record = None
        if image is not None:
            locations, descriptors = self._extract(image, f"reference {reference_id}")
            record = FeatureRecord(reference_id, int(class_index), self.extractor.spec,
                                   locations, descriptors)
        if len(self._on_demand) >= MAX_ON_DEMAND_CACHED:
            self._on_demand.pop(next(iter(self._on_demand)))  # the oldest
        self._on_demand[reference_id] = record
        return record

    # ---- one photo -------------------------------------------------------------------------

    def read_photo(self, photo: str, image_id: str) -> DecodedImage:
        """Path or URL -> the pixels the job would read from the photo's ingested record."""
        try:
            data = fetch.fetch_bytes(photo)
        except fetch.FetchFailed as error:
            raise PhotoError(f"cannot read: {error.reason}: {error.detail}") from error
        try:
            normalised = normalise.normalise_image(data, self.normalise_params)
        except normalise.ImageRejected as error:
            raise PhotoError(f"not a usable image: {error.reason}: {error.detail}") from error
        return DecodedImage(image_id, -1, transforms.decode_rgb(normalised.jpeg_bytes))

    def _extract(self, image: np.ndarray, what: str):
        kind = "test" if what.startswith("photo") else "reference"
        self.extraction_attempts[kind] += 1
        try:
            return transforms.check_features(self.extractor.extract(image))
        except Exception as error:  # noqa: BLE001 - as the job's ExtractFeatures: any failure
            _LOG.warning("features of %s failed: %s", what, transforms.error_summary(error))
            self.extraction_failures[kind].append(transforms.error_summary(error))
            return np.zeros((0, 2), np.float32), np.zeros((0, 1), np.float32)

    def _forward(self, model, image: np.ndarray) -> np.ndarray:
        from trainer.preprocessing import ImageContract

        views = crops.make_views(image, self.image_size, self.crop_spec, dtype=np.uint8)
        scaled = np.asarray(ImageContract(self.image_size).scale(views), np.float32)
        return model_handler.forward_views(model, scaled)

    def answer(self, photo: str, image_id: str) -> PhotoAnswer:
        """Answers one photo (raises :class:`PhotoError` when it cannot be read)."""
        start = time.monotonic()
        decoded = self.read_photo(photo, image_id)
        locations, descriptors = self._extract(decoded.image, f"photo {photo}")
        probabilities = None
        if self.config.uses_classifier:
            probabilities = self._forward(self.model, decoded.image)
        if self.config.uses_knn:
            scored, candidates = self._answer_knn(decoded, locations, descriptors, probabilities)
        else:
            scored, candidates = self._answer_classifier(
                decoded, locations, descriptors, probabilities)
        return PhotoAnswer(photo, image_id, decoded.image, scored, tuple(candidates),
                           int(len(locations)), time.monotonic() - start)

    def _matcher(self):
        """``(count_inliers, matches)``: a drop-in for ``verification.count_inliers`` (same
        arguments, same count) that keeps each reference's matches in ``matches``, keyed by
        the reference's descriptor array."""
        matches: dict = {}

        def count_inliers(locations, descriptors, reference_locations, reference_descriptors,
                          params):
            found = verification.inlier_matches(locations, descriptors, reference_locations,
                                                reference_descriptors, params)
            matches[id(reference_descriptors)] = found
            return int(len(found[0]))

        return count_inliers, matches

    def _evidence(self, class_index: int, references: list, locations, descriptors,
                  matches: Optional[dict] = None) -> tuple:
        """Each reference's inlier count (most first); the matched points of the best
        :data:`MAX_MATCHED_REFERENCES`. ``matches``: the ones already found (by
        :meth:`_matcher`), else they are computed here."""
        matches = {} if matches is None else matches
        counted = []
        for record in references:
            found = matches.get(id(record.descriptors))
            if found is None:
                found = (verification.inlier_matches(
                    locations, descriptors, record.locations, record.descriptors,
                    self.verification) if len(locations) and record.num_features
                    else (_NO_INDICES, _NO_INDICES))
            # Image 1 is the photo, image 2 the reference: the job's order (score_query).
            counted.append((record, found[0], found[1]))
        counted.sort(key=lambda item: (-len(item[1]), item[0].image_id))
        landmark_id = int(self.landmark_ids[class_index])
        evidence = []
        for position, (record, index_photo, index_reference) in enumerate(counted):
            keep = position < MAX_MATCHED_REFERENCES and len(index_photo)
            evidence.append(Evidence(
                record.image_id, landmark_id, int(len(index_photo)),
                np.asarray(locations, np.float32)[index_photo] if keep else _NO_POINTS,
                np.asarray(record.locations, np.float32)[index_reference] if keep
                else _NO_POINTS))
        return tuple(evidence)

    def _answer_classifier(self, decoded, locations, descriptors, probabilities):
        class_index, confidence = voting.vote(probabilities)
        shares = voting.vote_shares(probabilities)
        query = TestQuery(decoded.image_id, Vote(int(class_index), float(confidence)),
                          locations, descriptors)
        count_inliers, matches = self._matcher()
        scored = transforms.score_query(query, class_index, self.class_references(class_index),
                                        self.verification, count_inliers)
        mean_probability = probabilities.mean(axis=0)
        order = sorted(range(len(mean_probability)), key=lambda c: (
            c != class_index, -shares.get(c, 0.0), -float(mean_probability[c]), c))
        candidates = []
        for candidate in order[: self.settings.top]:
            share = float(confidence) if candidate == class_index else shares.get(candidate, 0.0)
            evidence = self._evidence(candidate, self.class_references(candidate), locations,
                                      descriptors, matches)
            candidates.append(Candidate(
                int(self.landmark_ids[candidate]), int(candidate), share, share,
                float(mean_probability[candidate]),
                max((item.inliers for item in evidence), default=0), evidence))
        return scored, candidates

    def _answer_knn(self, decoded, locations, descriptors, probabilities):
        params = self.knn_params
        embedding = retrieval.combine_view_embeddings(
            self._forward(self.embedding_model, decoded.image))
        similarities, positions = retrieval.exact_top_k(
            embedding[None], self.index.vectors, self.config.knn_k)
        merge = knn_lib.MergeNeighboursFn(self.config.knn_k)
        found = positions[0] >= 0
        neighbours = merge.extract_output(merge.add_input(merge.create_accumulator(), (
            np.asarray(similarities[0][found], np.float32), self.index.ids[positions[0][found]],
            self.index.labels[positions[0][found]])))
        vote = None
        with_classifier = self.config.recognizer == "knn+classifier"
        if with_classifier:
            class_index, confidence = voting.vote(probabilities)
            vote = Vote(int(class_index), float(confidence),
                        tuple(voting.vote_shares(probabilities).items()))
        _, knn_scores = knn_lib.score_neighbours(decoded.image_id, neighbours, vote, params,
                                                 with_classifier)
        # The job's pairs (neighbour_pairs): every landmark neighbour of a photo with features;
        # a reference without a record or without features stays unverified.
        features: dict = {}
        inliers = []
        count_inliers, matches = self._matcher()
        if len(locations):
            for reference_id, label in zip(neighbours.ids, neighbours.labels):
                if label == retrieval.NON_LANDMARK_LABEL:
                    continue
                record = self.reference_features(reference_id, label)
                if record is None or record.num_features == 0:
                    continue
                features[reference_id] = record
                inliers.append((reference_id, count_inliers(
                    locations, descriptors, record.locations, record.descriptors,
                    self.verification)))
        scored, reranked = knn_lib.rerank_scored(decoded.image_id, knn_scores,
                                                 int(len(locations)), inliers, params,
                                                 self.config.recognizer)
        order = sorted(reranked.per_class, key=lambda c: (
            c != scored.class_index, -reranked.per_class[c], c))
        candidates = []
        for candidate in order[: self.settings.top]:
            verified = [features[reference_id] for reference_id, label
                        in zip(neighbours.ids, neighbours.labels)
                        if label == candidate and reference_id in features]
            evidence = self._evidence(candidate, verified, locations, descriptors, matches)
            share = (None if knn_scores.class_confidences is None
                     else float(knn_scores.class_confidences.get(candidate, 0.0)))
            candidates.append(Candidate(
                int(self.landmark_ids[candidate]), int(candidate),
                knn_lib.blend_confidence(knn_scores, candidate, params), share,
                float(reranked.per_class[candidate]),
                max((item.inliers for item in evidence), default=0), evidence))
        return scored, candidates

    # ---- after all photos ------------------------------------------------------------------

    def finish(self, answers: Sequence[PhotoAnswer], local_max_top: float = 0.0) -> tuple:
        """The final scores: each answer's job row (:func:`transforms.blend_row`) and each
        candidate's score. Returns ``(answers, maxima)``.

        The max inlier counts are divided by ``local_max_top`` when it is given (> 0; e.g. the
        largest ``local_max`` of a predict run, for that run's scale), else by the largest
        inlier count of any compared reference of these answers, candidates included. The job
        divides by the largest of its test set's answers; a query is often one photo, and
        normalising one photo by its own answer would give that answer the top local score
        however few inliers it has (5 inliers scoring as much as 250), so the candidates'
        counts set the scale too. With the job's normaliser the scores are the job's.
        """
        maxima = scores.maxima_of(transforms.local_scores(answer.scored) for answer in answers)
        if local_max_top > 0:
            top = float(local_max_top)
        else:
            top = max([maxima[0], *(candidate.inliers for answer in answers
                                    for candidate in answer.candidates)])
        maxima = (float(top),) + tuple(maxima[1:])
        finished = []
        for answer in answers:
            row = transforms.blend_row(answer.scored, maxima, self.config.blend_weight,
                                       self.landmark_ids)
            # With a given local_max_top a candidate may have more inliers than it: clipped,
            # so that every score stays in [0, 1].
            candidates = [dataclasses.replace(candidate, score=scores.final_score(
                min(candidate.inliers, maxima[0]), maxima[0], candidate.confidence,
                self.config.blend_weight)) for candidate in answer.candidates]
            if candidates and row.label == candidates[0].landmark_id:
                # The job's answer: its score is the job's (the same numbers, so equal unless
                # the photo had no features, where the job blends a local score of 0 too).
                candidates[0] = dataclasses.replace(candidates[0], score=row.final_score)
            # The job's answer stays first (rescoring changes its confidence, never its
            # class); the other candidates by their score.
            candidates[1:] = sorted(candidates[1:], key=lambda c: (-c.score, c.landmark_id))
            finished.append(dataclasses.replace(answer, row=row, candidates=tuple(candidates)))
        return finished, maxima


_NO_POINTS = np.zeros((0, 2), np.float32)
_NO_INDICES = np.zeros((0,), np.int64)


def _load(action):
    """Runs a loading step; its input errors become :class:`QueryInputError`."""
    from beam_pipelines.predict.pipeline import PredictError

    try:
        return action()
    except (PredictError, FileNotFoundError, ValueError) as error:
        raise QueryInputError(str(error)) from error


def _feature_keys(payload: bytes) -> list:
    try:
        return [int(parse_features(payload).label)]
    except SchemaError as error:
        raise QueryInputError(f"bad reference feature record: {error}") from error


def _image_keys(payload: bytes) -> list:
    try:
        return [image_record.parse_record(payload).image_id]
    except SchemaError:
        image_id = transforms.record_id_if_any(payload)
        return [image_id] if image_id else []
