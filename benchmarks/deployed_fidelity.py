"""Agreement of the engine with each deployed int8 runtime, fault-free, on the ResNet-style model of the reader
tests (tests/deployed_models.py: fused conv+bn+relu, residual adds, global average pooling, a linear head) trained on
scikit-learn's digits and evaluated on the 397 held-out images.

For each format: the share of equal predictions, of exactly equal output codes (logits / output scale), and the
largest difference in codes, against the runtime's own output:

- torch.ao eager and FX: torch's quantized kernels (x86 engine);
- PT2E (torchao, X86InductorQuantizer): the converted graph itself; its logits are the float result of the last
  linear (no output codes), so the codes compared are those the last linear reads, and the logits are compared up to
  float32 rounding;
- PT2E compiled (``torch.compile`` with freezing: x86 Inductor on oneDNN's int8 kernels): the compiled model's own
  logits, compared exactly (also on the random 128-channel model below);
- ONNX QDQ (onnxruntime quantize_static, per-channel int8 weights, uint8 or int8 activations): onnxruntime's CPU
  provider with its default optimizations (QLinearConv/QGemm/QLinearAdd/QLinearGlobalAveragePool kernels); the
  same in QOperator format (the kernels as nodes), against onnxruntime running that model;
- torch.ao dynamic (quantize_dynamic, qint8 per-channel Linear layers): the model run one image at a time, logits
  compared exactly (also on a random transformer-style block, 2048 inputs of magnitudes over five decades).

Also a random-init two-block transformer encoder exported to ONNX (tests/deployed_models.py's `Encoder`, 400
inputs): static QDQ of the ops the reader reproduces (u8, s8), the full one with LayerNorm, Softmax and GELU (whose
float ops and QLinearSoftmax/QLinearMul the reader computes as onnxruntime's kernels, or names in its notes), and
`quantize_dynamic`; a tiny Hugging Face GPT-2 and a 4-layer BERT, static and dynamic.

For the ONNX models with act sites (QDQ CNNs, static transformers, BERT), also under faults: three trials of act
faults at BER 1e-3 in the view against onnxruntime running the model with each faulted layer's stored output codes
XORed with the same masks (`deployed_models.onnx_under_faults`): onnxruntime's own kernels on the same faulty
codes (`act_faults_logits_exactly_equal`, the lowest of the three; `act_faults_logits_changed`: how many logits the
faults moved).

Then the same architecture with 128 channels, random weights and 2048 random images (torch.ao FX, ONNX u8 and s8):
sums past 2^24, and near-ties that training smooths away; with int8 activations onnxruntime leaves the first conv of
each block in float, whose float32 sums round (the model's notes name them).

`--torchvision` adds, for PT2E compiled by x86 Inductor, random-init torchvision models (and ResNet56), 16 random
images each, their logits against the compiled model's own (a few minutes: each model is compiled), and the
converted graph of each checked part by part at load (`graph_agreement`: the view exact or not, the codes one apart
at the graph's float32 near-ties); and six
torchvision models (MobileNetV3, EfficientNet, ShuffleNet, MnasNet, SqueezeNet, RegNet) exported to ONNX and quantized
by onnxruntime, against onnxruntime; nine through onnxruntime's quantize_dynamic (ConvInteger), each run one image at
a time; and nine torchvision models quantized by torch.ao FX and five quantizable ones
by eager mode, against torch's kernels, fault-free and under three trials of act faults at BER 1e-2.

    python benchmarks/deployed_fidelity.py [--torchvision] [--json fidelity.json]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import deployed_models as dm  # noqa: E402
from _common import environment, save_json  # noqa: E402

from pytest_hwfault import quantize  # noqa: E402


class Digits:
    """The reader tests' split of scikit-learn's digits (tests/conftest.py's `digits`)."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x_t, y_t = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
        order = torch.randperm(len(x_t), generator=torch.Generator().manual_seed(0))
        x_t, y_t = x_t[order], y_t[order]
        self.x_train, self.y_train, self.x_test, self.y_test = x_t[:1400], y_t[:1400], x_t[1400:], y_t[1400:]


def _run(model: Any, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model(x)


def _onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def measure() -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    digits = Digits()
    x, calibration = dm.images(digits.x_test), dm.images(digits.x_train)
    net, eager = dm.trained_resnet_style(digits), dm.trained_resnet_style(digits, eager=True)
    rows: dict[str, dict[str, float]] = {}
    ao = dm.to_ao_eager(eager, calibration, dm.ResNetStyle.FUSIONS)
    qmodel = quantize(ao, calibration[:256])
    rows["torch.ao eager"] = dm.agreement(_run(ao, x), qmodel(x), qmodel.layers["fc"].act_scale)
    fx = dm.to_ao_fx(net, calibration)
    qmodel = quantize(fx, calibration)
    rows["torch.ao fx"] = dm.agreement(_run(fx, x), qmodel(x), qmodel.layers["fc"].act_scale)
    pt2e = dm.to_pt2e(net, calibration[:512])
    qmodel = quantize(pt2e, calibration[:256])
    reference, ours = _run(pt2e, x), qmodel(x)
    close = (reference - ours).abs() <= 1e-5 * reference.abs().max()  # equal up to float32 rounding
    rows["pt2e (logits in float)"] = {
        "predictions": float((reference.argmax(1) == ours.argmax(1)).float().mean()),
        "logits_equal_to_float32_rounding": float(close.float().mean()),
        "max_relative_logit_difference": float((reference - ours).abs().max() / reference.abs().max()),
        "view_exact": float(not qmodel.config["view_mismatch"])}  # the load check, part by part
    rows["pt2e compiled (x86 Inductor)"] = _compiled(pt2e, calibration[:256], x)
    with tempfile.TemporaryDirectory() as folder:
        for activations in ("u8", "s8"):
            path = dm.to_onnx_qdq(net, calibration[:500], folder, activations)
            qmodel = quantize(path, calibration[:64])
            rows[f"onnx ({activations} activations)"] = {
                **dm.agreement(_onnx(path, x), qmodel(x), qmodel.layers["fc_Gemm"].act_scale), **_probed(qmodel),
                **_under_faults(path, qmodel, {"x": x[:128]})}
            path = dm.to_onnx_qdq(net, calibration[:500], folder, activations, qoperator=True)
            qmodel = quantize(path, calibration[:64])
            rows[f"onnx QOperator ({activations} activations)"] = {**dm.agreement(
                _onnx(path, x), qmodel(x), qmodel.layers[list(qmodel.layers)[-1]].act_scale), **_probed(qmodel)}
        rows.update(_random_wide(folder))
        rows.update(_onnx_transformer(Path(folder)))
    rows.update(_dynamic(net, calibration, x))
    return rows


def _onnx_transformer(folder: Path) -> dict[str, dict[str, float]]:
    """A random-init two-block encoder exported to ONNX (tests/deployed_models.py's `Encoder`), 400 inputs:
    static QDQ of the ops the reader reproduces (plain: ReLU for softmax and GELU, no LayerNorm), u8 and s8; the
    full one (LayerNorm, Softmax, GELU) static u8 and dynamic (one input at a time); the plain one with its linear
    layers on [batch x tokens, width] image by image and token by token; a tiny Hugging Face GPT-2 (its Conv1D
    projections on merged rows), static (the causal mask left unquantized) and dynamic, 256 inputs one at a time."""
    import warnings

    with torch.random.fork_rng():
        torch.manual_seed(0)
        full, plain = dm.Encoder(), dm.Encoder(plain=True)
    full_path, plain_path = dm.export_encoder(full, folder, "encoder"), dm.export_encoder(plain, folder, "plain")
    x = dm.encoder_inputs(400, seed=7)
    cases = {"onnx transformer, static of reproduced ops (u8)": (dm.encoder_static(plain_path), False),
             "onnx transformer, static of reproduced ops (s8)": (dm.encoder_static(plain_path, "s8"), False),
             "onnx transformer, static with LayerNorm/Softmax/GELU (u8)": (dm.encoder_static(full_path), False),
             "onnx transformer, dynamic (one input at a time)": (dm.encoder_dynamic(full_path), True)}
    for rows_kind in ("merged", "sequence"):  # the plain one's layers on [batch x tokens, width]: viewed per image
        model = dm.Encoder(plain=True, rows=rows_kind)
        model.load_state_dict(plain.state_dict())
        name = f"onnx transformer, layers on {rows_kind} rows, static of reproduced ops (u8)"
        cases[name] = (dm.encoder_static(dm.export_encoder(model, folder, rows_kind)), False)
    rows = {}
    for name, (path, each) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the load check's mismatch warning: the row says how far apart
            qmodel = quantize(path, x[:64])
        ours = torch.cat([qmodel(x[i:i + 1]) for i in range(len(x))]) if each else qmodel(x)
        faulty = _under_faults(path, qmodel, {"x": x[:64]}, sites=("weight",), each=True) if each else \
            _under_faults(path, qmodel, {"x": x[:128]})
        rows[name] = {**_exact(dm.run_onnxruntime(path, x, each), ours), **_probed(qmodel), **faulty}
    try:
        import transformers  # noqa: F401
    except ImportError:
        return rows
    from pytest_hwfault.data import Inputs

    float_path, ids = dm.export_gpt2(folder, images=256)
    for kind, path in dm.gpt2_quantized(float_path, ids[:64]).items():  # one input at a time, as the test does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = quantize(path, Inputs((ids[:64],)))
        ours = torch.cat([qmodel(Inputs((ids[i:i + 1],))) for i in range(len(ids))])
        faulty = _under_faults(path, qmodel, {"ids": ids[:32]}, each=True,
                               **({"sites": ("weight",)} if kind == "dynamic" else {}))
        rows[f"onnx GPT-2 (Hugging Face, 2 layers, Conv1D on merged rows), {kind}, 256 inputs one at a time"] = \
            {**_exact(dm.run_onnxruntime_ids(path, ids), ours), **_probed(qmodel), **faulty}
    rows.update(_onnx_bert(folder))
    return rows


def _onnx_bert(folder: Path) -> dict[str, dict[str, float]]:
    """A random-init 4-layer Hugging Face BERT (width 256, 4 heads, intermediate 1024, vocabulary 1000, 64 tokens,
    3 classes) exported by torch's exporter (opset 17, ids and an attention mask in, a dynamic batch), quantized by
    onnxruntime (quantize_static QDQ u8, calibrated on 32 inputs; quantize_dynamic); 256 other inputs, a third with
    their last 24 tokens masked: static in batches of 64, dynamic one input at a time (as it runs)."""
    import onnxruntime as ort
    import transformers
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from pytest_hwfault.data import Inputs

    class Logits(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids, attention_mask=mask).logits

    config = transformers.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=1024, max_position_embeddings=64, num_labels=3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Logits(transformers.BertForSequenceClassification(config)).eval()
    ids = torch.randint(0, 1000, (32, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(32, 64, dtype=torch.long)
    test_ids = torch.randint(0, 1000, (256, 64), generator=torch.Generator().manual_seed(5))
    test_mask = torch.ones(256, 64, dtype=torch.long)
    test_mask[::3, 40:] = 0
    float_path = folder / "bert.onnx"
    paths = {kind: folder / f"bert_{kind}.onnx" for kind in ("static", "dynamic")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids[:2], mask[:2]), str(float_path), dynamo=False, input_names=["ids", "mask"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"ids": {0: "n"}, "mask": {0: "n"}, "logits": {0: "n"}})
        quantize_dynamic(str(float_path), str(paths["dynamic"]), weight_type=QuantType.QInt8)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"ids": ids.numpy(), "mask": mask.numpy()}])

            def get_next(self) -> dict | None:
                return next(self.batches, None)

        quantize_static(str(float_path), str(paths["static"]), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    rows = {}
    for kind, path in paths.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = quantize(path, Inputs((ids, mask)))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        step = 1 if kind == "dynamic" else 64
        with torch.no_grad():
            ours = torch.cat([qmodel(Inputs((test_ids[i:i + step], test_mask[i:i + step])))
                              for i in range(0, 256, step)])
        theirs = torch.cat([torch.from_numpy(session.run(None, {"ids": test_ids[i:i + step].numpy(),
                                                                "mask": test_mask[i:i + step].numpy()})[0])
                            for i in range(0, 256, step)])
        faulty = _under_faults(path, qmodel, {"ids": test_ids[:64], "mask": test_mask[:64]},
                               **({"sites": ("weight",), "each": True} if kind == "dynamic" else {}))
        rows[f"onnx BERT (Hugging Face, 4 layers, width 256, 64 tokens), {kind}"] = {**_exact(theirs, ours),
                                                                                   **_probed(qmodel), **faulty}
    return rows


def _under_faults(path: Any, qmodel: Any, inputs: dict[str, torch.Tensor], trials: int = 3,
                  ber: float = 1e-3, sites: tuple[str, ...] = ("act", "weight"),
                  each: bool = False) -> dict[str, float]:
    """The view under `trials` trials of act faults and of weight faults at `ber` against onnxruntime running the
    model under the same faults (`deployed_models.onnx_under_faults`: each faulted layer's stored output codes
    XORed with the same masks, the int8 weight initializers' codes flipped): per site, the lowest share of logits
    exactly equal over the trials, and the lowest share the faults changed. `each`: onnxruntime runs one input at a
    time (a dynamic model, whose ranges are each input's own, as the view computes them)."""
    import onnxruntime as ort

    from pytest_hwfault import FaultModel
    from pytest_hwfault.data import Inputs
    from pytest_hwfault.faults import sample_pattern, trial_generator

    view_input = next(iter(inputs.values())) if len(inputs) == 1 else Inputs(tuple(inputs.values()))
    images = len(next(iter(inputs.values())))
    clean = qmodel(view_input)
    row = {}
    for site in sites:
        fault_model = FaultModel(site, ber)
        equal, changed = [], []
        for trial in range(trials):
            pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), images,
                                     trial_generator(0, f"deployed_fidelity-{site}", trial))
            # one input at a time: act faults as that input's own masks (restricted to it, renumbered 0), so that any
            # row layout of the masks holds; weight faults once, the same for every input
            steps = [torch.tensor([i]) for i in range(images)] if each else [torch.arange(images)]
            sessions: dict[int, tuple[Any, dict[str, Any]]] = {}
            outputs = []
            for step in steps:
                key = int(step[0]) if each and site == "act" else -1
                if key not in sessions:
                    part = pattern.restricted_to(step) if key >= 0 else pattern
                    proto, masks = dm.onnx_under_faults(path, qmodel, part, len(step) if key >= 0 else images)
                    sessions = {key: (ort.InferenceSession(proto.SerializeToString(),
                                                           providers=["CPUExecutionProvider"]), masks)}
                session, masks = sessions[key]
                feeds = {k: v[step].numpy() for k, v in inputs.items()}
                outputs.append(torch.from_numpy(session.run(None, {**feeds, **masks})[0]))
            theirs = torch.cat(outputs)
            ours = qmodel(view_input, pattern)
            equal.append(float((theirs == ours).float().mean()))
            changed.append(float((ours != clean).float().mean()))
        row[f"{site}_faults_logits_exactly_equal"], row[f"{site}_faults_logits_changed"] = min(equal), min(changed)
    return row


