"""Terminal rendering: a per-token EU heat-map of a `score` / `speculate` JSON result."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

# White -> yellow -> red: low EU reads as plain text, high EU stands out.
_RAMP = [(255, 255, 255), (255, 236, 140), (255, 170, 60), (235, 70, 50)]


def color(x: float) -> str:
    x = min(max(x, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(x), len(_RAMP) - 2)
    f = x - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(_RAMP[i], _RAMP[i + 1], strict=True))
    return f"rgb({r},{g},{b})"


def heatmap(result: dict, scale: float | None = None) -> Group:
    """The answer with each token's background coloured by its EU (0 .. ``scale``, default max)."""
    eus = [t["eu"] for t in result["tokens"]]
    top = scale if scale is not None else max(eus, default=0.0)
    riskiest = (result.get("spans") or [None])[0]  # underlined: the sentence / line to re-check first
    text = Text()
    for i, tok in enumerate(result["tokens"]):
        shade = color(tok["eu"] / top) if top > 0 else color(0.0)
        marked = riskiest is not None and riskiest["start"] <= i < riskiest["end"]
        text.append(tok["text"], style=f"black on {shade}" + (" underline" if marked else ""))
    legend = Text("EU scale: ")
    for i in range(5):
        v = top * i / 4
        legend.append(f" {v:.3g} ", style=f"black on {color(i / 4)}")
    legend.append("  nats")
    seq = result["sequence"]
    table = Table(show_header=True, header_style="bold", box=None)
    for col in ("method", "tokens", "mean EU", "max EU", "sum EU"):
        table.add_column(col)
    table.add_row(
        result["method"], str(len(eus)), f"{seq['mean']:.4g}", f"{seq['max']:.4g}", f"{seq['sum']:.4g}"
    )
    parts = [text, Text(""), legend, table]
    if riskiest is not None:
        parts.insert(2, Text(f"riskiest span (underlined; max EU {riskiest['max_eu']:.3g}, mean "
                             f"{riskiest['mean_eu']:.3g}): {riskiest['text'][:120]}"))
    return Group(*parts)
