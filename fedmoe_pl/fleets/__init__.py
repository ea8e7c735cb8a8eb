"""Where a run's clients live and how they train: the ``Fleet`` seam the round loop calls
(``fleet``), the in-process fleet (``in_process``) with its client pool or disk store (``clients``),
its executors — sequential (``executor``), batched across clients (``batched``, ``stacked_sgd``) and
over torch.distributed ranks (``distributed``, ``rank_watch``)."""
