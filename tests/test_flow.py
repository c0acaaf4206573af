"""The compile flow's seams: kernel hooks offered by target families, pass order rules, layer
names from import to report, target facts for passes, per-layer and stored-byte statistics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_compress
from tvm_compress import errors, pipeline
from tvm_compress.layers import NameLayers, layer_name, layer_stats
from tvm_compress.pass_registry import PassPreset, parse_pass_list, register_pass, unregister_pass
from tvm_compress.passes import Quantize, QuantizeConfig
from tvm_compress.pass_registry import PassEnv
from tvm_compress.targets import (KernelHook, get_family, get_target, load_target_files,
                                  register_kernel_hook, unregister_kernel_hook)

quiet = lambda m: None  # noqa: E731


class _RecordingHook(KernelHook):
    """A toy kernel hook: its rewrite sees Relax ops before fusion, its schedule sees fused
    kernels, and it leaves a fact for the passes."""

    name = "toy"
    feature = "toy_kernels"

    def __init__(self):
        self.seen = []

    def rewrites(self, profile):
        @tvm.transform.module_pass(opt_level=0, name="ToyRewrite")
        def rewrite(mod, _ctx):
            ops = set()
            relax.analysis.post_order_visit(
                mod["main"], lambda e: ops.add(e.op.name) if isinstance(e, relax.Call) and
                isinstance(e.op, tvm.ir.Op) else None)
            self.seen.append(("rewrite", "relax.nn.conv2d" in ops))
            return mod

        return [rewrite]

    def schedules(self, profile):
        @tvm.transform.module_pass(opt_level=0, name="ToySchedule")
        def schedule(mod, _ctx):
            fused = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
            self.seen.append(("schedule", any("conv2d" in n for n in fused)))
            return mod

        return [schedule]

    def facts(self, profile):
        return {"vector_lanes": 64}


@pytest.fixture
def toy_target(tmp_path):
    (tmp_path / "toy.toml").write_text(
        '[x86-toy]\nfamily = "x86"\ntarget = { kind = "llvm", mcpu = "auto" }\n'
        "features = { toy_kernels = true }\n")
    load_target_files([tmp_path / "toy.toml"])
    hook = register_kernel_hook("x86", _RecordingHook())
    yield hook
    unregister_kernel_hook("x86", hook)


def test_kernel_hook_of_a_family_runs_in_the_flow(toy_target, conv_model, tmp_path):
    """Registered from outside the package, turned on by the preset's feature: its rewrite runs
    before fusion, its schedule after, and passes see its fact. pipeline.py is not touched."""
    rep = tvm_compress.compile(conv_model, tmp_path / "c.so", target="x86-toy", bench_runs=1, log=quiet)
    assert toy_target.seen == [("rewrite", True), ("schedule", True)]
    assert rep["verified"]
    assert get_family("x86").facts(get_target("x86-toy")).vector_lanes == 64
    # a preset without the feature does not run it
    tvm_compress.compile(conv_model, tmp_path / "d.so", target="x86", bench_runs=1, log=quiet)
    assert len(toy_target.seen) == 2


def test_pipeline_from_relax_registry_names_its_stages(conv_model):
    profile = get_target("x86")
    mod = tvm_compress.load_onnx(conv_model)
    flow = pipeline.FlowInstrument(quiet)
    with tvm.transform.PassContext(instruments=[flow]):
        out = relax.get_pipeline("tvm_compress", target=profile)(mod)
    assert [s["name"] for s in flow.stages] == ["lower", "schedule"]
    assert flow.lowered is not None and not _scheduled(flow.lowered) and _scheduled(out)
    vm = relax.VirtualMachine(tvm.compile(out, profile.tvm_target()), tvm.cpu())
    assert vm["main"](tvm.runtime.tensor(np.zeros((1, 3, 8, 8), "float32"))).numpy().shape == (1, 10)


def test_a_nested_pass_that_raised_and_was_caught_leaves_the_stages_whole(conv_model):
    """A rewrite that catches its inner pass's error (and keeps the module it was given, as
    ``ChannelsLast`` does when ``ConvertLayout`` fails) leaves that inner pass without its
    after-hook: the stages after it are still told apart (``lowered`` was lost)."""

    @tvm.transform.module_pass(opt_level=0, name="Fails")
    def fails(mod, _ctx):
        raise ValueError("no")

    @tvm.transform.module_pass(opt_level=0, name="FallsBack")
    def falls_back(mod, _ctx):
        try:
            return tvm.transform.Sequential([fails], name="Inner")(mod)
        except Exception:  # noqa: BLE001
            return mod

    mod = tvm.transform.Sequential([falls_back], name="lower")
    flow = pipeline.FlowInstrument(quiet)
    with tvm.transform.PassContext(instruments=[flow]):
        tvm.transform.Sequential([mod, tvm.transform.Sequential([], name="schedule")], name=pipeline.PIPELINE)(
            tvm_compress.load_onnx(conv_model))
    assert [s["name"] for s in flow.stages] == ["lower", "schedule"] and flow.lowered is not None
    assert flow.stack == []


def _scheduled(mod) -> bool:
    return any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and
               f.attrs.get("tirx.is_scheduled", False) for f in mod.functions.values())


@pytest.fixture
def order_presets():
    """Two toy presets: 'shrink' must run before 'quantize'."""
    def make(_config, _env):
        return tvm.transform.module_pass(lambda m, _c: m, opt_level=0, name="Identity")

    @dataclasses.dataclass(frozen=True)
    class _NoOptions:
        pass

    shrink = register_pass(PassPreset("shrink", "toy", _NoOptions, make, runs_before=("quantize",),
                                      order_reason="quantize calibrates the shrunk model"))
    yield shrink
    unregister_pass("shrink")


def test_pass_order_and_repeats_are_rejected_with_the_rule(order_presets):
    assert parse_pass_list("shrink,quantize") == ["shrink", "quantize"]
    with pytest.raises(errors.PassOptionError,
                       match=r"--passes: shrink must come before quantize: quantize calibrates the shrunk model"):
        parse_pass_list("quantize,shrink")
    with pytest.raises(errors.PassOptionError, match=r"--passes names 'quantize' twice"):
        parse_pass_list(["quantize", "quantize"])


def test_quantize_declares_it_runs_after_the_float_rewrites():
    from tvm_compress.pass_registry import get_preset, parse_pass_list

    assert {"prune", "lowrank"} <= set(get_preset("quantize").runs_after)
    # fold either before (into float weights) or after (into the int8 rescales)
    assert parse_pass_list("fold,quantize") == ["fold", "quantize"]
    assert parse_pass_list("quantize,fold") == ["quantize", "fold"]


def test_cli_rejects_bad_order_in_one_line(order_presets, conv_model, tmp_path, capsys):
    from tvm_compress.cli import main

    code = main(["compile", str(conv_model), "-o", str(tmp_path / "c.so"), "--passes", "quantize,shrink"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "shrink must come before quantize" in err
    assert not (tmp_path / "c.so").exists()


def test_layers_named_at_import_travel_through_quantize(demo_model):
    """ONNX node names on the layers' calls; quantize reports and realizes by those names and
    never reads the ONNX file."""
    mod = tvm_compress.load_onnx(demo_model, {"input": (1, 1, 28, 28)})
    names = list(layer_stats(mod))
    assert names == ["/features/features.0/Conv", "/features/features.4/Conv", "/features/features.8/Conv",
                     "/classifier/classifier.1/Gemm", "/classifier/classifier.3/Gemm"]
    env = PassEnv(log=quiet)
    config = QuantizeConfig(calib=str(tvm_compress.demo.demo_files()["data"]) + ":calib", calib_samples=16,
                            quant_skip=("/features/features.4/Conv",))
    qmod = Quantize(config, env)(mod)
    report = {l["name"]: l for l in env.report["quantize"]["layers"]}
    assert list(report) == names
    assert report["/features/features.4/Conv"]["status"] == "float"
    assert all(report[n]["status"] == "int8" and report[n]["realized"] for n in names if "4/Conv" not in n)
    stats = layer_stats(qmod)
    # int8 weight plus one float32 scale per output channel, under the same name
    assert stats["/features/features.0/Conv"]["weight_bytes"] == 16 * 9 + 16 * 4
    assert stats["/features/features.4/Conv"]["weight_bytes"] == 4 * 32 * 16 * 9


def test_unnamed_layers_get_positional_names():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(np.ones((4, 3), "float32"))))
            out = bb.emit_output(relax.op.matmul(y, relax.const(np.ones((3, 2), "float32"))))
        bb.emit_func_output(out)
    named = NameLayers()(bb.get())
    calls = []
    relax.analysis.post_order_visit(named["main"], lambda e: calls.append(layer_name(e))
                                    if isinstance(e, relax.Call) else None)
    assert [c for c in calls if c] == ["matmul_0", "matmul_1"]
    tvm.ir.assert_structural_equal(named, bb.get())  # names are spans: the IR is unchanged


def test_quantize_takes_activation_dtype_from_target_facts(demo_model):
    """On a target whose int8 kernels take no uint8 (sdot), activations are int8."""
    rpi5 = get_target("rpi5")
    logs = []
    env = PassEnv(facts=get_family(rpi5.family).facts(rpi5), log=logs.append)
    mod = tvm_compress.load_onnx(demo_model, {"input": (1, 1, 28, 28)})
    Quantize(QuantizeConfig(calib="random", calib_samples=8), env)(mod)
    assert {l["input_quant"]["dtype"] for l in env.report["quantize"]["layers"]} == {"int8"}
    assert any("sdot kernels take no uint8" in m for m in logs)


def test_report_counts_stored_bytes_and_macs_per_layer(demo_model, tmp_path):
    rep = tvm_compress.compile(
        demo_model, tmp_path / "q.so", input_shapes={"input": (1, 1, 28, 28)}, passes="quantize",
        pass_configs={"quantize": {"calib": str(tvm_compress.demo.demo_files()["data"]) + ":calib",
                                   "calib_samples": 16}}, bench_runs=1, log=quiet)
    layers = {l["name"]: l for l in rep["layers"]}
    conv0 = layers["/features/features.0/Conv"]
    assert conv0["macs_before"] == conv0["macs_after"] == 16 * 28 * 28 * 9
    assert conv0["weight_bytes_before"] == 16 * 9 * 4 and conv0["weight_bytes_after"] == 16 * 9 + 16 * 4
    assert rep["macs_before"] == rep["macs_after"] == sum(l["macs_before"] for l in rep["layers"])
    # the library stores int8 weights plus scales and the packed kernels' extra terms
    assert 0.24 < rep["weight_bytes_after"] / rep["weight_bytes_before"] < 0.27
    q = rep["pass_reports"]["quantize"]
    assert {r["name"] for r in q["layer_stats"]} == set(layers) and q["seconds"] > 0
    assert [s["name"] for s in rep["stages"]] == ["fold", "quantize", "lower", "schedule"]


def test_a_subcommand_is_one_registered_module(monkeypatch, capsys):
    """The CLI builds its parser from the command registry."""
    from tvm_compress import commands
    from tvm_compress.cli import main

    def add_arguments(p):
        p.add_argument("--who", default="world")

    def run(args):
        print(f"hello {args.who}")
        return 0

    monkeypatch.setitem(commands._COMMANDS, "hello", commands.Command("hello", "say hello", add_arguments, run))
    assert main(["hello", "--who", "board"]) == 0
    assert capsys.readouterr().out.strip() == "hello board"
    assert {c.name for c in commands.commands()} >= {"compile", "run", "inspect", "targets", "demo", "hello"}


def test_demo_runs_the_presets_that_apply_to_its_float_trained_model():
    """``make demo`` compresses the bundled model with int8, pruning and low-rank (the README's
    list); binary needs a network trained binarized and failed on it in every demo run."""
    from tvm_compress.demo import demo_pass_sets
    from tvm_compress.pass_registry import get_preset

    sets = demo_pass_sets()
    assert sets[0].passes == () and sorted(s.label for s in sets[1:]) == ["lowrank", "prune", "quantize"]
    assert all(get_preset(s.label).lossy for s in sets[1:])
