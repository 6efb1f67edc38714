"""The text side of ``pretrain``: the class prompts tokenised once, the class embeddings a step trains through
(the mean of a sample of each class's prompts), and how far apart the classes' texts lie (``--text-separation``
and the held-out check's class-text cosine)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from semclip_batch.methods.prompts import PromptSet
from semclip_batch.model.text import encode_prompts


@dataclass(frozen=True)
class ClassTexts:
    """The class prompts tokenised once: every prompt's tokens and the class each belongs to."""

    tokens: torch.Tensor
    owner: torch.Tensor
    n_classes: int

    @classmethod
    def of(cls, tokenizer: Callable[[list[str]], torch.Tensor], prompts: PromptSet) -> ClassTexts:
        """Every class's prompts through the backbone's ``tokenizer`` (``open_clip.get_tokenizer``)."""
        return cls(torch.cat([tokenizer(list(p)) for p in prompts.prompts]),
                   torch.cat([torch.full((len(p),), c) for c, p in enumerate(prompts.prompts)]), len(prompts.classes))

    def embeddings(self, clip: nn.Module, pick: torch.Tensor | None = None) -> torch.Tensor:
        """``(C, E)`` class text embeddings from all prompts, or from the prompts ``pick``."""
        tokens, owner = (self.tokens, self.owner) if pick is None else (self.tokens[pick], self.owner[pick])
        return class_text(clip, tokens, owner, self.n_classes)


def class_text(clip: nn.Module, tokens: torch.Tensor, owner: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Differentiable class embeddings: mean of normalised prompt embeddings per class. -> ``(C, E)``."""
    emb = F.normalize(encode_prompts(clip, tokens), dim=-1)
    sums = torch.zeros(n_classes, emb.shape[1], dtype=emb.dtype).index_add(0, owner, emb)
    return F.normalize(sums, dim=-1)


def prompt_sample(owner: torch.Tensor, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of up to ``per_class`` random prompts of every class (a fresh draw each step: the text tower
    sees every prompt over the schedule at a fraction of the cost of all of them per step)."""
    picks = []
    for c in owner.unique():
        members = (owner == c).nonzero().flatten()
        picks.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    return torch.cat(picks)


def text_separation(text: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between different classes' text embeddings ``(C, E)``: 0 when they are orthogonal.
    A randomly initialised text tower embeds every class's prompts almost alike (cosine ~0.9), and while the
    class texts are that close no image feature can tell the classes apart: the dense loss sits near chance."""
    return between_classes(text).pow(2).mean()


def between_classes(text: torch.Tensor) -> torch.Tensor:
    """The cosines between different classes' (normalised) text embeddings ``(C, E)`` -> ``(C * (C - 1),)``."""
    return (text @ text.t())[~torch.eye(len(text), dtype=torch.bool)]
