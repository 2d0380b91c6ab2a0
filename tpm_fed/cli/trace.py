"""``tpm trace``: run prompts while reading and writing activations (mode 3)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tpm_fed.client import Client
from tpm_fed.interventions import LogitLens, Save, SessionRequest, TraceRequest
from tpm_fed.protocol.dtypes import BY_CODE
from tpm_fed.protocol.errors import InvalidRequest


@click.command()
@click.argument("prompts", nargs=-1)
@click.option("--model", default=None, help="NAME or NAME@VERSION (default: the federation's first model).")
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSON intervention spec: steps, logit_lens, attention_lens, attention_patterns.")
@click.option("--session", "session_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSON session: {\"steps\": [{\"name\", \"prompts\", \"steps\", ...}, ...]} run on one "
                   "replica, later steps taking value_from earlier saves (instead of PROMPTS).")
@click.option("--save", "saves", multiple=True, metavar="POINT", help="Save this point (repeatable).")
@click.option("--logit-lens", is_flag=True, help="Decode every layer's residual stream.")
@click.option("--top-k", type=int, default=3, show_default=True, help="Tokens per layer for --logit-lens.")
@click.option("--max-tokens", "max_new_tokens", type=int, default=0, show_default=True,
              help="Generate this many tokens with the edits in place (0: one forward pass).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every returned tensor to this .safetensors file.")
@click.option("--project", default=None, help="Project to charge (needed if you are in several).")
@click.option("--site", default=None, help="Run only on this site.")
def trace(prompts, model, spec_file, session_file, saves, logit_lens, top_k, max_new_tokens, out, project,
          site) -> None:
    """Run PROMPTS through the model, applying and returning what the spec asks for.

    Points are module paths of the model (see `tpm models inspect`), e.g.
    model.layers.2, model.layers.2.mlp.input, model.layers.2.self_attn.heads[1].
    """
    if session_file is not None:
        if prompts or spec_file or saves or logit_lens or max_new_tokens:
            raise click.UsageError("--session runs the file's own steps: give no PROMPTS, --spec, --save, "
                                   "--logit-lens or --max-tokens with it")
        _session(_read_spec(session_file), model, out, project, site)
        return
    if not prompts:
        raise click.UsageError("give PROMPTS to trace (or --session FILE)")
    fields = _read_spec(spec_file) if spec_file else {}
    fields.setdefault("steps", [])
    fields["steps"] = [*fields["steps"], *(Save(point=p).model_dump() for p in saves)]
    if logit_lens:
        fields["logit_lens"] = LogitLens(top_k=top_k).model_dump()
    with Client(progress=True) as client:
        request = TraceRequest.create(model or client.default_model(), prompts=list(prompts),
                                      max_new_tokens=max_new_tokens, project=project, site=site, **fields)
        pending = client.submit(request)
        click.echo("tpm: running the trace (a cold start takes seconds)...", err=True)
        result = pending.result()
    where = " (by reference)" if result.tensors_ref is not None else ""
    click.echo(f"model {result.model}@{result.version} on {result.site}; "
               f"{result.usage.activation_bytes:,} bytes of tensors{where}; charged {result.charge.charged_su:.6f} SU")
    if out is not None:  # first, and chunk by chunk: a large result is never held in memory whole
        written = result.save_tensors(out)
        click.echo(f"tensors written to {out} ({written:,} bytes)")
    for name, described in _described(result, out).items():
        if ".ids" not in name and ".probs" not in name:
            click.echo(f"  {name}: {described}")
    for prompt in range(len(result.prompt_tokens)):
        if result.completions:
            click.echo(f"[{prompt}] generated: {result.completions[prompt].text!r}")
        if request.logit_lens is not None:
            for line in lens_lines(result, prompt):
                click.echo(line)


def lens_lines(result, prompt: int) -> list[str]:
    """The logit lens at ``prompt``'s last token, one line per layer, in the text each token stands for."""
    lens = result.logit_lens(prompt)
    last = result.prompt_texts[prompt][-1]
    lines = [f"[{prompt}] logit lens at the last token {shown_token(last)} ('·' marks a space):"]
    for layer, row in enumerate(lens.texts):
        tops = zip(row[-1], lens.probs[layer][-1].tolist(), strict=True)
        lines.append(f"  layer {layer}: " + ", ".join(f"{shown_token(text)} {p:.2f}" for text, p in tops))
    return lines


def shown_token(text: str) -> str:
    """A token's text, quoted, with its spaces visible: ``' is'`` shows as ``'·is'``, a newline as ``'\\n'``."""
    return repr(text.replace(" ", "·"))


def _session(fields: dict, model: str | None, out: Path | None, project: str | None, site: str | None) -> None:
    with Client(progress=True) as client:
        request = SessionRequest.create(model or client.default_model(), project=project, site=site, **fields)
        pending = client.submit(request)
        click.echo(f"tpm: running a session of {len(request.steps)} steps on one replica...", err=True)
        result = pending.result()
    where = " (by reference)" if result.tensors_ref is not None else ""
    click.echo(f"model {result.model}@{result.version} on {result.site}; {len(result.steps)} steps; "
               f"{result.usage.activation_bytes:,} bytes of tensors{where}; charged {result.charge.charged_su:.6f} SU")
    if out is not None:
        click.echo(f"tensors written to {out} ({result.save_tensors(out):,} bytes)")
    described = _described(result, out)
    for step in result.steps:
        click.echo(f"step {step.name}: {step.usage.prompt_tokens} prompt tokens, "
                   f"{step.usage.completion_tokens} generated; charged {step.charged_su:.6f} SU")
        for prompt, completion in enumerate(step.completions):
            click.echo(f"  [{prompt}] generated: {completion.text!r}")
        for name, text in described.items():
            if name.startswith(f"{step.name}/"):
                click.echo(f"  {name.split('/', 1)[1]}: {text}")


def _described(result, out: Path | None) -> dict[str, str]:
    """Each tensor's dtype and shape: from the written file's header alone when there is one."""
    if out is None:
        return {name: f"{tensor.dtype} {list(tensor.shape)}" for name, tensor in result.tensors.items()}
    from safetensors import safe_open


    with safe_open(str(out), framework="numpy") as tensors:
        slices = {name: tensors.get_slice(name) for name in tensors.keys()}
        return {name: f"{BY_CODE[part.get_dtype()].name} {part.get_shape()}" for name, part in slices.items()}


def _read_spec(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text())
    except ValueError as error:
        raise InvalidRequest(f"{path}: not JSON: {error}") from None
    if not isinstance(spec, dict):
        raise InvalidRequest(f"{path}: expected a JSON object (a spec's steps, logit_lens...; a session's steps)")
    return spec
