"""Check a live Globus Compute endpoint end to end: what the offline tests cannot.

It uses nothing of tpm-fed's client side but the request and model types:
plain ``globus_compute_sdk.Executor`` calls, as a scientist's script would
make them. On the endpoint (which must have this tpm-fed installed):

1. makes the small demo model in ``--endpoint-folder`` (``~/.tpm-live`` on
   the worker by default) and reads back its version (two functions
   submitted by value);
2. registers ``functions.serve.serve_batch`` (or uses ``--function-id``) and
   submits a greedy generation to it by id, with your
   ``--user-endpoint-config`` for a multi-user endpoint;
3. runs the same batch through Parsl's ``GlobusComputeExecutor``;
4. sends a request the worker must refuse (a prompt past the model's
   context) and a batch expecting other serving code, and checks both come
   back as typed errors.

Usage:
    tpm login
    python scripts/live_endpoint.py --endpoint UUID [--function-id UUID]
        [--user-endpoint-config '{"account": "m0000", "walltime": "00:30:00"}']
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid


def make_model_at_endpoint(folder: str) -> str:
    """Runs on the endpoint: the demo model (made once), and its path there."""
    from pathlib import Path

    from tpm_fed.models.demo import make_demo_model

    path = Path(folder).expanduser() / "demo"
    if not (path / "config.json").exists():
        make_demo_model(path, progress=False)
    return str(path)


def model_version_at_endpoint(path: str) -> str:
    """Runs on the endpoint: the content hash that names the model's version."""
    from pathlib import Path

    from tpm_fed.protocol.versions import hash_model_dir

    return hash_model_dir(Path(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="the endpoint's UUID")
    parser.add_argument("--function-id", default=None, help="serve_batch's registered id (registered if absent)")
    parser.add_argument("--user-endpoint-config", default=None, help="JSON for a multi-user endpoint")
    parser.add_argument("--endpoint-folder", default="~/.tpm-live", help="where the worker keeps the demo model")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for each answer")
    args = parser.parse_args(argv)
    try:
        endpoint_id = str(uuid.UUID(args.endpoint))
    except ValueError:
        parser.error(f"--endpoint: {args.endpoint!r} is not a UUID")
    user_config = json.loads(args.user_endpoint_config) if args.user_endpoint_config else None

    from globus_compute_sdk import Executor

    from functions.serve import serve_batch
    from tpm_fed.protocol.code_version import serving_code_version
    from tpm_fed.globus_auth import compute_client
    from tpm_fed.protocol.model import ModelSpec
    from tpm_fed.protocol.requests import GenerationRequest
    from tpm_fed.sites.json_results import JSON_RESULTS, json_results_serializer

    client = compute_client()  # NotLoggedIn: run `tpm login`
    checks: list[tuple[str, bool, str]] = []
    # Results come back as JSON and are read only as JSON, as the service reads them (docs/security.md).
    with Executor(endpoint_id=endpoint_id, client=client, user_endpoint_config=user_config,
                  serializer=json_results_serializer("live"), result_serializers=[JSON_RESULTS]) as executor:
        started = time.perf_counter()
        print("[1/4] making the demo model at the endpoint (cold start may queue for nodes) ...", flush=True)
        path = executor.submit(make_model_at_endpoint, args.endpoint_folder).result(timeout=args.timeout)
        version = executor.submit(model_version_at_endpoint, path).result(timeout=args.timeout)
        print(f"      {path} version {version} ({time.perf_counter() - started:.1f} s)")

        function_id = args.function_id or client.register_function(serve_batch)
        print(f"[2/4] serve_batch by registered id {function_id}", flush=True)
        spec = ModelSpec(name="demo", version=version, path=path, backend="torch").to_wire()
        request = GenerationRequest.create(["The telescope", "A star"], "demo", max_new_tokens=8).to_wire()
        context = {"code_version": serving_code_version()}
        started = time.perf_counter()
        reply = executor.submit_to_registered_function(
            function_id, args=(spec, [request], context)
        ).result(timeout=args.timeout)
        outcome = reply["outcomes"][0]
        served = "result" in outcome
        checks.append(("serve_batch by id", served, json.dumps(outcome)[:200]))
        print(f"      {time.perf_counter() - started:.1f} s, replica {reply['replica']}")

        print("[3/4] refusals come back typed", flush=True)
        too_long = GenerationRequest.create(["word " * 5000], "demo", max_new_tokens=4).to_wire()
        reply = executor.submit_to_registered_function(
            function_id, args=(spec, [too_long], context)
        ).result(timeout=args.timeout)
        error = reply["outcomes"][0].get("error", {})
        checks.append(("prompt past the context", error.get("type") == "ContextLengthExceeded", str(error)))
        reply = executor.submit_to_registered_function(
            function_id, args=(spec, [request], {"code_version": "0000000000000000"})
        ).result(timeout=args.timeout)
        error = reply["outcomes"][0].get("error", {})
        checks.append(("other serving code", error.get("type") == "CodeVersionMismatch", str(error)))

    print("[4/4] the same batch through Parsl's GlobusComputeExecutor", flush=True)
    parsl_executor = Executor(endpoint_id=endpoint_id, client=client, user_endpoint_config=user_config,
                              serializer=json_results_serializer("live"), result_serializers=[JSON_RESULTS])
    checks.append(_through_parsl(parsl_executor, spec, request, context, outcome, args.timeout))

    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def _through_parsl(executor, spec, request, context, expected, timeout) -> tuple[str, bool, str]:
    import parsl
    from parsl import python_app
    from parsl.config import Config
    from parsl.executors import GlobusComputeExecutor

    @python_app
    def serve(model, requests, context):
        from functions.serve import serve_batch

        return serve_batch(model, requests, context)

    with parsl.load(Config(executors=[GlobusComputeExecutor(executor=executor)])):
        reply = serve(spec, [request], context).result(timeout=timeout)
    same, detail = same_tokens(expected, reply["outcomes"][0])
    return ("Parsl GlobusComputeExecutor", same, detail)


def served_token_ids(outcome: dict) -> list[list[int]] | None:
    """The token ids of each completion of a served outcome; None when it has none (an error, a bad reply)."""
    completions = outcome.get("result", {}).get("completions") if isinstance(outcome, dict) else None
    if not completions or not isinstance(completions, list):
        return None
    try:
        ids = [list(completion["token_ids"]) for completion in completions]
    except (KeyError, TypeError):
        return None
    return ids if all(ids) else None


def same_tokens(expected: dict, got: dict) -> tuple[bool, str]:
    """Whether two outcomes carry the same, real token ids (never true of two outcomes without any)."""
    want, have = served_token_ids(expected), served_token_ids(got)
    if want is None or have is None:
        return False, f"no token ids to compare (expected {want}, got {have})"
    return want == have, f"token ids {have}" + ("" if want == have else f", expected {want}")


if __name__ == "__main__":
    sys.exit(main())
