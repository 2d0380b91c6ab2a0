"""``tpm service status | stop | restart | logs``: the home's background service."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

import click

from tpm_fed.connection import ServiceAddress, ensure_service, running_service
from tpm_fed.home import TpmHome


@click.group()
def service() -> None:
    """The service that owns this home's federation (started by the first request)."""


@service.command()
def status() -> None:
    """Say whether the home's service runs, where, and its token (for the openai client, curl...)."""
    home = TpmHome.default()
    address = running_service(home)
    if address is None:
        click.echo(f"no service is running for {home.root} (the next request starts one)")
        raise SystemExit(3)
    click.echo(f"running for {home.root}: {address.url} (pid {address.pid})")
    if address.token:
        click.echo(f"token: {address.token}")
        click.echo(f"web page (this link signs you in): {address.url}/#token={address.token}")
        click.echo(f"e.g. OpenAI(base_url=\"{address.url}/v1\", api_key=\"{address.token}\")")
    if vllm_installed_after(home.root / "service.json"):
        click.echo("vLLM was installed after this service started: replicas it loaded before stay on torch "
                   "(their results say vllm is not installed); `tpm service restart` serves them with vLLM")


def vllm_installed_after(started: Path) -> bool:
    """Whether vLLM is installed here and newer than ``started`` (the service's file, written as it started).

    Found, not imported (the CLI never imports vLLM); pip writes a package's files
    as it installs it, so the time of ``vllm/__init__.py`` is when it was installed.
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        return False
    try:
        return Path(spec.origin).stat().st_mtime > started.stat().st_mtime
    except OSError:
        return False


@service.command()
@click.option("--timeout", type=float, default=40.0, show_default=True,
              help="Seconds to wait for requests in flight to finish.")
def stop(timeout: float) -> None:
    """Stop the home's service: requests in flight finish, then sites and replicas stop."""
    home = TpmHome.default()
    address = running_service(home)
    if address is None or address.pid is None:
        click.echo(f"no service is running for {home.root}")
        return
    _stop(address, timeout)


@service.command()
@click.option("--timeout", type=float, default=40.0, show_default=True,
              help="Seconds to wait for requests in flight to finish.")
def restart(timeout: float) -> None:
    """Stop the home's service and start it again (e.g. to serve with a vLLM installed since it started)."""
    home = TpmHome.default()
    address = running_service(home)
    if address is not None and address.pid is not None:
        _stop(address, timeout)
    address = ensure_service(home, announce=True)
    click.echo(f"running for {home.root}: {address.url} (pid {address.pid})")


def _stop(address: ServiceAddress, timeout: float) -> None:
    os.kill(address.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(address.pid, 0)
        except ProcessLookupError:
            click.echo(f"stopped the service (pid {address.pid})")
            return
        time.sleep(0.1)
    raise click.ClickException(f"the service (pid {address.pid}) is still stopping after {timeout:g} s")


@service.command()
@click.option("-n", "--lines", type=int, default=40, show_default=True)
def logs(lines: int) -> None:
    """Print the end of $TPM_HOME/service.log."""
    path = TpmHome.default().root / "service.log"
    if not path.exists():
        raise click.ClickException(f"{path} does not exist: no service has run for this home")
    click.echo("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
