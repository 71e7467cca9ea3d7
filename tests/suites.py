"""Source of the small suites that the pytester tests run in subprocesses."""


def _digits_fixture(shape: str) -> str:
    """The `digits` session fixture: scikit-learn's digits as [N, *shape] inputs in [0, 1], in a fixed order."""
    return f'''
@pytest.fixture(scope="session")
def digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, {shape}) / 16
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]
'''


# A conftest for the inner runs: a small conv net trained on scikit-learn's digits, once per inner session.
DIGITS_CONFTEST = '''
import pytest, torch
from torch import nn
from sklearn.datasets import load_digits

''' + _digits_fixture('1, 8, 8') + '''
@pytest.fixture(scope="session")
def model(digits):
    x, y = digits
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.set_num_threads(1)  # float training differs with the thread count; xdist workers use fewer
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Flatten(), nn.Linear(8 * 64, 10))
        opt = torch.optim.Adam(net.parameters(), 2e-2)
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[:1200]), y[:1200]).backward()
            opt.step()
    torch.set_num_threads(threads)
    return net.eval()

@pytest.fixture(scope="session")
def val_data(digits):
    x, y = digits
    return x[1200:1500], y[1200:1500]
'''

# A conftest for the hostile-input suites: a small MLP on the digits, and variants of it and its data that no gate
# may pass. Everything is seeded and trained on one thread, so every xdist worker builds the same models.
MLP_CONFTEST = '''
import os
import pytest, torch
from torch import nn
from sklearn.datasets import load_digits


def _train(net, x, y, steps=40):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(1)
            opt = torch.optim.Adam(net.parameters(), 2e-2)
            for _ in range(steps):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def mlp(act=None, seed=0, outputs=10):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 32), act or nn.ReLU(), nn.Linear(32, outputs))


''' + _digits_fixture('64') + '''

@pytest.fixture(scope="session")
def model(digits):
    x, y = digits
    return _train(mlp(), x[:1200], y[:1200])


@pytest.fixture(scope="session")
def val_data(digits):
    x, y = digits
    return x[1200:1500], y[1200:1500]
'''

