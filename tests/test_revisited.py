"""The revisited Oxford and Paris protocol (rescoring.revisited) and landmarks-revisited.

- mAP and mP@k on rankings worked out by hand, per setup, and against an independent loop-based
  implementation of the official AP (trapezoids, junk removed) on random rankings;
- the ground truth: ``.pkl`` through the restricted unpickler (a malicious pickle runs nothing
  and is refused by name), the MATLAB ``.mat``, malformed files;
- the whole command on a tiny dataset in the official layout, with a stand-in embedding model
  (1x1 identity conv + global average pooling + L2 normalisation, 32 px) whose rankings are
  known: each image is one colour, so its embedding is the direction of its colour.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from beam_pipelines import revisited as command
from rescoring import revisited as protocol
from rescoring.revisited import QueryTruth
from tfrecords_schema import InputError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _truth(easy=(), hard=(), junk=(), bbx=(0, 0, 1, 1)) -> QueryTruth:
    as_array = lambda values: np.array(values, np.int64)  # noqa: E731
    return QueryTruth(as_array(easy), as_array(hard), as_array(junk), tuple(map(float, bbx)))


# ---------------------------------------------------------------------------------------------
# AP and mP@k worked out by hand.

# Query A ranks the database 0, 1, ..., 5; easy {0, 3}, hard {2, 5}, junk {1}.
# Query B ranks it 5, 4, ..., 0; easy {3}, no hard, junk {5}.
QUERY_A = _truth(easy=[0, 3], hard=[2, 5], junk=[1])
QUERY_B = _truth(easy=[3], hard=[], junk=[5])
RANKS_AB = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
# Easy, A: positives at 0 and 3; junk 1 (junk) and 2 (hard) removed -> ranks 0, 1 -> AP 1.
#   B: 3 at position 2, junk 5 before it -> rank 1: one trapezoid (0 + 1/2) / 2 = 0.25.
# Medium, A: 0, 2, 3, 5 with junk 1 removed -> ranks 0, 1, 2, 4: 1 + 1 + 1 + (3/4 + 4/5) / 2,
#   over 4 = 0.94375. B as in Easy (no hard image): 0.25.
# Hard, A: 2 and 5 with 0, 1, 3 removed -> ranks 0, 2: (1 + (1/2 + 2/3) / 2) / 2 = 19/24.
#   B has no hard image: left out of the mean.
EXPECTED_MAP = {"easy": (1 + 0.25) / 2, "medium": (0.94375 + 0.25) / 2, "hard": 19 / 24}
# P@k at kq = min(k, 1-based rank of the last positive): Easy A {1, 2} -> 1, 1, 1; B {2} -> 0,
# 1/2, 1/2. Medium A {1, 2, 3, 5} -> 1, 4/5, 4/5. Hard A {1, 3} -> 1, 2/3, 2/3.
EXPECTED_MP = {"easy": (0.5, 0.75, 0.75), "medium": (0.5, 0.65, 0.65),
               "hard": (1.0, 2 / 3, 2 / 3)}


def test_map_and_mp_at_k_worked_out_by_hand():
    results = protocol.evaluate(RANKS_AB, [QUERY_A, QUERY_B])
    for setup in protocol.SETUPS:
        assert results[setup].mean_ap == pytest.approx(EXPECTED_MAP[setup]), setup
        assert results[setup].mean_precision == pytest.approx(EXPECTED_MP[setup]), setup
    assert results["hard"].num_evaluated == 1 and np.isnan(results["hard"].aps[1])
    assert results["medium"].aps == pytest.approx([0.94375, 0.25])


def test_junk_between_positives_is_ignored():
    # Positives at positions 0, 2, 4 with junk at 1 and 3: as if ranked 0, 1, 2 -> AP 1.
    ranking = np.array([0, 1, 2, 3, 4])
    found = protocol.positive_ranks(ranking, np.array([0, 2, 4]), np.array([1, 3]))
    assert found.tolist() == [0, 1, 2]
    assert protocol.average_precision(found, 3) == 1.0
    # The same ranking with 1 and 3 as negatives: (1 + 1 + (1/2 + 2/3)/2 + (2/4 + 3/5)/2) / 3.
    found = protocol.positive_ranks(ranking, np.array([0, 2, 4]), np.array([], np.int64))
    assert protocol.average_precision(found, 3) == pytest.approx(
        (1 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2) / 3)


def test_ap_uses_the_trapezoidal_interpolation():
    assert protocol.average_precision(np.array([1]), 1) == 0.25  # (0 + 1/2) / 2, not 1/2
    assert protocol.average_precision(np.array([0]), 2) == 0.5  # half the positives, at the top
    assert protocol.average_precision(np.array([3]), 1) == pytest.approx((0 + 1 / 4) / 2)


def test_precision_at_k_stops_at_the_last_positive():
    # Two positives on top: P@5 and P@10 are 1 in the official definition, not 2/5 and 2/10.
    assert protocol.precision_at(np.array([0, 1]), (1, 5, 10)).tolist() == [1.0, 1.0, 1.0]
    assert protocol.precision_at(np.array([2, 11]), (1, 5, 10)).tolist() == [0.0, 0.2, 0.1]


def test_setup_rules():
    truth = _truth(easy=[1], hard=[2], junk=[3])
    labels = {setup: tuple(sorted(a.tolist()) for a in protocol.setup_labels(truth, setup))
              for setup in protocol.SETUPS}
    assert labels == {"easy": ([1], [2, 3]), "medium": ([1, 2], [3]), "hard": ([2], [1, 3])}


def test_a_setup_without_any_positive_is_none():
    result = protocol.evaluate_setup(RANKS_AB[:1], [_truth(easy=[1])], "hard")
    assert result.mean_ap is None and result.mean_precision is None and result.num_evaluated == 0


def test_ranking_is_by_similarity_ties_by_database_order():
    similarity = np.array([[0.1, 0.9, 0.5, 0.9]])
    assert protocol.rank_database(similarity).tolist() == [[1, 3, 2, 0]]
    queries = np.array([[2.0, 0.0]])  # not normalised: cosine all the same
    database = np.array([[1.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    assert protocol.similarities(queries, database) == pytest.approx(
        np.array([[np.sqrt(0.5), 1.0, 0.0]]))


# ---------------------------------------------------------------------------------------------
# Against an independent implementation, on random rankings.


def _reference_query(ranking, positives, junk, kappas):
    """Walks the ranking: junk skipped, a trapezoid per positive, precision at the ranks."""
    positives, junk = set(positives), set(junk)
    rank, found, ap, hit_ranks = 0, 0, 0.0, []
    for image in ranking:
        if image in junk:
            continue
        if image in positives:
            before = 1.0 if rank == 0 else found / rank
            found += 1
            after = found / (rank + 1)
            ap += (before + after) / 2 / len(positives)
            hit_ranks.append(rank + 1)
        rank += 1
    precisions = []
    for k in kappas:
        cut = min(k, hit_ranks[-1])
        precisions.append(sum(1 for hit in hit_ranks if hit <= cut) / cut)
    return ap, precisions


def _reference_map(ranks, gnd, setup, kappas):
    rules = {"easy": (["easy"], ["junk", "hard"]), "medium": (["easy", "hard"], ["junk"]),
             "hard": (["hard"], ["junk", "easy"])}
    aps, precisions = [], []
    for ranking, truth in zip(ranks, gnd):
        positives = [i for label in rules[setup][0] for i in getattr(truth, label).tolist()]
        junk = [i for label in rules[setup][1] for i in getattr(truth, label).tolist()]
        if not positives:
            continue
        ap, precision = _reference_query(ranking.tolist(), positives, junk, kappas)
        aps.append(ap)
        precisions.append(precision)
    if not aps:
        return None, None
    return float(np.mean(aps)), np.mean(precisions, axis=0)


@pytest.mark.parametrize("seed", range(12))
def test_matches_an_independent_implementation_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(8, 120))
    num_queries = int(rng.integers(1, 8))
    gnd = []
    for _ in range(num_queries):
        labels = rng.choice(4, size=size, p=rng.dirichlet(np.ones(4)))  # 3 = negative
        gnd.append(_truth(easy=np.flatnonzero(labels == 0), hard=np.flatnonzero(labels == 1),
                          junk=np.flatnonzero(labels == 2)))
    ranks = np.stack([rng.permutation(size) for _ in range(num_queries)])
    kappas = (1, 5, 10)
    for setup in protocol.SETUPS:
        result = protocol.evaluate_setup(ranks, gnd, setup, kappas)
        expected_map, expected_mp = _reference_map(ranks, gnd, setup, kappas)
        if expected_map is None:
            assert result.mean_ap is None
            continue
        assert result.mean_ap == pytest.approx(expected_map, abs=1e-12), setup
        assert result.mean_precision == pytest.approx(expected_mp, abs=1e-12), setup


# ---------------------------------------------------------------------------------------------
# Reading the ground truth.

GND_PLAIN = {
    "imlist": ["db_0", "db_1", "db_2"],
    "qimlist": ["q_0", "q_1"],
    "gnd": [{"bbx": [1.5, 2.0, 30.0, 40.0], "easy": [0, 2], "hard": [], "junk": [1]},
            {"bbx": np.array([0.0, 0.0, 10.0, 10.0]), "easy": np.array([1]),
             "hard": np.array([0], np.int64), "junk": np.array([], np.int64)}],
}


def _check_plain(gt):
    assert gt.imlist == ("db_0", "db_1", "db_2") and gt.qimlist == ("q_0", "q_1")
    assert gt.gnd[0].easy.tolist() == [0, 2] and gt.gnd[0].junk.tolist() == [1]
    assert gt.gnd[0].hard.size == 0 and gt.gnd[0].bbx == (1.5, 2.0, 30.0, 40.0)
    assert gt.gnd[1].hard.tolist() == [0] and gt.gnd[1].bbx == (0.0, 0.0, 10.0, 10.0)


@pytest.mark.parametrize("protocol_number", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickle_of_plain_containers_and_numpy_arrays_loads(protocol_number):
    _check_plain(protocol.parse_ground_truth(pickle.dumps(GND_PLAIN, protocol=protocol_number),
                                             "gnd_roxford5k.pkl"))


def test_a_pickle_written_by_numpy_1_loads():
    data = pickle.dumps(GND_PLAIN, protocol=2)
    assert b"numpy._core.multiarray" in data
    _check_plain(protocol.parse_ground_truth(
        data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"), "gnd.pkl"))


class Payload:
    """Runs a shell command when unpickled by a trusting loader."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.target}",)


