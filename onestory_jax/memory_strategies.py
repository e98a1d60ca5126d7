"""Memory strategies: which earlier frames condition the next shot (OneStory's and the simpler ones it is compared with).

The memory bank holds every latent frame of the earlier shots, oldest first (paper Eq. 2). A strategy picks up to
``K_sel`` of them and ranks them; the Adaptive Conditioner (Eq. 7) then patchifies the ranked frames into the same
context-token budget whatever the strategy, finest kernels for the best ranks, so the strategies differ only in the
frames they choose (paper Table 2a, Fig. 6):

* ``onestory``: Frame Selection scores every frame against the caption and keeps the top ``K_sel`` (Eqs. 3-6);
  ``full`` is its old name.
* ``none``: no memory, the no-memory baseline.
* ``last_frame``: the previous shot's last latent frame alone, the paper's ablation baseline (the I2V-style link).
* ``recent``: the ``K_sel`` most recent frames, the most recent ranked first (packed by recency, as FramePack does).
* ``uniform``: ``K_sel`` frames evenly spaced over all earlier shots, as ShotStream samples its memory; ranked by
  recency.
* ``keyframes``: a StoryMem-style bank: each shot's keyframes are its first latent frame and every later frame that
  differs from the last keyframe (cosine similarity of the latents below ``KEYFRAME_SIMILARITY``); the bank keeps the
  first ``KEYFRAME_FIXED`` keyframes of the story and fills the rest with the most recent ones (a FIFO), ranked most
  recent first, then the fixed ones.

Everything but ``onestory`` is a pure function of the bank (:func:`choose`), fed to the sampler as a forced choice
in place of Frame Selection's top-K, as the decoupled-conditioning warm-up feeds its uniform choice (Sec. 4.4).
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("onestory", "none", "last_frame", "recent", "uniform", "keyframes")
ALIASES = {"full": "onestory"}
KEYFRAME_SIMILARITY = 0.9
KEYFRAME_FIXED = 1


def canonical(name: str) -> str:
  """The strategy a name stands for (``full`` is ``onestory``); ValueError naming the choices otherwise."""
  name = ALIASES.get(name, name)
  if name not in STRATEGIES:
    raise ValueError(f"memory must be one of {STRATEGIES} (or 'full' for 'onestory'), got {name!r}")
  return name


def _ranked(frames: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
  idx = np.zeros((k,), np.int32)
  valid = np.zeros((k,), bool)
  frames = frames[:k]
  idx[: len(frames)] = frames
  valid[: len(frames)] = True
  return idx, valid


def training_choice(strategy: str, shots: int, frames_per_shot: int, k: int) -> tuple[np.ndarray, np.ndarray] | None:
  """A strategy's choice in a training memory of ``shots`` full shots (``config.selection.strategy``), as constants:
  every strategy but ``keyframes`` (which depends on the frames' content) chooses by position alone. None for
  ``onestory``."""
  strategy = canonical(strategy)
  if strategy == "keyframes":
    raise ValueError(
        "config.selection.strategy: 'keyframes' chooses by the frames' content and is a sampling-time "
        "baseline only; train with 'onestory', 'none', 'last_frame', 'recent' or 'uniform'"
    )
  n = shots * frames_per_shot
  return choose(strategy, np.zeros((n, 1)), np.repeat(np.arange(shots), frames_per_shot), k)


def keyframes(bank: np.ndarray, frame_shot: np.ndarray, threshold: float = KEYFRAME_SIMILARITY) -> list[int]:
  """StoryMem-style keyframes of a bank [N, ...] whose frame ``i`` comes from shot ``frame_shot[i]``: per shot, the
  first frame and every frame whose cosine similarity to the shot's last keyframe is below ``threshold``."""
  flat = bank.reshape(bank.shape[0], -1).astype(np.float64)
  flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
  out: list[int] = []
  for i in range(bank.shape[0]):
    if i == 0 or frame_shot[i] != frame_shot[i - 1] or float(flat[i] @ flat[out[-1]]) < threshold:
      out.append(i)
  return out


def choose(strategy: str, bank: np.ndarray, frame_shot: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
  """The frames a strategy gives the next shot: (indices [k] into the bank, valid [k]), best rank first; None for
  ``onestory``, whose choice Frame Selection makes inside the model.

  Args:
    strategy: one of :data:`STRATEGIES` (or an alias).
    bank: [N, ...] the memory's latent frames, oldest first.
    frame_shot: [N] the shot each frame comes from.
    k: ``K_sel``, the most frames any strategy may give.
  """
  strategy = canonical(strategy)
  n = bank.shape[0]
  if strategy == "onestory":
    return None
  if strategy == "none" or n == 0:
    return _ranked([], k)
  if strategy == "last_frame":
    return _ranked([n - 1], k)
  if strategy == "recent":
    return _ranked(list(range(n - 1, -1, -1)), k)
  if strategy == "uniform":
    spaced = np.unique(np.round(np.linspace(0, n - 1, min(k, n))).astype(int)) if n > 1 else np.array([0])
    return _ranked(sorted(spaced.tolist(), reverse=True), k)
  keys = keyframes(bank, frame_shot)  # keyframes
  fixed = keys[: min(KEYFRAME_FIXED, k)]
  recent = [i for i in reversed(keys[len(fixed) :])][: k - len(fixed)]
  return _ranked(recent + fixed[::-1], k)
