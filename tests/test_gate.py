"""Unit tests of the gate's engine room: model identity, the quantize-once cache, input checks."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from pytest_hwfault.data import DataError
from pytest_hwfault.gate import ModelCache, calibration_tensor, prepare, resolve_device
from pytest_hwfault.identity import model_fingerprint

CPU = torch.device("cpu")


def _mlp(act: nn.Module | None = None) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 6), act or nn.ReLU(), nn.Linear(6, 3)).eval()


class Scaled(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.net = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


class Shifted(Scaled):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.scale


def test_fingerprints_tell_apart_models_with_one_state_dict() -> None:
    relu, hardtanh = _mlp(), _mlp(nn.Hardtanh(0.0, 0.5))
    assert relu.state_dict().keys() == hardtanh.state_dict().keys()
    models = [relu, hardtanh, _mlp(nn.Hardtanh(0.0, 0.6)), Scaled(2.0), Scaled(3.0), Shifted(2.0)]
    assert len({model_fingerprint(m) for m in models}) == len(models)
    assert model_fingerprint(copy.deepcopy(relu)) == model_fingerprint(relu)
    with torch.no_grad():
        relu[0].weight[0, 0] += 1e-6
    assert model_fingerprint(relu) != model_fingerprint(_mlp())


def test_fingerprints_of_torch_ao_models_read_their_packed_codes() -> None:
    """torch.ao keeps a Linear's (weight, bias) and an LSTM's packed cells beside its tensors: hashed by their repr, a
    code in the elided middle of a large weight went unseen (two different models, one fingerprint: the model
    cache would have handed the second the first one's view) and a packed cell hashed its memory address (a
    different fingerprint in every process: each xdist shard saw "different models")."""
    import warnings

    import torch.ao.quantization as tq

    class Sequence(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0][:, -1])

    def dynamic(model: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tq.quantize_dynamic(model.eval(), {nn.LSTM, nn.Linear}, dtype=torch.qint8)

    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 64))
    edited = copy.deepcopy(head)
    with torch.no_grad():
        edited[0].weight[30, 8] += 0.05  # the middle of a 64 x 16 weight, which a tensor's repr elides
    a, b = dynamic(head), dynamic(edited)
    assert not torch.equal(a[0].weight().int_repr(), b[0].weight().int_repr())
    assert model_fingerprint(a) != model_fingerprint(b)
    recurrent = dynamic(Sequence())
    assert model_fingerprint(copy.deepcopy(recurrent)) == model_fingerprint(recurrent)  # new packed objects


def test_the_cache_reuses_a_model_and_only_that_model() -> None:
    cache = ModelCache()
    x = torch.randn(32, 8)
    relu = cache.get(_mlp(), x, CPU, 8, {})
    assert cache.get(_mlp(), x, CPU, 8, {}) is relu and cache.hits == 1  # the same model, built again
    other = _mlp(nn.Hardtanh(0.0, 0.5))
    other.load_state_dict(_mlp().state_dict())
    assert cache.get(other, x, CPU, 8, {}) is not relu
    assert cache.get(_mlp(), x, CPU, 4, {}) is not relu
    assert cache.get(_mlp(), x + 1, CPU, 8, {}) is not relu


def test_prepare_refuses_non_finite_inputs_and_calibration() -> None:
    x, y = torch.randn(20, 8), torch.randint(0, 3, (20,))
    bad = x.clone()
    bad[7, 2] = float("inf")
    with pytest.raises(DataError, match=r"evaluation inputs hold NaN or Inf values \(1 of 20 images, the first at "
                                        r"index 7\)"):
        prepare(_mlp(), (bad, y), samples=None, bits=8, cache=ModelCache(), device=CPU)
    with pytest.raises(DataError, match="calibration data hold NaN"):
        calibration_tensor((bad, y))
    prepared = prepare(_mlp(), (x, y), samples=10, bits=8, cache=ModelCache(), device=CPU)
    assert len(prepared.inputs) == 10 and set(prepared.identity) == {"model", "data"}


def test_calibration_data_that_reads_differently_twice_is_refused() -> None:
    """Calibration images drawn anew at every read quantized another model in every run (under -n 2, in every shard:
    an invalid campaign blamed on model construction); refused as such. Stable forms are read alike."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    class Noisy(Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.randn(8), i % 3

    for data in (Noisy(), DataLoader(Noisy(), batch_size=16)):
        with pytest.raises(DataError, match=r"the calibration data \(.*\) gives different images when read twice"):
            calibration_tensor(data)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    for data in (x, (x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=16)):
        assert torch.equal(calibration_tensor(data), x)
    with pytest.raises(DataError, match="the calibration data is empty"):
        calibration_tensor(DataLoader(TensorDataset(x[:0], y[:0]), batch_size=16))


