"""Reading TensorBoard event files back in tests, with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def events(logdir: Path | str) -> EventAccumulator:
    """The accumulator of the newest run directory under ``logdir``, everything kept."""
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no event files under {logdir}"
    acc = EventAccumulator(str(files[-1].parent), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def texts(acc: EventAccumulator, tag: str) -> list[str]:
    """The text entries logged under ``tag`` (``add_text``), in step order."""
    return [b"".join(e.tensor_proto.string_val).decode() for e in acc.Tensors(f"{tag}/text_summary")]


def _plugin_stack(logdir: Path | str) -> tuple[Any, Any]:
    """TensorBoard's own server side over ``logdir``: the custom-scalars plugin and a request context."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
    from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin

    mux = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"custom_scalars": 10})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    plugins: dict[str, Any] = {}
    tb_context = base_plugin.TBContext(
        logdir=str(logdir), data_provider=provider, plugin_name_to_instance=plugins
    )
    plugins["scalars"] = ScalarsPlugin(tb_context)
    return CustomScalarsPlugin(tb_context), context.RequestContext()


def layout(logdir: Path | str) -> dict[str, dict[str, Any]]:
    """The custom-scalars layout TensorBoard serves for ``logdir`` (its plugin's ``/layout`` route).

    ``{category title: {chart title: ("multiline", [tag regexes]) or ("margin", [(value, lower, upper)])}}``.
    """
    plugin, ctx = _plugin_stack(logdir)
    got = json.loads(plugin.layout_impl(ctx, "") or "{}")
    out: dict[str, dict[str, Any]] = {}
    for category in got.get("category", []):
        charts: dict[str, Any] = {}
        for chart in category["chart"]:
            if "multiline" in chart:
                charts[chart["title"]] = ("multiline", list(chart["multiline"]["tag"]))
            else:
                series = chart["margin"]["series"]
                charts[chart["title"]] = ("margin", [(s["value"], s["lower"], s["upper"]) for s in series])
        out[category["title"]] = charts
    return out


def chart_tags(logdir: Path | str, run: str, regexes: list[str]) -> set[str]:
    """The tags of ``run`` a multiline chart with ``regexes`` draws (the plugin's ``/scalars`` route)."""
    plugin, ctx = _plugin_stack(logdir)
    joined = (
        regexes[0] if len(regexes) == 1 else "|".join(f"({r})" for r in regexes)
    )  # as the frontend joins them
    got = plugin.scalars_impl(ctx, run, joined, "")
    assert got["regex_valid"], joined
    return set(got["tag_to_events"])
