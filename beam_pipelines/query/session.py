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
  ``combine_view_embeddings`` -> the exact top-k over every reference embedding (read from
  disk a block at a time, :mod:`.embedding_index`) ->
  ``knn.score_neighbours`` -> inliers per landmark neighbour (cached features, else extracted
  from the reference's record) -> ``knn.rerank``;
* final score: ``transforms.blend_row``, normalised by a given ``local_max_top`` (the job's,
  for the job's scores) or by the largest inlier count among the photos' compared references
  (:meth:`QuerySession.finish`).

So, with the job's normaliser, the first candidate's row equals the job's ``scores.csv`` row
for the same image (tested), up to float32 rounding of the network, which depends on how many
views share a forward pass.

Each answer lists the top candidates (the classifier's order of
``rescoring.candidates.top_candidates``: the vote's class, then vote share, then mean
probability; or the kNN's classes), each verified against its own references the same way,
with the inlier matches of its best references for the picture. They are ranked by the score
that decides the answer, so the first is always the answer and none below it scores higher:
for the classifier, the final score of each of the ``--rerank_top`` K candidates the job
verifies (the answer is the best of them), then the candidates beyond K, which cannot be the
answer and have no deciding score (their inliers are shown: one with more than the answer's is
worth a larger K); for the kNN recognizers, the re-ranked class score
(``rescoring.retrieval.rerank_with_inliers``), which decides their answer.
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
    ScoredImage,
    TestQuery,
    Vote,
)
from beam_pipelines.query import embedding_index, records
from rescoring import candidates as candidates_lib
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

    ``score``: the final score this landmark would get as the answer (the job's blend of its
    normalised max inlier count and ``confidence``; filled by :meth:`QuerySession.finish`);
    ``confidence``: what the blend uses (the classifier: the candidate's confidence of
    ``rescoring.candidates.top_candidates``; ``knn+classifier``: the classifier factor; ``knn``:
    the kNN score / k); ``classifier_share``: the classifier's vote share (for
    ``knn+classifier`` its factor; None for ``knn``); ``stage1_score``: the classifier's mean
    probability, or the kNN's re-ranked class score; ``inliers``: the max over its compared
    references; ``evidence``: its references, most inliers first; ``rank``: its position in the
    classifier's order (the kNN's: by re-ranked score); ``eligible``: it can be the answer (one
    of the ``--rerank_top`` K verified for the classifier; every kNN candidate); ``decisive``:
    the score that decides the answer among the eligible candidates (the final score for the
    classifier, the re-ranked class score for kNN; None when not eligible).
    """

    landmark_id: int
    class_index: int
    confidence: float
    classifier_share: Optional[float]
    stage1_score: float
    inliers: int
    evidence: tuple
    score: float = 0.0
    rank: int = 0
    eligible: bool = True
    decisive: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class PhotoAnswer:
    """The answer for one photo: ``row`` is the job's ``scores.csv`` row (after
    :meth:`QuerySession.finish`); ``scored`` the same before normalisation; ``image`` the
    normalised RGB pixels ``[H, W, 3]`` uint8 the scores were computed on; ``verified``: the
    classifier's ``ScoredImage`` of each of its ``--rerank_top`` candidates (the job's rows
    before the best is picked; empty: ``(scored,)``)."""

    photo: str
    image_id: str
    image: np.ndarray
    scored: ScoredImage
    candidates: tuple
    num_features: int
    seconds: float
    row: Optional[FinalRow] = None
    verified: tuple = ()


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
    rerank_top: int = 0
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
        from beam_pipelines.predict import completeness, input_checks
        from beam_pipelines.predict import pipeline as predict

        start = time.monotonic()
        self.settings = settings
        model_path = io_utils.join(settings.model_dir, "model.keras")
        label_map = _load(lambda: input_checks.load_label_map(
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
            rerank_top=settings.rerank_top if settings.recognizer == "classifier" else 0,
        ).resolved(geometry.image_size, geometry.num_classes)
        extractor, _ = _load(lambda: input_checks.probe_extractor(spec))
        self.extractor = extractor
        self.verification = input_checks.make_verification_params(extractor)
        self.crop_spec = input_checks.crop_spec_for(settings.crops)
        self.normalise_params = normalise.NormaliseParams(max_side=settings.max_side)
        references = predict.ensure_reference_features(self.config, beam_args, extractor.spec)
        self.references = references  # the featurisation's counts (extraction failures)
        problem = completeness.reference_problem(references, self.config)
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
        self.index: Optional[embedding_index.EmbeddingIndex] = None
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
        from beam_pipelines.predict import completeness, input_checks
        from beam_pipelines.predict import pipeline as predict

        _, sha256 = _load(lambda: input_checks.check_embedding_model(
            self.config.embedding, self.image_size))
        embeddings = predict.ensure_reference_embeddings(self.config, beam_args, sha256)
        problem = completeness.embedding_problem(embeddings, self.config)
        if problem is not None:
            raise QueryInputError(problem)
        # On disk, searched a block at a time (embedding_index: memory independent of N).
        self.index = _load(lambda: embedding_index.open_index(embeddings["dir"], sha256))
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
        verified = ()
        if self.config.uses_knn:
            scored, candidates = self._answer_knn(decoded, locations, descriptors, probabilities)
        else:
            verified, candidates = self._answer_classifier(
                decoded, locations, descriptors, probabilities)
            scored = verified[0]
        return PhotoAnswer(photo, image_id, decoded.image, scored, tuple(candidates),
                           int(len(locations)), time.monotonic() - start, verified=verified)

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
        """``(ScoredImage of each verified candidate, the listed Candidates)``: the job's
        ``VoteOverViews``, ``candidate_queries`` and ``score_query`` (what ``Verify`` runs);
        the answer is picked by :meth:`finish`, once the normaliser is known."""
        rerank_top = self.config.rerank_top
        verified = candidates_lib.top_candidates(probabilities, rerank_top)
        class_index, confidence = verified[0]
        vote = Vote(int(class_index), float(confidence), (), verified if rerank_top > 1 else ())
        count_inliers, matches = self._matcher()
        rows = tuple(
            transforms.score_query(query, candidate, self.class_references(candidate),
                                   self.verification, count_inliers)
            for candidate, query in transforms.candidate_queries(
                TestQuery(decoded.image_id, vote, locations, descriptors)))
        shares = voting.vote_shares(probabilities)
        mean_probability = probabilities.mean(axis=0)
        listed = candidates_lib.top_candidates(probabilities, max(self.settings.top, rerank_top))
        candidates = []
        for rank, (candidate, candidate_confidence) in enumerate(listed):
            share = float(confidence) if rank == 0 else shares.get(candidate, 0.0)
            evidence = self._evidence(candidate, self.class_references(candidate), locations,
                                      descriptors, matches)
            candidates.append(Candidate(
                int(self.landmark_ids[candidate]), int(candidate), candidate_confidence, share,
                float(mean_probability[candidate]),
                max((item.inliers for item in evidence), default=0), evidence, rank=rank,
                eligible=rank < len(verified)))
        return rows, candidates

    def _answer_knn(self, decoded, locations, descriptors, probabilities):
        params = self.knn_params
        embedding = retrieval.combine_view_embeddings(
            self._forward(self.embedding_model, decoded.image))
        merge = knn_lib.MergeNeighboursFn(self.config.knn_k)
        neighbours = merge.extract_output(merge.add_input(
            merge.create_accumulator(), self.index.search(embedding, self.config.knn_k)))
        vote = None
        with_classifier = self.config.recognizer == "knn+classifier"
        if with_classifier:  # the job's vote, with the classifier factor of the rule
            from apache_beam.ml.inference.base import PredictionResult

            _, vote = transforms.vote_keyed(
                (decoded.image_id, PredictionResult(None, probabilities)), class_votes=True)
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
                max((item.inliers for item in evidence), default=0), evidence,
                rank=len(candidates), decisive=float(reranked.per_class[candidate])))
        return scored, candidates

    # ---- after all photos ------------------------------------------------------------------

    def finish(self, answers: Sequence[PhotoAnswer], local_max_top: float = 0.0) -> tuple:
        """The final scores: each answer's job row (:func:`transforms.blend_row`; for the
        classifier the best of its verified candidates' rows, as the job's
        ``PickBestCandidate``) and each candidate's score, the candidates ranked by the score
        that decides the answer (see the module docstring) and cut to ``--top``. Returns
        ``(answers, maxima)``.

        The max inlier counts are divided by ``local_max_top`` when it is given (> 0; e.g. the
        largest ``local_max`` of a predict run, for that run's scale), else by the largest
        inlier count of any compared reference of these answers, candidates included. The job
        divides by the largest of its test set's candidates; a query is often one photo, and
        normalising one photo by its own answer would give that answer the top local score
        however few inliers it has (5 inliers scoring as much as 250), so the candidates'
        counts set the scale too. With the job's normaliser the scores are the job's.
        """
        verified = [answer.verified or (answer.scored,) for answer in answers]
        maxima = scores.maxima_of(transforms.local_scores(scored)
                                  for rows in verified for scored in rows)
        if local_max_top > 0:
            top = float(local_max_top)
        else:
            top = max([maxima[0], *(candidate.inliers for answer in answers
                                    for candidate in answer.candidates)])
        maxima = (float(top),) + tuple(maxima[1:])
        finished = []
        for answer, rows in zip(answers, verified):
            blended = [transforms.blend_row(scored, maxima, self.config.blend_weight,
                                            self.landmark_ids) for scored in rows]
            row = blended[0]
            if len(blended) > 1:
                row = candidates_lib.pick_best(blended, transforms.candidate_preference)
            scored = rows[blended.index(row)]
            final_scores = {item.label: item.final_score for item in blended}
            candidates = []
            for candidate in answer.candidates:
                # With a given local_max_top a candidate may have more inliers than it:
                # clipped, so that every score stays in [0, 1].
                score = scores.final_score(min(candidate.inliers, maxima[0]), maxima[0],
                                           candidate.confidence, self.config.blend_weight)
                if candidate.landmark_id in final_scores:  # verified: the job's row's score
                    score = final_scores[candidate.landmark_id]
                decisive = candidate.decisive
                if not self.config.uses_knn:
                    decisive = score if candidate.eligible else None
                candidates.append(dataclasses.replace(candidate, score=score,
                                                      decisive=decisive))
            candidates = rank_candidates(candidates, row.label)[: self.settings.top]
            finished.append(dataclasses.replace(answer, scored=scored, row=row,
                                                candidates=tuple(candidates)))
        return finished, maxima


def rank_candidates(candidates: Sequence[Candidate], answer_label) -> list:
    """The candidates in the order shown: the answer first (landmark ``answer_label``), then
    the other eligible ones by their deciding score (equal scores: earlier rank), then those
    that cannot be the answer, in rank order. Every deciding score below the answer is at
    most the answer's: the answer is the best of them (the job's pick, the kNN's best class)."""
    return sorted(candidates, key=lambda c: (
        c.landmark_id != answer_label, c.decisive is None,
        -(c.decisive if c.decisive is not None else 0.0), c.rank))


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
