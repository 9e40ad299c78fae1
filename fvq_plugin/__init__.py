"""fvq-plugin: FVQ-Rater face-video quality assessment for pyiqa and lmms-eval."""

__version__ = "0.1.0"
