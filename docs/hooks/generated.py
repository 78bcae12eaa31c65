"""MkDocs hook: the documentation's generated parts, made at every build.

A page asks for a generated block with a marker on a line of its own:

    <!-- dreamdeck:params -->                      every parameter, one table per group
    <!-- dreamdeck:actions -->                     every action
    <!-- dreamdeck:cli -->                         `dreamdeck COMMAND --help` for every command
    <!-- dreamdeck:effects -->                     the effects chain, from engine.render.effects
    <!-- dreamdeck:bench-render FILE -->           a benchmark's JSON (docs/data/bench/FILE),
    <!-- dreamdeck:bench-osc FILE [FILE ...] -->     as the bench script wrote it, as a table
    ...                                            (see BENCH_TABLES)

Since the blocks are made from the registry, the CLI and the benchmark files at build time,
no generated page can go stale. What cannot be generated is checked: every parameter path
the prose names in backticks must exist, so `mkdocs build --strict` fails on a renamed
parameter as it fails on a broken link. A page whose example declares parameters of its own
(a plugin's) lists them in its front matter: `example_params: [/scene/invert/amount]`.
The same functions run without MkDocs:

    python3 docs/hooks/generated.py PAGE.md      # print the page with its blocks filled in
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent
ROOT = DOCS.parent
BENCH_DATA = DOCS / "data" / "bench"
HELP_WIDTH = 100

# Under "mkdocs.": a warning here fails `mkdocs build --strict`.
log = logging.getLogger("mkdocs.hooks.dreamdeck")

MARKER = re.compile(r"^<!-- dreamdeck:([a-z-]+)((?: [^ >]+)*) -->$", re.MULTILINE)


class GenerationError(Exception):
    """A marker that names no generator, or a data file that is missing or malformed."""


# ---- reference: parameters, actions, command line ------------------------------------------


def _reference(markdown: str) -> str:
    """Inside a div the stylesheet knows (docs/stylesheets/extra.css: paths stay on one line)."""
    return f'<div class="reference-table" markdown>\n\n{_code_pipes(markdown)}\n\n</div>'


_CODE_SPAN = re.compile(r"`([^`\n]*)`")  # left to right, so backticks pair as Markdown pairs them


def _code_pipes(markdown: str) -> str:
    """Table cells with ``|`` inside code (``scene/select(ref: str\\|int)``) as HTML code.

    engine.paramdoc escapes the pipe so that a row keeps its columns, as GitHub's Markdown
    wants; Python-Markdown keeps the backslash inside a code span, so the site would show
    ``str\\|int``. ``<code>`` with ``&#124;`` shows ``str|int`` and splits no cell.
    """

    def html(match: re.Match) -> str:
        code = match.group(1)
        if "\\|" not in code:
            return match.group(0)
        code = code.replace("\\|", "|").replace("&", "&amp;").replace("<", "&lt;")
        return "<code>" + code.replace("|", "&#124;") + "</code>"

    return _CODE_SPAN.sub(html, markdown)


def params_block() -> str:
    from engine.catalog import build_registry
    from engine.paramdoc import params_markdown

    return _reference(params_markdown(build_registry(), heading="##"))


def actions_block() -> str:
    from engine.paramdoc import actions_markdown

    return _reference(actions_markdown())


def effects_block() -> str:
    from engine.render.effects import EFFECTS

    rows = [
        (f"`{fx.name}`", fx.description, f"`shaders/{fx.shader}`", ", ".join(f"`{p.path}`" for p in fx.all_params()))
        for fx in EFFECTS
    ]
    return "\n".join(_table(("effect", "what it does", "shader", "parameters"), rows))


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:  # argparse has no public way to list subcommands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((name, sub))
                found += [(f"{name} {inner}", p) for inner, p in _subcommands(sub)]
    return found


def _help(parser: argparse.ArgumentParser) -> str:
    # a fixed width, so the page does not depend on the terminal that builds it
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=HELP_WIDTH)
    return parser.format_help().rstrip()


def cli_block() -> str:
    from engine.cli import build_parser

    parser = build_parser()
    parts = ["## dreamdeck", "", "```text", _help(parser), "```"]
    for name, sub in _subcommands(parser):
        parts += ["", f"## dreamdeck {name}", "", "```text", _help(sub), "```"]
    return "\n".join(parts)


# ---- benchmark tables ----------------------------------------------------------------------


def load_bench(name: str) -> dict[str, Any]:
    path = BENCH_DATA / name
    if not path.is_file():
        raise GenerationError(f"no benchmark file docs/data/bench/{name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GenerationError(f"docs/data/bench/{name}: not JSON: {exc}") from None


def _num(value: float | None, digits: int = 1, thousands: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise GenerationError(f"a row of {len(row)} cells under {len(header)} columns: {row}")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return lines


def _caption(reports: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = [""]
    for name, report in reports:
        said = f"Measured on {report['conditions']}" if report.get("conditions") else "Measured"
        said += f" ({report['date']})" if report.get("date") else ""
        command = f" Command: `{report['command']}`." if report.get("command") else ""
        lines.append(f"*{said}.*{command} Data: `docs/data/bench/{name}`.  ")
    lines[-1] = lines[-1].rstrip()
    return lines


def _field(report: dict[str, Any], key: str, name: str) -> Any:
    try:
        return report[key]
    except (KeyError, TypeError):
        raise GenerationError(f"docs/data/bench/{name}: no {key!r}") from None


def bench_render(*names: str) -> str:
    """``dreamdeck bench render --json`` reports: one row per output size and case."""
    reports = [(n, load_bench(n)) for n in names]
    rows = [
        (r["size"], r["case"].replace("+", " + "), _num(r["fps"]), _num(r["p50_ms"], 2), _num(r["p99_ms"], 2))
        for name, report in reports
        for r in _field(report, "results", name)
    ]
    gl = sorted({f"`{report['gl_renderer']}`, OpenGL {report['gl_version']}" for _, report in reports})
    return "\n".join(
        _table(("output", "case", "fps", "p50 ms", "p99 ms"), rows)
        + ["", f"GL renderer: {'; '.join(gl)}."]
        + _caption(reports)
    )


def bench_osc(*names: str) -> str:
    """``scripts/bench_osc.py --json`` reports: with the render loop, then the OSC server alone."""
    reports = [(n, load_bench(n)) for n in names]
    phases = [(report["output_size"], r) for name, report in reports for r in _field(report, "with_render", name)]
    phases += [("OSC alone", r) for _, report in reports for r in report.get("osc_alone", [])]
    rows = []
    for output, r in phases:
        latency = "–" if r["latency_p50_ms"] is None else f"{_num(r['latency_p50_ms'])} / {_num(r['latency_p99_ms'])}"
        rows.append(
            (
                output,
                f"{r['rate']:,}" if r["rate"] else "0 (baseline)",
                _num(r["landed_per_s"], 0, thousands=True) if r["rate"] else "–",
                f"{r['lost']:,}",
                _num(r["fps"]),
                _num(r["longest_frame_ms"]),
                str(r["frames_over_25ms"]),
                latency,
            )
        )
    header = (
        "output",
        "rate/s",
        "landed/s",
        "lost",
        "render fps",
        "longest frame ms",
        "frames > 25 ms",
        "latency p50 / p99 ms",
    )
    return "\n".join(_table(header, rows) + _caption(reports))


def _baselines(r: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A case's diffusers baselines, as (own VAE, same TAESD) records with ``ratio`` in each.

    Runs from before the bench had two baselines have one, ``baseline`` (the model's own VAE)
    with one ``ratio``: it fills the own-VAE column, and the TAESD one stays empty."""
    if "baselines" in r:
        ratios = r.get("ratios") or {}
        return tuple(
            dict(r["baselines"].get(name) or {}, ratio=ratios.get(name))  # type: ignore[return-value]
            for name in ("own_vae", "taesd")
        )
    return (dict(r["baseline"], ratio=r.get("ratio")) if r.get("baseline") else {}), {}


