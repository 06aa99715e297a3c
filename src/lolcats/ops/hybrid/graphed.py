"""The global cache's selection replay, captured as a CUDA graph (training and prefill with a global cache).

Training a fresh sequence with a global cache first replays every selection of the sequence
(`_selection_schedule`: a loop over the selection intervals, a few dozen small ops each, no
gradient, shapes fixed by the block). On the GPU that loop costs launches, not arithmetic, and it
runs again for every layer and step with the same shapes: it is captured once per shape and
replayed (the inputs copied into the graph's buffers, the result copied out, so one graph serves
every layer). A prompt's length changes from call to call: prefill pads its sequence to one of
a few interval counts (`bucketed_selection_schedule`), so prompts of many lengths share a graph.
The math stays `lolcats.attention.hybrid`'s; this module only decides how it runs.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from lolcats.attention.hybrid import Memory, _selection_schedule

__all__ = ["bucketed_selection_schedule", "graphed_selection_schedule"]

_MAX_GRAPHS = 8  # shapes kept (training has one or two: the block, a shorter last batch; prefill a few buckets)
_graphs: OrderedDict[tuple, "_CapturedSchedule"] = OrderedDict()
_lock = threading.Lock()


# the position axis of each input (fk_g [B, Hk, kg, T, F], v_g [B, Hk, 1, T, Dv], valid and
# is_sink [B, T], log_decay [H]): a padded graph's buffers are longer there
_POSITION_DIMS = (3, 3, 1, 1, None)


def fill_padded(buffer: torch.Tensor, x: torch.Tensor, dim: int | None) -> None:
    """Copy x into the start of `buffer` along `dim` and zero the rest (the padding: zero features and
    values, never valid, never a sink); one copy where padding then copying would make two."""
    if dim is None or buffer.shape[dim] == x.shape[dim]:
        buffer.copy_(x)
        return
    n = x.shape[dim]
    buffer.narrow(dim, 0, n).copy_(x)
    buffer.narrow(dim, n, buffer.shape[dim] - n).zero_()


class _CapturedSchedule:
    """One shape's replay: static input buffers, the captured graph, its output buffer."""

    def __init__(self, inputs: list[torch.Tensor | None], shapes: list[tuple | None], window: int, memory: Memory,
                 intervals: int):
        self.inputs = [None if x is None else x.new_empty(shape) for x, shape in zip(inputs, shapes)]
        self._load(inputs)

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            fk, v, valid, is_sink, log_decay = self.inputs
            return _selection_schedule(fk, v, valid, is_sink, window, memory, intervals, log_decay)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the main stream, as torch.cuda.graphs asks
            run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = run()

    def _load(self, inputs: list[torch.Tensor | None]) -> None:
        for buffer, x, dim in zip(self.inputs, inputs, _POSITION_DIMS):
            if buffer is not None:
                fill_padded(buffer, x, dim)

    def __call__(self, inputs: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        self._load(inputs)
        self.graph.replay()
        return tuple(t.clone() for t in self.output)


def _padded_shape(x: torch.Tensor | None, dim: int | None, length: int) -> tuple | None:
    if x is None:
        return None
    shape = list(x.shape)
    if dim is not None:
        shape[dim] = length
    return tuple(shape)


def graphed_selection_schedule(fk_g, v_g, valid, is_sink, window: int, memory: Memory, intervals: int,
                               log_decay: torch.Tensor | None = None,
                               length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_selection_schedule`, replayed from a CUDA graph on CUDA tensors (eager elsewhere, and while
    a graph is being captured around it). With `length` (>= the sequence's), the graph runs on the
    sequence padded to that many positions (`fill_padded`)."""
    length = length or fk_g.shape[3]
    if not fk_g.is_cuda or torch.cuda.is_current_stream_capturing():
        if length > fk_g.shape[3]:
            fk_g, v_g, valid, is_sink = _padded(fk_g, v_g, valid, is_sink, length)
        return _selection_schedule(fk_g, v_g, valid, is_sink, window, memory, intervals, log_decay)
    inputs = [fk_g.detach(), v_g.detach(), valid, is_sink, None if log_decay is None else log_decay.detach()]
    shapes = [_padded_shape(x, dim, length) for x, dim in zip(inputs, _POSITION_DIMS)]
    key = (fk_g.device, window, memory, intervals,
           *(None if x is None else (shape, x.dtype) for x, shape in zip(inputs, shapes)))
    with torch.no_grad(), torch.cuda.device(fk_g.device), _lock:
        graph = _graphs.get(key)
        if graph is None:
            graph = _graphs[key] = _CapturedSchedule(inputs, shapes, window, memory, intervals)
            while len(_graphs) > _MAX_GRAPHS:
                _graphs.popitem(last=False)
        _graphs.move_to_end(key)
        return graph(inputs)


def _padded(fk_g, v_g, valid, is_sink, length: int):
    """The eager path's padding (the graph's buffers do the same in place)."""
    pad = length - fk_g.shape[3]
    F = torch.nn.functional
    return (F.pad(fk_g.detach(), (0, 0, 0, pad)), F.pad(v_g.detach(), (0, 0, 0, pad)),
            F.pad(valid, (0, pad), value=False), F.pad(is_sink, (0, pad), value=False))


def interval_bucket(intervals: int) -> int:
    """``intervals`` rounded up to one of 4 counts per octave (8, 10, 12, 14, 16, 20, ...): at most a
    quarter more selections than needed, and a few graphs for prompts of any length."""
    if intervals <= 8:
        return intervals
    step = 1 << (intervals.bit_length() - 3)
    return -(-intervals // step) * step


def bucketed_selection_schedule(fk_g, v_g, valid, is_sink, window: int, memory: Memory, intervals: int,
                                log_decay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`graphed_selection_schedule` for a prompt of any length: the sequence is padded with positions
    that are never candidates up to `interval_bucket(intervals)` intervals, and the first `intervals`
    rows returned. A selection never looks past its interval, so those rows are the unpadded schedule's."""
    n = interval_bucket(intervals)
    length = max(n * memory.period, fk_g.shape[3])
    slots, held = graphed_selection_schedule(fk_g, v_g, valid, is_sink, window, memory, n, log_decay, length=length)
    return slots[:, :, :intervals], held[:, :, :intervals]
