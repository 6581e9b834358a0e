"""Loading ``model.keras`` anywhere (launcher, in-process runner, separate worker processes) and
running it on batches of test images' views inside Beam's ``RunInference``.

Why a handler of our own instead of Beam's ``TFModelHandlerTensor``: each element is one test
image's ``V`` views (``[V, S, S, 3]`` uint8), not one tensor; a batch of several images is
concatenated into one forward pass and split back per image, which Beam's TF handler does not
do. The handler also owns the one rule that makes a model with custom layers load in a separate
worker process: ``custom_objects`` keyed by the *registered* name
(``keras.saving.get_registered_name(cls)``, e.g. ``"landmarks>GeMPooling"``); without it a
fresh worker process fails with "Could not locate class" (README, "Troubleshooting"), while
in-process runners hide the problem. Wrap it in ``KeyedModelHandler`` to carry the image id
through.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import zipfile
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

_LOG = logging.getLogger(__name__)

# Views per forward pass at most: bounds activation memory (Xception at 299 px needs roughly
# 60 MB of activations per view on CPU), whatever --batch_images x --crops adds up to.
MAX_VIEWS_PER_FORWARD = 64


def custom_objects() -> dict[str, Any]:
    """The project's custom Keras classes keyed by their registered names.

    Keyed by the registered name (``"landmarks>GeMPooling"``), not the class name: a fresh
    worker process that never imported ``trainer.layers`` would otherwise fail with
    "Could not locate class". Importing here also runs the registration decorator.
    """
    import keras
    from trainer import layers

    classes = (layers.GeMPooling, layers.CosineClassifier)
    return {keras.saving.get_registered_name(cls): cls for cls in classes}


def load_keras_model(path: str):
    """Loads a whole ``.keras`` model for inference from a local path or any Beam file system.

    Remote files (``gs://``) are first copied to a local temporary file, because Keras opens
    ``.keras`` archives as local zip files.

    Raises:
      FileNotFoundError: nothing at ``path``.
      ValueError: the file is not a loadable Keras model (message names the path).
    """
    import keras

    if not FileSystems.exists(path):
        raise FileNotFoundError(f"model not found: {path}")
    local_path, temp_dir = path, None
    if FileSystems.get_scheme(path) is not None:
        temp_dir = tempfile.mkdtemp(prefix="landmarks-model-")
        local_path = os.path.join(temp_dir, "model.keras")
        with FileSystems.open(path) as source, open(local_path, "wb") as target:
            shutil.copyfileobj(source, target, length=16 << 20)
    try:
        return keras.saving.load_model(local_path, custom_objects=custom_objects(), compile=False)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot load model {path}: {error}") from error
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class ModelGeometry:
    """What the pipeline needs to know about a model: square input side and output width."""

    image_size: int
    num_classes: int


def model_geometry(model) -> ModelGeometry:
    """Reads ``[B, S, S, 3] -> [B, C]`` from a loaded model; ``ValueError`` if it is not that."""
    input_shape = tuple(model.input_shape)
    output_shape = tuple(model.output_shape)
    if len(input_shape) != 4 or input_shape[3] != 3 or input_shape[1] != input_shape[2]:
        raise ValueError(f"model input must be [batch, S, S, 3], got {list(input_shape)}")
    if input_shape[1] is None:
        raise ValueError("model input size is not fixed; crop voting needs a square size S")
    if len(output_shape) != 2 or output_shape[1] is None:
        raise ValueError(f"model output must be [batch, classes], got {list(output_shape)}")
    return ModelGeometry(image_size=int(input_shape[1]), num_classes=int(output_shape[1]))


def forward_views(model, views_scaled: np.ndarray, max_views: int = MAX_VIEWS_PER_FORWARD) -> np.ndarray:
    """Runs ``model`` on scaled views ``[N, S, S, 3]`` float32 in [-1, 1] -> ``[N, C]`` float32.

    ``N`` is split into forward passes of at most ``max_views`` views.
    """
    outputs = []
    for start in range(0, len(views_scaled), max_views):
        chunk = views_scaled[start : start + max_views]
        outputs.append(np.asarray(model.predict_on_batch(chunk), np.float32))
    return np.concatenate(outputs, axis=0)


def split_per_image(probabilities: np.ndarray, view_counts: Sequence[int]) -> list[np.ndarray]:
    """Splits ``[sum(view_counts), C]`` back into one ``[V_i, C]`` array per image, in order."""
    if int(np.sum(view_counts)) != len(probabilities):
        raise ValueError(f"{len(probabilities)} rows for view counts {list(view_counts)}")
    return np.split(probabilities, np.cumsum(view_counts)[:-1], axis=0)


class CropViewsModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """``ModelHandler``: one example = one image's views ``[V, S, S, 3]`` uint8 (RGB, 0-255).

    ``run_inference`` concatenates the batch's views, scales them with the training contract
    (:class:`trainer.preprocessing.ImageContract`), runs one forward pass (in chunks of at most
    :data:`MAX_VIEWS_PER_FORWARD` views) and returns, per example, a ``PredictionResult`` whose
    ``inference`` is that image's per-view probabilities ``[V, C]`` float32. ``example`` is set
    to ``None`` so the views are not carried further down the pipeline.

    The model is loaded once per worker (Beam's ``RunInference`` shares it between bundles).
    """

    def __init__(self, model_path: str, image_size: int, max_batch_images: int = 4):
        # min = max: fixed batches of max_batch_images images (a bundle's last batch may be
        # smaller); Beam's adaptive sizing would start at 1 image per forward pass.
        super().__init__(min_batch_size=max_batch_images, max_batch_size=max_batch_images)
        self._model_path = model_path
        self._image_size = image_size

    def load_model(self):
        _LOG.info("loading model %s", self._model_path)
        model = load_keras_model(self._model_path)
        geometry = model_geometry(model)
        if geometry.image_size != self._image_size:
            raise ValueError(
                f"model {self._model_path} takes {geometry.image_size} px, "
                f"the job was configured for {self._image_size} px"
            )
        return model

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model,
        inference_args: Optional[dict[str, Any]] = None,
    ) -> Iterable[PredictionResult]:
        from trainer.preprocessing import ImageContract

        view_counts = [len(views) for views in batch]
        stacked = np.concatenate(batch, axis=0)
        scaled = np.asarray(ImageContract(self._image_size).scale(stacked), np.float32)
        probabilities = forward_views(model, scaled)
        per_image = split_per_image(probabilities, view_counts)
        return [PredictionResult(None, image_probabilities) for image_probabilities in per_image]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        # The default pickles the whole batch just to measure it.
        return int(sum(views.nbytes for views in batch))

    def get_metrics_namespace(self) -> str:
        return "landmarks_predict_crop_voting"


def embedding_width(model, image_size: int) -> int:
    """Checks an embedding model (``embedding.keras``): input ``[B, S, S, 3]`` with S =
    ``image_size`` (the classifier's), output ``[B, D]``; returns D (``ValueError`` if not)."""
    geometry = model_geometry(model)  # the same shape rules: [B, S, S, 3] -> [B, D]
    if geometry.image_size != image_size:
        raise ValueError(f"it takes {geometry.image_size} px images, the classifier "
                         f"{image_size} px (both must come from the same model dir)")
    return geometry.num_classes


class EmbeddingViewsModelHandler(CropViewsModelHandler):
    """:class:`CropViewsModelHandler` for ``embedding.keras``: per example (one image's views
    ``[V, S, S, 3]`` uint8) the ``inference`` is the views' embeddings ``[V, D]`` float32, to
    be combined into one by ``rescoring.retrieval.combine_view_embeddings``."""

    def load_model(self):
        _LOG.info("loading embedding model %s", self._model_path)
        model = load_keras_model(self._model_path)
        try:
            embedding_width(model, self._image_size)
        except ValueError as error:
            raise ValueError(f"embedding model {self._model_path}: {error}") from error
        return model

    def get_metrics_namespace(self) -> str:
        return "landmarks_predict_embedding"