def _against(b: dict[str, Any]) -> str:
    if not b.get("fps"):
        return "–"
    ratio = f", {_num(b['ratio'])}x" if b.get("ratio") else ""
    return f"{_num(b['fps'], 2)} ({_num(b.get('p50_ms'), 0)} ms{ratio})"


def bench_diffusion(*names: str) -> str:
    """``dreamdeck bench diffusion --json`` results, or a ``scripts/bench_diffusion.py`` summary
    (``{"cases": [...]}``): a row per bench case, a line per in-app case; the slow-scene and
    LoRA cases have tables of their own. A backend that fell back is marked FELL BACK."""
    reports = [(n, load_bench(n)) for n in names]
    rows, commands, in_app = [], [], []
    for name, report in reports:
        for r in report.get("cases", [report]):
            case = r.get("case", name)
            if r.get("status") == "failed" or "error" in r:
                rows.append((f"`{case}`", f"failed: {r.get('error')}", "", "", "", "", ""))
                continue
            if r.get("status") == "skipped" or "skipped" in r:
                rows.append((f"`{case}`", f"skipped: {r.get('skipped')}", "", "", "", "", ""))
                continue
            backend = r.get("accel", "?")
            if r.get("fell_back"):
                backend += f" (**FELL BACK** from {r.get('accel_requested')})"
            if r.get("kind") == "inapp":
                ratio = f", {_num(r['ratio'], 2)}x the `{r['compare_to']}` bench" if r.get("ratio") is not None else ""
                in_app.append(
                    f"- `{case}`, the show headless: the realtime scene at "
                    f"{_num(r['scene_fps'])} images/s (cap {_num(r['cap_fps'], 0)}), render "
                    f"{_num(r['render_fps'])} fps, {backend}, {r.get('device', '?')}{ratio}."
                )
                continue
            if "engine" not in r:
                continue
            e = r["engine"]
            own, taesd = _baselines(r)
            where = r.get("gpu_name") or r["device"]
            what = f"{r['arch']} {r['size']}², {r['steps']} step{'s' if r['steps'] > 1 else ''}, {r['dtype']}"
            # the stages as timed: encode / unet / decode before one graph per frame, then upload / diffuse / download
            stages = ", ".join(f"{name} {_num(ms, 0)}" for name, ms in e["stages_ms"].items())
            first = r["startup"]["first_frame_s"]
            rows.append(
                (
                    f"`{case}`",
                    f"{what}, {backend}, {where}",
                    f"{_num(e['fps'], 2)} ({_num(e['p50_ms'], 0)})",
                    stages,
                    _against(own),
                    _against(taesd),
                    f"{_num(first)} s",
                )
            )
            if r.get("command"):
                commands.append(f"- `{case}`: `{r['command']}`")
    header = (
        "case",
        "what, backend, device",
        "hot path fps (p50 ms)",
        "stages ms",
        "diffusers, own VAE: fps (p50, ratio)",
        "diffusers, same TAESD: fps (p50, ratio)",
        "first frame",
    )
    lines = _table(header, rows)
    if in_app:
        lines += ["", "In the show:", "", *in_app]
    if commands:
        lines += ["", "Commands:", "", *commands]
    return "\n".join(lines + _caption(reports))


