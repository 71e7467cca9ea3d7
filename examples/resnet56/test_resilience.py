"""Release gates and seed-study checks for the three ResNet56 models of the example (see docs/examples.md).

    pytest examples/resnet56 --hwfault -n 2

* Release gates (``@resilience`` + ``hwfault.assess``): each model must keep its accuracy under bit flips in the
  int8 activation codes (``act``), the weight codes (``weight``) and the int32 accumulators (``acc``) at several
  bit error rates. The thresholds are per model where the models differ, and they encode what the measurements
  (examples/resnet56/RESULTS.md) show on the digits stand-in, with margin.
* Seed-study checks (plain tests with custom assertions): the models' quantization scaling factors, their
  accuracy under a paired fault campaign, and their PGD robustness.

The gated models are the seed-0 ResNet56s trained on the digits stand-in. On them the seed study's first claim
holds (the adversarial model's mean activation scale is larger, and it is less resilient than the vanilla one) and
its remedy does not (weight decay 1e-2 shrinks the scales, but the model is less accurate, less robust and less
resilient). Across three training seeds (RESULTS.md) most of these differences are not significant: the seeds
differ as much as the recipes. The tests assert what holds for these three models, and say so.
"""

from __future__ import annotations

import pytest
import torch
from train import evaluate

from pytest_hwfault import resilience
from pytest_hwfault.campaign import Campaign
from pytest_hwfault.spec import CampaignSpec
from pytest_hwfault.stats import clopper_pearson_interval

RECIPES = ("vanilla", "adversarial", "adversarial_wd")
SAMPLES = 256  # test images per campaign: about +-2 points at 95% after 4 trials, fast on 2 cores

# -- release gates ---------------------------------------------------------------------------------------------------
# Activation bit flips: every model keeps its fault-free int8 accuracy within max_drop. Up to BER 1e-3 (about 1,500
# flipped bits per image) all three qualify for the same gate.


@pytest.mark.parametrize("recipe", RECIPES)
@resilience(ber=[1e-4, 1e-3], site="act", max_drop=0.05, samples=SAMPLES)
def test_release_gate_activations(hwfault, models, val_data, calibration, recipe: str):
    hwfault.assess(models[recipe].model, val_data, calibration_data=calibration)


# Past the knee of the curve the models differ, and so do the gates: the allowed drop is per model. On digits the
# vanilla model loses about 6 points at BER 3e-3 where the adversarial one loses about 12 and the weight-decayed one
# about 25 (4 trials x 256 images); a gate that asked the adversarial ones for the vanilla model's 12 points would
# fail them.
KNEE_BER = 3e-3
KNEE_MAX_DROP = {"vanilla": 0.12, "adversarial": 0.20, "adversarial_wd": 0.35}


@pytest.mark.parametrize("recipe", RECIPES)
@resilience(ber=KNEE_BER, site="act", max_drop=0.08, samples=SAMPLES)
def test_release_gate_activations_at_the_knee(hwfault, models, val_data, calibration, recipe: str):
    hwfault.assess(models[recipe].model, val_data, calibration_data=calibration, max_drop=KNEE_MAX_DROP[recipe])


# Weight bit flips are persistent for a trial (one faulty copy of the weights judged on all images), so the verdict
# rests on per-trial accuracies with a distribution-free interval: a PASS needs a wide gap between the accuracy and
# the floor, or many trials. min_acc=0.7 against ~96% decides within 16 trials.
@pytest.mark.parametrize("recipe", RECIPES)
@resilience(ber=[1e-4, 1e-3], site="weight", min_acc=0.70, samples=SAMPLES, budget=32)
def test_release_gate_weights(hwfault, models, val_data, calibration, recipe: str):
    hwfault.assess(models[recipe].model, val_data, calibration_data=calibration)


# Compute faults: bit flips in the int32 accumulators before requantization.
@pytest.mark.parametrize("recipe", RECIPES)
@resilience(ber=[1e-5, 1e-4], site="acc", max_drop=0.05, samples=SAMPLES)
def test_release_gate_accumulators(hwfault, models, val_data, calibration, recipe: str):
    hwfault.assess(models[recipe].model, val_data, calibration_data=calibration)


# Hardware fault models beyond bit flips in stored codes (README, *Fault models*). A stuck-at-1 bit in one PE's
# accumulator register of the systolic array that computes every conv corrupts a whole column of output channels in
# every layer: most trials hold no faulty PE at this rate, a few are catastrophic (~10% accuracy), so the gate
# judges the mean over trials against a low floor.
@pytest.mark.parametrize("recipe", RECIPES)
@resilience(ber=2e-5, site="pe", array=(16, 16), pe_register="acc", kind="stuck1", min_acc=0.5, samples=64,
            budget=32)
def test_release_gate_systolic_array(hwfault, models, val_data, calibration, recipe: str):
    hwfault.assess(models[recipe].model, val_data, calibration_data=calibration)


# The seed study is about scaling factors: here the stored requantization multipliers and output zero points
# themselves take the bit flips (an exponent bit rescales a whole channel).
@pytest.mark.parametrize("recipe", RECIPES)
@resilience(ber=1e-5, site="qparams", min_acc=0.5, samples=SAMPLES, budget=32)
def test_release_gate_quantization_parameters(hwfault, models, val_data, calibration, recipe: str):
    hwfault.assess(models[recipe].model, val_data, calibration_data=calibration)


