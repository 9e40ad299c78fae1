"""tools/gpu_check.py: its --smoke run (the GPU check's code path at tiny shapes, float32, CPU) and its verdicts.

The smoke run happens in a subprocess where the video, face and pyiqa/lmms-eval libraries look
uninstalled, as on the GPU host: the check must import only the model path.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"
# Absent on the GPU host; the model path must not import them (an import attempt fails the test).
HEAVY = ("av", "decord", "pyiqa", "lmms_eval", "pytorchvideo", "cv2", "mediapipe", "insightface", "onnxruntime",
         "scipy")
# Also absent there, but libraries may try them inside try/except: hidden, not asserted on.
ALSO_ABSENT = ("PIL", "torchvision", "skimage", "sklearn", "timm", "bitsandbytes")

# Runs tools/gpu_check.py with HEAVY + ALSO_ABSENT hidden from the import system: importlib.util.find_spec
# says None (so transformers' availability checks see them missing) and `import` raises
# ModuleNotFoundError. Real import attempts (not availability probes) are written to $IMPORT_RECORD.
WRAPPER = r"""
import atexit, importlib.machinery, json, os, runpy, sys

heavy, hidden = set(sys.argv[1].split(",")), set(sys.argv[1].split(",")) | set(sys.argv[2].split(","))
attempts = []

def _probe():
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "find_spec" and frame.f_code.co_filename.endswith(("importlib/util.py",
                                                                                      "<frozen importlib.util>")):
            return True
        frame = frame.f_back
    return False

class Absent:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            if name.split(".")[0] in heavy and not _probe():
                attempts.append(name)
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Absent

@atexit.register
def _record():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
    with open(os.environ["IMPORT_RECORD"], "w") as f:
        json.dump({"attempts": sorted(set(attempts)), "loaded": loaded}, f)

script = sys.argv[3]
sys.argv = sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_every_field_and_passes_without_the_heavy_libraries(tmp_path):
    record = tmp_path / "imports.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path / "out"), "IMPORT_RECORD": str(record),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FVQ_PLUGIN_DISCOVERY": "0"}
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", WRAPPER, ",".join(HEAVY), ",".join(ALSO_ABSENT), str(SCRIPT),
                           "--smoke", "--tmp", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    imports = json.loads(record.read_text())
    assert imports == {"attempts": [], "loaded": []}, imports

    printed = done.stdout
    for field in ("torch ", "transformers ", "peft ", "CPU:", "flash_attn package:", "prefill (",
                  "videos/s", "peak MB", "build:", "save_pretrained:", "from_pretrained(dtype=float32",
                  "attn_implementation='sdpa'", "attention: configured", "sdpa used",
                  "batch 8 vs 8 x batch 1", "-> PASS", "VERDICT: PASS"):
        assert field in printed, f"{field!r} missing from:\n{printed}"

    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())  # $OUT/gpu_check.json
    assert report["mode"] == "smoke" and report["verdict"] == "PASS"
    assert not report["errors"] and not report["skipped"]
    assert {"torch", "transformers", "peft", "gpu", "flash_attn_package"} <= set(report["environment"])
    tiny = report["configs"]["tiny"]
    assert set(tiny["throughput"]["batches"]) == {"1", "8"}
    assert all(b["videos_per_s"] > 0 and b["peak_memory_mb"] > 0 for b in tiny["throughput"]["batches"].values())
    assert tiny["load"]["seconds"] > 0 and tiny["load"]["attn_implementation"] == "sdpa"
    assert tiny["attention"]["sdpa_used"] and tiny["attention"]["configured"]["text"] == "sdpa"
    equality = tiny["batch_equality"]
    assert equality["passed"] and equality["max_abs_score_diff"] <= equality["tolerance_points"] == 1e-3
    assert equality["compared_videos"] == 8 and not equality["level_flips"]
    assert equality["score_spread_std"] > 0.1  # the scores depend on the video: the comparison is not vacuous
    assert not list(tmp_path.glob("fvq-gpu-check-*"))  # the temporary checkpoint is removed


def test_a_budget_too_small_skips_every_step_with_a_line(tmp_path, capsys):
    module = _load_module()
    assert module.main(["--smoke", "--budget-s", "0", "--json", str(tmp_path / "r.json"), "--tmp", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "SKIP throughput" in printed and "SKIP build" in printed and "VERDICT: INCOMPLETE" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["step"] for s in report["skipped"]] == ["throughput", "build"]


class _BatchDependent(nn.Module):
    """A stand-in rater whose score moves with the batch size by `shift` points, and whose level logits
    for videos with temporal[:, 0] > 0 tie "good" with "excellent", broken by +-`tie` with the batch size."""

    def __init__(self, shift: float, tie: float = 0.0):
        super().__init__()
        self.shift, self.tie = shift, tie
        self.config = SimpleNamespace(num_frames=2, face_dim=4, temporal_dim=3)
        self.image_size = (4, 4)
        self.score_head = nn.Linear(3, 1)

    def forward(self, pixel_values, temporal, **_):
        batch = pixel_values.shape[0]
        hidden = temporal + 0.0
        score = self.score_head(hidden).squeeze(-1) * 100 + self.shift * (batch > 1)
        level_logits = torch.stack([temporal[:, 0] * i for i in range(5)], -1)
        if self.tie:
            tied = temporal[:, 0] > 0
            level_logits[tied, 3] = level_logits[tied, 4] + (self.tie if batch > 1 else -self.tie)
        return SimpleNamespace(score=score, level_logits=level_logits)


def test_batch_equality_fails_when_scores_depend_on_the_batch_size():
    module = _load_module()
    assert module.step_batch_equality(_BatchDependent(0.0), "cpu", 0.5, 0.25)["passed"]
    result = module.step_batch_equality(_BatchDependent(0.8), "cpu", 0.5, 0.25)
    assert not result["passed"] and abs(result["max_abs_score_diff"] - 0.8) < 1e-3


def test_a_level_flip_at_a_near_tie_is_reported_and_accepted_only_while_the_logits_agree():
    module = _load_module()
    near = module.step_batch_equality(_BatchDependent(0.0, tie=0.01), "cpu", 0.5, 0.25)
    assert near["passed"] and near["level_flips"] and 0 < near["compared_videos"] < 8
    assert all((f["level_batch8"], f["level_batch1"]) == (3, 4) for f in near["level_flips"])
    assert not module.step_batch_equality(_BatchDependent(0.0, tie=1.0), "cpu", 0.5, 0.25)["passed"]
