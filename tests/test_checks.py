"""Integer, range and count arguments (`hooked_vit.checks`) and the public API that uses them: integral
types of any kind taken as integers, floats and booleans refused with the received type in the message,
and score functions used with another number of pairs than they were built for refused with both counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caap import CAAP
from caap.patching import Intervention, logit_diff_score, logit_score, path_patch, prob_score, run_interventions, sweep
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.checks import (
    ArgumentTypeError,
    IndexRangeError,
    as_int,
    check_index,
    check_indices,
    check_int,
    check_layer_range,
    check_positive_int,
)

INTEGRAL = [3, np.int64(3), np.int32(3), np.uint8(3), np.array(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32)]
NOT_INTEGRAL = [
    (True, "bool True"),
    (np.bool_(True), "numpy.bool"),
    (2.5, "float 2.5"),
    (3.0, "float 3.0"),  # a whole float is still a float
    (np.float64(3.0), "numpy.float64"),
    (torch.tensor(3.0), "torch.float32 tensor"),
    (torch.tensor(True), "torch.bool tensor"),
    (torch.tensor([3]), "tensor of shape (1,)"),
    (np.array([3]), "array of shape (1,)"),
    ("3", "str '3'"),
    (None, "NoneType None"),
]


# ------------------------------------------------------------------------------------------ the helpers
@pytest.mark.parametrize("value", INTEGRAL, ids=lambda v: type(v).__name__ + str(getattr(v, "dtype", "")))
def test_integral_types_are_integers(value):
    got = as_int(value, "x")
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("value, shown", NOT_INTEGRAL, ids=[s for _, s in NOT_INTEGRAL])
def test_other_types_are_refused_naming_the_type(value, shown):
    with pytest.raises(ArgumentTypeError, match="batch_size must be an integer") as info:
        as_int(value, "batch_size")
    assert shown in str(info.value)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_ranges_and_counts():
    assert check_positive_int(np.int64(1), "n") == 1
    with pytest.raises(ValueError, match="n_masks must be at least 1, got 0"):
        check_positive_int(0, "n_masks")
    with pytest.raises(ValueError, match="k must be in 1..4, got 5"):
        check_int(5, "k", 1, 4)
    with pytest.raises(ValueError, match="x must be at most 2, got 3"):
        check_int(3, "x", high=2)
    assert check_int(-7, "x") == -7


def test_indices_count_from_the_end_and_refuse_outside():
    assert check_index(np.int64(-1), 4, "head") == 3 and check_index(torch.tensor(2), 4, "head") == 2
    with pytest.raises(IndexRangeError, match=r"head 4 is out of range: accepted -4\.\.3") as info:
        check_index(4, 4, "head")
    assert isinstance(info.value, IndexError) and isinstance(info.value, ValueError)
    with pytest.raises(IndexRangeError, match=r"head -5 is out of range"):
        check_index(-5, 4, "head")
    with pytest.raises(IndexRangeError, match="axis is empty"):
        check_index(0, 0, "position")
    assert check_indices(torch.tensor([0, -1]), 3, "layer") == [0, 2]
    assert check_indices(np.array([1, 2]), 3, "layer") == [1, 2]
    assert check_indices(np.int64(1), 3, "layer") == [1]
    with pytest.raises(ArgumentTypeError, match="layer must be an integer, got float 1.0"):
        check_indices([0, 1.0], 3, "layer")
    with pytest.raises(ValueError, match="1-d list"):
        check_indices(torch.zeros(2, 2, dtype=torch.long), 3, "layer")


def test_layer_ranges():
    assert check_layer_range((np.int64(8), np.int64(11)), 12) == (8, 11)
    assert check_layer_range(torch.tensor([8, 11]), 12) == (8, 11)
    assert check_layer_range([0, 0], 1) == (0, 0)
    with pytest.raises(ValueError, match=r"layers=\(8, 12\) is not a valid range: need 0 <= start <= end <= 11"):
        check_layer_range((8, 12), 12)
    with pytest.raises(ValueError, match=r"layers=\(9, 8\) is not a valid range"):
        check_layer_range((9, 8), 12)
    with pytest.raises(ArgumentTypeError, match=r"layers\[1\] \(end\) must be an integer, got float 11.0"):
        check_layer_range((8, 11.0), 12)
    with pytest.raises(ValueError, match="must be a pair"):
        check_layer_range(8, 12)
    with pytest.raises(ValueError, match="must be a pair"):
        check_layer_range((1, 2, 3), 12)


# ------------------------------------------------------------------------------------------ the public API
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    cfg = HookedViTConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, img_size=16, patch_size=8,
                          n_classes=10)
    model = HookedViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)


def test_caap_takes_numpy_and_tensor_integers(vit, images):
    pixels = images[0]
    expected = CAAP(vit, layers=(1, 2), context="grey", batch_size=3).attribute(pixels, target=4)
    for layers, batch_size in (((np.int64(1), np.int64(2)), np.int64(3)), (torch.tensor([1, 2]), torch.tensor(3))):
        method = CAAP(vit, layers=layers, context="grey", batch_size=batch_size)
        assert method.layers == (1, 2) and type(method.layers[0]) is int and method.batch_size == 3
        torch.testing.assert_close(method.attribute(pixels, target=np.int64(4)), expected, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 2.5}, "batch_size must be an integer, got float 2.5"),
    ({"batch_size": True}, "batch_size must be an integer, got bool True"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"layers": (1.0, 2)}, r"layers\[0\] \(start\) must be an integer, got float 1.0"),
    ({"layers": (1, 3)}, r"layers=\(1, 3\) is not a valid range: need 0 <= start <= end <= 2"),
])
def test_caap_refuses_bad_integers_at_construction(vit, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CAAP(vit, context="grey", **kwargs)


def test_sweep_takes_integral_indices_and_refuses_floats(vit, images):
    source, context = images
    score = logit_score(torch.tensor([1, 2]))
    a = sweep(vit, source, context, score, component="z", layers=[1, 2], heads=[0, 3], positions=[0, 2],
              progress=False)
    b = sweep(vit, source, context, score, component="z", layers=np.array([1, 2]), heads=torch.tensor([0, 3]),
              positions=[np.int64(0), torch.tensor(-3)], batch_size=np.int64(5), progress=False)
    torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)
    assert a.coords == b.coords and all(type(v) is int for v in b.coords["layer"] + b.coords["head"])
    with pytest.raises(ArgumentTypeError, match="layer must be an integer, got float 1.0"):
        sweep(vit, source, context, score, layers=[1.0], progress=False)
    with pytest.raises(ValueError, match="batch_size must be an integer, got float 2.5"):
        sweep(vit, source, context, score, batch_size=2.5, progress=False)
    with pytest.raises(IndexRangeError, match=r"position 5 is out of range: accepted -5\.\.4"):
        sweep(vit, source, context, score, positions=[5], progress=False)


@pytest.mark.parametrize("make", [
    lambda: logit_score(torch.tensor([1])),
    lambda: prob_score([1]),
    lambda: logit_diff_score(torch.tensor([1]), torch.tensor([2])),
])
def test_a_score_function_built_for_one_pair_refuses_two(vit, images, make):
    source, context = images
    score = make()
    assert score.n_pairs == 1
    with pytest.raises(ValueError, match="built for 1 pair and is used with 2 pairs"):
        sweep(vit, source, context, score, progress=False)
    with pytest.raises(ValueError, match="built for 1 pair and is used with 2 pairs"):
        path_patch(vit, source, context, score, senders=[(0, 0)], progress=False)
    rows = [Intervention.single("blocks.0.hook_resid_pre", 1, source=i, context=i) for i in range(2)]
    with pytest.raises(ValueError, match="built for 1 pair and is used with 2 pairs"):
        run_interventions(vit, rows, source, context, score)
    with pytest.raises(ValueError, match="built for 1 pair and is used with 2 pairs"):  # called directly
        score(torch.zeros(2, 10), torch.tensor([0, 1]))


def test_score_functions_for_three_pairs_refuse_two_and_one_for_all_takes_any(vit, images):
    source, context = images
    with pytest.raises(ValueError, match="built for 3 pairs and is used with 2 pairs"):
        sweep(vit, source, context, logit_score(torch.tensor([1, 2, 3])), progress=False)
    for one_for_all in (logit_score(4), logit_score(np.int64(4)), logit_score(torch.tensor(4))):
        assert one_for_all.n_pairs is None
        torch.testing.assert_close(one_for_all(torch.arange(20.0).view(2, 10), torch.tensor([0, 1])),
                                   torch.tensor([4.0, 14.0]))
    # rows that use some of the pairs only: accepted (pairs 0 and 1 of a 3-pair score)
    rows = [Intervention.single("blocks.0.hook_resid_pre", 1, source=i, context=i) for i in range(2)]
    run_interventions(vit, rows, source, context, logit_score(torch.tensor([1, 2, 3])))
    with pytest.raises(ValueError, match="different numbers of pairs"):
        logit_diff_score(torch.tensor([1, 2]), torch.tensor([3]))
    with pytest.raises(ValueError, match="classes must be class"):
        logit_score(torch.tensor([1.0, 2.0]))
    with pytest.raises(ArgumentTypeError, match="classes must be an integer, got float 1.5"):
        logit_score(1.5)
    with pytest.raises(ValueError, match=r"pairs must be one integer pair index per intervention \[2\]"):
        run_interventions(vit, rows, source, context, logit_score(1), pairs=torch.tensor([0.0, 1.0]))


def test_path_patching_heads_of_any_integral_type(vit, images):
    source, context = images
    score = logit_score(torch.tensor([1, 2]))
    a = path_patch(vit, source, context, score, senders=[(0, 1), (1, 2)], progress=False)
    b = path_patch(vit, source, context, score, senders=[(np.int64(0), torch.tensor(1)), torch.tensor([1, 2])],
                   progress=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ArgumentTypeError, match="a sender's head must be an integer, got float 1.0"):
        path_patch(vit, source, context, score, senders=[(0, 1.0)], progress=False)
    with pytest.raises(ValueError, match="each receiver must be a \\(layer, head\\) pair, got int 3"):
        path_patch(vit, source, context, score, senders=[(0, 1)], receivers=[3], progress=False)


def test_model_layers_and_config_sizes(vit, images):
    x = images[0]
    with torch.no_grad():
        resid = vit(x, stop_at_layer=np.int64(1))
        torch.testing.assert_close(vit(resid, start_at_layer=torch.tensor(1)), vit(x), atol=1e-5, rtol=0)
        with pytest.raises(ArgumentTypeError, match="start_at_layer must be an integer, got float 1.0"):
            vit(resid, start_at_layer=1.0)
        with pytest.raises(IndexRangeError, match="stop_at_layer=4 is out of range"):
            vit(x, stop_at_layer=4)
    cfg = HookedViTConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, img_size=np.int64(16),
                          patch_size=(np.int32(8), 8), n_classes=3)
    assert cfg.img_size == (16, 16) and cfg.patch_size == (8, 8) and type(cfg.img_size[0]) is int
    with pytest.raises(ArgumentTypeError, match="img_size must be an integer, got float 16.5"):
        HookedViTConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, img_size=16.5, patch_size=8)


def test_baselines_and_metrics(vit, images):
    from caap.baselines import RISE, TIS, AtMan, AttentionRollout, IntegratedGradients, Occlusion
    from caap.metrics import Deletion, Insertion, MoRF, ROADMoRF, TokenDeletion

    rise = RISE(vit, n_masks=np.int64(8), s=torch.tensor(2), internal_batch_size=np.int64(4))
    assert (rise.n_masks, rise.s, rise.internal_batch_size) == (8, 2, 4) and type(rise.n_masks) is int
    assert AttentionRollout(vit, start_layer=np.int64(-1)).start_layer == 2
    assert AtMan(vit, layers=np.array([0, -1])).layers == [0, 2]
    cases = [
        (lambda: RISE(vit, n_masks=2.5), "n_masks must be an integer, got float 2.5"),
        (lambda: TIS(vit, n_masks=True), "n_masks must be an integer, got bool True"),
        (lambda: IntegratedGradients(vit, n_steps=0), "n_steps must be at least 1, got 0"),
        (lambda: Occlusion(vit, internal_batch_size=4.0), "internal_batch_size must be an integer, got float 4.0"),
        (lambda: AttentionRollout(vit, start_layer=3), r"start_layer 3 is out of range: accepted -3\.\.2"),
        (lambda: AtMan(vit, layers=[0.0]), "layers must be an integer, got float 0.0"),
        (lambda: Insertion(batch_size=2.5), "batch_size must be an integer, got float 2.5"),
        (lambda: Deletion(n_steps=np.float64(7.0)), "n_steps must be an integer, got numpy.float64 7.0"),
        (lambda: MoRF(n_steps=0), "n_steps must be at least 1, got 0"),
        (lambda: TokenDeletion(n_steps=2.0), "n_steps must be an integer, got float 2.0"),
        (lambda: ROADMoRF(batch_size=0), "batch_size must be at least 1, got 0"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    assert Insertion(batch_size=np.int64(3), n_steps=torch.tensor(7)).n_steps == 7


def test_persuasion_counts(vit):
    from caap.persuasion import logit_diff_fn, random_head_sets, top_heads

    scores = torch.arange(24.0).view(2, 3, 4)
    assert top_heads(scores, np.int64(2)) == [(2, 3), (2, 2)]
    with pytest.raises(ValueError, match="k must be in 1..12, got 13"):
        top_heads(scores, 13)
    with pytest.raises(ArgumentTypeError, match="k must be an integer, got float 2.0"):
        top_heads(scores, 2.0)
    sets = random_head_sets(vit, np.int64(2), torch.tensor(3), exclude=[(0, 0)])
    assert len(sets) == 3 and all(len(s) == 2 and (0, 0) not in s for s in sets)
    with pytest.raises(ValueError, match="k must be in 1..11, got 12"):
        random_head_sets(vit, 12, 1, exclude=[(0, 0)])
    score = logit_diff_fn(torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="built for 1 pair and is used with 2 pairs"):
        score(torch.zeros(2, 5, 10), torch.tensor([0, 1]))


def test_dataset_settings_and_run_arguments(tmp_path):
    from caap.dataset import DatasetSettings, list_items

    settings = DatasetSettings(model="vit_tiny_patch16_224", layers=(np.int64(8), torch.tensor(11)))
    assert settings.layers == (8, 11) and type(settings.layers[0]) is int
    with pytest.raises(ArgumentTypeError, match=r"layers\[0\] \(start\) must be an integer, got float 8.0"):
        DatasetSettings(model="vit_tiny_patch16_224", layers=(8.0, 11))
    with pytest.raises(ValueError, match=r"layers=\(8, 12\) is not a valid range"):
        DatasetSettings(model="vit_tiny_patch16_224", layers=(8, 12)).resolved()
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="limit must be an integer, got float 1.5"):
        list_items(tmp_path, limit=1.5)
