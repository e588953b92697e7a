"""The `spra-tools` command: a thin click layer over the Python API (parse, call, print, exit code).

Expected failures (`SpraError`, unreadable files) print one line on stderr and exit 1; `--debug`
shows the traceback instead. torch is imported inside the commands so that `--help` stays fast.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys

import click

from .algebra import methods
from .format import SHORT_DTYPES
from .fsutil import human_size
from .train.config import TrainConfig

_DEBUG = os.environ.get("SPRA_TOOLS_DEBUG") == "1"
VALUES_DTYPES = click.Choice(list(SHORT_DTYPES))


def _progress(ctx: click.Context) -> bool:
    return not ctx.find_root().params.get("quiet") and sys.stderr.isatty()


def _say(ctx: click.Context, message: str) -> None:
    """Print one line; file and tensor names in it shown escaped (errors.shown), like every line we print."""
    from .errors import shown

    if not ctx.find_root().params.get("quiet"):
        click.echo(shown(message))


def _warn(message: str) -> None:
    """One line on stderr, even with --quiet: something the user should act on, though nothing failed."""
    click.echo(f"spra-tools: warning: {message}", err=True)


def _load(path: str, allow_nonfinite: bool = True):
    from .adapter import Adapter

    return Adapter.load(path, allow_nonfinite=allow_nonfinite)


def _density_option(help: str, required: bool = False):
    """--density, validated the same for every command while parsing, before any file is read."""

    def check(ctx, param, value: float | None) -> float | None:
        from .algebra.checks import checked_density

        return None if value is None else checked_density(value)

    return click.option("--density", type=float, required=required, callback=check, help=help)


def _check_outputs(out: str, overwrite: bool, inputs=(), report_path: str | None = None) -> None:
    """Refuse, before any work, an output (and a --report file) that could not be written or that
    is, holds or lies inside one of `inputs` (fsutil.check_output)."""
    from pathlib import Path

    from .errors import SpraError
    from .fsutil import check_output

    check_output(out, overwrite, inputs)
    if report_path:
        if Path(report_path).is_dir():
            raise SpraError("is a directory (--report takes a file name)", report_path)
        check_output(report_path, True, (*inputs, out))


def _save(adapter, out: str, overwrite: bool, inputs=(), report=None, report_path: str | None = None) -> None:
    """Write the adapter and, when asked, its JSON report: both or neither (each goes to a temporary
    first; the adapter is moved into place last)."""
    import contextlib

    from .errors import SpraError
    from .fsutil import atomic_path

    with contextlib.ExitStack() as outputs:
        adapter_tmp = outputs.enter_context(atomic_path(out, overwrite, inputs=inputs))
        if report_path:
            report_tmp = outputs.enter_context(atomic_path(report_path, True, inputs=(*inputs, out)))
            try:
                report_tmp.write_text(json.dumps(report, indent=2) + "\n")
            except OSError as e:
                raise SpraError(f"cannot write ({e.strerror})", report_path) from None
        try:
            adapter.save(adapter_tmp)
        except SpraError as e:  # name the output, not its temporary
            raise SpraError(e.message, out if e.path == os.fspath(adapter_tmp) else e.path) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="spra-tools")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def cli(debug: bool, quiet: bool):
    """Create, apply, inspect and extract SpaRTA sparse adapters (.spra files).

    \b
    Quick start:
      spra-tools demo                                   # everything on a tiny local model
      spra-tools train BASE --data train.jsonl -o task.spra --steps 500
      spra-tools create BASE -o task.spra --density 0.01 --seed 0
      spra-tools apply BASE task.spra -o merged/
      spra-tools info task.spra
    """
    global _DEBUG
    _DEBUG = _DEBUG or debug


def _targets_options(default: str):
    def wrap(f):
        f = click.option("--exclude", multiple=True, metavar="REGEX", help="Skip tensors whose name matches.")(f)
        f = click.option(
            "--targets",
            multiple=True,
            default=[default],
            show_default=True,
            metavar="PRESET|REGEX",
            help="vo, attn, mlp, all-linear, all, or a regex over tensor names (repeatable).",
        )(f)
        return f

    return wrap


@cli.command()
@click.argument("base")
@click.option("-o", "--output", "out", required=True, help="The .spra file to write.")
@_density_option("Fraction of each targeted tensor to adapt, in (0, 1].", required=True)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), required=True, help="64-bit seed of the supports.")
@_targets_options("vo")
@click.option("--values-dtype", type=VALUES_DTYPES, default="bf16", show_default=True)
@click.option("--revision", help="Hub revision of BASE.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def create(ctx, base, out, density, seed, targets, exclude, values_dtype, revision, overwrite):
    """Create a zero-valued seeded adapter for BASE (same arguments give the same bytes).

    \b
    Example:  spra-tools create ./llama -o task.spra --density 0.001 --seed 7 --targets all-linear
    """
    from .checkpoint import open_checkpoint
    from .surgery import create_adapter

    _check_outputs(out, overwrite, [base])
    ckpt = open_checkpoint(base, revision)
    adapter = create_adapter(ckpt, density, seed, targets, exclude, SHORT_DTYPES[values_dtype], _progress(ctx))
    adapter.save(out, overwrite, inputs=[ckpt.path])
    size = os.path.getsize(out)
    _say(
        ctx,
        f"wrote {out}: {adapter.num_values:,} values in {len(adapter.deltas)} tensors, {human_size(size)}"
        f" ({size / max(1, adapter.num_values):.2f} bytes per value)",
    )


@cli.command()
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--indices", "indices_of", metavar="TENSOR", help="Print TENSOR's support, one flat index per line.")
def info(adapter, as_json, indices_of):
    """Show an adapter's metadata, per-tensor counts, densities and value statistics."""
    from .errors import SpraError
    from .report import describe_adapter

    a = _load(adapter)
    if indices_of is not None:
        if indices_of not in a.deltas:
            raise SpraError(f"no tensor {indices_of!r} in the adapter", adapter)
        flat = a.deltas[indices_of].indices().numpy()
        if flat.size:
            sys.stdout.write("\n".join(flat.astype(str).tolist()) + "\n")
        return
    from .errors import shown

    d = describe_adapter(a, adapter)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    for t in d["per_tensor"]:
        t["name"] = shown(t["name"])
    d["path"] = shown(d["path"])
    bpv = f", {d['bytes_per_value']:.2f} bytes per value" if d["bytes_per_value"] else ""
    frac = f", {d['fraction_of_model']:.4%} of the model" if d["fraction_of_model"] else ""
    base = d["base"]
    click.echo(f"adapter     {d['path']}  ({human_size(d['file_bytes'])}{bpv})")
    click.echo(f"base        {shown(str(base.get('name')))}  revision {shown(str(base.get('revision') or '-'))}")
    click.echo(
        f"values      {d['values']:,} in {d['tensors']} tensors: {d['density_of_targeted']:.4%} of the targeted{frac}"
    )
    click.echo(f"support     {d['support']}   exact: {'yes' if d['exact'] else 'no'}")
    if d["dense"]:
        click.echo(f"dense       {shown(', '.join(d['dense']))}")
    click.echo(f"provenance  {json.dumps(d['provenance'])}")
    if d["task"]:
        click.echo(f"task        {json.dumps(d['task'])}")
    width = max([len(t["name"]) for t in d["per_tensor"]] + [6])
    click.echo(
        f"\n{'tensor':<{width}}  {'shape':>14}  {'dtype':>5}  {'count':>10}  {'density':>8}  {'|v| mean':>9}  {'|v| max':>9}"
    )
    for t in d["per_tensor"]:
        shape = "x".join(map(str, t["shape"]))
        click.echo(
            f"{t['name']:<{width}}  {shape:>14}  {t['dtype']:>5}  {t['count']:>10,}  {t['density']:>8.3%}"
            f"  {t['abs_mean']:>9.2e}  {t['abs_max']:>9.2e}"
        )


