"""The README against the code: what a site or an engineer copies from it must exist as written.

Checked without services or training: every `TRIAGE_*` name and default of the configuration tables is the
settings' own, every flag a command in the README passes is one its parser takes, and every file the
README links to or names under results/, benchmarks/results/ or deploy/ is in the repository. A renamed
setting, a changed default, a dropped flag or a moved result file otherwise leaves the README telling
users to do something that is silently ignored (a misspelt variable) or refused.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from dicom_gateway.config import GatewaySettings
from worker.config import COMPOSE_ONLY_VARIABLES, WorkerSettings, setting_names

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SETTINGS = (WorkerSettings, GatewaySettings)
KNOWN = setting_names(WorkerSettings) | setting_names(GatewaySettings)
DELIBERATE_MISSPELLINGS = {"TRIAGE_MISSING_TAGS_POLICY"}
"""The README's example of the warning a misspelt name gets."""


def config_rows() -> list[tuple[list[str], list[str]]]:
    """(names, defaults) of each `| `TRIAGE_...` | default | meaning |` row; `/ `_X`` shorthands expanded."""
    rows = []
    for line in README.splitlines():
        if not line.startswith("| `TRIAGE_"):
            continue
        name_cell, default_cell = [cell.strip() for cell in line.strip("|").split("|")[:2]]
        names = re.findall(r"`([A-Z0-9_]+)`", name_cell)
        prefix = "TRIAGE_GATEWAY" if names[0].startswith("TRIAGE_GATEWAY_") else "TRIAGE"
        names = [name if name.startswith("TRIAGE_") else prefix + name for name in names]
        defaults = [d.strip() for d in default_cell.split(" / ")] if len(names) > 1 else [default_cell]
        rows.append((names, defaults))
    return rows


def test_every_triage_variable_the_readme_names_is_read_by_a_service():
    """A name the README gives that no setting reads is dropped by pydantic-settings (with only a warning)."""
    named = set(re.findall(r"\bTRIAGE_[A-Z0-9_]*[A-Z0-9]\b", README))
    unread = sorted(named - KNOWN - COMPOSE_ONLY_VARIABLES - DELIBERATE_MISSPELLINGS)
    assert unread == [], f"README names settings that no service reads: {unread}"
    for name in DELIBERATE_MISSPELLINGS:  # the example stays a misspelling, or it would document a real name
        assert name not in KNOWN


def test_every_setting_has_a_row_in_a_readme_configuration_table():
    documented = {name for names, _ in config_rows() for name in names}
    assert sorted(KNOWN - documented) == [], "settings missing from the README's configuration tables"


def _default(settings_class, field: str):
    info = settings_class.model_fields[field]
    return info.default_factory() if info.default_factory is not None else info.default


def _same(readme: str, code) -> bool:
    text = readme.replace("`", "").strip()
    if text.startswith(("unset", "empty")):
        return code is None or code == []
    if text.startswith("packaged"):  # TRIAGE_MODEL_PATH: None = the packaged model
        return code is None
    if isinstance(code, bool):
        return text.lower() == str(code).lower()
    if isinstance(code, (int, float)):
        return float(text) == float(code)
    if isinstance(code, dict):
        return json.loads(text) == code
    return text == str(code)


@pytest.mark.parametrize("names,defaults", config_rows(), ids=lambda v: v[0] if isinstance(v, list) else None)
def test_the_readme_tables_give_each_setting_its_code_default(names, defaults):
    if len(defaults) == 1:  # `TRIAGE_GATEWAY_TLS_CERT` / `_TLS_KEY` | unset: one default for both
        defaults = defaults * len(names)
    assert len(defaults) == len(names), f"{names}: one default per variable, or one for all ({defaults})"
    for name, default in zip(names, defaults):
        field = name.removeprefix("TRIAGE_").lower()
        classes = [cls for cls in SETTINGS if field in cls.model_fields]
        assert classes, f"{name} is no setting"
        for cls in classes:
            code = _default(cls, field)
            assert _same(default, code), f"{name}: README says {default!r}, {cls.__name__} defaults to {code!r}"


