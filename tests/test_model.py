"""SEM-CLIP model math against hand-computed and reference (open_clip) results."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from semclip_batch.model import SemClip, SemClipConfig, default_taps
from semclip_batch.model.encoder import (
    dual_block,
    embed_kept_patches,
    embed_patches,
    encode_dual_path,
    fuses,
    keep_tokens,
    vv_attention,
)
from semclip_batch.model.semclip import defect_map
from semclip_batch.model.surgery import feature_surgery


def naive_vv(attn: torch.nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """softmax(v v^T / sqrt(d)) v, head by head with explicit loops, then out_proj."""
    w = attn.embed_dim
    heads = attn.num_heads
    d = w // heads
    v = h @ attn.in_proj_weight[2 * w:].t() + attn.in_proj_bias[2 * w:]
    out = torch.zeros_like(v)
    for b in range(h.shape[0]):
        for k in range(heads):
            vk = v[b, :, k * d:(k + 1) * d]
            att = torch.softmax(vk @ vk.t() / math.sqrt(d), dim=-1)
            out[b, :, k * d:(k + 1) * d] = att @ vk
    return out @ attn.out_proj.weight.t() + attn.out_proj.bias


def test_vv_attention_matches_naive_per_head(tiny_clip):
    torch.manual_seed(1)
    block = tiny_clip.clip.visual.transformer.resblocks[0]
    h = torch.randn(2, 226, block.attn.embed_dim)
    with torch.no_grad():
        assert torch.allclose(vv_attention(block.attn, h), naive_vv(block.attn, h), atol=1e-5)


def test_dual_block_is_the_block_and_its_vv_attention_in_one_projection(tiny_clip):
    """The fused block (Q, K, V projected once for both paths) equals open_clip's block and the V-V attention of
    its own ln_1; open_clip's ViT blocks take that path."""
    torch.manual_seed(4)
    blocks = tiny_clip.clip.visual.transformer.resblocks
    assert all(fuses(b) for b in blocks)
    x = torch.randn(2, 226, blocks[0].attn.embed_dim)
    with torch.no_grad():
        for block in blocks:
            fused, a_vv = dual_block(block, x)
            assert torch.allclose(fused, block(x), atol=1e-5)
            assert torch.allclose(a_vv, vv_attention(block.attn, block.ln_1(x)), atol=1e-5)
            x = fused
    odd = torch.nn.Module()
    odd.attn = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)
    assert not fuses(odd)  # anything else runs the block and the V-V path apart


@pytest.mark.parametrize("vv_from", [None, 1, 3])
def test_pooled_embedding_equals_open_clip(tiny_clip, vv_from):
    torch.manual_seed(2)
    x = torch.randn(3, 3, 240, 240)
    with torch.no_grad():
        ref = tiny_clip.clip.encode_image(x)
        out = encode_dual_path(tiny_clip.clip.visual, x, (1, 2, 3, 4), vv_from)
    assert torch.allclose(out.pooled, ref, atol=1e-5)
    assert len(out.original) == 4
    if vv_from is None:
        assert all(v is None for v in out.vv)
    else:
        assert [v is not None for v in out.vv] == [i >= vv_from for i in (1, 2, 3, 4)]


def test_vv_path_starts_from_first_dual_block_input(tiny_clip):
    """With one dual block (the last), x_vv = input of that block + out_proj(a_vv)."""
    visual = tiny_clip.clip.visual
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        out = encode_dual_path(visual, x, (3, 4), 4)
        block = visual.transformer.resblocks[3]
        h_in = out.original[0]  # output of block 3 = input of block 4
        expected = h_in + vv_attention(block.attn, block.ln_1(h_in))
    assert out.vv[0] is None
    assert torch.allclose(out.vv[1], expected, atol=1e-6)