class Custom:
    """A harmless class of our own: still not plain data, so refused."""


def test_a_malicious_pickle_runs_nothing_and_is_refused_by_name(tmp_path):
    target = tmp_path / "pwned"
    data = pickle.dumps({"imlist": ["a"], "qimlist": [Payload(target)], "gnd": []})
    with pytest.raises(InputError) as caught:
        protocol.parse_ground_truth(data, "gnd_roxford5k.pkl")
    message = str(caught.value)
    assert f"references {os.system.__module__}.system;" in message
    assert message.startswith("ground truth gnd_roxford5k.pkl: refused to load")
    assert "\n" not in message
    assert not target.exists()
    # A trusting loader would have run it: the payload is real.
    pickle.loads(data)
    assert target.read_text().strip() == "pwned"


@pytest.mark.parametrize("payload, pickle_protocol, refused", [
    (Custom(), 4, f"{__name__}.Custom"),
    ({1, 2}, 2, "__builtin__.set"),  # protocols 0-2 build a set by calling set
    (eval, 4, "builtins.eval"),
    (pathlib.Path("/etc"), 4, "pathlib.PosixPath"),
])
def test_anything_but_plain_data_is_refused(payload, pickle_protocol, refused):
    data = pickle.dumps({"imlist": payload}, protocol=pickle_protocol)
    with pytest.raises(InputError, match="refused to load") as caught:
        protocol.load_pickle_safely(data, "gnd.pkl")
    assert f"references {refused};" in str(caught.value)


