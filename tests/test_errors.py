"""Bad input of every kind: one clear line on stderr naming the file, exit code 1, nothing written.

The README's promise: every error is one line on stderr naming the file, exit code 1, nothing
written, and `--debug` shows the traceback. Every case below builds its
bad input in a fresh tmp_path, runs the CLI, and checks:

* the exit code (1; click's 2 only for pure usage errors);
* stderr is exactly one non-empty line (verify mismatches: one line per tensor plus a summary, in
  a fixed format), contains the expected text and names the file involved, and has no traceback;
* nothing was written: the output path is absent (or unchanged when it existed), no ``.*.tmp``
  leftovers sit in its parent, tmp_path is byte-identical, and so is every input named on the
  command line (base checkpoints, adapters).

Most cases run `spra_tools.cli.main` in-process (fast); those marked ``sub`` go through a real
``python -m spra_tools`` subprocess to prove the real exit code and stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from spra_tools.adapter import Adapter
from spra_tools.format import HIGH, VALUES, container_header, read_container
from spra_tools.testing import build_tiny_model

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory) -> Path:
    """Same architecture and shapes as tiny_llama, different random weights (seed 1)."""
    path = tmp_path_factory.mktemp("other-llama") / "base"
    build_tiny_model("llama", path, dtype=torch.bfloat16, shard_size="100KB", seed=1)
    return path


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A Llama with hidden size 128: same tensor names as tiny_llama, different shapes."""
    path = tmp_path_factory.mktemp("wide-llama") / "base"
    build_tiny_model("llama", path, dtype=torch.bfloat16, seed=0, hidden=128)
    return path


@pytest.fixture(scope="module")
def fp32_adapter(tiny_fp32_file, tmp_path_factory) -> Path:
    """A seeded adapter made on the fp32 single-file base (tiny_llama is its bf16 twin)."""
    from spra_tools.checkpoint import open_checkpoint
    from spra_tools.surgery import create_adapter

    path = tmp_path_factory.mktemp("fp32-adapter") / "fp32.spra"
    create_adapter(open_checkpoint(tiny_fp32_file), 0.05, 7).save(path)
    return path


def rewrite(src: Path, dst: Path, doc: Callable[[dict], None] | None = None, tensors=None, text=None) -> Path:
    """Re-serialise a .spra container, optionally editing its document and its tensor list.

    `doc` edits the parsed adapter document in place, `text` maps the document's JSON text to
    new text; `tensors` maps the list of (name, dtype, shape, raw bytes), in file order, to a new
    list (and the document's checksums follow it). The result is always a valid safetensors
    container (header by format.container_header).
    """
    c = read_container(src)
    items = [
        (t.name, t.dtype, t.shape, bytes(c.read_bytes(t.name)))
        for t in sorted(c.tensors.values(), key=lambda t: t.begin)
    ]
    metadata = dict(c.metadata)
    if doc is not None:
        document = json.loads(metadata["spra"])
        doc(document)
        metadata["spra"] = json.dumps(document, separators=(",", ":"))
    if text is not None:
        metadata["spra"] = text(metadata["spra"])
    if tensors is not None:
        items = tensors(items)
        document = json.loads(metadata["spra"])
        if "checksums" in document:  # as a writer would: each case tests its own check, not the checksum
            document["checksums"] = {n: hashlib.blake2b(raw, digest_size=8).hexdigest() for n, _, _, raw in items}
            metadata["spra"] = json.dumps(document, separators=(",", ":"))
    with open(dst, "wb") as f:
        f.write(container_header([(n, d, s) for n, d, s, _ in items], metadata))
        for *_, raw in items:
            f.write(raw)
    read_container(dst)  # still a valid container: only the adapter layer should object
    return dst


def raw_container(header: bytes | str, data: bytes = b"") -> bytes:
    """A file made of an 8-byte length, the given header bytes and data (no checks at all)."""
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + data


