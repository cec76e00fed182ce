"""``cogumi report RUN_DIR``: one page people read -- report.html (self-contained) and report.md.

Sections (each drawn from the run dir's own records, so a report of a stopped run shows how far it got):
  * status: where the run stands, why it stopped and what to do;
  * headline: accuracy per phase (base -> Phase 1A -> Phase 1B) per task, with 95% intervals;
  * artifact lineage: each artifact, the stage that made it, its parents and fingerprints, red flags;
  * training loss curves (``train_log.jsonl`` of each training stage);
  * wins / ties / losses against the reference with 95% Wilson intervals, against the expected bands of
    the success criteria (pooled groups such as code = humaneval + mbpp drawn as their own panel);
  * the gates tables; the Phase 1A vs 1B paired comparison; the Phase 1B set (what was mined, what was
    removed and why); the 4-bit incident (when the run reproduced it);
  * red flags and warnings; time and cost per stage.

Plots are matplotlib (Agg backend, no display needed), embedded in the HTML as base64 PNG data URIs:
no external asset, script or font, so the file can be mailed or archived. report.md links the same
PNGs, written beside it in ``report_files/``. Both files are written atomically.

A plain eval run dir (``cogumi eval --out``) gets its own page (accuracy, wins/ties/losses, truncation
against its reference); a plain training output dir (``cogumi train``) gets the adapter's manifest and
the loss curve. The headline shows each phase's truncated rate (generations that hit max_new_tokens).

Failure modes: a directory that is none of the three -> CogumiError saying what each needs; a missing or
unreadable artifact is shown as missing in its section rather than failing the report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from cogumi.errors import CogumiError
from cogumi.io import atomic_write_bytes, atomic_write_text

PHASES = (("base", "validate-base", "base model"), ("1a", "validate-1a", "Phase 1A"), ("1b", "validate-1b", "Phase 1B"))
PHASE_COLORS = {"base": "#9aa5b1", "1a": "#3b82c4", "1b": "#e07b39"}
OUTCOME_COLORS = {"win": "#2e9d5b", "tie": "#8c9bab", "loss": "#d0454c"}
STATUS_COLORS = {"done": "#2e9d5b", "skipped": "#8c9bab", "disabled": "#b8c2cc", "pending": "#b8c2cc",
                 "running": "#3b82c4", "red_flag": "#d0454c", "gate_failed": "#d0454c", "error": "#d0454c",
                 "crashed": "#d0454c", "stopped": "#d0454c", "pass": "#2e9d5b", "fail": "#d0454c",
                 "STOP": "#d0454c", "ok": "#2e9d5b", "unknown": "#8c9bab"}


# ---------------------------------------------------------------------------------------------
# reading the run dir
# ---------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue          # a line cut by a kill
            if isinstance(obj, dict):
                rows.append(obj)
    except OSError:
        pass
    return rows


class Run:
    """A pipeline run dir: summary, stage records and the artifacts they point at."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.summary = _read_json(self.dir / "summary.json")
        if not isinstance(self.summary, dict) or "stages" not in self.summary:
            raise CogumiError(f"{run_dir}: no summary.json with stages here; is this a `cogumi pipeline` run dir "
                              "(or a demo dir)?")
        self.records: dict[str, dict] = {}
        for rec_path in sorted((self.dir / "stages").glob("*/stage.json")):
            rec = _read_json(rec_path)
            if isinstance(rec, dict) and rec.get("name"):
                rec["_dir"] = rec_path.parent
                self.records[rec["name"]] = rec

    def done(self, stage: str) -> bool:
        return (self.records.get(stage) or {}).get("status") == "done"

    def output(self, stage: str, name: str) -> Path | None:
        rec = self.records.get(stage) or {}
        out = (rec.get("outputs") or {}).get(name)
        if not out:
            return None
        p = self.dir / out["path"]
        return p if p.exists() else None

    def json_output(self, stage: str, name: str) -> Any:
        p = self.output(stage, name)
        return _read_json(p) if p else None

    def eval_summary(self, stage: str) -> dict | None:
        return self.json_output(stage, "summary")

    def criteria(self) -> dict[str, dict]:
        """gate stage -> its gate.json (rows with bands)."""
        return {s: g for s in ("gate-1a", "gate-1b") if (g := self.json_output(s, "gate"))}


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titlesize": 10, "figure.dpi": 100})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def wilson(k: int, n: int) -> tuple[float, float] | None:
    if not n:
        return None
    from cogumi.evaluation.stats import wilson_interval
    return tuple(wilson_interval(k, n))