def test_the_bytes_stand_ins_make_only_bytes():
    # Protocol 2 writes bytes as _codecs.encode(text, "latin1"); any other use is refused.
    data = pickle.dumps({"imlist": b"\x00\xff"}, protocol=2)
    assert protocol.load_pickle_safely(data, "gnd.pkl") == {"imlist": b"\x00\xff"}
    forged = data.replace(b"latin1", b"cp1252")
    assert forged != data
    with pytest.raises(InputError, match="not a readable pickle .*admitted only"):
        protocol.load_pickle_safely(forged, "gnd.pkl")


def test_garbage_is_an_input_error():
    with pytest.raises(InputError, match="gnd.pkl: not a readable pickle"):
        protocol.parse_ground_truth(b"not a pickle at all", "gnd.pkl")


@pytest.mark.parametrize("edit, message", [
    (lambda g: g.pop("gnd"), "lacks gnd"),
    (lambda g: g["gnd"].pop(), "gnd has 1 entries for 2 queries"),
    (lambda g: g["gnd"][0].pop("junk"), "gnd[0] lacks 'junk'"),
    (lambda g: g["gnd"][0].update(easy=[0, 3]), "gnd[0]['easy'] holds index 3, outside the 3"),
    (lambda g: g["gnd"][0].update(hard=[-1]), "gnd[0]['hard'] holds index -1"),
    (lambda g: g["gnd"][1].update(junk=[0.5]), "gnd[1]['junk'] holds a non-integer index"),
    (lambda g: g["gnd"][1].update(bbx=[1, 2, 3]), "gnd[1]['bbx'] is not 4 finite numbers"),
    (lambda g: g["gnd"][1].update(bbx=[5, 0, 5, 9]), "is empty"),
    (lambda g: g.update(imlist="db_0"), "imlist is a str, not a list of image names"),
    (lambda g: g.update(qimlist=[]), "qimlist is empty"),
])
def test_a_malformed_ground_truth_is_an_input_error(edit, message):
    gnd = pickle.loads(pickle.dumps(GND_PLAIN))
    edit(gnd)
    with pytest.raises(InputError) as caught:
        protocol.parse_ground_truth(pickle.dumps(gnd), "gnd_x.pkl")
    assert message in str(caught.value) and str(caught.value).startswith("ground truth gnd_x.pkl")


