"""Calibrate: range methods on known distributions, data loading, fallback, one-line errors."""

import warnings

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from tvm_compress.errors import DataError, PassOptionError
from tvm_compress.passes import (Calibrate, CalibrateConfig, QuantizeAnnotate, QuantizeAnnotateConfig,
                                 QuantizeRealize)
from tvm_compress.passes import _quant_common as qc
from tvm_compress.passes._quant_stats import Observer, kl_threshold, qparams, weight_qparams

RNG = np.random.default_rng(2)


def _observer(x, bins=16384):
    obs = Observer(bins)
    obs.update_range(x)
    obs.update_hist(x)
    return obs


def test_weight_pairs_fit_int16_pair_sums():
    """``pair_sums``: per output channel, the scale also covers every pair of adjacent input
    channels' same-signed weights (at most 128 after rounding, what 255 x int8 pairs summed in
    int16 allow); a channel without large same-signed neighbours keeps its plain scale; a dense
    weight's pairs are rows of one column."""
    w = RNG.standard_normal((6, 5, 3, 3)).astype("float32")
    w[0, 0, 1, 1], w[0, 1, 1, 1] = 4.0, 3.9  # channel 0: two large same-signed neighbours
    w[1] = 0.01 * np.sign(w[1])
    w[1, 2, 0, 0], w[1, 3, 0, 0] = -3.0, 2.0  # channel 1: its largest pair has opposite signs
    q_plain, s_plain = weight_qparams(w, 0)
    q, s = weight_qparams(w, 0, pair_sums=True)
    pairs = np.pad(q.astype(np.int32), ((0, 0), (0, 1), (0, 0), (0, 0))).reshape(6, 3, 2, 3, 3)
    assert np.maximum(pairs, 0).sum(axis=2).max() <= 128 and np.maximum(-pairs, 0).sum(axis=2).max() <= 128
    assert np.all(s >= s_plain)
    np.testing.assert_allclose(s[0], 7.9 / 127, rtol=1e-6)  # was 4.0 / 127
    assert s[1] == s_plain[1] and np.array_equal(q[1], q_plain[1])
    np.testing.assert_allclose(q * s.reshape(-1, 1, 1, 1), w, atol=float(s.max()) / 2 + 1e-6)
    # a dense weight [K, N], outputs on axis 1: pairs of rows 2k, 2k+1 in each column
    m = 0.05 * RNG.standard_normal((16, 8)).astype("float32")
    m[4, 0], m[5, 0] = 3.0, 2.5
    mq, ms = weight_qparams(m, 1, pair_sums=True)
    rows = mq.astype(np.int32).reshape(8, 2, 8)
    assert np.maximum(rows, 0).sum(axis=1).max() <= 128 and np.maximum(-rows, 0).sum(axis=1).max() <= 128
    np.testing.assert_allclose(ms[0], 5.5 / 127, rtol=1e-6)
    assert np.all(ms >= weight_qparams(m, 1)[1])
    # one input channel: the kernels pair kernel columns 2k, 2k+1 (column_taps)
    c = RNG.standard_normal((4, 1, 3, 3)).astype("float32")
    c[0, 0, 2, 0], c[0, 0, 2, 1] = -4.0, -3.5
    cq, cs = weight_qparams(c, 0, pair_sums=True)
    cols = np.pad(cq.astype(np.int32), ((0, 0), (0, 0), (0, 0), (0, 1))).reshape(4, 3, 2, 2)
    assert np.maximum(cols, 0).sum(axis=3).max() <= 128 and np.maximum(-cols, 0).sum(axis=3).max() <= 128
    np.testing.assert_allclose(cs[0], 7.5 / 127, rtol=1e-6)


def test_grouped_conv_weights_fit_pair_sums_too():
    """A grouped conv runs the same pair-summing dot kernels as a plain one
    (``int8_conv.group_weight``): with ``weight_pairs`` its int8 weight fits the pairs as well."""
    from tvm_compress.relax_utils import const_value, is_constant
    from tvm_compress.specs import pair_weight_sums

    w = RNG.standard_normal((16, 8, 3, 3)).astype("float32") * 0.3
    w[:, 0], w[:, 1] = 2.0, 1.9  # every output channel: two large same-signed neighbours
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.emit_output(relax.op.nn.conv2d(x, relax.const(w), padding=1, groups=2))
        bb.emit_func_output(gv)
    data = RNG.uniform(0, 1, (4, 16, 8, 8)).astype("float32")
    for pairs, fits in ((True, True), (False, False)):
        found = []
        relax.analysis.post_order_visit(_calibrate(bb.get(), data, weight_pairs=pairs)["main"],
                                        lambda e: found.append(const_value(e)) if is_constant(e) else None)
        (q,) = [v for v in found if v.dtype == np.int8 and v.ndim == 4]
        assert (pair_weight_sums(q).max() <= 128) == fits


