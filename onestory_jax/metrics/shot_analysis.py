r"""Per-shot analysis of StoryWorld frames: colour clusters, entities, motion, background.

:func:`analyze_shot` segments and describes one generated shot; the StoryWorld metrics
(:mod:`onestory_jax.metrics.storyworld_metrics`) compare these descriptions across shots. StoryWorld
stories are tiny, flat-shaded and procedural (``onestory_jax.data.storyworld``), so exact,
deterministic image analysis stands in for the paper's learned encoders (YOLO segmentation and
DINOv2 features). docs/metrics.md states the same definitions with their rationale.

Notation: colours in CIELAB (sRGB, D65); Delta-E is the CIE76 distance; the colour similarity is
``s(c1, c2) = exp(-(DeltaE(c1, c2) / colour_sigma)^2)``;
``ramp(x; lo, hi) = clip((x - lo) / (hi - lo), 0, 1)``. Thresholds are the fields of
``MetricConfig``.


Per shot (``analyze_shot``):

1. *Foreground.* StoryWorld draws characters in vivid colours (HSV ``s >= 0.6``, ``v >= 0.75``) over
   muted piecewise-flat backgrounds (``s <= 0.45``, ``v <= 0.7``) and moves every character during a
   shot. A pixel is *vivid* if ``s > vivid_saturation`` and ``v > vivid_value``. A first background
   is the per-pixel temporal median over the frames where the pixel is not vivid. A pixel is
   foreground if it is vivid or lies more than ``fg_delta_e`` from that background; per-frame
   8-connected foreground components smaller than ``min_area`` pixels are dropped. The shot's
   *background image* is the per-pixel temporal median over the frames where the pixel is
   background; a pixel that is foreground in every frame is *invalid*.
2. *Regions.* Within a frame, 8-neighbouring foreground pixels closer than ``region_delta_e`` are
   joined into colour-connected regions. A region pixel is *solid* if at least 3 of its 4 neighbours
   are in the same region. Regions with ``>= min_area`` pixels and ``>= min_solid`` solid pixels are
   *candidates*; thin anti-aliased rims that split off a shape are not.
3. *Colour clusters.* The solid pixels of all candidates of the shot are clustered by
   ``cluster_colours``: seed = median colour of the fullest cell of a Lab grid of pitch
   ``merge_delta_e / 2``; farthest-point additions while some pixel is more than ``merge_delta_e``
   from every centre (at most ``max_clusters``); k-medians iterations; clusters with less than
   ``min_cluster_fraction`` of the pixels are dropped; centres closer than ``merge_delta_e`` are
   merged.
4. *Entities.* Every candidate pixel takes its nearest cluster. A candidate is an entity of the
   cluster holding most of its solid pixels; a further cluster of the same region is a further
   entity (touching characters of different colours) if its centre is at least ``region_delta_e``
   from the colours already taken there and at least ``max(min_solid, split_fraction * solid pixels
   of the region)`` of its pixels are *own-solid* (3 of 4 neighbours in the same region and
   cluster). Each region pixel belongs to the region's entity of the nearest colour. The shot's
   **count** is the most frequent per-frame number of entities (the smallest on ties).
5. *Cluster descriptors.* For each cluster: ``coherence = ramp(share of its solid pixels within
   coherence_delta_e of its centre; quality_lo, quality_hi)``; ``presence = ramp(share of frames
   with an entity of this cluster; presence_lo, presence_hi)``; ``quality = coherence * presence``
   (flat, persistent characters score 1, specks of noise 0); ``multiplicity`` = most frequent number
   of its entities per frame among frames that show it; ``shape`` = mean over frames of the
   ``shape_grid x shape_grid`` occupancy grid (exact area fractions over the bounding box) of its
   largest entity that does not touch the image border (``None`` if there is none) - scale and
   position invariant.
6. *Motion.* For each cluster with ``quality >= 0.5``, the centroid of its entities' pixels per
   frame; its displacement is the mean centroid over the last ``max(1, T // 4)`` frames minus the
   mean over the first ``max(1, T // 4)`` frames (both must show it). The shot's displacement ``(dx,
   dy)`` is the mean over those clusters weighted by their share of solid pixels. The **detected
   direction** is ``right``/``left`` by the sign of ``dx`` if ``|dx| >= |dy|``, else ``down``/``up``
   by the sign of ``dy`` (image rows grow downwards); it is ``None`` when no cluster qualifies or
   ``max(|dx|, |dy|) < min_displacement``.
7. *Background descriptors.* ``flatness`` = share of horizontally or vertically adjacent valid pixel
   pairs of the background image closer than ``flat_delta_e``; ``background_quality = ramp(flatness;
   quality_lo, quality_hi)`` (piecewise-flat backgrounds score 1, noise 0); a colour signature
   (``cluster_colours`` on the valid background pixels: centres and pixel shares ``w``).

There is no randomness: initialisations are fixed and sorts are stable, so equal inputs give equal
outputs.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import ndimage
from scipy import sparse
from scipy.sparse import csgraph

_FOUR = ((-1, 0), (1, 0), (0, -1), (0, 1))


@dataclasses.dataclass(frozen=True)
class MetricConfig:
  """Thresholds of the StoryWorld metrics (Delta-E values are CIE76 distances in CIELAB)."""

  vivid_saturation: float = 0.525  # between background s <= 0.45 and character s >= 0.6
  vivid_value: float = 0.725  # between background v <= 0.7 and character v >= 0.75
  fg_delta_e: float = 12.0  # distance from the temporal-median background that marks foreground
  min_area: int = 4  # pixels of the smallest foreground component / region that counts
  region_delta_e: float = 30.0  # neighbouring foreground pixels closer than this share a region
  min_solid: int = 2  # solid pixels a region needs to hold an entity
  split_fraction: float = 0.1  # own-solid share of a region a second colour needs to be an entity
  merge_delta_e: float = 10.0  # colour clusters closer than this are one cluster
  max_clusters: int = 8
  min_cluster_fraction: float = 0.04
  coherence_delta_e: float = 12.0
  flat_delta_e: float = 10.0
  quality_lo: float = 0.25
  quality_hi: float = 0.75
  presence_lo: float = 0.15  # share of frames at or below which a colour is a speck of noise
  presence_hi: float = 0.5  # share of frames at or above which it is a character
  colour_sigma: float = 20.0
  shape_grid: int = 4
  shape_weight: float = 0.25
  min_displacement: float = 0.5  # pixels


@dataclasses.dataclass(frozen=True)
class ColourCluster:
  """One colour of a shot's entities (module docstring, step 5)."""

  centre: np.ndarray  # Lab [3]
  fraction: float  # share of the shot's solid candidate pixels
  coherence: float
  presence: float
  multiplicity: int
  shape: np.ndarray | None  # [shape_grid, shape_grid]

  @property
  def quality(self) -> float:
    return self.coherence * self.presence


