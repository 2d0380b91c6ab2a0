"""Service units: prices, and the ledger that reserves and settles them exactly once."""

from tpm_fed.ledger.ledger import Balance, Charge, Hold, Ledger, LedgerConflict
from tpm_fed.ledger.pricing import Metered, estimate_usu, node_ms_used, node_time_bound_usu, price_usu

__all__ = ["Balance", "Charge", "Hold", "Ledger", "LedgerConflict", "Metered", "estimate_usu", "node_ms_used", "node_time_bound_usu",
           "price_usu"]
