import sys

from beam_pipelines.query.main import main

sys.exit(main())
