"""``landmarks-predict``'s launcher checks: everything it can check before a pipeline is built.

:func:`check_all` runs them in order on the frozen :class:`.config.PredictConfig` and returns
what the job needs (:class:`CheckedInputs`): every input and output can be reached
(:func:`beam_pipelines.io_utils.check_access`, exit code 5), the test, reference and index
globs match files, the label map reads, the model loads once (input size S, output width C must
match the label map; the config is then resolved with S and C), the kNN recognizers' ``--ann``
and ``--embedding`` work (:func:`check_knn`), and the extractor of ``--local_features`` loads
and finds features in a photograph (:func:`probe_extractor`). A failed check raises
:class:`PredictError` (an ``InputError``: one line, exit code 2).

``landmarks-query`` reads its label map, probes its extractor and checks its embedding model
with the same functions.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipelines import cli, io_utils
from beam_pipelines.predict import config as config_lib
from beam_pipelines.predict import knn, model_handler, reference_cache, transforms
from rescoring import crops, verification
from tfrecords_schema import InputError, SchemaError
from tfrecords_schema.label_map import LabelMap

_LOG = logging.getLogger(__name__)

PROBE_IMAGE_SIDE = 256


class PredictError(InputError):
    """A problem with the inputs found before any pipeline starts (one-line message)."""


@dataclasses.dataclass(frozen=True)
class CheckedInputs:
    """What the launcher checks hand the job.

    Attributes:
      config: the config resolved with the model's input size S (px) and output width C.
      label_map: the label map (class index -> landmark id).
      extractor_spec: the canonical spec of the ``--local_features`` extractor.
      probe_features: the number of local features it found in :func:`probe_image`.
      crop_spec: ``rescoring.crops.CropSpec`` of ``--crops``.
      verification_params: ``rescoring.verification.VerificationParams`` of the extractor.
      knn: the kNN recognizers' ``embedding_dim``, ``embedding_sha256`` and ``aggregation``
        (:func:`check_knn`); empty for the classifier.
    """

    config: config_lib.PredictConfig
    label_map: LabelMap
    extractor_spec: str
    probe_features: int
    crop_spec: crops.CropSpec
    verification_params: verification.VerificationParams
    knn: dict


def check_all(config: config_lib.PredictConfig, beam_args: Sequence[str]) -> CheckedInputs:
    """Runs every launcher check, in this order (see the module docstring).

    Raises:
      ResourceUnreachable: an input or output whose storage service does not answer (exit
        code 5).
      InputError: a bucket that cannot be listed (exit code 2).
      PredictError: the first other check that fails (exit code 2).
    """
    io_utils.check_access(access_paths(config, beam_args))
    check_inputs(config)
    label_map = load_label_map(config.label_map)
    geometry = check_model(config.model, label_map)
    config = config.resolved(geometry.image_size, geometry.num_classes)
    knn_config = check_knn(config)
    extractor, probe_features = probe_extractor(config.local_features)
    # The workers load their own extractor: the launcher keeps only what they need of it.
    return CheckedInputs(
        config=config, label_map=label_map, extractor_spec=extractor.spec,
        probe_features=probe_features, crop_spec=crop_spec_for(config.crops),
        verification_params=make_verification_params(extractor), knn=knn_config)


def check_knn(config: config_lib.PredictConfig) -> dict:
    """The kNN recognizers' checks (:func:`check_ann`, :func:`check_embedding_model`) -> the
    ``knn`` part of ``config.json``: ``embedding_dim``, ``embedding_sha256`` (keys the
    reference-embedding cache) and the ``aggregation`` rule; empty for the classifier."""
    if not config.uses_knn:
        return {}
    check_ann(config)
    embedding_dim, embedding_sha256 = check_embedding_model(config.embedding, config.image_size)
    return {"embedding_dim": embedding_dim, "embedding_sha256": embedding_sha256,
            "aggregation": repr(knn.aggregation_params(config.recognizer, config.knn_k))}


def load_label_map(path: str) -> LabelMap:
    if not io_utils.exists(path):
        raise PredictError(f"label map not found: {path} (pass --label_map)")
    try:
        return LabelMap.from_csv_text(io_utils.read_text(path), source=path)
    except SchemaError as error:
        raise PredictError(f"bad label map: {error}") from error


def check_model(path: str, label_map: LabelMap) -> model_handler.ModelGeometry:
    """Loads the model once in the launcher: input size, and output width == label-map size."""
    try:
        model = model_handler.load_keras_model(path)
        geometry = model_handler.model_geometry(model)
    except FileNotFoundError as error:
        raise PredictError(str(error)) from error
    except ValueError as error:
        raise PredictError(f"incompatible model {path}: {error}") from error
    del model
    if geometry.num_classes != label_map.num_classes:
        raise PredictError(
            f"model {path} predicts {geometry.num_classes} classes but label map has "
            f"{label_map.num_classes} landmark ids; pass the label map the model was trained with"
        )
    return geometry


def check_embedding_model(path: str, image_size: int) -> tuple[int, str]:
    """Loads ``--embedding`` once in the launcher: input S = the classifier's, output ``[B, D]``
    of unit rows (checked on :func:`probe_image`, so a classifier passed by mistake is refused).

    Returns:
      ``(D, SHA-256 of the file)``; the digest keys the reference-embedding cache.
    """
    import numpy as np

    from trainer.preprocessing import ImageContract

    flag = f"--embedding {path}"
    try:
        model = model_handler.load_keras_model(path)
        width = model_handler.embedding_width(model, image_size)
    except FileNotFoundError as error:
        raise PredictError(f"{flag}: {error} (train with landmarks-train, which writes "
                           "embedding.keras beside model.keras, or pass --embedding)") from error
    except ValueError as error:
        raise PredictError(f"incompatible {flag}: {error}") from error
    from PIL import Image

    probe = np.asarray(Image.fromarray(probe_image()).resize((image_size, image_size)), np.uint8)
    output = np.asarray(model.predict_on_batch(ImageContract(image_size).scale(probe[None])))
    del model
    norm = float(np.linalg.norm(output[0]))
    if not np.all(np.isfinite(output)) or abs(norm - 1.0) > 1e-3:
        raise PredictError(
            f"{flag} does not output L2-normalised embeddings (norm {norm:.4g} on a test "
            "photograph); pass the embedding.keras written by landmarks-train")
    return width, reference_cache.file_digest(path)


def check_ann(config) -> None:
    """``--ann faiss`` needs FAISS in the launcher (and the workers)."""
    if config.ann != "faiss":
        return
    from rescoring import ann

    try:
        ann.import_faiss()
    except ImportError as error:
        raise PredictError(f"--ann faiss: {error}") from error


def access_paths(config: config_lib.PredictConfig, beam_args: Sequence[str]) -> dict:
    """Flag -> path of every input and output of the job, Beam's temporary and staging
    folders included, for :func:`io_utils.check_access` (before any pipeline is built)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    cloud = PipelineOptions(list(beam_args)).view_as(GoogleCloudOptions)
    paths = {"--model": config.model, "--test_data": config.test_data,
             "--reference_data": config.reference_data, "--output_dir": config.output_dir,
             "--reference_features": config.reference_features,
             "--temp_location": cloud.temp_location,
             "--staging_location": cloud.staging_location}
    return {flag: path for flag, path in paths.items() if path}


