"""The revisited Oxford and Paris retrieval benchmarks (ROxford5k, RParis6k).

Radenovic, Iscen, Tolias, Avrithis, Chum: "Revisiting Oxford and Paris: Large-Scale Image
Retrieval Benchmarking", CVPR 2018. This module is the protocol, written from the description of
the official evaluation (the ``revisitop`` package: ``compute_map``, ``compute_ap``, its example
scripts); no code of it is copied. Pure functions on numpy arrays and bytes: no file I/O (the
``landmarks-revisited`` command, :mod:`beam_pipelines.revisited`, reads the files).

**Dataset layout** (as the official download script writes it)::

    <root>/<dataset>/gnd_<dataset>.pkl      ground truth (or gnd_<dataset>.mat, the older form)
    <root>/<dataset>/jpg/<name>.jpg         every database and query image

The ground truth holds ``imlist`` (the N database image names), ``qimlist`` (the query image
names) and ``gnd``, one entry per query: ``easy``, ``hard``, ``junk`` (0-based indices into
``imlist``; 1-based in the ``.mat``) and ``bbx`` = ``[x1, y1, x2, y2]``, the query's region in
pixels of its original image. A query is the **crop** of its image to ``bbx``; the whole image is
never used as the query.

**Setups.** Each query's database images are labelled easy, hard, junk or (unlisted) negative.
The three setups differ in which labels count as positive and which are ignored:

========  ======================  =====================
setup     positives               junk (ignored)
========  ======================  =====================
Easy      easy                    junk + hard
Medium    easy + hard             junk
Hard      hard                    junk + easy
========  ======================  =====================

**AP**, per query and setup: the database is ranked by similarity to the query, junk images are
taken out of the ranking (each positive moves up by the number of junk images ranked before it),
and AP is the area under the precision-recall curve by the trapezoidal rule over recall steps of
``1 / P`` (P = the number of positives): the j-th positive (0-based) at rank r (0-based, junk
removed) adds ``(p0 + p1) / (2 P)`` with ``p1 = (j + 1) / (r + 1)`` (precision just after it) and
``p0 = j / r`` (just before it; 1 when r = 0). So a single positive at rank 1 gives
``(0 + 1/2) / 2 = 0.25``, not 1/2 as non-interpolated AP would. A query without positives in a
setup (e.g. no hard image) is left out of that setup's mean (its AP is NaN).

**mP@k**: the official precision at k of one query is measured at ``kq = min(k, rank of its last
positive)`` (1-based, junk removed): ``#positives within kq / kq``. A query whose positives all
sit above rank k is thus not punished for having fewer than k positives. Means as for mAP.

Ties in similarity are broken by database index (a stable sort); the official script's
``argsort`` leaves them to numpy's default sort.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tfrecords_schema import InputError

DATASETS = ("roxford5k", "rparis6k")
SETUPS = ("easy", "medium", "hard")
SETUP_LETTERS = {"easy": "E", "medium": "M", "hard": "H"}
DEFAULT_KAPPAS = (1, 5, 10)
IMAGE_FOLDER = "jpg"
IMAGE_EXTENSION = ".jpg"
GND_KEYS = ("easy", "hard", "junk", "bbx")

# Which labels are positives and which are junk in each setup.
SETUP_RULES = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


# ----------------------------------------------------------------------------- layout

def ground_truth_names(dataset: str) -> tuple[str, str]:
    """``(gnd_<dataset>.pkl, gnd_<dataset>.mat)``: the two forms of the ground truth file."""
    return f"gnd_{dataset}.pkl", f"gnd_{dataset}.mat"


def image_filename(name: str) -> str:
    """The file name of an image listed in ``imlist``/``qimlist``: ``name + ".jpg"``.

    Names in the official files carry no extension; one that already has one (the MATLAB tools
    accept that) is kept as it is.
    """
    if name.lower().endswith((".jpg", ".jpeg")):
        return name
    return name + IMAGE_EXTENSION


# ----------------------------------------------------------------------------- ground truth

@dataclasses.dataclass(frozen=True)
class QueryTruth:
    """One query's labels (0-based indices into ``imlist``) and its region."""

    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray
    bbx: tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """A revisited benchmark's ground truth: database names, query names, per-query truth."""

    imlist: tuple[str, ...]
    qimlist: tuple[str, ...]
    gnd: tuple[QueryTruth, ...]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for ``_codecs.encode``, which pickle protocols 0-2 name to write ``bytes`` (a
    numpy array's raw data among them) as ``_codecs.encode(text, "latin1")``; nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only as the bytes of protocols "
                                     "0-2: encode(str, 'latin1')")
    return text.encode("latin1")