def test_kept_tokens_run_like_a_shorter_sequence(tiny_clip):
    """Token dropping: keeping every patch changes nothing; keeping some runs exactly those tokens (CLS first)
    through both paths, with their own position embeddings."""
    visual = tiny_clip.clip.visual
    torch.manual_seed(3)
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        full = encode_dual_path(visual, x, (2, 4), 1)
        every = encode_dual_path(visual, x, (2, 4), 1, keep=torch.arange(225).expand(2, -1))
        keep = torch.tensor([[0, 7, 224], [3, 100, 101]])
        some = encode_dual_path(visual, x, (2, 4), 1, keep=keep)
        tokens = embed_patches(visual, x)
        idx = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], dim=1)
        short = torch.stack([tokens[b, idx[b]] for b in range(2)])
        block = visual.transformer.resblocks[0]
        first_vv = short + vv_attention(block.attn, block.ln_1(short))
        first = block(short)
    assert torch.allclose(every.original[1], full.original[1], atol=1e-5)
    assert torch.allclose(every.vv[1], full.vv[1], atol=1e-5)
    assert some.original[0].shape == (2, 4, visual.transformer.width)
    single = encode_dual_path(visual, x, (1,), 1, keep=keep)
    assert torch.allclose(single.original[0], first, atol=1e-5)
    assert torch.allclose(single.vv[0], first_vv, atol=1e-5)


