"""The patching engine: invariants, equality with a plain loop, and the same code on a language model."""

from __future__ import annotations

import pytest
import torch

from caap.patching import (
    Intervention,
    ResidContext,
    Write,
    logit_diff_score,
    logit_score,
    path_patch,
    run_interventions,
    sweep,
)
from hooked_vit import HookedViT, HookedViTConfig

TOL = 1e-5


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    cfg = HookedViTConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, img_size=32, patch_size=8,
                          n_registers=1, n_classes=10)
    model = HookedViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def pair(vit):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)


def _loop_reference(model, source, target, writes, metric_fn):
    """One plain forward per intervention, with a hand-written hook: what the engine must equal."""
    _, cache = model.run_with_cache(source)
    out = []
    for write in writes:
        def hook(act, hook, w=write):
            src = cache[w.hook]
            if w.hook.endswith("hook_pattern"):
                idx = (slice(None), w.head if w.head is not None else slice(None),
                       w.pos if w.pos is not None else slice(None))
            elif w.hook.endswith(("hook_z", "hook_q", "hook_k", "hook_v", "hook_result")):
                idx = (slice(None), w.pos if w.pos is not None else slice(None),
                       w.head if w.head is not None else slice(None))
            else:
                idx = (slice(None), w.pos if w.pos is not None else slice(None))
            act = act.clone()
            act[idx] = src[idx]
            return act

        with torch.no_grad():
            logits = model.run_with_hooks(target, fwd_hooks=[(write.hook, hook)])
        out.append(metric_fn(logits))
    return torch.stack(out)


