"""Start-up announcements of third-party libraries, silenced where they start; our own warnings stay.

TensorFlow Lite announces its XNNPACK delegate and OpenCV's dnn warns about compute targets on every
model load. Both write from C++ straight to file descriptor 2, where Python's warnings and logging
filters cannot reach, so `native_stderr_filtered` captures fd 2 around such a call and writes back
every line except those known announcements: a real error from the same call still shows.
bitsandbytes (installed for pyiqa) logs a warning about an optional CPU kernel whenever it is
imported; its logger is raised to ERROR.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

NATIVE_NOISE = re.compile(r"Created TensorFlow Lite XNNPACK delegate for CPU|"
                          r"setPreferableTarget Targets are not supported by the new graph engine")
NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


@contextlib.contextmanager
def native_stderr_filtered():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not NATIVE_NOISE.search(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def quiet_noisy_loggers() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
