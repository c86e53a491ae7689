"""Tests of the recent baselines (issue 11): AttnLRP, LibraGrad (IxG, GAE, Grad-SAM), TIS, ViT-CX and Beyond
Intuition (BT-H, BT-T), each on an invariant its paper states or a case with a known answer. The shared
contract (shapes, every token layout and grid, batch = each image alone, no hook or .grad left behind) runs
for them in tests/test_baselines.py."""

from __future__ import annotations

import pytest
import torch
from conftest import scramble

from caap.baselines import (
    TIS,
    AttnLRP,
    BeyondIntuitionHead,
    BeyondIntuitionToken,
    LibraGradIxG,
    ViTCX,
    get_baseline,
)
from caap.baselines._clustering import agglomerative_complete, kmeans
from caap.baselines._common import attention_with_grads, readout_weights
from caap.baselines._rules import check_rule_support, rule_hooks
from hooked_vit import HookedViT, HookedViTConfig

# small random ViTs covering the token layouts and block features the backward rules meet
SPECS = {
    "class": ("vit_tiny_patch16_224", dict(depth=2, embed_dim=48, num_heads=2, dynamic_img_size=True), (64, 96)),
    "registers_gap": ("vit_base_patch16_reg4_gap_256", dict(depth=2, embed_dim=32, num_heads=2, img_size=64), (64, 64)),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, embed_dim=32, num_heads=2), (224, 224)),
    "clip_prenorm": ("vit_base_patch32_clip_224", dict(depth=2, embed_dim=32, num_heads=2), (224, 224)),
    "layerscale": ("deit3_small_patch16_224", dict(depth=2, embed_dim=32, num_heads=2), (224, 224)),
}


def make(key: str, seed: int = 0, biases: bool = True, **extra) -> tuple[HookedViT, tuple[int, int]]:
    name, kwargs, size = SPECS[key]
    model = HookedViT.from_timm(name, pretrained=False, **{**kwargs, **extra})
    return scramble(model, seed, biases), size


def images(size: tuple[int, int], n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def target_logits(model: HookedViT, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[torch.arange(len(t)), t]


# ---------------------------------------------------------------------------- the backward rules
@pytest.mark.parametrize("key", list(SPECS))
@pytest.mark.parametrize("attention", ["uniform", "constant"])
def test_rules_keep_the_forward_pass(key, attention):
    """The rules change only the backward pass (both papers: "without changing the forward pass")."""
    model, size = make(key)
    x = images(size)
    with torch.no_grad():
        ref = model(x)
        with model.hooks(fwd_hooks=rule_hooks(model, attention, epsilon=1e-6)):
            out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_softmax_rule_is_the_gradient():
    """AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1), R_in = x ⊙ (R_out - s Σ R_out) with
    R_out = s ⊙ g, is gradient x input with the softmax's own gradient: what the implementation uses."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    up = torch.randn(5, 7, generator=g, dtype=torch.float64)
    s = x.softmax(-1)
    (grad,) = torch.autograd.grad((s * up).sum(), x)
    r_out = s.detach() * up
    paper = x.detach() * (r_out - s.detach() * r_out.sum(-1, keepdim=True))
    torch.testing.assert_close(x.detach() * grad, paper)


def test_unsupported_models_are_refused():
    qk = HookedViT(HookedViTConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, img_size=(32, 32),
                                   patch_size=(16, 16), n_classes=5, qk_norm=True))
    for name in ("attnlrp", "libragrad_ixg", "libragrad_gae", "libragrad_gradsam"):
        with pytest.raises(ValueError, match=r"qk-norm.*supported: .*gelu"):
            get_baseline(name, qk)
    with pytest.raises(ValueError, match="HookedViT"):
        check_rule_support(torch.nn.Linear(2, 2), "AttnLRP")
    model, _ = make("class")
    with pytest.raises(ValueError, match="level"):
        AttnLRP(model, level="patch")
    with pytest.raises(ValueError, match="epsilon"):
        AttnLRP(model, epsilon=-1.0)


# ---------------------------------------------------------------------------- AttnLRP
def attnlrp_conservation(model: HookedViT, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(relevance summed over every token at the input of block 0; target logit minus what the softmax
    rule absorbs). The absorbed part of a softmax, in gradient x input terms, is
    1/2 (Σ A ⊙ ∂A - Σ S ⊙ ∂S) (A the attention, S the scores: the uniform rule gives A half of A·V's
    relevance, and q and k together half of q·k's), read with tensor hooks during the method's own pass."""
    parts: dict[str, list[torch.Tensor]] = {"hook_pattern": [], "hook_attn_scores": []}

    def capture(tensor: torch.Tensor, hook) -> torch.Tensor:
        key = hook.name.split(".")[-1]
        tensor.register_hook(lambda g: parts[key].append((tensor.detach() * g).sum(dim=(1, 2, 3))))
        return tensor

    names = [f"blocks.{lay}.attn.{k}" for lay in range(model.cfg.n_layers) for k in parts]
    method = AttnLRP(model, epsilon=0.0)
    with model.hooks(fwd_hooks=[(n, capture) for n in names]):
        tokens, _ = method.relevance(x, t)
    absorbed = 0.5 * (sum(parts["hook_pattern"]) - sum(parts["hook_attn_scores"]))
    return tokens.sum(-1), target_logits(model, x, t) - absorbed


@pytest.mark.parametrize("key", list(SPECS))
def test_attnlrp_conservation(key):
    """Achtibat et al.: with no biases, relevance is conserved from the target logit to the input of block 0
    except what the softmax rule absorbs (its bias term); every prefix layout, pooling, ln_pre, LayerScale."""
    model, size = make(key, biases=False)
    x, t = images(size), torch.tensor([1, 4])
    total, expected = attnlrp_conservation(model, x, t)
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-4)
    assert (expected - target_logits(model, x, t)).abs().max() > 1e-3, "the softmax term should not vanish here"


def test_attnlrp_conservation_any_grid_and_batch():
    """Conservation on a dynamic-size model at two image sizes, and a batch gives each image its own answer."""
    model, _ = make("class", biases=False, dynamic_img_size=True)
    for size in ((64, 96), (112, 48)):
        x, t = images(size, n=3, seed=size[0]), torch.tensor([0, 3, 3])
        total, expected = attnlrp_conservation(model, x, t)
        torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-4)
        alone = AttnLRP(model).attribute(x[1:2], target=3)
        torch.testing.assert_close(AttnLRP(model).attribute(x, t)[1:2], alone, rtol=1e-4, atol=1e-6)


