"""``tpm trace``: run prompts while reading and writing activations (mode 3)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tpm_fed.client import Client
from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.interventions import LogitLens, Save, TraceRequest


@click.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--model", default=None, help="NAME or NAME@VERSION (default: the federation's first model).")
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSON intervention spec: steps, logit_lens, attention_lens, attention_patterns.")
@click.option("--save", "saves", multiple=True, metavar="POINT", help="Save this point (repeatable).")
@click.option("--logit-lens", is_flag=True, help="Decode every layer's residual stream.")
@click.option("--top-k", type=int, default=3, show_default=True, help="Tokens per layer for --logit-lens.")
@click.option("--max-tokens", "max_new_tokens", type=int, default=0, show_default=True,
              help="Generate this many tokens with the edits in place (0: one forward pass).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every returned tensor to this .safetensors file.")
@click.option("--project", default=None, help="Project to charge (needed if you are in several).")
@click.option("--site", default=None, help="Run only on this site.")
def trace(prompts, model, spec_file, saves, logit_lens, top_k, max_new_tokens, out, project, site) -> None:
    """Run PROMPTS through the model, applying and returning what the spec asks for.

    Points are module paths of the model (see `tpm models inspect`), e.g.
    model.layers.2, model.layers.2.mlp.input, model.layers.2.self_attn.heads[1].
    """
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
    for prompt, tokens in enumerate(result.prompt_tokens):
        if result.completions:
            click.echo(f"[{prompt}] generated: {result.completions[prompt].text!r}")
        if request.logit_lens is not None:
            lens = result.logit_lens(prompt)
            click.echo(f"[{prompt}] logit lens at the last token {tokens[-1]!r}:")
            for layer, row in enumerate(lens.tokens):
                shown = ", ".join(f"{t!r} {p:.2f}" for t, p in zip(row[-1], lens.probs[layer][-1].tolist(), strict=True))
                click.echo(f"  layer {layer}: {shown}")


def _described(result, out: Path | None) -> dict[str, str]:
    """Each tensor's dtype and shape: from the written file's header alone when there is one."""
    if out is None:
        return {name: f"{tensor.dtype} {list(tensor.shape)}" for name, tensor in result.tensors.items()}
    from safetensors import safe_open

    with safe_open(str(out), framework="numpy") as tensors:
        return {name: f"{tensors.get_slice(name).get_dtype()} {tensors.get_slice(name).get_shape()}"
                for name in tensors.keys()}


def _read_spec(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text())
    except ValueError as error:
        raise InvalidRequest(f"{path}: not JSON: {error}") from None
    if not isinstance(spec, dict):
        raise InvalidRequest(f"{path}: the spec must be a JSON object with steps, logit_lens, ...")
    return spec
