"""A Globus Compute client that submits as the caller, from the caller's dependent token.

A bring-your-own site reached through Globus Compute (``billing: byo``,
``access: globus-compute``) runs on the caller's own allocation: its
multi-user endpoint maps the submitting identity to the caller's own account.
So the service submits that caller's tasks with the Globus Compute token
Globus Auth granted it *for that caller*, never with its own. The
authorizer asks for the current token at every request, so a long-lived
client keeps working across the dependent token's renewals.
"""

from __future__ import annotations

from typing import Any

from tpm_fed.service.dependent_tokens import COMPUTE_RESOURCE_SERVER, DependentTokens


def compute_client_for(tokens: DependentTokens, identity: str) -> Any:
    """A ``globus_compute_sdk.Client`` whose every call carries ``identity``'s dependent token."""
    from globus_compute_sdk import Client

    return Client(authorizer=_authorizer(tokens, identity), do_version_check=False)


def _authorizer(tokens: DependentTokens, identity: str) -> Any:
    from globus_sdk.authorizers import GlobusAuthorizer

    class OnBehalfAuthorizer(GlobusAuthorizer):
        def get_authorization_header(self) -> str:
            return f"Bearer {tokens.token_for(identity, COMPUTE_RESOURCE_SERVER).access_token}"

        def handle_missing_authorization(self) -> bool:
            return False  # a refused token is the caller's to renew (tpm login), not ours

    return OnBehalfAuthorizer()