def test_dense_weights_fit_pair_sums_unless_they_read_a_flattened_map():
    """A dense layer runs the pair-summing dot kernel on its rows: with ``weight_pairs`` its
    weight fits the pairs, except after a flatten of a feature map, whose rows the
    channels-last rewrite reorders (the pairs fitted here would not be the kernel's)."""
    from tvm_compress.relax_utils import const_value, is_constant
    from tvm_compress.specs import pair_weight_sums

    w_conv = RNG.standard_normal((8, 4, 1, 1)).astype("float32")
    w_head = 0.05 * RNG.standard_normal((72, 16)).astype("float32")
    w_out = 0.05 * RNG.standard_normal((16, 4)).astype("float32")
    for w in (w_head, w_out):
        w[0::2, :], w[1::2, :] = 1.0, 0.9  # every column: large same-signed pairs of rows
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 3, 3), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, relax.const(w_conv))))
            y = bb.emit(relax.op.reshape(y, (1, 72)))
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(y, relax.const(w_head))))
            gv = bb.emit_output(relax.op.matmul(y, relax.const(w_out)))
        bb.emit_func_output(gv)
    data = RNG.uniform(0, 1, (4, 4, 3, 3)).astype("float32")
    found = []
    relax.analysis.post_order_visit(_calibrate(bb.get(), data, weight_pairs=True)["main"],
                                    lambda e: found.append(const_value(e)) if is_constant(e) else None)
    int8 = {v.shape: v for v in found if v.dtype == np.int8 and v.ndim == 2}
    assert pair_weight_sums(int8[(16, 4)].T).max() <= 128   # fitted
    assert pair_weight_sums(int8[(72, 16)].T).max() > 128    # after the flatten: as plain int8


def test_inputs_of_other_leading_sizes_get_their_own_rows_per_batch():
    """A sequence input (T, F) beside a recurrent state (1, 1, H): each batch feeds the state
    its own leading size, not the sequence's (it was given T rows and the model refused them)."""
    from tvm_compress.calib_data import Preprocess, load_calibration

    inputs = [("x", (6, 5), "float32"), ("h", (1, 1, 3), "float32")]
    data = load_calibration("random", inputs, Preprocess(), limit=20, log=lambda m: None)
    feeds = list(data.batches(6))
    assert len(feeds) == 4  # 20 rows of x in batches of 6, the last one filled up
    for k, (feed, _) in enumerate(feeds):
        assert feed["x"].shape == (6, 5) and feed["h"].shape == (1, 1, 3)
        np.testing.assert_array_equal(feed["h"], data.inputs["h"][k:k + 1])


def test_percentile_clips_an_outlier_minmax_does_not():
    x = np.abs(RNG.standard_normal(200_000)).astype("float32")
    x[123] = 1000.0
    obs = _observer(x)
    assert obs.clip_range("minmax", 99.99, 256) == (0.0, 1000.0)
    lo, hi = obs.clip_range("percentile", 99.99, 256)
    assert lo == 0.0 and 3.0 < hi < 6.0  # the 99.99th percentile of |N(0,1)| is about 3.9
    _, ent = obs.clip_range("entropy", 99.99, 256)
    assert ent < 200.0  # KL also ignores a single outlier (at most 128 of 2048 bins)


def test_signed_percentile_and_qparams():
    x = RNG.standard_normal(100_000).astype("float32")
    x[0], x[1] = -500.0, 400.0
    lo, hi = _observer(x).clip_range("percentile", 99.9, 128)
    assert -4.5 < lo < -2.5 and 2.5 < hi < 4.5
    assert qparams(-1.0, 2.0, "int8") == (pytest.approx(2.0 / 127), 0, "int8")
    assert qparams(0.0, 2.55, "auto") == (pytest.approx(0.01), 0, "uint8")
    s, z, d = qparams(-1.0, 1.55, "uint8")
    assert d == "uint8" and s == pytest.approx(0.01) and z == 100


