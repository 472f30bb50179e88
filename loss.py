"""Masked, pos-weighted multi-label losses on logits. Targets are 1 / 0 / -1 (NA); NA cells add nothing.

Every loss returns the mean over the known cells of the batch, and 0 (not NaN) when all cells are NA.
"""
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("bce", "focal", "asymmetric")


def pos_weights(targets):
    """pos_weight = negatives / positives per attribute, over known cells; returns (weights, problems).

    An attribute with no positives or no negatives gets 1.0 (neg/pos would be 0, inf or NaN) and a
    message in `problems`, one per such attribute index.
    """
    positives = torch.zeros(targets.shape[1], dtype=torch.float64)
    negatives = torch.zeros(targets.shape[1], dtype=torch.float64)
    for start in range(0, len(targets), 65536):  # in blocks: a bool sum casts the whole operand to int64 (8x)
        block = targets[start:start + 65536]
        positives += (block == 1).sum(0)
        negatives += (block == 0).sum(0)
    problems = {}
    for k in range(targets.shape[1]):
        if positives[k] == 0 or negatives[k] == 0:
            missing = "positives" if positives[k] == 0 else "negatives"
            problems[k] = f"no known {missing} in the training rows; its pos_weight is 1.0"
    ok = (positives > 0) & (negatives > 0)
    weights = torch.where(ok, negatives / positives.clamp(min=1), torch.ones_like(positives))
    return weights.float(), problems


class MaskedLoss(nn.Module):
    """Elementwise loss -[y * pos_weight * L+(x) + (1 - y) * L-(x)], averaged over known cells."""

    def __init__(self, pos_weight):
        super().__init__()
        self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32))

    def positive_term(self, logits):  # L+, the log-likelihood term of a known positive
        return F.logsigmoid(logits)

    def negative_term(self, logits):  # L-, the term of a known negative
        return F.logsigmoid(-logits)

    def forward(self, logits, targets):
        logits = logits.float()
        known = targets >= 0
        # Zero the NA logits first: where() below hides an inf in the value but not in the gradient.
        logits = torch.where(known, logits, torch.zeros_like(logits))
        y = (targets == 1).float()
        elementwise = -(y * self.pos_weight * self.positive_term(logits) + (1 - y) * self.negative_term(logits))
        # where(), not multiplication: an NA cell's loss may be inf and inf * 0 is NaN.
        total = torch.where(known, elementwise, torch.zeros_like(elementwise)).sum()
        return total / known.sum().clamp(min=1)


class MaskedBCE(MaskedLoss):
    """BCEWithLogitsLoss(pos_weight) restricted to the known cells."""


class MaskedFocal(MaskedLoss):
    """Focal loss (Lin et al. 2017): the BCE terms scaled by (1 - p_t)^gamma, weighted alpha / (1 - alpha)."""

    def __init__(self, pos_weight, gamma=2.0, alpha=0.5):
        super().__init__(pos_weight)
        self.gamma, self.alpha = gamma, alpha

    def positive_term(self, logits):
        p = torch.sigmoid(logits)
        return self.alpha * (1 - p) ** self.gamma * F.logsigmoid(logits)

    def negative_term(self, logits):
        p = torch.sigmoid(logits)
        return (1 - self.alpha) * p ** self.gamma * F.logsigmoid(-logits)


class MaskedAsymmetric(MaskedLoss):
    """Asymmetric loss (Ridnik et al. 2021): negatives focused by gamma_neg on a shifted probability
    p_m = max(p - clip, 0), so easy negatives (p < clip) add nothing; positives by gamma_pos."""

    def __init__(self, pos_weight, gamma_neg=4.0, gamma_pos=0.0, clip=0.05):
        super().__init__(pos_weight)
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def positive_term(self, logits):
        p = torch.sigmoid(logits)
        return (1 - p) ** self.gamma_pos * F.logsigmoid(logits)

    def negative_term(self, logits):
        p = torch.sigmoid(logits)
        p_m = (p - self.clip).clamp(min=0)
        # log(1 - p_m), with 1 - p_m = min(1 - p + clip, 1) computed from log-sigmoid when clip is 0.
        log_q = F.logsigmoid(-logits) if self.clip == 0 else torch.log((1 - p_m).clamp(min=1e-8))
        return p_m ** self.gamma_neg * log_q


def make_loss(name, pos_weight, *, focal_gamma=2.0, focal_alpha=0.5, asl_gamma_neg=4.0, asl_gamma_pos=0.0,
              asl_clip=0.05):
    if name == "bce":
        return MaskedBCE(pos_weight)
    if name == "focal":
        return MaskedFocal(pos_weight, focal_gamma, focal_alpha)
    if name == "asymmetric":
        return MaskedAsymmetric(pos_weight, asl_gamma_neg, asl_gamma_pos, asl_clip)
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