# A deploy-time mitigation gated by the same test (README, *Mitigations and the advisor*): Ranger-style range
# restriction clamps each layer's output codes to the per-channel range they take on fault-free data, so a flipped
# high bit cannot blow a value up. The gate judges the mitigated model; the report puts the unmitigated accuracy
# under the same faults beside it.
@resilience(ber=KNEE_BER, site="act", mitigation="range_restriction", max_drop=0.08, samples=SAMPLES)
def test_release_gate_range_restriction(hwfault, models, val_data, calibration):
    result = hwfault.assess(models["vanilla"].model, val_data, calibration_data=calibration)
    outcome = result.outcome()
    assert outcome.unmitigated is not None and outcome.unmitigated.estimate < outcome.accuracy


# -- the seed study's claims, as custom assertions -------------------------------------------------------------------
def act_scales(hwfault, model: torch.nn.Module, calibration: torch.Tensor) -> tuple[float, float]:
    """Mean and max over layers of the per-tensor int8 output (activation) scale."""
    scales = [layer["act_scale"] for layer in hwfault.quantize(model, calibration).summary()]
    return sum(scales) / len(scales), max(scales)


def test_scaling_factors(hwfault, models, calibration):
    """The seed study: adversarial training enlarges the activation scales; strong weight decay shrinks them.

    For these seed-0 ResNet56s both hold on the mean over layers. The largest single scale is the vanilla model's
    (one layer with a wide range), so by the max the first half is reversed. Across seeds (RESULTS.md) the first
    half is not significant: the vanilla seeds' mean scales vary more than the recipes differ."""
    vanilla, adversarial, remedy = (act_scales(hwfault, models[r].model, calibration) for r in RECIPES)
    # holds: strong weight decay shrinks the adversarial model's scales (mean and max)
    assert remedy[0] < adversarial[0] and remedy[1] < adversarial[1], (remedy, adversarial)
    # holds on the mean (the paper's direction); reversed on the max
    assert adversarial[0] > vanilla[0], (adversarial, vanilla)
    assert vanilla[1] > adversarial[1], (vanilla, adversarial)


def paired_accuracy_under_faults(hwfault, model: torch.nn.Module, data, calibration, *, ber: float, trials: int,
                                 samples: int) -> tuple[float, float, float]:
    """Accuracy under activation bit flips with its 95% interval, from a fixed number of trials.

    Every model gets the same campaign name, hence the same fault draws (the architectures are identical): the
    comparison between models is paired."""
    x, y = data
    spec = CampaignSpec(site="act", ber=ber, min_acc=0.0, budget=trials, samples=samples)
    campaign = Campaign(hwfault.quantize(model, calibration), x, y, spec, name="paired-comparison")
    outcomes = [campaign.trial(i) for i in range(trials)]
    correct, images = sum(t.correct for t in outcomes), sum(t.images for t in outcomes)
    low, high = clopper_pearson_interval(correct, images, 0.95)
    return correct / images, low, high


ORDERING_BER = 4e-3  # where the curves have separated (RESULTS.md, seed 0): vanilla ~92%, adversarial ~79%, wd ~57%


@pytest.mark.usefixtures("campaigns_enabled")
def test_resilience_ordering(hwfault, models, val_data, calibration):
    """The seed study: adversarial models are less resilient; weight decay restores resilience.

    For these seed-0 models the first holds (the vanilla model's interval lies above the adversarial model's) and the
    second is reversed: the weight-decayed model is the least resilient (it is also the least accurate, 91.75%
    fault-free). Across seeds neither difference is significant (RESULTS.md)."""
    acc = {r: paired_accuracy_under_faults(hwfault, models[r].model, val_data, calibration, ber=ORDERING_BER,
                                           trials=4, samples=SAMPLES) for r in RECIPES}
    vanilla, adversarial, remedy = (acc[r] for r in RECIPES)
    assert vanilla[1] > adversarial[2], f"vanilla {vanilla} vs adversarial {adversarial}"
    assert adversarial[1] > remedy[2], f"adversarial {adversarial} vs adversarial_wd {remedy}"


PGD_IMAGES = 200


@pytest.fixture(scope="module")
def pgd_accuracy(models, split) -> dict[str, float]:
    """PGD-7 (eps 8/255, step 2/255, random start) accuracy of the float models on the first PGD_IMAGES test images."""
    x, y = split.test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {r: evaluate(models[r].model, x[:PGD_IMAGES], y[:PGD_IMAGES], attack=True) for r in RECIPES}
    finally:
        torch.set_num_threads(threads)


def test_remedy_keeps_robustness(pgd_accuracy):
    """The seed study: the weight decay remedy keeps adversarial robustness.

    Does not hold for these seed-0 models: weight decay 1e-2 costs the adversarial model 5 points of PGD-7 accuracy on
    these 200 images (83% vs 88%; clean: 91.75% vs 97.25%), so at depth 56 and 4 epochs this decay is too strong.
    Adversarial training itself buys little on digits, where the vanilla model is already robust (85%)."""
    assert pgd_accuracy["adversarial"] > pgd_accuracy["vanilla"], pgd_accuracy
    assert pgd_accuracy["adversarial_wd"] < pgd_accuracy["adversarial"] - 0.03, pgd_accuracy


def test_checkpoint_provenance(models):
    """Each checkpoint carries the provenance its training run wrote, and the numbers are those of the run."""
    for recipe, candidate in models.items():
        p = candidate.provenance
        assert p["recipe"]["name"] == recipe and p["depth"] == 56 and p["data"] == "digits"
        assert p["pgd"]["eps_255"] == 8 and p["pgd"]["steps"] == 7 and p["pgd"]["step_255"] == 2
        assert p["clean_accuracy"] >= 0.90, p
