"""scripts/gpu-check.sh, the one command for the first GPU session, runs end to end in its CPU mode (so it cannot
rot between GPU sessions): every section reports, none fails."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow                                               # about two minutes on 2 cores
def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    report = tmp_path / "gpu-check.md"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--cpu", "--quick", "--out", str(report)],
                          capture_output=True, text=True, env=env, timeout=600)
    text = report.read_text()
    assert done.returncode == 0, text + done.stderr[-2000:]
    for section in ("SDPA probe", "tnt bench vs timm", "Augmentation stage alone", "Train 20 steps"):
        assert f"## {section}" in text
    assert "**failed:**" not in text
    assert "TNT-S/DeiT-S throughput" in text and "host syncs reported" in text and "`--resume`" in text