def plot_losses(curves: dict[str, list[dict]]) -> bytes | None:
    curves = {k: v for k, v in curves.items() if any("loss" in r for r in v)}
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.0), squeeze=False)
    for ax, (label, rows) in zip(axes[0], curves.items()):
        pts = sorted((r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))
                     and math.isfinite(r["loss"]))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2.5, lw=1.4,
                color=PHASE_COLORS.get(label.split()[-1].lower(), "#3b82c4"))
        ax.set_title(f"{label}: training loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _groups(run: Run, tasks: list[str]) -> list[tuple[str, list[str]]]:
    """Panels for the outcome plot: each task, then each pooled group a criterion rule uses."""
    groups = [(t, [t]) for t in tasks]
    for gate in run.criteria().values():
        for row in gate.get("rows", []):
            if row.get("metric") == "infra_error_rate":
                continue
            if len(row["tasks"]) > 1 and all(t in tasks for t in row["tasks"]):
                name = "+".join(row["tasks"])
                if name not in [g[0] for g in groups]:
                    groups.append((name, list(row["tasks"])))
    return groups


def _bands(run: Run, group: list[str]) -> dict[str, tuple[float, float, str]]:
    """metric -> (low, high, rule name) of the expected bands (or min/max) for exactly this task group."""
    out = {}
    for gate in run.criteria().values():
        for row in gate.get("rows", []):
            if sorted(row["tasks"]) != sorted(group) or row["kind"] != "criterion":
                continue
            band = row.get("expected") or (row.get("min") if row.get("min") is not None else 0.0,
                                           row.get("max") if row.get("max") is not None else 1.0)
            if row["metric"] == "not_loss_rate":       # not losing >= m is losses <= 1 - m
                out["loss_rate"] = (1 - band[1], 1 - band[0], row["name"])
            else:
                out[row["metric"]] = (band[0], band[1], row["name"])
    return out


def pooled_counts(summary: dict, group: list[str]) -> dict[str, int]:
    tasks = summary.get("tasks") or {}
    out = {"wins": 0, "ties": 0, "losses": 0, "judged": 0, "correct": 0, "checked": 0}
    for t in group:
        e = tasks.get(t) or {}
        for k in ("wins", "ties", "losses", "correct"):
            out[k] += int(e.get(k) or 0)
        out["judged"] += int(e.get("judged") if e.get("judged") is not None else
                             sum(int(e.get(k) or 0) for k in ("wins", "ties", "losses")))
        out["checked"] += int(e.get("checked") if e.get("checked") is not None else e.get("n") or 0)
    return out


def plot_outcomes(run: Run, phases: list[tuple[str, str, dict]]) -> bytes | None:
    """Wins/ties/losses rates with 95% Wilson intervals per phase, against the expected bands."""
    if not phases:
        return None
    tasks = list(dict.fromkeys(t for _, _, s in phases for t in (s.get("tasks") or {})))
    groups = _groups(run, tasks)
    plt = _plt()
    cols = min(len(groups), 4)
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.1 * rows), squeeze=False)
    metrics = (("win_rate", "wins"), ("tie_rate", "ties"), ("loss_rate", "losses"))
    width = 0.8 / len(phases)
    for idx, (gname, group) in enumerate(groups):
        ax = axes[idx // cols][idx % cols]
        bands = _bands(run, group)
        for m_i, (metric, key) in enumerate(metrics):
            if metric in bands:
                lo, hi, rule = bands[metric]
                ax.add_patch(_plt().Rectangle((m_i - 0.45, lo), 0.9, hi - lo, color="#f2c94c", alpha=0.35, lw=0,
                                              zorder=0))
        for p_i, (phase, label, summary) in enumerate(phases):
            c = pooled_counts(summary, group)
            xs, ys, err_lo, err_hi = [], [], [], []
            for m_i, (metric, key) in enumerate(metrics):
                n = c["judged"]
                if not n:
                    continue
                v = c[key] / n
                lo, hi = wilson(c[key], n)
                xs.append(m_i - 0.4 + width * (p_i + 0.5))
                ys.append(v)
                err_lo.append(v - lo)
                err_hi.append(hi - v)
            ax.bar(xs, ys, width=width * 0.92, color=PHASE_COLORS[phase], label=label, zorder=2)
            ax.errorbar(xs, ys, yerr=[err_lo, err_hi], fmt="none", ecolor="#333", elinewidth=0.9, capsize=2.5,
                        zorder=3)
        n_max = max((pooled_counts(s, group)["judged"] for _, _, s in phases), default=0)
        ax.set_title(f"{gname} (n={n_max})")
        ax.set_xticks(range(3), [k for _, k in metrics])
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("share of judged items")
        ax.grid(axis="y", alpha=0.3, zorder=0)
    for idx in range(len(groups), rows * cols):
        axes[idx // cols][idx % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.28 / (3.1 * rows)))
    fig.legend(handles, labels, loc="upper center", ncol=len(phases), frameon=False, bbox_to_anchor=(0.5, 1.0))
    return _png(fig)


def plot_accuracy(phases: list[tuple[str, str, dict]]) -> bytes | None:
    if not phases:
        return None
    tasks = list(dict.fromkeys(t for _, _, s in phases for t in (s.get("tasks") or {})))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.9 * len(tasks) + 2.2, 2.9))
    width = 0.8 / len(phases)
    for p_i, (phase, label, summary) in enumerate(phases):
        xs, ys, lo_e, hi_e = [], [], [], []
        for t_i, t in enumerate(tasks):
            c = pooled_counts(summary, [t])
            if not c["checked"]:
                continue
            v = c["correct"] / c["checked"]
            lo, hi = wilson(c["correct"], c["checked"])
            xs.append(t_i - 0.4 + width * (p_i + 0.5))
            ys.append(v)
            lo_e.append(v - lo)
            hi_e.append(hi - v)
        bars = ax.bar(xs, ys, width=width * 0.92, color=PHASE_COLORS[phase], label=label, zorder=2)
        ax.errorbar(xs, ys, yerr=[lo_e, hi_e], fmt="none", ecolor="#333", elinewidth=0.9, capsize=2.5, zorder=3)
        for b, v in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, 0.02, f"{100 * v:.0f}%", ha="center", va="bottom", fontsize=7,
                    color="white" if v > 0.12 else "#333", zorder=4)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% CI)")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3, zorder=0)
    fig.tight_layout()
    return _png(fig)