@pytest.mark.parametrize("size", [240, 250, 176])  # the model's input, one the grid does not divide, another grid
def test_kept_patches_are_embedded_as_the_whole_grid_then_kept(tiny_clip, size):
    """The patch embedding of the kept patches only has the values, and gives the embedding's weights the
    gradients, of the whole grid embedded then the kept tokens gathered (up to float rounding)."""
    visual = copy.deepcopy(tiny_clip.clip.visual).requires_grad_(True)  # the session's model is frozen by others
    torch.manual_seed(4)
    x = torch.randn(3, 3, size, size)
    n = (size // 16) ** 2
    keep = torch.stack([torch.randperm(n)[:9].sort().values for _ in range(3)])

    def run(embed: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        visual.zero_grad()
        out = embed()
        (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
        grads = (visual.conv1.weight.grad, visual.positional_embedding.grad, visual.class_embedding.grad)
        return (out.detach(), *(g.clone() for g in grads if g is not None))

    whole = run(lambda: keep_tokens(embed_patches(visual, x), keep))
    whole_grid = visual.conv1.forward
    visual.conv1.forward = lambda *_: pytest.fail("the kept patches' embedding ran the convolution over the whole grid")
    kept = run(lambda: embed_kept_patches(visual, x, keep))
    visual.conv1.forward = whole_grid
    assert len(whole) == len(kept) == 4 and whole[0].shape == (3, 10, visual.transformer.width)
    for a, b in zip(whole, kept, strict=True):
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())  # float rounding of sums of ~800 terms


def test_stopping_at_the_last_tap_keeps_its_tokens_and_runs_no_further_block(tiny_clip):
    """``pooled=False`` (the reference views): the tapped tokens equal the full pass's, no block past the last tap
    runs, and the pooled embedding is empty."""
    visual = tiny_clip.clip.visual
    blocks = visual.transformer.resblocks
    ran: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(blocks, start=1)]
    torch.manual_seed(4)
    x = torch.randn(2, 3, 240, 240)
    try:
        with torch.no_grad():
            full = encode_dual_path(visual, x, (1, 2), None)
            ran.clear()
            short = encode_dual_path(visual, x, (1, 2), None, pooled=False)
    finally:
        for h in hooks:
            h.remove()
    assert len(blocks) > 2 and ran == [1, 2]
    assert short.pooled.shape == (2, 0) and full.pooled.shape[0] == 2 and full.pooled.shape[1] > 0
    for a, b in zip(short.original, full.original, strict=True):
        assert torch.equal(a, b)


def hand_surgery(f: torch.Tensor, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The elementwise formula of SEMCLIP.md for one patch f (D,), guide g (D,), classes t (C, D)."""
    prob = torch.softmax(2 * (t @ g), dim=0)
    w = prob / prob.mean()
    e = f[None, :] * t  # (C, D)
    we = w[:, None] * e
    r = we.mean(dim=0)
    return (we - r[None, :]).sum(dim=1)


def test_surgery_two_classes_three_channels_by_hand():
    f = F.normalize(torch.tensor([[[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]]]), dim=-1)  # (1, 2 patches, 3)
    g = F.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    t = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), dim=-1)
    # cls weights: softmax(2 * [1, 0]) = [e^2, 1] / (e^2 + 1); w = prob / 0.5
    p0 = math.exp(2) / (math.exp(2) + 1)
    w = torch.tensor([2 * p0, 2 * (1 - p0)])
    sim0 = f[0, 0] @ t.t()  # patch 0: [0.6, 0.8/sqrt(2)]
    expected0 = w * sim0 - (w * sim0).mean()
    out = feature_surgery(f, g, t, "cls")
    assert torch.allclose(out[0, 0], expected0, atol=1e-6)
    assert torch.allclose(out[0, 0], hand_surgery(f[0, 0], g[0], t), atol=1e-6)
    assert torch.allclose(out[0, 1], hand_surgery(f[0, 1], g[0], t), atol=1e-6)
    patch = feature_surgery(f, g, t, "patch")
    for n in range(2):
        assert torch.allclose(patch[0, n], hand_surgery(f[0, n], f[0, n], t), atol=1e-6)
    assert not torch.allclose(patch, out)


def test_default_taps():
    assert default_taps(12) == (3, 6, 9, 12)
    assert default_taps(4) == (1, 2, 3, 4)
    assert default_taps(24) == (6, 12, 18, 24)


def test_transformation_layer_starts_as_zero_shot_clip(tiny_clip):
    model = SemClip(tiny_clip.clip, SemClipConfig(taps=(4,)), n_classes=3)
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        enc = encode_dual_path(model.visual, x, (4,), None)
        cls = model.transform[0](enc.original[0])[:, 0]
        ref = F.normalize(tiny_clip.clip.encode_image(x), dim=-1)
    assert torch.allclose(cls, ref, atol=1e-5)


def test_forward_maps_and_state(tiny_clip):
    model = SemClip(tiny_clip.clip, SemClipConfig(taps=(2, 4)), n_classes=3).eval()
    text = F.normalize(torch.randn(3, 64), dim=-1)
    model.set_text_embeddings(text)
    assert model.n_terms() == 4
    assert torch.allclose(model.state_dict()["text_embeddings"], text)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 240, 240))
    assert out.maps.shape == (2, 240, 240)
    assert float(out.maps.min()) >= 0.0 and float(out.maps.max()) <= 1.0
    assert torch.allclose(out.class_probs.sum(-1), torch.ones(2), atol=1e-5)
    no_vv = SemClip(tiny_clip.clip, SemClipConfig(taps=(2, 4), use_vv=False), n_classes=3)
    assert no_vv.n_terms() == 2


def test_method_part_is_the_mean_of_the_resized_terms(tiny_clip):
    """map_parts resizes the terms' patch-grid mean once; bilinear resizing is linear, so that is the mean of each
    term resized (what the map was before, 8 resizes a view)."""
    model = SemClip(tiny_clip.clip, SemClipConfig(taps=(2, 4)), n_classes=3).eval()
    model.set_text_embeddings(F.normalize(torch.randn(3, 64), dim=-1))
    with torch.no_grad():
        enc = model.encode(torch.randn(2, 3, 240, 240))
        terms = model.term_logits(enc)
        parts = model.map_parts(enc, (97, 131), terms=terms, with_self=False)
    want = torch.stack([defect_map(t, (97, 131)) for t in terms]).mean(dim=0)
    assert len(terms) == 4 and parts.method.shape == (2, 97, 131)
    assert torch.allclose(parts.method, want, atol=1e-6)


def test_uniform_text_gives_uniform_defect_probability(tiny_clip):
    """With identical class embeddings every patch is 1 - 1/C: the map is exactly (C-1)/C, never min-max scaled."""
    model = SemClip(tiny_clip.clip, SemClipConfig(taps=(4,)), n_classes=7).eval()
    model.set_text_embeddings(torch.ones(7, 64))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 240, 240))
    assert torch.allclose(out.maps, torch.full_like(out.maps, 6 / 7), atol=1e-5)


def test_bad_taps_refused(tiny_clip):
    with pytest.raises(ValueError, match="taps"):
        SemClip(tiny_clip.clip, SemClipConfig(taps=(5,)), n_classes=2)


@pytest.mark.parametrize(("shape", "sigma"), [((4, 240, 240), 4.0), ((3, 224, 300), 1.5), ((2, 40, 33), 4.0),
                                             ((1, 700, 520), 4.0), ((2, 260, 1030), 1.0)])
def test_gaussian_blur_is_the_separable_reflected_convolution(shape, sigma):
    """The maps' smoothing, done as two matrix products, equals the direct separable convolution with reflected
    borders; it keeps a constant map constant, works under inference mode and with autograd alike, and in bf16."""
    from semclip_batch.model.semclip import gaussian_blur, gaussian_kernel

    maps = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    k = gaussian_kernel(sigma)
    r = k.numel() // 2
    x = F.conv2d(F.pad(maps[:, None], (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    direct = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))[:, 0]
    with torch.inference_mode():
        assert torch.allclose(gaussian_blur(maps, sigma), direct, atol=1e-5)
    assert torch.allclose(gaussian_blur(torch.full(shape, 0.3), sigma), torch.full(shape, 0.3), atol=1e-5)
    grad_in = maps.clone().requires_grad_(True)
    gaussian_blur(grad_in, sigma).sum().backward()
    assert grad_in.grad is not None and torch.isfinite(grad_in.grad).all()
    half = gaussian_blur(maps.to(torch.bfloat16), sigma)  # the matrices follow the maps' dtype (cached per dtype)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), direct, atol=2e-2)


@pytest.mark.parametrize(("shape", "sigma"), [((1, 1024, 1024), 4.0), ((2, 700, 257), 1.0), ((1, 300, 900), 8.0),
                                             ((1, 200, 1030), 1.0)])
def test_long_axes_are_blurred_in_blocks_of_the_band_as_by_the_whole_product(shape, sigma):
    """Past ``2 * BLUR_BLOCK`` samples an axis is blurred in blocks, each from the inputs its band reaches: the whole
    products' sums up to float rounding, gradients too; the blur matrix really is a band of the kernel's radius; and
    axes up to ``2 * BLUR_BLOCK`` (the model's views) take the whole products, to the bit."""
    from semclip_batch.model.semclip import BLUR_BLOCK, blur_matrix, gaussian_blur, gaussian_radius

    def whole(m: torch.Tensor) -> torch.Tensor:
        return blur_matrix(m.shape[-2], sigma, m.device, m.dtype).t() @ (m @ blur_matrix(m.shape[-1], sigma, m.device, m.dtype))

    maps = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    blocked = gaussian_blur(maps, sigma)
    assert blocked.is_contiguous() and torch.allclose(blocked, whole(maps), rtol=0, atol=1e-6)
    a, b = maps.clone().requires_grad_(True), maps.clone().requires_grad_(True)
    weights = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    (gaussian_blur(a, sigma) * weights).sum().backward()
    (whole(b) * weights).sum().backward()
    assert a.grad is not None and b.grad is not None and torch.allclose(a.grad, b.grad, rtol=0, atol=1e-6)
    radius, n = gaussian_radius(sigma), max(shape[-2:])
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert not blur_matrix(n, sigma)[(rows - cols).abs() > radius].any()
    short = torch.rand(2, 2 * BLUR_BLOCK, 2 * BLUR_BLOCK - 50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(gaussian_blur(short, sigma), whole(short))


def test_prompts_encode_on_their_used_columns_as_on_the_full_context(tiny_clip):
    """The text tower run up to the longest prompt's last token gives the full context's embeddings (the
    padding after the pooled end-of-text token never reaches it under the causal mask); a tower pooled at its
    last column runs the full context."""
    from semclip_batch.methods.weights import open_clip_module
    from semclip_batch.model.text import encode_prompts

    clip = tiny_clip.clip.eval()
    tokens = open_clip_module().get_tokenizer("semclip-tiny")(["a scratch.", "a sem image of a wafer with a long bridge defect"])
    assert (tokens != 0).sum(1).max() < 20  # the trimmed run is a fraction of the 77 columns
    with torch.no_grad():
        full, trimmed = clip.encode_text(tokens), encode_prompts(clip, tokens)
        assert trimmed.shape == full.shape
        assert torch.allclose(trimmed, full, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(trimmed[0], trimmed[1], atol=1e-3)  # the two prompts differ: not a constant
        clip.text_pool_type = "last"
        try:
            assert torch.equal(encode_prompts(clip, tokens), clip.encode_text(tokens))
        finally:
            clip.text_pool_type = "argmax"


def test_normalize_equals_expanding_the_grey_channel_first():
    from semclip_batch.config import PreprocessConfig
    from semclip_batch.io.preprocess import normalize

    cfg = PreprocessConfig(image_size=16, mean=(0.48, 0.45, 0.40), std=(0.26, 0.26, 0.27))
    views = torch.rand(3, 16, 16)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    want = (views[:, None].expand(-1, 3, -1, -1) - mean) / std
    got = normalize(views, cfg)
    assert got.shape == (3, 3, 16, 16) and got.is_contiguous()
    assert torch.equal(got, want)
