"""``vramfit check``: lint preset files, reporting every problem as ``file:line: field: reason``.

Each file is read in stages, each guarding the next: only a regular file of at most
``MAX_YAML_BYTES`` is read; the raw YAML event stream is scanned (``config.scan_yaml``: no anchors
or aliases, bounded nesting, node count and integer length), so billion-laughs documents, deeply
nested ones and 5,000-digit integers are refused before anything is built from them; then the
document is composed (for line numbers) and validated as a ``Preset``; finally its parameter
count is compared with ``published_params``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vramfit.config import MAX_YAML_BYTES, Preset, read_text_bounded, scan_yaml
from vramfit.errors import VramfitError, shorten
from vramfit.presets import count_disagreement

# ``field`` values for problems that are not about one key
FILE, YAML, DOCUMENT = "(file)", "(yaml)", "(document)"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file. ``line`` is 1-based; 0 means the file as a whole."""

    file: Path
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        file = shorten(str(self.file))
        where = f"{file}:{self.line}" if self.line > 0 else file
        return f"{where}: {shorten(self.field, 60)}: {shorten(self.reason)}"


def collect_files(paths: list[Path]) -> list[Path]:
    """The files ``check_paths`` reads: each file as given, and each directory's *.yaml / *.yml
    files (not recursive), sorted."""
    files: list[Path] = []
    for path in paths:
        if _is_dir(path):
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        else:
            files.append(path)
    return files


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long for the file system: read as a file
        return False


def check_paths(paths: list[Path]) -> list[Problem]:
    """Check every file ``collect_files(paths)`` names; also flag a preset name used twice."""
    problems: list[Problem] = []
    for path in paths:
        if _is_dir(path) and not collect_files([path]):
            problems.append(Problem(path, 0, FILE, "a folder with no .yaml or .yml files"))
    seen: dict[str, Path] = {}
    for file in collect_files(paths):
        file_problems, preset, root = _check_file(file)
        problems.extend(file_problems)
        if preset is None:
            continue
        key = preset.name.lower()
        if key in seen:
            line = _line_of(root, ("name",)) if root is not None else 0
            problems.append(
                Problem(file, line, "name", f"duplicate preset name (also {seen[key]})")
            )
        else:
            seen[key] = file
    return problems


def summary_line(n_files: int, problems: list[Problem]) -> str:
    """e.g. ``checked 27 files: all OK`` or ``checked 27 files: 3 problems in 2 files``."""
    checked = f"checked {_plural(n_files, 'file')}"
    if not problems:
        return f"{checked}: all OK"
    n_bad = len({problem.file for problem in problems})
    return f"{checked}: {_plural(len(problems), 'problem')} in {_plural(n_bad, 'file')}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _check_file(file: Path) -> tuple[list[Problem], Preset | None, yaml.Node | None]:
    """Problems in one file, the preset when it validated, and its composed root node."""
    try:
        text = read_text_bounded(file, limit=MAX_YAML_BYTES)
    except VramfitError as err:
        return [Problem(file, 0, FILE, err.message)], None, None

    try:
        unsafe = scan_yaml(text)
        if unsafe is not None:
            line, reason = unsafe
            return [Problem(file, line, YAML, reason)], None, None
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        return (
            [Problem(file, line, YAML, f"invalid YAML: {exc.problem or exc.context}")],
            None,
            None,
        )
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        return [Problem(file, 0, YAML, f"invalid YAML: {type(exc).__name__}")], None, None

    if root is None or data is None:
        return [Problem(file, 0, DOCUMENT, "empty file")], None, None
    if not isinstance(data, dict):
        got = type(data).__name__
        return [Problem(file, _line(root), DOCUMENT, f"expected a mapping, got {got}")], None, None

    try:
        preset = Preset.model_validate(data)
    except ValidationError as err:
        return _validation_problems(file, root, err), None, root

    try:
        disagreement = count_disagreement(preset)
    except (ValidationError, VramfitError) as exc:  # resolving family defaults can still fail
        return [Problem(file, _line_of(root, ("model",)), "model", str(exc))], None, root
    if disagreement is not None:
        line = _line_of(root, ("published_params",))
        return [Problem(file, line, "published_params", disagreement)], preset, root
    return [], preset, root


def _validation_problems(file: Path, root: yaml.Node, err: ValidationError) -> list[Problem]:
    problems = []
    for error in err.errors():
        loc = tuple(error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        field = ".".join(str(part) for part in loc) or DOCUMENT
        problem = Problem(file, _line_of(root, loc), field, message)
        if problem not in problems:
            problems.append(problem)
    return problems


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _line_of(root: yaml.Node, loc: tuple[Any, ...]) -> int:
    """The line of the key at ``loc`` (a pydantic error location); for a key that is absent
    (a missing field), the line of the deepest key that is present."""
    node, line = root, _line(root)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            entry = next((kv for kv in node.value if kv[0].value == str(part)), None)
            if entry is None:
                break
            line, node = _line(entry[0]), entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                break
            node = node.value[part]
            line = _line(node)
        else:
            break
    return line
