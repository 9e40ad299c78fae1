"""fvq-plugin: FVQ-Rater face-video quality assessment for pyiqa and lmms-eval.

Importing this package makes `pyiqa.create_metric("fvq_rater")` available (as soon as pyiqa
is imported, before or after this package).
"""

__version__ = "0.1.0"

from .integrations import register_when_pyiqa_loads

register_when_pyiqa_loads()
