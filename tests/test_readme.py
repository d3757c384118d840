"""The README's commands run as written, and every relative link in the README and docs/ leads somewhere.

Each command line of the README's ```bash blocks is checked on CPU without doing its work:
- `python -m MODULE ...` and `torchrun ... -m MODULE ...`: MODULE exists, `--help` exits 0 (each module once, all
  in one fresh interpreter so that torch is imported once) and names every `--option` the command passes it;
- `python scripts/X.py ...` (or bench/): the same for the file;
- `make TARGET ...`: `make -n TARGET` exits 0;
- `sbatch [flags] slurm/X.sh ...`: the script exists;
- every `configs/*.yaml` argument exists and loads with `trainer.config.load_train_config`, with the command's
  dotted `key=value` overrides applied;
- every argument naming a file of the repository (configs/, slurm/, scripts/, bench/, tests/, docs/) exists.
A command of any other form fails the test: add a rule here before adding it to the README.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
REPO_DIRS = ("configs/", "slurm/", "scripts/", "bench/", "tests/", "docs/")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")  # dotted key=value (not an env VAR=value)
ENV_PREFIX = re.compile(r"^[A-Za-z_]\w*=")
PYTHONS = {"python", "python3"}

# Runs each target as `python -m MODULE --help` / `python FILE --help` would, in one interpreter, and prints
# {target: [exit code or a reason, help text]} as JSON on its last line.
HELP_RUNNER = r"""
import contextlib, importlib.util, io, json, runpy, sys
codes = {}
for kind, target in json.loads(sys.argv[1]):
    out = io.StringIO()
    try:
        if kind == "module":
            spec = importlib.util.find_spec(target)
            if spec is None:
                codes[target] = ["no such module", ""]
                continue
            name = target + ".__main__" if spec.submodule_search_locations is not None else target
            sys.argv = [target, "--help"]
            with contextlib.redirect_stdout(out):
                runpy.run_module(name, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, "--help"]
            with contextlib.redirect_stdout(out):
                runpy.run_path(target, run_name="__main__")
        codes[target] = ["ran to the end instead of stopping at --help", out.getvalue()]
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        codes[target] = [0 if code is None else code, out.getvalue()]
    except BaseException as e:
        codes[target] = [f"raised {type(e).__name__}: {e}", out.getvalue()]
print(json.dumps(codes))
"""


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def command_lines(block: str) -> list[list[str]]:
    """The commands of a bash block as argument lists: continuation lines joined, comments dropped, `&&` and `;`
    split."""
    joined = re.sub(r"\\\n", " ", block)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in [*words, "&&"]:
            if w in ("&&", ";"):
                if cmd:
                    commands.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return commands


def readme_commands() -> list[list[str]]:
    return [c for block in bash_blocks(README.read_text()) for c in command_lines(block)]


def options(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


def plan(commands: list[list[str]]) -> tuple[list[str], dict, set, list[tuple[str, list[str]]], list[str]]:
    """What to check: make targets, --help targets {(kind, target): [(command, its --options)]}, files that must
    exist, configs with their overrides, and the commands no rule covers."""
    targets: list[str] = []
    helps: dict[tuple[str, str], list[tuple[str, list[str]]]] = {}
    files: set[str] = set()
    configs: list[tuple[str, list[str]]] = []
    unknown: list[str] = []
    for cmd in commands:
        text = shlex.join(cmd)
        while cmd and ENV_PREFIX.match(cmd[0]):
            cmd = cmd[1:]
        prog, args = cmd[0], cmd[1:]
        files.update(a for a in args if a.startswith(REPO_DIRS))
        overrides = [a for a in args if OVERRIDE.match(a)]
        configs += [(a, overrides) for a in args if a.startswith("configs/") and a.endswith(".yaml")]
        if prog == "make":
            targets += [a for a in args if not a.startswith("-") and "=" not in a]
        elif prog in PYTHONS and len(args) >= 2 and args[0] == "-m":
            helps.setdefault(("module", args[1]), []).append((text, options(args[2:])))
        elif prog in PYTHONS and args and args[0].endswith(".py"):
            helps.setdefault(("file", args[0]), []).append((text, options(args[1:])))
        elif prog == "torchrun" and "-m" in args:
            i = args.index("-m")
            helps.setdefault(("module", args[i + 1]), []).append((text, options(args[i + 2:])))
        elif prog == "sbatch":
            scripts = [a for a in args if a.endswith(".sh")]
            if not scripts:
                unknown.append(text)
        else:
            unknown.append(text)
    return targets, helps, files, configs, unknown


def test_readme_has_commands_of_every_kind():
    targets, helps, _, configs, unknown = plan(readme_commands())
    assert not unknown, f"README commands no rule of tests/test_readme.py checks: {unknown}"
    assert {"setup", "test", "demo"} <= set(targets), targets
    modules = {t for kind, t in helps if kind == "module"}
    assert {"trainer.train", "evaluation.recon_fid"} <= modules, modules
    assert any(path.startswith("configs/") for path, _ in configs)


def test_readme_commands_run_as_written():
    from trainer.config import load_train_config

    targets, helps, files, configs, _ = plan(readme_commands())
    problems = []
    for f in sorted(files):
        if not (ROOT / f).exists():
            problems.append(f"{f}: no such file")
    for t in dict.fromkeys(targets):
        r = subprocess.run(["make", "-n", t], cwd=ROOT, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            problems.append(f"make {t}: `make -n {t}` exited {r.returncode}: {r.stderr.strip()[-300:]}")
    for path, overrides in configs:
        try:
            load_train_config(ROOT / path, overrides)
        except BaseException as e:  # noqa: BLE001 - a bad config exits (SystemExit) or raises
            problems.append(f"{path} {' '.join(overrides)}: {type(e).__name__}: {e}")
    if helps:
        r = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(sorted(helps))], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        codes = json.loads(r.stdout.strip().splitlines()[-1])
        for (_, target), uses in sorted(helps.items()):
            code, usage = codes[target]
            if code != 0:
                problems.append(f"`{uses[0][0]}`: {target} --help: {code}")
                continue
            for text, opts in uses:
                unknown = [o for o in opts if not re.search(rf"{re.escape(o)}\b", usage)]
                if unknown:
                    problems.append(f"`{text}`: {target} --help names no {', '.join(unknown)}")
    assert not problems, "README commands that would not run as written:\n" + "\n".join(problems)


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (outside code blocks)."""
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_relative_links_lead_to_existing_files_and_headings():
    broken = []
    for md in (README, *DOCS):
        text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target}: no such heading in {dest.name}")
    assert not broken, "\n".join(broken)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) < 200