def _probed(qmodel: Any) -> dict[str, float]:
    """How many of the view's integer kernels (QLinearAdd, QLinearMul, QLinearSoftmax, ...) a probe of their own
    grids checked against onnxruntime at load (`onnx_probes`), on how many it disagreed, and how many it could not
    run (both named in the notes)."""
    verdicts = [m.probe_agrees for m in qmodel.module.modules() if hasattr(m, "probe_agrees")]
    return {"kernels_probed": float(len(verdicts) - verdicts.count(None)),
            "probes_disagreeing": float(verdicts.count(False)), "probes_not_run": float(verdicts.count(None))}


def _exact(reference: torch.Tensor, ours: torch.Tensor) -> dict[str, float]:
    return {"predictions": float((reference.argmax(1) == ours.argmax(1)).float().mean()),
            "logits_exactly_equal": float((reference == ours).float().mean()),
            "max_logit_difference": float((reference - ours).abs().max())}


def _dynamic(net: torch.nn.Module, calibration: torch.Tensor, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """torch.ao dynamic quantization (quantize_dynamic, qint8 Linear layers), against the model run one image at a
    time (each call's range is then that image's): the trained ResNet-style model (its convs stay float) and a
    random transformer-style MLP block on [N, 16, 64] inputs with a 1100-wide hidden layer (float64 sums)."""
    import torch.ao.quantization as tq

    def dynamic(model: torch.nn.Module) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tq.quantize_dynamic(model.eval(), {torch.nn.Linear: tq.per_channel_dynamic_qconfig},
                                       dtype=torch.qint8)

    def one_at_a_time(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([_run(model, images[i : i + 1]) for i in range(len(images))])

    rows = {}
    deployed = dynamic(net)
    view = quantize(deployed, calibration)
    ours = one_at_a_time(view, x)
    # its convolutions stay float, and torch's float convolutions give a batch other roundings than one image
    rows["torch.ao dynamic (Linear head; one image at a time)"] = {
        **_exact(one_at_a_time(deployed, x), ours),
        "view_batch_logits_equal_to_one_at_a_time": float((view(x) == ours).float().mean())}
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 1100), torch.nn.GELU(), torch.nn.Linear(1100, 64),
                                torch.nn.LayerNorm(64), torch.nn.Flatten(), torch.nn.Linear(16 * 64, 10))
    tokens = torch.randn(2048, 16, 64) * torch.logspace(-3, 2, 2048).reshape(-1, 1, 1)
    deployed = dynamic(block)
    rows["torch.ao dynamic, random block, 2048 inputs"] = _exact(one_at_a_time(deployed, tokens),
                                                                quantize(deployed, tokens[:64])(tokens))
    return rows