def bench_slow_scenes(frames: str, ddpm: str, *vqgan_clip: str) -> str:
    """The render loop while a slow scene computes (tests/test_slow_scene_frames.py), DDPM steps
    (scripts/bench_ddpm.py) and CLIP-guided drawing steps per drawer (scripts/bench_vqgan_clip.py
    --json: one file or more)."""
    loop, steps = load_bench(frames), load_bench(ddpm)
    clip_runs = [(name, load_bench(name)) for name in vqgan_clip]
    rows = [
        (
            "render loop from the cut to the DDPM on, while it loads and computes",
            f"{loop['output_size']}, {loop['clock_hz']} Hz clock, {loop['frames']} frames",
            f"longest frame {_num(loop['longest_ms'])} ms, p99 {_num(loop['p99_ms'])} ms "
            f"(limit: 1.5 vsync = {_num(loop['limit_ms'], 0)} ms), {loop['scene_images']} DDPM steps meanwhile",
        )
    ]
    for name, per_second in _field(steps, "results", ddpm).items():
        ms = 1000.0 / per_second
        took = f"{_num(ms)} ms" if ms < 1000 else f"{_num(ms / 1000, 2)} s"
        threads = f"{steps['threads']} thread" + ("s" if steps["threads"] != 1 else "")
        rows.append(
            (
                f"DDPM, {name}",
                f"{steps['device']}, {threads}",
                f"{_num(per_second, 2 if per_second < 1 else 1)} steps/s ({took})",
            )
        )
    for file, vq in clip_runs:
        for r in _field(vq, "results", file):
            drawer = r.get("drawer", "vqgan")  # runs from before the drawers timed the VQGAN only
            name = "VQGAN+CLIP" if drawer == "vqgan" else f"CLIP, {drawer} drawer"
            rows.append(
                (
                    f"{name}, {r['size']}², {r['cutouts']} cutouts (`{file}`)",
                    f"{r.get('setting', vq['vqgan'])} + {vq['clip']}",
                    f"{r['steps_per_second']:.2g} it/s ({_num(r['seconds_per_step'])} s)",
                )
            )
    reports = [(frames, loop), (ddpm, steps), *clip_runs]
    return "\n".join(_table(("what", "setting", "figure"), rows) + _caption(reports))


def bench_lora(name: str) -> str:
    """``scripts/bench_lora.py --json``: weight change, hot-swap and reload on the SD 1.5 UNet."""
    r = load_bench(name)
    call, with_lora = r["unet_call_ms"], r["unet_call_with_lora_ms"]
    rows = [
        ("weight change", f"**{r['weight_change_ms']:.2f} ms**", "< 16.7 ms (one frame at 60 Hz)"),
        (
            "file hot-swap",
            f"**{_num(r['hotswap_total_ms'], 0)} ms**: {_num(r['hotswap_read_ms'], 0)} ms file read "
            f"(background thread) + {_num(r['hotswap_swap_ms'], 0)} ms swap between frames",
            "< 250 ms",
        ),
        (
            "unload + load as a new adapter (for comparison)",
            f"{_num(r['unload_load_ms'], 0)} ms",
            "a compiled graph would rebuild",
        ),
        (
            "one UNet call, without / with the LoRA",
            f"{_num(call / 1000, 2)} s / {_num(with_lora / 1000, 2)} s (+{(with_lora / call - 1) * 100:.0f} %)",
            "",
        ),
    ]
    header = (
        f"LoRA rank {r['rank']}, {r['lora_layers']} layers, {_num(r['lora_file_mb'], 0)} MB file, "
        f"{r['device']} {r['dtype']}",
        "figure",
        "target",
    )
    return "\n".join(_table(header, rows) + _caption([(name, r)]))


