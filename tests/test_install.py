"""The install route: a torch/torchvision pair whose compiled ops load, and frameworks that import."""
import importlib
import subprocess
import sys

import torch
import torchvision


def test_torchvision_ops_load_with_this_torch():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_frameworks_import():
    for name in ("pyiqa", "lmms_eval", "transformers", "peft", "accelerate", "decord", "insightface", "av"):
        importlib.import_module(name)


def test_tasks_and_metrics_install_under_fvq_plugin_only(tmp_path):
    # Run outside the checkout: from the repository root, its folders are importable regardless.
    probe = "from importlib.util import find_spec as f; print([f(n) is not None for n in %r])"
    names = ["fvq_plugin.metrics", "fvq_plugin.tasks.fvq20k", "tasks", "metrics"]
    found = subprocess.run([sys.executable, "-c", probe % names], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[True, True, False, False]"