@dataclass
class W:
    """What a case can use: fixtures' paths and a fresh directory for its own inputs and output."""

    tmp: Path
    base: Path
    fp32: Path
    other: Path
    wide: Path
    seeded: Path
    explicit: Path
    fp32_adapter: Path

    @property
    def out(self) -> Path:  # the default output of apply (a checkpoint directory)
        return self.tmp / "out"

    @property
    def new_spra(self) -> Path:  # the default output of create / diff
        return self.tmp / "new.spra"

    def write(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def apply(self, adapter: Path, base: Path | None = None) -> list:
        return ["apply", base or self.base, adapter, "-o", self.out]


@dataclass
class Bad:
    """A bad invocation and what the CLI must say about it."""

    argv: list
    expect: str  # a substring of stderr
    names: Path | str | None = None  # the file stderr must name (None: no file is involved)
    rc: int = 1
    env: dict = field(default_factory=dict)
    verify_lines: bool = False  # verify's mismatch report (stdout) and its one error line
    usage: bool = False  # a click usage error: click's own format (Usage/Try/Error lines)


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------
# One list, CASES: (id, build, run also as a real subprocess). Each
# build function makes its bad input under w.tmp and returns the invocation and what it must say.

CASES: list[tuple[str, Callable[[W], Bad], bool]] = []


def case(case_id: str, sub: bool = False):
    def register(build: Callable[[W], Bad]) -> Callable[[W], Bad]:
        CASES.append((case_id, build, sub))
        return build

    return register


HUGE_INT = "9" * 5000  # beyond Python's default limit for int <-> str conversion (4300 digits)


def _create(w: W, *extra) -> list:
    return ["create", w.base, "-o", w.new_spra, *map(str, extra)]


def _base_copy(w: W) -> Path:
    copy = w.tmp / "base-copy"
    shutil.copytree(w.base, copy)
    return copy


# -- the adapter file -------------------------------------------------------------------------


@case("adapter-missing")
def _(w):
    return Bad(w.apply(p := w.tmp / "nope.spra"), "no such file", p)


@case("adapter-missing-info")
def _(w):
    return Bad(["info", p := w.tmp / "nope.spra"], "no such file", p)


@case("adapter-is-directory")
def _(w):
    folder = w.tmp / "a-folder"  # not the output's parent: that is refused as an output inside an input
    folder.mkdir(exist_ok=True)
    return Bad(w.apply(folder), "is a directory", folder)


@case("adapter-unreadable")
def _(w):
    path = w.write("unreadable.spra", w.seeded.read_bytes())
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as a user who can read a chmod-000 file (root)")
    return Bad(w.apply(path), "permission denied", path)


@case("adapter-empty")
def _(w):
    return Bad(w.apply(p := w.write("empty.spra", b"")), "(0 bytes)", p)


@case("adapter-7-bytes")
def _(w):
    return Bad(w.apply(p := w.write("seven.spra", b"1234567")), "(7 bytes)", p)


@case("header-longer-than-file")
def _(w):
    path = w.write("long.spra", struct.pack("<Q", 1000) + b"{}")
    return Bad(w.apply(path), "header length 1000 does not fit", path)


@case("header-not-json", sub=True)
def _(w):
    return Bad(w.apply(p := w.write("garbage.spra", raw_container("not json at all"))), "header is not valid JSON", p)


@case("header-not-utf8")
def _(w):
    return Bad(w.apply(p := w.write("latin.spra", raw_container(b'{"\xff": 1}'))), "header is not valid JSON", p)


@case("header-json-not-object")
def _(w):
    return Bad(w.apply(p := w.write("list.spra", raw_container("[1, 2, 3]"))), "header is not a JSON object", p)


@case(
    "header-dtype-not-a-string",
)
def _(w):
    header = '{"x":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}'
    return Bad(w.apply(p := w.write("dtype.spra", raw_container(header, b"\0" * 4))), "unsupported dtype", p)


@case(
    "header-huge-integer",
)
def _(w):
    header = '{"x":{"dtype":"U8","shape":[' + HUGE_INT + '],"data_offsets":[0,1]}}'
    return Bad(w.apply(p := w.write("bigint.spra", raw_container(header, b"\0"))), "header is not valid JSON", p)


@case("safetensors-without-spra-metadata")
def _(w):
    shard = sorted(w.base.glob("*.safetensors"))[0]  # the base's own shard: valid safetensors
    return Bad(w.apply(shard), "not a spra adapter", shard)


@case("adapter-truncated")
def _(w):
    path = w.write("cut.spra", w.seeded.read_bytes()[:-3])
    return Bad(w.apply(path), "outside the data", path)


@case("adapter-trailing-garbage")
def _(w):
    path = w.write("tail.spra", w.seeded.read_bytes() + b"garbage!")
    return Bad(w.apply(path), "trailing bytes", path)


# -- the adapter document ---------------------------------------------------------------------


@case("unknown-format-version")
def _(w):
    path = rewrite(w.seeded, w.tmp / "v99.spra", doc=lambda d: d.update(version=99))
    return Bad(w.apply(path), "format version 99 is not supported", path)


@case("unknown-format-version-info")
def _(w):
    path = rewrite(w.seeded, w.tmp / "v99.spra", doc=lambda d: d.update(version=99))
    return Bad(["info", path], "format version 99 is not supported", path)


@case("unknown-scheme")
def _(w):
    path = rewrite(w.seeded, w.tmp / "scheme.spra", doc=lambda d: d.update(scheme="spra-seeded-v9"))
    return Bad(w.apply(path), "unknown support scheme 'spra-seeded-v9'", path)


@case(
    "document-huge-integer",
)
def _(w):
    def huge(text: str) -> str:
        assert '"version":1,' in text
        return text.replace('"version":1,', f'"version":{HUGE_INT},', 1)

    path = rewrite(w.seeded, w.tmp / "docint.spra", text=huge)
    return Bad(w.apply(path), "not valid JSON", path)


@case("count-disagrees-with-seed")
def _(w):
    def bump(d):
        d["tensors"][0]["count"] += 1

    path = rewrite(w.seeded, w.tmp / "count.spra", doc=bump)
    return Bad(w.apply(path), "differs from the seeded count", path)


@case("corrupted-elias-fano")
def _(w):
    flipped = []

    def flip(items):
        out = []
        for n, d, s, raw in items:
            if n.startswith(HIGH) and not flipped:
                raw = bytes([raw[0] ^ 0x01]) + raw[1:]
                flipped.append(n)
            out.append((n, d, s, raw))
        return out

    path = rewrite(w.explicit, w.tmp / "bad-ef.spra", tensors=flip)
    assert flipped
    return Bad(w.apply(path), "support code", path)


@case("values-wrong-length")
def _(w):
    def longer(items):
        name = next(n for n, *_ in items if n.startswith(VALUES))
        return [(n, d, (s[0] + 1,), raw + b"\0\0") if n == name else (n, d, s, raw) for n, d, s, raw in items]

    path = rewrite(w.seeded, w.tmp / "values.spra", tensors=longer)
    return Bad(w.apply(path), "values tensor must be", path)


@case("stray-tensor")
def _(w):
    path = rewrite(w.seeded, w.tmp / "stray.spra", tensors=lambda items: [*items, ("extra", "F32", (1,), b"\0" * 4)])
    return Bad(w.apply(path), "'extra' is not described by the adapter document", path)


def _nonfinite(w: W, value: float, name: str) -> Bad:
    adapter = Adapter.load(w.seeded)
    delta = next(iter(adapter.deltas.values()))
    delta.values = delta.values.clone()
    delta.values[3] = value
    path = w.tmp / name
    adapter.save(path, allow_nonfinite=True)
    return Bad(w.apply(path), "NaN or Inf values", path)


@case("nan-values-on-apply")
def _(w):
    return _nonfinite(w, float("nan"), "nan.spra")


@case("inf-values-on-apply")
def _(w):
    return _nonfinite(w, float("inf"), "inf.spra")


# -- adapter against the wrong base -----------------------------------------------------------


@case("merge-one-adapter")
def _(w):
    return Bad(["merge", w.seeded, "-o", w.new_spra], "at least two adapters", None)


@case("merge-weights-not-numbers")
def _(w):
    return Bad(["merge", w.seeded, w.seeded, "-o", w.new_spra, "--weights", "1,x"], "comma-separated", None)


@case("merge-recipe-missing")
def _(w):
    return Bad(["merge", "--recipe", p := w.tmp / "nope.yaml", "-o", w.new_spra], "nope.yaml", p)


@case("wrong-base-stack")
def _(w):
    return Bad(["stack", w.other, w.seeded, "-o", w.new_spra], "fingerprint mismatch", w.seeded)


@case("reseed-without-base")
def _(w):
    return Bad(["reseed", w.seeded, "-o", w.new_spra, "--seed", "12345"], "needs the base", None)


@case("compare-missing")
def _(w):
    return Bad(["compare", w.seeded, p := w.tmp / "nope.spra"], "no such file", p)


@case("wrong-base-same-shapes-apply", sub=True)
def _(w):
    return Bad(w.apply(w.seeded, w.other), "fingerprint mismatch", w.seeded)


@case("wrong-base-same-shapes-verify", sub=True)
def _(w):
    return Bad(["verify", w.other, w.seeded], "does not match", w.seeded, verify_lines=True)


@case("wrong-base-explicit-apply")
def _(w):
    return Bad(w.apply(w.explicit, w.other), "fingerprint mismatch", w.explicit)


@case("wrong-base-other-shapes-apply")
def _(w):
    return Bad(w.apply(w.seeded, w.wide), "shape [128, 128] in the base, [64, 64] in the adapter", w.seeded)


@case("wrong-base-other-shapes-verify")
def _(w):
    return Bad(["verify", w.wide, w.seeded], "does not match", w.seeded, verify_lines=True)


@case("wrong-base-single-file-dtype")
def _(w):
    # The bf16 adapter against the fp32 single-file base (whose output would be a single file).
    return Bad(["apply", w.fp32, w.seeded, "-o", w.tmp / "out.safetensors"], "dtype F32 in the base, BF16", w.seeded)


@case("base-dtype-mismatch")
def _(w):
    # Made on the fp32 single file; tiny_llama is the same model (same seed, same names) in bf16.
    return Bad(w.apply(w.fp32_adapter, w.base), "dtype BF16 in the base, F32 in the adapter", w.fp32_adapter)


# -- the base ---------------------------------------------------------------------------------


@case("base-missing")
def _(w):
    return Bad(w.apply(w.seeded, p := w.tmp / "no-base"), "no such file or directory", p)


@case("base-missing-verify")
def _(w):
    return Bad(["verify", p := w.tmp / "no-base", w.seeded], "no such file or directory", p)


@case("base-without-safetensors")
def _(w):
    empty = w.tmp / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    return Bad(w.apply(w.seeded, empty), "no model.safetensors", empty)


@case("base-shard-truncated")
def _(w):
    copy = _base_copy(w)
    shard = sorted(copy.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return Bad(w.apply(w.seeded, copy), "outside the data", shard)


# A shard index that cannot be used: (id, new index text from the old one, expected message).
BAD_INDEXES = [
    ("base-index-not-json", lambda old: "{not json", "cannot read the shard index"),
    (
        "base-index-huge-integer",
        lambda old: '{"metadata": {"total_size": ' + HUGE_INT + '}, "weight_map": {}}',
        "cannot read the shard index",
    ),
    ("base-index-deeply-nested", lambda old: "[" * 100_000 + "]" * 100_000, "cannot read the shard index"),
    ("base-index-metadata-not-object", lambda old: json.dumps({**json.loads(old), "metadata": [1]}), "metadata"),
]


def _bad_index_case(case_id, new_text, expected):
    @case(case_id)
    def _(w):
        copy = _base_copy(w)
        index = copy / "model.safetensors.index.json"
        index.write_text(new_text(index.read_text()))
        return Bad(w.apply(w.seeded, copy), expected, index)


for _bad_index in BAD_INDEXES:
    _bad_index_case(*_bad_index)


# -- the output -------------------------------------------------------------------------------


@case("output-exists-apply", sub=True)
def _(w):
    w.out.mkdir()
    (w.out / "keep.txt").write_text("precious")
    return Bad(w.apply(w.seeded), "output exists (use --overwrite", w.out)


@case("output-exists-create")
def _(w):
    w.new_spra.write_bytes(b"precious")
    return Bad(_create(w, "--density", 0.01, "--seed", 1), "output exists (use --overwrite", w.new_spra)


@case("output-parent-missing")
def _(w):
    argv = ["apply", w.base, w.seeded, "-o", w.tmp / "missing" / "out"]
    return Bad(argv, "output directory does not exist", w.tmp / "missing")


@case("output-parent-missing-create")
def _(w):
    argv = ["create", w.base, "-o", w.tmp / "missing" / "a.spra", "--density", "0.01", "--seed", "1"]
    return Bad(argv, "output directory does not exist", w.tmp / "missing")


@case("output-parent-unwritable")
def _(w):
    parent = w.tmp / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):
        pytest.skip("running as a user who can write a mode-555 directory (root)")
    return Bad(["apply", w.base, w.seeded, "-o", parent / "out"], "not writable", parent)


# -- arguments and environment ----------------------------------------------------------------


@case("density-zero")
def _(w):
    return Bad(_create(w, "--density", 0, "--seed", 1), "density must be in (0, 1]")


@case("density-above-one")
def _(w):
    return Bad(_create(w, "--density", 1.5, "--seed", 1), "density must be in (0, 1]")


@case("density-nan")
def _(w):
    return Bad(_create(w, "--density", "nan", "--seed", 1), "density must be in (0, 1]")


@case("seed-negative", sub=True)
def _(w):
    # A pure usage error: click's exit code 2 and click's own Usage/Try/Error lines.
    return Bad(_create(w, "--density", 0.01, "--seed", -1), "Invalid value for '--seed'", rc=2, usage=True)


@case("targets-bad-regex")
def _(w):
    return Bad(_create(w, "--density", 0.01, "--seed", 1, "--targets", "("), "is neither a preset")


@case("targets-match-nothing")
def _(w):
    return Bad(
        _create(w, "--density", 0.01, "--seed", 1, "--targets", "no_such_tensor"), "no floating-point tensor matches"
    )


@case(
    "targets-match-nothing-names-base",
)
def _(w):
    argv = _create(w, "--density", 0.01, "--seed", 1, "--targets", "no_such_tensor")
    return Bad(argv, "no floating-point tensor matches", w.base)


@case("backend-bogus-apply", sub=True)
def _(w):
    return Bad(w.apply(w.seeded), "SPRA_TOOLS_BACKEND='bogus' is not one of", env={"SPRA_TOOLS_BACKEND": "bogus"})


@case("backend-bogus-create")
def _(w):
    return Bad(
        _create(w, "--density", 0.01, "--seed", 1),
        "SPRA_TOOLS_BACKEND='bogus' is not one of",
        env={"SPRA_TOOLS_BACKEND": "bogus"},
    )


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def w(tmp_path, tiny_llama, tiny_fp32_file, other_llama, wide_llama, seeded_adapter, explicit_adapter, fp32_adapter):
    work = tmp_path / "work"
    work.mkdir()
    yield W(work, tiny_llama, tiny_fp32_file, other_llama, wide_llama, seeded_adapter, explicit_adapter, fp32_adapter)
    for p in [work, *work.rglob("*")]:  # undo chmods so that tmp_path can be cleaned up
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)


