"""What this worker permits, read from its endpoint's own configuration and never from a task.

Anyone who may submit to an endpoint can call the registered serving
function by id with arguments of their choosing (docs/globus-compute.md
shows how), so nothing in a task may grant a permission. What a worker
allows comes from the side of the endpoint's operator: the environment the
endpoint config sets for its workers (the provider's ``worker_init``), or a
policy file on the endpoint host named there.

==========================  ====================================================
``TPM_ALLOW_CALLER_CODE``   ``1``: a caller's own Python may run here (python
                            hooks in traces, ``input_code``/``head_code`` in
                            embeddings). Unset or ``0``: refused (``NotPermitted``).
``TPM_ADAPTER_REGISTRY``    The adapter registry's folder (an absolute path).
                            Unset: this worker serves no registered adapters.
``TPM_MAX_RESULT_BYTES``    The largest result one request may get back
                            (at most, and by default, the protocol's limit).
``TPM_RESULT_STORE``        Where results too large to travel inline are
                            written (a ProxyStore connector spec:
                            ``file:///path`` on a file system the service can
                            read, or ``redis://host:port``). Unset: every
                            result travels inline, up to the limit above.
``TPM_INLINE_RESULT_BYTES`` Results larger than this go to the result store
                            (default 1 MiB).
``TPM_MAX_REFERENCE_BYTES`` The largest result one request may leave in the
                            store (default 1 GiB).
``TPM_RESULT_RETENTION_S``  How long the store keeps a result (default a day).
``TPM_MAX_SESSION_STEPS``   The most steps one session may run here
                            (default, and at most, 16).
``TPM_STREAM_HOSTS``        Origins (comma-separated ``scheme://host:port``)
                            this worker may send streamed tokens to: the
                            service's back channel. Scheme, host and port
                            must all match (a task names where to stream, so
                            another port on the right host, where anyone on
                            that host may listen, gets nothing).
``TPM_STREAM_LOOPBACK``     ``1``: any loopback port too. Only for workers
                            the service starts itself on its own host (the
                            ``local`` site), which are given its bound URL.
``TPM_MODEL_ROOTS``         The folders (absolute, separated by ``:``) models
                            may be loaded from: the endpoint's model folders
                            and model store. A task names a model's folder,
                            so a folder outside these is refused
                            (``NotPermitted``) before anything in it is read.
                            Unset: any folder the account can read (set it
                            on every endpoint others may submit to).
``TPM_TORCH_DEVICE``        Where the torch backend runs a model: ``auto``
                            (the default: the first GPU when torch sees one,
                            else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
                            A GPU named here that torch cannot see refuses
                            the load (``ModelLoadError``), never falls back.
``TPM_BATCH_ROWS``         The most batch-line rows (requests at the batch
                            priority) a vLLM replica's engine holds at once;
                            the task's other batch lines wait in the worker
                            and enter as those end, so an interactive request
                            shares each step with at most this many
                            (:mod:`functions.batch_rows`). Unset: no cap, right
                            on GPUs (a step's time barely grows with its rows);
                            on CPUs, where it does, docs/performance.md gives
                            the trade-off.
``TPM_BATCH_ROWS_BESIDE_INTERACTIVE``
                            The most batch-line rows a vLLM replica's engine
                            steps while an interactive request is in it (0:
                            none). The others sit those steps out, keeping
                            their place and KV cache, and no waiting batch
                            line is admitted. Unset: 0 on a CPU, no pause on
                            a GPU (:mod:`functions.backends.interactive_first`).
``TPM_BATCH_TOKENS_AFTER_INTERACTIVE``
                            The most tokens a vLLM replica's step gives batch
                            rows within a second of an interactive request
                            (so the next one waits for a short step, not a
                            long one). Unset: 16 on a CPU, no limit on a GPU.
``TPM_STEP_TOKENS``         The most tokens one step of a vLLM replica's
                            engine holds (vLLM's ``max_num_batched_tokens``).
                            Unset: 512 on a CPU, vLLM's own server's size on
                            a GPU (:mod:`functions.backends.step_size`).
``TPM_WORKER_POLICY``       A YAML or JSON file holding the same settings
                            (``allow_caller_code``, ``adapter_registry``,
                            ``max_result_bytes``, ``result_store``... the
                            fields of :class:`WorkerPolicy`) instead of
                            the variables.
==========================  ====================================================

A policy that does not validate refuses every request with a
:class:`~tpm_fed.protocol.errors.SiteError` naming the variable (or the file
and key) at fault: a typo must not quietly run code, or quietly refuse it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tpm_fed.protocol.errors import NotPermitted, SiteError
from tpm_fed.protocol.limits import MAX_RESULT_BYTES
from tpm_fed.protocol.references import MAX_REFERENCE_BYTES
from tpm_fed.protocol.sessions import MAX_SESSION_STEPS

INLINE_RESULT_BYTES = 1024 * 1024
"""Results above this go to the endpoint's result store, when it has one."""

