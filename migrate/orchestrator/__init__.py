"""Live migration: `migrate run`, its phases, convergence policy and rollback."""
