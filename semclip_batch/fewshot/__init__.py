"""Learning from labelled frames: ``pretrain`` (adapting a backbone), ``train`` (few-shot checkpoints) and the
baselines' fitting. Imports ``io``, ``methods`` and ``model``; never the Ray pipeline."""
