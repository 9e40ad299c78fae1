"""The four face-aware feature streams of FVQ-Rater (see pipeline.py for how they run together)."""
from .pipeline import FEATURES_VERSION, FeatureConfig, FeatureExtractor, FramePreparer, model_inputs, video_flags

__all__ = ["FEATURES_VERSION", "FeatureConfig", "FeatureExtractor", "FramePreparer", "model_inputs", "video_flags"]
