"""py-spy profiles of a Pacemaker server: record one under load, then say where its CPU goes, as markdown."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import LOAD_CPU, pin


def record(pid: int, seconds: float, out: Path, load: Callable[[int], object], pinning: bool) -> Path:
    """Record the process with py-spy (raw collapsed stacks, --gil) while load(duration) runs."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy (it is not a project dependency)")
    duration = max(1, round(seconds))
    options = f"record --pid {pid} --duration {duration} --rate 200 --format raw --gil"
    args = [py_spy, *options.split(), "--output", str(out)]
    with (out.parent / "py-spy.log").open("wb") as spy_log:
        spy = subprocess.Popen(args, stdout=spy_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if pinning:
                pin(spy.pid, {LOAD_CPU})
            load(duration)
            spy.wait(timeout=duration + 60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(10)
    if spy.returncode != 0 or not out.is_file():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {(out.parent / 'py-spy.log').read_text()[-2000:]}")
    return out


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> tuple[str, str]:
    """('function', 'module') from py-spy's 'function (path/file.py:line)'."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), "?"
    return match["func"], _module(match["file"])


def _module(path: str) -> str:
    """A frame's module as py-spy names its file: 'app.providers.openai', 'fastapi', 'asyncio', 'threading'."""
    if path.startswith("<frozen"):
        return "stdlib"
    parts = list(Path(path).with_suffix("").parts)
    for i in range(len(parts) - 1, -1, -1):  # absolute paths: keep what follows site-packages or lib/pythonX.Y
        if parts[i] == "site-packages" or re.fullmatch(r"python3\.\d+", parts[i]):
            parts = parts[i + 1 :]
            break
    else:
        if "app" in parts:  # the project, from the work tree
            parts = parts[parts.index("app") :]
    if not parts:
        return "?"
    return ".".join(parts) if parts[0] == "app" else parts[0]


_NO_FRAME = "(no Python frame) (?)"
_ROOTS = ("_run_module_as_main (", "Thread._bootstrap (", _NO_FRAME)


def _stitch(stacks: list[tuple[list[str], int]]) -> tuple[list[tuple[list[str], int]], int]:
    """Complete the stacks py-spy cut short, from whole stacks that pass through their first frame.

    Under asyncio, py-spy often loses a stack's outer frames; the call site (function, file and line)
    where one starts nearly always has a single ancestry in a one-route benchmark, so the most common
    one is prepended. Returns the stacks and how many samples were whole to begin with.
    """
    prefixes: dict[str, Counter[tuple[str, ...]]] = {}
    complete = 0
    for frames, count in stacks:
        if frames[0].startswith(_ROOTS):
            complete += count
            for i, frame in enumerate(frames[1:], 1):
                for key in (frame, _LINE.sub(")", frame)):  # the exact call site, else the function
                    prefixes.setdefault(key, Counter())[tuple(frames[:i])] += count
    stitched = []
    for frames, count in stacks:
        for _ in range(8):  # each step reaches a root or stops; bounded regardless
            if frames[0].startswith(_ROOTS):
                break
            found = prefixes.get(frames[0]) or prefixes.get(_LINE.sub(")", frames[0]))
            if found is None:
                break
            frames = [*found.most_common(1)[0][0], *frames]
        stitched.append((frames, count))
    return stitched, complete


_LINE = re.compile(r":\d+\)$")
_LAYERS = {
    "solve_dependencies", "run_endpoint_function", "run_in_threadpool", "Request.body", "Request.json",
    "serialize_response", "ClientSession._request", "ClientResponse.read", "ClientResponse.start",
    "Response.__call__", "Response.__init__", "request_body_to_args", "Router.__call__",
    "PrometheusInstrumentatorMiddleware._get_handler",
}  # fmt: skip


def _is_layer(func: str, module: str) -> bool:
    """Frames worth an inclusive figure: Pacemaker's own code, every middleware, and framework hot spots."""
    if module.startswith("app.") and module != "app.cli":
        return True
    return func.endswith("Middleware.__call__") or func in _LAYERS


def summarise(raw: Path, top: int = 10) -> str:
    """Self time by function and by module, and inclusive time, as markdown tables."""
    raw_stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if samples.isdigit():
            raw_stacks.append(([f for f in stack.split(";") if f] or [_NO_FRAME], int(samples)))
    stitched, complete = _stitch(raw_stacks)
    stacks = [([_frame_name(f) for f in frames], count) for frames, count in stitched]
    total = sum(count for _, count in stacks)
    if not total:
        return "py-spy recorded no samples.\n"
    self_fn: Counter[tuple[str, str]] = Counter()
    self_mod: Counter[str] = Counter()
    inclusive: Counter[tuple[str, str]] = Counter()
    own: Counter[tuple[str, str]] = Counter()
    for frames, count in stacks:
        layer = next((f for f in reversed(frames) if _is_layer(*f)), ("(outside any layer: server, event loop)", "-"))
        own[layer] += count
        self_fn[frames[-1]] += count
        self_mod[frames[-1][1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def pct(n: int) -> str:
        return f"{100 * n / total:.1f}"

    partial = sum(count for frames, count in stitched if not frames[0].startswith(_ROOTS))
    threads = sum(count for frames, count in stacks if any(f[0] == "Thread._bootstrap" for f in frames))
    lines = [
        f"py-spy --gil: {total} samples taken while Pacemaker held the GIL (its Python CPU time); {pct(threads)} %"
        " of them in threads other than the event loop's (e.g. the thread pool that runs sync dependencies)."
        + (
            f" py-spy cut {pct(total - complete)} % of the stacks short; those were completed from whole stacks"
            f" through the same call site ({pct(partial)} % could not be), so inclusive figures are estimates."
            if complete < total
            else ""
        ),
        "",
    ]
    lines += ["| # | self % | function | module |", "|---:|---:|---|---|"]
    for i, ((func, module), n) in enumerate(self_fn.most_common(top), 1):
        lines.append(f"| {i} | {pct(n)} | `{func}` | {module} |")
    lines += ["", "| self % by module | module |", "|---:|---|"]
    lines += [f"| {pct(n)} | {module} |" for module, n in self_mod.most_common(top + 5)]
    lines += ["", "| own % | layer (each sample charged to the innermost layer on its stack) | module |"]
    lines += ["|---:|---|---|"]
    lines += [f"| {pct(n)} | `{func}` | {module} |" for (func, module), n in own.most_common(top * 2)]
    lines += ["", "| inclusive % | function (Pacemaker's code, middleware, framework hot spots) | module |"]
    lines += ["|---:|---|---|"]
    shown = [(f, n) for f, n in inclusive.most_common() if _is_layer(*f) and n >= 0.01 * total][: top * 3]
    lines += [f"| {pct(n)} | `{func}` | {module} |" for (func, module), n in shown]
    return "\n".join(lines) + "\n"
