"""The quantize preset end to end on the bundled demo model, and its CLI flags."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from tvm_compress.errors import PassOptionError
from tvm_compress.pass_registry import PassEnv, get_preset, make_config
from tvm_compress.specs import InputSpec
from tvm_compress.passes import _quant_common as qc
from tvm_compress.pass_registry import config_from_args

DATA = Path(__file__).resolve().parents[1] / "tvm_compress" / "data"
MODEL = DATA / "fashion_cnn.onnx"
NPZ = DATA / "fashion_test.npz"
BATCH = 50

# Stated tolerance: int8 top-1 on the 500 bundled test images within 1 point of float.
MAX_TOP1_DROP = 1.0

needs_demo = pytest.mark.skipif(not MODEL.exists(), reason="demo model not built")


def _load(batch=BATCH):
    from tvm_compress.loader import load_onnx

    return load_onnx(MODEL, {"input": (batch, 1, 28, 28)})


def _run_all(mod, images):
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    fn = relax.VirtualMachine(ex, tvm.cpu())["main"]
    outs = [fn(tvm.runtime.tensor(images[i:i + BATCH])).numpy() for i in range(0, len(images), BATCH)]
    return np.concatenate(outs)


def _env():
    logs = []
    env = PassEnv(inputs=[InputSpec("input", (BATCH, 1, 28, 28), "float32")],
                  log=logs.append)
    return env, logs


@needs_demo
def test_demo_int8_accuracy_and_weight_bytes():
    preset = get_preset("quantize")
    env, logs = _env()
    config = make_config(preset, {"calib": str(NPZ), "calib_method": "percentile"})
    mod = _load()
    qmod = preset.make(config, env)(mod)
    report = env.report["quantize"]
    assert qc.REPORT_ATTR not in (qmod.attrs or {})
    assert all(l["status"] == "int8" and l["realized"] for l in report["layers"])
    # ONNX node names reach the report
    assert not report["layers"][0]["name"].startswith("conv2d_")
    assert report["weight_bytes"]["ratio"] <= 0.30
    text = qmod["main"].script(show_meta=False)
    assert text.count('out_dtype="int32"') == len(report["layers"])
    assert "R.dequantize" not in text  # integers from the first conv to the last matmul

    data = np.load(NPZ)
    images = (data["images"].astype("float32") / 255.0)[:, None]
    labels = data["labels"]
    f_top1 = 100 * np.mean(_run_all(mod, images).argmax(1) == labels)
    q_top1 = 100 * np.mean(_run_all(qmod, images).argmax(1) == labels)
    assert f_top1 - q_top1 <= MAX_TOP1_DROP, (f_top1, q_top1)
    assert any("weight bytes" in m for m in logs)


@needs_demo
@pytest.mark.slow
def test_demo_accuracy_budget_runs_fallback():
    preset = get_preset("quantize")
    env, logs = _env()
    config = make_config(preset, {"calib": f"{NPZ}:calib", "max_accuracy_drop": 0.5, "eval_samples": 100})
    preset.make(config, env)(_load())
    fb = env.report["quantize"]["fallback"]
    assert fb["met"] and fb["float_accuracy"] - fb["accuracy_final"] <= 0.5
    assert all("sensitivity" in l for l in env.report["quantize"]["layers"])


def test_cli_flags_map_to_config():
    from tvm_compress.calib_data import add_calib_arguments

    preset = get_preset("quantize")
    parser = argparse.ArgumentParser()
    add_calib_arguments(parser.add_argument_group("calibration data"))  # shared, added once
    preset.add_arguments(parser.add_argument_group("quantize"))
    args = parser.parse_args([
        "--calib", "x.npz", "--calib-method", "entropy", "--quant-skip", "conv1,3",
        "--quant-skip-first", "--max-error", "0.02", "--calib-mean", "0.5,0.4,0.3", "--calib-size", "32x48",
    ])
    cfg = config_from_args(preset, args)
    assert cfg.calib == "x.npz" and cfg.calib_method == "entropy"
    assert cfg.quant_skip == ("conv1", "3") and cfg.quant_skip_first is True
    assert cfg.max_error == 0.02 and cfg.calib_mean == (0.5, 0.4, 0.3) and cfg.calib_size == (32, 48)
    assert cfg.quant_skip_last is False  # absent flags keep the defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--calib-method", "mse"])


def test_preset_bad_option_one_line():
    preset = get_preset("quantize")
    with pytest.raises(PassOptionError) as err:
        make_config(preset, {"calib_method": "mse"})
    assert "unknown calibration method 'mse'" in str(err.value)
    with pytest.raises(PassOptionError, match="has no option 'bits'"):
        make_config(preset, {"bits": 4})


def _int8_conv_weights(mod):
    """The int8 OIHW constants of a realized module (its conv weights)."""
    from tvm_compress.relax_utils import const_value, is_constant

    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(const_value(e))
                                    if is_constant(e) else None)
    return [w for w in found if w.dtype == np.int8 and w.ndim == 4]


@needs_demo
def test_pair_sum_targets_get_weights_their_fast_kernel_runs_exactly():
    """On a target whose int8 kernel adds products in saturating int16 pairs (``x86-avx2``:
    ``pmaddubsw``), calibration quantizes conv weights to fit the pairs, so every conv runs
    that kernel (``layer_kernel`` falls back to none); quantized for a target without the
    fact, a conv of the same model would have needed the slower exact one."""
    from tvm_compress.targets import get_family, get_target
    from tvm_compress.targets.int8_conv import layer_kernel
    from tvm_compress.targets.int8_intrin import KERNELS

    profile = get_target("x86-avx2")
    facts = get_family(profile.family).facts(profile)
    assert facts.int8_dot == "pmaddubsw" and facts.int8_pair_sums
    preset = get_preset("quantize")
    config = make_config(preset, {"calib": str(NPZ), "calib_samples": 50})
    kernel = KERNELS["pmaddubsw"]
    fallbacks = {}
    for name, env_facts in (("pairs", facts), ("plain", None)):
        env, _ = _env()
        if env_facts is not None:
            env.facts = env_facts
        weights = _int8_conv_weights(preset.make(config, env)(_load()))
        assert len(weights) == 3  # the demo's three convs
        # (the first conv's 1 input channel runs the exact kernel anyway)
        fallbacks[name] = sum(layer_kernel(w, kernel) is not kernel for w in weights if w.shape[1] > 2)
    assert fallbacks["pairs"] == 0 and fallbacks["plain"] >= 1


@needs_demo
@pytest.mark.slow
@pytest.mark.parametrize("target_name", ["aarch64", "cuda"])
def test_int8_module_builds_for_other_targets(target_name):
    """The realized int8 IR legalizes, schedules and compiles beyond x86 (no run here)."""
    from tvm_compress import pipeline
    from tvm_compress.targets import get_family, get_target

    preset = get_preset("quantize")
    env, _ = _env()
    qmod = preset.make(make_config(preset, {"calib": str(NPZ), "calib_samples": 50}), env)(_load())
    profile = get_target(target_name)
    target = profile.tvm_target()
    with target:
        lowered = tvm.transform.Sequential(pipeline.lowering_passes())(qmod)
    names = [gv.name_hint for gv in lowered.functions]
    assert any(n.startswith("fused_conv2d") and "quantize" in n for n in names), names
    scheduled = pipeline.Schedule(profile)(lowered)
    get_family(profile.family).compile(scheduled, profile)  # as compile() builds (nvcc for CUDA)
