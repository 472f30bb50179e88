"""loss.py: pos_weights and the masked BCE / focal / asymmetric losses against hand calculations."""
import math

import pytest
import torch

from loss import LOSSES, MaskedAsymmetric, MaskedBCE, MaskedFocal, make_loss, pos_weights


def softplus(z):  # -log(sigmoid(-z)); so -log(sigmoid(x)) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x)
    return math.log1p(math.exp(z))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---- pos_weights ----

def test_pos_weights_counts_known_cells_only():
    targets = torch.tensor([
        [1, 0, -1],
        [0, -1, 1],
        [-1, 1, 0],
        [0, -1, 1],
        [0, 0, 1],
    ])
    weights, problems = pos_weights(targets)
    # col 0: pos 1, neg 3, NA 1 -> 3/1 = 3.0   (NA as negative would give 4.0)
    # col 1: pos 1, neg 2, NA 2 -> 2/1 = 2.0   (NA as negative would give 4.0)
    # col 2: pos 3, neg 1, NA 1 -> 1/3         (NA as negative would give 2/3)
    assert weights.tolist() == pytest.approx([3.0, 2.0, 1 / 3])
    assert weights.dtype == torch.float32
    assert problems == {}


def test_pos_weights_degenerate_attributes_get_one_and_a_problem():
    targets = torch.tensor([
        [0, 1, -1, 1],
        [0, 1, -1, 0],
        [-1, -1, -1, 0],
        [0, 1, -1, 0],
    ])
    weights, problems = pos_weights(targets)
    # col 0: 0 positives (neg/pos = 3/0 = inf) -> 1.0; col 1: 0 negatives (0/3 = 0) -> 1.0;
    # col 2: all NA (0/0 = NaN) -> 1.0; col 3: pos 1, neg 3 -> 3.0
    assert weights.tolist() == pytest.approx([1.0, 1.0, 1.0, 3.0])
    assert torch.isfinite(weights).all()
    assert sorted(problems) == [0, 1, 2]
    assert "positives" in problems[0]
    assert "negatives" in problems[1]
    assert "positives" in problems[2]


# ---- MaskedBCE ----

def test_bce_equals_torch_bce_without_na():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g) * 3
    targets = (torch.rand(6, 4, generator=g) > 0.5).long()
    pw = torch.tensor([0.5, 1.0, 2.0, 7.0])
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=pw, reduction="mean")(logits, targets.float())
    assert MaskedBCE(pw)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


