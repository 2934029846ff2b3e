"""Prefect flows: orchestration only; the work lives in components/."""

from components.prefect_server import ensure_ephemeral_timeout

# Before Prefect reads its settings: a flow run with no server gives Prefect's temporary one time to
# migrate a fresh database (a first run on a cold machine takes longer than Prefect's 20 s).
ensure_ephemeral_timeout()