def _mat_bytes(gnd_plain=GND_PLAIN) -> bytes:
    """The MATLAB form: cell arrays of names, a 1 x Q struct array, 1-based indices."""
    from scipy import io as scipy_io

    def cells(names):
        array = np.empty((len(names), 1), dtype=object)
        for i, name in enumerate(names):
            array[i, 0] = name
        return array

    queries = gnd_plain["gnd"]
    gnd = np.empty((1, len(queries)), dtype=[(key, "O") for key in protocol.GND_KEYS])
    for i, entry in enumerate(queries):
        gnd[0, i] = tuple(
            np.array([np.asarray(entry[key], np.float64) + (0 if key == "bbx" else 1)])
            for key in protocol.GND_KEYS)
    buffer = io.BytesIO()
    scipy_io.savemat(buffer, {"imlist": cells(gnd_plain["imlist"]),
                              "qimlist": cells(gnd_plain["qimlist"]), "gnd": gnd})
    return buffer.getvalue()


def test_the_matlab_ground_truth_loads_with_0_based_indices():
    _check_plain(protocol.parse_ground_truth(_mat_bytes(), "gnd_roxford5k.mat"))
    with pytest.raises(InputError, match="gnd_x.mat: not a readable MAT file"):
        protocol.parse_ground_truth(b"MATLAB garbage", "gnd_x.mat")


