"""What turns a backbone into a scorer: the method registry (``registry``) and one module per method
(``semclip_method``, ``winclip_method``, ``promptad_method``: build, load, taps, score, fit, with the shared
fitting helpers in ``fitting``), backbone weights and checkpoints, prompts and class embeddings, frozen features,
and the decisions taken from maps and scores. Imports ``io`` and ``model``."""
