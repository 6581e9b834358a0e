"""The stage-1 classifier: Xception backbone -> GeM -> dropout -> head (the recipe's: ReLU ->
Dense -> sigmoid).

``build_model`` returns a functional ``keras.Model`` mapping float32 images ``[B, S, S, 3]`` in
[-1, 1] (Xception's scaling, ``trainer.preprocessing.ImageContract.scale``) to class
probabilities ``[B, num_classes]`` float32, whatever the head (``trainer.heads``: ``sigmoid``,
the recipe's independent probabilities, or the ArcFace heads' softmax). Layer names (stable,
other modules look them up), with the recipe's sigmoid head:

    "images"         the input
    "xception"       the backbone, a nested functional model (``include_top=False``)
    "gem"            GeM pooling, the 2048-wide embedding used for retrieval
    "dropout"        dropout (0.05 in the recipe)
    "relu"           ReLU on the pooled features
    "logits"         Dense(num_classes), float32
    "probabilities"  sigmoid, float32 (the model's output)

The ArcFace heads replace the last three by "projection", "embedding_bn", "embedding",
"cosine", "logits" (the scaled cosines) and "probabilities" (softmax); see ``trainer.heads``.

Mixed precision: every layer follows the global dtype policy except ``logits`` and
``probabilities``, which are float32 so that confidences used for ranking (loss, GAP) keep 24
bits of mantissa; the 2048 x C head costs ~2048 * C multiply-adds per image, negligible next to
Xception's ~8.4 G at 299 px.

BatchNorm stays in inference mode in every phase (moving statistics used, never updated), as
Keras' transfer-learning guide asks. The guide's ``base_model(x, training=False)`` alone is not
enough in Keras 3.15: a functional model passes its own call's ``training`` value to every
nested layer (``keras/src/models/functional.py``, ``operation_fn``), so ``fit`` would run the
backbone with ``training=True``. What does hold is Keras 3's rule that a BatchNormalization layer
with ``trainable=False`` always runs in inference mode; :func:`set_trainable_from` therefore
keeps every BatchNorm layer frozen (gamma/beta included). The call still says
``training=False`` for callers that pass no ``training``. The head's dropout follows ``training``.
"""

import logging
import os

import keras

from tfrecords_schema import InputError
from trainer import heads, layers
# Names and widths shared with trainer.heads; kept importable from here (model_lib.GEM_NAME).
from trainer.architecture import BACKBONE_NAME, EMBEDDING_WIDTH, GEM_NAME, OUTPUT_NAME
from trainer.cli import ResourceUnreachable

logger = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 71  # Xception's smallest accepted input
# Weights of Xception without its top (include_top=False), whatever the input size: Keras'
# documented 22,910,480 for the full network minus its 1000-class top (2048 x 1000 + 1000).
# 54,528 of them are BatchNorm moving statistics (never trained), 20,806,952 can train.
XCEPTION_NO_TOP_PARAMS = 22_910_480 - (2048 * 1000 + 1000)


def _resolve_backbone_weights(backbone_weights):
    """``"imagenet"`` -> ``"imagenet"``, ``"none"``/``None`` -> ``None``, a file -> its path.

    Raises ``InputError`` (``--backbone_weights`` is the user's) for anything else.
    """
    if backbone_weights is None:
        return None
    if not isinstance(backbone_weights, (str, os.PathLike)):
        raise InputError(
            f"backbone_weights must be 'imagenet', 'none' or a weights file path, "
            f"got {backbone_weights!r}"
        )
    value = os.fspath(backbone_weights)
    if value.lower() == "none":
        return None
    if value.lower() == "imagenet":
        return "imagenet"
    if not value.endswith((".weights.h5", ".h5", ".keras")):
        raise InputError(
            f"backbone_weights must be 'imagenet', 'none' or a path to a Keras weights file "
            f"(*.weights.h5, *.h5 or *.keras); got {value!r}"
        )
    if "://" in value:
        raise InputError(f"backbone_weights must be a local file (copy it first), got {value!r}")
    if not os.path.isfile(value):
        raise InputError(f"backbone_weights file does not exist: {value!r}")
    return value


def build_backbone(image_size, backbone_weights="none"):
    """Xception without its top, input ``[B, S, S, 3]`` -> features ``[B, s, s, 2048]``.

    ``backbone_weights``: ``"imagenet"`` (Keras downloads them; needs internet), ``"none"``
    (random initialisation) or a path to a weights file of an Xception without top (e.g. saved
    with ``backbone.save_weights("x.weights.h5")``).
    """
    weights = _resolve_backbone_weights(backbone_weights)
    logger.info("Building Xception at %d px, weights=%s", image_size, weights)
    try:
        return keras.applications.Xception(
            include_top=False,
            weights=weights,
            input_shape=(image_size, image_size, 3),
            name=BACKBONE_NAME,
        )
    except Exception as error:  # noqa: BLE001 - Keras' get_file raises a bare Exception
        if weights == "imagenet" and str(error).startswith(_DOWNLOAD_FAILURE):
            cause = str(error).strip().splitlines()[0]
            raise ResourceUnreachable(
                f"--backbone_weights imagenet: the ImageNet weights cannot be downloaded "
                f"({cause}); without internet, pass --backbone_weights PATH (a local copy of "
                "Keras' xception_weights_tf_dim_ordering_tf_kernels_notop.h5) or none"
            ) from error
        raise


