"""EDEN frame interpolation (bbldCVer/EDEN, CVPR 2025: a diffusion transformer), vsr_ddp's own
implementation, loading the published ``eden.pt`` strictly. model.py: the network; engine.py:
loading, the published constants and the 2-step Euler sampler (``Eden.midpoint``)."""
from .engine import (COS_SIM_MEAN, COS_SIM_STD, ODE_TIMES, VAE_SCALER, VAE_SHIFT, difference_of,
                     is_eden_state, load_eden, load_eden_if, midpoint, midpoints, noise_for, pad_amounts,
                     random_eden, sample, save_eden, unwrap)
from .model import Condition, Eden, EdenConfig, config_from_shapes, parameter_counts, pos_embedding

__all__ = ["COS_SIM_MEAN", "COS_SIM_STD", "Condition", "Eden", "EdenConfig", "ODE_TIMES", "VAE_SCALER",
           "VAE_SHIFT", "config_from_shapes", "difference_of", "is_eden_state", "load_eden", "load_eden_if",
           "midpoint", "midpoints", "noise_for", "pad_amounts", "parameter_counts", "pos_embedding",
           "random_eden", "sample", "save_eden", "unwrap"]
