"""Shared builders for test inputs: tiny models in their real on-disk formats, clips, bad inputs.

Everything is generated locally and deterministically: models come from seeded
random weights, clips are encoded by the ffmpeg binary bundled with imageio-ffmpeg
(never a system ffmpeg, so every machine encodes alike). A plain sequential PyAV decode
is the reference; the production reader (seeks, frames counted by timestamp; or decord) is
checked against it.

One module per thing built: sr_models (Real-ESRGAN layouts), clips (index-coded clips and the
reference readers), footage (rotation, VFR, interlacing, 10-bit, audio/subtitle timing, camera
motion; the streams beside the video: audio tracks, cover art, DVD subtitles), bad_inputs, sd15
(SD 1.5 + ControlNet folders and single files), temporal_models (a stub of the temporal model
protocol), weights (random weights of a useful scale), runs (killing a run mid-way, its finished shards
and "already done" counts). Tests import them all from here: ``from builders import make_clip``.
"""
from .bad_inputs import *  # noqa: F401,F403
from .clips import *  # noqa: F401,F403
from .common import FFMPEG  # noqa: F401
from .footage import *  # noqa: F401,F403
from .runs import *  # noqa: F401,F403
from .sd15 import *  # noqa: F401,F403
from .sr_models import *  # noqa: F401,F403
from .temporal_models import *  # noqa: F401,F403
from .weights import *  # noqa: F401,F403
