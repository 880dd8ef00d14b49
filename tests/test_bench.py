"""The benchmark's --smoke mode: tiny sizes, so the script cannot rot unnoticed."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench" / "run.py"


def test_bench_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Time to reach the plain recipe" in proc.stdout and "Scaling" in proc.stdout
    (saved,) = tmp_path.glob("bench-*-smoke.json")
    results = json.loads(saved.read_text())
    assert results["machine"]["cores"] >= 1
    run = results["training"][0]
    assert set(run["baseline"]["stages"]) == set(run["wingspan"]["stages"]) == {"head",
                                                                                   "finetune"}
    # fp32 eager, PyTorch under the policy, and the policy in full (ONNX Runtime here)
    modes = [r["mode"] for r in results["inference"]]
    assert len(modes) == 3 and modes[0] == "fp32 eager NCHW" and "ONNX" in modes[2], modes
    key = next(k for k in results["inference"][0] if k.startswith("images_per_s"))
    eager = results["inference"][0][key]
    assert all(abs(r["speedup"] - r[key] / eager) < 0.05 for r in results["inference"])
    assert len(results["scaling"]) == 2 and results["wall_seconds"] > 0
    table = saved.with_suffix(".md").read_text()  # the README's tables, ready to paste
    assert "| data / backbone | stage | plain recipe | wingspan |" in table
    assert "--smoke" in table