def test_attnlrp_epsilon_and_pixel_level():
    """The default ε (1e-6) changes the relevance only at float rounding; the pixel map is gradient x input on the pixels: with no
    convolution bias it sums to the patch tokens' relevance at block 0 minus their position embeddings'."""
    model, size = make("class", biases=False)
    x, t = images(size), torch.tensor([2, 2])
    tokens0, _ = AttnLRP(model, epsilon=0.0).relevance(x, t)
    tokens1, _ = AttnLRP(model, epsilon=1e-6).relevance(x, t)
    torch.testing.assert_close(tokens1, tokens0, rtol=1e-3, atol=1e-3 * float(tokens0.abs().max()))

    store: dict[str, torch.Tensor] = {}

    def keep_pos(pos, hook):
        store["pos"] = pos.detach()
        return pos

    def keep_grad(resid, hook):
        resid.register_hook(lambda g: store.setdefault("g", g))
        return resid

    method = AttnLRP(model, epsilon=0.0, level="pixel")
    with model.hooks(fwd_hooks=[("hook_pos_embed", keep_pos), ("blocks.0.hook_resid_pre", keep_grad)]):
        tokens, pix = method.relevance(x, t)
    p = model.cfg.n_prefix_tokens
    pos_rel = (store["pos"] * store["g"])[:, p:].sum((1, 2))
    torch.testing.assert_close(pix.sum((1, 2)), tokens[:, p:].sum(-1) - pos_rel, rtol=1e-4, atol=1e-5)
    maps = method.attribute(x, t)
    assert method.resolution == "pixel" and maps.shape == (2, *size)
    torch.testing.assert_close(maps, pix)


# ---------------------------------------------------------------------------- LibraGrad
@pytest.mark.parametrize("key", list(SPECS))
def test_libragrad_fullgrad_completeness(key):
    """Mehri et al.: with LibraGrad's backward pass a ViT is FullGrad-complete; with no biases, input x
    gradient at the tokens entering block 0 sums exactly to the target logit."""
    model, size = make(key, biases=False)
    x, t = images(size), torch.tensor([1, 4])
    total = LibraGradIxG(model, score="logit").token_relevance(x, t).sum(-1)
    torch.testing.assert_close(total, target_logits(model, x, t), rtol=1e-4, atol=1e-5)