def _output_of(bad: Bad) -> Path | None:
    argv = [str(a) for a in bad.argv]
    return Path(argv[argv.index("-o") + 1]) if "-o" in argv else None


def check_refused(bad: Bad, w: W, runner, snapshot) -> None:
    argv = [str(a) for a in bad.argv]
    out = _output_of(bad)
    must_not_appear = out if out is not None and not out.exists() else None
    inputs = {a: snapshot(a) for a in argv if a != str(out) and os.path.exists(a)}
    before_tmp = snapshot(w.tmp)

    rc, stdout, stderr = runner(*argv, env=bad.env)
    context = f"argv={argv}\nrc={rc}\nstdout={stdout!r}\nstderr={stderr}"

    assert rc == bad.rc, context
    assert "Traceback" not in stderr, context
    assert bad.expect in stderr, context
    lines = [line for line in stderr.splitlines() if line.strip()]
    if bad.verify_lines:  # the report on stdout, the verdict as the one error line
        adapter, base = argv[2], argv[1]
        report = stdout.splitlines()
        assert report, context
        for line in report:
            assert re.fullmatch(rf"{re.escape(adapter)}: tensor '[^']+': .+", line), context
        assert len(lines) == 1 and re.fullmatch(
            rf"spra-tools: error: {re.escape(adapter)}: does not match {re.escape(base)} \(\d+ of \d+ tensors differ\)",
            lines[0],
        ), context
    elif bad.usage:
        # click's usage error: "Usage: ...", "Try '... -h' for help.", "Error: ..."
        assert lines[0].startswith("Usage: spra-tools"), context
        assert lines[-1].startswith("Error: ") and bad.expect in lines[-1], context
        assert len(lines) == 3, context
    else:
        assert len(lines) == 1, context
        assert lines[0].startswith("spra-tools: error: "), context
        assert stderr.endswith("\n") and stderr.count("\n") == 1, context
    if bad.names is not None:
        assert str(bad.names) in stderr, f"stderr does not name {bad.names}\n{context}"

    # Nothing written: no output, no temporaries, inputs byte-identical.
    if must_not_appear is not None:
        assert not must_not_appear.exists(), context
        if must_not_appear.parent.is_dir():
            assert not list(must_not_appear.parent.glob(".*.tmp")), context
            assert not list(must_not_appear.parent.glob(".*.old-*")), context
    assert snapshot(w.tmp) == before_tmp, "files appeared, vanished or changed in the work directory"
    for arg, snap in inputs.items():
        assert snapshot(arg) == snap, f"{arg} changed"


