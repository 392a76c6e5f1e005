"""Watching the routing: a dead-expert / collapse detector and expert-load heatmaps.

The training loop hands every logged metrics row to `RoutingMonitor.observe`; each row's
`moe/layer{i}/tokens_per_expert` covers the steps since the previous log. The monitor keeps the
load history (for the heatmaps) and returns alerts:

- dead expert: an expert's load stays under `dead_frac` x the layer's mean load for at least
  `window` steps;
- collapse: the entropy of a layer's load distribution (tokens per expert, normalised) stays under
  `collapse_entropy` x ln(E) for at least `window` steps (1 would be perfectly even). This is the
  load entropy, not `moe/router_entropy` (the mean per-token entropy), which falls in healthy
  training as the router grows confident while still spreading tokens over experts.

Each condition alerts once when it has lasted `window` steps and again only after it has cleared.
The history starts afresh on resume; past `MAX_HISTORY` rows every other row is dropped.

Legend: L MoE layers, E experts, N logged rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moe_lm.config import RoutingMonitorConfig

_LOAD_KEY = re.compile(r"^moe/layer(\d+)/tokens_per_expert$")
MAX_HISTORY = 512  # logged rows kept for the heatmap


@dataclass
class RoutingAlert:
    """One finding of the detector: a title for the alert and a sentence saying what to do."""

    title: str
    text: str


def layer_loads(row: dict[str, Any]) -> Optional[np.ndarray]:
    """The (L, E) tokens-per-expert matrix of a metrics row, or None if it has no MoE keys."""
    found = {int(m.group(1)): v for k, v in row.items() if (m := _LOAD_KEY.match(k))}
    if not found:
        return None
    return np.array([found[i] for i in sorted(found)], dtype=np.float64)


def load_entropy_ratio(load_LE: np.ndarray) -> np.ndarray:
    """Entropy of each layer's load distribution divided by ln(E): 1 = even, 0 = one expert."""
    E = load_LE.shape[1]
    if E < 2:
        return np.ones(load_LE.shape[0])
    p_LE = load_LE / np.clip(load_LE.sum(1, keepdims=True), 1e-12, None)
    h_L = -(p_LE * np.log(np.clip(p_LE, 1e-30, None))).sum(1)
    return h_L / math.log(E)


