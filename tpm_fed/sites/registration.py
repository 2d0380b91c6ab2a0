"""The functions a Globus Compute site runs, and registering them with the service.

There is one serving function, ``functions.serve:serve_batch``, for every
request kind, named by :data:`~tpm_fed.protocol.entrypoints.SERVE_BATCH`. Globus Compute stores it by reference, so its behaviour is the
tpm-fed installed at the endpoint; the id is recorded with the serving code
version (:mod:`tpm_fed.protocol.code_version`), and a changed version is registered
anew rather than silently reusing an id that names other code.
"""

from __future__ import annotations

from typing import Any

from tpm_fed.protocol.code_version import serving_code_version
from tpm_fed.protocol.entrypoints import SERVING_FUNCTIONS, WorkerFunction
from tpm_fed.protocol.errors import FunctionNotRegistered
from tpm_fed.federation import RegisteredFunction, SiteConfig


def stale_functions(site: SiteConfig) -> list[str]:
    """Serving functions the site has no id for, or an id registered for other code."""
    version = serving_code_version()
    return [
        name for name in SERVING_FUNCTIONS
        if name not in site.functions or site.functions[name].code_version != version
    ]


def registered_id(site: SiteConfig, function: WorkerFunction) -> str:
    """The id to submit ``function`` by at ``site``.

    Raises:
        FunctionNotRegistered: No id, or one registered for code other than this.
    """
    name = function.__name__
    command = f"run `tpm functions register --site {site.name}`"
    recorded = site.functions.get(name)
    if recorded is None:
        raise FunctionNotRegistered(f"site {site.name!r} has no registered id for {name!r}: {command}")
    if recorded.code_version != serving_code_version():
        raise FunctionNotRegistered(
            f"site {site.name!r}: {name!r} was registered for serving code {recorded.code_version}, "
            f"this is {serving_code_version()}: {command}"
        )
    return str(recorded.function_id)


def register(
    client: Any, site: SiteConfig, *, force: bool = False
) -> tuple[dict[str, RegisteredFunction], list[str]]:
    """Register the site's stale serving functions (all of them with ``force``).

    Args:
        client: A logged-in ``globus_compute_sdk.Client``.

    Returns:
        The site's whole function table, new ids included, and the names registered now.
    """
    version = serving_code_version()
    table = dict(site.functions)
    stale = stale_functions(site)
    registered = [name for name in SERVING_FUNCTIONS if force or name in stale]
    for name in registered:
        function_id = client.register_function(
            SERVING_FUNCTIONS[name], description=f"tpm-fed {name} (serving code {version})"
        )
        table[name] = RegisteredFunction(function_id=function_id, code_version=version)
    return table, registered