def _params(subprocess_only: bool = False):
    for case_id, build, sub in CASES:
        if subprocess_only and not sub:
            continue
        yield pytest.param(build, id=case_id)


@pytest.mark.parametrize("build", list(_params()))
def test_refused_in_process(build, w, call_cli, snapshot):
    check_refused(build(w), w, call_cli, snapshot)


@pytest.mark.parametrize("build", list(_params(subprocess_only=True)))
def test_refused_by_the_real_command(build, w, run_cli, snapshot):
    check_refused(build(w), w, run_cli, snapshot)


def test_debug_shows_the_traceback(w, run_cli, call_cli):
    bad = w.write("garbage.spra", raw_container("not json at all"))
    rc, _, stderr = run_cli("--debug", "info", bad)
    assert rc == 1
    assert "Traceback (most recent call last)" in stderr
    assert f"spra_tools.errors.FormatError: {bad}: header is not valid JSON" in stderr
    # SPRA_TOOLS_DEBUG=1 does the same; and `--debug` in one call does not leak into the next.
    r = call_cli("info", bad, env={"SPRA_TOOLS_DEBUG": "1"})
    assert r.rc == 1 and "Traceback (most recent call last)" in r.stderr and "FormatError" in r.stderr
    r = call_cli("--debug", "info", bad)
    assert r.rc == 1 and "Traceback (most recent call last)" in r.stderr
    r = call_cli("info", bad)
    assert r.rc == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_nonfinite_hint_names_an_existing_option(w, call_cli):
    bad = _nonfinite(w, float("nan"), "nan.spra")
    r = call_cli(*bad.argv)
    assert r.rc == 1
    hinted = re.findall(r"--[a-z][a-z-]+", r.stderr)
    assert hinted, r.stderr
    help_text = call_cli("apply", "--help").stdout
    for option in hinted:
        assert option in help_text, f"stderr suggests {option}, which `apply` does not accept"


def test_rewrite_helper_round_trips(w):
    """The helper that builds the document cases re-serialises a valid adapter unchanged."""
    for src in (w.seeded, w.explicit):
        copy = rewrite(src, w.tmp / f"copy-{src.name}")
        assert copy.read_bytes() == src.read_bytes()