def test_more_samples_than_the_data_holds_are_refused() -> None:
    """samples=1000 on 20 images ran on the 20 silently: a verdict about another set than the one asked for."""
    from torch.utils.data import DataLoader, TensorDataset

    from pytest_hwfault.campaign import Campaign
    from pytest_hwfault.quantization import quantize
    from pytest_hwfault.spec import CampaignSpec

    x, y = torch.randn(20, 8), torch.randint(0, 3, (20,))
    message = r"samples=21 but the evaluation data holds 20 labelled images: give more data, or ask for samples=20"
    for data in ((x, y), DataLoader(TensorDataset(x, y), batch_size=6)):
        with pytest.raises(DataError, match=message):
            prepare(_mlp(), data, samples=21, bits=8, cache=ModelCache(), device=CPU)
        assert len(prepare(_mlp(), data, samples=20, bits=8, cache=ModelCache(), device=CPU).inputs) == 20
    with pytest.raises(DataError, match=message):
        Campaign(quantize(_mlp(), x), x, y, CampaignSpec(site="act", ber=1e-3, min_acc=0.0, samples=21), "t")


def test_empty_evaluation_data_is_refused() -> None:
    """Zero images as (X, y) tensors crashed in a reshape; as a DataLoader they were refused: both refused."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(0, 8), torch.randint(0, 3, (0,))
    for data in ((x, y), DataLoader(TensorDataset(x, y), batch_size=6)):
        with pytest.raises(DataError, match="the evaluation data is empty"):
            prepare(_mlp(), data, samples=None, bits=8, cache=ModelCache(), device=CPU)


class _Stream(torch.utils.data.IterableDataset):
    """`count` labelled images (None: without end), the same at every read."""

    def __init__(self, count: int | None) -> None:
        self.count = count

    def __iter__(self):  # type: ignore[no-untyped-def]
        generator = torch.Generator().manual_seed(0)
        for i in itertools.count() if self.count is None else range(self.count):
            yield torch.randn(8, generator=generator), i % 3


def test_an_iterable_dataset_is_read_as_the_stream_it_is() -> None:
    """An IterableDataset given as such died in a bare "object of type ... has no len()": it is read in order, as a
    DataLoader over it reads it."""
    from torch.utils.data import DataLoader

    x = prepare(_mlp(), DataLoader(_Stream(20), batch_size=6), samples=None, bits=8, cache=ModelCache(),
                device=CPU).inputs
    prepared = prepare(_mlp(), _Stream(20), samples=None, bits=8, cache=ModelCache(), device=CPU)
    assert torch.equal(prepared.inputs, x) and len(x) == 20
    assert torch.equal(prepared.labels, torch.arange(20) % 3)
    assert torch.equal(calibration_tensor(_Stream(20)), x)


def test_an_endless_stream_is_refused_unless_samples_bounds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream without a length and without end, with no samples=, was read until memory ran out: a CI job hung
    without a word. Past a bound it is refused, naming samples=; with samples= it is read that far."""
    from torch.utils.data import DataLoader

    from pytest_hwfault import data

    monkeypatch.setattr(data, "UNBOUNDED_STREAM_BYTES", 8 * 4 * 1000)  # 1000 images of 8 float32
    for stream in (_Stream(None), DataLoader(_Stream(None), batch_size=7)):
        with pytest.raises(DataError, match=r"the evaluation data \(.*\) has no length and gave \d+ images .* "
                                            r"without ending.*samples="):
            prepare(_mlp(), stream, samples=None, bits=8, cache=ModelCache(), device=CPU)
        with pytest.raises(DataError, match=r"the calibration data \(.*\) has no length .*as a tensor or a Dataset"):
            calibration_tensor(stream)
        assert len(prepare(_mlp(), stream, samples=1500, bits=8, cache=ModelCache(), device=CPU).inputs) == 1500
    assert len(calibration_tensor(_Stream(999))) == 999  # a finite stream under the bound reads whole


