"""The documentation stays true: every public name is in the API reference with its real signature,
relative links resolve, and the guide's and the API reference's Python examples run (the API
reference's pasted outputs are what its examples print).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TinyConvNet
from torch import nn

import lgconv
import lgconv.models
from lgconv.layers import CondensedConv2d, LearnedGroupMixin

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SIGNATURE = re.compile(r"`(?:lgconv\.(?:models\.)?)?([A-Za-z_][A-Za-z0-9_]*)\(")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(info string, body)`` of every fenced block, in document order."""
    return [(match.group(1).strip(), match.group(2)) for match in FENCE.finditer(text)]


def public_names() -> dict[str, object]:
    """Every name the reference must cover: ``lgconv.__all__``, ``lgconv.models.__all__``, the presets."""
    names = {name: getattr(lgconv, name) for name in lgconv.__all__}
    names.update({name: getattr(lgconv.models, name) for name in lgconv.models.__all__})
    names.update({name: getattr(lgconv.models, name, None) for name in lgconv.models.list_models()})
    return names


def signature_text(obj: object) -> str:
    """The parameter list as the reference writes it: no annotations, double-quoted strings."""
    parts = []
    keyword_marker = False
    for parameter in inspect.signature(obj).parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            keyword_marker = True
            parts.append(f"*{parameter.name}")
            continue
        if parameter.kind is parameter.VAR_KEYWORD:
            parts.append(f"**{parameter.name}")
            continue
        if parameter.kind is parameter.KEYWORD_ONLY and not keyword_marker:
            keyword_marker = True
            parts.append("*")
        text = parameter.name
        if parameter.default is not parameter.empty:
            text += "=" + repr(parameter.default).replace("'", '"')
        parts.append(text)
    return ", ".join(parts)


def documented_signatures(text: str) -> dict[str, list[str]]:
    """``name -> [parameter list, ...]`` from headings and table rows that open with `name(...)`."""
    found: dict[str, list[str]] = {}
    prose = FENCE.sub("", text)
    for line in prose.splitlines():
        stripped = line.lstrip("#| ").strip()
        if not (line.startswith("#") or line.startswith("|")):
            continue
        match = SIGNATURE.match(stripped)
        if match is None:
            continue
        depth, start = 0, match.end() - 1
        for position in range(start, len(stripped)):
            depth += {"(": 1, ")": -1}.get(stripped[position], 0)
            if depth == 0:
                found.setdefault(match.group(1), []).append(stripped[start + 1 : position])
                break
    return found


def test_every_public_name_is_in_the_api_reference() -> None:
    """Functions and classes with their signature (a heading or table row opening with it);
    dataclasses, whose constructor users do not call, with a heading naming them."""
    text = API.read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    signatures = documented_signatures(text)
    missing = []
    for name, obj in public_names().items():
        if dataclasses.is_dataclass(obj):
            if not any(f"`{name}`" in heading for heading in headings):
                missing.append(name)
        elif name not in signatures:
            missing.append(name)
    assert not missing, (
        f"docs/api.md does not document {missing}; add a heading or table row with each signature"
    )


def test_documented_signatures_are_the_real_ones() -> None:
    names = public_names()
    wrong = []
    for name, documented in documented_signatures(API.read_text()).items():
        if name not in names:
            continue
        real = signature_text(names[name])
        for parameters in documented:
            if re.sub(r"\s+", "", parameters) != re.sub(r"\s+", "", real):
                wrong.append(f"{name}({parameters}) should read {name}({real})")
    assert not wrong, "docs/api.md signatures differ from the code:\n" + "\n".join(wrong)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", FENCE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_points_at_an_existing_file() -> None:
    """Links in README.md and docs/*.md to files (and to headings, when they name one) resolve."""
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        if not page.exists():
            continue
        prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
        for target in LINK.findall(prose):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # an absolute URL (http:, mailto:)
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_api_reference_examples_run_and_print_what_is_pasted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write model files into the working directory
    blocks = code_blocks(API.read_text())
    assert any(info == "python" for info, _ in blocks), "docs/api.md has no python example to run"
    namespace: dict[str, object] = {"__name__": "api_examples"}
    for position, (info, body) in enumerate(blocks):
        if info != "python":
            continue
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(body, f"docs/api.md python block {position}", "exec"), namespace)
        following = blocks[position + 1] if position + 1 < len(blocks) else None
        if following is not None and following[0] == "text":
            assert stdout.getvalue().rstrip() == following[1].rstrip(), (
                f"docs/api.md: the output pasted after python block {position} is not what it prints; "
                f"paste this instead:\n{stdout.getvalue()}"
            )


def test_guide_python_blocks_run_on_a_tiny_model(tmp_path: Path) -> None:
    """The guide's python blocks (training-loop recipe, checkpoint and resume) run in order on
    TinyConvNet with these names defined, and the recipe ends with an exact finalized model."""
    blocks = [body for info, body in code_blocks((DOCS / "guide.md").read_text()) if info == "python"]
    assert blocks, "docs/guide.md has no python block; the lifecycle recipe should be one"
    epochs, batches = 2, 3
    loader = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(batches)]
    evaluated: list[nn.Module] = []

    def evaluate(model: nn.Module) -> None:
        evaluated.append(copy.deepcopy(model).eval())

    namespace: dict[str, object] = {
        "__name__": "guide_examples",
        "torch": torch,
        "model": TinyConvNet(),
        "epochs": epochs,
        "loader": loader,
        "criterion": nn.CrossEntropyLoss(),
        "evaluate": evaluate,
        "path": tmp_path / "checkpoint.pt",
    }
    for position, body in enumerate(blocks):
        exec(compile(body, f"docs/guide.md python block {position}", "exec"), namespace)

    model = namespace["model"]
    assert isinstance(model, nn.Module)
    assert len(evaluated) == epochs
    assert any(isinstance(m, CondensedConv2d) for m in model.modules())
    assert not any(isinstance(m, LearnedGroupMixin) for m in model.modules())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), evaluated[-1](x), atol=1e-5, rtol=1e-5)
    sched = namespace["sched"]
    assert isinstance(sched, lgconv.CondensationScheduler)
    assert sched.step_count == epochs * batches and not sched.condensing