def test_batched_sweep_equals_loop(vit, pair):
    source, target = pair[0][:1], pair[1][:1]
    metric = logit_score(torch.tensor([3]))
    result = sweep(vit, source, target, metric, component=["resid_pre", "attn_out", "mlp_out"], batch_size=7,
                   progress=False)
    writes = [Write(f"blocks.{layer}.hook_{c}", p) for c in ["resid_pre", "attn_out", "mlp_out"]
              for layer in range(3) for p in range(result.values.shape[-1])]
    ref = _loop_reference(vit, source, target, writes, lambda lg: lg[0, 3])
    assert result.dims == ("pair", "component", "layer", "pos")
    torch.testing.assert_close(result.values.flatten(), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("component,per_position", [("z", True), ("z", False), ("pattern", False), ("q", True), ("v", False)])
def test_head_sweeps_equal_loop(vit, pair, component, per_position):
    source, target = pair[0][:1], pair[1][:1]
    metric = logit_score(torch.tensor([5]))
    result = sweep(vit, source, target, metric, component=component, layers=[1, 2], per_position=per_position,
                   batch_size=16, progress=False)
    hook = {"z": "attn.hook_z", "pattern": "attn.hook_pattern", "q": "attn.hook_q", "v": "attn.hook_v"}[component]
    n_pos = vit.cfg.n_ctx
    writes = [Write(f"blocks.{layer}.{hook}", p, h) for layer in [1, 2]
              for p in (range(n_pos) if per_position else [None]) for h in range(4)]
    ref = _loop_reference(vit, source, target, writes, lambda lg: lg[0, 5])
    torch.testing.assert_close(result.values.flatten(), ref, atol=TOL, rtol=0)


def test_patching_nothing_gives_target_and_everything_gives_source(vit, pair):
    source, target = pair
    classes = torch.tensor([1, 7])
    metric = logit_score(classes)
    with torch.no_grad():
        tgt_logits, src_logits = vit(target), vit(source)
    # a write into a position that is then overwritten by the target itself: patching target into target
    nothing = run_interventions(vit, [Intervention.single("blocks.0.hook_resid_pre", 0, source=i, context=i)
                                      for i in range(2)], target, target, metric)
    torch.testing.assert_close(nothing, tgt_logits[[0, 1], classes], atol=TOL, rtol=0)
    everything = run_interventions(vit, [Intervention.single("blocks.0.hook_resid_pre", None, source=i, context=i)
                                         for i in range(2)], source, target, metric)
    torch.testing.assert_close(everything, src_logits[[0, 1], classes], atol=TOL, rtol=0)
    # the sweep reports the same baselines
    result = sweep(vit, source, target, metric, layers=[0], progress=False)
    torch.testing.assert_close(result.context_score, tgt_logits[[0, 1], classes], atol=TOL, rtol=0)
    torch.testing.assert_close(result.source_score, src_logits[[0, 1], classes], atol=TOL, rtol=0)


def test_rows_without_writes_give_target(vit, pair):
    source, target = pair
    metric = logit_score(torch.tensor([2, 2]))
    with torch.no_grad():
        ref = vit(target)[:, 2]
    ivs = [Intervention((), source=0, context=0), Intervention((), source=1, context=1),
           Intervention.single("blocks.2.hook_resid_pre", 0)]
    out = run_interventions(vit, ivs, source, target, metric, batch_size=2)
    torch.testing.assert_close(out[:2], ref, atol=TOL, rtol=0)


def test_all_heads_z_equals_attn_out(vit, pair):
    source, target = pair
    metric = logit_score(torch.tensor([4, 6]))
    for layer in range(3):
        z = run_interventions(vit, [Intervention.single(f"blocks.{layer}.attn.hook_z", None, None, i, i)
                                    for i in range(2)], source, target, metric)
        attn = run_interventions(vit, [Intervention.single(f"blocks.{layer}.hook_attn_out", None, None, i, i)
                                       for i in range(2)], source, target, metric)
        torch.testing.assert_close(z, attn, atol=1e-4, rtol=0)


def test_resid_context_and_result_component(vit, pair):
    source, target = pair
    vit.set_use_attn_result(True)
    try:
        metric = logit_score(torch.tensor([0]))
        ctx_resid = {layer: vit(target[:1], stop_at_layer=layer) for layer in range(4)}
        a = sweep(vit, source[:1], ResidContext(ctx_resid), metric, component="result", layers=[1],
                  per_position=False, progress=False)
        b = sweep(vit, source[:1], target[:1], metric, component="result", layers=[1], per_position=False,
                  progress=False)
        torch.testing.assert_close(a.values, b.values, atol=TOL, rtol=0)
    finally:
        vit.set_use_attn_result(False)


def test_to_grid_and_dataframe(vit, pair):
    source, target = pair
    result = sweep(vit, source[:1], target[:1], logit_score(torch.tensor([0])), progress=False)
    grid = result.to_grid(vit)
    assert grid.dims == ("pair", "layer", "grid_h", "grid_w")
    assert grid.values.shape == (1, 3, 4, 4)
    prefix = vit.cfg.n_prefix_tokens
    torch.testing.assert_close(grid.values[0, 1].flatten(), result.values[0, 1, prefix:])
    df = result.to_dataframe()
    assert len(df) == result.values.numel() and list(df.columns) == ["pair", "layer", "pos", "value"]
    assert result.sel(pair=0, layer=2).values.shape == (vit.cfg.n_ctx,)


def test_bad_requests(vit, pair):
    source, target = pair
    metric = logit_score(torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="unknown component"):
        sweep(vit, source, target, metric, component="nope", progress=False)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        sweep(vit, source, target, metric, layers=[7], progress=False)
    with pytest.raises(ValueError, match="unknown hook"):
        run_interventions(vit, [Intervention.single("blocks.0.hook_nothing", 0)], source, target, metric)
    with pytest.raises(ValueError, match="use_attn_result"):
        sweep(vit, source, target, metric, component="result", progress=False)
    with pytest.raises(IndexError, match="position 99"):
        run_interventions(vit, [Intervention.single("blocks.0.hook_resid_pre", 99)], source, target, metric)


def test_hooks_removed_after_error(vit, pair):
    source, target = pair

    def bad_metric(out, pair):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sweep(vit, source, target, bad_metric, layers=[1], progress=False)
    assert all(not hp._forward_hooks for hp in vit.hook_dict.values())


# ------------------------------------------------------------------------------- hand-built known answers
def test_known_answer_linear_model():
    """Blocks that do nothing (zero weights), average pooling and an identity head: logit c is the mean
    over patches of (patch embedding + position)[c], so patching patch p's residual at any layer moves
    it by exactly (source_p - target_p)[c] / n_patches."""
    cfg = HookedViTConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=8, img_size=8, patch_size=4,
                          n_classes=8, class_token=False, pooling="avg", final_norm=False)
    model = HookedViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.patch_embed.proj.weight.normal_()
        model.pos_embed.normal_()
        model.head.weight.copy_(torch.eye(8))
    g = torch.Generator().manual_seed(0)
    source, target = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    c = 5
    result = sweep(model, source, target, logit_score(torch.tensor([c])), progress=False)
    with torch.no_grad():
        src_emb, tgt_emb = model.patch_embed(source)[0, :, c], model.patch_embed(target)[0, :, c]
    expected = result.context_score + (src_emb - tgt_emb) / 4
    for layer in range(2):
        torch.testing.assert_close(result.values[0, layer], expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- language models
@pytest.fixture(scope="module")
def lm():
    """A TransformerLens bridge around a small random Llama with one key / value head per query head (so
    keys and values may receive path patching)."""
    from tiny_llama import llama_bridge

    return llama_bridge(n_layers=2, n_heads=4, n_kv_heads=4, vocab=20)


def test_same_engine_on_a_language_model(lm):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 20, (1, 6), generator=g)
    corrupt = torch.randint(0, 20, (1, 6), generator=g)
    metric = logit_diff_score(torch.tensor([3]), torch.tensor([4]))
    result = sweep(lm, clean, corrupt, metric, component=["resid_pre", "attn_out"], batch_size=5, progress=False)
    assert result.values.shape == (1, 2, 2, 6)
    writes = [Write(f"blocks.{layer}.hook_{c}", p) for c in ["resid_pre", "attn_out"] for layer in range(2)
              for p in range(6)]
    ref = _loop_reference(lm, clean, corrupt, writes, lambda lg: lg[0, -1, 3] - lg[0, -1, 4])
    torch.testing.assert_close(result.values.flatten(), ref, atol=TOL, rtol=0)
    heads = sweep(lm, clean, corrupt, metric, component="z", per_position=False, progress=False)
    assert heads.dims == ("pair", "layer", "head")
    with torch.no_grad():
        assert torch.allclose(result.source_score, metric(lm(clean), torch.tensor([0])))
    # patching every resid_pre position at layer 0 gives the clean run
    full = run_interventions(lm, [Intervention.single("blocks.0.hook_resid_pre", None)], clean, corrupt, metric)
    torch.testing.assert_close(full, result.source_score, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------- path patching
def _path_patch_reference(model, source, target, metric, sender, receivers, kinds, to_logits, freeze_mlps=False):
    """Slow, obvious path patching for one sender and one pair, with full forwards."""
    _, src = model.run_with_cache(source)
    _, tgt = model.run_with_cache(target)
    n_layers = model.cfg.n_layers
    recorded = {}

    def freeze(act, hook):
        layer = hook.layer()
        act = tgt[hook.name].clone()
        if layer == sender[0]:
            act[:, :, sender[1]] = src[hook.name][:, :, sender[1]]
        return act

    def record(act, hook):
        recorded[hook.name] = act.clone()

    hooks = [(f"blocks.{layer}.attn.hook_z", freeze) for layer in range(n_layers)]
    if freeze_mlps:
        hooks += [(f"blocks.{layer}.hook_mlp_out", lambda act, hook: tgt[hook.name]) for layer in range(n_layers)]
    if not to_logits:
        hooks += [(f"blocks.{layer}.attn.hook_{k}", record) for layer, _ in receivers for k in kinds]
    with torch.no_grad():
        out = model.run_with_hooks(target, fwd_hooks=hooks)
    if to_logits:
        return metric(out, torch.tensor([0]))[0]

    def patch(act, hook):
        act = act.clone()
        for layer, head in receivers:
            if hook.layer() == layer:
                act[:, :, head] = recorded[hook.name][:, :, head]
        return act

    with torch.no_grad():
        out = model.run_with_hooks(target, fwd_hooks=[(f"blocks.{layer}.attn.hook_{k}", patch)
                                                      for layer, _ in receivers for k in kinds])
    return metric(out, torch.tensor([0]))[0]


@pytest.mark.parametrize("receivers,kinds,freeze_mlps", [
    ("logits", ["q"], False),
    ("logits", ["q"], True),
    ([(2, 1), (2, 3)], ["q"], False),
    ([(1, 0), (2, 2)], ["k", "v"], False),
])
def test_path_patching_matches_slow_reference(vit, pair, receivers, kinds, freeze_mlps):
    source, target = pair[0][:1], pair[1][:1]
    metric = logit_score(torch.tensor([3]))
    senders = [(layer, head) for layer in range(3) for head in range(4)]
    fast = path_patch(vit, source, target, metric, senders=senders, receivers=receivers, receiver_input=kinds,
                      freeze_mlps=freeze_mlps, batch_size=5, progress=False)
    to_logits = receivers == "logits"
    ref = torch.stack([_path_patch_reference(vit, source, target, metric, s, [] if to_logits else receivers, kinds,
                                             to_logits, freeze_mlps) for s in senders])
    torch.testing.assert_close(fast[0], ref, atol=1e-4, rtol=0)


def test_path_patching_on_language_model(lm):
    g = torch.Generator().manual_seed(5)
    clean, corrupt = torch.randint(0, 20, (1, 6), generator=g), torch.randint(0, 20, (1, 6), generator=g)
    metric = logit_diff_score(torch.tensor([1]), torch.tensor([2]))
    senders = [(0, h) for h in range(4)]
    fast = path_patch(lm, clean, corrupt, metric, senders=senders, receivers=[(1, 0), (1, 2)], receiver_input="v",
                      progress=False)
    ref = torch.stack([_path_patch_reference(lm, clean, corrupt, metric, s, [(1, 0), (1, 2)], ["v"], False)
                       for s in senders])
    torch.testing.assert_close(fast[0], ref, atol=1e-4, rtol=0)
