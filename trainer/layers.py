"""Generalised-mean (GeM) pooling: a pure functional core and a thin, serialisable Keras layer.

GeM (Radenovic et al.) pools each channel of a feature map with a power mean,

    f_k = (mean_i |a_ik|^p + epsilon)^(1/p),

which is average pooling at p = 1 and tends to max pooling as p grows. The recipe learns one
exponent ``p`` shared by all channels, initialised at 3.0 (it ended near 2.2).

Low precision: ``|a|^p`` overflows float16 for activations above ~40 at p = 3 (40^3 = 64000,
float16 max 65504) and loses digits in bfloat16 (8-bit mantissa), so the power mean is always
computed in float32 and only the pooled result is cast back to the layer's compute dtype.

:class:`CosineClassifier` is the class layer of the ArcFace heads (``trainer.heads``): the cosine
between an embedding and each class's L2-normalised weight vector, with K sub-centers per class
(the class cosine is the largest of its K). Both layers are registered under ``landmarks>``, so
importing this module is all a process needs to load any ``model.keras`` this project writes.
"""

import keras
from keras import ops

DEFAULT_EPSILON = 1e-8


def gem(x, p, epsilon=DEFAULT_EPSILON):
    """Generalised mean over the spatial grid.

    Args:
        x: feature map ``[B, H, W, C]`` (any float dtype).
        p: exponent, a scalar (Python float or tensor/variable); shared by all channels.
        epsilon: added to the mean before the ``1/p`` root, keeps the root differentiable
            when a channel is all zeros (``d/dm m^(1/p)`` is infinite at ``m = 0``).

    Returns:
        ``[B, C]`` float32: ``(mean_{h,w} |x|^p + epsilon)^(1/p)``.
    """
    x = ops.cast(x, "float32")
    p = ops.cast(p, "float32")
    if len(x.shape) != 4:
        raise ValueError(f"gem expects a feature map [B, H, W, C], got shape {x.shape}")
    # tf.pow's gradient w.r.t. the exponent uses log(x) only where x > 0, so exact zeros
    # (common after ReLU) give a finite gradient for p.
    powered = ops.power(ops.abs(x), p)  # [B, H, W, C]
    mean = ops.mean(powered, axis=(1, 2))  # [B, C]
    return ops.power(mean + epsilon, 1.0 / p)


@keras.saving.register_keras_serializable(package="landmarks")
class GeMPooling(keras.layers.Layer):
    """Keras layer around :func:`gem` with one trainable exponent ``p``.

    Input ``[B, H, W, C]``, output ``[B, C]`` in the layer's compute dtype. The exponent is a
    float32 scalar weight named ``p`` that is never autocast, so under a mixed policy it is read
    at full precision (a learned 2.2 would read as 2.203125 in bfloat16).
    """

    def __init__(self, p_init=3.0, epsilon=DEFAULT_EPSILON, **kwargs):
        super().__init__(**kwargs)
        if p_init <= 0:
            raise ValueError(f"GeMPooling p_init must be positive, got {p_init}")
        self.p_init = float(p_init)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"GeMPooling expects [B, H, W, C] inputs, got {input_shape}")
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.p_init),
            dtype="float32",
            trainable=True,
            autocast=False,
        )

    def call(self, inputs):
        pooled = gem(inputs, self.p, self.epsilon)  # float32 [B, C]
        return ops.cast(pooled, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update({"p_init": self.p_init, "epsilon": self.epsilon})
        return config


def _unit_rows(x, axis, epsilon=1e-12):
    """``x`` divided by its L2 norm along ``axis`` (float32; an all-zero vector stays zero)."""
    x = ops.cast(x, "float32")
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=True), epsilon))


@keras.saving.register_keras_serializable(package="landmarks")
class CosineClassifier(keras.layers.Layer):
    """Cosine similarity to the class centres: ``[B, D]`` -> ``[B, num_classes]`` float32.

    The kernel ``[D, num_classes * subcenters]`` holds ``subcenters`` (K) centre vectors per
    class, class-major (column ``c * K + k``). Inputs and centres are L2-normalised, so each
    entry is ``cos(theta)`` in [-1, 1]; with ``K > 1`` the class cosine is the largest over the
    class's sub-centers (sub-center ArcFace, Deng et al. 2020), so the gradient of an image
    reaches only the sub-center closest to it. No bias: a bias would break the cosine reading.
    The layer computes in float32 whatever the dtype policy (it feeds the margin loss and the
    softmax, like the sigmoid head's float32 logits).
    """

    def __init__(self, num_classes, subcenters=1, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if int(subcenters) != subcenters or subcenters < 1:
            raise ValueError(f"subcenters must be a positive integer, got {subcenters!r}")
        self.num_classes = int(num_classes)
        self.subcenters = int(subcenters)

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"CosineClassifier expects [B, D] inputs, got {input_shape}")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.num_classes * self.subcenters),
            initializer="glorot_uniform",
            dtype="float32",
            trainable=True,
            autocast=False,
        )

    def call(self, inputs):
        cosines = ops.matmul(_unit_rows(inputs, axis=-1), _unit_rows(self.kernel, axis=0))
        if self.subcenters == 1:
            return cosines  # [B, C]
        cosines = ops.reshape(cosines, (-1, self.num_classes, self.subcenters))  # [B, C, K]
        return ops.max(cosines, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "subcenters": self.subcenters})
        return config
