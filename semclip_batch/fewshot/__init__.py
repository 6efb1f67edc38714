"""Learning from labelled frames: ``pretrain`` (adapting a backbone) and ``train`` (few-shot checkpoints of any
registered method; each method's own fitting lives in its ``methods/`` module). Imports ``io``, ``methods`` and
``model``; never the Ray pipeline."""
