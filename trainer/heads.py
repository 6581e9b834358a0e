"""Pluggable heads on the GeM features: sigmoid (the recipe), arcface, subcenter_arcface.

A head is one small object (:func:`make_head` picks it by name from ``--head``) that knows

- the layers it puts on the pooled features (after GeM and the shared dropout; ``build``),
- what the loss sees during training (``training_model``) and the loss itself (``loss``),
- its training metric (``metrics``: batch GAP on the class probabilities it exports),
- its retrieval embedding (``embedding_model``: images -> L2-normalised float32 ``[B, D]``),
- what it does with non-landmark training images (label -1).

Whatever the head, the classifier ``trainer.model.build_model`` returns (and ``model.keras``)
maps images ``[B, S, S, 3]`` in [-1, 1] to class probabilities ``[B, C]`` float32: dev GAP,
crop voting and the predict job work unchanged for every head. The margin exists only in the
loss, never in the exported model.

=====================  ======================================  =================================
head                   layers after GeM -> dropout             loss (non-landmark images)
=====================  ======================================  =================================
``sigmoid``            ReLU -> Dense(C) -> sigmoid             rank-weighted BCE
                                                               (all-zero target)
``arcface``            Dense(D) -> BatchNorm -> L2 ->          ArcFace softmax cross-entropy,
                       cosine to C centres -> x s -> softmax   fixed margin m (excluded)
``subcenter_arcface``  as ``arcface``, K sub-centers per       ArcFace softmax cross-entropy,
                       class (class cosine = max over K)       dynamic margin per class (excluded)
=====================  ======================================  =================================

Embeddings (``embedding.keras``): ``sigmoid`` -> the L2-normalised GeM output (D = 2048, the
recipe has no projection); ArcFace heads -> the L2-normalised D-dimensional projection, the
vector the class centres are compared with (D = 512 by default, ``--embedding_dim``).

Values and their sources (every one is a flag):

- **Margin m = 0.5** (``arcface``, ``--arcface_margin``): ArcFace, Deng, Guo, Xue and Zafeiriou,
  "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019: their setting
  for all reported face experiments (s = 64, m = 0.5).
- **Scale s = 30** (both ArcFace heads, ``--arcface_scale``). Departure: ArcFace uses s = 64 for
  faces; the GLR-2020 third-place code defines its margin loss with s = 30 and ran it at s = 80.
  Reason for 30: the scale only has to let a confident softmax probability be reached; the
  lower bound of Wang et al. (CosFace, CVPR 2018), ``s >= (C-1)/C * log((C-1) P / (1 - P))``,
  is about 12 for C = 15,000 classes and P = 0.9 (13.5 for GLDv2's 81,313), so 30 leaves a wide
  margin, while a larger s makes the untrained head's softmax sharper and its first steps
  larger under Adam at the recipe's head learning rate (1e-3). ``--arcface_scale 64`` gives
  ArcFace's value.
- **Sub-centers K = 3** (``subcenter_arcface``, ``--subcenters``): Deng, Guo, Liu, Gong and
  Zafeiriou, "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web Faces",
  ECCV 2020 (K = 3 is their default), also the value of the GLR-2020 third-place solution.
- **Dynamic margins** (``subcenter_arcface``): Ha, Liu, Liu and Liao, "Google Landmark
  Recognition 2020 Competition Third Place Solution", arXiv 2010.05350: the margin of class c
  is a decreasing function of its number of training images n_c,
  ``m_c = a * n_c^(-lambda) + b`` with ``lambda = 0.25`` (``--margin_power``), and a, b chosen
  so that the margins span [0.05, 0.5] (``--margin_min``, ``--margin_max``): the largest class
  gets 0.05, the smallest 0.5 (their released training script min-max scales ``n^(-1/4)``
  into that range; :func:`dynamic_margins`). Rare classes get large margins: they need the
  strongest push to be separable from the rest. Counts come from the training records
  (``trainer.data.count_labels``) and are stored with the margins in the model dir
  (``class_counts.json``). Two edge cases the paper does not meet: a class of the label map
  with no training image gets ``margin_max`` (it is never a target, so this only matters if
  the data change), and when all classes have the same count (no range to scale) every class
  gets ``margin_max``, ArcFace's fixed margin.
- **Embedding width D = 512** (``--embedding_dim``): ArcFace's and the GLR-2020 third place's.

Other departures from the papers, with reasons:

- *Backbone and pooling*: the recipe's Xception + GeM (+ dropout 0.05), shared by all heads, so
  that heads can be compared on the same features (the third place used EfficientNets with
  average pooling).
- *Embedding normalisation*: Dense(D) -> BatchNorm -> L2, ArcFace's output block "E" (BN,
  dropout, FC, BN) without its first BN: the recipe's GeM -> dropout stem comes first, and the
  backbone's BatchNorm layers stay frozen (docs/METHOD.md). The third place used FC -> Swish;
  we keep ArcFace's BN, which centres the embedding before the L2 normalisation. This BN is
  new and trained from scratch, so it trains in batch-statistics mode (the argument for
  freezing the backbone's BN, pretrained statistics overwritten by noisy batches, does not
  apply), and it is **synchronized** across replicas (``synchronized=True``): its statistics
  are those of the global batch, so the training step does not depend on the number of
  replicas (the third place, too, made its network's BatchNorm layers synchronized). Like the
  backbone's, its moving statistics are set from the calibration images when the backbone is
  random (``--calibrate_batchnorm_images``), so that a short run evaluates sensibly.
- *Non-landmark images* (label -1, absent from the papers' training data): there is no class
  to pull them to and the softmax has no "none" output, so they are **excluded** from the
  ArcFace loss (weight 0: no loss, no gradient). The loss is divided by the number of
  landmark images in the global batch (``trainer.losses.ArcMarginLoss``). They still pass
  through the head's BatchNorm (they are part of the batch's statistics) and the batch GAP
  counts them as in the recipe (a prediction on them is wrong).
- *Probabilities*: the exported model outputs ``softmax(s * cos)`` (no margin), a class
  probability like the sigmoid head's; the third place ranked by the top cosine. Both give the
  same top-1 class; the softmax keeps ``model.keras``'s contract. Unlike the sigmoid head, the
  probabilities sum to 1, so a non-landmark image cannot score low on every class: separating
  non-landmarks is left to the rescoring stage.
- *Margin past pi*: where ``theta + m`` would exceed pi, the target logit continues linearly
  (``cos(theta) - m sin(m)``), as in ArcFace's reference implementation, so it keeps
  decreasing with theta (``trainer.losses``).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from typing import ClassVar, Mapping, Sequence

import keras
import numpy as np

from trainer import architecture, layers, losses, metrics
from trainer.config import HEAD_CHOICES, ModelConfig

_LOG = logging.getLogger(__name__)

# Layer names of the heads (stable: other modules and tests look them up).
RELU = "relu"
LOGITS = "logits"
PROJECTION = "projection"
EMBEDDING_NORM = "embedding_bn"
EMBEDDING = "embedding"
COSINE = "cosine"


def per_class_counts(counts: Mapping[int, int] | Sequence[int], num_classes: int) -> np.ndarray:
    """Training images per class index ``[C]`` int64, from ``trainer.data.count_labels``'s dict
    (label -> images; label -1, the non-landmarks, is left out) or a sequence of ``C`` counts."""
    if isinstance(counts, Mapping):
        result = np.zeros(num_classes, np.int64)
        for label, count in counts.items():
            if 0 <= int(label) < num_classes:
                result[int(label)] = int(count)
        return result
    result = np.asarray(counts, np.int64)
    if result.shape != (num_classes,):
        raise ValueError(f"expected {num_classes} class counts, got shape {result.shape}")
    return result


def dynamic_margins(
    counts: Sequence[int],
    margin_min: float = 0.05,
    margin_max: float = 0.5,
    power: float = 0.25,
) -> np.ndarray:
    """Per-class margins ``a * n_c^(-power) + b`` spanning ``[margin_min, margin_max]``.

    ``a`` and ``b`` map the present classes' ``n^(-power)`` linearly onto the range: the class
    with the most images gets ``margin_min``, the one with the fewest ``margin_max``
    (module docstring: Ha et al. 2020). A class with no image gets ``margin_max``; if every
    present class has the same count, all get ``margin_max``.

    Returns:
        float64 ``[C]``, radians.
    """
    counts = np.asarray(counts, np.float64)
    margins = np.full(counts.shape, float(margin_max))
    present = counts > 0
    if not present.any():
        return margins
    transformed = counts[present] ** -float(power)
    low, high = transformed.min(), transformed.max()
    if high - low <= 1e-12 * high:
        return margins
    a = (margin_max - margin_min) / (high - low)
    b = margin_min - a * low
    margins[present] = a * transformed + b
    return margins


class Head(abc.ABC):
    """One head (module docstring). Subclasses are frozen dataclasses built by :func:`make_head`."""

    name: ClassVar[str]
    uses_class_counts: ClassVar[bool] = False  # the loss needs the training images per class

    @property
    @abc.abstractmethod
    def embedding_dim(self) -> int:
        """Width D of :meth:`embedding_model`'s output."""

    @abc.abstractmethod
    def parameter_counts(self, num_classes: int,
                         features: int = architecture.EMBEDDING_WIDTH) -> tuple[int, int]:
        """``(all, trainable)`` weights of the head's layers for ``num_classes`` classes on
        ``features``-wide pooled features: the closed form, no model built (docs/SCALE.md;
        ``trainer.model.parameter_count`` adds the backbone and GeM)."""

    @abc.abstractmethod
    def build(self, features, num_classes: int):
        """The head's layers on ``features`` (GeM -> dropout, ``[B, 2048]``); returns the class
        probabilities ``[B, C]`` float32 (the last layer is named ``probabilities``)."""

    def training_model(self, model: keras.Model) -> keras.Model:
        """What ``fit`` trains (sharing ``model``'s layers): images -> what the loss sees."""
        return model

    @abc.abstractmethod
    def embedding(self, model: keras.Model):
        """The symbolic L2-normalised embedding ``[B, D]`` float32 of ``model``'s graph."""

    def embedding_model(self, model: keras.Model) -> keras.Model:
        """Images ``[B, S, S, 3]`` in [-1, 1] -> L2-normalised embeddings ``[B, D]`` float32,
        sharing ``model``'s weights (a fresh model or one loaded from ``model.keras``)."""
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        return keras.Model(inputs, self.embedding(model), name="landmark_embedding")

    @abc.abstractmethod
    def loss(self, class_counts: Sequence[int] | None = None) -> keras.losses.Loss:
        """The training loss; ``class_counts`` ``[C]`` is needed when :attr:`uses_class_counts`."""

    @abc.abstractmethod
    def metrics(self) -> list[keras.metrics.Metric]:
        """Training metrics on the training output (``batch_gap`` on the class probabilities)."""

    def describe(self) -> str:
        return f"{self.name} head ({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