_DOWNLOAD_FAILURE = "URL fetch failure"  # Keras' get_file, for an unreachable or failing URL


def build_model(num_classes, image_size=299, backbone_weights="none", dropout=0.05, gem_p=3.0,
                head=None):
    """The classifier (module docstring). Honours the global dtype policy.

    Args:
        num_classes: number of landmark classes ``C`` (>= 1).
        image_size: input side ``S`` in pixels (>= 71; the recipe uses 299).
        backbone_weights: ``"imagenet"``, ``"none"`` or a local weights-file path.
        dropout: dropout rate after pooling, in [0, 1).
        gem_p: initial GeM exponent (> 0).
        head: a ``trainer.heads.Head``; ``None`` = the recipe's sigmoid head.

    Returns:
        ``keras.Model`` images ``[B, S, S, 3]`` float32 -> probabilities ``[B, C]`` float32,
        with the backbone frozen (call :func:`set_trainable_from` to unfreeze).
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if int(image_size) != image_size or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if gem_p <= 0:
        raise ValueError(f"gem_p must be positive, got {gem_p!r}")
    num_classes, image_size = int(num_classes), int(image_size)

    backbone = build_backbone(image_size, backbone_weights)
    images = keras.Input(shape=(image_size, image_size, 3), name="images")
    # training=False documents the intent; set_trainable_from enforces it (module docstring).
    features = backbone(images, training=False)  # [B, s, s, 2048], s = 10 at 299 px, 3 at 71
    pooled = layers.GeMPooling(p_init=gem_p, name=GEM_NAME)(features)  # [B, 2048]
    x = keras.layers.Dropout(dropout, name="dropout")(pooled)
    if head is None:
        head = heads.SigmoidHead()
    probabilities = head.build(x, num_classes)  # [B, C] float32
    model = keras.Model(images, probabilities, name="landmark_classifier")
    set_trainable_from(model, None)
    return model


def parameter_count(num_classes, head=None):
    """Weights of :func:`build_model`'s classifier (trainable or not), in closed form, no model
    built: Xception without top + GeM's ``p`` + the head's
    (``trainer.heads.Head.parameter_counts``). At 203,094 classes the recipe's sigmoid head is
    416.1M of the 437.0M weights (docs/SCALE.md, "Training with many classes")."""
    if head is None:
        head = heads.SigmoidHead()
    head_all, _ = head.parameter_counts(int(num_classes), EMBEDDING_WIDTH)
    return XCEPTION_NO_TOP_PARAMS + 1 + head_all


def embedding_model(model):
    """Model sharing ``model``'s weights: images ``[B, S, S, 3]`` -> GeM embedding ``[B, 2048]``.

    Works on a freshly built model and on one loaded from ``model.keras``. The embedding is in
    the global policy's compute dtype (bfloat16 under ``mixed_bfloat16``); cast as needed.
    """
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, model.get_layer(GEM_NAME).output, name="landmark_embedding")


def set_trainable_from(model, first_index):
    """Freeze backbone layers ``[0, first_index)``, train ``[first_index, end)`` and the head.

    Args:
        model: a model from :func:`build_model` (or loaded from its ``.keras`` file).
        first_index: index into ``model.get_layer("xception").layers`` (the recipe uses 85,
            then 25); ``None`` freezes the whole backbone (head-only phase).

    The head (GeM ``p``, Dense) always trains. The backbone's BatchNorm layers are never made
    trainable, which in Keras 3 keeps them in inference mode even under ``fit`` (module
    docstring); their gamma/beta stay at their pretrained values. (An ArcFace head's own
    BatchNorm is part of the head: it trains, see ``trainer.heads``.) Recompile the model after
    calling this (``trainable`` is read when the train function is built).
    """
    backbone = model.get_layer(BACKBONE_NAME)
    backbone_layers = backbone.layers
    if first_index is not None:
        if int(first_index) != first_index or not 0 <= first_index <= len(backbone_layers):
            raise ValueError(
                f"first_index must be None or an integer in [0, {len(backbone_layers)}], "
                f"got {first_index!r}"
            )
        first_index = int(first_index)
    for layer in model.layers:
        if layer is not backbone:
            layer.trainable = True
    # Setting trainable on a model sets it on all its layers; then override per layer.
    backbone.trainable = first_index is not None
    if first_index is not None:
        for index, layer in enumerate(backbone_layers):
            is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = index >= first_index and not is_batchnorm
    logger.info(
        "Backbone trainable from layer %s of %d: %d trainable weights in the model",
        first_index,
        len(backbone_layers),
        len(model.trainable_weights),
    )