def _compiled(pt2e: Any, calibration: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """The engine given the compiled PT2E model, against the compiled model's own logits: exactly equal or not."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        compiled = torch.compile(pt2e, dynamic=False)
        qmodel = quantize(compiled, calibration)
        reference, ours = _run(compiled, x), qmodel(x)
    return {"predictions": float((reference.argmax(1) == ours.argmax(1)).float().mean()),
            "logits_exactly_equal": float((reference == ours).float().mean()),
            "max_logit_difference": float((reference - ours).abs().max()),
            "checked_at_load_equal": float("equal bit for bit" in qmodel.config["deployed_notes"][0]),
            # and part by part against the graph it compiled (`graph_agreement`)
            "parts_agree_with_graph": float(any("every part computes the graph's arithmetic" in note
                                                for note in qmodel.config["deployed_notes"][:2])),
            **_flow(next((note for note in qmodel.config["deployed_notes"][:2] if "part by part" in note), ""))}


def _random_wide(folder: str) -> dict[str, dict[str, float]]:
    """The same architecture with 128 channels (fan-in 1152: sums past 2^24), random weights and images: no training
    smooths the values, so a few outputs in 10^5 sit within float32 rounding of a half code, where the order of a
    kernel's float32 steps decides."""
    from pytest_hwfault.cifar_resnet import recalibrate_bn

    generator = torch.Generator().manual_seed(0)
    calibration, x = torch.rand(64, 1, 8, 8, generator=generator), torch.rand(2048, 1, 8, 8, generator=generator)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = recalibrate_bn(dm.ResNetStyle(channels=128), calibration)
    rows = {}
    fx = dm.to_ao_fx(net, calibration)
    qmodel = quantize(fx, calibration)
    rows["torch.ao fx, random 128-ch"] = dm.agreement(_run(fx, x), qmodel(x), qmodel.layers["fc"].act_scale)
    rows["pt2e compiled (x86 Inductor), random 128-ch"] = _compiled(dm.to_pt2e(net, calibration), calibration, x)
    for activations in ("u8", "s8"):
        path = dm.to_onnx_qdq(net, calibration, folder, activations)
        qmodel = quantize(path, calibration)
        in_float = sum("runs it as a float" in note for note in qmodel.config["deployed_notes"])
        rows[f"onnx ({activations}), random 128-ch"] = {
            **dm.agreement(_onnx(path, x), qmodel(x), qmodel.layers["fc_Gemm"].act_scale),
            "layers_onnxruntime_runs_in_float": float(in_float)}
    return rows


# (model, image size): torchvision's constructors, and the project's CIFAR ResNet56
TORCHVISION = (("resnet56", 32), ("mobilenet_v2", 64), ("mobilenet_v3_small", 64), ("mobilenet_v3_large", 64),
               ("efficientnet_b0", 64), ("shufflenet_v2_x0_5", 64), ("mnasnet0_5", 64), ("regnet_x_400mf", 64),
               ("densenet121", 64), ("squeezenet1_0", 64), ("vit_b_16", 224))


def _torchvision_rows() -> dict[str, dict[str, float]]:
    """Each model random-init (seeded), BatchNorm statistics recalibrated, quantized by PT2E on 16 random images,
    compiled (freezing, static shapes) and read by the engine; logits on 16 other images against the compiled
    model's, and whether the load check found them equal."""
    import torchvision

    from pytest_hwfault.cifar_resnet import recalibrate_bn, resnet56

    rows = {}
    for name, size in TORCHVISION:
        torch.manual_seed(0)
        calibration, x = torch.rand(16, 3, size, size), torch.rand(16, 3, size, size)
        net = resnet56() if name == "resnet56" else getattr(torchvision.models, name)(weights=None)
        pt2e = dm.to_pt2e(recalibrate_bn(net, calibration).eval(), calibration)
        torch._dynamo.reset()
        rows[f"pt2e compiled, {name}"] = _compiled(pt2e, calibration, x)
        rows[f"pt2e graph, {name}"] = _graph_parts(pt2e, calibration)
    return rows


def _graph_parts(pt2e: Any, calibration: torch.Tensor) -> dict[str, float]:
    """The engine given the converted (not compiled) PT2E graph: whether the load check found every part of the
    view computing the graph's arithmetic (`graph_agreement`), and the output codes it found one apart at a near-tie
    of the graph's float32 sums, fault-free and under its act faults (per million codes)."""
    qmodel = quantize(pt2e, calibration)
    note = qmodel.config["deployed_notes"][0]
    ties = re.search(r"(\d+) of (\d+) fault-free, (\d+) of (\d+) under faults", note)
    clean, faulty = ((int(ties[1]) / int(ties[2]), int(ties[3]) / int(ties[4])) if ties else (0.0, 0.0))
    return {"view_exact": float(not qmodel.config["view_mismatch"]),
            "near_ties_per_million_fault_free": 1e6 * clean, "near_ties_per_million_under_faults": 1e6 * faulty,
            **_flow(note)}


def _flow(note: str) -> dict[str, float]:
    """From the part check's note: the share of the view's parts whose input was compared with the graph's, every
    part before it given the graph's output (`graph_agreement.flow_agreement`; 0 where the note does not say)."""
    flow = re.search(r"is the graph's \((\d+) parts(?:; (\d+) whose)?", note)
    compared, left_out = (int(flow[1]), int(flow[2] or 0)) if flow else (0, 0)
    return {"flow_inputs_compared_share": compared / max(compared + left_out, 1)}


ONNX_TORCHVISION = ("mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "mnasnet0_5", "squeezenet1_0",
                    "regnet_y_400mf")


def _onnx_torchvision_rows() -> dict[str, dict[str, float]]:
    """Each model random-init (seeded, 10 classes), exported and quantized by onnxruntime's quantize_static (QDQ,
    per-channel int8 weights, uint8 activations) on 32 random 64 x 64 images, read by the engine; logits on those
    images against onnxruntime's, and the share of the model's quantized layers onnxruntime's optimizer leaves as
    float ops (named in the notes); its kernels' probes, whether the load check under faults found the outputs equal
    (and every layer's stored codes), whether the load checks found the view exact, and one trial of act and of
    weight faults against onnxruntime running them."""
    import warnings

    import torchvision

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ONNX_TORCHVISION:
            torch.manual_seed(0)
            x = torch.randn(32, 3, 64, 64)
            net = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
            path = dm.to_onnx_qdq(net, x, folder, "u8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the load check's mismatch warning: the row says how far apart
                qmodel = quantize(path, x)
            run = [n for n in qmodel.config["deployed_notes"] if "optimizer leaves as float ops" in n]
            in_float = int(run[0].split(" ", 1)[0]) if run else 0
            checked = qmodel.config["deployed_notes"][1]  # the load check under faults, in words
            rows[f"onnx (u8), {name}"] = {**_exact(_onnx(path, x), qmodel(x)), "layers": float(len(qmodel.layers)),
                                          "layers_onnxruntime_runs_in_float": float(in_float), **_probed(qmodel),
                                          "load_check_under_faults_equal": float(checked.endswith("bit for bit")),
                                          "view_exact": float(not qmodel.config["view_mismatch"]),
                                          **_under_faults(path, qmodel, {"x": x}, trials=1)}
    return rows


# onnxruntime's quantize_dynamic on torchvision's constructors: ConvInteger and MatMulInteger layers, float ops between
ONNX_DYNAMIC_TORCHVISION = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
                            "squeezenet1_0", "shufflenet_v2_x1_0", "mnasnet0_5", "regnet_x_400mf")


def _onnx_dynamic_torchvision_rows() -> dict[str, dict[str, float]]:
    """Each model random-init (seeded, 10 classes), exported and quantized by onnxruntime's quantize_dynamic (int8
    weights; its convolutions as ConvInteger), read by the engine on 16 random 64 x 64 images; logits of the view
    and of onnxruntime, each run one image at a time (dynamic quantization's ranges are the call's), compared
    exactly; how many dynamic layers the load check compared and found equal; the float ops named as not certified;
    whether the load checks found the view exact. A model the reader refuses is a row saying so."""
    import logging
    import warnings

    import torchvision
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pytest_hwfault.onnx_faults import onnx_dynamic_layer_agreement

    rows = {}
    logging.disable(logging.WARNING)  # quantize_dynamic's advice to pre-process
    with tempfile.TemporaryDirectory() as folder:
        for name in ONNX_DYNAMIC_TORCHVISION:
            torch.manual_seed(0)
            x = torch.randn(16, 3, 64, 64)
            net = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
            float_path, path = Path(folder) / f"{name}.onnx", Path(folder) / f"{name}_dynamic.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (x[:1],), str(float_path), input_names=["x"], output_names=["y"],
                                  dynamic_axes={"x": {0: "n"}}, dynamo=False, opset_version=17)
                quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8)
                try:
                    qmodel = quantize(path, x)
                except Exception as exc:  # noqa: BLE001 - the row says the reader refused it
                    print(f"onnx dynamic, {name}: refused: {exc}"[:300])
                    rows[f"onnx dynamic, {name}"] = {"refused": 1.0}
                    continue
            ours = torch.cat([qmodel(x[i : i + 1]) for i in range(len(x))])
            theirs = torch.cat([_onnx(path, x[i : i + 1]) for i in range(len(x))])
            layers = onnx_dynamic_layer_agreement(path, qmodel, x[:4])
            named = [n for n in qmodel.config["deployed_notes"] if "not certified" in n]
            rows[f"onnx dynamic, {name}"] = {
                **_exact(theirs, ours), "layers": float(len(qmodel.layers)),
                "layers_compared": float(layers.compared), "layers_apart": float(len(layers.apart)),
                "float_ops_named": float(sum(int(m) for m in re.findall(r" x(\d+)", named[0])) if named else 0),
                "view_exact": float(not qmodel.config["view_mismatch"])}
    logging.disable(logging.NOTSET)
    return rows