def test_the_project_writes_no_pickle():
    offenders = []
    for folder in ("beam_pipelines", "trainer", "rescoring", "tfrecords_schema"):
        for path in (REPO / folder).rglob("*.py"):
            if re.search(r"\bpickle\.(dump|dumps|Pickler)\b", path.read_text()):
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders


# ---------------------------------------------------------------------------------------------
# Query crops and the layout.


def test_query_box_is_rounded_like_pillow_and_clipped():
    assert protocol.crop_box([8.4, 7.6, 40.2, 32.5], 64, 48) == (8, 8, 40, 32)
    assert protocol.crop_box([-3, -1, 70, 50], 64, 48) == (0, 0, 64, 48)
    image = np.arange(48 * 64 * 3).reshape(48, 64, 3)
    assert protocol.crop_query(image, [8.4, 7.6, 40.2, 32.5]).shape == (24, 32, 3)
    pil = Image.fromarray((image % 251).astype(np.uint8)).crop((8.4, 7.6, 40.2, 32.5))
    assert np.array_equal(np.asarray(pil), protocol.crop_query(image % 251, [8.4, 7.6, 40.2, 32.5]))
    with pytest.raises(InputError, match="outside the 64x48 image"):
        protocol.crop_box([70, 0, 80, 10], 64, 48)


def test_image_names_get_the_jpg_extension_once():
    assert protocol.image_filename("all_souls_000013") == "all_souls_000013.jpg"
    assert protocol.image_filename("paris_defense_000605.jpg") == "paris_defense_000605.jpg"
    assert protocol.ground_truth_names("rparis6k") == ("gnd_rparis6k.pkl", "gnd_rparis6k.mat")


# ---------------------------------------------------------------------------------------------
# landmarks-revisited on a tiny dataset in the official layout.

SIZE = 32
# Database image i is one colour (255, G[i], 0): its cosine with red falls as G grows, its cosine
# with yellow rises. Query A is a red box on blue, query B a yellow box on blue: only the crops
# rank the database as RANKS_AB says (the whole images would rank it otherwise).
GREENS = (0, 50, 100, 150, 200, 250)
BLUE, RED, YELLOW = (0, 0, 255), (255, 0, 0), (255, 255, 0)
QUERY_BOX = [8.4, 7.6, 40.2, 32.5]  # pixels (8, 8) to (40, 32) after rounding


def _jpeg(path, pixels):
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, quality=95, subsampling=0)


def _query_image(colour):
    pixels = np.empty((48, 64, 3), np.uint8)
    pixels[:] = BLUE
    pixels[8:32, 8:40] = colour
    return pixels


def write_dataset(root, dataset="roxford5k", gnd_format="pkl", gnd_override=None):
    folder = root / dataset
    (folder / "jpg").mkdir(parents=True)
    imlist = [f"{dataset}_db_{i:03d}" for i in range(len(GREENS))]
    for name, green in zip(imlist, GREENS):
        _jpeg(folder / "jpg" / f"{name}.jpg", np.full((30, 40, 3), (255, green, 0), np.uint8))
    qimlist = [f"{dataset}_query_a", f"{dataset}_query_b"]
    _jpeg(folder / "jpg" / f"{qimlist[0]}.jpg", _query_image(RED))
    _jpeg(folder / "jpg" / f"{qimlist[1]}.jpg", _query_image(YELLOW))
    gnd = {"imlist": imlist, "qimlist": qimlist, "gnd": [
        {"bbx": list(QUERY_BOX), "easy": QUERY_A.easy.tolist(), "hard": QUERY_A.hard.tolist(),
         "junk": QUERY_A.junk.tolist()},
        {"bbx": np.array(QUERY_BOX), "easy": QUERY_B.easy, "hard": QUERY_B.hard,
         "junk": QUERY_B.junk},
    ]}
    if gnd_override is not None:
        gnd = gnd_override
    if gnd_format == "pkl":
        (folder / f"gnd_{dataset}.pkl").write_bytes(pickle.dumps(gnd))
    else:
        (folder / f"gnd_{dataset}.mat").write_bytes(_mat_bytes(gnd))
    return folder


