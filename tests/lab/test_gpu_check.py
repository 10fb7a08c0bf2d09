"""The GPU check runs end to end (on the CPU, at a tiny shape) and writes every phase's figures."""

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_measures_every_phase_at_a_tiny_shape(tmp_path):
    command = [sys.executable, "-m", "lab.gpu_check", "--shapes", "tiny", "--device", "cpu", "--dtype", "float32",
               "--samples", "4", "--seq-len", "32", "--edits", "64", "--singles", "1", "--epochs", "1",
               "--out", str(tmp_path)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    tiny = report["tiny"]
    assert tiny["cache"]["tokens"] == 4 * 31 and tiny["cache"]["eigh_fp32_s"] > 0
    assert tiny["ft_vs_crispedit"]["ft"]["steps"] == tiny["ft_vs_crispedit"]["crispedit"]["steps"] == 2
    assert tiny["coalescing"]["coalesced_s"] > 0 and len(tiny["coalescing"]["single_job_s"]) == 1
    assert "finished" in report
