"""Release gates and seed-study checks for the three models of the example (see docs/examples.md).

    pytest examples/resnet56 --hwfault -n 2

* Release gates (``@resilience`` + ``hwfault.assess``): each model must keep its accuracy under bit flips in the
  int8 activation codes (``act``), the weight codes (``weight``) and the int32 accumulators (``acc``) at several
  bit error rates. The thresholds are per model where the models differ, and they encode what the measurements
  (examples/resnet56/RESULTS.md) show on the digits stand-in, with margin.
* Seed-study checks (plain tests with custom assertions): the models' quantization scaling factors, their
  accuracy under a paired fault campaign, and their PGD robustness.

On the digits stand-in the seed study's first claim is *reversed*: the adversarially trained models are more
resilient than the vanilla one, and their activation scales are smaller, not larger. The tests assert what holds
here, and say so; the docs discuss it.
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
# vanilla model loses about 10 points at BER 3e-3 where the adversarial ones lose about 4 (RESULTS.md); a
# gate that asked the vanilla model for 8 points would fail it.
KNEE_BER = 3e-3
KNEE_MAX_DROP = {"vanilla": 0.18, "adversarial": 0.08, "adversarial_wd": 0.08}


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

    On digits the first half is reversed (the vanilla model has the largest scales); the second half holds. What
    also holds is the mechanism's prediction: the model with the largest scales is the least resilient."""
    vanilla, adversarial, remedy = (act_scales(hwfault, models[r].model, calibration) for r in RECIPES)
    # holds on digits: strong weight decay shrinks the adversarial model's scales (mean and max)
    assert remedy[0] < adversarial[0] and remedy[1] < adversarial[1], (remedy, adversarial)
    # reversed on digits (the paper: adversarial > vanilla): here the vanilla model has the largest scales
    assert vanilla[0] > adversarial[0] and vanilla[1] > adversarial[1], (vanilla, adversarial)


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


ORDERING_BER = 5e-3  # where the curves have separated (RESULTS.md): vanilla ~68%, adversarial ~92%


@pytest.mark.usefixtures("campaigns_enabled")
def test_resilience_ordering(hwfault, models, val_data, calibration):
    """The seed study: adversarial models are less resilient; weight decay restores resilience.

    On digits the adversarial models are *more* resilient than the vanilla one (asserted below: what holds), and the
    weight-decayed one is at least as resilient as the plain adversarial one (within 2 points, paired)."""
    acc = {r: paired_accuracy_under_faults(hwfault, models[r].model, val_data, calibration, ber=ORDERING_BER,
                                           trials=4, samples=SAMPLES) for r in RECIPES}
    vanilla, adversarial, remedy = (acc[r] for r in RECIPES)
    assert vanilla[2] < adversarial[1], f"vanilla {vanilla} vs adversarial {adversarial}"
    assert vanilla[2] < remedy[1], f"vanilla {vanilla} vs adversarial_wd {remedy}"
    assert remedy[0] >= adversarial[0] - 0.02, f"adversarial_wd {remedy} vs adversarial {adversarial}"


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
    """The seed study: the weight decay remedy keeps adversarial robustness. Holds on digits."""
    assert pgd_accuracy["adversarial_wd"] >= pgd_accuracy["adversarial"] - 0.03, pgd_accuracy
    assert pgd_accuracy["adversarial_wd"] >= pgd_accuracy["vanilla"] + 0.08, pgd_accuracy


def test_checkpoint_provenance(models):
    """Each checkpoint carries the provenance its training run wrote, and the numbers are those of the run."""
    for recipe, candidate in models.items():
        p = candidate.provenance
        assert p["recipe"]["name"] == recipe and p["depth"] == 20 and p["data"] == "digits"
        assert p["pgd"]["eps_255"] == 8 and p["pgd"]["steps"] == 7 and p["pgd"]["step_255"] == 2
        assert p["clean_accuracy"] >= 0.95, p