def test_libragrad_gradients_match_a_hand_linearised_model():
    """A one-block model without MLP and without final norm: LibraGrad's GAE gradient w.r.t. the attention
    equals the plain gradient (nothing downstream is modified), so libragrad_gae == gae there."""
    cfg = HookedViTConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, img_size=(64, 64),
                          patch_size=(16, 16), n_classes=6, final_norm=False)
    model = scramble(HookedViT(cfg), seed=3)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight.zero_()
        model.blocks[0].mlp.fc2.bias.zero_()
    x = images((64, 64))
    a = get_baseline("libragrad_gae", model, score="logit").attribute(x, target=[1, 2])
    b = get_baseline("gae", model, score="logit").attribute(x, target=[1, 2])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_libragrad_under_no_grad_and_frozen_parameters():
    model, size = make("class")
    x = images(size)
    for name in ("attnlrp", "libragrad_ixg", "libragrad_gae", "libragrad_gradsam"):
        ref = get_baseline(name, model).attribute(x, target=[1, 2])
        with torch.inference_mode():
            torch.testing.assert_close(get_baseline(name, model).attribute(x.clone(), target=[1, 2]), ref)
        frozen = model.requires_grad_(False)
        torch.testing.assert_close(get_baseline(name, frozen).attribute(x, target=[1, 2]), ref)
        model.requires_grad_(True)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- TIS
def test_kmeans_finds_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g) for c in centers])
    found = kmeans(pts, 3, seed=1)
    dist = torch.cdist(found, centers).min(dim=1).values
    assert dist.max() < 0.2
    torch.testing.assert_close(kmeans(pts, 3, seed=1), found, rtol=0, atol=0)
    with pytest.raises(ValueError, match="k-means"):
        kmeans(pts, 61)


def test_tis_masks_and_known_answer():
    """Every mask keeps tokens_ratio of the patches; on a model that cannot see its patches (zero patch and
    position embeddings: every kept patch token is the same vector) every mask scores the same y, and the
    coverage-corrected map is y at every patch."""
    model, size = make("class")
    x, t = images(size), torch.tensor([1, 4])
    method = TIS(model, n_masks=12, tokens_ratio=0.25, internal_batch_size=5, kmeans_iters=5)
    keep = method.keep_indices(method.token_features(x)[0])
    n = model.grid_size_for(x)[0] * model.grid_size_for(x)[1]
    assert keep.shape == (12, int(0.25 * n)) and all(len(set(r.tolist())) == keep.shape[1] for r in keep)
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.pos_embed.zero_()
    for masks in ("clusters", "random"):
        maps = TIS(model, n_masks=12, tokens_ratio=0.25, masks=masks, internal_batch_size=5).attribute(x, t)
        with torch.no_grad():
            some = torch.arange(keep.shape[1]).expand(2, -1)
            y = model.forward_patches(x, some).softmax(-1)[torch.arange(2), t]
        covered = maps != 0
        torch.testing.assert_close(maps[covered], y[:, None, None].expand_as(maps)[covered], rtol=1e-5, atol=1e-6)


def test_tis_seeded():
    model, size = make("class", seed=2)
    x = images(size)
    a = TIS(model, n_masks=16, seed=5, masks="random").attribute(x, target=1)
    torch.testing.assert_close(a, TIS(model, n_masks=16, seed=5, masks="random").attribute(x, target=1), rtol=0, atol=0)
    assert not torch.allclose(a, TIS(model, n_masks=16, seed=6, masks="random").attribute(x, target=1))
    with pytest.raises(ValueError, match="tokens_ratio"):
        TIS(model, tokens_ratio=0.0)
    with pytest.raises(ValueError, match="masks"):
        TIS(model, masks="grid")


# ---------------------------------------------------------------------------- ViT-CX
def test_agglomerative_complete_linkage():
    """Points on a line at 0, 1, 2, 10, 11 (distance |a - b|): with threshold 2.5 complete linkage merges
    {0, 1, 2} (largest distance 2) and {10, 11}; with threshold 1.5 it cannot put 0 and 2 together."""
    pos = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0])
    d = (pos[:, None] - pos[None]).abs()
    assert agglomerative_complete(d, 2.5).tolist() == [0, 0, 0, 1, 1]
    labels = agglomerative_complete(d, 1.5).tolist()
    assert labels[0] != labels[2] and labels[3] == labels[4] and len(set(labels)) == 3
    assert agglomerative_complete(d, 0.5).tolist() == [0, 1, 2, 3, 4]


class FixedMasksViTCX(ViTCX):
    def __init__(self, model, masks, **kw):
        super().__init__(model, **kw)
        self.fixed = masks

    def cluster_masks(self, masks):
        return self.fixed