# torch.ao FX (x86 qconfig mapping) on torchvision's constructors, and eager mode on its quantizable models
AO_TORCHVISION = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
                  "regnet_x_400mf", "squeezenet1_0", "googlenet", "resnet18")
AO_EAGER_TORCHVISION = ("mobilenet_v2", "mobilenet_v3_large", "googlenet", "resnet18", "shufflenet_v2_x0_5")


def _ao_torchvision_rows() -> dict[str, dict[str, float]]:
    """Each model random-init (seeded, 10 classes), quantized by torch.ao (FX: `convert_fx` with the x86 mapping;
    eager: torchvision's quantizable model, fused, the x86 qconfig) on 32 random 64 x 64 images and read by the
    engine; logits on 16 other images against torch's kernels, the reader's tables (activations and batch norms
    torch computes code by code) and saturating depthwise layers, and three trials of act faults at BER 1e-2 against
    torch's kernels under the same faults (`deployed_models.ao_under_faults`): the lowest share of logits exactly
    equal, and of logits the faults changed; whether the load checks (outputs and every layer's codes, fault-free
    and under a trial of act faults) found the view exact."""
    import warnings

    import torchvision
    import torchvision.models.quantization as quantizable

    from pytest_hwfault import FaultModel
    from pytest_hwfault.deployed import CodeTable
    from pytest_hwfault.faults import sample_pattern

    rows = {}
    for form, names in (("fx", AO_TORCHVISION), ("eager", AO_EAGER_TORCHVISION)):
        for name in names:
            torch.manual_seed(0)
            calibration, x = torch.randn(32, 3, 64, 64), torch.randn(16, 3, 64, 64)
            if form == "fx":
                model = dm.to_ao_fx(getattr(torchvision.models, name)(weights=None, num_classes=10).eval(),
                                    calibration)
            else:
                net = getattr(quantizable, name)(weights=None, quantize=False, num_classes=10).eval()
                net.fuse_model(is_qat=False)
                model = dm.to_ao_eager(net, calibration)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the load check's mismatch warning: the row says how far apart
                qmodel = quantize(model, calibration)
            equal, changed = [], []
            for trial in range(3):
                fault_model = FaultModel("act", 1e-2)
                pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x),
                                         torch.Generator().manual_seed(trial))
                faulty, ours = _run(dm.ao_under_faults(model, pattern), x), qmodel(x, pattern)
                equal.append(float((faulty == ours).float().mean()))
                changed.append(float((ours != qmodel(x)).float().mean()))
            rows[f"torch.ao {form}, {name}"] = {
                **_exact(_run(model, x), qmodel(x)), "layers": float(len(qmodel.layers)),
                "tables": float(sum(isinstance(m, CodeTable) for m in qmodel.module.modules())),
                "saturating_layers": float(sum(type(m).__name__ == "PairSaturatingConv2d"
                                               for m in qmodel.module.modules())),
                "act_faults_logits_exactly_equal": min(equal), "act_faults_logits_changed": min(changed),
                "view_exact": float(not qmodel.config["view_mismatch"])}
    return rows


