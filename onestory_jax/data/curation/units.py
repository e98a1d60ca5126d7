"""Story units: the paper's 2- and 3-shot training videos, cut from the consecutive kept shots of a source video.

Rule (ours; the paper only says that its data are 2- and 3-shot videos): a unit is a run of shots that follow each
other in the source with no rejected shot between them, so that a unit never jumps over footage that curation left
out. Each maximal run of n consecutive kept shots is cut, in order and without overlap, into as many units of
``max_shots`` shots as possible such that no shot is left alone: with max_shots = 3, n = 2, 3, 4, 5, 6, 7 give units
of 2 | 3 | 2+2 | 3+2 | 3+3 | 3+2+2 shots. With max_shots = 2 the last shot of an odd run is left over. Units do not
overlap, so no shot is in two training videos.
"""

from __future__ import annotations

from typing import Sequence


def unit_sizes(n: int, max_shots: int = 3) -> list[int]:
  """The sizes of the units that a run of ``n`` consecutive kept shots is cut into (sum <= n)."""
  if max_shots not in (2, 3):
    raise ValueError(f"max_shots must be 2 or 3, got {max_shots!r}")
  if n < 2:
    return []
  if max_shots == 2:
    return [2] * (n // 2)
  threes = n // 3 - (1 if n % 3 == 1 else 0)
  return [3] * threes + [2] * ((n - 3 * threes) // 2)


def story_units(kept: Sequence[bool], max_shots: int = 3) -> list[list[int]]:
  """Shot indices of each unit, from per-shot kept flags (in source order)."""
  units: list[list[int]] = []
  run: list[int] = []
  for index, keep in enumerate(list(kept) + [False]):
    if keep:
      run.append(index)
      continue
    start = 0
    for size in unit_sizes(len(run), max_shots):
      units.append(run[start : start + size])
      start += size
    run = []
  return units
