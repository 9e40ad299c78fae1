"""The one patch into pyiqa: let a metric's network prepare its own inputs.

pyiqa 0.1.16's InferenceModel reads every str input as an image and requires 4-D tensors, with
no per-metric hook, so a video path or a clip could never reach a video metric. We wrap
`InferenceModel._prepare_inputs`: a network that defines `prepare_inputs(target)` receives the
raw input and returns what its forward takes (anything with `.to(device)`); every other metric
goes through pyiqa's own code unchanged. tests/test_pyiqa.py fails if pyiqa changes the code
this relies on.
"""
from __future__ import annotations

import functools

_MARK = "_fvq_plugin_hook"


def install() -> None:
    from pyiqa.models.inference_model import InferenceModel

    original = InferenceModel._prepare_inputs
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _prepare_inputs(self, target, ref=None):
        hook = getattr(self.net, "prepare_inputs", None)
        if hook is None:
            return original(self, target, ref)
        return hook(target), ref

    setattr(_prepare_inputs, _MARK, True)
    InferenceModel._prepare_inputs = _prepare_inputs


class VideoPaths(list):
    """File paths handed through InferenceModel.forward, which calls `.to(device)` on its input."""

    def to(self, *args, **kwargs):
        return self
