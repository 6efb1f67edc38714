"""The Ray batch job: the driver (``driver.run``), the shard plan and markers, the read, model and write
stages, run records and the Ray session. Imports ``io``, ``methods`` and ``model``; nothing imports it but the
CLI, ``demo`` and ``jobs/``."""
