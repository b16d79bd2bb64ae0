r"""Griffe extension for the documentation site: bayesflow's docstrings, written for ``help()`` and
doctest in Google style with reStructuredText markup, rendered as mkdocs Markdown.

Before mkdocstrings parses a docstring this rewrites, in the text it renders (the source is untouched):

- ``.. math::`` blocks to ``$$ … $$`` (``aligned`` when they contain ``&`` or ``\\``) and
  ``:math:`x``` to ``\(x\)`` (pymdownx.arithmatex, MathJax);
- ``:class:`~bayesflow.engine.SDEState``` and the other Python roles to cross-references: a target is
  resolved as Sphinx does (the object's own scope first, then each enclosing one); a ``bayesflow.…`` target
  that does not exist, or a relative one found nowhere that names no importable module, is a *broken
  reference*, logged as a warning (``mkdocs build --strict`` fails); one that exists links to its rendered
  page where it has one; other targets (``fnmatch``, torch, …) stay code;
- RST simple tables (``=== ===`` borders) to Markdown tables;
- an ``Example:`` section to griffe's ``Examples:`` (doctest code, not an admonition);
- one ``Args:`` entry naming several parameters (``lr, beta, **kwargs: as in config``) to one entry per
  name, so that griffe still checks every documented name against the signature.
"""

from __future__ import annotations

import html
import importlib.util
import re

import griffe

ROLE = re.compile(r":(class|func|mod|meth|attr|data|obj|exc):`(~?)([^`]+)`")
MATH = re.compile(r":math:`([^`]+)`")
MATH_BLOCK = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
BORDER = re.compile(r"^(\s*)=+( +=+)+\s*$")
SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
MULTI = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(\s.*)?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _tables(lines: list[str]) -> list[str]:
    """RST simple tables (border, header, border, rows, border) as Markdown pipe tables."""
    out, i = [], 0
    while i < len(lines):
        match = BORDER.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        border, pad = lines[i], match.group(1)
        starts = [m.start() for m in re.finditer(r"=+", border)]
        rows, borders, j = [], 1, i + 1
        while j < len(lines) and borders < 3:
            if lines[j].strip() == border.strip():
                borders += 1
                rows.append(None)
            elif lines[j].strip():
                rows.append(lines[j])
            j += 1
        cells = []
        for row in rows:
            if row is None:
                continue
            cuts = [0]
            for start in starts[1:]:  # a cell running past its column ends at the next space
                cut = max(start, cuts[-1])
                while 0 < cut < len(row) and row[cut - 1] != " ":
                    cut += 1
                cuts.append(cut)
            bounds = [*cuts[1:], None]
            cells.append([row[a:b].strip().replace("|", r"\|") for a, b in zip(cuts, bounds)])
        if not cells:  # a bare border line: not a table
            out.append(lines[i])
            i += 1
            continue
        header, body = cells[0], cells[1:]
        out += ["", pad + "| " + " | ".join(header) + " |", pad + "|" + "---|" * len(header)]
        out += [pad + "| " + " | ".join(row) + " |" for row in body]
        out.append("")
        i = j
    return out


def _math_blocks(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        match = MATH_BLOCK.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        pad, body, i = match.group(1), [match.group(2)] if match.group(2) else [], i + 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        tex = [line for line in body if line]
        if any("&" in line or r"\\" in line for line in tex):
            tex = [r"\begin{aligned}", *tex, r"\end{aligned}"]
        out += ["", pad + "$$", *(pad + line for line in tex), pad + "$$", ""]
    return out


def _split_params(lines: list[str]) -> list[str]:
    out, section, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        if (match := SECTION.match(line)) is not None:
            section = len(match.group(1))
        elif section is not None and line.strip() and _indent(line) <= section:
            section = None
        match = MULTI.match(line) if section is not None else None
        if match is None or _indent(line) <= section:
            out.append(line)
            i += 1
            continue
        block, i = [], i + 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > _indent(line)):
            block.append(lines[i])
            i += 1
        pad, annotation, rest = match.group(1), match.group(3) or "", match.group(4) or ""
        for name in (name.strip() for name in match.group(2).split(",")):
            out += [f"{pad}{name}{annotation}:{rest}", *block]
    return out


def _lookup(package: griffe.Module, path: str):
    try:
        return package[path[len(package.path) + 1:]] if path.startswith(package.path + ".") else None
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _exists(package: griffe.Module, path: str) -> bool:
    if path == package.path or _lookup(package, path) is not None:
        return True
    # names griffe does not see as members (``A, B = 1, 2``) but that a module's ``__all__`` exports
    parent, _, name = path.rpartition(".")
    module = package if parent == package.path else _lookup(package, parent)
    return module is not None and not module.is_alias and module.is_module and name in (module.exports or ())


def _resolve(obj: griffe.Object, target: str) -> str | None:
    package, target = obj.package, target.lstrip(".")
    if target == package.path or target.startswith(package.path + "."):
        return target if _exists(package, target) else None
    scope = obj
    while scope is not None:
        if _exists(package, f"{scope.path}.{target}"):
            return f"{scope.path}.{target}"
        scope = scope.parent
    return None


def _roles(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match) -> str:
        short, target = match.group(2), match.group(3).strip()
        title = html.escape(target.rsplit(".", 1)[-1] if short else target)
        path = _resolve(obj, target)
        if path is None:
            top = target.split(".")[0]
            if top == obj.package.path or importlib.util.find_spec(top) is None:
                griffe.logger.warning(f"{obj.relative_filepath}:{obj.lineno}: broken reference {match.group(0)}")
            return f"<code>{title}</code>"
        return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'

    return ROLE.sub(link, text)


def convert(obj: griffe.Object, text: str) -> str:
    """``text`` (a docstring of ``obj``) in the site's Markdown."""
    lines = _split_params(_math_blocks(_tables(text.split("\n"))))
    text = EXAMPLE.sub(r"\1Examples:", "\n".join(lines))
    text = MATH.sub(lambda m: r"\(" + m.group(1) + r"\)", text)
    return _roles(obj, text)


class RstDocstrings(griffe.Extension):
    """Rewrites every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:
                obj.docstring.value = convert(obj, obj.docstring.value)
            stack += [member for member in obj.members.values() if not member.is_alias]
