"""The global cache's selection replay, captured as a CUDA graph (training with a global cache).

Training a fresh sequence with a global cache first replays every selection of the sequence
(`_selection_schedule`: a loop over the selection intervals, a few dozen small ops each, no
gradient, shapes fixed by the block). On the GPU that loop costs launches, not arithmetic, and it
runs again for every layer and step with the same shapes: it is captured once per shape and
replayed (the inputs copied into the graph's buffers, the result copied out, so one graph serves
every layer). The math stays `lolcats.attention.hybrid`'s; this module only decides how it runs.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from lolcats.attention.hybrid import Memory, _selection_schedule

__all__ = ["graphed_selection_schedule"]

_MAX_GRAPHS = 8  # shapes kept (training has one or two: the block, a shorter last batch)
_graphs: OrderedDict[tuple, "_CapturedSchedule"] = OrderedDict()
_lock = threading.Lock()


class _CapturedSchedule:
    """One shape's replay: static input buffers, the captured graph, its output buffer."""

    def __init__(self, inputs: list[torch.Tensor | None], window: int, memory: Memory, intervals: int):
        self.inputs = [None if x is None else x.clone() for x in inputs]

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

    def __call__(self, inputs: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        for buffer, x in zip(self.inputs, inputs):
            if buffer is not None:
                buffer.copy_(x)
        self.graph.replay()
        return tuple(t.clone() for t in self.output)


def graphed_selection_schedule(fk_g, v_g, valid, is_sink, window: int, memory: Memory, intervals: int,
                               log_decay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_selection_schedule`, replayed from a CUDA graph on CUDA tensors (eager elsewhere, and while
    a graph is being captured around it)."""
    if not fk_g.is_cuda or torch.cuda.is_current_stream_capturing():
        return _selection_schedule(fk_g, v_g, valid, is_sink, window, memory, intervals, log_decay)
    inputs = [fk_g.detach(), v_g.detach(), valid, is_sink, None if log_decay is None else log_decay.detach()]
    key = (fk_g.device, window, memory, intervals,
           *(None if x is None else (tuple(x.shape), x.dtype) for x in inputs))
    with torch.no_grad(), torch.cuda.device(fk_g.device), _lock:
        graph = _graphs.get(key)
        if graph is None:
            graph = _graphs[key] = _CapturedSchedule(inputs, window, memory, intervals)
            while len(_graphs) > _MAX_GRAPHS:
                _graphs.popitem(last=False)
        _graphs.move_to_end(key)
        return graph(inputs)
