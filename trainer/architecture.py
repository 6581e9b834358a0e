"""The classifier's fixed names and widths, shared below the modules that build it.

``trainer.model`` builds the stem (Xception -> GeM -> dropout) and ``trainer.heads`` the top
(each head ends in the layer :data:`OUTPUT_NAME`); both read these values from here, so neither
has to import the other for them. Layer names are stable: other modules and tests look them up
(``model.get_layer(GEM_NAME)``).
"""

BACKBONE_NAME = "xception"  # the backbone, a nested functional model
GEM_NAME = "gem"  # GeM pooling: the embedding used for retrieval
OUTPUT_NAME = "probabilities"  # the model's output, float32 [B, C]
EMBEDDING_WIDTH = 2048  # channels of Xception's last block = width of the GeM embedding
