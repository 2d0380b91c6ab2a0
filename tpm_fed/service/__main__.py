"""``python -m tpm_fed.service``: what ``tpm serve`` runs (and what a home's first call starts)."""

from tpm_fed.service.cli import serve

if __name__ == "__main__":
    serve(prog_name="tpm serve")
