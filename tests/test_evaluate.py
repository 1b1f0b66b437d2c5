"""Accuracy metrics shared by training, export and bench."""
from __future__ import annotations

import numpy as np
import torch

from kdtool.evaluate import classification_metrics, topk_accuracy


def test_topk_on_a_known_example():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    targets = torch.tensor([1, 1, 0, 2])
    assert topk_accuracy(logits, targets, ks=(1, 2)) == {"top1": 25.0, "top2": 50.0}


def test_ties_go_to_the_lower_index_like_argmax():
    """Quantised logits tie exactly; export and bench must count such an image the same way."""
    logits = np.array([[1.0, 3.0, 3.0, 0.0]] * 8, dtype=np.float32)
    assert topk_accuracy(logits, np.full(8, 1), ks=(1,))["top1"] == 100.0
    assert topk_accuracy(logits, np.full(8, 2), ks=(1,))["top1"] == 0.0


def test_agreement_and_kl_against_a_reference():
    reference = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    metrics = classification_metrics(reference.clone(), torch.tensor([0, 0]), reference)
    assert metrics["top1"] == 50.0 and metrics["teacher_agreement"] == 100.0 and abs(metrics["teacher_kl"]) < 1e-6
    swapped = classification_metrics(reference.flip(1), torch.tensor([0, 0]), reference)
    assert swapped["teacher_agreement"] == 0.0 and swapped["teacher_kl"] > 1.0
