"""What turns a backbone into a scorer: the method registry, backbone weights and checkpoints, prompts and
class embeddings, frozen features, and the decisions taken from maps and scores. Imports ``io`` and ``model``."""
