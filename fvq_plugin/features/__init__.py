"""The four face-aware feature streams of FVQ-Rater (see pipeline.py for how they run together).

Its names load on first use, so that importing one stream's module (e.g. features.face for the
fvq_rater_lite student) does not import torchvision through the spatial stream.
"""
__all__ = ["FEATURES_VERSION", "FeatureConfig", "FeatureExtractor", "FramePreparer", "model_inputs"]


def __getattr__(name):
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
