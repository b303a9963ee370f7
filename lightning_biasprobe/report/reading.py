"""Reading runs from TensorBoard event files, with TensorBoard's own ``EventAccumulator``.

A *run* is a directory holding ``*tfevents*`` files (a Lightning ``TensorBoardLogger`` version
directory, say); a log directory given to the report may hold any number of runs below it. Only
scalars and histograms are read (images, such as the probes' profile figures, are skipped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

PREFIX = "biasprobe/"


class ReportError(ValueError):
    """The report cannot be written from these log directories (no event files, no probe data)."""


@dataclass
class Series:
    """A scalar over training: strictly increasing global steps and their values (float64)."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class Histogram:
    """One logged histogram: bucket ``i`` holds ``counts[i]`` values in ``[edges[i], edges[i + 1]]``."""

    step: int
    edges: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> float:
        return float(self.counts.sum())


@dataclass
class Run:
    label: str
    path: str
    scalars: dict[str, Series] = field(default_factory=dict)  # in the order TensorBoard first saw them
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)

    def probe_tags(self) -> list[str]:
        return [t for t in [*self.scalars, *self.histograms] if t.startswith(PREFIX)]

    def has_probe_data(self) -> bool:
        return bool(self.probe_tags())

    def step_range(self) -> tuple[int, int]:
        steps = [int(s.steps[i]) for s in self.scalars.values() if len(s.steps) for i in (0, -1)]
        return (min(steps), max(steps)) if steps else (0, 0)


def find_run_dirs(logdir: str) -> list[str]:
    """Every directory at or below ``logdir`` that holds TensorBoard event files, sorted."""
    if not os.path.isdir(logdir):
        raise ReportError(f"{logdir!r} is not a directory: pass the log directory of a run (the folder given "
                          "to TensorBoardLogger, or one of its version_* folders)")
    found = []
    for root, dirs, files in os.walk(logdir):
        dirs.sort()
        if any("tfevents" in name for name in files):
            found.append(root)
    return found


def _dedupe(steps: np.ndarray, values: np.ndarray) -> Series:
    # A step written twice (a resumed run, a validation row) keeps its last value.
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    keep = np.ones(len(steps), dtype=bool)
    keep[:-1] = steps[1:] != steps[:-1]
    return Series(steps[keep], values[keep])


def _histogram(step: int, value) -> Histogram:
    limits = np.asarray(value.bucket_limit, dtype=np.float64)
    counts = np.asarray(value.bucket, dtype=np.float64)
    low, high = float(value.min), float(value.max)
    # Bucket i spans (limit[i-1], limit[i]]; the outer limits can be far outside the data, so
    # everything is clipped to the logged minimum and maximum.
    edges = np.clip(np.concatenate([[low], limits]), low, high)
    return Histogram(step, np.maximum.accumulate(edges), counts)


def read_run(path: str, label: str = "") -> Run:
    """Scalars and histograms of the event files in the directory ``path``."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    sizes = {ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.COMPRESSED_HISTOGRAMS: 1, ea.IMAGES: 1, ea.AUDIO: 1,
             ea.TENSORS: 1}
    acc = ea.EventAccumulator(path, size_guidance=sizes)
    acc.Reload()
    tags = acc.Tags()
    run = Run(label or os.path.basename(os.path.normpath(path)), os.path.abspath(path))
    for tag in tags.get(ea.SCALARS, []):
        events = acc.Scalars(tag)
        run.scalars[tag] = _dedupe(np.array([e.step for e in events], dtype=np.int64),
                                   np.array([e.value for e in events], dtype=np.float64))
    for tag in tags.get(ea.HISTOGRAMS, []):
        by_step: dict[int, Histogram] = {}
        for event in acc.Histograms(tag):
            by_step[int(event.step)] = _histogram(int(event.step), event.histogram_value)
        run.histograms[tag] = [by_step[s] for s in sorted(by_step)]
    return run


def run_labels(paths: Sequence[str]) -> list[str]:
    """Short, distinct labels for runs: the parts of their paths that differ.

    ``a/demo/version_0`` and ``b/demo/version_0`` become ``a`` and ``b``; a single run keeps its
    last two path components.
    """
    parts = [os.path.abspath(p).split(os.sep) for p in paths]
    if len(parts) == 1:
        return [os.sep.join(parts[0][-2:]).lstrip(os.sep) or parts[0][-1]]
    head = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    labels = [os.sep.join(p[head:len(p) - tail]) for p in parts]
    if len(set(labels)) < len(labels):  # the same directory twice
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    return labels


def read_runs(logdirs: Iterable[str]) -> list[Run]:
    """Every run below the given log directories, labelled by what tells them apart."""
    paths: list[str] = []
    for logdir in logdirs:
        found = find_run_dirs(logdir)
        if not found:
            raise ReportError(f"no TensorBoard event files (*tfevents*) under {logdir!r}")
        paths.extend(found)
    return [read_run(path, label) for path, label in zip(paths, run_labels(paths))]