@cli.command()
@click.argument("base")
@click.argument("adapter")
@click.option("--revision", help="Hub revision of BASE.")
@click.pass_context
def verify(ctx, base, adapter, revision):
    """Exit 0 iff ADAPTER belongs to BASE: names, shapes, dtypes and fingerprints all match."""
    from .checkpoint import open_checkpoint
    from .errors import MismatchError, shown
    from .surgery import verify_adapter

    a = _load(adapter)
    problems = verify_adapter(open_checkpoint(base, revision), a, _progress(ctx))
    if problems:  # the report on stdout, one per tensor; the verdict is the one error line
        for line in problems:
            click.echo(f"{shown(adapter)}: {line}")
        raise MismatchError(
            f"does not match {shown(base)} ({len(problems)} of {len(a.deltas) + len(a.dense)} tensors differ)", adapter
        )
    _say(ctx, f"{shown(adapter)}: matches {shown(base)} ({len(a.deltas)} tensors, {a.num_values:,} values)")


@cli.command()
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", "out", required=True, help="The .spra file to write.")
@_density_option("Keep only the largest |Δ| per tensor (else: every change, exactly).")
@_targets_options("all")
@click.option("--values-dtype", type=VALUES_DTYPES, default="bf16", show_default=True)
@click.option("--report", "report_path", help="Write the per-tensor report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def diff(ctx, base, tuned, out, density, targets, exclude, values_dtype, report_path, overwrite):
    """Extract the adapter that turns BASE into TUNED (a fine-tuned checkpoint).

    Without --density, `apply BASE OUT` reproduces TUNED bit-exactly.

    \b
    Example:  spra-tools diff ./llama ./llama-sft -o sft.spra --density 0.01
    """
    from .algebra import diff_checkpoints
    from .checkpoint import open_checkpoint

    _check_outputs(out, overwrite, [base, tuned], report_path)
    base_ckpt, tuned_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    adapter, report = diff_checkpoints(
        base_ckpt,
        tuned_ckpt,
        density,
        targets,
        exclude,
        SHORT_DTYPES[values_dtype],
        _progress(ctx),
    )
    _save(adapter, out, overwrite, [base_ckpt.path, tuned_ckpt.path], report, report_path)
    upgraded = [n for n, r in report["tensors"].items() if "values" in r]
    _say(
        ctx,
        f"wrote {out}: {adapter.num_values:,} values in {len(adapter.deltas)} tensors"
        f"{f', {len(adapter.dense)} dense' if adapter.dense else ''}, {human_size(os.path.getsize(out))}",
    )
    if density is not None:
        _say(ctx, f"retained {report['retained']:.2%} of ||Δ||²")
    if upgraded:
        _say(ctx, f"{len(upgraded)} tensors stored with fp32 values to stay exact")


@cli.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True, help="Directory (or .safetensors file) to write.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply every value by X.")
@click.option("--revision", help="Hub revision of BASE.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-nonfinite", is_flag=True, help="Apply NaN/Inf values instead of refusing them.")
@click.pass_context
def apply(ctx, base, adapters, out, scale, revision, overwrite, allow_nonfinite):
    """Write BASE with ADAPTERS applied (in order) as a new checkpoint.

    Each adapter is verified against BASE first; a wrong base is refused and nothing is written.

    \b
    Example:  spra-tools apply meta-llama/Llama-3.1-8B task.spra -o merged/
    """
    from .file_apply import apply_files

    _check_outputs(out, overwrite, [base, *adapters])
    stats = apply_files(base, list(adapters), out, scale, revision, overwrite, _progress(ctx), allow_nonfinite)
    _say(ctx, f"wrote {out}: {stats['values']:,} values in {stats['tensors']} tensors, {stats['seconds']:.2f} s")


