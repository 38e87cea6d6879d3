"""Synthetic laser-solidification sequences: a moving heat source melts a polycrystal that re-grows.

Physics (deliberately simple, but each piece is the textbook one):

* **Temperature** — Rosenthal's quasi-steady solution for a point source moving at speed ``v``
  over a conducting half-space::

      T = T0 + q / (2 pi k R) * exp(-v (xi + R) / (2 alpha))

  with ``xi`` the coordinate along the scan direction measured from the source and ``R`` the
  distance to it. Written in units of the image edge ``L`` it depends on two numbers only: the
  melt-pool tail length ``l = q / (2 pi k (T_liquidus - T0))`` (exact: the liquidus isotherm ends
  ``l`` behind the source) and its half width ``h = sqrt(4 alpha l / (e v))`` (the high-Peclet
  limit). Each sequence draws ``l``, ``h``, the preheat ``T0``, a scan angle, 1..``max_tracks``
  parallel tracks (uni-directional or serpentine, overlapping hatch). With steel-like
  ``k = 25 W/(m K)``, ``alpha = 6e-6 m^2/s`` and ``L = 1 mm`` the ranges correspond to
  ``q ~ 30-65 W`` and ``v ~ 0.07-0.55 m/s`` (for the default 1600/1700 K). The singularity at the source is capped.
* **Microstructure** — a vectorised cellular automaton on the pixel grid, sub-stepped so that the
  source moves at most half a pixel per step. Cells at or above ``T_liquidus`` are liquid. Liquid
  cells that have cooled below ``T_liquidus`` solidify epitaxially with a probability that rises
  with undercooling, adopting the grain of one solid 8-neighbour chosen at random with weights
  favouring growth up the temperature gradient (into the liquid, against the heat flow) and along
  the grain's in-plane <100> axis (competitive growth). Undercooled liquid also nucleates new
  grains with a small probability; liquid left below ``T_solidus`` without a solid neighbour
  nucleates quickly, so nothing stays liquid in the cold.
* **Colour** — every grain has a random (uniform) orientation quaternion; its colour is the cubic
  inverse-pole-figure colour of the sample normal (red <001>, green <101>, blue <111>), scaled to
  full brightness. Liquid is dark grey (:data:`LIQUID_COLOUR`), distinct from every grain colour.

The substrate is a Voronoi polycrystal. Each sequence has its own random stream spawned from the
seed, so sequence ``i`` is the same whatever ``num_sequences`` is, and the same seed always gives
identical arrays. Everything is numpy-vectorised over sequences and pixels (the only Python loop
is over time sub-steps).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

LIQUID_COLOUR = (0.1, 0.1, 0.1)
# growth-direction preference (up the temperature gradient) and crystallographic preference
GRADIENT_BIAS = 3.0
CRYSTAL_BIAS = 1.0
# per-substep solidification probability of a liquid cell with a solid neighbour: P0 + undercooling
GROW_P0 = 0.3
# nucleation: probability per cell per unit path (in image edges) per unit cell area, x undercooling
NUCLEATION_RATE = 2000.0
# probability per substep that liquid below the solidus with no solid neighbour nucleates
FORCED_NUCLEATION = 0.5
# the source advances at most this many pixels per automaton step
MAX_STEP_PX = 0.5
# ranges of the per-sequence draws (lengths in units of the image edge)
TAIL_LENGTH = (0.15, 0.3)
HALF_WIDTH = (0.07, 0.14)
PREHEAT_K = (293.0, 500.0)
SUBSTRATE_GRAINS = (12, 30)
ENTRY_MARGIN = 0.08  # the source starts this far before the image edge

# the 8 neighbour offsets (row, col) and their unit vectors
_DI = np.array([-1, -1, -1, 0, 0, 1, 1, 1])
_DJ = np.array([-1, 0, 1, -1, 1, -1, 0, 1])
_NORM = np.hypot(_DI, _DJ)
# direction of growth from the neighbour at (i+di, j+dj) into the cell (i, j): (-di, -dj)
_GROWTH_ANGLE = np.arctan2(-_DI, -_DJ).astype(np.float32)


class Sequences(NamedTuple):
    """``micro[S,T,H,W,3]`` float32 RGB in [0, 1]; ``temperature[S,T,H,W]`` float32 kelvin."""

    micro: np.ndarray
    temperature: np.ndarray


def _orientations(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uniformly random cubic orientations: IPF-Z colours ``(n, 3)`` and in-plane <100> angles ``(n,)``."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    # rotation matrix crystal -> sample; row 2 is the sample normal in crystal coordinates
    rot = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], 1)  # (n, 3, 3)
    c = -np.sort(-np.abs(rot[:, 2, :]), axis=1)  # c1 >= c2 >= c3 >= 0 (cubic symmetry)
    rgb = np.stack([c[:, 0] - c[:, 1], c[:, 1] - c[:, 2], c[:, 2] * math.sqrt(3.0)], 1)
    rgb = np.sqrt(rgb / rgb.max(axis=1, keepdims=True))  # full brightness, softer gamma
    # in-plane angle of the crystal axis lying closest to the sample plane (4-fold symmetric use)
    axis = np.argmin(np.abs(rot[:, 2, :]), axis=1)
    cols = rot[np.arange(n), :, axis]  # (n, 3) that axis in sample coordinates
    angle = np.arctan2(-cols[:, 1], cols[:, 0])  # image rows point down
    return rgb.astype(np.float32), angle.astype(np.float32)


class _Grains:
    """Global grain table (ids shared by all sequences): colour and in-plane angle per id."""

    def __init__(self) -> None:
        self.colour = np.zeros((0, 3), np.float32)
        self.angle = np.zeros(0, np.float32)

    def add(self, rng: np.random.Generator, n: int) -> np.ndarray:
        colour, angle = _orientations(rng, n)
        start = len(self.angle)
        self.colour = np.concatenate([self.colour, colour])
        self.angle = np.concatenate([self.angle, angle])
        return np.arange(start, start + n, dtype=np.int32)

    def render(self, ids: np.ndarray) -> np.ndarray:
        table = np.concatenate([np.array([LIQUID_COLOUR], np.float32), self.colour])
        return table[ids + 1]


def _draw(rngs: list[np.random.Generator], counts: np.ndarray, cols: int) -> np.ndarray:
    """Uniform draws for rows grouped by sequence (rows sorted by sequence), each from its own stream."""
    return np.concatenate([rng.random((int(n), cols), dtype=np.float32) for rng, n in zip(rngs, counts)])


def generate_sequences(num_sequences: int = 16, frames: int = 12, size: int | tuple[int, int] = 64, *,
                       seed: int = 0, t_solidus: float = 1600.0, t_liquidus: float = 1700.0,
                       max_tracks: int = 3) -> Sequences:
    """Simulate ``num_sequences`` scans of ``frames`` frames each on a ``size`` (or ``(H, W)``) grid.

    Deterministic in ``seed``: same seed, identical arrays. Returns :class:`Sequences`.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if num_sequences < 1 or frames < 1 or height < 4 or width < 4 or max_tracks < 1:
        raise ValueError(f"generate_sequences: bad sizes num_sequences={num_sequences}, frames={frames}, "
                         f"size={(height, width)}, max_tracks={max_tracks}")
    if not t_solidus < t_liquidus:
        raise ValueError(f"generate_sequences: t_solidus ({t_solidus}) must be below t_liquidus ({t_liquidus})")
    if t_solidus <= 0:
        raise ValueError(f"generate_sequences: t_solidus must be > 0 K, got {t_solidus}")
    # preheat well below the solidus even for low-melting alloys
    preheat = (min(PREHEAT_K[0], 0.4 * t_solidus), min(PREHEAT_K[1], 0.5 * t_solidus))
    S = num_sequences
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(S)]
    edge = max(height, width)
    dx = 1.0 / edge  # pixel size in image edges
    ys = ((np.arange(height) + 0.5) * dx - height * dx / 2)[:, None]
    xs = ((np.arange(width) + 0.5) * dx - width * dx / 2)[None, :]

    # ----- per-sequence process parameters --------------------------------------------------------
    tail = np.empty(S); half = np.empty(S); t0 = np.empty(S); theta = np.empty(S)
    ntracks = np.empty(S, int); track_w = np.zeros((S, max_tracks)); track_dir = np.ones((S, max_tracks))
    grains = _Grains()
    ids = np.empty((S, height, width), np.int32)
    for s, rng in enumerate(rngs):
        tail[s] = rng.uniform(*TAIL_LENGTH)
        half[s] = rng.uniform(*HALF_WIDTH)
        t0[s] = rng.uniform(*preheat)
        theta[s] = rng.uniform(0, 2 * math.pi)
        ntracks[s] = rng.integers(1, max_tracks + 1)
        hatch = half[s] * rng.uniform(1.2, 1.6)
        band = (ntracks[s] - 1) * hatch
        inner = min(height, width) * dx / 2  # keep the tracks across the middle of the image
        centre = rng.uniform(-1, 1) * max(inner - band / 2 - half[s], 0.0)
        track_w[s, :ntracks[s]] = centre - band / 2 + hatch * np.arange(ntracks[s])
        if rng.random() < 0.5:  # serpentine
            track_dir[s, 1::2] = -1
        # substrate: Voronoi polycrystal
        n_seeds = int(rng.integers(SUBSTRATE_GRAINS[0], SUBSTRATE_GRAINS[1] + 1))
        seeds = rng.uniform(-0.5, 0.5, (n_seeds, 2)) * [height * dx, width * dx]
        dist = (ys[..., None] - seeds[:, 0]) ** 2 + (xs[..., None] - seeds[:, 1]) ** 2
        ids[s] = grains.add(rng, n_seeds)[np.argmin(dist, axis=-1)]

    # scan coordinates of every pixel: u along the tracks, w across
    cos_t, sin_t = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (xs * cos_t - ys * sin_t).astype(np.float32)  # y axis points down in the image
    w = (xs * sin_t + ys * cos_t).astype(np.float32)
    extent_u = (width * dx * np.abs(np.cos(theta)) + height * dx * np.abs(np.sin(theta))) / 2
    start = extent_u + ENTRY_MARGIN  # track k runs u_s = dir * (-start + q), q in [0, track_len]
    track_len = 2 * extent_u + ENTRY_MARGIN + 1.15 * tail + 0.02
    total = ntracks * track_len
    # Rosenthal in image-edge units: T = T0 + A / R * exp(-B (xi + R))
    amp = ((t_liquidus - t0) * tail).astype(np.float32)[:, None, None]
    decay = (2 * tail / (math.e * half ** 2)).astype(np.float32)[:, None, None]
    t_cap = (t_liquidus + 0.8 * (t_liquidus - t0)).astype(np.float32)[:, None, None]
    t0_f = t0.astype(np.float32)[:, None, None]
    r_min = np.float32(0.5 * dx)

    # a common number of substeps per frame, from the longest possible scan (independent of the draws)
    max_len = max_tracks * (math.hypot(height, width) * dx + ENTRY_MARGIN + 1.15 * TAIL_LENGTH[1] + 0.02)
    per_frame = max_len / max(frames - 1, 1)
    n_sub = max(1, math.ceil(per_frame / dx / MAX_STEP_PX))
    dp_sub = total / max(frames - 1, 1) / n_sub  # path advance per substep, per sequence
    p_nuc = np.float32(NUCLEATION_RATE * dx * dx) * dp_sub.astype(np.float32)  # (S,)
    span = np.float32(t_liquidus - t_solidus)
    t_liq, t_sol = np.float32(t_liquidus), np.float32(t_solidus)
    seq = np.arange(S)

    def temperature(p: np.ndarray) -> np.ndarray:
        k = np.minimum((p // track_len).astype(int), ntracks - 1)
        q = p - k * track_len
        d = track_dir[seq, k]
        us = (d * (q - start)).astype(np.float32)[:, None, None]
        ws = track_w[seq, k].astype(np.float32)[:, None, None]
        xi = (u - us) * d.astype(np.float32)[:, None, None]
        rho = w - ws
        r = np.maximum(np.sqrt(xi * xi + rho * rho), r_min)
        temp = t0_f + amp / r * np.exp(-decay * (xi + r))
        return np.minimum(temp, t_cap)

    def step(ids: np.ndarray, temp: np.ndarray) -> np.ndarray:
        ids = np.where(temp >= t_liq, np.int32(-1), ids)
        cand = (ids < 0) & (temp < t_liq)
        if not cand.any():
            return ids
        s, i, j = np.nonzero(cand)
        counts = np.bincount(s, minlength=S)
        r = _draw(rngs, counts, 10)
        padded = np.pad(ids, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
        nb = padded[s[:, None], i[:, None] + 1 + _DI, j[:, None] + 1 + _DJ]  # (n, 8)
        solid = nb >= 0
        tp = np.pad(temp, ((0, 0), (1, 1), (1, 1)), mode="edge")
        gy = tp[s, i + 2, j + 1] - tp[s, i, j + 1]
        gx = tp[s, i + 1, j + 2] - tp[s, i + 1, j]
        gn = np.sqrt(gx * gx + gy * gy) + np.float32(1e-6)
        cos_grad = (-_DI * gy[:, None] - _DJ * gx[:, None]) / (_NORM * gn[:, None])
        align = np.cos(4 * (_GROWTH_ANGLE - grains.angle[np.maximum(nb, 0)]))
        gumbel = -np.log(-np.log(np.clip(r[:, :8], 1e-7, 1 - 1e-7)))
        score = np.where(solid, GRADIENT_BIAS * cos_grad + CRYSTAL_BIAS * align + gumbel, -np.inf)
        chosen = nb[np.arange(len(s)), np.argmax(score, axis=1)]
        under = (t_liq - temp[s, i, j]) / span  # undercooling in units of the freezing range
        grow = solid.any(axis=1) & (r[:, 8] < GROW_P0 + under)
        nucleate = ~grow & (r[:, 9] < p_nuc[s] * np.minimum(under, 1) + FORCED_NUCLEATION * (under >= 1))
        new = np.where(grow, chosen, np.int32(-1))
        if nucleate.any():
            born = np.bincount(s[nucleate], minlength=S)
            new[nucleate] = np.concatenate([grains.add(rngs[k], int(n)) for k, n in enumerate(born) if n]
                                           or [np.zeros(0, np.int32)])
        ids[s, i, j] = new
        return ids

    micro = np.empty((S, frames, height, width, 3), np.float32)
    temps = np.empty((S, frames, height, width), np.float32)
    frame_len = total / max(frames - 1, 1)
    for f in range(frames):
        if f == 0:
            temp = temperature(np.zeros(S))
            ids = step(ids, temp)
        else:
            for k in range(1, n_sub + 1):
                temp = temperature((f - 1) * frame_len + k * dp_sub)
                ids = step(ids, temp)
        micro[:, f] = grains.render(ids)
        temps[:, f] = temp
    return Sequences(micro, temps)


def normalise_temperature(temperature, t_solidus: float, t_liquidus: float,
                          low: float = -8.0, high: float = 4.0):
    """Temperature (K) as a network input: ``(T - T_s) / (T_l - T_s)`` clipped to ``[low, high]``, divided by 4.

    0 at the solidus, 0.25 at the liquidus; the default range maps to [-2, 1]. Works on numpy
    arrays and torch tensors.
    """
    z = (temperature - t_solidus) / (t_liquidus - t_solidus)
    return z.clip(low, high) / 4.0
