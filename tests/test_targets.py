"""caap.targets: one class index per image, and the score of a class per row."""

import pytest
import torch

from caap.targets import class_score, resolve_targets


class _Model(torch.nn.Module):
    class cfg:
        n_classes = 4

    def forward(self, x):
        return x.flatten(1)[:, :4]


def test_resolve_targets():
    model, pixels = _Model(), torch.randn(3, 3, 2, 2)
    assert resolve_targets(model, pixels, None).tolist() == model(pixels).argmax(-1).tolist()
    assert resolve_targets(model, pixels, 2).tolist() == [2, 2, 2]
    assert resolve_targets(model, pixels, [0, 1, 3]).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="out of range: accepted 0..3"):
        resolve_targets(model, pixels, 4)
    with pytest.raises(ValueError, match="integer class index"):
        resolve_targets(model, pixels, 1.0)
    with pytest.raises(ValueError, match="integer class index"):
        resolve_targets(model, pixels, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"one integer class index per image \(3\)"):
        resolve_targets(model, pixels, [0, 1])
    with pytest.raises(ValueError, match="no images"):
        resolve_targets(model, pixels[:0], None)


def test_class_score():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    assert class_score(logits, torch.tensor([1, 2])).tolist() == [2.0, 3.0]
    probs = class_score(logits, torch.tensor([[0, 1], [2, 2]]), "prob")
    torch.testing.assert_close(probs, logits.softmax(-1)[[[0, 0], [1, 1]], [[0, 1], [2, 2]]])
    assert class_score(logits, torch.tensor([1, 0]), "accuracy").tolist() == [1.0, 0.0]
    diff = class_score(logits, torch.tensor([1, 2]), "logit_diff", reference=torch.tensor([1.0, 1.0]))
    assert diff.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown score"):
        class_score(logits, torch.tensor([1, 2]), "margin")