@dataclasses.dataclass(frozen=True)
class SigmoidHead(Head):
    """The recipe: ReLU -> Dense(C) -> sigmoid, float32; rank-weighted BCE (``trainer.losses``).

    A non-landmark image has the all-zero target: every sigmoid output should be low.
    """

    name: ClassVar[str] = "sigmoid"
    rank_weight: float = 1.0

    @property
    def embedding_dim(self) -> int:
        return architecture.EMBEDDING_WIDTH

    def parameter_counts(self, num_classes, features=architecture.EMBEDDING_WIDTH):
        total = features * num_classes + num_classes  # Dense kernel [F, C] + bias [C]
        return total, total

    def build(self, features, num_classes: int):
        x = keras.layers.Activation("relu", name=RELU)(features)
        logits = keras.layers.Dense(num_classes, dtype="float32", name=LOGITS)(x)  # [B, C]
        return keras.layers.Activation(
            "sigmoid", dtype="float32", name=architecture.OUTPUT_NAME
        )(logits)

    def embedding(self, model: keras.Model):
        pooled = model.get_layer(architecture.GEM_NAME).output  # [B, 2048], compute dtype
        return keras.layers.UnitNormalization(axis=-1, dtype="float32", name=EMBEDDING)(pooled)

    def loss(self, class_counts=None) -> keras.losses.Loss:
        del class_counts
        return losses.RankWeightedBCE(rank_weight=self.rank_weight)

    def metrics(self) -> list[keras.metrics.Metric]:
        return [metrics.BatchGAP()]