AO_QNNPACK_TORCHVISION = (("eager", "mobilenet_v2"), ("eager", "mobilenet_v3_large"), ("eager", "resnet18"),
                          ("eager", "shufflenet_v2_x0_5"), ("fx", "mobilenet_v2"), ("fx", "resnet18"))


def _ao_qnnpack_rows() -> dict[str, dict[str, float]]:
    """As `_ao_torchvision_rows`, under torch's qnnpack engine (QNNPACK's kernels, as on ARM; the qnnpack qconfig):
    fault-free logits, the lowest share equal under three act trials at BER 1e-2, and whether the load checks found
    the view exact (`view_exact` 1) or an inexact view (0: a gate needs allow_inexact_view=True)."""
    import warnings

    import torchvision
    import torchvision.models.quantization as quantizable

    from pytest_hwfault import FaultModel
    from pytest_hwfault.faults import sample_pattern

    rows = {}
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        for form, name in AO_QNNPACK_TORCHVISION:
            torch.manual_seed(0)
            calibration, x = torch.randn(32, 3, 64, 64), torch.randn(16, 3, 64, 64)
            if form == "fx":
                model = dm.to_ao_fx(getattr(torchvision.models, name)(weights=None, num_classes=10).eval(),
                                    calibration, engine="qnnpack")
            else:
                net = getattr(quantizable, name)(weights=None, quantize=False, num_classes=10).eval()
                net.fuse_model(is_qat=False)
                model = dm.to_ao_eager(net, calibration, engine="qnnpack")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the load check's mismatch warning: the row says it
                qmodel = quantize(model, calibration)
            equal = []
            for trial in range(3):
                fault_model = FaultModel("act", 1e-2)
                pattern = sample_pattern(fault_model, qmodel.targets(fault_model.site), len(x),
                                         torch.Generator().manual_seed(trial))
                equal.append(float((_run(dm.ao_under_faults(model, pattern), x) == qmodel(x, pattern)).float().mean()))
            rows[f"torch.ao {form} qnnpack, {name}"] = {
                **_exact(_run(model, x), qmodel(x)), "act_faults_logits_exactly_equal": min(equal),
                "view_exact": float(not qmodel.config["view_mismatch"])}
    finally:
        torch.backends.quantized.engine = engine
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torchvision", action="store_true",
                        help="add torchvision models through torch.ao, compiled PT2E and ONNX")
    parser.add_argument("--json", help="write the figures and the environment here")
    args = parser.parse_args()
    rows = measure()
    if args.torchvision:
        rows.update(_ao_torchvision_rows())
        rows.update(_ao_qnnpack_rows())
        rows.update(_torchvision_rows())
        rows.update(_onnx_torchvision_rows())
        rows.update(_onnx_dynamic_torchvision_rows())
    print(f"{'format':<44} agreement")
    for name, row in rows.items():
        print(f"{name:<44} " + ", ".join(f"{k} {v:.6g}" for k, v in row.items()))
    save_json(args.json, {"agreement": rows, "environment": environment("torchao", "onnxruntime", "onnx")})


if __name__ == "__main__":
    main()