def test_a_stream_read_once_per_loader_worker_is_refused() -> None:
    """A DataLoader over an IterableDataset with num_workers=2 yields every item twice (the dataset iterated whole
    in each worker): 20 images gated as 40. Refused, naming the cause; copies in other data stand (under transient
    faults each copy is a trial of its own)."""
    from torch.utils.data import DataLoader

    with pytest.raises(DataError, match=r"num_workers=2\) gave 40 images of which only 20 differ.*get_worker_info"):
        prepare(_mlp(), DataLoader(_Stream(20), batch_size=8, num_workers=2), samples=None, bits=8,
                cache=ModelCache(), device=CPU)
    x, y = torch.randn(20, 8), torch.randint(0, 3, (20,))
    assert len(prepare(_mlp(), (x.repeat(3, 1), y.repeat(3)), samples=None, bits=8, cache=ModelCache(),
                       device=CPU).inputs) == 60


def test_what_is_no_model_is_refused_saying_what_is_allowed(tmp_path: Path) -> None:
    """An int reached the fingerprint and failed there ('int' object has no attribute 'named_modules'); a missing
    .onnx file is the file system's error, naming the path."""
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, a deployed int8 model \(torch.ao, PT2E\) "
                                        r"or an ONNX model \(ModelProto or .onnx path\), got int"):
        prepare(42, (x, y), samples=None, bits=8, cache=ModelCache(), device=CPU)  # type: ignore[arg-type]
    missing = tmp_path / "missing.onnx"
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        prepare(missing, (x, y), samples=None, bits=8, cache=ModelCache(), device=CPU)  # type: ignore[arg-type]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(RuntimeError, match="cuda"):
            resolve_device("cuda")


def test_a_model_given_in_training_mode_is_gated_in_eval_mode_and_the_report_says_so() -> None:
    """A model left in training mode (BatchNorm on batch statistics, dropout on) was gated, silently, as it runs in
    eval mode: the report now says so. The cached view serves both modes; the note follows the model as given,
    whose own flag is left as it was."""
    from pytest_hwfault.gate import TRAINING_MODE_NOTE, assess
    from pytest_hwfault.spec import CampaignSpec

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    spec = CampaignSpec(site="act", ber=1e-3, min_acc=0.0, budget=4, first=4)
    cache = ModelCache()
    trained = assess(model.train(), (x, y), spec, "t", cache=cache, device=CPU).result
    assert trained.model_notes[:1] == [TRAINING_MODE_NOTE] and model.training
    evaluated = assess(model.eval(), (x, y), spec, "t", cache=cache, device=CPU).result
    assert TRAINING_MODE_NOTE not in evaluated.model_notes and cache.hits == 1
    assert trained.quantized_accuracy == evaluated.quantized_accuracy
    assert trained.float_accuracy == evaluated.float_accuracy


GAIN = 1.0


class Activated(nn.Module):
    """An MLP whose activation is a plain attribute: a function, a partial, a lambda, a tensor that is no buffer."""

    def __init__(self, act: object, gain: torch.Tensor | None = None) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 3)
        self.act, self._gain = act, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x)) * GAIN  # type: ignore[operator]
        return self.b(h if self._gain is None else h * self._gain)