def save_standin_embedding(path, size=SIZE):
    """1x1 identity conv + global average pooling + L2 normalisation: an image's embedding is
    the direction of its mean colour in [-1, 1]."""
    import keras

    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(3, 1, use_bias=False, name="colour")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    model = keras.Model(inputs, keras.layers.UnitNormalization(axis=-1)(x))
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    save_standin_embedding(folder / "embedding.keras")
    return folder


@pytest.fixture
def data_root(tmp_path):
    write_dataset(tmp_path / "datasets")
    return tmp_path / "datasets"


def _argv(model_dir, data_root, output_dir, *extra, dataset="roxford5k"):
    return ["--model_dir", str(model_dir), "--data_root", str(data_root), "--dataset", dataset,
            "--output_dir", str(output_dir), *extra]


def test_the_command_reports_the_expected_figures(model_dir, data_root, tmp_path, capsys):
    output = tmp_path / "eval"
    assert command.main(_argv(model_dir, data_root, output, "--batch_size", "4")) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["map"] == pytest.approx(EXPECTED_MAP)
    for setup in protocol.SETUPS:
        assert [report["mp_at_k"][setup][k] for k in ("1", "5", "10")] == pytest.approx(
            EXPECTED_MP[setup])
    assert report["per_query"][0] == {"query": "roxford5k_query_a", "ap": pytest.approx(
        {"easy": 1.0, "medium": 0.94375, "hard": 19 / 24})}
    assert report["per_query"][1]["ap"]["hard"] is None
    assert report["counts"] == {"database_images": 6, "queries": 2, "embedding_dim": 3,
                                "evaluated_queries": {"easy": 2, "medium": 2, "hard": 1}}
    assert report["config"]["image_size"] == SIZE and report["config"]["batch_size"] == 4
    assert report["config"]["embedding_path"] == str(model_dir / "embedding.keras")
    table = capsys.readouterr().out
    assert re.search(r"mAP\s+62\.50\s+59\.69\s+79\.17", table), table
    assert re.search(r"mP@5\s+75\.00\s+65\.00\s+66\.67", table), table


def test_the_crops_decide_the_ranking(model_dir, data_root, tmp_path, monkeypatch):
    # Whole query images (mostly blue) would rank the database otherwise: the crop is applied.
    monkeypatch.setattr(protocol, "crop_query", lambda image, bbx: image)
    report = command.run(_argv(model_dir, data_root, tmp_path / "eval"))
    assert report["map"] != pytest.approx(EXPECTED_MAP)


def test_embedding_path_and_matlab_ground_truth(model_dir, tmp_path):
    root = tmp_path / "datasets"
    gnd = {"imlist": [f"rparis6k_db_{i:03d}" for i in range(6)],
           "qimlist": ["rparis6k_query_a", "rparis6k_query_b"],
           "gnd": [{"bbx": QUERY_BOX, "easy": QUERY_A.easy, "hard": QUERY_A.hard,
                    "junk": QUERY_A.junk},
                   {"bbx": QUERY_BOX, "easy": QUERY_B.easy, "hard": QUERY_B.hard,
                    "junk": QUERY_B.junk}]}
    write_dataset(root, "rparis6k", gnd_format="mat", gnd_override=gnd)
    report = command.run(["--embedding", str(model_dir / "embedding.keras"), "--data_root",
                          str(root), "--dataset", "rparis6k", "--output_dir",
                          str(tmp_path / "eval"), "--image_size", str(SIZE)])
    assert report["map"] == pytest.approx(EXPECTED_MAP)