GENERATORS: dict[str, Callable[..., str]] = {
    "params": params_block,
    "actions": actions_block,
    "cli": cli_block,
    "effects": effects_block,
    "bench-render": bench_render,
    "bench-osc": bench_osc,
    "bench-diffusion": bench_diffusion,
    "bench-slow-scenes": bench_slow_scenes,
    "bench-lora": bench_lora,
}


def fill(markdown: str, where: str = "page") -> str:
    """The page with every marker replaced by its block; GenerationError names a bad one."""

    def replace(match: re.Match) -> str:
        name, args = match.group(1), match.group(2).split()
        generator = GENERATORS.get(name)
        if generator is None:
            raise GenerationError(f"{where}: unknown marker dreamdeck:{name} (known: {', '.join(GENERATORS)})")
        try:
            return generator(*args)
        except TypeError as exc:
            raise GenerationError(f"{where}: dreamdeck:{name} {' '.join(args)}: {exc}") from None
        except GenerationError as exc:
            raise GenerationError(f"{where}: {exc}") from None

    return MARKER.sub(replace, markdown)


# ---- prose check: the parameter paths a page names exist ---------------------------------

_CODE = re.compile(r"`([^`\n]+)`")
_PATH = re.compile(r"/[\w/<>{},*.-]*")  # up to a space, a query (?VALUE) or a colon


def _pattern(path: str) -> re.Pattern:
    """A path as the prose writes it (``/lfo/<n>/rate``, ``/fx/*/enabled``,
    ``/output/keystone/{tl,tr}_{x,y}``) as a regex."""
    out = ""
    for token in re.split(r"(<[^>]+>|\{[^}]*\}|\*)", path):
        if token.startswith("<"):
            out += r"[^/]+(?:/[^/]+)*" if token == "<path>" else r"[^/]+"
        elif token.startswith("{"):
            out += "(?:" + "|".join(re.escape(t) for t in token[1:-1].split(",")) + ")"
        elif token == "*":
            out += r"[^/]+"
        else:
            out += re.escape(token)
    return re.compile(out + r"\Z")


@functools.lru_cache(maxsize=1)
def _known() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    from engine.catalog import build_registry
    from engine.paramdoc import action_records

    paths = frozenset(p.path for p in build_registry().params())
    groups = frozenset(p.split("/")[1] for p in paths)
    actions = frozenset("/" + r["name"] for r in action_records()) | {"/get"}  # /get: the OSC query
    return paths, groups, actions


def unknown_paths(markdown: str, examples: tuple[str, ...] = ()) -> list[str]:
    """Parameter paths named in backticks (`/fx/kaleido/segments`, `/dreamdeck/norm/...`) that
    neither the registry nor the actions have. ``examples``: paths a page's example declares
    (a plugin's parameters: the registry has them only where the plugin is installed)."""
    paths, groups, actions = _known()
    paths = paths | frozenset(examples)
    unknown = []
    for code in _CODE.findall(markdown):
        found = _PATH.match(code)
        if found is None:
            continue
        word = found.group(0).rstrip(".,")
        osc = word.startswith("/dreamdeck")
        path = word.removeprefix("/dreamdeck").removeprefix("/norm") if osc else word
        if not path.startswith("/") or path.split("/")[1] not in groups | {a.split("/")[1] for a in actions}:
            continue
        if path in ("/norm", "") or path.startswith("/norm<"):
            continue
        pattern = _pattern(path)
        if not any(pattern.match(p) for p in paths | actions):
            unknown.append(word)
    return unknown


# ---- MkDocs ---------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from mkdocs.exceptions import PluginError

    where = page.file.src_uri
    try:
        markdown = fill(markdown, where)
    except GenerationError as exc:
        raise PluginError(str(exc)) from None
    # a page whose example declares parameters says so in its front matter (example_params: [...])
    examples = tuple(str(path) for path in (page.meta or {}).get("example_params", ()))
    for word in unknown_paths(markdown, examples):
        log.warning("%s: `%s` is not a parameter or an action (renamed?)", where, word)
    return markdown


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    for page in sys.argv[1:]:
        print(fill(Path(page).read_text(encoding="utf-8"), page))
