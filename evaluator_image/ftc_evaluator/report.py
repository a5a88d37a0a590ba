"""The self-contained HTML report (`report/index.html`): no network at all — CSS inline, plots inline as
SVG drawn by matplotlib, no scripts, fonts or images from elsewhere.

`render_report(data)` is a pure function of a `ReportData`; `loss_chart_svg` and `score_chart_svg`
draw the charts.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class ReportModel:
    """One model's row of the report."""

    name: str
    checkpoint: str
    adapter_uri: str | None = None
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # metric -> {mean, low, high, n, missing}
    train: dict[str, Any] = field(default_factory=dict)
    overfitting: dict[str, Any] | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # [{step, train_loss, eval_loss}]


@dataclass
class ReportData:
    """Everything the report shows."""

    title: str
    primary_metric: str
    metrics: list[str]
    models: list[ReportModel]
    winner: str | None = None
    p_value: float | None = None
    verdict_reason: str = ""
    checkpoint: str = "best"
    failed: dict[str, str] = field(default_factory=dict)
    pairwise: list[dict[str, Any]] = field(default_factory=list)
    judges: list[dict[str, Any]] = field(default_factory=list)
    agreement: list[dict[str, Any]] = field(default_factory=list)
    budget_exhausted: bool = False
    samples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    items: int = 0
    generated: str = ""
    scores_uri: str | None = None


# ---------------------------------------------------------------------------------------------- charts


def _svg(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    text = text[text.find("<svg") :]  # drop the XML declaration and DOCTYPE (inline SVG needs neither)
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "ftc"  # stable element ids: the same data gives the same SVG
    return plt


def loss_chart_svg(models: Sequence[ReportModel]) -> str | None:
    """Train (solid) and eval (dashed, dots) loss against step, one colour per model, on one chart."""
    curves = [m for m in models if m.history]
    if not curves:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.2), dpi=100)
    for i, model in enumerate(curves):
        colour = PALETTE[i % len(PALETTE)]
        train = [(p["step"], p["train_loss"]) for p in model.history if p.get("train_loss") is not None]
        evals = [(p["step"], p["eval_loss"]) for p in model.history if p.get("eval_loss") is not None]
        if train:
            axis.plot(*zip(*train, strict=True), color=colour, linewidth=1.8, label=f"{model.name} train")
        if evals:
            axis.plot(
                *zip(*evals, strict=True), color=colour, linestyle="--", marker="o", markersize=4, label=f"{model.name} eval"
            )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("Train and eval loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    return _svg(figure)


def score_chart_svg(models: Sequence[ReportModel], metric: str, winner: str | None = None) -> str | None:
    """The primary metric's mean per model with its 95% interval as error bars."""
    rows = [(m.name, m.scores.get(metric, {})) for m in models]
    rows = [(name, s) for name, s in rows if s.get("mean") is not None]
    if not rows:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 0.6 + 0.55 * len(rows)), dpi=100)
    names = [name for name, _ in rows]
    means = [s["mean"] for _, s in rows]
    low = [s["mean"] - (s["low"] if s.get("low") is not None else s["mean"]) for _, s in rows]
    high = [(s["high"] if s.get("high") is not None else s["mean"]) - s["mean"] for _, s in rows]
    colours = ["#2ca02c" if name == winner else "#7f7f7f" for name in names]
    axis.barh(names, means, xerr=[low, high], color=colours, capsize=4)
    axis.invert_yaxis()
    axis.set_xlabel(f"{metric} (mean, 95% bootstrap interval)")
    axis.grid(axis="x", alpha=0.3)
    return _svg(figure)