LOGITS = [[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]
TARGETS = [[1, 0, -1], [0, -1, 1]]
PW = [2.0, 1.0, 0.5]


def test_bce_with_na_hand_computed():
    loss = MaskedBCE(torch.tensor(PW))(torch.tensor(LOGITS), torch.tensor(TARGETS))
    # known cells (NA at (0,2) and (1,1) skipped):
    # (0,0) pos x=2,  pw=2:   -2 * log sigmoid(2)      = 2 * softplus(-2)   = 0.253856
    # (0,1) neg x=-1:         -log(1 - sigmoid(-1))    = softplus(-1)       = 0.313262
    # (1,0) neg x=0:          -log(1 - 0.5)            = log 2              = 0.693147
    # (1,2) pos x=-2, pw=0.5: -0.5 * log sigmoid(-2)   = 0.5 * softplus(2)  = 1.063464
    # sum 2.323729 over 4 known cells = 0.580932
    expected = (2 * softplus(-2) + softplus(-1) + math.log(2) + 0.5 * softplus(2)) / 4
    assert expected == pytest.approx(0.580932, abs=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def _all_losses(pw):
    return [MaskedBCE(pw), MaskedFocal(pw, gamma=2.0, alpha=0.25), MaskedAsymmetric(pw, 4.0, 1.0, 0.05)]


LOSS_IDS = ["bce", "focal", "asymmetric"]


def _loss_and_grad(loss_fn, logits, targets):
    x = torch.tensor(logits, requires_grad=True)
    loss = loss_fn(x, torch.tensor(targets))
    loss.backward()
    return loss.item(), x.grad


@pytest.mark.parametrize("which", range(3), ids=LOSS_IDS)
@pytest.mark.parametrize("na_logit", [7.0, -7.0, 1e4, -1e4, math.inf, -math.inf])
def test_na_cell_changes_nothing_and_gets_zero_gradient(which, na_logit):
    loss_fn = _all_losses(torch.tensor(PW))[which]
    base_loss, base_grad = _loss_and_grad(loss_fn, LOGITS, TARGETS)
    changed = [row[:] for row in LOGITS]
    changed[0][2] = na_logit  # (0,2) is NA
    loss, grad = _loss_and_grad(loss_fn, changed, TARGETS)
    assert math.isfinite(loss)
    assert loss == base_loss
    assert torch.isfinite(grad).all(), grad
    assert grad[0, 2].item() == 0.0
    assert grad[1, 1].item() == 0.0  # the other NA cell
    assert torch.equal(grad, base_grad)
    assert base_grad[0, 0].item() != 0.0  # known cells do get a gradient


@pytest.mark.parametrize("which", range(3), ids=LOSS_IDS)
def test_all_na_batch_gives_zero_loss_and_zero_gradient(which):
    loss_fn = _all_losses(torch.tensor(PW))[which]
    loss, grad = _loss_and_grad(loss_fn, [[3.0, -2.0, 1e4], [0.0, 1.0, -1e4]], [[-1, -1, -1], [-1, -1, -1]])
    assert loss == 0.0
    assert torch.equal(grad, torch.zeros(2, 3))


# ---- MaskedFocal ----

def test_focal_hand_computed():
    loss_fn = MaskedFocal(torch.tensor([2.0, 3.0, 5.0]), gamma=2.0, alpha=0.25)
    loss = loss_fn(torch.tensor([[1.0, 0.5, 9.0]]), torch.tensor([[1, 0, -1]]))
    # pos x=1, pw=2: p = sigmoid(1) = 0.731059; -0.25 * 2 * (1 - p)^2 * log p = 0.5 * 0.072329 * 0.313262 = 0.011329
    # neg x=0.5:     p = sigmoid(0.5) = 0.622459; -0.75 * p^2 * log(1 - p) = 0.75 * 0.387456 * 0.974077 = 0.283059
    # NA x=9 skipped; mean over 2 known cells = 0.147194
    p1, p2 = sigmoid(1.0), sigmoid(0.5)
    pos = -0.25 * 2.0 * (1 - p1) ** 2 * math.log(p1)
    neg = -0.75 * p2 ** 2 * math.log(1 - p2)
    assert pos == pytest.approx(0.011329, abs=1e-6)
    assert neg == pytest.approx(0.283059, abs=1e-6)
    assert loss.item() == pytest.approx((pos + neg) / 2, rel=1e-5)
    assert loss.item() == pytest.approx(0.147194, abs=1e-6)


def random_cells(seed, scale, second):
    """Seeded (5, 3) logits and targets with at least one NA cell and cell (1, 1) set to `second`; pos_weight."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 3, generator=g) * scale
    targets = torch.randint(-1, 2, (5, 3), generator=g)
    targets[0, 0], targets[1, 1] = -1, second
    return logits, targets, torch.tensor([0.3, 1.0, 4.0])


def test_focal_gamma0_alpha_half_is_half_bce():
    logits, targets, pw = random_cells(1, 2, 1)
    focal = MaskedFocal(pw, gamma=0.0, alpha=0.5)(logits, targets)
    bce = MaskedBCE(pw)(logits, targets)
    assert focal.item() == pytest.approx(0.5 * bce.item(), rel=1e-6)


# ---- MaskedAsymmetric ----

def test_asymmetric_hand_computed():
    loss_fn = MaskedAsymmetric(torch.tensor([2.0, 3.0, 5.0, 1.0]), gamma_neg=4.0, gamma_pos=1.0, clip=0.05)
    loss = loss_fn(torch.tensor([[0.5, 1.0, -3.0, 4.0]]), torch.tensor([[1, 0, 0, -1]]))
    # pos x=0.5, pw=2: p = 0.622459; -2 * (1 - p)^1 * log p = 2 * 0.377541 * 0.474077 = 0.357967
    # neg x=1:   p = 0.731059, p_m = 0.681059; -(p_m^4) * log(1 - p_m) = 0.215148 * 1.142748 = 0.245860
    # neg x=-3:  p = 0.047426 < clip 0.05 -> p_m = 0 -> exactly 0
    # NA x=4 skipped; mean over 3 known cells = (0.357967 + 0.245860 + 0) / 3 = 0.201276
    p_pos, p_neg = sigmoid(0.5), sigmoid(1.0)
    pos = -2.0 * (1 - p_pos) * math.log(p_pos)
    p_m = p_neg - 0.05
    neg = -(p_m ** 4) * math.log(1 - p_m)
    assert pos == pytest.approx(0.357967, abs=1e-6)
    assert neg == pytest.approx(0.245860, abs=1e-6)
    assert loss.item() == pytest.approx((pos + neg + 0.0) / 3, rel=1e-5)
    assert loss.item() == pytest.approx(0.201276, abs=1e-6)


def test_asymmetric_easy_negative_contributes_exactly_zero():
    loss_fn = MaskedAsymmetric(torch.tensor([1.0, 1.0]), gamma_neg=4.0, gamma_pos=0.0, clip=0.05)
    # sigmoid(-3) = 0.0474 < 0.05 and sigmoid(-10) = 4.5e-5: both shifted to p_m = 0
    loss, grad = _loss_and_grad(loss_fn, [[-3.0, -10.0]], [[0, 0]])
    assert loss == 0.0
    assert torch.equal(grad, torch.zeros(1, 2))
    # just above the clip it is no longer 0: sigmoid(-2.9) = 0.0522 -> p_m = 0.0022
    assert loss_fn(torch.tensor([[-2.9, -10.0]]), torch.tensor([[0, 0]])).item() > 0


def test_asymmetric_without_focusing_or_clip_is_bce():
    logits, targets, pw = random_cells(2, 3, 0)
    asl = MaskedAsymmetric(pw, gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(logits, targets)
    bce = MaskedBCE(pw)(logits, targets)
    assert asl.item() == pytest.approx(bce.item(), rel=1e-6)


# ---- make_loss ----

def test_make_loss_names():
    pw = torch.tensor([1.0, 2.0])
    assert type(make_loss("bce", pw)) is MaskedBCE
    focal = make_loss("focal", pw, focal_gamma=3.0, focal_alpha=0.2)
    assert type(focal) is MaskedFocal and (focal.gamma, focal.alpha) == (3.0, 0.2)
    asl = make_loss("asymmetric", pw, asl_gamma_neg=2.0, asl_gamma_pos=1.0, asl_clip=0.1)
    assert type(asl) is MaskedAsymmetric and (asl.gamma_neg, asl.gamma_pos, asl.clip) == (2.0, 1.0, 0.1)
    assert asl.pos_weight.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="bce, focal, asymmetric"):
        make_loss("mse", pw)


@pytest.mark.parametrize("name", LOSSES)
def test_int8_targets_give_the_loss_and_pos_weights_of_int64(name):
    # The parser keeps targets int8 (1, 0, -1) up to the batch; nothing may read them as bytes or unsigned.
    targets = torch.tensor([[1, 0, -1], [0, -1, 1], [1, 1, 0], [-1, 0, 0]])
    logits = torch.tensor([[2.0, -1.0, 30.0], [0.5, -40.0, 1.5], [-0.3, 0.2, 0.1], [1.0, -2.0, 0.7]])
    weights, problems = pos_weights(targets.to(torch.int8))
    assert weights.tolist() == pos_weights(targets)[0].tolist() == [0.5, 2.0, 2.0]  # neg/pos: 1/2, 2/1, 2/1
    loss = make_loss(name, weights)
    assert torch.equal(loss(logits, targets.to(torch.int8)), loss(logits, targets))
