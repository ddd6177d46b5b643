"""`ifedicl demo` end to end on the real SmolLM2-135M: the run beats zero-shot, and serving agrees.

The one slow real-model federation of the suite (fixed seed, the Subj slice shipped with
the package, 200 train texts over 4 client actors, 3 second-order rounds of the label-only loss on half
of each shard): it is the README's first command, so it is also the test that the product
does what the README promises. Accuracy is asserted because the
weights are real and the seed fixed; the margin was measured first (see MEASURED_GAIN).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ifedicl.federation_job.second_order import stats_size
from ifedicl.storage.store import Store

# The whole product in one subprocess: 804 s beside the other pytest-xdist worker on a 2-core AVX2-only CPU,
# too close to the suite-wide 900 s; a hung demo still fails at its own limit.
DEMO_TIMEOUT_S = 1500
pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(DEMO_TIMEOUT_S + 60)]

# IFed-ICL minus zero-shot measured with the second-order round and stage 1 from 32 examples a client (49.5% ->
# 77.5%, AVX2 machine; from every example: 78.0%; local AdamW steps, the earlier default: 73.5%); asserted with
# slack below
MEASURED_GAIN = 0.28
SLACK = 0.05


def test_demo_federates_serves_and_beats_zero_shot(tmp_path, real_models):
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "ifedicl.cli", "demo", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=DEMO_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((workdir / "demo-result.json").read_text())
    assert "zero-shot" in done.stdout and "IFed-ICL" in done.stdout
    assert result["served_examples"] == 200
    # The served answers are the evaluated ones (float32 on both paths): at most one text of 200 differs.
    assert abs(result["served_accuracy"] - result["run_accuracy"]) <= 1 / 200 + 1e-9
    assert result["served_accuracy"] >= result["zero_shot_accuracy"] + MEASURED_GAIN - SLACK
    # A round's upload: the loss twice, the gradient and the upper triangle of the Gauss-Newton matrix of the
    # 120 coefficients (30 layers x 2 blocks x 2), float32, plus its framing (216 B measured).
    stats_bytes = 4 * stats_size(120, spread=True)  # the default check also sends its decrease's variance
    assert stats_bytes <= result["round_bytes_up_per_client"] <= stats_bytes + 256
    store = Store(workdir / "store")
    assert store.published_run_id("subj") == result["run_id"]