# ---------------------------------------------------------------------------------------------- html

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ d.title }}</title>
<style>
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.winner td { background: #d9f2d9; font-weight: bold; }
.verdict { font-size: 16px; padding: 8px 12px; background: #eef5ff; border-left: 4px solid #1f77b4; }
.overfitting { color: #b00020; font-weight: bold; } .ok { color: #2e7d32; }
.failed { color: #b00020; } .small { font-size: 12px; color: #555; }
.answer { white-space: pre-wrap; font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }
.chart svg { max-width: 100%; height: auto; }
</style>
</head>
<body>
<h1>{{ d.title }}</h1>
<p class="small">{{ d.items }} held-out items &middot; checkpoint: {{ d.checkpoint }} &middot; primary metric:
{{ d.primary_metric }}{% if d.generated %} &middot; {{ d.generated }}{% endif %}</p>
<p class="verdict" id="verdict">
{% if d.winner and d.winner != "tie" %}Winner: <b>{{ d.winner }}</b>{% else %}Verdict: <b>tie</b>{% endif %}
{% if d.p_value is not none %} (adjusted p = {{ "%.4g"|format(d.p_value) }}){% endif %}. {{ d.verdict_reason }}</p>

<h2>Scores</h2>
<table id="scores">
<tr><th>model</th><th>checkpoint</th>
{% for m in d.metrics %}<th>{{ m }}{% if m == d.primary_metric %} (primary){% endif %}</th>{% endfor %}</tr>
{% for model in d.models %}
<tr class="{{ 'winner' if model.name == d.winner else '' }}"><td>{{ model.name }}</td><td>{{ model.checkpoint }}</td>
{% for m in d.metrics %}{% set s = model.scores.get(m, {}) %}<td>{% if s.get('mean') is not none %}{{ "%.3f"|format(s.mean) }}
{% if s.get('low') is not none %}<span class="small">[{{ "%.3f"|format(s.low) }}, {{ "%.3f"|format(s.high) }}]</span>{% endif %}
{% else %}&ndash;{% endif %}
{% if s.get('missing') %}<br><span class="small">{{ s.missing }} missing</span>{% endif %}</td>{% endfor %}
</tr>
{% endfor %}
</table>
<p class="small">Mean over the items scored, with a 95% BCa bootstrap interval. Missing: items without a score
(for example judgments that stayed unparseable after retries); they are never counted as a score.</p>
{% if score_svg %}<div class="chart" id="score-chart">{{ score_svg|safe }}</div>{% endif %}

{% if d.pairwise %}
<h2>Paired tests on {{ d.primary_metric }}</h2>
<table id="pairwise"><tr><th>a</th><th>b</th><th>mean a&minus;b</th><th>95% interval</th><th>permutation p</th>
<th>Holm-adjusted p</th><th>Wilcoxon p</th><th>items</th></tr>
{% for t in d.pairwise %}<tr><td>{{ t.a }}</td><td>{{ t.b }}</td><td>{{ "%.4f"|format(t.mean_diff) }}</td>
<td>{% if t.ci_low is not none %}[{{ "%.4f"|format(t.ci_low) }}, {{ "%.4f"|format(t.ci_high) }}]{% endif %}</td>
<td>{{ "%.4g"|format(t.p_value) }}</td><td>{{ "%.4g"|format(t.p_adjusted) }}</td>
<td>{% if t.wilcoxon_p is not none %}{{ "%.4g"|format(t.wilcoxon_p) }}{% endif %}</td><td>{{ t.n }}</td></tr>{% endfor %}
</table>
{% endif %}

<h2>Training</h2>
{% if loss_svg %}<div class="chart" id="loss-chart">{{ loss_svg|safe }}</div>{% else %}<p>No loss history.</p>{% endif %}
<table id="training"><tr><th>model</th><th>training time</th><th>tokens/s (pod)</th><th>GPUs</th><th>tokens/s per GPU</th>
<th>final train loss</th>
<th>best eval loss (step)</th><th>final eval loss</th><th>overfitting</th><th>adapter evaluated</th></tr>
{% for model in d.models %}{% set t = model.train %}<tr><td>{{ model.name }}</td>
<td>{% if t.get('train_seconds') is not none %}{{ "%.1f"|format(t.train_seconds) }} s{% endif %}</td>
<td>{% if t.get('tokens_per_second') is not none %}{{ "%.1f"|format(t.tokens_per_second) }}{% endif %}</td>
<td>{{ t.get('processes') or '' }}</td>
<td>{% if t.get('tokens_per_second_per_gpu') is not none %}{{ "%.1f"|format(t.tokens_per_second_per_gpu) }}{% endif %}</td>
<td>{% if t.get('final_train_loss') is not none %}{{ "%.4f"|format(t.final_train_loss) }}{% endif %}</td>
<td>{% if t.get('best_eval_loss') is not none %}{{ "%.4f"|format(t.best_eval_loss) }}
{% if t.get('best_step') is not none %} ({{ t.best_step }}){% endif %}{% endif %}</td>
<td>{% if t.get('final_eval_loss') is not none %}{{ "%.4f"|format(t.final_eval_loss) }}{% endif %}</td>
<td>{% if model.overfitting %}{% set v = model.overfitting.verdict %}
<span class="{{ 'overfitting' if v == 'overfitting' else 'ok' }}">{{ v }}</span>
<br><span class="small">{{ model.overfitting.reason }}</span>{% endif %}</td>
<td>{{ model.checkpoint }}<br><span class="small">{{ model.adapter_uri or '' }}</span></td></tr>{% endfor %}
</table>

<h2>Generation</h2>
<table id="generation"><tr><th>model</th><th>answers/s</th><th>batch size</th><th>halvings on OOM</th><th>new tokens</th></tr>
{% for model in d.models %}{% set g = model.generation %}<tr><td>{{ model.name }}</td>
<td>{% if g.get('answers_per_second') is not none %}{{ "%.2f"|format(g.answers_per_second) }}{% endif %}</td>
<td>{{ g.get('batch_size', '') }}</td><td>{{ g.get('oom_halvings', '') }}</td>
<td>{{ g.get('new_tokens', '') }}</td></tr>{% endfor %}
</table>

{% if d.failed %}
<h2>Failed models</h2>
<table id="failed"><tr><th>model</th><th>why</th></tr>
{% for name, why in d.failed.items() %}<tr><td class="failed">{{ name }}</td><td>{{ why }}</td></tr>{% endfor %}
</table>
{% endif %}

{% if d.judges %}
<h2>Judges</h2>
<table id="judges"><tr><th>judge</th><th>calls</th><th>cache hits</th><th>retries</th><th>429s waited out</th><th>missing</th>
<th>prompt tokens</th><th>completion tokens</th><th>estimated cost</th><th>errors</th></tr>
{% for j in d.judges %}<tr><td>{{ j.model }}{% if j.kind == "ragas" %} (RAGAS LLM metrics){% endif %}</td><td>{{ j.calls }}</td>
<td>{{ j.cache_hits }}</td><td>{{ j.retries }}</td><td>{{ j.rate_limited or 0 }}</td>
<td>{{ j.missing }}</td><td>{{ j.prompt_tokens }}</td><td>{{ j.completion_tokens }}</td><td>{{ "%.4f"|format(j.cost) }}</td>
<td class="small">{% for k, v in j.errors.items() %}{{ k }}: {{ v }} {% endfor %}</td></tr>{% endfor %}
</table>
{% if d.budget_exhausted %}<p class="failed" id="budget">The call budget (maxJudgeCalls, judges and RAGAS LLM metrics
together) ran out: the remaining answers are unscored and count as missing.</p>{% endif %}
{% if d.agreement %}<table id="agreement">
<tr><th>judge</th><th>items</th><th>Spearman</th><th>Cohen's kappa</th><th>exact</th></tr>
{% for a in d.agreement %}<tr><td>{{ a.judge }} vs main</td><td>{{ a.n }}</td>
<td>{% if a.spearman is not none %}{{ "%.3f"|format(a.spearman) }}{% endif %}</td>
<td>{% if a.kappa is not none %}{{ "%.3f"|format(a.kappa) }}{% endif %}</td>
<td>{% if a.exact is not none %}{{ "%.3f"|format(a.exact) }}{% endif %}</td></tr>{% endfor %}</table>{% endif %}
{% endif %}

{% if d.samples %}
<h2>Sample of held-out prompts</h2>
<table id="samples"><tr><th>prompt</th><th>reference</th>{% for model in d.models %}<th>{{ model.name }}</th>{% endfor %}</tr>
{% for s in d.samples %}<tr><td class="answer">{{ s.question }}</td><td class="answer">{{ s.reference }}</td>
{% for a in s.answers %}<td><div class="answer">{{ a.answer }}</div>
{% if a.rating is not none %}<b>judge: {{ a.rating }}</b>{% elif a.judged %}<b class="failed">judge: missing</b>{% endif %}
{% if a.rationale %}<div class="small">{{ a.rationale }}</div>{% endif %}</td>{% endfor %}</tr>{% endfor %}
</table>
{% endif %}

{% if d.notes %}<h2>Notes</h2><ul>{% for n in d.notes %}<li>{{ n }}</li>{% endfor %}</ul>{% endif %}
{% if d.scores_uri %}<p class="small">All numbers: {{ d.scores_uri }}</p>{% endif %}
</body>
</html>
"""


def render_report(data: ReportData) -> str:
    """The report's HTML: one file, nothing fetched from anywhere."""
    from jinja2 import Environment

    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(
        d=data,
        loss_svg=loss_chart_svg(data.models),
        score_svg=score_chart_svg(data.models, data.primary_metric, data.winner),
    )


def history_points(doc: Any) -> list[dict[str, Any]]:
    """Loss points from a metrics.json document: a list of LossPoint, or an object with `history`.
    Accepts camelCase and snake_case keys; ignores fields it does not know."""
    if isinstance(doc, Mapping):
        doc = doc.get("history") or doc.get("lossHistory") or doc.get("loss_history") or []
    points: list[dict[str, Any]] = []
    if not isinstance(doc, list):
        return points
    for raw in doc:
        if not isinstance(raw, Mapping) or raw.get("step") is None:
            continue
        train = raw.get("trainLoss", raw.get("train_loss", raw.get("loss")))
        evaluation = raw.get("evalLoss", raw.get("eval_loss"))
        points.append(
            {
                "step": int(raw["step"]),
                "epoch": float(raw.get("epoch") or 0),
                "train_loss": None if train is None else float(train),
                "eval_loss": None if evaluation is None else float(evaluation),
            }
        )
    return sorted(points, key=lambda p: p["step"])
