"""fvq-plugin: FVQ-Rater face-video quality assessment for pyiqa and lmms-eval.

Installing the package is enough for `pyiqa.create_metric("fvq_rater")` and for lmms-eval's
`--model fvq_rater` and `--tasks fvq20k`; importing it also registers the pyiqa metric (as soon
as pyiqa is imported, before or after this package). See fvq_plugin.integrations.discovery.
"""

__version__ = "0.1.0"

from .integrations import discovery

discovery.install()