def test_the_cache_tells_apart_models_that_compute_differently(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal architectures and state dicts computing different functions (an activation kept as an attribute, a
    partial's argument, a tensor attribute, a module global changed between two tests) shared one fingerprint: the
    cache handed the second model the first one's view, and its gate reported the first model's accuracy (0.97 for a
    model at 0.58). Each is its own entry now; a model built again still hits, and the data is left as it was."""
    import functools

    import torch.nn.functional as F

    from pytest_hwfault.identity import attributes_fingerprint, outputs_fingerprint

    x = torch.randn(32, 8)
    kept = x.clone()
    variants = [Activated(F.relu), Activated(torch.tanh), Activated(lambda t: t * 2),
                Activated(functools.partial(F.leaky_relu, negative_slope=0.1)),
                Activated(functools.partial(F.leaky_relu, negative_slope=0.5)),
                Activated(F.relu, torch.tensor(2.0)), Activated(F.relu, torch.tensor(3.0))]
    assert len({model_fingerprint(m) for m in variants}) == 1  # the architecture and state agree
    assert len({attributes_fingerprint(m) for m in variants}) == len(variants)
    cache = ModelCache()
    views = [cache.get(m, x, CPU, 8, {}) for m in variants]
    assert len({id(v) for v in views}) == len(variants) and cache.hits == 0
    assert cache.get(Activated(F.relu), x, CPU, 8, {}) is views[0] and cache.hits == 1  # built again
    relu = Activated(F.relu)
    assert attributes_fingerprint(copy.deepcopy(relu)) == attributes_fingerprint(relu)
    monkeypatch.setattr(f"{__name__}.GAIN", -1.0)  # the forward reads a global: only its outputs tell
    assert attributes_fingerprint(relu) == attributes_fingerprint(variants[0])
    assert cache.get(relu, x, CPU, 8, {}) is not views[0]
    assert torch.equal(x, kept)

    class WritesItsInput(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t.mul_(2)

    outputs_fingerprint(WritesItsInput(), x)
    assert torch.equal(x, kept)  # the outputs are taken on a copy of the images

    class Unrunnable(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no")

    assert outputs_fingerprint(Unrunnable(), x) != outputs_fingerprint(Unrunnable(), x)  # never a cache hit


def test_data_in_a_form_misread_is_refused_naming_the_fix() -> None:
    """A list of (inputs, labels) batches was stacked as a list of images (inputs [2, 20, 8], labels [2, 20]) and
    refused later for its labels' shape; a dict of columns without keys died in a bare KeyError: 0; (X, y) as numpy
    arrays, or with y a list, met advice about 'input_key=(0, 1), label_key=39'. Each is refused saying what to
    pass; a mapping of whole columns (a tokenizer's output with the labels) is read with input_key= and label_key=."""
    from pytest_hwfault.data import Keyed

    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    refused = {
        r"the data is a list whose items hold 20 labels each \(shape \[20\]\), not one label per image: a list of "
        r"\(inputs, labels\) batches is read as a list of images; join the batches": [(x[:20], y[:20]),
                                                                                       (x[20:], y[20:])],
        r"the data is a mapping \(keys \['x', 'y'\]\): say which are the model's inputs and which the label with "
        r"input_key= and label_key=": {"x": x, "y": y},
        r"\(X, y\) must be tensors, got \(numpy.ndarray, numpy.ndarray\)": (x.numpy(), y.numpy()),
        r"\(X, y\) must be tensors, got \(torch.Tensor, builtins.list\)": (x, y.tolist()),
        r"the data's columns have different lengths: \{'input': 40, 'label': 30\}": Keyed(
            {"input": x, "label": y[:30]}, "input", "label"),
    }
    for message, data in refused.items():
        with pytest.raises(DataError, match=message):
            prepare(_mlp(), data, samples=None, bits=8, cache=ModelCache(), device=CPU)

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.net(features * mask)

    mask = (torch.rand(40, 8) > 0.2).float()
    columns = {"features": x, "mask": mask, "labels": y}
    prepared = prepare(TwoInputs().eval(), Keyed(columns, ("features", "mask"), "labels"), samples=None, bits=8,
                       cache=ModelCache(), device=CPU)
    assert prepared.inputs.names == ("features", "mask")
    assert torch.equal(prepared.inputs.tensors[0], x) and torch.equal(prepared.inputs.tensors[1], mask)
    assert torch.equal(prepared.labels, y)
    assert torch.equal(calibration_tensor(Keyed(columns, "features")), x)


def test_a_lazy_module_that_never_ran_is_refused_by_name() -> None:
    """nn.LazyLinear's parameters hold no values until a forward pass: the fingerprint died in torch's 'Attempted to
    use an uninitialized parameter'. There is no trained model to gate: refused, naming the parameters."""
    from pytest_hwfault.quantization import UnsupportedModelError, quantize

    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    lazy = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.LazyLinear(3)).eval()
    message = (r"Sequential: 4 of its parameters are not initialized \('0.weight', '0.bias', '2.weight', \.\.\.: a "
               r"lazy module, e.g. nn.LazyLinear, that never ran\), so it has no weights to gate")
    with pytest.raises(UnsupportedModelError, match=message):
        prepare(lazy, (x, y), samples=None, bits=8, cache=ModelCache(), device=CPU)
    with pytest.raises(UnsupportedModelError, match=message):
        quantize(lazy, x)
    lazy(x)  # initialized: an ordinary model
    assert prepare(lazy, (x, y), samples=None, bits=8, cache=ModelCache(), device=CPU).qmodel.layers


def test_a_model_with_no_values_or_that_fails_on_its_inputs_is_refused_saying_why() -> None:
    """A model on the meta device (empty weights, never loaded) died in torch's 'Cannot copy out of meta tensor';
    a model that fails on the inputs (a float16 model given float32 images, float64 images for a float32 model)
    died in its own 'mat1 and mat2 must have the same dtype', deep in quantize. Each is refused, naming the model,
    the inputs and the fix; the model's own error is kept as the cause."""
    from pytest_hwfault.quantization import UnsupportedModelError, quantize

    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with pytest.raises(UnsupportedModelError, match=r"Sequential: 4 of its parameters and buffers are on the meta "
                                                    r"device \('0.weight', '0.bias', '2.weight', \.\.\.\): they hold "
                                                    r"no values .*load_state_dict\(state, assign=True\)"):
        prepare(empty, (x, y), samples=None, bits=8, cache=ModelCache(), device=CPU)
    half = nn.Sequential(nn.Linear(8, 3)).half().eval()
    with pytest.raises(UnsupportedModelError, match=r"Sequential fails in float on two calibration images \(float32 "
                                                    r"\[2, 8\]\), before anything is quantized: RuntimeError: .*dtype"
                                                    r".*\. Its parameters are float16 and the inputs float32: .*"
                                                    r"\(model\.float\(\), x\.float\(\)\)") as refused:
        quantize(half, x)
    assert isinstance(refused.value.__cause__, RuntimeError)
    with pytest.raises(UnsupportedModelError, match=r"\(float64 \[2, 8\]\).* Its parameters are float32 and the "
                                                    r"inputs float64"):
        prepare(_mlp(), (x.double(), y), samples=None, bits=8, cache=ModelCache(), device=CPU)

    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            raise ValueError("expects token ids")

    with pytest.raises(UnsupportedModelError, match=r"Picky fails in float .*: ValueError: expects token ids$"):
        quantize(Picky().eval(), x)


def test_an_attribute_that_will_not_be_read_stands_as_its_type() -> None:
    """A module attribute whose contents raise when read (a proxy, a handle) must not break the cache's key."""
    from pytest_hwfault.identity import attributes_fingerprint

    class Proxy:
        def __getattribute__(self, name: str) -> object:
            if name == "__dict__":
                raise RuntimeError("closed")
            return object.__getattribute__(self, name)

    first, second = _mlp(), _mlp()
    first.handle, second.handle = Proxy(), Proxy()  # type: ignore[assignment]
    assert attributes_fingerprint(first) == attributes_fingerprint(second) != attributes_fingerprint(_mlp())
    x = torch.randn(8, 8)
    cache = ModelCache()
    assert cache.get(first, x, CPU, 8, {}) is cache.get(second, x, CPU, 8, {})