@dataclasses.dataclass(frozen=True)
class ArcFaceHead(Head):
    """Dense(D) -> synchronized BatchNorm -> L2 -> cosine to the class centres -> x s -> softmax.

    Trains on the class cosines (layer ``cosine``) with :class:`trainer.losses.ArcMarginLoss` at
    a fixed margin; non-landmark images are excluded from the loss (module docstring).
    """

    name: ClassVar[str] = "arcface"
    dimension: int = 512
    scale: float = 30.0
    margin: float = 0.5

    @property
    def embedding_dim(self) -> int:
        return self.dimension

    @property
    def subcenters_per_class(self) -> int:
        return 1

    def parameter_counts(self, num_classes, features=architecture.EMBEDDING_WIDTH):
        d = self.dimension
        projection = features * d + d  # Dense kernel [F, D] + bias [D]
        centres = d * num_classes * self.subcenters_per_class  # CosineClassifier [D, C * K]
        # BatchNorm: gamma and beta train; the moving mean and variance do not.
        return projection + 4 * d + centres, projection + 2 * d + centres

    def build(self, features, num_classes: int):
        # float32 from the projection on: the embedding, the cosines and the softmax feed the
        # loss and the ranking (as the sigmoid head's logits); the cost, 2048 x D + D x C x K
        # multiply-adds per image, is small next to the backbone's.
        x = keras.layers.Dense(self.dimension, dtype="float32", name=PROJECTION)(features)
        x = keras.layers.BatchNormalization(
            synchronized=True, dtype="float32", name=EMBEDDING_NORM
        )(x)
        embedding = keras.layers.UnitNormalization(axis=-1, dtype="float32", name=EMBEDDING)(x)
        cosines = layers.CosineClassifier(
            num_classes, subcenters=self.subcenters_per_class, name=COSINE
        )(embedding)  # [B, C] in [-1, 1]
        logits = keras.layers.Rescaling(self.scale, dtype="float32", name=LOGITS)(cosines)
        return keras.layers.Activation(
            "softmax", dtype="float32", name=architecture.OUTPUT_NAME
        )(logits)

    def training_model(self, model: keras.Model) -> keras.Model:
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        return keras.Model(inputs, model.get_layer(COSINE).output, name=f"{model.name}_cosines")

    def embedding(self, model: keras.Model):
        return model.get_layer(EMBEDDING).output

    def margins(self, class_counts=None):
        del class_counts
        return self.margin

    def loss(self, class_counts=None) -> keras.losses.Loss:
        return losses.ArcMarginLoss(margins=self.margins(class_counts), scale=self.scale)

    def metrics(self) -> list[keras.metrics.Metric]:
        return [metrics.ScaledCosineBatchGAP(scale=self.scale)]


