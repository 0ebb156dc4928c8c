"""Quality evaluation: the procedural shapes world the demo model is trained on (:mod:`.shapes`) and the
harness that reads generated pictures back into attributes and scores a model (:mod:`.harness`)."""
