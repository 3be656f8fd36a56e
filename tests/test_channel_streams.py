"""lgconv.channel_streams: residual streams that can carry a grouped conv's output order."""

from __future__ import annotations

import torch
from helpers import condense_all, perturb_
from torch import nn

import lgconv
from lgconv import export
from lgconv.channel_streams import find_streams


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(width, width, 1), nn.BatchNorm2d(width)
        self.c2, self.bn2 = nn.Conv2d(width, width, 1), nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn2(self.c2(self.relu(self.bn1(self.c1(x))))))


class Stage(nn.Module):
    """A plain stem and two residual blocks writing one stream, read by a pooled linear head
    (``head=False``: the stream is the model's output)."""

    def __init__(self, width: int = 16, head: bool = True) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = (
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5)) if head else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(torch.relu(self.bn0(self.stem(x))))
        return self.head(y) if self.head is not None else y


def streams_of(model: nn.Module, groups: dict[str, int] | None = None) -> tuple[list, nn.Module, dict]:
    torch.manual_seed(0)
    for name, g in (groups or {"blocks.0.c2": 4, "blocks.1.c2": 4}).items():
        lgconv.condensify(model, g, include=[name], layout="interleaved")
    lgconv.condensify(model, 4, include=["blocks.*.c1"], layout="interleaved")
    model = lgconv.finalize(perturb_(condense_all(model)).eval()).eval()
    form, folded, _ = export._export_form(model)
    for name, item in folded.items():
        export._set(form, name, export._build(item, "dense"))
    absorbers = export._order_absorbers(form, list(folded))
    streams = find_streams(form, export._shuffled_orders(folded, set(absorbers)), export._Tracer())
    return streams, model, {"form": form, "folded": folded, "absorbers": absorbers}


def test_both_blocks_and_the_stem_write_one_stream_read_by_the_next_layers_and_the_head() -> None:
    streams, _, _ = streams_of(Stage())
    assert len(streams) == 1
    stream = streams[0]
    assert set(stream.condensed) == {"blocks.0.c2", "blocks.1.c2"}
    assert stream.plain == ("stem",) and stream.norms == ("bn0",)
    assert set(stream.readers) == {"blocks.0.c1", "blocks.1.c1", "head.2"}


def test_a_stream_that_is_the_model_output_keeps_its_order() -> None:
    assert streams_of(Stage(head=False))[0] == []


def test_writers_in_different_orders_are_no_stream() -> None:
    streams, _, _ = streams_of(Stage(), {"blocks.0.c2": 4, "blocks.1.c2": 2})
    assert streams == []


def test_a_graph_is_exact_whether_the_stream_runs_permuted_or_its_writers_shuffle() -> None:
    streams, model, parts = streams_of(Stage())
    folded, absorbers = parts["folded"], parts["absorbers"]
    streaming = {n for s in streams for n in s.condensed}
    forms, leftovers = {}, {}
    for name, item in folded.items():
        forms[name], leftover = export._candidates(item, name in absorbers, name in streaming)
        if leftover is not None:
            leftovers[name] = leftover
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        expected = model(x)
    for demote in (None, "blocks.1.c2"):  # every writer grouped, or one dense: the other shuffles
        plan = [
            export.LayerChoice(n, "dense" if n == demote else "grouped", {"grouped": 1.0, "dense": 1.0})
            for n in folded
        ]
        graph, built = export._assemble(parts["form"], forms, plan, leftovers, absorbers, streams)
        shuffles = [type(m).__name__ for m in graph.modules()].count("ChannelShuffle")
        assert shuffles == (0 if demote is None else 1)
        assert {c.name: c.representation for c in built}["blocks.0.c2"] == (
            "grouped" if demote is None else "grouped+shuffle"
        )
        with torch.no_grad():
            torch.testing.assert_close(graph(x), expected, rtol=1e-5, atol=1e-5)