@dataclasses.dataclass(frozen=True)
class SubCenterArcFaceHead(ArcFaceHead):
    """:class:`ArcFaceHead` with K sub-centers per class and dynamic margins per class."""

    name: ClassVar[str] = "subcenter_arcface"
    uses_class_counts: ClassVar[bool] = True
    subcenters: int = 3
    margin_min: float = 0.05
    margin_max: float = 0.5
    margin_power: float = 0.25

    @property
    def subcenters_per_class(self) -> int:
        return self.subcenters

    def margins(self, class_counts=None):
        if class_counts is None:
            raise ValueError("the subcenter_arcface loss needs the training images per class")
        return dynamic_margins(
            class_counts, self.margin_min, self.margin_max, self.margin_power
        ).tolist()


HEADS: dict[str, type[Head]] = {
    head.name: head for head in (SigmoidHead, ArcFaceHead, SubCenterArcFaceHead)
}
assert tuple(HEADS) == HEAD_CHOICES


def make_head(config: ModelConfig) -> Head:
    """The head named by ``config.head``, with its values from ``config``."""
    if config.head == SigmoidHead.name:
        return SigmoidHead(rank_weight=config.rank_weight)
    if config.head == ArcFaceHead.name:
        return ArcFaceHead(
            dimension=config.embedding_dim, scale=config.arcface_scale,
            margin=config.arcface_margin,
        )
    if config.head == SubCenterArcFaceHead.name:
        return SubCenterArcFaceHead(
            dimension=config.embedding_dim, scale=config.arcface_scale,
            margin=config.margin_max, subcenters=config.subcenters,
            margin_min=config.margin_min, margin_max=config.margin_max,
            margin_power=config.margin_power,
        )
    raise ValueError(f"unknown head {config.head!r}; expected one of {tuple(HEADS)}")
