"""landmarks-query on a demo run's outputs: the job's scores for the same photos, the pictures
and index.html, bad photos, PNG/WebP and gs:// photos, reference records as --references.

The demo run (toy data, ingest, training, three predict jobs) is shared with test_demo.py
(fixture ``demo_run`` in conftest.py): every query here reads its model, its reference cache and
the very photos its test records were ingested from.
"""

import csv
import dataclasses
import io
import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from beam_pipelines.predict import config as predict_config
from beam_pipelines.predict import model_handler
from beam_pipelines.query import main as query
from beam_pipelines.query import render, session as session_lib
from rescoring import crops, retrieval
from trainer.preprocessing import ImageContract

import forward_effects

FLOAT32_ULP = float(np.finfo(np.float32).eps)


def read_scores(path):
    with open(path) as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def demo_photos(run_dir, count):
    """``count`` test photos of the demo: landmark views and distractors, sorted by id."""
    with open(os.path.join(run_dir, "toy_data", "test_solution.csv")) as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["id"])
    landmarks = [row for row in rows if row["landmarks"]][: count - count // 3]
    distractors = [row for row in rows if not row["landmarks"]][: count // 3]
    folder = os.path.join(run_dir, "toy_data", "images", "test")
    return [os.path.join(folder, row["id"] + ".jpg") for row in landmarks + distractors]


def job_local_max_top(scores, predict_dir=None):
    """The job's normaliser: ``local_max_top`` of its stats.json (the largest local_max of
    every candidate), else the largest local_max of its test set."""
    if predict_dir is not None:
        with open(os.path.join(predict_dir, "stats.json")) as handle:
            stats = json.load(handle)
        if "local_max_top" in stats:
            return stats["local_max_top"]
    return max(float(row["local_max"]) for row in scores.values())


def job_rerank_top(predict_dir):
    """The job's --rerank_top (1 for a config written before the flag)."""
    with open(os.path.join(predict_dir, "config.json")) as handle:
        return json.load(handle)["config"].get("rerank_top", 1)


def run_query(tmp_path, run_dir, photos, *flags, name="query"):
    output = tmp_path / name
    code = query.main(["--model_dir", os.path.join(run_dir, "model"),
                       "--references", os.path.join(run_dir, "reference_features"),
                       "--output_dir", str(output), *flags, *photos])
    return code, output


def views_of(photos, image_size, num_views, max_side):
    """The scaled views the job forwards for each photo (the query's own preprocessing)."""
    from beam_pipelines.ingest import normalise
    from beam_pipelines.predict import transforms

    params = normalise.NormaliseParams(max_side=max_side)
    spec = crops.CropSpec.for_num_views(num_views)
    views = {}
    for photo in photos:
        with open(photo, "rb") as handle:
            pixels = transforms.decode_rgb(normalise.normalise_image(handle.read(), params)
                                           .jpeg_bytes)
        views[photo] = np.asarray(ImageContract(image_size).scale(
            crops.make_views(pixels, image_size, spec, dtype=np.uint8)), np.float32)
    return views


def test_classifier_answers_equal_the_prediction_jobs_scores(demo_run, tmp_path):
    """The same photos give the job's scores.csv rows: labels and inlier columns exactly, the
    confidences and final scores within the effect of batching on the network, measured
    here for these photos (the job forwards several images' views at once)."""
    run_dir = demo_run.run_dir
    predict_dir = os.path.join(run_dir, "predict")
    job = read_scores(os.path.join(predict_dir, "scores.csv"))
    photos = demo_photos(run_dir, 4)
    rerank_top = job_rerank_top(predict_dir)
    code, output = run_query(tmp_path, run_dir, photos,
                             "--local_max_top", repr(job_local_max_top(job, predict_dir)),
                             "--rerank_top", str(rerank_top))
    assert code == 0
    answered = read_scores(output / "scores.csv")
    ids = [os.path.basename(photo)[:-4] for photo in photos]
    assert sorted(answered) == sorted(ids)

    model = model_handler.load_keras_model(os.path.join(run_dir, "model", "model.keras"))
    image_size = model_handler.model_geometry(model).image_size
    spread = forward_effects.batching_spread(
        model, views_of(photos, image_size, 22, 512), predict_config.DEFAULT_BATCH_IMAGES)
    weight = predict_config.DEFAULT_BLEND_WEIGHT
    for image_id in ids:
        mine, theirs = answered[image_id], job[image_id]
        for column in ("nn_label", "label", "local_max", "local_mean", "local_best_half"):
            assert mine[column] == theirs[column], (image_id, column)
        assert abs(float(mine["nn_confidence"]) - float(theirs["nn_confidence"])) <= (
            spread + 2 * FLOAT32_ULP)
        assert abs(float(mine["final_score"]) - float(theirs["final_score"])) <= (
            weight * spread + 4 * FLOAT32_ULP)

    # answers.json: the answer first, every candidate's numbers from its own evidence, ranked
    # by the score that decides the answer.
    answers = json.loads((output / "answers.json").read_text())
    assert answers["answered"] == len(photos) and answers["failed"] == 0
    normaliser = answers["local_max_top"]
    for answer in answers["answers"]:
        row = answered[answer["id"]]
        first = answer["candidates"][0]
        assert str(first["landmark_id"]) == row["label"]
        assert first["score"] == pytest.approx(float(row["final_score"]), abs=1e-12)
        assert len(answer["candidates"]) == 5
        assert len({c["landmark_id"] for c in answer["candidates"]}) == 5
        for candidate in answer["candidates"]:
            counts = [reference["inliers"] for reference in candidate["references"]]
            assert candidate["inliers"] == max(counts)
            assert counts == sorted(counts, reverse=True)
            expected = (1 - weight) * min(candidate["inliers"], normaliser) / normaliser + (
                weight * candidate["confidence"])
            assert candidate["score"] == pytest.approx(expected, abs=1e-9)
        assert [c["eligible"] for c in answer["candidates"]] == sorted(
            (c["rank"] < rerank_top for c in answer["candidates"]), reverse=True)
        decisive = [c["decisive"] for c in answer["candidates"] if c["eligible"]]
        assert decisive[0] == first["score"] and decisive == sorted(decisive, reverse=True)
        assert all(c["decisive"] is None for c in answer["candidates"] if not c["eligible"])

    # One picture per photo, all of them on the page.
    page = (output / "index.html").read_text()
    for answer in answers["answers"]:
        picture = Image.open(output / answer["picture"])
        assert picture.format == "JPEG" and picture.height >= render.ROW_HEIGHT
        assert answer["picture"] in page
    assert (output / "_SUCCESS").exists()


def test_knn_answers_equal_the_prediction_jobs_scores(demo_run, tmp_path):
    """--recognizer knn: the same neighbours, inliers and labels as the job's kNN run; the
    similarities within the batching effect on the embeddings, measured here."""
    run_dir = demo_run.run_dir
    job = read_scores(os.path.join(run_dir, "predict_knn", "scores.csv"))
    photos = demo_photos(run_dir, 6)
    code, output = run_query(tmp_path, run_dir, photos, "--recognizer", "knn",
                             "--local_max_top", repr(job_local_max_top(job)))
    assert code == 0
    answered = read_scores(output / "scores.csv")

    embedding = model_handler.load_keras_model(os.path.join(run_dir, "model", "embedding.keras"))
    image_size = model_handler.model_geometry(embedding).image_size
    views = views_of(photos, image_size, 22, 512)
    alone = {photo: retrieval.combine_view_embeddings(embedding.predict_on_batch(v))
             for photo, v in views.items()}
    together = np.asarray(embedding.predict_on_batch(np.concatenate(list(views.values()))))
    spread = max(float(np.abs(alone[photo] - retrieval.combine_view_embeddings(
        together[22 * i: 22 * (i + 1)])).sum()) for i, photo in enumerate(views))
    # |cos(a, r) - cos(b, r)| <= |a - b|_1 for unit r: the similarity tolerance.
    for photo in photos:
        image_id = os.path.basename(photo)[:-4]
        mine, theirs = answered[image_id], job[image_id]
        for column in ("label", "knn_label", "neighbour_ids", "neighbour_labels",
                       "neighbour_inliers", "local_max", "local_mean", "local_best_half"):
            assert mine[column] == theirs[column], (image_id, column)
        for a, b in zip(mine["neighbour_similarities"].split(),
                        theirs["neighbour_similarities"].split()):
            assert abs(float(a) - float(b)) <= spread + 4 * FLOAT32_ULP
        assert abs(float(mine["final_score"]) - float(theirs["final_score"])) <= (
            2 * spread + 8 * FLOAT32_ULP)


def test_bad_photos_get_one_line_and_the_others_their_answers(demo_run, tmp_path, capsys):
    run_dir = demo_run.run_dir
    good = demo_photos(run_dir, 2)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is not a photo")
    missing = tmp_path / "missing.jpg"
    code, output = run_query(tmp_path, run_dir,
                             [good[0], str(not_an_image), str(missing), good[1]],
                             "--crops", "1")
    assert code == query.EXIT_SOME_PHOTOS_FAILED
    err = capsys.readouterr().err
    bad_lines = [line for line in err.splitlines() if line.startswith("landmarks-query: error:")]
    assert len(bad_lines) == 3  # one per bad photo, then the summary line
    assert any("notes.jpg" in line and "not a usable image" in line for line in bad_lines)
    assert any("missing.jpg" in line and "cannot read" in line for line in bad_lines)
    answers = json.loads((output / "answers.json").read_text())
    assert [a["photo"] for a in answers["answers"]] == good
    assert {f["photo"] for f in answers["failures"]} == {str(not_an_image), str(missing)}
    assert "notes.jpg" in (output / "index.html").read_text()
    assert not (output / "_SUCCESS").exists()


def test_png_webp_and_gs_photos_are_answered_like_the_jpeg(demo_run, tmp_path, gcs_emulator):
    """Other formats and a gs:// URL: the same answer as the JPEG they were made from (the
    pixels differ only by the JPEG decoder's reduced-size decoding of large photos)."""
    run_dir = demo_run.run_dir
    jpeg = demo_photos(run_dir, 3)[0]
    pixels = Image.open(jpeg).convert("RGB")
    png, webp = tmp_path / "p.png", tmp_path / "w.webp"
    pixels.save(png)
    pixels.save(webp, lossless=True)
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG")
    remote = gcs_emulator.upload("photos/g.png", buffer.getvalue())
    code, output = run_query(tmp_path, run_dir, [jpeg, str(png), str(webp), remote],
                             "--crops", "1")
    assert code == 0
    answered = read_scores(output / "scores.csv")
    labels = {row["label"] for row in answered.values()}
    assert len(answered) == 4 and len(labels) == 1 and labels != {""}


def test_reference_records_are_featurised_once_then_reused(demo_run, tmp_path, caplog):
    run_dir = demo_run.run_dir
    photos = demo_photos(run_dir, 2)
    records = os.path.join(run_dir, "ingest_train", "train-*.tfrecord")
    cache = tmp_path / "cache"
    flags = ["--references", records, "--reference_features", str(cache),
             "--references_per_class", "4", "--crops", "1", "--local_features", "orb"]
    for name in ("first", "second"):
        caplog.clear()
        with caplog.at_level("INFO"):
            code = query.main(["--model_dir", os.path.join(run_dir, "model"), "--output_dir",
                               str(tmp_path / name), *flags, *photos])
        assert code == 0
        log = caplog.text
        assert ("computing into" in log) == (name == "first"), name
        assert ("reusing" in log) == (name == "second"), name
    first = read_scores(tmp_path / "first" / "scores.csv")
    assert first == read_scores(tmp_path / "second" / "scores.csv")
    assert json.loads((cache / "metadata.json").read_text())["references_per_class"] == 4
    assert (cache / session_lib.INDEX_FILENAME).exists()


@pytest.mark.parametrize("argv, message", [
    ([], "at least one PHOTO"),
    (["--recognizer", "nearest", "x.jpg"], "invalid choice"),
    (["--crops", "5", "x.jpg"], "--crops must be one of"),
    (["--knn_k", "3", "x.jpg"], "--knn_k"),
    (["--top", "0", "x.jpg"], "--top must be >= 1"),
    (["--cropz", "1", "x.jpg"], "unknown flag --cropz"),
])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    code = query.main(["--model_dir", str(tmp_path), "--references", str(tmp_path),
                       "--output_dir", str(tmp_path / "out"), *argv])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_missing_model_or_reference_cache_is_one_line(tmp_path, capsys):
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(photo)
    code = query.main(["--model_dir", str(tmp_path / "nothing"), "--references",
                       str(tmp_path / "nocache"), "--output_dir", str(tmp_path / "out"),
                       str(photo)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label map not found" in err[0], err


def test_photo_ids_are_stems_unless_two_collide():
    assert session_lib.photo_ids(["a/x1.jpg", "gs://b/y 2.png"]) == ["x1", "y_2"]
    assert session_lib.photo_ids(["a/x.jpg", "b/x.png"]) == ["000_x", "001_x"]



def _candidate(landmark_id, inliers_per_reference, with_points=True):
    evidence = tuple(
        session_lib.Evidence(f"r{landmark_id}_{i}", landmark_id, inliers,
                             np.array([[10.0, 10.0]] * inliers, np.float32) if with_points
                             else np.zeros((0, 2), np.float32),
                             np.array([[40.0, 60.0]] * inliers, np.float32) if with_points
                             else np.zeros((0, 2), np.float32))
        for i, inliers in enumerate(inliers_per_reference))
    return session_lib.Candidate(landmark_id, 0, 0.5, 0.5, 0.5,
                                 max(inliers_per_reference, default=0), evidence, score=0.5)


def test_pictures_show_the_answers_references_and_a_stronger_rival():
    photo = np.zeros((100, 100, 3), np.uint8)
    from beam_pipelines.predict.elements import FinalRow

    row = FinalRow("p", "scored", 1, 0.5, 5.0, 4.0, 4.5, 0.5, 1, 100, 3)
    answer = session_lib.PhotoAnswer("p.jpg", "p", photo, None, (
        _candidate(1, [5, 4, 3]), _candidate(2, [30, 2]), _candidate(3, [1])), 100, 0.1, row)
    shown = render.shown_references(answer)
    assert [e.reference_id for e in shown] == ["r1_0", "r1_1", "r2_0"]  # rival has 30 > 5
    weaker = dataclasses.replace(answer, candidates=(_candidate(1, [5, 4, 3]),
                                                     _candidate(2, [4])))
    assert [e.reference_id for e in render.shown_references(weaker)] == ["r1_0", "r1_1", "r1_2"]
    unverified = dataclasses.replace(answer, candidates=(_candidate(1, [0, 0], False),))
    assert [e.reference_id for e in render.shown_references(unverified)] == ["r1_0"]

    # The match (10, 10) -> (40, 60) of the first row is drawn in that row's colour, from the
    # photo's point to the reference's, both scaled to ROW_HEIGHT.
    alone = dataclasses.replace(answer, candidates=answer.candidates[:1])
    picture = render.evidence_picture(
        alone, lambda reference_id: np.full((50, 100, 3), 90, np.uint8), row_height=200)
    scale_photo, scale_reference = 200 / 100, 200 / 50
    caption = len(render.caption_lines(alone)) * render.CAPTION_LINE + 8
    top = caption + render.CAPTION_LINE + 4
    start = np.array([10 * scale_photo, top + 10 * scale_photo])
    end = np.array([200 + render.GAP + 60 * scale_reference, top + 40 * scale_reference])
    middle = np.round((start + end) / 2).astype(int)
    colour = np.array(render._LINE_COLOURS[0])
    window = picture[middle[1] - 1: middle[1] + 2, middle[0] - 1: middle[0] + 2].reshape(-1, 3)
    assert (np.abs(window.astype(int) - colour).sum(axis=1) < 60).any()
    assert picture.shape[0] == caption + 3 * (200 + render.CAPTION_LINE + 4)


def test_one_photo_is_normalised_by_the_strongest_evidence_compared_not_its_own_answer():
    """A single photo's weak answer (5 inliers) must not get the top local score because it is
    the only answer: the normaliser is the largest count compared (279, another candidate's);
    a given --local_max_top replaces it, and counts above it are clipped."""
    from beam_pipelines.predict.elements import ScoredImage

    session = _session(rerank_top=1)
    scored = ScoredImage("p", "scored", 0, 0.4, 5.0, 3.0, 4.0, 100, 3)
    weak, strong = _candidate(1, [5, 2]), _candidate(2, [279, 10])
    weak = dataclasses.replace(weak, confidence=0.4)
    strong = dataclasses.replace(strong, class_index=1, confidence=0.0, rank=1, eligible=False)
    answer = session_lib.PhotoAnswer("p.jpg", "p", np.zeros((8, 8, 3), np.uint8), scored,
                                     (weak, strong), 100, 0.1)
    (finished,), maxima = session.finish([answer])
    assert maxima[0] == 279
    assert finished.row.final_score == pytest.approx(0.85 * 5 / 279 + 0.15 * 0.4)
    assert [c.score for c in finished.candidates] == pytest.approx(
        [0.85 * 5 / 279 + 0.15 * 0.4, 0.85])
    # Beyond --rerank_top 1 the strong candidate cannot be the answer: no deciding score.
    assert [c.decisive for c in finished.candidates] == [finished.row.final_score, None]
    (fixed,), maxima = session.finish([answer], local_max_top=10.0)
    assert maxima[0] == 10.0
    assert fixed.row.final_score == pytest.approx(0.85 * 5 / 10 + 0.15 * 0.4)
    assert fixed.candidates[1].score == pytest.approx(0.85)  # 279 clipped to 10


def _session(rerank_top, top=5):
    """A session without its loading: what finish() reads."""
    session = object.__new__(session_lib.QuerySession)
    session.config = types.SimpleNamespace(blend_weight=0.15, uses_knn=False,
                                           rerank_top=rerank_top)
    session.settings = types.SimpleNamespace(top=top)
    session.landmark_ids = (1, 2, 3)
    return session


def test_the_first_line_is_the_answer_and_nothing_below_scores_higher():
    """Three candidates verified (--rerank_top 3): the third in the classifier's order has
    the strongest evidence and becomes the answer; the text, the caption and the page list
    it first, and every deciding score below it is lower. With --rerank_top 1 the vote's
    class stays the answer and the stronger candidate has no deciding score, with a hint."""
    from beam_pipelines.predict.elements import Candidacy, ScoredImage

    def scored(class_index, confidence, local_max, rank):
        return ScoredImage("p", "scored", class_index, confidence, local_max, local_max / 2,
                           local_max, 100, 3, candidate=Candidacy(rank, 3, 0, 0.4))

    verified = (scored(0, 0.4, 5.0, 0), scored(2, 0.3, 40.0, 1), scored(1, 0.4, 20.0, 2))
    listed = (dataclasses.replace(_candidate(1, [5]), confidence=0.4, rank=0),
              dataclasses.replace(_candidate(3, [40]), class_index=2, confidence=0.3, rank=1),
              dataclasses.replace(_candidate(2, [20]), class_index=1, confidence=0.4, rank=2))
    answer = session_lib.PhotoAnswer("p.jpg", "p", np.zeros((8, 8, 3), np.uint8), verified[0],
                                     listed, 100, 0.1, verified=verified)
    (finished,), maxima = _session(rerank_top=3).finish([answer])
    assert maxima[0] == 40.0
    assert finished.row.label == 3 and finished.scored is verified[1]
    assert finished.row.final_score == pytest.approx(0.85 + 0.15 * 0.3)
    assert [c.landmark_id for c in finished.candidates] == [3, 2, 1]
    decisive = [c.decisive for c in finished.candidates]
    assert decisive == sorted(decisive, reverse=True) and decisive[0] == finished.row.final_score
    text = query.format_answer(finished).splitlines()
    assert text[0] == "p.jpg: landmark 3 (score 0.895)"
    assert [line.split()[1] for line in text[2:]] == ["3", "2", "1"]
    assert render.caption_lines(finished)[1].startswith("answer: landmark 3: score 0.895")

    # The recipe: only the vote's class is verified and answers.
    recipe = dataclasses.replace(answer, verified=(verified[0]._replace(candidate=None),),
                                 candidates=tuple(
            dataclasses.replace(c, eligible=c.rank == 0) for c in listed))
    (finished,), _ = _session(rerank_top=1).finish([recipe])
    assert finished.row.label == 1 and [c.landmark_id for c in finished.candidates] == [1, 3, 2]
    assert [c.decisive for c in finished.candidates][1:] == [None, None]
    text = query.format_answer(finished).splitlines()
    assert [line.split()[2] for line in text[2:5]] == [f"{finished.row.final_score:.3f}", "-", "-"]
    assert text[5:] == ["  landmark 3 has more inliers than the answer but was not verified "
                        "for it: --rerank_top 2 would",
                        "  landmark 2 has more inliers than the answer but was not verified "
                        "for it: --rerank_top 3 would"]
