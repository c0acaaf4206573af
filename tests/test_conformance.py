"""The conformance corpus: every model of the onnx package's backend test data, compiled for the
host and compared with the outputs shipped beside it (``scripts/conformance.py``). Each ends as
a match or a one-line refusal; none compiles wrong, none crashes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from conformance import cases, check_case  # noqa: E402

# Matches measured when the corpus was added (docs/robustness.md); fewer means a regression.
MIN_MATCHES = 120


@pytest.mark.slow
def test_every_corpus_model_matches_or_is_refused_in_one_line(tmp_path):
    from tvm_compress.console import native_output

    results = []
    with native_output(tmp_path / "native.log"):
        for case in cases():
            results.append(check_case(case, tmp_path))
    bad = [r for r in results if r["outcome"] in ("WRONG", "CRASH")]
    assert not bad, bad
    refusals = [r for r in results if r["outcome"] == "refused"]
    assert all("\n" not in str(r["reason"]) and r["reason"] for r in refusals)
    assert sum(r["outcome"] == "match" for r in results) >= MIN_MATCHES, \
        [(r["name"], r["reason"]) for r in refusals]