def _empty_bytes(*args) -> bytes:
    """Stands in for ``bytes``, which protocols 0-2 name to write ``b""``; nothing else."""
    if args:
        raise pickle.UnpicklingError("bytes is admitted only as bytes() = b''")
    return b""


# The only globals a ground-truth pickle may name: what numpy needs to rebuild an array, a dtype
# and a scalar (module paths of numpy 1.x and 2.x), and the two names protocols 0-2 use for
# bytes, each replaced by a function of ours that can only make bytes. Lists, dicts, tuples,
# strings and numbers need no global at all.
def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_bytes,
               ("builtins", "bytes"): _empty_bytes, ("__builtin__", "bytes"): _empty_bytes}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


ALLOWED_PICKLE_GLOBALS = _allowed_globals()
"""``(module, name) -> object``: every global :class:`RestrictedUnpickler` resolves."""


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside :data:`ALLOWED_PICKLE_GLOBALS`."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only plain containers, numbers, strings and numpy arrays.

    :meth:`find_class` is where a pickle gets hold of any callable (``os.system``, a class whose
    construction runs code, ...); here it resolves only the few numpy functions and types that
    rebuild an ``ndarray`` (:data:`ALLOWED_PICKLE_GLOBALS`) from a fixed table, never by importing
    the name the stream gives, and refuses everything else before anything is called. Persistent
    ids are refused by ``pickle.Unpickler`` itself.
    """

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None


def load_pickle_safely(data: bytes, source: str) -> Any:
    """Unpickles ``data`` with :class:`RestrictedUnpickler`.

    Raises:
      InputError: the pickle names a global that is not a numpy array part (the message names
        it), or the bytes are not a readable pickle.
    """
    try:
        # latin1: a pickle written by Python 2 (numpy's raw data in 8-bit strings) reads as
        # numpy expects; Python 3 pickles are unaffected.
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except RefusedGlobal as error:
        raise InputError(
            f"ground truth {source}: refused to load: the pickle references "
            f"{error.qualified_name}; only plain lists, dicts, numbers, strings and numpy arrays "
            f"are accepted") from None
    except Exception as error:  # noqa: BLE001 - any failure to parse untrusted bytes is input
        raise InputError(f"ground truth {source}: not a readable pickle "
                         f"({type(error).__name__}: {error})") from None


def _names(value, what: str, source: str) -> tuple[str, ...]:
    if isinstance(value, np.ndarray):
        value = value.ravel().tolist()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InputError(f"ground truth {source}: {what} is a {type(value).__name__}, "
                         f"not a list of image names")
    names = []
    for item in value:
        if isinstance(item, np.ndarray) and item.dtype.kind in "US":  # a MATLAB char array
            item = "".join(str(part) for part in item.ravel())
        if isinstance(item, bytes):
            item = item.decode("utf-8", "replace")
        if not isinstance(item, str) or not item:
            raise InputError(f"ground truth {source}: {what} holds {item!r}, not an image name")
        names.append(str(item))
    if not names:
        raise InputError(f"ground truth {source}: {what} is empty")
    return tuple(names)


def _indices(value, where: str, source: str, num_images: int, offset: int) -> np.ndarray:
    try:
        array = np.asarray(value if value is not None else [], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InputError(f"ground truth {source}: {where} holds non-numbers") from None
    if array.size and (not np.all(np.isfinite(array)) or np.any(array != np.round(array))):
        raise InputError(f"ground truth {source}: {where} holds a non-integer index")
    indices = array.astype(np.int64) - offset
    bad = indices[(indices < 0) | (indices >= num_images)]
    if bad.size:
        raise InputError(f"ground truth {source}: {where} holds index {int(bad[0]) + offset}, "
                         f"outside the {num_images} database images")
    return indices


def _box(value, where: str, source: str) -> tuple[float, float, float, float]:
    try:
        box = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InputError(f"ground truth {source}: {where} is not 4 numbers") from None
    if box.shape != (4,) or not np.all(np.isfinite(box)):
        raise InputError(f"ground truth {source}: {where} is not 4 finite numbers "
                         f"[x1, y1, x2, y2]: {value!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"ground truth {source}: {where} = {[x1, y1, x2, y2]} is empty "
                         f"(x2 <= x1 or y2 <= y1)")
    return x1, y1, x2, y2


def build_ground_truth(imlist, qimlist, gnd: Sequence[Mapping], source: str,
                       index_offset: int = 0) -> GroundTruth:
    """Checks and converts the three parts of a ground truth file.

    Args:
      gnd: one mapping per query with ``easy``, ``hard``, ``junk`` and ``bbx``.
      index_offset: 0 for the ``.pkl`` (0-based indices), 1 for the ``.mat`` (MATLAB's).

    Raises:
      InputError: a part is missing or malformed (one line naming the part).
    """
    database = _names(imlist, "imlist", source)
    queries = _names(qimlist, "qimlist", source)
    if isinstance(gnd, np.ndarray):
        gnd = gnd.ravel().tolist()
    if not isinstance(gnd, (list, tuple)):
        raise InputError(f"ground truth {source}: gnd is a {type(gnd).__name__}, not a list")
    if len(gnd) != len(queries):
        raise InputError(f"ground truth {source}: gnd has {len(gnd)} entries for "
                         f"{len(queries)} queries")
    truths = []
    for number, entry in enumerate(gnd):
        if not isinstance(entry, Mapping):
            raise InputError(f"ground truth {source}: gnd[{number}] is a "
                             f"{type(entry).__name__}, not a dict")
        missing = [key for key in GND_KEYS if key not in entry]
        if missing:
            raise InputError(f"ground truth {source}: gnd[{number}] lacks "
                             f"{', '.join(repr(key) for key in missing)}")
        truths.append(QueryTruth(
            **{key: _indices(entry[key], f"gnd[{number}][{key!r}]", source, len(database),
                             index_offset) for key in ("easy", "hard", "junk")},
            bbx=_box(entry["bbx"], f"gnd[{number}]['bbx']", source)))
    return GroundTruth(database, queries, tuple(truths))


def parse_ground_truth_pkl(data: bytes, source: str) -> GroundTruth:
    """``gnd_<dataset>.pkl`` bytes -> :class:`GroundTruth`, through :func:`load_pickle_safely`.

    Raises:
      InputError: a refused or unreadable pickle, or a malformed ground truth.
    """
    content = load_pickle_safely(data, source)
    if not isinstance(content, dict):
        raise InputError(f"ground truth {source}: holds a {type(content).__name__}, not a dict "
                         f"with imlist, qimlist and gnd")
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in content]
    if missing:
        raise InputError(f"ground truth {source}: lacks {', '.join(missing)}")
    return build_ground_truth(content["imlist"], content["qimlist"], content["gnd"], source)


def parse_ground_truth_mat(data: bytes, source: str) -> GroundTruth:
    """``gnd_<dataset>.mat`` (the MATLAB form: 1-based indices, a struct array ``gnd``) bytes ->
    :class:`GroundTruth`, through ``scipy.io.loadmat`` (which builds arrays only, runs no code).

    Raises:
      InputError: not a readable MAT file, or a malformed ground truth.
    """
    from scipy import io as scipy_io  # scikit-image's dependency; only this format needs it

    try:
        content = scipy_io.loadmat(io.BytesIO(data), squeeze_me=False, struct_as_record=True,
                                   chars_as_strings=True)
    except Exception as error:  # noqa: BLE001 - any failure to parse untrusted bytes is input
        raise InputError(f"ground truth {source}: not a readable MAT file "
                         f"({type(error).__name__}: {error})") from None
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in content]
    if missing:
        raise InputError(f"ground truth {source}: lacks {', '.join(missing)}")
    gnd = content["gnd"]
    if not isinstance(gnd, np.ndarray) or gnd.dtype.names is None:
        raise InputError(f"ground truth {source}: gnd is not a struct array")
    lacking = [key for key in GND_KEYS if key not in gnd.dtype.names]
    if lacking:
        raise InputError(f"ground truth {source}: gnd lacks {', '.join(lacking)}")
    entries = [{key: record[key] for key in GND_KEYS} for record in gnd.ravel()]

    def names(cells):
        # A cell array of char arrays: each cell a 1-element array holding one string.
        if not isinstance(cells, np.ndarray) or cells.dtype != object:
            return cells
        return [_matlab_string(cell) for cell in cells.ravel()]

    return build_ground_truth(names(content["imlist"]), names(content["qimlist"]), entries,
                              source, index_offset=1)


def _matlab_string(cell):
    if isinstance(cell, np.ndarray):
        parts = cell.ravel().tolist()
        return "".join(str(part) for part in parts) if parts else ""
    return cell


def parse_ground_truth(data: bytes, source: str) -> GroundTruth:
    """Ground truth bytes -> :class:`GroundTruth`, by the file's suffix (``.pkl`` or ``.mat``)."""
    if source.endswith(".mat"):
        return parse_ground_truth_mat(data, source)
    return parse_ground_truth_pkl(data, source)


# ----------------------------------------------------------------------------- queries

def crop_box(bbx: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The pixel box ``(left, top, right, bottom)`` (right/bottom exclusive) of a query region.

    Coordinates are rounded as Pillow's ``Image.crop`` rounds them (the official Python scripts
    crop with it), then clipped to the image: Pillow would pad a box reaching outside the image
    with black, which the official boxes never need.

    Raises:
      InputError: nothing of the box lies inside the image.
    """
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbx)
    left, top = max(x1, 0), max(y1, 0)
    right, bottom = min(x2, width), min(y2, height)
    if right <= left or bottom <= top:
        raise InputError(f"query box {list(bbx)} lies outside the {width}x{height} image")
    return left, top, right, bottom


def crop_query(image: np.ndarray, bbx: Sequence[float]) -> np.ndarray:
    """``image[H, W, C]`` cropped to the query region ``bbx`` (:func:`crop_box`)."""
    left, top, right, bottom = crop_box(bbx, image.shape[1], image.shape[0])
    return image[top:bottom, left:right]


# ----------------------------------------------------------------------------- ranking

def similarities(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Cosine similarities ``[Q, N]`` of query embeddings ``[Q, D]`` and database ``[N, D]``.

    The embeddings are L2-normalised again here (a no-op for ``embedding.keras``' outputs), so
    the dot product is the cosine whatever model produced them.
    """
    def normalise(x):
        x = np.asarray(x, dtype=np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, 1e-12)

    return normalise(queries) @ normalise(database).T


def rank_database(similarity: np.ndarray) -> np.ndarray:
    """``[Q, N]`` similarities -> ``[Q, N]`` database indices, most similar first.

    Stable: equal similarities keep database order. (The official script ranks with the
    transposed layout ``[N, Q]``; here each row is one query's ranking.)
    """
    return np.argsort(-np.asarray(similarity), axis=1, kind="stable")


# ----------------------------------------------------------------------------- metrics

def setup_labels(truth: QueryTruth, setup: str) -> tuple[np.ndarray, np.ndarray]:
    """``(positives, junk)`` index arrays of one query in ``setup`` (:data:`SETUP_RULES`)."""
    if setup not in SETUP_RULES:
        raise ValueError(f"unknown setup {setup!r}; one of {', '.join(SETUPS)}")
    positive_labels, junk_labels = SETUP_RULES[setup]
    positives = np.concatenate([getattr(truth, label) for label in positive_labels])
    junk = np.concatenate([getattr(truth, label) for label in junk_labels])
    return positives.astype(np.int64), junk.astype(np.int64)


def positive_ranks(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in ``ranking`` once junk images are taken out.

    Each positive moves up by the number of junk images ranked strictly before it (an image that
    is both positive and junk stays a positive and counts as junk for the positives after it, as
    in the official evaluation).
    """
    ranking = np.asarray(ranking)
    size = int(ranking.max()) + 1 if ranking.size else 0
    size = max(size, int(positives.max()) + 1 if positives.size else 0,
               int(junk.max()) + 1 if junk.size else 0)
    is_positive = np.zeros(size, bool)
    is_positive[positives] = True
    is_junk = np.zeros(size, bool)
    is_junk[junk] = True
    positions = np.flatnonzero(is_positive[ranking])
    junk_at = is_junk[ranking].astype(np.int64)
    junk_before = np.cumsum(junk_at) - junk_at
    return positions - junk_before[positions]


def average_precision(ranks: np.ndarray, num_positives: int) -> float:
    """The official interpolated AP from the 0-based ranks (junk removed) of the positives found.

    Trapezoids of the precision-recall curve: the j-th positive at rank r adds
    ``(p0 + p1) / (2 * num_positives)``, ``p0 = j / r`` (1 if r = 0), ``p1 = (j + 1) / (r + 1)``.
    """
    ranks = np.sort(np.asarray(ranks, dtype=np.float64))
    if num_positives <= 0:
        raise ValueError("average precision needs at least one positive")
    found = np.arange(len(ranks), dtype=np.float64)
    before = np.where(ranks == 0, 1.0, found / np.maximum(ranks, 1.0))
    after = (found + 1.0) / (ranks + 1.0)
    return float(np.sum(before + after) / (2.0 * num_positives))


def precision_at(ranks: np.ndarray, kappas: Sequence[int]) -> np.ndarray:
    """The official precision at each k from the 0-based ranks (junk removed) of the positives:
    ``#{rank < kq} / kq`` with ``kq = min(k, 1 + last rank)``; 0 when no positive was ranked."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return np.zeros(len(kappas))
    last = int(ranks.max()) + 1
    values = []
    for k in kappas:
        kq = min(last, int(k))
        values.append(np.count_nonzero(ranks + 1 <= kq) / kq)
    return np.array(values, np.float64)


@dataclasses.dataclass(frozen=True)
class SetupResult:
    """One setup's figures: mean AP and mean precision at k over the queries with positives.

    ``aps [Q]`` and ``precisions [Q, len(kappas)]`` hold NaN for queries left out (no positive
    in this setup); ``mean_ap`` / ``mean_precision`` are None when every query was left out.
    """

    setup: str
    mean_ap: Optional[float]
    mean_precision: Optional[tuple[float, ...]]
    aps: np.ndarray
    precisions: np.ndarray
    kappas: tuple[int, ...]

    @property
    def num_evaluated(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.aps)))