# Gates that the plugin once passed without testing the model (issue 12); run with MLP_CONFTEST under -n 0 and -n 2.
HOSTILE_SUITE = '''
import pytest, torch
from torch import nn
from conftest import mlp, _train
from pytest_hwfault import resilience


def float_accuracy(net, data):
    x, y = data
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


# 1. two models with one state dict and different architectures are two models
@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4)
def test_arch_relu(hwfault, model, val_data):
    assert hwfault.assess(model, val_data).float_accuracy == float_accuracy(model, val_data)


@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4)
def test_arch_hardtanh(hwfault, model, val_data):
    other = mlp(nn.Hardtanh(0.0, 0.5))
    other.load_state_dict(model.state_dict())
    own = float_accuracy(other.eval(), val_data)
    assert own != float_accuracy(model, val_data)  # the architectures really compute different functions
    assert hwfault.assess(other, val_data).float_accuracy == own


# 1b. equal architectures and state dicts, different functions: an activation kept as an attribute, a module global
GAIN = 1.0


class Activated(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(64, 32), nn.Linear(32, 10), act

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def gained(x):
    return torch.relu(x * GAIN)


def activated(model, act):
    other = Activated(act)
    other.a.load_state_dict(model[0].state_dict())
    other.b.load_state_dict(model[2].state_dict())
    return other.eval()


@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4)
def test_attribute_relu(hwfault, model, val_data):
    other = activated(model, torch.relu)
    assert hwfault.assess(other, val_data).float_accuracy == float_accuracy(other, val_data)


@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4)
def test_attribute_tanh(hwfault, model, val_data):
    other = activated(model, torch.tanh)
    own = float_accuracy(other, val_data)
    assert own != float_accuracy(activated(model, torch.relu), val_data)
    assert hwfault.assess(other, val_data).float_accuracy == own


@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4)
def test_global_gain(hwfault, model, val_data):
    assert hwfault.assess(activated(model, gained), val_data).float_accuracy == float_accuracy(model, val_data)


@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4)
def test_global_gain_negated(hwfault, model, val_data, monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules[__name__], "GAIN", -1.0)
    other = activated(model, gained)
    own = float_accuracy(other, val_data)
    assert own != float_accuracy(model, val_data)
    assert hwfault.assess(other, val_data).float_accuracy == own


# 2. verdicts that xdist used to lose
def test_unmarked_gate_fails(hwfault, model, val_data):
    hwfault.assess(model, val_data, site="act", ber=1e-3, min_acc=0.999, budget=8)


@pytest.mark.parametrize("ber", [pytest.param(1e-3, marks=pytest.mark.resilience(
    ber=1e-3, site="act", min_acc=0.999, budget=8))])
def test_param_marker_gate_fails(hwfault, model, val_data, ber):
    hwfault.assess(model, val_data)


@resilience(ber=1e-3, site="act", min_acc=0.999, budget=8)
def test_two_calls_first_fails(hwfault, model, val_data):
    hwfault.assess(model, val_data)
    hwfault.assess(model, val_data, min_acc=0.0)


# 3. shards that build different models (here: each shard seeds its own init)
@resilience(ber=1e-4, site="act", min_acc=0.0, budget=8)
def test_model_differs_per_shard(hwfault, digits, val_data, request):
    x, y = digits
    net = _train(mlp(seed=2 if "shard2" in request.node.name else 1), x[:1200], y[:1200], steps=10)
    hwfault.assess(net, val_data)


# 4. max_drop gates with nothing sane to drop from
@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_labels_out_of_range(hwfault, model, val_data):
    x, y = val_data
    hwfault.assess(model, (x, y + 10))


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_fewer_logits_than_classes(hwfault, val_data):
    hwfault.assess(mlp(outputs=5).eval(), val_data)


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_output_not_logits(hwfault, val_data):
    spatial = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 10, 3, padding=1))
    hwfault.assess(spatial.eval(), val_data)


@resilience(ber=1e-4, site="weight", max_drop=0.5, budget=8)
def test_baseline_at_chance(hwfault, model, val_data):
    x, y = val_data
    hwfault.assess(model, (x, (y + 1) % 10))


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_input_nan(hwfault, model, val_data):
    x, y = val_data
    x = x.clone()
    x[3, 5] = float("nan")
    hwfault.assess(model, (x, y))


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_one_logit_binary(hwfault, val_data):
    x, y = val_data
    hwfault.assess(mlp(outputs=1).eval(), (x, (y > 4).long()))


class _WritesInput(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.sub_(0.1))


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_writes_its_input(hwfault, model, val_data):
    hwfault.assess(_WritesInput(model), val_data)


class _DropoutLeftOn(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.nn.functional.dropout(x, 0.3, training=True))


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_dropout_left_on(hwfault, model, val_data):
    hwfault.assess(_DropoutLeftOn(model), val_data)


class _BatchStatistics(torch.nn.Module):
    """Centres each input on its batch's mean: each image's prediction reads the others'."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x - 0.5 * x.mean(0, keepdim=True))


@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4)
def test_images_read_each_other(hwfault, model, val_data):
    hwfault.assess(_BatchStatistics(model), val_data)


class _BatchBranch(torch.nn.Module):
    """Another branch for small batches, as a campaign runs its faulty images: they would run in float."""

    def __init__(self, inner):
        super().__init__()
        import copy
        self.inner, self.small = inner, copy.deepcopy(inner)

    def forward(self, x):
        return self.inner(x) if len(x) > 32 else self.small(x)


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_batch_dependent_branch(hwfault, model, val_data):
    hwfault.assess(_BatchBranch(model), val_data)


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_bfloat16_model(hwfault, model, val_data):
    import copy
    x, y = val_data
    hwfault.assess(copy.deepcopy(model).bfloat16(), (x.bfloat16(), y))


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_traced_model(hwfault, model, val_data):
    x, y = val_data
    hwfault.assess(torch.jit.trace(model, x[:2]), val_data)


# compute the faults cannot reach: a convolution by kernels computed from each image (dynamic filters, a Siamese
# tracker's cross-correlation) multiplies two activations, and no layer kind holds it, so it stays in float
class FunctionalStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(8, 1, 3, 3) / 3)
        self.head = nn.Linear(8 * 64, 10)

    def forward(self, x):
        x = x.reshape(-1, 1, 8, 8)
        n = len(x)
        kernels = (self.kernel * (1 + x.mean((1, 2, 3))).reshape(n, 1, 1, 1, 1)).reshape(n * 8, 1, 3, 3)
        x = nn.functional.conv2d(x.reshape(1, n, 8, 8), kernels, padding=1, groups=n)
        return self.head(nn.functional.relu(x).reshape(n, 8 * 64))


def _trained(make, seed, digits):
    x, y = digits
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = make()
    return _train(net, x[:1200], y[:1200])


@pytest.fixture(scope="session")
def functional_stem(digits):
    return _trained(FunctionalStem, 3, digits)


@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4)
def test_uncovered_compute_refused(hwfault, functional_stem, val_data):
    hwfault.assess(functional_stem, val_data)


@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4, min_coverage=0.5)
def test_uncovered_compute_accepted_knowingly(hwfault, functional_stem, val_data):
    hwfault.assess(functional_stem, val_data)


@resilience(search="act", max_flips=1, max_drop=0.9, examples=5, seed=0)
def test_uncovered_search_refused(hwfault, functional_stem, val_data):
    hwfault.assess(functional_stem, val_data)


# torch's flop counter has no formula for nn.Bilinear's op: its MACs were not counted and the coverage said 100%
class BilinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(64, 16)
        self.pair = nn.Bilinear(16, 16, 10)

    def forward(self, x):
        h = nn.functional.relu(self.stem(x))
        return self.pair(h, h)


@pytest.fixture(scope="session")
def bilinear_head(digits):
    return _trained(BilinearHead, 4, digits)


@resilience(ber=1e-4, site="act", min_acc=0.0, budget=4)
def test_bilinear_head_refused(hwfault, bilinear_head, val_data):
    hwfault.assess(bilinear_head, val_data)


# 7. the fixture's contract
def test_assess_without_campaign(hwfault, model, val_data):
    hwfault.assess(model, val_data)


@resilience(ber=1e-4, site="act", max_drop=0.5, budget=8)
def test_refusal_checked_by_the_test(hwfault, model, val_data):
    x, y = val_data
    with pytest.raises(pytest.fail.Exception, match="outside the model's 10 output classes"):
        hwfault.assess(model, (x, y + 10))
'''