def test_a_model_of_any_input_size_needs_image_size(data_root, tmp_path, capsys):
    save_standin_embedding(tmp_path / "any_size.keras", size=None)
    argv = ["--embedding", str(tmp_path / "any_size.keras"), "--data_root", str(data_root),
            "--dataset", "roxford5k", "--output_dir", str(tmp_path / "eval")]
    assert command.main(argv) == 2
    assert "takes any input size: pass --image_size" in _error(capsys)
    assert command.main(argv + ["--image_size", "16"]) == 2
    assert "--image_size must be >= 32" in _error(capsys)
    report = command.run(argv + ["--image_size", "40"])
    assert report["config"]["image_size"] == 40
    assert report["map"] == pytest.approx(EXPECTED_MAP)


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in lines if line.startswith("landmarks-revisited: ")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("landmarks-revisited: error: "), lines[0]
    return lines[0]


def test_missing_images_are_an_input_error(model_dir, data_root, tmp_path, capsys):
    (data_root / "roxford5k" / "jpg" / "roxford5k_db_002.jpg").unlink()
    (data_root / "roxford5k" / "jpg" / "roxford5k_query_b.jpg").unlink()
    assert command.main(_argv(model_dir, data_root, tmp_path / "eval")) == 2
    assert "2 of the 8 images of roxford5k are missing from" in _error(capsys)
    assert not (tmp_path / "eval").exists()


def test_an_unreadable_image_is_an_input_error(model_dir, data_root, tmp_path, capsys):
    (data_root / "roxford5k" / "jpg" / "roxford5k_db_004.jpg").write_bytes(b"not a jpeg")
    assert command.main(_argv(model_dir, data_root, tmp_path / "eval")) == 2
    assert "roxford5k_db_004.jpg: undecodable image" in _error(capsys)


def test_a_malicious_ground_truth_stops_the_command(model_dir, tmp_path, capsys):
    target = tmp_path / "pwned"
    write_dataset(tmp_path / "datasets", gnd_override={"imlist": Payload(target)})
    assert command.main(_argv(model_dir, tmp_path / "datasets", tmp_path / "eval")) == 2
    assert "refused to load: the pickle references" in _error(capsys)
    assert not target.exists()


def test_a_malformed_ground_truth_stops_the_command(model_dir, tmp_path, capsys):
    write_dataset(tmp_path / "datasets", gnd_override={"imlist": ["a"], "qimlist": ["b"],
                                                       "gnd": [{"easy": [0]}]})
    assert command.main(_argv(model_dir, tmp_path / "datasets", tmp_path / "eval")) == 2
    assert "gnd[0] lacks 'hard', 'junk', 'bbx'" in _error(capsys)


def test_other_input_errors(model_dir, data_root, tmp_path, capsys):
    assert command.main(_argv(model_dir, tmp_path / "nowhere", tmp_path / "eval")) == 2
    message = _error(capsys)
    assert "no ground truth" in message and "data/datasets" in message
    assert command.main(_argv(tmp_path / "empty_model", data_root, tmp_path / "eval")) == 2
    assert "embedding model not found" in _error(capsys)
    assert command.main(_argv(model_dir, data_root, tmp_path / "eval", "--image_size", "64")) == 2
    assert "--image_size 64 differs from the model's input size 32" in _error(capsys)
    assert command.main(_argv(model_dir, data_root, tmp_path / "eval", "--dataset",
                              "oxford5k")) == 2
    assert "invalid choice: 'oxford5k'" in _error(capsys)
    argv = _argv(model_dir, data_root, tmp_path / "eval")
    assert command.main(argv + ["--embedding", "x.keras"]) == 2
    assert "not allowed with argument --model_dir" in _error(capsys)
    assert command.main(argv[2:]) == 2
    assert "give exactly one of --model_dir" in _error(capsys)
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    assert command.main(["--embedding", str(tmp_path / "bad.keras"), *argv[2:]]) == 2
    assert "cannot load model" in _error(capsys)
    assert not (tmp_path / "eval").exists()