def evaluate_setup(ranks: np.ndarray, gnd: Sequence[QueryTruth], setup: str,
                   kappas: Sequence[int] = DEFAULT_KAPPAS) -> SetupResult:
    """mAP and mP@k of one setup.

    Args:
      ranks: ``[Q, N]`` database indices per query, best first (:func:`rank_database`).
      gnd: the Q queries' truth.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != len(gnd):
        raise ValueError(f"ranks must be [queries={len(gnd)}, database], got {ranks.shape}")
    kappas = tuple(int(k) for k in kappas)
    aps = np.full(len(gnd), np.nan)
    precisions = np.full((len(gnd), len(kappas)), np.nan)
    for query, truth in enumerate(gnd):
        positives, junk = setup_labels(truth, setup)
        if positives.size == 0:
            continue  # left out of the means, as in the official evaluation
        found = positive_ranks(ranks[query], positives, junk)
        aps[query] = average_precision(found, positives.size)
        precisions[query] = precision_at(found, kappas)
    evaluated = ~np.isnan(aps)
    if not evaluated.any():
        return SetupResult(setup, None, None, aps, precisions, kappas)
    return SetupResult(setup, float(aps[evaluated].mean()),
                       tuple(float(v) for v in precisions[evaluated].mean(axis=0)),
                       aps, precisions, kappas)


def evaluate(ranks: np.ndarray, gnd: Sequence[QueryTruth],
             kappas: Sequence[int] = DEFAULT_KAPPAS) -> dict[str, SetupResult]:
    """:func:`evaluate_setup` for Easy, Medium and Hard: ``{"easy": ..., ...}``."""
    return {setup: evaluate_setup(ranks, gnd, setup, kappas) for setup in SETUPS}


def percent(value: Optional[float]) -> Optional[float]:
    """A fraction as the papers print it: percent, 2 decimals (None stays None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(100.0 * value, 2)
