"""Stage 1: Xception + GeM + sigmoid head, rank-weighted loss, trained on tf.distribute (``landmarks-train``)."""
