"""A griffe extension: read this project's docstrings as the Google style they are written in.

The docstrings follow Google/Napoleon conventions that griffe's parser reads differently:

- ``Example:`` (Napoleon's singular spelling) would become an admonition whose doctest lines
  render as Markdown; it is read as ``Examples:`` so doctests render as code.
- a doctest block outside any section (after the prose) gets an ``Examples:`` heading.
- ``b1, b2: the decay rates.`` documents several parameters at once (also wrapped over two
  lines); each name gets its own entry with the shared description, so griffe can still
  match every documented name to the signature (``--strict`` keeps catching real drift).
- Sphinx roles (``:class:`X```, ``:func:`f```) lose the role and keep the code span.
- ``# NOTE [name]`` lines (design notes kept in docstrings) would be Markdown headings that
  break the page's outline; they render as bold paragraph starts.

Only the rendered text changes; the library's ``__doc__`` strings are untouched.
"""

from __future__ import annotations

import re
from typing import Any

try:
    from griffe import Extension
    from griffe import Object
except ImportError:  # no docs extra: `normalize` still works (tests/test_docs_api.py uses it)
    Extension = object
    Object = Any

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|math|py:\w+):`")
_NAMES = re.compile(r"^[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+$")
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?|Note|"
                      r"Notes|References|Attributes|Warning|Warnings|See Also):\s*$")


def _split_grouped(lines: list[str]) -> list[str]:
    out: list[str] = []
    i, in_args, item_indent = 0, False, None
    while i < len(lines):
        line = lines[i]
        head = _SECTION.match(line)
        if head:
            in_args = head.group(1) in ("Args", "Arguments", "Parameters")
            item_indent = None
            out.append(line)
            i += 1
            continue
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if in_args and stripped and item_indent is None:
            item_indent = indent
        if in_args and stripped and indent == item_indent:
            # a name list wrapped onto the next line: "a, b, c,\n  d, e: text"
            if stripped.endswith(",") and ":" not in stripped and i + 1 < len(lines):
                line = line.rstrip() + " " + lines[i + 1].strip()
                i += 1
            name_part, sep, desc = line.strip().partition(":")
            if sep and _NAMES.match(name_part):
                block = [desc]
                while i + 1 < len(lines) and lines[i + 1].strip() and (
                        len(lines[i + 1]) - len(lines[i + 1].lstrip()) > item_indent):
                    i += 1
                    block.append(lines[i])
                for name in (n.strip() for n in name_part.split(",")):
                    out.append(" " * item_indent + name + ":" + block[0])
                    out.extend(block[1:])
                i += 1
                continue
        elif in_args and stripped and item_indent is not None and indent < item_indent:
            in_args = False
        out.append(line)
        i += 1
    return out


def _add_examples_heading(lines: list[str]) -> list[str]:
    if any(_SECTION.match(ln) and ln.strip().startswith("Example") for ln in lines):
        return lines
    for i, line in enumerate(lines):
        # a top-level doctest (no indentation): not inside any section
        if line.startswith(">>>"):
            return [*lines[:i], "Examples:", *("  " + ln if ln else ln for ln in lines[i:])]
    return lines


def normalize(text: str) -> str:
    """The docstring ``text`` as griffe's Google parser expects it (see the module doc)."""
    text = re.sub(r"^(\s*)Example:\s*$", r"\1Examples:", text, flags=re.M)
    text = re.sub(_ROLE.pattern + r"([^`<]*?)\s*<[^`>]*>`", r"`\1`", text)  # :func:`t <x>`
    text = _ROLE.sub("`", text)
    text = re.sub(r"^(\s*)# (NOTE \[[^\]]*\])\s*$", r"\1**\2**", text, flags=re.M)
    lines = _add_examples_heading(_split_grouped(text.split("\n")))
    return "\n".join(lines)


class FpDocstrings(Extension):
    """Normalise every object's docstring once it is loaded (see the module doc)."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            obj.docstring.value = normalize(obj.docstring.value)
