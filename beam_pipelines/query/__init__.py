"""``landmarks-query``: one or more photos -> answers with their evidence (pictures,
``index.html``), by the prediction job's own functions (:mod:`.session`)."""