@cli.command()
@click.argument("adapter")
@click.option("-o", "--output", "out", required=True, help="The directory to write.")
@click.option("--base", metavar="HUB_ID", help="Base model id for the card (default: the adapter's recorded base).")
@click.option("--license", "license_", metavar="ID", help="License id for the card's front matter (e.g. apache-2.0).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def export(ctx, adapter, out, base, license_, overwrite):
    """Write a shareable directory: the .spra file, adapter_config.json and a README.md model card.

    \b
    Example:  spra-tools export task.spra -o task-adapter/ --base meta-llama/Llama-3.2-1B
    """
    from .share import export_adapter

    _check_outputs(out, overwrite, [adapter])
    export_adapter(adapter, out, base, overwrite, license_, warn=_warn)
    _say(ctx, f"wrote {out}: {os.path.basename(adapter)}, adapter_config.json, README.md")


@cli.command()
@click.argument("adapter_or_dir")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", metavar="BRANCH", help="Push to this branch (created from main if missing).")
@click.option("--base", metavar="HUB_ID", help="Base model id for the card, when pushing a .spra file.")
@click.pass_context
def push(ctx, adapter_or_dir, repo_id, private, revision, base):
    """Upload an adapter (a .spra file, exported on the fly, or an export directory) to the Hub.

    The token is huggingface_hub's: HF_TOKEN, else `huggingface-cli login`.

    \b
    Example:  spra-tools push task.spra acme/llama-task-spra --base meta-llama/Llama-3.2-1B
    """
    from .share import push as push_adapter

    url = push_adapter(adapter_or_dir, repo_id, private=private, revision=revision, base=base, progress=_progress(ctx),
                       warn=_warn)  # fmt: skip
    _say(ctx, f"pushed {adapter_or_dir} to {repo_id}{f'@{revision}' if revision else ''}: {url}")


@cli.command()
@click.argument("repo_id")
@click.option("-o", "--output", "out", required=True, help="The directory to write.")
@click.option("--revision", help="Branch, tag or commit to download.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def pull(ctx, repo_id, out, revision, overwrite):
    """Download an adapter repository from the Hub; OUT appears only if its .spra file reads.

    \b
    Example:  spra-tools pull acme/llama-task-spra -o task-adapter/
    """
    from .share import pull as pull_adapter

    path = pull_adapter(repo_id, out, revision=revision, overwrite=overwrite, progress=_progress(ctx))
    spra = next(path.glob("*.spra"))
    _say(ctx, f"wrote {out}: {spra.name} ({human_size(spra.stat().st_size)}) from {repo_id}")


def _numbers(ctx, param, value: str | None) -> list[float] | None:
    """A comma-separated list of numbers (--weights 1,0.7)."""
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",")]
    except ValueError:
        from .errors import SpraError

        raise SpraError(f"--{param.name} {value!r} is not a comma-separated list of numbers") from None