def plot_stage_times(stages: list[dict]) -> bytes | None:
    ran = [s for s in stages if s.get("seconds")]
    if not ran:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.28 * len(ran) + 0.9))
    names = [s["name"] for s in ran][::-1]
    secs = [s["seconds"] for s in ran][::-1]
    colors = [STATUS_COLORS.get(s["status"], "#3b82c4") if s["status"] != "done" else "#3b82c4" for s in ran][::-1]
    ax.barh(names, secs, color=colors)
    for y, v in enumerate(secs):
        ax.text(v, y, f" {_fmt_seconds(v)}", va="center", fontsize=7)
    ax.set_xlabel("wall time (s)")
    ax.set_xlim(0, max(secs) * 1.18)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# content
# ---------------------------------------------------------------------------------------------

def _fmt_seconds(s: float) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ci(ci) -> str:
    return "-" if not ci else f"{100 * ci[0]:.0f}-{100 * ci[1]:.0f}%"


def _short(h: str | None, n: int = 16) -> str:
    if not h:
        return "-"
    kind, _, digest = str(h).partition(":")
    return f"{kind}:{digest[:n]}" if digest else str(h)[:n]


def _truncated_cell(entry: dict) -> str:
    rate, ref = entry.get("truncated_rate"), entry.get("reference_truncated_rate")
    if rate is None:
        return "-"
    return f"{_pct(rate)} ({entry.get('truncated', '?')})" + (f" [ref {_pct(ref)}]" if ref is not None else "")


def phase_summaries(run: Run) -> list[tuple[str, str, dict]]:
    out = []
    for phase, stage, label in PHASES:
        s = run.eval_summary(stage) if run.done(stage) else None
        if s:
            out.append((phase, label, s))
    return out


LINEAGE_OUTPUTS = ("adapter", "merged", "results", "gate", "phase1b_set", "train_data", "compare", "incident")


def lineage_rows(run: Run) -> list[dict]:
    """Each artifact that carries the lineage (models, eval results, verdicts, training sets): the stage that made
    it, its hash, its parents with their fingerprints, its red flags. Side files (logs, summaries) are left out."""
    from cogumi.lineage import MANIFEST_NAME
    rows = []
    seen_base = set()
    for name, rec in sorted(run.records.items(), key=lambda kv: kv[1].get("index", 0)):
        for out_name, out in (rec.get("outputs") or {}).items():
            if out_name not in LINEAGE_OUTPUTS:
                continue
            path = run.dir / out["path"]
            man = _read_json(path / MANIFEST_NAME) if path.is_dir() else None
            row = {"artifact": f"{name}/{out_name}", "path": out["path"], "hash": out.get("hash"),
                   "kind": (man or {}).get("kind") or ("file" if path.is_file() else "dir"),
                   "parents": [], "red_flags": [], "exists": path.exists()}
            if man:
                for pname, p in (man.get("parents") or {}).items():
                    if isinstance(p, dict):
                        row["parents"].append(f"{pname}: {p.get('id') or p.get('path') or '-'} "
                                              f"[{_short(p.get('fingerprint'))}]")
                base = man.get("base") or {}
                if base.get("id") and base.get("id") not in seen_base and not (man.get("parents") or {}).get("base"):
                    row["parents"].append(f"base: {base['id']} [{_short(base.get('fingerprint'))}]")
                for f in man.get("red_flags") or []:
                    row["red_flags"].append(f.get("message", str(f)) if isinstance(f, dict) else str(f))
                if man.get("forced"):
                    row["red_flags"].append("merged with --force (a red flag was overridden)")
                if man.get("quantized_base_override_used"):
                    row["red_flags"].append("trained on a quantized base (allow_quantized_base override)")
            else:
                for up, info in ((rec.get("inputs") or {}).get("upstream") or {}).items():
                    for o, h in ((info or {}).get("outputs") or {}).items():
                        if o in LINEAGE_OUTPUTS:
                            row["parents"].append(f"{up}/{o} [{_short(h)}]")
            rows.append(row)
    return rows


