"""``python -m beam_pipelines.toy_data``: the same as ``landmarks-toy-data``."""

import sys

from beam_pipelines.toy_data import main

sys.exit(main())
