"""Every shared parity case must match the official implementation through `vl2 trace` + compare.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.helpers import PARITY
from vl2cli.cli import app

CASES = sorted(p for p in PARITY.iterdir() if (p / "case.json").exists())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_trace_matches_golden(case, tmp_path):
    spec = json.loads((case / "case.json").read_text())
    args = ["trace", "--model", str((case / spec["ckpt"]).resolve()), "--prompt", spec["prompt"],
            "--max-new-tokens", str(spec["max_new_tokens"]), "--out", str(tmp_path / "cand"), "--dtype", "float32"]
    for image in spec["images"]:
        args += ["--image", str((case / image).resolve())]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    verdict = subprocess.run([sys.executable, str(PARITY / "compare.py"), str(case / "golden"), str(tmp_path / "cand")],
                             capture_output=True, text=True)
    assert verdict.returncode == 0, verdict.stdout
    assert verdict.stdout.strip().splitlines()[-1].startswith("MATCH")
    # the decode steps themselves, through the scheduler's slot cache: one row of logits per generated token,
    # the first from the prefill (the format's last_logits), each choosing the token the trace generated
    import numpy as np
    arrays = np.load(tmp_path / "cand.npz")
    generated = json.loads((tmp_path / "cand.json").read_text())["generated_ids"]
    steps = arrays["step_logits"]
    assert steps.dtype == np.float32 and steps.shape == (len(generated), arrays["last_logits"].shape[0])
    assert steps.argmax(-1).tolist() == generated
    np.testing.assert_allclose(steps[0], arrays["last_logits"], atol=1e-4, rtol=1e-4)
