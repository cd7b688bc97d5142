"""`grpokit report RUN_DIR`: one self-contained report.html of a run.

Reads what a run leaves in its directory (metrics.jsonl, config.yaml, training_log.txt, alerts.jsonl,
completions/step_N.jsonl, reward_errors.jsonl) and writes a single HTML file that opens with no
network: CSS inline, every plot an inline SVG drawn by matplotlib (text as paths, so no fonts are
needed either), no scripts, and a Content-Security-Policy of `default-src 'none'` so a browser
fetches nothing even if user text were to smuggle in a tag. All user text (prompts, completions,
alert messages, the config) goes through html.escape.

A missing metrics.jsonl is an error; anything else missing (a metric, the completion logs, the
alerts, the config) leaves a note in the report where it would have been. The files read here may
be half-written (a run killed mid-line) or edited by hand, so a line that is not JSON is skipped
with a note rather than stopping the report.

matplotlib is used through its object API (`matplotlib.figure.Figure`), never pyplot, so making a
report neither picks nor changes the process's plotting backend.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from grpokit import __version__
from grpokit.errors import GrpokitError

SHOWN_COMPLETIONS = 16  # rows of the sample table (the last logged step's first completions)
TEXT_PREVIEW = 240  # characters of a prompt or completion shown before "more" (the rest in <details>)
PANEL_HEIGHT = 2.1  # inches per panel of a plot
FIGURE_WIDTH = 7.0


@dataclass(frozen=True, slots=True)
class Panel:
    ylabel: str
    keys: tuple[str, ...]  # metric names or regular expressions (full match), in plotting order


@dataclass(frozen=True, slots=True)
class Plot:
    id: str  # the <figure>'s id; stable, tests and links rely on it
    title: str
    caption: str
    panels: tuple[Panel, ...]
    missing: str = "not in metrics.jsonl"  # the note when no panel has data


PLOTS = (
    Plot("plot-reward", "Reward", "mean reward of each step's completions, and each reward function's mean",
         (Panel("reward", ("reward", r"rewards/.+/mean")),)),
    Plot("plot-reward-spread", "Reward spread", "standard deviation of the rewards, and the fraction of groups "
         "whose rewards are all equal (no learning signal)",
         (Panel("std", ("reward_std", r"rewards/.+/std")), Panel("fraction", ("frac_reward_zero_std",)))),
    Plot("plot-length", "Completion length", "tokens per completion, and the fraction cut at max_completion_length "
         "(clipped) or identical within their group",
         (Panel("tokens", ("completions/mean_length", "completions/min_length", "completions/max_length",
                           "completions/mean_terminated_length")),
          Panel("fraction", ("completions/clipped_ratio", "completions/frac_identical_in_group")))),
    Plot("plot-kl", "KL to the reference model", "mean per-token KL of the policy to the reference model",
         (Panel("kl", ("kl",)),), missing="not in metrics.jsonl (logged only when beta > 0)"),
    Plot("plot-entropy", "Entropy", "mean per-token entropy of the policy on its completions",
         (Panel("entropy", ("entropy",)),)),
    Plot("plot-clip-ratio", "Clip ratios", "fraction of tokens whose importance ratio was clipped",
         (Panel("fraction", ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")),)),
    Plot("plot-timings", "Timings", "seconds per step by phase, and throughput",
         (Panel("seconds", ("step_time", r"time/[^/]+")), Panel("tokens / s", ("tokens_per_second",)))),
    Plot("plot-loss", "Loss and gradient norm", "training loss and the gradient norm before clipping",
         (Panel("loss", ("loss",)), Panel("grad norm", ("grad_norm",)))),
    Plot("plot-eval", "Held-out evaluation", "greedy evaluation on eval_dataset: accuracy and each reward's mean, "
         "completion length, fraction cut at max_completion_length",
         (Panel("score", ("eval/accuracy", r"eval/rewards/.+/mean")),
          Panel("tokens", ("eval/completions/mean_length",)),
          Panel("fraction", ("eval/completions/clipped_ratio",))),
         missing="no evaluation in metrics.jsonl (eval_dataset not set?)"),
    Plot("plot-learning-rate", "Learning rate", "learning rate after each optimizer step",
         (Panel("learning rate", ("learning_rate",)),)),
)


@dataclass(slots=True)
class Run:
    """What the report shows, read from a run directory."""
    run_dir: Path
    series: dict[str, list[tuple[int, float]]]  # metric -> [(step, value)], sorted by step; NaN for null
    config_text: str | None
    config: dict
    notes: list[str] = field(default_factory=list)  # problems met while reading, shown in the report


def build_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write the run's report (default RUN_DIR/report.html) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GrpokitError(f"run directory {run_dir} does not exist (give the output_dir of a training run)")
    run = read_run(run_dir)
    output = Path(output) if output is not None else run_dir / "report.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(render(run), encoding="utf-8")
    os.replace(partial, output)
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output_dir")
    parser.add_argument("--output", metavar="PATH", default=None, help="where to write the HTML "
                        "(default RUN_DIR/report.html)")


def main(args: argparse.Namespace) -> int:
    path = build_report(Path(args.run_dir), Path(args.output) if args.output else None)
    print(path)
    return 0


# ---- reading the run directory


def read_run(run_dir: Path) -> Run:
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise GrpokitError(f"{metrics_path} not found: a report needs the metrics a training run writes there "
                           "(is RUN_DIR a run's output_dir, and has it finished a step?)")
    notes: list[str] = []
    by_key: dict[str, dict[int, float]] = {}
    for line in _jsonl(metrics_path, notes):
        step = line.get("step")
        if not isinstance(step, int):
            notes.append(f"{metrics_path.name}: a line without an integer 'step' was skipped")
            continue
        for key, value in line.items():
            if key in ("step", "timestamp") or not (value is None or isinstance(value, (int, float))):
                continue
            # a resumed run logs the steps after its checkpoint again: the later line wins
            by_key.setdefault(key, {})[step] = math.nan if value is None else float(value)
    series = {key: sorted(points.items()) for key, points in by_key.items()}
    config_text, config = None, {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        import yaml

        config_text = config_path.read_text(encoding="utf-8", errors="replace")
        try:  # the file may have been edited by hand; the report still shows it as text
            loaded = yaml.safe_load(config_text)
            config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError as exc:
            notes.append(f"config.yaml is not valid YAML ({exc.__class__.__name__}); shown as text only")
    return Run(run_dir=run_dir, series=series, config_text=config_text, config=config, notes=notes)


def _jsonl(path: Path, notes: list[str]) -> list[dict]:
    rows = []
    for number, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        try:  # a run killed mid-write leaves a partial last line
            row = json.loads(text)
        except json.JSONDecodeError:
            notes.append(f"{path.name} line {number} is not JSON and was skipped")
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            notes.append(f"{path.name} line {number} is not a JSON object and was skipped")
    return rows


def _training_dates(run_dir: Path) -> tuple[str | None, str | None]:
    log_path = run_dir / "training_log.txt"
    if not log_path.is_file():
        return None, None
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log_path.read_text(errors="replace"), re.M)
    return (stamps[0], stamps[-1]) if stamps else (None, None)


# ---- plots


def _keys_for(panel: Panel, available: dict[str, list]) -> list[str]:
    keys: list[str] = []
    for pattern in panel.keys:
        if pattern in available:
            found = [pattern]
        else:
            found = sorted(k for k in available if re.fullmatch(pattern, k))
        keys += [k for k in found if k not in keys]
    return keys


def _finite(points: list[tuple[int, float]]) -> bool:
    return any(math.isfinite(v) for _, v in points)


def render_plot(plot: Plot, series: dict[str, list[tuple[int, float]]]) -> str | None:
    """The plot as an inline <svg> string, or None when none of its metrics has a finite value."""
    panels = [(p, keys) for p in plot.panels
              if (keys := [k for k in _keys_for(p, series) if _finite(series[k])])]
    if not panels:
        return None
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # a per-plot hash salt keeps the clip-path ids of different plots apart in one HTML document
    with rc_context({"svg.hashsalt": plot.id, "svg.fonttype": "path", "font.size": 8}):
        fig = Figure(figsize=(FIGURE_WIDTH, 0.5 + PANEL_HEIGHT * len(panels)), layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (panel, keys) in zip(axes, panels, strict=True):
            for n, key in enumerate(keys):
                steps = [s for s, _ in series[key]]
                values = [v for _, v in series[key]]
                (line,) = ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3,
                                  linewidth=1.3, label=key)
                line.set_gid(f"{plot.id}-series-{n}")  # <g id=...> around the data line in the SVG
            ax.set_ylabel(panel.ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        axes[-1].set_xlabel("step")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return _inline_svg(buffer.getvalue())


def _inline_svg(svg: str) -> str:
    """matplotlib's SVG file as an element for HTML: no XML prolog or DOCTYPE, no RDF metadata, no
    namespace URLs (HTML's parser supplies the SVG namespace), so no URL of any kind is left in it."""
    svg = re.sub(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(?::\w+)?="[^"]*"', "", svg)
    return svg.strip()


# ---- HTML

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1500px;
       padding: 1em 2em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; font-family: ui-monospace, monospace; }
