"""What a run measured and how it reads: evaluation with torchmetrics (``evaluation``), training FLOPs
(``flops``), a run's pictures (``plots``), the partition report (``report``) and the results table over
many runs (``results``)."""
