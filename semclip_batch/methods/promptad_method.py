"""PromptAD as a registered method: prompts learned on the normal support images, then normal-patch memories
and prototypes.

Settings are the paper's (fixed before any SEM-CLIP figure was measured): 4 context tokens, 3 normal prompts,
4 learnable anomaly suffixes of 1 token, manual suffixes = the defect class names, margin 0.1, 100 full-batch
epochs (``--epochs`` overrides). Only the support set's *normal* images are used, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from semclip_batch.config import LossProgress, ModelSpec
from semclip_batch.methods.features import Features
from semclip_batch.methods.fitting import Support, SupportSet, fit_temperature, normal_rows, pooled_embeddings
from semclip_batch.methods.registry import Method, depth_of, method_taps, register
from semclip_batch.methods.weights import open_clip_module
from semclip_batch.model import SemClipOutput
from semclip_batch.model.promptad import PromptAd, PromptLearner, project_tokens, promptad_loss
from semclip_batch.model.towers import as_clip

OBJECT = "wafer pattern"


@dataclass(frozen=True)
class PromptAdSettings:
    n_ctx: int = 4
    n_prompts: int = 3
    n_learned: int = 4
    n_ab: int = 1
    margin: float = 0.1
    epochs: int = 100
    lr: float = 2e-3


@register
class PromptAdMethod(Method[PromptAd]):
    name = "promptad"

    def build(self, spec: ModelSpec, clip: nn.Module, text: torch.Tensor) -> PromptAd:
        model = PromptAd(clip, n_classes=text.shape[0], taps=method_taps(spec, depth_of(clip)), sigma=spec.sigma)
        model.set_text_embeddings(text)
        return model

    def load(self, model: PromptAd, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        # memories first: their sizes come from the checkpoint
        model.set_memory([tensors.get(f"memory{k}", m) for k, m in enumerate(model.memories())])
        return super().load(model, tensors)

    def taps(self, model: PromptAd) -> tuple[int, ...]:
        return model.read_taps

    def vv_from(self, model: PromptAd) -> int | None:
        return 1  # the last block's V-V tokens are its local features

    def score(self, model: PromptAd, feats: Features, size: tuple[int, int]) -> SemClipOutput:
        return model.from_encoded(feats.select(model.read_taps, True), size)

    def fit(self, model: PromptAd, spec: ModelSpec, support: Support) -> dict[str, Any]:
        model.text_scale.fill_(fit_temperature(pooled_embeddings(support.feats), model.text_embeddings,
                                               support.data.labels))
        settings = PromptAdSettings() if support.epochs is None else PromptAdSettings(epochs=support.epochs)
        with torch.enable_grad():
            return fit_promptad(model, support.clip, support.clip_name, support.feats, support.data, support.seed,
                                settings, support.progress)


class _PromptTokens(TypedDict):
    normal: torch.Tensor
    manual: torch.Tensor
    learned: torch.Tensor
    ab_start: int


def _prompt_tokens(clip_name: str, classes: tuple[str, ...], s: PromptAdSettings) -> _PromptTokens:
    tokenizer = open_clip_module().get_tokenizer(clip_name)
    ctx = " ".join(["X"] * s.n_ctx)
    ab = " ".join(["X"] * s.n_ab)
    normal = tokenizer([f"{ctx} {OBJECT}."] * s.n_prompts)
    manual = tokenizer([f"{ctx} {OBJECT} with {c.replace('_', ' ')}." for c in classes[1:]])
    learned = tokenizer([f"{ctx} {OBJECT} with {ab}."] * s.n_learned)
    head = tokenizer([f"{ctx} {OBJECT} with"])[0]
    ab_start = int((head != 0).sum()) - 1  # position after "with" (the end token is dropped)
    return {"normal": normal, "manual": manual, "learned": learned, "ab_start": ab_start}


def fit_promptad(model: PromptAd, clip: nn.Module, clip_name: str, feats: Features, data: SupportSet, seed: int,
                 settings: PromptAdSettings | None = None, progress: LossProgress | None = None) -> dict[str, Any]:
    """Learn PromptAD's prompts on the normal support images, then fill its memories and prototypes."""
    s = settings or PromptAdSettings()
    idx = normal_rows(data, "promptad")
    taps = model.read_taps
    enc = feats.subset(idx).select(taps, True)
    with torch.no_grad():
        image = F.normalize(enc.pooled.float(), dim=-1)
        last_vv = enc.vv[-1]
        assert last_vv is not None  # select(taps, True) of features encoded with the V-V path (vv_from=1)
        local = project_tokens(model.visual, last_vv).reshape(-1, image.shape[-1]).float()
        targets = torch.cat([image, local])
    tok = _prompt_tokens(clip_name, data.classes, s)
    learner = PromptLearner(clip, tok["normal"], tok["manual"], tok["learned"], s.n_ctx, s.n_ab,
                            int(tok["ab_start"]), seed)
    for p in clip.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([learner.ctx, learner.ab_ctx], lr=s.lr)
    scale = as_clip(clip).logit_scale.detach().exp()
    loss = torch.tensor(0.0)
    for epoch in range(1, s.epochs + 1):
        normal, manual, learned = learner()
        loss = promptad_loss(targets, normal, manual, learned, scale, s.margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and (epoch % 10 == 0 or epoch == s.epochs):
            progress(epoch, s.epochs, float(loss.detach()))
    with torch.no_grad():
        normal, manual, learned = learner()
        protos = torch.stack([F.normalize(normal.mean(0), dim=-1), F.normalize(torch.cat([manual, learned]).mean(0), dim=-1)])
    model.states.copy_(protos)
    model.set_memory([F.normalize(enc.original[taps.index(t)][:, 1:].float(), dim=-1).reshape(-1, enc.original[0].shape[-1])
                      for t in model.taps])
    return {"final_loss": float(loss.detach()), "epochs": s.epochs}
