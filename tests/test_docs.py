"""Checks of the Sphinx sources and the READMEs: the API page lists every public name, and
the Python snippets users copy run as written and give what their comments say.

Snippets run: README.md's block under "## Usage", docs/index.rst's block and the eight
blocks of docs/usage.rst, read from the files (an edit to the docs is tested). Every
``name = ...  # (d1, d2, ...)`` comment is checked against ``name``'s shape; the tests
assert the other promises of the comments. Not run: benchmarks/README.md's block, which
imports ``MyPool`` from ``mypkg``, a placeholder for the reader's own module that does not
exist; it is counted all the same, so that a new block there is noticed.

Pretrained weights load through the library's real path, offline: the
``imagenet_inception_v3`` fixture puts a file where torch.hub finds a finished download.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor

import bilinearpool
import bilinearpool.functional
from bilinearpool import SEBlock
from bilinearpool.backbones import _torchvision_model_node  # the default node of a model passed in

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


_DIRECTIVE = re.compile(r"^\.\. (autoclass|autofunction|automodule):: (\S+)[ \t]*$")
_OPTION = re.compile(r"^[ \t]+:([\w-]+):(.*)$")


def _names(value: str) -> set[str]:
    return {n.strip() for n in value.split(",") if n.strip()}


def autodoc_names(rst: str) -> set[str]:
    """Dotted names the autodoc directives of ``rst`` document.

    ``autoclass`` and ``autofunction`` document their target; ``automodule`` with
    ``:members:`` documents the names listed there or, when none are, the module's
    ``__all__``, less any ``:exclude-members:``. An ``automodule`` without ``:members:``
    (or with ``:no-members:``) documents none of the module's names.
    """
    documented: set[str] = set()
    lines = rst.splitlines()
    for i, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if match is None:
            continue
        kind, target = match.groups()
        if kind != "automodule":
            documented.add(target)
            continue
        options: dict[str, str] = {}
        for opt in lines[i + 1 :]:
            opt_match = _OPTION.match(opt)
            if opt_match is None:
                break
            options[opt_match.group(1)] = opt_match.group(2).strip()
        if "members" not in options or "no-members" in options:
            continue
        members = _names(options["members"]) or set(importlib.import_module(target).__all__)
        members -= _names(options.get("exclude-members", ""))
        documented |= {f"{target}.{n}" for n in members}
    return documented


def _public_names() -> set[str]:
    skip = {"__version__", "functional"}  # the version string; the subpackage has its own section
    wanted = {f"bilinearpool.{n}" for n in bilinearpool.__all__ if n not in skip}
    wanted |= {f"bilinearpool.functional.{n}" for n in bilinearpool.functional.__all__}
    return wanted


def test_api_page_lists_every_public_name() -> None:
    documented = autodoc_names((DOCS / "api.rst").read_text())
    missing = sorted(_public_names() - documented)
    assert missing == [], f"public names missing from docs/api.rst's autodoc directives: {missing}"


def test_autodoc_names_reads_the_directives() -> None:
    rst = """
.. autoclass:: bilinearpool.BilinearPool
.. autofunction:: bilinearpool.functional.triu_size

.. automodule:: bilinearpool.functional
   :no-members:

.. automodule:: bilinearpool.norm
   :members:
   :exclude-members: L2Normalize

.. automodule:: bilinearpool.pooling
   :members: FastBilinearPool

