"""``train --recipe``: how SEM-CLIP is fitted on the support set. ``paper`` is the paper's recipe as SEMCLIP.md
rebuilds it (Transformation Layers + head on the pooled token, frozen backbone); ``transfer`` (the default)
adds what made few shots work on families the backbone never saw (README "Quality that transfers"): the
support frames in four orientations (at the whole view only: under a scale policy the tiles are the extra
views, :func:`for_policy`), a normal-patch memory fused into the map, a head that also reads the most
anomalous patches, class scores of large frames also from a crop at the map's maximum, frames whose pattern
repeats compared with their own cells (a cell reference, README "Cell references"), and each patch scored by
its likeness to the rest of its frame (README "Self-similarity"). Each part is one field, so
the benchmark ablates them one at a time. Recipes apply to SEM-CLIP only; the baselines keep their papers'
recipes."""

from __future__ import annotations

from dataclasses import dataclass, replace

from semclip_batch.config import DEFAULT_SELF_SIMILARITY, ModelSpec, check_self_similarity
from semclip_batch.errors import ConfigError
from semclip_batch.fewshot.augment import TRANSFORMS
from semclip_batch.methods.registry import get_method


@dataclass(frozen=True)
class Recipe:
    name: str
    augment: bool = False  # the support frames flipped and turned (fewshot.augment.TRANSFORMS)
    memory: bool = False  # normal-patch memory fused into the map (model.memory)
    region_head: bool = False  # the head also reads the region embedding (model.semclip.SemClipConfig)
    defect_view: bool = False  # run: large frames' class scores also from a native crop at the map's maximum
    self_reference: bool = False  # frames without a reference frame compared with their own repeats (io.cell_reference)
    self_similarity: float = 0.0  # the in-frame self-similarity map's share of the map (model.selfsim)
    choose_self_similarity: bool = False  # the fit chooses the share with the memory's (self_similarity: ties)
    grey_memory: bool = False  # a memory of normal grey-level neighbourhoods, kept where the held-out frames gain (rule 17)
    region_classes: bool = False  # defect classes also from the region's attributes, kept unless held out frames lose (rule 22)


RECIPES = {
    "paper": Recipe("paper"),
    "transfer": Recipe("transfer", augment=True, memory=True, region_head=True, defect_view=True, self_reference=True,
                       self_similarity=DEFAULT_SELF_SIMILARITY, choose_self_similarity=True, grey_memory=True,
                       region_classes=True),
}
DEFAULT_RECIPE = "transfer"


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return RECIPES[name]


def applied(recipe: Recipe, spec: ModelSpec) -> ModelSpec:
    """The model description a recipe trains (SEM-CLIP gains its memory / region head; baselines unchanged). The
    recipe's self-similarity weight replaces the spec's (``train --self-similarity`` sets the recipe's)."""
    if not get_method(spec.method).recipes:
        return spec
    return replace(spec, memory=recipe.memory, region_head=recipe.region_head, defect_view=recipe.defect_view,
                   self_reference=spec.self_reference or recipe.self_reference, self_similarity=recipe.self_similarity,
                   grey_memory=recipe.grey_memory, region_classes=recipe.region_classes)


def recorded(recipe: Recipe, method: str) -> str:
    """The recipe name a checkpoint records: the recipe's, or the baseline's own name."""
    return recipe.name if get_method(method).recipes else method


def copies(recipe: Recipe, method: str) -> int:
    """Rows per support frame once augmented."""
    return len(TRANSFORMS) if recipe.augment and get_method(method).recipes else 1


def for_policy(recipe: Recipe, scale_policy: float | None) -> Recipe:
    """The recipe as it trains at ``scale_policy``: the augmentation at the whole view only. Under a policy a
    frame's tiles are its extra views; on the validation families (``contacts@1024`` and ``contacts-small@1024`` at
    0.5) the augmentation moved pixel AUROC by -0.003 and -0.005 there and took 2.3-2.9x the time (README "The scale
    check")."""
    return recipe if scale_policy is None else replace(recipe, augment=False)


def with_self_reference(recipe: Recipe, on: bool | None) -> Recipe:
    """``train --self-reference / --no-self-reference`` over the recipe's own setting (None: the recipe's)."""
    return recipe if on is None else replace(recipe, self_reference=on)


def with_self_similarity(recipe: Recipe, weight: float | None) -> Recipe:
    """``train --self-similarity W`` over the recipe's own weight, used as given (not chosen by the fit); None:
    the recipe's."""
    if weight is None:
        return recipe
    check_self_similarity(weight)
    return replace(recipe, self_similarity=weight, choose_self_similarity=False)
