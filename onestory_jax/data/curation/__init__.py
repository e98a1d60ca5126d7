"""Data curation (paper Sec. 3): raw videos -> multi-shot story units with per-shot captions.

The command is ``python -m onestory_jax.data.curate`` (docs/curation.md). Modules, one concept each:

* config: :class:`CurationConfig`, every setting with its default;
* decode: PyAV decoding, resampled to a frame rate and a frame size;
* shots: the :class:`ShotDetector` interface and its backends (PySceneDetect; TransNetV2 is an open slot);
* filters: per-shot statistics, the rejection rules and the pluggable shot embedding;
* captions: the :class:`Captioner` interface, the two-stage referential scheme, the JSONL captions;
* vlm: a captioner backend that runs a local transformers vision-language model (imported on demand: torch);
* units: cutting consecutive kept shots into 2- and 3-shot story units;
* pipeline: one video, and a resumable run over many;
* synthetic: StoryWorld videos with known cuts, for the tests and the benchmark.
"""

from onestory_jax.data.curation.captions import Captioner
from onestory_jax.data.curation.captions import JsonlCaptions
from onestory_jax.data.curation.captions import TwoStageCaptioner
from onestory_jax.data.curation.config import CurationConfig
from onestory_jax.data.curation.decode import iter_frames
from onestory_jax.data.curation.decode import Undecodable
from onestory_jax.data.curation.filters import register_similarity
from onestory_jax.data.curation.pipeline import curate
from onestory_jax.data.curation.pipeline import curate_video
from onestory_jax.data.curation.pipeline import find_videos
from onestory_jax.data.curation.pipeline import REASONS
from onestory_jax.data.curation.shots import register_detector
from onestory_jax.data.curation.shots import ShotDetector
from onestory_jax.data.curation.units import story_units
