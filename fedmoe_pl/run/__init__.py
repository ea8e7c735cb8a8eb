"""A run and its loop: the round loop (``federation``), who is sampled and seeded when (``schedule``),
the run directory and its readers (``rundir``), where events go (``sinks``, ``tracking``), stop
signals (``signals``), the Trainer settings a local fit honours (``trainer_settings``), and the
experiment a config describes (``experiment``)."""