@dataclasses.dataclass(frozen=True)
class ShotAnalysis:
  """What ``analyze_shot`` measures on one shot."""

  foreground: np.ndarray  # bool [T, H, W]
  entities: np.ndarray  # int [T, H, W]: index of the entity owning each pixel, -1 elsewhere
  entity_cluster: np.ndarray  # int [num_entities]: colour cluster of each entity
  clusters: tuple[ColourCluster, ...]
  frame_counts: np.ndarray  # int [T]: entities per frame
  count: int
  displacement: tuple[float, float]  # (dx, dy) in pixels
  direction: str | None
  background: np.ndarray  # Lab [H, W, 3]
  background_valid: np.ndarray  # bool [H, W]
  background_quality: float
  background_signature: tuple[np.ndarray, np.ndarray]  # centres [K, 3], pixel shares [K]


# ----------------------------------------------------------------------------- colour


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """sRGB in [0, 1] (any leading shape, last axis 3) to CIELAB under D65."""
  rgb = np.asarray(rgb, np.float64)
  lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
  m = np.array(
      [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
  )
  xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
  eps = (6.0 / 29.0) ** 3
  f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3.0 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
  return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def _saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  v = rgb.max(-1)
  s = np.where(v > 0, (v - rgb.min(-1)) / np.maximum(v, 1e-12), 0.0)
  return s, v


def delta_e(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """CIE76 colour distance of Lab colours (last axis 3), broadcast over the leading axes."""
  return np.linalg.norm(np.asarray(a) - np.asarray(b), axis=-1)


def colour_similarity(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
  """``s(a, b) = exp(-(DeltaE(a, b) / sigma)^2)`` of Lab colours: 1 for equal colours."""
  return np.exp(-((delta_e(a, b) / sigma) ** 2))


def _ramp(x: float, lo: float, hi: float) -> float:
  return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def cluster_colours(
    lab: np.ndarray, *, merge_delta_e: float, max_clusters: int, min_fraction: float, iterations: int = 10
) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic colour clustering of Lab pixels ``[N, 3]`` (module docstring, step 3).

  Returns:
    ``(centres [K, 3], labels [N])``, clusters ordered by size, largest first; K = 0 when N = 0.
  """
  lab = np.asarray(lab, np.float64).reshape(-1, 3)
  n = lab.shape[0]
  if n == 0:
    return np.zeros((0, 3)), np.zeros((0,), np.int64)

  def assign(c: np.ndarray) -> np.ndarray:
    return np.argmin(delta_e(lab[:, None, :], c[None, :, :]), axis=1)

  def medians(c: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # Per-channel medians (k-medians) resist the blended pixels along shape edges.
    out = c.copy()
    for k in range(c.shape[0]):
      if (labels == k).any():
        out[k] = np.median(lab[labels == k], axis=0)
    return out

  # Seed: the fullest cell of a coarse Lab grid (np.unique sorts, so ties resolve the same way).
  cells = np.floor(lab / (merge_delta_e / 2.0)).astype(np.int64)
  _, inverse, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
  centres = [np.median(lab[inverse.reshape(-1) == int(np.argmax(counts))], axis=0)]
  dist = delta_e(lab, centres[0])
  while len(centres) < max_clusters:
    far = int(np.argmax(dist))
    if dist[far] <= merge_delta_e:
      break
    centres.append(lab[far])
    dist = np.minimum(dist, delta_e(lab, lab[far]))
  c = np.stack(centres)
  labels = assign(c)
  for _ in range(iterations):
    c = medians(c, labels)
    new_labels = assign(c)
    if np.array_equal(new_labels, labels):
      break
    labels = new_labels
  # Drop small clusters (always keeping the largest), then merge close centres, closest pair first.
  counts = np.bincount(labels, minlength=c.shape[0])
  keep = counts >= min_fraction * n
  keep[int(np.argmax(counts))] = True
  c = c[keep]
  labels = assign(c)
  c = medians(c, labels)
  while c.shape[0] > 1:
    d = delta_e(c[:, None, :], c[None, :, :]) + np.eye(c.shape[0]) * 1e9
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    if d[i, j] >= merge_delta_e:
      break
    counts = np.bincount(labels, minlength=c.shape[0]).astype(np.float64)
    merged = (c[i] * counts[i] + c[j] * counts[j]) / max(counts[i] + counts[j], 1.0)
    c = np.concatenate([np.delete(c, [i, j], axis=0), merged[None]], axis=0)
    labels = assign(c)
    c = medians(c, labels)
  labels = assign(c)
  order = np.argsort(-np.bincount(labels, minlength=c.shape[0]), kind="stable")
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size)
  return c[order], rank[labels]


# ----------------------------------------------------------------------------- per-shot helpers


def _masked_temporal_median(lab: np.ndarray, use: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel median of ``lab`` [T, H, W, 3] over the frames where ``use`` [T, H, W] holds."""
  valid = use.any(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels are handled through `valid`
    med = np.nanmedian(np.where(use[..., None], lab, np.nan), axis=0)
  return np.where(valid[..., None], med, 0.0), valid


def _remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
  """Drops the 8-connected components of each frame of ``mask`` [T, H, W] below ``min_area``."""
  structure = np.zeros((3, 3, 3), dtype=bool)
  structure[1] = True  # no connectivity across time
  ids, num = ndimage.label(mask, structure=structure)
  if num == 0:
    return mask
  keep = np.bincount(ids.ravel()) >= min_area
  keep[0] = False
  return keep[ids]


def _colour_regions(fg: np.ndarray, lab: np.ndarray, max_step: float) -> tuple[np.ndarray, int]:
  """Regions of ``fg`` [T, H, W]: 8-neighbours in a frame join if closer than ``max_step``.

  Returns:
    ``(ids, num)``: ids [T, H, W] in ``[0, num)`` on foreground pixels and -1 elsewhere.
  """
  _, h, w = fg.shape
  index = np.arange(fg.size).reshape(fg.shape)
  rows, cols = [], []
  for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
    ys, ya = slice(0, h - dy), slice(dy, h)
    xs = slice(max(0, -dx), w - max(0, dx))
    xa = slice(xs.start + dx, xs.stop + dx)
    join = fg[:, ys, xs] & fg[:, ya, xa] & (delta_e(lab[:, ys, xs], lab[:, ya, xa]) < max_step)
    rows.append(index[:, ys, xs][join])
    cols.append(index[:, ya, xa][join])
  rows, cols = np.concatenate(rows), np.concatenate(cols)
  graph = sparse.coo_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(fg.size,) * 2)
  _, comp = csgraph.connected_components(graph, directed=False)
  used, ids = np.unique(comp.reshape(fg.shape)[fg], return_inverse=True)
  out = np.full(fg.shape, -1, np.int64)
  out[fg] = ids.reshape(-1)
  return out, int(used.size)


def _solid(ids: np.ndarray) -> np.ndarray:
  """Pixels with ``ids >= 0`` [T, H, W] whose 4 neighbours carry the same id at least 3 times."""
  _, h, w = ids.shape
  padded = np.pad(ids, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
  same = sum((padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == ids).astype(np.int64) for dy, dx in _FOUR)
  return (ids >= 0) & (same >= 3)


def _occupancy_grid(mask: np.ndarray, g: int) -> np.ndarray:
  """Exact area fractions of a cropped binary mask over a ``g x g`` grid of its bounding box."""
  h, w = mask.shape
  up = np.kron(mask.astype(np.float64), np.ones((g, g)))  # [g h, g w]: each grid cell is h x w
  return up.reshape(g, h, g, w).mean(axis=(1, 3))


def _flatness(image: np.ndarray, valid: np.ndarray, threshold: float) -> float:
  """Share of 4-adjacent pixel pairs, both valid, closer than ``threshold``."""
  pairs, flat = 0, 0
  for a, b, va, vb in (
      (image[1:], image[:-1], valid[1:], valid[:-1]),
      (image[:, 1:], image[:, :-1], valid[:, 1:], valid[:, :-1]),
  ):
    both = va & vb
    pairs += int(both.sum())
    flat += int((both & (delta_e(a, b) < threshold)).sum())
  return flat / pairs if pairs else 0.0


def _entities(regions: np.ndarray, num_regions: int, lab: np.ndarray, fg: np.ndarray, cfg: MetricConfig):
  """Steps 2-4: clusters of solid candidate pixels, then entities as (region, cluster) pairs."""
  solid = _solid(regions)
  region_area = np.bincount(regions[fg], minlength=num_regions)
  region_solid = np.bincount(regions[solid], minlength=num_regions)
  candidate = (region_area >= cfg.min_area) & (region_solid >= cfg.min_solid)
  in_candidate = np.append(candidate, False)[regions]  # id -1 (background) picks the False
  core = solid & in_candidate
  centres, core_labels = cluster_colours(
      lab[core], merge_delta_e=cfg.merge_delta_e, max_clusters=cfg.max_clusters, min_fraction=cfg.min_cluster_fraction
  )
  k_all = max(centres.shape[0], 1)
  combo = np.full(fg.shape, -1, np.int64)  # region * k_all + nearest cluster, on candidate pixels
  if centres.shape[0]:
    nearest = np.argmin(delta_e(lab[in_candidate][:, None, :], centres[None]), axis=1)
    combo[in_candidate] = regions[in_candidate] * k_all + nearest
  pairs, core_counts = np.unique(combo[core], return_counts=True)
  own_ids, own_counts = np.unique(combo[_solid(combo)], return_counts=True)
  own = dict(zip(own_ids.tolist(), own_counts.tolist()))
  ent_region, ent_cluster, taken = [], [], {}
  for i in np.lexsort((-core_counts, pairs // k_all)):  # by region, then most solid pixels first
    r, k = int(pairs[i] // k_all), int(pairs[i] % k_all)
    if r in taken and not (
        own.get(int(pairs[i]), 0) >= max(cfg.min_solid, cfg.split_fraction * region_solid[r])
        and all(delta_e(centres[k], centres[j]) >= cfg.region_delta_e for j in taken[r])
    ):
      continue
    taken.setdefault(r, []).append(k)
    ent_region.append(r)
    ent_cluster.append(k)
  return (centres, lab[core], core_labels, np.asarray(ent_region, np.int64), np.asarray(ent_cluster, np.int64))


def analyze_shot(frames: np.ndarray, cfg: MetricConfig = MetricConfig()) -> ShotAnalysis:
  """Segments and describes one shot, uint8 ``[T >= 2, H, W, 3]`` (module docstring, steps 1-7)."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 2:
    raise ValueError(
        f"analyze_shot: expected uint8 frames of shape [T>=2, H, W, 3], got " f"{frames.dtype} {frames.shape}"
    )
  t_len, h, w, _ = frames.shape
  rgb = frames.astype(np.float64) / 255.0
  lab = srgb_to_lab(rgb)
  sat, val = _saturation_value(rgb)
  vivid = (sat > cfg.vivid_saturation) & (val > cfg.vivid_value)

  # 1. Foreground and background image.
  bg0, bg0_valid = _masked_temporal_median(lab, ~vivid)
  moved = (delta_e(lab, bg0[None]) > cfg.fg_delta_e) & bg0_valid[None]
  fg = _remove_small(vivid | moved, cfg.min_area)
  background, background_valid = _masked_temporal_median(lab, ~fg)

  # 2-4. Regions, colour clusters, entities and the count.
  regions, num_regions = _colour_regions(fg, lab, cfg.region_delta_e)
  region_frame = np.zeros(num_regions, np.int64)
  region_frame[regions[fg]] = np.nonzero(fg)[0]
  centres, core_lab, core_labels, ent_region, ent_cluster = _entities(regions, num_regions, lab, fg, cfg)
  ent_frame = region_frame[ent_region]
  frame_counts = np.bincount(ent_frame, minlength=t_len)
  count = int(np.argmax(np.bincount(frame_counts)))
  owner = np.full(fg.shape, -1, np.int64)  # each region pixel -> its entity of the nearest colour
  owner_de = np.full(fg.shape, np.inf)
  for e, (r, k, t) in enumerate(zip(ent_region, ent_cluster, ent_frame)):
    d = np.where(regions[t] == r, delta_e(lab[t], centres[k]), np.inf)
    closer = d < owner_de[t]
    owner[t][closer] = e
    owner_de[t][closer] = d[closer]

  # 5. Cluster descriptors (and centroid tracks for step 6).
  clusters = []
  centroids = np.full((centres.shape[0], t_len, 2), np.nan)  # (x, y)
  for k in range(centres.shape[0]):
    d = delta_e(core_lab[core_labels == k], centres[k])
    members = np.nonzero(ent_cluster == k)[0]
    per_frame = np.bincount(ent_frame[members], minlength=t_len)
    shapes = []
    for t in np.nonzero(per_frame)[0]:
      in_frame = members[ent_frame[members] == t]
      ys, xs = np.nonzero(np.isin(owner[t], in_frame))
      centroids[k, t] = (xs.mean(), ys.mean())
      areas = [int((owner[t] == e).sum()) for e in in_frame]
      for e in in_frame[np.argsort(-np.asarray(areas), kind="stable")]:
        ys, xs = np.nonzero(owner[t] == e)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        if y0 > 0 and x0 > 0 and y1 < h and x1 < w:
          shapes.append(_occupancy_grid(owner[t, y0:y1, x0:x1] == e, cfg.shape_grid))
          break
    shown = per_frame[per_frame > 0]
    clusters.append(
        ColourCluster(
            centre=centres[k],
            fraction=float((core_labels == k).mean()),
            coherence=_ramp(float((d < cfg.coherence_delta_e).mean()), cfg.quality_lo, cfg.quality_hi),
            presence=_ramp(float((per_frame > 0).mean()), cfg.presence_lo, cfg.presence_hi),
            multiplicity=int(np.argmax(np.bincount(shown))) if shown.size else 1,
            shape=np.mean(shapes, axis=0) if shapes else None,
        )
    )

  # 6. Motion.
  span = max(1, t_len // 4)
  disp, weight = np.zeros(2), 0.0
  for k, cluster in enumerate(clusters):
    early, late = centroids[k, :span], centroids[k, -span:]
    if cluster.quality < 0.5 or np.isnan(early[:, 0]).all() or np.isnan(late[:, 0]).all():
      continue
    disp += cluster.fraction * (np.nanmean(late, axis=0) - np.nanmean(early, axis=0))
    weight += cluster.fraction
  dx, dy = (float(x) for x in (disp / weight if weight > 0 else disp))
  if weight == 0 or max(abs(dx), abs(dy)) < cfg.min_displacement:
    direction = None
  elif abs(dx) >= abs(dy):
    direction = "right" if dx > 0 else "left"
  else:
    direction = "down" if dy > 0 else "up"

  # 7. Background descriptors.
  bg_quality = _ramp(_flatness(background, background_valid, cfg.flat_delta_e), cfg.quality_lo, cfg.quality_hi)
  bg_centres, bg_labels = cluster_colours(
      background[background_valid],
      merge_delta_e=cfg.merge_delta_e,
      max_clusters=cfg.max_clusters,
      min_fraction=cfg.min_cluster_fraction,
  )
  bg_shares = np.bincount(bg_labels, minlength=bg_centres.shape[0]) / max(bg_labels.size, 1)

  return ShotAnalysis(
      foreground=fg,
      entities=owner,
      entity_cluster=ent_cluster,
      clusters=tuple(clusters),
      frame_counts=frame_counts,
      count=count,
      displacement=(dx, dy),
      direction=direction,
      background=background,
      background_valid=background_valid,
      background_quality=bg_quality,
      background_signature=(bg_centres, bg_shares.astype(np.float64)),
  )