def red_flags_and_warnings(run: Run) -> tuple[list[str], list[str]]:
    reds, warns = [], []
    for name, rec in sorted(run.records.items(), key=lambda kv: kv[1].get("index", 0)):
        for f in rec.get("findings") or []:
            if not isinstance(f, dict):
                continue
            line = f"{name}: {f.get('message', '')}" + (f" -> {f['fix']}" if f.get("fix") else "")
            if f.get("level") == "red":
                reds.append(line)
            elif f.get("level") == "warn":
                warns.append(line)
        if rec.get("status") in ("red_flag", "gate_failed", "error", "crashed"):
            reds.append(f"{name} stopped the run: {rec.get('reason', '')}")
        for w in (rec.get("metrics") or {}).get("warnings") or []:
            warns.append(f"{name}: {w}")
    return list(dict.fromkeys(reds)), list(dict.fromkeys(warns))


def loss_curves(run: Run) -> dict[str, list[dict]]:
    out = {}
    for stage, label in (("train-1a", "Phase 1A"), ("train-1b", "Phase 1B")):
        p = run.output(stage, "train_log")
        if p is None:
            p = (run.records.get(stage) or {}).get("_dir")
            p = p / "run" / "train_log.jsonl" if p else None
        if p and Path(p).exists():
            out[label] = _read_jsonl(p)
    return out


# ---------------------------------------------------------------------------------------------
# HTML / Markdown building
# ---------------------------------------------------------------------------------------------