.. automodule:: bilinearpool.attention
"""
    assert autodoc_names(rst) == {
        "bilinearpool.BilinearPool",
        "bilinearpool.functional.triu_size",
        "bilinearpool.norm.SignedSqrt",
        "bilinearpool.pooling.FastBilinearPool",
    }


def test_api_page_check_catches_a_missing_name() -> None:
    api = (DOCS / "api.rst").read_text()
    line = ".. autofunction:: bilinearpool.functional.triu_size\n"
    assert line in api
    missing = _public_names() - autodoc_names(api.replace(line, ""))
    assert "bilinearpool.functional.triu_size" in missing


# ---------------------------------------------------------------------------------------
# Python snippets of the docs and READMEs

_RST_BLOCK = re.compile(r"^\.\. code-block:: python\n\n((?:   .*\n|\n)+)", re.M)
_MD_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
_RST_HEADING = re.compile(r"^(\S.*)\n([-=~^\"'`#*+])\2+$", re.M)
_MD_HEADING = re.compile(r"^#+ (.+)$", re.M)
_MD_FENCE = re.compile(r"^```.*?^```", re.M | re.S)  # a `# comment` line in one is no heading
# `name = ...  # (8, 512*513/2), ...`: a promise about name's shape
_SHAPE_COMMENT = re.compile(r"^[ \t]*(\w+) = .*#[ \t]*(\([\d\s,*/+]+\))", re.M)


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # line number of the code's first line in ``path``
    section: str  # the heading it stands under
    code: str


def _headings(text: str, rst: bool) -> list[tuple[int, str]]:
    """(offset, title) of the headings of an .rst or Markdown text."""
    if rst:
        return [(m.start(), m.group(1).strip()) for m in _RST_HEADING.finditer(text)]
    fences = [m.span() for m in _MD_FENCE.finditer(text)]
    return [
        (m.start(), m.group(1).strip())
        for m in _MD_HEADING.finditer(text)
        if not any(start <= m.start() < end for start, end in fences)
    ]


def python_snippets(path: Path, text: str | None = None) -> list[Snippet]:
    """The Python code blocks of an ``.rst`` (``.. code-block:: python``) or Markdown
    (```` ```python ````) file, dedented; ``text`` in place of the file's."""
    text = path.read_text() if text is None else text
    rst = path.suffix == ".rst"
    headings = _headings(text, rst)
    snippets = []
    for match in (_RST_BLOCK if rst else _MD_BLOCK).finditer(text):
        code = match.group(1)
        if rst:
            code = "\n".join(line[3:] for line in code.splitlines()) + "\n"
        section = next((title for start, title in reversed(headings) if start < match.start()), "")
        snippets.append(Snippet(path, text.count("\n", 0, match.start(1)) + 1, section, code))
    return snippets


@dataclass
class SnippetRun:
    """What snippets left: their namespace, every value each name was bound to (in
    order), and the ``(name, shape)`` of each shape comment checked."""

    ns: dict = field(default_factory=dict)
    history: dict[str, list[object]] = field(default_factory=lambda: defaultdict(list))
    shapes: list[tuple[str, tuple]] = field(default_factory=list)


def run_snippets(snippets: list[Snippet]) -> SnippetRun:
    """Runs the snippets in order in one namespace, as a reader of the page would, one
    top-level statement at a time (tracebacks give the doc file's line), and checks each
    statement's shape comments."""
    run = SnippetRun()
    for snippet in snippets:
        tree = ast.parse(snippet.code, str(snippet.path))
        ast.increment_lineno(tree, snippet.line - 1)
        lines = snippet.code.splitlines()
        for stmt in tree.body:
            before = dict(run.ns)
            module = ast.Module(body=[stmt], type_ignores=[])
            # dont_inherit: without this file's `from __future__ import annotations`
            exec(compile(module, str(snippet.path), "exec", dont_inherit=True), run.ns)  # noqa: S102
            for name, value in run.ns.items():
                if name != "__builtins__" and (name not in before or before[name] is not value):
                    run.history[name].append(value)
            source = "\n".join(lines[stmt.lineno - snippet.line : stmt.end_lineno - snippet.line + 1])
            for name, expr in _SHAPE_COMMENT.findall(source):
                shape = tuple(run.ns[name].shape)
                assert shape == eval(expr, {"__builtins__": {}}), (  # noqa: S307
                    f"{snippet.path.name}:{stmt.lineno}: {name}.shape is {shape}, its comment says {expr}"
                )
                run.shapes.append((name, shape))
    return run


_LAYERS = "Layers on your own feature maps"
_CLASSIFIERS = "Classifiers around a backbone"
#: Every file with Python snippets, and the sections of its snippets in order.
SNIPPET_SECTIONS = {
    "README.md": ["Usage"],
    "docs/index.rst": ["bilinearpool"],
    "docs/usage.rst": [_LAYERS] * 4 + [_CLASSIFIERS] * 5,
    # not run (it imports the placeholder mypkg): see the module docstring
    "benchmarks/README.md": ["Adding a pooling to the layer benchmark"],
}


def test_every_python_snippet_is_counted() -> None:
    # A new snippet fails here until it has a test (and its count here).
    for rel, sections in SNIPPET_SECTIONS.items():
        found = [s.section for s in python_snippets(ROOT / rel)]
        assert found == sections, f"{rel}: its Python snippets stand under {found}; tests run {sections}"
    candidates = [*ROOT.glob("*.md"), *(ROOT / "benchmarks").glob("*.md"), *DOCS.rglob("*.rst")]
    others = [
        rel
        for rel, p in ((p.relative_to(ROOT).as_posix(), p) for p in candidates if "_build" not in p.parts)
        if rel not in SNIPPET_SECTIONS and python_snippets(p)
    ]
    assert others == [], f"files with Python snippets that no test runs: {others}"
    (bench,) = python_snippets(ROOT / "benchmarks" / "README.md")
    assert "from mypkg import MyPool" in bench.code  # why it is not run


def test_python_snippets_reads_blocks_and_sections() -> None:
    rst = (
        "Title\n=====\n\n.. code-block:: python\n\n   a = 1\n\n   b = 2\n\n"
        "Part\n----\n\n.. code-block:: bash\n\n   ls\n"
    )
    (snippet,) = python_snippets(Path("x.rst"), rst)
    assert (snippet.line, snippet.section, snippet.code) == (6, "Title", "a = 1\n\nb = 2\n\n")
    md = "# T\n\n## Use\n\n```bash\n# not a heading\n```\n\n```python\nx = 1\n```\n"
    (snippet,) = python_snippets(Path("x.md"), md)
    assert (snippet.line, snippet.section, snippet.code) == (10, "Use", "x = 1\n")


def test_run_snippets_checks_shape_comments() -> None:
    code = "import torch\nx = torch.zeros(2, 3)   # (2, 1+2), as promised\n"
    run = run_snippets([Snippet(Path("x.rst"), 10, "", code)])
    assert run.shapes == [("x", (2, 3))]
    with pytest.raises(AssertionError, match=r"x.rst:11: x.shape is \(2, 3\), its comment says \(2, 4\)"):
        run_snippets([Snippet(Path("x.rst"), 10, "", code.replace("1+2", "4"))])


def _no_download(url: str, *args: object, **kwargs: object) -> None:
    raise AssertionError(f"the test tried to download {url}")


@pytest.fixture
def imagenet_inception_v3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Tensor]:
    """torchvision's ImageNet weights of Inception-v3 as a finished download would leave
    them: a state_dict of the architecture the weights enum builds (random values) at
    ``$TORCH_HOME/hub/checkpoints/<basename of the weights' url>``. torch.hub's
    ``load_state_dict_from_url`` loads a file found there as it is (it checks the hash only
    of a file it downloads); a download fails the test."""
    url = torchvision.models.get_model_weights("inception_v3").DEFAULT.url
    # the pretrained model has the auxiliary classifier; init_weights=False: skip the slow init
    state = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    return state