nav a { margin-right: 1em; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1.2em; }
figure.plot { margin: 0; border: 1px solid #e3e3e3; border-radius: 6px; padding: 0.6em; }
figure.plot svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9em; color: #555; } figcaption b { color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.5em; vertical-align: top; text-align: left; }
th { background: #f5f5f5; } td.num { text-align: right; font-family: ui-monospace, monospace; white-space: nowrap; }
pre, .text { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, monospace; margin: 0; }
td .text { max-width: 48em; }
details summary { cursor: pointer; color: #225; }
.note { color: #7a5a00; }
.alert { border-left: 4px solid #c33; background: #fff6f6; padding: 0.5em 1em; margin: 0.8em 0; }
.alert p { margin: 0.2em 0; } pre.config { background: #f7f7f7; padding: 1em; border-radius: 6px; }
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'"


def render(run: Run) -> str:
    e = html.escape
    title = f"grpokit report: {run.run_dir.resolve().name}"
    body = [f"<h1>{e(title)}</h1>", _header(run),
            '<nav><a href="#summary">Summary</a><a href="#plots">Plots</a><a href="#completions">Completions</a>'
            '<a href="#alerts">Alerts</a><a href="#reward-errors">Reward errors</a><a href="#config">Config</a></nav>',
            _summary(run), _plots(run), _completions(run), _alerts(run), _reward_errors(run), _config(run)]
    if run.notes:
        body.append('<section id="notes"><h2>Notes</h2><ul>'
                    + "".join(f'<li class="note">{e(n)}</li>' for n in run.notes) + "</ul></section>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _train_steps(run: Run) -> list[int]:
    return sorted({s for key, points in run.series.items() if not key.startswith("eval/") for s, _ in points})


def _header(run: Run) -> str:
    e = html.escape
    started, finished = _training_dates(run.run_dir)
    steps = _train_steps(run)
    max_steps = run.config.get("max_steps")
    shown_steps = (f"{steps[-1]}" if steps else "none") + (f" of {max_steps}" if max_steps else "")
    rows = [("model", run.config.get("model", "unknown (no config.yaml)")), ("run directory", run.run_dir.resolve()),
            ("steps logged", shown_steps), ("started", started or "unknown"), ("last log line", finished or "unknown"),
            ("report written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
            ("grpokit", __version__)]
    return ('<header><dl class="meta">' + "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in rows)
            + "</dl></header>")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    return str(value)


def _last(points: list[tuple[int, float]]) -> tuple[int, float] | None:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    return finite[-1] if finite else None


def _summary(run: Run) -> str:
    keys = ["reward", "reward_std", "kl", "entropy", "completions/mean_length", "completions/clipped_ratio",
            "loss", "grad_norm", "step_time", "eval/accuracy"]
    keys += sorted(k for k in run.series if re.fullmatch(r"rewards/.+/mean", k))
    rows = []
    for key in keys:
        if key not in run.series or (last := _last(run.series[key])) is None:
            continue
        first = next((v for _, v in run.series[key] if math.isfinite(v)), math.nan)
        rows.append(f"<tr><td>{html.escape(key)}</td><td class=num>{_fmt(first)}</td>"
                    f"<td class=num>{_fmt(last[1])}</td><td class=num>{last[0]}</td></tr>")
    skipped = sum(v == 1.0 for _, v in run.series.get("skipped_step", []))
    extra = f'<p class="note">{skipped} step(s) skipped (non-finite loss or gradients)</p>' if skipped else ""
    table = ("<table><tr><th>metric</th><th>first</th><th>last</th><th>at step</th></tr>" + "".join(rows)
             + "</table>") if rows else '<p class="note">no metric has a finite value yet</p>'
    return f'<section id="summary"><h2>Summary</h2>{table}{extra}</section>'


def _plots(run: Run) -> str:
    figures, omitted = [], []
    for plot in PLOTS:
        svg = render_plot(plot, run.series)
        if svg is None:
            omitted.append(f'<li class="note" data-plot="{plot.id}"><b>{html.escape(plot.title)}</b>: '
                           f"{html.escape(plot.missing)}</li>")
            continue
        figures.append(f'<figure class="plot" id="{plot.id}">{svg}<figcaption><b>{html.escape(plot.title)}</b>: '
                       f"{html.escape(plot.caption)}</figcaption></figure>")
    notes = f'<ul class="omitted">{"".join(omitted)}</ul>' if omitted else ""
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{"".join(figures)}</div>{notes}</section>'


def _as_text(value) -> str:
    """A prompt or completion: chat messages as 'role: content' lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in value)
    return "" if value is None else json.dumps(value)


def _text_cell(value) -> str:
    text = _as_text(value)
    if len(text) <= TEXT_PREVIEW:
        return f'<td><div class="text">{html.escape(text)}</div></td>'
    return (f'<td><details><summary><span class="text">{html.escape(text[:TEXT_PREVIEW])}</span>… '
            f"({len(text):,} characters)</summary><div class=\"text\">{html.escape(text)}</div></details></td>")


FIXED_COLUMNS = ("step", "prompt", "completion", "rewards", "total_reward", "advantage", "finish_reason")


def _completions(run: Run) -> str:
    folder = run.run_dir / "completions"
    logs = {int(m[1]): p for p in (folder.glob("step_*.jsonl") if folder.is_dir() else [])
            if (m := re.fullmatch(r"step_(\d+)\.jsonl", p.name))}
    files = [logs[step] for step in sorted(logs)]
    if not files:
        return ('<section id="completions"><h2>Sample completions</h2><p class="note">no completion logs '
                "(set log_completions_steps to write completions/step_N.jsonl)</p></section>")
    path = files[-1]
    rows = _jsonl(path, run.notes)
    names: list[str] = []  # reward names, in the order they first appear
    for row in rows:
        rewards = row.get("rewards") if isinstance(row.get("rewards"), dict) else {
            k: v for k, v in row.items() if k not in FIXED_COLUMNS}  # older layout: rewards at the top level
        row["_rewards"] = rewards
        names += [k for k in rewards if k not in names]
    has_total = any("total_reward" in r for r in rows)
    head = (["prompt", "completion"] + names + (["total reward"] if has_total else [])
            + ["advantage", "finish"])
    body = []
    for row in rows[:SHOWN_COMPLETIONS]:
        cells = [_text_cell(row.get("prompt")), _text_cell(row.get("completion"))]
        cells += [f"<td class=num>{html.escape(_fmt(row['_rewards'].get(n)))}</td>" for n in names]
        if has_total:
            cells.append(f"<td class=num>{html.escape(_fmt(row.get('total_reward')))}</td>")
        cells += [f"<td class=num>{html.escape(_fmt(row.get('advantage')))}</td>",
                  f"<td>{html.escape(str(row.get('finish_reason', '')))}</td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    logged = ", ".join(p.name.removeprefix("step_").removesuffix(".jsonl") for p in files)
    intro = (f"<p>{min(len(rows), SHOWN_COMPLETIONS)} of {len(rows)} completions of the last logged step "
             f"(completions/{html.escape(path.name)}); steps logged: {html.escape(logged)}. "
             "n/a: the reward did not apply.</p>")
    table = ('<table class="completions"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
             + "".join(body) + "</table>")
    return f'<section id="completions"><h2>Sample completions</h2>{intro}{table}</section>'


def _alerts(run: Run) -> str:
    path = run.run_dir / "alerts.jsonl"
    if not path.is_file():
        return '<section id="alerts"><h2>Health alerts</h2><p>no health alerts (no alerts.jsonl)</p></section>'
    alerts = _jsonl(path, run.notes)
    e = lambda v: html.escape(str(v if v is not None else ""))  # noqa: E731
    items = [f'<div class="alert"><p><b>step {e(a.get("step"))}: {e(a.get("name"))}</b></p>'
             f"<p>seen: {e(a.get('message'))}</p><p>causes: {e(a.get('causes'))}</p><p>fix: {e(a.get('fix'))}</p></div>"
             for a in alerts]
    return (f'<section id="alerts"><h2>Health alerts</h2><p>{len(alerts)} alert(s), from alerts.jsonl</p>'
            + "".join(items) + "</section>")


def _reward_errors(run: Run) -> str:
    parts = []
    for name in ("reward_errors.jsonl", "eval_reward_errors.jsonl"):
        path = run.run_dir / name
        if not path.is_file():
            continue
        rows = _jsonl(path, run.notes)
        counts: dict[tuple[str, str], int] = {}
        first: dict[tuple[str, str], str] = {}
        for row in rows:
            key = (str(row.get("reward", "?")), str(row.get("kind", "?")))
            counts[key] = counts.get(key, 0) + 1
            first.setdefault(key, f"step {row.get('step')}: {row.get('error', '')}")
        table = "".join(f"<tr><td>{html.escape(r)}</td><td>{html.escape(k)}</td><td class=num>{n}</td>"
                        f'<td><div class="text">{html.escape(first[(r, k)][:TEXT_PREVIEW])}</div></td></tr>'
                        for (r, k), n in counts.items())
        parts.append(f"<p>{len(rows)} failure(s) in {name}</p><table><tr><th>reward</th><th>kind</th>"
                     f"<th>count</th><th>first</th></tr>{table}</table>")
    if not parts:
        parts.append("<p>no reward errors (no reward_errors.jsonl)</p>")
    return '<section id="reward-errors"><h2>Reward errors</h2>' + "".join(parts) + "</section>"


def _config(run: Run) -> str:
    if run.config_text is None:
        return '<section id="config"><h2>Config</h2><p class="note">no config.yaml in the run directory</p></section>'
    return (f'<section id="config"><h2>Config</h2><p>config.yaml, the resolved config</p>'
            f'<pre class="config">{html.escape(run.config_text)}</pre></section>')