def test_vitcx_delta_correction_known_answer():
    """Xie et al.'s delta correction: s_i = y(masked + noise) - y(x + noise) + y(x). For a model whose score
    does not depend on the image, s_i = y(x) for every mask, and the density-normalised map is y(x) / N on
    every pixel a mask covers, 0 elsewhere, whatever the masks overlap."""
    model, size = make("class")
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
    h, w = size
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2] = 1.0
    masks[1, :, w // 4 :] = 0.5
    masks[2, : h // 2] = torch.linspace(0, 1, w)
    x, t = images(size), torch.tensor([1, 4])
    maps = FixedMasksViTCX(model, masks).attribute(x, t)
    with torch.no_grad():
        y = model(x).softmax(-1)[torch.arange(2), t]
    covered = masks.sum(0) > 0
    expected = (y[:, None, None] / 3) * covered
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-7)


def test_vitcx_masks_and_seed():
    model, size = make("class", seed=4)
    x = images(size)
    method = ViTCX(model)
    feats = method.feature_masks(x)
    assert feats.shape == (2, model.cfg.d_model, *size) and feats.min() >= 0 and feats.max() <= 1
    clustered = method.cluster_masks(feats[0])
    assert 1 <= clustered.shape[0] <= model.cfg.d_model and clustered.amax(dim=(1, 2)).max() <= 1
    a = ViTCX(model, seed=1).attribute(x, target=2)
    torch.testing.assert_close(a, ViTCX(model, seed=1).attribute(x, target=2), rtol=0, atol=0)
    assert not torch.allclose(a, ViTCX(model, seed=2).attribute(x, target=2))
    with pytest.raises(ValueError, match="distance_threshold"):
        ViTCX(model, distance_threshold=0.0)


# ---------------------------------------------------------------------------- Beyond Intuition
def test_beyond_intuition_head_one_head_known_answer():
    """With one head and only the last block, BT-H reduces to R = I + A and map = (W ⊙ (I + A))[cls, patches],
    W the clamped gradient of A averaged over the scaled inputs."""
    cfg = HookedViTConfig(n_layers=2, d_model=16, n_heads=1, d_head=16, d_mlp=32, img_size=(64, 64),
                          patch_size=(16, 16), n_classes=6)
    model = scramble(HookedViT(cfg), seed=5)
    x, t = images((64, 64)), torch.tensor([1, 2])
    got = BeyondIntuitionHead(model, start_layer=1, steps=4).attribute(x, t)
    (a,), _ = attention_with_grads(model, x, t, [1])
    grads = [attention_with_grads(model, al * x, t, [1])[1][0] for al in torch.linspace(0, 1, 4)]
    w = (sum(grads) / 4).clamp(min=0).mean(dim=1)
    m = w * (torch.eye(a.shape[-1]) + a[:, 0])
    expected = model.to_grid(m[:, 0, 1:], (4, 4))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_beyond_intuition_token_known_answer():
    """BT-T weighs each token by |v W_O| / |z|: with W_O = 0 every weight is 0, R = I, and the map (the class
    row of W ⊙ I at the patch columns) is 0; otherwise it is not."""
    model, size = make("class")
    x = images(size)
    assert BeyondIntuitionToken(model, steps=2).attribute(x, target=1).abs().sum() > 0
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
    assert BeyondIntuitionToken(model, steps=2).attribute(x, target=1).abs().sum() == 0


def test_beyond_intuition_settings():
    model, _ = make("class")
    twelve = HookedViT(HookedViTConfig(n_layers=12, d_model=16, n_heads=2, d_head=8, d_mlp=32, img_size=(32, 32),
                                       patch_size=(16, 16), n_classes=5))
    assert BeyondIntuitionHead(twelve).start_layer == 3 and BeyondIntuitionToken(twelve).start_layer == 5
    assert BeyondIntuitionHead(model).start_layer == 0
    with pytest.raises(ValueError, match="start_layer"):
        BeyondIntuitionHead(model, start_layer=2)
    # head weights sum to one per image, whatever the batch (the authors' code normalised over the batch)
    x, t = images(SPECS["class"][2], n=3), torch.tensor([0, 1, 2])
    full = BeyondIntuitionHead(model, steps=2).attribute(x, t)
    torch.testing.assert_close(full[2:], BeyondIntuitionHead(model, steps=2).attribute(x[2:], t[2:]))
    r = readout_weights(model, model.cfg.n_prefix_tokens + 12, "auto")
    assert float(r.sum()) == pytest.approx(1.0)
