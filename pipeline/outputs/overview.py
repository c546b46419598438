"""The dataset at a glance, for the gallery's first page: boxes per class, histograms of the box,
entity and caption scores and of box sizes, errors by kind. Each bar names its facet
(`class=dog`, `box score=0.8-0.9`), and each row the facets it falls in, so a click on a bar shows
the images behind it. Counts only: memory holds one counter per class and bin, never the rows."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from pipeline.records import caption_score, error_kind

BINS = 10  # histogram bins over [0, 1]
PLOTS = ("class", "box score", "entity score", "caption score", "box size", "error")
TITLES = {
    "class": "Boxes per class",
    "box score": "Box scores (the probability of its two location tokens)",
    "entity score": "Entity scores (the probability that the phrase is grounded)",
    "caption score": "Caption scores (the mean probability of its tokens, geometric)",
    "box size": "Box sizes (the square root of the share of the image it covers)",
    "error": "Errors by kind",
}
SHOWN = 40  # bars of the class plot; the rest are summed in one


def _bin(value: float) -> str:
    return _bin_label(min(max(int(value * BINS), 0), BINS - 1))


class Overview:
    def __init__(self):
        self.counts: dict[str, Counter[str]] = {plot: Counter() for plot in PLOTS}
        self.pages: dict[str, set[int]] = defaultdict(set)

    def add(self, row: dict, classes: list[str | None], page: int) -> list[str]:
        """Counts the row (its entities' classes given in order) and returns its facets."""
        found: list[tuple[str, str]] = []
        if row["error"]:
            found.append(("error", error_kind(row["error"]).strip()[:60] or "error"))  # a bar's label
        for entity, name in zip(row["entities"] or [], classes):
            if entity.get("score") is not None:
                found.append(("entity score", _bin(entity["score"])))
            for b in entity["boxes"]:
                if name is not None:
                    found.append(("class", name))
                if b.get("score") is not None:
                    found.append(("box score", _bin(b["score"])))
                found.append(("box size", _bin(math.sqrt(abs((b["x2"] - b["x1"]) * (b["y2"] - b["y1"]))))))
        if (score := caption_score(row)) is not None:
            found.append(("caption score", _bin(score)))
        for plot, label in found:
            self.counts[plot][label] += 1
        facets = sorted({f"{plot}={label}" for plot, label in found})
        for facet in facets:
            self.pages[facet].add(page)
        return facets

    def plots(self) -> list[dict]:
        """Each plot: its title and bars (label, count, facet); the histograms in bin order."""
        out = []
        for plot in PLOTS:
            counts = self.counts[plot]
            if not counts:
                continue
            if plot in ("class", "error"):
                ranked = counts.most_common()
                bars = [{"label": k, "count": n, "facet": f"{plot}={k}"} for k, n in ranked[:SHOWN]]
                if len(ranked) > SHOWN:
                    bars.append({"label": f"{len(ranked) - SHOWN} more", "count": sum(n for _, n in ranked[SHOWN:])})
            else:
                bars = [{"label": k, "count": counts[k], "facet": f"{plot}={k}"} for k in map(_bin_label, range(BINS))]
            out.append({"title": TITLES[plot], "bars": bars})
        return out

    def facet_pages(self) -> dict[str, list[int]]:
        return {facet: sorted(pages) for facet, pages in sorted(self.pages.items())}


def _bin_label(k: int) -> str:
    return f"{k / BINS:.1f}-{(k + 1) / BINS:.1f}"
