"""Inputs and outputs as data: storage access, names inside OUT, stage schemas, manifests, decoding and
preprocessing of frames. Imports only ``errors`` and ``config``."""