def test_entropy_threshold_on_uniform_keeps_the_range():
    hist = np.full(2048, 100.0)
    assert kl_threshold(hist, 128) >= 2000  # nothing to clip in a uniform distribution


@I.ir_module
class TwoConv:
    @R.function
    def main(x: R.Tensor((2, 3, 8, 8), "float32"), w1: R.Tensor((8, 3, 3, 3), "float32"),
             w2: R.Tensor((4, 8, 3, 3), "float32")) -> R.Tensor((2, 4, 8, 8), "float32"):
        with R.dataflow():
            lv = R.nn.conv2d(x, w1, padding=[1, 1, 1, 1])
            lv1 = R.nn.relu(lv)
            gv = R.nn.conv2d(lv1, w2, padding=[1, 1, 1, 1])
            R.output(gv)
        return gv


def two_conv(sensitive=False):
    w1 = RNG.standard_normal((8, 3, 3, 3)).astype("float32") * 0.3
    w2 = RNG.standard_normal((4, 8, 3, 3)).astype("float32") * 0.3
    if sensitive:
        # channel 0 of the hidden activation is 1000x larger and scaled back by conv2: one
        # per-tensor scale for that activation wipes out the other 7 channels.
        w1[0] *= 1000.0
        w2[:, 0] /= 1000.0
    return relax.transform.BindParams("main", {"w1": w1, "w2": w2})(TwoConv)


def _calibrate(mod, data, **cfg):
    annotated = QuantizeAnnotate(QuantizeAnnotateConfig())(mod)
    return Calibrate(CalibrateConfig(**cfg), dataset=data)(annotated)


def test_pass_minmax_vs_percentile_scale():
    data = RNG.uniform(0, 1, (16, 3, 8, 8)).astype("float32")
    data[3, 1, 2, 2] = 500.0
    mm = qc.read_report(_calibrate(two_conv(), data, method="minmax"))
    pc = qc.read_report(_calibrate(two_conv(), data, method="percentile", percentile=99.9))
    s_mm = mm["layers"][0]["input_quant"]["scale"]
    s_pc = pc["layers"][0]["input_quant"]["scale"]
    assert s_mm == pytest.approx(500.0 / 255)  # non-negative input: uint8 with zero point 0
    assert s_pc < 1.1 / 255
    text = _calibrate(two_conv(), data, method="entropy")["main"].script(show_meta=False)
    assert text.count("R.quantize(") == 2 and text.count("R.dequantize(") == 4


def test_fallback_keeps_the_sensitive_layer_in_float():
    mod = two_conv(sensitive=True)
    data = RNG.uniform(0, 1, (32, 3, 8, 8)).astype("float32")
    out = _calibrate(mod, data, method="minmax", max_error=0.05, eval_samples=16)
    report = qc.read_report(out)
    status = {l["name"]: l["status"] for l in report["layers"]}
    assert status == {"conv2d_0": "int8", "conv2d_1": "float"}
    assert report["fallback"]["float_layer_names"] == ["conv2d_1"]
    assert report["fallback"]["met"] and report["fallback"]["error_final"] <= 0.05
    reason = report["layers"][1]["reason"]
    assert "--max-error 0.05" in reason and "sensitive" in reason
    sens = {l["name"]: l["sensitivity"] for l in report["layers"]}
    assert sens["conv2d_1"] > 10 * sens["conv2d_0"]
    realized = qc.read_report(QuantizeRealize()(out))
    assert [l["status"] for l in realized["layers"]] == ["int8", "float"]


def test_random_calibration_warns():
    annotated = QuantizeAnnotate(QuantizeAnnotateConfig())(two_conv())
    logs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, in the log: no Python warning with a source line
        Calibrate(CalibrateConfig(calib="random"), log=logs.append)(annotated)
    assert any("calibrating on random data: the result's accuracy is unknown" in m for m in logs)


def test_npz_file_with_uint8_images(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, calib=RNG.integers(0, 256, (6, 8, 8, 3)).astype("uint8"), calib_labels=np.arange(6))
    out = _calibrate(two_conv(), None, calib=str(path), mean=(0.5,), std=(0.25,))
    rep = qc.read_report(out)
    assert rep["calibration"]["samples"] == 6
    stats = rep["points"][0]["stats"]
    assert -2.01 <= stats["min"] < -1.5 and 1.5 < stats["max"] <= 2.01  # (x/255 - 0.5) / 0.25