class RoutingMonitor:
    """Keeps the per-layer expert-load history of a run and detects dead experts and collapse."""

    def __init__(self, cfg: RoutingMonitorConfig):
        self.cfg = cfg
        self.steps: list[int] = []  # step of each observed row
        self.loads: list[np.ndarray] = []  # (L, E) load / mean load of each observed row
        self.last_step = 0
        self.dead_since: dict[tuple[int, int], int] = {}  # (layer, expert) -> first low step - 1
        self.collapsed_since: dict[int, int] = {}  # layer -> first low step - 1
        self.alerted: set[tuple] = set()

    def observe(self, row: dict[str, Any]) -> list[RoutingAlert]:
        """Records a logged training row; returns the alerts that fire at this step."""
        load_LE = layer_loads(row)
        if load_LE is None:
            return []
        step, since = int(row["step"]), self.last_step  # this row covers steps (since, step]
        self.last_step = step
        rel_LE = load_LE / np.clip(load_LE.mean(1, keepdims=True), 1e-12, None)
        self.steps.append(step)
        self.loads.append(rel_LE.astype(np.float32))
        if len(self.steps) > MAX_HISTORY:  # thin out the past, keep the newest row
            self.steps, self.loads = self.steps[-1::-2][::-1], self.loads[-1::-2][::-1]
        alerts: list[RoutingAlert] = []
        L, E = rel_LE.shape
        for layer in range(L):
            for expert in range(E):
                low = bool(rel_LE[layer, expert] < self.cfg.dead_frac)
                alert = self._track(("dead", layer, expert), self.dead_since, (layer, expert), low,
                                    since, step)
                if alert:
                    alerts.append(RoutingAlert(
                        f"dead expert: layer {layer} expert {expert}",
                        f"MoE layer {layer}, expert {expert} has received under "
                        f"{self.cfg.dead_frac:.0%} of the mean load since step "
                        f"{self.dead_since[(layer, expert)] + 1} (now {rel_LE[layer, expert]:.1%} "
                        f"of the mean at step {step}). Raise loss.aux_coef, use expert=aux_free, "
                        "add router jitter (expert.jitter) or lower optim.lr."))
        ratio_L = load_entropy_ratio(load_LE)
        for layer in range(L):
            low = bool(ratio_L[layer] < self.cfg.collapse_entropy)
            if self._track(("collapse", layer), self.collapsed_since, layer, low, since, step):
                alerts.append(RoutingAlert(
                    f"routing collapse: layer {layer}",
                    f"MoE layer {layer}'s load entropy has stayed under "
                    f"{self.cfg.collapse_entropy:.2f} x ln({E}) since step "
                    f"{self.collapsed_since[layer] + 1} (now {ratio_L[layer]:.2f} at step {step}): "
                    "most tokens go to a few experts. Raise loss.aux_coef, use expert=aux_free "
                    "or lower optim.lr."))
        return alerts

    def _track(self, key: tuple, since_map: dict, item: Any, low: bool, since: int,
               step: int) -> bool:
        """Updates one condition's streak; True when it has just lasted `window` steps."""
        if not low:
            since_map.pop(item, None)
            self.alerted.discard(key)
            return False
        start = since_map.setdefault(item, since)
        if step - start >= self.cfg.window and key not in self.alerted:
            self.alerted.add(key)
            return True
        return False

    def write_heatmap(self, path: Path, step: int) -> Optional[Path]:
        """Saves the expert-load heatmap PNG (layers x experts now, and load over time)."""
        if not self.loads:
            return None
        return write_load_heatmap(Path(path), np.stack(self.loads), self.steps, step)


def write_load_heatmap(path: Path, rel_NLE: np.ndarray, steps: list[int], step: int) -> Path:
    """Two panels of load / mean load (1 = fair share; 0 = dead): left, layers x experts at the last
    logged row; right, every (layer, expert) over the logged steps. Written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    N, L, E = rel_NLE.shape
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel_NLE.max())))
    fig = Figure(figsize=(11, min(16.0, max(3.0, 1.2 + 0.08 * L * E + 0.25 * L))),
                 layout="constrained")
    FigureCanvasAgg(fig)
    now_ax, time_ax = fig.subplots(1, 2, width_ratios=[1, 2])
    image = now_ax.imshow(rel_NLE[-1], aspect="auto", cmap="RdBu_r", norm=norm,
                          interpolation="nearest")
    first = steps[-2] + 1 if N > 1 else 1
    now_ax.set(title=f"expert load / mean, steps {first}-{steps[-1]}", xlabel="expert",
               ylabel="MoE layer")
    if L <= 64:
        now_ax.set_yticks(range(L))
    if E <= 32:
        now_ax.set_xticks(range(E))
    over_time = rel_NLE.reshape(N, L * E).T  # row = (layer, expert), column = logged step
    time_ax.imshow(over_time, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                   extent=(-0.5, N - 0.5, L * E - 0.5, -0.5))
    if L <= 64:
        for layer in range(1, L):
            time_ax.axhline(layer * E - 0.5, color="black", linewidth=0.8)
        time_ax.set_yticks([layer * E + (E - 1) / 2 for layer in range(L)],
                           [f"layer {layer}" for layer in range(L)])
    ticks = sorted({0, N // 2, N - 1})
    time_ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    time_ax.set(title="load over time (rows: experts of each layer)", xlabel="step")
    fig.colorbar(image, ax=[now_ax, time_ax], label="tokens / mean tokens per expert")
    fig.suptitle(f"expert load at step {step}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path


def heatmap_path(run_dir: Path, step: int) -> Path:
    """Where the heatmap of an eval at `step` goes: `<run>/plots/expert_load_step_NNNNNNN.png`."""
    return Path(run_dir) / "plots" / f"expert_load_step_{step:07d}.png"