class Doc:
    """Builds the same report as HTML and Markdown at once."""

    def __init__(self):
        self.html: list[str] = []
        self.md: list[str] = []
        self.images: dict[str, bytes] = {}

    def h(self, level: int, text: str, anchor: str | None = None):
        aid = f' id="{anchor}"' if anchor else ""
        self.html.append(f"<h{level}{aid}>{html.escape(text)}</h{level}>")
        self.md.append(f"\n{'#' * level} {text}\n")

    def p(self, text: str, cls: str = ""):
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{html.escape(text)}</p>")
        self.md.append(f"{text}\n")

    def raw(self, html_text: str, md_text: str = ""):
        self.html.append(html_text)
        if md_text:
            self.md.append(md_text)

    def bullets(self, items: list[str], cls: str = ""):
        if not items:
            return
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<ul{c}>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
        self.md.append("\n".join(f"- {i}" for i in items) + "\n")

    def table(self, header: list[str], rows: list[list[Any]], *, status_col: int | None = None, num_cols=()):
        th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = []
        for r in rows:
            cells = []
            for i, v in enumerate(r):
                text = "" if v is None else str(v)
                cls = []
                if i in num_cols:
                    cls.append("num")
                if i == status_col:
                    color = STATUS_COLORS.get(text.split()[0] if text else "", "#555")
                    cells.append(f'<td><span class="badge" style="background:{color}">{html.escape(text)}</span></td>')
                    continue
                cells.append(f'<td class="{" ".join(cls)}">{html.escape(text)}</td>' if cls else
                             f"<td>{html.escape(text)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        self.html.append(f'<div class="tablewrap"><table><thead><tr>{th}</tr></thead><tbody>{"".join(body)}'
                         "</tbody></table></div>")
        esc = lambda v: ("" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        self.md.append("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" +
                       "\n".join("| " + " | ".join(esc(v) for v in r) + " |" for r in rows) + "\n")

    def image(self, name: str, png: bytes | None, alt: str):
        if png is None:
            self.p(f"({alt}: no data)", "muted")
            return
        self.images[name] = png
        b64 = base64.b64encode(png).decode("ascii")
        self.html.append(f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></figure>')
        self.md.append(f"![{alt}](report_files/{name})\n")


CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 color:#1f2933;background:#f5f7fa;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 32px 64px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:32px 0 8px;padding-top:8px;border-top:1px solid #e4e7eb}
h3{font-size:15px;margin:18px 0 6px}
p{margin:6px 0} .muted{color:#7b8794;font-size:13px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px;width:100%}
th,td{border-bottom:1px solid #e4e7eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f4f8;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.tablewrap{overflow-x:auto}
.badge{color:#fff;border-radius:3px;padding:1px 6px;font-size:11.5px;white-space:nowrap}
.banner{border-radius:6px;padding:10px 14px;margin:12px 0;color:#fff;font-weight:600}
.banner small{display:block;font-weight:400;margin-top:4px;white-space:pre-wrap}
figure{margin:8px 0} img{max-width:100%;height:auto}
ul.red li{color:#b42318;font-size:13.5px} ul.warn li{color:#8a6100;font-size:12.5px}
.chain{display:flex;flex-wrap:wrap;align-items:center;gap:6px;margin:8px 0 12px}
.node{border:2px solid #3b82c4;border-radius:6px;padding:4px 8px;font-size:12px;background:#f5f9fd}
.node.red{border-color:#d0454c;background:#fdf2f2} .node b{display:block;font-size:12.5px}
.arrow{color:#7b8794;font-size:18px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
nav a{margin-right:10px;font-size:13px}
"""


def _status_banner(doc: Doc, run: Run):
    s = run.summary
    status = s.get("status", "?")
    color = {"done": "#2e9d5b", "running": "#3b82c4"}.get(status, "#d0454c")
    text = {"done": "Run complete", "running": "Run in progress (or interrupted: resume with --resume)",
            "stopped": f"Run STOPPED at stage {s.get('stopped_at')}"}.get(status, status)
    extra = ""
    if status == "stopped":
        extra = f"{s.get('reason', '')}\nWhat to do: {s.get('fix', '')}"
    doc.raw(f'<div class="banner" style="background:{color}">{html.escape(text)}'
            + (f"<small>{html.escape(extra)}</small>" if extra else "") + "</div>",
            f"**{text}**" + (f"\n\n```\n{extra}\n```" if extra else "") + "\n")


def _headline(doc: Doc, run: Run, phases):
    doc.h(2, "Headline: accuracy per phase", "headline")
    if not phases:
        doc.p("No validation finished yet.", "muted")
        return
    tasks = list(dict.fromkeys(t for _, _, s in phases for t in (s.get("tasks") or {})))
    header = ["task"] + [f"{label} accuracy (95% CI)" for _, label, _ in phases] + \
             [f"{label} W/T/L" for _, label, _ in phases] + [f"{label} truncated" for _, label, _ in phases]
    rows = []
    for t in tasks:
        row = [t]
        for _, _, s in phases:
            e = (s.get("tasks") or {}).get(t) or {}
            row.append(f"{_pct(e.get('accuracy'))} ({_ci(e.get('accuracy_ci'))}) n={e.get('n', '-')}")
        for _, _, s in phases:
            e = (s.get("tasks") or {}).get(t) or {}
            row.append(f"{e.get('wins', '-')}/{e.get('ties', '-')}/{e.get('losses', '-')}")
        for _, _, s in phases:
            row.append(_truncated_cell((s.get("tasks") or {}).get(t) or {}))
        rows.append(row)
    doc.table(header, rows)
    doc.p("Truncated: generations that hit max_new_tokens without finishing (a model that loops); the "
          "reference's rate in brackets. A model that loops on many more items than the base is broken.", "muted")
    ref = phases[-1][2].get("reference")
    doc.p(f"Reference: {ref}. W/T/L = wins / ties / losses against the reference (exact judge: both "
          "answers checked objectively).", "muted")
    doc.image("accuracy.png", plot_accuracy(phases), "accuracy per task and phase with 95% intervals")


def _lineage(doc: Doc, run: Run):
    doc.h(2, "Artifact lineage", "lineage")
    chain = [("base", None), ("train-1a", "adapter"), ("merge-1a", "merged"), ("train-1b", "adapter"),
             ("merge-1b", "merged")]
    nodes = []
    from cogumi.lineage import MANIFEST_NAME
    first_adapter = run.output("train-1a", "adapter")
    base_man = (_read_json(first_adapter / MANIFEST_NAME) or {}).get("base", {}) if first_adapter else {}
    for stage, out in chain:
        if stage == "base":
            if base_man:
                nodes.append(("base model", base_man.get("id") or "-", base_man.get("fingerprint"),
                              bool(base_man.get("quantized"))))
            continue
        rec = run.records.get(stage)
        if not rec or out not in (rec.get("outputs") or {}):
            continue
        p = run.output(stage, out)
        man = (_read_json(p / MANIFEST_NAME) or {}) if p else {}
        red = bool(man.get("red_flags") or man.get("forced") or rec.get("status") != "done")
        nodes.append((f"{stage}/{out}", rec["outputs"][out]["path"], rec["outputs"][out]["hash"], red))
    if nodes:
        parts = []
        for i, (title, sub, fp, red) in enumerate(nodes):
            if i:
                parts.append('<span class="arrow">&rarr;</span>')
            parts.append(f'<div class="node{" red" if red else ""}"><b>{html.escape(title)}</b>'
                         f"<code>{html.escape(_short(fp, 12))}</code></div>")
        doc.raw('<div class="chain">' + "".join(parts) + "</div>",
                " -> ".join(f"{t} [{_short(fp, 12)}]" for t, _, fp, _ in nodes) + "\n")
    rows = [[r["artifact"], r["kind"], _short(r["hash"], 20), "; ".join(r["parents"]) or "-",
             "; ".join(r["red_flags"]) or "none"] for r in lineage_rows(run)]
    doc.table(["artifact", "kind", "fingerprint / hash", "parents (fingerprints)", "red flags"], rows)


def _training(doc: Doc, run: Run):
    doc.h(2, "Training", "training")
    curves = loss_curves(run)
    rows = []
    for stage, label in (("train-1a", "Phase 1A"), ("train-1b", "Phase 1B")):
        rec = run.records.get(stage)
        if not rec:
            continue
        m = rec.get("metrics") or {}
        losses = m.get("losses") or {}
        rows.append([label, rec.get("status"), m.get("base_model", "-"), m.get("rows", "-"), m.get("steps", "-"),
                     m.get("tokens_seen", "-"),
                     f"{losses.get('first', float('nan')):.3f} -> {losses.get('last', float('nan')):.3f}"
                     if losses.get("first") is not None else "-", _fmt_seconds(rec.get("seconds"))])
    if rows:
        doc.table(["phase", "status", "base", "rows", "steps", "tokens", "loss first -> last", "time"], rows,
                  status_col=1)
    doc.image("loss.png", plot_losses(curves), "training loss curves")


def _outcomes(doc: Doc, run: Run, phases):
    doc.h(2, "Wins / ties / losses against the reference", "outcomes")
    doc.p("Bars: share of judged items per phase, whiskers: 95% Wilson intervals; shaded: the expected band "
          "of the success criteria for that task or pooled group.", "muted")
    doc.image("outcomes.png", plot_outcomes(run, phases), "wins ties losses with 95% intervals against the bands")


def _gates(doc: Doc, run: Run):
    doc.h(2, "Gates", "gates")
    gates = run.criteria()
    if not gates:
        doc.p("No gate has run yet.", "muted")
        return
    for stage, g in gates.items():
        verdict = "PASS" if g.get("passed") else ("STOP (red flag)" if g.get("red_flags") else "FAIL")
        doc.h(3, f"{stage}: {g.get('name', '')} -- {verdict}")
        rows = []
        for r in g.get("rows", []):
            needs = " ".join(x for x in ((f">={_pct(r['min'])}" if r.get("min") is not None else ""),
                                         (f"<={_pct(r['max'])}" if r.get("max") is not None else "")) if x)
            band = f"{_pct(r['expected'][0])}-{_pct(r['expected'][1])}" if r.get("expected") else "-"
            rows.append([("red flag: " if r["kind"] == "red_flag" else "") + r["name"], "+".join(r["tasks"]),
                         r["metric"], _pct(r.get("value")), _ci(r.get("ci")), r.get("n"), needs, band,
                         r.get("status"), r.get("reason") or ""])
        doc.table(["rule", "tasks", "metric", "value", "95% CI", "n", "needs", "expected", "status", "why"], rows,
                  status_col=8, num_cols=(3, 5))
        if g.get("regression"):
            doc.bullets([g["regression"]], "red")
        doc.bullets(g.get("warnings") or [], "warn")


def _comparison(doc: Doc, run: Run):
    doc.h(2, "Phase 1A vs Phase 1B (same items, paired)", "compare")
    comp = run.json_output("compare-1a-1b", "compare")
    if not comp:
        doc.p("Phase 1B has not been validated (yet).", "muted")
        return
    rows = []
    for name, r in list((comp.get("tasks") or {}).items()) + [("overall", comp.get("overall") or {})]:
        n = r.get("paired") or 0
        pct = lambda k: f"{k} ({100 * k / n:.0f}%)" if n else "-"  # noqa: E731
        rows.append([name, n, pct(r.get("a_correct", 0)), pct(r.get("b_correct", 0)), r.get("a_only_right"),
                     r.get("b_only_right"), f"{r.get('p_value', 1):.3g}",
                     ", ".join(f"{k} {v}" for k, v in sorted((r.get("outcome_moves") or {}).items())) or "-"])
    doc.table(["task", "paired items", "1A right", "1B right", "only 1A right", "only 1B right",
               "p (exact McNemar)", "outcome moves (1A -> 1B)"], rows, num_cols=(1,))
    if comp.get("base_vs_1a"):
        o = comp["base_vs_1a"]["overall"]
        doc.p(f"Base -> Phase 1A on the same items: {o.get('a_correct')} -> {o.get('b_correct')} right of "
              f"{o.get('paired')} (p={o.get('p_value', 1):.3g}).")


def _phase1b_set(doc: Doc, run: Run):
    doc.h(2, "Phase 1B training set", "phase1b")
    stats = run.json_output("failures-1a", "stats")
    if not stats:
        doc.p("Not mined (yet).", "muted")
        return
    doc.table(["mined rows", "losses / candidates", "written", "infrastructure failures excluded", "duplicates",
               "removed by decontamination", "targets"],
              [[stats.get("rows"), stats.get("candidates"), stats.get("written"), stats.get("infra_excluded"),
                stats.get("duplicates"), len(stats.get("contaminated") or []),
                ", ".join(f"{k}: {v}" for k, v in sorted((stats.get("targets") or {}).items()))]], num_cols=(0, 1, 2))
    doc.p(f"Only items the Phase 1A model lost (never ties{'; both-wrong ties included' if stats.get('include_both_wrong') else ''}"
          f"), checked against {stats.get('gate_items')} gate item(s) by id and {stats.get('ngram')}-gram overlap >= "
          f"{stats.get('overlap')}. Outcomes of the mined items: "
          + ", ".join(f"{k} {v}" for k, v in sorted((stats.get("outcomes") or {}).items())), "muted")
    removed = stats.get("contaminated") or []
    if removed:
        doc.table(["removed item", "matched gate item", "by", "overlap"],
                  [[f"{c['task']}/{c['task_id']}", f"{c['gate_task']}/{c['gate_task_id']}", c["by"],
                    c.get("overlap") if c.get("overlap") is not None else "-"] for c in removed[:12]])
        if len(removed) > 12:
            doc.p(f"... and {len(removed) - 12} more (stages/10-failures-1a/stats.json lists them all).", "muted")


def _incident(doc: Doc, run: Run):
    data = run.json_output("incident", "incident")
    if not data:
        return
    doc.h(2, "The 4-bit incident, reproduced", "incident")
    doc.p("A LoRA trained on an NF4 (4-bit) copy of the base and merged naively into the bf16 weights -- the setup "
          "that corrupted the user's model -- next to the alternatives, scored on the same held-out rows, each "
          "checked by `cogumi verify`:")
    table = data.get("table") or []
    if table and isinstance(table[0], dict):
        doc.table(["model", "held-out loss", "token accuracy", "cogumi verify"],
                  [[r.get("model"), _fmt_value(r.get("loss")),
                    _pct(r["token_accuracy"]) if isinstance(r.get("token_accuracy"), (int, float)) else "-",
                    r.get("verify")] for r in table], num_cols=(1, 2))
    reds = [line for v in (data.get("verify") or {}).values() if isinstance(v, dict) for line in v.get("red_flags") or []]
    doc.bullets(reds[:4], "red")
    auto = data.get("auto") or {}
    if isinstance(auto.get("original"), dict) and isinstance(auto.get("dequantized"), dict):
        doc.p(f"merge --target auto measured both targets on held-out rows: original loss "
              f"{auto['original'].get('loss', float('nan')):.3f}, dequantized loss "
              f"{auto['dequantized'].get('loss', float('nan')):.3f}; kept '{auto.get('chosen', '?')}'.", "muted")


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)[:200]
    return "" if v is None else str(v)


def _flags(doc: Doc, run: Run):
    doc.h(2, "Red flags and warnings", "flags")
    reds, warns = red_flags_and_warnings(run)
    if reds:
        doc.bullets(reds, "red")
    else:
        doc.p("No red flag.")
    if warns:
        doc.h(3, "Warnings")
        doc.bullets(warns, "warn")
    if run.criteria():
        doc.p("The gates' own warnings (sample size, thresholds inside intervals) are listed under Gates.", "muted")


def _time_cost(doc: Doc, run: Run):
    doc.h(2, "Time and cost per stage", "time")
    s = run.summary
    rows = []
    for st in s["stages"]:
        peak = st.get("peak_rss_gib")
        rows.append([f"{st.get('index', 0):02d} {st['name']}", st["status"] + (" (reused)" if st.get("reused") else ""),
                     _fmt_seconds(st.get("seconds")), f"${st.get('cost_usd', 0):.4f}",
                     "-" if peak is None else f"{peak:.2f} GiB", st.get("reason", "")[:160]])
    rows.append(["total", s.get("status"), _fmt_seconds(s.get("total_seconds")), f"${s.get('total_cost_usd', 0):.4f}",
                 "", ""])
    doc.table(["stage", "status", "time", "cost", "peak RSS", "note"], rows, status_col=1)
    rate = s.get("gpu_hourly_usd")
    doc.p(f"Cost = wall time of GPU stages x {'$%.2f/h' % rate if rate is not None else 'the GPU price'}"
          " (plus API usage where the eval recorded it). Reused stages show the time they took when they ran. "
          "Peak RSS: the process's resident memory at its highest during that stage (what was already resident "
          "when it began included).", "muted")
    doc.image("stage_times.png", plot_stage_times(s["stages"]), "wall time per stage")


def build(run: Run) -> Doc:
    doc = Doc()
    s = run.summary
    title = f"cogumi run report: {s.get('name') or run.dir.name}"
    doc.h(1, title)
    doc.p(f"{s.get('description') or ''} Plan: {s.get('plan', '-')}. Run dir: {run.dir}. Updated {s.get('updated', '-')}.",
          "muted")
    doc.raw('<nav>' + "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("headline", "headline"), ("lineage", "lineage"), ("training", "training"), ("outcomes", "wins/ties/losses"),
        ("gates", "gates"), ("compare", "1A vs 1B"), ("phase1b", "Phase 1B set"), ("incident", "incident"),
        ("flags", "red flags"), ("time", "time & cost"))) + "</nav>")
    _status_banner(doc, run)
    phases = phase_summaries(run)
    _headline(doc, run, phases)
    _lineage(doc, run)
    _training(doc, run)
    _outcomes(doc, run, phases)
    _gates(doc, run)
    _comparison(doc, run)
    _phase1b_set(doc, run)
    _incident(doc, run)
    _flags(doc, run)
    _time_cost(doc, run)
    return doc


class PlainDir:
    """A directory that is not a pipeline run: an eval run dir (summary.json with tasks) or a training
    output dir (train_log.jsonl / adapter/). Offers what the section builders read from a ``Run``."""

    def __init__(self, path: Path, kind: str):
        self.dir, self.kind = path, kind
        self.summary: dict = {"name": path.name}
        self.records: dict = {}

    def criteria(self) -> dict:
        return {}


def detect(run_dir: str | Path):
    """A ``Run`` for a pipeline run dir, a ``PlainDir`` for an eval or training dir; else CogumiError."""
    d = Path(run_dir)
    summary = _read_json(d / "summary.json")
    if isinstance(summary, dict) and "stages" in summary:
        return Run(d)
    if isinstance(summary, dict) and isinstance(summary.get("tasks"), dict):
        return PlainDir(d, "eval")
    if (d / "train_log.jsonl").exists() or (d / "adapter" / "adapter_config.json").exists():
        return PlainDir(d, "train")
    raise CogumiError(f"{run_dir}: nothing to report here: expected a `cogumi pipeline` run dir (summary.json with "
                      "stages), an eval run dir (summary.json with tasks) or a `cogumi train` output dir "
                      "(train_log.jsonl, adapter/)")


def build_eval(plain: PlainDir) -> Doc:
    """An eval run dir: per-task accuracy, wins/ties/losses, truncation, against its reference."""
    doc = Doc()
    s = _read_json(plain.dir / "summary.json")
    doc.h(1, f"cogumi eval report: {plain.dir.name}")
    prompt = s.get("prompt") or {}
    doc.p(f"Model {s.get('model', '-')} against reference {s.get('reference') or '(none)'}; judge "
          f"{(s.get('judge') or {}).get('kind', '-')}; prompt set {prompt.get('name', '-')}; finished "
          f"{s.get('finished', '-')}. Eval dir: {plain.dir}.", "muted")
    phases = [("1a", "model", s)]
    _headline(doc, plain, phases)
    if s.get("reference"):
        _outcomes(doc, plain, phases)
    return doc


def build_train(plain: PlainDir) -> Doc:
    """A training output dir: the adapter's manifest (base, steps, tokens, losses, red flags) and the loss curve."""
    doc = Doc()
    from cogumi.lineage import MANIFEST_NAME
    man = _read_json(plain.dir / "adapter" / MANIFEST_NAME) or {}
    doc.h(1, f"cogumi training report: {plain.dir.name}")
    base = man.get("base") or {}
    if man:
        losses = man.get("losses") or {}
        doc.table(["base", "phase", "steps", "tokens", "loss first -> last", "time", "global batch"],
                  [[base.get("id", "-"), man.get("phase", "-"), man.get("steps", "-"), man.get("tokens_seen", "-"),
                    f"{losses['first']:.3f} -> {losses['last']:.3f}" if losses.get("first") is not None else "-",
                    _fmt_seconds(man.get("wall_time_s")), man.get("global_batch_size", "-")]])
        reds = [f.get("message", str(f)) for f in man.get("red_flags") or [] if isinstance(f, dict)]
        doc.bullets(reds, "red")
    else:
        doc.p("No finished adapter here yet (adapter/cogumi.json is written when training ends).", "muted")
    doc.image("loss.png", plot_losses({"training": _read_jsonl(plain.dir / "train_log.jsonl")}),
              "training loss curve")
    return doc


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write report.html (self-contained) and report.md (+ report_files/*.png) for a pipeline run dir, an
    eval run dir or a training output dir; returns the HTML path."""
    run = detect(run_dir)
    doc = build(run) if isinstance(run, Run) else build_eval(run) if run.kind == "eval" else build_train(run)
    out = Path(out) if out else run.dir / "report.html"
    if out.suffix != ".html":
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = html.escape(f"cogumi report: {run.summary.get('name') or run.dir.name}")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body><main>{''.join(doc.html)}</main></body></html>\n")
    files = out.parent / "report_files"
    for name, png in doc.images.items():
        atomic_write_bytes(files / name, png)
    atomic_write_text(out.with_suffix(".md"), "\n".join(doc.md))
    atomic_write_text(out, page)
    return out


def report_command(run_dir, *, out=None) -> int:
    path = write_report(run_dir, out)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0