def _assert_loaded(model: bilinearpool.BilinearClassifier, state: dict[str, Tensor]) -> None:
    """The model's backbone holds the file's tensors, all but its classifiers (cut off).
    Parameters are compared; batch norm statistics change in any forward in training mode."""
    keys = {k[len("body.") :] for k in model.backbone.state_dict()}
    assert keys == {k for k in state if not k.startswith(("AuxLogits.", "fc."))}
    for key, value in model.backbone.named_parameters():
        assert torch.equal(value, state[key[len("body.") :]]), key


def test_readme_usage_snippet_runs(imagenet_inception_v3: dict[str, Tensor]) -> None:
    (snippet,) = python_snippets(ROOT / "README.md")
    torch.manual_seed(0)
    run = run_snippets([snippet])
    assert run.shapes == [("logits", (2, 8)), ("embedding", (2, 2048 * 2048))]
    resnet, inception, swin = run.history["model"]
    # cut at layer4: (B, 2048, 7, 7), the default for torchvision models
    with torch.no_grad():
        assert resnet.forward_features(torch.zeros(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
    assert _torchvision_model_node(run.ns["backbone"]) == "layer4"
    # unit norm
    torch.testing.assert_close(run.ns["embedding"].norm(dim=1), torch.ones(2))
    # by name, with pretrained weights, packed triangle
    _assert_loaded(inception, imagenet_inception_v3)
    assert inception.pool.triu and inception.embedding_dim == 2048 * 2049 // 2
    # torchvision Swin's channels-last maps are recognised: 768 channels, not a spatial size
    assert swin.backbone.output_fmt == "NHWC" and swin.backbone.out_channels == 768
    assert swin.embedding_dim == 768 * 768


def test_index_snippet_runs() -> None:
    (snippet,) = python_snippets(DOCS / "index.rst")
    torch.manual_seed(0)
    run = run_snippets([snippet])
    assert run.shapes == [("logits", (2, 8))]
    assert isinstance(run.ns["backbone"], torchvision.models.ResNet)
    assert run.ns["model"].backbone.out_channels == 2048


def test_usage_layer_snippets_run() -> None:
    # The blocks of "Layers on your own feature maps" need no backbone or download.
    snippets = [s for s in python_snippets(DOCS / "usage.rst") if s.section == _LAYERS]
    torch.manual_seed(0)
    run = run_snippets(snippets)
    assert [name for name, _ in run.shapes] == ["z", "z", "g", "logits", "logits"]
    full, packed = run.history["z"]
    torch.testing.assert_close(full.norm(dim=1), torch.ones(8))  # unit L2 norm
    torch.testing.assert_close(packed.norm(dim=1), torch.ones(8))  # same norm
    ns = run.ns
    torch.manual_seed(0)  # the snippet's draws again: x, then g's second map
    x, y = torch.randn(8, 512, 14, 14).relu(), torch.randn(8, 256, 14, 14)
    assert torch.equal(x, ns["x"])
    average = torch.einsum("bchw,bdhw->bcd", x, y) / (14 * 14)
    torch.testing.assert_close(ns["g"], average, atol=1e-5, rtol=1e-4)  # raw average outer product
    assert ns["head"][0].save_output  # the second head
    torch.testing.assert_close(ns["logits"], ns["head"](ns["x"]), atol=1e-5, rtol=1e-4)  # as head(x)


def test_usage_classifier_snippets_run(imagenet_inception_v3: dict[str, Tensor]) -> None:
    # They use names of the page's earlier blocks (torch): run the page in order.
    snippets = python_snippets(DOCS / "usage.rst")
    torch.manual_seed(0)
    run = run_snippets(snippets)
    # the classifier blocks have no shape comments: those checked are the layer blocks'
    assert [name for name, _ in run.shapes] == ["z", "z", "g", "logits", "logits"]
    ns = run.ns
    fast, two, se, images = ns["fast"], ns["two"], ns["se"], ns["images"]
    _assert_loaded(fast, imagenet_inception_v3)  # downloads the weights: found in the cache
    # two streams, separate weights
    assert two.backbone_b is not None and two.backbone_b is not two.backbone, "one stream, or a shared one"
    assert {id(p) for p in two.backbone.parameters()}.isdisjoint(id(p) for p in two.backbone_b.parameters())
    # the "+SE" baseline: SE blocks of reduction 8 in ResNet-50's 16 bottlenecks, average pooling
    se_blocks = [m for m in se.backbone.modules() if isinstance(m, SEBlock)]
    assert len(se_blocks) == 16 and {m.reduction for m in se_blocks} == {8}
    assert se.embedding_dim == 2048
    # pre-logits
    assert ns["emb"].shape == (2, fast.classifier.in_features) == (2, 2048 * 2048)
    assert ns["layer"] is fast.backbone
    assert ns["layers"] == (two.backbone, two.backbone_b)  # one per stream
    cam = ns["cam"]
    # one map per image at the input size, both streams' maps added, then the ReLU
    assert cam.shape == (2, 1, 299, 299) and cam.isfinite().all()
    assert cam.amin() == 0 and cam.amax() > 0
    # same predictions, 2,098,176 instead of 4,194,304 inputs per class
    deployed = ns["deployed"]
    assert (deployed.classifier.in_features, fast.classifier.in_features) == (2_098_176, 4_194_304)
    assert not deployed.training
    with torch.no_grad():
        torch.testing.assert_close(deployed(images), fast(images), atol=1e-5, rtol=1e-4)
    # a smaller rate for the pretrained backbones, frozen after
    backbone, head = ns["opt"].param_groups
    assert (backbone["lr"], head["lr"], backbone["momentum"], head["momentum"]) == (1e-3, 1e-1, 0.9, 0.9)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in two.backbone_parameters()}
    assert len(backbone["params"]) + len(head["params"]) == len(list(two.parameters()))
    assert not any(p.requires_grad for p in two.backbone_parameters())
    assert all(p.requires_grad for p in two.head_parameters())
    # another label set: a fresh 2-class classifier, the rest as in the checkpoint
    checkpoint = ns["checkpoint"]
    assert se.num_classes == 2 and (se.classifier.in_features, se.classifier.out_features) == (2048, 2)
    kept = {k: v for k, v in se.state_dict().items() if not k.startswith("classifier.")}
    assert kept.keys() == {k for k in checkpoint if not k.startswith("classifier.")}
    assert all(torch.equal(v, checkpoint[k]) for k, v in kept.items())
    (group,) = ns["head_opt"].param_groups
    assert {id(p) for p in group["params"]} == {id(se.classifier.weight), id(se.classifier.bias)}
