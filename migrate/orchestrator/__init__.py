"""Live migration: per-host agents, `migrate run`, convergence policy, rollback."""