class _ChoiceFrom(click.Choice):
    """A click.Choice over a list declared in a library module that imports torch, read when first
    needed (parsing, the command's own --help) so that `spra-tools --help` stays fast."""

    def __init__(self, module: str, name: str, *extra: str):
        self._source = (module, name, extra)
        self.case_sensitive = True

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:
        module, name, extra = self._source
        return (*extra, *getattr(importlib.import_module(module, __package__), name))


@cli.command(epilog=methods.methods_help())
@click.argument("adapters", nargs=-1)
@click.option("-o", "--output", "out", required=True, help="The .spra file to write.")
@click.option(
    "--method", type=click.Choice(methods.method_names()), help=f"How to combine (default: {methods.DEFAULT_METHOD})."
)
@click.option("--weights", metavar="W1,W2,...", callback=_numbers,
              help=f"One weight per adapter ({methods.methods_taking('weights')}).")  # fmt: skip
@_density_option(f"Fraction of each adapter's values kept ({methods.methods_taking('density')}).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1),
              help=f"Seed of the random drops ({methods.methods_taking('seed')}; default 0).")  # fmt: skip
@click.option("--recipe", type=click.Path(dir_okay=False), help="A mergekit-style YAML recipe (merge_method, models).")
@click.option("--base", help="The adapters' base checkpoint: needed for a new support (different seeds, density < 1).")
@click.option("--report", "report_path", help="Write the per-tensor report (overlap, sign conflicts, norms) as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def merge(ctx, adapters, out, method, weights, density, seed, recipe, base, report_path, overwrite):
    """Merge task adapters into one, without loading the model (the union of their supports).

    Flags override the recipe's values; adapters given as arguments replace its models.

    Adapters of one seed and density share their supports; adapters of different seeds make a new
    union support, and trimming or dropping (a density below 1) a smaller one: the fingerprints of
    a new support need the base, so give --base.

    \b
    Examples:
      spra-tools merge math.spra code.spra chat.spra -o multi.spra
      spra-tools merge a.spra b.spra -o ab.spra --base ./llama   # different seeds
      spra-tools merge a.spra b.spra -o ab.spra --method ties --density 0.5 --weights 1,0.7 --base ./llama
      spra-tools merge --recipe merge.yaml -o multi.spra
    """
    from .algebra.merge import merge_files
    from .algebra.recipe import MergeRequest, read_recipe

    request = (read_recipe(recipe) if recipe else MergeRequest()).with_flags(
        adapters, method, weights, density, seed, base
    )
    inputs = [recipe, *request.paths, request.base]  # the recipe's adapters and base, or the flags'
    _check_outputs(out, overwrite, inputs, report_path)
    merged, report = merge_files(request)
    _save(merged, out, overwrite, inputs, report, report_path)
    _say(
        ctx,
        f"wrote {out}: {merged.num_values:,} values in {len(merged.deltas)} tensors from {len(request.paths)} adapters"
        f" ({report['overlap']:,} shared indices, {report['sign_conflicts']:,} sign conflicts)",
    )


@cli.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True, help="The .spra file to write.")
@click.option("--values-dtype", type=VALUES_DTYPES, default="bf16", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def stack(ctx, base, adapters, out, values_dtype, overwrite):
    """Compose a chain (B trained on BASE+A, ...) into one adapter: applying it to BASE equals
    applying ADAPTERS in order, bit for bit.

    \b
    Example:  spra-tools stack ./llama a.spra b.spra -o ab.spra
    """
    from .algebra.stack import stack_adapters
    from .checkpoint import open_checkpoint

    _check_outputs(out, overwrite, [base, *adapters])
    ckpt = open_checkpoint(base)
    stacked = stack_adapters(ckpt, [(p, _load(p)) for p in adapters], SHORT_DTYPES[values_dtype])
    stacked.save(out, overwrite, inputs=[ckpt.path, *adapters])
    _say(
        ctx,
        f"wrote {out}: {stacked.num_values:,} values in {len(stacked.deltas)} tensors from {len(adapters)} adapters",
    )


@cli.command()
@click.argument("adapter")
@click.option("-o", "--output", "out", required=True, help="The .spra file to write.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), required=True, help="Seed of the new supports.")
@_density_option("Density of the new supports (default: the adapter's; inferred with --compact).")
@click.option("--base", help="The base checkpoint: needed for the fingerprints of new supports.")
@click.option("--compact", is_flag=True, help="Only store explicit supports that equal the seeded one as seeded.")
@click.option("--values-dtype", type=VALUES_DTYPES, help="Store the values in this dtype (default: as they are).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def reseed(ctx, adapter, out, seed, density, base, compact, values_dtype, overwrite):
    """Move ADAPTER to the seeded supports of SEED (values kept where the supports meet).

    With its own seed and density this is the identity. --compact changes no values: it turns
    explicit supports that equal a seeded one into seeded storage (2 bytes per value).

    \b
    Example:  spra-tools reseed task.spra -o task-s7.spra --seed 7 --base ./llama
    """
    from .algebra.reseed import compact_adapter, reseed_adapter
    from .checkpoint import open_checkpoint

    inputs = [adapter, base]
    _check_outputs(out, overwrite, inputs)
    a = _load(adapter)
    if values_dtype:
        from .dtypes import TORCH_DTYPES

        a = a.with_values_dtype(TORCH_DTYPES[SHORT_DTYPES[values_dtype]])
    if compact:
        result, changed = compact_adapter(a, seed, density, adapter)
        result.save(out, overwrite, inputs=inputs)
        _say(ctx, f"wrote {out}: {changed} of {len(a.deltas)} tensors now seeded")
        return
    ckpt = open_checkpoint(base) if base else None
    result, report = reseed_adapter(a, seed, density, ckpt, adapter)
    result.save(out, overwrite, inputs=[*inputs, ckpt and ckpt.path])
    _say(ctx, f"wrote {out}: {result.num_values:,} values; retained {report['retained']:.2%} of ||Δ||²")


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def compare(a, b, as_json):
    """Per tensor: support overlap, cosine of the deltas on the overlap, norms; then a summary."""
    from .errors import shown
    from .report import compare_adapters

    result = compare_adapters(_load(a), _load(b))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    result["tensors"] = {shown(name): t for name, t in result["tensors"].items()}
    width = max([len(n) for n in result["tensors"]] + [6])
    click.echo(f"{'tensor':<{width}}  {'overlap':>9}  {'cosine':>7}  {'|a|':>9}  {'|b|':>9}")
    for name, t in result["tensors"].items():
        if "only_in" in t:
            click.echo(f"{name:<{width}}  only in {t['only_in']}")
            continue
        cos = "-" if t["cosine_on_overlap"] is None else f"{t['cosine_on_overlap']:.3f}"
        click.echo(f"{name:<{width}}  {t['overlap']:>9,}  {cos:>7}  {t['norm_a']:>9.3e}  {t['norm_b']:>9.3e}")
    s = result["summary"]
    click.echo(
        f"{s['tensors_in_both']} tensors in both, {s['only_in_one']} in one only; {s['overlap']:,} shared indices"
        f" ({s['values_a']:,} values in A, {s['values_b']:,} in B)"
    )


@cli.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, help="The .spra file or directory to write.")
@click.option("--from", "source", type=_ChoiceFrom(".algebra.convert", "SOURCES", "auto"), default="auto",
              show_default=True, help="What SRC is (auto: by its files).")  # fmt: skip
@click.option("--to", "target", type=_ChoiceFrom(".algebra.convert", "TARGETS"), help="Default: the other format.")
@click.option("--base", help="The base checkpoint (default: the one SRC records).")
@_density_option("LoRA: keep the largest |ΔW| per tensor (default: every element).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.pass_context
def convert(ctx, src, out, source, target, base, density, overwrite):
    """Convert between .spra and the peft-sparta layout, or a PEFT LoRA adapter into a sparse adapter.

    \b
    Examples:
      spra-tools convert peft_sparta_dir/ -o task.spra --base ./llama
      spra-tools convert task.spra -o peft_sparta_dir/ --to peft-sparta
      spra-tools convert lora_dir/ -o lora.spra --density 0.01
    """
    from .algebra.convert import convert_files

    _check_outputs(out, overwrite, [src, base])
    adapter, target, base_name = convert_files(src, out, source, target, base, density, overwrite)
    if target == "peft-sparta":
        _say(ctx, f"wrote {out}: peft-sparta layout of {adapter.num_values:,} values (base {base_name})")
        return
    retained = adapter.provenance.get("retained_total")
    extra = f"; retained {retained:.2%} of ||ΔW||²" if isinstance(retained, float) and density is not None else ""
    _say(ctx, f"wrote {out}: {adapter.num_values:,} values in {len(adapter.deltas)} tensors{extra}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def env(as_json):
    """Versions, devices, and the status of the compiled extension."""
    from .report import environment

    e = environment()
    if as_json:
        click.echo(json.dumps(e, indent=2))
        return
    for key, value in e.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        click.echo(f"{key:<16}{value}")


@cli.command("build-ext")
@click.option("--kind", type=click.Choice(["all", "cpu", "cuda"]), default="all", show_default=True)
def build_ext(kind):
    """Build the compiled extension now (it otherwise builds on first use) and report its status.

    Exit 1 if a requested build fails. CUDA is built when torch is a CUDA build and CUDA_HOME
    holds nvcc; without a visible GPU it targets TORCH_CUDA_ARCH_LIST (default 9.0).
    """
    from .ops import extension

    failed = False
    for k in extension.KINDS if kind == "all" else (kind,):
        status = extension.load(k)
        click.echo(f"{k:<5} {status}")
        failed |= status != "ok" and (kind != "all" or status.startswith("build failed"))
    if failed:
        sys.exit(1)


class _ConfigOption(click.Option):
    """An option whose shown default is its config field's (the option's own default stays None, so
    that an absent flag keeps the value of a --config file)."""

    def __init__(self, *args, shown_default: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown_default = shown_default

    def get_help_extra(self, ctx):
        extra = super().get_help_extra(ctx)
        if self.shown_default is not None:
            extra["default"] = self.shown_default
        return extra


def _config_options(config_class):
    """Click parameters of a config dataclass's fields, from each field's type, default and declared
    help (field.metadata): Literal -> choices, bool -> --x/--no-x, tuple[str, ...] -> repeatable,
    tuple[float, float] -> two numbers. Fields without help are not options. Values are checked by
    the config itself, which names the flag in its errors."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)

    def wrap(f):
        for field in reversed(dataclasses.fields(config_class)):
            meta = field.metadata
            if meta.get("argument"):
                f = click.argument(field.name, required=False)(f)
                continue
            if not meta.get("help"):
                continue
            flag = "--" + field.name.replace("_", "-")
            hint = hints[field.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if type(None) in typing.get_args(hint):  # X | None
                (hint,) = args
                args = list(typing.get_args(hint))
            kwargs = dict(help=meta["help"], metavar=meta.get("metavar"), default=None, cls=_ConfigOption)
            if typing.get_origin(hint) is typing.Literal:
                kwargs["type"] = click.Choice(args)
            elif hint is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            elif typing.get_origin(hint) is tuple and args[-1] is Ellipsis:
                kwargs.update(type=args[0], multiple=True)
            elif typing.get_origin(hint) is tuple:
                kwargs.update(type=args[0], nargs=len(args))
            else:
                kwargs["type"] = hint
            default = field.default
            if default not in (dataclasses.MISSING, None, ()) and hint is not bool:
                joined = ", " if kwargs.get("multiple") else " "
                kwargs["shown_default"] = joined.join(map(str, default)) if isinstance(default, tuple) else str(default)
            names = [meta["short"], flag] if "short" in meta else [flag]
            f = click.option(*names, field.name, **kwargs)(f)
        return f

    return wrap


@cli.command(context_settings={"max_content_width": 110})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML with the same keys; flags win.")
@_config_options(TrainConfig)
@click.pass_context
def train(ctx, base, config_file, **flags):
    """Fine-tune a seeded sparse adapter of BASE on local data (causal-LM SFT or classification).

    \b
    Records: {"text"}, {"prompt", "completion"}, {"messages"} (chat template), or
    {"text", "label"} with --task seq-cls (the new head trains densely and is stored whole).
    Multi-GPU: torchrun --nproc-per-node N -m spra_tools train ...  (DDP; rank 0 writes)
    """
    from .train.loop import train as run

    config = TrainConfig.resolve(config_file, {"base": base, **flags})
    run(config, echo=lambda m: _say(ctx, m), progress=_progress(ctx))


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the demo's files here (default: a temp dir).")
@click.pass_context
def demo(ctx, workdir):
    """Build a tiny Llama locally, make, apply, verify and extract an adapter; report sizes and timings."""
    from .demo import run_demo

    run_demo(workdir, echo=lambda m: _say(ctx, m))


def main() -> None:
    from .errors import SpraError, shown

    try:
        cli.main(standalone_mode=False, prog_name="spra-tools")
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except (SpraError, OSError, MemoryError) as e:
        if _DEBUG:
            raise
        if isinstance(e, OSError) and e.filename:
            message = f"{e.filename}: {e.strerror or e}"
        else:
            message = str(e) or e.__class__.__name__
        click.echo(f"spra-tools: error: {shown(message)}", err=True)
        sys.exit(1)