VARIABLES = {
    "allow_caller_code": "TPM_ALLOW_CALLER_CODE",
    "adapter_registry": "TPM_ADAPTER_REGISTRY",
    "max_result_bytes": "TPM_MAX_RESULT_BYTES",
    "stream_hosts": "TPM_STREAM_HOSTS",
    "stream_loopback": "TPM_STREAM_LOOPBACK",
    "result_store": "TPM_RESULT_STORE",
    "inline_result_bytes": "TPM_INLINE_RESULT_BYTES",
    "max_reference_bytes": "TPM_MAX_REFERENCE_BYTES",
    "result_retention_s": "TPM_RESULT_RETENTION_S",
    "max_session_steps": "TPM_MAX_SESSION_STEPS",
    "model_roots": "TPM_MODEL_ROOTS",
    "torch_device": "TPM_TORCH_DEVICE",
    "model_cache": "TPM_MODEL_CACHE",
    "batch_rows": "TPM_BATCH_ROWS",
    "batch_rows_beside_interactive": "TPM_BATCH_ROWS_BESIDE_INTERACTIVE",
    "batch_tokens_after_interactive": "TPM_BATCH_TOKENS_AFTER_INTERACTIVE",
    "step_tokens": "TPM_STEP_TOKENS",
}
"""Policy field -> the environment variable that sets it."""

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

POLICY_FILE = "TPM_WORKER_POLICY"
"""The environment variable naming a policy file (instead of the variables above)."""


class WorkerPolicy(BaseModel):
    """What a worker permits.

    Attributes:
        allow_caller_code: Callers' own Python may be deserialized and run here.
        adapter_registry: The adapter registry's folder, or None (no registered adapters).
        max_result_bytes: The largest result (tensor bytes) one request may get back.
        stream_hosts: Origins (``scheme://host:port``) streamed tokens may be sent to.
        stream_loopback: Streamed tokens may go to any loopback port (the service's own local site).
        result_store: Where large results are left for the caller (a connector spec,
            :mod:`tpm_fed.storage.result_stores`), or None: every result travels inline.
        inline_result_bytes: Results larger than this are left in the store.
        max_reference_bytes: The largest result one request may leave in the store.
        result_retention_s: How long a stored result is kept.
        max_session_steps: The most steps one session may run here.
        model_roots: The folders models may be loaded from (empty: any folder).
        torch_device: Where the torch backend runs models (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
        model_cache: Where store versions are materialized as folders for vLLM, once per node
            (:mod:`functions.model_cache`); None: ``~/.cache/tpm-fed/models``.
        batch_rows: The most batch-line rows in a vLLM replica's engine at once (None: no cap).
        batch_rows_beside_interactive: The most it steps while an interactive row is in it; the rest
            pause (None: 0 on a CPU, no pause on a GPU).
        batch_tokens_after_interactive: The most tokens its step gives batch rows within a second of an
            interactive row (None: 16 on a CPU, no limit on a GPU).
        step_tokens: The most tokens one step of its engine holds (None: 512 on a CPU, vLLM's own
            server's size on a GPU).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow_caller_code: bool = False
    adapter_registry: Path | None = None
    max_result_bytes: int = Field(default=MAX_RESULT_BYTES, ge=1, le=MAX_RESULT_BYTES)
    stream_hosts: list[str] = Field(default_factory=list)
    stream_loopback: bool = False
    result_store: str | None = None
    inline_result_bytes: int = Field(default=INLINE_RESULT_BYTES, ge=0, le=MAX_RESULT_BYTES)
    max_reference_bytes: int = Field(default=1024 ** 3, ge=1, le=MAX_REFERENCE_BYTES)
    result_retention_s: float = Field(default=86400.0, gt=0)
    max_session_steps: int = Field(default=MAX_SESSION_STEPS, ge=1, le=MAX_SESSION_STEPS)
    model_roots: list[Path] = Field(default_factory=list)
    torch_device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$")
    model_cache: Path | None = None
    batch_rows: int | None = Field(default=None, ge=1)
    batch_rows_beside_interactive: int | None = Field(default=None, ge=0)
    batch_tokens_after_interactive: int | None = Field(default=None, ge=1)
    step_tokens: int | None = Field(default=None, ge=1)

    @field_validator("result_store")
    @classmethod
    def _store_spec(cls, spec: str | None) -> str | None:
        from tpm_fed.storage.result_stores import check_spec

        return None if spec is None else check_spec(spec)

    @property
    def result_limit(self) -> int:
        """The largest result one request may get: by reference where there is a store, else inline."""
        return self.max_reference_bytes if self.result_store else self.max_result_bytes

    @field_validator("stream_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [host.strip() for host in value.split(",") if host.strip()] if isinstance(value, str) else value

    @field_validator("stream_hosts")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        origins = []
        for value in values:
            origin = _origin(value)
            if origin is None:
                raise ValueError(f"{value!r} is not an origin: name scheme, host and port "
                                 "(e.g. https://tpm.center.edu:443)")
            origins.append(origin)
        return origins

    def may_stream_to(self, url: str) -> bool:
        """Whether streamed tokens may go to ``url``: its scheme, host and port are an origin the operator
        listed (or, with ``stream_loopback``, it is any loopback port)."""
        origin = _origin(url)
        if origin is None:
            return False
        if self.stream_loopback and urlsplit(origin).hostname in LOOPBACK:
            return True
        return origin in self.stream_hosts

    @field_validator("adapter_registry", "model_cache")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError(f"{str(path)!r} is not an absolute path")
        return path

    @field_validator("model_roots", mode="before")
    @classmethod
    def _path_list(cls, value: Any) -> Any:
        return [part for part in value.split(os.pathsep) if part] if isinstance(value, str) else value

    @field_validator("model_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        for root in roots:
            cls._absolute(root)
        return roots

    def check_model_folder(self, name: str, folder: str) -> None:
        """Refuse a model folder outside this endpoint's model roots, before anything in it is read.

        Links and ``..`` are resolved first, so neither leads out of a root. The
        message names neither the folder nor the roots: a refusal tells a caller
        nothing about the endpoint's file system.

        Raises:
            NotPermitted: ``folder`` is outside every root (when the endpoint sets roots).
        """
        if not self.model_roots:
            return
        real = Path(folder).resolve()
        if any(real.is_relative_to(root.resolve()) for root in self.model_roots):
            return
        raise NotPermitted(
            f"model {name!r}: the folder the task names is outside this endpoint's model folders "
            f"(its operator lists them in {VARIABLES['model_roots']}); ask the service for a model by name"
        )

    def check_caller_code(self, what: str) -> None:
        """Refuse a request carrying the caller's own code, unless this endpoint runs it.

        Raises:
            NotPermitted: This endpoint's policy does not run callers' code.
        """
        if not self.allow_caller_code:
            raise NotPermitted(
                f"{what} run only on a site your project owns (byo); this endpoint runs no caller code "
                f"(its operator allows it with {VARIABLES['allow_caller_code']}=1 in the endpoint's worker_init)"
            )

    def load_caller_code(self, code: str, what: str) -> Any:
        """The caller's function, deserialized: the one place caller code enters a worker.

        The permission is checked first, so a refused request's code is never unpacked
        (unpickling alone can run code).

        Raises:
            NotPermitted: This endpoint's policy does not run callers' code.
        """
        self.check_caller_code(what)
        from globus_compute_sdk.serialize import ComputeSerializer

        return ComputeSerializer().deserialize(code)


def _origin(url: str) -> str | None:
    """``scheme://host:port`` of an http(s) URL (the port written out), or None if it is not one."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except (ValueError, AttributeError):
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def load_policy(environ: Mapping[str, str]) -> WorkerPolicy:
    """The policy an environment describes (empty variables count as unset).

    Raises:
        SiteError: A value does not validate, the policy file cannot be read, or both a
            policy file and variables are given (which would win is not obvious: refuse).
    """
    given = {field: environ[name] for field, name in VARIABLES.items() if environ.get(name)}
    policy_file = environ.get(POLICY_FILE)
    if policy_file:
        if given:
            names = ", ".join(VARIABLES[field] for field in given)
            raise SiteError(f"endpoint policy: {POLICY_FILE} names a policy file and {names} is set too; "
                            "set one or the other")
        return _from_file(Path(policy_file))
    try:
        return WorkerPolicy.model_validate(given)
    except ValidationError as error:
        raise SiteError("endpoint policy: " + _describe(error, lambda field: VARIABLES.get(field, field))) from None


