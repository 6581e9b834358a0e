"""Local feature extractors: an RGB uint8 image -> (locations, descriptors).

Every extractor made by :func:`make_extractor` has

* ``extract(image)``: ``image`` uint8 ``[H, W, 3]`` RGB -> ``(locations, descriptors)``:
  ``locations`` float32 ``[N, 2]``, (y, x) in pixels of the *input* image (whatever resizing
  happens inside); ``descriptors`` float32 ``[N, D]``, each row L2-normalised, or for a binary
  extractor (ORB) uint8 ``[N, D / 8]``, the bits packed (:mod:`rescoring.descriptors`: matching
  unpacks them to unit rows); ``N`` may be 0.
* ``spec``: the spec string it was made from (stored with the features, see
  ``tfrecords_schema.local_features``), and
* ``max_descriptor_distance``: the putative-match threshold to use for its descriptors in
  ``rescoring.verification.VerificationParams`` (descriptor spaces differ, so does the bound).
* ``load()``: loads what ``extract`` needs now instead of on first use (``make_extractor``
  itself never touches the module), so a caller can tell "does not load" from "fails on an
  image".

Specs:

``"delf:<handle>"``
  DELF through TF-Hub: ``hub.load(handle)`` (a tfhub.dev URL, a local SavedModel folder,
  ``file://`` or ``gs://``), its ``signatures["default"]`` called with the recipe's parameters:
  image resized to 384 x 384, RGB in [0, 1], ``score_threshold=100``, ``image_scales`` =
  0.25 ... 2.0, ``max_feature_num=1000``. 40-dim descriptors; match distance 0.8 (docs/METHOD.md).
``"sift"``
  OpenCV SIFT on the grey image, longer side bounded by ``max_image_side``, RootSIFT
  descriptors (L1-normalise, square root: unit L2 rows, Hellinger-kernel matching, better
  than raw SIFT for retrieval). 128 dims. Match distance 0.5 (chosen below).
``"orb"``
  OpenCV ORB. Its 256-bit binary descriptors are kept packed (uint8 ``[N, 32]``, 32 bytes a
  keypoint); matching compares them as float rows ``(2 * bit - 1) / 16`` (unit length,
  :func:`rescoring.descriptors.unit_descriptors`); then ``|a - b|^2 = hamming(a, b) / 64``, so a
  Euclidean bound ``d`` is a Hamming bound ``64 d^2``. Match distance 0.8 (at most 40 of 256
  bits differ).
``"default"``
  The offline extractor the demo uses: ``"orb"`` (the made extractor's ``spec`` is ``"orb"``:
  stored features name what actually made them).

Choice of the default, on evidence (measured here, one core, 1000 features, the recipe's RANSAC,
each extractor at its own match distance): ``skimage.data.astronaut()`` (512 px) against five
altered copies of itself (affine warp + relighting; rotation 30 deg at scale 0.6; a zoomed crop;
perspective + JPEG q35 + noise; the warp at 256 px) vs against nine unrelated ``skimage.data``
photographs (coffee, chelsea, rocket, camera, ...), and those nine among themselves:

::

    spec  distance  inliers vs altered copies      inliers, unrelated pairs  ms per image
    sift  0.5       579 / 256 / 355 / 421 / 347    max 21, mean 9.8          ~94-160
    sift  0.6       589 / 265 / 378 / 438 / 361    max 34, mean 16.4
    orb   0.8       586 / 186 / 288 / 509 / 309    max 5,  mean 0.9          ~8-13
    orb   0.85      637 / 208 / 331 / 562 / 356    max 19, mean 3.9

ORB at 0.8 separates best (weakest true pair 186 vs strongest false pair 5: 37x; SIFT 12x) and
extracts ~10x faster, so ``"default"`` is ORB. Its costs: 256-dim float rows (1 MB per 1000
features, vs 160 kB for DELF; matching costs ~6x DELF's 40 dims) and no features on tiny
images, hence ``min_image_side``.
Note that ``residual_threshold`` (20 px) is in input-image pixels: it suits images of a few
hundred pixels, as the recipe's 384 px DELF inputs.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

_LOG = logging.getLogger(__name__)

DELF_PREFIX = "delf:"
DEFAULT_SPEC = "default"
DEFAULT_OFFLINE_SPEC = "orb"

# Euclidean bound on descriptor distance for a putative match, per descriptor family.
MAX_DESCRIPTOR_DISTANCE = {
    "delf": 0.8,
    "sift": 0.5,
    "orb": 0.8,
}


@dataclasses.dataclass(frozen=True)
class ExtractorParams:
    """Settings shared by the extractors.

    Attributes:
      max_features: at most this many keypoints per image (DELF: ``max_feature_num``).
      max_image_side: offline extractors first shrink the image so its longer side is at most
        this many pixels; locations are mapped back to input pixels.
      min_image_side: offline extractors enlarge smaller images so their longer side is this
        many pixels (ORB finds nothing on a 64 px image: its patches are 31 px).
      delf_image_size: DELF's input is resized to this square size (the recipe's 384).
      delf_score_threshold: DELF's attention score threshold (the recipe's 100).
      delf_image_scales: DELF's image pyramid scales.
    """

    max_features: int = 1000
    max_image_side: int = 512
    min_image_side: int = 256
    delf_image_size: int = 384
    delf_score_threshold: float = 100.0
    delf_image_scales: tuple[float, ...] = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)

    def __post_init__(self):
        if self.max_features < 1:
            raise ValueError(f"max_features must be >= 1, got {self.max_features}")
        if self.max_image_side < 32:
            raise ValueError(f"max_image_side must be >= 32, got {self.max_image_side}")
        if not 16 <= self.min_image_side <= self.max_image_side:
            raise ValueError(
                f"min_image_side must be in [16, max_image_side={self.max_image_side}], "
                f"got {self.min_image_side}"
            )
        if self.delf_image_size < 32:
            raise ValueError(f"delf_image_size must be >= 32, got {self.delf_image_size}")
        if not self.delf_image_scales or min(self.delf_image_scales) <= 0:
            raise ValueError(f"delf_image_scales must be positive, got {self.delf_image_scales}")
        object.__setattr__(self, "delf_image_scales", tuple(float(s) for s in self.delf_image_scales))


def check_image(image: np.ndarray) -> np.ndarray:
    """Returns ``image`` as a C-contiguous uint8 ``[H, W, 3]`` array or raises ``ValueError``."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {image.dtype} {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image {image.shape}")
    return np.ascontiguousarray(image)