def test_every_triage_name_in_deploy_is_read_by_a_service_commented_examples_included():
    """A site uncomments the examples in triage.env as they are; a misspelt one would be ignored."""
    found = {}
    for path in sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        for name in re.findall(r"\bTRIAGE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
            found.setdefault(name, path.relative_to(ROOT).as_posix())
    unread = {name: where for name, where in found.items() if name not in KNOWN | COMPOSE_ONLY_VARIABLES}
    assert unread == {}, f"names in deploy/ that no service reads: {unread}"


# --- commands -------------------------------------------------------------------------------------------

ENTRY_POINTS = {"pneumonia-train": "training.cli", "pneumonia-worker": "worker.cli", "pneumonia-admin": "worker.admin",
                "dicom-gateway": "dicom_gateway.cli"}
COMMAND = re.compile(r"(pneumonia-train|pneumonia-worker|pneumonia-admin|dicom-gateway"
                     r"|python (?:benchmarks|results/\w+)/\w+\.py)([^`\n#;&|]*)")
FLAG = re.compile(r"^-{1,2}[a-zA-Z][\w-]*$")


def readme_commands() -> list[tuple[str, list[str]]]:
    text = re.sub(r"\\\n\s*", " ", README)  # a shell line continued with a backslash
    return [(match.group(1), match.group(2).split()) for match in COMMAND.finditer(text)]


@lru_cache(maxsize=None)
def entry_point_help(program: str, subcommand: str | None) -> str:
    module = __import__(ENTRY_POINTS[program], fromlist=["main"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main([subcommand, "--help"] if subcommand else ["--help"])
    return out.getvalue()


def subcommands(program: str) -> set[str]:
    return set(re.search(r"\{([\w,-]+)\}", entry_point_help(program, None)).group(1).split(","))


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))


@lru_cache(maxsize=None)
def script_flags(script: str) -> set[str]:
    """The flags a benchmark's parser takes: read from its source, `--help` only when a name is built there."""
    return flags_in(" ".join(re.findall(r"add_argument\(([^)]*)", (ROOT / script).read_text())))


@lru_cache(maxsize=None)
def script_help(script: str) -> set[str]:
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return flags_in(out.stdout)


def used_flags(tokens: list[str]) -> list[str]:
    return [flag for flag in (token.strip("[](),.:;`").split("=")[0] for token in tokens) if FLAG.match(flag)]


@pytest.mark.parametrize("program", sorted(ENTRY_POINTS))
def test_every_flag_a_readme_command_passes_is_taken_by_that_subcommand(program):
    if program == "pneumonia-train":
        pytest.importorskip("torch")  # training.cli imports it (the train extra)
    commands = [tokens for name, tokens in readme_commands() if name == program]
    assert commands, f"the README shows no {program} command"
    unknown = []
    for tokens in commands:
        subcommand = next((t for t in tokens if t in subcommands(program)), None)
        if subcommand is None:  # prose ("`pneumonia-admin` prints ...") or the bare --help
            continue
        known = flags_in(entry_point_help(program, None)) | flags_in(entry_point_help(program, subcommand))
        unknown += [f"{program} {subcommand} {flag}" for flag in used_flags(tokens) if flag not in known]
    assert unknown == [], f"flags the README passes that the parser refuses: {sorted(set(unknown))}"


def test_every_script_the_readme_runs_exists_and_takes_its_flags():
    unknown = []
    for name, tokens in readme_commands():
        if not name.startswith("python "):
            continue
        script = name.removeprefix("python ")
        assert (ROOT / script).is_file(), f"README runs {script}, which is not in the repository"
        for flag in used_flags(tokens):
            if flag not in script_flags(script) and flag not in script_help(script):
                unknown.append(f"{script} {flag}")
    assert unknown == [], f"flags the README passes that the script refuses: {sorted(set(unknown))}"


# --- files ----------------------------------------------------------------------------------------------

NOT_COMMITTED = ("deploy/.env", "deploy/tls/", "benchmarks/out/")
"""Paths the README names that a site or a run makes (ignored by git)."""


def expand(pattern: str) -> list[str]:
    """Shell brace expansion, `{a,b}` and `{1..5}`, as the README writes families of files."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    options = [str(i) for i in range(int(numeric.group(1)), int(numeric.group(2)) + 1)] if numeric else body.split(",")
    return list(itertools.chain.from_iterable(
        expand(pattern[:match.start()] + option + pattern[match.end():]) for option in options))


def readme_paths() -> set[str]:
    links = {link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", README) if "://" not in link}
    named = set(re.findall(r"(?<![\w/.-])((?:results|benchmarks/results|deploy)/[\w./{}*,-]*[\w/}*])", README))
    return {path for path in links | named if path and not path.startswith(NOT_COMMITTED)}


def test_every_file_the_readme_links_or_names_exists():
    missing = []
    for path in sorted(readme_paths()):
        for candidate in expand(path):
            if not (list(ROOT.glob(candidate)) if "*" in candidate else (ROOT / candidate).exists()):
                missing.append(candidate)
    assert missing == [], f"README paths that are not in the repository: {missing}"