def check_inputs(config: config_lib.PredictConfig) -> None:
    if not io_utils.match(config.test_data):
        raise PredictError(f"no test files match --test_data {config.test_data}")
    if not io_utils.match(config.reference_data):
        raise PredictError(f"no reference files match --reference_data {config.reference_data}")
    if config.retrieval_index and not io_utils.match(config.retrieval_index):
        raise PredictError(f"no index files match --retrieval_index {config.retrieval_index}")


def probe_image():
    """The photograph every extractor is tried on before any Beam work: scikit-image's bundled
    astronaut (no download), resized to 256 x 256 px. It is full of corners and texture: a
    working extractor finds features in it."""
    import numpy as np
    import skimage.data
    from PIL import Image

    image = Image.fromarray(skimage.data.astronaut()).resize(
        (PROBE_IMAGE_SIDE, PROBE_IMAGE_SIDE), Image.BILINEAR)
    return np.asarray(image, np.uint8)


def probe_extractor(spec: str):
    """Makes the extractor of ``--local_features``, loads it and tries it on :func:`probe_image`.

    Returns:
      ``(extractor, number of features found in the probe image)``.

    Raises:
      ResourceUnreachable: a module URL whose host does not answer (exit code 5).
      PredictError: one line naming the spec and the cause: unknown spec; ``does not load``
        (module missing, no ``default`` signature, ...); ``fails on a test photograph`` (the
        call raised, e.g. a signature with other inputs); ``returns no usable output`` (not
        ``(locations [N, 2], descriptors [N, D])`` of finite numbers, or no features at all).
    """
    from rescoring import local_features

    flag = f"--local_features {spec}"
    try:
        extractor = local_features.make_extractor(spec)
    except ValueError as error:
        raise PredictError(f"bad {flag}: {error}") from error
    if spec.startswith(local_features.DELF_PREFIX):  # a TF-Hub URL or a gs:// folder
        cli.check_reachable({"--local_features": spec[len(local_features.DELF_PREFIX):]})
    try:
        extractor.load()
    except Exception as error:  # noqa: BLE001 - hub.load raises OSError, KeyError, TF errors...
        raise PredictError(f"{flag} does not load: {transforms.error_summary(error)}") from error
    try:
        output = extractor.extract(probe_image())
    except Exception as error:  # noqa: BLE001 - whatever the module raises
        raise PredictError(
            f"{flag} fails on a test photograph: {transforms.error_summary(error)}") from error
    try:
        locations, descriptors = transforms.check_features(output)
    except ValueError as error:
        raise PredictError(f"{flag} returns no usable output: {error}") from error
    if len(locations) == 0:
        raise PredictError(
            f"{flag} returns no usable output: no local features in a "
            f"{PROBE_IMAGE_SIDE} px photograph (scikit-image's astronaut)")
    _LOG.info("extractor %s: %d features of %d dims in the probe photograph",
              extractor.spec, len(locations), descriptors.shape[1])
    return extractor, len(locations)


def make_verification_params(extractor) -> verification.VerificationParams:
    """The verification settings of an extractor's descriptors (their match distance)."""
    return verification.VerificationParams(
        max_descriptor_distance=float(extractor.max_descriptor_distance)
    )


def crop_spec_for(num_views: int):
    """``--crops`` -> ``rescoring.crops.CropSpec``: 22 = recipe, 12 = c 0.1, 2 = whole+mirror,
    1 = whole."""
    return crops.CropSpec.for_num_views(num_views)