def l2_normalise(descriptors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero); float32 ``[N, D]``."""
    descriptors = np.asarray(descriptors, np.float32)
    norms = np.linalg.norm(descriptors, axis=1, keepdims=True)
    return descriptors / np.maximum(norms, 1e-12)


def _empty(dim: int, packed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if packed:
        return np.zeros([0, 2], np.float32), np.zeros([0, dim // 8], np.uint8)
    return np.zeros([0, 2], np.float32), np.zeros([0, dim], np.float32)


class OpenCVExtractor:
    """SIFT (RootSIFT descriptors) or ORB (packed binary descriptors) from OpenCV, no download."""

    _DIMS = {"sift": 128, "orb": 256}

    def __init__(self, kind: str, params: ExtractorParams, spec: str | None = None):
        if kind not in self._DIMS:
            raise ValueError(f"unknown OpenCV extractor {kind!r}; choose from {sorted(self._DIMS)}")
        self.kind = kind
        self.params = params
        self.spec = spec or kind
        self.max_descriptor_distance = MAX_DESCRIPTOR_DISTANCE[kind]
        self.descriptor_dim = self._DIMS[kind]
        self._detector = None  # built on first use: cv2 objects do not pickle (Beam ships DoFns)

    def _get_detector(self):
        import cv2

        if self._detector is None:
            if self.kind == "sift":
                self._detector = cv2.SIFT_create(nfeatures=self.params.max_features)
            else:
                self._detector = cv2.ORB_create(nfeatures=self.params.max_features)
        return self._detector

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_detector"] = None
        return state

    def load(self) -> None:
        """Builds the OpenCV detector now (otherwise on the first ``extract``)."""
        self._get_detector()

    def extract(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """See the module docstring: (locations (y, x) [N, 2], unit descriptors [N, D])."""
        import cv2

        image = check_image(image)
        height, width = image.shape[:2]
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        longer = max(height, width)
        scale = 1.0
        if longer > self.params.max_image_side:
            scale = self.params.max_image_side / longer
        elif longer < self.params.min_image_side:
            scale = self.params.min_image_side / longer
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2: (w, h)
            # INTER_AREA averages when shrinking (antialiasing); bilinear when enlarging.
            interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
            grey = cv2.resize(grey, size, interpolation=interpolation)
        scale_y = height / grey.shape[0]
        scale_x = width / grey.shape[1]
        keypoints, descriptors = self._get_detector().detectAndCompute(grey, None)
        if descriptors is None or len(keypoints) == 0:
            return _empty(self.descriptor_dim, packed=self.kind == "orb")
        # SIFT may return a few more than nfeatures (ties in response): keep the strongest.
        order = np.argsort([-keypoint.response for keypoint in keypoints], kind="stable")
        order = order[: self.params.max_features]
        points_xy = np.array([keypoints[i].pt for i in order], np.float64)
        descriptors = descriptors[order]
        # Pixel centres: a keypoint at resized pixel coordinate u covers input (u + 0.5) * s - 0.5.
        locations = np.stack(
            [(points_xy[:, 1] + 0.5) * scale_y - 0.5, (points_xy[:, 0] + 0.5) * scale_x - 0.5], axis=1
        ).astype(np.float32)
        return locations, self._stored_form(descriptors)

    def _stored_form(self, descriptors: np.ndarray) -> np.ndarray:
        if self.kind == "sift":
            # RootSIFT: L1-normalise then square root; the result has unit L2 norm.
            descriptors = descriptors.astype(np.float32)
            descriptors /= np.maximum(descriptors.sum(axis=1, keepdims=True), 1e-12)
            return l2_normalise(np.sqrt(descriptors))
        # ORB: OpenCV's packed bits, uint8 [N, 32], as they are (rescoring.descriptors).
        return np.ascontiguousarray(descriptors, np.uint8)


class DelfExtractor:
    """DELF through TF-Hub (``hub.load``), called with the recipe's parameters."""

    def __init__(self, handle: str, params: ExtractorParams, spec: str | None = None):
        if not handle:
            raise ValueError("DELF needs a handle: 'delf:<url or folder>'")
        self.handle = handle
        self.params = params
        self.spec = spec or DELF_PREFIX + handle
        self.max_descriptor_distance = MAX_DESCRIPTOR_DISTANCE["delf"]
        # Loaded on first use (once per Beam worker, not per element); the module is kept alive
        # because the signature refers to its variables.
        self._module = None
        self._signature = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_module"] = None
        state["_signature"] = None
        return state

    def load(self) -> None:
        """Loads the module now (otherwise on the first ``extract``); raises what ``hub.load``
        or the signature lookup raise (``OSError``, ``KeyError``, TF errors, ...)."""
        self._get_signature()

    def _get_signature(self):
        if self._signature is None:
            import tensorflow_hub as hub

            _LOG.info("loading DELF from %s", self.handle)
            self._module = hub.load(self.handle)
            self._signature = self._module.signatures["default"]
        return self._signature

    def extract(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """See the module docstring: (locations (y, x) [N, 2], unit descriptors [N, 40])."""
        import tensorflow as tf

        image = check_image(image)
        height, width = image.shape[:2]
        size = self.params.delf_image_size
        resized = tf.image.resize(
            tf.convert_to_tensor(image, tf.float32) / 255.0, [size, size], antialias=True
        )
        outputs = self._get_signature()(
            image=tf.clip_by_value(resized, 0.0, 1.0),
            score_threshold=tf.constant(self.params.delf_score_threshold, tf.float32),
            image_scales=tf.constant(self.params.delf_image_scales, tf.float32),
            max_feature_num=tf.constant(self.params.max_features, tf.int32),
        )
        locations = np.asarray(outputs["locations"], np.float32).reshape(-1, 2)
        descriptors = np.asarray(outputs["descriptors"], np.float32)
        descriptors = descriptors.reshape(locations.shape[0], -1)
        # DELF reports (y, x) in the resized square's pixels; map back to the input image.
        scale = np.array([height / size, width / size], np.float32)
        return (locations * scale).astype(np.float32), l2_normalise(descriptors)


def make_extractor(spec: str = DEFAULT_SPEC, params: ExtractorParams | None = None):
    """Builds the extractor named by ``spec`` (see the module docstring for the specs).

    Args:
      spec: ``"default"``, ``"sift"``, ``"orb"`` or ``"delf:<handle>"``.
      params: shared settings; :class:`ExtractorParams` defaults when None.

    Returns:
      An object with ``extract(image)``, ``spec`` and ``max_descriptor_distance``.
    """
    params = params or ExtractorParams()
    if spec.startswith(DELF_PREFIX):
        return DelfExtractor(spec[len(DELF_PREFIX) :], params, spec=spec)
    if spec == DEFAULT_SPEC:
        # Resolved to the concrete name: stored features must say what made them.
        spec = DEFAULT_OFFLINE_SPEC
    if spec in OpenCVExtractor._DIMS:
        return OpenCVExtractor(spec, params, spec=spec)
    raise ValueError(f"unknown extractor spec {spec!r}: use 'default', 'sift', 'orb' or 'delf:<handle>'")