@pytest.mark.parametrize(
    "cfg, words",
    [
        (dict(method="mse"), "unknown calibration method 'mse'"),
        (dict(percentile=20), "percentile must be in (50, 100]"),
        (dict(activation_dtype="int4"), "unknown activation dtype 'int4'"),
        (dict(max_error=0.1, max_accuracy_drop=1.0), "either max_error or max_accuracy_drop"),
    ],
)
def test_bad_options_one_line(cfg, words):
    with pytest.raises(PassOptionError) as err:
        CalibrateConfig(**cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "data, calib, words",
    [
        (np.zeros((0, 3, 8, 8), "float32"), None, "is empty"),
        (np.zeros((4, 3, 9, 9), "float32"), None, "has sample shape (3, 9, 9), the model expects (3, 8, 8)"),
        (None, None, "quantize needs calibration data"),
        (None, "/nonexistent/calib.npz", "does not exist"),
    ],
)
def test_bad_data_one_line(tmp_path, data, calib, words):
    annotated = QuantizeAnnotate(QuantizeAnnotateConfig())(two_conv())
    with pytest.raises(DataError) as err:
        Calibrate(CalibrateConfig(calib=calib), dataset=data)(annotated)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_empty_npz_and_accuracy_budget_without_labels(tmp_path):
    annotated = QuantizeAnnotate(QuantizeAnnotateConfig())(two_conv())
    path = tmp_path / "empty.npz"
    np.savez(path, calib=np.zeros((0, 3, 8, 8), "float32"))
    with pytest.raises(DataError, match="is empty"):
        Calibrate(CalibrateConfig(calib=str(path)))(annotated)
    with pytest.raises(DataError, match="needs labelled calibration data"):
        Calibrate(CalibrateConfig(max_accuracy_drop=1.0),
                  dataset=np.ones((4, 3, 8, 8), "float32"))(annotated)


def test_report_has_per_layer_errors():
    data = RNG.uniform(0, 1, (8, 3, 8, 8)).astype("float32")
    report = qc.read_report(_calibrate(two_conv(), data, method="minmax", eval_samples=2))
    errs = [l["input_error"] for l in report["layers"]]
    assert all(0 <= e < 0.05 for e in errs), errs
    assert 0 < report["output_error"] < 0.1


# ---- image folders (decoded by Pillow) ----------------------------------------------------------

def _image_folder(tmp_path):
    """Lossless RGB PNG, gray PGM, RGB PPM and RGBA PNG of 8x8: the arrays and the folder."""
    from PIL import Image

    rgb = RNG.integers(0, 256, (8, 8, 3)).astype("uint8")
    gray = RNG.integers(0, 256, (8, 8)).astype("uint8")
    ppm = RNG.integers(0, 256, (8, 8, 3)).astype("uint8")
    rgba = RNG.integers(0, 256, (8, 8, 4)).astype("uint8")
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(gray).save(tmp_path / "b.pgm")
    (tmp_path / "sub").mkdir()
    Image.fromarray(ppm).save(tmp_path / "sub" / "c.ppm")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sub" / "d.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return [rgb, np.repeat(gray[..., None], 3, 2), ppm, rgba[..., :3]], tmp_path


