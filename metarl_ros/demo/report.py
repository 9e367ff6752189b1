"""The demo's metric, table, JSON summary and plot (one definition for every way of running).

Metric: the mean tracking error ``||q_ref - q||`` over windows fixed by the scenario (rad in the
JSON summary, mrad in the printed table and the plot):

* ``before_faults``: from :data:`SETTLE_S` (the start-up transient is skipped; at most half
  the time before the first event) to the first event;
* per event, ``right_after``: the first :data:`RIGHT_AFTER_S` seconds after it, and
  ``adapted``: the last :data:`ADAPTED_S` seconds before the next event (or the end of the run).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from metarl_ros.core.files import atomic_write_bytes
from metarl_ros.core.schema import ConfigError
from metarl_ros.evaluation.trace import Trace
from metarl_ros.sim.scenario import Scenario

SETTLE_S = 1.0
RIGHT_AFTER_S = 0.5
ADAPTED_S = 1.0


@dataclass(frozen=True)
class EventWindows:
    """The two windows of one scenario event (simulated seconds, ``[start, end)``)."""

    label: str
    time_s: float
    right_after: tuple[float, float]
    adapted: tuple[float, float]


@dataclass(frozen=True)
class PhaseWindows:
    """Where the metric averages (simulated seconds, ``[start, end)``)."""

    before_faults: tuple[float, float]
    events: tuple[EventWindows, ...]

    @classmethod
    def for_scenario(cls, scenario: Scenario, duration_s: float) -> "PhaseWindows":
        """Windows for ``scenario`` run for ``duration_s``; ConfigError if one is empty."""
        name = scenario.config.name
        times = [event.time_s for event in scenario.events]
        if times and times[-1] >= duration_s:
            raise ConfigError(f"scenario {name}: event at {times[-1]:g} s is not before the end "
                              f"of the run ({duration_s:g} s); run longer (--duration)")
        labels = [event.label for event in scenario.events]
        for label in labels:
            if labels.count(label) > 1:
                raise ConfigError(f"scenario {name}: several events are labelled {label!r}; "
                                  "give each a label of its own")
        first = times[0] if times else duration_s
        before = (min(SETTLE_S, 0.5 * first), first)
        events = []
        for event, end in zip(scenario.events, [*times[1:], duration_s]):
            events.append(EventWindows(
                label=event.label, time_s=event.time_s,
                right_after=(event.time_s, min(event.time_s + RIGHT_AFTER_S, end)),
                adapted=(max(event.time_s, end - ADAPTED_S), end)))
        windows = cls(before, tuple(events))
        for label, (start, end) in windows.named():
            if end - start <= 0.0:
                raise ConfigError(f"scenario {name}: window {label!r} is empty "
                                  f"({start:g}-{end:g} s); space the events further apart")
        return windows

    def named(self) -> list[tuple[str, tuple[float, float]]]:
        """``(label, window)`` for every window, in table order."""
        out = [("before faults", self.before_faults)]
        for event in self.events:
            out += [(f"{event.label}: right after", event.right_after),
                    (f"{event.label}: adapted", event.adapted)]
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "metric": "mean ||q_ref - q||_2 over the window, rad",
            "before_faults_s": list(self.before_faults),
            "events": [{"label": e.label, "time_s": e.time_s, "right_after_s": list(e.right_after),
                        "adapted_s": list(e.adapted)} for e in self.events],
        }

    def errors(self, trace: Trace) -> dict[str, Any]:
        """``{"before_faults": x, <event label>: {"right_after": x, "adapted": x}}``;
        a window without samples gives None."""
        result: dict[str, Any] = {"before_faults": trace.mean_between(*self.before_faults)}
        for event in self.events:
            result[event.label] = {"right_after": trace.mean_between(*event.right_after),
                                   "adapted": trace.mean_between(*event.adapted)}
        return result


def flatten(errors: Mapping[str, Any]) -> list[float | None]:
    """The values of :meth:`PhaseWindows.errors` in table order."""
    values = [errors["before_faults"]]
    for key, value in errors.items():
        if key != "before_faults":
            values += [value["right_after"], value["adapted"]]
    return values


def format_table(windows: PhaseWindows, rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text table: one row per run, a column per window (``rows``: run -> errors)."""
    name_width = max(12, *(len(name) for name in rows)) + 2
    widths = [max(22, len(event.label)) for event in windows.events]
    head1 = f"{'':{name_width}s}{'before':>10s}"
    head2 = f"{'run':{name_width}s}{'faults':>10s}"
    for event, width in zip(windows.events, widths):
        head1 += f" | {event.label:^{width}s}"
        head2 += f" | {'right after':>{width // 2}s}{'adapted':>{width - width // 2}s}"
    lines = [head1, head2, "-" * len(head2)]
    for name, errors in rows.items():
        values = flatten(errors)
        line = f"{name:{name_width}s}{_cell(values[0], 10)}"
        for i, width in enumerate(widths):
            line += (f" | {_cell(values[1 + 2 * i], width // 2)}"
                     f"{_cell(values[2 + 2 * i], width - width // 2)}")
        lines.append(line)
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{value * 1e3:{width}.2f}" if value is not None else f"{'n/a':>{width}s}"


def describe_windows(windows: PhaseWindows) -> str:
    start, end = windows.before_faults
    return (f"tracking error ||q_ref - q|| [mrad], mean over: before faults = "
            f"{start:g}-{end:g} s; right after = the first {RIGHT_AFTER_S:g} s after the event; "
            f"adapted = the last {ADAPTED_S:g} s before the next event (or the end)")


def plot(traces: Mapping[str, Trace], windows: PhaseWindows, title: str, path: Path) -> None:
    """PNG: tracking error (log scale) and the latent mean's norm over time, events marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with_latent = any(trace.latent_norm.size for trace in traces.values())
    fig, axes = plt.subplots(2 if with_latent else 1, 1, figsize=(9, 6.5 if with_latent else 4.5),
                             sharex=True, squeeze=False)
    error_ax = axes[0, 0]
    for name, trace in traces.items():
        line, = error_ax.plot(trace.time_s, np.asarray(trace.tracking_error) * 1e3, label=name,
                              linewidth=1.1)
        if with_latent and trace.latent_norm.size:
            axes[1, 0].plot(trace.latent_time_s, trace.latent_norm, label=name, linewidth=1.1,
                            color=line.get_color())
    error_ax.set_yscale("log")
    error_ax.set_ylabel("tracking error ||q_ref - q|| [mrad]")
    error_ax.set_title(title)
    error_ax.legend(fontsize=8)
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3, which="both")
        for event in windows.events:
            ax.axvline(event.time_s, color="k", linestyle="--", linewidth=0.8)
    for event in windows.events:
        error_ax.annotate(" " + event.label, (event.time_s, 1.0),
                          xycoords=("data", "axes fraction"), fontsize=8, va="top")
    if with_latent:
        axes[1, 0].set_ylabel("||latent mean||")
    axes[-1, 0].set_xlabel("simulated time [s]")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def all_finite(values: Sequence[float | None]) -> bool:
    """True when every value is a finite number (None counts as not finite)."""
    return all(v is not None and bool(np.isfinite(v)) for v in values)
