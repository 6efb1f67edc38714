"""Reading what a run wrote: predictions, per-lot statistics, DuckDB queries, evaluation and its metrics.
Imports ``io`` and ``methods``."""