def test_image_folder_rgb_nchw_and_nhwc(tmp_path):
    from tvm_compress.calib_data import Preprocess, load_calibration

    want, folder = _image_folder(tmp_path)
    want = np.stack(want).astype("float32") / 255.0  # sorted: a.png, b.pgm, sub/c.ppm, sub/d.png
    data = load_calibration(str(folder), [("x", (1, 3, 8, 8), "float32")], Preprocess(), 100)
    assert data.count == 4 and data.labels is None and data.source == str(folder)
    np.testing.assert_allclose(data.inputs["x"], want.transpose(0, 3, 1, 2), atol=1e-6)

    prep = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), layout="NHWC", bgr=True)
    data = load_calibration(str(folder), [("x", (1, 8, 8, 3), "float32")], prep, 3)
    assert data.inputs["x"].shape == (3, 8, 8, 3)
    expect = (want[:3, ..., ::-1] - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(data.inputs["x"], expect, atol=1e-5)


def test_image_folder_gray_model_and_resize(tmp_path):
    from tvm_compress.calib_data import Preprocess, _resize, load_calibration

    want, folder = _image_folder(tmp_path)
    data = load_calibration(str(folder), [("x", (1, 1, 8, 8), "float32")], Preprocess(), 100)
    luma = [np.rint(w.astype("float32") @ np.array([0.299, 0.587, 0.114], "float32")) for w in want]
    np.testing.assert_allclose(data.inputs["x"][:, 0], np.stack(luma) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(data.inputs["x"][1, 0], want[1][..., 0] / np.float32(255.0))

    data = load_calibration(str(folder), [("x", (1, 3, 5, 6), "float32")], Preprocess(), 1)
    np.testing.assert_allclose(data.inputs["x"][0], _resize(want[0], 5, 6).transpose(2, 0, 1) / 255.0,
                               atol=1e-6)


def test_image_folder_jpeg_bmp_and_16bit(tmp_path):
    from PIL import Image

    from tvm_compress.calib_data import Preprocess, load_calibration

    rgb = np.zeros((8, 8, 3), "uint8")
    rgb[:, :, 0] = 200
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "b.bmp")
    gray16 = np.full((8, 8), 257 * 100, "uint16")
    Image.fromarray(gray16).save(tmp_path / "c.png")  # 16-bit gray: scaled to 8 bits, not clipped
    data = load_calibration(str(tmp_path), [("x", (1, 3, 8, 8), "float32")], Preprocess(), 100)
    x = data.inputs["x"] * 255.0
    assert np.abs(x[0, 0] - 200).max() <= 3 and np.abs(x[0, 1:]).max() <= 3  # JPEG is lossy
    np.testing.assert_allclose(x[1, 0], 200, atol=1e-3)
    np.testing.assert_allclose(x[2], 100, atol=1e-3)
    # the same folder through the pass
    rep = qc.read_report(_calibrate(two_conv(), None, calib=str(tmp_path)))
    assert rep["calibration"]["samples"] == 3


@pytest.mark.parametrize(
    "name, content",
    [
        ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"\x00" * 5),  # cut in the header
        ("junk.jpg", b"hello, not a jpeg"),
        ("empty.pgm", b""),
        ("trunc.png", None),  # a real PNG cut in its pixel data
    ],
)
def test_bad_image_one_line_names_the_file(tmp_path, name, content):
    from PIL import Image

    from tvm_compress.calib_data import Preprocess, load_calibration

    Image.fromarray(RNG.integers(0, 256, (8, 8, 3)).astype("uint8")).save(tmp_path / "a.png")
    bad = tmp_path / name
    if content is None:
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3)).astype("uint8")).save(bad)
        content = bad.read_bytes()[:-200]
    bad.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_calibration(str(tmp_path), [("x", (1, 3, 8, 8), "float32")], Preprocess(), 100)
    msg = str(err.value)
    assert str(bad) in msg and "not a readable image" in msg and "\n" not in msg


def test_image_folder_without_images(tmp_path):
    from tvm_compress.calib_data import Preprocess, load_calibration

    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="has no images"):
        load_calibration(str(tmp_path), [("x", (1, 3, 8, 8), "float32")], Preprocess(), 100)


def test_large_models_run_their_calibration_copy_on_scheduled_kernels(monkeypatch):
    """From ``SCHEDULE_FROM_MACS`` the host build schedules the module with the default CPU
    schedule first (LegalizeOps' naive loops took 490 s to quantize ConvNeXt-Tiny, 29 s
    scheduled); it computes what the naive build does."""
    from tvm_compress.passes import _host
    from tvm_compress.targets import cpu_schedule

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 24, 24), "float32"))
    w = np.random.default_rng(5).standard_normal((32, 16, 3, 3)).astype("float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(x, relax.const(w), padding=1)))
            out = bb.emit_output(relax.op.mean(y, axis=[2, 3]))
        bb.emit_func_output(out)
    mod = bb.get()
    data = np.random.default_rng(6).standard_normal((1, 16, 24, 24)).astype("float32")
    naive = _host.host_run(mod)(data)
    scheduled_with = []
    default = cpu_schedule.cpu_default_schedule
    monkeypatch.setattr(cpu_schedule, "cpu_default_schedule", lambda lanes: scheduled_with.append(lanes) or default(lanes))
    monkeypatch.setattr(_host, "SCHEDULE_FROM_MACS", 0)
    np.testing.assert_allclose(_host.host_run(mod)(data), naive, rtol=1e-5, atol=1e-5)
    # the host's own vector width (it assumed 8 lanes: AVX-512 hosts scheduled for half theirs)
    from tvm_compress.host_build import host_lanes
    from tvm_compress.targets import get_family, get_target

    assert scheduled_with == [host_lanes()] == [get_family("x86").vector_lanes(get_target("x86"))]
