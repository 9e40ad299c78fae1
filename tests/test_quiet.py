import os
import subprocess
import sys

import pytest

from fvq_plugin.quiet import native_stderr_filtered


@pytest.mark.reliability
def test_only_the_known_native_announcements_are_dropped(capfd):
    with native_stderr_filtered():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"[ WARN:0@1.1] global net_impl_backend.cpp:345 setPreferableTarget Targets are not supported "
                    b"by the new graph engine for now\n")
        os.write(2, b"a real error from the same library\n")
    assert capfd.readouterr().err == "a real error from the same library\n"


@pytest.mark.reliability
def test_loading_the_feature_models_prints_nothing_but_our_own_warnings():
    code = ("import numpy as np\nfrom fvq_plugin.features.portrait import PortraitFeatures\n"
            "from fvq_plugin.features.face import FaceFeatures\nimport fvq_plugin.model, peft\n"
            "frames = np.zeros((1, 64, 64, 3), np.uint8)\nPortraitFeatures()(frames)\n"
            "FaceFeatures(backend='yunet-sface')(frames)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for noise in ("XNNPACK", "setPreferableTarget", "gemm_4bit_forward"):
        assert noise not in run.stderr, run.stderr