def current_policy() -> WorkerPolicy:
    """This worker's policy, from its process environment (validated once per distinct setting).

    Raises:
        SiteError: The endpoint's policy does not validate.
    """
    return _policy_for(tuple(os.environ.get(name, "") for name in (*VARIABLES.values(), POLICY_FILE)))


@functools.lru_cache(maxsize=8)
def _policy_for(values: tuple[str, ...]) -> WorkerPolicy:
    return load_policy(dict(zip((*VARIABLES.values(), POLICY_FILE), values, strict=True)))


def _from_file(path: Path) -> WorkerPolicy:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except OSError as error:
        raise SiteError(f"endpoint policy: {POLICY_FILE}={path}: {error.strerror}") from None
    except UnicodeError as error:
        raise SiteError(f"endpoint policy: {POLICY_FILE}={path}: not UTF-8 text: {error}") from None
    except yaml.YAMLError as error:
        raise SiteError(f"endpoint policy: {POLICY_FILE}={path}: not YAML or JSON: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SiteError(f"endpoint policy: {POLICY_FILE}={path}: expected a mapping of settings")
    try:
        return WorkerPolicy.model_validate(data)
    except ValidationError as error:
        raise SiteError(f"endpoint policy: {POLICY_FILE}={path}: " + _describe(error, str)) from None


def _describe(error: ValidationError, name_of) -> str:
    problems = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else "policy"
        problems.append(f"{name_of(field)}={item.get('input')!r}: {item['msg']}")
    return "; ".join(problems)
